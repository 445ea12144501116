"""The ledger: validated, idempotent, ordered, hash-chained, encrypted appends, and reads.

This is the one write path every adapter ends in (SDK, file import, Kafka
worker, HTTP collector). A batch is appended in one transaction that holds the
store's writer lock:

1. each input is validated against the contract (bad ones become
   :class:`Rejection` s with reasons; the rest go on);
2. repeats of an ``event_id`` (in the batch or already stored) are counted as
   duplicates and stored once;
3. each new event gets the next global position and its customer's next
   sequence, its personal fields are encrypted with the customer's data key,
   and it is sealed to the previous hash of its customer's chain;
4. rows, idempotency index, stream heads and (optionally) upstream tracking
   positions commit together, so a crash leaves all or nothing.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson
from cryptography.exceptions import InvalidTag
from eventsourcing.persistence import IntegrityError, OperationalError, Tracking

from ledger import keyring as kr
from ledger.chain import GENESIS, SealError, chain_hash, seal, unseal
from ledger.contract import (
    CHANNEL_OF,
    ENVELOPE_FIELDS,
    PAYLOAD_FIELDS,
    PERSONAL_FIELDS,
    ContractError,
    Event,
    parse_event,
    parse_line,
)
from ledger.settings import Settings
from ledger.store import EventStore, StoredRow, open_store
from ledger.store.base import Head

Input = bytes | str | dict[str, Any] | Event
# Canonical JSON: sorted keys, UTC times with "Z", UUIDs and decimals as strings.
_CANON = orjson.OPT_SORT_KEYS | orjson.OPT_UTC_Z


class LedgerError(RuntimeError):
    """A failure a user can act on; the CLI prints the message without a traceback."""


class StaleTracking(LedgerError):
    """The upstream position recorded with this batch is not past the stored one."""


@dataclass(frozen=True)
class Rejection:
    """One input that broke the contract, with the reasons (one sentence per field)."""

    index: int
    problems: list[str]
    raw: bytes | None = None
    event_id: str | None = None

    @property
    def reason(self) -> str:
        return "; ".join(self.problems)


@dataclass
class AppendResult:
    accepted: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    first_position: int | None = None
    last_position: int | None = None

    def add(self, other: AppendResult) -> None:
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.rejected.extend(other.rejected)
        if other.first_position is not None and self.first_position is None:
            self.first_position = other.first_position
        if other.last_position is not None:
            self.last_position = other.last_position


@dataclass(frozen=True)
class RecordedEvent:
    """An event as the ledger holds it, personal fields decrypted when the key exists."""

    position: int
    sequence: int
    customer_id: str
    event_id: str
    type: str
    channel: str
    occurred_at: dt.datetime
    recorded_at: dt.datetime
    source: str
    schema_version: int
    payload: dict[str, Any]
    identifiers: dict[str, Any] | None
    extra: dict[str, Any]
    hash: str
    prev_hash: str
    #: True when the event had personal data whose key was destroyed by ``forget``.
    erased: bool = False
    #: True when personal data exists but was not decrypted (``decrypt=False``).
    sealed_personal: bool = False

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["occurred_at"] = self.occurred_at.isoformat()
        out["recorded_at"] = self.recorded_at.isoformat()
        return out


@dataclass(frozen=True)
class Tampering:
    customer_id: str
    sequence: int
    position: int
    reason: str


@dataclass(frozen=True)
class Anchor:
    """A commitment to the whole ledger up to ``position``, small enough to keep elsewhere.

    ``digest`` is SHA-256 over every customer's chain head as of that position (customer,
    sequence, hash; sorted by customer). Hash chains alone cannot reveal a rewrite by
    someone who can write the database (re-seal a chain's tail and its stream head);
    an anchor published outside the database can: the same position must replay to the
    same digest. ``ledger verify`` prints one and checks earlier ones (``--anchor``).
    """

    position: int
    digest: str

    def __str__(self) -> str:
        return f"{self.position}:{self.digest}"

    @classmethod
    def parse(cls, text: str) -> Anchor:
        position, _, digest = text.strip().partition(":")
        digest = digest.lower()
        if (
            not position.isdigit()
            or int(position) < 1
            or len(digest) != 64
            or digest.strip("0123456789abcdef")
        ):
            raise ValueError(
                f"anchor: {text.strip()[:100]!r} is not an anchor; expected POSITION:DIGEST as "
                "`ledger verify` prints it, e.g. 1000:3f5a... (64 hex digits)"
            )
        return cls(int(position), digest)


def heads_digest(heads: dict[str, Head]) -> str:
    """The anchor digest of a set of chain heads (see :class:`Anchor`)."""
    digest = sha256()
    for customer in sorted(heads):
        head = heads[customer]
        digest.update(f"{customer}\x00{head.sequence}\x00{head.hash}\n".encode())
    return digest.hexdigest()


@dataclass
class VerifyReport:
    events: int = 0
    customers: int = 0
    problems: list[Tampering] = field(default_factory=list)
    #: Anchors given to :meth:`Ledger.verify` that this ledger does not replay to.
    broken_anchors: list[tuple[Anchor, str]] = field(default_factory=list)
    #: The anchor of the verified ledger as it is now (None for an empty ledger).
    anchor: Anchor | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and not self.broken_anchors

    @property
    def first(self) -> Tampering | None:
        return min(self.problems, key=lambda p: p.position) if self.problems else None


@dataclass
class LedgerStats:
    location: str
    events: int
    customers: int
    first_position: int | None
    last_position: int
    by_type: dict[str, int]
    by_channel: dict[str, int]
    sizes: dict[str, int]


def _parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


class Ledger:
    """The append-only customer interaction ledger over an :class:`EventStore`."""

    def __init__(self, store: EventStore, keys: kr.Keyring, *, strict: bool = False):
        self.store = store
        self.keys = keys
        self.strict = strict
        #: Set once a stored data key unwrapped: the master key is the ledger's.
        self._master_ok = False

    @classmethod
    def open(cls, settings: Settings | None = None) -> Ledger:
        settings = settings or Settings()
        try:
            master = kr.load_master_key(settings.master_key, settings.key_file)
            store = open_store(settings)
        except (kr.KeyError_, ValueError) as exc:
            raise LedgerError(str(exc)) from None
        except OperationalError as exc:
            raise LedgerError(f"cannot open the ledger store: {exc}".strip()) from None
        return cls(store, kr.Keyring(master), strict=settings.strict)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def validate(
        self, inputs: Iterable[Input], *, strict: bool | None = None
    ) -> tuple[list[Event], list[Rejection]]:
        """Split inputs into valid events and rejections (no storage involved)."""
        strict = self.strict if strict is None else strict
        now = dt.datetime.now(dt.UTC)
        valid: list[Event] = []
        rejected: list[Rejection] = []
        for index, item in enumerate(inputs):
            try:
                if isinstance(item, bytes | str):
                    valid.append(parse_line(item, strict=strict, now=now))
                else:
                    valid.append(parse_event(item, strict=strict, now=now))
            except ContractError as exc:
                raw = item.encode(errors="backslashreplace") if isinstance(item, str) else item
                rejected.append(
                    Rejection(
                        index,
                        exc.problems,
                        raw=raw if isinstance(raw, bytes) else None,
                        event_id=_event_id_of(item),
                    )
                )
        return valid, rejected

    def append(
        self,
        inputs: Iterable[Input],
        *,
        strict: bool | None = None,
        tracking: Sequence[Tracking] = (),
    ) -> AppendResult:
        """Validate and append a batch in one transaction (with ``tracking``, if given)."""
        events, rejected = self.validate(inputs, strict=strict)
        result = self.append_valid(events, tracking=tracking)
        result.rejected = rejected
        return result

    def append_valid(
        self,
        events: Sequence[Event],
        *,
        tracking: Sequence[Tracking] = (),
        also: Callable[[Any], None] | None = None,
        check: Callable[[Any], Sequence[Event] | None] | None = None,
    ) -> AppendResult:
        """Append already-validated events (one transaction).

        ``also``, if given, is called with the transaction's DB-API connection after the
        events are written and before the commit, so what it writes commits with them or
        not at all (the collector's identity graph). It may be called more than once when
        a busy database makes the append retry: each call is in a fresh transaction.

        ``check``, if given, is called the same way but first, before anything is read or
        written: with the writer lock held, it may return other (validated) events to
        append instead of ``events`` (the collector's workers re-resolve a group whose
        identity graph another process changed), or None to go on with ``events``.
        """
        unique, in_batch_repeats = _unique(events)
        if not unique and not tracking and also is None and check is None:
            return AppendResult(duplicates=in_batch_repeats)
        for attempt in range(5):
            # A fresh result per attempt: a rolled-back attempt must not leave counts behind.
            result = AppendResult(duplicates=in_batch_repeats)
            try:
                with self.store.write() as session:
                    if check is not None:
                        instead = check(session.connection)
                        if instead is not None:
                            unique, in_batch_repeats = _unique(instead)
                            result.duplicates = in_batch_repeats
                    self._append_locked(session, unique, result, tracking)
                    if also is not None:
                        also(session.connection)
                return result
            except IntegrityError as exc:
                if tracking:
                    raise StaleTracking(f"tracking position is not new: {exc}") from None
                raise
            except OperationalError:
                # SQLite's busy timeout ran out while another process held the lock.
                if attempt == 4:
                    raise LedgerError(
                        f"the ledger at {self.store.location} stayed locked by another writer"
                    ) from None
        raise AssertionError("unreachable: the retry loop returns or raises")

    def _append_locked(
        self,
        session: Any,
        unique: dict[bytes, tuple[Event, dict[str, Any], dict[str, Any]]],
        result: AppendResult,
        tracking: Sequence[Tracking],
    ) -> None:
        ids = list(unique)
        seen = session.existing_event_ids(ids) if ids else set()
        fresh = [(i, *unique[i]) for i in ids if i not in seen]
        result.duplicates += len(seen)
        if fresh:
            customers = list(dict.fromkeys(e["customer_id"] for _, e, _, _ in fresh))
            heads = session.heads(customers)
            ciphers = self._ciphers_for(session, customers)
            position = session.max_position()
            recorded_at = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
            nonces = os.urandom(kr.NONCE * len(fresh))
            rows: list[StoredRow] = []
            event_ids: list[bytes] = []
            encrypt, dumps, width = kr.encrypt, orjson.dumps, kr.NONCE
            # The hot loop of the ledger: keep per-event work to dict stores and C calls.
            for n, (event_id, event, record, personal) in enumerate(fresh):
                customer = event["customer_id"]
                position += 1
                head = heads.get(customer)
                sequence, prev = (head[0] + 1, head[1]) if head else (1, GENESIS)
                record["position"] = position
                record["sequence"] = sequence
                record["recorded_at"] = recorded_at
                record["prev_hash"] = prev
                if personal:
                    record["personal"] = encrypt(
                        ciphers[customer],
                        nonces[n * width : (n + 1) * width],
                        dumps(personal, default=str, option=orjson.OPT_UTC_Z),
                        event_id,
                    )
                state, digest = seal(dumps(record, option=_CANON, default=str), prev)
                heads[customer] = Head(sequence, digest)
                rows.append(StoredRow(position, customer, sequence, record["type"], state))
                event_ids.append(event_id)
            session.insert_events(rows, event_ids)
            session.upsert_heads({c: heads[c] for c in customers})
            result.accepted += len(rows)
            result.first_position = rows[0].position
            result.last_position = rows[-1].position
        if tracking:
            session.record_tracking(tracking)

    def _ciphers_for(self, session: Any, customers: list[str]) -> dict[str, Any]:
        # Read under the writer lock on every batch (one indexed query, ~1 ms per 2,000
        # customers), not only on a cache miss: another process may have forgotten the
        # customer since we cached the key, and a destroyed key must never encrypt new data.
        wrapped = session.wrapped_keys(customers)
        ciphers: dict[str, Any] = {}
        new_rows = []
        for c in customers:
            if c in wrapped:
                ciphers[c] = self._unwrap(c, wrapped[c])
            else:
                blob, ciphers[c] = self.keys.new_wrapped_key(c)
                new_rows.append((c, blob))
        if new_rows:
            if not self._master_ok:
                # Wrapping new keys under a wrong master key would leave those customers
                # unreadable with the right one: prove the key on a stored one first.
                sample = session.any_wrapped_key()
                if sample is not None:
                    self._unwrap(*sample)
                self._master_ok = True
            session.insert_keys(new_rows)
        return ciphers

    # ------------------------------------------------------------------ reading

    def decode(
        self, row: StoredRow, *, decrypt: bool = True, ciphers: dict[str, Any] | None = None
    ) -> RecordedEvent:
        """A stored row as a :class:`RecordedEvent`; ``ciphers`` (customer -> cipher, from
        keys read for this page) overrides the per-customer key lookup."""
        body, digest = unseal(row.state)
        rec = orjson.loads(body)
        blob = rec.get("personal")
        personal: dict[str, Any] = {}
        erased = sealed = False
        if blob:
            if decrypt:
                cipher = (
                    ciphers.get(row.customer_id)
                    if ciphers is not None
                    else self._cipher(row.customer_id)
                )
                if cipher is None:
                    erased = True
                else:
                    try:
                        personal = orjson.loads(
                            kr.decrypt(cipher, blob, UUID(rec["event_id"]).bytes)
                        )
                    except InvalidTag:
                        erased = True
            else:
                sealed = True
        payload = dict(rec["payload"])
        payload.update(personal.get("payload", {}))
        return RecordedEvent(
            position=row.position,
            sequence=row.sequence,
            customer_id=row.customer_id,
            event_id=rec["event_id"],
            type=rec["type"],
            channel=rec["channel"],
            occurred_at=_parse_time(rec["occurred_at"]),
            recorded_at=_parse_time(rec["recorded_at"]),
            source=rec["source"],
            schema_version=rec["schema_version"],
            payload=payload,
            identifiers=personal.get("identifiers"),
            extra=personal.get("extra", {}),
            hash=digest,
            prev_hash=rec["prev_hash"],
            erased=erased,
            sealed_personal=sealed,
        )

    def _cipher(self, customer_id: str) -> Any:
        cached = self.keys.cached(customer_id)
        if cached is not None:
            return cached
        wrapped = self.store.wrapped_key(customer_id)
        return None if wrapped is None else self._unwrap(customer_id, wrapped)

    def _unwrap(self, customer_id: str, wrapped: bytes) -> Any:
        try:
            cipher = self.keys.load(customer_id, wrapped)
            self._master_ok = True
            return cipher
        except kr.KeyError_ as exc:
            # A wrong master key is a user's mistake, not a crash: say so in one sentence.
            raise LedgerError(str(exc)) from None

    def history(
        self,
        customer_id: str,
        *,
        as_of: dt.datetime | None = None,
        known_at: dt.datetime | None = None,
    ) -> list[RecordedEvent]:
        """One customer's timeline in event-time order (ties by sequence).

        ``as_of`` keeps events that had occurred by then; ``known_at`` keeps events the
        ledger had recorded by then (what an auditor saw at that moment).
        """
        self.keys.drop(customer_id)  # a forget in another process must show at once
        events = [self.decode(r) for r in self.store.read_stream(customer_id)]
        if as_of is not None:
            events = [e for e in events if e.occurred_at <= as_of]
        if known_at is not None:
            events = [e for e in events if e.recorded_at <= known_at]
        events.sort(key=lambda e: (e.occurred_at, e.sequence))
        return events

    def read(
        self, after: int = 0, limit: int = 1_000, *, decrypt: bool = False
    ) -> list[RecordedEvent]:
        """The global log: events with position > ``after``, in position order.

        With ``decrypt``, the page's keys are read from the store (not the cache), so a
        customer forgotten by another process reads as erased at once.
        """
        rows = self.store.read_log(after, limit)
        if not decrypt:
            return [self.decode(r, decrypt=False) for r in rows]
        live = self.store.read_wrapped_keys(list({r.customer_id for r in rows}))
        ciphers = {c: self._unwrap(c, wrapped) for c, wrapped in live.items()}
        return [self.decode(r, ciphers=ciphers) for r in rows]

    def read_raw(self, after: int = 0, limit: int = 10_000) -> list[StoredRow]:
        """The global log as stored rows (sealed bytes), for bulk readers such as projections."""
        return self.store.read_log(after, limit)

    def follow(
        self, after: int = 0, *, page: int = 1_000, decrypt: bool = False
    ) -> Iterator[RecordedEvent]:
        """Every event after ``after`` that exists now, page by page."""
        while True:
            events = self.read(after, page, decrypt=decrypt)
            if not events:
                return
            yield from events
            after = events[-1].position

    @property
    def position(self) -> int:
        return self.store.max_position()

    # ------------------------------------------------------------------ audit

    def verify(
        self,
        on_progress: Callable[[int, int], None] | None = None,
        *,
        anchors: Sequence[Anchor] = (),
    ) -> VerifyReport:
        """Recompute every chain from the stored bytes; report each broken link, and each
        of ``anchors`` the ledger no longer replays to."""
        report = VerifyReport()
        running: dict[str, Head] = {}
        broken: set[str] = set()
        last_position = 0
        total = self.store.max_position()
        pending = sorted(anchors, key=lambda a: a.position)

        def check_anchors(upto: int) -> None:
            while pending and pending[0].position <= upto:
                anchor = pending.pop(0)
                if heads_digest(running) != anchor.digest:
                    report.broken_anchors.append(
                        (
                            anchor,
                            f"the ledger up to position {anchor.position} does not replay to "
                            "the anchored digest: events before it were altered, removed or "
                            "rewritten",
                        )
                    )

        def flag(customer: str, sequence: int, position: int, reason: str) -> None:
            report.problems.append(Tampering(customer, sequence, position, reason))
            broken.add(customer)

        while True:
            rows = self.store.read_log(last_position, 10_000)
            if not rows:
                break
            for row in rows:
                report.events += 1
                if pending and pending[0].position < row.position:
                    check_anchors(row.position - 1)  # `running` holds every row before this
                if row.position != last_position + 1:
                    # Not flag(): this row's own chain may be intact and must still be checked,
                    # or a deletion would hide alterations to the next customer's events.
                    report.problems.append(
                        Tampering(
                            row.customer_id,
                            row.sequence,
                            row.position,
                            f"positions {last_position + 1}..{row.position - 1} are missing",
                        )
                    )
                last_position = row.position
                if row.customer_id in broken:
                    continue
                head = running.get(row.customer_id)
                expected_seq = head.sequence + 1 if head else 1
                prev = head.hash if head else GENESIS
                problem, digest = _check_row(row, expected_seq, prev)
                if problem:
                    flag(row.customer_id, row.sequence, row.position, problem)
                    continue
                running[row.customer_id] = Head(row.sequence, digest)
            if on_progress:
                on_progress(last_position, total)
        for customer, head in self.store.all_heads():
            if customer in broken:
                continue
            seen = running.get(customer)
            if seen is None or seen.sequence != head.sequence or seen.hash != head.hash:
                flag(
                    customer,
                    seen.sequence + 1 if seen else 1,
                    last_position,
                    f"the stream head says {head.sequence} events but "
                    f"{seen.sequence if seen else 0} chain up to it: events are missing",
                )
        check_anchors(last_position)
        report.customers = len(running)
        for anchor in pending:  # beyond the end of the ledger
            report.broken_anchors.append(
                (
                    anchor,
                    f"the ledger ends at position {last_position}, before the anchored "
                    f"position {anchor.position}: events were removed",
                )
            )
        if last_position:
            report.anchor = Anchor(last_position, heads_digest(running))
        return report

    def forget(self, customer_id: str, *, reason: str | None = None) -> bool:
        """Crypto-shred a customer: destroy the data key, record the fact as an event.

        Returns False when the customer had no key (unknown, or already forgotten).
        """
        event = parse_event(
            {
                "event_id": str(UUID(bytes=os.urandom(16), version=4)),
                "customer_id": customer_id,
                "channel": "system",
                "type": "customer_forgotten",
                "occurred_at": dt.datetime.now(dt.UTC).isoformat(),
                "source": "ledger-forget",
                "payload": {"reason": reason} if reason else {},
            }
        )
        with self.store.write() as session:
            existed = bool(session.wrapped_keys([customer_id]))
            if existed:
                # Append before deleting: appending for a customer without a key makes one.
                self._append_locked(
                    session,
                    {event.event_id.bytes: (event, *_split_personal(event))},
                    AppendResult(),
                    (),
                )
                session.delete_key(customer_id)
        self.keys.drop(customer_id)
        if not self.store.checkpoint():
            raise LedgerError(
                f"the data key of {customer_id} is destroyed, but the ledger's WAL could not be "
                "checkpointed within 10 s (other checkpoints kept running), so the erased "
                "pages' old images are still in it: run the same forget again"
            )
        return existed

    def backup(self, destination: Path) -> None:
        """Copy the ledger to a new file ``destination`` while it keeps taking appends
        (:meth:`verify_copy` then checks the copy's chains).

        The copy holds the wrapped data keys: a customer forgotten later stays readable in
        it (with the master key) until the copy is destroyed, so keep backups on a schedule
        that expires them. PostgreSQL ledgers are backed up by PostgreSQL's tools.
        """
        destination = Path(destination)
        if destination.exists():
            raise LedgerError(f"{destination} exists; a backup never overwrites a file")
        if not destination.parent.is_dir():
            raise LedgerError(f"{destination.parent} is not a directory")
        try:
            self.store.backup(destination)
        except NotImplementedError as exc:
            raise LedgerError(
                f"{exc}: use pg_dump or your database's snapshots for a PostgreSQL ledger"
            ) from None
        except (OSError, sqlite3.Error) as exc:
            destination.unlink(missing_ok=True)
            raise LedgerError(f"backup to {destination} failed: {exc}") from None

    def verify_copy(
        self, path: Path, on_progress: Callable[[int, int], None] | None = None
    ) -> VerifyReport:
        """:meth:`verify` of a SQLite copy of a ledger (a backup) at ``path``."""
        from ledger.store.sqlite import SQLiteStore

        copy = SQLiteStore(Path(path))
        try:
            return Ledger(copy, self.keys).verify(on_progress)
        finally:
            copy.close()

    def stats(self) -> LedgerStats:
        by_type = self.store.counts_by_type()
        by_channel: dict[str, int] = {}
        for t, n in by_type.items():
            ch = CHANNEL_OF.get(t, "?")
            by_channel[ch] = by_channel.get(ch, 0) + n
        events = sum(by_type.values())
        last = self.store.max_position()
        return LedgerStats(
            location=self.store.location,
            events=events,
            customers=self.store.customer_count(),
            first_position=1 if events else None,
            last_position=last,
            by_type=dict(sorted(by_type.items())),
            by_channel=dict(sorted(by_channel.items())),
            sizes=self.store.size_bytes(),
        )


def _check_row(row: StoredRow, expected_seq: int, prev: str) -> tuple[str | None, str]:
    """(what is wrong with this row, or None; its recorded hash)."""
    try:
        body, digest = unseal(row.state)
        rec = orjson.loads(body)
    except (SealError, orjson.JSONDecodeError):
        return "the stored bytes are not a sealed event (altered or truncated)", ""
    if chain_hash(rec.get("prev_hash", ""), body) != digest:
        return "content does not match its hash (the event was altered)", digest
    if rec.get("prev_hash") != prev:
        return (
            "prev_hash does not match the previous event's hash (the chain was rewritten)",
            digest,
        )
    if row.sequence != expected_seq or rec.get("sequence") != row.sequence:
        return f"sequence {row.sequence} where {expected_seq} was expected", digest
    if rec.get("position") != row.position or rec.get("customer_id") != row.customer_id:
        return (
            "the event was moved: its position or customer differs from its sealed content",
            digest,
        )
    return None, digest


def _unique(
    events: Sequence[Event],
) -> tuple[dict[bytes, tuple[Event, dict[str, Any], dict[str, Any]]], int]:
    """Events by event id (first occurrence, split into clear and personal parts), and how
    many repeats of an id the batch itself held."""
    repeats = 0
    unique: dict[bytes, tuple[Event, dict[str, Any], dict[str, Any]]] = {}
    for event in events:
        key = event["event_id"].bytes
        if key in unique:
            repeats += 1
        else:
            unique[key] = (event, *_split_personal(event))
    return unique, repeats


def _split_personal(event: Event) -> tuple[dict[str, Any], dict[str, Any]]:
    """The event as data, split into what stays clear and what gets encrypted.

    Identifiers, the type's personal payload fields and every unknown field (we cannot
    know it is not personal) are encrypted; the rest stays readable for projections.
    """
    clear = dict(event)
    personal: dict[str, Any] = {}
    identifiers = clear.pop("identifiers", None)
    if identifiers:
        personal["identifiers"] = identifiers
    extra = (
        {}
        if ENVELOPE_FIELDS.issuperset(clear)
        else {k: clear.pop(k) for k in [k for k in clear if k not in ENVELOPE_FIELDS]}
    )
    payload = clear["payload"]
    known = PAYLOAD_FIELDS[clear["type"]]
    secret_names = PERSONAL_FIELDS[clear["type"]]
    if not known.issuperset(payload) or not secret_names.isdisjoint(payload):
        payload = dict(payload)  # the caller's event stays untouched
        for name in [k for k in payload if k not in known]:
            extra[f"payload.{name}"] = payload.pop(name)
        secret = {f: payload.pop(f) for f in secret_names if f in payload}
        if secret:
            personal["payload"] = secret
        clear["payload"] = payload
    if extra:
        personal["extra"] = extra
    if personal:
        # Which identifiers the ciphertext holds (names, never values; [] for free text
        # only): a projection needs only the latest value of each, so it decrypts one
        # event per field, not every one, and none of the events without identifiers.
        clear["identifier_fields"] = sorted(identifiers) if identifiers else []
    clear.setdefault("schema_version", 1)
    return clear, personal


def _event_id_of(item: Input) -> str | None:
    try:
        if isinstance(item, bytes | str):
            value = orjson.loads(item).get("event_id")
        elif isinstance(item, dict):
            value = item.get("event_id")
        else:
            value = item.event_id
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return None
    return None if value is None else str(value)[:100]
