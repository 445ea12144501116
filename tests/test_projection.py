"""Projection runner: a scripted journey with hand-computed tables, late events, forget,
rebuild equals incremental (SQLite, and the journey on PostgreSQL too)."""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from fixtures.projection_data import (
    assert_same_tables,
    event,
    following,
    generated,
    order,
    project,
    rows,
)
from ledger.ledger import Ledger
from ledger.projection import lifecycle
from ledger.projection.definitions import sql
from ledger.projection.runner import MAINTENANCE_SPACING, ProjectionRunner
from ledger.settings import Settings

UTC = dt.UTC


def t(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def alice_and_bob() -> list[dict]:
    a = "cus_alice"
    return [
        event(
            a,
            "2026-01-05T09:00:00Z",
            "page_viewed",
            {"url": "https://shop/"},
            {"anonymous_id": "anon-1"},
        ),
        event(
            a,
            "2026-01-05T09:05:00Z",
            "form_submitted",
            {"form_id": "newsletter_signup", "fields": {"note": "hi"}},
            {"email": "alice@example.com", "name": "Alice"},
        ),
        event(
            a,
            "2026-01-06T10:00:00Z",
            "consent_changed",
            {"purpose": "email_marketing", "status": "granted"},
        ),
        event(a, "2026-01-07T10:00:00Z", "email_sent", {"message_id": "m1"}),
        event(
            a, "2026-01-08T10:00:00Z", "email_clicked", {"message_id": "m1", "url": "https://x/"}
        ),
        event(a, "2026-01-10T10:00:00Z", "form_submitted", {"form_id": "demo_request"}),
        event(a, "2026-01-12T10:00:00Z", "form_submitted", {"form_id": "quote_request"}),
        order(a, "2026-01-15T10:00:00Z", "o1", "100.00"),
        event(a, "2026-01-20T10:00:00Z", "ticket_opened", {"ticket_id": "t1"}),
        event(a, "2026-01-21T10:00:00Z", "ticket_resolved", {"ticket_id": "t1", "satisfaction": 5}),
        event(a, "2026-01-22T10:00:00Z", "ticket_opened", {"ticket_id": "t2"}),
        event(
            a,
            "2026-02-01T10:00:00Z",
            "order_refunded",
            {"order_id": "o1", "amount": {"amount": "20.00", "currency": "EUR"}},
        ),
        order(a, "2026-09-01T10:00:00Z", "o2", "50.00"),
        event(
            "cus_bob",
            "2026-03-01T10:00:00Z",
            "chat_message",
            {"conversation_id": "c1", "direction": "inbound", "text": "hello"},
            {"phone": "+4915112345678"},
        ),
        event(
            "cus_bob",
            "2026-03-02T10:00:00Z",
            "call_completed",
            {
                "call_id": "k1",
                "direction": "outbound",
                "duration_seconds": 60,
                "outcome": "answered",
            },
        ),
    ]


def one(con: duckdb.DuckDBPyConnection, sql: str) -> dict:
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    found = cur.fetchall()
    assert len(found) == 1, f"{sql}: {len(found)} rows"
    return dict(zip(names, found[0], strict=True))


def test_scripted_journey_in_every_table(settings: Settings, tmp_path: Path) -> None:
    with Ledger.open(settings) as ledger:
        ledger.append(alice_and_bob())
        # A late event: it occurred before everything else but arrives last.
        late = event("cus_alice", "2026-01-03T08:00:00Z", "page_viewed", {"url": "https://a/"})
        ledger.append([late])
        with project(ledger, tmp_path / "p.duckdb", batch_size=4) as runner:
            con = runner.con
            c = one(con, "SELECT * FROM customer_360 WHERE customer_id = 'cus_alice'")
            assert c["email"] == "alice@example.com"
            assert c["name"] == "Alice"
            assert c["anonymous_id"] == "anon-1"
            assert c["phone"] is None and c["erased"] is False
            assert c["first_seen"] == t("2026-01-03T08:00:00Z")  # the late event
            assert c["last_seen"] == t("2026-09-01T10:00:00Z")
            assert c["events"] == 14
            assert (c["web_events"], c["email_events"], c["commerce_events"]) == (5, 2, 3)
            assert (c["support_events"], c["system_events"], c["chat_events"]) == (3, 1, 0)
            assert (c["page_viewed"], c["form_submitted"], c["email_clicked"]) == (2, 3, 1)
            assert c["orders"] == 2
            assert c["revenue"] == Decimal("150")
            assert c["refunds"] == Decimal("20")
            assert c["net_revenue"] == Decimal("130")
            assert c["currencies"] == "EUR"
            assert c["open_tickets"] == 1
            assert c["last_contact_at"] == t("2026-01-12T10:00:00Z")
            assert c["last_contact_channel"] == "web"
            assert c["consent_email_marketing"] == "granted"
            assert c["consent_tracking"] is None
            assert c["lifecycle_stage"] == "customer"
            assert c["lifecycle_since"] == t("2026-09-01T10:00:00Z")
            assert c["rfm_segment"] is not None and c["churn_risk"] in ("low", "medium", "high")

            history = con.execute(
                "SELECT step, from_stage, to_stage, occurred_at FROM lifecycle_history "
                "WHERE customer_id = 'cus_alice' ORDER BY step"
            ).fetchall()
            assert [(h[1], h[2]) for h in history] == [
                (None, "subscriber"),
                ("subscriber", "marketing_qualified"),
                ("marketing_qualified", "sales_qualified"),
                ("sales_qualified", "opportunity"),
                ("opportunity", "customer"),
                ("customer", "advocate"),
                ("advocate", "churned"),
                ("churned", "customer"),
            ]
            assert [h[0] for h in history] == list(range(1, 9))
            assert history[5][3] == t("2026-01-21T10:00:00Z")
            # Churn and reactivation are both caused by the order that came 229 days later.
            assert history[6][3] == history[7][3] == t("2026-09-01T10:00:00Z")
            lc = one(con, "SELECT * FROM lifecycle WHERE customer_id = 'cus_alice'")
            assert (lc["stage"], lc["previous_stage"], lc["transitions"]) == (
                "customer",
                "churned",
                8,
            )
            bob = one(con, "SELECT * FROM customer_360 WHERE customer_id = 'cus_bob'")
            assert bob["phone"] == "+4915112345678"
            assert bob["lifecycle_stage"] == "lead"  # the outbound call changes nothing
            assert bob["orders"] == 0 and bob["rfm_segment"] is None
            assert bob["churn_method"] == "engagement"
            assert bob["last_contact_channel"] == "call"

            # The stream: every change, in order, with ids matching the history.
            stream = con.execute(
                "SELECT seq, customer_id, to_stage, CAST(change_id AS VARCHAR), "
                "CAST(event_id AS VARCHAR) FROM lifecycle_changes ORDER BY seq"
            ).fetchall()
            assert [s[0] for s in stream] == list(range(1, 10))
            assert [s[2] for s in stream if s[1] == "cus_alice"][-2:] == ["churned", "customer"]
            for s in stream:
                assert s[3] == lifecycle.change_id(
                    s[1],
                    s[4],
                    con.execute(
                        "SELECT from_stage FROM lifecycle_changes WHERE seq = ?", [s[0]]
                    ).fetchall()[0][0],
                    s[2],
                )
            state = one(con, "SELECT * FROM projection_state, derived_state")
            assert state["position"] == state["derived_position"] == 16
            assert state["as_of"] == t("2026-09-01T10:00:00Z")

            r = one(con, "SELECT * FROM rfm WHERE customer_id = 'cus_alice'")
            assert r["frequency"] == 2 and r["monetary"] == Decimal("130")
            assert r["recency_days"] == 0.0
            assert (r["r_score"], r["f_score"], r["m_score"]) == (1, 1, 1)  # the only buyer
            assert r["segment"] == "Lost"


def test_late_events_rewrite_first_seen_rfm_and_lifecycle(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    with Ledger.open(sqlite_settings) as ledger:
        ledger.append([order("cus_c", "2025-06-01T00:00:00Z", "o2", "10")])
        runner = project(ledger, tmp_path / "p.duckdb")
        con = runner.con
        assert con.execute("SELECT first_seen, lifecycle_stage FROM customer_360").fetchall() == [
            (t("2025-06-01T00:00:00Z"), "customer")
        ]
        ledger.append([order("cus_c", "2025-02-01T00:00:00Z", "o1", "5")])  # late
        runner.run()
        assert con.execute(
            "SELECT first_seen, first_order_at, orders FROM customer_360"
        ).fetchall() == [(t("2025-02-01T00:00:00Z"), t("2025-02-01T00:00:00Z"), 2)]
        history = con.execute(
            "SELECT to_stage, occurred_at, event_position FROM lifecycle_history"
        ).fetchall()
        assert history == [("customer", t("2025-02-01T00:00:00Z"), 2)]
        # The stream keeps what it published and adds the new fact, in ledger order.
        assert con.execute(
            "SELECT seq, occurred_at, ledger_position FROM lifecycle_changes ORDER BY seq"
        ).fetchall() == [
            (1, t("2025-06-01T00:00:00Z"), 1),
            (2, t("2025-02-01T00:00:00Z"), 2),
        ]
        assert con.execute("SELECT frequency, monetary, last_order_at FROM rfm").fetchall() == [
            (2, Decimal("15"), t("2025-06-01T00:00:00Z"))
        ]
        # A late order inside a lapse removes the churn it had caused.
        ledger.append([order("cus_c", "2026-01-01T00:00:00Z", "o3", "1")])
        runner.run()
        stages = "SELECT to_stage FROM lifecycle_history ORDER BY step"
        assert [r[0] for r in con.execute(stages).fetchall()] == [
            "customer",
            "churned",
            "customer",
        ]
        ledger.append([order("cus_c", "2025-10-01T00:00:00Z", "o4", "1")])  # late, fills gap
        runner.run()
        assert [r[0] for r in con.execute(stages).fetchall()] == ["customer"]
        runner.close()
        with project(ledger, tmp_path / "rebuilt.duckdb") as rebuilt:
            assert_same_tables(
                runner_con := duckdb.connect(str(tmp_path / "p.duckdb")), rebuilt.con
            )
            runner_con.close()


def test_forget_erases_identifiers_and_rebuild_agrees(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    with Ledger.open(sqlite_settings) as ledger:
        ledger.append(alice_and_bob())
        runner = project(ledger, tmp_path / "p.duckdb", batch_size=5)
        email = "SELECT email, name, erased FROM customer_360 WHERE customer_id = 'cus_alice'"
        assert runner.con.execute(email).fetchall() == [("alice@example.com", "Alice", False)]
        assert ledger.forget("cus_alice")
        runner.run()
        assert runner.con.execute(email).fetchall() == [(None, None, True)]
        assert runner.con.execute(
            "SELECT count(*) FROM customer_identifiers WHERE customer_id = 'cus_alice'"
        ).fetchall() == [(0,)]
        # Bob is untouched; Alice's counts and stage stay (they are not personal data).
        assert runner.con.execute(
            "SELECT phone FROM customer_360 WHERE customer_id = 'cus_bob'"
        ).fetchall() == [("+4915112345678",)]
        assert runner.con.execute(
            "SELECT events, lifecycle_stage FROM customer_360 WHERE customer_id = 'cus_alice'"
        ).fetchall() == [(14, "customer")]
        # She comes back: a new key, new identifiers that show (with the erasure on record).
        ledger.append(
            [
                event(
                    "cus_alice",
                    "2026-10-01T00:00:00Z",
                    "page_viewed",
                    {"url": "https://x/"},
                    {"email": "new@example.com"},
                )
            ]
        )
        runner.run()
        assert runner.con.execute(email).fetchall() == [("new@example.com", None, True)]
        runner.close()
        with (
            project(ledger, tmp_path / "rebuilt.duckdb", batch_size=3) as rebuilt,
            duckdb.connect(str(tmp_path / "p.duckdb")) as incremental,
        ):
            assert_same_tables(incremental, rebuilt.con)
        # Worker processes decrypting the whole log: the erased rows fail and are retried.
        with (
            project(
                ledger,
                tmp_path / "offloaded.duckdb",
                settings=sqlite_settings,
                offload_min_events=1,
                processes=2,
            ) as offloaded,
            duckdb.connect(str(tmp_path / "p.duckdb")) as incremental,
        ):
            assert_same_tables(incremental, offloaded.con)


@pytest.mark.parametrize(
    ("batches", "offload"),
    [((17,), False), ((7, 130, 500), False), ((250, 1_000), False), ((250, 1_000), True)],
)
def test_rebuild_equals_incremental(
    sqlite_settings: Settings, tmp_path: Path, batches: tuple[int, ...], offload: bool
) -> None:
    lines = generated(3_000, 150)
    with Ledger.open(sqlite_settings) as ledger:
        # offload: every batch folds and decrypts in worker processes (resumed folds too).
        incremental = ProjectionRunner(
            ledger,
            tmp_path / "inc.duckdb",
            batch_size=batches[0],
            settings=sqlite_settings,
            offload_min_events=1 if offload else 10**9,
            processes=2,
        )
        # Append in slices and project between them, changing the batch size as we go.
        for n, start in enumerate(range(0, len(lines), 700)):
            result = ledger.append(lines[start : start + 700])
            assert not result.rejected
            incremental.batch_size = batches[n % len(batches)]
            incremental.run()
        with project(ledger, tmp_path / "full.duckdb") as rebuilt:
            assert rebuilt.position == incremental.position == 3_000
            n_buyers = rebuilt.con.execute("SELECT count(*) FROM rfm").fetchall()[0][0]
            assert n_buyers >= 20  # the data set exercises the BG/NBD fit
            assert_same_tables(incremental.con, rebuilt.con)
        # customer_identifiers has no key index: one row per (customer, field) by its SQL.
        assert incremental.con.execute(
            "SELECT count(*) FROM (SELECT customer_id, field FROM customer_identifiers "
            "GROUP BY ALL HAVING count(*) > 1)"
        ).fetchall() == [(0,)]
        incremental.close()


def test_counts_add_up_on_generated_data(sqlite_settings: Settings, tmp_path: Path) -> None:
    lines = generated(3_000, 150, seed=7)
    with Ledger.open(sqlite_settings) as ledger:
        ledger.append(lines)
        with project(ledger, tmp_path / "p.duckdb", batch_size=333) as runner:
            con = runner.con
            assert con.execute("SELECT sum(events), count(*) FROM customer_360").fetchall() == [
                (3_000, 150)
            ]
            by_type = dict(ledger.stats().by_type)
            assert con.execute("SELECT sum(order_placed) FROM customer_360").fetchall()[0][
                0
            ] == by_type.get("order_placed", 0)
            model = one(con, "SELECT * FROM churn_model")
            assert model["converged"] and model["time_unit"] == "week"
            assert all(model[k] > 0 for k in ("r", "alpha", "a", "b"))
            assert con.execute(
                "SELECT count(*) FROM churn_risk WHERE method = 'bgnbd' AND p_alive IS NULL"
            ).fetchall() == [(0,)]
            assert con.execute(
                "SELECT count(*) FROM customer_360 WHERE churn_risk IS NULL"
            ).fetchall() == [(0,)]


def test_last_activity_kept_in_the_facts_equals_a_scan_of_the_events(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    """churn's engagement fallback reads each customer's last own action from
    customer_facts (kept per batch) when the reference date is after every event, and
    from `events` for an earlier `--as-of`: the two agree, and late events count."""
    lines = generated(3_000, 150, seed=12)
    sent = {"message_id": "m-1", "campaign_id": "spring", "subject": "Spring sale"}
    with Ledger.open(sqlite_settings) as ledger:
        ledger.append(lines)
        # A late own action, an email sent after it (not an action), a customer only mailed.
        late = [
            event("cus_late", "2025-01-01T00:00:00Z", "page_viewed", {"url": "u"}),
            event("cus_late", "2025-02-01T00:00:00Z", "email_sent", sent),
            event("cus_mailed", "2025-02-01T00:00:00Z", "email_sent", sent),
        ]
        assert not ledger.append(late).rejected
        with project(ledger, tmp_path / "p.duckdb", batch_size=333) as runner:
            con = runner.con
            (latest,) = con.execute("SELECT max(last_seen) FROM customer_facts").fetchone() or ()
            both = [
                sorted(con.execute(sql("churn", "engaged_all")).fetchall()),
                sorted(con.execute(sql("churn", "engaged_as_of"), {"as_of": latest}).fetchall()),
            ]
            assert both[0] == both[1] and len(both[0]) == 152
            found = dict(both[0])
            assert found["cus_late"] == dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
            assert "cus_mailed" in found and found["cus_mailed"] is None
            assert con.execute(
                "SELECT count(*) FROM churn_risk c JOIN customer_facts f USING (customer_id) "
                "WHERE c.last_activity_at IS DISTINCT FROM f.last_activity_at"
            ).fetchall() == [(0,)]


def test_a_reference_date_set_before_any_event(sqlite_settings: Settings, tmp_path: Path) -> None:
    """`--as-of` on an empty ledger derives nothing and fails nothing; the events that come
    later are scored as of that date."""
    with (
        Ledger.open(sqlite_settings) as ledger,
        ProjectionRunner(ledger, tmp_path / "p.duckdb") as runner,
    ):
        runner.set_as_of(dt.datetime(2026, 1, 10, tzinfo=dt.UTC))
        runner.run()
        assert runner.con.execute("SELECT count(*) FROM churn_risk").fetchall() == [(0,)]
        ledger.append([event("cus_a", "2026-01-01T00:00:00Z", "page_viewed", {"url": "u"})])
        runner.run()
        assert runner.con.execute(
            "SELECT customer_id, days_inactive FROM churn_risk"
        ).fetchall() == [("cus_a", 9.0)]


def test_a_big_batch_says_what_it_is_doing(sqlite_settings: Settings, tmp_path: Path) -> None:
    with Ledger.open(sqlite_settings) as ledger:
        assert not ledger.append(generated(1_000, 60)).rejected
        runner = ProjectionRunner(
            ledger,
            tmp_path / "p.duckdb",
            settings=sqlite_settings,
            offload_min_events=1,
            processes=2,
        )
        phases: list[str] = []
        runner.on_phase = phases.append
        runner.run()
        runner.close()
    # In the order `ledger project` shows them beside its bar, for the one batch.
    expected = [
        "choosing lifecycle touches and identifiers",
        "loading events, merging customer facts",
        "computing RFM and churn risk",
        "folding lifecycle stages, decrypting identifiers",
        "writing identifiers and lifecycle history",
        "committing",
    ]
    assert phases[: len(expected)] == expected
    # rfm/churn were computed inside the batch: refresh_derived had nothing left to do.
    assert phases[len(expected) :] == ["computing RFM and churn risk"]


class _TimedPublishes(ProjectionRunner):
    """The real runner, recording when the maintenance thread published snapshots."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.publishes: list[tuple[float, float]] = []

    def publish(self, con: duckdb.DuckDBPyConnection | None = None) -> None:
        began = time.monotonic()
        super().publish(con)
        if threading.current_thread().name == "projection-maintenance":
            self.publishes.append((began, time.monotonic()))


def test_following_spaces_publishes_by_how_long_they_take(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    # With no minimum interval, the maintenance thread would publish back to back while
    # batches keep the projections dirty (a third of the time or more, on the cores the
    # batches need); spaced, each publish is followed by nine times its duration.
    lines = generated(3_000, 150, seed=5)
    with Ledger.open(sqlite_settings) as ledger:
        ledger.append(lines[:1_000])
        runner = _TimedPublishes(
            ledger,
            tmp_path / "p.duckdb",
            snapshot_to=tmp_path / "p.snapshot.duckdb",
            snapshot_interval=0.0,
            batch_size=100,
        )
        runner.run()
        with following(runner):
            for start in range(1_000, len(lines), 50):
                ledger.append(lines[start : start + 50])
                time.sleep(0.05)
        runner.close()
    spans = runner.publishes
    assert len(spans) >= 2, spans
    for (began, ended), (next_began, _) in itertools.pairwise(spans):
        assert next_began - ended >= MAINTENANCE_SPACING * (ended - began) * 0.95


def test_following_fits_the_churn_model_in_a_worker_process_with_the_same_result(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    lines = generated(3_000, 150, seed=7)
    with Ledger.open(sqlite_settings) as ledger:
        ledger.append(lines[:2_000])
        runner = ProjectionRunner(
            ledger, tmp_path / "follow.duckdb", derive_interval=0.0, fit_offload_min=1
        )
        runner.run()  # not following: fitted in this process
        assert runner._offload._pool is None
        with following(runner):
            ledger.append(lines[2_000:])
            deadline = time.monotonic() + 60
            while runner.con.cursor().execute(
                "SELECT derived_position FROM derived_state"
            ).fetchall() != [(len(lines),)]:
                assert time.monotonic() < deadline, "the maintenance thread did not derive"
                time.sleep(0.05)
        # The maintenance thread's fit went to the runner's worker processes.
        assert runner._offload._pool is not None
        followed = runner.con.execute("SELECT * FROM churn_model").fetchall()
        scores = rows(runner.con, "churn_risk")
        runner.close()
        with project(ledger, tmp_path / "inline.duckdb") as inline:
            assert followed == inline.con.execute("SELECT * FROM churn_model").fetchall()
            assert scores == rows(inline.con, "churn_risk")
            # Converged: the model, not the engagement fallback, scored the purchasers.
            assert inline.con.execute("SELECT converged FROM churn_model").fetchall() == [(True,)]
