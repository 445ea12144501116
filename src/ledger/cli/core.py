"""Core commands: ingest, history, verify, forget, stats, schemas."""

from __future__ import annotations

import datetime as dt
import sys
import time
from pathlib import Path
from typing import IO, Annotated, Any

import orjson
import typer
from rich.progress import TaskID
from rich.table import Table

from ledger.cli.output import EXIT_USAGE, console, err_console, fail, progress
from ledger.contract import event_json_schemas
from ledger.deadletter import DeadLetters, purge_customer
from ledger.ingest import IngestReport, ingest_stream
from ledger.ledger import Anchor, Ledger, RecordedEvent
from ledger.settings import Settings


def parse_moment(value: str | None, option: str) -> dt.datetime | None:
    """An ISO 8601 time with a timezone, or a date (midnight UTC at the end of that day)."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            return dt.datetime.combine(day, dt.time.max, tzinfo=dt.UTC)
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        fail(
            f"{option}: {value!r} is not a time; expected ISO 8601 such as "
            "2026-03-01T12:00:00Z or a date such as 2026-03-01",
            EXIT_USAGE,
        )
    if moment.tzinfo is None:
        fail(
            f"{option}: {value!r} has no timezone; add one, e.g. {value}Z or {value}+01:00",
            EXIT_USAGE,
        )
    return moment


def _open(settings: Settings | None = None) -> Ledger:
    return Ledger.open(settings or Settings())


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{n} B"


# --------------------------------------------------------------------------- ingest


def ingest(
    files: Annotated[
        list[str], typer.Argument(help="JSONL or CSV files to import; '-' reads standard input.")
    ],
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            help="jsonl or csv. Default: from each file's extension (.csv is CSV, else JSONL).",
        ),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict/--lenient",
            help="Strict rejects fields outside the contract; lenient (default, or "
            "LEDGER_STRICT) keeps them, encrypted, in the event's extra bag.",
        ),
    ] = False,
    batch_size: Annotated[
        int | None, typer.Option(help="Events per transaction (default LEDGER_BATCH_SIZE).")
    ] = None,
) -> None:
    """Append touchpoints from JSONL or CSV files.

    Valid lines land; each bad line goes to the dead letters ($LEDGER_HOME/rejected/)
    with file, line number and reason. Exit status: 0 when every line landed or was a
    duplicate, 1 when any line was rejected, 2 when the arguments are unusable (missing
    file, unknown format)."""
    if fmt is not None and fmt not in ("jsonl", "csv"):
        fail(f"--format: expected jsonl or csv, got {fmt!r}", EXIT_USAGE)
    for name in files:
        path = Path(name)
        if name != "-" and not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            fail(f"{name}: {what}; expected a JSONL or CSV file (or '-' for stdin)", EXIT_USAGE)
    settings = Settings()
    size = batch_size or settings.batch_size
    if size < 1:
        fail(f"--batch-size: expected a positive number, got {size}", EXIT_USAGE)
    reports: list[IngestReport] = []
    with _open(settings) as ledger, DeadLetters(settings.rejected_dir) as dead:
        for name in files:
            kind = fmt or ("csv" if name.lower().endswith(".csv") else "jsonl")
            if name == "-":
                reports.append(
                    ingest_stream(
                        ledger,
                        sys.stdin.buffer,
                        source="<stdin>",
                        fmt=kind,  # type: ignore[arg-type]
                        dead_letters=dead,
                        batch_size=size,
                        strict=strict or None,
                    )
                )
                continue
            total = Path(name).stat().st_size
            with progress() as bar, open(name, "rb") as fh:
                task = bar.add_task(f"ingest {Path(name).name}", total=total)

                def advance(_: IngestReport, fh: IO[bytes] = fh, task: TaskID = task) -> None:
                    bar.update(task, completed=fh.tell())

                reports.append(
                    ingest_stream(
                        ledger,
                        fh,
                        source=name,
                        fmt=kind,  # type: ignore[arg-type]
                        dead_letters=dead,
                        batch_size=size,
                        strict=strict or None,
                        on_batch=advance,
                    )
                )
                bar.update(task, completed=total)
        dead_path, samples = dead.path, dead.samples
    table = Table(title="ingest", title_justify="left")
    for column in ("file", "lines", "accepted", "duplicates", "rejected"):
        table.add_column(column, justify="left" if column == "file" else "right")
    for r in reports:
        table.add_row(
            r.source, f"{r.lines:,}", f"{r.accepted:,}", f"{r.duplicates:,}", f"{r.rejected:,}"
        )
    console.print(table)
    rejected = sum(r.rejected for r in reports)
    if rejected:
        # The first reasons on screen: most bad files have one mistake repeated.
        for source, line, reason in samples:
            where = f"{source} line {line}" if line is not None else source
            err_console.print(f"rejected: {where}: {reason}", highlight=False, markup=False)
        err_console.print(
            f"{rejected:,} rejected line(s) with reasons in {dead_path}", highlight=False
        )
        raise typer.Exit(1)
    if not any(r.lines for r in reports):
        err_console.print("nothing to ingest: the input had no events")


# --------------------------------------------------------------------------- history


def _summary(event: RecordedEvent) -> str:
    text = _payload_summary(event.payload)
    if event.erased:
        return (text + " " if text else "") + "[dim](personal data erased)[/]"
    return text


def _payload_summary(p: dict[str, Any]) -> str:
    for key in ("url", "form_id", "text", "subject", "order_id", "ticket_id", "purpose"):
        if key in p:
            value = p[key]
            extra = ""
            if "total" in p:
                extra = f" {p['total']['amount']} {p['total']['currency']}"
            elif "amount" in p and isinstance(p["amount"], dict):
                extra = f" {p['amount']['amount']} {p['amount']['currency']}"
            elif "status" in p:
                extra = f" {p['status']}"
            text = str(value)
            return (text[:60] + "…" if len(text) > 60 else text) + extra
    return ", ".join(f"{k}={v}" for k, v in list(p.items())[:3])


def history(
    customer: Annotated[str, typer.Argument(help="The customer id, e.g. cus_000042.")],
    as_of: Annotated[
        str | None,
        typer.Option(help="Only events that had occurred by this time (ISO 8601 with timezone)."),
    ] = None,
    known_at: Annotated[
        str | None,
        typer.Option(help="Only events the ledger had recorded by this time (what was known)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Show one customer's timeline in event-time order.

    Personal data is decrypted, or marked erased after `ledger forget`."""
    as_of_t = parse_moment(as_of, "--as-of")
    known_t = parse_moment(known_at, "--known-at")
    with _open() as ledger:
        events = ledger.history(customer, as_of=as_of_t, known_at=known_t)
    if not events:
        fail(
            f"no events for customer {customer!r}"
            + (" in that window" if as_of or known_at else "")
        )
    if as_json:
        for e in events:
            sys.stdout.buffer.write(orjson.dumps(e.to_json()) + b"\n")
        return
    table = Table(title=f"history of {customer} ({len(events)} events)", title_justify="left")
    for column in ("occurred_at", "channel", "type", "what", "seq", "position"):
        table.add_column(column, overflow="fold")
    for e in events:
        table.add_row(
            e.occurred_at.strftime("%Y-%m-%d %H:%M:%S"),
            e.channel,
            e.type,
            _summary(e),
            str(e.sequence),
            str(e.position),
        )
    console.print(table)
    identifiers = next((e.identifiers for e in reversed(events) if e.identifiers), None)
    if identifiers:
        console.print("identifiers: " + ", ".join(f"{k}={v}" for k, v in identifiers.items()))


# --------------------------------------------------------------------------- verify


def verify(
    anchor: Annotated[
        list[str] | None,
        typer.Option(
            "--anchor",
            "-a",
            help="An anchor (POSITION:DIGEST) an earlier verify printed: fail unless the "
            "ledger up to POSITION still replays to DIGEST. Repeatable.",
        ),
    ] = None,
    anchor_file: Annotated[
        Path | None,
        typer.Option(
            help="A file of anchors, one per line (as --anchor-out writes them); each is checked."
        ),
    ] = None,
    anchor_out: Annotated[
        Path | None,
        typer.Option(
            help="Append this run's anchor to FILE when the ledger verifies (keep FILE, or a "
            "copy, outside the ledger's machine)."
        ),
    ] = None,
) -> None:
    """Recompute every customer's hash chain and report tampering.

    Exit 1 and name the first altered event (customer, sequence, position) when any
    stored byte was changed, an event removed or a chain rewritten. On success it prints
    an anchor, POSITION:DIGEST, a commitment to every chain up to POSITION: keep it
    somewhere the ledger's database cannot reach, and a later `ledger verify --anchor`
    proves that nothing up to POSITION was rewritten, even by someone able to re-seal
    chains inside the database."""
    texts = list(anchor or [])
    if anchor_file is not None:
        try:
            texts += [t for t in anchor_file.read_text().splitlines() if t.strip()]
        except OSError as exc:
            fail(f"--anchor-file: cannot read {anchor_file} ({exc.strerror})", EXIT_USAGE)
    try:
        anchors = [Anchor.parse(t) for t in texts]
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    with _open() as ledger, progress() as bar:
        task = bar.add_task("verify", total=max(ledger.position, 1))
        report = ledger.verify(
            lambda done, total: bar.update(task, completed=done, total=total), anchors=anchors
        )
    if report.ok:
        console.print(
            f"[green]OK[/]: {report.events:,} events in {report.customers:,} customer chains "
            "verified; no alteration found"
            + (f"; {len(anchors)} anchor(s) hold" if anchors else "")
        )
        if report.anchor is not None:
            console.print(f"anchor: {report.anchor}", highlight=False, soft_wrap=True)
            if anchor_out is not None:
                with anchor_out.open("a") as out:
                    out.write(f"{report.anchor}\n")
        return
    for broken, reason in report.broken_anchors:
        err_console.print(f"anchor {broken.position} broken: {reason}", highlight=False)
    if not report.problems:
        fail(f"{len(report.broken_anchors)} anchor(s) do not hold: the ledger was rewritten")
    table = Table(title="tampering found", title_justify="left")
    for column in ("customer", "sequence", "position", "problem"):
        table.add_column(column)
    for p in sorted(report.problems, key=lambda p: p.position):
        table.add_row(p.customer_id, str(p.sequence), str(p.position), p.reason)
    console.print(table)
    first = report.first
    assert first is not None
    fail(
        f"first altered event: customer {first.customer_id}, sequence {first.sequence}, "
        f"position {first.position} ({first.reason})"
    )


# --------------------------------------------------------------------------- forget


def forget(
    customer: Annotated[str, typer.Argument(help="The customer whose personal data to erase.")],
    reason: Annotated[str | None, typer.Option(help="Why (recorded in the ledger).")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Erase a customer's personal data by destroying their data key (crypto-shredding).

    The events stay (chains still verify); their personal fields can never be decrypted
    again. The erasure itself is recorded as a customer_forgotten event, and the
    customer's rejected lines are removed from the dead letters.

    When the HTTP collector's identity graph knows the customer, the whole person goes:
    their identifiers are unlinked from the graph (an email or cookie seen again starts a
    new customer, never this one) and every customer merged with them is forgotten too."""
    from ledger.collector.db import CollectorDB
    from ledger.collector.identity import forget_identities, graph_group

    if not yes:
        if not sys.stdin.isatty():
            fail("forget is irreversible: pass --yes to confirm without a terminal", EXIT_USAGE)
        typer.confirm(f"Irreversibly erase the personal data of {customer}?", abort=True)
    settings = Settings()
    # The graph first: from here on no new touch resolves to this person, so nothing the
    # collector appends can land under a key about to be destroyed.
    db = CollectorDB(settings)
    try:
        group = graph_group(db, customer)
        if group is not None:
            group = forget_identities(db, customer)
    finally:
        db.close()
    members = group or [customer]
    with _open(settings) as ledger:
        erased = [m for m in members if ledger.forget(m, reason=reason)]
    purged = sum(purge_customer(settings.rejected_dir, m) for m in members)
    if not erased and group is None:
        fail(f"customer {customer!r} has no data key: unknown, or already forgotten")
    said = [
        f"forgot {', '.join(erased)}: data key destroyed"
        if erased
        else f"{customer}: data key already destroyed"
    ]
    if group is not None:
        others = [m for m in group if m != customer]
        said.append(
            "identity graph: identifiers unlinked"
            + (f" (with the merged customers {', '.join(others)})" if others else "")
            + "; a returning identifier starts a new customer"
        )
    if purged:
        said.append(f"{purged} rejected line(s) removed from the dead letters")
    console.print("; ".join(said))


# --------------------------------------------------------------------------- backup


def backup(
    destination: Annotated[
        Path, typer.Argument(help="The backup file to create (it must not exist yet).")
    ],
    verify: Annotated[
        bool, typer.Option(help="Recompute every hash chain of the copy afterwards.")
    ] = True,
) -> None:
    """Copy the embedded ledger to a new file while it keeps taking appends.

    The copy is one consistent snapshot (SQLite's online backup), created with mode 0600,
    then verified like `ledger verify` and its anchor printed. It holds personal data
    encrypted and the wrapped data keys, not the master key: keep LEDGER_MASTER_KEY (or
    master.key) backed up separately, or the copy's personal data can never be read. A
    customer forgotten after the backup stays readable in it until the copy is destroyed:
    expire backups on a schedule. To restore, stop writers and put the file in place of
    $LEDGER_HOME/ledger.db. A PostgreSQL ledger is backed up with PostgreSQL's tools."""
    settings = Settings()
    if settings.store_url:
        fail(
            "LEDGER_STORE_URL names a PostgreSQL ledger: back it up with PostgreSQL's tools "
            "(pg_dump, base backups, your provider's snapshots)"
        )
    started = time.perf_counter()
    with _open(settings) as ledger:
        with err_console.status(f"backing up {ledger.store.location} ..."):
            ledger.backup(destination)
        size = destination.stat().st_size
        console.print(
            f"backed up to {destination} ({_human_bytes(size)}) in "
            f"{time.perf_counter() - started:,.1f} s",
            highlight=False,
        )
        if not verify:
            return
        with progress() as bar:
            task = bar.add_task("verify the copy", total=None)
            report = ledger.verify_copy(
                destination, lambda done, total: bar.update(task, completed=done, total=total)
            )
    if not report.ok:
        fail(
            f"the copy at {destination} does not verify ({len(report.problems)} problem(s)); "
            "run `ledger verify` on the ledger itself"
        )
    console.print(
        f"[green]OK[/]: the copy's {report.events:,} events in {report.customers:,} chains verify"
    )
    if report.anchor is not None:
        console.print(f"anchor: {report.anchor}", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- stats


def stats(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Events, customers, counts per channel and type, positions and storage size."""
    with _open() as ledger:
        s = ledger.stats()
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(s.__dict__, option=orjson.OPT_INDENT_2) + b"\n")
        return
    overview = Table(title="ledger", title_justify="left", show_header=False)
    overview.add_column()
    overview.add_column(justify="right")
    overview.add_row("store", s.location)
    overview.add_row("events", f"{s.events:,}")
    overview.add_row("customers", f"{s.customers:,}")
    overview.add_row("positions", f"{s.first_position or 0:,} … {s.last_position:,}")
    for name, size in s.sizes.items():
        overview.add_row(f"size {name}", _human_bytes(size))
    console.print(overview)
    by_type = Table(title="events by channel and type", title_justify="left")
    for column in ("channel", "type", "events", "share"):
        by_type.add_column(column, justify="right" if column in ("events", "share") else "left")
    from ledger.contract import CHANNEL_OF

    for t, n in sorted(s.by_type.items(), key=lambda kv: (CHANNEL_OF.get(kv[0], ""), kv[0])):
        by_type.add_row(CHANNEL_OF.get(t, "?"), t, f"{n:,}", f"{n / max(s.events, 1):.1%}")
    console.print(by_type)


# --------------------------------------------------------------------------- schemas

schemas_app = typer.Typer(
    help="The JSON Schemas of the event contract (schemas/).", no_args_is_help=True
)


def _schema_files() -> dict[str, bytes]:
    return {
        f"{name}.schema.json": orjson.dumps(
            schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
        )
        + b"\n"
        for name, schema in event_json_schemas().items()
    }


@schemas_app.command("export")
def schemas_export(
    directory: Annotated[Path, typer.Argument(help="Where to write the files.")] = Path("schemas"),
) -> None:
    """Write one JSON Schema per event type plus the envelope, generated from the models."""
    directory.mkdir(parents=True, exist_ok=True)
    files = _schema_files()
    for name, content in files.items():
        (directory / name).write_bytes(content)
    console.print(f"wrote {len(files)} schemas to {directory}/")


@schemas_app.command("check")
def schemas_check(
    directory: Annotated[Path, typer.Argument(help="The checked-in schemas.")] = Path("schemas"),
) -> None:
    """Exit 1 when the files differ from what the models generate (drift)."""
    drift = schema_drift(directory)
    if drift:
        fail(
            "schemas drifted from the models: " + ", ".join(drift) + "; run `ledger schemas export`"
        )
    console.print(f"schemas in {directory}/ match the models")


def schema_drift(directory: Path) -> list[str]:
    """Names of schema files that are missing, stale or unexpected in ``directory``."""
    expected = _schema_files()
    drift = [
        n
        for n, c in expected.items()
        if not (directory / n).is_file() or (directory / n).read_bytes() != c
    ]
    drift += [p.name for p in directory.glob("*.schema.json") if p.name not in expected]
    return sorted(drift)


def register(app: typer.Typer) -> None:
    app.command()(ingest)
    app.command()(history)
    app.command()(verify)
    app.command()(forget)
    app.command()(backup)
    app.command()(stats)
    app.add_typer(schemas_app, name="schemas")
