-- lifecycle, lifecycle_history, lifecycle_changes. The stage rules are Python
-- (src/ledger/projection/lifecycle.py, one table of rules); SQL selects their input and
-- the runner replaces the touched customers' rows.

-- name: touches
-- Every lifecycle-relevant event of each customer who has one in this batch.
SELECT customer_id, position, event_id, type, occurred_us, form_id, direction, outcome,
       sentiment, satisfaction
FROM touches
WHERE customer_id IN (SELECT DISTINCT customer_id FROM touches WHERE position > $after)
ORDER BY customer_id, position;

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
