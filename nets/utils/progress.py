"""Progress bars for long library calls (`progress=True | False | None`).

None (the default everywhere) shows a tqdm bar on standard error only when it is a
terminal and the call is expected to take more than a few seconds (`expected_s`); True
always shows one, False never. Library code never prints otherwise.
"""

from __future__ import annotations

import sys
from typing import Iterable

__all__ = ["progress_bar", "wants_progress"]

#: calls expected to take longer than this many seconds show a bar when progress=None
AUTO_SECONDS = 3.0


def wants_progress(progress, expected_s: float | None = None) -> bool:
    if progress is None:
        interactive = bool(getattr(sys.stderr, "isatty", lambda: False)())
        return interactive and (expected_s is None or expected_s > AUTO_SECONDS)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    return progress


def progress_bar(iterable: Iterable, *, progress=None, total=None, desc=None,
                 expected_s: float | None = None, leave: bool = False):
    """`iterable` wrapped in a tqdm bar when `wants_progress(progress, expected_s)`."""
    if not wants_progress(progress, expected_s):
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=leave, file=sys.stderr)
