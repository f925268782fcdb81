"""The report folder and the terminal table.

`<out>/README.md` holds a table (check, claim, predicted, measured, tolerance, verdict)
followed by each check's figure embedded with a caption; `<out>/<check>.json` holds the
full `CheckResult` (every plotted series) and `<out>/<check>.png` the figure. `redraw`
rebuilds every PNG from the JSON files alone, without recomputing anything.
"""

from __future__ import annotations

import datetime as _dt
import platform
import re
from pathlib import Path
from typing import Sequence

from .result import CheckResult, atomic_write_text

COLUMNS = ("check", "claim", "predicted", "measured", "tolerance", "verdict")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def verdict_label(r: CheckResult) -> str:
    if r.verdict == "skipped":
        return r.reason if r.reason.startswith("skipped") else f"skipped: {r.reason}"
    if r.verdict == "error":
        return f"ERROR: {r.reason}"
    if r.verdict == "fail":
        return f"FAIL: {r.reason}" if r.reason else "FAIL"
    return "pass"


def table_rows(results: Sequence[CheckResult]) -> list[tuple[str, ...]]:
    """One row per result, in COLUMNS order (the README table and the JSON agree by
    construction: both come from the same CheckResult fields)."""
    return [(r.name, r.claim, r.predicted, r.measured, r.tolerance, verdict_label(r))
            for r in results]


def markdown_table(results: Sequence[CheckResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in table_rows(results):
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def summary_counts(results: Sequence[CheckResult]) -> dict[str, int]:
    counts = {"pass": 0, "fail": 0, "skipped": 0, "error": 0}
    for r in results:
        counts[r.verdict] += 1
    return counts


_RUN_LINE = re.compile(r"^Command: `(?P<command>.*)` — (?P<rest>.*)\.$")


def run_line(out_dir: str | Path) -> str | None:
    """The 'Command: … wall time … s' line of the report already in `out_dir` (None when
    there is none): `--redraw` keeps it, since the figures it redraws are that run's."""
    path = Path(out_dir) / "README.md"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    return next((line for line in lines[:6] if _RUN_LINE.match(line)), None)


def interrupted_note(out_dir: str | Path) -> str | None:
    """The 'Interrupted: …' note of the report in `out_dir` (None when there is none):
    `--redraw` keeps it, so a redrawn partial report still says which checks never ran."""
    path = Path(out_dir) / "README.md"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    hit = next((line for line in lines[:10] if line.startswith("**Interrupted:")), None)
    return hit.strip("*") if hit else None


def write_readme(results: Sequence[CheckResult], out_dir: str | Path, *,
                 title: str = "Paper checks", wall_seconds: float | None = None,
                 command: str = "python -m paper_checks", redrawn: bool = False,
                 note: str | None = None) -> Path:
    """The report `out_dir/README.md`. With `redrawn=True` (`--redraw`) the run line of
    the report already there (the command that computed the results, its date and wall
    time) is kept and the redraw noted under it. `note`: a line under the run line (an
    interrupted run says so, and which checks it did not reach)."""
    out_dir = Path(out_dir)
    counts = summary_counts(results)
    parts = [f"# {title}", ""]
    now = f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}"
    kept = run_line(out_dir) if redrawn else None
    if redrawn and note is None:
        note = interrupted_note(out_dir)   # an interrupted run stays one (it was dropped)
    if kept is not None:
        parts.append(kept)
    elif redrawn:
        parts.append("Command: unknown (the folder had no report to take it from).")
    else:
        parts.append(f"Command: `{command}` — {now}, "
                     f"Python {platform.python_version()} on {platform.machine()}"
                     + (f", wall time {wall_seconds:.0f} s" if wall_seconds is not None else "") + ".")
    if redrawn:
        parts.append(f"Figures and this page redrawn from the JSON files {now} "
                     f"(`python -m paper_checks --redraw`), nothing recomputed.")
    if note:
        parts.append("")
        parts.append(f"**{note}**")
    parts.append("")
    parts.append(", ".join(f"**{v}** {k}" for k, v in counts.items()) + ".")
    parts.append("")
    parts.append(markdown_table(results))
    parts.append("")
    parts.append("Each check's JSON file holds every number behind its verdict (`details`) and "
                 "every plotted series (`series`); `python -m paper_checks --redraw DIR` "
                 "rebuilds the figures from them without recomputing.")
    parts.append("")
    for r in results:
        parts.append(f"## {r.name}")
        parts.append("")
        parts.append(f"*Claim.* {r.claim}")
        parts.append("")
        parts.append(f"*Verdict:* {verdict_label(r)} (ran {r.seconds:.1f} s). "
                     f"*Predicted:* {r.predicted or '—'}. *Measured:* {r.measured or '—'}. "
                     f"*Tolerance:* {r.tolerance or '—'}.")
        parts.append("")
        png = out_dir / f"{r.name}.png"
        error = r.details.get("figure_error") if isinstance(r.details, dict) else None
        if error:
            parts.append(f"*No figure: {_cell(str(error))}.* Data: [`{r.name}.json`]({r.name}.json).")
            parts.append("")
        elif png.exists():
            caption = r.details.get("caption", r.claim) if isinstance(r.details, dict) else r.claim
            parts.append(f"![{_cell(r.name)}]({r.name}.png)")
            parts.append("")
            parts.append(f"*Figure: {caption}* Data: [`{r.name}.json`]({r.name}.json).")
            parts.append("")
    path = out_dir / "README.md"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path


def text_table(results: Sequence[CheckResult], width: int = 60) -> str:
    """Plain-text pass/fail table for the terminal (long cells are shortened)."""
    def short(s: str, n: int) -> str:
        s = str(s).replace("\n", " ").strip()          # plain text: no markdown escapes
        return s if len(s) <= n else s[: n - 1] + "…"

    rows = [("check", "verdict", "predicted", "measured")]
    for r in results:
        v = r.verdict.upper() if r.verdict != "skipped" else "SKIPPED"
        rows.append((r.name, v, short(r.predicted, width), short(r.measured, width)))
    w = [max(len(row[i]) for row in rows) for i in range(4)]
    out = []
    for i, row in enumerate(rows):
        out.append("  ".join(c.ljust(w[j]) for j, c in enumerate(row)).rstrip())
        if i == 0:
            out.append("  ".join("-" * x for x in w))
    notes = [f"  {r.name}: {verdict_label(r)}" for r in results if r.verdict != "pass"]
    if notes:
        out.append("")
        out.append("Notes:")
        out.extend(notes)
    c = summary_counts(results)
    out.append("")
    out.append(f"{c['pass']} passed, {c['fail']} failed, {c['skipped']} skipped, {c['error']} errors")
    return "\n".join(out)


def load_results(out_dir: str | Path) -> list[CheckResult]:
    """Every check result (`<check>.json`) in `out_dir`; other or damaged JSON files are
    skipped with a note on stderr."""
    import sys

    results = []
    for js in sorted(Path(out_dir).glob("*.json")):
        if not js.is_file():                # a folder named *.json crashed --redraw
            continue
        try:
            results.append(CheckResult.load(js))
        except (ValueError, KeyError, TypeError, OSError) as exc:
            print(f"note: {js.name} is not a check result, skipped ({type(exc).__name__})",
                  file=sys.stderr)
    return results


def reported_names(out_dir: str | Path) -> list[str] | None:
    """The checks the report in `out_dir` lists (its '## name' sections), None when there
    is no report: a run with --only writes a report of its own checks and leaves the other
    checks' files of an earlier run in the folder, which --redraw must not mix in (it did:
    a seed-0 fail shown under the seed-1 run's command line; an outside sweep)."""
    path = Path(out_dir) / "README.md"
    if not path.exists() or not readme_is_ours(out_dir):
        return None
    text = path.read_text(encoding="utf-8")
    return [line[3:].strip() for line in text.splitlines() if line.startswith("## ")]


def readme_is_ours(out_dir: str | Path) -> bool:
    """Whether `out_dir/README.md` is absent or a paper_checks report (its title or run
    line), i.e. safe to rewrite."""
    path = Path(out_dir) / "README.md"
    if not path.exists():
        return True
    try:
        first = path.read_text(encoding="utf-8").splitlines()[:1]
    except (OSError, UnicodeDecodeError):
        return False
    return first == ["# Paper checks"] or run_line(out_dir) is not None


def is_report(out_dir: str | Path) -> bool:
    """Whether `out_dir` holds a paper_checks report: a README of ours with at least one
    check result beside it."""
    return readme_is_ours(out_dir) and bool(load_results(out_dir))


def report_results(out_dir: str | Path) -> list[CheckResult]:
    """The results of the report in `out_dir`, in the order of the checks' registry: those
    its README lists (`reported_names`), or every check result when it lists none."""
    from .checks import all_names

    results = load_results(out_dir)
    names = reported_names(out_dir)
    if names is not None:
        # a report that lists no check (a run interrupted before any finished) redraws
        # none: every JSON in the folder, from an earlier run, was shown under this run's
        # command line (an outside sweep)
        results = [r for r in results if r.name in names]
    order = {n: i for i, n in enumerate(all_names("paper"))}
    return sorted(results, key=lambda r: (order.get(r.name, len(order)), r.name))


def redraw(out_dir: str | Path) -> tuple[list[Path], dict[str, str]]:
    """Rebuild every `<check>.png` in `out_dir` from its JSON (no recomputation).

    Returns (figures written, {check: error} for the figures that failed). A figure that
    fails is handled as in a run: its old PNG is removed (it was drawn by other code, so
    it no longer stands for the JSON) and the error is kept in the JSON's
    `details["figure_error"]`, which the README shows; a figure that draws again drops an
    earlier error."""
    from .checks import by_name
    from .runner import draw

    out_dir = Path(out_dir)
    written, failed = [], {}
    for result in report_results(out_dir):
        try:
            check = by_name(result.name)
        except KeyError:
            continue
        png = out_dir / f"{result.name}.png"
        details = result.details if isinstance(result.details, dict) else None
        clean = result if details is None or "figure_error" not in details else result.with_(
            details={k: v for k, v in details.items() if k != "figure_error"})
        err = draw(check, clean, png)
        if err is None and result.series:
            written.append(png)
        if err is not None:
            failed[result.name] = err
            if png.exists():
                png.unlink()
        if details is not None and details.get("figure_error") != err:
            kept = clean if err is None else clean.with_(
                details={**clean.details, "figure_error": err})
            kept.save(out_dir / f"{result.name}.json")
    return written, failed
