"""`benchmarks/bench_scale.py` runs in its documented form, `python -m benchmarks.bench_scale`
from the repository root (every row's child process is started that way): it imports the
shared helpers of the benchmarks folder without that folder on the path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_module_form_starts_and_validates_rows():
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", "--rows", "no_such_row"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert "ModuleNotFoundError" not in res.stderr
    assert res.returncode != 0 and "unknown rows ['no_such_row']" in res.stderr
    assert "transfer_momentum" in res.stderr          # the rows added in session 39 are offered
