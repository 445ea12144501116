"""RFM segments: the named-segment map over every (R, F, M) score combination.

Scores come from ``projections/rfm.sql`` (1-5, 5 best, ties share a score). The
segment is read off a grid of R against FM, where FM = round-half-up of the
mean of F and M (the common way to fold three scores onto the usual 5 x 5
R/FM grid). Every one of the 125 (R, F, M) combinations falls in exactly one
cell, and each cell has exactly one name:

=====  =============  =============  ================  ==================  ================
R\\FM   1              2              3                 4                   5
=====  =============  =============  ================  ==================  ================
5      New            Potential      Potential         Champions           Champions
                      Loyalist       Loyalist
4      Promising      Potential      Potential         Loyal               Loyal
                      Loyalist       Loyalist
3      About to       About to       Need Attention    Loyal               Loyal
       Sleep          Sleep
2      Hibernating    Hibernating    At Risk           At Risk             Can't Lose Them
1      Lost           Hibernating    At Risk           At Risk             Can't Lose Them
=====  =============  =============  ================  ==================  ================
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SEGMENTS: tuple[str, ...] = (
    "Champions",
    "Loyal",
    "Potential Loyalist",
    "New",
    "Promising",
    "Need Attention",
    "About to Sleep",
    "At Risk",
    "Can't Lose Them",
    "Hibernating",
    "Lost",
)


@dataclass(frozen=True)
class Cell:
    """A rectangle of the R x FM grid with its segment name (bounds inclusive)."""

    segment: str
    r: tuple[int, int]
    fm: tuple[int, int]

    def holds(self, r: int, fm: int) -> bool:
        return self.r[0] <= r <= self.r[1] and self.fm[0] <= fm <= self.fm[1]


#: The map, as non-overlapping rectangles covering the whole 5 x 5 grid.
GRID: tuple[Cell, ...] = (
    Cell("Champions", (5, 5), (4, 5)),
    Cell("Loyal", (3, 4), (4, 5)),
    Cell("Potential Loyalist", (4, 5), (2, 3)),
    Cell("New", (5, 5), (1, 1)),
    Cell("Promising", (4, 4), (1, 1)),
    Cell("Need Attention", (3, 3), (3, 3)),
    Cell("About to Sleep", (3, 3), (1, 2)),
    Cell("At Risk", (1, 2), (3, 4)),
    Cell("Can't Lose Them", (1, 2), (5, 5)),
    Cell("Hibernating", (2, 2), (1, 2)),
    Cell("Hibernating", (1, 1), (2, 2)),
    Cell("Lost", (1, 1), (1, 1)),
)


def fm_score(f: int, m: int) -> int:
    """Mean of F and M, halves rounded up (integer arithmetic, no float rounding surprises)."""
    return (f + m + 1) // 2


def cells_for(r: int, f: int, m: int) -> list[Cell]:
    fm = fm_score(f, m)
    return [c for c in GRID if c.holds(r, fm)]


def segment_of(r: int, f: int, m: int) -> str:
    """The named segment of one score combination."""
    found = cells_for(r, f, m)
    if len(found) != 1:
        raise ValueError(f"RFM scores ({r}, {f}, {m}) match {len(found)} segments, expected 1")
    return found[0].segment


def segment_table() -> pa.Table:
    """All 125 combinations with their segment (loaded into ``rfm_segments``)."""
    rows = [(r, f, m) for r in range(1, 6) for f in range(1, 6) for m in range(1, 6)]
    return pa.table(
        {
            "r_score": pa.array([r for r, _, _ in rows], pa.int32()),
            "f_score": pa.array([f for _, f, _ in rows], pa.int32()),
            "m_score": pa.array([m for _, _, m in rows], pa.int32()),
            "fm_score": pa.array([fm_score(f, m) for _, f, m in rows], pa.int32()),
            "segment": [segment_of(*row) for row in rows],
        }
    )
