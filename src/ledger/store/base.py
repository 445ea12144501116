"""What the ledger needs from a database, whichever it is.

The tables (both stores):

* ``stored_events``: eventsourcing's application table. ``originator_id`` is
  the customer id, ``originator_version`` the per-customer sequence, ``topic``
  the event type, ``state`` the sealed event (see :mod:`ledger.chain`), and
  the notification id (SQLite rowid / PostgreSQL ``notification_id``) is the
  global position. Update, delete and truncate are refused by triggers.
* ``ledger_event_ids``: the idempotency index, one row per stored event id.
* ``ledger_streams``: per customer, the last sequence and the head hash.
* ``ledger_keys``: per customer, the data key wrapped by the master key. The
  only table rows are ever deleted from (``forget``).
* tracking (eventsourcing's): the position a reader or an upstream offset has
  reached, written in the same transaction as the events it produced.

All writes go through a :class:`WriteSession`, which holds the store's single
writer lock (SQLite ``BEGIN IMMEDIATE``, PostgreSQL ``LOCK TABLE ... EXCLUSIVE``)
so positions are assigned gap-free and chains extended without races.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple

from eventsourcing.persistence import PersistenceError, Tracking


class StoredRow(NamedTuple):
    position: int
    customer_id: str
    sequence: int
    type: str
    state: bytes


class Head(NamedTuple):
    """The end of one customer's chain: last sequence and its hash."""

    sequence: int
    hash: str


class WriteSession(abc.ABC):
    """Primitives available while holding the writer lock, inside one transaction."""

    #: The DB-API cursor the session writes through (sqlite3 or psycopg).
    cur: Any

    @property
    def connection(self) -> Any:
        """The DB-API connection of this transaction: rows a caller writes through it
        commit (or roll back) together with the events (see ``Ledger.append_valid``)."""
        return self.cur.connection

    @abc.abstractmethod
    def existing_event_ids(self, event_ids: Sequence[bytes]) -> set[bytes]: ...

    @abc.abstractmethod
    def heads(self, customer_ids: Sequence[str]) -> dict[str, Head]: ...

    @abc.abstractmethod
    def max_position(self) -> int: ...

    @abc.abstractmethod
    def wrapped_keys(self, customer_ids: Sequence[str]) -> dict[str, bytes]: ...

    @abc.abstractmethod
    def insert_keys(self, rows: Sequence[tuple[str, bytes]]) -> None: ...

    @abc.abstractmethod
    def insert_events(self, rows: Sequence[StoredRow], event_ids: Sequence[bytes]) -> None: ...

    @abc.abstractmethod
    def upsert_heads(self, heads: dict[str, Head]) -> None: ...

    @abc.abstractmethod
    def record_tracking(self, tracking: Sequence[Tracking]) -> None:
        """Store consumed positions/offsets; refuse (raise) one that does not move forward."""

    @abc.abstractmethod
    def delete_key(self, customer_id: str) -> bool: ...

    @abc.abstractmethod
    def any_wrapped_key(self) -> tuple[str, bytes] | None:
        """One stored (customer, wrapped key): proof the master key is right before new
        keys are wrapped with it."""


class EventStore(abc.ABC):
    """A database holding the ledger. Subclasses wrap an eventsourcing process recorder."""

    #: Human-readable location for messages (a path or a URL without password).
    location: str

    @abc.abstractmethod
    def write(self) -> AbstractContextManager[WriteSession]:
        """A transaction holding the writer lock; commits on success."""

    @abc.abstractmethod
    def read_log(self, after: int, limit: int) -> list[StoredRow]:
        """Events with position > ``after``, in position order (the notification log)."""

    @abc.abstractmethod
    def read_stream(self, customer_id: str) -> list[StoredRow]:
        """One customer's events in sequence order."""

    def wrapped_key(self, customer_id: str) -> bytes | None:
        return self.read_wrapped_keys([customer_id]).get(customer_id)

    @abc.abstractmethod
    def read_wrapped_keys(self, customer_ids: Sequence[str]) -> dict[str, bytes]:
        """Wrapped keys of many customers in one query (bulk readers such as projections)."""

    @abc.abstractmethod
    def all_heads(self) -> Iterator[tuple[str, Head]]: ...

    @abc.abstractmethod
    def max_position(self) -> int: ...

    @abc.abstractmethod
    def tracking_position(self, name: str) -> int | None:
        """The last position/offset recorded under ``name`` (None if never)."""

    @abc.abstractmethod
    def counts_by_type(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def customer_count(self) -> int: ...

    @abc.abstractmethod
    def size_bytes(self) -> dict[str, int]:
        """Storage used, by file or relation name."""

    def checkpoint(self) -> bool:
        """After ``forget``: make the erased rows' old page images leave the database's
        write-ahead files now; False if that could not be done. Only SQLite has a step of
        its own here (its WAL); other stores have nothing to do."""
        return True

    def backup(self, destination: Path) -> None:
        """Write a consistent copy of the ledger to ``destination`` while appends go on."""
        raise NotImplementedError(
            f"the ledger at {self.location} is backed up by its database's own tools"
        )

    @abc.abstractmethod
    def close(self) -> None: ...


def create_schema(recorder: Any, attempts: int = 5) -> None:
    """Create the recorder's tables, retrying while another process creates them too.

    eventsourcing's ``create_table`` is not safe when two processes start on a fresh
    database at once: both insert the same tracking-migration row, and PostgreSQL's
    CREATE TYPE / CREATE TABLE IF NOT EXISTS collide on ``pg_type``. The loser's transaction
    rolls back; on the next attempt it finds the schema in place.
    """
    for attempt in range(attempts):
        try:
            recorder.create_table()
            return
        except PersistenceError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
