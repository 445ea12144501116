"""Projections: the ledger folded into DuckDB tables (customer 360, lifecycle, RFM, churn).

* :mod:`~ledger.projection.runner`: the incremental, exactly-once runner.
* :mod:`~ledger.projection.lifecycle`: the lifecycle stage rules.
* :mod:`~ledger.projection.rfm` and :mod:`~ledger.projection.churn`: segments and BG/NBD.
* :mod:`~ledger.projection.query`, :mod:`~ledger.projection.serve` and
  :mod:`~ledger.projection.snapshot`: how other processes read while the runner writes.
* :mod:`~ledger.projection.subscribe`: the lifecycle-change stream.

The SQL that defines each table lives in ``projections/*.sql``.
"""

from ledger.projection.query import query
from ledger.projection.runner import ProjectionRunner
from ledger.projection.snapshot import connect
from ledger.projection.subscribe import LifecycleChange, changes_after, iter_changes

__all__ = [
    "LifecycleChange",
    "ProjectionRunner",
    "changes_after",
    "connect",
    "iter_changes",
    "query",
]
