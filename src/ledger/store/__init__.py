"""Event stores: the ledger's tables on eventsourcing's recorders (SQLite, PostgreSQL)."""

from __future__ import annotations

from ledger.settings import Settings
from ledger.store.base import EventStore, StoredRow, WriteSession


def open_store(settings: Settings) -> EventStore:
    """The store the settings name: PostgreSQL for ``LEDGER_STORE_URL``, else the SQLite file."""
    if settings.store_url:
        from ledger.store.postgres import PostgresStore

        return PostgresStore.from_url(settings.store_url)
    from ledger.store.sqlite import SQLiteStore

    settings.home.mkdir(parents=True, exist_ok=True)
    return SQLiteStore(
        settings.sqlite_path,
        cache_mb=settings.sqlite_cache_mb,
        synchronous=settings.sqlite_synchronous,
    )


__all__ = ["EventStore", "StoredRow", "WriteSession", "open_store"]
