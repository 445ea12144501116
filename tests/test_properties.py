"""Property-based: random malformed events mixed with valid ones never crash ``append``; each
bad one is rejected with a reason naming a field, every valid one is stored, and re-sending
the batch changes nothing."""

from __future__ import annotations

import copy
import datetime as dt
import json
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SAMPLE_PAYLOADS, build_event
from ledger.contract import (
    CHANNEL_OF,
    CHANNELS,
    EVENT_TYPES,
    ContractError,
    parse_event,
    parse_line,
)
from ledger.ledger import Ledger

# customer_forgotten is written by the ledger itself and its payload has no required field,
# so a random dict is a valid payload for it: leave it out of the bases we mutate.
TYPES = sorted(t for t in EVENT_TYPES if t != "customer_forgotten")
REQUIRED = ["event_id", "customer_id", "channel", "type", "occurred_at", "source", "payload"]
LETTERS = "ghijklmnopqrstuvwxyz"  # no hex digits, no digits: never a UUID or a time

MUTATIONS = [
    "drop", "wrong", "mismatch", "money", "huge", "bigint", "version", "bad_email", "not_a_dict",
    "line",
]  # fmt: skip
PROFILE = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    type_name = draw(st.sampled_from(TYPES))
    moment = draw(
        st.datetimes(
            min_value=dt.datetime(2000, 1, 1),
            max_value=dt.datetime(2026, 1, 1),
            timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=-5, minutes=-30))]),
        )
    )
    event: dict[str, Any] = {
        # Not drawn: ids must stay unique across examples sharing one ledger.
        "event_id": str(uuid.uuid4()),
        "customer_id": draw(st.from_regex(r"\Acus_[0-9]{1,3}\Z")),
        "channel": CHANNEL_OF[type_name],
        "type": type_name,
        "occurred_at": moment.isoformat(),
        "source": draw(st.text(min_size=1, max_size=30)),
        "payload": copy.deepcopy(SAMPLE_PAYLOADS[type_name]),
    }
    if draw(st.booleans()):
        event["identifiers"] = {"name": draw(st.text(min_size=1, max_size=40))}
    if draw(st.booleans()):
        event["extra_note"] = draw(st.text(max_size=20))  # kept in `extra` (lax mode)
    return event


WRONG_SHAPES = st.one_of(
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(LETTERS, max_size=3), st.integers(), max_size=2),
)

INVALID_VALUE = {
    "event_id": st.one_of(WRONG_SHAPES, st.text(LETTERS + " -", max_size=40)),
    "customer_id": st.one_of(
        WRONG_SHAPES,
        st.just(""),
        st.text(max_size=20).map(lambda s: "@" + s),
        st.text("abc", min_size=129, max_size=140),
    ),
    "channel": st.one_of(WRONG_SHAPES, st.text(max_size=12).filter(lambda s: s not in CHANNELS)),
    "type": st.one_of(WRONG_SHAPES, st.text(max_size=20).filter(lambda s: s not in EVENT_TYPES)),
    "occurred_at": st.one_of(
        WRONG_SHAPES,
        st.text(LETTERS, max_size=25),
        st.datetimes(timezones=st.none()).map(dt.datetime.isoformat),  # naive
        st.integers(2101, 9000).map(lambda y: f"{y}-01-01T00:00:00Z"),  # the future
    ),
    "source": st.one_of(WRONG_SHAPES, st.just(""), st.text("xyz", min_size=201, max_size=300)),
    "payload": st.one_of(
        st.none(), st.booleans(), st.lists(st.integers(), max_size=3), st.text(max_size=10)
    ),
}


@st.composite
def malformed(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    """A mutation of ``base`` that no reading of the contract can accept."""
    event = copy.deepcopy(base)
    kind = draw(st.sampled_from(MUTATIONS))
    if kind == "drop":
        del event[draw(st.sampled_from(REQUIRED))]
    elif kind == "wrong":
        field = draw(st.sampled_from(REQUIRED))
        event[field] = draw(INVALID_VALUE[field])
    elif kind == "mismatch":
        event["channel"] = draw(st.sampled_from([c for c in CHANNELS if c != event["channel"]]))
    elif kind == "money":
        event["type"], event["channel"] = "order_placed", "commerce"
        amount = draw(
            st.one_of(
                st.floats(allow_nan=False, allow_infinity=False),  # never a binary float
                st.integers(max_value=-1).map(str),  # negative
                st.text(LETTERS, min_size=1, max_size=8),  # not a number
                st.builds("{}.{:06d}".format, st.integers(0, 10**6), st.integers(0, 999_999)),
            )
        )
        currency = draw(st.sampled_from(["EUR", "eur", "EURO"]))
        event["payload"] = {"order_id": "o", "total": {"amount": amount, "currency": currency}}
    elif kind == "huge":
        event["source"] = "s" * draw(st.integers(33_000, 40_000))  # over 32 KiB as a whole
    elif kind == "bigint":
        event["schema_version"] = draw(st.integers(min_value=2**64, max_value=2**80))
    elif kind == "version":
        event["schema_version"] = draw(st.integers().filter(lambda v: v != 1))
    elif kind == "bad_email":
        event["identifiers"] = {"email": draw(st.text(LETTERS, max_size=10))}  # no "@"
    elif kind == "not_a_dict":
        return draw(
            st.one_of(
                st.none(),
                st.integers(),
                st.lists(st.integers(), max_size=3),
                st.just(event["type"]),
            )
        )
    elif kind == "line":
        # Raw bytes that are not one JSON object: garbage, truncation, or a JSON array.
        text = json.dumps(event)
        return draw(
            st.one_of(
                st.binary(max_size=60).filter(lambda b: not b.strip().startswith(b"{")),
                st.integers(1, len(text) - 1).map(lambda n: text[:n].encode()),
                st.just(("[" + text + "]").encode()),
            )
        )
    if draw(st.booleans()):
        # The same broken event as a JSON line, as the file and Kafka paths receive it.
        try:
            return json.dumps(event).encode()
        except (TypeError, ValueError):
            return event
    return event


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[Any], list[int]]:
    """A shuffled mix of valid events and malformed ones; returns it with the bad indices."""
    valid = draw(st.lists(valid_events(), min_size=0, max_size=6))
    bad = [draw(malformed(draw(valid_events()))) for _ in range(draw(st.integers(1, 8)))]
    tagged = [(e, False) for e in valid] + [(b, True) for b in bad]
    order = draw(st.permutations(range(len(tagged))))
    mixed = [tagged[i] for i in order]
    return [item for item, _ in mixed], [i for i, (_, is_bad) in enumerate(mixed) if is_bad]


@PROFILE
@given(batch=batches())
def test_malformed_events_are_rejected_and_valid_ones_land(
    ledger: Ledger, batch: tuple[list[Any], list[int]]
) -> None:
    inputs, bad = batch
    valid_ids = {
        item["event_id"] for i, item in enumerate(inputs) if i not in bad and isinstance(item, dict)
    }
    before = ledger.position
    result = ledger.append(inputs)
    assert sorted(r.index for r in result.rejected) == bad
    for rejection in result.rejected:
        assert rejection.problems, rejection
        for problem in rejection.problems:
            field, _, reason = problem.partition(": ")
            assert field and reason.strip(), problem
    assert (result.accepted, result.duplicates) == (len(valid_ids), 0)
    stored = ledger.read(after=before, limit=100)
    assert {e.event_id for e in stored} == valid_ids
    assert [e.position for e in stored] == list(range(before + 1, before + len(valid_ids) + 1))
    # Re-sending the whole batch (a retry) stores nothing new and rejects the same inputs.
    again = ledger.append(inputs)
    assert (again.accepted, again.duplicates) == (0, len(valid_ids))
    assert [r.index for r in again.rejected] == bad
    assert ledger.position == before + len(valid_ids)


@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_any_bytes_or_text_either_parse_or_raise_contract_error(raw: bytes | str) -> None:
    try:
        parse_line(raw)
    except ContractError as exc:
        assert exc.problems and all(p.strip() for p in exc.problems)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Whole minutes: what ISO 8601 offsets carry (seconds in an offset are another rejection path).
OFFSETS = st.integers(-23 * 60, 23 * 60).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))
ANY_TIME = st.one_of(
    st.datetimes(timezones=OFFSETS | st.none()),
    # The calendar's ends, where an offset can push the UTC equivalent out of range.
    st.datetimes(max_value=dt.datetime(1, 1, 2), timezones=OFFSETS),
    st.datetimes(min_value=dt.datetime(9999, 12, 31), timezones=OFFSETS),
).map(dt.datetime.isoformat)

FIELD_PATHS = [
    *REQUIRED, "identifiers", "schema_version", "payload.url", "payload.total", "payload.text",
    "payload.fields", "payload.items", "payload.duration_seconds",
]  # fmt: skip


@PROFILE
@given(
    base=valid_events(),
    path=st.sampled_from(FIELD_PATHS),
    value=st.one_of(JSON_VALUES, ANY_TIME),
    as_line=st.booleans(),
)
def test_any_value_in_any_field_is_stored_or_rejected_never_raised(
    ledger: Ledger, base: dict[str, Any], path: str, value: Any, as_line: bool
) -> None:
    """No oracle here: whatever the value, append must answer with a verdict, not a crash."""
    target = base
    *parents, leaf = path.split(".")
    for parent in parents:
        target = target[parent]
    target[leaf] = value
    item: Any = base
    if as_line:
        try:
            item = json.dumps(base, allow_nan=True).encode()
        except (TypeError, ValueError):
            item = base
    before = ledger.position
    result = ledger.append([item])
    assert result.accepted + len(result.rejected) == 1
    if result.rejected:
        assert result.rejected[0].problems
        assert all(": " in p for p in result.rejected[0].problems)
        assert ledger.position == before
    else:
        [event] = ledger.read(after=before, decrypt=True)
        assert event.event_id == str(uuid.UUID(str(base["event_id"])))


@settings(max_examples=200, deadline=None)
@given(moment=ANY_TIME)
def test_any_timestamp_is_normalised_to_utc_or_rejected_naming_occurred_at(moment: str) -> None:
    try:
        event = parse_event(build_event(occurred_at=moment))
    except ContractError as exc:
        assert all(p.startswith("occurred_at: ") for p in exc.problems), exc.problems
    else:
        assert event.occurred_at.utcoffset() == dt.timedelta(0)
        assert event.occurred_at == dt.datetime.fromisoformat(moment)
