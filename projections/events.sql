-- Load one batch of the ledger into `events`. The runner registers the batch as the
-- Arrow table `batch_raw` (position, customer_id, sequence, body, has_personal), where
-- body is the sealed event's canonical JSON; DuckDB parses it once per row.

-- name: load
-- customer_id is the canonical customer (customer_aliases: merges, projections/merges.sql).
INSERT INTO events
SELECT position, coalesce(a.canonical_id, r.customer_id), sequence,
       j.event_id, j.type, j.channel, j.occurred_at, j.recorded_at, j.source,
       j.payload.order_id,
       coalesce(j.payload.total.amount, j.payload.amount.amount),
       coalesce(j.payload.total.currency, j.payload.amount.currency),
       j.payload.form_id, j.payload.ticket_id, j.payload.priority, j.payload.satisfaction,
       j.payload.purpose, j.payload.status, j.payload.direction, j.payload.outcome,
       j.payload.sentiment, j.payload.campaign_id, j.payload.bounce_type, j.payload.url,
       has_personal
FROM (
    SELECT position, customer_id, sequence, has_personal, json_transform(body, '{
        "event_id": "UUID", "type": "VARCHAR", "channel": "VARCHAR",
        "occurred_at": "TIMESTAMPTZ", "recorded_at": "TIMESTAMPTZ", "source": "VARCHAR",
        "payload": {
            "order_id": "VARCHAR",
            "total": {"amount": "DECIMAL(18,4)", "currency": "VARCHAR"},
            "amount": {"amount": "DECIMAL(18,4)", "currency": "VARCHAR"},
            "form_id": "VARCHAR", "ticket_id": "VARCHAR", "priority": "VARCHAR",
            "satisfaction": "INTEGER", "purpose": "VARCHAR", "status": "VARCHAR",
            "direction": "VARCHAR", "outcome": "VARCHAR", "sentiment": "VARCHAR",
            "campaign_id": "VARCHAR", "bounce_type": "VARCHAR", "url": "VARCHAR"
        }
    }') AS j
    FROM batch_raw
) r
LEFT JOIN customer_aliases a ON a.customer_id = r.customer_id;

-- name: affected
CREATE OR REPLACE TEMP TABLE affected AS
SELECT DISTINCT coalesce(a.canonical_id, b.customer_id) AS customer_id
FROM batch_raw b LEFT JOIN customer_aliases a ON a.customer_id = b.customer_id;

-- name: purchases
INSERT INTO purchases
SELECT customer_id, position, type, occurred_at, order_id, amount, currency
FROM events
WHERE position > $after AND type IN ('order_placed', 'order_refunded');

-- name: touches
-- $types: the event types the lifecycle rules look at (lifecycle.RELEVANT_TYPES).
-- Keyed by the event's own stream (batch_raw), not the canonical customer.
INSERT INTO touches
SELECT b.customer_id, position, CAST(event_id AS VARCHAR), type, epoch_us(occurred_at),
       form_id, direction, outcome, sentiment, satisfaction
FROM events JOIN batch_raw b USING (position)
WHERE position > $after AND type IN (SELECT unnest($types));

-- name: forgotten
INSERT INTO forgotten
SELECT customer_id, position FROM events
WHERE position > $after AND type = 'customer_forgotten';
