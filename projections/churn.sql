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
    FROM purchases
    WHERE type = 'order_placed' AND occurred_at <= $as_of
)
GROUP BY customer_id
ORDER BY customer_id;

-- name: engaged_all
-- Per customer, the latest action of their own (schema.sql `own_action`), when $as_of is
-- at or after every event:
-- kept in customer_facts as batches land, so a derive reads 1M rows at 10M events, not
-- every event.
SELECT customer_id, last_activity_at FROM customer_facts

-- name: engaged_as_of
-- The same as of an earlier reference date (`--as-of`): from the events up to it.
SELECT customer_id,
       max(occurred_at) FILTER (WHERE own_action(type, channel, direction)) AS last_activity_at
FROM events
WHERE occurred_at <= $as_of
GROUP BY customer_id

-- name: write
-- The CTE `engaged` is `engaged_all` or `engaged_as_of`, which the runner writes in.
-- churn_risk for every customer with an event up to $as_of: the model's scores where the
-- runner registered them (`churn_in`), else the engagement fallback: days since the last
-- own action <= $low_days low, <= $medium_days medium, beyond or never high.
INSERT INTO churn_risk
WITH engaged AS ($engaged),
measured AS (
    SELECT customer_id, last_activity_at,
           epoch_us($as_of::TIMESTAMPTZ - last_activity_at) / 86400e6 AS days_inactive
    FROM engaged
)
SELECT m.customer_id,
       CASE WHEN s.customer_id IS NULL THEN 'engagement' ELSE 'bgnbd' END,
       s.frequency, s.recency_weeks, s.age_weeks, s.p_alive, s.expected_purchases_90d,
       m.last_activity_at, m.days_inactive,
       coalesce(s.risk_band, CASE
           WHEN m.days_inactive IS NULL THEN 'high'
           WHEN m.days_inactive <= $low_days THEN 'low'
           WHEN m.days_inactive <= $medium_days THEN 'medium'
           ELSE 'high' END)
FROM measured m
LEFT JOIN churn_in s ON s.customer_id = m.customer_id;
