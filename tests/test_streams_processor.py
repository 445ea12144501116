"""The ingest worker's batch logic on real ledgers: offsets stored with events, replays skipped."""

from __future__ import annotations

import orjson
import pytest
from kafka import KafkaProducer
from streams.ingest import BrokerProbe, IngestProcessor, Message, tracking_name

from broker import read_topic
from conftest import build_event
from ledger.ledger import Ledger
from ledger.settings import Settings
from ledger.topics import create_topics

TOPIC = "touchpoints"


def _messages(partition: int, start: int, values: list[bytes]) -> list[Message]:
    return [Message(TOPIC, partition, start + i, b"k", v) for i, v in enumerate(values)]


def _valid(n: int, customer: str = "cus_00001") -> list[bytes]:
    return [orjson.dumps(build_event(customer)) for _ in range(n)]


def test_batch_appends_events_and_offsets_together_and_dead_letters_invalid(
    settings: Settings,
) -> None:
    with Ledger.open(settings) as ledger:
        proc = IngestProcessor(ledger, TOPIC)
        values = _valid(3)
        values.insert(1, orjson.dumps(build_event(event_id="nope")))
        messages = _messages(0, 0, values) + _messages(1, 10, _valid(2, "cus_00002"))
        batch = proc.prepare(messages)
        assert len(batch.valid) == 5
        assert [d.message.offset for d in batch.dead] == [1]
        assert "event_id" in batch.dead[0].reason
        headers = dict(batch.dead[0].headers())
        assert headers["ledger_source_offset"] == b"1"
        assert headers["ledger_reason"].decode() == batch.dead[0].reason
        assert proc.commit(batch, messages) == (5, 0)
        assert ledger.store.tracking_position(tracking_name(TOPIC, 0)) == 3
        assert ledger.store.tracking_position(tracking_name(TOPIC, 1)) == 11
        assert ledger.position == 5
        assert proc.resume_offsets([0, 1, 2]) == {0: 4, 1: 12, 2: 0}


def test_redelivered_offsets_are_skipped_not_appended_again(settings: Settings) -> None:
    with Ledger.open(settings) as ledger:
        proc = IngestProcessor(ledger, TOPIC)
        first = _messages(0, 0, _valid(4))
        proc.commit(proc.prepare(first), first)
        # A restart re-reads offsets 2..3 plus two new ones.
        again = first[2:] + _messages(0, 4, _valid(2))
        restarted = IngestProcessor(ledger, TOPIC)
        batch = restarted.prepare(again)
        assert batch.skipped == 2
        assert restarted.commit(batch, again) == (2, 0)
        assert ledger.position == 6
        assert ledger.store.tracking_position(tracking_name(TOPIC, 0)) == 5


def test_a_worker_that_lost_the_race_refilters_and_appends_only_the_rest(
    settings: Settings,
) -> None:
    """Two workers hold the same partition across a rebalance: the slower one must neither
    fail on the stale offset nor store anything twice."""
    with Ledger.open(settings) as ledger:
        messages = _messages(0, 0, _valid(6))
        fast = IngestProcessor(ledger, TOPIC)
        slow = IngestProcessor(ledger, TOPIC)
        # Both read before the other worker committed offsets 0..2.
        behind = slow.prepare(messages[:2])
        ahead = slow.prepare(messages[:4])
        fast.commit(fast.prepare(messages[:3]), messages[:3])
        # Offset 1 is not past the stored 2: StaleTracking inside, re-read, nothing left to do.
        assert slow.commit(behind, messages[:2]) == (0, 0)
        # Offset 3 is past it: the three already stored are duplicates by event_id.
        assert slow.commit(ahead, messages[:4]) == (1, 3)
        assert ledger.position == 4
        assert ledger.store.tracking_position(tracking_name(TOPIC, 0)) == 3
        assert [e.event_id for e in ledger.read()] == [
            orjson.loads(m.value)["event_id"] for m in messages[:4]
        ]


def test_the_next_batch_is_validated_while_the_previous_one_is_still_being_appended(
    settings: Settings,
) -> None:
    """The worker prepares batch N+1 during N's append: N+1 continues after N's offsets
    (no false hole sent to the broker probe), and what N holds is not taken again."""
    probed: list[tuple[int, int]] = []

    def probe(partition: int, offset: int) -> int | None:
        probed.append((partition, offset))
        return offset

    with Ledger.open(settings) as ledger:
        proc = IngestProcessor(ledger, TOPIC, probe=probe)
        messages = _messages(0, 0, _valid(7))
        first = proc.prepare(messages[:4])
        second = proc.prepare(messages[2:], after=first.last_offsets)
        assert probed == [] and proc.take_seeks() == {}
        assert second.skipped == 2 and len(second.valid) == 3
        assert second.last_offsets == {0: 6}
        assert proc.commit(first, messages[:4]) == (4, 0)
        assert proc.commit(second, messages[2:]) == (3, 0)
        assert ledger.position == 7
        assert ledger.store.tracking_position(tracking_name(TOPIC, 0)) == 6
        assert [e.event_id for e in ledger.read()] == [
            orjson.loads(m.value or b"")["event_id"] for m in messages
        ]


def test_duplicate_event_ids_on_other_offsets_are_stored_once(settings: Settings) -> None:
    with Ledger.open(settings) as ledger:
        proc = IngestProcessor(ledger, TOPIC)
        values = _valid(3)
        messages = _messages(0, 0, [*values, values[0]]) + _messages(1, 0, [values[1]])
        assert proc.commit(proc.prepare(messages), messages) == (3, 2)
        assert ledger.position == 3


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_a_batch_of_only_invalid_messages_still_moves_the_offset(settings: Settings) -> None:
    with Ledger.open(settings) as ledger:
        proc = IngestProcessor(ledger, TOPIC)
        messages = _messages(2, 7, [b"\xff", b"[]"])
        batch = proc.prepare(messages)
        assert len(batch.dead) == 2 and not batch.valid
        assert proc.commit(batch, messages) == (0, 0)
        assert ledger.store.tracking_position(tracking_name(TOPIC, 2)) == 8
        assert ledger.position == 0


def _produce(settings: Settings, values: list[bytes], *, transactional: bool = False) -> None:
    producer = KafkaProducer(
        bootstrap_servers=settings.kafka,
        acks="all",
        transactional_id=f"tx-{settings.consumer_group}" if transactional else None,
    )
    try:
        if transactional:
            producer.init_transactions()
            producer.begin_transaction()
        for value in values:
            producer.send(settings.topic_touchpoints, value, b"k", partition=0)
        if transactional:
            producer.commit_transaction()
        producer.flush()
    finally:
        producer.close()


def _partition0(settings: Settings) -> list[Message]:
    records = read_topic(settings.kafka or "", settings.topic_touchpoints)
    return sorted(
        (
            Message(r.topic, r.partition, r.offset, r.key, r.value)
            for r in records
            if r.partition == 0
        ),
        key=lambda m: m.offset,
    )


@pytest.mark.kafka
@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_messages_the_consumer_skipped_are_read_again_before_the_offset_moves(
    settings: Settings, kafka_settings: Settings
) -> None:
    create_topics(kafka_settings)
    _produce(kafka_settings, _valid(10))
    messages = _partition0(kafka_settings)
    assert [m.offset for m in messages] == list(range(10))
    with Ledger.open(settings) as ledger:
        proc = IngestProcessor(
            ledger, kafka_settings.topic_touchpoints, probe=BrokerProbe(kafka_settings)
        )
        proc.commit(proc.prepare(messages[:3]), messages[:3])
        # 3 and 4 never arrived (a seek raced the fetcher): nothing past 2 may be recorded.
        gap = proc.prepare(messages[5:8])
        assert gap.empty and gap.skipped == 3
        assert proc.take_seeks() == {0: 3}
        stale = proc.prepare(messages[8:9])
        assert stale.empty and proc.take_seeks() == {}
        again = messages[3:]
        assert proc.commit(proc.prepare(again), again) == (7, 0)
        assert ledger.position == 10
        assert [e.event_id for e in ledger.read()] == [
            orjson.loads(m.value)["event_id"] for m in messages
        ]


@pytest.mark.kafka
@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_a_hole_the_broker_has_too_is_skipped(settings: Settings, kafka_settings: Settings) -> None:
    """A transaction's commit marker takes an offset no consumer ever sees."""
    create_topics(kafka_settings)
    _produce(kafka_settings, _valid(2), transactional=True)
    _produce(kafka_settings, _valid(3))
    messages = _partition0(kafka_settings)
    offsets = [m.offset for m in messages]
    assert len(offsets) == 5 and offsets[-1] > 4, f"no marker offset: {offsets}"
    with Ledger.open(settings) as ledger:
        proc = IngestProcessor(
            ledger, kafka_settings.topic_touchpoints, probe=BrokerProbe(kafka_settings)
        )
        proc.commit(proc.prepare(messages[:2]), messages[:2])
        rest = messages[2:]
        assert proc.commit(proc.prepare(rest), rest) == (3, 0)
        assert proc.take_seeks() == {}
        assert (
            ledger.store.tracking_position(tracking_name(kafka_settings.topic_touchpoints, 0))
            == offsets[-1]
        )
