"""`ledger serve --workers N`: several collector processes on one SQLite ledger.

The HTTP tests drive the real server (a supervisor and its forked workers) with
connections pinned to distinct workers (checked through /proc), and hold the
guarantees of one collector: every acknowledged event stored once, one customer
per identifier when two processes see it first at the same moment, limits and
merges exact, forget obeyed by every worker. The resolver tests replay the same
races step by step in one process to show the check under the write lock is what
decides them.
"""

from __future__ import annotations

import datetime as dt
import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from collector_server import Server, add_source, cli_env, free_port
from conftest import TEST_MASTER_KEY
from ledger.collector import segment
from ledger.collector.db import CollectorDB
from ledger.collector.identity import GraphResolver, Pseudonyms, identity_key, parse_limits
from ledger.collector.intake import LedgerSink, _Group
from ledger.collector.touch import Touch
from ledger.ledger import Ledger, LedgerError
from ledger.settings import Settings

pytestmark = pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="needs Linux /proc")

NOW = dt.datetime(2026, 11, 1, 12, tzinfo=dt.UTC)

# --------------------------------------------------------------------------- helpers


def workers_of(server: Server) -> list[int]:
    assert server.proc is not None
    pid = server.proc.pid
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _server_socket_inode(server_port: int, client_port: int) -> str | None:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == (
            client_port
        ):
            return inode
    return None


def worker_of(server: Server, conn: http.client.HTTPConnection) -> int:
    """The worker process holding the server side of ``conn``."""
    assert conn.sock is not None
    inode = _server_socket_inode(server.port, conn.sock.getsockname()[1])
    assert inode is not None
    for pid in workers_of(server):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds the connection")


class Client:
    """One keep-alive connection posting Segment batches."""

    def __init__(self, server: Server, key: str):
        import base64

        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        self.auth = "Basic " + base64.b64encode(f"{key}:".encode()).decode()

    def post(self, messages: list[dict[str, Any]], path: str = "/v1/batch") -> dict[str, Any]:
        body = orjson.dumps({"batch": messages})
        self.conn.request(
            "POST", path, body, {"Authorization": self.auth, "Content-Type": "application/json"}
        )
        response = self.conn.getresponse()
        data = response.read()
        assert response.status == 200, data
        return dict(orjson.loads(data))

    def close(self) -> None:
        self.conn.close()


def pinned_pair(server: Server, key: str) -> tuple[Client, Client]:
    """Two connections served by two different workers (handed out in turn)."""
    a = Client(server, key)
    a.post([])
    b = Client(server, key)
    b.post([])
    assert worker_of(server, a.conn) != worker_of(server, b.conn)
    return a, b


def at_once(*calls: Callable[[], Any]) -> list[Any]:
    """Run ``calls`` in threads released together; their results in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(n: int) -> None:
        barrier.wait()
        try:
            results[n] = calls[n]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def msg(type_: str, **fields: Any) -> dict[str, Any]:
    return {"type": type_, "messageId": str(uuid.uuid4()), **fields}


def page(anon: str) -> dict[str, Any]:
    return msg("page", anonymousId=anon, properties={"url": "https://x.example/"})


def identify(user: str | None = None, anon: str | None = None, **traits: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"traits": traits}
    if user:
        fields["userId"] = user
    if anon:
        fields["anonymousId"] = anon
    return msg("identify", **fields)


def regrouped(stderr: str) -> int:
    return sum(int(n) for n in re.findall(r"(\d+) groups? resolved again", stderr))


def settings_of(home: Path) -> Settings:
    return Settings(home=home, master_key=TEST_MASTER_KEY)


def graph_rows(home: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    db = CollectorDB(settings_of(home))
    try:
        return db.query(sql, params)
    finally:
        db.close()


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    home = tmp_path / "home"
    key = add_source(home, "website", "web")
    server = Server(home, workers=2, args=("--limit", "email=3")).start()
    yield server, key
    server.stop()


# --------------------------------------------------------------------------- over HTTP


def test_workers_store_every_acknowledged_event_once_and_share_the_connections(
    two_workers: tuple[Server, str],
) -> None:
    server, key = two_workers
    assert len(workers_of(server)) == 2
    sent: set[str] = set()
    lock = threading.Lock()
    used: set[int] = set()

    def client(n: int) -> None:
        c = Client(server, key)
        for r in range(25):
            batch = [page(f"v-{n}-{r}-{i % 5}") for i in range(40)]
            answer = c.post(batch)
            assert answer["stored"] == 40 and answer["rejected"] == []
            if r % 4 == 0:  # a client retrying a request it already got an answer for
                assert c.post(batch)["stored"] == 40
            with lock:
                sent.update(m["messageId"] for m in batch)
        with lock:
            used.add(worker_of(server, c.conn))
        c.close()

    at_once(*[lambda n=n: client(n) for n in range(6)])
    assert len(used) == 2, "both workers served connections"
    server.stop()
    with Ledger.open(settings_of(server.home)) as ledger:
        assert ledger.position == len(sent) == 6 * 25 * 40
        report = ledger.verify()
        assert report.ok and report.events == len(sent)
        stored = {e.event_id for e in ledger.follow(0, page=5_000)}
    assert len(stored) == len(sent)


def test_two_workers_seeing_the_same_new_identifiers_make_one_customer_of_each(
    two_workers: tuple[Server, str],
) -> None:
    server, key = two_workers
    a, b = pinned_pair(server, key)
    rounds, width = 12, 30
    for r in range(rounds):
        ids = [f"race-{r}-{i}" for i in range(width)]
        # The same new visitors reach both workers at once; each also brings an email for
        # some of them (a stronger identifier: the customer would be minted from it).
        first = [
            identify(anon=v, email=f"{v}@x.example") if i % 3 == 0 else page(v)
            for i, v in enumerate(ids)
        ]
        second = [page(v) for v in ids]
        at_once(lambda f=first: a.post(f), lambda s=second: b.post(s))
    a.close()
    b.close()
    logged = server.stop()
    assert "Traceback" not in logged
    assert regrouped(logged) > 0, "the race was met: some groups were resolved again"
    with Ledger.open(settings_of(server.home)) as ledger:
        events = list(ledger.follow(0, page=5_000, decrypt=True))
    assert len(events) == rounds * width * 2
    owners: dict[str, set[str]] = {}
    for event in events:
        owners.setdefault(event.identifiers["anonymous_id"], set()).add(event.customer_id)
    assert all(len(c) == 1 for c in owners.values()), "one customer per visitor"
    assert len({c for cs in owners.values() for c in cs}) == rounds * width
    rows = graph_rows(
        server.home,
        "SELECT COUNT(*), COUNT(DISTINCT customer_id) FROM collector_identifiers "
        "WHERE kind = 'anonymous_id'",
    )
    assert rows == [(rounds * width, rounds * width)]
    live = graph_rows(
        server.home, "SELECT COUNT(*) FROM collector_customers WHERE merged_into IS NULL"
    )
    assert live == [(rounds * width,)]
    seqs = graph_rows(server.home, "SELECT COUNT(DISTINCT created_seq) FROM collector_customers")
    total = graph_rows(server.home, "SELECT COUNT(*) FROM collector_customers")
    assert seqs == total, "every customer has its own creation order"


def test_the_identifier_limit_is_exact_when_workers_link_at_once(
    two_workers: tuple[Server, str],
) -> None:
    server, key = two_workers
    a, b = pinned_pair(server, key)
    a.post([identify(user="u-1")])
    for k in range(5):
        at_once(
            lambda k=k: a.post([identify(user="u-1", email=f"e{2 * k}@x.example")]),
            lambda k=k: b.post([identify(user="u-1", email=f"e{2 * k + 1}@x.example")]),
        )
    # Two anonymous visitors, one on each worker, then both give the same new email at once:
    # one merge, whichever worker commits second.
    at_once(lambda: a.post([page("anon-a")]), lambda: b.post([page("anon-b")]))
    at_once(
        lambda: a.post([identify(anon="anon-a", email="shared@x.example")]),
        lambda: b.post([identify(anon="anon-b", email="shared@x.example")]),
    )
    a.close()
    b.close()
    server.stop()
    with Ledger.open(settings_of(server.home)) as ledger:
        events = list(ledger.follow(0, page=5_000, decrypt=True))
    customer = graph_rows(
        server.home, "SELECT customer_id FROM collector_identifiers WHERE kind = 'user_id'"
    )[0][0]
    emails = graph_rows(
        server.home,
        "SELECT COUNT(*) FROM collector_identifiers WHERE customer_id = ? AND kind = 'email'",
        (customer,),
    )
    assert emails == [(3,)], "exactly the limit of emails, however the links raced"
    refused = [e for e in events if e.type == "identity_link_refused"]
    assert len(refused) == 7 and {e.customer_id for e in refused} == {customer}
    merged = [e for e in events if e.type == "customers_merged"]
    assert len(merged) == 1
    survivor, gone = merged[0].customer_id, merged[0].payload["merged_customer_id"]
    owners = graph_rows(
        server.home,
        "SELECT DISTINCT customer_id FROM collector_identifiers WHERE customer_id IN (?, ?)",
        (survivor, gone),
    )
    assert owners == [(survivor,)]
    created = dict(
        graph_rows(
            server.home,
            "SELECT customer_id, created_seq FROM collector_customers WHERE customer_id IN (?, ?)",
            (survivor, gone),
        )
    )
    assert created[survivor] < created[gone], "the older customer survives"


def test_every_worker_obeys_a_forget(two_workers: tuple[Server, str]) -> None:
    server, key = two_workers
    a, b = pinned_pair(server, key)
    at_once(lambda: a.post([page("f-1")]), lambda: b.post([page("f-1")]))
    customer = graph_rows(
        server.home,
        "SELECT customer_id FROM collector_identifiers WHERE kind = 'anonymous_id'",
    )[0][0]
    forgot = subprocess.run(
        [sys.executable, "-m", "ledger", "forget", customer, "--yes"],
        env=cli_env(server.home),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert forgot.returncode == 0, forgot.stderr
    # Both workers had the visitor cached; each must now start a new customer, the same one.
    at_once(lambda: a.post([page("f-1")]), lambda: b.post([page("f-1")]))
    a.close()
    b.close()
    server.stop()
    with Ledger.open(settings_of(server.home)) as ledger:
        pages = [e for e in ledger.follow(0) if e.type == "page_viewed"]
    assert {e.customer_id for e in pages[:2]} == {customer}
    after = {e.customer_id for e in pages[2:]}
    assert len(after) == 1 and customer not in after
    assert graph_rows(server.home, "SELECT customer_id FROM collector_identifiers") == [
        (after.pop(),)
    ]


def test_a_killed_worker_is_replaced_and_stop_ends_every_worker(
    two_workers: tuple[Server, str],
) -> None:
    server, key = two_workers
    first = workers_of(server)
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = workers_of(server)
        if len(now) == 2 and first[0] not in now:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the killed worker was not replaced: {workers_of(server)}")
    clients = [Client(server, key) for _ in range(4)]
    for n, c in enumerate(clients):
        assert c.post([page(f"k-{n}")])["stored"] == 1
    for c in clients:
        c.close()
    workers = workers_of(server)
    logged = server.stop()
    assert "starting another" in logged
    for pid in workers:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        )
    with Ledger.open(settings_of(server.home)) as ledger:
        assert ledger.position == 4


def test_a_worker_killed_under_load_loses_nothing_its_clients_retry(
    two_workers: tuple[Server, str],
) -> None:
    server, key = two_workers
    acked: set[str] = set()
    lock = threading.Lock()
    started = threading.Event()
    done = threading.Event()
    retried = 0

    def client(n: int) -> None:
        nonlocal retried
        c = Client(server, key)
        r = 0
        while not done.is_set():
            r += 1
            batch = [page(f"kl-{n}-{r}-{i % 4}") for i in range(40)]
            while True:  # a Segment library retries until it gets an answer
                try:
                    answer = c.post(batch)
                    break
                except (OSError, http.client.HTTPException):
                    with lock:
                        retried += 1
                    c.close()
                    time.sleep(0.05)
                    c = Client(server, key)
            assert answer["stored"] == 40
            with lock:
                acked.update(m["messageId"] for m in batch)
            started.set()
        c.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    started.wait(30)
    time.sleep(0.2)
    os.kill(workers_of(server)[0], signal.SIGKILL)
    time.sleep(1.5)  # the clients go on, through the other worker and the replacement
    done.set()
    for t in threads:
        t.join()
    assert retried > 0, "some requests were cut off by the kill"
    server.stop()
    with Ledger.open(settings_of(server.home)) as ledger:
        report = ledger.verify()
        assert report.ok
        # Every acknowledged event is there once; a request cut off before its commit was
        # retried, and one cut off after it is stored once (event ids from messageIds).
        assert ledger.position == len(acked) > 0


def _serve(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`ledger serve` on a free port, expected to refuse and exit."""
    return subprocess.run(
        [sys.executable, "-m", "ledger", "serve", "--port", str(free_port()), *args],
        env=env or cli_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_workers_and_a_single_collector_exclude_each_other(tmp_path: Path) -> None:
    home = tmp_path / "home"
    add_source(home, "website", "web")
    single = Server(home).start()
    try:
        refused = _serve(home, "--workers", "2")
    finally:
        single.stop()
    assert refused.returncode == 1
    assert "another collector is already serving the ledger" in refused.stderr
    assert "Traceback" not in refused.stderr
    workers = Server(home, workers=2).start()
    try:
        second = _serve(home)
    finally:
        workers.stop()
    assert second.returncode == 1 and "another collector" in second.stderr


def test_workers_are_refused_for_kafka_and_postgresql(tmp_path: Path, pg_url: str) -> None:
    home = tmp_path / "home"
    for extra, store_url, said in (
        ({"LEDGER_KAFKA": "127.0.0.1:9"}, None, "with LEDGER_KAFKA set run one collector"),
        ({}, pg_url, "with PostgreSQL run one collector process"),
    ):
        done = _serve(home, "--workers", "2", env=cli_env(home, store_url, extra))
        assert done.returncode == 1, done.stderr
        said_on_one_line = " ".join(done.stderr.split())
        assert said in said_on_one_line and "Traceback" not in done.stderr


# --------------------------------------------------------------------- the races, step by step


class Process:
    """One collector process's write path (its own ledger, graph connection and cache)."""

    def __init__(self, home: Path, limits: dict[str, int] | None = None):
        settings = settings_of(home)
        self.ledger = Ledger.open(settings)
        self.db = CollectorDB(settings)
        self.resolver = GraphResolver(
            self.db, Pseudonyms(identity_key(settings)), limits, shared=True
        )
        self.sink = LedgerSink(self.ledger, home / "collector-append.lock")

    def resolve(self, *messages: dict[str, Any]) -> tuple[_Group, list[Touch], list[Any]]:
        touches = [segment.map_message(m, source="site", received_at=NOW) for m in messages]
        derived = self.resolver.resolve(touches)
        return _Group(self.resolver, touches, self.resolver.take()), touches, derived

    def append(self, resolved: tuple[_Group, list[Touch], list[Any]]) -> list[str]:
        group, touches, derived = resolved
        failed = self.sink.write(
            [t.event for t in touches] + derived, also=group.write, check=group.check
        )
        assert failed == {}
        self.resolver.committed(group.pending)
        return [t.event["customer_id"] for t in touches]

    def close(self) -> None:
        self.sink.close()
        self.db.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[tuple[Process, Process]]:
    home = tmp_path / "home"
    limits = parse_limits(["email=3"])
    a, b = Process(home, limits), Process(home, limits)
    yield a, b
    a.close()
    b.close()


def test_a_group_resolved_against_a_graph_another_process_changed_is_resolved_again(
    processes: tuple[Process, Process],
) -> None:
    a, b = processes
    # a sees the visitor alone, b with an email: both resolved before either appends.
    seen_by_a = a.resolve(page("v-1"))
    seen_by_b = b.resolve(identify(anon="v-1", email="v1@x.example"))
    (by_b,) = b.append(seen_by_b)
    (by_a,) = a.append(seen_by_a)
    assert seen_by_a[0].again == 1 and seen_by_b[0].again == 0
    assert by_a == by_b
    rows = a.db.query("SELECT kind, customer_id FROM collector_identifiers ORDER BY kind")
    assert rows == [("anonymous_id", by_b), ("email", by_b)]


def test_a_limit_counted_before_another_process_linked_is_counted_again(
    processes: tuple[Process, Process],
) -> None:
    a, b = processes
    (customer,) = a.append(a.resolve(identify(user="u-1", email="e1@x.example")))
    a.append(a.resolve(identify(user="u-1", email="e2@x.example")))
    b.append(b.resolve(identify(user="u-1")))  # b caches the customer, 2 emails
    third_by_a = a.resolve(identify(user="u-1", email="e3@x.example"))
    third_by_b = b.resolve(identify(user="u-1", email="e4@x.example"))
    a.append(third_by_a)
    b.append(third_by_b)  # its count of 2 emails is stale: resolved again, refused
    assert third_by_b[0].again == 1
    emails = a.db.query(
        "SELECT COUNT(*) FROM collector_identifiers WHERE customer_id = ? AND kind = 'email'",
        [customer],
    )
    assert emails == [(3,)]
    refused = [e for e in a.ledger.read(0, 100) if e.type == "identity_link_refused"]
    assert len(refused) == 1


def test_customers_minted_in_two_processes_keep_their_commit_order(
    processes: tuple[Process, Process],
) -> None:
    a, b = processes
    minted_by_a = a.resolve(page("old-or-new-a"))
    (first,) = b.append(b.resolve(page("old-or-new-b")))
    (second,) = a.append(minted_by_a)  # minted first in a, committed second
    seq = dict(a.db.query("SELECT customer_id, created_seq FROM collector_customers"))
    assert seq[first] < seq[second]
    # Their merge keeps the one committed first, whichever process decides it.
    a.append(a.resolve(identify(anon="old-or-new-a", email="m@x.example")))
    b.append(b.resolve(identify(anon="old-or-new-b", email="m@x.example")))
    merged = [e for e in a.ledger.read(0, 100) if e.type == "customers_merged"]
    assert [(e.customer_id, e.payload["merged_customer_id"]) for e in merged] == [(first, second)]


def test_single_process_resolver_is_refused_beside_workers(tmp_path: Path) -> None:
    settings = settings_of(tmp_path / "home")
    shared = CollectorDB(settings)
    single = CollectorDB(settings)
    try:
        shared.claim_single_writer(shared=True)
        with pytest.raises(LedgerError, match="another collector"):
            single.claim_single_writer()
    finally:
        shared.close()
        single.close()
