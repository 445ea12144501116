"""`ledger project / query / export / subscribe` as a user meets them, and the Python
lifecycle-change iterator (resumable, no gaps or repeats)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from fixtures.projection_data import generated
from ledger.ledger import Ledger
from ledger.projection import subscribe as sub
from ledger.projection.runner import ProjectionRunner
from ledger.projection.snapshot import LOOKUP_INDEX, SNAPSHOT_TABLES, connect, snapshot_path
from ledger.settings import Settings


def run(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "LEDGER_HOME": str(settings.home),
        "LEDGER_MASTER_KEY": str(settings.master_key),
        "COLUMNS": "200",
    }
    env.pop("LEDGER_STORE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "ledger", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def loaded(sqlite_settings: Settings) -> Settings:
    with Ledger.open(sqlite_settings) as ledger:
        assert not ledger.append(generated(1_500, 80, seed=5)).rejected
    return sqlite_settings


def test_query_before_any_projection_is_a_sentence(sqlite_settings: Settings) -> None:
    got = run(sqlite_settings, "query", "SELECT 1")
    assert got.returncode == 1
    assert "run `ledger project` first" in got.stderr
    assert "Traceback" not in got.stderr


def test_project_query_export_subscribe(loaded: Settings, tmp_path: Path) -> None:
    done = run(loaded, "project")
    assert done.returncode == 0, done.stderr
    assert "projections at position 1,500 (1,500 events applied)" in done.stdout

    table = run(loaded, "query", "SELECT count(*) AS customers FROM customer_360")
    assert table.returncode == 0 and "customers" in table.stdout and "80" in table.stdout

    as_csv = run(
        loaded, "query", "SELECT segment, count(*) AS n FROM rfm GROUP BY 1 ORDER BY 1", "-f", "csv"
    )
    assert as_csv.returncode == 0
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert rows and sum(int(r["n"]) for r in rows) > 0

    as_json = run(
        loaded,
        "query",
        "SELECT customer_id, revenue, first_seen FROM customer_360 ORDER BY customer_id LIMIT 2",
        "--format",
        "json",
    )
    parsed = json.loads(as_json.stdout)
    assert len(parsed) == 2 and parsed[0]["first_seen"].endswith("Z")
    assert isinstance(parsed[0]["revenue"], str)  # decimals stay exact

    target = tmp_path / "stages.parquet"
    pq_run = run(
        loaded,
        "query",
        "SELECT stage, count(*) AS n FROM lifecycle GROUP BY 1",
        "-f",
        "parquet",
        "-o",
        str(target),
    )
    assert pq_run.returncode == 0, pq_run.stderr
    assert set(pq.read_table(target).column_names) == {"stage", "n"}

    out = tmp_path / "export"
    exported = run(loaded, "export", str(out))
    assert exported.returncode == 0, exported.stderr
    for name in SNAPSHOT_TABLES:
        assert (out / f"{name}.parquet").exists(), name
    assert pq.read_table(out / "customer_360.parquet").num_rows == 80

    all_changes = run(loaded, "subscribe", "lifecycle", "--once", "--json")
    assert all_changes.returncode == 0, all_changes.stderr
    seqs = [json.loads(line)["seq"] for line in all_changes.stdout.splitlines()]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 10
    tail = run(loaded, "subscribe", "lifecycle", "--once", "--json", "--from", "10")
    assert [json.loads(line)["seq"] for line in tail.stdout.splitlines()] == seqs[10:]
    text = run(loaded, "subscribe", "lifecycle", "--once", "--from", str(len(seqs) - 1))
    assert text.stdout.count("\n") == 1 and " -> " in text.stdout


def test_rebuild_and_as_of(loaded: Settings) -> None:
    assert run(loaded, "project").returncode == 0
    before = run(loaded, "query", "SELECT * FROM customer_360 ORDER BY customer_id", "-f", "csv")
    rebuilt = run(loaded, "project", "--rebuild")
    assert rebuilt.returncode == 0 and "(1,500 events applied)" in rebuilt.stdout
    after = run(loaded, "query", "SELECT * FROM customer_360 ORDER BY customer_id", "-f", "csv")
    assert before.stdout == after.stdout

    dated = run(loaded, "project", "--as-of", "2025-06-30")
    assert dated.returncode == 0, dated.stderr
    got = json.loads(
        run(
            loaded, "query", "SELECT DISTINCT CAST(as_of AS VARCHAR) AS d FROM rfm", "-f", "json"
        ).stdout
    )
    assert [g["d"][:10] for g in got] == ["2025-06-30"]
    back = run(loaded, "project", "--as-of", "latest")
    assert back.returncode == 0


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("query", "SELECT nope FROM rfm"), 1, "the query failed"),
        (("query", "SELECT 1", "--format", "xml"), 2, "is not one of table, csv, json, parquet"),
        (("query", "SELECT 1", "--format", "parquet"), 2, "needs -o FILE"),
        (("project", "--as-of", "yesterday"), 2, "is not a time"),
        (("subscribe", "orders"), 2, "the only stream is 'lifecycle'"),
        (("query", "DELETE FROM rfm"), 1, "read-only"),
    ],
)
def test_errors_are_sentences_with_exit_codes(
    loaded: Settings, args: tuple[str, ...], code: int, words: str
) -> None:
    assert run(loaded, "project").returncode == 0
    got = run(loaded, *args)
    assert got.returncode == code, got.stderr
    assert words in " ".join(got.stderr.split())
    assert "Traceback" not in got.stderr


def test_change_iterator_resumes_without_gaps_or_repeats(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    lines = generated(3_000, 150, seed=9)
    with Ledger.open(sqlite_settings) as ledger:
        ledger.append(lines[:1_000])
        runner = ProjectionRunner.for_settings(ledger, sqlite_settings, batch_size=300)
        runner.run()
        stop = threading.Event()
        received: list[sub.LifecycleChange] = []

        def consume(after: int) -> None:
            for change in sub.subscribe(sqlite_settings, after, poll_interval=0.05, stop=stop):
                received.append(change)
                if len(received) == 25:
                    return  # the consumer goes away mid-stream...

        first = threading.Thread(target=consume, args=(0,))
        first.start()
        first.join(30)
        assert len(received) == 25
        # ...more events arrive while it is away...
        ledger.append(lines[1_000:])
        runner.run()
        # ...and it resumes from the last seq it handled.
        received_before = len(received)

        def resume() -> None:
            for change in sub.subscribe(
                sqlite_settings, received[-1].seq, poll_interval=0.05, stop=stop
            ):
                received.append(change)

        second = threading.Thread(target=resume)
        second.start()
        total = runner.con.execute("SELECT changes FROM projection_state").fetchall()[0][0]
        deadline = 300
        while len(received) < total and deadline:
            stop.wait(0.1)
            deadline -= 1
        stop.set()
        second.join(10)
        runner.close()
        assert received_before == 25
        assert [c.seq for c in received] == list(range(1, total + 1))
        ids = [c.change_id for c in received]
        assert len(set(ids)) == len(ids)
        # The embedded API gives the same changes straight from a runner's database.
        with ProjectionRunner.for_settings(ledger, sqlite_settings) as again:
            direct = list(sub.iter_changes(again.con, 0, page=97))
        assert direct == received
        assert received[0].to_json()["occurred_at"].endswith("Z")


def test_a_file_of_another_layout_asks_for_a_rebuild(loaded: Settings) -> None:
    loaded.home.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(loaded.projections_path)) as con:
        con.execute("CREATE TABLE projection_state (id INTEGER, position BIGINT)")
    refused = run(loaded, "project")
    assert refused.returncode == 1
    assert "run `ledger project --rebuild`" in " ".join(refused.stderr.split())
    assert "Traceback" not in refused.stderr
    rebuilt = run(loaded, "project", "--rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "(1,500 events applied)" in rebuilt.stdout


def test_the_snapshot_looks_customers_up_by_index(loaded: Settings) -> None:
    done = run(loaded, "project")
    assert done.returncode == 0, done.stderr
    with connect(loaded) as con:
        assert con.execute(
            "SELECT table_name, expressions FROM duckdb_indexes() WHERE index_name = ?",
            [LOOKUP_INDEX],
        ).fetchall() == [("customer_360", "[customer_id]")]
        some = con.execute("SELECT customer_id FROM customer_360 LIMIT 1").fetchall()[0][0]
        # The plan as run (EXPLAIN alone shows the sequential scan it may replace).
        plan = con.execute(
            f"EXPLAIN ANALYZE SELECT * FROM customer_360 WHERE customer_id = '{some}'"
        ).fetchall()[0][1]
        assert "Index Scan" in plan, plan
        row = con.execute("SELECT * FROM customer_360 WHERE customer_id = ?", [some]).fetchall()
        assert len(row) == 1 and row[0][0] == some


def test_unwritable_outputs_are_sentences(loaded: Settings, tmp_path: Path) -> None:
    """`query -o` into a missing directory or onto a directory, and `export` under a file,
    fail with a sentence naming the path, for every output format."""
    assert run(loaded, "project").returncode == 0
    missing = tmp_path / "no" / "such"
    for fmt in ("table", "csv", "json", "parquet"):
        target = missing / f"out.{fmt}"
        got = run(loaded, "query", "SELECT 1 AS a", "--format", fmt, "-o", str(target))
        assert got.returncode == 1, got.stderr
        said = " ".join(got.stderr.split())
        assert f"cannot write the result to {target}" in said
        assert "Traceback" not in got.stderr
        assert not target.exists()
    got = run(loaded, "query", "SELECT 1 AS a", "--format", "csv", "-o", str(tmp_path))
    assert got.returncode == 1
    assert "is a directory" in got.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("kept\n")
    got = run(loaded, "export", str(blocker / "exports"))
    assert got.returncode == 1
    assert f"cannot create the directory {blocker / 'exports'}" in " ".join(got.stderr.split())
    assert "Traceback" not in got.stderr
    assert blocker.read_text() == "kept\n"


def test_damaged_files_are_sentences_and_project_mends_them(loaded: Settings) -> None:
    """A projections file or snapshot that is not a DuckDB database: `project` says to
    rebuild, `--rebuild` replaces the file, `query` says to project, `project` republishes."""
    loaded.projections_path.parent.mkdir(parents=True, exist_ok=True)
    loaded.projections_path.write_text("not a database\n")
    got = run(loaded, "project")
    assert got.returncode == 1
    said = " ".join(got.stderr.split())
    assert "not a valid DuckDB database" in said and "ledger project --rebuild" in said
    assert "another `ledger project`" not in said  # not mistaken for a lock
    assert "Traceback" not in got.stderr
    rebuilt = run(loaded, "project", "--rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    counted = run(loaded, "query", "SELECT count(*) AS n FROM customer_360", "--format", "json")
    assert json.loads(counted.stdout) == [{"n": 80}]

    # Cut short (a crash or a full disk): it opens, and fails at its first read of a table.
    whole = loaded.projections_path.read_bytes()
    loaded.projections_path.write_bytes(whole[: len(whole) // 2])
    got = run(loaded, "project")
    assert got.returncode == 1
    said = " ".join(got.stderr.split())
    assert "Could not read enough bytes" in said and "ledger project --rebuild" in said
    assert "Traceback" not in got.stderr
    assert run(loaded, "project", "--rebuild").returncode == 0

    snap = snapshot_path(loaded)
    snap.write_text("not a database either\n")
    got = run(loaded, "query", "SELECT 1")
    assert got.returncode == 1
    said = " ".join(got.stderr.split())
    assert f"cannot read the published projections at {snap}" in said
    assert "`ledger project` publishes them again" in said
    assert "Traceback" not in got.stderr
    # Nothing new in the ledger: the run publishes because the snapshot cannot be read.
    assert run(loaded, "project").returncode == 0
    counted = run(loaded, "query", "SELECT count(*) AS n FROM customer_360", "--format", "json")
    assert json.loads(counted.stdout) == [{"n": 80}]


def test_a_wrong_master_key_is_a_sentence_and_loses_nothing(loaded: Settings) -> None:
    """Identifiers cannot be decrypted with another master key: `project` says so, exits 1,
    and the projections applied before stay as they were."""
    assert run(loaded, "project").returncode == 0
    with Ledger.open(loaded) as ledger:
        assert not ledger.append(generated(300, 20, seed=21)).rejected
    wrong = Settings(home=loaded.home, master_key="d" * 64)
    got = run(wrong, "project")
    assert got.returncode == 1
    said = " ".join(got.stderr.split())
    assert "cannot decrypt identifiers: the master key does not unwrap" in said
    assert "Traceback" not in got.stderr
    with duckdb.connect(str(loaded.projections_path), read_only=True) as con:
        assert con.execute("SELECT position FROM projection_state").fetchall() == [(1_500,)]
    assert run(loaded, "project").returncode == 0
    with duckdb.connect(str(loaded.projections_path), read_only=True) as con:
        assert con.execute("SELECT position FROM projection_state").fetchall() == [(1_800,)]
