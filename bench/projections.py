"""Projection benchmark: rebuild, SQL vs pandas, follow-mode freshness, 360 lookups.

    .venv/bin/python bench/projections.py --events 1000000 --customers 100000

Each figure is printed with its baseline, measured in the same run:

* rebuild    - ``ledger project --rebuild`` in a subprocess (events/s, peak RSS from the
               kernel's rusage): the first pass, when no columnar copy of the log exists
               yet (it reads the log and writes the copy; skipped when the copy is there
               from an earlier run), then the rebuild that reads the copy, beside (a) DuckDB
               loading the copy alone, (b) reading the log alone (``Ledger.read_raw``, the
               ceiling for anything fed by the ledger's store) and (c) a naive replay:
               ``Ledger.read`` decoded per event in Python -> Arrow -> DuckDB, no projection;
               ``--bypass`` adds a rebuild with ``--no-columnar``;
* sql/pandas - customer 360 and RFM over the same events, the projections' SQL
               (``projections/customer_360.sql`` merge, as a rebuild runs it, and
               ``projections/rfm.sql``) in an in-memory DuckDB vs the way an analyst would
               do it in pandas (groupby, crosstab, rank/qcut);
* freshness  - ``ledger project --follow`` in a subprocess while this process appends
               ``--rate`` events/s: append committed -> visible to ``ledger query`` (which
               asks the runner through its socket), p50/p99, beside the same through the
               published snapshot file; on a copy of the data set;
* lookup     - one customer's 360 row from the snapshot, p50/p99 over 1,000 random
               customers, beside the same lookup in the runner's own database file and a
               pandas ``.loc`` on an indexed frame.

The ledger is generated once into ``--home`` (not timed) and reused by later runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import psutil
import pyarrow as pa

from ledger.generate import generate_events
from ledger.ledger import Ledger
from ledger.projection import serve, snapshot
from ledger.projection.definitions import sql
from ledger.projection.query import query
from ledger.projection.rfm import segment_table
from ledger.settings import Settings

MASTER_KEY = "c" * 64


def settings_for(home: Path) -> Settings:
    return Settings(home=home, master_key=MASTER_KEY)


def env_for(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LEDGER_HOME=str(home), LEDGER_MASTER_KEY=MASTER_KEY)
    env.pop("LEDGER_STORE_URL", None)
    return env


def ledger_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ledger", *args]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def setup(home: Path, events: int, customers: int, seed: int) -> None:
    s = settings_for(home)
    with Ledger.open(s) as ledger:
        have = ledger.position
    if have >= events:
        print(f"# reusing {home}: {have:,} events", flush=True)
        return
    if have:
        raise SystemExit(f"{home} holds {have:,} events, not {events:,}: use another --home")
    print(f"# generating {events:,} events for {customers:,} customers into {home}", flush=True)
    began = time.perf_counter()
    with Ledger.open(s) as ledger:
        batch: list[bytes] = []
        for line in generate_events(customers, events, seed):
            batch.append(line)
            if len(batch) == 20_000:
                ledger.append(batch)
                batch = []
        if batch:
            ledger.append(batch)
    print(f"# generated and appended in {time.perf_counter() - began:,.0f} s", flush=True)


def run_rebuild(home: Path, events: int, *extra: str) -> dict[str, float]:
    """``ledger project --rebuild`` in a subprocess: wall time, rate and peak RSS."""
    proc = subprocess.Popen(
        ledger_cmd("project", "--rebuild", "--batch-size", "100000", *extra),
        env=env_for(home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    began = time.perf_counter()
    tree = _TreeRss(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - began
    tree.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        assert proc.stderr is not None
        raise SystemExit(f"ledger project --rebuild failed: {proc.stderr.read().decode()}")
    return {
        "seconds": seconds,
        "rate": events / seconds,
        "peak_mb": usage.ru_maxrss / 1024,
        "tree_mb": tree.peak / 2**20,
    }


class _TreeRss:
    """Peak of the summed RSS of a process and its children (the runner's worker processes),
    sampled every 20 ms: the kernel's ru_maxrss is per process, not per tree.

    Cheap on purpose: the rebuild it watches is CPU-bound on two cores. Listing the
    children walks every process in /proc (psutil, ~2 ms), so that is done every 10th
    sample; the samples between read each known process's RSS (one /proc read each).
    Walking the tree every sample took ~5 % of a core from the rebuild.
    """

    def __init__(self, pid: int):
        self.peak = 0
        self._done = threading.Event()
        self._root = psutil.Process(pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tree: list[psutil.Process] = [self._root]
        n = 0
        while not self._done.is_set():
            if n % 10 == 0:
                try:
                    tree = [self._root, *self._root.children(recursive=True)]
                except psutil.Error:
                    break
            n += 1
            total = 0
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self._done.wait(0.02)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def bench_rebuild(home: Path, events: int, bypass: bool) -> dict[str, Any]:
    copy = home / "columnar"
    if not (copy.is_dir() and any(copy.glob("events-*.parquet"))):
        # The first pass reads the log and writes the columnar copy beside it.
        cold: dict[str, float] | None = run_rebuild(home, events)
    else:
        cold = None  # the copy exists already (kept between runs: it is a cache of the log)
    rebuild = run_rebuild(home, events)
    plain = run_rebuild(home, events, "--no-columnar") if bypass else None
    files = sorted(str(f) for f in copy.glob("events-*.parquet"))
    con = duckdb.connect()
    began = time.perf_counter()
    con.execute("CREATE TEMP TABLE loaded AS SELECT * FROM read_parquet(?)", [files])
    copy_rate = events / (time.perf_counter() - began)
    con.close()
    rebuild.update(cold=cold, plain=plain, copy_rate=copy_rate)
    sample = min(events, 200_000)
    with Ledger.open(settings_for(home)) as ledger:
        began = time.perf_counter()
        after = 0
        while after < sample:
            rows = ledger.read_raw(after, 10_000)
            if not rows:
                break
            after = rows[-1].position
        read_rate = after / (time.perf_counter() - began)

        con = duckdb.connect()
        began = time.perf_counter()
        after = 0
        created = False
        while after < sample:
            batch = ledger.read(after, 10_000)
            if not batch:
                break
            decoded = pa.Table.from_pylist(
                [
                    {
                        "position": e.position,
                        "customer_id": e.customer_id,
                        "type": e.type,
                        "channel": e.channel,
                        "occurred_at": e.occurred_at,
                        "amount": (e.payload.get("total") or {}).get("amount"),
                    }
                    for e in batch
                ]
            )
            con.register("decoded", decoded)
            if created:
                con.execute("INSERT INTO naive SELECT * FROM decoded")
            else:
                con.execute("CREATE TABLE naive AS SELECT * FROM decoded")
                created = True
            after = batch[-1].position
        naive_rate = after / (time.perf_counter() - began)
        con.close()
    return {**rebuild, "read_rate": read_rate, "naive_rate": naive_rate, "sample": sample}


def pandas_360(df: pd.DataFrame) -> pd.DataFrame:
    g = df.groupby("customer_id")
    base = g.agg(
        first_seen=("occurred_at", "min"),
        last_seen=("occurred_at", "max"),
        events=("position", "size"),
    )
    by_channel = pd.crosstab(df["customer_id"], df["channel"]).add_suffix("_events")
    by_type = pd.crosstab(df["customer_id"], df["type"])
    orders = df[df["type"] == "order_placed"]
    refunds = df[df["type"] == "order_refunded"]
    money = pd.DataFrame(
        {
            "orders": orders.groupby("customer_id")["order_id"].nunique(),
            "revenue": orders.groupby("customer_id")["amount"].sum(),
            "refunds": refunds.groupby("customer_id")["amount"].sum(),
            "first_order_at": orders.groupby("customer_id")["occurred_at"].min(),
            "last_order_at": orders.groupby("customer_id")["occurred_at"].max(),
        }
    )
    contact = df[df["channel"].isin(["web", "email", "chat", "call", "social"])]
    contact = contact.sort_values(["occurred_at", "position"])
    last_contact = contact.groupby("customer_id").agg(
        last_contact_at=("occurred_at", "last"), last_contact_channel=("channel", "last")
    )
    tickets = df[df["type"].isin(["ticket_opened", "ticket_resolved"])]
    state = pd.crosstab([tickets["customer_id"], tickets["ticket_id"]], tickets["type"])
    open_ = state[(state.get("ticket_opened", 0) > 0) & (state.get("ticket_resolved", 0) == 0)]
    open_tickets = open_.groupby(level=0).size().rename("open_tickets")
    consent = df[df["type"] == "consent_changed"].sort_values(["occurred_at", "position"])
    consent_state = consent.groupby(["customer_id", "purpose"])["status"].last().unstack()
    out = (
        base.join(by_channel)
        .join(by_type)
        .join(money)
        .join(last_contact)
        .join(open_tickets)
        .join(consent_state.add_prefix("consent_"))
    )
    out["revenue"] = out["revenue"].fillna(0)
    out["refunds"] = out["refunds"].fillna(0)
    out["net_revenue"] = out["revenue"] - out["refunds"]
    out["open_tickets"] = out["open_tickets"].fillna(0)
    return out


def pandas_rfm(df: pd.DataFrame, as_of: pd.Timestamp, segments: pd.DataFrame) -> pd.DataFrame:
    money = df[df["type"].isin(["order_placed", "order_refunded"]) & (df["occurred_at"] <= as_of)]
    orders = money[money["type"] == "order_placed"]
    g = orders.groupby("customer_id")
    rfm = pd.DataFrame({"last_order_at": g["occurred_at"].max(), "frequency": g.size()})
    signed = np.where(money["type"] == "order_placed", money["amount"], -money["amount"])
    rfm["monetary"] = pd.Series(signed, index=money.index).groupby(money["customer_id"]).sum()
    rfm["recency_days"] = (as_of - rfm["last_order_at"]).dt.total_seconds() / 86400
    n = len(rfm)
    # Same scores as the SQL: ties share the lowest rank of their group.
    rfm["r_score"] = 1 + (
        5 * (rfm["recency_days"].rank(method="min", ascending=False) - 1) // n
    ).astype(int)
    rfm["f_score"] = 1 + (5 * (rfm["frequency"].rank(method="min") - 1) // n).astype(int)
    rfm["m_score"] = 1 + (5 * (rfm["monetary"].rank(method="min") - 1) // n).astype(int)
    return rfm.reset_index().merge(segments, on=["r_score", "f_score", "m_score"])


def timed(fn: Any, repeat: int = 3) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        began = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - began)
    return best, result


def bench_sql_vs_pandas(home: Path) -> dict[str, Any]:
    with duckdb.connect(str(settings_for(home).projections_path), read_only=True) as src:
        events = src.sql("SELECT * FROM events").to_arrow_table()
        as_of = src.execute("SELECT as_of FROM derived_state").fetchall()[0][0]
    mem = duckdb.connect()
    mem.execute("SET TimeZone = 'UTC'")
    mem.execute(sql("schema", "schema"))
    mem.register("events_in", events)
    # In the runner `events` is a view over the columnar copy; here, one table in memory.
    mem.execute("CREATE TABLE events AS SELECT * FROM events_in")
    # The runner keeps the order facts as batches land; load them as it would have.
    mem.execute(
        "INSERT INTO purchases SELECT customer_id, position, type, occurred_at, order_id, "
        "amount, currency FROM events WHERE type IN ('order_placed', 'order_refunded')"
    )
    mem.unregister("events_in")
    mem.register("segments_in", segment_table())
    mem.execute("INSERT INTO rfm_segments SELECT * FROM segments_in")
    # The runner's path for customer 360 (what a rebuild runs): the events aggregated per
    # customer and merged into customer_facts (projections/customer_360.sql merge, after the
    # batch's customers, events.sql affected),
    # over the batch as a view on `events`; no customer re-keyed by a merge.
    mem.execute("CREATE OR REPLACE TEMP VIEW batch_events AS SELECT * FROM events")
    mem.execute("CREATE OR REPLACE TEMP TABLE recompute (customer_id VARCHAR)")
    # The analyst's frame: the columns the pandas code uses, money as floats.
    df = mem.sql(
        "SELECT position, customer_id, type, channel, occurred_at, order_id, "
        "amount::DOUBLE AS amount, ticket_id, purpose, status FROM events"
    ).df()
    del events

    def sql_360() -> int:
        mem.execute("DELETE FROM customer_facts; DELETE FROM ticket_events; DELETE FROM consents")
        # The slices the merge reads for open tickets and consent (timed: the runner
        # builds them per batch).
        mem.execute(
            "INSERT INTO ticket_events SELECT customer_id, position, type, ticket_id "
            "FROM events WHERE type IN ('ticket_opened', 'ticket_resolved')"
        )
        mem.execute(
            "INSERT INTO consents SELECT customer_id, position, occurred_at, purpose, status "
            "FROM events WHERE type = 'consent_changed'"
        )
        mem.execute(sql("events", "affected"))
        mem.execute(sql("customer_360", "merge"))
        return int(mem.execute("SELECT count(*) FROM customer_facts").fetchall()[0][0])

    def sql_rfm() -> int:
        mem.execute(sql("rfm", "compute"), {"as_of": as_of})
        return int(mem.execute("SELECT count(*) FROM rfm").fetchall()[0][0])

    segments = segment_table().to_pandas()[["r_score", "f_score", "m_score", "segment"]]
    stamp = pd.Timestamp(as_of)
    t_sql_360, n_sql_360 = timed(sql_360)
    t_pd_360, pd_360 = timed(lambda: pandas_360(df))
    t_sql_rfm, n_sql_rfm = timed(sql_rfm)
    t_pd_rfm, pd_rfm = timed(lambda: pandas_rfm(df, stamp, segments))
    assert n_sql_360 == len(pd_360), (n_sql_360, len(pd_360))
    assert n_sql_rfm == len(pd_rfm), (n_sql_rfm, len(pd_rfm))
    same = mem.execute("SELECT customer_id, segment FROM rfm").df().set_index("customer_id")
    both = same.join(pd_rfm.set_index("customer_id")["segment"].rename("segment_pandas"))
    agree = (both["segment"] == both["segment_pandas"]).mean()
    mem.close()
    return {
        "rows": len(df),
        "sql_360": t_sql_360,
        "pandas_360": t_pd_360,
        "sql_rfm": t_sql_rfm,
        "pandas_rfm": t_pd_rfm,
        "rfm_agree": float(agree),
    }


def _stop_if_exited(follower: subprocess.Popen[bytes]) -> None:
    """End the benchmark with the follower's own error once it has exited."""
    if follower.poll() is not None:
        assert follower.stderr is not None
        raise SystemExit(
            f"the follower exited ({follower.returncode}): "
            f"{follower.stderr.read().decode()[-2000:]}"
        )


def bench_freshness(home: Path, rate: int, seconds: float) -> dict[str, Any]:
    copy = home.with_name(home.name + "-fresh")
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for name in ("ledger.db", "projections.duckdb"):
        shutil.copy2(home / name, copy / name)
    s = settings_for(copy)
    # Generated before the clock starts: making up events (~60 us each) is the data
    # source's work, not the ledger's, and on two cores it took a third of one from the
    # runner being measured. Appending them (validate, seal, commit) stays in the loop.
    # 20,000 new customers, fewer for a short run: each needs at least one of its events.
    appended = int(rate * seconds) + 1_000
    lines = iter(list(generate_events(min(20_000, appended // 4), appended, seed=99)))
    follower = subprocess.Popen(
        ledger_cmd("project", "--follow", "--batch-size", "100000"),
        env=env_for(copy),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    committed: list[tuple[int, float]] = []
    seen_by: dict[str, list[tuple[int, float]]] = {"socket": [], "snapshot": []}
    try:
        deadline = time.monotonic() + 300
        while not (serve.socket_path(s).exists() and snapshot.snapshot_path(s).exists()):
            _stop_if_exited(follower)
            if time.monotonic() > deadline:
                raise SystemExit("the follower did not start serving within 300 s")
            time.sleep(0.1)
        stop = threading.Event()

        def read_socket() -> None:
            # What `ledger query` reads: the runner, through its socket. Each query costs the
            # runner ~2.3 ms of CPU (measured on an idle follower, 1,000 queries): asked
            # every 5 ms this probe took about a third of a core from the batches it times.
            # Every 20 ms it takes a tenth; the coarser poll can only add to a latency.
            while not stop.is_set():
                got = query("SELECT position FROM projection_state", s)
                seen_by["socket"].append((int(got.column(0)[0].as_py()), time.perf_counter()))
                time.sleep(0.02)

        def read_snapshot() -> None:
            # Opening the snapshot file costs ~27 ms of CPU: polled every 50 ms this baseline
            # probe took a third of a core from the two that the runner, the appender and the
            # socket probe share. Its latencies are seconds; 250 ms is resolution enough.
            while not stop.is_set():
                with snapshot.connect(s) as con:
                    position = con.execute("SELECT position FROM projection_state").fetchall()
                seen_by["snapshot"].append((int(position[0][0]), time.perf_counter()))
                time.sleep(0.25)

        tick = 0.05
        per_tick = max(1, int(rate * tick))
        readers = [threading.Thread(target=read_socket), threading.Thread(target=read_snapshot)]
        with Ledger.open(s) as ledger:
            for reader in readers:
                reader.start()
            began = time.perf_counter()
            n = 0
            while time.perf_counter() - began < seconds:
                result = ledger.append([next(lines) for _ in range(per_tick)])
                if result.last_position is not None:
                    committed.append((result.last_position, time.perf_counter()))
                n += 1
                pause = began + n * tick - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
            achieved = per_tick * len(committed) / (time.perf_counter() - began)
            last = committed[-1][0]
            while max((p for p, _ in seen_by["snapshot"]), default=0) < last:
                if time.monotonic() > deadline + seconds + 120:
                    break
                _stop_if_exited(follower)
                time.sleep(0.1)
        stop.set()
        for reader in readers:
            reader.join()
    finally:
        follower.terminate()
        follower.wait(60)
        shutil.rmtree(copy, ignore_errors=True)
    out: dict[str, Any] = {"rate": achieved, "appends": len(committed)}
    for path, marks in seen_by.items():
        latencies = []
        for position, at in committed:
            seen_at = next((t for p, t in marks if p >= position and t >= at), None)
            if seen_at is not None:
                latencies.append(seen_at - at)
        if not latencies:
            raise SystemExit(f"no reads through the {path} saw the appends ({len(marks)} reads)")
        out[path] = (pct(latencies, 50), pct(latencies, 99), len(latencies))
    return out


def bench_lookup(home: Path, n: int = 1_000) -> dict[str, Any]:
    s = settings_for(home)
    rng = random.Random(5)
    with snapshot.connect(s) as con:
        ids = [r[0] for r in con.execute("SELECT customer_id FROM customer_360").fetchall()]
        picks = [rng.choice(ids) for _ in range(n)]

        def run(c: duckdb.DuckDBPyConnection, table: str) -> list[float]:
            out = []
            for customer in picks:
                began = time.perf_counter()
                rows = c.execute(
                    f"SELECT * FROM {table} WHERE customer_id = ?", [customer]
                ).fetchall()
                out.append(time.perf_counter() - began)
                assert len(rows) == 1
            return out

        snap = run(con, "customer_360")
        frame = con.sql("SELECT * FROM customer_360").df().set_index("customer_id")
    pandas_times = []
    for customer in picks:
        began = time.perf_counter()
        frame.loc[customer]
        pandas_times.append(time.perf_counter() - began)
    with duckdb.connect(str(s.projections_path), read_only=True) as live:
        view = run(live, "customer_360")
    return {
        "customers": len(ids),
        "snap": (pct(snap, 50), pct(snap, 99)),
        "view": (pct(view, 50), pct(view, 99)),
        "pandas": (pct(pandas_times, 50), pct(pandas_times, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--customers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--rate", type=int, default=5_000, help="append rate for freshness")
    parser.add_argument("--fresh-seconds", type=float, default=20.0)
    parser.add_argument(
        "--bypass", action="store_true", help="also time a rebuild with --no-columnar"
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["rebuild", "sql", "fresh", "lookup"]
    )
    args = parser.parse_args()
    customers = args.customers or max(1, args.events // 10)
    home = args.home or Path(f"/tmp/ledger-bench-projections-{args.events}")
    setup(home, args.events, customers, args.seed)
    print(f"## {args.events:,} events, {customers:,} customers (`{' '.join(sys.argv)}`)\n")
    if "rebuild" not in args.skip or not settings_for(home).projections_path.exists():
        r = bench_rebuild(home, args.events, args.bypass)
        cold, plain = r["cold"], r["plain"]
        if cold is not None:
            print(
                f"- first pass (`ledger project --rebuild` with no columnar copy yet: reads the "
                f"log, writes the copy): {cold['seconds']:,.1f} s, **{cold['rate']:,.0f} "
                f"events/s**, peak RSS {cold['peak_mb']:,.0f} MB (with its worker processes "
                f"{cold['tree_mb']:,.0f} MB)",
                flush=True,
            )
        print(
            f"- rebuild (`ledger project --rebuild`, from the columnar copy): "
            f"{r['seconds']:,.1f} s, **{r['rate']:,.0f} events/s**, peak RSS "
            f"**{r['peak_mb']:,.0f} MB** (summed with its worker processes "
            f"**{r['tree_mb']:,.0f} MB**); baselines: DuckDB loading the copy alone "
            f"(read_parquet -> temp table, no projection) {r['copy_rate']:,.0f} events/s; on "
            f"the first {r['sample']:,} events: reading the log alone (`read_raw`) "
            f"{r['read_rate']:,.0f} events/s, naive replay (`Ledger.read` -> Arrow -> DuckDB, "
            f"no projection) {r['naive_rate']:,.0f} events/s",
            flush=True,
        )
        if plain is not None:
            print(
                f"- rebuild bypassing the copy (`--no-columnar`, every event from the log): "
                f"{plain['seconds']:,.1f} s, {plain['rate']:,.0f} events/s, peak RSS "
                f"{plain['peak_mb']:,.0f} MB",
                flush=True,
            )
    if "sql" not in args.skip:
        q = bench_sql_vs_pandas(home)
        print(
            f"- customer 360 over {q['rows']:,} events: SQL {q['sql_360']:.2f} s, pandas "
            f"{q['pandas_360']:.2f} s: **{q['pandas_360'] / q['sql_360']:.1f}x** faster\n"
            f"- RFM: SQL {q['sql_rfm']:.3f} s, pandas {q['pandas_rfm']:.3f} s: "
            f"**{q['pandas_rfm'] / q['sql_rfm']:.2f}x** (segments agree for "
            f"{q['rfm_agree']:.1%} of customers)",
            flush=True,
        )
    if "fresh" not in args.skip:
        f = bench_freshness(home, args.rate, args.fresh_seconds)
        sock, snap = f["socket"], f["snapshot"]
        print(
            f"- freshness while appending {f['rate']:,.0f} events/s ({f['appends']} appends of "
            f"{args.rate // 20} events): append -> visible to `ledger query` (runner socket) "
            f"p50 **{sock[0] * 1000:,.0f} ms**, p99 **{sock[1] * 1000:,.0f} ms**; baseline, "
            f"the published snapshot file: p50 {snap[0] * 1000:,.0f} ms, "
            f"p99 {snap[1] * 1000:,.0f} ms",
            flush=True,
        )
    if "lookup" not in args.skip:
        lk = bench_lookup(home)
        print(
            f"- one customer's 360 row among {lk['customers']:,}: snapshot p50 "
            f"**{lk['snap'][0] * 1000:.2f} ms**, p99 **{lk['snap'][1] * 1000:.2f} ms**; "
            f"baselines: the runner's database p50 {lk['view'][0] * 1000:.2f} ms / "
            f"p99 {lk['view'][1] * 1000:.2f} ms, pandas .loc p50 "
            f"{lk['pandas'][0] * 1000:.3f} ms / p99 {lk['pandas'][1] * 1000:.3f} ms",
            flush=True,
        )


if __name__ == "__main__":
    main()
