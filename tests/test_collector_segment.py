"""The Segment mapping as a function: each call to its contract event, validated by the contract."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.collector.segment import map_message
from ledger.collector.touch import MappingError, normalise_phone
from ledger.contract import ContractError, parse_event
from strategies import JSON_VALUES

RECEIVED = dt.datetime(2026, 11, 1, 12, 0, 0, tzinfo=dt.UTC)


def mapped(msg: dict[str, Any], **kw: Any) -> dict[str, Any]:
    touch = map_message(
        {"anonymousId": "a-1", "messageId": "m-1", **msg}, source="site", received_at=RECEIVED, **kw
    )
    event = dict(touch.event, customer_id="cus_test")
    parse_event(event, strict=True)  # every mapping yields a contract-clean event
    return event


def test_page_takes_url_and_referrer_from_context_page_and_title_from_name() -> None:
    event = mapped(
        {
            "type": "page",
            "name": "Pricing",
            "context": {"page": {"url": "https://x.example/p", "referrer": "https://g.example/"}},
        }
    )
    assert event["type"] == "page_viewed"
    assert event["payload"] == {
        "url": "https://x.example/p",
        "referrer": "https://g.example/",
        "title": "Pricing",
    }


def test_order_completed_money_is_an_exact_decimal_string() -> None:
    event = mapped(
        {
            "type": "track",
            "event": "Order Completed",
            "userId": 42,
            "properties": {"order_id": 9, "revenue": 0.1, "products": [{"quantity": 3}, {}]},
        }
    )
    assert event["type"] == "order_placed" and event["channel"] == "commerce"
    assert event["payload"] == {
        "order_id": "9",
        "total": {"amount": "0.1", "currency": "USD"},
        "items": 4,
    }
    assert event["identifiers"] == {"user_id": "42", "anonymous_id": "a-1"}


def test_track_named_like_a_contract_type_uses_it_and_others_become_web_events() -> None:
    chat = mapped(
        {
            "type": "track",
            "event": "Chat Message",
            "properties": {"conversation_id": "c", "direction": "inbound", "text": "hi"},
        }
    )
    assert chat["type"] == "chat_message" and chat["channel"] == "chat"
    form = mapped(
        {
            "type": "track",
            "event": "Form Submitted",
            "properties": {"form_id": "demo_request", "fields": {"size": 50}},
        }
    )
    assert form["payload"] == {"form_id": "demo_request", "fields": {"size": "50"}}
    other = mapped({"type": "track", "event": "Signed Up", "properties": {"plan": "pro"}})
    assert other["payload"] == {
        "action": "track",
        "name": "Signed Up",
        "properties": {"plan": "pro"},
    }
    with pytest.raises(MappingError, match="event: missing"):
        mapped({"type": "track"})
    # The system's own types are not for sites to write.
    forged = mapped({"type": "track", "event": "customer_forgotten"})
    assert forged["type"] == "web_event"


def test_screen_group_identify_alias() -> None:
    screen = mapped({"type": "screen", "name": "Home", "properties": {"tab": 2}})
    assert screen["payload"] == {"action": "screen", "name": "Home", "properties": {"tab": 2}}
    group = mapped({"type": "group", "groupId": "acme", "traits": {"seats": 5}})
    assert group["payload"] == {"action": "group", "name": "acme", "properties": {"seats": 5}}
    who = mapped(
        {
            "type": "identify",
            "userId": "u",
            "context": {"traits": {"email": "A@B.example"}},
            "traits": {"phone": "+1 (415) 555-2671", "name": "Al"},
        }
    )
    assert who["type"] == "identity_linked" and who["channel"] == "system"
    assert who["identifiers"] == {
        "user_id": "u",
        "anonymous_id": "a-1",
        "email": "a@b.example",
        "phone": "+14155552671",
        "name": "Al",
    }
    alias = mapped({"type": "alias", "userId": "u", "previousId": "old", "anonymousId": None})
    assert alias["identifiers"] == {"user_id": "u", "anonymous_id": "old"}
    with pytest.raises(MappingError, match="alias: needs both previousId and userId"):
        mapped({"type": "alias", "userId": "u"})


def test_clock_skew_correction_and_time_errors() -> None:
    sent = "2026-11-01T15:00:10Z"  # device three hours fast
    called = "2026-11-01T15:00:00Z"
    event = mapped(
        {"type": "page", "properties": {"url": "u:"}, "originalTimestamp": called},
        batch_sent_at=sent,
    )
    assert event["occurred_at"] == RECEIVED - dt.timedelta(seconds=10)
    own = mapped({"type": "page", "properties": {"url": "u:"}, "timestamp": called, "sentAt": sent})
    assert own["occurred_at"] == RECEIVED - dt.timedelta(seconds=10)
    assert mapped({"type": "page", "properties": {"url": "u:"}})["occurred_at"] == RECEIVED
    with pytest.raises(MappingError, match="timestamp: '2026-11-01T15:00:00' has no timezone"):
        mapped({"type": "page", "timestamp": "2026-11-01T15:00:00"})
    with pytest.raises(MappingError, match="sentAt: 'soon' is not an ISO 8601 time"):
        mapped({"type": "page", "timestamp": called}, batch_sent_at="soon")


def test_messages_without_an_id_get_a_content_derived_event_id() -> None:
    base = {"type": "page", "anonymousId": "x", "properties": {"url": "u:"}}
    one = map_message(dict(base), source="s", received_at=RECEIVED).event["event_id"]
    two = map_message(dict(base), source="s", received_at=RECEIVED).event["event_id"]
    other = map_message({**base, "anonymousId": "y"}, source="s", received_at=RECEIVED)
    assert one == two != other.event["event_id"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("+49 151 1234-5678", "+4915112345678"),
        ("0049 151 12345678", "+4915112345678"),
        ("(+1) 415.555.2671", "+14155552671"),
        ("0151 12345678", None),  # national: no country code to assume
        ("+0123456789", None),
        ("anonymous", None),
    ],
)
def test_phone_normalisation_to_e164(given: str, expected: str | None) -> None:
    assert normalise_phone(given) == expected


_TIMES = st.datetimes(
    min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30), timezones=st.just(dt.UTC)
).map(lambda t: t.isoformat())


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["track", "page", "identify", "screen", "group", "alias"])
            | JSON_VALUES,
            "event": st.sampled_from(
                ["Order Completed", "Order Refunded", "Form Submitted", "chat_message", "Clicked"]
            )
            | JSON_VALUES,
            "userId": st.text(max_size=5) | JSON_VALUES,
            "anonymousId": st.text(max_size=5) | JSON_VALUES,
            "previousId": JSON_VALUES,
            "groupId": JSON_VALUES,
            "name": JSON_VALUES,
            "messageId": JSON_VALUES,
            "timestamp": _TIMES | JSON_VALUES,
            "originalTimestamp": _TIMES | JSON_VALUES,
            "sentAt": _TIMES | JSON_VALUES,
            "context": st.fixed_dictionaries(
                {}, optional={"page": JSON_VALUES, "traits": JSON_VALUES}
            )
            | JSON_VALUES,
            "traits": st.fixed_dictionaries(
                {},
                optional={
                    "email": JSON_VALUES | st.emails(),
                    "phone": JSON_VALUES,
                    "name": JSON_VALUES,
                },
            )
            | JSON_VALUES,
            "properties": st.fixed_dictionaries(
                {},
                optional={
                    "url": JSON_VALUES,
                    "order_id": JSON_VALUES,
                    "total": JSON_VALUES,
                    "revenue": JSON_VALUES,
                    "currency": JSON_VALUES,
                    "products": st.lists(
                        st.fixed_dictionaries({}, optional={"quantity": JSON_VALUES})
                    ),
                    "form_id": JSON_VALUES,
                    "fields": JSON_VALUES,
                },
            )
            | JSON_VALUES,
        },
    ),
    _TIMES | JSON_VALUES,
)
def test_any_message_is_mapped_or_refused_with_sentences_never_raises(
    msg: dict[str, Any], batch_sent_at: Any
) -> None:
    try:
        touch = map_message(msg, source="s", received_at=RECEIVED, batch_sent_at=batch_sent_at)
    except MappingError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        return
    try:
        parse_event(dict(touch.event, customer_id="cus_x"))
    except ContractError as exc:
        assert exc.problems
