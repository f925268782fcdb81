"""Run checks one after another, writing each as soon as it finishes, resumably.

A check is any object (normally a module in `paper_checks.checks`) with
`NAME: str`, `CLAIM: str`, `REQUIRES: tuple[str, ...]` ('module:attr' it needs),
`run(ctx) -> CheckResult` and `plot(result) -> matplotlib Figure`.

For each check the runner
1. returns the stored result if this configuration already finished it (resume), unless
   `fresh`;
2. else verifies REQUIRES (a missing or placeholder dependency gives "skipped: <why>",
   as does a NotImplementedError raised by a dependency at run time);
3. runs it; an exception gives verdict "error" with the message, and the others still run;
4. writes `<out>/<name>.json` atomically (temp file + os.replace), the figure
   `<out>/<name>.png`, and — for pass/fail outcomes only — a record in the JsonlStore
   `<out>/.resume.jsonl`, so an interrupted run resumes without redoing finished checks.
   Skipped and errored checks are retried on the next run.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from .context import Context, MissingDependency, require
from .result import CheckResult

STORE_NAME = ".resume.jsonl"


def _store(out_dir: Path, fresh: bool):
    from nets.utils.jsonl_store import JsonlStore

    path = out_dir / STORE_NAME
    if fresh and path.exists():
        path.unlink()
    return JsonlStore(path)


def _claim(check) -> str:
    return getattr(check, "CLAIM", "") or (check.__doc__ or "").strip().split("\n")[0]


def run_one(check, ctx: Context) -> CheckResult:
    """Run a single check, turning missing dependencies and exceptions into results."""
    t0 = time.perf_counter()
    base = dict(name=check.NAME, claim=_claim(check), predicted="", measured="", tolerance="")
    try:
        require(*getattr(check, "REQUIRES", ()))
        result = check.run(ctx)
        if not isinstance(result, CheckResult):
            raise TypeError(f"{check.NAME}.run returned {type(result).__name__}, not CheckResult")
    except MissingDependency as exc:
        result = CheckResult(verdict="skipped", reason=f"skipped: {exc}", **base)
    except NotImplementedError as exc:
        result = CheckResult(verdict="skipped",
                             reason=f"skipped: dependency not implemented yet ({exc})", **base)
    except Exception as exc:  # noqa: BLE001 - reported, not swallowed
        tb = traceback.format_exc(limit=6)
        result = CheckResult(verdict="error", reason=f"{type(exc).__name__}: {exc}",
                             details={"traceback": tb}, **base)
    return result.with_(seconds=round(time.perf_counter() - t0, 3))


def draw(check, result: CheckResult, path: Path) -> str | None:
    """Save check.plot(result) as PNG; return an error message instead of raising."""
    if result.verdict not in ("pass", "fail") or not result.series:
        return None
    try:
        fig = check.plot(result)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        tmp.replace(path)
        return None
    except Exception as exc:  # noqa: BLE001
        return f"figure failed: {type(exc).__name__}: {exc}"


def run_checks(checks: Sequence, ctx: Context, out_dir: str | Path, *, fresh: bool = False,
               progress: bool = True,
               on_result: Callable[[CheckResult, bool], None] | None = None) -> list[CheckResult]:
    """Run `checks` in order; return their results (resumed ones included).

    `on_result(result, resumed)` is called after each check is written (the CLI uses it
    to refresh the README so a partial run still leaves a readable report).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = _store(out_dir, fresh)
    results: list[CheckResult] = []
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(checks, desc="paper checks", unit="check", position=0, dynamic_ncols=True)
    else:
        bar = checks
    for check in bar:
        if progress:
            bar.set_postfix_str(check.NAME)
        key = f"{check.NAME}|{ctx.config_key()}"
        resumed = key in store
        if resumed:
            result = CheckResult.from_dict(store[key])
        else:
            result = run_one(check, ctx)
        png = out_dir / f"{check.NAME}.png"
        if not resumed or not png.exists():
            err = draw(check, result, png)
            if err:
                result = result.with_(details={**result.details, "figure_error": err})
        result.save(out_dir / f"{check.NAME}.json")
        if not resumed and result.verdict in ("pass", "fail"):
            store.put(key, result.to_dict())
        results.append(result)
        if progress:
            bar.write(f"  {result.verdict.upper():7s} {check.NAME} ({result.seconds:.1f}s)"
                      + (" [resumed]" if resumed else ""))
        if on_result is not None:
            on_result(result, resumed)
    return results
