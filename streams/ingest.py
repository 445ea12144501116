"""The ingest worker: touchpoints topic -> ledger, exactly-once in effect.

Run it with ``ledger worker ingest`` (or ``faust -A streams.ingest worker --without-web``
from the project directory). Several may run in one consumer group; Kafka spreads
the partitions over them.

It is a faust app (group membership, rebalances, the producer for dead letters), but
records do not go through a faust agent: the consumer hands each fetched batch of
aiokafka records to :class:`BatchIngester`, which validates the next batch while the
previous one is appended (see :meth:`LedgerSeekingConsumer._drain_messages`).

Why it cannot lose or double anything, even when killed at any instant:

* Each batch is appended in one ledger transaction together with a tracking row
  per partition, ``kafka:<topic>:<partition>`` = the last offset consumed. The
  offsets the ledger holds are the truth; Kafka's committed offsets are not
  consulted (records bypass faust's acking, which is what faust commits from).
* On start and on every partition assignment, and whenever faust would seek to
  Kafka's committed offsets, the consumer seeks instead to the offset after the
  one stored in the ledger (:class:`LedgerSeekingConsumer`).
* Messages at or below the stored offset (redelivered after a rebalance, or
  prefetched before a seek) are dropped before appending, and when another
  worker got there first the append raises ``StaleTracking``: the stored offsets
  are re-read and the batch filtered again. Appends are idempotent by event_id
  too, so a producer's duplicates are stored once.
* Invalid messages go to the dead-letter topic (original bytes as the value,
  the reasons in headers) *before* the transaction that moves the offset past
  them commits: a crash in between re-sends a dead letter, never drops one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import faust
import orjson
from eventsourcing.persistence import Tracking
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport
from faust.types import TP

from ledger.contract import ContractError, Event, parse_line
from ledger.ingest import GC_THRESHOLDS
from ledger.ledger import Ledger, StaleTracking
from ledger.settings import Settings

log = logging.getLogger("ledger.ingest")

#: Exit status when a batch could not be stored (the worker must be restarted).
EXIT_BATCH_FAILED = 70
#: Records per fetch from the consumer thread (batches are filled from several fetches).
MAX_POLL_RECORDS = 10_000
#: How long a fetch waits for records while a batch is being appended / when idle.
FETCH_WAIT_BUSY_S = 0.01
FETCH_WAIT_IDLE_S = 1.0


class Record(Protocol):
    """What the processor reads of a consumed record: :class:`Message`, or aiokafka's
    ``ConsumerRecord`` as fetched (the worker passes those through without copying)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class Message(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()


@dataclass(frozen=True)
class DeadLetter:
    message: Record
    problems: list[str]

    @property
    def reason(self) -> str:
        return "; ".join(self.problems)

    def headers(self) -> list[tuple[str, bytes]]:
        """The original headers plus where the message came from and why it was rejected."""
        now = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        return [
            *self.message.headers,
            ("ledger_reason", self.reason.encode()),
            ("ledger_problems", orjson.dumps(self.problems)),
            ("ledger_source_topic", self.message.topic.encode()),
            ("ledger_source_partition", str(self.message.partition).encode()),
            ("ledger_source_offset", str(self.message.offset).encode()),
            ("ledger_rejected_at", now.encode()),
        ]


@dataclass
class Batch:
    valid: list[Event] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    #: partition -> last offset in this batch (recorded with the events)
    last_offsets: dict[int, int] = field(default_factory=dict)
    skipped: int = 0

    @property
    def empty(self) -> bool:
        return not self.last_offsets


def tracking_name(topic: str, partition: int) -> str:
    return f"kafka:{topic}:{partition}"


#: ``probe(partition, offset)``: the first offset >= ``offset`` the broker holds (None: none).
Probe = Callable[[int, int], "int | None"]
#: While waiting for a partition to come back from a seek, how often to repeat the seek.
RESEEK_EVERY_S = 1.0


class IngestProcessor:
    """The broker-independent half of the worker: filter, validate, append with offsets.

    Each partition must continue exactly after the offset the ledger holds. A message past
    that point with a hole before it is checked with ``probe``: a hole the broker also has
    (transaction markers, compaction) is skipped; records the consumer failed to deliver
    (a seek racing its fetcher) make the partition wait, seek back and read them again,
    so an offset is never recorded past a message that was not appended.
    """

    def __init__(
        self, ledger: Ledger, topic: str, *, strict: bool = False, probe: Probe | None = None
    ) -> None:
        self.ledger = ledger
        self.topic = topic
        self.strict = strict
        self.probe = probe
        #: partition -> last offset the ledger holds (None: nothing yet), as last read/written.
        self.stored: dict[int, int | None] = {}
        #: partition -> the offset it must deliver next after a seek back; others are stale.
        self.resync: dict[int, int] = {}
        self._reseek_at: dict[int, float] = {}
        self.seeks: dict[int, int] = {}

    def refresh(self, partitions: Iterable[int]) -> dict[int, int | None]:
        """Re-read the stored offsets of ``partitions`` from the ledger."""
        for p in partitions:
            self.stored[p] = self.ledger.store.tracking_position(tracking_name(self.topic, p))
        return {p: self.stored[p] for p in partitions}

    def resume_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        """Where to start reading each partition: just past what the ledger holds."""
        stored = self.refresh(list(partitions))
        for p in stored:
            self.resync.pop(p, None)
        return {p: 0 if last is None else last + 1 for p, last in stored.items()}

    def prepare(self, messages: Iterable[Record], *, after: dict[int, int] | None = None) -> Batch:
        """Filter and validate a batch. ``after`` (partition -> offset) holds the last offsets
        of a batch still being appended: this one continues after them, not after what the
        ledger holds yet (the worker validates the next batch while the previous commits)."""
        batch = Batch()
        expected: dict[int, int | None] = {}
        blocked: set[int] = set()
        now = dt.datetime.now(dt.UTC)
        strict = self.strict
        for m in messages:
            p = m.partition
            if p not in expected:
                if p not in self.stored:
                    self.refresh([p])
                done = self.stored[p]
                if after is not None and p in after and (done is None or after[p] > done):
                    done = after[p]
                expected[p] = None if done is None else done + 1
            if p in blocked:
                batch.skipped += 1
                continue
            want = self.resync.get(p)
            if want is not None:
                if m.offset != want:
                    batch.skipped += 1
                    self._seek_again(p, want)
                    continue
                del self.resync[p]
            nxt = expected[p]
            if nxt is not None and m.offset < nxt:
                batch.skipped += 1
                continue
            if nxt is not None and m.offset > nxt and self.probe is not None:
                first = self.probe(p, nxt)
                if first is not None and first < m.offset:
                    log.warning(
                        "partition %d: offsets %d..%d were not delivered; seeking back",
                        p,
                        first,
                        m.offset - 1,
                    )
                    blocked.add(p)
                    self.resync[p] = first
                    self._seek_again(p, first)
                    batch.skipped += 1
                    continue
                if first is None:
                    # Liveness over certainty here: the broker holds offset m.offset, so a
                    # probe that finds nothing means it could not answer in time.
                    log.warning(
                        "partition %d: could not confirm the hole %d..%d on the broker; "
                        "taking it as real",
                        p,
                        nxt,
                        m.offset - 1,
                    )
            expected[p] = m.offset + 1
            if m.offset > batch.last_offsets.get(p, -1):
                batch.last_offsets[p] = m.offset
            try:
                batch.valid.append(parse_line(m.value or b"", strict=strict, now=now))
            except ContractError as exc:
                batch.dead.append(DeadLetter(m, exc.problems))
        return batch

    def _seek_again(self, partition: int, offset: int) -> None:
        # Stale messages fetched before the seek may still be queued and move the consumer's
        # read position on: repeat the seek now and then until the wanted offset shows up.
        now = time.monotonic()
        if now - self._reseek_at.get(partition, 0.0) >= RESEEK_EVERY_S:
            self._reseek_at[partition] = now
            self.seeks[partition] = offset

    def take_seeks(self) -> dict[int, int]:
        """Seeks the consumer must do now: partition -> offset."""
        seeks, self.seeks = self.seeks, {}
        return seeks

    def commit(self, batch: Batch, messages: Sequence[Record]) -> tuple[int, int]:
        """Append the batch with its offsets; returns (accepted, duplicates)."""
        for _ in range(10):
            if batch.empty:
                return 0, 0
            tracking = [
                Tracking(tracking_name(self.topic, p), offset)
                for p, offset in sorted(batch.last_offsets.items())
            ]
            try:
                result = self.ledger.append_valid(batch.valid, tracking=tracking)
            except StaleTracking:
                # Another worker (before a rebalance) appended some of these: skip what it did.
                self.refresh(batch.last_offsets)
                batch = self.prepare(messages)
                continue
            self.stored.update(batch.last_offsets)
            return result.accepted, result.duplicates
        raise StaleTracking("the stored offsets kept moving under this worker for 10 attempts")


# --------------------------------------------------------------------------- faust wiring


class BrokerProbe:
    """Asks the broker which offset really comes next (a plain consumer, no group)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._consumer: Any = None

    def __call__(self, partition: int, offset: int) -> int | None:
        from kafka import KafkaConsumer, TopicPartition

        if self._consumer is None:
            self._consumer = KafkaConsumer(
                bootstrap_servers=self.settings.kafka,
                enable_auto_commit=False,
                request_timeout_ms=self.settings.kafka_request_timeout_ms,
            )
        tp = TopicPartition(self.settings.topic_touchpoints, partition)
        self._consumer.assign([tp])
        self._consumer.seek(tp, offset)
        deadline = time.monotonic() + self.settings.kafka_request_timeout_ms / 1000
        while time.monotonic() < deadline:
            for records in self._consumer.poll(timeout_ms=200, max_records=1).values():
                if records:
                    return int(records[0].offset)
        return None


class LedgerConsumerThread(AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # faust hard-codes fetch_max_wait_ms=1500. A broker that holds a fetch for the whole
        # wait even when records arrive (Tansu does) then adds up to 1.5 s of latency:
        # use LEDGER_KAFKA_FETCH_MAX_WAIT_MS (read by aiokafka when the consumer starts).
        app = self.app
        if isinstance(app, IngestApp):
            consumer._fetch_max_wait_ms = app.settings.kafka_fetch_max_wait_ms
            consumer._max_poll_records = min(app.settings.batch_size, MAX_POLL_RECORDS)
        return consumer


class LedgerSeekingConsumer(AIOKafkaConsumer):
    """Faust's consumer, seeking to the offsets stored in the ledger instead of Kafka's, and
    handing whole fetched batches to the ingest loop (:meth:`_drain_messages`)."""

    def _new_consumer_thread(self) -> Any:
        return LedgerConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: Any) -> None:
        """Run by faust's Fetcher service in place of its per-message loop.

        faust's own loop wraps every record in a Message, an Event and several callbacks and
        tasks (about 600 Python calls per message, measured). Here the records aiokafka
        fetched (decoded in C, in faust's consumer thread) go to :class:`BatchIngester` as
        they are: group membership, rebalances and the seek to the ledger's offsets on every
        assignment stay faust's.
        """
        app = self.app
        if not isinstance(app, IngestApp):
            await super()._drain_messages(fetcher)
            return
        ingester = BatchIngester(app, self)
        stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        await ingester.run(lambda: stopped() or fetcher_stopped() or self.should_stop)

    async def perform_seek(self) -> None:
        await super().perform_seek()
        app = self.app
        if not isinstance(app, IngestApp):
            return
        assigned = {tp for tp in self.assignment() if tp.topic == app.settings.topic_touchpoints}
        if not assigned:
            return
        processor = await asyncio.to_thread(lambda: app.processor)
        offsets = await asyncio.to_thread(
            processor.resume_offsets, [tp.partition for tp in assigned]
        )
        # seek_wait runs in the consumer's own thread: faust's seek() calls aiokafka from this
        # thread, racing its fetcher (KeyError in Fetcher.fetched_records, worker crash).
        await self.seek_wait({tp: offsets[tp.partition] for tp in assigned})
        log.info(
            "resumed from the ledger's offsets: %s",
            ", ".join(f"{p}@{o}" for p, o in sorted(offsets.items())),
        )


class BatchIngester:
    """Fetched records -> validated batches -> ledger appends, two batches in flight.

    While batch N is appended (in a thread: psycopg waits for PostgreSQL without the GIL),
    the records that arrived meanwhile are fetched and batch N+1 is validated, continuing
    after N's offsets. Batches therefore grow with the backlog (up to LEDGER_BATCH_SIZE)
    and stay small, hence quick, at low rates. Dead letters of a batch are on the broker
    before its append starts, and a batch is appended only after the previous one committed.
    """

    def __init__(self, app: IngestApp, consumer: LedgerSeekingConsumer) -> None:
        self.app = app
        self.consumer = consumer
        self.settings = app.settings
        self.topic = app.settings.topic_touchpoints
        #: The last offsets of the batch handed to the ledger last.
        self._last_offsets: dict[int, int] = {}

    async def run(self, should_stop: Callable[[], bool]) -> None:
        proc = await asyncio.to_thread(lambda: self.app.processor)
        # A batch makes hundreds of thousands of short-lived objects; with the default
        # thresholds the collector rescans the worker's long-lived ones over and over
        # (appends measured 10-20 % faster with these).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        limit = self.settings.batch_size
        buffer: list[Any] = []
        inflight: asyncio.Task[tuple[int, int]] | None = None
        inflight_offsets: dict[int, int] = {}
        try:
            while not should_stop():
                busy = inflight is not None and not inflight.done()
                if buffer and (len(buffer) >= limit or not busy):
                    chunk, buffer = buffer[:limit], buffer[limit:]
                    inflight = await self._next(proc, chunk, inflight, inflight_offsets)
                    inflight_offsets = self._last_offsets
                    continue
                records, _ = await self.consumer._wait_next_records(
                    FETCH_WAIT_BUSY_S if busy or buffer else FETCH_WAIT_IDLE_S
                )
                if records:
                    for tp_records in records.values():
                        buffer.extend(tp_records)
                elif inflight is not None and inflight.done():
                    await self._finish(inflight)
                    inflight = None
        finally:
            if inflight is not None:
                await self._finish(inflight)

    async def _next(
        self,
        proc: IngestProcessor,
        chunk: list[Any],
        inflight: asyncio.Task[tuple[int, int]] | None,
        inflight_offsets: dict[int, int],
    ) -> asyncio.Task[tuple[int, int]]:
        t_start = time.perf_counter()
        speculative = inflight is not None and not inflight.done() and not proc.resync
        batch = await asyncio.to_thread(
            proc.prepare, chunk, after=inflight_offsets if speculative else None
        )
        t_prepared = time.perf_counter()
        if inflight is not None:
            await self._finish(inflight)
            if speculative and any(
                proc.stored.get(p) != o
                for p, o in inflight_offsets.items()
                if p in batch.last_offsets
            ):
                # The previous batch was re-filtered (another worker got there first):
                # validate this one again against what the ledger now holds.
                batch = await asyncio.to_thread(proc.prepare, chunk)
        t_waited = time.perf_counter()
        seeks = proc.take_seeks()
        if seeks:
            await self.consumer.seek_wait({TP(self.topic, p): o for p, o in seeks.items()})
        if batch.dead:
            await self.app.send_dead_letters(batch.dead)
        t_sent = time.perf_counter()
        self._last_offsets = dict(batch.last_offsets)
        timings = (t_prepared - t_start, t_sent - t_waited)
        return asyncio.create_task(self._commit(proc, batch, chunk, timings))

    async def _commit(
        self,
        proc: IngestProcessor,
        batch: Batch,
        chunk: list[Any],
        timings: tuple[float, float],
    ) -> tuple[int, int]:
        started = time.perf_counter()
        accepted, duplicates = await asyncio.to_thread(proc.commit, batch, chunk)
        # The timings show where a worker spends its time (bench/streaming.py sums them).
        log.info(
            "batch of %d: %d appended, %d duplicates, %d dead-lettered, %d already applied"
            " (validate %.1f ms, dead letters %.1f ms, append %.1f ms)",
            len(chunk),
            accepted,
            duplicates,
            len(batch.dead),
            batch.skipped,
            timings[0] * 1000,
            timings[1] * 1000,
            (time.perf_counter() - started) * 1000,
        )
        return accepted, duplicates

    async def _finish(self, inflight: asyncio.Task[tuple[int, int]]) -> None:
        try:
            await asyncio.shield(inflight)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The offsets of these messages were not stored; moving on would store later
            # ones past them: lost. Exit instead; a restarted worker seeks to the ledger's
            # offsets and reads them again.
            log.exception("a batch could not be stored; exiting to resume from the ledger")
            logging.shutdown()
            os._exit(EXIT_BATCH_FAILED)


class LedgerTransport(AIOKafkaTransport):
    Consumer = LedgerSeekingConsumer


class IngestApp(faust.App):
    """A faust app that owns one ledger connection, opened on first use."""

    def __init__(self, settings: Settings, **options: Any) -> None:
        super().__init__(settings.consumer_group, autodiscover=False, **options)
        self.settings = settings
        self._processor: IngestProcessor | None = None

    @property
    def processor(self) -> IngestProcessor:
        if self._processor is None:
            self._processor = IngestProcessor(
                Ledger.open(self.settings),
                self.settings.topic_touchpoints,
                strict=self.settings.strict,
                probe=BrokerProbe(self.settings),
            )
        return self._processor

    def _new_transport(self) -> Any:
        return LedgerTransport(self.conf.broker_consumer, self)

    async def send_dead_letters(self, dead: Sequence[DeadLetter]) -> None:
        """Send to the dead-letter topic and wait until the broker has every one."""
        topic = self.dlq_topic
        sent = [
            await topic.send(key=d.message.key, value=d.message.value, headers=d.headers())
            for d in dead
        ]
        await asyncio.gather(*sent)

    dlq_topic: Any = None


def faust_settings(settings: Settings) -> dict[str, Any]:
    """faust App options from LEDGER_* settings (timeouts per shared/BROKER.md)."""
    if not settings.kafka:
        raise ValueError("LEDGER_KAFKA is not set: expected the Kafka bootstrap servers")
    return {
        "broker": [f"kafka://{server.strip()}" for server in settings.kafka.split(",")],
        "topic_partitions": settings.partitions,
        "topic_replication_factor": settings.replication_factor,
        "processing_guarantee": "at_least_once",
        "broker_session_timeout": settings.kafka_session_timeout_ms / 1000,
        "broker_heartbeat_interval": settings.kafka_heartbeat_interval_ms / 1000,
        "broker_rebalance_timeout": settings.kafka_rebalance_timeout_s,
        "broker_commit_interval": settings.kafka_commit_interval_s,
        "broker_request_timeout": settings.kafka_request_timeout_ms / 1000,
        "consumer_auto_offset_reset": "earliest",
        "producer_acks": -1,
        "web_enabled": False,
        "store": "memory://",
        "datadir": str(settings.home / "faust"),
    }


def create_app(settings: Settings | None = None) -> IngestApp:
    settings = settings or Settings()
    app = IngestApp(settings, **faust_settings(settings))
    # faust makes only the last level of its data directory.
    Path(app.conf.datadir).mkdir(parents=True, exist_ok=True)
    source = app.topic(
        settings.topic_touchpoints,
        value_type=bytes,
        key_type=bytes,
        value_serializer="raw",
        key_serializer="raw",
    )
    dlq = app.topic(
        settings.topic_dlq,
        value_type=bytes,
        key_type=bytes,
        value_serializer="raw",
        key_serializer="raw",
    )

    app.dlq_topic = dlq
    # Subscribed through faust's conductor; records reach BatchIngester, not a faust agent.
    app.topics.add(source)
    return app


def run_worker(app: faust.App, loglevel: str = "INFO") -> None:
    """Run the worker in this process until SIGTERM/SIGINT (no web server)."""
    from faust.worker import Worker

    app.conf.web_enabled = False
    Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()


def __getattr__(name: str) -> Any:
    # ``faust -A streams.ingest`` looks up ``app``; build it from LEDGER_* only when asked.
    if name == "app":
        return create_app()
    raise AttributeError(name)


__all__ = ["TP", "IngestProcessor", "Message", "create_app", "run_worker"]
