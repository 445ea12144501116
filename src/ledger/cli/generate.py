"""``ledger generate``: realistic synthetic touchpoints as JSONL."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer

from ledger.cli.output import EXIT_USAGE, err_console, fail, progress
from ledger.generate import DEFAULT_DAYS, DEFAULT_START, GenerateError, plan, write_jsonl


def _parse_start(value: str | None) -> dt.datetime | None:
    """A date (midnight UTC) or an ISO 8601 time with a timezone."""
    if value is None:
        return None
    try:
        if len(value) == 10:
            return dt.datetime.combine(dt.date.fromisoformat(value), dt.time(), tzinfo=dt.UTC)
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        fail(
            f"--start: {value!r} is not a date; expected e.g. 2025-01-01 or 2025-01-01T00:00:00Z",
            EXIT_USAGE,
        )
    if moment.tzinfo is None:
        fail(f"--start: {value!r} has no timezone; add one, e.g. {value}Z", EXIT_USAGE)
    return moment


def generate(
    customers: Annotated[
        int, typer.Option("--customers", "-c", help="How many customers (at least 1).")
    ] = 1000,
    events: Annotated[
        int,
        typer.Option(
            "--events",
            "-n",
            help="How many lines to write in all, duplicates and invalid lines included. "
            "The valid events must be at least one per customer.",
        ),
    ] = 50_000,
    seed: Annotated[
        int, typer.Option("--seed", "-s", help="Random seed: the same seed gives the same bytes.")
    ] = 42,
    output: Annotated[
        str,
        typer.Option(
            "--output", "-o", help="File to write; '-' (the default) writes to standard output."
        ),
    ] = "-",
    start: Annotated[
        str | None,
        typer.Option(
            help=f"First day of the period, a date or an ISO 8601 time with a timezone "
            f"(default {DEFAULT_START:%Y-%m-%d}). The period must end before now.",
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="Length of the period in days.")] = DEFAULT_DAYS,
    duplicates: Annotated[
        float,
        typer.Option(
            help="Fraction of lines (0 to <1) that repeat a recent line exactly, same event_id, "
            "as a redelivering producer would.",
        ),
    ] = 0.0,
    invalid: Annotated[
        float,
        typer.Option(
            help="Fraction of lines (0 to <1) with a realistic mistake the contract rejects: "
            "naive timestamp, float money, wrong channel, unknown type, missing field, "
            "broken JSON, bad phone, bad currency, bad event_id.",
        ),
    ] = 0.0,
) -> None:
    try:
        work = plan(
            customers,
            events,
            start=_parse_start(start),
            days=days,
            duplicates=duplicates,
            invalid=invalid,
        )
    except GenerateError as exc:
        fail(str(exc), EXIT_USAGE)
    to_file = output != "-"
    try:
        with progress() as bar:
            task = bar.add_task("generating", total=work.events, visible=to_file)
            summary = write_jsonl(
                output,
                customers,
                events,
                seed,
                start=work.start,
                days=days,
                duplicates=duplicates,
                invalid=invalid,
                on_progress=lambda done: bar.update(task, completed=done),
            )
    except OSError as exc:
        fail(f"--output: cannot write {output!r} ({exc.strerror or exc})", EXIT_USAGE)
    where = output if to_file else "standard output"
    err_console.print(
        f"wrote {summary.lines:,} lines ({work.valid:,} valid events, {work.duplicates:,} "
        f"duplicates, {work.invalid:,} invalid) for {work.customers:,} customers, "
        f"{work.start:%Y-%m-%d} to {work.end:%Y-%m-%d}, to {where} in {summary.seconds:.1f}s "
        f"({summary.rate:,.0f} lines/s)",
        highlight=False,
    )


HELP = (
    "Write realistic multi-channel touchpoints as JSONL, deterministic for a seed.\n\n"
    "Customers move through journeys: anonymous web visits, sign-ups, campaign emails, chats, "
    "calls, social mentions, demo and quote requests, orders (repeat buyers, drop-outs), "
    "refunds, support tickets and consent changes, with daily, weekly and Q4 seasonality. "
    "Lines come in arrival order; about 3% arrive hours or days late. Personal data "
    "(names, emails, phones, free text) is fake but shaped like the real thing.\n\n"
    "Example: ledger generate --customers 1000 --events 100000 --seed 7 -o events.jsonl"
)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("generate", help=HELP)(generate)
