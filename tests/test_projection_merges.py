"""Identity stitching in the projections: a `customers_merged` event folds the merged-away
customer's history (and later events) into the survivor; chains resolve; rebuild agrees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pytest

from fixtures.projection_data import assert_same_tables, event, order, project
from ledger.ledger import Ledger
from ledger.projection.runner import ProjectionRunner
from ledger.settings import Settings


def merged(survivor: str, gone: str, at: str) -> dict[str, Any]:
    return event(
        survivor, at, "customers_merged", {"merged_customer_id": gone, "identifier_type": "email"}
    )


def form(customer: str, at: str, form_id: str) -> dict[str, Any]:
    return event(customer, at, "form_submitted", {"form_id": form_id})


#: Appended in these slices, projected between them.
SLICES: list[list[dict[str, Any]]] = [
    [
        form("cus_a", "2026-01-01T00:00:00Z", "newsletter_signup"),
        order("cus_a", "2026-01-05T00:00:00Z", "o-a1", "10.00"),
        event(
            "cus_b",
            "2026-01-02T00:00:00Z",
            "page_viewed",
            {"url": "https://x/"},
            {"email": "b@example.com"},
        ),
        order("cus_b", "2026-01-03T00:00:00Z", "o-b1", "20.00"),
        form("cus_c", "2026-01-04T00:00:00Z", "contact"),
        order("cus_c", "2026-01-06T00:00:00Z", "o-c1", "5.00"),
    ],
    [
        merged("cus_b", "cus_c", "2026-02-01T00:00:00Z"),  # C into B
        order("cus_b", "2026-02-02T00:00:00Z", "o-b2", "7.00"),
    ],
    [
        merged("cus_a", "cus_b", "2026-03-01T00:00:00Z"),  # then B into A
        # Late events of merged-away streams land on A too.
        order("cus_b", "2026-03-05T00:00:00Z", "o-b3", "3.00"),
        order("cus_c", "2025-12-30T00:00:00Z", "o-c0", "1.00"),
        event("cus_b", "2026-03-06T00:00:00Z", "page_viewed", {"url": "https://y/"}),
    ],
]


@pytest.mark.parametrize("batch_size", [1, 2, 3, 50])
def test_merges_fold_into_survivor_and_rebuild_agrees(
    sqlite_settings: Settings, tmp_path: Path, batch_size: int
) -> None:
    with Ledger.open(sqlite_settings) as ledger:
        incremental = ProjectionRunner(ledger, tmp_path / "inc.duckdb", batch_size=batch_size)
        # The same, every batch written to the columnar copy: `events` reads them there.
        copied = ProjectionRunner(
            ledger,
            tmp_path / "copied.duckdb",
            batch_size=batch_size,
            columnar=tmp_path / "columnar",
            segment_min_events=1,
        )
        for piece in SLICES:
            assert not ledger.append(piece).rejected
            incremental.run()
            copied.run()
        con = incremental.con
        assert con.execute("SELECT DISTINCT customer_id FROM events").fetchall() == [("cus_a",)]
        # Events of the merged-away streams, read from segments, show the survivor too.
        assert copied.con.execute(
            "SELECT (SELECT count(*) FROM events_tail), (SELECT count(*) FROM events_segments), "
            "(SELECT list(DISTINCT customer_id) FROM events)"
        ).fetchall() == [(0, sum(-(-len(p) // batch_size) for p in SLICES), ["cus_a"])]
        assert_same_tables(incremental.con, copied.con)
        copied.close()
        assert con.execute(
            "SELECT customer_id, orders, revenue, events, email, lifecycle_stage "
            "FROM customer_360 ORDER BY customer_id"
        ).fetchall() == [("cus_a", 6, 46, 12, "b@example.com", "customer")]
        for table in ("customer_facts", "customer_identifiers", "lifecycle", "rfm", "churn_risk"):
            assert con.execute(f"SELECT DISTINCT customer_id FROM {table}").fetchall() == [
                ("cus_a",)
            ], table
        assert con.execute("SELECT frequency, monetary FROM rfm").fetchall() == [(6, 46)]
        assert con.execute("SELECT DISTINCT customer_id FROM lifecycle_history").fetchall() == [
            ("cus_a",)
        ]
        assert con.execute(
            "SELECT customer_id, canonical_id FROM customer_aliases ORDER BY 1"
        ).fetchall() == [("cus_b", "cus_a"), ("cus_c", "cus_a")]
        with project(ledger, tmp_path / "rebuilt.duckdb") as rebuilt:
            assert rebuilt.position == incremental.position
            assert_same_tables(incremental.con, rebuilt.con)
        # Folding in worker processes keeps each merged group in one partition.
        with project(
            ledger,
            tmp_path / "offloaded.duckdb",
            settings=sqlite_settings,
            offload_min_events=1,
            processes=2,
        ) as offloaded:
            assert_same_tables(incremental.con, offloaded.con)
        incremental.close()
        with (
            project(ledger, tmp_path / "small.duckdb", batch_size=1) as small,
            duckdb.connect(str(tmp_path / "inc.duckdb")) as again,
        ):
            assert_same_tables(again, small.con)
