"""Personal data is encrypted at rest, and ``forget`` crypto-shreds one customer: their
personal fields become unreadable everywhere (history, the database file, its WAL), while
every chain still verifies and other customers are untouched."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from collector_server import Server, add_source, cli_env
from conftest import TEST_MASTER_KEY
from ledger.ledger import Ledger
from ledger.settings import Settings

MakeEvent = Callable[..., dict[str, Any]]

# Distinctive clear text per customer, so a grep of the database bytes cannot hit by chance.
SECRETS = {
    "cus_alice": {
        "email": "alice.wunderland@example.org",
        "name": "Alice Wunderland",
        "text": "my card ending 4242 was charged twice",
        "form": "please call alice on the landline",
        "extra": "alice-private-utm-value",
    },
    "cus_bob": {
        "email": "bob.baumeister@example.org",
        "name": "Bob Baumeister",
        "text": "bob wants to cancel the subscription",
        "form": "bob prefers contact by post",
        "extra": "bob-private-utm-value",
    },
}


def personal_events(make_event: MakeEvent, customer: str) -> list[dict[str, Any]]:
    s = SECRETS[customer]
    ids = {"email": s["email"], "name": s["name"], "phone": "+4915112345678"}
    form = {"form_id": "contact", "fields": {"message": s["form"]}}
    return [
        make_event(customer, "page_viewed", identifiers={"anonymous_id": f"anon-{customer}"}),
        make_event(customer, "form_submitted", identifiers=ids, payload=form),
        make_event(
            customer,
            "chat_message",
            identifiers=ids,
            payload={
                "conversation_id": f"conv-{customer}",
                "direction": "inbound",
                "text": s["text"],
            },
            utm_content=s["extra"],
        ),
        make_event(customer, "order_placed"),  # no personal data at all
    ]


def fill(settings: Settings, make_event: MakeEvent) -> None:
    with Ledger.open(settings) as ledger:
        events = personal_events(make_event, "cus_alice") + personal_events(make_event, "cus_bob")
        assert ledger.append(events).accepted == 8


def db_bytes(settings: Settings) -> bytes:
    """The SQLite database as it sits on disk: main file plus write-ahead log."""
    path = settings.sqlite_path
    wal = Path(f"{path}-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def secrets_in(data: bytes, customer: str) -> list[str]:
    return [value for value in SECRETS[customer].values() if value.encode() in data]


def assert_readable(ledger: Ledger, customer: str) -> None:
    s = SECRETS[customer]
    history = ledger.history(customer)
    assert [e.type for e in history][:4] == [
        "page_viewed",
        "form_submitted",
        "chat_message",
        "order_placed",
    ]
    assert not any(e.erased for e in history)
    assert history[1].identifiers == {
        "email": s["email"],
        "name": s["name"],
        "phone": "+4915112345678",
    }
    assert history[1].payload["fields"] == {"message": s["form"]}
    assert history[2].payload["text"] == s["text"]
    assert history[2].extra == {"utm_content": s["extra"]}


def test_forget_erases_personal_fields_keeps_chains_and_other_customers(
    settings: Settings, make_event: MakeEvent
) -> None:
    fill(settings, make_event)
    with Ledger.open(settings) as ledger:
        assert_readable(ledger, "cus_alice")
        before = {e.position: e.hash for e in ledger.read(limit=100)}
        assert ledger.forget("cus_alice", reason="GDPR art. 17 request")
        history = ledger.history("cus_alice")
        # The history stays complete: same events, same hashes, plus the fact of forgetting.
        assert [e.type for e in history] == [
            "page_viewed",
            "form_submitted",
            "chat_message",
            "order_placed",
            "customer_forgotten",
        ]
        for event in history[:4]:
            assert event.hash == before[event.position]
            assert event.identifiers is None and event.extra == {}
        # Events that carried personal data say so; one that had none is simply intact.
        assert [e.erased for e in history] == [True, True, True, False, False]
        assert "fields" not in history[1].payload and history[1].payload["form_id"] == "contact"
        assert "text" not in history[2].payload
        assert history[2].payload == {"conversation_id": "conv-cus_alice", "direction": "inbound"}
        assert history[3].payload["total"] == {"amount": "19.99", "currency": "EUR"}
        assert history[4].sequence == 5 and history[4].payload == {"reason": "GDPR art. 17 request"}
        assert_readable(ledger, "cus_bob")
        report = ledger.verify()
        assert (report.ok, report.events, report.customers) == (True, 9, 2)
        assert not ledger.forget("cus_alice")  # already forgotten: nothing to destroy
        assert not ledger.forget("cus_nobody")
        assert ledger.position == 9
        raw = b"".join(row.state for row in ledger.read_raw())
        assert secrets_in(raw, "cus_alice") == [] and secrets_in(raw, "cus_bob") == []
    # Another process (a fresh ledger) sees the same.
    with Ledger.open(settings) as ledger:
        assert [e.erased for e in ledger.history("cus_alice")][:3] == [True, True, True]
        assert_readable(ledger, "cus_bob")


def test_forget_leaves_no_plaintext_or_key_in_the_sqlite_file(
    sqlite_settings: Settings, make_event: MakeEvent
) -> None:
    fill(sqlite_settings, make_event)
    with Ledger.open(sqlite_settings) as ledger:
        # Encryption at rest: neither customer's personal data is on disk in the clear,
        # though history decrypts it.
        on_disk = db_bytes(sqlite_settings)
        assert secrets_in(on_disk, "cus_alice") == [] and secrets_in(on_disk, "cus_bob") == []
        assert_readable(ledger, "cus_alice")
        wrapped = ledger.store.wrapped_key("cus_alice")
        assert wrapped is not None and wrapped in on_disk
        assert ledger.forget("cus_alice")
        # While the ledger is still open (WAL present or not), the wrapped key is gone from
        # every byte on disk: no master key can bring Alice's data back.
        on_disk = db_bytes(sqlite_settings)
        assert wrapped not in on_disk
        assert secrets_in(on_disk, "cus_alice") == [] and secrets_in(on_disk, "cus_bob") == []
        assert ledger.verify().ok
    on_disk = db_bytes(sqlite_settings)
    assert wrapped not in on_disk and secrets_in(on_disk, "cus_alice") == []


_PINNING_READER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
# A commit of its own leaves frames in the WAL that no checkpoint has copied yet, so the
# snapshot below is one of the WAL's (a reader of a fully copied WAL reads the main file).
con.execute("PRAGMA wal_autocheckpoint=0")
con.execute("CREATE TABLE IF NOT EXISTS pinning_reader (x INTEGER)")
con.execute("INSERT INTO pinning_reader VALUES (1)")
con.execute("BEGIN")
con.execute("SELECT count(*) FROM stored_events").fetchall()  # holds this snapshot
print("pinned", flush=True)
time.sleep(1.0)
con.execute("COMMIT")
"""


def test_forget_erases_the_key_from_disk_while_another_process_reads(
    sqlite_settings: Settings, make_event: MakeEvent
) -> None:
    """A reader in another process (a collector, an analyst's script) holding an older
    snapshot pins the WAL's frames, with the wrapped key in their page images: forget's
    checkpoint waits for it to move on (the connection's busy handler) rather than leave
    them on disk."""
    fill(sqlite_settings, make_event)
    with Ledger.open(sqlite_settings) as ledger:
        wrapped = ledger.store.wrapped_key("cus_alice")
        assert wrapped is not None
        reader = subprocess.Popen(
            [sys.executable, "-c", _PINNING_READER, str(sqlite_settings.sqlite_path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert reader.stdout is not None and reader.stdout.readline() == "pinned\n"
            assert ledger.forget("cus_alice")
            assert wrapped not in db_bytes(sqlite_settings)
        finally:
            reader.kill()
            reader.wait()


def test_the_checkpoint_after_forget_retries_while_another_checkpoint_runs(
    sqlite_settings: Settings, make_event: MakeEvent
) -> None:
    """Only one checkpoint runs at a time: SQLite answers the second `busy` at once, without
    waiting (the store's own background thread checkpoints after every commit, the forget's
    included). The WAL then kept its old page images, erased data with them: the store
    retries until its TRUNCATE checkpoint has run."""
    fill(sqlite_settings, make_event)
    wal = Path(f"{sqlite_settings.sqlite_path}-wal")
    stop = threading.Event()

    def checkpoint_again_and_again() -> None:
        con = sqlite3.connect(sqlite_settings.sqlite_path, isolation_level=None)
        con.execute("PRAGMA busy_timeout=0")
        while not stop.is_set():
            with contextlib.suppress(sqlite3.OperationalError):
                con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        con.close()

    other = threading.Thread(target=checkpoint_again_and_again)
    with Ledger.open(sqlite_settings) as ledger:
        other.start()
        try:
            for i in range(30):
                ledger.append([make_event(f"cus_{i:03d}", "page_viewed")])
                assert ledger.store.checkpoint()
                assert wal.stat().st_size == 0, f"round {i}: the WAL kept its frames"
        finally:
            stop.set()
            other.join()


def test_events_after_forget_are_readable_under_a_new_key(
    settings: Settings, make_event: MakeEvent
) -> None:
    fill(settings, make_event)
    with Ledger.open(settings) as ledger:
        ledger.forget("cus_alice")
        comeback = make_event(
            "cus_alice", "chat_message", identifiers={"email": "new.alice@example.org"}
        )
        assert ledger.append([comeback]).accepted == 1
        history = ledger.history("cus_alice")
        assert [e.erased for e in history] == [True, True, True, False, False, False]
        [again] = [e for e in history if e.event_id == comeback["event_id"]]
        assert again.identifiers == {"email": "new.alice@example.org"}
        assert ledger.verify().ok


def test_forget_in_another_process_is_honoured_by_an_open_ledger(
    settings: Settings, make_event: MakeEvent
) -> None:
    """A long-running writer (an ingest worker) must not keep using a destroyed key."""
    fill(settings, make_event)
    with Ledger.open(settings) as worker, Ledger.open(settings) as admin:
        assert worker.history("cus_alice")[1].identifiers is not None  # key now cached
        assert admin.forget("cus_alice")
        later = make_event("cus_alice", "chat_message", identifiers={"name": "Alice Again"})
        assert worker.append([later]).accepted == 1
        # Whatever the worker wrote after the forget is readable by everyone, i.e. it was
        # not encrypted with the destroyed key (which would make it unreadable garbage).
        with Ledger.open(settings) as reader:
            [event] = [e for e in reader.history("cus_alice") if e.event_id == later["event_id"]]
            assert not event.erased
            assert event.identifiers == {"name": "Alice Again"}


@pytest.mark.parametrize("decrypt", [False, True])
def test_global_log_read_never_exposes_a_forgotten_customer(
    sqlite_settings: Settings, make_event: MakeEvent, decrypt: bool
) -> None:
    fill(sqlite_settings, make_event)
    with Ledger.open(sqlite_settings) as ledger:
        ledger.forget("cus_alice")
        events = ledger.read(limit=100, decrypt=decrypt)
        alice = [e for e in events if e.customer_id == "cus_alice"]
        assert all(e.identifiers is None and "text" not in e.payload for e in alice)
        bob_chat = next(
            e for e in events if e.customer_id == "cus_bob" and e.type == "chat_message"
        )
        assert ("text" in bob_chat.payload) is decrypt


def test_global_log_read_honours_a_forget_by_another_ledger(
    settings: Settings, make_event: MakeEvent
) -> None:
    """A projection runner reading the log must not decrypt with a key it cached before
    another process destroyed it."""
    fill(settings, make_event)
    with Ledger.open(settings) as runner, Ledger.open(settings) as admin:
        before = [e for e in runner.read(limit=100, decrypt=True) if e.customer_id == "cus_alice"]
        assert any(e.identifiers for e in before)  # decrypted, key now cached in `runner`
        assert admin.forget("cus_alice")
        after = [e for e in runner.read(limit=100, decrypt=True) if e.customer_id == "cus_alice"]
        assert after and all(e.identifiers is None for e in after)
        assert any(e.erased for e in after)


# --------------------------------------------------------------------------- one command


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger", *args],
        capture_output=True,
        text=True,
        env={**cli_env(home), "COLUMNS": "300"},
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def _segment(server: Server, key: str, call: str, **msg: Any) -> None:
    answer = requests.post(
        f"{server.url}/v1/{call}",
        auth=(key, ""),
        json={"messageId": str(uuid.uuid4()), **msg},
        timeout=30,
    )
    assert answer.status_code == 200 and answer.json()["stored"] == 1, answer.text


def _customers(home: Path, type_: str) -> list[str]:
    with Ledger.open(Settings(home=home, master_key=TEST_MASTER_KEY)) as ledger:
        return [e.customer_id for e in ledger.read(0, 10_000) if e.type == type_]


def test_forget_also_unlinks_the_collectors_identity_graph(tmp_path: Path) -> None:
    """`ledger forget C` is the one command: data keys of the whole (merged) person destroyed,
    their identifiers unlinked from the graph of the running collector, so the same email or
    cookie seen again is someone new, never the forgotten customer."""
    home = tmp_path / "home"
    key = add_source(home, "website", "web")
    server = Server(home).start()
    try:
        _segment(server, key, "page", anonymousId="cookie-9", properties={"url": "https://s/"})
        _segment(server, key, "identify", userId="u-9")
        _segment(
            server,
            key,
            "identify",
            userId="u-9",
            anonymousId="cookie-9",
            traits={"email": "Erin@Example.org", "name": "Erin Erased"},
        )
        browsing, app_user, person = _customers(home, "page_viewed") + _customers(
            home, "identity_linked"
        )
        assert person == browsing != app_user  # merged: the older customer survives

        with sqlite3.connect(home / "ledger.db") as conn:
            digests = [
                bytes.fromhex(r[0])
                for r in conn.execute("SELECT digest FROM collector_identifiers")
            ]
        assert len(digests) == 3  # cookie, user id, email: all of this one person

        forgot = _cli(home, "forget", app_user, "--yes", "--reason", "art. 17")
        assert forgot.returncode == 0, forgot.stderr
        # The identifier hashes are gone from every byte on disk, not only from the table.
        on_disk = (home / "ledger.db").read_bytes()
        wal = home / "ledger.db-wal"
        on_disk += wal.read_bytes() if wal.exists() else b""
        assert not [d for d in digests if d.hex().encode() in on_disk]
        out = forgot.stdout.replace("\n", "")
        assert f"forgot {browsing}, {app_user}: data key destroyed" in out
        assert f"identifiers unlinked (with the merged customers {browsing})" in out
        shown = _cli(home, "identities", browsing)
        assert "identifiers unlinked at" in shown.stdout and "erin@example.org" not in shown.stdout

        # The running collector honours it at once: the same identifiers make someone new.
        _segment(server, key, "track", event="Viewed Plans", anonymousId="cookie-9")
        _segment(
            server, key, "identify", anonymousId="cookie-new", traits={"email": "erin@example.org"}
        )
        back = _customers(home, "web_event") + _customers(home, "identity_linked")[2:]
        assert len(back) == 2 and not {browsing, app_user} & set(back)
    finally:
        server.stop()

    with Ledger.open(Settings(home=home, master_key=TEST_MASTER_KEY)) as ledger:
        for forgotten in (browsing, app_user):
            history = ledger.history(forgotten)
            assert history[-1].type == "customer_forgotten"
            assert history[-1].payload == {"reason": "art. 17"}
            assert all(e.identifiers is None for e in history)
        # The newcomer's data is theirs, readable under their own key.
        [newcomer] = [e for e in ledger.history(back[1]) if e.type == "identity_linked"]
        assert newcomer.identifiers == {"email": "erin@example.org", "anonymous_id": "cookie-new"}
        assert ledger.verify().ok
    # Forgetting again finds no key but still clears the graph (idempotent), exit 0.
    again = _cli(home, "forget", browsing, "--yes")
    assert again.returncode == 0, again.stderr
    assert "data key already destroyed" in again.stdout


def test_forget_without_a_collector_leaves_no_graph_tables_behind(
    sqlite_settings: Settings, make_event: MakeEvent
) -> None:
    fill(sqlite_settings, make_event)
    forgot = _cli(sqlite_settings.home, "forget", "cus_alice", "--yes")
    assert forgot.returncode == 0, forgot.stderr
    assert "identity graph" not in forgot.stdout
    with sqlite3.connect(sqlite_settings.sqlite_path) as conn:
        tables = conn.execute(
            "SELECT name FROM sqlite_master WHERE name LIKE 'collector%'"
        ).fetchall()
    assert tables == []
