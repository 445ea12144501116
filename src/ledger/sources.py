"""Reading input files for import: JSON Lines and CSV, as raw event documents.

Both readers yield ``(line_number, raw_bytes_or_dict)`` and never load a whole
file: a huge file streams, and a huge line is cut off at the contract's size
limit instead of being read into memory.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import IO, Any

from ledger.contract import MAX_EVENT_BYTES

Item = bytes | dict[str, Any]


class OversizedLine(bytes):
    """Marker: the first bytes of a line longer than the event size limit."""


def read_jsonl(fh: IO[bytes]) -> Iterator[tuple[int, Item]]:
    number = 0
    while True:
        line = fh.readline(MAX_EVENT_BYTES + 2)
        if not line:
            return
        number += 1
        if len(line) > MAX_EVENT_BYTES + 1 or (
            len(line) == MAX_EVENT_BYTES + 2 and not line.endswith(b"\n")
        ):
            # Skip the rest of the line without holding it in memory.
            rest = line
            while rest and not rest.endswith(b"\n"):
                rest = fh.readline(1 << 20)
            yield number, OversizedLine(line[:200])
            continue
        stripped = line.strip()
        if stripped:
            yield number, stripped


def _set_path(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            return
    target[parts[-1]] = value


def read_csv(fh: IO[bytes]) -> Iterator[tuple[int, Item]]:
    """CSV with a header row. Dotted columns nest (``payload.total.amount``); a ``payload``
    or ``identifiers`` column may instead hold a JSON object. Empty cells are omitted."""
    text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
    try:
        yield from _csv_events(csv.DictReader(text))
    finally:
        # Detach so closing the wrapper does not close the caller's file.
        text.detach()


def _csv_events(reader: csv.DictReader[str]) -> Iterator[tuple[int, Item]]:
    import orjson

    for row in reader:
        number = reader.line_num
        event: dict[str, Any] = {}
        for column, value in row.items():
            if column is None or value is None or value == "":
                continue
            column = column.strip()
            if column in ("payload", "identifiers", "extra") and value.lstrip().startswith("{"):
                try:
                    event[column] = orjson.loads(value)
                except orjson.JSONDecodeError:
                    event[column] = value
            else:
                _set_path(event, column, value)
        yield number, event
