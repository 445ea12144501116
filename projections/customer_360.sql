-- customer_360: one row per customer. `customer_facts` is recomputed from `events` for the
-- customers a batch touched (the `affected` temp table), so late events land correctly;
-- `customer_360_base` adds identifiers and lifecycle (refreshed for the affected customers
-- each batch) and the `customer_360` view joins RFM and churn risk, which are recomputed on
-- their own schedule. Snapshots hold customer_360 as a table.

-- "Latest" means by event time, ties by ledger position; the pair is packed into one
-- HUGEINT key (epoch microseconds * 10^12 + position) for arg_max, twice as fast as a
-- struct key.

-- name: refresh
DELETE FROM customer_facts WHERE customer_id IN (SELECT customer_id FROM affected);

-- name: insert
INSERT INTO customer_facts
WITH mine AS (
    SELECT customer_id, position, type, channel, occurred_at, order_id, amount, currency,
           ticket_id, purpose, status
    FROM events
    WHERE customer_id IN (SELECT customer_id FROM affected)
),
tickets AS (
    SELECT customer_id, count(*) AS open_tickets
    FROM (
        SELECT customer_id, ticket_id
        FROM mine
        WHERE type IN ('ticket_opened', 'ticket_resolved')
        GROUP BY customer_id, ticket_id
        HAVING bool_or(type = 'ticket_opened') AND NOT bool_or(type = 'ticket_resolved')
    )
    GROUP BY customer_id
)
SELECT
    m.customer_id,
    min(occurred_at),
    max(occurred_at),
    count(*),
    count(*) FILTER (WHERE channel = 'web'),
    count(*) FILTER (WHERE channel = 'email'),
    count(*) FILTER (WHERE channel = 'chat'),
    count(*) FILTER (WHERE channel = 'call'),
    count(*) FILTER (WHERE channel = 'social'),
    count(*) FILTER (WHERE channel = 'commerce'),
    count(*) FILTER (WHERE channel = 'support'),
    count(*) FILTER (WHERE channel = 'system'),
    count(*) FILTER (WHERE type = 'page_viewed'),
    count(*) FILTER (WHERE type = 'form_submitted'),
    count(*) FILTER (WHERE type = 'email_sent'),
    count(*) FILTER (WHERE type = 'email_opened'),
    count(*) FILTER (WHERE type = 'email_clicked'),
    count(*) FILTER (WHERE type = 'email_bounced'),
    count(*) FILTER (WHERE type = 'chat_message'),
    count(*) FILTER (WHERE type = 'call_completed'),
    count(*) FILTER (WHERE type = 'social_mention'),
    count(*) FILTER (WHERE type = 'order_placed'),
    count(*) FILTER (WHERE type = 'order_refunded'),
    count(*) FILTER (WHERE type = 'ticket_opened'),
    count(*) FILTER (WHERE type = 'ticket_resolved'),
    count(*) FILTER (WHERE type = 'consent_changed'),
    count(DISTINCT order_id) FILTER (WHERE type = 'order_placed'),
    coalesce(sum(amount) FILTER (WHERE type = 'order_placed'), 0),
    coalesce(sum(amount) FILTER (WHERE type = 'order_refunded'), 0),
    coalesce(sum(amount) FILTER (WHERE type = 'order_placed'), 0)
        - coalesce(sum(amount) FILTER (WHERE type = 'order_refunded'), 0),
    string_agg(DISTINCT currency, ',' ORDER BY currency),
    min(occurred_at) FILTER (WHERE type = 'order_placed'),
    max(occurred_at) FILTER (WHERE type = 'order_placed'),
    coalesce(any_value(t.open_tickets), 0),
    max(occurred_at) FILTER (WHERE channel IN ('web', 'email', 'chat', 'call', 'social')),
    arg_max(channel, epoch_us(occurred_at)::HUGEINT * 1000000000000 + position)
        FILTER (WHERE channel IN ('web', 'email', 'chat', 'call', 'social')),
    arg_max(status, epoch_us(occurred_at)::HUGEINT * 1000000000000 + position)
        FILTER (WHERE type = 'consent_changed' AND purpose = 'email_marketing'),
    arg_max(status, epoch_us(occurred_at)::HUGEINT * 1000000000000 + position)
        FILTER (WHERE type = 'consent_changed' AND purpose = 'sms_marketing'),
    arg_max(status, epoch_us(occurred_at)::HUGEINT * 1000000000000 + position)
        FILTER (WHERE type = 'consent_changed' AND purpose = 'call_marketing'),
    arg_max(status, epoch_us(occurred_at)::HUGEINT * 1000000000000 + position)
        FILTER (WHERE type = 'consent_changed' AND purpose = 'tracking'),
    arg_max(status, epoch_us(occurred_at)::HUGEINT * 1000000000000 + position)
        FILTER (WHERE type = 'consent_changed' AND purpose = 'profiling'),
    bool_or(type = 'customer_forgotten'),
    max(occurred_at) FILTER (WHERE type = 'customer_forgotten')
FROM mine m
LEFT JOIN tickets t ON t.customer_id = m.customer_id
GROUP BY m.customer_id;

-- name: base
-- customer_360_base: facts, identifiers and lifecycle (changed by batches only).
CREATE TABLE IF NOT EXISTS customer_360_base AS
SELECT f.customer_id,
       NULL::VARCHAR AS email, NULL::VARCHAR AS phone, NULL::VARCHAR AS name,
       NULL::VARCHAR AS user_id, NULL::VARCHAR AS anonymous_id, NULL::VARCHAR AS social_handle,
       f.* EXCLUDE (customer_id),
       NULL::VARCHAR AS lifecycle_stage, NULL::TIMESTAMPTZ AS lifecycle_since
FROM customer_facts f
WITH NO DATA;

-- name: refresh_affected
DELETE FROM customer_360_base WHERE customer_id IN (SELECT customer_id FROM affected);
INSERT INTO customer_360_base
WITH ids AS (
    SELECT customer_id,
           any_value(value) FILTER (WHERE field = 'email') AS email,
           any_value(value) FILTER (WHERE field = 'phone') AS phone,
           any_value(value) FILTER (WHERE field = 'name') AS name,
           any_value(value) FILTER (WHERE field = 'user_id') AS user_id,
           any_value(value) FILTER (WHERE field = 'anonymous_id') AS anonymous_id,
           any_value(value) FILTER (WHERE field = 'social_handle') AS social_handle
    FROM customer_identifiers
    WHERE customer_id IN (SELECT customer_id FROM affected)
    GROUP BY customer_id
),
stages AS (
    SELECT customer_id, stage, since FROM lifecycle
    WHERE customer_id IN (SELECT customer_id FROM affected)
)
SELECT f.customer_id, i.email, i.phone, i.name, i.user_id, i.anonymous_id, i.social_handle,
       f.* EXCLUDE (customer_id), l.stage, l.since
FROM customer_facts f
LEFT JOIN ids i ON i.customer_id = f.customer_id
LEFT JOIN stages l ON l.customer_id = f.customer_id
WHERE f.customer_id IN (SELECT customer_id FROM affected);

-- name: view
-- customer_360: the base row plus RFM and churn risk (recomputed on their own schedule).
CREATE OR REPLACE VIEW customer_360 AS
SELECT b.*,
       r.r_score, r.f_score, r.m_score, r.segment AS rfm_segment,
       c.method AS churn_method, c.p_alive, c.expected_purchases_90d, c.risk_band AS churn_risk
FROM customer_360_base b
LEFT JOIN rfm r ON r.customer_id = b.customer_id
LEFT JOIN churn_risk c ON c.customer_id = b.customer_id;
