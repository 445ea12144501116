"""The columnar copy of the log and lazy decryption: a rebuild that reads the copy gives
the same tables as incremental processing; a copy that does not match the ledger is
discarded; forget erases identifiers in rebuilds from the copy; only the newest event per
(customer, identifier) is decrypted and the values equal a full decryption."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

from fixtures.projection_data import assert_same_tables, event, generated, project, rows
from ledger.ledger import Ledger
from ledger.projection.runner import ProjectionRunner, pick_sql
from ledger.projection.segments import ColumnarCopy
from ledger.settings import Settings


def _segments(copy: Path) -> list[tuple[int, int]]:
    found = []
    for path in sorted(copy.glob("events-*.parquet")):
        first, last = path.stem.split("-")[1:]
        found.append((int(first), int(last)))
    return found


def test_rebuild_from_the_copy_equals_incremental(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    lines = generated(3_000, 150)
    copy = tmp_path / "columnar"
    with Ledger.open(sqlite_settings) as ledger:
        incremental = ProjectionRunner(
            ledger, tmp_path / "inc.duckdb", batch_size=400, columnar=copy, segment_min_events=400
        )
        for start in range(0, len(lines), 700):
            assert not ledger.append(lines[start : start + 700]).rejected
            incremental.run()
        # Only whole batches read at the copy's end become segments: here 1..400.
        assert _segments(copy) == [(1, 400)]
        # A rebuild reads 1..400 from the copy, the rest from the log (extending the copy).
        with project(
            ledger, tmp_path / "first.duckdb", batch_size=400, columnar=copy, segment_min_events=400
        ) as first:
            assert_same_tables(incremental.con, first.con)
        chain = _segments(copy)
        assert chain[0] == (1, 400) and chain[-1] == (2_401, 2_800)
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(chain))
        # A second rebuild reads 1..2,800 from the copy (one transaction) and the tail.
        with project(ledger, tmp_path / "second.duckdb", columnar=copy) as second:
            assert second.copy is not None and second.copy.frontier == 2_800
            assert_same_tables(incremental.con, second.con)
        # With the Python steps in worker processes (4 partitions each) from the copy.
        with project(
            ledger,
            tmp_path / "offloaded.duckdb",
            columnar=copy,
            settings=sqlite_settings,
            offload_min_events=1,
            processes=2,
        ) as offloaded:
            assert_same_tables(incremental.con, offloaded.con)
        # And the same without the copy at all.
        with project(ledger, tmp_path / "plain.duckdb") as plain:
            assert_same_tables(incremental.con, plain.con)
        incremental.close()


def test_a_copy_of_another_ledger_or_a_damaged_segment_is_discarded(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    copy = tmp_path / "columnar"
    other = Settings(home=tmp_path / "other", master_key=sqlite_settings.master_key)
    with Ledger.open(other) as ledger:
        assert not ledger.append(generated(1_000, 50, seed=3)).rejected
        project(
            ledger, tmp_path / "other.duckdb", batch_size=500, columnar=copy, segment_min_events=1
        ).close()
    assert _segments(copy) == [(1, 500), (501, 1_000)]
    with Ledger.open(sqlite_settings) as ledger:
        assert not ledger.append(generated(1_000, 50, seed=4)).rejected
        checked = ColumnarCopy(copy, ledger)
        assert checked.frontier == 0  # the hash of position 500 is not this ledger's
        assert _segments(copy) == [(501, 1_000)]  # the first failed and was deleted
        with project(
            ledger, tmp_path / "p.duckdb", batch_size=500, columnar=copy, segment_min_events=1
        ) as runner:
            assert _segments(copy) == [(1, 500), (501, 1_000)]
            with project(ledger, tmp_path / "plain.duckdb") as plain:
                assert_same_tables(runner.con, plain.con)
        # A segment that cannot be read is a cache miss, not an error: a rebuild reads
        # its events from the log, and so does a runner whose `events` read it (they go
        # into `events_tail`, the other segment is still read in place).
        (copy / "events-000000000001-000000000500.parquet").write_bytes(b"not parquet")
        with (
            project(ledger, tmp_path / "again.duckdb", columnar=copy) as again,
            project(ledger, tmp_path / "p.duckdb", columnar=copy) as reopened,
        ):
            assert_same_tables(reopened.con, again.con)
            assert reopened.con.execute(
                "SELECT (SELECT count(*) FROM events_tail), "
                "(SELECT list(first) FROM events_segments)"
            ).fetchall() == [(500, [501])]


def test_forget_erases_identifiers_in_a_rebuild_from_the_copy(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    copy = tmp_path / "columnar"
    alice = [
        event("cus_a", "2026-01-01T00:00:00Z", "page_viewed", {"url": "u"}, {"email": "a@x.io"}),
        event(
            "cus_b",
            "2026-01-02T00:00:00Z",
            "page_viewed",
            {"url": "u"},
            {"phone": "+4915112345678"},
        ),
    ]
    with Ledger.open(sqlite_settings) as ledger:
        ledger.append(alice)
        project(ledger, tmp_path / "p.duckdb", columnar=copy, segment_min_events=1).close()
        assert _segments(copy) == [(1, 2)]
        assert ledger.forget("cus_a")
        with project(ledger, tmp_path / "rebuilt.duckdb", columnar=copy) as rebuilt:
            # The copy still holds the ciphertext, but its key is gone.
            assert rebuilt.con.execute(
                "SELECT customer_id, email, phone, erased FROM customer_360 ORDER BY 1"
            ).fetchall() == [("cus_a", None, None, True), ("cus_b", None, "+4915112345678", False)]
            with project(ledger, tmp_path / "plain.duckdb") as plain:
                assert_same_tables(plain.con, rebuilt.con)


def _newest_identifiers(ledger: Ledger) -> dict[tuple[str, str], tuple[object, int, str]]:
    """(customer, field) -> (occurred_at, position, value) of the newest value, by a full
    decryption of the ledger."""
    newest: dict[tuple[str, str], tuple[object, int, str]] = {}
    for recorded in ledger.read(0, 10_000, decrypt=True):
        for field, value in (recorded.identifiers or {}).items():
            known = newest.get((recorded.customer_id, field))
            if value is not None and (
                known is None or (recorded.occurred_at, recorded.position) > known[:2]
            ):
                newest[(recorded.customer_id, field)] = (
                    recorded.occurred_at,
                    recorded.position,
                    str(value),
                )
    return newest


def test_only_the_newest_identifiers_are_decrypted_and_they_match_a_full_decryption(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    with Ledger.open(sqlite_settings) as ledger:
        assert not ledger.append(generated(3_000, 150, seed=11)).rejected
        newest = _newest_identifiers(ledger)
        with project(
            ledger, tmp_path / "p.duckdb", columnar=tmp_path / "columnar", segment_min_events=1
        ) as runner:
            got = rows(runner.con, "customer_identifiers")
            assert {(r[0], r[1]): (r[3], r[4], r[2]) for r in got} == newest
            # What a rebuild decrypts: one event per (customer, field) at most.
            runner.con.execute("BEGIN")
            runner.con.execute(
                "CREATE OR REPLACE TEMP TABLE batch_events AS SELECT * FROM read_parquet(?)",
                [[str(s.path) for s in (runner.copy.chain() if runner.copy else [])]],
            )
            runner.con.execute("DELETE FROM customer_identifiers")
            runner._identifier_candidates([])
            runner.con.execute(pick_sql())
            picked = runner.con.execute("SELECT count(*) FROM id_pick").fetchall()[0][0]
            runner.con.execute("ROLLBACK")
            assert 0 < picked <= len(newest)
            assert picked < 3_000 // 4


def test_bodies_that_do_not_name_their_identifiers_are_decrypted_whole(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    """Bodies sealed before `identifier_fields` existed (the field absent: NULL) are
    decrypted whole when they carry ciphertext, and only then; the identifiers come out as
    a full decryption gives them."""
    with Ledger.open(sqlite_settings) as ledger:
        assert not ledger.append(generated(1_000, 60, seed=5)).rejected
        # Events with nothing personal: no ciphertext, nothing to decrypt.
        opened = [
            event(f"plain-{i}", "2026-03-01T12:00:00Z", "email_opened", {"message_id": f"m-{i}"})
            for i in range(5)
        ]
        assert not ledger.append(opened).rejected
        newest = _newest_identifiers(ledger)
        with project(
            ledger, tmp_path / "p.duckdb", columnar=tmp_path / "columnar", segment_min_events=1
        ) as runner:
            con = runner.con
            segments = [str(s.path) for s in (runner.copy.chain() if runner.copy else [])]
            # Projected as appended (every body names its identifiers): `has_personal`
            # says whether the event holds ciphertext.
            assert con.execute(
                "SELECT count(*) FILTER (WHERE e.has_personal <> (b.personal IS NOT NULL)), "
                "count(*) FILTER (WHERE NOT e.has_personal) FROM events e "
                "JOIN read_parquet(?) b USING (position)",
                [segments],
            ).fetchall() == [(0, 5)]
            con.execute("BEGIN")
            con.execute(
                "CREATE OR REPLACE TEMP TABLE batch_events AS SELECT * REPLACE "
                "(NULL::VARCHAR[] AS identifier_fields) FROM read_parquet(?)",
                [segments],
            )
            with_ciphertext, without = con.execute(
                "SELECT count(*) FILTER (WHERE personal IS NOT NULL), "
                "count(*) FILTER (WHERE personal IS NULL) FROM batch_events"
            ).fetchall()[0]
            assert with_ciphertext and without  # both kinds are in the batch
            con.execute("DELETE FROM customer_identifiers")
            runner._identifier_candidates([])
            con.execute(pick_sql())
            picked = con.execute("SELECT count(*), count(fields) FROM id_pick").fetchall()
            assert picked == [(with_ciphertext, 0)]  # each body with ciphertext, whole
            decrypted = runner._decrypt_inline(runner._take_picked())
            runner._identifiers_finish([decrypted])
            got = rows(con, "customer_identifiers")
            con.execute("ROLLBACK")
            assert {(r[0], r[1]): (r[3], r[4], r[2]) for r in got} == newest


def test_events_survive_the_copy_being_deleted(sqlite_settings: Settings, tmp_path: Path) -> None:
    """`events` reads the copy's segments in place; with the copy gone, the next runner of
    the file (with or without a copy) reads those events from the log into `events_tail`."""
    copy = tmp_path / "columnar"
    with Ledger.open(sqlite_settings) as ledger:
        assert not ledger.append(generated(1_200, 60, seed=9)).rejected
        with project(
            ledger, tmp_path / "p.duckdb", batch_size=500, columnar=copy, segment_min_events=1
        ) as runner:
            before = rows(runner.con, "events")
            assert runner.con.execute(
                "SELECT (SELECT count(*) FROM events_tail), (SELECT count(*) FROM events_segments)"
            ).fetchall() == [(0, 3)]
        assert len(before) == 1_200
        # One segment gone: only its events are read again.
        (copy / "events-000000000501-000000001000.parquet").unlink()
        with project(ledger, tmp_path / "p.duckdb", columnar=copy) as runner:
            assert rows(runner.con, "events") == before
            assert runner.con.execute(
                "SELECT (SELECT count(*) FROM events_tail), (SELECT list(first ORDER BY first) "
                "FROM events_segments)"
            ).fetchall() == [(500, [1, 1_001])]
        # The whole copy gone, and the runner bypassing it (--no-columnar).
        shutil.rmtree(copy)
        with project(ledger, tmp_path / "p.duckdb") as runner:
            assert rows(runner.con, "events") == before
            assert runner.con.execute(
                "SELECT (SELECT count(*) FROM events_tail), (SELECT count(*) FROM events_segments)"
            ).fetchall() == [(1_200, 0)]
            with project(ledger, tmp_path / "plain.duckdb") as plain:
                assert_same_tables(plain.con, runner.con)


def test_a_far_behind_catch_up_writes_the_copy_ahead_then_applies_it_at_once(
    settings: Settings, tmp_path: Path
) -> None:
    """At least ``copy_ahead_min_events`` behind, a catch-up first parses the log into
    segments (nothing applied; the next chunk is read from the store, SQLite or PostgreSQL,
    in a thread), then applies the backlog from them in one transaction; the tables equal a
    runner that reads the log batch by batch without a copy."""
    copy = tmp_path / "columnar"
    with Ledger.open(settings) as ledger:
        assert not ledger.append(generated(2_500, 120, seed=4)).rejected
        with project(ledger, tmp_path / "plain.duckdb", batch_size=400) as plain:
            ahead = ProjectionRunner(
                ledger,
                tmp_path / "ahead.duckdb",
                batch_size=400,
                columnar=copy,
                segment_min_events=100,
                copy_ahead_min_events=2_000,
                ahead_segment_events=1_000,
            )
            ahead.run()
            # Segments of 1,000 written ahead, and the events read from them in place:
            # batches from the log would have left 400-event segments or rows in events_tail.
            assert _segments(copy) == [(1, 1_000), (1_001, 2_000), (2_001, 2_500)]
            assert ahead.position == 2_500
            assert ahead.con.execute(
                "SELECT (SELECT count(*) FROM events_tail), (SELECT count(*) FROM events_segments)"
            ).fetchall() == [(0, 3)]
            assert_same_tables(plain.con, ahead.con)
            ahead.close()
        # Not far enough behind: the batches come from the log (and extend the copy).
        assert not ledger.append(generated(500, 30, seed=6)).rejected
        with project(
            ledger,
            tmp_path / "ahead.duckdb",
            batch_size=400,
            columnar=copy,
            copy_ahead_min_events=2_000,
            segment_min_events=100,
        ) as again:
            assert _segments(copy)[-2:] == [(2_501, 2_900), (2_901, 3_000)]
            with project(ledger, tmp_path / "plain2.duckdb") as plain:
                assert_same_tables(plain.con, again.con)


def test_a_copy_cut_elsewhere_does_not_show_events_twice(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    """A follower's small batches leave the copy behind; written ahead from there, the
    first new segment also holds events already applied (in `events_tail`): those are not
    read twice. The same when another runner cut the copy at other positions."""
    copy = tmp_path / "columnar"
    with Ledger.open(sqlite_settings) as ledger:
        assert not ledger.append(generated(1_500, 80, seed=11)).rejected
        follower = ProjectionRunner(
            ledger,
            tmp_path / "follower.duckdb",
            batch_size=300,
            columnar=copy,
            segment_min_events=1_000,  # its 300-event batches are not written as segments
            copy_ahead_min_events=10_000,
        )
        follower.run()
        assert _segments(copy) == [] and follower.position == 1_500
        assert not ledger.append(generated(1_500, 80, seed=12)).rejected
        follower.copy_ahead_min_events = 1_000
        follower.run()  # 1,500 behind, the copy 3,000: written ahead from position 0
        assert _segments(copy) == [(1, 3_000)]
        assert follower.con.execute(
            "SELECT (SELECT count(*) FROM events_tail), (SELECT count(*) FROM events_segments)"
        ).fetchall() == [(3_000, 0)]
        with project(ledger, tmp_path / "plain.duckdb") as plain:
            assert_same_tables(plain.con, follower.con)
        follower.close()
        # A file stopped at 700 without the copy, then run with a copy another runner cut
        # into 1,000-event segments.
        shutil.rmtree(copy)
        project(
            ledger, tmp_path / "cut.duckdb", batch_size=1_000, columnar=copy, segment_min_events=1
        ).close()
        assert _segments(copy) == [(1, 1_000), (1_001, 2_000), (2_001, 3_000)]
        stopped = ProjectionRunner(ledger, tmp_path / "stopped.duckdb", batch_size=700)
        stopped.apply(ledger.read_raw(0, 700), after=0)
        stopped.close()
        with project(ledger, tmp_path / "stopped.duckdb", columnar=copy) as resumed:
            assert resumed.con.execute("SELECT count(*) FROM events").fetchall() == [(3_000,)]
            with project(ledger, tmp_path / "plain.duckdb") as plain:
                assert_same_tables(plain.con, resumed.con)
