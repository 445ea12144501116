"""The dead-letter place of the embedded mode: rejected input kept with its reason.

Invariant 6: bad input is never silently dropped. Each rejected line becomes
one JSON line in ``$LEDGER_HOME/rejected/<UTC time>-<pid>.jsonl`` holding the
file and line it came from, the reasons, and the original text, so a person
can fix it and ingest it again.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
from pathlib import Path
from typing import IO, Any

import orjson


class DeadLetters:
    """Appends rejections to one dead-letter file, created on the first rejection."""

    #: How many rejections :attr:`samples` keeps for a summary on screen.
    SAMPLES = 5

    def __init__(self, directory: Path):
        self.directory = directory
        self.path: Path | None = None
        self._fh: IO[bytes] | None = None
        self.count = 0
        #: The first few rejections as (source, line, reason): what a person reads first.
        self.samples: list[tuple[str, int | None, str]] = []

    def write(self, source: str, line: int | None, problems: list[str], raw: bytes | None) -> None:
        if self._fh is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
            self.path = self.directory / f"{stamp}-{os.getpid()}.jsonl"
            self._fh = self.path.open("ab")
        record: dict[str, Any] = {
            "rejected_at": dt.datetime.now(dt.UTC).isoformat(),
            "file": source,
            "line": line,
            "reason": "; ".join(problems),
            "problems": problems,
        }
        if raw is not None:
            try:
                record["raw"] = raw.decode("utf-8")
            except UnicodeDecodeError:
                record["raw_base64"] = base64.b64encode(raw).decode()
        self._fh.write(orjson.dumps(record) + b"\n")
        self.count += 1
        if len(self.samples) < self.SAMPLES:
            self.samples.append((source, line, record["reason"]))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> DeadLetters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def purge_customer(directory: Path, customer_id: str) -> int:
    """Remove a forgotten customer's rejected lines (they may hold personal data in clear).

    Returns how many lines were removed. Lines whose raw text is not JSON, or names no
    customer, are kept: they cannot be attributed to anyone.
    """
    removed = 0
    if not directory.is_dir():
        return 0
    for path in sorted(directory.glob("*.jsonl")):
        kept: list[bytes] = []
        dropped = 0
        for line in path.read_bytes().splitlines():
            try:
                raw = orjson.loads(line).get("raw")
                owner = orjson.loads(raw).get("customer_id") if raw else None
            except (orjson.JSONDecodeError, AttributeError):
                owner = None
            if owner == customer_id:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(b"".join(line + b"\n" for line in kept))
            os.replace(tmp, path)
            removed += dropped
    return removed
