"""paper_checks infrastructure: results as JSON, the report, resumable runner, the CLI."""

import json
import math
import re
import sys
import types

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from paper_checks.__main__ import main
from paper_checks.context import Context, DependencyError, MissingDependency, require
from paper_checks.report import COLUMNS, markdown_table, redraw, table_rows, write_readme
from paper_checks.result import CheckResult, judged
from paper_checks.runner import STORE_NAME, run_checks


def _result(name="demo", verdict="pass", **kw):
    base = dict(name=name, claim="a | claim", predicted="λ'=1.5", measured="1.49±0.01",
                tolerance="4·SE", verdict=verdict, details={"z": [0.1, float("nan")]},
                series={"x": np.arange(3.0), "y": np.array([1.0, np.inf, -np.inf])})
    base.update(kw)
    return CheckResult(**base)


# ----------------------------------------------------------------------------- result
def test_result_json_round_trip_keeps_arrays_and_nonfinite(tmp_path):
    r = _result()
    path = r.save(tmp_path / "demo.json")
    text = path.read_text()
    json.loads(text)                               # strict JSON (no bare NaN)
    assert "NaN" not in text
    back = CheckResult.load(path)
    assert back.name == r.name and back.verdict == "pass"
    np.testing.assert_array_equal(back.array("x"), [0.0, 1.0, 2.0])
    y = back.array("y")
    assert y[0] == 1.0 and y[1] == math.inf and y[2] == -math.inf
    assert math.isnan(back.details["z"][1])
    assert [p.name for p in tmp_path.iterdir()] == ["demo.json"]   # no temp file left


def test_result_rejects_unknown_verdict_and_fields():
    with pytest.raises(ValueError, match="verdict"):
        _result(verdict="ok")
    with pytest.raises(ValueError, match="unknown"):
        CheckResult.from_dict({**_result().to_dict(), "extra": 1})


def test_judged_fails_iff_failures_listed():
    kw = dict(name="n", claim="c", predicted="p", measured="m", tolerance="t", details={},
              series={})
    assert judged(failures=[], **kw).verdict == "pass"
    r = judged(failures=["B=8: measured 2 vs predicted 3"], **kw)
    assert r.verdict == "fail" and "B=8" in r.reason and not r.ok


# ----------------------------------------------------------------------------- report
def _parse_table(md: str):
    lines = [l for l in md.splitlines() if l.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    rows = []
    for line in lines[1:]:
        cells = re.split(r"(?<!\\) \| ", line.strip()[2:-2])
        rows.append([c.replace("\\|", "|").strip() for c in cells])
    return header, rows


def test_readme_table_rows_match_the_json_files(tmp_path):
    results = [_result("alpha"), _result("beta", verdict="fail", reason="B=8: off by 30%"),
               _result("gamma", verdict="skipped", reason="skipped: rmt.x is a placeholder",
                       series={})]
    for r in results:
        r.save(tmp_path / f"{r.name}.json")
    readme = write_readme(results, tmp_path).read_text()
    header, rows = _parse_table(readme)
    assert tuple(header) == COLUMNS
    assert len(rows) == 3
    for row in rows:
        r = CheckResult.load(tmp_path / f"{row[0]}.json")
        assert row[1:5] == [r.claim, r.predicted, r.measured, r.tolerance]
        assert row[5].lower().startswith(r.verdict if r.verdict != "fail" else "fail")
    assert "B=8: off by 30%" in rows[1][5]
    assert rows[2][5] == "skipped: rmt.x is a placeholder"
    assert table_rows(results)[0][1] == "a | claim"
    assert "a \\| claim" in markdown_table(results)


# ----------------------------------------------------------------------------- runner
class _CountingCheck:
    """A fake check that counts how often it really runs."""

    def __init__(self, name="counting", verdict="pass", raises=None, requires=()):
        self.NAME, self.CLAIM, self.REQUIRES = name, f"{name} claim", requires
        self.calls, self.verdict, self.raises = 0, verdict, raises

    def run(self, ctx):
        self.calls += 1
        if self.raises is not None:
            raise self.raises
        return _result(self.NAME, verdict=self.verdict,
                       reason="" if self.verdict == "pass" else "numbers off")

    def plot(self, result):
        from matplotlib.figure import Figure
        fig = Figure()
        fig.subplots().plot(result.array("x"), result.array("x") ** 2)
        return fig


def test_runner_resumes_without_recomputing_and_fresh_recomputes(tmp_path):
    ok, bad = _CountingCheck("ok"), _CountingCheck("bad", verdict="fail")
    ctx = Context(progress=False)
    first = run_checks([ok, bad], ctx, tmp_path, progress=False)
    assert [r.verdict for r in first] == ["pass", "fail"]
    assert (tmp_path / "ok.json").exists() and (tmp_path / "ok.png").stat().st_size > 0
    assert (tmp_path / STORE_NAME).exists()
    second = run_checks([ok, bad], ctx, tmp_path, progress=False)
    assert ok.calls == 1 and bad.calls == 1                 # resumed from the store
    assert [r.to_dict() for r in second] == [r.to_dict() for r in first]
    run_checks([ok], ctx, tmp_path, fresh=True, progress=False)
    assert ok.calls == 2
    # another configuration (seed) is not mixed up with the stored one
    run_checks([ok], Context(seed=5, progress=False), tmp_path, progress=False)
    assert ok.calls == 3


def test_resume_key_holds_library_versions(tmp_path, monkeypatch):
    """A result computed under another torch/numpy is not served (bisection thresholds
    can move by a step with the round-off)."""
    from paper_checks import context

    ok = _CountingCheck("ok")
    run_checks([ok], Context(progress=False), tmp_path, progress=False)
    key = Context(progress=False).config_key()
    assert "torch-" in key and "numpy-" in key
    monkeypatch.setattr(context, "library_versions", lambda: "torch-0.0;numpy-0.0")
    assert Context(progress=False).config_key() != key
    run_checks([ok], Context(progress=False), tmp_path, progress=False)
    assert ok.calls == 2


class _SeedSeen(Exception):
    pass


@pytest.mark.parametrize("name", ["adam_real_training", "lr_transfer", "stability_onset",
                                  "sgd_scaling_mlp", "network_batch_spectra"])
def test_network_checks_train_their_model_with_the_run_seed(name, monkeypatch):
    """`--seed` reaches the trained network of every check that trains one."""
    import importlib

    import nets.training.loops as loops

    def spy(seed=0, *args, **kwargs):
        raise _SeedSeen(seed)

    monkeypatch.setattr(loops, "trained_digits_mlp", spy)
    check = importlib.import_module(f"paper_checks.checks.{name}")
    with pytest.raises(_SeedSeen) as seen:
        check.run(Context(seed=7, quick=True, progress=False))
    assert seen.value.args == (7,)


def test_interrupted_run_resumes_with_finished_checks_kept(tmp_path):
    done, later = _CountingCheck("done"), _CountingCheck("later")
    killer = _CountingCheck("killer", raises=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):                  # Ctrl-C mid-run
        run_checks([done, killer, later], Context(progress=False), tmp_path, progress=False)
    assert done.calls == 1 and later.calls == 0
    assert CheckResult.load(tmp_path / "done.json").verdict == "pass"
    res = run_checks([done, later], Context(progress=False), tmp_path, progress=False)
    assert done.calls == 1 and later.calls == 1 and [r.verdict for r in res] == ["pass"] * 2


def test_runner_reports_errors_and_skips_and_keeps_going(tmp_path):
    """Only a check that declares itself not applicable (MissingDependency from run) is
    skipped; a failed import, a missing REQUIRES and a NotImplementedError are errors
    (a skip counts as success, a broken dependency must not)."""
    boom = _CountingCheck("boom", raises=RuntimeError("exploded at B=8"))
    todo = _CountingCheck("todo", raises=NotImplementedError("rmt.lr.sgd_max_lr"))
    missing = _CountingCheck("missing", requires=("no_such_module_xyz:f",))
    broken = _CountingCheck("broken", raises=ImportError("cannot import name 'x' from 'nets'"))
    na = _CountingCheck("na", raises=MissingDependency("--scale paper needs --data"))
    fine = _CountingCheck("fine")
    res = run_checks([boom, todo, missing, broken, na, fine], Context(progress=False), tmp_path,
                     progress=False)
    verdicts = {r.name: r for r in res}
    assert verdicts["boom"].verdict == "error" and "exploded at B=8" in verdicts["boom"].reason
    assert verdicts["todo"].verdict == "error" and "sgd_max_lr" in verdicts["todo"].reason
    assert verdicts["missing"].verdict == "error" and missing.calls == 0
    assert "no_such_module_xyz" in verdicts["missing"].reason
    assert "ModuleNotFoundError" in verdicts["missing"].details["traceback"]   # the import's own
    assert verdicts["broken"].verdict == "error" and "ImportError" in verdicts["broken"].details["traceback"]
    assert verdicts["na"].verdict == "skipped" and verdicts["na"].ok
    assert not any(verdicts[n].ok for n in ("boom", "todo", "missing", "broken"))
    assert verdicts["fine"].verdict == "pass"
    assert CheckResult.load(tmp_path / "boom.json").verdict == "error"
    # errors and skips are retried on the next run; the pass is resumed
    run_checks([boom, fine], Context(progress=False), tmp_path, progress=False)
    assert boom.calls == 2 and fine.calls == 1


def test_require_detects_placeholder_modules(monkeypatch):
    mod = types.ModuleType("fake_placeholder_mod", "Placeholder: being written")
    mod.f = lambda: 1
    monkeypatch.setitem(sys.modules, "fake_placeholder_mod", mod)
    with pytest.raises(DependencyError, match="placeholder"):
        require("fake_placeholder_mod:f")
    real = types.ModuleType("fake_real_mod", "Real module.")
    real.f = lambda: 1
    monkeypatch.setitem(sys.modules, "fake_real_mod", real)
    require("fake_real_mod:f")
    with pytest.raises(DependencyError, match="does not exist"):
        require("fake_real_mod:g")
    with pytest.raises(ImportError):             # a DependencyError is an ImportError
        require("no_such_module_xyz")


def test_redraw_rebuilds_figures_from_json_only(tmp_path, monkeypatch):
    from paper_checks.checks import ggn_wishart

    r = ggn_wishart.run(Context(quick=True, progress=False))
    r.save(tmp_path / f"{r.name}.json")

    def no_recompute(ctx):  # redraw must not call run()
        raise AssertionError("recomputed")

    monkeypatch.setattr(ggn_wishart, "run", no_recompute)
    written, failed = redraw(tmp_path)
    assert written == [tmp_path / "ggn_wishart.png"] and failed == {}
    assert written[0].read_bytes()[:4] == b"\x89PNG"


def test_redraw_reports_a_figure_that_fails_and_drops_its_old_png(tmp_path, monkeypatch, capsys):
    """--redraw swallowed plot errors: it exited 0, kept the PNG an earlier plot() had drawn
    (so the folder showed a figure the JSON's code no longer draws) and the README said
    nothing; a failure is now handled as in a run, and a figure that draws again drops it."""
    from paper_checks.checks import ggn_wishart

    r = ggn_wishart.run(Context(quick=True, progress=False))
    r.save(tmp_path / f"{r.name}.json")
    write_readme([r], tmp_path)
    assert main(["--redraw", str(tmp_path)]) == 0
    png = tmp_path / "ggn_wishart.png"
    assert png.exists()
    before = json.loads((tmp_path / "ggn_wishart.json").read_text())

    def broken(result):
        raise ValueError("no such series")

    monkeypatch.setattr(ggn_wishart, "plot", broken)
    capsys.readouterr()
    assert main(["--redraw", str(tmp_path)]) == 1
    assert "ggn_wishart: figure failed: ValueError: no such series" in capsys.readouterr().err
    assert not png.exists()
    stored = CheckResult.load(tmp_path / "ggn_wishart.json")
    assert stored.details["figure_error"] == "figure failed: ValueError: no such series"
    page = (tmp_path / "README.md").read_text()
    assert "No figure: figure failed: ValueError: no such series" in page
    assert "ggn_wishart.png" not in page
    after = json.loads((tmp_path / "ggn_wishart.json").read_text())
    del after["details"]["figure_error"]
    assert after == before                                     # the numbers are kept

    monkeypatch.undo()
    assert main(["--redraw", str(tmp_path)]) == 0
    assert png.exists()
    assert "figure_error" not in CheckResult.load(tmp_path / "ggn_wishart.json").details
    assert "No figure" not in (tmp_path / "README.md").read_text()


# ----------------------------------------------------------------------------- CLI
def test_cli_scale_paper_needs_data(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--scale", "paper"])
    assert e.value.code == 2
    assert "--data" in capsys.readouterr().err


def test_cli_scale_paper_data_must_exist(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--scale", "paper", "--data", str(tmp_path / "nope")])
    assert "does not exist" in capsys.readouterr().err


def test_cli_scale_paper_needs_a_gpu(tmp_path, capsys, monkeypatch):
    import paper_checks.__main__ as cli

    monkeypatch.setattr(cli, "_cuda_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["--scale", "paper", "--data", str(tmp_path)])
    assert "GPU" in capsys.readouterr().err


def test_cli_rejects_unknown_check_and_data_without_scale(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--only", "no_such_check"])
    assert "no_such_check" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path)])
    assert "--scale paper" in capsys.readouterr().err


def test_cli_list_names_every_check(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("batch_hessian_top", "ggn_wishart", "symbolic_derivations"):
        assert name in out


def test_cli_runs_selected_checks_and_exit_code_follows_verdicts(tmp_path, monkeypatch, capsys):
    out = tmp_path / "rep"
    code = main(["--quick", "--only", "ggn_wishart,batch_hessian_top", "--out", str(out),
                 "--no-progress", "--jobs", "1"])     # --jobs 2: tests/test_paper_checks_cli.py
    assert code == 0
    text = capsys.readouterr().out
    assert "ggn_wishart" in text and "2 passed" in text
    header, rows = _parse_table((out / "README.md").read_text())
    assert [r[0] for r in rows] == ["batch_hessian_top", "ggn_wishart"]
    assert "![ggn_wishart](ggn_wishart.png)" in (out / "README.md").read_text()

    import rmt

    real = rmt.spiked_wishart_outlier
    monkeypatch.setattr(rmt, "spiked_wishart_outlier", lambda *a, **k: 1.5 * real(*a, **k))
    code = main(["--quick", "--only", "ggn_wishart", "--out", str(tmp_path / "rep2"),
                 "--no-progress"])
    assert code == 1
    assert "FAIL" in capsys.readouterr().out
