"""Collector benchmark: sustained /v1/batch throughput and latency, beside direct appends.

    .venv/bin/python bench/collector.py --requests 1500 --connections 4 8 --workers 1 2

Runs, on the same generated Segment messages (100 per request, page and track
calls from 10 visitors each, so the identity graph links repeat visitors):

* collector - ``ledger serve`` in its own process (SQLite ledger in a temp dir),
              loaded over loopback by a *separate* load-generating process
              holding ``--connections`` keep-alive connections; events/s over
              the whole run and p50/p99 request latency; the server's CPU time
              per event during the load (user + system; all its threads, and
              split into the main thread: HTTP, parsing, mapping; the writer:
              resolving, validating, appending; the others: the ledger's WAL
              checkpointer) — less sensitive than events/s to other work on a
              shared machine; with ``--workers N`` (N > 1) ``ledger serve --workers N``,
              its CPU summed over the supervisor and its worker processes (the
              supervisor's, which accepts and hands out connections, under 'other');
              afterwards the ledger's event count must equal the count the
              server acknowledged;
* baseline  - ``Ledger.append`` (validate, then append with the identity graph's
              rows in the same transaction) of the same messages, mapped and
              resolved, in batches of 100 in this process: the ledger's own cost
              with no HTTP; beside it, the time per event of each stage the
              collector runs (parse, map, resolve, validate, append + graph), all
              in one thread.

Generation is not timed: request bodies are encoded before the clock starts.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import gc
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

BATCH = 100
MASTER_KEY = "c" * 64


def messages(request: int) -> list[dict[str, Any]]:
    out = []
    stamp = "2026-11-01T10:00:00.000Z"
    for i in range(BATCH):
        visitor = f"anon-{request}-{i % 10}"
        common = {"anonymousId": visitor, "messageId": str(uuid.uuid4()), "timestamp": stamp}
        if i % 2:
            out.append(
                {
                    "type": "page",
                    "name": "Pricing",
                    "properties": {"url": f"https://shop.example/p/{i}", "title": "Pricing"},
                    **common,
                }
            )
        else:
            out.append(
                {
                    "type": "track",
                    "event": "Product Viewed",
                    "properties": {"product_id": f"sku-{i}", "price": 19.5},
                    **common,
                }
            )
    return out


def bodies(count: int) -> list[bytes]:
    sent = "2026-11-01T10:00:01.000Z"
    return [orjson.dumps({"batch": messages(n), "sentAt": sent}) for n in range(count)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- load generator


def load(port: int, key: str, path: Path, connections: int, out: Path) -> None:
    """The separate process: post every body in ``path`` over ``connections`` connections."""
    payloads = [line for line in path.read_bytes().split(b"\n") if line]
    auth = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    latencies: list[float] = []
    acked = 0
    failures: list[str] = []
    lock = threading.Lock()
    cursor = iter(range(len(payloads)))

    def worker() -> None:
        nonlocal acked
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                n = next(cursor, None)
            if n is None:
                break
            began = time.perf_counter()
            conn.request(
                "POST",
                "/v1/batch",
                payloads[n],
                {"Authorization": auth, "Content-Type": "application/json"},
            )
            response = conn.getresponse()
            body = response.read()
            took = time.perf_counter() - began
            with lock:
                latencies.append(took)
                if response.status == 200:
                    acked += int(orjson.loads(body)["stored"])
                else:
                    failures.append(f"{response.status} {body[:200]!r}")
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    out.write_text(
        json.dumps(
            {"elapsed": elapsed, "latencies": latencies, "acked": acked, "failures": failures}
        )
    )


# --------------------------------------------------------------------------- runs


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def tree_cpu(pid: int) -> dict[str, float]:
    """:func:`process_cpu` summed over ``pid`` and its child processes (the workers of
    ``ledger serve --workers N``; the supervisor's own main thread counts as 'other')."""
    out = {"total": 0.0, "main": 0.0, "writer": 0.0, "other": 0.0}
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for n, each in enumerate([pid, *map(int, children)]):
        try:
            cpu = process_cpu(each)
        except OSError:  # a worker that just ended
            continue
        if children and n == 0:
            cpu["other"] += cpu.pop("main")
            cpu["main"] = 0.0
        for k, v in cpu.items():
            out[k] += v
    return out


def process_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) a process has used so far, in total and per thread:
    the main thread (HTTP, parsing, mapping), the collector's writer (resolve, validate,
    append), the rest (the ledger's WAL checkpointer, ...). Linux only."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"total": 0.0, "main": 0.0, "writer": 0.0, "other": 0.0}
    writer: int | None = None
    seconds: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            name = (task / "comm").read_text().strip()
        except OSError:  # a thread that just ended
            continue
        tid = int(task.name)
        seconds[tid] = (int(fields[11]) + int(fields[12])) / tick
        # Threads the writer starts (the ledger's WAL checkpointer) inherit its OS name:
        # the writer is the first of them.
        if name == "collector-write" and (writer is None or tid < writer):
            writer = tid
    for tid, used in seconds.items():
        out["main" if tid == pid else "writer" if tid == writer else "other"] += used
        out["total"] += used
    return out


def run_collector(
    work: Path, payloads: list[bytes], connections: int, workers: int = 1
) -> dict[str, Any]:
    from ledger.collector.auth import SourceRegistry
    from ledger.collector.db import CollectorDB
    from ledger.ledger import Ledger
    from ledger.settings import Settings

    home = work / "collector"
    settings = Settings(home=home, master_key=MASTER_KEY)
    with Ledger.open(settings):
        pass
    db = CollectorDB(settings)
    _, key = SourceRegistry(db).add("bench-site", ["web"])
    db.close()
    bodies_file = work / "bodies.jsonl"
    bodies_file.write_bytes(b"\n".join(payloads) + b"\n")
    port = free_port()
    env = {**os.environ, "LEDGER_HOME": str(home), "LEDGER_MASTER_KEY": MASTER_KEY}
    env.pop("LEDGER_STORE_URL", None)
    env.pop("LEDGER_KAFKA", None)
    server = subprocess.Popen(
        [
            sys.executable,
            *("-m", "ledger", "serve", "--port", str(port), "--workers", str(workers)),
        ],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the collector did not start") from None
                time.sleep(0.1)
        result_file = work / "load.json"
        cpu_before = tree_cpu(server.pid)
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--load",
                str(port),
                key,
                str(bodies_file),
                str(connections),
                str(result_file),
            ],
            check=True,
        )
        after = tree_cpu(server.pid)
        cpu = {k: after[k] - cpu_before.get(k, 0.0) for k in after}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    result = json.loads(result_file.read_text())
    result["server_cpu"] = cpu
    with Ledger.open(settings) as ledger:
        result["in_ledger"] = ledger.store.max_position()
    return result


def run_baseline(work: Path, payloads: list[bytes]) -> dict[str, Any]:
    """The same events through the collector's stages in one thread, each stage timed.

    ``validate`` + ``append + graph``, in batches of 100, is the baseline; the other stages
    are what the collector adds per event (the HTTP layer aside).
    """
    from ledger.cli.collector import GC_THRESHOLDS
    from ledger.collector import segment
    from ledger.collector.db import CollectorDB
    from ledger.collector.identity import GraphResolver, Pseudonyms, identity_key
    from ledger.ledger import Ledger
    from ledger.settings import Settings

    settings = Settings(home=work / "baseline", master_key=MASTER_KEY)
    received = dt.datetime.now(dt.UTC)
    # The garbage collector as `ledger serve` sets it, so the stages cost what they do there.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    stages = dict.fromkeys(("parse", "map", "resolve", "validate", "append + graph"), 0.0)
    db = CollectorDB(settings, durable=False)  # as the collector opens it
    resolver = GraphResolver(db, Pseudonyms(identity_key(settings)))
    with Ledger.open(settings) as ledger:
        for body in payloads:
            t0 = time.perf_counter()
            parsed = orjson.loads(body)
            raws = [orjson.dumps(m) for m in parsed["batch"]]
            t1 = time.perf_counter()
            touches = [
                segment.map_message(
                    m,
                    source="bench-site",
                    received_at=received,
                    batch_sent_at=parsed["sentAt"],
                    raw=raw,
                )
                for m, raw in zip(parsed["batch"], raws, strict=True)
            ]
            t2 = time.perf_counter()
            derived = resolver.resolve(touches)
            t3 = time.perf_counter()
            valid, _ = ledger.validate([t.event for t in touches] + derived)
            t4 = time.perf_counter()
            # As the collector's writer does: the graph's rows in the append's transaction.
            ledger.append_valid(valid, also=resolver.writer(resolver.take()))
            t5 = time.perf_counter()
            for stage, took in zip(
                stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True
            ):
                stages[stage] += took
        count = ledger.store.max_position()
    db.close()
    return {
        "elapsed": stages["validate"] + stages["append + graph"],
        "events": count,
        "stages": stages,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        port, key, path, connections, out = sys.argv[2:7]
        load(int(port), key, Path(path), int(connections), Path(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1500, help="requests of 100 events")
    parser.add_argument(
        "--connections", type=int, nargs="+", default=[4, 8], help="concurrent connections"
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1], help="ledger serve --workers N"
    )
    args = parser.parse_args()
    payloads = bodies(args.requests)
    print(f"events per run             {args.requests * BATCH:,} in {args.requests:,} requests")
    mismatch = False
    with tempfile.TemporaryDirectory(prefix="ledger-bench-collector-") as tmp:
        for workers, connections in [(w, c) for w in args.workers for c in args.connections]:
            work = Path(tmp) / f"w{workers}c{connections}"
            work.mkdir()
            run = run_collector(work, payloads, connections, workers)
            lat = run["latencies"]
            print(
                f"collector /v1/batch        {run['acked'] / run['elapsed']:,.0f} events/s over "
                f"{run['elapsed']:.1f} s, {connections} connections, {workers} worker"
                + ("s" if workers > 1 else "")
            )
            print(
                f"  request latency          p50 {pct(lat, 0.50) * 1000:.1f} ms, "
                f"p99 {pct(lat, 0.99) * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms"
            )
            cpu = {k: v / max(run["acked"], 1) * 1e6 for k, v in run["server_cpu"].items()}
            print(
                f"  server CPU               {cpu['total']:.1f} µs per event (user + system, all "
                f"threads: {1e6 / cpu['total']:,.0f} events/s per core busy): main thread "
                f"{cpu['main']:.1f}, writer {cpu['writer']:.1f}, other {cpu['other']:.1f}"
            )
            print(
                f"  acknowledged / in ledger {run['acked']:,} / {run['in_ledger']:,} "
                f"({len(run['failures'])} failed requests)"
            )
            mismatch |= run["acked"] != run["in_ledger"] or bool(run["failures"])
        baseline = run_baseline(Path(tmp), payloads)
    base_rate = baseline["events"] / baseline["elapsed"]
    print(f"baseline Ledger.append     {base_rate:,.0f} events/s (batches of {BATCH}, in-process)")
    per_event = {k: v / baseline["events"] * 1e6 for k, v in baseline["stages"].items()}
    print(
        "  per event, one thread    "
        + ", ".join(f"{k} {v:.1f}" for k, v in per_event.items())
        + f" µs; all stages {1e6 / sum(per_event.values()):,.0f} events/s"
    )
    if mismatch:
        print("MISMATCH: acknowledged events are not all in the ledger", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
