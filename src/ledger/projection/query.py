"""Reading the projections from any process: the freshest consistent source available.

``query`` asks the running ``ledger project --follow`` through its socket
(:mod:`ledger.projection.serve`: committed batches, no copy delay) and falls back
to the last published snapshot file (:mod:`ledger.projection.snapshot`) when no
runner is following. Either way the answer reflects whole batches only.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from ledger.ledger import LedgerError
from ledger.projection import serve, snapshot
from ledger.settings import Settings


def query(sql: str, settings: Settings | None = None) -> pa.Table:
    """Run one read-only SQL statement over the projections; the rows as an Arrow table."""
    settings = settings or Settings()
    try:
        answered = serve.ask(serve.socket_path(settings), sql)
    except OSError:
        answered = None  # the runner went away mid-question: the snapshot still answers
    if answered is not None:
        return answered
    with snapshot.connect(settings) as con:
        try:
            return serve.run_read_only(con, sql)
        except (duckdb.Error, serve.ReadOnlyError) as exc:
            raise LedgerError(f"the query failed: {exc}") from None
