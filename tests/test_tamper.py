"""Immutable and tamper-evident: the database refuses changes; changes made behind its back
(a byte flipped in the file, triggers disabled, a row deleted, a chain re-hashed) are found by
``verify()``, which names the customer, sequence and position of the first altered event."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import psycopg
import pytest

from ledger.chain import seal
from ledger.ledger import Anchor, Ledger, Tampering
from ledger.settings import Settings

MakeEvent = Callable[..., dict[str, Any]]


class RawDB:
    """Plain SQL on the ledger's database, bypassing the ledger (as an operator or attacker)."""

    def __init__(self, settings: Settings):
        self.postgres = bool(settings.store_url)
        self.conn: Any = (
            psycopg.connect(settings.store_url, autocommit=True)
            if self.postgres
            else sqlite3.connect(settings.sqlite_path, isolation_level=None)
        )
        self.position = "notification_id" if self.postgres else "rowid"

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.postgres:
            sql = sql.replace("?", "%s")
        cur = self.conn.execute(sql, params)
        return list(cur.fetchall()) if cur.description else []

    def disable_guards(self) -> None:
        """What an attacker with database access does first."""
        if self.postgres:
            for table in ("stored_events", "ledger_event_ids"):
                self.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
        else:
            names = self.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
            assert len(names) == 4
            for (name,) in names:
                self.execute(f"DROP TRIGGER {name}")

    def state(self, position: int) -> bytes:
        [(state,)] = self.execute(
            f"SELECT state FROM stored_events WHERE {self.position} = ?", (position,)
        )
        return bytes(state)

    def set_state(self, position: int, state: bytes) -> None:
        self.execute(
            f"UPDATE stored_events SET state = ? WHERE {self.position} = ?", (state, position)
        )

    def close(self) -> None:
        self.conn.close()


@contextmanager
def raw_db(settings: Settings) -> Iterator[RawDB]:
    db = RawDB(settings)
    try:
        yield db
    finally:
        db.close()


def fill(settings: Settings, make_event: MakeEvent) -> list[dict[str, Any]]:
    """Three customers, interleaved: cus_b's events sit at positions 2, 5, 8, 11."""
    events = [
        make_event(
            ("cus_a", "cus_b", "cus_c")[i % 3],
            "order_placed",
            payload={"order_id": f"order-{i:04d}", "total": {"amount": "9.50", "currency": "EUR"}},
            source=f"shop-{i:04d}",
        )
        for i in range(12)
    ]
    with Ledger.open(settings) as ledger:
        assert ledger.append(events).accepted == 12
        assert ledger.verify().ok
    return events


def verify(settings: Settings) -> list[Tampering]:
    with Ledger.open(settings) as ledger:
        report = ledger.verify()
    assert not report.ok
    assert report.first is not None and report.first == report.problems[0]
    return report.problems


# --------------------------------------------------------------------------- immutable


def test_database_refuses_update_delete_and_truncate(
    settings: Settings, make_event: MakeEvent
) -> None:
    fill(settings, make_event)
    error = psycopg.Error if settings.store_url else sqlite3.DatabaseError
    statements = [
        "UPDATE stored_events SET state = state WHERE {pos} = 1",
        "UPDATE stored_events SET originator_version = 99",
        "DELETE FROM stored_events WHERE {pos} = 12",
        "DELETE FROM stored_events",
        "UPDATE ledger_event_ids SET position = 99",
        "DELETE FROM ledger_event_ids",
    ]
    if settings.store_url:
        statements += ["TRUNCATE stored_events", "TRUNCATE ledger_event_ids"]
    with raw_db(settings) as db:
        before = db.execute("SELECT COUNT(*) FROM stored_events")
        for statement in statements:
            with pytest.raises(error) as refused:
                db.execute(statement.format(pos=db.position))
            message = str(refused.value)
            table = "stored_events" if "stored_events" in statement else "ledger_event_ids"
            assert "append-only" in message and table in message, (statement, message)
        assert db.execute("SELECT COUNT(*) FROM stored_events") == before
        assert db.execute("SELECT COUNT(*) FROM ledger_event_ids") == before
    with Ledger.open(settings) as ledger:
        report = ledger.verify()
        assert (report.ok, report.events) == (True, 12)


# --------------------------------------------------------------------------- tamper-evident


def test_sqlite_byte_flipped_in_the_file_on_disk_is_located(
    sqlite_settings: Settings, make_event: MakeEvent
) -> None:
    fill(sqlite_settings, make_event)  # closed: the WAL is folded into the main file
    path = sqlite_settings.sqlite_path
    for suffix in ("-wal", "-shm"):
        wal = path.with_name(path.name + suffix)
        assert not wal.exists() or wal.stat().st_size == 0 or suffix == "-shm"
    data = bytearray(path.read_bytes())
    # order-0007 is cus_b's third event (sequence 3), at position 8.
    assert data.count(b"order-0007") == 1
    at = data.index(b"order-0007") + len("order-000")
    data[at] = ord("8")
    path.write_bytes(bytes(data))
    problems = verify(sqlite_settings)
    assert [(p.customer_id, p.sequence, p.position) for p in problems] == [("cus_b", 3, 8)]
    assert "altered" in problems[0].reason


def test_postgres_state_byte_changed_behind_disabled_triggers_is_located(
    pg_url: str, tmp_path: Any, make_event: MakeEvent
) -> None:
    settings = Settings(home=tmp_path / "home", store_url=pg_url, master_key="a" * 64)
    fill(settings, make_event)
    with raw_db(settings) as db:
        db.disable_guards()
        state = db.state(8)
        assert state.count(b"shop-0007") == 1
        db.set_state(8, state.replace(b"shop-0007", b"shop-0008"))
    problems = verify(settings)
    assert [(p.customer_id, p.sequence, p.position) for p in problems] == [("cus_b", 3, 8)]
    assert "altered" in problems[0].reason


def test_deleted_event_is_found_as_a_gap_and_a_broken_chain(
    settings: Settings, make_event: MakeEvent
) -> None:
    fill(settings, make_event)
    with raw_db(settings) as db:
        db.disable_guards()
        db.execute(f"DELETE FROM stored_events WHERE {db.position} = 5")  # cus_b, sequence 2
        # A second, independent alteration right behind the gap: it must not be masked.
        state = db.state(9)  # cus_c, sequence 3
        db.set_state(9, state.replace(b"shop-0008", b"shop-9999"))
    problems = verify(settings)
    gap = problems[0]
    assert gap.position == 6 and "positions 5..5 are missing" in gap.reason
    found = {(p.customer_id, p.sequence, p.position) for p in problems[1:]}
    assert found == {("cus_b", 3, 8), ("cus_c", 3, 9)}
    assert all(p.customer_id != "cus_a" for p in problems)


def test_deleted_last_event_is_found_by_the_stream_head(
    settings: Settings, make_event: MakeEvent
) -> None:
    fill(settings, make_event)
    with raw_db(settings) as db:
        db.disable_guards()
        db.execute(f"DELETE FROM stored_events WHERE {db.position} = 12")  # cus_c, sequence 4
    [problem] = verify(settings)
    assert (problem.customer_id, problem.sequence) == ("cus_c", 4)
    assert "head" in problem.reason and "missing" in problem.reason


def test_rewritten_event_with_recomputed_hash_is_caught_at_the_next_event(
    settings: Settings, make_event: MakeEvent
) -> None:
    fill(settings, make_event)
    with raw_db(settings) as db:
        db.disable_guards()
        # The attacker re-seals cus_a's second event (position 4) so it verifies on its own.
        sealed = orjson.loads(db.state(4))
        body = sealed["event"]
        body["payload"]["total"]["amount"] = "0.01"
        state, _ = seal(orjson.dumps(body, option=orjson.OPT_SORT_KEYS), body["prev_hash"])
        db.set_state(4, state)
    problems = verify(settings)
    assert [(p.customer_id, p.sequence, p.position) for p in problems] == [("cus_a", 3, 7)]
    assert "prev_hash" in problems[0].reason and "rewritten" in problems[0].reason


def test_rewritten_last_event_is_caught_by_the_stream_head(
    sqlite_settings: Settings, make_event: MakeEvent
) -> None:
    fill(sqlite_settings, make_event)
    with raw_db(sqlite_settings) as db:
        db.disable_guards()
        body = orjson.loads(db.state(10))["event"]  # cus_a's last event, sequence 4
        body["source"] = "forged"
        state, _ = seal(orjson.dumps(body, option=orjson.OPT_SORT_KEYS), body["prev_hash"])
        db.set_state(10, state)
    [problem] = verify(sqlite_settings)
    assert problem.customer_id == "cus_a" and "head" in problem.reason


def test_event_moved_to_another_customer_is_detected(
    sqlite_settings: Settings, make_event: MakeEvent
) -> None:
    fill(sqlite_settings, make_event)
    with raw_db(sqlite_settings) as db:
        db.disable_guards()
        # Re-attributing an order to another customer without touching the sealed bytes.
        db.execute("UPDATE stored_events SET originator_id = 'cus_d' WHERE rowid = 11")
    problems = verify(sqlite_settings)
    assert (problems[0].customer_id, problems[0].position) == ("cus_d", 11)
    assert {p.customer_id for p in problems} == {"cus_b", "cus_d"}  # cus_b lost its head


# --------------------------------------------------------------------------- anchors


def rewrite_tail_and_head(settings: Settings, position: int) -> None:
    """The attack hash chains alone cannot see: re-seal a chain's last event and move the
    stream head along with it, so every link and the head agree again."""
    with raw_db(settings) as db:
        db.disable_guards()
        body = orjson.loads(db.state(position))["event"]
        body["payload"]["total"]["amount"] = "0.01"
        state, digest = seal(orjson.dumps(body, option=orjson.OPT_SORT_KEYS), body["prev_hash"])
        db.set_state(position, state)
        db.execute(
            "UPDATE ledger_streams SET head_hash = ? WHERE customer_id = ?",
            (digest, body["customer_id"]),
        )


def test_anchor_catches_a_rewrite_the_chains_alone_cannot(
    settings: Settings, make_event: MakeEvent
) -> None:
    fill(settings, make_event)
    with Ledger.open(settings) as ledger:
        report = ledger.verify()
        assert report.ok and report.anchor is not None and report.anchor.position == 12
        anchor = report.anchor
        # Later appends do not disturb an anchor: it commits to the log up to its position.
        ledger.append([make_event("cus_a", "page_viewed")])
        later = ledger.verify(anchors=[anchor])
        assert later.ok and later.anchor is not None and later.anchor.position == 13
    rewrite_tail_and_head(settings, 11)  # cus_b's last order: the chain re-sealed, head moved
    with Ledger.open(settings) as ledger:
        plain = ledger.verify()
        assert plain.ok  # the limit of chains alone, which the anchor exists for
        anchored = ledger.verify(anchors=[anchor])
    assert not anchored.ok and anchored.problems == []
    [(broken, reason)] = anchored.broken_anchors
    assert broken == anchor and "does not replay" in reason


def test_anchor_beyond_the_end_of_the_ledger_means_removed_events(
    sqlite_settings: Settings, make_event: MakeEvent
) -> None:
    fill(sqlite_settings, make_event)
    with Ledger.open(sqlite_settings) as ledger:
        anchor = ledger.verify().anchor
        assert anchor is not None
        far = Anchor(anchor.position + 5, anchor.digest)
        report = ledger.verify(anchors=[far])
    [(_, reason)] = report.broken_anchors
    assert "ends at position 12" in reason and "removed" in reason


def test_anchor_text_round_trips_and_bad_text_is_a_sentence() -> None:
    anchor = Anchor(42, "ab" * 32)
    assert Anchor.parse(str(anchor)) == anchor
    for bad in ("42", "x:" + "ab" * 32, "42:abc", "0:" + "ab" * 32, "42:" + "zz" * 32):
        with pytest.raises(ValueError, match="expected POSITION:DIGEST"):
            Anchor.parse(bad)
