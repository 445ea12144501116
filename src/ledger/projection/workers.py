"""The runner's Python steps: folding lifecycle stages, decrypting identifiers, and
(following) fitting the churn model.

Both are per-customer Python work that SQL cannot do (the stage rules of
:mod:`ledger.projection.lifecycle`, AES-GCM). They are pure functions of Arrow
inputs with Arrow results, so a big batch can run them in worker processes
(:class:`Offload`), partitioned by customer, while the runner's own process keeps
DuckDB busy: in threads they would share one GIL with each other and with the
runner (a 1M-event rebuild spent ~4 s of Python on one core). Small batches (follow
mode) run them inline, where starting or feeding processes would cost more than the
work.
"""

from __future__ import annotations

import atexit
import bisect
import gc
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from cryptography.exceptions import InvalidTag

from ledger import keyring as kr
from ledger.contract import Identifiers
from ledger.ledger import LedgerError
from ledger.projection import churn, lifecycle
from ledger.settings import Settings
from ledger.store import EventStore, open_store

_TS = pa.timestamp("us", tz="UTC")
#: Wrapped keys read from the store per query while decrypting inline.
KEY_CHUNK = 20_000
#: The identifier names, in the order of the bits of a picked event's ``fields`` mask
#: (``projections/identifiers.sql`` `pick`).
IDENTIFIER_FIELDS: tuple[str, ...] = tuple(Identifiers.__annotations__)
#: Every mask's names, in bit order.
_FIELDS_OF_MASK: tuple[tuple[str, ...], ...] = tuple(
    tuple(name for bit, name in enumerate(IDENTIFIER_FIELDS) if mask >> bit & 1)
    for mask in range(1 << len(IDENTIFIER_FIELDS))
)


class LifecycleInputs(NamedTuple):
    """What the fold of one batch (or one partition of its customers) reads."""

    touches: pa.Table
    #: (merged-away customer, survivor, position) of the streams' merges, by position.
    merges: list[Any]
    #: (customer, stage, transitions, last_order_us, last_occurred_us, last_position) of
    #: the customers whose fold resumes from the stored state (lifecycle.sql `resume`).
    resumed: list[Any]


class Folded(NamedTuple):
    """A fold's results: Arrow tables inline, Parquet files from a worker process."""

    #: customer_id, appended, step, change_id, from_stage, to_stage, event_id,
    #: event_position, occurred_at (step 0: the customer's rows are cleared, none written).
    history: pa.Table | Path
    #: The new changes, ordered: ledger_position, k (order within the position), then the
    #: change's fields; the runner numbers them (``seq``) after every partition is in.
    changes: pa.Table | Path


class Decrypted(NamedTuple):
    #: position, field, value of every identifier decrypted (a Parquet file from a worker).
    found: pa.Table | Path
    #: (customer, field, position) whose value could not be decrypted (key destroyed).
    failed: list[tuple[str, str, int]]


def fold(after: int, inputs: LifecycleInputs) -> Folded:
    """Refold the stage history of customers with relevant events in the batch.

    The change stream is defined per ledger position: the changes in the history
    after position p that were not in the history after p-1, so the stream is the
    same however the log is cut into batches.
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
    return Folded(_history_table(history, appended), _changes_table(emitted))


def decrypt(
    picked: pa.Table,
    keys: kr.Keyring,
    read_wrapped: Callable[[list[str]], Mapping[str, bytes]],
    *,
    cache: bool,
) -> Decrypted:
    """Decrypt the picked events (``projections/identifiers.sql`` `pick`): of each, the
    identifiers its ``fields`` mask names (bits over :data:`IDENTIFIER_FIELDS`), or every
    identifier when the mask is NULL.

    The rows come grouped by stream: each stream's key is unwrapped when its rows start
    and, unless ``cache`` (follow mode, whose customers come back), not kept after them
    (an AESGCM object holds ~2.4 KB of native memory; a rebuild may touch a million
    customers; skipping the LRU's bookkeeping also costs 1.6 instead of 8.9 us a key).
    Wrapped keys are asked of ``read_wrapped`` in chunks of :data:`KEY_CHUNK` streams.
    """
    positions: list[int] = []
    fields_out: list[str] = []
    values: list[str] = []
    failed: list[tuple[str, str, int]] = []
    if picked.num_rows:
        cols = [picked.column(i).to_pylist() for i in range(picked.num_columns)]
        order = list(dict.fromkeys(cols[1]))
        chunk: Mapping[str, bytes] = {}
        requested: set[str] = set()
        next_chunk = 0
        current: str | None = None
        cipher: Any = None
        loads, nonce = orjson.loads, kr.NONCE
        unwrap = keys.load if cache else keys.unwrap
        for position, stream, sealed, aad, fields, customer in zip(*cols, strict=True):
            if stream != current:
                current = stream
                cipher = keys.cached(stream) if cache else None
                if cipher is None:
                    if stream not in requested:  # streams come in `order`: the next chunk
                        wanted = order[next_chunk : next_chunk + KEY_CHUNK]
                        next_chunk += KEY_CHUNK
                        requested = set(wanted)
                        chunk = read_wrapped(wanted)
                    blob = chunk.get(stream)
                    try:
                        cipher = None if blob is None else unwrap(stream, blob)
                    except kr.KeyError_ as exc:
                        # A wrong master key: the user's to fix, said in one sentence.
                        raise LedgerError(f"cannot decrypt identifiers: {exc}") from None
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
                        positions.append(position)
                        fields_out.append(name)
                        values.append(str(value))
                continue
            for field in _FIELDS_OF_MASK[fields]:
                value = None if ids is None else ids.get(field)
                if value is None:
                    failed.append((customer, field, position))
                else:
                    positions.append(position)
                    fields_out.append(field)
                    values.append(str(value))
    return Decrypted(_found_table(positions, fields_out, values), failed)


#: The columns of lifecycle.sql `input` the fold reads (an empty partition has no file).
TOUCH_SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("position", pa.int64()),
        ("event_id", pa.string()),
        ("type", pa.string()),
        ("occurred_us", pa.int64()),
        ("form_id", pa.string()),
        ("direction", pa.string()),
        ("outcome", pa.string()),
        ("sentiment", pa.string()),
        ("satisfaction", pa.int32()),
    ]
)
_stores: dict[str, EventStore] = {}


def _read_part(directory: Path, order: list[str]) -> pa.Table | None:
    """A partition written by the runner's COPY ... PARTITION_BY, sorted; None if empty."""
    if not directory.exists():
        return None
    table = pq.read_table(str(directory))
    return table.sort_by([(name, "ascending") for name in order])


def _fold_part(
    after: int, touches_dir: Path, merges: list[Any], resumed: list[Any], out: Path
) -> Folded:
    """One partition's fold, in a worker process: Parquet in, Parquet out."""
    touches = _read_part(touches_dir, ["position"])
    if touches is None:
        touches = TOUCH_SCHEMA.empty_table()
    touches = touches.select(TOUCH_SCHEMA.names).cast(TOUCH_SCHEMA)
    folded = fold(after, LifecycleInputs(touches, sorted(merges, key=lambda m: m[2]), resumed))
    out.mkdir()
    _hand_over(folded.history, out / "history.parquet")
    _hand_over(folded.changes, out / "changes.parquet")
    del touches, folded
    _release()
    return Folded(out / "history.parquet", out / "changes.parquet")


def _hand_over(table: pa.Table, path: Path) -> None:
    """Write a result for the runner, which reads it once, soon, from the page cache: not
    compressed, no dictionaries (a fold partition's tables: 19 -> 7 ms per 31k rows)."""
    pq.write_table(table, path, compression="none", use_dictionary=False)


def _release() -> None:
    """Hand a finished partition's memory back: a worker lives for many partitions, and
    without this the peaks of its Python objects and Arrow buffers add up."""
    gc.collect()
    # What survives is the worker's own: the modules and caches loaded by its first
    # partitions (pyarrow.parquet, cryptography, the store). Frozen, the next collection
    # walks only the next partition's objects (each walked them again: ~30 ms a partition).
    gc.freeze()
    pa.default_memory_pool().release_unused()


def _decrypt_part(picked_dir: Path, keys: kr.Keyring, settings: Settings, out: Path) -> Decrypted:
    """One partition's decryption, in a worker process, reading wrapped keys itself."""
    picked = _read_part(picked_dir, ["stream_id", "position"])
    if picked is None:
        return Decrypted(_found_table([], [], []), [])
    store = _store_for(settings)
    picked = picked.select(["position", "stream_id", "sealed", "aad", "fields", "customer_id"])
    decrypted = decrypt(picked, keys, store.read_wrapped_keys, cache=False)
    _hand_over(decrypted.found, out)
    del picked
    _release()
    return Decrypted(out, decrypted.failed)


def _store_for(settings: Settings) -> EventStore:
    """The ledger's store, opened once per worker process (for its wrapped keys)."""
    where = settings.store_url or settings.home.as_posix()
    store = _stores.get(where)
    if store is None:
        store = _stores[where] = open_store(settings)
        atexit.register(store.close)
    return store


def _found_table(positions: list[int], fields: list[str], values: list[str]) -> pa.Table:
    return pa.table(
        {
            "position": pa.array(positions, pa.int64()),
            "field": pa.array(fields, pa.string()),
            "value": pa.array(values, pa.string()),
        }
    )


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


def _changes_table(rows: list[tuple[int, int, lifecycle.Change]]) -> pa.Table:
    return pa.table(
        {
            "ledger_position": pa.array([p for p, _, _ in rows], pa.int64()),
            "k": pa.array([k for _, k, _ in rows], pa.int32()),
            "change_id": pa.array([c.change_id for _, _, c in rows], pa.string()),
            "customer_id": pa.array([c.customer_id for _, _, c in rows], pa.string()),
            "from_stage": pa.array([c.from_stage for _, _, c in rows], pa.string()),
            "to_stage": pa.array([c.to_stage for _, _, c in rows], pa.string()),
            "event_id": pa.array([c.event_id for _, _, c in rows], pa.string()),
            "event_position": pa.array([c.event_position for _, _, c in rows], pa.int64()),
            "occurred_at": pa.array([c.occurred_us for _, _, c in rows], _TS),
        }
    )


#: Scheduling niceness of the worker processes: the runner's own DuckDB work is the
#: batch's critical path; the workers fill the CPU it leaves idle.
WORKER_NICENESS = 10


def _start_worker() -> None:
    os.nice(WORKER_NICENESS)
    # A runner killed by SIGKILL cannot stop its pool, and a worker waiting for work holds
    # both ends of its task queue, so it would wait forever: leave when the parent is gone.
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    # A partition allocates hundreds of thousands of objects and no cycles worth chasing:
    # the collector's passes took ~40 % of a fold. `_release` collects after each one, and
    # the modules imported so far are never garbage: frozen, that collection does not walk
    # them (9 ms a partition otherwise).
    gc.disable()
    gc.freeze()


class Offload:
    """Worker processes for the Python steps of big batches (started on first use).

    ``spawn``, not ``fork``: the runner's process has DuckDB's threads running, and a
    forked child would inherit their locks mid-use.
    """

    def __init__(self, processes: int):
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
            )
        return self._pool

    def fold(
        self, after: int, touches: Path, merges: list[Any], resumed: list[Any], out: Path
    ) -> Future[Folded]:
        """Fold one partition: its touches in the Parquet directory ``touches``, its merges
        and resumed customers; the result is Parquet files under ``out``."""
        return self._executor().submit(_fold_part, after, touches, merges, resumed, out)

    def decrypt(
        self, picked: Path, keys: kr.Keyring, settings: Settings, out: Path
    ) -> Future[Decrypted]:
        """Decrypt one partition of picked events (Parquet directory) into the file ``out``."""
        return self._executor().submit(_decrypt_part, picked, keys, settings, out)

    def start_fitter(self) -> None:
        """Start one worker process and load scipy into it, so that a later :meth:`fit`
        finds it ready (spawning one costs ~1 s of a core)."""
        self._executor().submit(churn.preload).result()

    def fit(self, x: Any, t_x: Any, big_t: Any) -> Future[churn.BgNbdFit]:
        """Fit the BG/NBD churn model (:func:`churn.fit`) in a worker process."""
        return self._executor().submit(churn.fit, x, t_x, big_t)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
