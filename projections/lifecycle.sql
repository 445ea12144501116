-- lifecycle, lifecycle_history, lifecycle_changes. The stage rules are Python
-- (src/ledger/projection/lifecycle.py, one table of rules); SQL selects their input and
-- the runner replaces the touched customers' rows.

-- name: streams
-- Every stream of each group (canonical customer and the customers merged into it) with a
-- lifecycle-relevant event or a merge in this batch.
CREATE OR REPLACE TEMP TABLE lifecycle_streams AS
WITH fresh AS (
    SELECT customer_id FROM touches WHERE position > $after
    UNION SELECT customer_id FROM customer_merges WHERE position > $after
    UNION SELECT survivor_id FROM customer_merges WHERE position > $after
),
roots AS (
    SELECT DISTINCT coalesce(a.canonical_id, f.customer_id) AS root
    FROM fresh f LEFT JOIN customer_aliases a USING (customer_id)
)
SELECT root AS customer_id FROM roots
UNION SELECT a.customer_id FROM customer_aliases a JOIN roots r ON a.canonical_id = r.root;

-- name: resume
-- The customers whose stage machine can resume where the stored state left it: no merge
-- involves them, and each of the batch's touches comes after (in event-time order, ties by
-- position) every touch before it, so folding them onto the stored stage gives what a
-- refold of the whole timeline would. Their history rows are appended, not rewritten.
-- last_order_us, last_occurred_us, last_position: the fold state after the earlier touches.
CREATE OR REPLACE TEMP TABLE lifecycle_resume AS
WITH mine AS (
    SELECT customer_id, position, type, occurred_us,
           occurred_us::HUGEINT * 1000000000000 + position AS key
    FROM touches
    WHERE customer_id IN (SELECT customer_id FROM lifecycle_streams)
      AND customer_id NOT IN (SELECT customer_id FROM customer_merges
                              UNION SELECT survivor_id FROM customer_merges)
),
ordered AS (
    SELECT *, max(key) OVER (PARTITION BY customer_id ORDER BY position
                             ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before_key
    FROM mine
),
resumable AS (
    SELECT customer_id,
           arg_max(occurred_us, key) FILTER (WHERE position <= $after) AS last_occurred_us,
           arg_max(position, key) FILTER (WHERE position <= $after) AS last_position,
           max(occurred_us) FILTER (WHERE position <= $after AND type = 'order_placed')
               AS last_order_us
    FROM ordered
    GROUP BY customer_id
    HAVING count(*) FILTER (WHERE position > $after) > 0
       AND bool_and(before_key IS NULL OR key > before_key) FILTER (WHERE position > $after)
)
SELECT r.customer_id, l.stage, coalesce(l.transitions, 0) AS transitions, r.last_order_us,
       r.last_occurred_us, r.last_position
FROM resumable r
LEFT JOIN lifecycle l ON l.customer_id = r.customer_id;

-- name: resumed
SELECT customer_id, stage, transitions, last_order_us, last_occurred_us, last_position
FROM lifecycle_resume;

-- name: input
-- Every touch of the streams, except the earlier touches of customers that resume; root:
-- the canonical customer (the runner cuts big batches into partitions by it).
SELECT t.customer_id, t.position, t.event_id, t.type, t.occurred_us, t.form_id,
       t.direction, t.outcome, t.sentiment, t.satisfaction,
       coalesce(a.canonical_id, t.customer_id) AS root
FROM touches t
LEFT JOIN customer_aliases a ON a.customer_id = t.customer_id
WHERE t.customer_id IN (SELECT customer_id FROM lifecycle_streams)
  AND (t.position > $after
       OR t.customer_id NOT IN (SELECT customer_id FROM lifecycle_resume));

-- name: input_bound
-- At least as many rows as `input` (what sizes a big batch's partitions), cheaper to count.
SELECT count(*) FROM touches
WHERE customer_id IN (SELECT customer_id FROM lifecycle_streams);

-- name: merges
SELECT customer_id, survivor_id, position FROM customer_merges
WHERE customer_id IN (SELECT customer_id FROM lifecycle_streams)
ORDER BY position;

-- name: clear
-- Customers refolded whole lose their rows; customers that resumed keep their history and
-- only get new steps (`appended`).
DELETE FROM lifecycle_history
WHERE customer_id IN (SELECT customer_id FROM history_batch WHERE NOT appended);
DELETE FROM lifecycle WHERE customer_id IN (SELECT customer_id FROM history_batch);

-- name: number
-- The batch's new changes (changes_found: from every partition's fold), numbered after
-- $seq in ledger-position order (k: order within one position).
CREATE OR REPLACE TEMP TABLE changes_batch AS
SELECT $seq + row_number() OVER (ORDER BY ledger_position, k) AS seq,
       change_id, customer_id, from_stage, to_stage, event_id, event_position, occurred_at,
       ledger_position
FROM changes_found;

-- name: write
INSERT INTO lifecycle_history
SELECT customer_id, step, change_id::UUID, from_stage, to_stage, event_id::UUID,
       event_position, occurred_at
FROM history_batch WHERE step > 0;
INSERT INTO lifecycle
SELECT customer_id, arg_max(to_stage, step), arg_max(from_stage, step),
       arg_max(occurred_at, step), arg_max(change_id, step)::UUID,
       arg_max(event_id, step)::UUID, max(step)
FROM history_batch WHERE step > 0
GROUP BY customer_id;
INSERT INTO lifecycle_changes
SELECT seq, change_id::UUID, customer_id, from_stage, to_stage, event_id::UUID,
       event_position, occurred_at, ledger_position
FROM changes_batch
ORDER BY seq;
