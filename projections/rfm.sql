-- rfm: recency, frequency, monetary per purchasing customer as of a reference date
-- ($as_of: `ledger project --as-of`, default the latest event time in the ledger).
--   recency_days = days from the last order to $as_of (fractional)
--   frequency    = orders placed up to $as_of
--   monetary     = order totals minus refunds up to $as_of
-- Scores 1-5, 5 best (most recent, most frequent, highest spend):
--   score = 1 + floor(5 * (RANK() - 1) / n), ranking from worst to best.
-- Tie-break: RANK gives tied customers the first rank of their group, so equal values
-- always share a score (the lower one); quintiles are then as equal as ties allow.
-- Segment: looked up in rfm_segments by (r, f, m); see src/ledger/projection/rfm.py.

-- name: compute
DELETE FROM rfm;
INSERT INTO rfm
WITH base AS (
    SELECT customer_id,
           max(occurred_at) FILTER (WHERE type = 'order_placed') AS last_order_at,
           count(*) FILTER (WHERE type = 'order_placed') AS frequency,
           coalesce(sum(amount) FILTER (WHERE type = 'order_placed'), 0)
             - coalesce(sum(amount) FILTER (WHERE type = 'order_refunded'), 0) AS monetary
    FROM purchases
    WHERE occurred_at <= $as_of
    GROUP BY customer_id
    HAVING count(*) FILTER (WHERE type = 'order_placed') > 0
),
measured AS (
    SELECT *, epoch_us($as_of::TIMESTAMPTZ - last_order_at) / 86400e6 AS recency_days,
           count(*) OVER () AS n
    FROM base
),
scored AS (
    SELECT *,
        1 + floor(5 * (rank() OVER (ORDER BY recency_days DESC) - 1) / n)::INTEGER AS r_score,
        1 + floor(5 * (rank() OVER (ORDER BY frequency ASC) - 1) / n)::INTEGER AS f_score,
        1 + floor(5 * (rank() OVER (ORDER BY monetary ASC) - 1) / n)::INTEGER AS m_score
    FROM measured
)
SELECT s.customer_id, $as_of, s.last_order_at, s.recency_days, s.frequency, s.monetary,
       s.r_score, s.f_score, s.m_score, g.fm_score,
       concat(s.r_score, s.f_score, s.m_score), g.segment
FROM scored s
JOIN rfm_segments g USING (r_score, f_score, m_score);
