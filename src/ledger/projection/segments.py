"""The columnar copy of the log: immutable Parquet segments written beside the ledger.

Reading the ledger through its store caps a rebuild at the speed of the notification
log (~140k events/s here) and parsing each sealed body costs more again. So when the
runner parses a batch of the log it also writes the parsed columns (``batch_events``,
see ``projections/events.sql``) as one Parquet segment, ``events-<first>-<last>.parquet``,
in a directory beside the ledger (not inside the DuckDB file, which a rebuild deletes).
A later rebuild loads the segments at DuckDB's Parquet speed and reads only the log's
tail from the store.

The copy is a cache, not truth. Each segment is checked against the ledger before it
is used, once per runner: its row count must equal its position range and the hash
recorded in its metadata must equal the hash of the ledger's event at its last position
(one indexed read); a segment that fails is deleted and rewritten from the log. Only a
contiguous chain of segments from position 1 is used. Personal data stays ciphertext in
the copy, exactly as in the ledger, so ``forget`` (which destroys the customer's key)
erases it there too. ``ledger project --no-columnar`` bypasses the copy.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from ledger.chain import SealError, unseal
from ledger.ledger import Ledger

_NAME = re.compile(r"^events-(\d{12})-(\d{12})\.parquet$")
_HASH_KEY = b"ledger_last_hash"
#: Batches smaller than this are not written as segments (follow mode's small batches).
MIN_SEGMENT_EVENTS = 10_000


@dataclass(frozen=True)
class Segment:
    first: int
    last: int
    path: Path

    @property
    def events(self) -> int:
        return self.last - self.first + 1


def matches(segment: Segment, ledger: Ledger) -> bool:
    """Whether the file holds as many rows as its positions and the hash recorded in it is
    the ledger's at its last position (False too when it cannot be read)."""
    try:
        meta = pq.read_metadata(segment.path)
        recorded = (meta.metadata or {}).get(_HASH_KEY, b"").decode("ascii", "replace")
        rows = ledger.read_raw(segment.last - 1, 1)
        return (
            meta.num_rows == segment.events
            and len(rows) == 1
            and rows[0].position == segment.last
            and unseal(rows[0].state)[1] == recorded
        )
    except (OSError, SealError, ValueError):
        return False


class ColumnarCopy:
    """The segments in ``directory`` that belong to ``ledger``."""

    def __init__(
        self, directory: Path, ledger: Ledger, *, min_events: int = MIN_SEGMENT_EVENTS
    ) -> None:
        self.directory = Path(directory)
        self.ledger = ledger
        self.min_events = min_events
        self._verified: set[Path] = set()
        self._chain: list[Segment] | None = None

    def _listed(self) -> list[Segment]:
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            match = _NAME.match(entry.name)
            if match:
                first, last = int(match[1]), int(match[2])
                if 1 <= first <= last:
                    found.append(Segment(first, last, entry))
        # For each start, the longest segment first.
        return sorted(found, key=lambda s: (s.first, -s.last))

    def verify(self, segment: Segment) -> bool:
        """Whether ``segment`` matches the ledger (checked once per copy); one that does
        not is deleted."""
        if segment.path in self._verified:
            return True
        if matches(segment, self.ledger):
            self._verified.add(segment.path)
            return True
        with contextlib.suppress(OSError):
            segment.path.unlink()
        return False

    def chain(self) -> list[Segment]:
        """The verified, contiguous segments from position 1 (cached per runner)."""
        if self._chain is None:
            chain: list[Segment] = []
            expect = 1
            for segment in self._listed():
                if segment.first < expect:
                    continue  # overlaps the chain (a shorter or stale segment)
                if segment.first > expect:
                    break  # a gap: the rest cannot be used yet
                if self.verify(segment):
                    chain.append(segment)
                    expect = segment.last + 1
            self._chain = chain
        return self._chain

    @property
    def frontier(self) -> int:
        """The last position the copy holds (0: none)."""
        chain = self.chain()
        return chain[-1].last if chain else 0

    def covering(self, after: int, budget: int) -> list[Segment]:
        """Whole segments holding the positions after ``after``, about ``budget`` events."""
        out: list[Segment] = []
        for segment in self.chain():
            if segment.last <= after:
                continue
            out.append(segment)
            if segment.last - after >= budget:
                break
        return out

    def write(
        self, con: duckdb.DuckDBPyConnection, table: str, first: int, last: int, last_hash: str
    ) -> Segment:
        """Write ``table`` (positions ``first``..``last``) as the next segment."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"events-{first:012d}-{last:012d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        con.execute(
            f"COPY (SELECT * FROM {table} ORDER BY position) TO '{tmp}' "
            f"(FORMAT parquet, KV_METADATA {{{_HASH_KEY.decode()}: '{last_hash}'}})"
        ).fetchall()
        os.replace(tmp, path)
        segment = Segment(first, last, path)
        self._verified.add(path)
        if self._chain is not None and self.frontier == first - 1:
            self._chain.append(segment)
        return segment

    def remove_stale(self) -> None:
        """Delete temporary files left by a runner killed while writing a segment."""
        if self.directory.is_dir():
            for stale in self.directory.glob(".events-*.tmp-*"):
                with contextlib.suppress(OSError):
                    stale.unlink()
