"""The outcome of one paper check, and its JSON form.

A `CheckResult` carries everything needed to judge and to redraw a check without
recomputing: the claim, headline predicted and measured numbers (as short text for the
table), the tolerance rule, the verdict, every number the verdict used (`details`) and
every plotted series (`series`, name → array). `plot(result)` in each check module reads
only `result.series` and `result.details`.

JSON conventions: the project's one encoder, `nets.utils.jsonio` (non-finite floats
as the strings "nan", "inf", "-inf", turned back into floats on reading).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from nets.utils.atomic import atomic_write
from nets.utils.jsonio import from_jsonable, to_jsonable  # noqa: F401  (re-exported)

VERDICTS = ("pass", "fail", "skipped", "error")

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
