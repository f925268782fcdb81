"""`no_autocast`: the package's numerics run outside an enclosing `torch.autocast`, and
`uncached_parametrizations` outside an enclosing `torch.nn.utils.parametrize.cached()`;
`outside_caller_contexts` is both, and `outside_autocast` the entry points' decorator.

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

__all__ = ["no_autocast", "outside_autocast", "outside_caller_contexts",
           "uncached_parametrizations"]


@contextlib.contextmanager
def no_autocast():
    """Switch off an enclosing CPU or CUDA `torch.autocast` region for the block."""
    with contextlib.ExitStack() as stack:
        for dev in ("cpu", "cuda"):
            if torch.is_autocast_enabled(dev):
                stack.enter_context(torch.autocast(dev, enabled=False))
        yield


@contextlib.contextmanager
def uncached_parametrizations():
    """Every parametrized tensor (`torch.nn.utils.parametrize`: `orthogonal`, the new
    `weight_norm`, `spectral_norm`) recomputed from its original on each access inside
    this block, also when the caller is inside `parametrize.cached()`.

    That cache keeps the first value computed per module until the caller's block ends. A
    curvature product or a training trial called inside it (a monitor's `opt.step()` in a
    cached training step) read the weight of its first forward for every later one: with
    an `orthogonal` layer λ₁ came out 0.520 for 0.537 and `predict_max_lr` 31 % high, the
    learner's lr 40 % high, and the package's own tensors, left in the caller's cache,
    made the next call fail ("Can't call numpy() on Tensor that requires grad"; an outside
    sweep). The caller's cache is left as it was, except that a `cached()` block opened
    and closed by a forward inside this one empties it (torch clears it whenever the
    outermost block closes): its tensors are then recomputed, with the same values."""
    from torch.nn.utils import parametrize

    depth = parametrize._cache_enabled
    parametrize._cache_enabled = 0
    try:
        yield
    finally:
        parametrize._cache_enabled = depth


@contextlib.contextmanager
def outside_caller_contexts():
    """`no_autocast()` and `uncached_parametrizations()`: the caller's mixed precision and
    parametrization cache do not reach the block."""
    with no_autocast(), uncached_parametrizations():
        yield


def outside_autocast(fn):
    """Decorator for the public entry points: `fn` runs inside `outside_caller_contexts()`
    (no autocast, no parametrization cache), and is marked (`runs_outside_autocast`) so a
    test can find an entry point without it."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with outside_caller_contexts():
            return fn(*args, **kwargs)
    wrapper.runs_outside_autocast = True
    return wrapper
