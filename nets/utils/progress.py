"""Progress bars for long library calls (`progress=True | False | None`).

None (the default everywhere) shows a tqdm bar on standard error only when it is a
terminal and the call has already run for `AUTO_SECONDS` (tqdm's `delay`: the bar is
created at the start and drawn once that much time has passed, so a slow product on a
small network shows one as well as a large network does); True always shows one at once,
False never. Library code never prints otherwise.
"""

from __future__ import annotations

import sys
from typing import Iterable

import numpy as np

__all__ = ["progress_bar", "progress_counter", "redraw", "wants_progress"]

#: with progress=None a bar is drawn once a call has run this many seconds
AUTO_SECONDS = 3.0


def wants_progress(progress) -> bool:
    """Whether a bar may be shown: progress True, or None with standard error a terminal
    (checks the type: True, False or None)."""
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    return bool(progress)


def _tqdm(progress, **kwargs):
    from tqdm.auto import tqdm
    return tqdm(file=sys.stderr, delay=AUTO_SECONDS if progress is None else 0.0, **kwargs)


def progress_bar(iterable: Iterable, *, progress=None, total=None, desc=None,
                 leave: bool = False):
    """`iterable` wrapped in a tqdm bar when `wants_progress(progress)` (module docstring)."""
    if not wants_progress(progress):
        return iterable
    return _tqdm(progress, iterable=iterable, total=total, desc=desc, leave=leave)


def progress_counter(progress, *, total, desc, leave: bool = False):
    """A tqdm bar to `update()` by hand (no iterable), or None when no bar is wanted."""
    if not wants_progress(progress):
        return None
    return _tqdm(progress, total=total, desc=desc, leave=leave)


def redraw(bar) -> None:
    """`bar.refresh()` (after its total was changed), unless its delay has not passed:
    refresh() draws regardless of tqdm's delay, which showed a bar for a fast call (a bar
    disabled by TQDM_DISABLE has no clock and is left alone)."""
    if bar is not None and not bar.disable and bar._time() >= bar.start_t + bar.delay:
        bar.refresh()
