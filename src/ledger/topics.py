"""The distributed mode's Kafka topics: names, partition counts and settings, created explicitly.

Brokers may auto-create an unknown topic with their own default partition count
(Tansu uses 4); consumers sized for ``LEDGER_PARTITIONS`` then disagree with
the topic, so every topic is created here, up front, with the count meant.

* touchpoints: keyed by customer_id so one customer's events stay ordered on one
  partition; the partition count bounds how many ingest workers can share the load.
* touchpoints.dlq: invalid messages with the reason; kept forever (a person must act).
* lifecycle: stage transitions for services; kept forever so a new subscriber can replay.
"""

from __future__ import annotations

from dataclasses import dataclass

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from ledger.ledger import LedgerError
from ledger.settings import Settings

_FOREVER = {"retention.ms": "-1", "cleanup.policy": "delete"}


@dataclass(frozen=True)
class TopicSpec:
    role: str
    name: str
    partitions: int
    config: dict[str, str]


@dataclass(frozen=True)
class TopicStatus:
    spec: TopicSpec
    created: bool
    #: Partitions the existing topic has (differs from spec.partitions if created elsewhere).
    partitions: int | None


def topic_specs(settings: Settings, partitions: int | None = None) -> list[TopicSpec]:
    count = partitions or settings.partitions
    return [
        TopicSpec("touchpoints", settings.topic_touchpoints, count, {"cleanup.policy": "delete"}),
        TopicSpec("dead letters", settings.topic_dlq, count, dict(_FOREVER)),
        TopicSpec("lifecycle changes", settings.topic_lifecycle, count, dict(_FOREVER)),
    ]


def require_bootstrap(settings: Settings) -> str:
    if not settings.kafka:
        raise LedgerError(
            "LEDGER_KAFKA is not set: expected the Kafka bootstrap servers, e.g. 127.0.0.1:9092"
        )
    return settings.kafka


def admin_client(settings: Settings) -> KafkaAdminClient:
    bootstrap = require_bootstrap(settings)
    try:
        return KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="ledger-admin",
            request_timeout_ms=settings.kafka_request_timeout_ms,
            bootstrap_timeout_ms=settings.kafka_max_block_ms,
        )
    except KafkaError:
        raise LedgerError(
            f"cannot reach a Kafka broker at {bootstrap} (LEDGER_KAFKA): is it running?"
        ) from None


def create_topics(settings: Settings, partitions: int | None = None) -> list[TopicStatus]:
    """Create the topics that do not exist yet; report the partition count of those that do."""
    specs = topic_specs(settings, partitions)
    admin = admin_client(settings)
    try:
        statuses = []
        for spec in specs:
            new = NewTopic(
                spec.name,
                num_partitions=spec.partitions,
                replication_factor=settings.replication_factor,
                topic_configs=spec.config,
            )
            try:
                admin.create_topics([new], timeout_ms=settings.kafka_request_timeout_ms)
                statuses.append(TopicStatus(spec, True, spec.partitions))
            except TopicAlreadyExistsError:
                statuses.append(TopicStatus(spec, False, _partition_count(admin, spec.name)))
            except KafkaError as exc:
                raise LedgerError(f"cannot create topic {spec.name!r}: {exc}") from None
        return statuses
    finally:
        admin.close()


def partition_count(settings: Settings, topic: str) -> int | None:
    admin = admin_client(settings)
    try:
        return _partition_count(admin, topic)
    finally:
        admin.close()


def _partition_count(admin: KafkaAdminClient, topic: str) -> int | None:
    described = admin.describe_topics([topic])
    if not described or described[0].get("error_code"):
        return None
    return len(described[0]["partitions"])
