-- The tables the projection runner owns (DuckDB). Read by the runner at start-up;
-- every statement is idempotent. Times are TIMESTAMPTZ (the runner sets TimeZone=UTC).
-- One row per customer holds by construction (GROUP BY customer_id); the tables carry no
-- PRIMARY KEY because DuckDB's key index makes every bulk insert 2-3x slower.

-- name: schema
CREATE TABLE IF NOT EXISTS projection_state (
    id               INTEGER PRIMARY KEY CHECK (id = 1),
    position         BIGINT NOT NULL,      -- last ledger position applied to the tables below
    changes          BIGINT NOT NULL,      -- last lifecycle_changes.seq
    as_of_setting    TIMESTAMPTZ           -- --as-of given by the user; NULL = latest event time
);

-- rfm, churn_risk and churn_model are recomputed apart from the batches (in --follow, by a
-- background thread), so their state lives in its own row.
CREATE TABLE IF NOT EXISTS derived_state (
    id               INTEGER PRIMARY KEY CHECK (id = 1),
    derived_position BIGINT NOT NULL,      -- ledger position rfm / churn_* were computed at
    as_of            TIMESTAMPTZ           -- the reference date they were computed for
);

-- `events` (the ledger's clear, non-personal fields, one row per event) is a view
-- (events.sql `view`) over two parts: the segments of the columnar copy that the runner
-- loaded, read in place (`events_segments`), and the events no segment holds
-- (`events_tail`: follow mode's small batches; every event with --no-columnar). A rebuild
-- from the copy thus stores no event row: at 10M events, writing them into this file was
-- ~11 s of CPU of a ~75 s rebuild. Both parts keep each event's own stream in
-- customer_id; the view maps merged-away customers to their canonical customer.
CREATE TABLE IF NOT EXISTS events_tail (
    position         BIGINT NOT NULL,
    customer_id      VARCHAR NOT NULL,     -- the event's own stream (not re-keyed)
    sequence         BIGINT NOT NULL,
    event_id         UUID NOT NULL,
    type             VARCHAR NOT NULL,
    channel          VARCHAR NOT NULL,
    occurred_at      TIMESTAMPTZ NOT NULL,
    recorded_at      TIMESTAMPTZ NOT NULL,
    source           VARCHAR NOT NULL,
    order_id         VARCHAR,
    amount           DECIMAL(18, 4),       -- order total (order_placed) or refund (order_refunded)
    currency         VARCHAR,
    form_id          VARCHAR,
    ticket_id        VARCHAR,
    priority         VARCHAR,
    satisfaction     INTEGER,
    purpose          VARCHAR,
    status           VARCHAR,
    direction        VARCHAR,
    outcome          VARCHAR,
    sentiment        VARCHAR,
    campaign_id      VARCHAR,
    bounce_type      VARCHAR,
    url              VARCHAR,
    has_personal     BOOLEAN NOT NULL
);

-- The columnar copy's segments that `events` reads (positions first..last each; path
-- relative to this file's directory unless absolute). The runner checks them when it
-- opens the file and puts a missing one's events back into `events_tail` from the ledger.
CREATE TABLE IF NOT EXISTS events_segments (
    first            BIGINT NOT NULL,
    last             BIGINT NOT NULL,
    path             VARCHAR NOT NULL
);

-- The order facts RFM and churn read (a small slice of `events`, kept as batches land).
CREATE TABLE IF NOT EXISTS purchases (
    customer_id      VARCHAR NOT NULL,
    position         BIGINT NOT NULL,
    type             VARCHAR NOT NULL,     -- order_placed | order_refunded
    occurred_at      TIMESTAMPTZ NOT NULL,
    order_id         VARCHAR,
    amount           DECIMAL(18, 4),
    currency         VARCHAR
);

-- The events the lifecycle rules look at (a slice of `events`, kept as batches land).
-- customer_id is the event's own stream (not re-keyed by merges: the lifecycle runner
-- resolves merges as of each ledger position).
CREATE TABLE IF NOT EXISTS touches (
    customer_id      VARCHAR NOT NULL,
    position         BIGINT NOT NULL,
    event_id         VARCHAR NOT NULL,
    type             VARCHAR NOT NULL,
    occurred_us      BIGINT NOT NULL,      -- occurred_at in epoch microseconds
    form_id          VARCHAR,
    direction        VARCHAR,
    outcome          VARCHAR,
    sentiment        VARCHAR,
    satisfaction     INTEGER
);

-- Ticket opens and resolutions (open_tickets is recomputed from them for a batch's customers).
CREATE TABLE IF NOT EXISTS ticket_events (
    customer_id      VARCHAR NOT NULL,
    position         BIGINT NOT NULL,
    type             VARCHAR NOT NULL,     -- ticket_opened | ticket_resolved
    ticket_id        VARCHAR
);

-- Consent changes (the consent_* columns are recomputed from them for a batch's customers).
CREATE TABLE IF NOT EXISTS consents (
    customer_id      VARCHAR NOT NULL,
    position         BIGINT NOT NULL,
    occurred_at      TIMESTAMPTZ NOT NULL,
    purpose          VARCHAR,
    status           VARCHAR
);

-- The position of each customer's last `customer_forgotten` event.
CREATE TABLE IF NOT EXISTS forgotten (
    customer_id      VARCHAR NOT NULL,
    position         BIGINT NOT NULL
);

-- Latest value of each identifier per customer (decrypted; erased by forget).
CREATE TABLE IF NOT EXISTS customer_identifiers (
    customer_id      VARCHAR NOT NULL,
    field            VARCHAR NOT NULL,
    value            VARCHAR NOT NULL,
    occurred_at      TIMESTAMPTZ NOT NULL,
    position         BIGINT NOT NULL       -- one row per (customer_id, field), by construction
);

CREATE TABLE IF NOT EXISTS customer_facts (
    customer_id              VARCHAR NOT NULL,
    first_seen               TIMESTAMPTZ NOT NULL,
    last_seen                TIMESTAMPTZ NOT NULL,
    events                   BIGINT NOT NULL,
    web_events               BIGINT NOT NULL,
    email_events             BIGINT NOT NULL,
    chat_events              BIGINT NOT NULL,
    call_events              BIGINT NOT NULL,
    social_events            BIGINT NOT NULL,
    commerce_events          BIGINT NOT NULL,
    support_events           BIGINT NOT NULL,
    system_events            BIGINT NOT NULL,
    page_viewed              BIGINT NOT NULL,
    form_submitted           BIGINT NOT NULL,
    email_sent               BIGINT NOT NULL,
    email_opened             BIGINT NOT NULL,
    email_clicked            BIGINT NOT NULL,
    email_bounced            BIGINT NOT NULL,
    chat_message             BIGINT NOT NULL,
    call_completed           BIGINT NOT NULL,
    social_mention           BIGINT NOT NULL,
    order_placed             BIGINT NOT NULL,
    order_refunded           BIGINT NOT NULL,
    ticket_opened            BIGINT NOT NULL,
    ticket_resolved          BIGINT NOT NULL,
    consent_changed          BIGINT NOT NULL,
    orders                   BIGINT NOT NULL,
    revenue                  DECIMAL(18, 4) NOT NULL,
    refunds                  DECIMAL(18, 4) NOT NULL,
    net_revenue              DECIMAL(18, 4) NOT NULL,
    currencies               VARCHAR,
    first_order_at           TIMESTAMPTZ,
    last_order_at            TIMESTAMPTZ,
    open_tickets             BIGINT NOT NULL,
    last_contact_at          TIMESTAMPTZ,
    last_contact_channel     VARCHAR,
    consent_email_marketing  VARCHAR,
    consent_sms_marketing    VARCHAR,
    consent_call_marketing   VARCHAR,
    consent_tracking         VARCHAR,
    consent_profiling        VARCHAR,
    erased                   BOOLEAN NOT NULL,
    forgotten_at             TIMESTAMPTZ,
    -- The latest action of the customer's own (churn.sql `engaged_all`; not in customer_360).
    last_activity_at         TIMESTAMPTZ
);

CREATE TABLE IF NOT EXISTS lifecycle (
    customer_id      VARCHAR NOT NULL,
    stage            VARCHAR NOT NULL,
    previous_stage   VARCHAR,
    since            TIMESTAMPTZ NOT NULL,
    change_id        UUID NOT NULL,
    event_id         UUID NOT NULL,
    transitions      INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS lifecycle_history (
    customer_id      VARCHAR NOT NULL,
    step             INTEGER NOT NULL,     -- 1, 2, ... in event-time order
    change_id        UUID NOT NULL,
    from_stage       VARCHAR,
    to_stage         VARCHAR NOT NULL,
    event_id         UUID NOT NULL,
    event_position   BIGINT NOT NULL,
    occurred_at      TIMESTAMPTZ NOT NULL
);

-- The lifecycle-change stream: append-only, in discovery order.
CREATE TABLE IF NOT EXISTS lifecycle_changes (
    seq              BIGINT NOT NULL,      -- 1, 2, ... gap-free; resume with "after seq"
    change_id        UUID NOT NULL,
    customer_id      VARCHAR NOT NULL,
    from_stage       VARCHAR,
    to_stage         VARCHAR NOT NULL,
    event_id         UUID NOT NULL,
    event_position   BIGINT NOT NULL,
    occurred_at      TIMESTAMPTZ NOT NULL,
    ledger_position  BIGINT NOT NULL       -- the ledger position at which it became true
);

CREATE TABLE IF NOT EXISTS rfm_segments (
    r_score          INTEGER NOT NULL,
    f_score          INTEGER NOT NULL,
    m_score          INTEGER NOT NULL,
    fm_score         INTEGER NOT NULL,
    segment          VARCHAR NOT NULL,
    PRIMARY KEY (r_score, f_score, m_score)
);

CREATE TABLE IF NOT EXISTS rfm (
    customer_id      VARCHAR NOT NULL,
    as_of            TIMESTAMPTZ NOT NULL,
    last_order_at    TIMESTAMPTZ NOT NULL,
    recency_days     DOUBLE NOT NULL,
    frequency        BIGINT NOT NULL,
    monetary         DECIMAL(18, 4) NOT NULL,
    r_score          INTEGER NOT NULL,
    f_score          INTEGER NOT NULL,
    m_score          INTEGER NOT NULL,
    fm_score         INTEGER NOT NULL,
    rfm_cell         VARCHAR NOT NULL,
    segment          VARCHAR NOT NULL
);

CREATE TABLE IF NOT EXISTS churn_risk (
    customer_id            VARCHAR NOT NULL,
    method                 VARCHAR NOT NULL,   -- bgnbd | engagement
    frequency              BIGINT,             -- repeat purchase days (x)
    recency_weeks          DOUBLE,             -- t_x: first to last purchase day
    age_weeks              DOUBLE,             -- T: first purchase day to the reference date
    p_alive                DOUBLE,
    expected_purchases_90d DOUBLE,
    last_activity_at       TIMESTAMPTZ,
    days_inactive          DOUBLE,
    risk_band              VARCHAR NOT NULL    -- low | medium | high
);

CREATE TABLE IF NOT EXISTS churn_model (
    as_of            TIMESTAMPTZ NOT NULL,
    position         BIGINT NOT NULL,
    time_unit        VARCHAR NOT NULL,
    customers        BIGINT NOT NULL,
    r                DOUBLE,
    alpha            DOUBLE,
    a                DOUBLE,
    b                DOUBLE,
    log_likelihood   DOUBLE,
    converged        BOOLEAN NOT NULL,
    message          VARCHAR NOT NULL
);

-- Identity stitching: each `customers_merged` event (customer_id = the merged-away customer
-- named in its payload, survivor_id = the stream it was appended to).
CREATE TABLE IF NOT EXISTS customer_merges (
    customer_id      VARCHAR NOT NULL,
    survivor_id      VARCHAR NOT NULL,
    position         BIGINT NOT NULL
);

-- Every merged-away customer and the customer it now belongs to (the end of its chain of
-- merges). Every table except `touches` is keyed by canonical_id.
CREATE TABLE IF NOT EXISTS customer_aliases (
    customer_id      VARCHAR NOT NULL,
    canonical_id     VARCHAR NOT NULL
);

-- An action of the customer's own, what churn's engagement fallback measures from: not an
-- email sent to them or bounced, not the system channel, not an outbound chat or call.
-- One definition for customer_facts.last_activity_at (customer_360.sql) and the scan of
-- `events` for an earlier reference date (churn.sql `engaged_as_of`).
CREATE OR REPLACE MACRO own_action(type, channel, direction) AS
    type NOT IN ('email_sent', 'email_bounced')
    AND channel <> 'system'
    AND coalesce(direction, 'inbound') = 'inbound';

-- The layout version (runner.LAYOUT_VERSION): a file of another layout needs --rebuild.
CREATE TABLE IF NOT EXISTS projection_layout (version INTEGER NOT NULL);
INSERT INTO projection_layout SELECT 8 WHERE NOT EXISTS (SELECT 1 FROM projection_layout);

INSERT INTO projection_state VALUES (1, 0, 0, NULL) ON CONFLICT DO NOTHING;
INSERT INTO derived_state VALUES (1, 0, NULL) ON CONFLICT DO NOTHING;
