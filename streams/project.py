"""The projection worker: the embedded projection runner fed by the (PostgreSQL) ledger, plus
every lifecycle transition published to the lifecycle topic.

Run it with ``ledger worker project``. One instance per projections directory: DuckDB
allows one writer per file.

* Projections: :class:`ledger.projection.runner.ProjectionRunner` follows the ledger in a
  thread, exactly once per event (it stores its position in the same DuckDB transaction).
* Lifecycle topic: the transitions are read back from ``lifecycle_changes`` (``seq`` 1, 2,
  ... without gaps) and sent with key = customer_id, so a customer's transitions stay in
  order on one partition. The last ``seq`` sent is saved only after the broker has
  acknowledged it: killed at any instant, the worker re-sends the tail it was not sure of
  (at least once); the deterministic ``change_id`` lets a subscriber drop the repeats.

This worker reads the ledger, not a Kafka topic, so it is a plain process rather than a
faust agent: a faust app would add a consumer group with nothing to consume.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Literal

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError
from pydantic import Field, TypeAdapter
from typing_extensions import TypedDict

from ledger.ledger import Ledger, LedgerError
from ledger.projection.lifecycle import ALL_STAGES
from ledger.projection.runner import ProjectionRunner
from ledger.projection.subscribe import LifecycleChange, changes_after
from ledger.settings import Settings

log = logging.getLogger("ledger.project")

Stage = Literal[ALL_STAGES]  # type: ignore[valid-type]

#: The CloudEvents type of a lifecycle-change message.
CE_TYPE = "com.ledger.lifecycle_changed"
SCHEMA_FILE = "schemas/topics/lifecycle_change.schema.json"


class LifecycleChangeMessage(TypedDict):
    """The JSON value of one message on the lifecycle topic."""

    change_id: Annotated[str, Field(description="Deterministic id: UUIDv5 of the facts.")]
    seq: Annotated[int, Field(ge=1, description="Order in the ledger (1, 2, ... no gaps).")]
    customer_id: str
    from_stage: Stage | None
    to_stage: Stage
    event_id: Annotated[str, Field(description="The event that caused the transition.")]
    event_position: Annotated[int, Field(ge=1, description="That event's ledger position.")]
    occurred_at: Annotated[str, Field(description="When that event occurred (ISO 8601, UTC).")]
    ledger_position: Annotated[int, Field(ge=1)]


MESSAGE = TypeAdapter(LifecycleChangeMessage)


def message_json_schema() -> dict[str, object]:
    schema = MESSAGE.json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "lifecycle_change.schema.json"
    schema["title"] = "Lifecycle change (Kafka topic LEDGER_TOPIC_LIFECYCLE)"
    return schema


def encode(change: LifecycleChange) -> bytes:
    return orjson.dumps(change.to_json())


def headers(change: LifecycleChange) -> list[tuple[str, bytes]]:
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", change.change_id.encode()),
        ("ce_source", b"ledger-projection"),
        ("ce_type", CE_TYPE.encode()),
        ("ce_subject", change.customer_id.encode()),
        ("ce_time", change.to_json()["occurred_at"].encode()),
        ("content-type", b"application/json"),
    ]


class PublishedMark:
    """The last ``seq`` the broker acknowledged, in a file beside the projections."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> int:
        try:
            return int(self.path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def write(self, seq: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            fh.write(f"{seq}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


class LifecycleTopic:
    """Sends lifecycle changes to Kafka and waits for every acknowledgement."""

    def __init__(self, settings: Settings) -> None:
        if not settings.kafka:
            raise LedgerError("LEDGER_KAFKA is not set: expected the Kafka bootstrap servers")
        self.topic = settings.topic_lifecycle
        self.settings = settings
        try:
            self.producer = KafkaProducer(
                bootstrap_servers=settings.kafka,
                client_id="ledger-projection",
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
                max_block_ms=settings.kafka_max_block_ms,
                request_timeout_ms=settings.kafka_request_timeout_ms,
                delivery_timeout_ms=settings.kafka_delivery_timeout_ms,
                bootstrap_timeout_ms=settings.kafka_max_block_ms,
            )
        except KafkaError as exc:
            raise LedgerError(f"cannot reach a Kafka broker at {settings.kafka}: {exc}") from None

    def send(self, changes: list[LifecycleChange]) -> None:
        """Send in order and wait for all; raises LedgerError if any was not acknowledged."""
        futures = [
            self.producer.send(
                self.topic,
                key=c.customer_id.encode(),
                value=encode(c),
                headers=headers(c),
            )
            for c in changes
        ]
        self.producer.flush(timeout=self.settings.kafka_delivery_timeout_ms / 1000)
        for change, future in zip(changes, futures, strict=True):
            try:
                future.get(timeout=0)
            except KafkaError as exc:
                raise LedgerError(
                    f"lifecycle change {change.seq} ({change.change_id}) was not delivered "
                    f"to {self.topic}: {exc}"
                ) from None

    def close(self) -> None:
        with contextlib.suppress(KafkaError):
            self.producer.close(timeout=1)


def run(
    settings: Settings,
    stop: threading.Event,
    *,
    poll_interval: float = 0.2,
    page: int = 5_000,
) -> None:
    """Follow the ledger into DuckDB and the lifecycle topic until ``stop`` is set."""
    mark = PublishedMark(settings.home / "lifecycle-published.seq")
    settings.home.mkdir(parents=True, exist_ok=True)
    topic = LifecycleTopic(settings)
    failure: list[BaseException] = []
    with Ledger.open(settings) as ledger, ProjectionRunner.for_settings(ledger, settings) as runner:

        def follow() -> None:
            try:
                runner.follow(stop, poll_interval=poll_interval)
            except BaseException as exc:
                failure.append(exc)
                stop.set()

        follower = threading.Thread(target=follow, name="projection-runner")
        follower.start()
        reader = runner.con.cursor()
        sent = mark.read()
        log.info("projection worker started; lifecycle changes published up to seq %d", sent)
        try:
            while not stop.is_set():
                changes = changes_after(reader, sent, page)
                if changes:
                    topic.send(changes)
                    sent = changes[-1].seq
                    mark.write(sent)
                    log.info("published lifecycle changes up to seq %d", sent)
                    continue
                stop.wait(poll_interval)
        finally:
            stop.set()
            follower.join()
            reader.close()
            topic.close()
    if failure:
        raise failure[0]


def run_until_signalled(settings: Settings) -> None:
    """Run in this process until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(process)d] %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    run(settings, stop)
