"""HTTP intake commands: write keys (``sources``), the collector (``serve``), ``identities``."""

from __future__ import annotations

import gc
import sys
from typing import Annotated

import typer
from rich.table import Table

from ledger.cli.output import EXIT_USAGE, console, err_console, fail
from ledger.collector.auth import KEY_CHANNELS, SourceRegistry
from ledger.collector.db import CollectorDB
from ledger.collector.identity import (
    DEFAULT_LIMITS,
    Pseudonyms,
    forget_identities,
    identity_key,
    parse_limits,
    report,
)
from ledger.collector.signing import WebhookSigning, master_key
from ledger.ingest import GC_THRESHOLDS
from ledger.ledger import Ledger
from ledger.settings import Settings

sources_app = typer.Typer(
    help="Write keys for the HTTP collector: one per source, bound to its channels.",
    no_args_is_help=True,
)


def _registry() -> tuple[CollectorDB, SourceRegistry]:
    db = CollectorDB(Settings())
    return db, SourceRegistry(db)


@sources_app.command("add")
def sources_add(
    name: Annotated[str, typer.Argument(help="The source name, stored as each event's source.")],
    channel: Annotated[
        list[str],
        typer.Option(
            "--channel",
            "-c",
            help=f"A channel this key may write ({', '.join(KEY_CHANNELS)}); repeatable.",
        ),
    ],
) -> None:
    """Register a source and print its write key (shown once; only its hash is stored)."""
    db, registry = _registry()
    try:
        source, key = registry.add(name, channel)
    finally:
        db.close()
    err_console.print(
        f"source [bold]{source.name}[/] may write {', '.join(source.channels)}; its write key "
        "(shown once, stored hashed):",
        highlight=False,
    )
    # The key alone on stdout, so `KEY=$(ledger sources add ...)` works.
    print(key)


@sources_app.command("list")
def sources_list() -> None:
    """The registered sources, their channels, whether their key still works, and the
    webhook signatures they require (a hint of each key or token, never the secret)."""
    db, registry = _registry()
    try:
        sources = registry.list()
        signing = WebhookSigning(db, None).hints()
    finally:
        db.close()
    table = Table("source", "channels", "key", "created", "status", "webhook signatures")
    for s in sources:
        status = "active" if s.active else f"revoked {s.revoked_at}"
        table.add_row(
            s.name,
            ", ".join(s.channels),
            s.key_prefix + "…",
            s.created_at,
            status,
            "\n".join(signing.get(s.name, [])) or "-",
        )
    console.print(table)
    if not sources:
        err_console.print("no sources yet: add one with `ledger sources add NAME --channel web`")


@sources_app.command("revoke")
def sources_revoke(
    name: Annotated[str, typer.Argument(help="The source whose key stops working.")],
) -> None:
    """Revoke a source's write key (a running collector refuses it within a second)."""
    db, registry = _registry()
    try:
        source = registry.revoke(name)
    finally:
        db.close()
    console.print(f"source {source.name}: key {source.key_prefix}… revoked at {source.revoked_at}")


def _secret_value(value: str | None, option: str) -> str | None:
    """``-`` reads the value from stdin, so it stays out of shell history and ``ps``."""
    if value != "-":
        return value
    text = sys.stdin.read().strip()
    if not text:
        fail(f"{option} -: nothing on stdin; pipe the value in", EXIT_USAGE)
    return text


@sources_app.command("signing")
def sources_signing(
    name: Annotated[str, typer.Argument(help="The source whose webhook requests to check.")],
    sendgrid_key: Annotated[
        str | None,
        typer.Option(
            help="SendGrid's Verification Key (Mail Settings > Signed Event Webhook; base64 "
            "or PEM; '-' reads stdin). /webhooks/sendgrid then needs a valid ECDSA signature.",
        ),
    ] = None,
    twilio_token: Annotated[
        str | None,
        typer.Option(
            help="The Twilio account's Auth Token ('-' reads stdin, keeping it out of shell "
            "history). /webhooks/twilio/call-status then needs a valid X-Twilio-Signature.",
        ),
    ] = None,
    public_url: Annotated[
        str | None,
        typer.Option(
            help="The collector's base URL as Twilio calls it (https://calls.example.com) when "
            "a proxy sits in between: Twilio signs the URL it requested.",
        ),
    ] = None,
    clear: Annotated[
        list[str] | None,
        typer.Option(help="Stop requiring this provider's signature: sendgrid or twilio."),
    ] = None,
) -> None:
    """Require provider signatures on a source's webhooks (SendGrid ECDSA, Twilio HMAC-SHA1).

    A source with a key or token set refuses its provider's requests without a signature
    (401) or with one that does not verify (403). The Twilio token is stored encrypted under
    the ledger's master key; neither secret is printed back (`ledger sources list` shows a
    hint). A running collector applies a change within a second.
    """
    if not (sendgrid_key or twilio_token or public_url or clear):
        fail(
            "nothing to change: pass --sendgrid-key, --twilio-token, --public-url or --clear",
            EXIT_USAGE,
        )
    settings = Settings()
    db = CollectorDB(settings)
    try:
        SourceRegistry(db)  # the sources table, for a fresh ledger
        signing = WebhookSigning(db, master_key(settings))
        for provider in clear or []:
            done = signing.clear(name, provider)
            console.print(
                f"source {name}: {provider} signatures "
                + ("no longer required" if done else "were not required")
            )
        key = _secret_value(sendgrid_key, "--sendgrid-key")
        if key:
            config = signing.set_sendgrid(name, key)
            console.print(f"source {name}: SendGrid signatures required ({config.hint})")
        token = _secret_value(twilio_token, "--twilio-token")
        if token:
            config = signing.set_twilio(name, token, public_url)
        elif public_url:
            config = signing.set_public_url(name, public_url)
        if token or public_url:
            where = f" over {config.public_url}/webhooks/…" if config.public_url else ""
            console.print(f"source {name}: Twilio signatures required{where} ({config.hint})")
    finally:
        db.close()


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 8080,
    limit: Annotated[
        list[str] | None,
        typer.Option(
            "--limit",
            help="Identifiers of a kind one customer may hold, KIND=N (repeatable); defaults: "
            + ", ".join(f"{k}={v}" for k, v in DEFAULT_LIMITS.items()),
        ),
    ] = None,
    access_log: Annotated[
        bool, typer.Option(help="Log each request (client addresses are personal data).")
    ] = False,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Collector processes (embedded SQLite ledger only). One process uses one "
            "core; N share the port (connections handed out in turn) and the ledger, take "
            "turns to append, and check each identity resolution under the ledger's write "
            "lock, so acknowledgements, one customer per identifier, merges, limits and "
            "forget stay exact. Worth it up to the number of cores.",
        ),
    ] = 1,
) -> None:
    """Run the HTTP collector: Segment-compatible /v1/* and provider webhooks, into the ledger.

    With LEDGER_KAFKA set, events go to the touchpoints topic instead (answered after the
    broker's acknowledgement); the ingest worker appends them. Every 2xx follows the commit
    (or the broker's acknowledgement) of its events.
    """
    import uvicorn

    from ledger.collector.app import create_app, open_collector

    settings = Settings()
    limits = parse_limits(limit or [])
    if workers > 1:
        from ledger.collector.workers import serve_workers

        status = serve_workers(
            settings,
            limits,
            host,
            port,
            workers,
            access_log,
            announce=lambda line: err_console.print(line, highlight=False),
        )
        raise typer.Exit(status)
    # Opened here, not at server startup, so a problem is a one-line error, not a traceback.
    collector = open_collector(settings, limits)
    app = create_app(settings, collector=collector)
    # Every request makes thousands of short-lived objects; with the default thresholds the
    # garbage collector rescans the long-lived ones (modules, the identity graph's cache)
    # over and over. As the ingest worker does: start-up objects frozen, thresholds raised
    # (server CPU per event 88-113 -> 73-93 µs in bench/collector.py, A/B on the same load).
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    where = "PostgreSQL" if settings.store_url else str(settings.sqlite_path)
    if settings.kafka:
        where = f"Kafka topic {settings.topic_touchpoints} at {settings.kafka}"
    err_console.print(f"collector on http://{host}:{port} into {where}", highlight=False)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=access_log,
        lifespan="on",
        timeout_graceful_shutdown=30,
    )
    uvicorn.Server(config).run()


def identities(
    customer: Annotated[str, typer.Argument(help="A customer id, e.g. from `ledger history`.")],
    forget: Annotated[
        bool,
        typer.Option(
            "--forget",
            help="Only unlink the person's identifiers from the graph; `ledger forget` does this "
            "and erases their events' personal data.",
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """The identifiers the collector linked to a customer, its merges and refused links."""
    settings = Settings()
    if forget:
        _forget_identities(settings, customer, yes)
        return
    db = CollectorDB(settings)
    try:
        found = report(db, customer)
        if not found.known:
            fail(f"no customer {customer!r} in the collector's identity graph")
        if found.merged_into:
            console.print(f"{customer} was merged into [bold]{found.merged_into}[/]")
            found = report(db, found.merged_into)
        if found.forgotten_at:
            console.print(f"{found.customer_id}: identifiers unlinked at {found.forgotten_at}")
    finally:
        db.close()
    # Values are not in the graph (only keyed hashes): read them from the ledger's events.
    pseudonyms = Pseudonyms(identity_key(settings))
    values: dict[tuple[str, str], str] = {}
    names: set[str] = set()
    with Ledger.open(settings) as ledger:
        for cid in [found.customer_id, *found.absorbed]:
            for event in ledger.history(cid):
                for kind, value in (event.identifiers or {}).items():
                    if kind == "name":
                        names.add(value)
                    else:
                        values[(kind, pseudonyms.digest(kind, value))] = value
    console.print(
        f"customer [bold]{found.customer_id}[/]"
        + (f" ({', '.join(sorted(names))})" if names else "")
    )
    table = Table("kind", "identifier", "first seen", title="identifiers")
    for kind, digest, seen in found.identifiers:
        table.add_row(kind, values.get((kind, digest), f"(hash {digest[:12]}…)"), seen)
    console.print(table)
    if found.merged:
        merges = Table("merged customer", "linked by", "at", title="merges into this customer")
        for gone, kind, at in found.merged:
            merges.add_row(gone, kind, at)
        console.print(merges)
    if found.absorbed:
        console.print("histories joined here: " + ", ".join(found.absorbed))
    if found.refusals:
        refused = Table("identifier kind", "other customer", "limit", "at", title="refused links")
        for kind, other, limit_value, at in found.refusals:
            refused.add_row(kind, other or "(new identifier)", str(limit_value), at)
        console.print(refused)


def _forget_identities(settings: Settings, customer: str, yes: bool) -> None:
    if not yes:
        if not sys.stdin.isatty():
            fail("--forget is irreversible: pass --yes to confirm without a terminal", EXIT_USAGE)
        typer.confirm(f"Irreversibly unlink the identifiers of {customer}?", abort=True)
    db = CollectorDB(settings)
    try:
        group = forget_identities(db, customer)
    finally:
        db.close()
    console.print(
        f"unlinked the identifiers of {', '.join(group)}; a returning identifier now starts "
        f"a new customer. Their events' personal data: `ledger forget {customer}` erases it "
        "for all of them (and unlinks the graph too, so it alone is enough)"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(sources_app, name="sources")
    app.command()(serve)
    app.command()(identities)
