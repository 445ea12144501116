"""The adapter SDK, `ledger topics create` and `ledger publish`, against a real Tansu broker."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition
from typer.testing import CliRunner

from broker import client_settings, free_port, read_topic
from conftest import TEST_MASTER_KEY, build_event
from ledger.cli.app import app
from ledger.contract import ContractError
from ledger.ledger import LedgerError
from ledger.publisher import DeliveryError, Publisher, PublishError
from ledger.settings import Settings
from ledger.topics import create_topics, partition_count

pytestmark = pytest.mark.kafka


def _end_offsets(settings: Settings) -> int:
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka)
    try:
        tps = [TopicPartition(settings.topic_touchpoints, p) for p in range(settings.partitions)]
        return sum(consumer.end_offsets(tps).values())
    finally:
        consumer.close()


def test_published_events_are_keyed_by_customer_with_cloudevents_headers(
    kafka_settings: Settings,
) -> None:
    create_topics(kafka_settings)
    events = [build_event(f"cus_{i % 7:05d}", "order_placed") for i in range(50)]
    with Publisher(kafka_settings) as publisher:
        assert publisher.publish_many(events) == 50
        report = publisher.flush()
    assert report.ok and report.delivered == 50

    records = read_topic(kafka_settings.kafka or "", kafka_settings.topic_touchpoints)
    assert len(records) == 50
    by_id = {e["event_id"]: e for e in events}
    partitions_of: dict[bytes, set[int]] = {}
    for record in records:
        body = orjson.loads(record.value)
        sent = by_id[body["event_id"]]
        assert record.key == sent["customer_id"].encode()
        assert body["payload"]["total"] == {"amount": "19.99", "currency": "EUR"}
        headers = dict(record.headers)
        assert headers["ce_specversion"] == b"1.0"
        assert headers["ce_id"] == sent["event_id"].encode()
        assert headers["ce_source"] == b"test-adapter"
        assert headers["ce_type"] == b"com.ledger.order_placed"
        assert headers["ce_subject"] == sent["customer_id"].encode()
        assert headers["ce_time"].startswith(b"2026-03-01T12:00:00")
        partitions_of.setdefault(record.key, set()).add(record.partition)
    # One customer, one partition: their events keep their order.
    assert all(len(p) == 1 for p in partitions_of.values())


def test_invalid_event_raises_at_the_caller_naming_the_field_and_is_not_sent(
    kafka_settings: Settings,
) -> None:
    create_topics(kafka_settings)
    with Publisher(kafka_settings) as publisher:
        with pytest.raises(ContractError) as caught:
            publisher.publish(build_event(occurred_at="yesterday"))
        assert caught.value.problems[0].startswith("occurred_at:")
        good = build_event()
        bad = build_event("cus_00002", "order_placed", payload={"order_id": "o-1"})
        with pytest.raises(ContractError) as caught:
            publisher.publish_many([good, bad])
        assert any(p.startswith("events[1]: payload.total:") for p in caught.value.problems)
        assert publisher.flush().delivered == 0
    assert _end_offsets(kafka_settings) == 0


def test_unreachable_broker_is_a_clear_error_within_the_configured_time(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        kafka=f"127.0.0.1:{free_port()}",
        kafka_max_block_ms=1500,
        kafka_request_timeout_ms=1000,
    )
    started = time.monotonic()
    with pytest.raises(PublishError, match=r"cannot reach a Kafka broker at 127\.0\.0\.1"):
        Publisher(settings)
    assert time.monotonic() - started < 5


def test_missing_bootstrap_setting_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="LEDGER_KAFKA is not set"):
        Publisher(Settings(home=tmp_path, kafka=None))


def test_broker_killed_while_publishing_gives_the_caller_an_error_for_each_lost_event(
    own_broker: Any, tmp_path: Path
) -> None:
    settings = Settings(
        home=tmp_path,
        partitions=2,
        **client_settings(own_broker.bootstrap)
        | {"kafka_delivery_timeout_ms": "3000", "kafka_request_timeout_ms": "1000"},
    )
    create_topics(settings)
    publisher = Publisher(settings)
    total = 0
    killer = threading.Timer(0.3, own_broker.kill)
    killer.start()
    try:
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            try:
                publisher.publish(build_event(f"cus_{total % 50:05d}"))
            except PublishError:
                break  # the buffer stayed full past max_block_ms: also an error, not silence
            total += 1
        with pytest.raises(DeliveryError) as caught:
            publisher.flush(timeout=4)
    finally:
        killer.cancel()
        with contextlib.suppress(PublishError):
            publisher.close(timeout=0.1)
    report = caught.value.report
    assert report.failed, "a dead broker must surface as failures"
    assert report.delivered + len(report.failed) == total
    assert len({f.event_id for f in report.failed}) == len(report.failed)
    assert "not delivered" in str(caught.value)


def _cli_env(settings: Settings) -> dict[str, str]:
    env = {f"LEDGER_{k.upper()}": v for k, v in client_settings(settings.kafka or "").items()}
    env.update(
        LEDGER_HOME=str(settings.home),
        LEDGER_MASTER_KEY=TEST_MASTER_KEY,
        LEDGER_TOPIC_TOUCHPOINTS=settings.topic_touchpoints,
        LEDGER_TOPIC_DLQ=settings.topic_dlq,
        LEDGER_TOPIC_LIFECYCLE=settings.topic_lifecycle,
        LEDGER_PARTITIONS=str(settings.partitions),
    )
    return env


def test_cli_topics_create_uses_the_partition_count_asked_for(kafka_settings: Settings) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app, ["topics", "create", "--partitions", "3"], env=_cli_env(kafka_settings)
    )
    assert result.exit_code == 0, result.output
    assert "created" in result.output
    for topic in (
        kafka_settings.topic_touchpoints,
        kafka_settings.topic_dlq,
        kafka_settings.topic_lifecycle,
    ):
        assert partition_count(kafka_settings, topic) == 3
    again = runner.invoke(app, ["topics", "create"], env=_cli_env(kafka_settings))
    assert again.exit_code == 0
    assert "exists (asked for 4)" in again.output


def test_cli_publish_sends_valid_lines_and_dead_letters_the_rest(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    create_topics(kafka_settings)
    good = [build_event(f"cus_{i:05d}") for i in range(30)]
    lines = [orjson.dumps(e) for e in good]
    lines.insert(5, orjson.dumps(build_event(channel="email")))
    lines.insert(9, b"{not json")
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    csv_path = tmp_path / "events.csv"
    event_id = str(uuid.uuid4())
    csv_path.write_text(
        "event_id,customer_id,channel,type,occurred_at,source,payload.order_id,"
        "payload.total.amount,payload.total.currency\n"
        f"{event_id},cus_09999,commerce,order_placed,2026-03-02T10:00:00Z,shop,o-9,42.50,EUR\n"
    )
    runner = CliRunner()
    env = _cli_env(kafka_settings)
    result = runner.invoke(app, ["publish", str(path)], env=env)
    assert result.exit_code == 1, result.output
    assert "32" in result.output and "30" in result.output
    dead = list((kafka_settings.home / "rejected").glob("*.jsonl"))
    reasons = [orjson.loads(line) for line in dead[0].read_bytes().splitlines()]
    assert [r["line"] for r in reasons] == [6, 10]
    assert reasons[0]["reason"].startswith("channel:")

    csv_result = runner.invoke(app, ["publish", str(csv_path)], env=env)
    assert csv_result.exit_code == 0, csv_result.output

    records = read_topic(kafka_settings.kafka or "", kafka_settings.topic_touchpoints)
    ids = {orjson.loads(r.value)["event_id"] for r in records}
    assert ids == {e["event_id"] for e in good} | {event_id}


def test_cli_publish_without_broker_fails_with_a_sentence(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(orjson.dumps(build_event()) + b"\n")
    env = {
        "LEDGER_HOME": str(tmp_path),
        "LEDGER_KAFKA": f"127.0.0.1:{free_port()}",
        "LEDGER_KAFKA_MAX_BLOCK_MS": "1000",
    }
    result = CliRunner().invoke(app, ["publish", str(path)], env=env)
    assert result.exit_code == 1
    assert "cannot reach a Kafka broker" in result.output
    assert "Traceback" not in result.output


def test_deliver_reports_only_its_own_events_to_each_thread(kafka_settings: Settings) -> None:
    create_topics(kafka_settings)
    results: dict[int, int] = {}
    with Publisher(kafka_settings) as publisher:

        def request(n: int) -> None:
            events = [build_event(f"cus_{n:05d}") for _ in range(40)]
            results[n] = publisher.deliver(events).delivered

        threads = [threading.Thread(target=request, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # deliver() keeps its events out of flush()'s report: nothing is counted twice.
        assert publisher.flush().delivered == 0
    assert results == {0: 40, 1: 40, 2: 40, 3: 40}
    records = read_topic(kafka_settings.kafka or "", kafka_settings.topic_touchpoints)
    assert len(records) == 160


def test_deliver_to_a_dead_broker_names_every_event_it_sent(
    own_broker: Any, tmp_path: Path
) -> None:
    settings = Settings(
        home=tmp_path,
        partitions=2,
        **client_settings(own_broker.bootstrap)
        | {"kafka_delivery_timeout_ms": "2000", "kafka_request_timeout_ms": "1000"},
    )
    create_topics(settings)
    publisher = Publisher(settings)
    try:
        assert publisher.deliver([build_event()]).delivered == 1
        own_broker.kill()
        events = [build_event(f"cus_{i:05d}") for i in range(5)]
        with pytest.raises(DeliveryError) as caught:
            publisher.deliver(events, timeout=4)
        assert {f.event_id for f in caught.value.report.failed} == {e["event_id"] for e in events}
        assert caught.value.report.delivered == 0
    finally:
        with contextlib.suppress(PublishError):
            publisher.close(timeout=0.1)
