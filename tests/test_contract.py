"""The event contract: what is accepted, what is rejected, and that every reason is actionable."""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from ledger.contract import (
    CHANNEL_OF,
    EVENT_TYPES,
    MAX_EVENT_BYTES,
    ContractError,
    cloudevent_headers,
    parse_event,
    parse_line,
)
from ledger.ledger import Ledger

MakeEvent = Callable[..., dict[str, Any]]


def problems_of(data: Any, *, strict: bool = False) -> list[str]:
    """The contract's reasons for rejecting ``data`` (fails the test if it is accepted)."""
    parse = parse_line if isinstance(data, str | bytes) else parse_event
    with pytest.raises(ContractError) as caught:
        parse(data, strict=strict)
    assert caught.value.problems, "a rejection must carry at least one reason"
    assert str(caught.value) == "; ".join(caught.value.problems)
    return caught.value.problems


def only_problem(data: Any, *, strict: bool = False) -> str:
    found = problems_of(data, strict=strict)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("type_name", sorted(EVENT_TYPES))
def test_every_type_accepts_its_sample_and_round_trips_as_json_line(
    make_event: MakeEvent, type_name: str
) -> None:
    data = make_event("cus_00001", type_name)
    from_dict = parse_event(data)
    from_line = parse_line(json.dumps(data))
    assert from_dict == from_line
    assert from_dict.type == type_name  # type: ignore[attr-defined]
    assert from_dict.channel == CHANNEL_OF[type_name]


def test_naive_timestamp_is_rejected_naming_occurred_at(make_event: MakeEvent) -> None:
    reason = only_problem(make_event(occurred_at="2026-03-01T12:00:00"))
    assert reason.startswith("occurred_at:")
    assert "'2026-03-01T12:00:00'" in reason  # what was given
    assert "timezone" in reason and "2026-03-01T12:00:00Z" in reason  # what is expected


def test_aware_timestamps_are_normalised_to_utc(make_event: MakeEvent) -> None:
    event = parse_event(make_event(occurred_at="2026-03-01T14:30:00+02:00"))
    assert event.occurred_at == dt.datetime(2026, 3, 1, 12, 30, tzinfo=dt.UTC)
    assert event.occurred_at.utcoffset() == dt.timedelta(0)


def test_unparseable_and_future_timestamps_name_occurred_at(make_event: MakeEvent) -> None:
    assert only_problem(make_event(occurred_at="yesterday")).startswith("occurred_at:")
    future = only_problem(make_event(occurred_at="2999-01-01T00:00:00Z"))
    assert future.startswith("occurred_at:") and "future" in future


def test_channel_that_does_not_own_the_type_is_rejected_naming_channel(
    make_event: MakeEvent,
) -> None:
    reason = only_problem(make_event(type="email_opened", channel="chat"))
    assert reason.startswith("channel:")
    assert "'email_opened'" in reason and "expected channel 'email'" in reason
    assert "'chat'" in reason


def test_channel_outside_the_list_is_rejected(make_event: MakeEvent) -> None:
    reason = only_problem(make_event(channel="fax"))
    assert reason.startswith("channel:") and "'fax'" in reason and "'web'" in reason


def test_float_money_is_rejected_with_the_decimal_string_to_send(make_event: MakeEvent) -> None:
    data = make_event(
        type="order_placed",
        payload={"order_id": "o-1", "total": {"amount": 19.99, "currency": "EUR"}},
    )
    reason = only_problem(data)
    assert reason.startswith("payload.total.amount:")
    assert "float" in reason and '"19.99"' in reason


def test_float_money_in_a_json_line_is_rejected_too(make_event: MakeEvent) -> None:
    line = json.dumps(make_event(type="order_refunded")).replace('"5.00"', "5.0")
    assert '"amount": 5.0' in line
    assert only_problem(line).startswith("payload.amount.amount:")


@pytest.mark.parametrize("amount", ["19.990", "0.0001", "99999999999999.9999", "7"])
def test_decimal_money_is_kept_exactly(make_event: MakeEvent, ledger: Ledger, amount: str) -> None:
    data = make_event(
        "cus_money",
        "order_placed",
        payload={"order_id": "o-1", "total": {"amount": amount, "currency": "JPY"}},
    )
    event = parse_event(data)
    assert event.payload["total"]["amount"] == Decimal(amount)
    assert str(event.payload["total"]["amount"]) == amount
    assert ledger.append([data]).accepted == 1
    [stored] = ledger.history("cus_money")
    # The exact string survives storage: no float ever sits in between.
    assert stored.payload["total"] == {"amount": amount, "currency": "JPY"}


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        ("-1", "greater than or equal to 0"),
        ("NaN", "finite"),
        ("0.00001", "4 decimal places"),
        # Projections hold money as DECIMAL(18,4): a larger amount would be stored forever
        # in the immutable ledger yet project as NULL, silently dropping revenue.
        ("1E+400", "14 digits"),
        ("100000000000000", "14 digits"),
    ],
)
def test_bad_amounts_are_rejected_naming_the_amount(
    make_event: MakeEvent, amount: str, expected: str
) -> None:
    data = make_event(
        type="order_placed",
        payload={"order_id": "o", "total": {"amount": amount, "currency": "EUR"}},
    )
    reason = only_problem(data)
    assert reason.startswith("payload.total.amount:") and expected in reason
    assert repr(amount) in reason


@pytest.mark.parametrize("currency", ["EURO", "eur", "XYZ", ""])
def test_currency_must_be_an_iso_4217_code(make_event: MakeEvent, currency: str) -> None:
    data = make_event(
        type="order_placed",
        payload={"order_id": "o", "total": {"amount": "1", "currency": currency}},
    )
    reason = only_problem(data)
    assert reason.startswith("payload.total.currency:")
    assert "ISO 4217" in reason and repr(currency) in reason


def test_event_over_32_kib_is_rejected_with_its_size(make_event: MakeEvent) -> None:
    # Stays under every per-field limit, so only the size rule can reject it.
    fields = {f"f{i}": "x" * 1_000 for i in range(40)}
    data = make_event(type="form_submitted", payload={"form_id": "contact", "fields": fields})
    line = json.dumps(data)
    assert len(line) > MAX_EVENT_BYTES
    for given in (data, line):
        reason = only_problem(given)
        assert reason.startswith("event:")
        assert f"is over the limit of {MAX_EVENT_BYTES:,} bytes" in reason
    assert f"{len(line.encode()):,} bytes" in only_problem(line)
    # Just under the limit is fine.
    data["payload"]["fields"] = {f"f{i}": "x" * 1_000 for i in range(30)}
    assert len(json.dumps(data)) < MAX_EVENT_BYTES
    parse_event(data)


def test_unknown_fields_in_strict_mode_are_rejected_naming_each(make_event: MakeEvent) -> None:
    data = make_event(type="page_viewed", utm_campaign="spring", tenant="acme")
    data["payload"]["scroll_depth"] = 80
    found = problems_of(data, strict=True)
    assert len(found) == 3
    for name in ("utm_campaign", "tenant", "payload.scroll_depth"):
        [reason] = [p for p in found if p.startswith(f"{name}:")]
        assert "unknown field" in reason and "strict" in reason
    assert any("'spring'" in p for p in found)  # what was given


def test_unknown_fields_are_kept_in_extra_and_read_back_through_history(
    make_event: MakeEvent, ledger: Ledger
) -> None:
    data = make_event("cus_extra", "page_viewed", utm_campaign="spring", tenant={"id": 7})
    data["payload"]["scroll_depth"] = 80
    lax = ledger.append([data])
    assert (lax.accepted, lax.rejected) == (1, [])
    [event] = ledger.history("cus_extra")
    assert event.extra == {
        "utm_campaign": "spring",
        "tenant": {"id": 7},
        "payload.scroll_depth": 80,
    }
    assert "scroll_depth" not in event.payload  # kept aside, not mixed into the typed payload
    # The same event through a strict append is refused and nothing is stored.
    other = make_event("cus_strict", "page_viewed", utm_campaign="spring")
    strict = ledger.append([other], strict=True)
    assert strict.accepted == 0
    [rejection] = strict.rejected
    assert rejection.problems[0].startswith("utm_campaign:")
    assert rejection.event_id == other["event_id"]
    assert ledger.history("cus_strict") == []


def test_unknown_type_lists_the_known_ones(make_event: MakeEvent) -> None:
    reason = only_problem({**make_event(type="order_placed"), "type": "order_shipped"})
    assert reason.startswith("type:") and "'order_shipped'" in reason
    for known in EVENT_TYPES:
        assert known in reason


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"event_id": ', "not valid JSON"),
        ("not json at all", "not valid JSON"),
        ("", "empty"),
        ("  \n", "empty"),
        ("[1, 2]", "expected a JSON object"),
        ("42", "expected a JSON object"),
        ("null", "expected a JSON object"),
        (b'{"source": "\xff"}', "not valid JSON"),
    ],
)
def test_bad_json_lines_get_one_sentence(line: str | bytes, expected: str) -> None:
    reason = only_problem(line)
    assert reason.startswith("event:") and expected in reason


@pytest.mark.parametrize("value", [None, 42, "text", [1, 2]])
def test_non_dict_inputs_are_rejected(value: Any) -> None:
    with pytest.raises(ContractError) as caught:
        parse_event(value)
    [reason] = caught.value.problems
    assert reason == f"event: expected a JSON object, got {type(value).__name__}"


def test_missing_fields_are_each_named(make_event: MakeEvent) -> None:
    data = make_event(type="chat_message")
    del data["source"], data["customer_id"]
    del data["payload"]["text"]
    found = problems_of(data)
    assert sorted(p.split(":")[0] for p in found) == ["customer_id", "payload.text", "source"]
    assert all("missing" in p for p in found)
    assert only_problem({"event_id": "x"}).startswith("type:")


@pytest.mark.parametrize(
    ("mutate", "field", "given"),
    [
        (lambda d: d.update(event_id="not-a-uuid"), "event_id", "'not-a-uuid'"),
        (lambda d: d.update(customer_id="alice@example.com"), "customer_id", "alice@example"),
        (lambda d: d.update(source=""), "source", "''"),
        (lambda d: d.update(schema_version=2), "schema_version", "2"),
        (lambda d: d.update(payload="text"), "payload", "'text'"),
        (lambda d: d["payload"].update(direction="sideways"), "payload.direction", "'sideways'"),
        (lambda d: d.update(identifiers={"phone": "0151 123"}), "identifiers.phone", "'0151 123'"),
        (lambda d: d.update(identifiers={"email": "nope"}), "identifiers.email", "'nope'"),
    ],
)
def test_each_error_names_the_field_and_what_was_given(
    make_event: MakeEvent, mutate: Callable[[dict[str, Any]], None], field: str, given: str
) -> None:
    data = make_event(type="chat_message")
    mutate(data)
    reason = only_problem(data)
    assert reason.startswith(f"{field}:"), reason
    assert given in reason, reason
    # Past the field name there is a sentence saying what is wrong or expected.
    assert len(reason.split(":", 1)[1].strip()) > 10


def test_all_problems_of_one_event_are_reported_together(make_event: MakeEvent) -> None:
    data = make_event(
        type="order_placed",
        occurred_at="2026-03-01T12:00:00",
        payload={"order_id": "o", "total": {"amount": 1.5, "currency": "EURO"}},
    )
    fields = sorted(p.split(":")[0] for p in problems_of(data))
    assert fields == ["occurred_at", "payload.total.amount", "payload.total.currency"]


def test_parse_event_does_not_mutate_its_input(make_event: MakeEvent) -> None:
    data = make_event(type="order_placed", extra_field=1)
    before = copy.deepcopy(data)
    parse_event(data)
    assert data == before


def test_cloudevents_mapping(make_event: MakeEvent) -> None:
    data = make_event("cus_00042", "email_clicked", occurred_at="2026-03-01T13:00:00+01:00")
    headers = dict(cloudevent_headers(parse_event(data)))
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_id"] == data["event_id"].encode()
    assert headers["ce_source"] == b"test-adapter"
    assert headers["ce_type"] == b"com.ledger.email_clicked"
    assert headers["ce_subject"] == b"cus_00042"
    assert dt.datetime.fromisoformat(headers["ce_time"].decode()) == dt.datetime(
        2026, 3, 1, 12, tzinfo=dt.UTC
    )


@pytest.mark.parametrize("moment", ["9999-12-31T23:00:00-14:00", "0001-01-01T00:30:00+14:00"])
def test_timestamp_outside_the_utc_range_is_rejected_not_crashing(
    make_event: MakeEvent, moment: str
) -> None:
    reason = only_problem(make_event(occurred_at=moment))
    assert reason.startswith("occurred_at:") and repr(moment) in reason


def test_text_that_cannot_be_utf8_is_rejected_not_crashing(
    make_event: MakeEvent, sqlite_settings: Any
) -> None:
    line = json.dumps(make_event()).replace("test-adapter", "bad\ud800source")
    assert "\ud800" in line
    assert only_problem(line).startswith("event:")
    with Ledger.open(sqlite_settings) as ledger:
        good = make_event()
        result = ledger.append([line, good])
    assert result.accepted == 1
    [rejection] = result.rejected
    assert rejection.index == 0 and "UTF-8" in rejection.reason


def test_null_optional_fields_count_as_absent(make_event: MakeEvent, ledger: Ledger) -> None:
    data = make_event(
        "cus_nulls",
        "page_viewed",
        payload={"url": "https://shop.example/a", "title": None, "referrer": None},
        identifiers={"email": None, "anonymous_id": "anon-1"},
    )
    data["schema_version"] = None
    event = parse_event(data)
    assert event.payload == {"url": "https://shop.example/a"}
    assert event.identifiers == {"anonymous_id": "anon-1"}
    assert "schema_version" not in event
    assert ledger.append([data]).accepted == 1
    [stored] = ledger.history("cus_nulls")
    assert stored.payload == {"url": "https://shop.example/a"}
    # A required field is still required when sent as null.
    assert only_problem(make_event("cus_nulls", "page_viewed", payload={"url": None})).startswith(
        "payload.url:"
    )


def test_unknown_field_that_cannot_be_stored_is_rejected_not_crashing(
    make_event: MakeEvent, ledger: Ledger
) -> None:
    huge = 2**70
    data = make_event("cus_big_int", "page_viewed")
    data["payload"]["scroll_depth"] = huge
    result = ledger.append([data, make_event("cus_big_int", "page_viewed")])
    assert result.accepted == 1
    [rejection] = result.rejected
    assert rejection.reason.startswith("payload.scroll_depth:") and "64 bits" in rejection.reason
    assert only_problem(
        make_event("cus_big_int", "page_viewed", payload={"url": "u", "duration_ms": huge})
    ).startswith("payload.duration_ms:")
