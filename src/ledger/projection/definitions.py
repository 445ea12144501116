"""The projection definitions: the SQL files in ``projections/``, split into named statements.

Each file holds sections that start with a ``-- name: <section>`` line; the
runner executes them by (file, section) so analysts read exactly the SQL that
builds their tables.
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

_SECTION = re.compile(r"^-- name: *(\w+) *$", re.MULTILINE)


def directory() -> Path:
    """``projections/`` at the project root (override with LEDGER_PROJECTIONS_DIR)."""
    configured = os.environ.get("LEDGER_PROJECTIONS_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[3] / "projections"


@cache
def sections(file: str) -> dict[str, str]:
    path = directory() / f"{file}.sql"
    try:
        text = path.read_text()
    except OSError as exc:
        raise FileNotFoundError(
            f"projection definitions {path} cannot be read ({exc.strerror}); "
            "set LEDGER_PROJECTIONS_DIR to the projections/ directory"
        ) from None
    parts = _SECTION.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def sql(file: str, section: str) -> str:
    found = sections(file).get(section)
    if found is None:
        raise KeyError(f"projections/{file}.sql has no section '-- name: {section}'")
    return found
