"""`in_b_order`: the series of a result drawn against B, sorted by B.

Batch sizes are kept in the order the caller gave them (results index by position), so a
line drawn straight from them joins the points in that order: `batch_sizes=[60, 4, 16]`
drew a chord 60 → 4 → 16 across the plot (an outside sweep). Every `plot()` that draws a
line against B sorts first.
"""

from __future__ import annotations

import numpy as np

__all__ = ["in_b_order"]


def in_b_order(batch_sizes, *series):
    """(B, *series) as float arrays sorted by B (stable: equal B keep their order); a
    series that is None stays None."""
    B = np.asarray(batch_sizes, dtype=float)
    order = np.argsort(B, kind="stable")
    return (B[order], *(None if s is None else np.asarray(s, dtype=float)[order]
                        for s in series))
