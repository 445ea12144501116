"""The ``ledger`` command: one Typer app, each concern's commands in its own module."""

from __future__ import annotations

import sys

import typer

from ledger.cli import collector, core, distributed, generate, projections
from ledger.cli.output import err_console
from ledger.ledger import LedgerError

app = typer.Typer(
    name="ledger",
    help=(
        "An event-sourced customer interaction ledger: append touchpoints once, immutably, "
        "and query what they add up to.\n\nConfiguration comes from LEDGER_* environment "
        "variables (see README): LEDGER_HOME (default ./.ledger), LEDGER_STORE_URL "
        "(PostgreSQL instead of SQLite), LEDGER_MASTER_KEY, LEDGER_KAFKA."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

for module in (core, generate, projections, distributed, collector):
    module.register(app)


def main() -> None:
    try:
        app()
    except LedgerError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
