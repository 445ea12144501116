"""Lifecycle rules, the RFM segment map and scoring, and the BG/NBD fit (CDNOW)."""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.projection_data import order, project
from ledger.ledger import Ledger
from ledger.projection import churn, lifecycle, rfm, workers
from ledger.settings import Settings

FIXTURES = Path(__file__).parent / "fixtures"
DAY_US = 86_400 * 1_000_000


def touch(n: int, type_: str, day: int, **fields: object) -> lifecycle.Touch:
    return lifecycle.Touch(n, f"e{n}", type_, day * DAY_US, **fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------ lifecycle


def stages(touches: list[lifecycle.Touch]) -> list[tuple[str | None, str]]:
    return [(c.from_stage, c.to_stage) for c in lifecycle.fold("c", touches).changes]


def test_stages_move_forward_only_and_may_skip() -> None:
    assert stages(
        [
            touch(1, "form_submitted", 1, form_id="quote_request"),
            touch(2, "form_submitted", 2, form_id="newsletter_signup"),  # backwards: ignored
            touch(3, "email_clicked", 3),  # below opportunity: ignored
            touch(4, "order_placed", 4),
            touch(5, "order_placed", 5),  # already a customer: no change
        ]
    ) == [(None, "opportunity"), ("opportunity", "customer")]


def test_each_rule_and_its_condition() -> None:
    assert stages([touch(1, "form_submitted", 1, form_id="newsletter_signup")]) == [
        (None, "subscriber")
    ]
    for form in ("contact", "download"):
        assert stages([touch(1, "form_submitted", 1, form_id=form)]) == [(None, "lead")]
    assert stages([touch(1, "form_submitted", 1, form_id="other")]) == []
    assert stages([touch(1, "chat_message", 1, direction="inbound")]) == [(None, "lead")]
    assert stages([touch(1, "chat_message", 1, direction="outbound")]) == []
    answered = {"direction": "inbound", "outcome": "answered"}
    assert stages([touch(1, "call_completed", 1, **answered)]) == [(None, "lead")]
    assert stages([touch(1, "call_completed", 1, direction="inbound", outcome="missed")]) == []
    assert stages([touch(1, "email_clicked", 1)]) == [(None, "marketing_qualified")]
    assert stages([touch(1, "form_submitted", 1, form_id="demo_request")]) == [
        (None, "sales_qualified")
    ]
    assert stages([touch(1, "page_viewed", 1)]) == []


def test_advocate_needs_customer_and_churn_needs_a_lapse() -> None:
    # A happy non-customer is not an advocate.
    assert stages([touch(1, "social_mention", 1, sentiment="positive")]) == []
    assert stages(
        [
            touch(1, "order_placed", 1),
            touch(2, "social_mention", 2, sentiment="negative"),
            touch(3, "ticket_resolved", 3, satisfaction=5),
            touch(4, "email_clicked", 4 + lifecycle.CHURN_AFTER_DAYS - 1),  # not lapsed yet
            touch(5, "email_clicked", 1 + lifecycle.CHURN_AFTER_DAYS),  # lapsed
            touch(6, "social_mention", 400, sentiment="positive"),  # churned: no advocate
            touch(7, "order_placed", 401),
        ]
    ) == [
        (None, "customer"),
        ("customer", "advocate"),
        ("advocate", "churned"),
        ("churned", "customer"),
    ]


def test_fold_orders_by_event_time_and_change_ids_are_deterministic() -> None:
    touches = [
        touch(2, "order_placed", 10),
        touch(1, "form_submitted", 20, form_id="contact"),  # later in time, earlier in log
    ]
    first = lifecycle.fold("c", touches).changes
    again = lifecycle.fold("c", list(reversed(touches))).changes
    assert [c.to_stage for c in first] == ["customer"]
    assert first == again
    assert first[0].change_id == lifecycle.change_id("c", "e2", None, "customer")
    assert lifecycle.change_id("c", "e2", None, "customer") != lifecycle.change_id(
        "d", "e2", None, "customer"
    )


_TOUCHES = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(lifecycle.RELEVANT_TYPES),
        st.integers(min_value=0, max_value=500),  # day: late events and lapses both occur
        st.sampled_from(["newsletter_signup", "contact", "demo_request", "quote_request"]),
        st.sampled_from(["inbound", "outbound"]),
        st.sampled_from(["positive", "negative"]),
        st.sampled_from([3, 5]),
    ),
    max_size=14,
)


@settings(max_examples=150, deadline=None)
@given(rows=_TOUCHES, cut=st.integers(min_value=0, max_value=14))
def test_batch_fold_emits_per_position_what_each_history_gained(
    rows: list[tuple[str, str, int, str, str, str, int]], cut: int
) -> None:
    """The runner's fold of a batch (positions after ``cut``; earlier touches given as
    history) against the definition of the change stream: at position p, the changes in
    the customer's history up to p that were not in it up to p-1. Again with a merge of two
    customers the batch does not touch: it changes nothing but their own cleared row."""
    timeline = [
        (
            customer,
            touch(
                n,
                type_,
                day,
                form_id=form,
                direction=direction,
                outcome="answered",
                sentiment=sentiment,
                satisfaction=score,
            ),
        )
        for n, (customer, type_, day, form, direction, sentiment, score) in enumerate(rows, 1)
    ]
    after = min(cut, len(timeline))
    names = workers.TOUCH_SCHEMA.names
    table = pa.table(
        {"customer_id": [c for c, _ in timeline]}
        | {name: [getattr(t, name) for _, t in timeline] for name in names[1:]},
        schema=workers.TOUCH_SCHEMA,
    )

    def upto(customer: str, position: int) -> list[lifecycle.Change]:
        mine = [t for c, t in timeline if c == customer and t.position <= position]
        return lifecycle.fold(customer, mine).changes

    history = []
    for customer in sorted({c for c, _ in timeline}):
        changes = upto(customer, len(timeline))
        steps = [(customer, step, c.change_id) for step, c in enumerate(changes, 1)]
        history += steps or [(customer, 0, None)]
    stream = []
    for customer, t in timeline[after:]:
        known = {c.change_id for c in upto(customer, t.position - 1)}
        new = [c for c in upto(customer, t.position) if c.change_id not in known]
        stream += [(t.position, k, c.change_id) for k, c in enumerate(new)]

    unrelated = [("zz", "yy", len(timeline) + 1)]
    for merges, cleared in (([], []), (unrelated, [("zz", 0, None)])):
        folded = workers.fold(after, workers.LifecycleInputs(table, merges, []))
        assert isinstance(folded.history, pa.Table) and isinstance(folded.changes, pa.Table)
        got = folded.history.to_pydict()
        assert list(zip(got["customer_id"], got["step"], got["change_id"], strict=True)) == (
            history + cleared
        )
        got = folded.changes.to_pydict()
        assert list(zip(got["ledger_position"], got["k"], got["change_id"], strict=True)) == (
            stream
        )


# ------------------------------------------------------------------ RFM


def test_segment_map_covers_all_125_combinations_exactly_once() -> None:
    combos = [(r, f, m) for r in range(1, 6) for f in range(1, 6) for m in range(1, 6)]
    assert len(combos) == 125
    for combo in combos:
        assert len(rfm.cells_for(*combo)) == 1, combo
    table = rfm.segment_table()
    assert table.num_rows == 125
    assert set(table.column("segment").to_pylist()) == set(rfm.SEGMENTS)
    assert rfm.segment_of(5, 5, 5) == "Champions"
    assert rfm.segment_of(1, 1, 1) == "Lost"
    assert rfm.segment_of(1, 5, 5) == "Can't Lose Them"
    assert rfm.segment_of(5, 1, 1) == "New"
    assert rfm.segment_of(3, 3, 3) == "Need Attention"


def test_rfm_scores_with_ties_sharing_a_score(sqlite_settings: Settings, tmp_path: Path) -> None:
    # Ten buyers b0..b9: the last order 1..10 days before the reference date; one order
    # each except b0 and b1 (3 orders); each order worth (10 - i) * 10.
    events = []
    for i in range(10):
        day = dt.date(2026, 3, 20) - dt.timedelta(days=i + 1)
        for k in range(3 if i < 2 else 1):
            at = f"{day - dt.timedelta(days=k * 30)}T12:00:00Z"
            events.append(order(f"b{i}", at, f"o{i}-{k}", str((10 - i) * 10)))
    with Ledger.open(sqlite_settings) as ledger:
        assert not ledger.append(events).rejected
        with project(ledger, tmp_path / "p.duckdb") as runner:
            runner.set_as_of(dt.datetime(2026, 3, 20, 12, tzinfo=dt.UTC))
            runner.refresh_derived()
            got = {
                r[0]: r[1:]
                for r in runner.con.execute(
                    "SELECT customer_id, recency_days, frequency, r_score, f_score, m_score, "
                    "rfm_cell, segment FROM rfm"
                ).fetchall()
            }
    assert got["b0"][:2] == (1.0, 3)
    # Recency: 10 distinct values, two per quintile, most recent best.
    assert [got[f"b{i}"][2] for i in range(10)] == [5, 5, 4, 4, 3, 3, 2, 2, 1, 1]
    # Frequency: eight customers tie at 1 order and all share the lowest score; the two
    # with 3 orders rank 9th and 10th of 10: 1 + floor(5 * 8 / 10) = 5.
    assert [got[f"b{i}"][3] for i in range(10)] == [5, 5, 1, 1, 1, 1, 1, 1, 1, 1]
    # Monetary: 300, 270, 80, 70, ... 10.
    assert [got[f"b{i}"][4] for i in range(10)] == [5, 5, 4, 4, 3, 3, 2, 2, 1, 1]
    assert got["b0"][5] == "555" and got["b0"][6] == "Champions"
    assert got["b9"][5] == "111" and got["b9"][6] == "Lost"


# ------------------------------------------------------------------ BG/NBD


def cdnow() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with open(FIXTURES / "cdnow_customers_summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    x = np.array([float(r["frequency"]) for r in rows])
    t_x = np.array([float(r["recency"]) for r in rows])
    big_t = np.array([float(r["T"]) for r in rows])
    return x, t_x, big_t


def test_bgnbd_fit_reproduces_the_papers_cdnow_estimates() -> None:
    x, t_x, big_t = cdnow()
    assert len(x) == 2357
    model = churn.fit(x, t_x, big_t)
    # Fader, Hardie & Lee (2005), section 5: r = 0.243, alpha = 4.414, a = 0.793,
    # b = 2.426, log-likelihood -9582.4.
    assert model.converged
    assert model.r == pytest.approx(0.243, abs=0.001)
    assert model.alpha == pytest.approx(4.414, abs=0.005)
    assert model.a == pytest.approx(0.793, abs=0.002)
    assert model.b == pytest.approx(2.426, abs=0.005)
    assert model.log_likelihood == pytest.approx(-9582.4, abs=0.1)
    p = churn.p_alive(model, x, t_x, big_t)
    assert np.all((p > 0) & (p <= 1))
    assert np.all(p[x == 0] == 1.0)  # no repeat purchase: the model cannot see a dropout
    # More repeat purchases at the same recency and age: more expected purchases.
    e = churn.expected_purchases(
        model, 39.0, np.array([1.0, 5.0]), np.array([30.0] * 2), np.array([38.0] * 2)
    )
    assert e[1] > e[0] > 0
    # Same history, long silence since the last purchase: less likely alive.
    quiet = churn.p_alive(
        model, np.array([5.0, 5.0]), np.array([37.0, 5.0]), np.array([38.0, 38.0])
    )
    assert quiet[0] > quiet[1]


def test_risk_bands_and_engagement_fallback() -> None:
    assert [churn.risk_band(p) for p in (0.9, 0.7, 0.5, 0.3, 0.1)] == [
        "low",
        "low",
        "medium",
        "medium",
        "high",
    ]
    assert [churn.engagement_band(d) for d in (0, 30, 31, 90, 91, None)] == [
        "low",
        "low",
        "medium",
        "medium",
        "high",
        "high",
    ]


def test_a_fit_that_stops_on_a_flat_ridge_is_judged_by_its_slope() -> None:
    # (x - 1)^2 + (y - 2)^2 within bounds that cut off y at 1.5: the bounded minimum is
    # (1, 1.5), where the objective pushes against the bound (flat within the bounds).
    def bowl(p: np.ndarray) -> float:
        return float((p[0] - 1.0) ** 2 + (p[1] - 2.0) ** 2)

    bounds = [(-5.0, 5.0), (-5.0, 1.5)]
    assert churn.projected_gradient(bowl, np.array([1.0, 1.5]), bounds) < 1e-8
    assert churn.projected_gradient(bowl, np.array([1.0, 1.0]), bounds) == pytest.approx(2.0)
    assert churn.projected_gradient(bowl, np.array([1.3, 1.5]), bounds) == pytest.approx(0.6)
