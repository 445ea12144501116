"""Write keys: `ledger sources add/list/revoke`, stored hashed in the collector's own table."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_MASTER_KEY
from ledger.collector.auth import SourceRegistry
from ledger.collector.db import CollectorDB
from ledger.ledger import Ledger, LedgerError
from ledger.settings import Settings


def ledger_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LEDGER_HOME": str(home), "LEDGER_MASTER_KEY": TEST_MASTER_KEY}
    env.pop("LEDGER_STORE_URL", None)
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "ledger", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_sources_add_prints_a_key_stored_only_as_its_hash_beside_the_ledger(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    with Ledger.open(Settings(home=home, master_key=TEST_MASTER_KEY)):
        pass  # the ledger's own tables exist first, as in a real deployment
    added = ledger_cli(home, "sources", "add", "website", "--channel", "web")
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("lk_") and len(key) > 40
    assert "shown once" in added.stderr

    with sqlite3.connect(home / "ledger.db") as conn:
        rows = conn.execute("SELECT name, channels, key_hash FROM collector_sources").fetchall()
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert rows == [("website", "web", hashlib.sha256(key.encode()).hexdigest())]
    assert "stored_events" in tables  # the same database file as the events...
    raw = b"".join(p.read_bytes() for p in home.glob("ledger.db*"))
    assert key.encode() not in raw  # ...and the key itself is nowhere in it

    listed = ledger_cli(home, "sources", "list")
    assert listed.returncode == 0
    assert "website" in listed.stdout and "active" in listed.stdout and key not in listed.stdout


def test_sources_revoke_and_errors_are_sentences_with_nonzero_exit(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert ledger_cli(home, "sources", "add", "desk", "-c", "call", "-c", "chat").returncode == 0
    again = ledger_cli(home, "sources", "add", "desk", "--channel", "call")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr
    bad = ledger_cli(home, "sources", "add", "x", "--channel", "fax")
    assert bad.returncode == 1 and "'fax' is not a channel" in bad.stderr
    system = ledger_cli(home, "sources", "add", "x", "--channel", "system")
    assert system.returncode == 1 and "'system' is not a channel" in system.stderr
    missing = ledger_cli(home, "sources", "revoke", "nope")
    assert missing.returncode == 1 and "no source named 'nope' (known: desk)" in missing.stderr

    revoked = ledger_cli(home, "sources", "revoke", "desk")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    listed = ledger_cli(home, "sources", "list")
    assert "call, chat" in listed.stdout and "revoked" in listed.stdout


@pytest.mark.postgres
def test_registry_checks_and_revokes_keys_in_postgresql(pg_url: str) -> None:
    settings = Settings(store_url=pg_url, master_key=TEST_MASTER_KEY)
    db = CollectorDB(settings)
    try:
        registry = SourceRegistry(db)
        _, key = registry.add("inbox", ["email"])
        checked = registry.check(key)
        assert checked is not None and checked.name == "inbox" and checked.channels == ("email",)
        assert registry.check(key + "x") is None
        with pytest.raises(LedgerError, match="already exists"):
            registry.add("inbox", ["email"])
        registry.revoke("inbox")
        fresh = SourceRegistry(db)  # a second collector process: no cache to hide the revoke
        assert fresh.check(key) is None
        stored = db.query("SELECT key_hash FROM collector_sources")
        assert stored == [(hashlib.sha256(key.encode()).hexdigest(),)]
    finally:
        db.close()
