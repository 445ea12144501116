"""The collector's own tables, in the ledger's database but never in its event tables.

Write keys and the identity graph live beside the ledger (the same SQLite file,
or the same PostgreSQL database) so one backup holds everything, yet the
ledger's tables stay exactly what the core owns. SQL here is the subset both
databases accept; ``?`` placeholders are rewritten for psycopg.
"""

from __future__ import annotations

import fcntl
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any

from ledger.ledger import LedgerError
from ledger.settings import Settings
from ledger.store.sqlite import WAL_FALLBACK_PAGES

#: Page cache of the connection: the identity graph's indexes are read at random.
CACHE_MB = 32
#: pg_advisory_lock key of "the collector of this database" (any fixed 64-bit number).
_ADVISORY_KEY = 0x6C65_6467_6572_0005


class CollectorDB:
    """One connection to the ledger's database, safe to share between threads (a lock)."""

    def __init__(self, settings: Settings, *, durable: bool = True):
        """``durable=False``: SQLite commits without fsync (they survive a crash of the
        process, not of the machine); see :func:`ledger.collector.app.open_collector`."""
        self._lock = threading.RLock()
        self._home = settings.home
        self._claim: IO[str] | None = None
        self.postgres = bool(settings.store_url)
        self._conn: Any
        try:
            if settings.store_url:
                import psycopg

                self._conn = psycopg.connect(settings.store_url, autocommit=True)
                self.location = settings.store_url.rsplit("@", 1)[-1]
            else:
                settings.home.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(
                    settings.sqlite_path,
                    timeout=60,
                    isolation_level=None,  # explicit BEGIN/COMMIT below
                    check_same_thread=False,
                )
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                # The ledger checkpoints the shared WAL from a thread of its own; with SQLite's
                # default (1,000 pages) this connection's commits did it instead, inside the
                # collector's writer (a fifth of its time under load). Same fallback as the
                # ledger's connections.
                self._conn.execute(f"PRAGMA wal_autocheckpoint={WAL_FALLBACK_PAGES}")
                self._conn.execute(f"PRAGMA cache_size=-{CACHE_MB * 1024}")
                # Unlinked identifier hashes (forget) are overwritten, not left in free pages.
                self._conn.execute("PRAGMA secure_delete=ON")
                self.location = str(settings.sqlite_path)
        except Exception as exc:  # sqlite3.Error / psycopg.Error: say where, not a traceback
            raise LedgerError(f"cannot open the collector tables: {exc}") from None

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def _run(self, sql: str, params: Sequence[Any]) -> Any:
        if self.postgres and not params:
            # No parameters, no placeholder parsing: a literal % (LIKE 'x_%') stays as it is.
            return self._conn.execute(sql)
        return self._conn.execute(self._sql(sql), tuple(params))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            cur = self._run(sql, params)
            rows = cur.fetchall() if cur.description else []
            return [tuple(r) for r in rows]

    @contextmanager
    def transaction(self) -> Iterator[CollectorDB]:
        """A write transaction; on SQLite it takes the writer lock at once (BEGIN IMMEDIATE)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE" if not self.postgres else "BEGIN")
            try:
                yield self
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            cur = self._run(sql, params)
            return int(cur.rowcount or 0)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        with self._lock:
            if self.postgres:
                with self._conn.cursor() as cur:
                    cur.executemany(self._sql(sql), [tuple(r) for r in rows])
            else:
                self._conn.executemany(sql, [tuple(r) for r in rows])

    def create(self, statements: Sequence[str]) -> None:
        with self.transaction():
            for statement in statements:
                self.execute(statement)

    def claim_single_writer(self, *, shared: bool = False) -> None:
        """Hold, for this connection's life, the right to be the ledger's only collector.

        SQLite: an exclusive ``flock`` on ``$LEDGER_HOME/collector.lock``; PostgreSQL: a
        session advisory lock. Both vanish with the process, so a crash never leaves a
        stale claim behind.

        ``shared``: a worker of ``ledger serve --workers N`` (SQLite only), which checks its
        identity resolutions under the ledger's write lock: any number of those may share
        the ledger (a shared ``flock``), but not with a single collector trusting its cache.
        """
        if self.postgres:
            if shared:
                raise LedgerError(
                    "collector workers share a SQLite ledger only; with PostgreSQL run one "
                    "collector process (--workers 1)"
                )
            held = self.query("SELECT pg_try_advisory_lock(?)", [_ADVISORY_KEY])[0][0]
            if not held:
                raise LedgerError(
                    f"another collector is already serving the ledger at {self.location}; "
                    "run one collector per ledger"
                )
            return
        path = self._home / "collector.lock"
        handle = path.open("a")
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise LedgerError(
                f"another collector is already serving the ledger at {self.location} "
                f"(it holds {path}); run one collector per ledger, or several only as "
                "`ledger serve --workers N`"
            ) from None
        self._claim = handle

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._claim is not None:
                self._claim.close()
                self._claim = None
