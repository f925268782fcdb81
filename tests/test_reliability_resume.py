"""Long runs survive interrupts: each finished item is written atomically and a re-run
resumes without redoing or losing anything.

* lr bisection sweep (`nets.learning_rates.lr_search.lr_sweep`, JsonlStore-backed): a child process is
  killed (SIGKILL, and SIGINT) mid-sweep; the re-run performs trials only for the
  missing (B, seed) keys and ends with exactly the numbers of an uninterrupted sweep.
* `python -m paper_checks`: killed (SIGKILL) after its first check is recorded; the
  re-run does not call that check's `run` again, runs the second once, and the runner's
  own store holds each check exactly once.
* learner comparison (`paper_checks.experiments.learner_comparison.compare`): interrupted by
  KeyboardInterrupt (what SIGINT raises) after two finished runs; the re-run trains only
  the missing runs and reproduces an uninterrupted comparison bit for bit.

(The JsonlStore itself has its own SIGKILL test in tests/test_jsonl_store.py.)
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from nets.utils.jsonl_store import JsonlStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _complete_lines(path):
    """Parsed records of the complete lines of a JSONL file (a torn tail is skipped)."""
    if not os.path.exists(path):
        return []
    raw = open(path, "rb").read()
    return [json.loads(l) for l in raw.split(b"\n")[:-1] if l.strip()]


def _wait_for(pred, proc, timeout=120.0, poll=0.01):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return pred()
        time.sleep(poll)
    return False


def _assert_clean_store(path):
    """Every line is a complete JSON record and no key appears twice."""
    raw = open(path, "rb").read()
    assert raw.endswith(b"\n")
    keys = [json.loads(l)["key"] for l in raw.split(b"\n")[:-1]]
    assert len(keys) == len(set(keys)), keys
    return keys


# ----------------------------------------------------------------------------- lr sweep

SWEEP = dict(batch_sizes=[4, 16, 48], seeds=(0, 1), steps=64, rel_tol=0.1, tag="rel")


def _sweep_problem():
    from nets.learning_rates.least_squares import spiked_regression
    p = spiked_regression(48, 8, 4.0, noise_std=0.0, rng=2)
    model, loss, data = p.torch_problem(w=np.zeros(p.d))
    lam = float(np.linalg.eigvalsh(p.hessian())[-1])
    return model, loss, data, lam


def _sweep(store, trial_fn=None):
    from nets.learning_rates.lr_search import lr_sweep
    model, loss, data, lam = _sweep_problem()
    kw = dict(SWEEP)
    return lr_sweep(model, loss, data, model.state_dict(), kw.pop("batch_sizes"),
                    alpha0=lambda B: 1.0 / lam, store=store, trial_fn=trial_fn, **kw)


@pytest.fixture(scope="module")
def uninterrupted_sweep():
    return _sweep(store=None)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_lr_sweep_killed_midway_resumes_without_loss_or_duplicates(tmp_path, sig, uninterrupted_sweep):
    path = tmp_path / "sweep.jsonl"
    script = textwrap.dedent(f"""
        import signal, sys, time
        # a shell starting the test run in the background leaves SIGINT ignored in its
        # children; restore Python's handler so SIGINT raises KeyboardInterrupt here
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path[:0] = [{ROOT!r}, {os.path.dirname(os.path.abspath(__file__))!r}]
        from nets.learning_rates.lr_search import run_trial
        from test_reliability_resume import _sweep
        def slow_trial(*a, **k):        # widen the window between two stored keys
            time.sleep(0.01)
            return run_trial(*a, **k)
        _sweep({str(path)!r}, slow_trial)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        assert _wait_for(lambda: len(_complete_lines(path)) >= 2, proc), \
            proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "timeout"
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0                     # it was interrupted, not finished
    n_keys = len(SWEEP["batch_sizes"]) * len(SWEEP["seeds"])
    saved = set(JsonlStore(path).keys())
    assert 2 <= len(saved) < n_keys                 # killed mid-way
    _assert_clean_store(path)

    calls = []

    def counting_trial(*args, **kwargs):
        from nets.learning_rates.lr_search import run_trial
        calls.append((args[5], kwargs["seed"]))
        return run_trial(*args, **kwargs)

    resumed = _sweep(str(path), counting_trial)
    # the keys come in (B, seed) order; they hold the model tag and every setting too
    key = dict(zip([(B, s) for B in SWEEP["batch_sizes"] for s in SWEEP["seeds"]],
                   resumed["keys"]))
    assert all(k.startswith(f"{SWEEP['tag']}|") and f"|sgd|B={B}|seed={s}|K={SWEEP['steps']}|"
               in k for (B, s), k in key.items())
    redone = {key[B, s] for B, s in calls}
    assert redone.isdisjoint(saved)                 # nothing finished was recomputed
    assert redone | saved == set(resumed["keys"])   # nothing was lost
    keys = _assert_clean_store(path)
    assert sorted(keys) == sorted(resumed["keys"])  # each key exactly once
    for k in ("alpha", "lo", "hi"):                 # identical to an uninterrupted sweep
        assert np.array_equal(resumed[k], uninterrupted_sweep[k]), k
    # a third run is a pure read: no trial at all
    calls.clear()
    again = _sweep(str(path), counting_trial)
    assert calls == [] and np.array_equal(again["alpha"], resumed["alpha"])


# ------------------------------------------------------------------------ paper checks

FIRST, SECOND = "ggn_wishart", "damping_inverse_batch"   # registry order: FIRST runs first


def test_paper_checks_killed_after_first_check_resumes(tmp_path, monkeypatch):
    from paper_checks import __main__ as cli
    from paper_checks.checks import all_names, by_name
    from paper_checks.result import CheckResult
    from paper_checks.runner import STORE_NAME

    names = all_names()
    assert names.index(FIRST) < names.index(SECOND)
    out = tmp_path / "report"
    store_path = out / STORE_NAME
    # one process, in registry order: the kill must land between the two checks
    argv = ["--quick", "--only", f"{FIRST},{SECOND}", "--out", str(out), "--no-progress",
            "--jobs", "1"]
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.Popen([sys.executable, "-m", "paper_checks", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def first_recorded():
        return any(r["key"].startswith(FIRST + "|") for r in _complete_lines(store_path))
    try:
        ok = _wait_for(first_recorded, proc, timeout=240)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ok, proc.stderr.read().decode()[-3000:]
    before = _complete_lines(store_path)
    assert [r["key"].split("|")[0] for r in before] == [FIRST]    # killed during SECOND
    first_json = json.loads((out / f"{FIRST}.json").read_text())

    calls = {FIRST: 0, SECOND: 0}
    for name in calls:
        mod = by_name(name)
        orig = mod.run

        def counted(ctx, _orig=orig, _name=name):
            calls[_name] += 1
            return _orig(ctx)
        monkeypatch.setattr(mod, "run", counted)
    code = cli.main(argv)
    assert calls == {FIRST: 0, SECOND: 1}           # resumed, not recomputed; none lost
    assert code in (0, 1)
    after = _complete_lines(store_path)
    keys = _assert_clean_store(store_path)
    assert [k.split("|")[0] for k in keys] == [FIRST, SECOND]
    assert after[0] == before[0]                    # the first record is untouched
    # the report JSON of the resumed check is the stored result, not a new one
    assert CheckResult.load(out / f"{FIRST}.json").to_dict() == CheckResult.from_dict(
        before[0]["value"]).to_dict()
    assert json.loads((out / f"{FIRST}.json").read_text()) == first_json
    assert CheckResult.load(out / f"{SECOND}.json").verdict in ("pass", "fail")


# ------------------------------------------------------------------- learner comparison

LEARNER_CFG = dict(models=("mlp",), seeds=(0,), epochs=1, batch_size=128, sgd_lrs=(0.1,),
                   adam_lrs=(1e-3,))


def _same_runs(a, b):
    for ra, rb in zip(a.runs, b.runs):
        assert (ra.model, ra.method, ra.seed) == (rb.model, rb.method, rb.seed)
        assert ra.loss_history == rb.loss_history
        assert ra.final_train_loss == rb.final_train_loss or (
            np.isnan(ra.final_train_loss) and np.isnan(rb.final_train_loss))
        assert ra.test_accuracy == rb.test_accuracy or np.isnan(ra.test_accuracy)
    assert len(a.runs) == len(b.runs)


def test_learner_comparison_interrupted_resumes(tmp_path, monkeypatch):
    import paper_checks.experiments.learner_comparison as lc

    path = tmp_path / "cmp.jsonl"
    reference = lc.compare(**LEARNER_CFG)

    seen = []

    def interrupt_after_two(msg):
        seen.append(msg)
        if len(seen) == 2:
            raise KeyboardInterrupt          # what SIGINT raises in the main thread

    with pytest.raises(KeyboardInterrupt):
        lc.compare(**LEARNER_CFG, store=path, progress=interrupt_after_two)
    saved = JsonlStore(path).keys()
    assert len(saved) == 2

    ran = []
    orig = lc._one_run

    def counting(model_name, method, seed, lr, *a, **k):
        ran.append((method, seed, lr))
        return orig(model_name, method, seed, lr, *a, **k)
    monkeypatch.setattr(lc, "_one_run", counting)
    resumed = lc.compare(**LEARNER_CFG, store=path)
    keys = _assert_clean_store(path)
    total = len(keys)
    assert total == 5                           # 2 tuning runs, 2 tuned runs, 1 learner run
    assert len(ran) == total - len(saved)       # only the missing runs were trained
    assert keys[:2] == saved                    # the stored ones kept, in order
    _same_runs(resumed, reference)
    ran.clear()
    lc.compare(**LEARNER_CFG, store=path)
    assert ran == []
    # one more seed: only its runs are new (every stored run was recomputed when the
    # settings' fingerprint held the seeds; an outside audit)
    more = dict(LEARNER_CFG, seeds=tuple(LEARNER_CFG["seeds"]) + (max(LEARNER_CFG["seeds"]) + 1,))
    lc.compare(**more, store=path)
    assert sorted(seed for _, seed, _ in ran) == [more["seeds"][-1]] * 3   # SGD, Adam, learner
