"""Identity stitching: a deterministic identity graph resolving each touchpoint to one customer.

The graph links identifiers (user ids, normalised emails, E.164 phones,
``network:handle`` social handles, anonymous ids) to customers. It is kept in
the collector's own tables, identifiers only as keyed hashes (BLAKE2b keyed
with a key derived from the ledger's master key): the tables say which
identifiers belong together without holding a single email or number; the
values themselves live, encrypted, in the ledger's events.

Resolving one touch (its identifiers in strength order: user_id, email, phone,
social_handle, anonymous_id):

1. The customer is the owner of its strongest *known* identifier. When a
   stronger identifier is new and cannot join that customer (the customer is
   at its limit for that kind, e.g. already has a user id), the stronger one
   wins: a new customer is minted from it. With no known identifier, a customer
   is minted from the strongest one. Minted ids are ``cus_`` + a keyed hash of
   that identifier, so a replay mints the same ids.
2. Every other identifier of the touch is linked to that customer: a new one
   joins it; one owned by another customer means both are one person, a
   **merge**: the older customer (created first) survives, the other's
   identifiers move to it, and a ``customers_merged`` event is appended to the
   survivor's stream in the same ledger transaction as the touch.
3. **Limits**: a customer may hold at most ``limits[kind]`` identifiers of each
   kind (default: 1 user id, 3 emails, 2 phones, 5 handles, 100 anonymous ids).
   A link or merge that would pass a limit is refused, recorded in
   ``collector_refusals`` and as an ``identity_link_refused`` event, and the
   touch stays with its customer. So a shared office phone cannot fuse people
   who have user ids, and people without them at most ``limits["email"]`` deep.

The resolver keeps its changes pending until they can be written with the
events that depend on them: inside the ledger's append transaction in the
embedded mode (``writer``: both commit, or neither), in a transaction of their
own after the broker's acknowledgement in the distributed one (``commit``). If
the append fails they are dropped, and a retried request resolves the same way
again.

The graph is cached in memory. One collector process (``ledger serve``) trusts its
cache. Several (``ledger serve --workers N``, ``shared=True``) each resolve from
their own cache, then, holding the ledger's write lock, check what the resolution
read against the tables before anything is written (:meth:`GraphResolver.fresh`):
the owner of every identifier the group looked up and the identifier counts of
every customer it linked to, merged or minted. When another process changed any of
them, the cache is dropped and the group resolved again while the lock is still
held, so two processes that see the same new identifier at once make one customer,
and limits and merges are decided on the graph as committed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ledger import keyring as kr
from ledger.collector.db import CollectorDB
from ledger.collector.touch import EVENT_NAMESPACE, IDENTIFIER_KINDS, Touch
from ledger.ledger import LedgerError
from ledger.settings import Settings

DEFAULT_LIMITS: dict[str, int] = {
    "user_id": 1,
    "email": 3,
    "phone": 2,
    "social_handle": 5,
    "anonymous_id": 100,
}
_STRENGTH = {kind: n for n, kind in enumerate(IDENTIFIER_KINDS)}

TABLES = [
    """CREATE TABLE IF NOT EXISTS collector_customers (
        customer_id TEXT PRIMARY KEY,
        created_seq BIGINT NOT NULL,
        created_at TEXT NOT NULL,
        merged_into TEXT,
        forgotten_at TEXT
    )""",
    # generation: bumped by every change made outside the collector (forget), so a running
    # collector drops its cache of the graph.
    """CREATE TABLE IF NOT EXISTS collector_meta (
        name TEXT PRIMARY KEY,
        value BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS collector_identifiers (
        kind TEXT NOT NULL,
        digest TEXT NOT NULL,
        customer_id TEXT NOT NULL,
        first_seen TEXT NOT NULL,
        PRIMARY KEY (kind, digest)
    )""",
    "CREATE INDEX IF NOT EXISTS collector_identifiers_customer "
    "ON collector_identifiers (customer_id)",
    # A merge re-points earlier merges (merged_into); a restart reads MAX(created_seq).
    "CREATE INDEX IF NOT EXISTS collector_customers_merged ON collector_customers (merged_into)",
    "CREATE INDEX IF NOT EXISTS collector_customers_seq ON collector_customers (created_seq)",
    """CREATE TABLE IF NOT EXISTS collector_merges (
        event_id TEXT PRIMARY KEY,
        from_customer TEXT NOT NULL,
        into_customer TEXT NOT NULL,
        kind TEXT NOT NULL,
        at TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS collector_refusals (
        event_id TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL,
        other_customer TEXT,
        kind TEXT NOT NULL,
        digest TEXT NOT NULL,
        limit_value INTEGER NOT NULL,
        at TEXT NOT NULL
    )""",
]


def identity_key(settings: Settings) -> bytes:
    """The key of identifier hashes; derived so it changes with the master key."""
    try:
        master = kr.load_master_key(settings.master_key, settings.key_file)
    except (kr.KeyError_, ValueError) as exc:
        raise LedgerError(str(exc)) from None
    return hmac.new(master, b"ledger collector identity v1", hashlib.sha256).digest()


class Pseudonyms:
    """Keyed hashes of identifiers, and customer ids minted from them."""

    def __init__(self, key: bytes):
        self._key = key

    def digest(self, kind: str, value: str) -> str:
        # Keyed BLAKE2b is a MAC in one C call, several times cheaper than hmac.new per id.
        return hashlib.blake2b(
            f"{kind}\n{value}".encode(), key=self._key, digest_size=32
        ).hexdigest()

    def customer_id(self, kind: str, value: str) -> str:
        return "cus_" + self.digest(kind, value)[:20]


def parse_limits(items: Iterable[str]) -> dict[str, int]:
    """``kind=N`` options over the defaults; errors name the item and what was expected."""
    limits = dict(DEFAULT_LIMITS)
    for item in items:
        kind, _, number = item.partition("=")
        well_formed = number.isascii() and number.isdigit()  # "²".isdigit() is true
        if kind not in DEFAULT_LIMITS or not well_formed or int(number) < 1:
            raise LedgerError(
                f"--limit {item!r}: expected KIND=N with N >= 1 and KIND one of "
                + ", ".join(DEFAULT_LIMITS)
            )
        limits[kind] = int(number)
    return limits


class StaleGraph(LedgerError):
    """A customer was forgotten while a group was being resolved: resolve it again."""


def _generation(db: CollectorDB) -> int:
    rows = db.query("SELECT value FROM collector_meta WHERE name = 'generation'")
    return int(rows[0][0]) if rows else 0


def forget_identities(db: CollectorDB, customer_id: str) -> list[str]:
    """Unlink every identifier of the person ``customer_id`` belongs to (after ``forget``).

    The person is the whole merged group: its survivor and every customer merged into it.
    Their identifier hashes are deleted, the customers marked forgotten (a returning
    identifier mints a new customer), and running collectors drop their cached graph.
    Returns the group's customer ids: each has events in the ledger to ``ledger forget``.
    """
    db.create(TABLES)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    with db.transaction():
        # The generation first: on PostgreSQL this waits for a collector's append that holds
        # it (see GraphResolver.writer), so what that append linked is deleted here too.
        if db.execute("UPDATE collector_meta SET value = value + 1 WHERE name = 'generation'") == 0:
            db.execute("INSERT INTO collector_meta (name, value) VALUES ('generation', 1)")
        row = db.query(
            "SELECT merged_into FROM collector_customers WHERE customer_id = ?", [customer_id]
        )
        if not row:
            raise LedgerError(f"no customer {customer_id!r} in the collector's identity graph")
        survivor = row[0][0] or customer_id
        group = [survivor] + [
            r[0]
            for r in db.query(
                "SELECT customer_id FROM collector_customers WHERE merged_into = ? "
                "ORDER BY created_seq",
                [survivor],
            )
        ]
        db.execute("DELETE FROM collector_identifiers WHERE customer_id = ?", [survivor])
        db.execute(
            "UPDATE collector_customers SET forgotten_at = ? "
            "WHERE (customer_id = ? OR merged_into = ?) AND forgotten_at IS NULL",
            [now, survivor, survivor],
        )
        for member in group:  # refusal rows hold identifier hashes too
            db.execute(
                "DELETE FROM collector_refusals WHERE customer_id = ? OR other_customer = ?",
                [member, member],
            )
    return group


def graph_group(db: CollectorDB, customer_id: str) -> list[str] | None:
    """The person ``customer_id`` belongs to in the identity graph, survivor first.

    None when the database has no identity graph (the collector never ran) or the graph
    does not know the customer; nothing is created here.
    """
    if db.postgres:
        present = db.query("SELECT to_regclass('collector_customers') IS NOT NULL")[0][0]
    else:
        present = bool(
            db.query(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'collector_customers'"
            )
        )
    if not present:
        return None
    row = db.query(
        "SELECT merged_into FROM collector_customers WHERE customer_id = ?", [customer_id]
    )
    if not row:
        return None
    survivor = row[0][0] or customer_id
    return [survivor] + [
        r[0]
        for r in db.query(
            "SELECT customer_id FROM collector_customers WHERE merged_into = ? "
            "ORDER BY created_seq",
            [survivor],
        )
    ]


_INSERT_CUSTOMER = "INSERT INTO collector_customers (customer_id, created_seq, created_at)"


def _derived_id(*parts: str) -> str:
    return str(uuid.uuid5(EVENT_NAMESPACE, "\n".join(parts)))


@dataclass
class _Pending:
    """Graph changes waiting for the ledger commit, in the order they happened, and (shared
    mode) what the resolution read, to check under the write lock."""

    sql: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    #: Every identifier the group looked up, with the owner the cache said it had.
    keys: dict[tuple[str, str], str | None] = field(default_factory=dict)
    #: Every customer whose identifiers the group counted (linked to, merged, minted), with
    #: the counts per kind the cache said it had before the group ({} when minted).
    customers: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Customers minted by the group (their created_seq is renumbered under the lock).
    minted: list[str] = field(default_factory=list)
    #: The resolver's highest created_seq before the group; minted ones follow it.
    base_seq: int = 0
    #: Added to the minted customers' created_seq when the tables' is higher (other
    #: processes minted meanwhile); set by :meth:`GraphResolver.fresh`.
    shift: int = 0

    def add(self, sql: str, *params: Any) -> None:
        self.sql.append((sql, params))


class GraphResolver:
    """Resolves touches against the identity graph (see the module docstring)."""

    def __init__(
        self,
        db: CollectorDB,
        pseudonyms: Pseudonyms,
        limits: dict[str, int] | None = None,
        *,
        cache_limit: int = 1_000_000,
        shared: bool = False,
    ):
        self.db = db
        #: Other collector processes write the same graph: check each group under the lock.
        self.shared = shared
        self.pseudonyms = pseudonyms
        self.limits = dict(limits or DEFAULT_LIMITS)
        #: Identifiers kept in memory (~200 B each) before the cache starts over from the tables.
        self.cache_limit = cache_limit
        db.create(TABLES)
        with db.transaction():  # the row every append checks (and PostgreSQL locks)
            db.execute(
                "INSERT INTO collector_meta (name, value) VALUES ('generation', 0) "
                "ON CONFLICT DO NOTHING"
            )
        self._reset()

    def _reset(self) -> None:
        self._owner: dict[tuple[str, str], str | None] = {}
        self._counts: dict[str, dict[str, int]] = {}
        self._created: dict[str, int] = {}
        self._members: dict[str, list[tuple[str, str]]] = {}
        rows = self.db.query("SELECT MAX(created_seq) FROM collector_customers")
        self._seq = int(rows[0][0] or 0)
        self._pending = _Pending(base_seq=self._seq)
        self._generation = _generation(self.db)
        self._forgotten = {
            r[0]
            for r in self.db.query(
                "SELECT customer_id FROM collector_customers WHERE forgotten_at IS NOT NULL"
            )
        }

    # ------------------------------------------------------------------ cache fills

    def _prefetch(self, keys: Sequence[tuple[str, str]]) -> None:
        by_kind: dict[str, list[str]] = {}
        for key in dict.fromkeys(k for k in keys if k not in self._owner):
            by_kind.setdefault(key[0], []).append(key[1])
        for kind, digests in by_kind.items():
            for start in range(0, len(digests), 400):
                chunk = digests[start : start + 400]
                # kind first: the primary key (kind, digest) answers it, whatever the size.
                rows = self.db.query(
                    "SELECT digest, customer_id FROM collector_identifiers "
                    f"WHERE kind = ? AND digest IN ({','.join('?' * len(chunk))})",
                    [kind, *chunk],
                )
                found = dict(rows)
                for digest in chunk:
                    self._owner[(kind, digest)] = found.get(digest)

    def _load_customer(self, customer: str) -> None:
        if customer in self._counts:
            return
        rows = self.db.query(
            "SELECT kind, digest FROM collector_identifiers WHERE customer_id = ?", [customer]
        )
        members = [(r[0], r[1]) for r in rows]
        self._members[customer] = members
        counts: dict[str, int] = {}
        for kind, _ in members:
            counts[kind] = counts.get(kind, 0) + 1
        self._counts[customer] = counts
        created = self.db.query(
            "SELECT created_seq FROM collector_customers WHERE customer_id = ?", [customer]
        )
        self._created[customer] = int(created[0][0]) if created else 0
        # Another process may have minted it after this one's last mint: customers minted
        # from now on must still sort after it (the older customer survives a merge).
        self._seq = max(self._seq, self._created[customer])

    def _use(self, customer: str) -> None:
        """Load ``customer`` and, in shared mode, note its counts as the group found them."""
        self._load_customer(customer)
        if self.shared and customer not in self._pending.customers:
            self._pending.customers[customer] = {
                k: n for k, n in self._counts[customer].items() if n
            }

    # ------------------------------------------------------------------ graph changes

    def _mint(self, kind: str, value: str, now: str) -> str:
        customer = self.pseudonyms.customer_id(kind, value)
        again = 0
        while customer in self._forgotten:
            # A forgotten person who comes back starts a new pseudonym, unlinked from the
            # history that was erased; still deterministic (the n-th return, the n-th id).
            again += 1
            customer = self.pseudonyms.customer_id(kind, f"{value}\n#{again}")
        if customer not in self._counts:
            if self.shared and customer not in self._pending.customers:
                self._pending.customers[customer] = {}  # new: nothing may be linked to it yet
                self._pending.minted.append(customer)
            self._seq += 1
            self._counts[customer] = {}
            self._members[customer] = []
            self._created[customer] = self._seq
            self._pending.add(
                # A customer row can outlive its cache entry; never fail a request over it.
                _INSERT_CUSTOMER + " VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                customer,
                self._seq,
                now,
            )
        return customer

    def _link(self, key: tuple[str, str], customer: str, now: str) -> None:
        self._owner[key] = customer
        self._members[customer].append(key)
        counts = self._counts[customer]
        counts[key[0]] = counts.get(key[0], 0) + 1
        self._pending.add(
            "INSERT INTO collector_identifiers (kind, digest, customer_id, first_seen) "
            "VALUES (?, ?, ?, ?)",
            key[0],
            key[1],
            customer,
            now,
        )

    def _fits(self, customer: str, extra: dict[str, int]) -> str | None:
        """The first kind whose limit ``extra`` more identifiers would pass, else None."""
        counts = self._counts[customer]
        for kind in IDENTIFIER_KINDS:
            if extra.get(kind) and counts.get(kind, 0) + extra[kind] > self.limits[kind]:
                return kind
        return None

    def _merge(self, gone: str, survivor: str, kind: str, now: str) -> str:
        for key in self._members.pop(gone):
            self._owner[key] = survivor
            self._members[survivor].append(key)
        for k, n in self._counts.pop(gone).items():
            self._counts[survivor][k] = self._counts[survivor].get(k, 0) + n
        self._created.pop(gone, None)
        event_id = _derived_id("merge", gone, survivor)
        self._pending.add(
            "UPDATE collector_identifiers SET customer_id = ? WHERE customer_id = ?",
            survivor,
            gone,
        )
        self._pending.add(
            "UPDATE collector_customers SET merged_into = ? WHERE customer_id = ?", survivor, gone
        )
        self._pending.add(
            "UPDATE collector_customers SET merged_into = ? WHERE merged_into = ?", survivor, gone
        )
        self._pending.add(
            "INSERT INTO collector_merges (event_id, from_customer, into_customer, kind, at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            event_id,
            gone,
            survivor,
            kind,
            now,
        )
        return event_id

    # ------------------------------------------------------------------ resolving

    def resolve(self, touches: list[Touch]) -> list[dict[str, Any]]:
        if _generation(self.db) != self._generation or len(self._owner) > self.cache_limit:
            # Someone forgot a customer (the cache is stale), or the cache is full: start over
            # from the tables. Only between groups: nothing is pending now.
            self._reset()
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        # A group repeats identifiers (a visitor's page views): hash each once.
        digests: dict[tuple[str, str], tuple[str, str]] = {}
        digest = self.pseudonyms.digest
        keyed: list[list[tuple[str, str, tuple[str, str]]]] = []
        for t in touches:
            ids = []
            for pair in t.ids:
                key = digests.get(pair)
                if key is None:
                    key = digests[pair] = (pair[0], digest(*pair))
                ids.append((pair[0], pair[1], key))
            if len(ids) > 1:
                ids.sort(key=lambda x: _STRENGTH[x[0]])
            keyed.append(ids)
        self._prefetch(list(digests.values()))
        owner = self._owner
        if self.shared:
            # After the prefetch: every customer the cache can name is at most this, so
            # minting from here on orders new customers after all of them (merges keep
            # the older one). Other processes' mints meanwhile: fresh() shifts ours.
            rows = self.db.query("SELECT MAX(created_seq) FROM collector_customers")
            self._seq = max(self._seq, int(rows[0][0] or 0))
            self._pending.base_seq = self._seq
            self._pending.keys = {key: owner.get(key) for key in digests.values()}
        derived: list[dict[str, Any]] = []
        for touch, ids in zip(touches, keyed, strict=True):
            if len(ids) == 1:
                known = owner.get(ids[0][2])
                if known is not None:  # one identifier, already linked: its owner
                    touch.event["customer_id"] = known
                    continue
            touch.event["customer_id"] = self._resolve_one(touch, ids, now, derived)
        return derived

    def _resolve_one(
        self,
        touch: Touch,
        ids: list[tuple[str, str, tuple[str, str]]],
        now: str,
        derived: list[dict[str, Any]],
    ) -> str:
        known = [(k, v, key) for k, v, key in ids if self._owner.get(key)]
        target: str | None = None
        if known:
            target = self._owner[known[0][2]]
            assert target is not None
            self._use(target)
            anchor = _STRENGTH[known[0][0]]
            for kind, value, key in ids:
                if _STRENGTH[kind] >= anchor:
                    break
                if self._owner.get(key) is None and self._fits(target, {kind: 1}) is not None:
                    # A stronger new identifier that cannot join: it is someone else.
                    target = self._mint(kind, value, now)
                    break
        else:
            kind, value, _ = ids[0]
            target = self._mint(kind, value, now)
        for kind, _, key in ids:
            owner = self._owner.get(key)
            if owner == target:
                continue
            if owner is None:
                if self._fits(target, {kind: 1}) is None:
                    self._link(key, target, now)
                else:
                    self._refuse(touch, target, None, key, derived, now)
                continue
            self._use(owner)
            over = self._fits(target, self._counts[owner])
            if over is not None:
                self._refuse(touch, target, owner, (over, key[1]), derived, now)
                continue
            survivor, gone = sorted((target, owner), key=lambda c: (self._created[c], c))
            event_id = self._merge(gone, survivor, kind, now)
            derived.append(
                self._system_event(
                    touch,
                    survivor,
                    event_id,
                    "customers_merged",
                    {"merged_customer_id": gone, "identifier_type": kind},
                )
            )
            target = survivor
        return target

    def _refuse(
        self,
        touch: Touch,
        target: str,
        other: str | None,
        key: tuple[str, str],
        derived: list[dict[str, Any]],
        now: str,
    ) -> None:
        kind = key[0]
        event_id = _derived_id("refused", target, other or "", kind, key[1])
        payload: dict[str, Any] = {"identifier_type": kind, "limit": self.limits[kind]}
        if other:
            payload["other_customer_id"] = other
        self._pending.add(
            "INSERT INTO collector_refusals (event_id, customer_id, other_customer, kind, digest,"
            " limit_value, at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            event_id,
            target,
            other,
            kind,
            key[1],
            self.limits[kind],
            now,
        )
        derived.append(
            self._system_event(touch, target, event_id, "identity_link_refused", payload)
        )

    @staticmethod
    def _system_event(
        touch: Touch, customer: str, event_id: str, type_: str, payload: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "event_id": event_id,
            "customer_id": customer,
            "channel": "system",
            "type": type_,
            "occurred_at": touch.event["occurred_at"],
            "source": touch.event["source"],
            "payload": payload,
            "schema_version": 1,
        }

    def take(self) -> _Pending:
        """The graph changes resolved since the last take (or commit), to write later."""
        pending, self._pending = self._pending, _Pending(base_seq=self._seq)
        return pending

    def fresh(self, pending: _Pending, connection: Any) -> bool:
        """Whether the graph in the tables is still what ``pending`` was resolved against.

        Called through the ledger's transaction (``connection``) while it holds the write
        lock, before the group's events are written: nothing can change the graph until
        it commits. Single-process mode trusts its cache (always True). Sets
        ``pending.shift`` so minted customers sort after every committed one.
        """
        if not self.shared:
            return True
        cur = connection.cursor()
        postgres = not isinstance(connection, sqlite3.Connection)

        def rows(sql: str, params: Sequence[Any]) -> list[Any]:
            cur.execute(sql.replace("?", "%s") if postgres else sql, tuple(params))
            return [tuple(r.values()) if isinstance(r, dict) else tuple(r) for r in cur.fetchall()]

        found = rows("SELECT value FROM collector_meta WHERE name = 'generation'", ())
        if (int(found[0][0]) if found else 0) != self._generation:
            return False
        by_kind: dict[str, list[str]] = {}
        for kind, digest in pending.keys:
            by_kind.setdefault(kind, []).append(digest)
        for kind, digests in by_kind.items():
            for start in range(0, len(digests), 400):
                chunk = digests[start : start + 400]
                owners = dict(
                    rows(
                        "SELECT digest, customer_id FROM collector_identifiers "
                        f"WHERE kind = ? AND digest IN ({','.join('?' * len(chunk))})",
                        [kind, *chunk],
                    )
                )
                for digest in chunk:
                    if owners.get(digest) != pending.keys[(kind, digest)]:
                        return False
        customers = list(pending.customers)
        counts: dict[str, dict[str, int]] = {}
        for start in range(0, len(customers), 400):
            chunk = customers[start : start + 400]
            for customer, kind, n in rows(
                "SELECT customer_id, kind, COUNT(*) FROM collector_identifiers "
                f"WHERE customer_id IN ({','.join('?' * len(chunk))}) GROUP BY customer_id, kind",
                chunk,
            ):
                counts.setdefault(customer, {})[kind] = int(n)
        for customer, expected in pending.customers.items():
            if counts.get(customer, {}) != expected:
                return False
        if pending.minted:
            top = int(rows("SELECT MAX(created_seq) FROM collector_customers", ())[0][0] or 0)
            pending.shift = max(0, top - pending.base_seq)
        return True

    def committed(self, pending: _Pending) -> None:
        """``pending`` is in the tables: give the cache the created_seq it was stored with."""
        if pending.shift:
            for customer in pending.minted:
                if customer in self._created:
                    self._created[customer] += pending.shift
            self._seq += pending.shift

    def commit(self, pending: _Pending | None = None) -> None:
        """Write ``pending`` (by default everything resolved so far) in a transaction of
        the collector's own connection (when the sink has no transaction to join)."""
        if pending is None:
            pending = self.take()
        if not pending.sql:
            return
        with self.db.transaction():
            _apply(pending, self.db.execute, self.db.executemany)

    def writer(self, pending: _Pending) -> Callable[[Any], None]:
        """Writes ``pending`` through another transaction's DB-API connection: the ledger's
        append, so the graph changes commit with their events or not at all. Re-runnable
        (a busy database makes the append retry in a fresh transaction)."""

        generation = self._generation

        def write(connection: Any) -> None:
            cur = connection.cursor()
            postgres = not isinstance(connection, sqlite3.Connection)
            # A forget committed since this group was resolved (another process) means it
            # may name the forgotten person: refuse, so the group is resolved again. On
            # SQLite the append holds the write lock; on PostgreSQL the row lock orders this
            # transaction and forget's (which bumps the generation first).
            cur.execute(
                "SELECT value FROM collector_meta WHERE name = 'generation'"
                + (" FOR UPDATE" if postgres else "")
            )
            row = cur.fetchone()
            value = 0 if row is None else int(row["value"] if isinstance(row, dict) else row[0])
            if value != generation:
                raise StaleGraph(
                    "a customer was forgotten while these requests were resolved; "
                    "resolving them again"
                )

            def execute(sql: str, params: Sequence[Any] = ()) -> None:
                cur.execute(sql.replace("?", "%s") if postgres else sql, tuple(params))

            def executemany(sql: str, rows: Sequence[Sequence[Any]]) -> None:
                shift = pending.shift  # set by fresh() under the same lock
                if shift and sql.startswith(_INSERT_CUSTOMER):
                    rows = [(c, seq + shift, at) for c, seq, at in rows]
                cur.executemany(sql.replace("?", "%s") if postgres else sql, rows)

            _apply(pending, execute, executemany)

        return write

    def rollback(self) -> None:
        self._reset()


def _apply(
    pending: _Pending,
    execute: Callable[[str, Sequence[Any]], Any],
    executemany: Callable[[str, Sequence[Sequence[Any]]], Any],
) -> None:
    # Inserts commute with each other, so each kind goes as one executemany (a batch of
    # new visitors is two calls); an update (a merge) must see every insert before it.
    buckets: dict[str, list[tuple[Any, ...]]] = {}
    for sql, params in pending.sql:
        if sql.startswith("INSERT"):
            buckets.setdefault(sql, []).append(params)
            continue
        for insert, rows in buckets.items():
            executemany(insert, rows)
        buckets.clear()
        execute(sql, params)
    for insert, rows in buckets.items():
        executemany(insert, rows)


# --------------------------------------------------------------------------- reading


@dataclass
class IdentityReport:
    """What ``ledger identities`` shows about one customer."""

    customer_id: str
    merged_into: str | None
    identifiers: list[tuple[str, str, str]]  # kind, digest, first seen
    merged: list[tuple[str, str, str]]  # from customer, identifier kind, at
    refusals: list[tuple[str, str | None, int, str]]  # kind, other customer, limit, at
    known: bool
    #: Every customer merged into this one, directly or through an earlier merge.
    absorbed: list[str] = field(default_factory=list)
    forgotten_at: str | None = None


def report(db: CollectorDB, customer_id: str) -> IdentityReport:
    db.create(TABLES)
    row = db.query(
        "SELECT merged_into, forgotten_at FROM collector_customers WHERE customer_id = ?",
        [customer_id],
    )
    identifiers = db.query(
        "SELECT kind, digest, first_seen FROM collector_identifiers WHERE customer_id = ? "
        "ORDER BY first_seen, kind, digest",
        [customer_id],
    )
    merged = db.query(
        "SELECT from_customer, kind, at FROM collector_merges WHERE into_customer = ? "
        "ORDER BY at, from_customer",
        [customer_id],
    )
    refusals = db.query(
        "SELECT kind, other_customer, limit_value, at FROM collector_refusals "
        "WHERE customer_id = ? ORDER BY at, kind",
        [customer_id],
    )
    absorbed = db.query(
        "SELECT customer_id FROM collector_customers WHERE merged_into = ? ORDER BY created_seq",
        [customer_id],
    )
    return IdentityReport(
        forgotten_at=row[0][1] if row else None,
        absorbed=[r[0] for r in absorbed],
        customer_id=customer_id,
        merged_into=row[0][0] if row else None,
        identifiers=[(r[0], r[1], r[2]) for r in identifiers],
        merged=[(r[0], r[1], r[2]) for r in merged],
        refusals=[(r[0], r[1], int(r[2]), r[3]) for r in refusals],
        known=bool(row),
    )
