"""Provider webhooks over real HTTP with the providers' published payload shapes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from collector_server import Server, add_source
from conftest import TEST_MASTER_KEY
from ledger.collector.touch import MappingError, event_id
from ledger.collector.webhooks import map_chat, map_sendgrid, map_social, map_twilio_call
from ledger.contract import ContractError, parse_event
from ledger.ledger import Ledger, RecordedEvent
from ledger.settings import Settings
from strategies import JSON_VALUES

MESSAGE = "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.000000000000000000000"
SMTP_ID = "<14c5d75ce93.dfd.64b469@ismtpd-555>"
UA = "Mozilla/4.0 (compatible; MSIE 6.1; Windows XP; .NET CLR 1.1.4322; .NET CLR 2.0.50727)"


def sendgrid_sample() -> list[dict[str, Any]]:
    """SendGrid's documented Event Webhook example: one of each event type."""
    common = {
        "email": "example@test.com",
        "timestamp": 1513299569,
        "smtp-id": SMTP_ID,
        "category": "cat facts",
        "sg_message_id": MESSAGE,
    }
    rows: list[dict[str, Any]] = [
        {"event": "processed", "sg_event_id": "rbtnWrG1DVDGGGFHFyun0A=="},
        {
            "event": "deferred",
            "sg_event_id": "t7LEShmowp86DTdUW8M-GQ==",
            "response": "400 try again later",
            "attempt": "5",
        },
        {"event": "delivered", "sg_event_id": "rWVYmVk90MjZJ9iohOBa3w==", "response": "250 OK"},
        {
            "event": "open",
            "sg_event_id": "FOTFFO0ecsBE-zxFXfs6WA==",
            "useragent": UA,
            "ip": "255.255.255.255",
        },
        {
            "event": "click",
            "sg_event_id": "kCAi1KttyQdEKHhdC-nuEA==",
            "useragent": UA,
            "ip": "255.255.255.255",
            "url": "http://www.sendgrid.com/",
        },
        {
            "event": "bounce",
            "sg_event_id": "6g4ZI7SA-xmRDv57GoPIPw==",
            "reason": "500 unknown recipient",
            "status": "5.0.0",
            "type": "bounce",
        },
        {
            "event": "dropped",
            "sg_event_id": "zmzJhfJgAfUSOW80yEbPyw==",
            "reason": "Bounced Address",
            "status": "5.0.0",
        },
        {"event": "spamreport", "sg_event_id": "37nvH5QBz858KGVYCM4uOA=="},
        {"event": "unsubscribe", "sg_event_id": "zz_BjPgU_5pS-J8vlfB1sg=="},
        {
            "event": "group_unsubscribe",
            "sg_event_id": "ft_8Td_-0DGqa-ZEY4cN_w==",
            "useragent": UA,
            "ip": "255.255.255.255",
            "url": "http://www.sendgrid.com/",
            "asm_group_id": 10,
        },
        {
            "event": "group_resubscribe",
            "sg_event_id": "cOAA1YCrnD3-aWGNw3lKHA==",
            "useragent": UA,
            "ip": "255.255.255.255",
            "url": "http://www.sendgrid.com/",
            "asm_group_id": 10,
        },
    ]
    return [{**common, **row} for row in rows]


def twilio_callback(**fields: str) -> dict[str, str]:
    """A call status callback as Twilio documents it (form fields, E.164 numbers)."""
    base = {
        "AccountSid": "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
        "ApiVersion": "2010-04-01",
        "CallSid": "CA1f3e6a1c8e1b4e6c9d2a7b5f0e9d8c7b",
        "CallStatus": "completed",
        "Called": "+15558675310",
        "CalledCity": "SAN FRANCISCO",
        "CalledCountry": "US",
        "Caller": "+14155552671",
        "CallerCity": "SAN FRANCISCO",
        "CallbackSource": "call-progress-events",
        "CallDuration": "42",
        "Direction": "inbound",
        "Duration": "1",
        "From": "+14155552671",
        "SequenceNumber": "3",
        "SipResponseCode": "200",
        "Timestamp": "Mon, 16 Nov 2026 17:20:01 +0000",
        "To": "+15558675310",
    }
    return {**base, **fields}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str]]]:
    home = tmp_path_factory.mktemp("webhooks") / "home"
    keys = {
        "email": add_source(home, "sendgrid", "email"),
        "call": add_source(home, "twilio", "call"),
        "chat": add_source(home, "intercom", "chat"),
        "social": add_source(home, "listening", "social"),
        "web": add_source(home, "website", "web"),
    }
    server = Server(home).start()
    yield server, keys
    server.stop()


def stored(home: Path) -> dict[str, RecordedEvent]:
    with Ledger.open(Settings(home=home, master_key=TEST_MASTER_KEY)) as ledger:
        return {e.event_id: e for e in ledger.read(0, 100_000, decrypt=True)}


def post(server: Server, path: str, key: str | None, **kw: Any) -> requests.Response:
    return requests.post(server.url + path, auth=(key, "") if key else None, timeout=30, **kw)


def test_sendgrid_event_webhook_sample_maps_every_event(
    served: tuple[Server, dict[str, str]],
) -> None:
    server, keys = served
    sample = sendgrid_sample()
    answer = post(server, "/webhooks/sendgrid", keys["email"], data=orjson.dumps(sample))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"success": True, "stored": 11, "rejected": []}
    events = stored(server.home)
    got = [events[event_id("sendgrid", f"sendgrid:{e['sg_event_id']}")] for e in sample]
    assert [(e.type, e.channel) for e in got] == [
        ("email_sent", "email"),
        ("email_bounced", "email"),
        ("email_delivered", "email"),
        ("email_opened", "email"),
        ("email_clicked", "email"),
        ("email_bounced", "email"),
        ("email_bounced", "email"),
        ("consent_changed", "system"),
        ("consent_changed", "system"),
        ("consent_changed", "system"),
        ("consent_changed", "system"),
    ]
    message = "14c5d75ce93.dfd.64b469"
    assert got[0].payload == {"message_id": message}
    assert got[1].payload == {
        "message_id": message,
        "bounce_type": "soft",
        "reason": "deferred: 400 try again later",
    }
    assert got[4].payload == {"message_id": message, "url": "http://www.sendgrid.com/"}
    assert got[5].payload == {
        "message_id": message,
        "bounce_type": "hard",
        "reason": "500 unknown recipient",
    }
    assert got[6].payload["reason"] == "dropped: Bounced Address"
    assert [e.payload["status"] for e in got[7:]] == ["withdrawn"] * 3 + ["granted"]
    assert {e.payload.get("purpose") for e in got[7:]} == {"email_marketing"}
    assert got[0].occurred_at == dt.datetime.fromtimestamp(1513299569, dt.UTC)
    assert got[0].identifiers == {"email": "example@test.com"}
    assert len({e.customer_id for e in got}) == 1

    # SendGrid retries a batch it got no 2xx for: nothing is stored twice.
    again = post(server, "/webhooks/sendgrid", keys["email"], data=orjson.dumps(sample))
    assert again.status_code == 200
    assert len(stored(server.home)) == len(events)


def test_sendgrid_unmappable_events_are_rejected_with_reasons_and_the_rest_land(
    served: tuple[Server, dict[str, str]],
) -> None:
    server, keys = served
    good = {**sendgrid_sample()[0], "sg_event_id": "fresh-1", "email": "b@test.com"}
    odd = {**good, "sg_event_id": "fresh-2", "event": "machine_opened"}
    nobody = {**good, "sg_event_id": "fresh-3", "email": "not an address"}
    answer = post(
        server, "/webhooks/sendgrid", keys["email"], data=orjson.dumps([odd, good, nobody])
    )
    assert answer.status_code == 200
    body = answer.json()
    assert body["stored"] == 1
    assert [r["index"] for r in body["rejected"]] == [0, 2]
    assert "'machine_opened' is not a SendGrid event" in body["rejected"][0]["problems"][0]
    assert body["rejected"][1]["problems"] == ["email: 'not an address' is not an email address"]

    web_key = post(server, "/webhooks/sendgrid", keys["web"], data=orjson.dumps([good]))
    assert web_key.status_code == 403
    assert "may write web, not 'email' events" in web_key.json()["message"]


def test_twilio_call_status_callbacks_form_encoded(served: tuple[Server, dict[str, str]]) -> None:
    server, keys = served
    path = "/webhooks/twilio/call-status"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    before = len(stored(server.home))
    ringing = post(
        server,
        path,
        keys["call"],
        data=urlencode(twilio_callback(CallStatus="ringing", CallDuration="")),
        headers=form,
    )
    assert ringing.status_code == 200 and ringing.json()["stored"] == 0
    assert len(stored(server.home)) == before

    done = twilio_callback()
    for _ in range(2):  # Twilio retries a callback it did not get a 2xx for
        answer = post(server, path, keys["call"], data=urlencode(done), headers=form)
        assert answer.status_code == 200 and answer.json()["stored"] == 1
    missed = twilio_callback(
        CallSid="CA00000000000000000000000000000002",
        CallStatus="no-answer",
        Direction="outbound-api",
        CallDuration="0",
        From="+15558675310",
        To="+44 20 7946 0958",
    )
    machine = twilio_callback(
        CallSid="CA00000000000000000000000000000003", AnsweredBy="machine_start"
    )
    for callback in (missed, machine):
        assert post(server, path, keys["call"], data=urlencode(callback), headers=form).ok

    events = stored(server.home)
    assert len(events) == before + 3
    answered = events[event_id("twilio", f"twilio:{done['CallSid']}")]
    assert answered.type == "call_completed"
    assert answered.payload == {
        "call_id": done["CallSid"],
        "direction": "inbound",
        "duration_seconds": 42,
        "outcome": "answered",
    }
    assert answered.identifiers == {"phone": "+14155552671"}  # the caller, not our number
    assert answered.occurred_at == dt.datetime(2026, 11, 16, 17, 20, 1, tzinfo=dt.UTC)
    outbound = events[event_id("twilio", f"twilio:{missed['CallSid']}")]
    assert outbound.payload["outcome"] == "missed" and outbound.payload["direction"] == "outbound"
    assert outbound.identifiers == {"phone": "+442079460958"}
    voicemail = events[event_id("twilio", f"twilio:{machine['CallSid']}")]
    assert voicemail.payload["outcome"] == "voicemail"

    bad = post(server, path, keys["call"], data=b"\xff\xfe", headers=form)
    assert bad.status_code == 400 and "x-www-form-urlencoded" in bad.json()["message"]
    no_number = post(
        server, path, keys["call"], data=urlencode(twilio_callback(From="anonymous")), headers=form
    )
    assert no_number.status_code == 200
    assert no_number.json()["rejected"][0]["problems"] == ["From: not an E.164 phone number"]
    wrong_key = post(server, path, keys["email"], data=urlencode(done), headers=form)
    assert wrong_key.status_code == 403
    assert post(server, path, None, data=urlencode(done), headers=form).status_code == 401


def test_generic_json_webhooks_for_chat_and_social(served: tuple[Server, dict[str, str]]) -> None:
    server, keys = served
    chat = {
        "id": "msg-1001",
        "conversation_id": "conv-77",
        "direction": "inbound",
        "text": "Is the blue one in stock?",
        "occurred_at": "2026-11-20T09:15:00+01:00",
        "contact": {"email": "Example@Test.com", "name": "Ex Ample"},
    }
    answer = post(server, "/webhooks/chat", keys["chat"], data=orjson.dumps(chat))
    assert answer.status_code == 200 and answer.json()["stored"] == 1
    mention = {
        "id": "tw-555",
        "network": "x",
        "url": "https://x.com/someone/status/555",
        "text": "@shop the blue one is great",
        "sentiment": "positive",
        "occurred_at": "2026-11-20T10:00:00Z",
        "author": {"handle": "@SomeOne"},
    }
    broken = {"id": "tw-556", "network": "myspace", "text": "hi", "author": {"handle": "x"}}
    answer = post(server, "/webhooks/social", keys["social"], data=orjson.dumps([mention, broken]))
    assert answer.status_code == 200
    assert answer.json()["stored"] == 1
    assert "network" in answer.json()["rejected"][0]["problems"][0]

    events = stored(server.home)
    message = events[event_id("intercom", "chat:msg-1001")]
    assert message.type == "chat_message" and message.payload["text"] == chat["text"]
    assert message.occurred_at == dt.datetime(2026, 11, 20, 8, 15, tzinfo=dt.UTC)
    assert message.identifiers == {"email": "example@test.com", "name": "Ex Ample"}
    social = events[event_id("listening", "social:tw-555")]
    assert social.type == "social_mention" and social.identifiers == {"social_handle": "x:someone"}

    not_json = post(server, "/webhooks/chat", keys["chat"], data=b"{nope")
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["message"]
    missing_id = post(server, "/webhooks/chat", keys["chat"], data=orjson.dumps({**chat, "id": ""}))
    assert missing_id.json()["rejected"][0]["problems"][0].startswith("id: missing")
    social_key_for_chat = post(server, "/webhooks/chat", keys["social"], data=orjson.dumps(chat))
    assert social_key_for_chat.status_code == 403


def _mapped_or_refused(mapper: Any, item: Any) -> None:
    received = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    try:
        touch = mapper(item, source="s", received_at=received)
    except MappingError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        return
    if touch is None:  # a Twilio progress status
        return
    try:
        parse_event(dict(touch.event, customer_id="cus_x"))
    except ContractError as exc:
        assert exc.problems


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "event": st.sampled_from(
                [
                    "processed",
                    "delivered",
                    "open",
                    "click",
                    "bounce",
                    "deferred",
                    "dropped",
                    "spamreport",
                    "unsubscribe",
                ]
            )
            | JSON_VALUES,
            "email": st.emails() | JSON_VALUES,
            "timestamp": st.integers() | st.floats() | JSON_VALUES,
            "sg_event_id": st.text(min_size=1, max_size=5) | JSON_VALUES,
            "sg_message_id": JSON_VALUES,
            "url": JSON_VALUES,
            "reason": JSON_VALUES,
            "type": st.sampled_from(["bounce", "blocked"]) | JSON_VALUES,
            "marketing_campaign_id": JSON_VALUES,
        },
    )
    | JSON_VALUES
)
def test_any_sendgrid_event_is_mapped_or_refused_never_raises(item: Any) -> None:
    _mapped_or_refused(map_sendgrid, item)


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            k: st.text(max_size=30)
            for k in (
                "CallSid",
                "CallStatus",
                "Direction",
                "From",
                "To",
                "CallDuration",
                "Timestamp",
                "AnsweredBy",
            )
        },
    ),
    st.sampled_from(["completed", "busy", "no-answer", "failed", "ringing"]),
)
def test_any_twilio_callback_is_mapped_or_refused_never_raises(
    form: dict[str, str], status: str
) -> None:
    _mapped_or_refused(lambda f, **kw: map_twilio_call(f, **kw), form)
    _mapped_or_refused(
        lambda f, **kw: map_twilio_call(f, **kw),
        {"CallSid": "CA1", "From": "+14155552671", **form, "CallStatus": status},
    )


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES, JSON_VALUES)
def test_any_chat_or_social_item_is_mapped_or_refused_never_raises(chat: Any, social: Any) -> None:
    for mapper, item in ((map_chat, chat), (map_social, social)):
        _mapped_or_refused(mapper, item)
        if isinstance(item, dict):
            _mapped_or_refused(mapper, {"id": "x", **item, "contact": item, "author": item})
