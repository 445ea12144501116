"""`ledger worker project` against a real Tansu broker and PostgreSQL: killed with SIGKILL and
restarted while the ledger grows, its DuckDB tables equal a clean rebuild and the lifecycle
topic carries every transition, in order per customer, for a plain consumer group."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer
from streams.project import MESSAGE, message_json_schema

from broker import TEST_CLIENT_ENV
from conftest import TEST_MASTER_KEY
from fixtures.projection_data import assert_same_tables
from ledger.generate import generate_events
from ledger.ledger import Ledger
from ledger.projection.runner import ProjectionRunner
from ledger.projection.subscribe import iter_changes
from ledger.settings import Settings
from ledger.topics import create_topics

ROOT = Path(__file__).resolve().parents[1]
LEDGER_BIN = str(Path(sys.executable).with_name("ledger"))


def test_checked_in_schema_matches_the_message_model() -> None:
    path = ROOT / "schemas" / "topics" / "lifecycle_change.schema.json"
    assert orjson.loads(path.read_bytes()) == orjson.loads(orjson.dumps(message_json_schema()))


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [LEDGER_BIN, "worker", "project"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.mark.kafka
@pytest.mark.postgres
def test_projection_worker_killed_and_restarted_publishes_every_transition(
    kafka_settings: Settings, pg_url: str, tmp_path: Path
) -> None:
    settings = kafka_settings.model_copy(
        update={"store_url": pg_url, "home": tmp_path / "worker-home"}
    )
    create_topics(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env.update(TEST_CLIENT_ENV)
    env.update(
        LEDGER_KAFKA=settings.kafka or "",
        LEDGER_STORE_URL=pg_url,
        LEDGER_HOME=str(settings.home),
        LEDGER_MASTER_KEY=TEST_MASTER_KEY,
        LEDGER_TOPIC_LIFECYCLE=settings.topic_lifecycle,
    )
    log = tmp_path / "project.log"
    lines = list(generate_events(300, 6_000, seed=11))
    rng = random.Random(5)

    with Ledger.open(settings) as ledger:
        worker = _start(env, log)
        chunks = [lines[i : i + 500] for i in range(0, len(lines), 500)]
        kill_at = rng.randrange(len(chunks) // 2, len(chunks) - 2)
        for n, chunk in enumerate(chunks):
            ledger.append(chunk)
            time.sleep(0.15)
            if n == len(chunks) // 2 - 1:
                # Kill only once it is publishing, so the kill lands in the middle of work.
                deadline = time.monotonic() + 60
                while "published lifecycle changes" not in log.read_text():
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(0.1)
            if n == kill_at:
                worker.send_signal(signal.SIGKILL)
                worker.wait(10)
                worker = _start(env, log)
        assert worker.poll() is None, log.read_text()[-3000:]

        rebuilt_path = tmp_path / "rebuild.duckdb"
        with ProjectionRunner(ledger, rebuilt_path) as rebuild:
            rebuild.run()
            expected = list(iter_changes(rebuild.con))
        assert len(expected) > 100, "the journey should move customers through stages"

        consumer = KafkaConsumer(
            settings.topic_lifecycle,
            bootstrap_servers=settings.kafka,
            group_id=f"subscriber-{settings.consumer_group}",
            auto_offset_reset="earliest",
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
        )
        seen: dict[str, dict[str, Any]] = {}
        last_seq_of: dict[str, int] = {}
        repeats = 0
        deadline = time.monotonic() + 120
        try:
            while len(seen) < len(expected) and time.monotonic() < deadline:
                assert worker.poll() is None, log.read_text()[-3000:]
                for records in consumer.poll(timeout_ms=500).values():
                    for record in records:
                        message = MESSAGE.validate_json(record.value)
                        assert record.key == message["customer_id"].encode()
                        assert dict(record.headers)["ce_id"] == message["change_id"].encode()
                        if message["change_id"] in seen:
                            repeats += 1
                            continue
                        seen[message["change_id"]] = dict(message)
                        # One customer's transitions arrive in the order they happened.
                        customer = message["customer_id"]
                        assert message["seq"] > last_seq_of.get(customer, 0)
                        last_seq_of[customer] = message["seq"]
        finally:
            consumer.close()
        assert {c.change_id for c in expected} == set(seen), log.read_text()[-2000:]
        for change in expected:
            assert seen[change.change_id] == change.to_json()

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, log.read_text()[-3000:]
        assert "published lifecycle changes" in log.read_text()

        with ProjectionRunner(ledger, settings.projections_path) as resumed:
            assert resumed.position == ledger.position, "the worker stopped behind the ledger"
            # RFM and churn are refreshed on a timer while following: settle them once.
            resumed.refresh_derived()
            with ProjectionRunner(ledger, rebuilt_path) as rebuild:
                assert_same_tables(resumed.con, rebuild.con)


@pytest.mark.kafka
def test_example_subscriber_handles_each_change_once_in_order(kafka_settings: Settings) -> None:
    import datetime as dt
    import importlib.util

    from streams.project import LifecycleTopic

    from ledger.projection.subscribe import LifecycleChange

    spec = importlib.util.spec_from_file_location("subscriber", ROOT / "examples/subscriber.py")
    assert spec and spec.loader
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    create_topics(kafka_settings)
    when = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    stages = [(None, "subscriber"), ("subscriber", "lead"), ("lead", "customer")]
    changes = [
        LifecycleChange(seq, f"c-{seq}", "cus_00001", old, new, f"e-{seq}", seq, when, seq)
        for seq, (old, new) in enumerate(stages, start=1)
    ]
    topic = LifecycleTopic(kafka_settings)
    try:
        # A re-send after a crash: the first two again, then the third.
        topic.send(changes[:2])
        topic.send(changes)
    finally:
        topic.close()
    handled: list[dict[str, Any]] = []
    count = example.subscribe(
        kafka_settings, f"example-{kafka_settings.consumer_group}", handled.append, max_messages=3
    )
    assert count == 3
    assert [(c["from_stage"], c["to_stage"]) for c in handled] == stages
