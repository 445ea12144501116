"""`ledger backup`: a consistent, verified copy of a ledger that keeps taking appends."""

from __future__ import annotations

import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ledger.ledger import Ledger, LedgerError
from ledger.settings import Settings
from test_cli import run  # the suite's CLI runner (COLUMNS wide: whole sentences per line)

MakeEvent = Callable[..., dict[str, Any]]
KEY = "b" * 64


def test_backup_during_appends_is_a_verified_prefix_that_restores(
    sqlite_settings: Settings, make_event: MakeEvent, tmp_path: Path
) -> None:
    copy = tmp_path / "copy.db"
    stop = threading.Event()
    with Ledger.open(sqlite_settings) as ledger:
        ledger.append(
            [make_event(f"cus_{n % 20}", "page_viewed", identifiers={"email": f"p{n % 20}@x.io"})
             for n in range(500)]
        )  # fmt: skip

        def keep_appending() -> None:
            with Ledger.open(sqlite_settings) as writer:
                while not stop.is_set():
                    writer.append([make_event(f"cus_{n}", "page_viewed") for n in range(50)])

        appender = threading.Thread(target=keep_appending)
        appender.start()
        try:
            ledger.backup(copy)
        finally:
            stop.set()
            appender.join()
        report = ledger.verify_copy(copy)
        assert report.ok and report.events >= 500
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
        with pytest.raises(LedgerError, match="never overwrites"):
            ledger.backup(copy)
        total = ledger.position
    assert report.anchor is not None and report.anchor.position == report.events <= total
    # Restore: the file in place of a new home's ledger.db, read with the same master key.
    home = tmp_path / "restored"
    home.mkdir()
    shutil.copy(copy, home / "ledger.db")
    restored = Settings(home=home, master_key=sqlite_settings.master_key)
    with Ledger.open(restored) as ledger:
        assert ledger.position == report.events
        assert ledger.verify(anchors=[report.anchor]).ok
        assert ledger.history("cus_3")[0].identifiers == {"email": "p3@x.io"}


def test_backup_cli_prints_the_copy_anchor_and_refuses_clearly(
    tmp_path: Path, make_event: MakeEvent, pg_url: str
) -> None:
    home = tmp_path / "home"
    with Ledger.open(Settings(home=home, master_key=KEY)) as ledger:
        ledger.append([make_event("cus_1", "page_viewed"), make_event("cus_2", "order_placed")])
    done = run(home, "backup", str(tmp_path / "b.db"))
    assert done.returncode == 0, done.stderr
    assert "OK: the copy's 2 events in 2 chains verify" in done.stdout
    assert any(line.startswith("anchor: 2:") for line in done.stdout.splitlines())
    again = run(home, "backup", str(tmp_path / "b.db"))
    assert again.returncode == 1 and "never overwrites" in again.stderr
    nowhere = run(home, "backup", str(tmp_path / "missing" / "b.db"))
    assert nowhere.returncode == 1 and "is not a directory" in nowhere.stderr
    postgres = run(home, "backup", str(tmp_path / "pg.db"), LEDGER_STORE_URL=pg_url)
    assert postgres.returncode == 1 and "PostgreSQL's tools" in postgres.stderr
    for proc in (again, nowhere, postgres):
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "pg.db").exists()
