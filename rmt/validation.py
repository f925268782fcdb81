"""Input checks shared by the public functions of `rmt` (and reused by `nets`).

Every checker names the offending argument in its message, raises `TypeError` for a
value of the wrong kind and `ValueError` for a value of the right kind out of range,
and returns the value converted to the canonical type (float, int or ndarray).

What counts as a number is decided once, here, for every kind of container:

* scalars: Python ``int``/``float`` (and other ``numbers.Real``), numpy integer and
  floating scalars, and 0-d numpy arrays, whose single element is checked by the same
  rule (so ``np.array(True)`` is refused exactly like ``True``);
* refused everywhere, inside lists too: ``bool``/``numpy.bool_``, strings and bytes,
  ``None``, complex numbers, and anything else that is not a real number;
* integers too large for int64 and floats that overflow are ``ValueError``s naming
  the argument, never an ``OverflowError`` from a conversion.

Seeds (`as_seed`, `as_rng`): an int seed >= 0 is used as is; a
``numpy.random.Generator`` yields one int drawn from it (so passing a Generator
advances it by one draw, and the caller's stream decides the seed).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
import re

import numpy as np

INT64_MAX = int(np.iinfo(np.int64).max)
SEED_BOUND = 2 ** 63 - 1          # a Generator passed as a seed yields an int in [0, 2**63 - 1)


def _unwrap_0d(value):
    """The element of a 0-d numpy array (a numpy scalar) or of a 0-d array of another
    library with `.item()` (a torch scalar tensor: its Python number), else `value`
    unchanged."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]
    if (not isinstance(value, (np.generic, numbers.Number)) and getattr(value, "ndim", None) == 0
            and callable(getattr(value, "item", None))):
        return value.item()
    return value


def _kind(value) -> str:
    """'bool', 'int', 'real' or 'other' for a scalar (after unwrapping a 0-d array)."""
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (numbers.Integral, np.integer)):
        return "int"
    if isinstance(value, (numbers.Real, np.floating)):
        return "real"
    return "other"


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}" if len(text) <= 40 else type(value).__name__


def as_float(name: str, value, *, positive: bool = False, nonnegative: bool = False,
             allow_inf: bool = False) -> float:
    """Return `value` as a finite float; reject bools, non-numbers, NaN and (unless
    `allow_inf`) infinities; optionally require > 0 or >= 0."""
    value = _unwrap_0d(value)
    if _kind(value) in ("bool", "other"):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    try:
        x = float(value)
    except OverflowError:            # an int beyond the float range
        raise ValueError(f"{name} must be finite, got an integer too large for a float") from None
    if math.isnan(x):
        raise ValueError(f"{name} must not be NaN")
    if math.isinf(x) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {x}")
    if positive and not x > 0:
        raise ValueError(f"{name} must be > 0, got {x}")
    if nonnegative and not x >= 0:
        raise ValueError(f"{name} must be >= 0, got {x}")
    return x


def as_bool(name: str, value) -> bool:
    """Return `value` as a Python bool: a bool, a numpy bool or a 0-d array of one (what
    numpy comparisons give). Refuse everything else with a TypeError naming `name`: 1,
    "yes" and None are not flags (a truthiness test would take "no" for True)."""
    value = _unwrap_0d(value)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {_describe(value)}")


def as_unit_interval(name: str, value) -> float:
    """`as_float` in [0, 1): a momentum or an EMA factor (ValueError from 1 on)."""
    v = as_float(name, value, nonnegative=True)
    if not v < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {v}")
    return v


def as_int(name: str, value, *, minimum: int | None = None, maximum: int | None = INT64_MAX) -> int:
    """Return `value` as an int (integral floats such as 8.0 are accepted); refuse bools,
    non-numbers and non-integral or non-finite floats (TypeError), and values below
    `minimum` or above `maximum` (ValueError; by default the int64 range, so that the
    value can index numpy and torch arrays)."""
    value = _unwrap_0d(value)
    kind = _kind(value)
    if kind == "int":
        n = int(value)
    elif kind == "real" and math.isfinite(float(value)) and float(value).is_integer():
        n = int(value)
    else:
        raise TypeError(f"{name} must be an integer, got {_describe(value)}")
    if minimum is not None and n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    if maximum is not None and n > maximum:
        got = f"a {len(str(n))}-digit integer" if n > 10 ** 15 else str(n)
        raise ValueError(f"{name} must be <= {maximum}, got {got}")
    return n


def as_range(name: str, value) -> tuple[float, float]:
    """Return a pair (lo, hi) of positive finite floats with hi > lo (ValueError
    otherwise; TypeError for something that is not a pair)."""
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (lo, hi), got {_describe(value)}") from None
    lo, hi = as_float(name, lo, positive=True), as_float(name, hi, positive=True)
    if not hi > lo:
        raise ValueError(f"{name} must be (lo, hi) with hi > lo, got {value}")
    return lo, hi


def as_batch_sizes(batch_sizes, N: int | None = None, replacement: bool = False, *,
                   name: str = "batch_sizes") -> np.ndarray:
    """A non-empty 1-d int64 array of batch sizes >= 1; when drawing without replacement
    from N samples (N given, `replacement` False) every size must be <= N. A single
    integer is a list of one; every element is checked by `as_int`."""
    if isinstance(batch_sizes, (str, bytes)) or batch_sizes is None:
        raise TypeError(f"{name} must be an integer or a list of integers, got {_describe(batch_sizes)}")
    try:
        arr = np.atleast_1d(np.asarray(batch_sizes, dtype=object))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be an integer or a list of integers: {exc}") from None
    if arr.size == 0 or arr.ndim != 1:
        raise ValueError(f"{name} must be a non-empty 1-d list of integers, got shape {arr.shape}")
    out = np.array([as_int(name, b, minimum=1) for b in arr.tolist()], dtype=np.int64)
    if N is not None and not replacement and np.any(out > N):
        raise ValueError(f"{name} must be <= N={N} when drawing without replacement, "
                         f"got {out.tolist()}")
    return out


def _check_scalar_element(name: str, el, complex_ok: bool, where: str) -> None:
    el = _unwrap_0d(el)
    k = _kind(el)
    if k == "other" and complex_ok and isinstance(el, numbers.Complex):
        return
    if k in ("bool", "other"):
        if isinstance(el, (complex, np.complexfloating)):
            raise TypeError(f"{name} must be real, got complex values{where}")
        raise TypeError(f"{name} must hold real numbers, got {_describe(el)}{where}")
    if k == "int" and abs(int(el)) > 2 ** 1023:
        raise ValueError(f"{name} must be finite, got an integer too large for a float{where}")


def _check_nested(name: str, value, complex_ok: bool, index: tuple = ()) -> None:
    """Check every element of a (nested) list/tuple before numpy converts it: numpy
    would silently turn [True, 8] into [1, 8] and ["8"] into [8.0]."""
    for i, el in enumerate(value):
        idx = index + (i,)
        if isinstance(el, (list, tuple)):
            _check_nested(name, el, complex_ok, idx)
        elif isinstance(el, np.ndarray) and el.ndim > 0:
            _check_array_dtype(name, el, complex_ok)
        else:
            where = f" at index {idx[0] if len(idx) == 1 else list(idx)}"
            _check_scalar_element(name, el, complex_ok, where)


def _check_array_dtype(name: str, arr: np.ndarray, complex_ok: bool) -> None:
    """Refuse an array whose dtype or (for object arrays) elements are not numbers."""
    kind = arr.dtype.kind
    if kind == "b":
        raise TypeError(f"{name} must hold numbers, got bools")
    if kind in "USVMm":
        raise TypeError(f"{name} must hold numbers, got dtype {arr.dtype}")
    if kind == "c" and not complex_ok:
        raise TypeError(f"{name} must be real, got complex values")
    if kind == "O":
        for idx, el in np.ndenumerate(arr):
            where = f" at index {idx[0] if len(idx) == 1 else list(idx)}" if arr.ndim else ""
            if isinstance(el, (list, tuple)):
                raise ValueError(f"{name} must be a regular (non-ragged) array of numbers{where}")
            _check_scalar_element(name, el, complex_ok, where)


def as_array(name: str, value, *, ndim: int | None = None, nonnegative: bool = False,
             dtype=float, allow_empty: bool = False) -> np.ndarray:
    """Return `value` as a finite ndarray of `dtype`; check dimensionality and sign.

    Every element must be a real number (complex too when `dtype` is complex): bools,
    strings, None and ragged nesting are refused, not converted. An empty array is
    refused unless `allow_empty` (evaluation grids may be empty)."""
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be array-like of numbers, got {type(value).__name__}")
    complex_ok = np.issubdtype(np.dtype(dtype), np.complexfloating)
    if isinstance(value, (list, tuple)):
        _check_nested(name, value, complex_ok)
    elif not isinstance(value, np.ndarray) and np.ndim(value) == 0:
        _check_scalar_element(name, value, complex_ok, "")
    try:
        raw = np.asarray(value)
    except ValueError as exc:       # ragged nesting
        raise ValueError(f"{name} must be a regular (non-ragged) array of numbers: {exc}") from None
    except TypeError as exc:
        raise TypeError(f"{name} must be array-like of numbers: {exc}") from None
    _check_array_dtype(name, raw, complex_ok)
    try:
        arr = np.asarray(raw, dtype=dtype)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got a value too large for {np.dtype(dtype)}") from None
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be array-like of numbers: {exc}") from None
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if arr.size == 0:
        if allow_empty:
            return arr
        raise ValueError(f"{name} must not be empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    if nonnegative and np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative")
    return arr


def _num(x: float) -> str:
    """Shortest repr of a float, without a trailing '.0' (2.0 → '2', 4e-20 → '4e-20')."""
    t = repr(float(x))
    return t[:-2] if t.endswith(".0") else t


def refuse_singular_points(name: str, z: np.ndarray, points, what: str) -> None:
    """ValueError naming the caller's `name` and its value if a real entry of the complex
    array `z` sits on one of the real `points` where the function being evaluated is
    infinite (an edge or pole of a Stieltjes transform; `what` says which function), to
    within the rounding of the point itself: |z − p| <= 4·eps·|p|. Relative to the point,
    so a law of scale 1e-20 keeps every legitimate z (an absolute 4·eps·(1 + |p|) refused
    every |z| below 1e-15); a point at 0 — a pole or the hard edge — is refused only
    exactly, the value beside it being representable or an overflow that the guard
    reports."""
    real = z.real[z.imag == 0]
    for p in points:
        hit = np.abs(real - p) <= 4 * np.finfo(float).eps * abs(p)
        if hit.any():
            zz = float(real[np.argmax(hit)])
            at = "" if zz == p else f" (within rounding of {_num(p)})"
            raise ValueError(f"{name}={_num(zz)} is a singular point of {what}{at}: it is "
                             "infinite there (evaluate off the real axis or away from it)")


def check_finite_result(names: str, value) -> None:
    """Raise ValueError naming the caller's arguments (`names`, e.g. "sigma2, P and B")
    when a quantity computed from them overflowed to inf or NaN, so that the error never
    reaches an inner helper and comes out under that helper's argument name."""
    arr = np.asarray(value, dtype=float)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{names} are too large: the quantity computed from them overflows "
                         f"(got {arr if arr.ndim else float(arr)})")


def resolved_seed(name: str, seed):
    """`seed` checked (`as_seed`: errors name `name`) and, when None, one int in
    [0, 2**63 - 1) drawn from fresh entropy (so that a result can record it and be
    repeated); an int >= 0 and a Generator's draw are returned as ints, other accepted
    seeds (a SeedSequence, a BitGenerator) as they are."""
    seed = as_seed(name, seed)
    if seed is None:
        return int(np.random.default_rng().integers(0, SEED_BOUND))
    return seed


def as_seed(name: str, seed):
    """Check a seed for `numpy.random.default_rng` and return it.

    An int seed >= 0 is used as is (returned as a Python int); a
    ``numpy.random.Generator`` yields one int drawn from it, ``integers(0, 2**63 - 1)``
    (returned; the Generator advances by one draw); None, a sequence of ints >= 0 and a
    ``SeedSequence`` are returned unchanged. Errors name the argument."""
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, SEED_BOUND))
    if isinstance(seed, np.ndarray) and seed.ndim == 0 and seed.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an int seed >= 0, a numpy Generator or None, "
                        f"got a 0-d array of dtype {seed.dtype}")
    seed = _unwrap_0d(seed)
    if seed is None or isinstance(seed, (np.random.SeedSequence, np.random.BitGenerator)):
        return seed
    kind = _kind(seed)
    if kind == "int":
        if int(seed) < 0:
            raise ValueError(f"{name} must be an int seed >= 0, got {int(seed)}")
        return int(seed)
    if kind != "other" or isinstance(seed, (str, bytes, dict, set)):
        raise TypeError(f"{name} must be an int seed >= 0, a numpy Generator or None, "
                        f"got {_describe(seed)}")
    try:
        elements = list(seed)
    except TypeError:
        raise TypeError(f"{name} must be an int seed >= 0, a numpy Generator or None, "
                        f"got {type(seed).__name__}") from None
    for el in elements:
        el = _unwrap_0d(el)
        if _kind(el) != "int":
            raise TypeError(f"{name} must be an int seed >= 0 or a sequence of them, "
                            f"got element {_describe(el)}")
        if int(el) < 0:
            raise ValueError(f"{name} must be an int seed >= 0, got element {int(el)}")
    if not elements:
        raise ValueError(f"{name} must not be an empty sequence")
    return [int(e) for e in elements]


def as_rng(rng, name: str = "rng") -> np.random.Generator:
    """A Generator from `rng`: a Generator is used as is (its stream continues), an int
    seed >= 0 starts `numpy.random.default_rng(seed)`, None draws fresh entropy. Never
    global state. Errors name `name` (the caller's argument: ``rng`` or ``seed``)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, np.ndarray) and rng.ndim == 0 and rng.dtype.kind not in "iu":
        raise TypeError(f"{name} must be a numpy.random.Generator, an int seed or None, "
                        f"got a 0-d array of dtype {rng.dtype}")
    rng = _unwrap_0d(rng)
    if rng is None:
        return np.random.default_rng()
    if _kind(rng) != "int":
        raise TypeError(f"{name} must be a numpy.random.Generator, an int seed or None, "
                        f"got {_describe(rng)}")
    if int(rng) < 0:
        what = name if name == "seed" else f"{name} seed"    # not "seed seed"
        raise ValueError(f"{what} must be >= 0, got {int(rng)}")
    return np.random.default_rng(int(rng))


def rng_from(rng=None, seed=None) -> np.random.Generator:
    """The Generator of a sampling function that takes both ``rng=`` and ``seed=`` (the
    same rule for each: a Generator is used as is, an int seeds a new one); at most one
    of the two may be given."""
    if rng is not None and seed is not None:
        raise TypeError("give either seed or rng, not both (they mean the same)")
    return as_rng(seed, "seed") if seed is not None else as_rng(rng, "rng")


# ------------------------------------------------------------------ public-function guard

_NUMERIC_FAILURES = (OverflowError, ZeroDivisionError, FloatingPointError, np.linalg.LinAlgError)


def _finite(out) -> bool:
    """True unless `out` (a number, array, tuple, list, dict or dataclass of them) holds
    a NaN or an infinity; non-numeric parts (strings, callables, sympy) are ignored."""
    if type(out) is float:                      # the common case, fast
        return math.isfinite(out)
    if isinstance(out, (bool, np.bool_, str, bytes)) or out is None:
        return True
    if isinstance(out, (numbers.Number, np.number)):
        return bool(np.isfinite(complex(out))) if isinstance(out, (complex, np.complexfloating)) \
            else bool(np.isfinite(float(out)))
    if isinstance(out, np.ndarray):
        return out.dtype.kind not in "fc" or bool(np.all(np.isfinite(out)))
    if isinstance(out, (tuple, list)):
        return all(_finite(v) for v in out)
    if isinstance(out, dict):
        return all(_finite(v) for v in out.values())
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return all(_finite(getattr(out, f.name)) for f in dataclasses.fields(out))
    return True


def _names_any(message: str, params) -> bool:
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(p)}(?![A-Za-z_])", message) for p in params)


def guarded(fn):
    """Wrap a public numeric function so that every failure names the caller's arguments.

    * an error whose message names none of `fn`'s parameters (it came from an inner
      helper, e.g. "noise_var must be finite" from a function without `noise_var`, or
      from scipy) is re-raised, same type, prefixed with `fn`'s name and parameters;
    * OverflowError, ZeroDivisionError, FloatingPointError and LinAlgError become a
      ValueError naming the parameters (inputs beyond the representable range);
    * a result holding NaN or inf (a product that overflowed) is a ValueError naming
      the parameters, never returned.
    """
    sig = inspect.signature(fn)
    params = tuple(sig.parameters)
    label = f"{fn.__name__}({', '.join(params)})"

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            out = fn(*args, **kwargs)
        except _NUMERIC_FAILURES as exc:
            raise ValueError(f"{label}: the arguments are beyond the numerically representable "
                             f"range ({type(exc).__name__}: {exc})") from exc
        except (ValueError, TypeError) as exc:
            if _names_any(str(exc), params + _renamed(sig, args, kwargs)):
                raise
            raise type(exc)(f"{label}: {exc}") from exc
        if not _finite(out):
            raise ValueError(f"{label}: the result overflows to inf/NaN for these arguments "
                             f"(values too large or too small for float64)")
        return out

    wrapper.__guarded__ = True
    return wrapper


def _renamed(sig, args, kwargs) -> tuple:
    """The caller's names for arguments, where `fn` takes them (`name=` or `B_name=`, e.g.
    "batch_size" for `batch_noise_factor`'s B): a message naming one names the caller's
    argument."""
    keys = [p for p in sig.parameters if p == "name" or p.endswith("_name")]
    if not keys:
        return ()
    try:
        bound = sig.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return ()
    given = [bound.get(k) for k in keys]
    return tuple(g for g in given if isinstance(g, str) and g.isidentifier())


def guard_module(namespace: dict) -> None:
    """Apply `guarded` to every public function defined in the module `namespace`
    (called once at the end of each numeric module of `rmt`)."""
    module = namespace["__name__"]
    for name, obj in list(namespace.items()):
        if (not name.startswith("_") and inspect.isfunction(obj) and obj.__module__ == module
                and not getattr(obj, "__guarded__", False)):
            namespace[name] = guarded(obj)
