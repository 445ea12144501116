"""The synthetic data generator: deterministic, valid, realistic, and honest about its noise."""

from __future__ import annotations

import datetime as dt
import itertools
import subprocess
import sys
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from ledger.cli.app import app
from ledger.contract import EVENT_TYPES, PERSONAL_FIELDS, ContractError, Event, parse_line
from ledger.generate import GenerateError, generate_events, plan, write_jsonl
from ledger.ledger import Ledger
from ledger.settings import Settings

LEDGER = str(Path(sys.executable).with_name("ledger"))


def _gen(customers: int = 150, events: int = 6000, seed: int = 7, **kw: object) -> list[bytes]:
    return list(generate_events(customers, events, seed, **kw))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sample() -> list[bytes]:
    return _gen()


@pytest.fixture(scope="module")
def parsed(sample: list[bytes]) -> list[Event]:
    return [parse_line(line, strict=True) for line in sample]


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(sample: list[bytes]) -> None:
    assert _gen() == sample
    other = _gen(seed=8)
    assert other != sample
    assert not {orjson.loads(x)["event_id"] for x in other} & {
        orjson.loads(x)["event_id"] for x in sample
    }


def test_counts_and_every_customer_present(sample: list[bytes], parsed: list[Event]) -> None:
    assert len(sample) == 6000
    assert all(b"\n" not in line for line in sample)
    customers = {e.customer_id for e in parsed}
    assert customers == {f"cus_{i:06d}" for i in range(1, 151)}
    assert len({e.event_id for e in parsed}) == 6000


def test_every_line_validates_strictly(sample: list[bytes]) -> None:
    for line in sample:
        parse_line(line, strict=True)  # raises ContractError naming the problem


def test_the_mix_has_every_producer_event_type(parsed: list[Event]) -> None:
    types = Counter(e.type for e in parsed)
    # Written by the ledger itself (forget, identity stitching) or only by the HTTP
    # collector's mappings (generic track events, SendGrid deliveries): not generated.
    not_generated = {
        "customer_forgotten",
        "identity_linked",
        "identity_link_refused",
        "customers_merged",
        "web_event",
        "email_delivered",
    }
    assert not_generated <= set(EVENT_TYPES)
    assert set(types) == set(EVENT_TYPES) - not_generated
    # Web traffic dominates, as it does in a real CDP; orders are a few percent.
    assert types["page_viewed"] > len(parsed) * 0.3
    assert 0.005 < types["order_placed"] / len(parsed) < 0.15


def test_times_stay_in_the_period_and_never_in_the_future(parsed: list[Event]) -> None:
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    assert all(start <= e.occurred_at < start + dt.timedelta(days=365) for e in parsed)
    custom = [
        parse_line(x).occurred_at
        for x in _gen(20, 500, start=dt.datetime(2024, 3, 1, tzinfo=dt.UTC), days=30)
    ]
    assert min(custom) >= dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
    assert max(custom) < dt.datetime(2024, 3, 31, tzinfo=dt.UTC)
    with pytest.raises(GenerateError, match="future"):
        plan(10, 100, start=dt.datetime.now(dt.UTC) - dt.timedelta(days=10), days=30)


def test_a_few_percent_arrive_late(parsed: list[Event]) -> None:
    newest = parsed[0].occurred_at
    late = 0
    for event in parsed:
        if event.occurred_at < newest - dt.timedelta(hours=1):
            late += 1
        newest = max(newest, event.occurred_at)
    assert 0.01 < late / len(parsed) < 0.08
    # ...and the rest is in arrival order: no big jumps backwards among on-time events.
    in_order = sum(
        a.occurred_at <= b.occurred_at + dt.timedelta(minutes=1)
        for a, b in itertools.pairwise(parsed)
    )
    assert in_order / len(parsed) > 0.9


def test_some_customers_timelines_arrive_out_of_order(parsed: list[Event]) -> None:
    newest: dict[str, dt.datetime] = {}
    shuffled: set[str] = set()
    for event in parsed:
        seen = newest.get(event.customer_id)
        if seen and event.occurred_at < seen - dt.timedelta(hours=1):
            shuffled.add(event.customer_id)
        newest[event.customer_id] = max(seen or event.occurred_at, event.occurred_at)
    assert len(shuffled) >= 10


def test_a_generated_batch_lands_in_a_real_ledger(sqlite_settings: Settings) -> None:
    lines = _gen(40, 800, seed=9, duplicates=0.05, invalid=0.05)
    with Ledger.open(sqlite_settings) as ledger:
        result = ledger.append(lines)
        assert (result.accepted, result.duplicates, len(result.rejected)) == (720, 40, 40)
        assert ledger.verify().ok
        assert ledger.stats().customers == 40


def test_personal_data_is_where_encryption_applies(parsed: list[Event]) -> None:
    def known(field: str) -> set[str]:
        return {e.identifiers[field] for e in parsed if e.identifiers and field in e.identifiers}

    emails, phones, names = known("email"), known("phone"), known("name")
    assert len(emails) > 30 and len(phones) > 10 and len(names) > 10
    assert all(phone.startswith("+") and phone[1:].isdigit() for phone in phones)
    chats = [e.payload["text"] for e in parsed if e.type == "chat_message"]
    assert any(email in text for text in chats for email in emails)
    # Fields outside identifiers and the personal payload fields are stored in the clear:
    # no email, phone or name of the customer may appear there.
    for e in parsed:
        personal = PERSONAL_FIELDS[e.type]
        clear = {k: v for k, v in e.payload.items() if k not in personal}
        text = orjson.dumps(clear, default=str).decode()
        ids = e.identifiers or {}
        for field in ("email", "phone", "name"):
            assert field not in ids or ids[field] not in text, (e.type, text)


def test_journeys_look_like_a_business(parsed: list[Event]) -> None:
    orders: dict[str, list[Event]] = defaultdict(list)
    for e in parsed:
        if e.type == "order_placed":
            orders[e.customer_id].append(e)
    buyers = len(orders)
    repeat = sum(len(v) > 1 for v in orders.values())
    assert 10 < buyers < 150 and repeat >= 3
    # Mostly one currency per customer.
    for placed in orders.values():
        currencies = Counter(o.payload["total"]["currency"] for o in placed)
        assert currencies.most_common(1)[0][1] >= len(placed) * 0.5
    # Money is exact decimals.
    totals = [o.payload["total"]["amount"] for v in orders.values() for o in v]
    assert all(isinstance(t, Decimal) and t > 0 for t in totals)
    # Refunds refer to orders of the same customer.
    placed_ids = {(c, o.payload["order_id"]) for c, v in orders.items() for o in v}
    refunds = [e for e in parsed if e.type == "order_refunded"]
    assert refunds and all((r.customer_id, r.payload["order_id"]) in placed_ids for r in refunds)
    # Sign-ups use the forms the lifecycle rules know.
    forms = {e.payload["form_id"] for e in parsed if e.type == "form_submitted"}
    assert forms == {"newsletter_signup", "contact", "download", "demo_request", "quote_request"}
    # Every ticket that is resolved was opened first, by the same customer, earlier.
    opened = {e.payload["ticket_id"]: e for e in parsed if e.type == "ticket_opened"}
    for e in parsed:
        if e.type == "ticket_resolved":
            first = opened[e.payload["ticket_id"]]
            assert first.customer_id == e.customer_id and first.occurred_at <= e.occurred_at


def test_seasonality_peaks_in_q4_and_dips_at_night() -> None:
    events = [parse_line(x) for x in _gen(300, 20_000, seed=3)]
    months = Counter(e.occurred_at.month for e in events)
    assert months[11] + months[12] > months[7] + months[8]
    hours = Counter(e.occurred_at.hour for e in events)
    assert hours[3] * 3 < hours[19]


def test_duplicates_and_invalid_fractions_are_exact() -> None:
    lines = _gen(100, 4000, seed=11, duplicates=0.05, invalid=0.03)
    assert len(lines) == 4000
    valid, problems, seen = [], [], {}
    duplicates = 0
    for line in lines:
        try:
            event = parse_line(line)
        except ContractError as exc:
            problems.append(exc.problems[0])
            continue
        if event.event_id in seen:
            assert seen[event.event_id] == line  # an exact repeat
            duplicates += 1
        else:
            seen[event.event_id] = line
            valid.append(line)
    assert len(problems) == 120
    assert all(line.decode() for line in lines)  # even broken lines stay UTF-8 text
    assert duplicates == 200
    assert len(valid) == 4000 - 200 - 120
    # The mistakes are varied, as real producers' are.
    kinds = {
        "timezone": any("no timezone" in p for p in problems),
        "float": any("binary float" in p for p in problems),
        "channel": any("expected channel" in p for p in problems),
        "type": any("unknown event type" in p for p in problems),
        "missing": any("missing" in p for p in problems),
        "json": any("not valid JSON" in p for p in problems),
    }
    assert all(kinds.values()), kinds
    # Noise does not change the valid events a seed gives.
    assert valid == _gen(100, 4000 - 320, seed=11)


def test_bad_arguments_are_refused_with_a_sentence() -> None:
    with pytest.raises(GenerateError, match="customers"):
        plan(0, 10)
    with pytest.raises(GenerateError, match="at least one"):
        plan(100, 50)
    with pytest.raises(GenerateError, match="duplicates"):
        plan(1, 10, duplicates=1.0)
    with pytest.raises(GenerateError, match="timezone"):
        plan(1, 10, start=dt.datetime(2025, 1, 1))


def test_write_jsonl_writes_lines_and_reports(tmp_path: Path) -> None:
    target = tmp_path / "events.jsonl"
    seen: list[int] = []
    summary = write_jsonl(target, 20, 500, 1, on_progress=seen.append)
    data = target.read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 500 == summary.lines
    assert data.splitlines() == _gen(20, 500, seed=1)
    assert summary.bytes == len(data) and seen[-1] == 500


def test_cli_writes_a_file_and_a_summary(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    args = [LEDGER, "generate", "--customers", "30", "--events", "900", "--seed", "5"]
    done = subprocess.run([*args, "-o", str(target)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wrote 900 lines" in done.stderr
    assert target.read_bytes().splitlines() == _gen(30, 900, seed=5)
    piped = subprocess.run(args, capture_output=True)
    assert piped.returncode == 0 and piped.stdout == target.read_bytes()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--customers", "-1"], "customers"),
        (["--events", "-5"], "events"),
        (["--customers", "50", "--events", "10"], "at least one"),
        (["--start", "2025-13-01"], "--start"),
        (["--start", "2025-01-01T00:00:00"], "timezone"),
        (["--start", "2099-01-01"], "future"),
        (["--invalid", "2"], "invalid"),
        (["--days", "0"], "days"),
        (["--events", "many"], "--events"),
    ],
)
def test_cli_bad_arguments_exit_2(extra: list[str], message: str) -> None:
    done = CliRunner().invoke(app, ["generate", *extra])
    assert done.exit_code == 2, done.output
    assert message in done.output
    assert done.exception is None or isinstance(done.exception, SystemExit)


def test_cli_bad_arguments_exit_2_from_the_installed_command() -> None:
    done = subprocess.run([LEDGER, "generate", "--customers", "0"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "customers: 0 is too few" in done.stderr and "Traceback" not in done.stderr


def test_cli_help_explains_every_option() -> None:
    done = CliRunner().invoke(app, ["generate", "--help"], terminal_width=200)
    assert done.exit_code == 0
    for option in ("--customers", "--events", "--seed", "--output", "--start", "--days"):
        assert option in done.output
    assert "--duplicates" in done.output and "--invalid" in done.output
    assert "deterministic for a seed" in done.output
