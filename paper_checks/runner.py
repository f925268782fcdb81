"""Run checks one after another, writing each as soon as it finishes, resumably.

A check is any object (normally a module in `paper_checks.checks`) with
`NAME: str`, `CLAIM: str`, `REQUIRES: tuple[str, ...]` ('module:attr' it needs),
`run(ctx) -> CheckResult` and `plot(result) -> matplotlib Figure`.

For each check the runner
1. returns the stored result if this configuration already finished it (resume), unless
   `fresh`;
2. else verifies REQUIRES: a dependency that does not import, does not exist or is a
   placeholder is an *error* (verdict "error", with the import's traceback), never a
   skip — a skip counts as success, a broken import must not;
3. runs it; an exception (ImportError and NotImplementedError included) gives verdict
   "error" with the message and traceback, and the others still run. Only a check that
   raises `MissingDependency` itself — honestly not applicable here, e.g. no CIFAR
   folder or no GPU — is "skipped";
4. writes `<out>/<name>.json` atomically (temp file + os.replace), the figure
   `<out>/<name>.png` (through a uniquely named temporary file), and — for pass/fail
   outcomes only — a record in the JsonlStore `<out>/.resume.jsonl`, so an interrupted
   run resumes without redoing finished checks. Skipped and errored checks are retried
   on the next run.

One run at a time per report folder: `run_checks` holds an exclusive lock on
`<out>/.paper_checks.lock` (an OS file lock, released when the process ends, even if
it is killed) and a second run into the same folder raises `ReportFolderInUse` before
computing anything.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from .context import Context, MissingDependency, require
from .result import CheckResult

STORE_NAME = ".resume.jsonl"
LOCK_NAME = ".paper_checks.lock"


class ReportFolderInUse(RuntimeError):
    """Another run holds the lock of this report folder."""


@contextlib.contextmanager
def report_lock(out_dir: str | Path):
    """Hold the exclusive lock of report folder `out_dir` for the duration of the block.

    Uses `fcntl.flock` (released by the OS when the process ends, so a killed run never
    leaves a stale lock); where fcntl is unavailable, an O_EXCL lock file removed on exit.
    Raises ReportFolderInUse at once (no waiting) if another process holds it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        fcntl = None
    if fcntl is None:  # pragma: no cover
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise ReportFolderInUse(_in_use(out_dir, path)) from None
        try:
            os.write(fd, str(os.getpid()).encode())
            yield path
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)
        return
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ReportFolderInUse(_in_use(out_dir, path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield path
    finally:
        os.close(fd)   # releases the lock


def _in_use(out_dir: Path, path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = "?"
    return (f"report folder {str(out_dir)!r} is in use by another paper_checks run "
            f"(pid {pid or '?'}; lock {path.name}): wait for it to finish or choose another --out")


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
    except MissingDependency as exc:     # raised by the check: not applicable in this run
        result = CheckResult(verdict="skipped", reason=f"skipped: {exc}", **base)
    except Exception as exc:  # noqa: BLE001 - reported (with traceback), not swallowed
        tb = traceback.format_exc()
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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.png")
        os.close(fd)
        try:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return None
    except Exception as exc:  # noqa: BLE001
        return f"figure failed: {type(exc).__name__}: {exc}"


def run_checks(checks: Sequence, ctx: Context, out_dir: str | Path, *, fresh: bool = False,
               progress: bool = True,
               on_result: Callable[[CheckResult, bool], None] | None = None,
               lock: bool = True) -> list[CheckResult]:
    """Run `checks` in order; return their results (resumed ones included).

    `on_result(result, resumed)` is called after each check is written (the CLI uses it
    to refresh the README so a partial run still leaves a readable report). With `lock`
    (default) the folder's lock is held throughout (ReportFolderInUse if another run
    holds it); pass False only when the caller already holds `report_lock(out_dir)`.
    """
    out_dir = Path(out_dir)
    if lock:
        with report_lock(out_dir):
            return _run_locked(checks, ctx, out_dir, fresh, progress, on_result)
    return _run_locked(checks, ctx, out_dir, fresh, progress, on_result)


def _run_locked(checks, ctx, out_dir: Path, fresh: bool, progress: bool, on_result):
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
