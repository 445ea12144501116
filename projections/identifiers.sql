-- customer_identifiers: the latest value of each identifier (email, phone, name, user_id,
-- anonymous_id, social_handle) per customer, by event time (ties: ledger position).
-- The runner decrypts the batch's personal data and registers `batch_identifiers`
-- (position, field, value). A `customer_forgotten` event erases every value recorded at
-- an earlier position; values from later events (a returning customer, new key) show again.

-- name: erase
DELETE FROM customer_identifiers i
USING (
    SELECT customer_id, max(position) AS forgotten_at_position
    FROM forgotten
    WHERE position > $after
    GROUP BY customer_id
) f
WHERE i.customer_id = f.customer_id AND i.position < f.forgotten_at_position;

-- name: merge
INSERT INTO customer_identifiers
WITH batch AS (
    SELECT position, customer_id, occurred_at FROM events WHERE position > $after
),
last_forget AS (
    SELECT customer_id, max(position) AS at_position
    FROM forgotten
    GROUP BY customer_id
)
SELECT customer_id, field,
       arg_max(value, epoch_us(occurred_at)::HUGEINT * 1000000000000 + position),
       max(occurred_at),
       arg_max(position, epoch_us(occurred_at)::HUGEINT * 1000000000000 + position)
FROM batch_identifiers b
JOIN batch e USING (position)
LEFT JOIN last_forget f USING (customer_id)
WHERE e.position > coalesce(f.at_position, 0)
GROUP BY customer_id, field
ON CONFLICT (customer_id, field) DO UPDATE SET
    value = excluded.value, occurred_at = excluded.occurred_at, position = excluded.position
WHERE excluded.occurred_at > customer_identifiers.occurred_at
   OR (excluded.occurred_at = customer_identifiers.occurred_at
       AND excluded.position > customer_identifiers.position);
