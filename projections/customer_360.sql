-- customer_360: one row per customer. `customer_facts` is recomputed from `events` for the
-- customers a batch touched (the `affected` temp table), so late events land correctly;
-- `customer_360_source` adds identifiers, lifecycle, RFM and churn risk, and the
-- `customer_360` table holds its rows (refreshed for the affected customers each batch,
-- and for everyone when RFM and churn risk are recomputed), so a lookup is one row read.

-- "Latest" means by event time, ties by ledger position; the pair is packed into one
-- HUGEINT key (epoch microseconds * 10^12 + position) for arg_max, twice as fast as a
-- struct key.

-- name: refresh
DELETE FROM customer_facts WHERE customer_id IN (SELECT customer_id FROM affected);

-- name: insert
INSERT INTO customer_facts
WITH mine AS (
    SELECT * FROM events WHERE customer_id IN (SELECT customer_id FROM affected)
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

-- name: source
-- The joins that make a customer_360 row (a view the runner reads from).
CREATE OR REPLACE VIEW customer_360_source AS
SELECT
    f.customer_id,
    i.email, i.phone, i.name, i.user_id, i.anonymous_id, i.social_handle,
    f.erased, f.forgotten_at,
    f.first_seen, f.last_seen, f.last_contact_at, f.last_contact_channel,
    f.events, f.web_events, f.email_events, f.chat_events, f.call_events, f.social_events,
    f.commerce_events, f.support_events, f.system_events,
    f.page_viewed, f.form_submitted, f.email_sent, f.email_opened, f.email_clicked,
    f.email_bounced, f.chat_message, f.call_completed, f.social_mention, f.order_placed,
    f.order_refunded, f.ticket_opened, f.ticket_resolved, f.consent_changed,
    f.orders, f.revenue, f.refunds, f.net_revenue, f.currencies,
    f.first_order_at, f.last_order_at, f.open_tickets,
    f.consent_email_marketing, f.consent_sms_marketing, f.consent_call_marketing,
    f.consent_tracking, f.consent_profiling,
    l.stage AS lifecycle_stage, l.since AS lifecycle_since,
    r.r_score, r.f_score, r.m_score, r.segment AS rfm_segment,
    c.method AS churn_method, c.p_alive, c.expected_purchases_90d, c.risk_band AS churn_risk
FROM customer_facts f
LEFT JOIN (
    SELECT customer_id,
           any_value(value) FILTER (WHERE field = 'email') AS email,
           any_value(value) FILTER (WHERE field = 'phone') AS phone,
           any_value(value) FILTER (WHERE field = 'name') AS name,
           any_value(value) FILTER (WHERE field = 'user_id') AS user_id,
           any_value(value) FILTER (WHERE field = 'anonymous_id') AS anonymous_id,
           any_value(value) FILTER (WHERE field = 'social_handle') AS social_handle
    FROM customer_identifiers
    GROUP BY customer_id
) i ON i.customer_id = f.customer_id
LEFT JOIN lifecycle l ON l.customer_id = f.customer_id
LEFT JOIN rfm r ON r.customer_id = f.customer_id
LEFT JOIN churn_risk c ON c.customer_id = f.customer_id;

-- name: table
CREATE TABLE IF NOT EXISTS customer_360 AS SELECT * FROM customer_360_source WITH NO DATA;

-- name: refresh_affected
DELETE FROM customer_360 WHERE customer_id IN (SELECT customer_id FROM affected);
INSERT INTO customer_360
SELECT * FROM customer_360_source WHERE customer_id IN (SELECT customer_id FROM affected);

-- name: refresh_all
-- After rfm / churn_risk are recomputed every row's scores may change.
DELETE FROM customer_360;
INSERT INTO customer_360 SELECT * FROM customer_360_source;
