"""Where a warning of the package should point: the first frame outside it.

Every warning `nets` gives is about the user's call (a summed loss, an optimizer setting
that is not modelled, a transfer outside its measured range), so it names the user's
line — whether the entry point was called directly, through another entry point, through
the decorator every entry point wears (`nets.utils.autocast.outside_autocast`), or from
torch (an optimizer's step hook). A fixed `stacklevel` cannot: the depth differs by
path. `caller_stacklevel()`, evaluated in the warning's arguments, walks up from the
function that warns past every frame of `nets`, of torch and of the standard library's
`contextlib`/`functools` wrappers.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

__all__ = ["caller_stacklevel"]

_NETS = str(Path(__file__).resolve().parent.parent)


def _skipped_prefixes() -> tuple[str, ...]:
    out = [_NETS, contextlib.__file__, functools.__file__]
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "__file__", None):
        out.append(str(Path(torch.__file__).resolve().parent))
    return tuple(out)


def caller_stacklevel() -> int:
    """`stacklevel` for `warnings.warn` in the calling function: the first frame outside
    nets, torch, contextlib and functools (1 if there is none)."""
    skipped = _skipped_prefixes()
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(skipped):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 1
