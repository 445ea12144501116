"""A service reacting to lifecycle changes: a plain kafka-python consumer group on the
lifecycle topic (LEDGER_TOPIC_LIFECYCLE), as marketing automation or a sales alert would be.

    export LEDGER_KAFKA=127.0.0.1:9092
    python examples/subscriber.py --group sales-alerts

Each message is one transition (schemas/topics/lifecycle_change.schema.json), keyed by
customer_id, so one customer's transitions arrive in order. Delivery is at least once: the
projection worker re-sends what it was not sure had arrived after a crash, and this
consumer may see a message again after its own restart. Both are harmless here because
every change carries a deterministic ``change_id`` and a per-ledger ``seq``: a change whose
seq is not above the last one handled for that customer is a repeat.

Offsets are committed after the handler ran (at least once on this side too); a real
service would keep ``last_seq`` in its own database, in the transaction of its reaction.
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Callable
from typing import Any

import orjson
from kafka import KafkaConsumer

from ledger.settings import Settings

Handler = Callable[[dict[str, Any]], None]


def alert_sales(change: dict[str, Any]) -> None:
    if change["to_stage"] in ("sales_qualified", "opportunity"):
        print(f"sales: {change['customer_id']} is now {change['to_stage']}", flush=True)
    else:
        print(
            f"{change['customer_id']}: {change['from_stage'] or '-'} -> {change['to_stage']}",
            flush=True,
        )


def subscribe(
    settings: Settings, group: str, handle: Handler, *, max_messages: int | None = None
) -> int:
    """Consume and handle lifecycle changes until SIGINT/SIGTERM; returns how many handled."""
    consumer = KafkaConsumer(
        settings.topic_lifecycle,
        bootstrap_servers=settings.kafka,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        request_timeout_ms=settings.kafka_request_timeout_ms,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
    )
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    last_seq: dict[str, int] = {}
    handled = 0
    try:
        while not stopping and (max_messages is None or handled < max_messages):
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    change = orjson.loads(record.value)
                    if change["seq"] <= last_seq.get(change["customer_id"], 0):
                        continue  # a repeat: already handled
                    handle(change)
                    last_seq[change["customer_id"]] = change["seq"]
                    handled += 1
            consumer.commit()
    finally:
        consumer.close()
    return handled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", default="lifecycle-subscriber", help="consumer group id")
    args = parser.parse_args()
    settings = Settings()
    if not settings.kafka:
        raise SystemExit("LEDGER_KAFKA is not set: expected the Kafka bootstrap servers")
    subscribe(settings, args.group, alert_sales)


if __name__ == "__main__":
    main()
