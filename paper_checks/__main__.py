"""`python -m paper_checks` (or `paper-checks`): run every paper check, print the pass/fail
table, write the report folder.

Exit code 0 when every check passed or was honestly skipped (not applicable in this run,
e.g. no CIFAR data for --scale paper), 1 if any check failed or raised (a dependency that
does not import is an error, not a skip), 2 for invalid arguments — reported in one line
naming the option, before any work — and when another run holds the report folder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

MAX_SEED = 2 ** 31 - 1
MAX_THREADS = 1024


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `paper_checks: error: <option>: <why> (see --help)`."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="paper_checks",
        description="Run every claim of Granziol, Zohren & Roberts (JMLR 2022) as a check and "
                    "write a report (markdown + PNG + JSON). Default: embedded data (synthetic "
                    "random matrices, sklearn digits), < 10 min on 2 CPU cores.")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only these checks (repeatable, or a comma-separated list)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, for tests (about 2-3 minutes instead of 5-8; verdicts "
                        "of the small sizes)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="device for network_batch_spectra and on_the_fly_learner (default "
                        "cpu; the real-training checks run on the CPU)")
    p.add_argument("--out", default="report", metavar="DIR", help="report folder (default: report)")
    p.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    p.add_argument("--fresh", action="store_true",
                   help="ignore results stored by an earlier (interrupted) run and recompute")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("--scale", choices=("default", "paper"), default="default",
                   help="'paper': add the GPU-sized VGG-16 / WideResNet-28-10 CIFAR-100 "
                        "batch-Hessian spectra (needs --data and a CUDA GPU)")
    p.add_argument("--data", metavar="DIR", help="CIFAR-100 folder (python pickle format) for --scale paper")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), metavar="N",
                   help="BLAS/OpenMP/torch threads in all, shared among the --jobs processes "
                        "(default 2, or 1 on a one-core machine; pass 1 on a machine shared "
                        "with other work)")
    p.add_argument("--jobs", type=int, default=None, metavar="J",
                   help="checks run in J worker processes at once, each with threads/J "
                        "threads (default: as many as --threads; 1 runs them one after "
                        "another in this process). On 2 cores, 2 processes of one thread "
                        "finished the default job 1.57x sooner than one of two threads.")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--redraw", metavar="DIR",
                   help="only rebuild the figures and README of an existing report from its JSON")
    return p


def _cuda_available() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False


def validate(args, parser: argparse.ArgumentParser) -> None:
    """Argument checks that argparse cannot express (the numeric ones, `_check_numbers`,
    ran first in `main`); errors name the option."""
    if args.scale == "paper":
        if not args.data:
            parser.error("--scale paper needs --data DIR (a folder holding CIFAR-100 in the "
                         "python pickle format, e.g. cifar-100-python/)")
        if not Path(args.data).is_dir():
            parser.error(f"--data {args.data!r} does not exist or is not a folder")
        if not _cuda_available():
            parser.error("--scale paper needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "run the default scale on CPU instead")
        if args.device != "cuda":
            args.device = "cuda"
    elif args.data:
        parser.error("--data is only used with --scale paper")
    if args.device == "cuda" and not _cuda_available():
        parser.error("--device cuda requested but no CUDA GPU is available")
    out = check_out_dir(args.out, parser, "--out")
    from .report import readme_is_ours

    if not readme_is_ours(out):
        parser.error(f"--out {args.out!r} holds a README.md that is not a paper_checks "
                     "report (it would be overwritten): choose another --out")


def _check_numbers(args, parser) -> None:
    """--seed, --threads and --jobs in range (sets the default --jobs)."""
    if not 0 <= args.seed <= MAX_SEED:
        parser.error(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    if not 1 <= args.threads <= MAX_THREADS:
        parser.error(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
    if args.jobs is None:
        args.jobs = args.threads
    if not 1 <= args.jobs <= args.threads:
        parser.error(f"--jobs must be in [1, --threads = {args.threads}], got {args.jobs}")


def check_out_dir(value: str, parser: argparse.ArgumentParser, option: str) -> Path:
    """The report folder must be a non-empty path to a folder that exists or can be
    created, and that this process can write to (probed with a temporary file)."""
    if not value or not value.strip():
        parser.error(f"{option} must name a folder, got an empty string")
    out = Path(value)
    if out.exists() and not out.is_dir():
        parser.error(f"{option} {value!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-probe-"):
            pass
    except OSError as exc:
        parser.error(f"{option} {value!r} is not a writable folder ({exc.strerror or exc})")
    return out


def _selected(args, parser) -> list[str]:
    from .checks import all_names

    names = all_names(args.scale)
    if not args.only:
        return names
    wanted = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    if not wanted:
        parser.error(f"--only: no check named (got {args.only!r}); known: {', '.join(names)}")
    unknown = [n for n in wanted if n not in names]
    paper = [n for n in unknown if n in all_names("paper")]
    if paper:
        parser.error(f"--only: {paper} run only with --scale paper (CIFAR data and a GPU)")
    if unknown:
        parser.error(f"--only: unknown check(s) {unknown}; known: {', '.join(names)}")
    return [n for n in names if n in wanted]


def _ignored_options(args, jobs_given, *more) -> list[str]:
    """The options given that neither --list nor --redraw uses (computation and output
    options), plus the (name, given) pairs in `more`."""
    pairs = (("--quick", args.quick), ("--fresh", args.fresh), ("--seed", args.seed != 0),
             ("--data", args.data), ("--out", args.out != "report"),
             ("--device", args.device != "cpu"), ("--jobs", jobs_given), *more)
    return [opt for opt, given in pairs if given]


def main(argv=None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = build_parser()
    args = parser.parse_args(argv)
    from .checks import load

    jobs_given = args.jobs is not None  # (_check_numbers fills in the default)
    _check_numbers(args, parser)        # --list and --redraw too (they ignored bad values)
    if args.list:                       # --only narrows the list (an unknown name is an error)
        # --list ran nothing and said so nowhere: `--list --quick --out x` printed the list
        ignored = _ignored_options(args, jobs_given, ("--redraw", args.redraw is not None))
        if ignored:
            parser.error(f"--list runs nothing, so {', '.join(ignored)} would be ignored: "
                         "leave them out (--only and --scale choose what is listed)")
        for mod in load(_selected(args, parser)):
            print(f"{mod.NAME:28s} {mod.CLAIM}")
        return 0
    if args.redraw is not None:
        from .report import (
            interrupted_note,
            is_report,
            redraw,
            report_results,
            reported_names,
            write_readme,
        )
        from .runner import ReportFolderInUse, report_lock

        ignored = _ignored_options(args, jobs_given, ("--only", args.only),
                                   ("--scale", args.scale != "default"))
        if ignored:
            parser.error(f"--redraw recomputes nothing, so {', '.join(ignored)} would be "
                         "ignored: leave them out")
        if not args.redraw.strip() or not Path(args.redraw).is_dir():
            parser.error(f"--redraw {args.redraw!r} is not a folder")
        if not is_report(args.redraw):
            # it rewrote README.md of any folder (a project's own, with --redraw .)
            parser.error(f"--redraw {args.redraw!r} holds no paper_checks report (no check "
                         "results, or a README.md written by something else)")
        out = check_out_dir(args.redraw, parser, "--redraw")
        try:
            with report_lock(out):
                _, failed = redraw(out)
                results = report_results(out)
                # a listed check whose JSON no longer loads vanished from the page, with
                # exit 0 (an outside sweep): named here and in the report, exit 1
                unread = [n for n in (reported_names(out) or [])
                          if n not in {r.name for r in results}]
                failed.update({n: "its JSON file is missing or damaged" for n in unread})
                note = None                 # write_readme keeps an interrupted run's note
                if unread:
                    prior = interrupted_note(out)
                    note = ((prior + " " if prior else "")
                            + f"Not redrawn (JSON missing or damaged): {', '.join(unread)}.")
                write_readme(results, out, redrawn=True, note=note)
        except ReportFolderInUse as exc:
            parser.error(f"--redraw: {str(exc).replace('or choose another --out', 'then redraw')}")
        for name, err in failed.items():        # the README says so too
            print(f"--redraw: {name}: {err}", file=sys.stderr)
        return 1 if failed else 0
    names = _selected(args, parser)        # before validate creates the --out folder
    validate(args, parser)
    from .runner import limit_threads
    limit_threads(args.threads)

    from .context import Context
    from .report import text_table, write_readme
    from .runner import STORE_NAME, ReportFolderInUse, report_lock, run_checks

    ctx = Context(seed=args.seed, quick=args.quick, device=args.device, scale=args.scale,
                  data=Path(args.data) if args.data else None, progress=not args.no_progress)
    out = Path(args.out)
    command = "python -m paper_checks " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    done = []

    resumed_names = []

    def refresh(result, resumed):
        done.append(result)
        if resumed:
            resumed_names.append(result.name)
        write_readme(done, out, wall_seconds=time.perf_counter() - t0, command=command.strip())

    with contextlib.ExitStack() as held:
        try:
            held.enter_context(report_lock(out))   # before any work: one run per folder
        except ReportFolderInUse as exc:
            parser.error(f"--out: {exc}")
        try:
            results = run_checks(load(names), ctx, out, fresh=args.fresh,
                                 progress=not args.no_progress, on_result=refresh, lock=False,
                                 jobs=args.jobs, threads=max(1, args.threads // args.jobs))
        except (KeyboardInterrupt, SystemExit) as exc:
            # Ctrl-C; SIGTERM or SIGHUP during a parallel run (SystemExit 143 / 129)
            code = 130 if isinstance(exc, KeyboardInterrupt) else exc.code
            if not isinstance(code, int) or code < 128:
                raise
            kept = [r for r in done if r.verdict in ("pass", "fail")]
            missing = [n for n in names if n not in {r.name for r in done}]
            write_readme(done, out, wall_seconds=time.perf_counter() - t0,
                         command=command.strip(),
                         note=f"Interrupted: {len(missing)} check(s) not run "
                              f"({', '.join(missing)}); run the same command to resume.")
            print(f"\ninterrupted: {len(kept)} finished check(s) are stored in {out} (errors "
                  "and skips are not); run the same command again to resume", file=sys.stderr)
            return code
        wall = time.perf_counter() - t0
        write_readme(results, out, wall_seconds=wall, command=command.strip())
    print()
    print(text_table(results))
    if resumed_names:
        print(f"\nresumed from {out}/{STORE_NAME} (same settings and code, not recomputed; "
              f"--fresh recomputes): {', '.join(resumed_names)}")
    print(f"\nwall time {wall:.0f} s; report written to {out}/README.md")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
