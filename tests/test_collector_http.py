"""The Segment-compatible collector over real HTTP: a `ledger serve` process, a SQLite ledger."""

from __future__ import annotations

import datetime as dt
import gzip
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from collector_server import Server, add_source, free_port
from conftest import TEST_MASTER_KEY
from ledger.collector.touch import event_id
from ledger.ledger import Ledger, RecordedEvent
from ledger.settings import Settings


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str]]]:
    home = tmp_path_factory.mktemp("collector") / "home"
    keys = {
        "web": add_source(home, "website", "web", "commerce"),
        "call": add_source(home, "phones", "call"),
        "gone": add_source(home, "retired", "web"),
    }
    server = Server(home).start()
    yield server, keys
    server.stop()


def events(home: Path) -> list[RecordedEvent]:
    with Ledger.open(Settings(home=home, master_key=TEST_MASTER_KEY)) as ledger:
        return ledger.read(0, 100_000, decrypt=True)


def by_id(home: Path) -> dict[str, RecordedEvent]:
    return {e.event_id: e for e in events(home)}


def post(server: Server, path: str, body: Any, key: str | None, **kw: Any) -> requests.Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    auth = (key, "") if key else None
    return requests.post(server.url + path, data=data, auth=auth, timeout=30, **kw)


def test_segment_python_library_unchanged_lands_typed_events(
    served: tuple[Server, dict[str, str]],
) -> None:
    from segment.analytics.client import Client

    server, keys = served
    errors: list[Exception] = []
    client = Client(
        keys["web"],
        host=server.url,
        on_error=lambda e, batch: errors.append(e),
        max_retries=1,
        sync_mode=True,
    )
    user = f"user-{uuid.uuid4().hex[:8]}"
    client.identify(user, {"email": " Ann@Example.COM ", "name": "Ann"}, anonymous_id="anon-1")
    _, order = client.track(
        user,
        "Order Completed",
        {"order_id": "o-77", "total": 19.99, "currency": "eur", "products": [{"quantity": 2}]},
    )
    _, page = client.page(user, "Docs", "Pricing", {"url": "https://shop.example/pricing"})
    _, video = client.track(user, "Video Played", {"seconds": 12})
    client.screen(user, "App", "Main")
    client.group(user, "acme", {"plan": "pro"})
    client.alias("anon-1", user)
    assert errors == []

    stored = by_id(server.home)
    placed = stored[event_id("website", order["messageId"])]
    assert placed.type == "order_placed" and placed.channel == "commerce"
    assert placed.payload == {
        "order_id": "o-77",
        "total": {"amount": "19.99", "currency": "EUR"},
        "items": 2,
    }
    viewed = stored[event_id("website", page["messageId"])]
    assert viewed.type == "page_viewed"
    assert viewed.payload == {"url": "https://shop.example/pricing", "title": "Pricing"}
    generic = stored[event_id("website", video["messageId"])]
    assert generic.type == "web_event"
    assert generic.payload == {
        "action": "track",
        "name": "Video Played",
        "properties": {"seconds": 12},
    }
    assert generic.source == "website"
    mine = [e for e in stored.values() if e.identifiers and e.identifiers.get("user_id") == user]
    assert sorted(e.type for e in mine) == sorted(
        [
            "identity_linked",
            "order_placed",
            "page_viewed",
            "web_event",
            "web_event",
            "web_event",
            "identity_linked",
        ]
    )
    identify = next(e for e in mine if e.payload.get("via") == "identify")
    assert identify.identifiers == {
        "user_id": user,
        "anonymous_id": "anon-1",
        "email": "ann@example.com",
        "name": "Ann",
    }
    assert identify.payload["traits"]["name"] == "Ann"
    assert len({e.customer_id for e in mine}) == 1  # one user id, one customer


def test_event_id_is_uuid5_of_source_and_message_id() -> None:
    from ledger.collector.touch import EVENT_NAMESPACE

    for source, message in [("website", "m-1"), ("shop", str(uuid.uuid4())), ("s", "é✓")]:
        expected = uuid.uuid5(EVENT_NAMESPACE, f"{source}\n{message}\n")
        assert event_id(source, message) == str(expected)


def test_message_id_is_the_idempotency_key_across_retries(
    served: tuple[Server, dict[str, str]],
) -> None:
    server, keys = served
    message_id = str(uuid.uuid4())
    msg = {
        "type": "page",
        "anonymousId": "anon-retry",
        "messageId": message_id,
        "properties": {"url": "https://shop.example/"},
    }
    before = len(events(server.home))
    for _ in range(3):
        answer = post(server, "/v1/batch", {"batch": [msg, msg]}, keys["web"])
        assert answer.status_code == 200 and answer.json()["stored"] == 2
    after = events(server.home)
    assert len(after) == before + 1
    assert after[-1].event_id == event_id("website", message_id)


def test_clock_skew_is_corrected_from_sent_at(served: tuple[Server, dict[str, str]]) -> None:
    server, keys = served
    # The device clock runs 3 hours fast; the call happened 5 s before it was sent.
    device_now = dt.datetime.now(dt.UTC) + dt.timedelta(hours=3)
    msg = {
        "type": "page",
        "anonymousId": "anon-skew",
        "messageId": str(uuid.uuid4()),
        "timestamp": (device_now - dt.timedelta(seconds=5)).isoformat(),
        "properties": {"url": "https://shop.example/late"},
    }
    before = dt.datetime.now(dt.UTC)
    answer = post(
        server, "/v1/batch", {"batch": [msg], "sentAt": device_now.isoformat()}, keys["web"]
    )
    after = dt.datetime.now(dt.UTC)
    assert answer.status_code == 200
    stored = by_id(server.home)[event_id("website", msg["messageId"])]
    assert before - dt.timedelta(seconds=6) <= stored.occurred_at <= after - dt.timedelta(seconds=4)

    # Without sentAt the client's timestamp is taken as it is (historical imports).
    old = {**msg, "messageId": str(uuid.uuid4()), "timestamp": "2026-01-02T03:04:05+01:00"}
    assert post(server, "/v1/page", old, keys["web"]).status_code == 200
    stored = by_id(server.home)[event_id("website", old["messageId"])]
    assert stored.occurred_at == dt.datetime(2026, 1, 2, 2, 4, 5, tzinfo=dt.UTC)


def test_auth_failures_and_channel_binding(served: tuple[Server, dict[str, str]]) -> None:
    server, keys = served
    msg = {"anonymousId": "a", "event": "Call Completed", "messageId": str(uuid.uuid4())}
    count = len(events(server.home))

    missing = post(server, "/v1/track", msg, None)
    assert missing.status_code == 401 and "no write key" in missing.json()["message"]
    assert missing.headers["WWW-Authenticate"].startswith("Basic")
    wrong = post(server, "/v1/track", msg, "lk_not-a-key")
    assert wrong.status_code == 401 and "unknown or revoked" in wrong.json()["message"]

    # A web key cannot write a call event, even inside an otherwise fine batch.
    call = {
        "type": "track",
        **msg,
        "properties": {
            "call_id": "c1",
            "direction": "inbound",
            "duration_seconds": 3,
            "outcome": "answered",
        },
    }
    page = {"type": "page", "anonymousId": "a", "properties": {"url": "https://x.example/"}}
    forbidden = post(server, "/v1/batch", {"batch": [page, call]}, keys["web"])
    assert forbidden.status_code == 403
    assert forbidden.json()["message"] == (
        "message 1: source 'website' may write web, commerce, not 'call' events (call_completed)"
    )
    assert len(events(server.home)) == count  # nothing of a refused request is stored
    allowed = post(server, "/v1/batch", {"batch": [call]}, keys["call"])
    assert allowed.status_code == 200 and allowed.json()["stored"] == 1

    # Segment also takes the key in the body; a revoked one stops working within a second.
    in_body = post(server, "/v1/batch", {"batch": [page], "writeKey": keys["gone"]}, None)
    assert in_body.status_code == 200
    subprocess_revoke(server.home, "retired")
    time.sleep(1.1)
    revoked = post(server, "/v1/batch", {"batch": [page]}, keys["gone"])
    assert revoked.status_code == 401


def subprocess_revoke(home: Path, name: str) -> None:
    from collector_server import cli_env

    subprocess.run(
        [sys.executable, "-m", "ledger", "sources", "revoke", name],
        env=cli_env(home),
        check=True,
        capture_output=True,
        timeout=60,
    )


def test_size_limits_and_malformed_bodies_get_400_with_the_reason(
    served: tuple[Server, dict[str, str]],
) -> None:
    server, keys = served
    count = len(events(server.home))
    big = {"type": "track", "anonymousId": "a", "event": "Big", "properties": {"x": "y" * 33_000}}
    single = post(server, "/v1/track", big, keys["web"])
    assert single.status_code == 400
    assert single.json()["message"] == "request body: the event is over the limit of 32 KB"

    small = {"type": "page", "anonymousId": "a", "properties": {"url": "https://x.example/"}}
    in_batch = post(server, "/v1/batch", {"batch": [small, big]}, keys["web"])
    assert in_batch.status_code == 400
    assert in_batch.json()["message"].startswith("batch[1]: 33,0")
    assert "over the limit of 32 KB per event" in in_batch.json()["message"]

    huge = {
        "batch": [dict(small, properties={"url": "https://x.example/", "p": "z" * 20_000})] * 30
    }
    too_big = post(server, "/v1/batch", huge, keys["web"])
    assert too_big.status_code == 400
    assert too_big.json()["message"] == "request body: the batch is over the limit of 500 KB"
    # Compressed bodies are measured after inflating: a gzip bomb is refused the same way.
    bomb = gzip.compress(orjson.dumps(huge))
    inflated = post(server, "/v1/batch", bomb, keys["web"], headers={"Content-Encoding": "gzip"})
    assert inflated.status_code == 400 and "over the limit of 500 KB" in inflated.text

    for body, reason in [
        (b'{"batch": [', "not valid JSON"),
        (b"", "empty"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", 'expected {"batch"'),
        (b'{"batch": {"type": "page"}}', 'expected {"batch"'),
    ]:
        answer = post(server, "/v1/batch", body, keys["web"])
        assert answer.status_code == 400, (body, answer.text)
        assert reason in answer.json()["message"]
    not_object = post(server, "/v1/page", b"[]", keys["web"])
    assert not_object.status_code == 400 and "expected a JSON object" in not_object.text
    assert len(events(server.home)) == count

    ok = post(
        server,
        "/v1/batch",
        gzip.compress(orjson.dumps({"batch": [small]})),
        keys["web"],
        headers={"Content-Encoding": "gzip"},
    )
    assert ok.status_code == 200 and ok.json()["stored"] == 1


def test_contract_rejections_are_reported_dead_lettered_and_spare_the_valid(
    served: tuple[Server, dict[str, str]],
) -> None:
    server, keys = served
    good = {
        "type": "page",
        "anonymousId": "dl",
        "messageId": str(uuid.uuid4()),
        "properties": {"url": "https://x.example/ok"},
    }
    no_url = {"type": "page", "anonymousId": "dl", "messageId": str(uuid.uuid4())}
    nobody = {"type": "track", "event": "Clicked"}
    bad_money = {
        "type": "track",
        "event": "Order Completed",
        "userId": "u",
        "properties": {"order_id": "o", "total": "lots"},
    }
    answer = post(server, "/v1/batch", {"batch": [no_url, good, nobody, bad_money]}, keys["web"])
    assert answer.status_code == 200
    body = answer.json()
    assert body["stored"] == 1
    reasons = {r["index"]: r["problems"] for r in body["rejected"]}
    assert reasons == {
        0: ["payload.url: missing, a required field"],
        2: ["userId/anonymousId: missing; every call needs one of them"],
        3: ["properties.total: 'lots' is not an amount"],
    }
    assert event_id("website", good["messageId"]) in by_id(server.home)
    dead = [
        orjson.loads(line)
        for path in sorted((server.home / "rejected").glob("*.jsonl"))
        for line in path.read_bytes().splitlines()
    ]
    mine = [d for d in dead if d["file"] == "http:website" and "dl" in d.get("raw", "")]
    assert [d["reason"] for d in mine] == ["payload.url: missing, a required field"]
    assert orjson.loads(mine[0]["raw"]) == no_url


def test_browser_style_calls_short_paths_key_in_body_and_cors(
    served: tuple[Server, dict[str, str]],
) -> None:
    server, keys = served
    preflight = requests.options(
        server.url + "/v1/p",
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
        timeout=10,
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    msg = {
        "anonymousId": "ajs-1",
        "messageId": str(uuid.uuid4()),
        "writeKey": keys["web"],
        "properties": {"url": "https://shop.example/"},
    }
    answer = post(server, "/v1/p", msg, None, headers={"Origin": "https://shop.example"})
    assert answer.status_code == 200 and answer.json()["stored"] == 1
    assert answer.headers["access-control-allow-origin"] == "*"
    assert by_id(server.home)[event_id("website", msg["messageId"])].type == "page_viewed"
    # A rejected browser call is dead-lettered without the key it carried.
    bad = {"anonymousId": "ajs-2", "writeKey": keys["web"], "properties": {}}
    assert post(server, "/v1/p", bad, None).json()["rejected"]
    dead = b"".join(p.read_bytes() for p in (server.home / "rejected").glob("*.jsonl"))
    assert b"ajs-2" in dead and keys["web"].encode() not in dead


def second_collector(server: Server) -> subprocess.CompletedProcess[str]:
    from collector_server import cli_env

    return subprocess.run(
        [sys.executable, "-m", "ledger", "serve", "--port", str(free_port())],
        env=cli_env(server.home, server.store_url),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_second_collector_on_the_same_ledger_is_refused(
    served: tuple[Server, dict[str, str]],
) -> None:
    server, _ = served
    second = second_collector(server)
    assert second.returncode == 1
    assert "another collector is already serving the ledger" in second.stderr
    assert "Traceback" not in second.stderr
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def test_no_route_or_method_is_a_500(served: tuple[Server, dict[str, str]]) -> None:
    server, _ = served
    assert requests.get(server.url + "/v1/track", timeout=10).status_code == 405
    assert requests.post(server.url + "/v2/nothing", timeout=10).status_code == 404
    bad_auth = requests.post(
        server.url + "/v1/track", data=b"{}", timeout=10, headers={"Authorization": "Basic !!!"}
    )
    assert bad_auth.status_code == 401


def test_restart_without_loss_every_acknowledged_event_is_in_the_ledger(tmp_path: Path) -> None:
    """SIGKILL the collector while a client is sending; restart; retry; nothing 2xx'd is lost."""
    import threading

    home = tmp_path / "home"
    key = add_source(home, "website", "web")
    port = free_port()
    server = Server(home, port=port).start()
    acked: list[str] = []
    unacked: list[list[dict[str, Any]]] = []
    stop = threading.Event()

    def batch(n: int) -> list[dict[str, Any]]:
        return [
            {
                "type": "page",
                "anonymousId": f"anon-{n}-{i}",
                "messageId": f"m-{n}-{i}",
                "properties": {"url": f"https://x.example/{n}/{i}"},
            }
            for i in range(20)
        ]

    def client() -> None:
        n = 0
        while not stop.is_set():
            msgs = batch(n)
            n += 1
            try:
                answer = post(server, "/v1/batch", {"batch": msgs}, key)
            except requests.ConnectionError:
                unacked.append(msgs)
                continue
            if answer.status_code == 200:
                acked.extend(m["messageId"] for m in msgs)
            else:
                unacked.append(msgs)

    sender = threading.Thread(target=client)
    sender.start()
    time.sleep(1.5)
    server.kill()
    time.sleep(0.3)
    stop.set()
    sender.join(timeout=60)
    assert acked, "the client got no acknowledgement before the kill"

    stored = {e.event_id for e in events(home)}
    missing = [m for m in acked if event_id("website", m) not in stored]
    assert missing == []

    # Restarted, the client retries what it never heard back about: stored once each.
    server = Server(home, port=free_port()).start()
    try:
        for msgs in [*unacked[:5], batch(0)]:
            answer = post(server, "/v1/batch", {"batch": msgs}, key)
            assert answer.status_code == 200
            acked.extend(m["messageId"] for m in msgs)
    finally:
        server.stop()
    recorded = events(home)
    ids = [e.event_id for e in recorded]
    assert len(ids) == len(set(ids))
    assert {event_id("website", m) for m in acked} <= set(ids)
    with Ledger.open(Settings(home=home, master_key=TEST_MASTER_KEY)) as ledger:
        assert ledger.verify().ok


@pytest.mark.postgres
def test_collector_on_postgresql_keys_graph_and_ledger_in_one_database(
    tmp_path: Path, pg_url: str
) -> None:
    home = tmp_path / "home"
    key = add_source(home, "website", "web", store_url=pg_url)
    server = Server(home, store_url=pg_url).start()
    try:
        batch = [
            {"type": "page", "anonymousId": "pg-a", "properties": {"url": "https://x.example/"}},
            {"type": "identify", "userId": "pg-u"},
            {"type": "identify", "userId": "pg-u", "anonymousId": "pg-a"},
        ]
        answer = post(server, "/v1/batch", {"batch": batch}, key)
        assert answer.status_code == 200 and answer.json()["stored"] == 3
        refused = second_collector(server)
        assert refused.returncode == 1 and "already serving" in refused.stderr
    finally:
        server.stop()
    assert not (home / "ledger.db").exists()  # nothing went to a SQLite file
    with Ledger.open(Settings(home=home, store_url=pg_url, master_key=TEST_MASTER_KEY)) as led:
        recorded = led.read(0, 100)
    # Derived events follow the touches of their transaction.
    assert [e.type for e in recorded] == [
        "page_viewed",
        "identity_linked",
        "identity_linked",
        "customers_merged",
    ]
    merged = recorded[3]
    assert recorded[0].customer_id == merged.customer_id == recorded[2].customer_id
    assert merged.payload["merged_customer_id"] == recorded[1].customer_id
