"""Ingest benchmark: generated events into a SQLite ledger, beside two baselines.

    .venv/bin/python bench/ingest.py --events 1000000 --customers 100000

Runs, on the same generated events:

* ledger   - ``ingest_stream`` (what ``ledger ingest`` runs): read JSONL, validate,
             dedupe, encrypt personal fields, hash-chain, append in batches;
* idiomatic - the eventsourcing way: one ``Customer`` aggregate per customer, one
             ``save()`` per event (on the first ``--idiomatic-events`` events: at a few
             hundred events/s a million would take an hour);
* ceiling  - raw ``sqlite3.executemany`` of the same lines into a bare table, one
             transaction per batch: no validation, no crypto, no index but the rowid.

Prints events/s, peak RSS (sampled), RSS along the run (to show it is flat), and
the ratios. Generation is not timed: the events are written to a file first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import psutil

from ledger.deadletter import DeadLetters
from ledger.ingest import IngestReport, ingest_stream
from ledger.ledger import Ledger
from ledger.settings import Settings


class RssSampler:
    """Samples this process's resident memory every ``interval`` seconds."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._proc = psutil.Process()

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - start, self._proc.memory_info().rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return max(r for _, r in self.samples) / 2**20

    def along(self, points: int = 5) -> str:
        """RSS at evenly spaced moments of the run, in MB."""
        if not self.samples:
            return "-"
        idx = [round(i * (len(self.samples) - 1) / (points - 1)) for i in range(points)]
        return " ".join(f"{self.samples[i][1] / 2**20:.0f}" for i in idx)


def generate(path: Path, events: int, customers: int, seed: int) -> None:
    ledger_cli = Path(sys.executable).with_name("ledger")
    subprocess.run(
        [
            str(ledger_cli),
            "generate",
            "--customers",
            str(customers),
            "--events",
            str(events),
            "--seed",
            str(seed),
            "-o",
            str(path),
        ],
        check=True,
    )


def bench_ledger(
    path: Path, work: Path, batch: int, synchronous: str
) -> tuple[float, IngestReport, RssSampler]:
    settings = Settings(
        home=work / "ledger",
        master_key="ab" * 32,
        batch_size=batch,
        sqlite_synchronous=synchronous,  # type: ignore[arg-type]
    )
    with Ledger.open(settings) as ledger, DeadLetters(settings.rejected_dir) as dead:
        with RssSampler() as rss, path.open("rb") as fh:
            start = time.perf_counter()
            report = ingest_stream(
                ledger, fh, source=str(path), fmt="jsonl", dead_letters=dead, batch_size=batch
            )
            elapsed = time.perf_counter() - start
        verify_start = time.perf_counter()
        assert ledger.verify().ok
        print(f"  (verify of the result: {time.perf_counter() - verify_start:.1f} s)")
    return elapsed, report, rss


def bench_idiomatic(path: Path, work: Path, limit: int) -> tuple[float, int]:
    """One aggregate per customer, repository get -> command -> save() per event."""
    from eventsourcing.application import AggregateNotFoundError, Application
    from eventsourcing.domain import Aggregate, event

    class Customer(Aggregate):
        @event("Created")
        def __init__(self, customer_id: str) -> None:
            self.customer_id = customer_id
            self.touchpoints = 0

        @staticmethod
        def create_id(customer_id: str) -> Any:
            import uuid

            return uuid.uuid5(uuid.NAMESPACE_URL, f"customer/{customer_id}")

        @event("TouchpointRecorded")
        def record(self, event_id: str, type: str, occurred_at: str, data: dict[str, Any]) -> None:
            self.touchpoints += 1

    class Touchpoints(Application[Any]):
        pass

    os.environ.update(
        PERSISTENCE_MODULE="eventsourcing.sqlite",
        SQLITE_DBNAME=str(work / "idiomatic.db"),
    )
    app = Touchpoints()
    n = 0
    with path.open("rb") as fh:
        lines = [fh.readline() for _ in range(limit)]
    start = time.perf_counter()
    for line in lines:
        if not line:
            break
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        cid = str(data.get("customer_id"))
        try:
            customer = app.repository.get(Customer.create_id(cid))
        except AggregateNotFoundError:
            customer = Customer(cid)
        customer.record(
            str(data.get("event_id")), str(data.get("type")), str(data.get("occurred_at")), data
        )
        app.save(customer)
        n += 1
    return time.perf_counter() - start, n


def bench_ceiling(path: Path, work: Path, batch: int) -> tuple[float, int]:
    conn = sqlite3.connect(work / "ceiling.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE events (position INTEGER PRIMARY KEY, customer_id TEXT, type TEXT, body BLOB)"
    )
    n = 0
    start = time.perf_counter()
    with path.open("rb") as fh:
        rows: list[tuple[int, str, str, bytes]] = []
        for line in fh:
            data = orjson.loads(line) if line.startswith(b"{") else {}
            n += 1
            rows.append((n, str(data.get("customer_id")), str(data.get("type")), line))
            if len(rows) >= batch:
                conn.execute("BEGIN")
                conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", rows)
                conn.execute("COMMIT")
                rows.clear()
        if rows:
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", rows)
            conn.execute("COMMIT")
    return time.perf_counter() - start, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch", type=int, default=20_000, help="events per transaction")
    parser.add_argument("--idiomatic-events", type=int, default=20_000)
    parser.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument(
        "--writer-checkpoints",
        action="store_true",
        help="A/B: SQLite's default checkpointing (the committing writer checkpoints every "
        "1,000 WAL pages) instead of the store's background checkpointer",
    )
    parser.add_argument("--work", type=Path, default=None, help="keep files here (default: tmp)")
    args = parser.parse_args()
    if args.writer_checkpoints:
        import ledger.store.sqlite as sqlite_store

        sqlite_store.WAL_FALLBACK_PAGES = 1_000  # SQLite's default wal_autocheckpoint
        sqlite_store._Checkpointer.committed = lambda self: None  # type: ignore[method-assign]
        print("A/B: writer checkpoints (SQLite's default), no background checkpointer")

    work = args.work or Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "events.jsonl"
    if not data.exists():
        print(f"generating {args.events:,} events for {args.customers:,} customers ...")
        generate(data, args.events, args.customers, args.seed)
    print(f"input: {data} ({data.stat().st_size / 2**20:,.0f} MB)")

    if (work / "ledger").exists():
        shutil.rmtree(work / "ledger")
    print(
        f"ledger (validate + dedupe + encrypt + hash-chain + append, synchronous="
        f"{args.synchronous}) ..."
    )
    t_ledger, report, rss = bench_ledger(data, work, args.batch, args.synchronous)
    eps_ledger = report.lines / t_ledger
    if args.skip_baselines:
        print(
            f"ledger: {report.lines:,} events in {t_ledger:.1f} s = "
            f"{report.lines / t_ledger:,.0f} events/s; peak RSS {rss.peak_mb:,.0f} MB"
        )
        return
    for stale in ("ceiling.db", "idiomatic.db"):
        for p in work.glob(stale + "*"):
            p.unlink()
    print("ceiling (raw executemany into a bare table) ...")
    t_ceiling, n_ceiling = bench_ceiling(data, work, args.batch)
    eps_ceiling = n_ceiling / t_ceiling
    print(f"idiomatic eventsourcing (save() per event, first {args.idiomatic_events:,}) ...")
    t_idiom, n_idiom = bench_idiomatic(data, work, args.idiomatic_events)
    eps_idiom = n_idiom / t_idiom

    print()
    print(f"{'path':<44}{'events':>12}{'seconds':>10}{'events/s':>12}")
    print(
        f"{'ledger append (batches of ' + str(args.batch) + ')':<44}{report.lines:>12,}"
        f"{t_ledger:>10.1f}{eps_ledger:>12,.0f}"
    )
    print(
        f"{'baseline: eventsourcing save() per event':<44}{n_idiom:>12,}{t_idiom:>10.1f}"
        f"{eps_idiom:>12,.0f}"
    )
    print(
        f"{'ceiling: raw sqlite executemany':<44}{n_ceiling:>12,}{t_ceiling:>10.1f}"
        f"{eps_ceiling:>12,.0f}"
    )
    print()
    print(
        f"accepted {report.accepted:,}, duplicates {report.duplicates:,}, "
        f"rejected {report.rejected:,}"
    )
    print(f"ledger vs idiomatic: {eps_ledger / eps_idiom:,.1f}x faster")
    print(f"ledger vs ceiling:   {eps_ledger / eps_ceiling:.2f} of the raw insert rate")
    print(f"peak RSS {rss.peak_mb:,.0f} MB; RSS along the run (MB): {rss.along()}")
    size = sum(p.stat().st_size for p in (work / "ledger").glob("ledger.db*"))
    print(
        f"ledger file size {size / 2**20:,.0f} MB ({size / max(report.accepted, 1):,.0f} B/event)"
    )


if __name__ == "__main__":
    main()
