"""Run checks, writing each as soon as it finishes, resumably; serially or in worker processes.

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

Parallel runs (`jobs` > 1): the checks still to compute are grouped — checks that
declare the same `SHARES` tag (an in-process cache, e.g. one simulation read by three
checks) form one group and run in one process — and the groups go to `jobs` worker
processes (spawned, each capped at `threads` BLAS/torch threads), the costliest first
by the checks' `COST` hints (typical seconds on one thread; 10 when absent) so that the
longest ones start at once. Every check draws its randomness from `ctx.rng(tag)`, so
the numbers do not depend on which process ran it or in what order; they can differ in
the last digits from a serial run with a different thread count (floating-point
reductions), and chaotic ones (real training near its threshold) by more. The parent
process does all the writing (JSON, figure, store, README callback) as each result
arrives, and returns the results in the order of `checks`. Nested progress bars of the
workers take the lines below the main bar, one per worker.

One run at a time per report folder: `run_checks` holds an exclusive lock on
`<out>/.paper_checks.lock` (an OS file lock, released when the process ends, even if
it is killed) and a second run into the same folder raises `ReportFolderInUse` before
computing anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from nets.utils.atomic import file_umask

from .context import Context, MissingDependency, require
from .result import CheckResult

STORE_NAME = ".resume.jsonl"
DEFAULT_COST = 10.0          # seconds assumed for a check without a COST hint
LOCK_NAME = ".paper_checks.lock"
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


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


def _store(out_dir: Path, fresh: bool, names=()):
    """The folder's resume store; `fresh` drops the stored results of the checks `names`
    (every seed and setting) and keeps the other checks'."""
    from nets.utils.jsonl_store import JsonlStore

    store = JsonlStore(out_dir / STORE_NAME)
    if fresh:
        store.drop(lambda key: key.split("|", 1)[0] in names)
    return store


def _claim(check) -> str:
    return getattr(check, "CLAIM", "") or (check.__doc__ or "").strip().split("\n")[0]


def _outcome(check, verdict: str, reason: str, **kw) -> CheckResult:
    """A result without numbers: a skip or an error of `check`."""
    return CheckResult(name=check.NAME, claim=_claim(check), predicted="", measured="",
                       tolerance="", verdict=verdict, reason=reason, **kw)


def run_one(check, ctx: Context) -> CheckResult:
    """Run a single check, turning missing dependencies and exceptions into results."""
    t0 = time.perf_counter()
    try:
        require(*getattr(check, "REQUIRES", ()))
        result = check.run(ctx)
        if not isinstance(result, CheckResult):
            raise TypeError(f"{check.NAME}.run returned {type(result).__name__}, not CheckResult")
    except MissingDependency as exc:     # raised by the check: not applicable in this run
        result = _outcome(check, "skipped", f"skipped: {exc}")
    except Exception as exc:  # noqa: BLE001 - reported (with traceback), not swallowed
        result = _outcome(check, "error", f"{type(exc).__name__}: {exc}",
                          details={"traceback": traceback.format_exc()})
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
            os.chmod(tmp, 0o666 & ~file_umask())      # mkstemp's 0600 is not the umask's
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
               lock: bool = True, jobs: int = 1, threads: int = 1) -> list[CheckResult]:
    """Run `checks`; return their results in the order of `checks` (resumed ones included).

    jobs : worker processes (1: in this process, in order; module docstring); threads :
    BLAS/torch threads of each worker (ignored for jobs = 1, where the caller's settings
    hold). Workers are spawned, so they import the caller's main module: a script that
    calls this with jobs > 1 needs the `if __name__ == "__main__":` guard (without it
    every check comes back as an "error" result naming the worker failure).

    `on_result(result, resumed)` is called after each check is written (the CLI uses it
    to refresh the README so a partial run still leaves a readable report). With `lock`
    (default) the folder's lock is held throughout (ReportFolderInUse if another run
    holds it); pass False only when the caller already holds `report_lock(out_dir)`.
    """
    out_dir = Path(out_dir)
    jobs, threads = int(jobs), int(threads)
    if jobs < 1 or threads < 1:
        raise ValueError(f"jobs and threads must be >= 1, got jobs={jobs}, threads={threads}")
    if lock:
        with report_lock(out_dir):
            return _run_locked(checks, ctx, out_dir, fresh, progress, on_result, jobs, threads)
    return _run_locked(checks, ctx, out_dir, fresh, progress, on_result, jobs, threads)


def _run_locked(checks, ctx, out_dir: Path, fresh: bool, progress: bool, on_result,
                jobs: int, threads: int):
    out_dir.mkdir(parents=True, exist_ok=True)
    store = _store(out_dir, fresh, [check.NAME for check in checks])
    keys = {check.NAME: f"{check.NAME}|{ctx.config_key()}" for check in checks}
    results: dict[str, CheckResult] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(checks), desc="paper checks", unit="check", position=0,
                   dynamic_ncols=True)

    def finish(check, result, resumed):
        png = out_dir / f"{check.NAME}.png"
        details = result.details if isinstance(result.details, dict) else {}
        if "figure_error" in details:       # a stored record of an earlier release
            result = result.with_(details={k: v for k, v in details.items()
                                           if k != "figure_error"})
        clean = result                      # stored: the numbers, not how drawing went
        err = draw(check, result, png)      # also when resumed: the folder's figure may
        drawn = err is None and result.verdict in ("pass", "fail") and bool(result.series)
        if not drawn and png.exists():      # be another seed's; with no figure of its own
            png.unlink()                    # (an error, a skip, a failed plot) none stands
        if err:                             # for this result
            result = result.with_(details={**result.details, "figure_error": err})
        result.save(out_dir / f"{check.NAME}.json")
        if not resumed and result.verdict in ("pass", "fail"):
            store.put(keys[check.NAME], clean.to_dict())
        results[check.NAME] = result
        if bar is not None:
            bar.update(1)
            bar.write(f"  {result.verdict.upper():7s} {check.NAME} ({result.seconds:.1f}s)"
                      + (" [resumed]" if resumed else "") + (f" [{err}]" if err else ""))
        if on_result is not None:
            on_result(result, resumed)

    pending = []
    for check in checks:
        if keys[check.NAME] in store:
            finish(check, CheckResult.from_dict(store[keys[check.NAME]]), True)
        else:
            pending.append(check)
    groups = _groups(pending)
    try:
        if jobs > 1 and len(groups) > 1:
            _run_parallel(groups, ctx, min(jobs, len(groups)), threads, finish, bar)
        else:
            # SIGTERM/SIGHUP as SystemExit here too, so the CLI writes its "Interrupted"
            # note: a plain SIGTERM ended a one-process run with a report that read as
            # complete (8 pass, 0 fail, 8 checks never reached; an outside sweep)
            with _sigterm_raises():
                for check in pending:
                    if bar is not None:
                        bar.set_postfix_str(check.NAME)
                    finish(check, run_one(check, ctx), False)
    finally:
        if bar is not None:
            bar.close()
    return [results[check.NAME] for check in checks]


def _groups(checks) -> list[list]:
    """Checks that share a `SHARES` tag together (registry order inside a group); the
    groups ordered by their summed `COST` hint, largest first."""
    groups: dict[str, list] = {}
    for check in checks:
        groups.setdefault(getattr(check, "SHARES", None) or check.NAME, []).append(check)
    cost = {tag: sum(float(getattr(c, "COST", DEFAULT_COST)) for c in g)
            for tag, g in groups.items()}
    return [groups[tag] for tag in sorted(groups, key=lambda t: -cost[t])]


_BAR_POSITION = 1           # a worker's line for nested bars (set when it starts)


def _init_worker(threads: int, lock, slots) -> None:
    """Worker start: cap its threads, share tqdm's lock, take a progress-bar line."""
    global _BAR_POSITION
    from tqdm.auto import tqdm

    limit_threads(threads)
    tqdm.set_lock(lock)
    with slots.get_lock():
        _BAR_POSITION = 1 + slots.value
        slots.value += 1
    _exit_with_parent()


def _exit_with_parent(period: float = 1.0) -> None:
    """End this worker when the process that started it is gone: a SIGKILLed or hung-up
    parent left its workers to finish their checks, throw the results away and then sleep
    for good, holding the caller's output pipe open (an outside sweep: alive after 600 s,
    a `| tee` waiting on them)."""
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(period)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="paper-checks-parent-watch", daemon=True).start()


def _run_group(names: list[str], ctx: Context) -> list[dict]:
    """Run one group of checks in a worker; their results as dictionaries."""
    from .checks import load

    ctx = dataclasses.replace(ctx, bar_position=_BAR_POSITION, cache={})
    return [run_one(check, ctx).to_dict() for check in load(names)]


def _run_parallel(groups, ctx, jobs, threads, finish, bar, *, retry: bool = True) -> None:
    """Run the groups in `jobs` spawned workers. A worker that dies (killed, out of
    memory) breaks the pool, and every group not finished then failed with it — the
    queued ones included (an outside sweep: four checks reported as errors for one
    killed worker); those groups are run once more, each in a worker of its own, and only
    a group whose worker dies again is reported as an error."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from tqdm.auto import tqdm

    spawn = mp.get_context("spawn")
    lock = spawn.RLock()
    tqdm.set_lock(lock)
    broken = []
    with _thread_env(threads), _sigterm_raises(), ProcessPoolExecutor(
            max_workers=jobs, mp_context=spawn, initializer=_init_worker,
            initargs=(threads, lock, spawn.Value("i", 0))) as pool:
        running = {pool.submit(_run_group, [c.NAME for c in g], ctx): g for g in groups}
        try:
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    group = running.pop(fut)
                    try:
                        done_results = [CheckResult.from_dict(d) for d in fut.result()]
                    except BrokenProcessPool:
                        if retry:
                            broken.append(group)
                            continue
                        done_results = _worker_failed(group, twice=True)
                    except Exception:  # noqa: BLE001 - the worker's call failed: report
                        done_results = _worker_failed(group, twice=False)
                    for check, result in zip(group, done_results):
                        finish(check, result, False)
                if bar is not None:
                    bar.set_postfix_str(", ".join(c.NAME for g in running.values() for c in g)[:60])
        except BaseException:
            # interrupted (Ctrl-C, SIGTERM, an error here): stop the workers now — left
            # alone they finished the running groups and started the queued ones, whose
            # results were then thrown away (Ctrl-C returned only after ~the whole run),
            # and after a SIGTERM they lived on as orphans
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    for group in broken:
        _run_parallel([group], ctx, 1, threads, finish, bar, retry=False)


def _worker_failed(group, *, twice: bool) -> list[CheckResult]:
    tb = traceback.format_exc()
    why = ("its worker process died twice" if twice else "worker process failed")
    exc = sys.exc_info()[1]
    return [_outcome(c, "error", f"{why}: {type(exc).__name__}: {exc}",
                     details={"traceback": tb}) for c in group]


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises SystemExit(143) in the main thread while checks run, so that
    `_run_parallel` stops its workers on the way out (a plain SIGTERM killed the parent
    and left them running) and the CLI reports the run as interrupted; off the main
    thread nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    sigs = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    old = {sig: signal.signal(sig, handler) for sig in sigs}   # a closed terminal as well
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def _thread_env(n: int):
    """The thread-count environment variables set to `n` while worker processes start
    (they read them when their BLAS loads, before any initializer runs)."""
    old = {v: os.environ.get(v) for v in _THREAD_VARS}
    os.environ.update({v: str(n) for v in _THREAD_VARS})
    try:
        yield
    finally:
        for v, val in old.items():
            if val is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = val


def limit_threads(n: int) -> None:
    """Cap BLAS/OpenMP/torch threads. Environment variables only act on libraries not yet
    loaded (and on worker processes started later), so this runs before the checks
    import numpy-heavy code; torch is capped directly, and threadpoolctl is used for an
    already-loaded BLAS when available."""
    os.environ.update({v: str(n) for v in _THREAD_VARS})
    try:
        import torch
        torch.set_num_threads(n)
    except Exception:  # pragma: no cover
        pass
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n)
    except Exception:
        pass
