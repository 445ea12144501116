#!/usr/bin/env bash
# The whole product in embedded mode on a fresh, throwaway LEDGER_HOME.
set -euo pipefail
cd "$(dirname "$0")/.."
LEDGER=.venv/bin/ledger
export LEDGER_HOME="${LEDGER_HOME:-.ledger-demo}"
export COLUMNS="${COLUMNS:-120}"  # tables written to files keep their width
rm -rf "$LEDGER_HOME"
mkdir -p "$LEDGER_HOME"
data="$LEDGER_HOME/touchpoints.jsonl"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "generate 50,000 touchpoints for 5,000 customers (1% duplicates, 0.5% invalid)"
$LEDGER generate --customers 5000 --events 50000 --seed 42 --duplicates 0.01 --invalid 0.005 -o "$data"

step "ingest them: valid events land, duplicates are stored once, bad lines go to the dead letters"
$LEDGER ingest "$data" || true   # exit 1 means "some lines were rejected": expected here

step "ingest the same file again: nothing new (exactly-once by event_id)"
$LEDGER ingest "$data" || true

step "what the ledger holds"
$LEDGER stats

step "verify every hash chain"
$LEDGER verify

step "build the projections (customer 360, lifecycle, RFM, churn risk)"
$LEDGER project
step "lifecycle funnel"
$LEDGER query "SELECT stage, count(*) AS customers FROM lifecycle GROUP BY stage ORDER BY customers DESC"
step "RFM segments"
$LEDGER query "SELECT segment, count(*) AS customers, round(avg(monetary), 2) AS avg_monetary FROM rfm GROUP BY segment ORDER BY customers DESC"
step "top churn risks among buyers"
$LEDGER query "SELECT customer_id, round(p_alive, 3) AS p_alive, risk_band FROM churn_risk WHERE p_alive IS NOT NULL ORDER BY p_alive LIMIT 10"

customer=$($LEDGER query "SELECT customer_id FROM customer_360 ORDER BY orders DESC, customer_id LIMIT 1" --format csv | tail -n 1 | tr -d '"')

step "one customer's timeline: $customer (decrypted; first 25 rows)"
$LEDGER history "$customer" > "$LEDGER_HOME/history.txt"
head -n 25 "$LEDGER_HOME/history.txt"
step "... and their 360 row"
$LEDGER query "SELECT customer_id, lifecycle_stage, orders, revenue, rfm_segment, churn_risk FROM customer_360 WHERE customer_id = '$customer'"

step "forget $customer (crypto-shredding), then verify again"
$LEDGER forget "$customer" --yes --reason "demo erasure request"
$LEDGER history "$customer" > "$LEDGER_HOME/history.txt"
head -n 12 "$LEDGER_HOME/history.txt"
$LEDGER verify
