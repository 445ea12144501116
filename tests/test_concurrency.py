"""Two OS processes appending overlapping batches to one store at the same time: every event
is stored exactly once, positions stay gap-free, sequences per customer gap-free, chains
verify. Both processes start cold (opening the store concurrently is part of the test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from ledger.ledger import Ledger
from ledger.settings import Settings

MakeEvent = Callable[..., dict[str, Any]]
EVENTS = 1_200
BATCH = 20
CUSTOMERS = 15

# Runs in a fresh interpreter. Two barriers (so a slow start under load cannot serialise the
# writers): both open the fresh store at the same moment, then both start appending at the
# same moment. Appends its slice in batches, re-sends its first batch at the end (a
# redelivery), and reports what each append said.
WORKER = r"""
import json, sys, time
from pathlib import Path
from ledger.ledger import Ledger

lines_file, start, stop, reverse, batch, signals, me = sys.argv[1:8]
signals = Path(signals)

def barrier(name):
    (signals / f"{name}-{me}").touch()
    deadline = time.monotonic() + 120
    while not (signals / name).exists():
        if time.monotonic() > deadline:
            sys.exit(f"no {name} signal")
        time.sleep(0.002)

lines = Path(lines_file).read_bytes().splitlines()[int(start):int(stop)]
batches = [lines[i:i + int(batch)] for i in range(0, len(lines), int(batch))]
if reverse == "1":
    batches = [list(reversed(b)) for b in reversed(batches)]
report = []
barrier("open")
with Ledger.open() as ledger:
    barrier("append")
    for chunk in [*batches, batches[0]]:
        r = ledger.append(chunk)
        report.append([r.accepted, r.duplicates, len(r.rejected), r.first_position,
                       r.last_position])
        # A producer pauses between batches (it waits for input); without a pause SQLite's
        # polling busy handler lets one writer re-take the lock until it is done.
        time.sleep(0.02)
print(json.dumps(report))
"""


def release(signals: Path, name: str, procs: list[subprocess.Popen[bytes]]) -> None:
    """Wait until every worker reached barrier ``name``, then let them all through."""
    deadline = time.monotonic() + 120
    while not all((signals / f"{name}-{n}").exists() for n in range(len(procs))):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            errors = [p.communicate()[1].decode()[-3000:] for p in procs]
            pytest.fail(f"the writers did not all reach {name!r}: {errors}")
        time.sleep(0.005)
    (signals / name).touch()


def run_two_writers(settings: Settings, make_event: MakeEvent, tmp_path: Path) -> list[Any]:
    events = [
        make_event(
            f"cus_{i % CUSTOMERS:03d}",
            ("page_viewed", "chat_message", "order_placed")[i % 3],
            occurred_at=f"2026-03-{1 + i % 28:02d}T{i % 24:02d}:00:00Z",
        )
        for i in range(EVENTS)
    ]
    lines_file = tmp_path / "events.jsonl"
    lines_file.write_bytes(b"\n".join(orjson.dumps(e) for e in events))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env.update(LEDGER_HOME=str(settings.home), LEDGER_MASTER_KEY=str(settings.master_key))
    if settings.store_url:
        env["LEDGER_STORE_URL"] = settings.store_url
    # A: the first two thirds in order; B: the last two thirds from the end backwards.
    # They meet in the middle third, racing for the same event ids and the same chains.
    third = EVENTS // 3
    slices = [(0, 2 * third, "0"), (third, EVENTS, "1")]
    signals = tmp_path / "signals"
    signals.mkdir()
    procs = []
    for n, (a, b, rev) in enumerate(slices):
        argv = [str(lines_file), str(a), str(b), rev, str(BATCH), str(signals), str(n)]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    for name in ("open", "append"):
        release(signals, name, procs)
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
        reports.append(json.loads(out))
    return [events, reports]


def check(settings: Settings, make_event: MakeEvent, tmp_path: Path) -> None:
    events, reports = run_two_writers(settings, make_event, tmp_path)
    sent = sum(len(r) - 1 for r in reports) * BATCH + 2 * BATCH
    accepted = sum(row[0] for r in reports for row in r)
    duplicates = sum(row[1] for r in reports for row in r)
    assert sum(row[2] for r in reports for row in r) == 0
    # Exactly once: every event accepted by exactly one process, everything else a duplicate.
    assert accepted == EVENTS
    assert accepted + duplicates == sent == EVENTS // 3 * 4 + 2 * BATCH
    # The test raced for real: each process won some events, and their positions interleave.
    spans = [[(row[3], row[4]) for row in r if row[0]] for r in reports]
    assert all(spans), reports
    a_first, a_last = spans[0][0][0], spans[0][-1][1]
    b_first, b_last = spans[1][0][0], spans[1][-1][1]
    assert a_first < b_last and b_first < a_last, spans

    with Ledger.open(settings) as ledger:
        stored = list(ledger.follow(0, page=500))
        assert [e.position for e in stored] == list(range(1, EVENTS + 1))
        assert sorted(e.event_id for e in stored) == sorted(e["event_id"] for e in events)
        sequences: dict[str, list[int]] = {}
        for e in stored:
            sequences.setdefault(e.customer_id, []).append(e.sequence)
        assert len(sequences) == CUSTOMERS
        for customer, seqs in sequences.items():
            assert seqs == list(range(1, len(seqs) + 1)), customer
        report = ledger.verify()
        assert (report.ok, report.events, report.customers) == (True, EVENTS, CUSTOMERS)
        stats = ledger.stats()
        assert (stats.events, stats.last_position) == (EVENTS, EVENTS)
        # Personal data written by either process decrypts with the customer's one key.
        chat = next(e for e in events if e["type"] == "chat_message")
        [mine] = [h for h in ledger.history(chat["customer_id"]) if h.event_id == chat["event_id"]]
        assert mine.payload["text"] == "hello" and not mine.erased


def test_two_processes_on_one_sqlite_file(
    sqlite_settings: Settings, make_event: MakeEvent, tmp_path: Path
) -> None:
    check(sqlite_settings, make_event, tmp_path)


def test_two_processes_on_one_postgres_database(
    pg_url: str, make_event: MakeEvent, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path / "home", store_url=pg_url, master_key="a" * 64)
    check(settings, make_event, tmp_path)
