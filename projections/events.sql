-- Load one batch of the ledger into `events` and the slices the other projections read.
-- The runner fills the temp table `batch_events` (one row per event, the columns below)
-- either by parsing the sealed bodies of the ledger (`parse`: DuckDB parses the canonical
-- JSON once per row) or from the columnar copy of the log (`from_copy`: Parquet segments
-- holding exactly these columns, written by `parse` batches; see
-- src/ledger/projection/segments.py). Personal data stays ciphertext (`personal`);
-- `identifier_fields` names the identifiers inside it (NULL: not recorded, decrypt to know).

-- name: parse
-- batch_raw: (position, customer_id, sequence, body) registered by the runner.
CREATE OR REPLACE TEMP TABLE batch_events AS
SELECT position, customer_id, sequence,
       j.event_id, j.type, j.channel, j.occurred_at, j.recorded_at, j.source,
       j.payload.order_id AS order_id,
       coalesce(j.payload.total.amount, j.payload.amount.amount) AS amount,
       coalesce(j.payload.total.currency, j.payload.amount.currency) AS currency,
       j.payload.form_id AS form_id, j.payload.ticket_id AS ticket_id,
       j.payload.priority AS priority, j.payload.satisfaction AS satisfaction,
       j.payload.purpose AS purpose, j.payload.status AS status,
       j.payload.direction AS direction, j.payload.outcome AS outcome,
       j.payload.sentiment AS sentiment, j.payload.campaign_id AS campaign_id,
       j.payload.bounce_type AS bounce_type, j.payload.url AS url,
       j.payload.merged_customer_id AS merged_customer_id,
       j.personal AS personal,
       j.identifier_fields AS identifier_fields
FROM (
    SELECT position, customer_id, sequence, json_transform(body, '{
        "event_id": "UUID", "type": "VARCHAR", "channel": "VARCHAR",
        "occurred_at": "TIMESTAMPTZ", "recorded_at": "TIMESTAMPTZ", "source": "VARCHAR",
        "personal": "VARCHAR", "identifier_fields": ["VARCHAR"],
        "payload": {
            "order_id": "VARCHAR",
            "total": {"amount": "DECIMAL(18,4)", "currency": "VARCHAR"},
            "amount": {"amount": "DECIMAL(18,4)", "currency": "VARCHAR"},
            "form_id": "VARCHAR", "ticket_id": "VARCHAR", "priority": "VARCHAR",
            "satisfaction": "INTEGER", "purpose": "VARCHAR", "status": "VARCHAR",
            "direction": "VARCHAR", "outcome": "VARCHAR", "sentiment": "VARCHAR",
            "campaign_id": "VARCHAR", "bounce_type": "VARCHAR", "url": "VARCHAR",
            "merged_customer_id": "VARCHAR"
        }
    }') AS j
    FROM batch_raw
);

-- name: from_copy
-- $files: Parquet segments of the columnar copy; the batch is the positions after $after.
-- A view (the runner writes the values in; a view takes no parameters): each statement
-- reads only the columns it needs, straight from the segments.
CREATE OR REPLACE TEMP VIEW batch_events AS
SELECT * FROM read_parquet($files) WHERE position > $after AND position <= $upto;

-- name: load
-- The batch's events up to position $last, which no listed segment of the columnar copy
-- holds (see `view`).
INSERT INTO events_tail
SELECT position, customer_id, sequence, event_id, type, channel, occurred_at, recorded_at,
       source, order_id, amount, currency, form_id, ticket_id, priority, satisfaction,
       purpose, status, direction, outcome, sentiment, campaign_id, bounce_type, url,
       personal IS NOT NULL
FROM batch_events
WHERE position <= $last;

-- name: view
-- `events`: the rows of `events_tail` and of the copy's segments listed in
-- `events_segments` ($segments: `read_parquet([...])` of their files, or an empty relation
-- of the same columns), with customer_id the canonical customer (customer_aliases: merges,
-- projections/merges.sql). `has_personal` (the event holds ciphertext) reads a segment's
-- ciphertext column only when asked for.
CREATE OR REPLACE VIEW events AS
SELECT e.position, coalesce(a.canonical_id, e.customer_id) AS customer_id,
       e.* EXCLUDE (position, customer_id)
FROM (
    SELECT * FROM events_tail
    UNION ALL
    SELECT position, customer_id, sequence, event_id, type, channel, occurred_at,
           recorded_at, source, order_id, amount, currency, form_id, ticket_id, priority,
           satisfaction, purpose, status, direction, outcome, sentiment, campaign_id,
           bounce_type, url, personal IS NOT NULL
    FROM $segments
) e
LEFT JOIN customer_aliases a ON a.customer_id = e.customer_id;

-- name: affected
CREATE OR REPLACE TEMP TABLE affected AS
SELECT DISTINCT coalesce(a.canonical_id, b.customer_id) AS customer_id
FROM batch_events b LEFT JOIN customer_aliases a ON a.customer_id = b.customer_id;

-- name: slices
-- The small slices of `events` that RFM, churn, tickets, consent and forget read, kept as
-- batches land (keyed by the canonical customer, like `events`).
INSERT INTO purchases
SELECT coalesce(a.canonical_id, b.customer_id), position, type, occurred_at, order_id,
       amount, currency
FROM batch_events b LEFT JOIN customer_aliases a ON a.customer_id = b.customer_id
WHERE type IN ('order_placed', 'order_refunded');
INSERT INTO ticket_events
SELECT coalesce(a.canonical_id, b.customer_id), position, type, ticket_id
FROM batch_events b LEFT JOIN customer_aliases a ON a.customer_id = b.customer_id
WHERE type IN ('ticket_opened', 'ticket_resolved');
INSERT INTO consents
SELECT coalesce(a.canonical_id, b.customer_id), position, occurred_at, purpose, status
FROM batch_events b LEFT JOIN customer_aliases a ON a.customer_id = b.customer_id
WHERE type = 'consent_changed';
INSERT INTO forgotten
SELECT coalesce(a.canonical_id, b.customer_id), position
FROM batch_events b LEFT JOIN customer_aliases a ON a.customer_id = b.customer_id
WHERE type = 'customer_forgotten';

-- name: touches
-- $types: the event types the lifecycle rules look at (lifecycle.RELEVANT_TYPES).
-- Keyed by the event's own stream, not the canonical customer.
INSERT INTO touches
SELECT customer_id, position, CAST(event_id AS VARCHAR), type, epoch_us(occurred_at),
       form_id, direction, outcome, sentiment, satisfaction
FROM batch_events
WHERE type IN (SELECT unnest($types));
