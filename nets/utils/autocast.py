"""`no_autocast`: the package's numerics run outside an enclosing `torch.autocast`.

Mixed precision in a user's training step (``with torch.autocast("cpu", torch.bfloat16):``
around the forward, or around the whole step with a monitor attached) would otherwise
reach the curvature products and the Lanczos recurrences, whose matrix products autocast
runs in bfloat16/float16 — eigenvalues off in the fourth digit and residuals 1000× larger
with nothing said. Inside `no_autocast()` every computation runs in the dtype the package
chose (the model's, or the requested one).
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["no_autocast", "outside_autocast"]


@contextlib.contextmanager
def no_autocast():
    """Switch off an enclosing CPU or CUDA `torch.autocast` region for the block."""
    with contextlib.ExitStack() as stack:
        for dev in ("cpu", "cuda"):
            if torch.is_autocast_enabled(dev):
                stack.enter_context(torch.autocast(dev, enabled=False))
        yield


def outside_autocast(fn):
    """Decorator for the public entry points: `fn` runs inside `no_autocast()`, and is
    marked (`runs_outside_autocast`) so a test can find an entry point without it."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with no_autocast():
            return fn(*args, **kwargs)
    wrapper.runs_outside_autocast = True
    return wrapper
