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

-- name: touches
SELECT customer_id, position, event_id, type, occurred_us, form_id, direction, outcome,
       sentiment, satisfaction
FROM touches
WHERE customer_id IN (SELECT customer_id FROM lifecycle_streams)
ORDER BY position;

-- name: merges
SELECT customer_id, survivor_id, position FROM customer_merges
WHERE customer_id IN (SELECT customer_id FROM lifecycle_streams)
ORDER BY position;

-- name: clear
DELETE FROM lifecycle_history WHERE customer_id IN (SELECT customer_id FROM history_batch);
DELETE FROM lifecycle WHERE customer_id IN (SELECT customer_id FROM history_batch);

-- name: write
INSERT INTO lifecycle_history
SELECT customer_id, step, change_id::UUID, from_stage, to_stage, event_id::UUID,
       event_position, occurred_at
FROM history_batch WHERE step > 0;
INSERT INTO lifecycle
SELECT customer_id, arg_max(to_stage, step), arg_max(from_stage, step),
       arg_max(occurred_at, step), arg_max(change_id, step)::UUID,
       arg_max(event_id, step)::UUID, count(*)
FROM history_batch WHERE step > 0
GROUP BY customer_id;
INSERT INTO lifecycle_changes
SELECT seq, change_id::UUID, customer_id, from_stage, to_stage, event_id::UUID,
       event_position, occurred_at, ledger_position
FROM changes_batch;
