"""The lifecycle-change stream: ordered, resumable from a position, for embedded subscribers.

Changes are read from ``lifecycle_changes`` by ``seq`` (1, 2, ... gap-free). A
consumer remembers the last ``seq`` it handled and resumes with ``after=seq``;
the ``change_id`` is deterministic, so a consumer that may see a change twice
(at-least-once delivery, such as the Kafka publisher) can drop repeats by it.
Because projections are a pure function of the ledger, ``seq`` numbers survive
a ``--rebuild`` unchanged.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import duckdb

from ledger.ledger import LedgerError
from ledger.projection.query import query
from ledger.settings import Settings

_COLUMNS = (
    "seq, CAST(change_id AS VARCHAR) AS change_id, customer_id, from_stage, to_stage, "
    "CAST(event_id AS VARCHAR) AS event_id, event_position, occurred_at, ledger_position"
)


@dataclass(frozen=True)
class LifecycleChange:
    seq: int
    change_id: str
    customer_id: str
    from_stage: str | None
    to_stage: str
    event_id: str
    event_position: int
    occurred_at: dt.datetime
    ledger_position: int

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "change_id": self.change_id,
            "customer_id": self.customer_id,
            "from_stage": self.from_stage,
            "to_stage": self.to_stage,
            "event_id": self.event_id,
            "event_position": self.event_position,
            "occurred_at": self.occurred_at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
            "ledger_position": self.ledger_position,
        }


def changes_after(
    con: duckdb.DuckDBPyConnection, after: int = 0, limit: int = 1_000
) -> list[LifecycleChange]:
    """Up to ``limit`` changes with ``seq > after``, in order (from any projections database)."""
    rows = con.execute(
        f"SELECT {_COLUMNS} FROM lifecycle_changes WHERE seq > ? ORDER BY seq LIMIT ?",
        [after, limit],
    ).fetchall()
    return [LifecycleChange(*row) for row in rows]


def iter_changes(
    con: duckdb.DuckDBPyConnection, after: int = 0, page: int = 1_000
) -> Iterator[LifecycleChange]:
    """Every change after ``after`` that exists now, page by page."""
    while True:
        found = changes_after(con, after, page)
        if not found:
            return
        yield from found
        after = found[-1].seq


def subscribe(
    settings: Settings | None = None,
    after: int = 0,
    *,
    follow: bool = True,
    poll_interval: float = 0.25,
    page: int = 1_000,
    stop: threading.Event | None = None,
) -> Iterator[LifecycleChange]:
    """Changes after ``after``, from any process; with ``follow``, wait for more.

    Runs alongside ``ledger project --follow``: it asks the runner (or reads the last
    snapshot when none is following), so it sees whole batches only.
    """
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            table = query(
                f"SELECT {_COLUMNS} FROM lifecycle_changes WHERE seq > {int(after)} "
                f"ORDER BY seq LIMIT {int(page)}",
                settings,
            )
        except LedgerError:
            if not follow:
                raise
            stop.wait(poll_interval)
            continue
        found = [LifecycleChange(*row.values()) for row in table.to_pylist()]
        for change in found:
            yield change
            after = change.seq
        if len(found) == page:
            continue
        if not follow:
            return
        stop.wait(poll_interval)
