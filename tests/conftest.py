"""Shared fixtures: real SQLite files, a real PostgreSQL database per test, real ledgers.

PostgreSQL: tests marked ``postgres`` (and the ``store`` parametrisation) use the
server on 127.0.0.1:5432, each in a fresh database created and dropped around
the test. Without a server they are skipped with the reason, unless
LEDGER_REQUIRE_POSTGRES=1 (set by .ci/run), which turns the skip into a failure.
"""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ledger.contract import CHANNEL_OF
from ledger.ledger import Ledger
from ledger.settings import Settings

PG_HOST = os.environ.get("LEDGER_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("LEDGER_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("LEDGER_TEST_PG_USER", "postgres")
TEST_MASTER_KEY = "a" * 64  # hex of 32 bytes: tests must not depend on a key file


def _admin() -> psycopg.Connection:
    return psycopg.connect(
        host=PG_HOST,
        port=PG_PORT,
        user=PG_USER,
        dbname="postgres",
        autocommit=True,
        connect_timeout=3,
    )


@pytest.fixture(scope="session")
def postgres_available() -> bool:
    try:
        with _admin() as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError as exc:
        reason = f"PostgreSQL is not reachable on {PG_HOST}:{PG_PORT} ({exc})".strip()
        if os.environ.get("LEDGER_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason}, and LEDGER_REQUIRE_POSTGRES=1 requires it")
        pytest.skip(reason)


@pytest.fixture
def pg_url(postgres_available: bool) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    name = f"ledger_test_{uuid.uuid4().hex[:12]}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with _admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings for a ledger in ``tmp_path``; PostgreSQL-backed when store_kind is postgres."""
    url = request.getfixturevalue("pg_url") if store_kind == "postgres" else None
    return Settings(home=tmp_path / "home", store_url=url, master_key=TEST_MASTER_KEY)


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", master_key=TEST_MASTER_KEY)


@pytest.fixture
def ledger(settings: Settings) -> Iterator[Ledger]:
    with Ledger.open(settings) as opened:
        yield opened


#: A valid payload per event type: the base tests mutate (personal fields hold clear text
#: that tests look for in the database bytes).
SAMPLE_PAYLOADS: dict[str, dict[str, Any]] = {
    "page_viewed": {"url": "https://shop.example/p/1", "title": "Shoes", "duration_ms": 1200},
    "form_submitted": {"form_id": "contact", "fields": {"message": "call me back"}},
    "email_sent": {"message_id": "m-1", "campaign_id": "spring", "subject": "Spring sale"},
    "email_opened": {"message_id": "m-1"},
    "email_clicked": {"message_id": "m-1", "url": "https://shop.example/sale"},
    "email_bounced": {"message_id": "m-1", "bounce_type": "soft"},
    "chat_message": {"conversation_id": "conv-1", "direction": "inbound", "text": "hello"},
    "call_completed": {
        "call_id": "call-1",
        "direction": "outbound",
        "duration_seconds": 95,
        "outcome": "answered",
        "notes": "wants a quote",
    },
    "social_mention": {"network": "x", "text": "love it", "sentiment": "positive"},
    "order_placed": {"order_id": "ord-1", "total": {"amount": "19.99", "currency": "EUR"}},
    "order_refunded": {"order_id": "ord-1", "amount": {"amount": "5.00", "currency": "EUR"}},
    "ticket_opened": {"ticket_id": "t-1", "subject": "broken zip", "priority": "high"},
    "ticket_resolved": {"ticket_id": "t-1", "resolution": "solved", "satisfaction": 4},
    "consent_changed": {"purpose": "email_marketing", "status": "granted"},
    "customer_forgotten": {},
    "web_event": {"action": "track", "name": "Video Played", "properties": {"seconds": 12}},
    "email_delivered": {"message_id": "m-1"},
    "identity_linked": {"via": "identify", "traits": {"plan": "pro"}},
    "customers_merged": {"merged_customer_id": "cus_00043", "identifier_type": "email"},
    "identity_link_refused": {"identifier_type": "phone", "limit": 1},
}


def build_event(
    customer_id: str = "cus_00001",
    type: str = "page_viewed",
    *,
    occurred_at: str = "2026-03-01T12:00:00Z",
    payload: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A valid event dict (fresh event_id unless given); ``fields`` override envelope keys."""
    event: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "customer_id": customer_id,
        "channel": CHANNEL_OF[type],
        "type": type,
        "occurred_at": occurred_at,
        "source": "test-adapter",
        "payload": copy.deepcopy(SAMPLE_PAYLOADS[type]) if payload is None else payload,
        "schema_version": 1,
    }
    event.update(fields)
    return event


@pytest.fixture
def make_event() -> Callable[..., dict[str, Any]]:
    """Factory of valid event dicts, see :func:`build_event`."""
    return build_event


# --- Kafka (issue 4): a real Tansu broker per session, see tests/broker.py ---------------


def _broker_or_skip() -> Any:
    from broker import Broker, BrokerUnavailable

    try:
        return Broker()
    except BrokerUnavailable as exc:
        if os.environ.get("LEDGER_REQUIRE_KAFKA") == "1":
            pytest.fail(f"{exc}, and LEDGER_REQUIRE_KAFKA=1 requires the broker")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[Any]:
    """The session's Tansu broker on a free loopback port (never stopped by a test)."""
    broker = _broker_or_skip()
    broker.start()
    yield broker
    broker.close()


@pytest.fixture
def own_broker() -> Iterator[Any]:
    """A broker for one test that may stop or kill it."""
    broker = _broker_or_skip()
    broker.start()
    yield broker
    broker.close()


@pytest.fixture
def kafka_settings(kafka_broker: Any, tmp_path: Path) -> Settings:
    """Settings for the session broker, test client timeouts, and topics/group of this test only."""
    from broker import client_settings

    tag = uuid.uuid4().hex[:8]
    return Settings(
        home=tmp_path / "home",
        master_key=TEST_MASTER_KEY,
        topic_touchpoints=f"touchpoints-{tag}",
        topic_dlq=f"touchpoints-{tag}.dlq",
        topic_lifecycle=f"lifecycle-{tag}",
        consumer_group=f"ledger-ingest-{tag}",
        partitions=4,
        **client_settings(kafka_broker.bootstrap),
    )
