"""The projection runner: folds the ledger's global log into DuckDB, exactly once.

Each batch of the log (``Ledger.read_raw``) is applied in one DuckDB
transaction that also stores the batch's last position in
``projection_state``: killed at any instant, the runner resumes from the last
committed position and the half-applied batch never happened. Per-event Python
work is kept to slicing the sealed bytes and decrypting the rows that carry
personal data; DuckDB parses the JSON and every table is recomputed
set-at-a-time for the customers the batch touched (so late events land where
they occurred). RFM and churn risk depend on a reference date over all
customers; they are recomputed when the runner catches up with the ledger
(``refresh_derived``), in their own transaction, recording the position they
reflect; in ``follow`` a background thread does that and publishes snapshots on
its own connection, while a socket serves read-only queries
(:mod:`ledger.projection.serve`).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from ledger.chain import unseal
from ledger.ledger import Ledger, LedgerError
from ledger.projection import churn, lifecycle, serve, snapshot, workers
from ledger.projection.definitions import sql
from ledger.projection.rfm import segment_table
from ledger.projection.segments import ColumnarCopy, Segment, matches
from ledger.settings import Settings
from ledger.store import StoredRow

_TS = pa.timestamp("us", tz="UTC")
#: Batches smaller than this are follow mode's: their statements run on one DuckDB thread
#: (a second one saved no time on a 2,500-event batch at 100k customers but cost 6-17 %
#: more CPU, taken from the appenders and readers on the same cores), and decryption keeps
#: its key cache (their customers come back).
_SMALL_BATCH = 10_000
#: The table layout of projections/schema.sql; a file of another layout needs --rebuild.
LAYOUT_VERSION = 8
ProgressFn = Callable[[int, int], None]
#: WAL size at which DuckDB checkpoints by itself while following (see ``follow``).
FOLLOW_CHECKPOINT_MB = 1024
#: The tables a follow-mode batch reads or rewrites (warmed up before following).
_WARM_TABLES = (
    "customer_facts",
    "customer_identifiers",
    "touches",
    "lifecycle",
    "lifecycle_history",
    "purchases",
    "ticket_events",
    "consents",
    "forgotten",
    "customer_aliases",
    "customer_merges",
)
#: Following, checkpoint a WAL of 64 MB or more once no batch came for this long.
IDLE_CHECKPOINT_SECONDS = 2.0
#: Following, the maintenance thread waits after each publish (or derive) at least this
#: many times as long as it took, so it takes at most a tenth of the time whatever the
#: data's size: it shares the cores with the batches whose freshness counts. At 1M events
#: a publish took 1.2-2.3 s (1.1-1.3 s CPU); every 5 s it was a fifth of a core, and at
#: 10M (3.5 s) it would have published back to back.
MAINTENANCE_SPACING = 9.0
#: Events per transaction when loading from the columnar copy (whole segments). Large:
#: every per-customer step (facts merge, identifiers, lifecycle) costs per customer the
#: batch touches, so at 10M events over 1M customers ten 1M-event batches did most of that
#: work ten times (68k events/s) where one transaction does it once. DuckDB spills what
#: exceeds its memory limit and the Python steps go to worker processes in partitions.
COPY_BATCH = 20_000_000
#: A catch-up at least this many events behind the ledger first extends the columnar copy
#: to the ledger's head (parsing the log and writing segments, nothing applied), then
#: applies it all from the copy in one transaction. Batch by batch from the log, every
#: batch repeats the per-customer work for the customers it touches: a first pass over 10M
#: events took 383 s that way.
COPY_AHEAD_MIN_EVENTS = 500_000
#: Events per segment written ahead of the projections (the view over the segments reads
#: one file per segment: not too many, each parsed batch held in memory: not too big).
AHEAD_SEGMENT_EVENTS = 100_000
_HAS_MERGES = "SELECT count(*) FROM batch_events WHERE type = 'customers_merged'"
#: DuckDB's memory limit (it spills beyond): with the two worker processes of a big batch
#: (~300-420 MB each) the runner stays under 2 GB in all (10M events: 1.8 GB; at 1 GB the
#: sum was 2.07 GB for the same 46 s).
MEMORY_LIMIT = "700MB"
#: Batches of at least this many events fold and decrypt in worker processes.
OFFLOAD_MIN_EVENTS = 200_000
#: Following, churn models of at least this many purchasers are fitted in a worker process.
FIT_OFFLOAD_MIN = 1_000
#: Rows per partition handed to a worker process: touches to fold, events to decrypt.
_FOLD_PART_ROWS = 75_000
_DECRYPT_PART_ROWS = 50_000
_FORGOTTEN = "SELECT DISTINCT customer_id FROM batch_events WHERE type = 'customer_forgotten'"


class ProjectionRunner:
    """Owns the projections DuckDB file (one writer) and publishes snapshots for readers."""

    def __init__(
        self,
        ledger: Ledger,
        path: Path,
        *,
        snapshot_to: Path | None = None,
        serve_at: Path | None = None,
        batch_size: int = 50_000,
        snapshot_interval: float = 5.0,
        derive_interval: float = 30.0,
        memory_limit: str = MEMORY_LIMIT,
        columnar: Path | None = None,
        segment_min_events: int | None = None,
        settings: Settings | None = None,
        offload_min_events: int = OFFLOAD_MIN_EVENTS,
        processes: int | None = None,
        fit_offload_min: int = FIT_OFFLOAD_MIN,
        copy_ahead_min_events: int = COPY_AHEAD_MIN_EVENTS,
        ahead_segment_events: int = AHEAD_SEGMENT_EVENTS,
    ):
        self.ledger = ledger
        #: Lets worker processes open the ledger's store (for wrapped keys); without it
        #: big batches decrypt in this process.
        self.settings = settings
        #: Batches of at least this many events run their Python steps in processes.
        self.offload_min_events = offload_min_events
        #: Following, a churn fit of at least this many purchasers runs in a process.
        self.fit_offload_min = fit_offload_min
        #: A catch-up this far behind extends the columnar copy first (see COPY_AHEAD_MIN_EVENTS).
        self.copy_ahead_min_events = copy_ahead_min_events
        #: Events per segment written ahead (at least ``batch_size``).
        self.ahead_segment_events = ahead_segment_events
        self._offload = workers.Offload(processes or os.cpu_count() or 1)
        self._registered: list[str] = []
        #: Told what a long batch is doing (``ledger project`` shows it beside its bar).
        self.on_phase: Callable[[str], None] | None = None
        self.copy: ColumnarCopy | None = None
        if columnar is not None:
            self.copy = ColumnarCopy(columnar, ledger)
            if segment_min_events is not None:
                self.copy.min_events = segment_min_events
            self.copy.remove_stale()
        self.path = Path(path)
        self.snapshot_to = snapshot_to
        self.serve_at = serve_at
        self.batch_size = batch_size
        self.snapshot_interval = snapshot_interval
        self.derive_interval = derive_interval
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open(memory_limit)
        self._threads = int(_x(self.con, "SELECT current_setting('threads')")[0][0])
        self._threads_now = self._threads
        self._published_at = 0.0
        self._derived_at = 0.0
        #: How long the last publish / derive took (wall seconds): spaces the next one.
        self._publish_took = 0.0
        self._derive_took = 0.0
        self._dirty = False
        self._applied_at = 0.0
        self._background = False
        if snapshot_to is not None:
            snapshot.remove_stale(snapshot_to)

    def _open(self, memory_limit: str) -> None:
        """Open the projections file (this runner is its one writer), create what it lacks
        and define ``events``. A file held by another writer, or one that is damaged (not a
        DuckDB database, or cut short: that opens and fails at its first read), is refused
        here with a sentence."""
        opened = None
        try:
            opened = self.con = duckdb.connect(str(self.path))
            # Scratch files of a runner of this file killed mid-batch (it is not alive: this
            # runner holds the file's lock).
            for stale in self.path.parent.glob(f".{self.path.name}.work-*"):
                shutil.rmtree(stale, ignore_errors=True)
            _x(self.con, "SET TimeZone = 'UTC'")
            _x(self.con, f"SET memory_limit = '{memory_limit}'")
            self._check_layout()
            _x(self.con, sql("schema", "schema"))
            if self.con.execute("SELECT count(*) FROM rfm_segments").fetchall()[0] == (0,):
                self.con.register("segments_in", segment_table())
                _x(self.con, "INSERT INTO rfm_segments SELECT * FROM segments_in")
                self.con.unregister("segments_in")
            _x(self.con, sql("customer_360", "view"))
            self._open_events()
        except duckdb.IOException as exc:
            if opened is not None:
                opened.close()
            if snapshot.held_by_writer(exc):
                raise LedgerError(
                    f"cannot open the projections at {self.path}: {exc} "
                    "(is another `ledger project` running?)"
                ) from None
            raise LedgerError(
                f"cannot open the projections at {self.path}: {exc}; they are computed from "
                "the ledger: `ledger project --rebuild` replaces the file and recomputes them"
            ) from None

    def _check_layout(self) -> None:
        """Refuse a file written by another table layout: its tables cannot be extended."""
        tables = {r[0] for r in _x(self.con, "SELECT table_name FROM information_schema.tables")}
        if "projection_state" not in tables:
            return  # a new file
        found = None
        if "projection_layout" in tables:
            found = _x(self.con, "SELECT max(version) FROM projection_layout")[0][0]
        if found != LAYOUT_VERSION:
            raise LedgerError(
                f"the projections at {self.path} were written by another layout "
                f"(version {found}, this runner writes {LAYOUT_VERSION}); "
                "run `ledger project --rebuild`"
            )

    def _open_events(self) -> None:
        """Define the ``events`` view, first putting the events of any segment it read that
        is gone (or no longer matches the ledger) back into ``events_tail`` from the log."""
        con = self.con
        listed = _x(con, "SELECT first, last, path FROM events_segments ORDER BY first")
        # With --no-columnar (no copy) a segment is still read, not deleted, if it matches.
        verify = self.copy.verify if self.copy else partial(matches, ledger=self.ledger)
        lost = [
            (first, last, path)
            for first, last, path in listed
            if not verify(Segment(first, last, self._segment_path(path)))
        ]
        if lost:
            with self._transaction():
                for first, last, path in lost:
                    self._phase(f"reading events {first:,}..{last:,} again (their copy is gone)")
                    self._restore_events(first, last)
                    _x(con, "DELETE FROM events_segments WHERE path = ?", [path])
        self._define_events()

    def _segment_path(self, stored: str) -> Path:
        # Absolute: DuckDB reads a relative path from its working directory.
        return self.path.parent.absolute() / stored  # an absolute `stored` stays itself

    def _define_events(self) -> None:
        """(Re)create the ``events`` view over ``events_tail`` and the listed segments."""
        paths = [
            str(self._segment_path(p)).replace("'", "''")
            for (p,) in _x(self.con, "SELECT path FROM events_segments ORDER BY first")
        ]
        if paths:
            segments = "read_parquet([" + ", ".join(f"'{p}'" for p in paths) + "])"
        else:  # no segment: an empty relation of their columns
            segments = "(SELECT *, NULL::VARCHAR AS personal FROM events_tail WHERE false)"
        _x(self.con, sql("events", "view").replace("$segments", segments))

    def _add_segments(self, segments: list[Segment]) -> None:
        """``events`` reads these segments from now on (in the caller's transaction)."""
        home = self.path.parent.resolve()
        paths = [s.path.resolve() for s in segments]
        stored = [str(p.relative_to(home)) if p.is_relative_to(home) else str(p) for p in paths]
        # One statement for all of them (a 10M rebuild lists 100: 0.1 s one INSERT each).
        _x(
            self.con,
            "INSERT INTO events_segments SELECT unnest(?), unnest(?), unnest(?)",
            [[s.first for s in segments], [s.last for s in segments], stored],
        )
        self._define_events()

    def _restore_events(self, first: int, last: int) -> None:
        """Read positions ``first``..``last`` from the ledger into ``events_tail``."""
        position = first - 1
        while position < last:
            rows = self.ledger.read_raw(position, min(self.batch_size, last - position))
            if not rows or rows[0].position != position + 1:
                raise LedgerError(
                    f"the ledger does not hold positions {position + 1}..{last}, which the "
                    f"projections at {self.path} read; run `ledger project --rebuild`"
                )
            self._parse(rows)
            _x(self.con, sql("events", "load"), {"last": rows[-1].position})
            _x(self.con, "DROP TABLE batch_events")
            position = rows[-1].position

    @classmethod
    def for_settings(cls, ledger: Ledger, settings: Settings, **options: Any) -> ProjectionRunner:
        """The runner of ``ledger project``: snapshot, socket and columnar copy beside the
        ledger (pass ``columnar=None`` to bypass the copy)."""
        options.setdefault("columnar", columnar_path(settings))
        options.setdefault("offload_min_events", settings.projection_offload_events)
        return cls(
            ledger,
            settings.projections_path,
            snapshot_to=snapshot.snapshot_path(settings),
            serve_at=serve.socket_path(settings),
            settings=settings,
            **options,
        )

    def close(self) -> None:
        self._offload.close()
        self.con.close()

    def __enter__(self) -> ProjectionRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ state

    def _state(self, con: duckdb.DuckDBPyConnection | None = None) -> tuple[int, int, int]:
        """(applied position, position the derived tables reflect, last change seq)."""
        row = _x(
            con or self.con,
            "SELECT p.position, d.derived_position, p.changes "
            "FROM projection_state p, derived_state d",
        )[0]
        return int(row[0]), int(row[1]), int(row[2])

    @property
    def position(self) -> int:
        """The last ledger position applied (committed) to the projections."""
        return self._state()[0]

    def set_as_of(self, as_of: dt.datetime | None) -> None:
        """Fix the RFM / churn reference date (None: the latest event time in the ledger)."""
        _x(self.con, "UPDATE projection_state SET as_of_setting = ?", [as_of])
        _x(self.con, "UPDATE derived_state SET derived_position = -1")

    # ------------------------------------------------------------------ applying

    def catch_up(
        self, *, on_progress: ProgressFn | None = None, stop: threading.Event | None = None
    ) -> int:
        """Apply every event the ledger holds now; return how many were applied.

        Positions the columnar copy holds are loaded from it (in batches of at least
        ``COPY_BATCH`` events); the rest is read from the ledger, and a large enough batch
        read at the copy's end extends the copy.
        """
        applied = 0
        head = self.ledger.position
        if self.copy is not None:
            self._copy_ahead(self.position, head, stop)
        while stop is None or not stop.is_set():
            position = self.position
            last = self._apply_from_copy(position) if self.copy is not None else None
            if last is None:
                rows = self.ledger.read_raw(position, self.batch_size)
                if not rows:
                    break
                self.apply(rows, after=position)
                last = rows[-1].position
            applied += last - position
            self._dirty = True
            self._applied_at = time.monotonic()
            if on_progress:
                head = max(head, last)
                on_progress(last, head)
            if (
                self.snapshot_to
                and not self._background
                and time.monotonic() - self._published_at >= self.snapshot_interval
            ):
                self.publish()
        return applied

    def _copy_ahead(self, position: int, head: int, stop: threading.Event | None) -> None:
        """When the projections are at least ``copy_ahead_min_events`` behind ``head``,
        parse the log from the copy's frontier to ``head`` into new segments (nothing is
        applied: the copy is a cache, valid whether or not a batch commits), so that
        ``catch_up`` then applies the backlog from the copy in one transaction.

        Not when the copy lags the projections by more than they lag the ledger (a
        follower's small batches do not extend the copy): re-reading would cost more than
        it saves. A tail shorter than a segment is left to the batches from the log.
        """
        copy = self.copy
        assert copy is not None
        frontier = copy.frontier
        behind, missing = head - position, head - frontier
        if behind < self.copy_ahead_min_events or not copy.min_events <= missing <= 2 * behind:
            return
        size = max(self.batch_size, self.ahead_segment_events, copy.min_events)

        def more(after: int) -> bool:
            return head - after >= copy.min_events and (stop is None or not stop.is_set())

        def read(after: int) -> list[StoredRow]:
            return self.ledger.read_raw(after, min(size, head - after))

        self._use_threads(self._threads)
        # The next chunk is read from the store while DuckDB parses and writes this one.
        with ThreadPoolExecutor(1, thread_name_prefix="copy-ahead") as reader:
            pending = reader.submit(read, frontier) if more(frontier) else None
            while pending is not None:
                self._phase(f"copying the log: {frontier:,} of {head:,} events")
                rows = pending.result()
                _check_follows(rows, frontier)
                last = rows[-1].position
                pending = reader.submit(read, last) if more(last) else None
                last_hash = self._parse(rows)
                try:
                    copy.write(self.con, "batch_events", frontier + 1, last, last_hash)
                finally:
                    _x(self.con, "DROP TABLE batch_events")
                frontier = last
        # The chunks' Arrow buffers stay in Arrow's allocator otherwise (~180 MB at 1M events),
        # on top of the big batch and its worker processes that come next.
        pa.default_memory_pool().release_unused()

    def apply(self, rows: list[StoredRow], *, after: int) -> None:
        """Apply one batch of log rows (positions after ``after``) in one transaction."""
        _check_follows(rows, after)
        last = rows[-1].position
        copy = self.copy
        extend = copy is not None and len(rows) >= copy.min_events and copy.frontier == after
        self._use_threads(1 if len(rows) < _SMALL_BATCH else self._threads)
        con = self.con
        with self._transaction():
            last_hash = self._parse(rows)
            segments = None
            if extend and copy is not None:
                # A cache of the log, valid whether or not this transaction commits; `events`
                # reads the batch from it.
                segments = [copy.write(con, "batch_events", after + 1, last, last_hash)]
            self._apply_batch(after, last, segments)
            _x(con, "DROP TABLE batch_events")

    def _parse(self, rows: list[StoredRow]) -> str:
        """Parse log rows into the temp table ``batch_events``; return the last one's hash."""
        sealed = [unseal(r.state) for r in rows]
        batch = pa.table(
            {
                "position": pa.array([r.position for r in rows], pa.int64()),
                "customer_id": pa.array([r.customer_id for r in rows], pa.string()),
                "sequence": pa.array([r.sequence for r in rows], pa.int64()),
                "body": pa.array([b for b, _ in sealed], pa.binary()).cast(pa.string()),
            }
        )
        self.con.register("batch_raw", batch)
        try:
            _x(self.con, sql("events", "parse"))
        finally:
            self.con.unregister("batch_raw")
        return sealed[-1][1]

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One batch's DuckDB transaction: committed whole or rolled back, and the Arrow
        tables registered for it unregistered either way."""
        _x(self.con, "BEGIN")
        try:
            yield
            self._phase("committing")
            _x(self.con, "COMMIT")
        except BaseException:
            _x(self.con, "ROLLBACK")
            raise
        finally:
            self._unregister()

    def _apply_from_copy(self, after: int) -> int | None:
        """Apply the positions after ``after`` that the columnar copy holds; None if none."""
        assert self.copy is not None
        segments = self.copy.covering(after, max(self.batch_size, COPY_BATCH))
        if not segments:
            return None
        last = segments[-1].last
        self._use_threads(self._threads)
        con = self.con
        with self._transaction():
            files = ", ".join("'" + str(s.path).replace("'", "''") + "'" for s in segments)
            _x(
                con,
                sql("events", "from_copy")
                .replace("$files", f"[{files}]")
                .replace("$after", str(int(after)))
                .replace("$upto", str(int(last))),
            )
            found = _x(con, "SELECT count(*), min(position), max(position) FROM batch_events")[0]
            if tuple(found) != (last - after, after + 1, last):
                raise LedgerError(
                    f"the columnar copy in {self.copy.directory} holds {found[0]} events for "
                    f"positions {after + 1}..{last}; delete the directory (it is a cache) "
                    "or run with --no-columnar"
                )
            self._apply_batch(after, last, segments)
            _x(con, "DROP VIEW batch_events")
        return last

    def _unregister(self) -> None:
        for name in ("batch_raw", "churn_in", "model_in", *self._registered):
            self.con.unregister(name)
        self._registered.clear()

    def _apply_batch(self, after: int, last: int, segments: list[Segment] | None) -> None:
        """Fold ``batch_events`` (positions ``after``+1..``last``) into every table.

        ``segments``: the columnar copy's segments that hold the batch, which ``events``
        then reads in place; None: the batch goes into ``events_tail``.

        The Python steps (folding lifecycle stages, decrypting identifiers) run in a
        worker thread, or for a big batch in worker processes, while this thread has
        DuckDB load ``events`` and merge the customer facts (DuckDB releases the GIL while
        it works): they read only inputs written before they start, and their results are
        read after they end.
        """
        con = self.con
        _x(con, "CREATE OR REPLACE TEMP TABLE recompute (customer_id VARCHAR)")
        merged = bool(_x(con, _HAS_MERGES)[0][0])
        if merged:  # identity stitching: re-key set-at-a-time (projections/merges.sql)
            _x(con, sql("merges", "record"), {"after": after})
            _x(con, sql("merges", "resolve"))
            self._load_events(segments, after, last)
        _x(con, sql("events", "affected"))
        if merged:
            _x(con, sql("merges", "rekey"))
            _x(con, sql("identifiers", "keep_newest"))
            _x(con, sql("merges", "erase"))
            _x(con, sql("merges", "affected"))
        _x(con, sql("events", "slices"))
        forgotten = [c for (c,) in _x(con, _FORGOTTEN)]
        if forgotten:
            _x(con, sql("identifiers", "erase"), {"after": after})
        _, _, seq = self._state()
        # A big batch's Python steps go to worker processes through this scratch directory.
        work = self._work_dir() if last - after >= self.offload_min_events else None
        try:
            self._phase("choosing lifecycle touches and identifiers")
            _x(con, sql("events", "touches"), {"types": list(lifecycle.RELEVANT_TYPES)})
            folding = self._start_fold(after, work)
            decrypting: _Pending | None = None
            try:
                decrypting = self._start_decrypt(forgotten, work)
                self._phase("loading events, merging customer facts")
                _x(con, sql("customer_360", "merge"))
                if merged:
                    _x(con, sql("customer_360", "refresh"))
                    _x(con, sql("customer_360", "insert"))
                else:
                    self._load_events(segments, after, last)
                if work is not None and not self._background and last >= self.ledger.position:
                    # The batch that catches up: rfm and churn read neither identifiers nor
                    # stages, so compute them now, while the worker processes finish,
                    # rather than after the commit (refresh_derived then has nothing to do).
                    # Not while following: there the maintenance thread owns those tables.
                    self._phase("computing RFM and churn risk")
                    self._derive(con, last)
            finally:
                self._phase("folding lifecycle stages, decrypting identifiers")
                try:
                    folded = folding.result()
                finally:
                    if decrypting is not None:
                        decrypted = decrypting.result()
            self._phase("writing identifiers and lifecycle history")
            self._identifiers_finish(decrypted)
            changes = self._lifecycle_finish(folded, seq)
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
        _x(con, "UPDATE projection_state SET position = ?, changes = ?", [last, changes])

    def _load_events(self, segments: list[Segment] | None, after: int, last: int) -> None:
        """Make ``events`` show the batch: read in place from ``segments``, or (None) stored
        in ``events_tail``."""
        if segments is None:
            _x(self.con, sql("events", "load"), {"last": last})
            return
        if segments[0].first <= after:
            # The first segment also holds events applied before (the copy was cut elsewhere:
            # written ahead from behind the projections, or by a runner of another file):
            # its new events go to the tail, and the segment is not listed.
            _x(self.con, sql("events", "load"), {"last": segments[0].last})
            segments = segments[1:]
        if segments:
            self._add_segments(segments)

    def _phase(self, what: str) -> None:
        if self.on_phase is not None:
            self.on_phase(what)

    def _use_threads(self, threads: int) -> None:
        if threads != self._threads_now:
            _x(self.con, f"SET threads = {threads}")
            self._threads_now = threads

    def _work_dir(self) -> Path:
        """A scratch directory beside the projections for one offloaded batch's files."""
        work = self.path.parent / f".{self.path.name}.work-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        return work

    def _parts(self, rows: int, rows_per_part: int) -> int:
        """How many partitions to cut ``rows`` rows into: about ``rows_per_part`` each,
        and at least two per worker process so the processes finish close together."""
        return max(2 * self._offload.processes, -(-rows // rows_per_part))

    def _start_fold(self, after: int, work: Path | None) -> _Pending:
        """Start refolding the stage history of every stream the batch changes.

        Inline, one fold in a thread; offloaded, the streams are cut into partitions by
        their canonical customer (a merged group stays whole) and each partition's touches
        go to a worker process as a Parquet file.
        """
        con = self.con
        _x(con, sql("lifecycle", "streams"), {"after": after})
        _x(con, sql("lifecycle", "resume"), {"after": after})
        # The input is read once, by this thread or by the COPY to the workers' files: a
        # temp table of it would hold its memory until the batch commits.
        touches = sql("lifecycle", "input").strip().rstrip(";")
        if work is None:
            inputs = workers.LifecycleInputs(
                con.sql(
                    f"SELECT * EXCLUDE (root) FROM ({touches}) ORDER BY position",
                    params={"after": after},
                ).to_arrow_table(),
                _x(con, sql("lifecycle", "merges")),
                _x(con, sql("lifecycle", "resumed")),
            )
            return _Pending.inline(lambda: [workers.fold(after, inputs)])
        rows = _x(con, sql("lifecycle", "input_bound"))[0][0]
        parts = self._parts(int(rows), _FOLD_PART_ROWS)
        _x(con, _copy_parts(touches, "root", parts, work / "touches"), {"after": after})
        merges: dict[int, list[Any]] = {}
        for *merge, part in _x(con, _by_part(sql("lifecycle", "merges"), "customer_id", parts)):
            merges.setdefault(part, []).append(tuple(merge))
        resumed: dict[int, list[Any]] = {}
        for *row, part in _x(con, _by_part(sql("lifecycle", "resumed"), "customer_id", parts)):
            resumed.setdefault(part, []).append(tuple(row))
        return _Pending.offloaded(
            [
                self._offload.fold(
                    after,
                    work / "touches" / f"part={k}",
                    merges.get(k, []),
                    resumed.get(k, []),
                    work / f"folded-{k}",
                )
                for k in range(parts)
            ]
        )

    def _start_decrypt(self, forgotten: list[str], work: Path | None) -> _Pending:
        """Start decrypting the events whose identifiers the batch needs
        (``projections/identifiers.sql``): per (customer, field) the newest event naming
        the field, and whole every body that does not name its identifiers;
        ``_identifiers_finish`` asks for the next newest only when one cannot be decrypted.
        """
        con = self.con
        keys = self.ledger.keys
        self._identifier_candidates(forgotten)
        _x(con, pick_sql())
        if work is None or self.settings is None:
            picked = self._take_picked()
            return _Pending.inline(lambda: [self._decrypt_inline(picked)])
        events = _x(con, "SELECT count(DISTINCT position) FROM id_candidates")[0][0]
        parts = self._parts(int(events), _DECRYPT_PART_ROWS)
        _x(con, _copy_parts("SELECT * FROM id_pick", "stream_id", parts, work / "picked"))
        _x(
            con,
            sql("identifiers", "meta_from_files"),
            {"files": str(work / "picked" / "*" / "*.parquet")},
        )
        _x(con, sql("identifiers", "picked_done"))
        return _Pending.offloaded(
            [
                self._offload.decrypt(
                    work / "picked" / f"part={k}", keys, self.settings, work / f"decrypted-{k}"
                )
                for k in range(parts)
            ]
        )

    def _identifier_candidates(self, forgotten: list[str]) -> None:
        """Choose the events to decrypt (temp table ``id_candidates``)."""
        # A forget destroys the key; a later event for the customer gets a new one, so a
        # cached old key must not be used for the rows after it.
        for customer in forgotten:
            self.ledger.keys.drop(customer)
        _x(self.con, sql("identifiers", "candidates"))

    def _take_picked(self) -> pa.Table:
        """One round's picked events, to decrypt in this process (recorded in id_meta)."""
        con = self.con
        picked = con.sql(sql("identifiers", "picked")).to_arrow_table()
        con.register("id_picked_in", picked)
        _x(con, "INSERT INTO id_meta SELECT position, customer_id, occurred_at FROM id_picked_in")
        con.unregister("id_picked_in")
        _x(con, sql("identifiers", "picked_done"))
        return picked.drop_columns(["occurred_at"])

    def _decrypt_inline(self, picked: pa.Table) -> workers.Decrypted:
        cache = picked.num_rows <= _SMALL_BATCH
        return workers.decrypt(
            picked, self.ledger.keys, self.ledger.store.read_wrapped_keys, cache=cache
        )

    def _identifiers_finish(self, decrypted: list[workers.Decrypted]) -> None:
        """Retry what could not be decrypted, then merge into ``customer_identifiers``."""
        con = self.con
        failed = [f for d in decrypted for f in d.failed]
        # A view (read once, by `merge`) unless retries add to it.
        kind = "TABLE" if failed else "VIEW"
        _x(
            con,
            _union_into(
                "batch_identifiers", con, [d.found for d in decrypted], self._registered, kind
            ),
        )
        _x(
            con,
            "CREATE OR REPLACE TEMP TABLE id_failed "
            "(customer_id VARCHAR, field VARCHAR, position BIGINT)",
        )
        while failed:
            con.register(
                "id_failed_in",
                pa.table(
                    {
                        "customer_id": pa.array([f[0] for f in failed], pa.string()),
                        "field": pa.array([f[1] for f in failed], pa.string()),
                        "position": pa.array([f[2] for f in failed], pa.int64()),
                    }
                ),
            )
            _x(con, "DELETE FROM id_failed; INSERT INTO id_failed SELECT * FROM id_failed_in")
            con.unregister("id_failed_in")
            _x(con, sql("identifiers", "retry"))
            _x(con, pick_sql())
            again = self._decrypt_inline(self._take_picked())
            con.register("found_in", again.found)
            _x(con, "INSERT INTO batch_identifiers SELECT * FROM found_in")
            con.unregister("found_in")
            failed = again.failed
        _x(con, sql("identifiers", "merge"))
        _x(con, sql("identifiers", "keep_newest"))
        _x(con, f"DROP TABLE id_meta; DROP {kind} batch_identifiers; DROP TABLE id_failed")

    def _lifecycle_finish(self, folded: list[workers.Folded], seq: int) -> int:
        """Write the refolded histories and the new changes, numbered after ``seq`` in
        ledger-position order; return the last change seq."""
        con = self.con
        _x(con, _union_into("history_batch", con, [f.history for f in folded], self._registered))
        changes = [f.changes for f in folded]
        _x(con, _union_into("changes_found", con, changes, self._registered, "VIEW"))
        _x(con, sql("lifecycle", "number"), {"seq": seq})
        if _x(con, "SELECT count(*) FROM history_batch")[0][0]:
            _x(con, sql("lifecycle", "clear"))
            _x(con, sql("lifecycle", "write"))
            seq += int(_x(con, "SELECT count(*) FROM changes_batch")[0][0])
        _x(con, "DROP VIEW changes_found")
        for table in ("history_batch", "changes_batch", "lifecycle_resume"):
            _x(con, f"DROP TABLE {table}")
        return seq

    # ------------------------------------------------------------------ derived

    def refresh_derived(
        self, *, force: bool = False, con: duckdb.DuckDBPyConnection | None = None
    ) -> bool:
        """Recompute rfm, churn_risk and churn_model if the applied position moved.

        ``con`` may be another connection (cursor) to this database: ``follow`` runs this
        in a background thread while batches go on. It writes only rfm, churn_* and
        derived_state, which batches never touch, so the two never conflict, and it reads
        one consistent state (its own transaction).
        """
        con = con or self.con
        if con is self.con:
            self._use_threads(self._threads)
        began = time.monotonic()
        _x(con, "BEGIN")
        try:
            position, derived, _ = self._state(con)
            if derived == position and not force:
                _x(con, "ROLLBACK")
                return False
            self._derive(con, position)
            _x(con, "COMMIT")
        except BaseException:
            _x(con, "ROLLBACK")
            raise
        finally:
            for name in ("churn_in", "model_in"):
                con.unregister(name)
        self._derived_at = time.monotonic()
        self._derive_took = self._derived_at - began
        self._dirty = True
        return True

    def _derive(self, con: duckdb.DuckDBPyConnection, position: int) -> None:
        """Recompute rfm, churn_risk and churn_model as of ``position`` (in the caller's
        transaction)."""
        # The latest event time from the per-customer facts: `events` may be Parquet segments.
        setting, latest = _x(
            con,
            "SELECT (SELECT as_of_setting FROM projection_state), "
            "(SELECT max(last_seen) FROM customer_facts)",
        )[0]
        as_of = setting if setting is not None else latest
        _x(con, "DELETE FROM rfm; DELETE FROM churn_risk; DELETE FROM churn_model")
        if as_of is not None:
            _x(con, sql("rfm", "compute"), {"as_of": as_of})
            self._churn(con, as_of, position, every_event=latest is None or as_of >= latest)
        _x(con, "UPDATE derived_state SET derived_position = ?, as_of = ?", [position, as_of])

    def _churn(
        self,
        con: duckdb.DuckDBPyConnection,
        as_of: dt.datetime,
        position: int,
        *,
        every_event: bool,
    ) -> None:
        """churn_risk and churn_model as of ``as_of``; ``every_event``: no event is later."""
        summary = con.sql(sql("churn", "summary"), params={"as_of": as_of}).to_arrow_table()
        x = summary.column("frequency").to_numpy().astype(np.float64)
        t_x = summary.column("recency_weeks").to_numpy().astype(np.float64)
        big_t = summary.column("age_weeks").to_numpy().astype(np.float64)
        fitted: churn.BgNbdFit | None = None
        message = f"fewer than {churn.MIN_CUSTOMERS} purchasing customers; not fitted"
        if summary.num_rows >= churn.MIN_CUSTOMERS:
            fitted = self._fit(x, t_x, big_t)
            message = fitted.message
        # Only a converged fit scores customers; otherwise everyone gets the fallback.
        model = fitted if fitted is not None and fitted.converged else None
        if model is not None:
            p = churn.p_alive(model, x, t_x, big_t)
            e = churn.expected_purchases(
                model, churn.HORIZON_DAYS / churn.DAYS_PER_UNIT, x, t_x, big_t
            )
            band = np.where(
                p >= churn.LOW_RISK_P_ALIVE,
                "low",
                np.where(p >= churn.MEDIUM_RISK_P_ALIVE, "medium", "high"),
            )
            scored = summary.append_column("p_alive", _floats(p)).append_column(
                "expected_purchases_90d", _floats(e)
            )
            scored = scored.append_column("risk_band", pa.array(band, pa.string()))
        else:
            scored = summary.slice(0, 0)
            for name, kind in (
                ("p_alive", pa.float64()),
                ("expected_purchases_90d", pa.float64()),
                ("risk_band", pa.string()),
            ):
                scored = scored.append_column(name, pa.array([], kind))
        con.register("churn_in", scored)
        engaged = sql("churn", "engaged_all" if every_event else "engaged_as_of")
        _x(
            con,
            sql("churn", "write").replace("$engaged", engaged.rstrip(";")),
            {
                "as_of": as_of,
                "low_days": churn.ENGAGEMENT_LOW_DAYS,
                "medium_days": churn.ENGAGEMENT_MEDIUM_DAYS,
            },
        )
        con.register(
            "model_in",
            pa.table(
                {
                    "as_of": pa.array([as_of], _TS),
                    "position": pa.array([position], pa.int64()),
                    "time_unit": [churn.TIME_UNIT],
                    "customers": pa.array([summary.num_rows], pa.int64()),
                    "r": pa.array([fitted.r if fitted else None], pa.float64()),
                    "alpha": pa.array([fitted.alpha if fitted else None], pa.float64()),
                    "a": pa.array([fitted.a if fitted else None], pa.float64()),
                    "b": pa.array([fitted.b if fitted else None], pa.float64()),
                    "log_likelihood": pa.array(
                        [fitted.log_likelihood if fitted else None], pa.float64()
                    ),
                    "converged": pa.array([model is not None], pa.bool_()),
                    "message": [message],
                }
            ),
        )
        _x(con, "INSERT INTO churn_model SELECT * FROM model_in")

    def _fit(self, x: np.ndarray, t_x: np.ndarray, big_t: np.ndarray) -> churn.BgNbdFit:
        if self._background and len(x) >= self.fit_offload_min:
            # Following, the fit runs in a (niced) worker process: it is about a second of
            # Python at 100k customers (9,450 purchasers), and in this process it held the
            # GIL that every batch's Python steps and statement calls wait for.
            return self._offload.fit(x, t_x, big_t).result()
        return churn.fit(x, t_x, big_t)

    # ------------------------------------------------------------------ publishing

    def publish(self, con: duckdb.DuckDBPyConnection | None = None) -> None:
        """Publish a snapshot for readers (no-op without a snapshot path)."""
        if self.snapshot_to is None:
            return
        self._dirty = False
        began = time.monotonic()
        snapshot.publish(con or self.con, self.snapshot_to)
        self._published_at = time.monotonic()
        self._publish_took = self._published_at - began

    def run(
        self,
        *,
        on_progress: ProgressFn | None = None,
        stop: threading.Event | None = None,
    ) -> int:
        """Catch up, refresh the derived tables and publish: what ``ledger project`` does."""
        applied = self.catch_up(on_progress=on_progress, stop=stop)
        if stop is not None and stop.is_set():
            if self._dirty:
                self.publish()
            return applied
        self._phase("computing RFM and churn risk")
        self.refresh_derived()
        if self.snapshot_to is not None and (
            self._dirty or not snapshot.readable(self.snapshot_to)
        ):
            self._phase("publishing the snapshot")
            self.publish()
        return applied

    def follow(
        self,
        stop: threading.Event,
        *,
        poll_interval: float = 0.05,
        on_progress: ProgressFn | None = None,
    ) -> None:
        """Keep applying new events until ``stop`` is set (always between transactions).

        Batches are applied here as soon as they appear; a background thread recomputes
        rfm / churn (every ``derive_interval`` s) and publishes snapshots (every
        ``snapshot_interval`` s, or ``spaced`` further apart when they take long) on its own
        connection, so neither delays a batch. Other processes query through the socket
        (``serve_at``), which sees each batch as soon as it commits.
        """
        if self.snapshot_to is not None and not self.snapshot_to.exists():
            self.publish()
        # Each small batch adds to the WAL; DuckDB's automatic checkpoint (every 16 MB)
        # would then rewrite the wide per-customer tables inside some batch's COMMIT,
        # stalling that batch for hundreds of ms. Following, checkpoint on our schedule
        # instead: in the maintenance thread, between batches (see _maintain).
        _x(self.con, f"SET checkpoint_threshold = '{FOLLOW_CHECKPOINT_MB}MB'")
        self._warm_up()
        position, derived, _ = self._state()
        if position == derived:
            self._derived_at = time.monotonic()  # fresh already: wait a full interval
        server = serve.QueryServer(self.con, self.serve_at) if self.serve_at else None
        done = threading.Event()
        failure: list[BaseException] = []
        worker = threading.Thread(
            target=self._maintain, args=(done, failure), name="projection-maintenance"
        )
        self._background = True
        worker.start()
        try:
            while not stop.is_set() and not failure:
                applied = self.catch_up(on_progress=on_progress, stop=stop)
                if not applied:
                    stop.wait(poll_interval)
        finally:
            done.set()
            worker.join()
            self._background = False
            if server is not None:
                server.close()
        if failure:
            raise failure[0]
        if self._dirty:
            self.publish()

    def _warm_up(self) -> None:
        """Read the tables every batch touches into DuckDB's buffers before following, load
        the modules a batch's Arrow hand-offs import on first use, and make the churn fit
        ready (scipy, its worker process).

        Otherwise the first batches after start read them from disk (a 250-event batch took
        ~0.8 s instead of ~0.2 s at 1M events), before anyone can query the runner; and
        the first batch imports pandas (DuckDB does, on its first Arrow registration),
        pyarrow.compute (the first cast) and theirs: 0.5-1.2 s of one core while
        appends queue up behind it.
        """
        for table in _WARM_TABLES:
            _x(self.con, f"SELECT max(hash(t)) FROM {table} t")
        # The first derive (after derive_interval s of following) imported scipy here
        # (~0.3 s holding the GIL that batches wait for) and spawned the fit's worker
        # process (~1 s of a core): both now, before anyone reads or appends.
        churn.preload()
        purchasers = _x(self.con, "SELECT count(DISTINCT customer_id) FROM purchases")[0][0]
        if purchasers >= self.fit_offload_min:
            self._offload.start_fitter()
        sample = pa.table({"body": pa.array([b"{}"], pa.binary()).cast(pa.string())})
        self.con.register("warm_up_in", sample)
        try:
            self.con.sql("SELECT * FROM warm_up_in").to_arrow_table()
        finally:
            self.con.unregister("warm_up_in")

    def _wal_mb(self) -> float:
        wal = Path(f"{self.path}.wal")
        try:
            return wal.stat().st_size / 2**20
        except OSError:
            return 0.0

    def _maintain(self, done: threading.Event, failure: list[BaseException]) -> None:
        con = self.con.cursor()
        try:
            _x(con, "SET TimeZone = 'UTC'")
            while not done.is_set():
                now = time.monotonic()
                if now - self._derived_at >= spaced(self.derive_interval, self._derive_took):
                    self.refresh_derived(con=con)
                publish_every = spaced(self.snapshot_interval, self._publish_took)
                if self._dirty and now - self._published_at >= publish_every:
                    self.publish(con)
                if now - self._applied_at >= IDLE_CHECKPOINT_SECONDS and self._wal_mb() >= 64:
                    _x(con, "CHECKPOINT")  # quiet for a while: fold the WAL in now
                done.wait(0.05)
        except BaseException as exc:
            failure.append(exc)
        finally:
            con.close()


class _Pending:
    """The Python steps of one batch under way: ``result()`` waits and returns their
    results (one per partition), or re-raises the first failure."""

    def __init__(self, wait: Callable[[], list[Any]]):
        self.result = wait

    @classmethod
    def inline(cls, fn: Callable[[], list[Any]]) -> _Pending:
        return cls(_Worker(fn).result)

    @classmethod
    def offloaded(cls, futures: list[Future[Any]]) -> _Pending:
        def wait() -> list[Any]:
            try:
                return [f.result() for f in futures]
            finally:
                for f in futures:
                    f.cancel()

        return cls(wait)


class _Worker:
    """Run ``fn`` in a thread; ``result()`` joins it and returns or re-raises."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="projection-python")
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def spaced(interval: float, took: float) -> float:
    """Seconds the maintenance thread waits after a publish or derive that took ``took``:
    ``interval``, or longer so that the work is at most a tenth of the time."""
    return max(interval, MAINTENANCE_SPACING * took)


def columnar_path(settings: Settings) -> Path:
    """Where the columnar copy of the log lives: beside the ledger, outside the DuckDB file."""
    return settings.home / "columnar"


def _floats(values: Any) -> pa.Array:
    """Floats with NaN (a model that cannot say) stored as NULL."""
    return pa.array(values, pa.float64(), from_pandas=True)


def _check_follows(rows: list[StoredRow], after: int) -> None:
    """Log rows read after ``after`` must start at ``after`` + 1: positions are gap-free."""
    if not rows or rows[0].position != after + 1:
        found = f"position {rows[0].position}" if rows else "no events"
        raise LedgerError(
            f"the ledger returned {found} after position {after}: positions must be gap-free"
        )


def _x(con: duckdb.DuckDBPyConnection, query: str, params: Any = None) -> list[Any]:
    """Execute and drain: DuckDB 2 blocks a connection while a result is unfetched."""
    return con.execute(query, params).fetchall()


def pick_sql() -> str:
    """identifiers.sql `pick` (a view: it takes no parameters) with the identifier names."""
    names = ", ".join(f"'{name}'" for name in workers.IDENTIFIER_FIELDS)
    return sql("identifiers", "pick").replace("$identifier_fields", f"[{names}]")


def _copy_parts(query: str, key: str, parts: int, directory: Path) -> str:
    """COPY ``query`` to one Parquet directory per partition (``part=K``), rows cut by the
    hash of ``key``; DuckDB writes the files with all its threads."""
    target = str(directory).replace("'", "''")
    query = query.strip().rstrip(";")
    return (
        f"COPY (SELECT *, hash({key}) % {parts} AS part FROM ({query})) "
        f"TO '{target}' (FORMAT parquet, PARTITION_BY (part), OVERWRITE_OR_IGNORE, "
        # Read once, soon, from the page cache; ciphertext does not compress anyway.
        "COMPRESSION uncompressed)"
    )


def _by_part(query: str, customer: str, parts: int) -> str:
    """``query``'s rows with the partition of their canonical customer as a last column
    (the partition the same group's touches, lifecycle.sql `input`, are in)."""
    query = query.strip().rstrip(";")
    return (
        f"SELECT q.*, hash(coalesce(a.canonical_id, q.{customer})) % {parts} "
        f"FROM ({query}) q LEFT JOIN customer_aliases a ON a.customer_id = q.{customer}"
    )


def _union_into(
    name: str,
    con: duckdb.DuckDBPyConnection,
    sources: list[Any],
    registered: list[str],
    kind: str = "TABLE",
) -> str:
    """The statement that makes ``name`` (a temp TABLE or VIEW) the union of ``sources``:
    Arrow tables (registered here and listed in ``registered``) or Parquet files. A view
    suits what is read once: a temp table holds its memory until the batch commits."""
    selects = []
    for i, source in enumerate(sources):
        if isinstance(source, Path):
            path = str(source).replace("'", "''")
            selects.append(f"SELECT * FROM read_parquet('{path}')")
        else:
            view = f"{name}_in_{i}"
            con.register(view, source)
            registered.append(view)
            selects.append(f"SELECT * FROM {view}")
    return f"CREATE OR REPLACE TEMP {kind} {name} AS " + " UNION ALL BY NAME ".join(selects)
