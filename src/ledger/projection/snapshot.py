"""How analysts read while the runner writes: published snapshot files.

DuckDB allows one writing process per file, so readers never open the
runner's file. After each applied batch (throttled) and whenever it catches up,
the runner copies the projection tables into a new DuckDB file and renames it
over ``projections.snapshot.duckdb``. The rename is atomic: a reader opens
either the previous snapshot or the new one, never a half-written file, and a
snapshot always holds whole batches (it is copied between transactions).
A reader keeps the file it opened even when a newer one replaces it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import duckdb

from ledger.ledger import LedgerError
from ledger.settings import Settings

#: Tables (and the customer_360 view, materialised) copied into every snapshot.
SNAPSHOT_TABLES: tuple[str, ...] = (
    "customer_360",
    "lifecycle",
    "lifecycle_history",
    "lifecycle_changes",
    "rfm",
    "rfm_segments",
    "churn_risk",
    "churn_model",
    "projection_state",
    "derived_state",
)


#: The index on customer_360 (customer_id) in every snapshot.
LOOKUP_INDEX = "customer_360_by_id"


def snapshot_path(settings: Settings) -> Path:
    return settings.projections_path.with_name("projections.snapshot.duckdb")


def publish(con: duckdb.DuckDBPyConnection, target: Path) -> None:
    """Copy the projection tables from ``con`` into a fresh file, then rename it to ``target``."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    for leftover in (tmp, Path(f"{tmp}.wal")):
        leftover.unlink(missing_ok=True)
    con.execute(f"ATTACH '{tmp}' AS snap")
    try:
        con.execute("BEGIN")
        for table in SNAPSHOT_TABLES:
            con.execute(f"CREATE TABLE snap.{table} AS SELECT * FROM main.{table}")
        # One customer's 360 row is what applications ask for most: an ART index makes it a
        # point lookup (100k customers: p50 8.4 -> 2.8 ms, p99 17 -> 7.4 ms) for 0.12 s
        # more per publish.
        con.execute(f"CREATE INDEX {LOOKUP_INDEX} ON snap.customer_360 (customer_id)")
        con.execute("COMMIT")
    finally:
        con.execute("DETACH snap")
    os.replace(tmp, target)


def held_by_writer(exc: duckdb.IOException) -> bool:
    """Whether DuckDB refused a file because another process holds it open for writing
    (rather than because the file is damaged or not a DuckDB database)."""
    return "Could not set lock" in str(exc)


def readable(target: Path) -> bool:
    """Whether ``target`` is a snapshot readers can open (it exists and is a DuckDB file)."""
    try:
        duckdb.connect(str(target), read_only=True).close()
    except duckdb.Error:
        return False
    return True


def remove_stale(target: Path) -> None:
    """Delete temporary snapshot files left by a runner that was killed mid-publish."""
    for stale in target.parent.glob(f"{target.name}.tmp-*"):
        with contextlib.suppress(OSError):
            stale.unlink()


@contextlib.contextmanager
def connect(settings: Settings | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to the latest published snapshot."""
    settings = settings or Settings()
    path = snapshot_path(settings)
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.IOException as exc:
        if not path.exists():
            raise LedgerError(
                f"no projections published yet at {path}: run `ledger project` first"
            ) from None
        raise LedgerError(
            f"cannot read the published projections at {path}: {exc}; "
            "`ledger project` publishes them again"
        ) from None
    try:
        con.execute("SET TimeZone = 'UTC'")
        yield con
    finally:
        con.close()
