"""The CLI as a user meets it: real processes, real files, exit codes and sentences."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import PG_HOST, PG_PORT, PG_USER
from ledger.cli.core import schema_drift

ROOT = Path(__file__).resolve().parents[1]


def run(
    home: Path, *args: str, stdin: bytes | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "LEDGER_HOME": str(home),
        "LEDGER_MASTER_KEY": "b" * 64,
        "COLUMNS": "200",
        **env,
    }
    environment.pop("LEDGER_STORE_URL", None)
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "ledger", *args],
        input=stdin.decode() if stdin else None,
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        cwd=home.parent,
    )


def event(customer: str = "cus_1", **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "customer_id": customer,
        "channel": "chat",
        "type": "chat_message",
        "occurred_at": "2026-02-01T09:30:00+01:00",
        "source": "chat-widget",
        "identifiers": {"email": f"{customer}@example.com", "name": "Ada Lovelace"},
        "payload": {
            "conversation_id": "conv-1",
            "direction": "inbound",
            "text": f"please call me back, {customer}",
        },
    }
    base.update(overrides)
    return base


def write_jsonl(path: Path, items: list[Any]) -> Path:
    lines = [i if isinstance(i, bytes) else orjson.dumps(i) for i in items]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


def test_ingest_lands_valid_lines_rejects_bad_ones_with_reasons(home: Path, tmp_path: Path) -> None:
    good = [event("cus_1"), event("cus_2")]
    bad_time = event("cus_3", occurred_at="2026-02-01T09:30:00")
    path = write_jsonl(tmp_path / "in.jsonl", [good[0], bad_time, b"{not json", good[1]])
    proc = run(home, "ingest", str(path))
    no_traceback(proc)
    assert proc.returncode == 1
    assert "2 rejected line(s)" in proc.stderr
    # The first reasons are on screen too, not only in the dead-letter file.
    shown = " ".join(proc.stderr.split())
    assert "line 2: occurred_at:" in shown and "has no timezone" in shown
    assert "line 3: event: not valid JSON" in shown
    dead = list((home / "rejected").glob("*.jsonl"))
    assert len(dead) == 1
    records = [orjson.loads(line) for line in dead[0].read_bytes().splitlines()]
    assert [(r["file"], r["line"]) for r in records] == [(str(path), 2), (str(path), 3)]
    assert records[0]["reason"].startswith("occurred_at:") and "timezone" in records[0]["reason"]
    assert "not valid JSON" in records[1]["reason"]
    assert records[1]["raw"] == "{not json"
    for customer in ("cus_1", "cus_2"):
        shown = run(home, "history", customer, "--json")
        assert shown.returncode == 0, shown.stderr
        assert orjson.loads(shown.stdout.splitlines()[0])["customer_id"] == customer


def test_reingest_counts_duplicates_and_exits_zero(home: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [event("cus_1"), event("cus_2")])
    assert run(home, "ingest", str(path)).returncode == 0
    again = run(home, "ingest", str(path))
    assert again.returncode == 0
    row = next(line for line in again.stdout.splitlines() if "in.jsonl" in line)
    cells = [c.strip() for c in row.split("│")[1:-1]]
    assert cells[1:] == ["2", "0", "2", "0"]  # lines, accepted, duplicates, rejected
    stats = orjson.loads(run(home, "stats", "--json").stdout)
    assert stats["events"] == 2


def test_unusable_arguments_exit_2_with_a_sentence(home: Path, tmp_path: Path) -> None:
    missing = run(home, "ingest", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    no_traceback(missing)
    directory = run(home, "ingest", str(tmp_path))
    assert directory.returncode == 2 and "is a directory" in directory.stderr
    fmt = run(home, "ingest", "--format", "xml", str(tmp_path))
    assert fmt.returncode == 2 and "--format" in fmt.stderr
    naive = run(home, "history", "cus_1", "--as-of", "2026-01-01T10:00:00")
    assert naive.returncode == 2 and "no timezone" in naive.stderr
    garbage = run(home, "history", "cus_1", "--as-of", "last tuesday")
    assert garbage.returncode == 2 and "ISO 8601" in garbage.stderr


def test_empty_input_and_stdin(home: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    proc = run(home, "ingest", str(empty))
    assert proc.returncode == 0 and "nothing to ingest" in proc.stderr
    piped = run(home, "ingest", "-", stdin=orjson.dumps(event("cus_9")) + b"\n")
    assert piped.returncode == 0, piped.stderr
    assert orjson.loads(run(home, "stats", "--json").stdout)["events"] == 1


def test_huge_line_is_rejected_and_the_next_line_still_lands(home: Path, tmp_path: Path) -> None:
    huge = event(
        "cus_big", payload={"conversation_id": "c", "direction": "inbound", "text": "x" * 5_000_000}
    )
    path = write_jsonl(tmp_path / "big.jsonl", [huge, event("cus_after")])
    proc = run(home, "ingest", str(path))
    assert proc.returncode == 1
    record = orjson.loads(next((home / "rejected").glob("*.jsonl")).read_bytes().splitlines()[0])
    assert record["line"] == 1 and "over the limit" in record["reason"]
    assert run(home, "history", "cus_after").returncode == 0


def test_csv_import_nests_dotted_columns(home: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "orders.csv"
    csv_path.write_text(
        "event_id,customer_id,channel,type,occurred_at,source,payload.order_id,"
        "payload.total.amount,payload.total.currency,payload.items,identifiers.email\n"
        f"{uuid.uuid4()},cus_7,commerce,order_placed,2026-01-03T10:00:00Z,shop,o-1,19.90,EUR,2,"
        "jo@example.com\n"
        f"{uuid.uuid4()},cus_7,commerce,order_placed,2026-01-04T10:00:00Z,shop,o-2,abc,EUR,1,\n"
    )
    proc = run(home, "ingest", str(csv_path))
    assert proc.returncode == 1
    record = orjson.loads(next((home / "rejected").glob("*.jsonl")).read_bytes())
    assert record["line"] == 3 and record["reason"].startswith("payload.total.amount")
    shown = orjson.loads(run(home, "history", "cus_7", "--json").stdout)
    assert shown["payload"]["total"] == {"amount": "19.90", "currency": "EUR"}
    assert shown["payload"]["items"] == 2
    assert shown["identifiers"] == {"email": "jo@example.com"}


def test_verify_passes_then_names_the_altered_event(home: Path, tmp_path: Path) -> None:
    events = [event("cus_1"), event("cus_2", source="marker-source-xyz"), event("cus_2")]
    assert run(home, "ingest", str(write_jsonl(tmp_path / "in.jsonl", events))).returncode == 0
    ok = run(home, "verify")
    assert ok.returncode == 0 and "3 events" in ok.stdout
    db = home / "ledger.db"
    data = db.read_bytes()
    assert data.count(b"marker-source-xyz") == 1
    db.write_bytes(data.replace(b"marker-source-xyz", b"marker-source-xyZ"))
    bad = run(home, "verify")
    no_traceback(bad)
    assert bad.returncode == 1
    assert "customer cus_2, sequence 1, position 2" in bad.stderr


def test_verify_prints_an_anchor_that_later_runs_check(home: Path, tmp_path: Path) -> None:
    events = [event("cus_1"), event("cus_2")]
    assert run(home, "ingest", str(write_jsonl(tmp_path / "in.jsonl", events))).returncode == 0
    kept = tmp_path / "anchors.txt"
    first = run(home, "verify", "--anchor-out", str(kept))
    assert first.returncode == 0, first.stderr
    [line] = [x for x in first.stdout.splitlines() if x.startswith("anchor: ")]
    anchor = line.removeprefix("anchor: ")
    assert anchor.startswith("2:") and kept.read_text() == anchor + "\n"
    assert (
        run(home, "ingest", str(write_jsonl(tmp_path / "more.jsonl", [event("cus_3")]))).returncode
        == 0
    )
    held = run(home, "verify", "--anchor", anchor, "--anchor-file", str(kept))
    assert held.returncode == 0 and "2 anchor(s) hold" in held.stdout
    forged = anchor[:-1] + ("0" if anchor[-1] != "0" else "1")
    broken = run(home, "verify", "--anchor", forged)
    no_traceback(broken)
    assert broken.returncode == 1 and "anchor 2 broken" in broken.stderr
    malformed = run(home, "verify", "--anchor", "yesterday")
    no_traceback(malformed)
    assert malformed.returncode == 2 and "expected POSITION:DIGEST" in malformed.stderr


def test_forget_needs_confirmation_then_erases(home: Path, tmp_path: Path) -> None:
    assert (
        run(home, "ingest", str(write_jsonl(tmp_path / "in.jsonl", [event("cus_1")]))).returncode
        == 0
    )
    refused = run(home, "forget", "cus_1")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    done = run(home, "forget", "cus_1", "--yes", "--reason", "GDPR art. 17")
    assert done.returncode == 0, done.stderr
    shown = [
        orjson.loads(line) for line in run(home, "history", "cus_1", "--json").stdout.splitlines()
    ]
    assert shown[0]["erased"] is True and shown[0]["identifiers"] is None
    assert shown[-1]["type"] == "customer_forgotten"
    assert run(home, "verify").returncode == 0
    again = run(home, "forget", "cus_1", "--yes")
    assert again.returncode == 1 and "already forgotten" in again.stderr


def test_unreachable_postgres_is_a_sentence_not_a_traceback(home: Path) -> None:
    """The server's own reason, not the connection pool's timeout."""
    proc = run(home, "stats", LEDGER_STORE_URL="postgresql://postgres@127.0.0.1:1/none")
    no_traceback(proc)
    said = " ".join(proc.stderr.split())
    assert proc.returncode == 1
    assert "cannot open the ledger store: postgresql://postgres@127.0.0.1:1/none" in said
    assert "Connection refused" in said


def test_a_missing_postgres_database_is_named(home: Path, postgres_available: bool) -> None:
    url = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/no_such_ledger_db"
    proc = run(home, "stats", LEDGER_STORE_URL=url)
    no_traceback(proc)
    assert proc.returncode == 1
    assert 'database "no_such_ledger_db" does not exist' in " ".join(proc.stderr.split())


@pytest.mark.parametrize(
    "command",
    [[], ["ingest"], ["history"], ["verify"], ["forget"], ["stats"], ["schemas", "export"]],
)
def test_help_explains_every_option(home: Path, command: list[str]) -> None:
    proc = run(home, *command, "--help")
    assert proc.returncode == 0
    assert "Usage" in proc.stdout


def test_checked_in_schemas_match_the_models() -> None:
    assert schema_drift(ROOT / "schemas") == []


def test_schema_drift_is_detected(tmp_path: Path, home: Path) -> None:
    assert run(home, "schemas", "export", str(tmp_path / "s")).returncode == 0
    target = tmp_path / "s" / "order_placed.schema.json"
    target.write_text(target.read_text().replace('"currency"', '"currency_code"'))
    assert schema_drift(tmp_path / "s") == ["order_placed.schema.json"]
    check = run(home, "schemas", "check", str(tmp_path / "s"))
    assert check.returncode == 1 and "order_placed.schema.json" in check.stderr
