"""The project's one JSON convention.

`to_jsonable` turns numpy/torch scalars and arrays, tuples, dataclass results and
mappings into plain JSON types; non-finite floats are written as the strings "nan",
"inf" and "-inf" (strict JSON has no NaN), and `from_jsonable` turns those strings back
into floats. Every file the package writes (result stores, check results, report JSON,
`Result.to_dict()`) goes through these two functions, so `json.dumps(..., allow_nan=False)`
always succeeds and NaN is written one way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["to_jsonable", "from_jsonable", "NONFINITE"]

NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _float(x: float):
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def to_jsonable(obj: Any) -> Any:
    """Plain-JSON version of `obj` (dicts, lists, numbers, strings, bools, None)."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return _float(obj)
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict())     # a nested object's own dict, made strict too
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch tensor
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, complex):
        return [_float(obj.real), _float(obj.imag)]
    if hasattr(obj, "__fspath__"):
        return str(obj)
    # torch.dtype, torch.device and other small value objects: their readable name
    return str(obj)


def from_jsonable(obj: Any) -> Any:
    """Inverse of `to_jsonable` for numbers: "nan", "inf", "-inf" become floats."""
    if isinstance(obj, dict):
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    if isinstance(obj, str) and obj in NONFINITE:
        return NONFINITE[obj]
    return obj
