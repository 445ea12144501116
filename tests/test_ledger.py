"""The ledger on both stores: exactly-once appends, order, reads, replay in time, master key."""

from __future__ import annotations

import datetime as dt
import os
import stat
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from eventsourcing.persistence import Tracking

from ledger.ledger import Ledger, LedgerError, StaleTracking
from ledger.settings import Settings

MakeEvent = Callable[..., dict[str, Any]]
OTHER_KEY = "b" * 64


def assert_ordered(ledger: Ledger, expected_events: int) -> None:
    """Positions 1..N without gaps; each customer's sequences 1..k in position order."""
    events = list(ledger.follow(0, page=7))
    assert [e.position for e in events] == list(range(1, expected_events + 1))
    assert ledger.position == expected_events
    per_customer: dict[str, list[int]] = {}
    for e in events:
        per_customer.setdefault(e.customer_id, []).append(e.sequence)
    for customer, sequences in per_customer.items():
        assert sequences == list(range(1, len(sequences) + 1)), customer


def test_one_batch_counts_accepted_duplicates_and_rejected(
    ledger: Ledger, make_event: MakeEvent
) -> None:
    a, b = make_event("cus_a", "page_viewed"), make_event("cus_b", "order_placed")
    bad = make_event("cus_c", "email_opened", channel="chat")
    result = ledger.append([a, b, a, bad, orjson.dumps(a), "{oops"])
    assert (result.accepted, result.duplicates) == (2, 2)
    assert [r.index for r in result.rejected] == [3, 5]
    assert result.rejected[0].event_id == bad["event_id"]
    assert result.rejected[0].problems[0].startswith("channel:")
    assert result.rejected[1].raw == b"{oops"
    assert (result.first_position, result.last_position) == (1, 2)
    assert ledger.verify().ok
    assert_ordered(ledger, 2)


def test_same_event_id_is_stored_once_across_batches_and_reopened_ledgers(
    settings: Settings, make_event: MakeEvent
) -> None:
    first = [make_event(f"cus_{i % 3}", "page_viewed") for i in range(6)]
    with Ledger.open(settings) as ledger:
        assert ledger.append(first).accepted == 6
        again = ledger.append([*first[:3], make_event("cus_0", "email_sent")])
        assert (again.accepted, again.duplicates) == (1, 3)
        assert (again.first_position, again.last_position) == (7, 7)
    # A restart: the idempotency index lives in the database, not in memory.
    with Ledger.open(settings) as ledger:
        replay = ledger.append([*first, first[0]])
        assert (replay.accepted, replay.duplicates, replay.rejected) == (0, 7, [])
        assert replay.first_position is None
        # A redelivery with altered content is still the same event: the first one wins.
        changed = dict(first[1], source="other-adapter")
        assert ledger.append([changed]).duplicates == 1
        assert ledger.stats().events == 7
        assert {e.source for e in ledger.read()} == {"test-adapter"}
        assert_ordered(ledger, 7)
        assert ledger.verify().ok


def test_positions_and_sequences_over_interleaved_batches(
    ledger: Ledger, make_event: MakeEvent
) -> None:
    customers = ["cus_x", "cus_y", "cus_z"]
    total = 0
    for batch in range(4):
        events = [make_event(customers[(batch + i) % 3], "chat_message") for i in range(5 + batch)]
        result = ledger.append(events)
        assert result.first_position == total + 1
        total += len(events)
        assert result.last_position == total
    assert_ordered(ledger, total)
    stats = ledger.stats()
    assert (stats.events, stats.customers, stats.last_position) == (total, 3, total)
    assert stats.by_channel == {"chat": total}
    # Paging is exact: no event twice, none skipped.
    assert [e.position for e in ledger.read(after=10, limit=4)] == [11, 12, 13, 14]
    assert ledger.read(after=total) == []
    report = ledger.verify()
    assert (report.ok, report.events, report.customers) == (True, total, 3)


def test_stored_form_is_canonical_and_personal_data_sealed(
    ledger: Ledger, make_event: MakeEvent
) -> None:
    event = make_event(
        "cus_s",
        "chat_message",
        occurred_at="2026-03-01T13:00:00+01:00",
        identifiers={"email": "sealed@example.com", "phone": "+4915112345678"},
    )
    ledger.append([event])
    [row] = ledger.read_raw()
    assert row.state.startswith(b'{"event":{') and row.state.endswith(b'"}')
    body = orjson.loads(row.state)["event"]
    assert set(body) == {
        "event_id", "customer_id", "channel", "type", "occurred_at", "source",
        "schema_version", "payload", "position", "sequence", "recorded_at", "prev_hash",
        "personal", "identifier_fields",
    }  # fmt: skip
    # The names of the sealed identifiers stay readable (projections decrypt lazily by them).
    assert body["identifier_fields"] == ["email", "phone"]
    assert body["occurred_at"] == "2026-03-01T12:00:00Z"
    assert body["payload"] == {"conversation_id": "conv-1", "direction": "inbound"}
    assert b"sealed@example.com" not in row.state and b"hello" not in row.state
    [sealed] = ledger.read()
    assert sealed.sealed_personal and sealed.identifiers is None
    assert "text" not in sealed.payload
    [opened] = ledger.read(decrypt=True)
    assert opened.identifiers == {"email": "sealed@example.com", "phone": "+4915112345678"}
    assert opened.payload["text"] == "hello"
    assert not opened.sealed_personal and not opened.erased
    # Free text without identifiers says so ([]); an event with nothing personal has neither.
    ledger.append([make_event("cus_t", "chat_message"), make_event("cus_t", "email_opened")])
    chat, opened_mail = (orjson.loads(r.state)["event"] for r in ledger.read_raw(1))
    assert chat["identifier_fields"] == [] and "personal" in chat
    assert "identifier_fields" not in opened_mail and "personal" not in opened_mail


def test_late_and_out_of_order_events_land_in_event_time_order(
    ledger: Ledger, make_event: MakeEvent
) -> None:
    c = "cus_timeline"

    def at(day: int, hour: int = 12) -> str:
        return f"2026-03-{day:02d}T{hour:02d}:00:00Z"

    # Arrival order differs from event time, within a batch and across batches.
    ledger.append(
        [
            make_event(c, "order_placed", occurred_at=at(10), event_id=_uuid(1)),
            make_event(c, "page_viewed", occurred_at=at(5), event_id=_uuid(2)),
            make_event(c, "email_opened", occurred_at=at(20), event_id=_uuid(3)),
        ]
    )
    time.sleep(0.01)
    between = dt.datetime.now(dt.UTC)
    time.sleep(0.01)
    late = ledger.append(
        [
            make_event(c, "email_sent", occurred_at=at(1), event_id=_uuid(4)),
            make_event(c, "ticket_opened", occurred_at=at(15), event_id=_uuid(5)),
        ]
    )
    assert late.accepted == 2
    history = ledger.history(c)
    assert [e.event_id for e in history] == [_uuid(n) for n in (4, 2, 1, 5, 3)]
    assert [e.occurred_at.day for e in history] == [1, 5, 10, 15, 20]
    # Sequences and positions record arrival, which history keeps visible.
    assert [e.sequence for e in history] == [4, 2, 1, 5, 3]
    assert [e.position for e in history] == [4, 2, 1, 5, 3]

    as_of = ledger.history(c, as_of=dt.datetime(2026, 3, 10, 12, tzinfo=dt.UTC))
    assert [e.event_id for e in as_of] == [_uuid(n) for n in (4, 2, 1)]  # bound inclusive
    known = ledger.history(c, known_at=between)
    assert [e.event_id for e in known] == [_uuid(n) for n in (2, 1, 3)]
    both = ledger.history(c, as_of=dt.datetime(2026, 3, 16, tzinfo=dt.UTC), known_at=between)
    assert [e.event_id for e in both] == [_uuid(2), _uuid(1)]
    assert ledger.history(c, as_of=dt.datetime(2026, 2, 1, tzinfo=dt.UTC)) == []
    assert ledger.history("cus_nobody") == []
    # Same instant: arrival (sequence) breaks the tie, so replays are deterministic.
    ledger.append([make_event(c, "page_viewed", occurred_at=at(10), event_id=_uuid(6))])
    again = [e.event_id for e in ledger.history(c)]
    assert again == [_uuid(n) for n in (4, 2, 1, 6, 5, 3)]
    assert again == [e.event_id for e in ledger.history(c)]


def _uuid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def test_tracking_commits_with_the_events_or_not_at_all(
    ledger: Ledger, make_event: MakeEvent
) -> None:
    assert ledger.store.tracking_position("touchpoints-0") is None
    ledger.append([make_event("cus_t")], tracking=[Tracking("touchpoints-0", 5)])
    assert ledger.store.tracking_position("touchpoints-0") == 5
    # A redelivered offset (a restarted worker) is refused, and its events are not stored.
    with pytest.raises(StaleTracking):
        ledger.append([make_event("cus_t")], tracking=[Tracking("touchpoints-0", 5)])
    assert ledger.position == 1
    ledger.append([make_event("cus_t")], tracking=[Tracking("touchpoints-0", 9)])
    assert (ledger.position, ledger.store.tracking_position("touchpoints-0")) == (2, 9)
    assert_ordered(ledger, 2)


def test_key_file_is_created_0600_and_reused(tmp_path: Any, make_event: MakeEvent) -> None:
    # Explicit Nones: a LEDGER_MASTER_KEY or LEDGER_STORE_URL in the environment must not count.
    settings = Settings(home=tmp_path / "home", master_key=None, store_url=None)
    assert not settings.key_file.exists()
    event = make_event("cus_k", "chat_message", identifiers={"name": "Kim"})
    with Ledger.open(settings) as ledger:
        ledger.append([event])
    mode = stat.S_IMODE(os.stat(settings.key_file).st_mode)
    assert mode == 0o600, oct(mode)
    key = settings.key_file.read_bytes()
    with Ledger.open(settings) as ledger:
        [stored] = ledger.history("cus_k")
        assert stored.identifiers == {"name": "Kim"}
    assert settings.key_file.read_bytes() == key


def test_wrong_master_key_is_a_clear_ledger_error(
    settings: Settings, make_event: MakeEvent
) -> None:
    with Ledger.open(settings) as ledger:
        ledger.append([make_event("cus_w", "chat_message")])
    wrong = settings.model_copy(update={"master_key": OTHER_KEY})
    with Ledger.open(wrong) as ledger:
        with pytest.raises(LedgerError, match="master key"):
            ledger.history("cus_w")
        with pytest.raises(LedgerError, match="master key"):
            ledger.append([make_event("cus_w", "chat_message")])
        assert ledger.position == 1  # the refused append stored nothing
        # A customer the ledger has never seen must not get a data key wrapped by the wrong
        # master key either: the right key could never read that customer again.
        with pytest.raises(LedgerError, match="master key"):
            ledger.append([make_event("cus_new", "chat_message")])
        assert ledger.position == 1
    with Ledger.open(settings) as ledger:
        assert ledger.append([make_event("cus_new", "chat_message")]).accepted == 1
        assert ledger.history("cus_new")[0].payload["text"] == "hello"
    malformed = settings.model_copy(update={"master_key": "too-short"})
    with pytest.raises(LedgerError, match="LEDGER_MASTER_KEY"):
        Ledger.open(malformed)


def test_stats_count_types_and_channels(ledger: Ledger, make_event: MakeEvent) -> None:
    kinds = ["page_viewed", "page_viewed", "order_placed", "chat_message", "consent_changed"]
    ledger.append([make_event(f"cus_{i}", t) for i, t in enumerate(kinds)])
    stats = ledger.stats()
    assert stats.by_type == dict(sorted(Counter(kinds).items()))
    assert stats.by_channel == {"chat": 1, "commerce": 1, "system": 1, "web": 2}
    assert (stats.events, stats.customers, stats.first_position) == (5, 5, 1)
    assert stats.sizes and all(size > 0 for size in stats.sizes.values() if size)


def test_tracking_advances_on_batches_with_nothing_new(
    ledger: Ledger, make_event: MakeEvent
) -> None:
    """A consumer's offsets must move past a batch that was all duplicates or all invalid,
    or a restarted worker would re-read it forever."""
    event = make_event("cus_t")
    ledger.append([event], tracking=[Tracking("touchpoints-1", 1)])
    dup = ledger.append([event], tracking=[Tracking("touchpoints-1", 2)])
    assert (dup.accepted, dup.duplicates) == (0, 1)
    bad = ledger.append(["{oops"], tracking=[Tracking("touchpoints-1", 3)])
    assert (bad.accepted, len(bad.rejected)) == (0, 1)
    ledger.append([], tracking=[Tracking("touchpoints-1", 4), Tracking("touchpoints-2", 7)])
    assert ledger.store.tracking_position("touchpoints-1") == 4
    assert ledger.store.tracking_position("touchpoints-2") == 7
    assert ledger.position == 1


def test_strictness_comes_from_settings_and_can_be_overridden_per_batch(
    sqlite_settings: Settings, make_event: MakeEvent
) -> None:
    strict = sqlite_settings.model_copy(update={"strict": True})
    with Ledger.open(strict) as ledger:
        refused = ledger.append([make_event("cus_1", utm_source="newsletter")])
        assert refused.accepted == 0
        assert refused.rejected[0].problems[0].startswith("utm_source: unknown field")
        lax = ledger.append([make_event("cus_1", utm_source="newsletter")], strict=False)
        assert lax.accepted == 1
        assert ledger.history("cus_1")[0].extra == {"utm_source": "newsletter"}
    empty = Ledger.open(sqlite_settings.model_copy(update={"home": sqlite_settings.home / "e"}))
    with empty:
        report = empty.verify()
        assert (report.ok, report.events, report.customers, empty.position) == (True, 0, 0, 0)


def test_sqlite_wal_is_checkpointed_in_the_background(
    sqlite_settings: Settings, make_event: MakeEvent
) -> None:
    """A small append never reaches the writer's own checkpoint threshold (64 MB of WAL),
    yet its pages reach the database file: the store's checkpointer thread copied them."""
    with Ledger.open(sqlite_settings) as ledger:
        db = sqlite_settings.home / "ledger.db"
        before = db.stat().st_size
        ledger.append([make_event(f"cus_{n % 50}", "page_viewed") for n in range(2_000)])
        wal = db.with_name("ledger.db-wal").stat().st_size
        assert wal > 500_000 > before  # the batch went to the WAL, not the file
        deadline = time.monotonic() + 20
        while db.stat().st_size < 500_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert db.stat().st_size >= 500_000
        assert ledger.verify().ok


def test_keyring_unwrap_is_uncached_and_refuses_a_wrong_master_key() -> None:
    from ledger.keyring import KeyError_, Keyring

    ring = Keyring(bytes(32))
    wrapped, cipher = ring.new_wrapped_key("cus_k")
    ring.drop("cus_k")
    fresh = ring.unwrap("cus_k", wrapped)
    nonce = bytes(12)
    assert fresh.decrypt(nonce, cipher.encrypt(nonce, b"secret", b"ad"), b"ad") == b"secret"
    assert ring.cached("cus_k") is None  # bulk readers use each key once: no LRU entry
    with pytest.raises(KeyError_, match="master key"):
        Keyring(bytes([1]) * 32).unwrap("cus_k", wrapped)
    with pytest.raises(KeyError_):
        ring.unwrap("cus_other", wrapped)  # a wrapped key is bound to its customer


def test_append_commits_what_also_writes_with_the_events_or_neither(
    settings: Settings, make_event: MakeEvent
) -> None:
    """The collector's identity graph rides in the append's transaction: both or nothing."""
    marker = "%s" if settings.store_url else "?"

    def side_rows(ledger: Ledger) -> list[str]:
        with ledger.store.write() as session:
            cur = session.connection.cursor()
            cur.execute("SELECT note FROM side_notes ORDER BY note")
            # eventsourcing's PostgreSQL connections return dict rows.
            return [r["note"] if isinstance(r, dict) else r[0] for r in cur.fetchall()]

    with Ledger.open(settings) as ledger:
        with ledger.store.write() as session:
            session.connection.cursor().execute("CREATE TABLE side_notes (note TEXT)")

        def note(text: str) -> Callable[[Any], None]:
            def write(connection: Any) -> None:
                connection.cursor().execute(f"INSERT INTO side_notes VALUES ({marker})", (text,))

            return write

        def fail(connection: Any) -> None:
            note("never")(connection)
            raise RuntimeError("the graph step failed")

        first = make_event("cus_g", "page_viewed")
        assert ledger.append_valid(ledger.validate([first])[0], also=note("one")).accepted == 1
        with pytest.raises(RuntimeError, match="graph step"):
            ledger.append_valid(ledger.validate([make_event("cus_g", "page_viewed")])[0], also=fail)
        assert ledger.position == 1 and side_rows(ledger) == ["one"]
        # A batch of repeats still runs `also` (a retried request may carry new links).
        again = ledger.append_valid(ledger.validate([first])[0], also=note("two"))
        assert (again.accepted, again.duplicates) == (0, 1)
        assert side_rows(ledger) == ["one", "two"]


def test_ingest_tunes_the_garbage_collector_only_while_it_runs(
    sqlite_settings: Settings, make_event: MakeEvent, tmp_path: Any
) -> None:
    import gc
    import io

    from ledger.deadletter import DeadLetters
    from ledger.ingest import GC_THRESHOLDS, ingest_stream

    lines = b"\n".join(orjson.dumps(make_event(f"cus_{n}", "page_viewed")) for n in range(30))
    seen: list[tuple[int, int, int]] = []
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    with Ledger.open(sqlite_settings) as ledger, DeadLetters(tmp_path / "dead") as dead:
        report = ingest_stream(
            ledger,
            io.BytesIO(lines),
            source="mem",
            fmt="jsonl",
            dead_letters=dead,
            batch_size=10,
            on_batch=lambda _: seen.append(gc.get_threshold()),
        )
    assert report.accepted == 30 and seen and set(seen) == {GC_THRESHOLDS}
    assert gc.get_threshold() == before and gc.get_freeze_count() == frozen
