"""Exactly-once ingestion from Kafka, proven end to end: real Tansu broker, real PostgreSQL,
`ledger worker ingest` processes killed with SIGKILL at random moments.

Each test publishes a stream with 1% re-sent duplicates and 1% invalid messages while
the workers run, and ends only when the ledger holds every partition's last offset.
Then the ledger must hold exactly the distinct valid events, at positions 1..N with no
gap, and the dead-letter topic every invalid message with its reason.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import psycopg
import pytest
from kafka import KafkaProducer
from streams.ingest import EXIT_BATCH_FAILED, tracking_name

from broker import TEST_CLIENT_ENV, read_topic
from conftest import TEST_MASTER_KEY, build_event
from ledger.contract import ContractError, parse_line
from ledger.generate import generate_events
from ledger.ledger import Ledger
from ledger.publisher import Publisher
from ledger.settings import Settings
from ledger.topics import create_topics

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

LEDGER_BIN = str(Path(sys.executable).with_name("ledger"))
FAUST_BIN = str(Path(sys.executable).with_name("faust"))
ROOT = Path(__file__).resolve().parents[1]
TYPES = ("page_viewed", "email_opened", "order_placed", "ticket_opened", "chat_message")


@dataclass
class Feed:
    """What was published: the distinct valid event ids and where each invalid message landed."""

    valid_ids: set[str] = field(default_factory=set)
    invalid: dict[tuple[int, int], bytes] = field(default_factory=dict)
    duplicates: int = 0
    #: Every message sent: valid, duplicate and invalid.
    messages: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def _invalid_message(rng: random.Random, n: int) -> bytes:
    kind = n % 4
    if kind == 0:
        return b'{"event_id": "not-a-uuid", "broken": ' + str(n).encode()
    if kind == 1:
        return orjson.dumps(build_event(f"cus_{n:05d}", channel="email"))
    if kind == 2:
        return orjson.dumps(build_event(f"cus_{n:05d}", occurred_at="2026-03-01T12:00:00"))
    return bytes(rng.randrange(256) for _ in range(20))


def publish_feed(settings: Settings, total: int, rate: float, seed: int) -> Feed:
    """Publish ``total`` valid events (+1% duplicates, +1% invalid) at about ``rate``/s."""
    feed = Feed()

    def run() -> None:
        rng = random.Random(seed)
        raw = KafkaProducer(bootstrap_servers=settings.kafka, acks="all")
        futures: list[tuple[Any, bytes]] = []
        sent: list[dict[str, Any]] = []
        try:
            with Publisher(settings) as publisher:
                started = time.monotonic()
                for i in range(total):
                    event = build_event(f"cus_{rng.randrange(2000):05d}", TYPES[i % len(TYPES)])
                    publisher.publish(event)
                    feed.valid_ids.add(event["event_id"])
                    sent.append(event)
                    if i % 100 == 50:
                        publisher.publish(rng.choice(sent))
                        feed.duplicates += 1
                    if i % 100 == 75:
                        value = _invalid_message(rng, i)
                        key = f"cus_{rng.randrange(2000):05d}".encode()
                        futures.append((raw.send(settings.topic_touchpoints, value, key), value))
                    if i % 500 == 499:
                        ahead = (i + 1) / rate - (time.monotonic() - started)
                        if ahead > 0:
                            time.sleep(ahead)
            raw.flush()
            for future, value in futures:
                meta = future.get(timeout=10)
                feed.invalid[(meta.partition, meta.offset)] = value
            feed.messages = total + feed.duplicates + len(feed.invalid)
        except BaseException as exc:
            feed.error = exc
        finally:
            raw.close()
            feed.done.set()

    threading.Thread(target=run, daemon=True).start()
    return feed


class Workers:
    """`ledger worker ingest` subprocesses, each logging to its own file."""

    def __init__(self, settings: Settings, directory: Path) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
        self.env.update(TEST_CLIENT_ENV)
        self.env.update(
            LEDGER_KAFKA=settings.kafka or "",
            LEDGER_STORE_URL=settings.store_url or "",
            LEDGER_HOME=str(settings.home),
            LEDGER_MASTER_KEY=TEST_MASTER_KEY,
            LEDGER_TOPIC_TOUCHPOINTS=settings.topic_touchpoints,
            LEDGER_TOPIC_DLQ=settings.topic_dlq,
            LEDGER_CONSUMER_GROUP=settings.consumer_group,
            LEDGER_PARTITIONS=str(settings.partitions),
            LEDGER_BATCH_SIZE="1000",
        )
        self.directory = directory
        self.logs: list[Path] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.killed: set[int] = set()

    def start(self, *, faust_cli: bool = False) -> subprocess.Popen[bytes]:
        """`ledger worker ingest`, or with ``faust_cli`` the documented alternative
        `faust -A streams.ingest worker --without-web` run from the project directory."""
        log = self.directory / f"worker-{len(self.logs)}.log"
        self.logs.append(log)
        command = [LEDGER_BIN, "worker", "ingest"]
        env = self.env
        if faust_cli:
            command = [FAUST_BIN, "-A", "streams.ingest", "worker", "--without-web", "-l", "info"]
            env = {**self.env, "PYTHONPATH": str(ROOT)}
        with log.open("wb") as out:
            process = subprocess.Popen(
                command,
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        self.killed.add(process.pid)

    def died(self) -> list[int]:
        """Exit statuses of workers that stopped without being killed by the test."""
        return [
            p.returncode
            for p in self.processes
            if p.pid not in self.killed and p.poll() is not None
        ]

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def tails(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.logs)


@pytest.fixture
def stream_settings(kafka_settings: Settings, pg_url: str) -> Settings:
    settings = kafka_settings.model_copy(update={"store_url": pg_url, "partitions": 4})
    create_topics(settings)
    return settings


@pytest.fixture
def workers(stream_settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(stream_settings, tmp_path)
    yield pool
    pool.stop_all()


def _wait(condition: Callable[[], bool], timeout: float, what: str, workers: Workers) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if workers.died():
            pytest.fail(f"a worker exited by itself ({workers.died()})\n{workers.tails()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s\n{workers.tails()}")
        time.sleep(0.05)


def _caught_up(ledger: Ledger, settings: Settings, feed: Feed) -> Callable[[], bool]:
    def check() -> bool:
        if not feed.done.is_set():
            return False
        # Offsets run from 0 without gaps (no transactions): the ledger has consumed every
        # message when the stored last offsets + 1 add up to the number published. (Tansu's
        # end offsets cannot tell: they lag by the last record batch.)
        consumed = 0
        for p in range(settings.partitions):
            last = ledger.store.tracking_position(tracking_name(settings.topic_touchpoints, p))
            consumed += 0 if last is None else last + 1
        return consumed == feed.messages

    return check


def _assert_exactly_once(ledger: Ledger, settings: Settings, feed: Feed) -> None:
    assert feed.error is None, f"publishing failed: {feed.error!r}"
    rows = []
    after = 0
    while batch := ledger.read(after, 10_000):
        rows.extend(batch)
        after = batch[-1].position
    assert [r.position for r in rows] == list(range(1, len(feed.valid_ids) + 1))
    stored_ids = [r.event_id for r in rows]
    assert len(set(stored_ids)) == len(stored_ids), "an event was stored twice"
    assert set(stored_ids) == feed.valid_ids
    assert ledger.verify().ok

    dead = read_topic(settings.kafka or "", settings.topic_dlq)
    seen: dict[tuple[int, int], Any] = {}
    for record in dead:
        headers = dict(record.headers)
        source = (
            int(headers["ledger_source_partition"]),
            int(headers["ledger_source_offset"]),
        )
        assert headers["ledger_reason"], "a dead letter without its reason"
        seen[source] = record
    # Redelivery after a crash may repeat a dead letter, never lose or invent one.
    assert set(seen) == set(feed.invalid)
    for source, record in seen.items():
        assert record.value == feed.invalid[source]


def _positions(ledger: Ledger) -> int:
    return ledger.position


def _last_assignment(log: str) -> list[str]:
    """The partitions a worker resumed at its latest assignment, from its log."""
    marker = "resumed from the ledger's offsets: "
    if marker not in log:
        return []
    line = log.rsplit(marker, 1)[1].splitlines()[0]
    return [part for part in line.strip().split(", ") if "@" in part]


def test_worker_killed_at_three_random_moments_ends_with_exactly_the_valid_events(
    stream_settings: Settings, workers: Workers
) -> None:
    seed = int(os.environ.get("LEDGER_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    total = 20_000
    with Ledger.open(stream_settings) as ledger:
        feed = publish_feed(stream_settings, total, rate=4_000, seed=seed)
        process = workers.start()
        kills = sorted(rng.uniform(0.1, 0.9) * total for _ in range(3))
        for threshold in kills:
            _wait(
                lambda t=threshold: _positions(ledger) >= t,
                90,
                f"the ledger reaching {threshold:.0f} events (seed {seed})",
                workers,
            )
            workers.kill(process)
            process = workers.start()
        _wait(_caught_up(ledger, stream_settings, feed), 120, f"catching up (seed {seed})", workers)
        assert feed.duplicates == total // 100 and len(feed.invalid) == total // 100
        _assert_exactly_once(ledger, stream_settings, feed)
        assert len(workers.processes) == 4


def publish_generated(settings: Settings, customers: int, events: int, seed: int) -> Feed:
    """`ledger generate --duplicates 0.01 --invalid 0.01` lines, sent as an adapter outside the
    SDK would (raw bytes, so the invalid ones reach the topic), keyed by customer_id."""
    feed = Feed()
    lines = list(generate_events(customers, events, seed, duplicates=0.01, invalid=0.01))

    def run() -> None:
        raw = KafkaProducer(
            bootstrap_servers=settings.kafka, acks="all", linger_ms=5, batch_size=256 * 1024
        )
        try:
            pending: list[tuple[Any, bytes]] = []
            seen: set[str] = set()
            for line in lines:
                try:
                    event_id = str(parse_line(line)["event_id"])
                except ContractError:
                    event_id = ""
                try:
                    key = str(orjson.loads(line)["customer_id"]).encode()
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    key = b"unknown"
                future = raw.send(settings.topic_touchpoints, line, key)
                if not event_id:
                    pending.append((future, line))
                elif event_id in seen:
                    feed.duplicates += 1
                else:
                    seen.add(event_id)
            raw.flush()
            for future, value in pending:
                meta = future.get(timeout=10)
                feed.invalid[(meta.partition, meta.offset)] = value
            feed.valid_ids = seen
            feed.messages = len(lines)
        except BaseException as exc:
            feed.error = exc
        finally:
            raw.close()
            feed.done.set()

    threading.Thread(target=run, daemon=True).start()
    return feed


@pytest.mark.slow
def test_100k_generated_events_with_three_kills_end_exactly_once(
    stream_settings: Settings, workers: Workers
) -> None:
    """The issue's figure: 100,000 generated lines (1% duplicates, 1% invalid), SIGKILL x3."""
    seed = 20261123
    rng = random.Random(seed)
    total = 100_000
    with Ledger.open(stream_settings) as ledger:
        feed = publish_generated(stream_settings, 10_000, total, seed)
        process = workers.start()
        for threshold in sorted(rng.uniform(0.1, 0.9) * total * 0.98 for _ in range(3)):
            _wait(lambda t=threshold: _positions(ledger) >= t, 120, f"{threshold:.0f}", workers)
            workers.kill(process)
            process = workers.start()
        _wait(_caught_up(ledger, stream_settings, feed), 180, "catching up", workers)
        # The generator's mistakes are judged by the contract: a few (an unknown field, say)
        # are valid in lenient mode and count as valid events here.
        assert feed.duplicates == total // 100 and 0.9 * total // 100 <= len(feed.invalid)
        _assert_exactly_once(ledger, stream_settings, feed)


def test_two_workers_share_partitions_and_the_survivor_takes_over(
    stream_settings: Settings, workers: Workers
) -> None:
    total = 12_000
    with Ledger.open(stream_settings) as ledger:
        first, second = workers.start(), workers.start(faust_cli=True)

        def shared() -> bool:
            held = [_last_assignment(log.read_text()) for log in workers.logs]
            return all(held) and sum(len(h) for h in held) == stream_settings.partitions

        _wait(shared, 60, "both workers getting a share of the partitions", workers)
        feed = publish_feed(stream_settings, total, rate=3_000, seed=7)
        _wait(lambda: _positions(ledger) >= total // 3, 90, "a third ingested", workers)
        workers.kill(first)
        _wait(_caught_up(ledger, stream_settings, feed), 120, "the survivor catching up", workers)
        _assert_exactly_once(ledger, stream_settings, feed)
        survivor = workers.logs[1].read_text()
        assert len(_last_assignment(survivor)) == stream_settings.partitions, survivor[-2000:]
        assert second.poll() is None


def test_a_batch_the_database_refuses_stops_the_worker_and_a_restart_loses_nothing(
    stream_settings: Settings, workers: Workers
) -> None:
    """PostgreSQL turning read-only mid-stream (a failover, say): the worker must not skip
    the batch it could not store; it exits, and its restart resumes from the ledger."""
    url = urlsplit(stream_settings.store_url or "")
    database = url.path.lstrip("/")
    admin = psycopg.connect(
        host=url.hostname, port=url.port, user=url.username, dbname="postgres", autocommit=True
    )
    total = 6_000
    try:
        with Ledger.open(stream_settings) as ledger:
            process = workers.start()
            feed = publish_feed(stream_settings, total, rate=2_000, seed=3)
            _wait(lambda: _positions(ledger) >= total // 5, 90, "a fifth ingested", workers)
        admin.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        )
        assert process.wait(60) == EXIT_BATCH_FAILED, workers.tails()
        workers.killed.add(process.pid)
        assert "a batch could not be stored" in workers.logs[0].read_text()
        admin.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        with Ledger.open(stream_settings) as ledger:
            workers.start()
            _wait(_caught_up(ledger, stream_settings, feed), 120, "catching up", workers)
            _assert_exactly_once(ledger, stream_settings, feed)
    finally:
        admin.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        admin.close()
