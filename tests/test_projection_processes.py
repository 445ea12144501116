"""Projections across processes: SIGKILL at random points then resume (exactly once),
analysts querying and subscribing while `ledger project --follow` writes."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import psutil
import pytest

from fixtures.projection_data import assert_same_tables, generated, project
from ledger.ledger import Ledger, LedgerError
from ledger.projection import serve, snapshot
from ledger.projection.query import query
from ledger.settings import Settings

KILL_SEED = 20260301


def _env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["LEDGER_HOME"] = str(settings.home)
    env["LEDGER_MASTER_KEY"] = str(settings.master_key)
    env.pop("LEDGER_STORE_URL", None)
    return env


def _ledger_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ledger", *args]


def _applied(path: Path) -> int:
    if not path.exists():
        return 0
    with duckdb.connect(str(path), read_only=True) as con:
        try:
            return int(con.execute("SELECT position FROM projection_state").fetchall()[0][0])
        except duckdb.CatalogException:
            return 0  # killed before the schema was committed


def _last_write(path: Path) -> float:
    """The newest modification time of the projections file or its WAL (0 if none yet)."""
    times = [p.stat().st_mtime for p in (path, path.with_name(path.name + ".wal")) if p.exists()]
    return max(times, default=0.0)


def _workers_of(home: Path) -> list[psutil.Process]:
    """Processes still running with this test's LEDGER_HOME (a runner's workers inherit it)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and proc.environ().get("LEDGER_HOME") == str(home):
                found.append(proc)
    return found


@pytest.mark.parametrize("offload", [False, True])
def test_sigkill_at_random_points_then_resume_counts_once(
    sqlite_settings: Settings, tmp_path: Path, offload: bool
) -> None:
    total = 3_000
    with Ledger.open(sqlite_settings) as ledger:
        assert not ledger.append(generated(total, 150)).rejected
    rng = random.Random(KILL_SEED)
    env = _env(sqlite_settings)
    if offload:  # every batch folds and decrypts in worker processes
        env["LEDGER_PROJECTION_OFFLOAD_EVENTS"] = "1"
    path = sqlite_settings.projections_path
    kills_midway = 0
    seen: list[int] = []
    # Kill only once the runner is writing (its files change), at a random moment after:
    # wall-clock windows alone fail on a loaded machine, where start-up takes seconds.
    for _kill in range(6):
        started = time.time()
        proc = subprocess.Popen(
            _ledger_cmd("project", "--batch-size", "25"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        while _last_write(path) < started and proc.poll() is None:
            assert time.monotonic() < deadline, "the runner never started writing"
            time.sleep(0.02)
        # Offloaded, the first batch also starts the worker processes (1-2 s).
        time.sleep(rng.uniform(1.0, 5.0) if offload else rng.uniform(0.05, 0.8))
        if proc.poll() is not None:
            break  # it finished before the kill: nothing left to interrupt
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        position = _applied(path)
        seen.append(position)
        if 0 < position < total:
            kills_midway += 1
    final = subprocess.run(
        _ledger_cmd("project", "--batch-size", "25"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert final.returncode == 0, final.stderr
    assert kills_midway >= 2, f"kills did not land mid-way often enough: {seen}"
    # A killed runner's worker processes exit with it, and its scratch files are gone.
    assert not list(path.parent.glob(f".{path.name}.work-*"))
    deadline = time.monotonic() + 10
    while _workers_of(sqlite_settings.home) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _workers_of(sqlite_settings.home)
    assert seen == sorted(seen), "a restart must never go back in the log"
    with (
        Ledger.open(sqlite_settings) as ledger,
        project(ledger, tmp_path / "clean.duckdb") as clean,
        duckdb.connect(str(path), read_only=True) as resumed,
    ):
        assert clean.position == total
        assert resumed.execute("SELECT sum(events) FROM customer_360").fetchall() == [(total,)]
        assert_same_tables(resumed, clean.con)


def test_query_and_subscribe_while_follow_writes(sqlite_settings: Settings, tmp_path: Path) -> None:
    lines = generated(3_000, 150, seed=11)
    env = _env(sqlite_settings)
    with Ledger.open(sqlite_settings) as ledger:
        ledger.append(lines[:500])
        follower = subprocess.Popen(
            _ledger_cmd("project", "--follow", "--batch-size", "200"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        subscriber = subprocess.Popen(
            _ledger_cmd("subscribe", "lifecycle", "--json"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not snapshot.snapshot_path(sqlite_settings).exists():
                assert time.monotonic() < deadline, "no snapshot was published"
                assert follower.poll() is None, follower.communicate()
                time.sleep(0.05)

            def append_rest() -> None:
                for start in range(500, len(lines), 100):
                    ledger.append(lines[start : start + 100])
                    time.sleep(0.03)

            writer = threading.Thread(target=append_rest)
            writer.start()
            checks = 0
            positions: list[int] = []
            while writer.is_alive() or checks < 5:
                # A snapshot holds whole batches: the per-customer counts add up to the
                # position, and the change stream to the recorded count, at every read.
                got = query(
                    "SELECT (SELECT position FROM projection_state) AS position, "
                    "(SELECT coalesce(sum(events), 0) FROM customer_360) AS counted, "
                    "(SELECT changes FROM projection_state) AS changes, "
                    "(SELECT count(*) FROM lifecycle_changes) AS streamed",
                    sqlite_settings,
                ).to_pylist()[0]
                assert got["position"] == got["counted"], got
                assert got["changes"] == got["streamed"], got
                positions.append(got["position"])
                # The published snapshot file (what export and Python readers open)
                # holds whole batches as well.
                with snapshot.connect(sqlite_settings) as con:
                    position, counted = con.execute(
                        "SELECT (SELECT position FROM projection_state), "
                        "(SELECT coalesce(sum(events), 0) FROM customer_360)"
                    ).fetchall()[0]
                    assert position == counted
                checks += 1
                time.sleep(0.02)
            writer.join()
            # Through the runner's socket nothing can be changed.
            with pytest.raises(LedgerError, match="read-only"):
                query("DELETE FROM customer_360", sqlite_settings)
            assert serve.socket_path(sqlite_settings).exists()
            # One writer per file: a second runner, or a rebuild, is refused with a sentence.
            for args in (("project",), ("project", "--rebuild")):
                second = subprocess.run(
                    _ledger_cmd(*args), env=env, capture_output=True, text=True, timeout=120
                )
                flat = " ".join(second.stderr.split())
                assert second.returncode == 1, flat
                assert (
                    "stop `ledger project` first" in flat
                    or "another `ledger project` running" in flat
                ), flat
                assert "Traceback" not in flat
            cli = subprocess.run(
                _ledger_cmd("query", "SELECT position FROM projection_state", "--format", "json"),
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert cli.returncode == 0, cli.stderr
            assert json.loads(cli.stdout)[0]["position"] <= len(lines)
            while True:
                got = query("SELECT position FROM projection_state", sqlite_settings)
                if got.to_pylist()[0]["position"] == len(lines):
                    break
                assert time.monotonic() < deadline + 60, "the follower did not catch up"
                time.sleep(0.1)
            assert positions == sorted(positions)
            assert len(set(positions)) > 2, "reads should see the follower progress"
            time.sleep(1.0)  # let the subscriber's next poll see the last snapshot
        finally:
            follower.send_signal(signal.SIGINT)
            subscriber.send_signal(signal.SIGINT)
            out, err = follower.communicate(timeout=60)
            sub_out, sub_err = subscriber.communicate(timeout=60)
        assert follower.returncode == 0, err
        assert not serve.socket_path(sqlite_settings).exists(), "the socket outlived its runner"
        assert subscriber.returncode == 0, sub_err
        assert "projections at position 3,000" in out
        changes = [json.loads(line) for line in sub_out.splitlines()]
        with duckdb.connect(str(sqlite_settings.projections_path), read_only=True) as con:
            expected = con.execute(
                "SELECT seq, CAST(change_id AS VARCHAR) FROM lifecycle_changes ORDER BY seq"
            ).fetchall()
        assert [(c["seq"], c["change_id"]) for c in changes] == expected
        # Ending the follow and catching up once more equals a clean rebuild.
        done = subprocess.run(_ledger_cmd("project"), env=env, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr
        with (
            project(ledger, tmp_path / "clean.duckdb") as clean,
            duckdb.connect(str(sqlite_settings.projections_path), read_only=True) as followed,
        ):
            assert_same_tables(followed, clean.con)


_FOLLOW_UNTIL = """
import sys, threading, time


def follow_until(runner, attribute):
    # Follow in a thread until the runner has set `attribute` (at most 60 s).
    stop = threading.Event()
    follower = threading.Thread(target=runner.follow, args=(stop,))
    follower.start()
    deadline = time.monotonic() + 60
    while getattr(runner, attribute) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    follower.join()
"""

_FIRST_BATCH = (
    _FOLLOW_UNTIL
    + """
from ledger.ledger import Ledger
from ledger.projection.runner import ProjectionRunner
from ledger.settings import Settings


class FirstBatch(ProjectionRunner):
    # The real runner, noting the modules its first batch imported.
    imported = None

    def apply(self, rows, *, after):
        before = set(sys.modules)
        super().apply(rows, after=after)
        if self.imported is None:
            self.imported = sorted(set(sys.modules) - before)


settings = Settings()
with Ledger.open(settings) as ledger:
    with FirstBatch.for_settings(ledger, settings, columnar=None) as runner:
        follow_until(runner, "imported")
        assert runner.imported is not None, "following applied no batch"
        print(" ".join(runner.imported))
"""
)


def _follow_in_a_fresh_process(settings: Settings, script: str, *, seed: int) -> str:
    """Project 1,000 events, append 500 more, run ``script`` (a follower that prints what
    it saw) in a fresh Python process; return what it printed."""
    lines = generated(1_500, 80, seed=seed)
    with Ledger.open(settings) as ledger:
        ledger.append(lines[:1_000])
        project(ledger, settings.projections_path).close()
        ledger.append(lines[1_000:])
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_following_warms_up_what_the_first_batch_would_import(
    sqlite_settings: Settings,
) -> None:
    # In a fresh process the first batch imported pandas (DuckDB does on its first Arrow
    # registration) and pyarrow.compute: 0.5-1.2 s of one core while appends queued up.
    # `follow` warms up before its first batch, which then imports neither.
    imported = _follow_in_a_fresh_process(sqlite_settings, _FIRST_BATCH, seed=13).split()
    assert not [m for m in imported if m.split(".")[0] in ("pandas", "pyarrow")], imported


_FIRST_DERIVE = (
    _FOLLOW_UNTIL
    + """
import multiprocessing
from ledger.ledger import Ledger
from ledger.projection.runner import ProjectionRunner
from ledger.settings import Settings


class FirstDerive(ProjectionRunner):
    # The real runner, noting what its first derive while following imported and which
    # worker processes were running before and after it.
    seen = None

    def refresh_derived(self, **kw):
        before = (set(sys.modules), {p.pid for p in multiprocessing.active_children()})
        done = super().refresh_derived(**kw)
        if done and self.seen is None and self._background:
            after = {p.pid for p in multiprocessing.active_children()}
            self.seen = (sorted(set(sys.modules) - before[0]), sorted(before[1]), sorted(after))
        return done


settings = Settings()
with Ledger.open(settings) as ledger:
    # fit_offload_min=1: this small ledger's fit goes to a worker process, as 1,000
    # purchasers' would.
    with FirstDerive.for_settings(
        ledger, settings, columnar=None, derive_interval=0.3, fit_offload_min=1
    ) as runner:
        follow_until(runner, "seen")
        assert runner.seen is not None, "following derived nothing"
        imported, before, after = runner.seen
        print(" ".join(imported))
        print(" ".join(map(str, before)))
        print(" ".join(map(str, after)))
"""
)


def test_following_prepares_the_churn_fit_before_its_first_derive(
    sqlite_settings: Settings,
) -> None:
    # The first derive while following imported scipy in the runner (~0.3 s holding the GIL
    # batches need) and spawned the fit's worker process (~1 s of a core): 30 s into
    # following, with appends arriving. `follow` now does both before it serves.
    printed = _follow_in_a_fresh_process(sqlite_settings, _FIRST_DERIVE, seed=17)
    imported, before, after = (line.split() for line in printed.splitlines())
    assert not [m for m in imported if m.split(".")[0] == "scipy"], imported
    assert before, "no worker process was running before the first derive"
    assert before == after, "the first derive started a worker process"
