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

import bisect
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import duckdb
import numpy as np
import orjson
import pyarrow as pa
from cryptography.exceptions import InvalidTag

from ledger import keyring as kr
from ledger.chain import unseal
from ledger.ledger import Ledger, LedgerError
from ledger.projection import churn, lifecycle, serve, snapshot
from ledger.projection.definitions import sql
from ledger.projection.rfm import segment_table
from ledger.projection.segments import ColumnarCopy
from ledger.settings import Settings
from ledger.store import StoredRow

_TS = pa.timestamp("us", tz="UTC")
_SMALL_BATCH = 2_000
#: The table layout of projections/schema.sql; a file of another layout needs --rebuild.
LAYOUT_VERSION = 5
ProgressFn = Callable[[int, int], None]
#: WAL size at which DuckDB checkpoints by itself while following (see ``follow``).
FOLLOW_CHECKPOINT_MB = 1024
#: The tables a follow-mode batch reads or rewrites (warmed up before following).
_WARM_TABLES = (
    "customer_facts",
    "customer_360_base",
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
#: Events per transaction when loading from the columnar copy (whole segments).
COPY_BATCH = 1_000_000
_HAS_MERGES = "SELECT count(*) FROM batch_events WHERE type = 'customers_merged'"
#: Wrapped keys read from the store per query while decrypting.
_KEY_CHUNK = 20_000
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
        memory_limit: str = "1GB",
        columnar: Path | None = None,
        segment_min_events: int | None = None,
    ):
        self.ledger = ledger
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
        try:
            self.con = duckdb.connect(str(self.path))
        except duckdb.IOException as exc:
            raise LedgerError(
                f"cannot open the projections at {self.path}: {exc} "
                "(is another `ledger project` running?)"
            ) from None
        _x(self.con, "SET TimeZone = 'UTC'")
        _x(self.con, f"SET memory_limit = '{memory_limit}'")
        self._check_layout()
        _x(self.con, sql("schema", "schema"))
        if self.con.execute("SELECT count(*) FROM rfm_segments").fetchall()[0] == (0,):
            self.con.register("segments_in", segment_table())
            _x(self.con, "INSERT INTO rfm_segments SELECT * FROM segments_in")
            self.con.unregister("segments_in")
        _x(self.con, sql("customer_360", "base"))
        _x(self.con, sql("customer_360", "view"))
        self._threads = int(_x(self.con, "SELECT current_setting('threads')")[0][0])
        self._threads_now = self._threads
        self._published_at = 0.0
        self._derived_at = 0.0
        self._dirty = False
        self._applied_at = 0.0
        self._background = False
        if snapshot_to is not None:
            snapshot.remove_stale(snapshot_to)

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

    @classmethod
    def for_settings(cls, ledger: Ledger, settings: Settings, **options: Any) -> ProjectionRunner:
        """The runner of ``ledger project``: snapshot, socket and columnar copy beside the
        ledger (pass ``columnar=None`` to bypass the copy)."""
        options.setdefault("columnar", columnar_path(settings))
        return cls(
            ledger,
            settings.projections_path,
            snapshot_to=snapshot.snapshot_path(settings),
            serve_at=serve.socket_path(settings),
            **options,
        )

    def close(self) -> None:
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

    def apply(self, rows: list[StoredRow], *, after: int) -> None:
        """Apply one batch of log rows (positions after ``after``) in one transaction."""
        if rows[0].position != after + 1:
            raise LedgerError(
                f"the ledger returned position {rows[0].position} after {after}: "
                "positions must be gap-free"
            )
        sealed = [unseal(r.state) for r in rows]
        batch = pa.table(
            {
                "position": pa.array([r.position for r in rows], pa.int64()),
                "customer_id": pa.array([r.customer_id for r in rows], pa.string()),
                "sequence": pa.array([r.sequence for r in rows], pa.int64()),
                "body": pa.array([b for b, _ in sealed], pa.binary()).cast(pa.string()),
            }
        )
        last = rows[-1].position
        copy = self.copy
        extend = copy is not None and len(rows) >= copy.min_events and copy.frontier == after
        self._use_threads(1 if len(rows) < _SMALL_BATCH else self._threads)
        con = self.con
        with self._transaction():
            con.register("batch_raw", batch)
            _x(con, sql("events", "parse"))
            con.unregister("batch_raw")
            if extend and copy is not None:
                # A cache of the log, valid whether or not this transaction commits.
                copy.write(con, "batch_events", after + 1, last, sealed[-1][1])
            self._apply_batch(after, last)
            _x(con, "DROP TABLE batch_events")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One batch's DuckDB transaction: committed whole or rolled back, and the Arrow
        tables registered for it unregistered either way."""
        _x(self.con, "BEGIN")
        try:
            yield
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
            self._apply_batch(after, last)
            _x(con, "DROP VIEW batch_events")
        return last

    def _unregister(self) -> None:
        for name in ("batch_raw", "batch_identifiers", "history_batch", "changes_batch"):
            self.con.unregister(name)

    def _apply_batch(self, after: int, last: int) -> None:
        """Fold ``batch_events`` (positions ``after``+1..``last``) into every table.

        The Python steps (folding lifecycle stages, decrypting identifiers) run in
        worker threads while this thread has DuckDB pick the identifiers, load
        ``events`` and merge the customer facts (DuckDB releases the GIL while it
        works): they read only inputs fetched before they start, and their results are
        written after they end.
        """
        con = self.con
        _x(con, "CREATE OR REPLACE TEMP TABLE recompute (customer_id VARCHAR)")
        merged = bool(_x(con, _HAS_MERGES)[0][0])
        if merged:  # identity stitching: re-key set-at-a-time (projections/merges.sql)
            _x(con, sql("merges", "record"), {"after": after})
            _x(con, sql("merges", "resolve"))
            _x(con, sql("events", "load"))
        _x(con, sql("events", "affected"))
        if merged:
            _x(con, sql("merges", "rekey"))
            _x(con, sql("merges", "affected"))
        _x(con, sql("events", "slices"))
        _x(con, sql("events", "touches"), {"types": list(lifecycle.RELEVANT_TYPES)})
        forgotten = [c for (c,) in _x(con, _FORGOTTEN)]
        if forgotten:
            _x(con, sql("identifiers", "erase"), {"after": after})
        inputs = self._lifecycle_inputs(after)
        folding = _Worker(lambda: self._fold(after, inputs))
        decrypting: _Worker | None = None
        try:
            candidates = self._identifier_candidates(forgotten)
            decrypting = _Worker(lambda: self._decrypt(candidates))
            if not merged:
                _x(con, sql("events", "load"))
            _x(con, sql("customer_360", "batch"))
            _x(con, sql("customer_360", "merge"))
            if merged:
                _x(con, sql("customer_360", "refresh"))
                _x(con, sql("customer_360", "insert"))
        finally:
            try:
                folded = folding.result()
            finally:
                if decrypting is not None:
                    decrypted = decrypting.result()
        self._identifiers_finish(decrypted)
        changes = self._lifecycle_finish(folded, inputs.seq)
        _x(con, sql("customer_360", "refresh_affected"))
        _x(con, "UPDATE projection_state SET position = ?, changes = ?", [last, changes])

    def _use_threads(self, threads: int) -> None:
        if threads != self._threads_now:
            _x(self.con, f"SET threads = {threads}")
            self._threads_now = threads

    def _identifier_candidates(self, forgotten: list[str]) -> pa.Table:
        """The events whose identifiers the batch needs (``projections/identifiers.sql``).

        Per (customer, field) the newest event naming the field, and whole every body
        that does not name its identifiers; ``_identifiers_finish`` asks for the next
        newest only when one cannot be decrypted.
        """
        con = self.con
        keys = self.ledger.keys
        # A forget destroys the key; a later event for the customer gets a new one, so a
        # cached old key must not be used for the rows after it.
        for customer in forgotten:
            keys.drop(customer)
        _x(con, sql("identifiers", "candidates"))
        return con.sql(sql("identifiers", "pick")).to_arrow_table()

    def _decrypt(self, found: pa.Table) -> _Decrypted:
        """Decrypt the picked events (pure Python and the key store: runs in a worker).

        The rows come grouped by stream: each stream's key is unwrapped when its rows
        start and not kept after them (an AESGCM object holds ~2.4 KB of native memory;
        a rebuild batch may touch a million customers). Wrapped keys are read in chunks.
        """
        keys = self.ledger.keys
        out = _Decrypted([], [], [], [])
        if not found.num_rows:
            return out
        cols = [found.column(i).to_pylist() for i in range(found.num_columns)]
        order = list(dict.fromkeys(cols[1]))
        chunk: dict[str, bytes] = {}
        requested: set[str] = set()
        next_chunk = 0
        current: str | None = None
        cipher: Any = None
        out_pos, out_field, out_value, failed = out.positions, out.fields, out.values, out.failed
        loads, nonce = orjson.loads, kr.NONCE
        # A rebuild uses each key once: skip the LRU's bookkeeping (8.9 -> 1.6 us a key);
        # follow mode's small batches keep the cache, their customers come back.
        unwrap = keys.unwrap if len(order) > _SMALL_BATCH else keys.load
        for position, stream, sealed, aad, fields, customer in zip(*cols, strict=True):
            if stream != current:
                current = stream
                cipher = keys.cached(stream)
                if cipher is None:
                    if stream not in requested:  # streams come in `order`: the next chunk
                        wanted = order[next_chunk : next_chunk + _KEY_CHUNK]
                        next_chunk += _KEY_CHUNK
                        requested = set(wanted)
                        chunk = self.ledger.store.read_wrapped_keys(wanted)
                    blob = chunk.get(stream)
                    cipher = None if blob is None else unwrap(stream, blob)
            ids: Any = None
            if cipher is not None:
                try:
                    ids = loads(cipher.decrypt(sealed[:nonce], sealed[nonce:], aad))
                except InvalidTag:
                    pass  # written under a key that was destroyed: erased
                else:
                    ids = ids.get("identifiers")
            if not isinstance(ids, dict):
                ids = None
            if fields is None:  # a body that does not name its identifiers: all of them
                for name, value in (ids or {}).items():
                    if value is not None:
                        out_pos.append(position)
                        out_field.append(name)
                        out_value.append(str(value))
                continue
            for field in fields:
                value = None if ids is None else ids.get(field)
                if value is None:
                    failed.append((customer, field, position))
                else:
                    out_pos.append(position)
                    out_field.append(field)
                    out_value.append(str(value))
        return out

    def _identifiers_finish(self, decrypted: _Decrypted) -> None:
        """Retry what could not be decrypted, then merge into ``customer_identifiers``."""
        con = self.con
        _x(
            con,
            "CREATE OR REPLACE TEMP TABLE id_failed "
            "(customer_id VARCHAR, field VARCHAR, position BIGINT)",
        )
        while decrypted.failed:
            failed = decrypted.failed
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
            again = self._decrypt(con.sql(sql("identifiers", "pick")).to_arrow_table())
            decrypted.positions.extend(again.positions)
            decrypted.fields.extend(again.fields)
            decrypted.values.extend(again.values)
            decrypted.failed[:] = again.failed
        con.register(
            "batch_identifiers",
            pa.table(
                {
                    "position": pa.array(decrypted.positions, pa.int64()),
                    "field": pa.array(decrypted.fields, pa.string()),
                    "value": pa.array(decrypted.values, pa.string()),
                }
            ),
        )
        _x(con, sql("identifiers", "merge"))

    def _lifecycle_inputs(self, after: int) -> _LifecycleInputs:
        """The touches and merges of every stream whose stage history the batch changes."""
        con = self.con
        _, _, seq = self._state()
        _x(con, sql("lifecycle", "streams"), {"after": after})
        _x(con, sql("lifecycle", "resume"), {"after": after})
        resumed = _x(con, sql("lifecycle", "resumed"))
        table = con.sql(sql("lifecycle", "touches"), params={"after": after}).to_arrow_table()
        merges = _x(con, sql("lifecycle", "merges"))
        return _LifecycleInputs(table, merges, seq, resumed)

    def _fold(self, after: int, inputs: _LifecycleInputs) -> _Folded:
        """Refold the stage history of customers with relevant events in the batch.

        The change stream is defined per ledger position: the changes in the history
        after position p that were not in the history after p-1, so the stream is the
        same however the log is cut into batches. Pure Python: runs in the worker.
        """
        table, merges = inputs.touches, inputs.merges
        cols = {name: table.column(name).to_pylist() for name in table.column_names}
        edges: dict[str, list[tuple[int, str]]] = {}
        for gone, survivor, at in merges:
            edges.setdefault(gone, []).append((at, survivor))

        def root_at(customer: str, position: int) -> str:
            """The customer a stream belonged to just after ``position`` (merges so far)."""
            if customer not in edges:
                return customer
            for _ in range(64):
                moves = [s for at, s in edges.get(customer, ()) if at <= position]
                if not moves:
                    break
                customer = moves[-1]
            return customer

        timelines: dict[str, list[lifecycle.Touch]] = {}
        fresh: list[tuple[int, str, lifecycle.Touch | None]] = []
        touches = map(
            lifecycle.Touch._make,
            zip(
                *(
                    cols[name]
                    for name in (
                        "position",
                        "event_id",
                        "type",
                        "occurred_us",
                        "form_id",
                        "direction",
                        "outcome",
                        "sentiment",
                        "satisfaction",
                    )
                ),
                strict=True,
            ),
        )
        for customer, touch in zip(cols["customer_id"], touches, strict=True):
            if touch.position <= after:
                timelines.setdefault(root_at(customer, after), []).append(touch)
            else:
                fresh.append((touch.position, customer, touch))
        # Touches come in position order (projections/lifecycle.sql); merges interleave.
        late_merges = [(at, gone, None) for gone, _, at in merges if at > after]
        if late_merges:
            fresh.extend(late_merges)
            fresh.sort(key=lambda f: f[0])
        states: dict[str, lifecycle.Fold] = {}
        offsets: dict[str, int] = {}  # resumed customers: history steps already stored
        for customer, stage, transitions, last_order_us, last_us, last_position in inputs.resumed:
            state = states[customer] = lifecycle.Fold(customer)
            state.stage = stage
            state.last_order_us = last_order_us
            state.last_key = None if last_us is None else (last_us, last_position)
            offsets[customer] = transitions
        for customer, timeline in timelines.items():
            timeline.sort(key=lambda t: t.order_key)
            states[customer] = lifecycle.fold(customer, timeline)
        groups = set(timelines)
        history: list[tuple[str, int, lifecycle.Change | None]] = []
        emitted: list[tuple[int, int, lifecycle.Change]] = []
        merged_away: set[str] = set()
        for position, customer, maybe in fresh:
            if maybe is None:  # `customer` merges into another group at `position`
                gone, into = root_at(customer, position - 1), root_at(customer, position)
                if gone == into or gone not in timelines:
                    continue
                merged_away.add(gone)
                groups.discard(gone)
                timeline = timelines.get(into, []) + timelines.pop(gone)
                timeline.sort(key=lambda t: t.order_key)
                known = {c.change_id for c in states[into].changes} if into in states else set()
                states.pop(gone)
                state = states[into] = lifecycle.fold(into, timeline)
                timelines[into] = timeline
                groups.add(into)
                new = [c for c in state.changes if c.change_id not in known]
            else:
                touch = maybe
                group = root_at(customer, position) if edges else customer
                groups.add(group)
                if merged_away:
                    merged_away.discard(group)
                listed = timelines.get(group)
                if listed is None:
                    listed = timelines[group] = []
                timeline = listed
                found = states.get(group)
                if found is None:
                    found = states[group] = lifecycle.Fold(group)
                state = found
                if state.last_key is None or (touch.occurred_us, position) > state.last_key:
                    before = len(state.changes)
                    state.step(touch)
                    timeline.append(touch)
                    new = state.changes[before:] if len(state.changes) > before else []
                else:
                    known = {c.change_id for c in state.changes}
                    bisect.insort(timeline, touch, key=lambda t: t.order_key)
                    state = states[group] = lifecycle.fold(group, timeline)
                    new = [c for c in state.changes if c.change_id not in known]
            if not new:
                continue
            for k, change in enumerate(new):
                emitted.append((position, k, change))
        by_customer = {g: states[g] for g in sorted(groups)}
        appended: set[str] = set()
        for customer, state in by_customer.items():
            offset = offsets.get(customer)
            if offset is not None:  # resumed: only the new steps, after the stored ones
                if state.changes:
                    appended.add(customer)
                    history.extend(
                        (customer, step, c) for step, c in enumerate(state.changes, offset + 1)
                    )
            elif state.changes:
                history.extend((customer, step, c) for step, c in enumerate(state.changes, 1))
            else:
                history.append((customer, 0, None))
        for customer in sorted(merged_away | (set(edges) - groups)):
            history.append((customer, 0, None))  # merged away: no rows of its own
        emitted.sort(key=lambda e: (e[0], e[1]))
        return _Folded(history, emitted, appended)

    def _lifecycle_finish(self, folded: _Folded, seq: int) -> int:
        """Write the refolded histories and the new changes; return the last change seq."""
        con = self.con
        if not folded.history:
            con.register("history_batch", _history_table([], set()))
            con.register("changes_batch", _changes_table([], seq))
            return seq
        con.register("history_batch", _history_table(folded.history, folded.appended))
        con.register("changes_batch", _changes_table(folded.emitted, seq))
        _x(con, sql("lifecycle", "clear"))
        _x(con, sql("lifecycle", "write"))
        return seq + len(folded.emitted)

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
        _x(con, "BEGIN")
        try:
            position, derived, _ = self._state(con)
            if derived == position and not force:
                _x(con, "ROLLBACK")
                return False
            row = _x(
                con,
                "SELECT coalesce((SELECT as_of_setting FROM projection_state), "
                "(SELECT max(occurred_at) FROM events))",
            )[0]
            as_of = row[0] if row else None
            _x(con, "DELETE FROM rfm; DELETE FROM churn_risk; DELETE FROM churn_model")
            if as_of is not None:
                _x(con, sql("rfm", "compute"), {"as_of": as_of})
                self._churn(con, as_of, position)
            _x(con, "UPDATE derived_state SET derived_position = ?, as_of = ?", [position, as_of])
            _x(con, "COMMIT")
        except BaseException:
            _x(con, "ROLLBACK")
            raise
        finally:
            for name in ("churn_in", "model_in"):
                con.unregister(name)
        self._derived_at = time.monotonic()
        self._dirty = True
        return True

    def _churn(self, con: duckdb.DuckDBPyConnection, as_of: dt.datetime, position: int) -> None:
        summary = con.sql(sql("churn", "summary"), params={"as_of": as_of}).to_arrow_table()
        x = summary.column("frequency").to_numpy().astype(np.float64)
        t_x = summary.column("recency_weeks").to_numpy().astype(np.float64)
        big_t = summary.column("age_weeks").to_numpy().astype(np.float64)
        fitted: churn.BgNbdFit | None = None
        message = f"fewer than {churn.MIN_CUSTOMERS} purchasing customers; not fitted"
        if summary.num_rows >= churn.MIN_CUSTOMERS:
            fitted = churn.fit(x, t_x, big_t)
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
        _x(
            con,
            sql("churn", "write"),
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

    # ------------------------------------------------------------------ publishing

    def publish(self, con: duckdb.DuckDBPyConnection | None = None) -> None:
        """Publish a snapshot for readers (no-op without a snapshot path)."""
        if self.snapshot_to is None:
            return
        self._dirty = False
        snapshot.publish(con or self.con, self.snapshot_to)
        self._published_at = time.monotonic()

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
        self.refresh_derived()
        if self._dirty or (self.snapshot_to is not None and not self.snapshot_to.exists()):
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
        ``snapshot_interval`` s) on its own connection, so neither delays a batch. Other
        processes query through the socket (``serve_at``), which sees each batch as soon
        as it commits.
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
        """Read the tables every batch touches into DuckDB's buffers before following.

        Otherwise the first batches after start read them from disk (a 250-event batch took
        ~0.8 s instead of ~0.2 s at 1M events), before anyone can query the runner.
        """
        for table in _WARM_TABLES:
            _x(self.con, f"SELECT max(hash(t)) FROM {table} t")

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
                if now - self._derived_at >= self.derive_interval:
                    self.refresh_derived(con=con)
                if self._dirty and now - self._published_at >= self.snapshot_interval:
                    self.publish(con)
                if now - self._applied_at >= IDLE_CHECKPOINT_SECONDS and self._wal_mb() >= 64:
                    _x(con, "CHECKPOINT")  # quiet for a while: fold the WAL in now
                done.wait(0.05)
        except BaseException as exc:
            failure.append(exc)
        finally:
            con.close()


class _Decrypted(NamedTuple):
    positions: list[int]
    fields: list[str]
    values: list[str]
    failed: list[tuple[str, str, int]]


class _LifecycleInputs(NamedTuple):
    touches: pa.Table
    merges: list[Any]
    seq: int
    #: (customer, stage, transitions, last_order_us, last_occurred_us, last_position) of
    #: the customers whose fold resumes from the stored state (lifecycle.sql `resume`).
    resumed: list[Any]


class _Folded(NamedTuple):
    history: list[tuple[str, int, lifecycle.Change | None]]
    emitted: list[tuple[int, int, lifecycle.Change]]
    appended: set[str]  # customers whose history rows are new steps only


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


def columnar_path(settings: Settings) -> Path:
    """Where the columnar copy of the log lives: beside the ledger, outside the DuckDB file."""
    return settings.home / "columnar"


def _floats(values: Any) -> pa.Array:
    """Floats with NaN (a model that cannot say) stored as NULL."""
    return pa.array(values, pa.float64(), from_pandas=True)


def _x(con: duckdb.DuckDBPyConnection, query: str, params: Any = None) -> list[Any]:
    """Execute and drain: DuckDB 2 blocks a connection while a result is unfetched."""
    return con.execute(query, params).fetchall()


def _history_table(
    rows: list[tuple[str, int, lifecycle.Change | None]], appended: set[str]
) -> pa.Table:
    return pa.table(
        {
            "customer_id": pa.array([r[0] for r in rows], pa.string()),
            "appended": pa.array([r[0] in appended for r in rows], pa.bool_()),
            "step": pa.array([r[1] for r in rows], pa.int32()),
            "change_id": pa.array([r[2].change_id if r[2] else None for r in rows], pa.string()),
            "from_stage": pa.array([r[2].from_stage if r[2] else None for r in rows], pa.string()),
            "to_stage": pa.array([r[2].to_stage if r[2] else None for r in rows], pa.string()),
            "event_id": pa.array([r[2].event_id if r[2] else None for r in rows], pa.string()),
            "event_position": pa.array(
                [r[2].event_position if r[2] else None for r in rows], pa.int64()
            ),
            "occurred_at": pa.array([r[2].occurred_us if r[2] else None for r in rows], _TS),
        }
    )


def _changes_table(rows: list[tuple[int, int, lifecycle.Change]], seq: int) -> pa.Table:
    return pa.table(
        {
            "seq": pa.array(range(seq + 1, seq + 1 + len(rows)), pa.int64()),
            "change_id": pa.array([c.change_id for _, _, c in rows], pa.string()),
            "customer_id": pa.array([c.customer_id for _, _, c in rows], pa.string()),
            "from_stage": pa.array([c.from_stage for _, _, c in rows], pa.string()),
            "to_stage": pa.array([c.to_stage for _, _, c in rows], pa.string()),
            "event_id": pa.array([c.event_id for _, _, c in rows], pa.string()),
            "event_position": pa.array([c.event_position for _, _, c in rows], pa.int64()),
            "occurred_at": pa.array([c.occurred_us for _, _, c in rows], _TS),
            "ledger_position": pa.array([p for p, _, _ in rows], pa.int64()),
        }
    )
