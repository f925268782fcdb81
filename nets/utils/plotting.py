"""`in_b_order`: the series of a result drawn against B, sorted by B; `batch_size_axis`:
the log x-axis of those plots.

Batch sizes are kept in the order the caller gave them (results index by position), so a
line drawn straight from them joins the points in that order: `batch_sizes=[60, 4, 16]`
drew a chord 60 → 4 → 16 across the plot (an outside sweep). Every `plot()` that draws a
line against B sorts first.
"""

from __future__ import annotations

import numpy as np

__all__ = ["batch_size_axis", "in_b_order"]


def in_b_order(batch_sizes, *series):
    """(B, *series) as float arrays sorted by B (stable: equal B keep their order); a
    series that is None stays None."""
    B = np.asarray(batch_sizes, dtype=float)
    order = np.argsort(B, kind="stable")
    return (B[order], *(None if s is None else np.asarray(s, dtype=float)[order]
                        for s in series))


def batch_size_axis(ax) -> None:
    """A log x-axis for batch sizes, ticks at powers of two labelled as plain integers
    (8, 16, 32, ...). Matplotlib's base-10 axis labelled its minor ticks too — 2×10¹,
    3×10¹, 4×10¹ printed over each other when B spans less than two decades (an outside
    trial's lr_table plot)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("batch size B")
