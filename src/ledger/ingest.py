"""Bulk import: stream a JSONL or CSV file into the ledger in batches.

Valid lines land; each bad line goes to the dead letters with its file, line
number and reasons, and never stops the rest (invariant 6).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Literal

from ledger.contract import MAX_EVENT_BYTES
from ledger.deadletter import DeadLetters
from ledger.ledger import AppendResult, Ledger
from ledger.sources import Item, OversizedLine, read_csv, read_jsonl

Format = Literal["jsonl", "csv"]


@dataclass
class IngestReport:
    source: str
    lines: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    bytes_read: int = 0


def _reader(fh: IO[bytes], fmt: Format) -> Iterator[tuple[int, Item]]:
    return read_csv(fh) if fmt == "csv" else read_jsonl(fh)


def ingest_stream(
    ledger: Ledger,
    fh: IO[bytes],
    *,
    source: str,
    fmt: Format,
    dead_letters: DeadLetters,
    batch_size: int,
    strict: bool | None = None,
    on_batch: Callable[[IngestReport], None] | None = None,
) -> IngestReport:
    report = IngestReport(source)
    numbers: list[int] = []
    batch: list[Item] = []

    def flush() -> None:
        result: AppendResult = ledger.append(batch, strict=strict)
        report.accepted += result.accepted
        report.duplicates += result.duplicates
        for rejection in result.rejected:
            dead_letters.write(source, numbers[rejection.index], rejection.problems, rejection.raw)
        report.rejected += len(result.rejected)
        batch.clear()
        numbers.clear()
        if on_batch:
            on_batch(report)

    for number, item in _reader(fh, fmt):
        report.lines += 1
        if isinstance(item, OversizedLine):
            dead_letters.write(
                source,
                number,
                [f"event: line is over the limit of {MAX_EVENT_BYTES:,} bytes"],
                bytes(item),
            )
            report.rejected += 1
            continue
        if isinstance(item, bytes):
            report.bytes_read += len(item) + 1
        numbers.append(number)
        batch.append(item)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return report
