"""Identity stitching: the graph over a real SQLite ledger, and end to end over HTTP."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector_server import Server, add_source, cli_env
from conftest import TEST_MASTER_KEY
from ledger.collector import segment
from ledger.collector.db import CollectorDB
from ledger.collector.identity import (
    GraphResolver,
    Pseudonyms,
    StaleGraph,
    forget_identities,
    identity_key,
    parse_limits,
)
from ledger.collector.intake import LedgerSink
from ledger.collector.touch import Touch
from ledger.ledger import Ledger, LedgerError
from ledger.settings import Settings
from ledger.store.sqlite import WAL_FALLBACK_PAGES

NOW = dt.datetime(2026, 11, 1, 12, tzinfo=dt.UTC)


class Graph:
    """The collector's write path without HTTP: resolve, append, then commit the graph."""

    def __init__(
        self, home: Path, limits: dict[str, int] | None = None, store_url: str | None = None
    ):
        self.settings = Settings(home=home, master_key=TEST_MASTER_KEY, store_url=store_url)
        self.ledger = Ledger.open(self.settings)
        self.db = CollectorDB(self.settings)
        self.resolver = GraphResolver(self.db, Pseudonyms(identity_key(self.settings)), limits)

    def send(self, *messages: dict[str, Any]) -> list[str]:
        touches: list[Touch] = [
            segment.map_message(
                {"messageId": str(uuid.uuid4()), **m}, source="site", received_at=NOW
            )
            for m in messages
        ]
        derived = self.resolver.resolve(touches)
        result = self.ledger.append([t.event for t in touches] + derived)
        assert result.rejected == []
        self.resolver.commit()
        return [t.event["customer_id"] for t in touches]

    def events(self, type_: str) -> list[Any]:
        return [e for e in self.ledger.read(0, 10_000, decrypt=True) if e.type == type_]

    def close(self) -> None:
        self.ledger.close()
        self.db.close()


@pytest.fixture
def graph(tmp_path: Path) -> Iterator[Graph]:
    g = Graph(tmp_path / "home")
    yield g
    g.close()


def identify(user: str | None = None, anon: str | None = None, **traits: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "identify", "traits": traits}
    if user:
        msg["userId"] = user
    if anon:
        msg["anonymousId"] = anon
    return msg


def page(anon: str) -> dict[str, Any]:
    return {"type": "page", "anonymousId": anon, "properties": {"url": "https://x.example/"}}


def test_identify_links_ids_and_merges_two_known_customers_into_the_older(graph: Graph) -> None:
    (browsing,) = graph.send(page("anon-1"))
    (app_user,) = graph.send(identify(user="u-1"))
    assert browsing != app_user
    (linked,) = graph.send(identify(user="u-1", anon="anon-1", email="Ann@Example.com "))
    assert linked == browsing  # the older customer survives
    merges = graph.events("customers_merged")
    assert len(merges) == 1
    assert merges[0].customer_id == browsing
    assert merges[0].payload == {"merged_customer_id": app_user, "identifier_type": "anonymous_id"}
    # Every identifier now resolves to the survivor, whichever arrives alone.
    alone = graph.send(
        page("anon-1"), identify(user="u-1"), identify(anon="new", email="ann@example.com")
    )
    assert alone == [browsing] * 3


def test_normalised_email_and_phone_find_the_same_customer(graph: Graph) -> None:
    first = graph.send(identify(user="u-7", email="Bob@Example.COM", phone="+49 151 1234-5678"))
    again = graph.send(
        identify(anon="a-7", email="  bob@example.com"),
        identify(anon="a-8", phone="0049 (151) 12345678"),
    )
    assert again == first * 2


def test_shared_office_phone_cannot_fuse_people_with_user_ids(graph: Graph) -> None:
    office = "+44 20 7946 0000"
    customers = graph.send(*[identify(user=f"staff-{n}", phone=office) for n in range(10)])
    assert len(set(customers)) == 10
    refused = graph.events("identity_link_refused")
    assert len(refused) == 9
    assert {e.payload["identifier_type"] for e in refused} == {"user_id"}
    assert {e.payload["other_customer_id"] for e in refused} == {customers[0]}
    assert graph.events("customers_merged") == []
    rows = graph.db.query("SELECT COUNT(*), COUNT(DISTINCT customer_id) FROM collector_refusals")
    assert rows == [(9, 9)]
    # The phone stays with the first person; each other person keeps their own customer.
    assert graph.send(identify(anon="visitor", phone=office)) == [customers[0]]
    assert graph.send(identify(user="staff-5")) == [customers[5]]


@pytest.mark.postgres
def test_graph_in_postgresql_merges_and_refuses_the_same_way(tmp_path: Path, pg_url: str) -> None:
    g = Graph(tmp_path / "home", store_url=pg_url)
    try:
        browsing, app_user, linked = g.send(
            page("a1"), identify(user="u1"), identify(user="u1", anon="a1")
        )
        shared = g.send(*[identify(user=f"s{n}", phone="+15550002222") for n in range(3)])
        merges = g.events("customers_merged")
        refused = g.events("identity_link_refused")
        tables = g.db.query(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_name LIKE 'collector_%'"
        )
    finally:
        g.close()
    assert linked == browsing != app_user
    assert [(e.customer_id, e.payload["merged_customer_id"]) for e in merges] == [
        (browsing, app_user)
    ]
    assert len(set(shared)) == 3 and len(refused) == 2
    assert tables == [(5,)]  # customers, identifiers, merges, refusals, meta (keys: first use)


def test_without_user_ids_the_email_limit_bounds_how_many_fuse(tmp_path: Path) -> None:
    g = Graph(tmp_path / "home", limits=parse_limits(["email=3"]))
    try:
        customers = g.send(
            *[
                identify(anon=f"a{n}", email=f"p{n}@firm.example", phone="+15550001111")
                for n in range(6)
            ]
        )
    finally:
        g.close()
    assert customers[:3] == [customers[0]] * 3  # three emails: the limit
    assert len(set(customers)) == 4
    assert len(set(customers[3:])) == 3


def test_resolution_is_deterministic_and_survives_a_restart(tmp_path: Path) -> None:
    script = [
        page("a1"),
        identify(user="u1"),
        identify(user="u1", anon="a1", email="x@y.example"),
        identify(anon="a2", email="X@y.example"),
        page("a3"),
        identify(user="u2", anon="a3"),
    ]
    a = Graph(tmp_path / "one")
    first = a.send(*script[:3])
    a.close()
    a = Graph(tmp_path / "one")  # a new process: the graph comes from the tables
    first += a.send(*script[3:])
    merges_a = sorted(
        (e.customer_id, e.payload["merged_customer_id"]) for e in a.events("customers_merged")
    )
    a.close()

    b = Graph(tmp_path / "two")  # the same master key: same pseudonyms
    second = b.send(*script)
    merges_b = sorted(
        (e.customer_id, e.payload["merged_customer_id"]) for e in b.events("customers_merged")
    )
    b.close()
    assert first[2:4] == [first[0], first[0]]
    assert second[2:] == first[2:]
    assert merges_a == merges_b and len(merges_a) == 1


def test_forgetting_unlinks_the_whole_person_and_a_return_is_a_new_customer(
    graph: Graph,
) -> None:
    first, app = graph.send(page("anon-f"), identify(user="u-f"))
    (person,) = graph.send(identify(user="u-f", anon="anon-f", email="f@x.example"))
    assert person == first != app
    # Forgetting the absorbed id forgets the person: survivor and absorbed alike.
    assert forget_identities(graph.db, app) == [first, app]
    assert graph.db.query("SELECT COUNT(*) FROM collector_identifiers") == [(0,)]
    forgotten = graph.db.query(
        "SELECT customer_id FROM collector_customers WHERE forgotten_at IS NOT NULL"
    )
    assert sorted(forgotten) == sorted([(first,), (app,)])

    # The running resolver notices; the same identifiers now make someone new.
    back = graph.send(page("anon-f"), identify(user="u-f", email="f@x.example"))
    pseudonyms = graph.resolver.pseudonyms
    # ...deterministically: the n-th return of an identifier mints its n-th id.
    assert back == [
        pseudonyms.customer_id("anonymous_id", "anon-f\n#1"),
        pseudonyms.customer_id("user_id", "u-f\n#1"),
    ]
    assert not {first, app} & set(back)
    with pytest.raises(LedgerError, match="no customer 'cus_nope'"):
        forget_identities(graph.db, "cus_nope")


def test_a_cache_that_starts_over_resolves_exactly_as_a_full_one(tmp_path: Path) -> None:
    script = [
        page("c1"),
        identify(user="cu1", anon="c2"),
        identify(anon="c1", email="c@x.example"),
        identify(user="cu1", anon="c1"),
        identify(user="cu2", email="c@x.example"),
        page("c2"),
    ]
    results = []
    for cache_limit in (1_000_000, 1):
        g = Graph(tmp_path / f"cache-{cache_limit}")
        g.resolver.cache_limit = cache_limit
        try:
            results.append(
                (
                    [g.send(m)[0] for m in script],
                    g.events("customers_merged"),
                    len(g.resolver._owner),
                )
            )
        finally:
            g.close()
    (full, full_merges, all_cached), (small, small_merges, cached) = results
    assert small == full
    assert [e.payload for e in small_merges] == [e.payload for e in full_merges]
    assert all_cached == 5 and cached < all_cached  # the small one did start over


def test_rollback_leaves_the_graph_as_it_was(graph: Graph) -> None:
    touch = segment.map_message(identify(user="u9", anon="a9"), source="s", received_at=NOW)
    graph.resolver.resolve([touch])
    graph.resolver.rollback()
    assert graph.db.query("SELECT COUNT(*) FROM collector_identifiers") == [(0,)]
    assert graph.db.query("SELECT COUNT(*) FROM collector_customers") == [(0,)]


def test_limits_option_errors_are_sentences() -> None:
    with pytest.raises(LedgerError, match="--limit 'fax=2': expected KIND=N"):
        parse_limits(["fax=2"])
    for bad in ("email=0", "email=²", "email=", "email=-1"):
        with pytest.raises(LedgerError, match="N >= 1"):
            parse_limits([bad])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, dict[str, str]]]:
    home = tmp_path / "home"
    keys = {
        "web": add_source(home, "website", "web"),
        "email": add_source(home, "sendgrid", "email"),
    }
    server = Server(home).start()
    yield server, keys
    server.stop()


def test_stitching_over_http_and_ledger_identities(served: tuple[Server, dict[str, str]]) -> None:
    server, keys = served

    def batch(key: str, path: str, body: Any) -> dict[str, Any]:
        answer = requests.post(
            server.url + path, data=orjson.dumps(body), auth=(key, ""), timeout=30
        )
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    batch(keys["web"], "/v1/batch", {"batch": [page("cookie-1")]})
    batch(keys["web"], "/v1/batch", {"batch": [{**identify(user="u-42"), "messageId": "m-id"}]})
    batch(
        keys["web"],
        "/v1/batch",
        {"batch": [identify(user="u-42", anon="cookie-1", email="Dana@Example.com", name="Dana")]},
    )
    sendgrid = [
        {
            "email": "dana@example.com",
            "timestamp": 1700000000,
            "event": "open",
            "sg_event_id": "ev-1",
            "sg_message_id": "msg-1.filter0001",
        }
    ]
    batch(keys["email"], "/webhooks/sendgrid", sendgrid)
    logged = server.stop()
    # '"POST ' would be an access-log line, which carries the client's address.
    for personal in ("dana@example.com", "Dana", "u-42", "cookie-1", '"POST '):
        assert personal not in logged, f"the collector logged {personal!r}"

    with Ledger.open(Settings(home=server.home, master_key=TEST_MASTER_KEY)) as ledger:
        recorded = ledger.read(0, 1000, decrypt=True)
    merged = [e for e in recorded if e.type == "customers_merged"]
    assert len(merged) == 1
    survivor, gone = merged[0].customer_id, merged[0].payload["merged_customer_id"]
    opened = next(e for e in recorded if e.type == "email_opened")
    assert opened.customer_id == survivor
    assert {e.customer_id for e in recorded if e.type == "page_viewed"} == {survivor}

    env = {**cli_env(server.home), "COLUMNS": "200"}
    shown = subprocess.run(
        [sys.executable, "-m", "ledger", "identities", gone],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"{gone} was merged into {survivor}" in out
    for value in ("u-42", "cookie-1", "dana@example.com", "Dana"):
        assert value in out
    assert "anonymous_id" in out and gone in out
    unknown = subprocess.run(
        [sys.executable, "-m", "ledger", "identities", "cus_nobody"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert unknown.returncode == 1
    assert "no customer 'cus_nobody' in the collector's identity graph" in unknown.stderr
    assert os.path.exists(server.home / "ledger.db")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ledger", "identities", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    unconfirmed = cli(survivor, "--forget")
    assert unconfirmed.returncode == 2 and "pass --yes" in unconfirmed.stderr
    forgot = cli(gone, "--forget", "--yes")
    assert forgot.returncode == 0, forgot.stderr
    assert f"`ledger forget {gone}` erases it for all of them" in forgot.stdout.replace("\n", "")
    after = cli(survivor)
    assert "identifiers unlinked at" in after.stdout and "dana@example.com" not in after.stdout


_POOL = {
    "user": ["u1", "u2", "u3"],
    "anon": ["a1", "a2", "a3", "a4"],
    "email": ["e1@x.example", "e2@x.example", "e3@x.example"],
    "phone": ["+15550000001", "+15550000002"],
}


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "user": st.none() | st.sampled_from(_POOL["user"]),
                "anon": st.sampled_from(_POOL["anon"]),
                "email": st.none() | st.sampled_from(_POOL["email"]),
                "phone": st.none() | st.sampled_from(_POOL["phone"]),
            }
        ),
        min_size=1,
        max_size=12,
    ),
    st.integers(min_value=1, max_value=3),
)
def test_graph_invariants_hold_for_any_sequence_of_touches(
    tmp_path_factory: pytest.TempPathFactory, calls: list[dict[str, Any]], email_limit: int
) -> None:
    limits = parse_limits([f"email={email_limit}", "phone=1"])
    messages = [
        identify(user=c["user"], anon=c["anon"], email=c["email"], phone=c["phone"]) for c in calls
    ]
    runs = []
    for _ in range(2):
        g = Graph(tmp_path_factory.mktemp("g") / "home", limits=limits)
        try:
            customers = [g.send(m)[0] for m in messages]  # one request each, as they arrive
            over = g.db.query(
                "SELECT customer_id, kind, COUNT(*) FROM collector_identifiers "
                "GROUP BY customer_id, kind"
            )
            stale = g.db.query(
                "SELECT COUNT(*) FROM collector_identifiers WHERE customer_id IN "
                "(SELECT customer_id FROM collector_customers WHERE merged_into IS NOT NULL)"
            )
            merges = {
                (e.customer_id, e.payload["merged_customer_id"])
                for e in g.events("customers_merged")
            }
            table = set(g.db.query("SELECT into_customer, from_customer FROM collector_merges"))
            touched = g.ledger.read(0, 10_000)
        finally:
            g.close()
        assert all(n <= limits[kind] for _, kind, n in over)  # no customer past a limit
        assert stale == [(0,)]  # no identifier left on a merged-away customer
        assert merges == table  # every merge in the graph is an event in the ledger
        assert [e.customer_id for e in touched if e.type == "identity_linked"] == customers
        runs.append((customers, merges))
    assert runs[0] == runs[1]  # the same touches in the same order: the same customers


def test_the_graphs_connection_leaves_wal_checkpoints_to_the_ledger(tmp_path: Path) -> None:
    """With SQLite's default (1,000 pages) the graph's commits ran the shared WAL's
    checkpoint inside the collector's writer; erased identifier hashes are overwritten."""
    settings = Settings(home=tmp_path / "home", master_key=TEST_MASTER_KEY)
    with Ledger.open(settings):
        db = CollectorDB(settings, durable=False)
        try:
            assert db.query("PRAGMA wal_autocheckpoint") == [(WAL_FALLBACK_PAGES,)]
            assert db.query("PRAGMA secure_delete") == [(1,)]
            assert db.query("PRAGMA synchronous") == [(1,)]  # NORMAL: the ledger fsyncs
        finally:
            db.close()


def test_graph_changes_commit_inside_the_ledgers_append_or_not_at_all(
    settings: Settings,
) -> None:
    """Embedded mode: the graph's rows are written through the append's own transaction
    (SQLite and PostgreSQL), so a failed append leaves neither events nor links."""
    g = Graph(settings.home, store_url=settings.store_url)
    sink = LedgerSink(g.ledger)
    try:
        messages = [identify(user="u-tx", anon="anon-tx", email="tx@x.example")]

        def touches() -> list[Touch]:
            return [
                segment.map_message({"messageId": "m-tx", **m}, source="site", received_at=NOW)
                for m in messages
            ]

        first = touches()
        derived = g.resolver.resolve(first)
        pending = g.resolver.take()
        write = g.resolver.writer(pending)

        def broken(connection: Any) -> None:
            write(connection)  # the graph rows are in the transaction...
            raise RuntimeError("the append failed after the graph step")

        with pytest.raises(RuntimeError, match="append failed"):
            sink.write([t.event for t in first] + derived, also=broken)
        g.resolver.rollback()
        assert g.ledger.position == 0  # ...and go with it
        assert g.db.query("SELECT COUNT(*) FROM collector_identifiers") == [(0,)]
        assert g.db.query("SELECT COUNT(*) FROM collector_customers") == [(0,)]

        again = touches()  # the client's retry resolves the same way and commits both
        derived = g.resolver.resolve(again)
        assert (
            sink.write(
                [t.event for t in again] + derived, also=g.resolver.writer(g.resolver.take())
            )
            == {}
        )
        assert again[0].event["customer_id"] == first[0].event["customer_id"]
        assert g.ledger.position == 1
        assert g.db.query("SELECT COUNT(*) FROM collector_identifiers") == [(3,)]
    finally:
        g.close()


def test_a_forget_between_resolving_and_appending_makes_the_group_resolve_again(
    settings: Settings,
) -> None:
    """`ledger forget` in another process while a group is in flight: its append refuses
    (nothing stored, nothing linked), and resolved again the touch is someone new."""
    g = Graph(settings.home, store_url=settings.store_url)
    sink = LedgerSink(g.ledger)
    other = CollectorDB(g.settings)
    try:
        (person,) = g.send(identify(user="u-race", email="race@x.example"))
        before = g.ledger.position
        late = [
            segment.map_message(
                {"messageId": "m-race", **identify(anon="anon-race", email="race@x.example")},
                source="site",
                received_at=NOW,
            )
        ]
        derived = g.resolver.resolve(late)
        assert late[0].event["customer_id"] == person  # resolved from the cache...
        assert forget_identities(other, person) == [person]  # ...then forgotten elsewhere
        with pytest.raises(StaleGraph, match="resolving them again"):
            sink.write([t.event for t in late] + derived, also=g.resolver.writer(g.resolver.take()))
        assert g.ledger.position == before
        g.resolver.rollback()
        derived = g.resolver.resolve(late)
        assert late[0].event["customer_id"] != person
        sink.write([t.event for t in late] + derived, also=g.resolver.writer(g.resolver.take()))
        assert g.ledger.position == before + 1
        owners = g.db.query("SELECT DISTINCT customer_id FROM collector_identifiers")
        assert owners == [(late[0].event["customer_id"],)]
    finally:
        other.close()
        g.close()
