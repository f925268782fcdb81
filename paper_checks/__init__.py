"""paper_checks: every claim of the paper as a runnable check (the main job).

    python -m paper_checks            # all checks, embedded data, < 10 min on 2 CPU cores
    python -m paper_checks --list     # what is checked
    python -m paper_checks --only batch_hessian_top,ggn_wishart --quick

Each check (one module per claim in `paper_checks.checks`) computes its numbers, judges
them against a stated tolerance and returns a `CheckResult` holding every plotted series;
`runner.run_checks` runs them resumably (each finished check is written at once) and
`report` writes `report/README.md`, one JSON and one PNG per check.
"""

from .context import Context, MissingDependency
from .result import CheckResult
from .runner import run_checks

__all__ = ["CheckResult", "Context", "MissingDependency", "run_checks"]
