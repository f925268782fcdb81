"""Input checks shared by the public functions of `rmt` (and reused by `nets`).

Every checker names the offending argument in its message, raises `TypeError` for a
value of the wrong kind and `ValueError` for a value of the right kind out of range,
and returns the value converted to the canonical type (float, int or ndarray).
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def as_float(name: str, value, *, positive: bool = False, nonnegative: bool = False,
             allow_inf: bool = False) -> float:
    """Return `value` as a finite float; reject bools, non-numbers, NaN and (unless
    `allow_inf`) infinities; optionally require > 0 or >= 0."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        else:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    x = float(value)
    if math.isnan(x):
        raise ValueError(f"{name} must not be NaN")
    if math.isinf(x) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {x}")
    if positive and not x > 0:
        raise ValueError(f"{name} must be > 0, got {x}")
    if nonnegative and not x >= 0:
        raise ValueError(f"{name} must be >= 0, got {x}")
    return x


def as_int(name: str, value, *, minimum: int | None = None) -> int:
    """Return `value` as an int (integral floats such as 8.0 are accepted)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    if isinstance(value, (numbers.Integral, np.integer)):
        n = int(value)
    elif isinstance(value, (numbers.Real, np.floating)) and float(value).is_integer():
        n = int(value)
    else:
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    return n


def as_batch_sizes(batch_sizes, N: int | None = None, replacement: bool = False) -> np.ndarray:
    """A non-empty 1-d int64 array of batch sizes >= 1; when drawing without replacement
    from N samples (N given, `replacement` False) every size must be <= N."""
    arr = np.atleast_1d(np.asarray(batch_sizes, dtype=object))
    if arr.size == 0 or arr.ndim != 1:
        raise ValueError("batch_sizes must be a non-empty 1-d list of integers")
    out = np.array([as_int("batch_sizes", b, minimum=1) for b in arr.tolist()], dtype=np.int64)
    if N is not None and not replacement and np.any(out > N):
        raise ValueError(f"batch_sizes must be <= N={N} when drawing without replacement, "
                         f"got {out.tolist()}")
    return out


def as_array(name: str, value, *, ndim: int | None = None, nonnegative: bool = False,
             dtype=float) -> np.ndarray:
    """Return `value` as a finite ndarray of `dtype`; check dimensionality and sign."""
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be array-like of numbers, got {type(value).__name__}")
    if np.iscomplexobj(value) and not np.issubdtype(np.dtype(dtype), np.complexfloating):
        raise TypeError(f"{name} must be real, got complex values")
    try:
        arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be array-like of numbers: {exc}") from None
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    if nonnegative and np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative")
    return arr


def as_rng(rng) -> np.random.Generator:
    """Accept a Generator, an int seed >= 0 or None (fresh entropy); never global state."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, (numbers.Integral, np.integer)) and not isinstance(rng, bool)):
        if rng is not None and rng < 0:
            raise ValueError(f"rng seed must be >= 0, got {rng}")
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None, got {type(rng).__name__}")


def as_seed(name: str, seed):
    """Check a seed for `numpy.random.default_rng`: None, an int >= 0, a sequence of
    ints >= 0, a SeedSequence or a Generator. Returns `seed` unchanged (so the stream it
    starts is the one the caller documents); errors name the argument."""
    if isinstance(seed, bool) or isinstance(seed, (str, bytes, float, np.floating)):
        raise TypeError(f"{name} must be an int seed >= 0 (or None), got {seed!r}")
    try:
        np.random.default_rng(seed)
    except TypeError:
        raise TypeError(f"{name} must be an int seed >= 0 (or None), got {type(seed).__name__}") from None
    except ValueError:
        raise ValueError(f"{name} must be an int seed >= 0, got {seed!r}") from None
    return seed
