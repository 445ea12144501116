"""CLI commands for projections: project, query, export, subscribe."""

from __future__ import annotations

import datetime as dt
import decimal
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Annotated, Any

import duckdb
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import typer
from rich.console import Console
from rich.table import Table

from ledger.cli.core import parse_moment
from ledger.cli.output import EXIT_USAGE, console, err_console, fail, progress
from ledger.ledger import Ledger, LedgerError
from ledger.projection import snapshot
from ledger.projection.query import query as run_query
from ledger.projection.subscribe import subscribe as subscribe_changes
from ledger.settings import Settings

FORMATS = ("table", "csv", "json", "parquet")
TABLE_ROW_LIMIT = 1_000


def _stop_on_signals() -> threading.Event:
    """Ctrl-C / SIGTERM ask the runner to stop between transactions."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (the open batch rolls back)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _drop_projections(settings: Settings) -> None:
    path = settings.projections_path
    if path.exists():
        try:
            duckdb.connect(str(path)).close()
        except duckdb.IOException as exc:
            if snapshot.held_by_writer(exc):
                fail(f"cannot rebuild {path}: it is in use ({exc}); stop `ledger project` first")
            # Damaged or not a DuckDB file: a rebuild replaces it all the same.
    for stale in (path, Path(f"{path}.wal")):
        stale.unlink(missing_ok=True)


def project(
    follow: Annotated[
        bool, typer.Option("--follow", help="Keep applying new events until Ctrl-C.")
    ] = False,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Drop the projections and recompute from position 0.")
    ] = False,
    as_of: Annotated[
        str | None,
        typer.Option(
            "--as-of",
            help="Reference date for RFM and churn risk (ISO time or date); 'latest' (the "
            "default) is the latest event time in the ledger. Remembered until changed.",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Ledger events per DuckDB transaction.")
    ] = 50_000,
    no_columnar: Annotated[
        bool,
        typer.Option(
            "--no-columnar",
            help="Read every event from the ledger itself: neither use nor extend the "
            "columnar copy of the log kept beside it (LEDGER_HOME/columnar).",
        ),
    ] = False,
) -> None:
    """Catch every projection up with the ledger (customer_360, lifecycle, rfm, churn_risk)."""
    # The runner pulls in scipy (the churn model): load it only for this command.
    from ledger.projection.runner import ProjectionRunner

    settings = Settings()
    reference: dt.datetime | None = None
    if as_of is not None and as_of != "latest":
        reference = parse_moment(as_of, "--as-of")
    if rebuild:
        _drop_projections(settings)
    stop = _stop_on_signals()
    with (
        Ledger.open(settings) as ledger,
        ProjectionRunner.for_settings(
            ledger, settings, batch_size=batch_size, **({"columnar": None} if no_columnar else {})
        ) as runner,
    ):
        if as_of is not None:
            runner.set_as_of(reference)
        start = runner.position
        with progress(transient=follow) as bar:
            task = bar.add_task("projecting", total=max(ledger.position - start, 0))

            def on_progress(position: int, head: int) -> None:
                bar.update(
                    task,
                    completed=position - start,
                    total=max(head - start, 1),
                    description="projecting",
                )

            def on_phase(what: str) -> None:
                # One batch of a rebuild can take a minute: say what it is doing.
                bar.update(task, description=f"projecting: {what}")

            if not follow:
                runner.on_phase = on_phase

            if follow:
                err_console.print(
                    f"following the ledger from position {start:,} (Ctrl-C stops)", highlight=False
                )
                runner.follow(stop, on_progress=on_progress)
            else:
                runner.run(on_progress=on_progress, stop=stop)
                bar.update(task, description="projected")
        end = runner.position
        console.print(
            f"projections at position {end:,} ({end - start:,} events applied); "
            f"snapshot {snapshot.snapshot_path(settings)}",
            highlight=False,
        )


def _json_default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    raise TypeError


def _write(result: pa.Table, fmt: str, output: Path | None) -> None:
    if fmt == "parquet":
        if output is None:
            fail("--format parquet needs -o FILE (Parquet is binary)", EXIT_USAGE)
        pq.write_table(result, output)
        return
    if fmt == "csv":
        if output is None:
            sink = pa.BufferOutputStream()
            pacsv.write_csv(result, sink)
            sys.stdout.write(sink.getvalue().to_pybytes().decode())
        else:
            pacsv.write_csv(result, output)
        return
    if fmt == "json":
        data = orjson.dumps(
            result.to_pylist(),
            default=_json_default,
            option=orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_INDENT_2,
        )
        if output is None:
            sys.stdout.write(data.decode() + "\n")
        else:
            output.write_bytes(data + b"\n")
        return
    table = Table(*result.column_names, show_lines=False)
    for row in result.slice(0, TABLE_ROW_LIMIT).to_pylist():
        table.add_row(*("" if v is None else str(v) for v in row.values()))
    if output is None:
        console.print(table)
    else:
        with output.open("w") as sink:
            Console(file=sink, width=200).print(table)
    if result.num_rows > TABLE_ROW_LIMIT:
        err_console.print(
            f"({result.num_rows - TABLE_ROW_LIMIT:,} more rows not shown; use --format csv)"
        )


def query(
    sql: Annotated[str, typer.Argument(help="SQL over the projection tables (read-only).")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="table, csv, json or parquet.")
    ] = "table",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to FILE instead of stdout.")
    ] = None,
) -> None:
    """Query the projections (read-only), also while `ledger project --follow` runs."""
    if fmt not in FORMATS:
        fail(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}", EXIT_USAGE)
    result = run_query(sql, Settings())
    try:
        _write(result, fmt, output)
    except OSError as exc:
        fail(f"cannot write the result to {output}: {exc.strerror or exc}")


def export(
    directory: Annotated[Path, typer.Argument(help="Directory for one Parquet file per table.")],
) -> None:
    """Export every projection table to DIR/<table>.parquet."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create the directory {directory}: {exc.strerror or exc}")
    with snapshot.connect(Settings()) as con:
        for table in snapshot.SNAPSHOT_TABLES:
            target = directory / f"{table}.parquet"
            path = str(target).replace("'", "''")
            try:
                con.execute(f"COPY (SELECT * FROM {table}) TO '{path}' (FORMAT parquet)")
            except duckdb.IOException as exc:
                fail(f"cannot export {table} to {target}: {exc}")
            rows = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
            console.print(f"{target}  {rows:,} rows", highlight=False)


def subscribe(
    stream: Annotated[str, typer.Argument(help="The stream to follow: lifecycle.")],
    after: Annotated[
        int, typer.Option("--from", min=0, help="Print changes after this seq (0: all).")
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    once: Annotated[
        bool, typer.Option("--once", help="Print what exists now and exit instead of following.")
    ] = False,
) -> None:
    """Print lifecycle changes in order as they happen (resume with --from SEQ)."""
    if stream != "lifecycle":
        fail(f"unknown stream {stream!r}; the only stream is 'lifecycle'", EXIT_USAGE)
    stop = _stop_on_signals()
    try:
        for change in subscribe_changes(Settings(), after, follow=not once, stop=stop):
            if as_json:
                sys.stdout.write(orjson.dumps(change.to_json()).decode() + "\n")
            else:
                sys.stdout.write(
                    f"{change.seq}\t{change.occurred_at.isoformat()}\t{change.customer_id}\t"
                    f"{change.from_stage or '-'} -> {change.to_stage}\t{change.event_id}\n"
                )
            sys.stdout.flush()
    except LedgerError as exc:
        fail(str(exc))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command()(project)
    app.command()(query)
    app.command()(export)
    app.command()(subscribe)
