"""Result objects: frozen dataclasses read as `r.key` or `r["key"]`, with `to_dict()`.

Every result the package returns is a frozen dataclass built with the `result`
decorator below (scipy's `OptimizeResult` and hessian-eigenthings' result classes are
the models): attribute and item access name the same fields, `keys()` lists them,
`to_dict()` gives plain JSON types (`json.dumps(r.to_dict())` always works; NaN as
"nan", see `nets.utils.jsonio`), and the repr fits a few lines (arrays are summarised by
shape and first values). Classes that draw themselves add `plot(ax=None)`, which returns
the matplotlib axes and never calls `show()`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from nets.utils.jsonio import to_jsonable

__all__ = ["Result", "result", "short_repr"]


def short_repr(value: Any, width: int = 60) -> str:
    """A one-line summary of `value`: arrays as array(shape, first values...)."""
    if isinstance(value, np.ndarray) or (hasattr(value, "detach") and hasattr(value, "shape")):
        arr = value if isinstance(value, np.ndarray) else value.detach().cpu().numpy()
        flat = arr.reshape(-1)
        head = ", ".join(_num(x) for x in flat[:4])
        more = ", …" if flat.size > 4 else ""
        return f"array{tuple(arr.shape)}[{head}{more}]"
    if isinstance(value, (list, tuple)) and (
            len(value) > 4 or any(not isinstance(v, (int, float, str, bool, type(None))) for v in value)):
        return f"{type(value).__name__}(len={len(value)})"
    if isinstance(value, float):
        return _num(value)
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _num(x) -> str:
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    try:
        return f"{float(x):.4g}"
    except (TypeError, ValueError):
        return repr(x)


class Result:
    """Mixin for frozen dataclass results (see module docstring)."""

    def __getitem__(self, key: str):
        if not isinstance(key, str) or key not in self.keys():
            raise KeyError(f"{type(self).__name__} has no field {key!r}; fields: {self.keys()}")
        return getattr(self, key)

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self.keys() else default

    def to_dict(self) -> dict:
        """Every field as plain JSON types (arrays → lists, NaN → "nan")."""
        return {k: to_jsonable(getattr(self, k)) for k in self.keys()}

    def __repr__(self) -> str:
        parts = [f"{k}={short_repr(getattr(self, k))}" for k in self.keys()]
        lines, line = [], f"{type(self).__name__}("
        for p in parts:
            if len(line) + len(p) > 88 and line.strip():
                lines.append(line.rstrip())
                line = "    "
            line += p + ", "
        lines.append(line.rstrip(", ") + ")")
        return "\n".join(lines[:8]) + ("\n    …)" if len(lines) > 8 else "")


def result(cls):
    """Class decorator: a frozen dataclass with the `Result` repr (not dataclass's)."""
    if not issubclass(cls, Result):
        raise TypeError(f"{cls.__name__} must derive from nets.utils.results.Result")
    return dataclasses.dataclass(frozen=True, repr=False)(cls)
