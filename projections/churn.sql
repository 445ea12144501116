-- churn_risk inputs. BG/NBD (Fader, Hardie & Lee 2005) is fitted in Python (scipy) on
-- each purchasing customer's purchase history aggregated by UTC day, as of $as_of:
--   frequency (x)      = distinct purchase days - 1 (repeat purchase days)
--   recency_weeks (t_x) = weeks from the first to the last purchase day
--   age_weeks (T)       = weeks from the first purchase day to the day of $as_of
-- Time unit: weeks (7 days), as in the paper.

-- name: summary
SELECT customer_id,
       count(DISTINCT d) - 1 AS frequency,
       date_diff('day', min(d), max(d)) / 7.0 AS recency_weeks,
       date_diff('day', min(d), CAST(timezone('UTC', $as_of::TIMESTAMPTZ) AS DATE)) / 7.0
           AS age_weeks
FROM (
    SELECT customer_id, CAST(timezone('UTC', occurred_at) AS DATE) AS d
    FROM events
    WHERE type = 'order_placed' AND occurred_at <= $as_of
)
GROUP BY customer_id
ORDER BY customer_id;

-- name: engagement
-- Every customer's last engagement up to $as_of: the last event the customer did
-- themselves (not email_sent / email_bounced, not outbound chat or calls, not system
-- events). The fallback rule for customers the model does not score uses it.
SELECT customer_id,
       max(occurred_at) FILTER (WHERE type NOT IN ('email_sent', 'email_bounced')
                                  AND channel <> 'system'
                                  AND coalesce(direction, 'inbound') = 'inbound')
           AS last_activity_at
FROM events
WHERE occurred_at <= $as_of
GROUP BY customer_id
ORDER BY customer_id;
