"""Distributed mode: with LEDGER_KAFKA set the collector publishes to the touchpoints topic."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
import pytest
import requests

from broker import TEST_CLIENT_ENV, read_topic
from collector_server import Server, add_source
from ledger.collector.touch import event_id
from ledger.settings import Settings
from ledger.topics import create_topics

pytestmark = pytest.mark.kafka


def kafka_env(settings: Settings) -> dict[str, str]:
    return {
        **TEST_CLIENT_ENV,
        "LEDGER_KAFKA": settings.kafka or "",
        "LEDGER_TOPIC_TOUCHPOINTS": settings.topic_touchpoints,
        "LEDGER_TOPIC_DLQ": settings.topic_dlq,
        "LEDGER_PARTITIONS": str(settings.partitions),
    }


def page(anon: str) -> dict[str, Any]:
    return {
        "type": "page",
        "anonymousId": anon,
        "messageId": str(uuid.uuid4()),
        "properties": {"url": "https://shop.example/"},
    }


def test_acknowledged_events_are_on_the_topic_keyed_by_resolved_customer(
    kafka_settings: Settings,
) -> None:
    create_topics(kafka_settings)
    home = kafka_settings.home
    key = add_source(home, "website", "web")
    server = Server(home, env=kafka_env(kafka_settings)).start()
    try:
        first, second = page("v-1"), page("v-1")
        identify = {"type": "identify", "userId": "u-1", "anonymousId": "v-2"}
        bad = {"type": "page", "anonymousId": "v-3"}  # no url: rejected, not published
        answer = requests.post(
            server.url + "/v1/batch",
            data=orjson.dumps({"batch": [first, second, identify, bad]}),
            auth=(key, ""),
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["stored"] == 3
        assert answer.json()["rejected"][0]["problems"] == [
            "payload.url: missing, a required field"
        ]
    finally:
        server.stop()
    records = read_topic(kafka_settings.kafka or "", kafka_settings.topic_touchpoints)
    bodies = {orjson.loads(r.value)["event_id"]: (r, orjson.loads(r.value)) for r in records}
    assert len(bodies) == 3
    one = bodies[event_id("website", first["messageId"])]
    two = bodies[event_id("website", second["messageId"])]
    assert one[1]["customer_id"] == two[1]["customer_id"]  # one visitor, one customer
    assert one[0].key == one[1]["customer_id"].encode()
    assert dict(one[0].headers)["ce_type"] == b"com.ledger.page_viewed"
    assert not (home / "ledger.db").exists() or _ledger_is_empty(kafka_settings)


def _ledger_is_empty(settings: Settings) -> bool:
    from ledger.ledger import Ledger

    with Ledger.open(settings) as ledger:
        return ledger.store.max_position() == 0


def test_an_unreachable_broker_gets_503_never_a_2xx(own_broker: Any, tmp_path: Any) -> None:
    from broker import client_settings

    settings = Settings(home=tmp_path / "home", **client_settings(own_broker.bootstrap))
    create_topics(settings)
    key = add_source(settings.home, "website", "web")
    env = {
        **kafka_env(settings),
        "LEDGER_KAFKA_REQUEST_TIMEOUT_MS": "1000",
        "LEDGER_KAFKA_DELIVERY_TIMEOUT_MS": "3000",
    }
    server = Server(settings.home, env=env).start()
    try:
        own_broker.kill()
        began = time.monotonic()
        answer = requests.post(
            server.url + "/v1/batch",
            data=orjson.dumps({"batch": [page("v-9")]}),
            auth=(key, ""),
            timeout=120,
        )
        assert answer.status_code == 503
        assert "retry" in answer.json()["message"]
        assert time.monotonic() - began < 60
    finally:
        server.stop()
