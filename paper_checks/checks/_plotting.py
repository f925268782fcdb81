"""Figure helpers. Figures are built with `matplotlib.figure.Figure` directly (no pyplot
state, works with any backend) and only from a result's stored series."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

COLORS = {"measured": "k", "theory": "C0", "alt": "C3", "third": "C2", "fourth": "C1"}


def new_figure(ncols: int = 1, width: float = 5.2, height: float = 3.8):
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def measured_points(ax, x, mean, err, label="measured (mean ± std)", **kw):
    ax.errorbar(x, mean, yerr=err, fmt=kw.pop("fmt", "o"), ms=4, capsize=3, color=kw.pop("color", "k"),
                label=label, zorder=3, **kw)


def curve(ax, x, y, label, color="C0", ls="-", **kw):
    ax.plot(x, y, ls, color=color, label=label, lw=1.6, **kw)


def verdict_title(ax, result, text: str):
    ax.set_title(f"{text}\n[{result.verdict}]", fontsize=10)


def lr_vs_batch_axes(ax, result, title: str):
    """Finish a log-log learning-rate-vs-B panel: labels, legend, verdict title."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("learning rate")
    ax.legend(fontsize=7)
    verdict_title(ax, result, title)


def log2_ticks(ax, xs):
    xs = np.asarray(xs, float)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{int(x)}" if float(x).is_integer() else f"{x:g}" for x in xs],
                       fontsize=8)
