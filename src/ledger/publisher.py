"""The adapter SDK: validate touchpoints at the source and publish them to Kafka.

An adapter (web site, email provider, chat widget, ...) creates one
:class:`Publisher` and calls :meth:`Publisher.publish` per event::

    with Publisher() as pub:            # LEDGER_KAFKA, LEDGER_TOPIC_TOUCHPOINTS
        pub.publish({"event_id": ..., "customer_id": "cus_00042", ...})
    # leaving the block flushes: DeliveryError if any event did not reach the broker

Guarantees:

* An event that breaks the contract raises :class:`~ledger.contract.ContractError`
  at the caller (one sentence per field) and is never sent.
* Events are keyed by ``customer_id`` (one customer's events keep their order on
  one partition) and carry CloudEvents 1.0 binary-mode headers.
* The producer is idempotent with ``acks=all`` and unlimited retries within
  ``LEDGER_KAFKA_DELIVERY_TIMEOUT_MS``: a broker hiccup neither loses nor
  reorders events.
* Nothing is lost silently: every event is either acknowledged by the broker or
  listed in :meth:`flush`'s report (and :meth:`flush` raises on failures). An
  unreachable broker raises :class:`PublishError` within ``LEDGER_KAFKA_MAX_BLOCK_MS``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError

from ledger.contract import (
    ContractError,
    Event,
    cloudevent_headers,
    parse_event,
    parse_line,
)
from ledger.ledger import LedgerError
from ledger.settings import Settings
from ledger.topics import require_bootstrap

EventInput = dict[str, Any] | Event | str | bytes


class PublishError(LedgerError):
    """The broker could not be reached or refused an event."""


@dataclass(frozen=True)
class DeliveryFailure:
    event_id: str
    customer_id: str
    error: str


@dataclass
class FlushReport:
    """What happened to the events published since the previous flush."""

    delivered: int = 0
    failed: list[DeliveryFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


class DeliveryError(PublishError):
    """Some events were not acknowledged by the broker; ``report.failed`` names them."""

    def __init__(self, report: FlushReport):
        self.report = report
        first = report.failed[0]
        super().__init__(
            f"{len(report.failed):,} event(s) were not delivered to Kafka "
            f"({report.delivered:,} were); first: event {first.event_id} of "
            f"{first.customer_id}: {first.error}"
        )


def to_envelope(event: EventInput, *, strict: bool = False) -> Event:
    """Validate one event given as a dict, a model, or JSON text/bytes (ContractError if bad)."""
    if isinstance(event, bytes | str):
        return parse_line(event, strict=strict)
    return parse_event(event, strict=strict)


def encode(event: Event) -> bytes:
    """The message value: the validated event as canonical JSON (unknown fields kept)."""
    return event.to_json()


class Publisher:
    """A validating, idempotent Kafka producer of touchpoints (thread-safe)."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        topic: str | None = None,
        strict: bool | None = None,
        linger_ms: int = 5,
        compression: str | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.topic = topic or self.settings.topic_touchpoints
        self.strict = self.settings.strict if strict is None else strict
        bootstrap = require_bootstrap(self.settings)
        try:
            self._producer = KafkaProducer(
                bootstrap_servers=bootstrap,
                client_id="ledger-publisher",
                acks="all",
                enable_idempotence=True,
                retries=2**31 - 1,
                linger_ms=linger_ms,
                batch_size=256 * 1024,
                compression_type=compression,
                max_block_ms=self.settings.kafka_max_block_ms,
                request_timeout_ms=self.settings.kafka_request_timeout_ms,
                delivery_timeout_ms=self.settings.kafka_delivery_timeout_ms,
                bootstrap_timeout_ms=self.settings.kafka_max_block_ms,
            )
        except KafkaError as exc:
            raise PublishError(
                f"cannot reach a Kafka broker at {bootstrap} (LEDGER_KAFKA) within "
                f"{self.settings.kafka_max_block_ms / 1000:g} s: {exc}"
            ) from None
        self._lock = threading.Lock()
        self._sequence = 0
        #: Sent, not yet acknowledged or failed: send number -> (event_id, customer_id).
        self._in_flight: dict[int, tuple[str, str]] = {}
        self._report = FlushReport()
        self._closed = False

    # ------------------------------------------------------------------ sending

    def publish(self, event: EventInput) -> Event:
        """Validate and send one event; returns the validated event. Delivery is asynchronous."""
        envelope = to_envelope(event, strict=self.strict)
        self._send(envelope)
        return envelope

    def publish_many(self, events: Iterable[EventInput]) -> int:
        """Validate every event first (nothing is sent if one is invalid), then send them all.

        An invalid event raises ContractError with each problem prefixed by its index."""
        envelopes = self._validate_all(events)
        for envelope in envelopes:
            self._send(envelope)
        return len(envelopes)

    def deliver(self, events: Iterable[EventInput], timeout: float | None = None) -> FlushReport:
        """Validate, send and wait for the acknowledgement of exactly these events.

        Unlike :meth:`flush`, which reports everything sent since the previous flush, this
        concerns only the events given, so threads sharing one Publisher (an HTTP server's
        requests, say) each learn the fate of their own. Raises ContractError (nothing
        sent) or :class:`DeliveryError` naming the events that were not acknowledged."""
        envelopes = self._validate_all(events)
        sent = [(e, self._send_untracked(e)) for e in envelopes]
        limit = self._flush_limit() if timeout is None else timeout
        deadline = time.monotonic() + limit
        report = FlushReport()
        for event, future in sent:
            try:
                future.get(timeout=max(0.0, deadline - time.monotonic()))
                report.delivered += 1
            except KafkaError as exc:
                report.failed.append(
                    DeliveryFailure(str(event.event_id), event.customer_id, str(exc) or repr(exc))
                )
        if report.failed:
            raise DeliveryError(report)
        return report

    def _send_untracked(self, event: Event) -> Any:
        if self._closed:
            raise PublishError("the publisher is closed")
        event_id = str(event.event_id)
        try:
            return self._producer.send(
                self.topic,
                key=event.customer_id.encode(),
                value=encode(event),
                headers=cloudevent_headers(event),
            )
        except KafkaTimeoutError:
            raise PublishError(
                f"Kafka did not accept event {event_id} within "
                f"{self.settings.kafka_max_block_ms / 1000:g} s (LEDGER_KAFKA_MAX_BLOCK_MS): "
                f"is the broker at {self.settings.kafka} reachable and topic {self.topic!r} there?"
            ) from None
        except KafkaError as exc:
            raise PublishError(f"Kafka refused event {event_id}: {exc}") from None

    def _validate_all(self, events: Iterable[EventInput]) -> list[Event]:
        envelopes = []
        for index, event in enumerate(events):
            try:
                envelopes.append(to_envelope(event, strict=self.strict))
            except ContractError as exc:
                raise ContractError([f"events[{index}]: {p}" for p in exc.problems]) from None
        return envelopes

    def _send(self, event: Event) -> None:
        event_id, customer = str(event.event_id), event.customer_id
        future = self._send_untracked(event)
        with self._lock:
            self._sequence += 1
            number = self._sequence
            self._in_flight[number] = (event_id, customer)
        # kafka-python calls back with the bound arguments first, then the result.
        future.add_callback(self._delivered, number)
        future.add_errback(self._failed, number)

    def _delivered(self, number: int, _metadata: Any) -> None:
        with self._lock:
            self._in_flight.pop(number, None)
            self._report.delivered += 1

    def _failed(self, number: int, exc: BaseException) -> None:
        with self._lock:
            event_id, customer = self._in_flight.pop(number, ("?", "?"))
            self._report.failed.append(DeliveryFailure(event_id, customer, str(exc) or repr(exc)))

    # ------------------------------------------------------------------ flushing

    def flush(self, timeout: float | None = None, *, raise_on_failure: bool = True) -> FlushReport:
        """Wait until every sent event is acknowledged or failed; report and reset the counts.

        Raises :class:`DeliveryError` when any event failed (unless ``raise_on_failure``
        is false). The default timeout outlasts LEDGER_KAFKA_DELIVERY_TIMEOUT_MS, by which
        the producer has settled every event; events still unacknowledged after a shorter
        ``timeout`` are reported as failed (they may still arrive: resending them is safe,
        the ledger stores an event_id once).
        """
        limit = self._flush_limit() if timeout is None else timeout
        with contextlib.suppress(KafkaTimeoutError):
            self._producer.flush(timeout=limit)
        with self._lock:
            report, self._report = self._report, FlushReport()
            for event_id, customer in self._in_flight.values():
                report.failed.append(
                    DeliveryFailure(event_id, customer, f"not acknowledged within {limit:g} s")
                )
            self._in_flight.clear()
        if report.failed and raise_on_failure:
            raise DeliveryError(report)
        return report

    def _flush_limit(self) -> float:
        # By delivery_timeout the producer has settled every record; a request may be in flight.
        return (
            self.settings.kafka_delivery_timeout_ms + self.settings.kafka_request_timeout_ms
        ) / 1000

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def close(self, timeout: float | None = None) -> FlushReport:
        """Flush (raising on failures) and release the connection."""
        if self._closed:
            return FlushReport()
        try:
            return self.flush(timeout)
        finally:
            self._release()

    def _release(self) -> None:
        self._closed = True
        # Whatever is still unacknowledged was already reported by flush().
        with contextlib.suppress(KafkaError):
            self._producer.close(timeout=0)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            # An error is already on its way out: report nothing new over it, but still flush.
            try:
                self.flush(raise_on_failure=False)
            finally:
                self._release()
