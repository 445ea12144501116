"""CLI commands of the distributed mode: topics, workers, and the file adapter for Kafka."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import IO, Annotated

import typer
from rich.table import Table

from ledger.cli.output import EXIT_USAGE, console, err_console, fail, progress
from ledger.contract import ContractError
from ledger.deadletter import DeadLetters
from ledger.ledger import LedgerError
from ledger.settings import Settings
from ledger.sources import OversizedLine, read_csv, read_jsonl

topics_app = typer.Typer(help="Kafka topics of the distributed mode.", no_args_is_help=True)
worker_app = typer.Typer(help="Distributed-mode workers (faust-streaming).", no_args_is_help=True)


def topics_create(
    partitions: Annotated[
        int | None,
        typer.Option(help="Partitions per topic (default LEDGER_PARTITIONS).", min=1),
    ] = None,
) -> None:
    """Create the touchpoints, dead-letter and lifecycle topics (names from LEDGER_TOPIC_*).

    Existing topics are left alone; a partition count that differs from the one asked
    for is reported, since workers and keys depend on it."""
    from ledger.topics import create_topics  # kafka-python loads only when used

    settings = Settings()
    try:
        statuses = create_topics(settings, partitions)
    except LedgerError as exc:
        fail(str(exc))
    table = Table(title=f"topics on {settings.kafka}", title_justify="left")
    for column in ("topic", "role", "partitions", "status"):
        table.add_column(column, justify="right" if column == "partitions" else "left")
    mismatched = []
    for st in statuses:
        status = "created" if st.created else "exists"
        if st.partitions is not None and st.partitions != st.spec.partitions:
            status += f" (asked for {st.spec.partitions})"
            mismatched.append(st.spec.name)
        table.add_row(st.spec.name, st.spec.role, str(st.partitions or "?"), status)
    console.print(table)
    if mismatched:
        err_console.print(
            f"warning: {', '.join(mismatched)} already exist with another partition count",
            highlight=False,
        )


def _streams_module(name: str) -> ModuleType:
    """Import ``streams.<name>``; from a source checkout, the project directory holds it."""
    try:
        return importlib.import_module(f"streams.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("streams", f"streams.{name}"):
            raise
    root = Path(__file__).resolve().parents[3]
    if not (root / "streams" / f"{name}.py").is_file():
        fail(
            f"the worker module streams/{name}.py is not importable: run from the project "
            "directory or put it on PYTHONPATH"
        )
    sys.path.insert(0, str(root))
    return importlib.import_module(f"streams.{name}")


def worker_ingest(
    loglevel: Annotated[str, typer.Option(help="Log level of the worker.")] = "INFO",
) -> None:
    """Consume the touchpoints topic into the ledger (LEDGER_STORE_URL), exactly once in effect.

    Several may run: they share the partitions (group LEDGER_CONSUMER_GROUP). Offsets
    are stored in the ledger with the events; invalid messages go to LEDGER_TOPIC_DLQ."""
    settings = Settings()
    if not settings.kafka:
        fail("LEDGER_KAFKA is not set: expected the Kafka bootstrap servers, e.g. 127.0.0.1:9092")
    module = _streams_module("ingest")
    module.run_worker(module.create_app(settings), loglevel=loglevel)


def worker_project() -> None:
    """Follow the ledger into the projections (DuckDB in LEDGER_HOME) and publish every
    lifecycle transition to LEDGER_TOPIC_LIFECYCLE (key customer_id, JSON per
    schemas/topics/lifecycle_change.schema.json). Run one per projections directory."""
    settings = Settings()
    if not settings.kafka:
        fail("LEDGER_KAFKA is not set: expected the Kafka bootstrap servers, e.g. 127.0.0.1:9092")
    module = _streams_module("project")
    try:
        module.run_until_signalled(settings)
    except LedgerError as exc:
        fail(str(exc))


def publish(
    file: Annotated[str, typer.Argument(help="JSONL or CSV file; '-' reads standard input.")],
    fmt: Annotated[
        str | None,
        typer.Option("--format", "-f", help="jsonl or csv. Default: from the file's extension."),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option("--strict/--lenient", help="Reject fields outside the contract."),
    ] = False,
) -> None:
    """Validate the events of a file and publish the valid ones to the touchpoints topic.

    Invalid lines are not sent: they go to the dead letters ($LEDGER_HOME/rejected/)
    with line number and reason. Exit status 1 when any line was rejected or any event
    could not be delivered, 2 when the arguments are unusable."""
    if fmt is not None and fmt not in ("jsonl", "csv"):
        fail(f"--format: expected jsonl or csv, got {fmt!r}", EXIT_USAGE)
    path = Path(file)
    if file != "-" and not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        fail(f"{file}: {what}; expected a JSONL or CSV file (or '-' for stdin)", EXIT_USAGE)
    from ledger.publisher import DeliveryError, Publisher  # kafka-python loads only when used

    kind = fmt or ("csv" if file.lower().endswith(".csv") else "jsonl")
    settings = Settings()
    lines = published = 0
    try:
        publisher = Publisher(settings, strict=strict or None)
    except LedgerError as exc:
        fail(str(exc))
    with (
        publisher,
        DeadLetters(settings.rejected_dir) as dead,
        progress() as bar,
    ):
        fh: IO[bytes] = sys.stdin.buffer if file == "-" else open(path, "rb")  # noqa: SIM115
        try:
            total = None if file == "-" else path.stat().st_size
            task = bar.add_task(f"publish {path.name}", total=total)
            reader = read_csv(fh) if kind == "csv" else read_jsonl(fh)
            for number, item in reader:
                lines += 1
                try:
                    if isinstance(item, OversizedLine):
                        raise ContractError([f"event: line {number} is over the size limit"])
                    publisher.publish(item)
                    published += 1
                except ContractError as exc:
                    raw = item if isinstance(item, bytes) else None
                    dead.write(file, number, exc.problems, raw)
                if lines % 1000 == 0 and total is not None:
                    bar.update(task, completed=fh.tell())
            if total is not None:
                bar.update(task, completed=total)
        finally:
            if fh is not sys.stdin.buffer:
                fh.close()
        try:
            report = publisher.flush()
        except DeliveryError as exc:
            fail(f"{exc} (the other events were delivered; publishing again is safe)")
        rejected, dead_path = dead.count, dead.path
    table = Table(title=f"publish to {publisher.topic}", title_justify="left")
    for column in ("file", "lines", "published", "rejected"):
        table.add_column(column, justify="left" if column == "file" else "right")
    table.add_row(file, f"{lines:,}", f"{report.delivered:,}", f"{rejected:,}")
    console.print(table)
    if rejected:
        err_console.print(
            f"{rejected:,} rejected line(s) with reasons in {dead_path}", highlight=False
        )
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    topics_app.command("create")(topics_create)
    worker_app.command("ingest")(worker_ingest)
    worker_app.command("project")(worker_project)
    app.add_typer(topics_app, name="topics")
    app.add_typer(worker_app, name="worker")
    app.command("publish")(publish)
