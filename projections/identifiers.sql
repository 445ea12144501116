-- customer_identifiers: the latest value of each identifier (email, phone, name, user_id,
-- anonymous_id, social_handle) per customer, by event time (ties: ledger position).
-- A `customer_forgotten` event erases every value recorded at an earlier position; values
-- from later events (a returning customer, new key) show again.
--
-- Decryption is lazy: a sealed body names the identifiers its ciphertext holds in the clear
-- field `identifier_fields` (names, never values), so only the event holding the newest
-- value of each (customer, field) is decrypted (`candidates`; `retry` takes the next one
-- only when that one cannot be decrypted). Bodies without `identifier_fields` (appended
-- before it existed) are decrypted whole. The runner registers what it decrypted as
-- `batch_identifiers` (position, field, value).

-- name: erase
DELETE FROM customer_identifiers i
USING (
    SELECT customer_id, max(position) AS forgotten_at_position
    FROM forgotten
    WHERE position > $after
    GROUP BY customer_id
) f
WHERE i.customer_id = f.customer_id AND i.position < f.forgotten_at_position;

-- name: candidates
CREATE OR REPLACE TEMP TABLE id_meta (position BIGINT, customer_id VARCHAR, occurred_at TIMESTAMPTZ);
-- id_live: the batch's events after their customer's last forget, with their ordering key
-- (event time in microseconds * 10^12 + position). A body that names identifiers holds them
-- in its ciphertext (src/ledger/ledger.py: a body names them, `[]` for free text only,
-- exactly when it holds ciphertext); only bodies that name none (NULL, appended before the
-- field existed) are asked whether they carry ciphertext, below.
CREATE OR REPLACE TEMP VIEW id_live AS
WITH last_forget AS (
    SELECT customer_id, max(position) AS at_position
    FROM forgotten
    GROUP BY customer_id
)
SELECT b.position, coalesce(a.canonical_id, b.customer_id) AS customer_id,
       epoch_us(b.occurred_at)::HUGEINT * 1000000000000 + b.position AS key,
       b.identifier_fields
FROM batch_events b
LEFT JOIN customer_aliases a ON a.customer_id = b.customer_id
LEFT JOIN last_forget f ON f.customer_id = coalesce(a.canonical_id, b.customer_id)
WHERE b.position > coalesce(f.at_position, 0);
-- Round 1: per (customer, field) the newest event naming the field, if newer than the
-- stored value; and every body that does not name its identifiers (field NULL).
CREATE OR REPLACE TEMP TABLE id_candidates AS
WITH newest AS (
    SELECT customer_id, field, max(key) AS key
    FROM (
        SELECT customer_id, unnest(identifier_fields) AS field, key
        FROM id_live
        WHERE identifier_fields IS NOT NULL
    )
    GROUP BY customer_id, field
)
SELECT n.customer_id, n.field, CAST(n.key % 1000000000000 AS BIGINT) AS position
FROM newest n
LEFT JOIN customer_identifiers i ON i.customer_id = n.customer_id AND i.field = n.field
WHERE i.customer_id IS NULL
   OR n.key > epoch_us(i.occurred_at)::HUGEINT * 1000000000000 + i.position
UNION ALL
SELECT customer_id, NULL, position FROM id_live
WHERE identifier_fields IS NULL
  -- A semi-join inside the semi-join: when no body lacks the field (the usual case) DuckDB
  -- skips the side that reads `personal`, the ciphertext (1.39 GB at 10M events): 0.24 s
  -- instead of 0.56-0.81 s with both tests in one WHERE.
  AND position IN (SELECT position FROM batch_events
                   WHERE position IN (SELECT position FROM batch_events
                                      WHERE identifier_fields IS NULL)
                     AND personal IS NOT NULL);

-- name: retry
-- Round 2, 3, ...: for the (customer, field) pairs whose candidate held no value (its key
-- was destroyed), the next newest event naming the field.
CREATE OR REPLACE TEMP TABLE id_candidates AS
SELECT l.customer_id, f.field, CAST(max(l.key) % 1000000000000 AS BIGINT) AS position
FROM id_live l
JOIN id_failed f ON f.customer_id = l.customer_id
    AND list_contains(l.identifier_fields, f.field)
    AND l.position <> f.position
    AND l.key < (SELECT epoch_us(occurred_at)::HUGEINT * 1000000000000 + position
                 FROM batch_events WHERE position = f.position)
GROUP BY l.customer_id, f.field;

-- name: pick
-- The candidates of one round, one row per event, with what `merge` needs of the event
-- (its canonical customer and time). `fields`: the identifiers to take, a bit mask over
-- $identifier_fields (the contract's identifier names, written in by the runner: a mask
-- aggregates ~6x faster than a list); NULL: decrypt the whole body. A view, read
-- once, by `picked` (small batches, decrypted in the runner's process) or by the
-- runner's COPY to the worker processes' Parquet files (big batches: a temp table of the
-- ciphertext would hold ~340 MB at 10M events until the batch commits). Candidates are
-- grouped before the join: grouping the joined rows would hash every ciphertext.
CREATE OR REPLACE TEMP VIEW id_pick AS
WITH c AS (
    SELECT position,
           CASE WHEN bool_or(bit IS NULL) THEN NULL ELSE bit_or(1 << bit) END AS fields,
           any_value(customer_id) AS customer_id
    FROM (SELECT position, customer_id,
                 list_position($identifier_fields, field) - 1 AS bit
          FROM id_candidates)
    GROUP BY position
)
SELECT c.position, b.customer_id AS stream_id, from_base64(b.personal) AS sealed,
       unhex(replace(CAST(b.event_id AS VARCHAR), '-', '')) AS aad, c.fields,
       c.customer_id, b.occurred_at
FROM c
JOIN batch_events b ON b.position = c.position;

-- name: picked
-- One round's events for the runner to decrypt in its own process, grouped by stream (it
-- holds one stream's key at a time).
SELECT position, stream_id, sealed, aad, fields, customer_id, occurred_at
FROM id_pick
ORDER BY stream_id, position;

-- name: meta_from_files
-- Big batches: id_meta from the Parquet files the picked events were copied to ($files).
INSERT INTO id_meta
SELECT position, customer_id, occurred_at
FROM read_parquet($files, hive_partitioning = false);

-- name: picked_done
DROP VIEW id_pick;
DROP TABLE id_candidates;

-- name: merge
-- id_meta: the canonical customer and time of every event decrypted (`pick`, each round).
-- The batch's newest value per (customer, field), merged by `keep_newest`. One row per (customer, field) holds by construction: the table
-- has no PRIMARY KEY because ON CONFLICT through DuckDB's key index took 4 s for the 2.2M
-- rows of a 10M-event rebuild, this DELETE + INSERT 0.1 s.
CREATE OR REPLACE TEMP TABLE id_newest AS
WITH last_forget AS (
    SELECT customer_id, max(position) AS at_position
    FROM forgotten
    GROUP BY customer_id
)
SELECT customer_id, field,
       arg_max(value, epoch_us(occurred_at)::HUGEINT * 1000000000000 + position) AS value,
       max(occurred_at) AS occurred_at,
       arg_max(position, epoch_us(occurred_at)::HUGEINT * 1000000000000 + position)
           AS position
FROM batch_identifiers b
JOIN id_meta e USING (position)
LEFT JOIN last_forget f USING (customer_id)
WHERE e.position > coalesce(f.at_position, 0)
GROUP BY customer_id, field;

-- name: keep_newest
-- id_newest (customer_id, field, value, occurred_at, position; one row per customer and
-- field) into customer_identifiers: a value replaces the stored one if newer (event time,
-- ties by position). Used by `merge` and by merges.sql (identifiers moving to a survivor).
-- The stored rows of those (customer, field) pairs are read once (id_stored) and the
-- replaced ones deleted by rowid, stable within the transaction (matching them again by
-- customer and field cost a second scan of the table).
CREATE OR REPLACE TEMP TABLE id_stored AS
SELECT i.rowid AS old_row, i.customer_id, i.field,
       n.occurred_at > i.occurred_at
           OR (n.occurred_at = i.occurred_at AND n.position > i.position) AS replaced
FROM customer_identifiers i
JOIN id_newest n ON i.customer_id = n.customer_id AND i.field = n.field;
DELETE FROM customer_identifiers
WHERE rowid IN (SELECT old_row FROM id_stored WHERE replaced);
INSERT INTO customer_identifiers
SELECT n.* FROM id_newest n
WHERE NOT EXISTS (SELECT 1 FROM id_stored s
                  WHERE s.customer_id = n.customer_id AND s.field = n.field
                    AND NOT s.replaced);
DROP TABLE id_stored;
DROP TABLE id_newest;
