"""The outcome of one paper check, and its JSON form.

A `CheckResult` carries everything needed to judge and to redraw a check without
recomputing: the claim, headline predicted and measured numbers (as short text for the
table), the tolerance rule, the verdict, every number the verdict used (`details`) and
every plotted series (`series`, name → array). `plot(result)` in each check module reads
only `result.series` and `result.details`.

JSON conventions: numpy arrays/scalars become lists/numbers; non-finite floats are
written as the strings "nan", "inf", "-inf" (strict JSON has no NaN) and turned back
into floats on reading.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from nets.utils.atomic import atomic_write

VERDICTS = ("pass", "fail", "skipped", "error")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def to_jsonable(obj: Any) -> Any:
    """Plain-JSON version of `obj` (dicts, lists, numbers, strings; NaN/inf as strings)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch tensor
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def from_jsonable(obj: Any) -> Any:
    """Inverse of `to_jsonable` for numbers: the strings 'nan', 'inf', '-inf' become floats."""
    if isinstance(obj, dict):
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    if isinstance(obj, str) and obj in _NONFINITE:
        return _NONFINITE[obj]
    return obj


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One check's outcome.

    name      : the check's identifier (module NAME), also the file stem in the report.
    claim     : the paper's claim in one sentence.
    predicted : headline predicted number(s), short text for the table.
    measured  : headline measured number(s), short text for the table.
    tolerance : the pass rule in words (z-score bound, relative error, ...).
    verdict   : "pass" | "fail" | "skipped" | "error".
    reason    : why skipped / the error message / which numbers failed ("" if passed).
    details   : every number the verdict used (name → number, list or short text).
    series    : every plotted series (name → list/array of floats); enough to redraw.
    seconds   : wall time of the check's run().
    """

    name: str
    claim: str
    predicted: str
    measured: str
    tolerance: str
    verdict: str
    reason: str = ""
    details: dict = dataclasses.field(default_factory=dict)
    series: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("name must be a non-empty string")

    @property
    def ok(self) -> bool:
        """True for an honest outcome that does not fail the job (pass or skipped)."""
        return self.verdict in ("pass", "skipped")

    def array(self, key: str) -> np.ndarray:
        """A stored series as a float ndarray."""
        return np.asarray(self.series[key], dtype=float)

    def with_(self, **changes) -> "CheckResult":
        return dataclasses.replace(self, **changes)

    # ---- JSON -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "CheckResult":
        data = from_jsonable(dict(data))
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown CheckResult fields: {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "CheckResult":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary file in the same folder, then os.replace."""
        path = Path(path)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CheckResult":
        return cls.from_json(Path(path).read_text())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that readers see either the old or the new file."""
    atomic_write(path, lambda fh: fh.write(text), binary=False)


def judged(*, name: str, claim: str, predicted: str, measured: str, tolerance: str,
           failures: list[str], details: dict, series: dict) -> CheckResult:
    """Build a pass/fail result: pass iff `failures` (messages naming the numbers) is empty."""
    return CheckResult(
        name=name, claim=claim, predicted=predicted, measured=measured, tolerance=tolerance,
        verdict="fail" if failures else "pass", reason="; ".join(failures),
        details=details, series=series,
    )
