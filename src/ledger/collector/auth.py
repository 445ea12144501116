"""Write keys: one per source, bound to the channels that source may write, stored hashed.

A key is 32 random bytes (``lk_`` + URL-safe base64). Only its SHA-256 is kept:
with that much entropy a fast hash is enough (a slow password hash protects
guessable secrets, which these are not) and lets every request be checked with
one indexed lookup. The first characters are kept in clear as a ``prefix`` so
people can tell keys apart in ``ledger sources list``.

A revoked key stops working within :data:`CACHE_SECONDS` in a running collector.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
import threading
import time
from dataclasses import dataclass

from ledger.collector.db import CollectorDB
from ledger.contract import CHANNELS
from ledger.ledger import LedgerError

KEY_PREFIX = "lk_"
#: How long a running collector trusts a looked-up key before asking the database again.
CACHE_SECONDS = 1.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
#: Channels a write key may be bound to: the touchpoint and fact channels, not ``system``
#: (system events are derived by the collector itself, e.g. consent from an unsubscribe).
KEY_CHANNELS = tuple(c for c in CHANNELS if c != "system")

TABLES = [
    """CREATE TABLE IF NOT EXISTS collector_sources (
        name TEXT PRIMARY KEY,
        channels TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        key_prefix TEXT NOT NULL,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    )""",
]


@dataclass(frozen=True)
class Source:
    """A registered source: who may write, and to which channels."""

    name: str
    channels: tuple[str, ...]
    key_prefix: str
    created_at: str
    revoked_at: str | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class SourceRegistry:
    """The ``collector_sources`` table: add, list, revoke, and check keys."""

    def __init__(self, db: CollectorDB):
        self.db = db
        db.create(TABLES)
        self._cache: dict[str, tuple[float, Source | None]] = {}
        self._cache_lock = threading.Lock()

    def add(self, name: str, channels: list[str]) -> tuple[Source, str]:
        """Register ``name`` for ``channels``; returns the source and its key (shown once)."""
        if not _NAME.match(name):
            raise LedgerError(
                f"source name {name!r} is not usable; expected letters, digits, _ . - "
                "(starting with a letter or digit, at most 100 characters)"
            )
        if not channels:
            raise LedgerError("a source needs at least one --channel")
        unknown = [c for c in channels if c not in KEY_CHANNELS]
        if unknown:
            raise LedgerError(
                f"channel {unknown[0]!r} is not a channel a source can write; expected one of "
                + ", ".join(KEY_CHANNELS)
            )
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        chans = tuple(dict.fromkeys(channels))
        with self.db.transaction():
            if self.db.query("SELECT 1 FROM collector_sources WHERE name = ?", [name]):
                raise LedgerError(
                    f"source {name!r} already exists; revoke it and add one with a new name"
                )
            self.db.execute(
                "INSERT INTO collector_sources (name, channels, key_hash, key_prefix, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [name, ",".join(chans), hash_key(key), key[:10], now],
            )
        return Source(name, chans, key[:10], now, None), key

    def list(self) -> list[Source]:
        rows = self.db.query(
            "SELECT name, channels, key_prefix, created_at, revoked_at FROM collector_sources "
            "ORDER BY name"
        )
        return [Source(r[0], tuple(r[1].split(",")), r[2], r[3], r[4]) for r in rows]

    def revoke(self, name: str) -> Source:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with self.db.transaction():
            rows = self.db.query("SELECT revoked_at FROM collector_sources WHERE name = ?", [name])
            if not rows:
                known = ", ".join(s.name for s in self.list()) or "none yet"
                raise LedgerError(f"no source named {name!r} (known: {known})")
            if rows[0][0] is None:
                self.db.execute(
                    "UPDATE collector_sources SET revoked_at = ? WHERE name = ?", [now, name]
                )
        return next(s for s in self.list() if s.name == name)

    def check(self, key: str) -> Source | None:
        """The active source this key belongs to, or None (unknown or revoked)."""
        digest = hash_key(key)
        now = time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit[1]
        rows = self.db.query(
            "SELECT name, channels, key_prefix, created_at, revoked_at FROM collector_sources "
            "WHERE key_hash = ?",
            [digest],
        )
        source = None
        if rows and rows[0][4] is None:
            r = rows[0]
            source = Source(r[0], tuple(r[1].split(",")), r[2], r[3], r[4])
        with self._cache_lock:
            if len(self._cache) > 10_000:  # unknown keys must not grow the cache without bound
                self._cache.clear()
            self._cache[digest] = (now, source)
        return source
