-- Identity stitching. A `customers_merged` event on the survivor's stream names the
-- merged-away customer (payload.merged_customer_id); from then on the projections show one
-- customer, the end of the chain of merges (C into B, then B into A: A), computed over every
-- event of the group, including events of a merged-away stream that arrive later. The
-- merged-away customers have no rows of their own (`customer_aliases` maps them).

-- name: record
INSERT INTO customer_merges
SELECT merged_customer_id, customer_id, position
FROM batch_events
WHERE type = 'customers_merged'
  AND merged_customer_id IS NOT NULL
  AND merged_customer_id <> customer_id
  AND position > $after;

-- name: resolve
-- The new alias map (the latest merge of a customer wins; chains followed, at most 64 deep)
-- and `merge_moved`: the aliases that are new or point elsewhere now.
CREATE OR REPLACE TEMP TABLE alias_new AS
WITH RECURSIVE edges AS (
    SELECT customer_id, arg_max(survivor_id, position) AS survivor_id
    FROM customer_merges GROUP BY customer_id
),
walk(customer_id, canonical_id, depth) AS (
    SELECT customer_id, survivor_id, 1 FROM edges
    UNION ALL
    SELECT w.customer_id, e.survivor_id, w.depth + 1
    FROM walk w JOIN edges e ON e.customer_id = w.canonical_id
    WHERE w.depth < 64
)
SELECT customer_id, arg_max(canonical_id, depth) AS canonical_id
FROM walk GROUP BY customer_id;
CREATE OR REPLACE TEMP TABLE merge_moved AS
SELECT customer_id, canonical_id FROM alias_new
EXCEPT SELECT customer_id, canonical_id FROM customer_aliases;
DELETE FROM customer_aliases;
INSERT INTO customer_aliases SELECT * FROM alias_new;

-- name: rekey
-- Rows stored under a key that is merged away now move to its canonical customer
-- (`events` keeps each event's own stream and maps it through customer_aliases).
UPDATE purchases SET customer_id = m.canonical_id
FROM merge_moved m WHERE purchases.customer_id = m.customer_id;
UPDATE forgotten SET customer_id = m.canonical_id
FROM merge_moved m WHERE forgotten.customer_id = m.customer_id;
UPDATE ticket_events SET customer_id = m.canonical_id
FROM merge_moved m WHERE ticket_events.customer_id = m.customer_id;
UPDATE consents SET customer_id = m.canonical_id
FROM merge_moved m WHERE consents.customer_id = m.customer_id;
-- The moved identifiers, newest per (survivor, field); identifiers.sql `keep_newest` then
-- merges them with the survivor's own, and `erase` applies the group's forgets.
CREATE OR REPLACE TEMP TABLE id_newest AS
SELECT m.canonical_id AS customer_id, i.field,
       arg_max(i.value, epoch_us(i.occurred_at)::HUGEINT * 1000000000000 + i.position) AS value,
       max(i.occurred_at) AS occurred_at,
       arg_max(i.position, epoch_us(i.occurred_at)::HUGEINT * 1000000000000 + i.position)
           AS position
FROM customer_identifiers i JOIN merge_moved m ON i.customer_id = m.customer_id
GROUP BY ALL;
DELETE FROM customer_identifiers
WHERE customer_id IN (SELECT customer_id FROM merge_moved);

-- name: erase
-- A forget of any member erases the group's identifiers recorded before it.
DELETE FROM customer_identifiers i
USING (
    SELECT customer_id, max(position) AS forgotten_at_position
    FROM forgotten
    WHERE customer_id IN (SELECT canonical_id FROM merge_moved)
    GROUP BY customer_id
) f
WHERE i.customer_id = f.customer_id AND i.position < f.forgotten_at_position;

-- name: affected
-- The merged-away keys (their rows are dropped) and the customers they joined: their
-- facts are recomputed whole from `events` (`recompute`), not merged with the batch's.
INSERT INTO affected
SELECT customer_id FROM merge_moved
UNION SELECT canonical_id FROM merge_moved
EXCEPT SELECT customer_id FROM affected;
INSERT INTO recompute
SELECT customer_id FROM merge_moved
UNION SELECT canonical_id FROM merge_moved;
