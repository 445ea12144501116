#!/usr/bin/env bash
# The whole product in embedded mode on a fresh, throwaway LEDGER_HOME.
set -euo pipefail
cd "$(dirname "$0")/.."
LEDGER=.venv/bin/ledger
export LEDGER_HOME="${LEDGER_HOME:-.ledger-demo}"
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

customer=$($LEDGER query "SELECT customer_id FROM customer_360 ORDER BY orders DESC, customer_id LIMIT 1" --format csv 2>/dev/null | tail -1 || true)
if [ -z "$customer" ] || [ "$customer" = "customer_id" ]; then customer=cus_000001; fi

step "one customer's timeline: $customer (decrypted)"
$LEDGER history "$customer" | head -30

step "verify every hash chain"
$LEDGER verify

if $LEDGER --help | grep -q " project "; then
  step "build the projections (customer 360, lifecycle, RFM, churn risk)"
  $LEDGER project
  step "lifecycle funnel"
  $LEDGER query "SELECT stage, count(*) AS customers FROM lifecycle GROUP BY stage ORDER BY customers DESC"
  step "RFM segments"
  $LEDGER query "SELECT segment, count(*) AS customers, round(avg(monetary), 2) AS avg_monetary FROM rfm GROUP BY segment ORDER BY customers DESC"
  step "top churn risks among buyers"
  $LEDGER query "SELECT customer_id, round(p_alive, 3) AS p_alive, risk_band FROM churn_risk WHERE p_alive IS NOT NULL ORDER BY p_alive LIMIT 10"
fi

step "forget $customer (crypto-shredding), then verify again"
$LEDGER forget "$customer" --yes --reason "demo erasure request"
$LEDGER history "$customer" | head -8
$LEDGER verify
