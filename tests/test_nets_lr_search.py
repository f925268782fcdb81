"""The empirical lr harness (nets.learning_rates.lr_search): bisection finds a known threshold, the
growth-rate fit, and resumability of the JSONL-backed sweep."""

import math

import numpy as np
import pytest

from nets.learning_rates.least_squares import spiked_regression
from nets.learning_rates.lr_search import bisect_max_lr, fit_growth_rate, lr_sweep, run_trial
from nets.utils.jsonl_store import JsonlStore


def _quadratic(seed=0):
    p = spiked_regression(48, 8, 4.0, noise_std=0.0, rng=seed)
    model, loss, data = p.torch_problem(w=np.zeros(p.d))
    lam = np.linalg.eigvalsh(p.hessian())[-1]
    return p, model, loss, data, lam


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_full_batch_threshold_found_within_tolerance(momentum):
    """B = N is gradient descent: the exact edge is 2(1+ρ)/λ_max. The growth criterion
    with threshold τ shifts the detected edge by at most a relative τ/2 (|1−αλ| = e^τ)."""
    p, model, loss, data, lam = _quadratic()
    steps, rel_tol = 1500, 0.01
    exact = 2 * (1 + momentum) / lam
    res = bisect_max_lr(lambda a: run_trial(model, loss, data, model.state_dict(), a, p.N, steps,
                                            momentum=momentum), 0.3 * exact, rel_tol=rel_tol)
    assert res.hi / res.lo <= 1 + rel_tol
    tau = 3.0 / steps
    assert res.lo <= exact * (1 + tau) and res.hi >= exact
    assert abs(res.alpha / exact - 1) <= rel_tol
    # the history holds both outcomes around the edge
    assert any(d for _, d, _ in res.history) and any(not d for _, d, _ in res.history)


def test_bisection_from_far_above_keeps_the_last_unstable_value_as_its_top():
    """Halving from an unstable start, the bracket's top is the last unstable α, not the
    start: with an edge at 1 from α₀ = 100 no α above 1.5625 is tried after it failed,
    and with a stable window at (8, 9.5) (outcomes not monotone) the answer lies between
    the stable α found and the unstable one just above it, not inside the window."""
    edge = bisect_max_lr(lambda a: a > 1.0, 100.0, rel_tol=0.01)
    tried = [a for a, _, _ in edge.history]
    first_fail_below_2 = tried.index(1.5625)
    assert max(tried[first_fail_below_2 + 1:]) <= 1.5625
    assert edge.lo < 1.0 < edge.hi <= 1.01 * edge.lo
    window = bisect_max_lr(lambda a: not (a <= 1.0 or 8 < a < 9.5), 100.0, rel_tol=0.01)
    assert window.lo < 1.0 < window.hi


def test_trial_growth_rate_equals_gd_multiplier():
    """Above 2/λ GD grows like |1 − αλ|^t along u: the fitted rate is log|1 − αλ|."""
    p, model, loss, data, lam = _quadratic(1)
    a = 1.03 * 2 / lam
    r = run_trial(model, loss, data, model.state_dict(), a, p.N, 600)
    assert r.diverged
    assert r.growth_rate == pytest.approx(math.log(abs(1 - a * lam)), rel=0.02)
    r2 = run_trial(model, loss, data, model.state_dict(), 0.97 * 2 / lam, p.N, 600)
    assert not r2.diverged and r2.growth_rate < 1e-3


def test_fit_growth_rate():
    t = np.arange(200)
    assert fit_growth_rate(np.exp(0.05 * t) * 3.0) == pytest.approx(0.05)
    assert fit_growth_rate(np.r_[np.ones(100), np.full(100, np.inf)]) == math.inf
    assert fit_growth_rate(np.zeros(50)) == 0.0


def test_sweep_resumes_without_redoing(tmp_path):
    p, model, loss, data, lam = _quadratic(2)
    calls = []

    def counting_trial(*args, **kwargs):
        calls.append((args[4], args[5], kwargs["seed"]))
        return run_trial(*args, **kwargs)

    path = tmp_path / "sweep.jsonl"
    kw = dict(steps=200, rel_tol=0.1, alpha0=lambda B: 1.0 / lam, tag="t")
    first = lr_sweep(model, loss, data, model.state_dict(), [p.N], seeds=(0, 1), store=path,
                     trial_fn=counting_trial, **kw)
    n_first = len(calls)
    assert n_first > 0 and len(JsonlStore(path)) == 2
    # a re-run of the finished sweep performs no trial and returns the same numbers
    again = lr_sweep(model, loss, data, model.state_dict(), [p.N], seeds=(0, 1), store=path,
                     trial_fn=counting_trial, **kw)
    assert len(calls) == n_first
    np.testing.assert_array_equal(first["alpha"], again["alpha"])
    # extending the sweep runs only the new key
    calls.clear()
    more = lr_sweep(model, loss, data, model.state_dict(), [p.N, p.N // 2], seeds=(0, 1),
                    store=path, trial_fn=counting_trial, **kw)
    assert {(B, s) for _, B, s in calls} == {(p.N // 2, 0), (p.N // 2, 1)}
    assert len(JsonlStore(path)) == 4
    np.testing.assert_array_equal(more["alpha"][0], first["alpha"][0])


def test_sweep_store_keys_every_setting_that_changes_the_result(tmp_path):
    """Review D1: the store key was "{tag}|{optimizer}|B|seed|K" only, so a re-run on the
    same store with momentum 0.9 (or ×3 inputs, another checkpoint, criterion, rel_tol or
    alpha0) returned the first run's thresholds (0.510/0.706 instead of 0.113/0.926)
    without running a trial. Every such change must now measure afresh and agree with a
    run without a store; the unchanged call is still a pure read."""
    import copy

    p, model, loss, data, lam = _quadratic(2)
    X, y = data
    sd = copy.deepcopy(model.state_dict())
    calls = []

    def counting_trial(*args, **kwargs):
        calls.append(1)
        return run_trial(*args, **kwargs)

    path = tmp_path / "sweep.jsonl"
    kw = dict(steps=64, seeds=(0,), alpha0=1.0 / lam, rel_tol=0.1)
    Bs = [4, 24]
    base = lr_sweep(model, loss, data, sd, Bs, store=path, **kw)
    sd2 = {k: v + 0.3 for k, v in sd.items()}
    variants = [((data, sd), dict(momentum=0.9)),
                (((3 * X, y), sd), {}),
                ((data, sd2), {}),
                ((data, sd), dict(criterion="loss")),
                ((data, sd), dict(rel_tol=0.5)),
                ((data, sd), dict(alpha0=0.3 / lam))]
    for (d, state), extra in variants:
        fresh = lr_sweep(model, loss, d, state, Bs, **{**kw, **extra})
        calls.clear()
        stored = lr_sweep(model, loss, d, state, Bs, store=path, trial_fn=counting_trial,
                          **{**kw, **extra})
        assert calls, extra                               # measured, not read back
        np.testing.assert_array_equal(stored["alpha"], fresh["alpha"])
        assert not set(stored["keys"]) & set(base["keys"])
    assert not np.allclose(lr_sweep(model, loss, data, sd, Bs, store=path, momentum=0.9,
                                     **kw)["alpha"], base["alpha"])
    # defaults given explicitly are the same settings: read back, no trial
    calls.clear()
    again = lr_sweep(model, loss, data, sd, Bs, store=path, trial_fn=counting_trial,
                     momentum=0.0, criterion="growth", **kw)
    assert calls == [] and again["keys"] == base["keys"]
    np.testing.assert_array_equal(again["alpha"], base["alpha"])


def test_adam_loss_criterion_and_bad_inputs():
    p = spiked_regression(64, 8, 4.0, noise_std=0.5, rng=3)
    model, loss, data = p.torch_problem(w=np.zeros(p.d))
    stable = run_trial(model, loss, data, model.state_dict(), 1e-2, 8, 200, optimizer="adam")
    assert stable.criterion == "loss" and not stable.diverged
    assert stable.final_loss < stable.initial_loss
    wild = run_trial(model, loss, data, model.state_dict(), 50.0, 8, 200, optimizer="adam")
    assert wild.diverged and wild.final_loss > wild.initial_loss
    with pytest.raises(ValueError, match="batch_size"):
        run_trial(model, loss, data, model.state_dict(), 0.1, 65, 100)
    with pytest.raises(ValueError, match="optimizer"):
        run_trial(model, loss, data, model.state_dict(), 0.1, 8, 100, optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr"):
        run_trial(model, loss, data, model.state_dict(), -0.1, 8, 100)


def test_lr_sweep_refuses_bad_data_state_and_seeds():
    import pytest as _pytest
    import torch as _torch

    from nets.learning_rates.lr_search import lr_sweep, run_trial

    model = _torch.nn.Linear(3, 1)
    X, y = _torch.randn(10, 3), _torch.randn(10, 1)
    sd = model.state_dict()
    mse = _torch.nn.functional.mse_loss
    Xbad = X.clone()
    Xbad[2, 1] = float("nan")
    with _pytest.raises(ValueError, match="NaN"):
        run_trial(model, mse, (Xbad, y), sd, 0.1, 4, 10)
    sdbad = {k: v.clone() for k, v in sd.items()}
    sdbad["weight"][0, 0] = float("inf")
    with _pytest.raises(ValueError, match="weight"):
        lr_sweep(model, mse, (X, y), sdbad, [2], steps=10)
    with _pytest.raises(ValueError, match="empty"):
        run_trial(model, mse, (X[:0], y[:0]), sd, 0.1, 1, 10)
    with _pytest.raises(TypeError, match="seeds"):
        lr_sweep(model, mse, (X, y), sd, [2], seeds=(0.7,), steps=10)
    with _pytest.raises(TypeError, match="seeds"):
        lr_sweep(model, mse, (X, y), sd, [2], seeds=("a",), steps=10)


def test_fit_scaling_exponent_refuses_non_positive_lr():
    import pytest as _pytest

    from nets.learning_rates.lr_prediction import fit_scaling_exponent

    with _pytest.raises(ValueError, match="lrs"):
        fit_scaling_exponent([1, 2, 4], [0.1, -0.2, 0.4])
    fit = fit_scaling_exponent([1, 2, 4, 8], [0.1, float("nan"), 0.4, 0.8])
    assert abs(fit.exponent - 1) < 1e-12


def test_onset_counts_a_run_that_blew_up_as_unstable():
    """criterion='onset' fitted only the slope of log|⟨w_t − w_0, u⟩| over the second half
    of the run: runs whose loss jumped to 10–95× its start at step 1 came out 'stable'
    (an outside sweep), so onset thresholds sat far above divergence ones. A trial past
    the divergence rule is onset-unstable, with its loss recorded."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from nets.learning_rates.lr_search import _top_direction, training_threshold, training_trial

    g = torch.Generator().manual_seed(0)
    X = torch.randn(160, 8, generator=g, dtype=torch.float64)
    W = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = (X @ W + 0.8 * torch.randn(160, 3, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(net(X), y).backward()
        opt.step()
    net.eval()
    u, lam = _top_direction(net, F.cross_entropy, (X, y), 0)
    for a in (30.0, 300.0):
        t = training_trial(net, F.cross_entropy, X, y, a, 4, steps=100, seed=0,
                           criterion="onset", direction=u)
        assert t.unstable and t.max_loss > 10 * t.initial_loss, t.reason
    kw = dict(steps=100, seeds=[0, 1, 2], progress=False, unbracketed="nan")
    div = training_threshold(net, F.cross_entropy, (X, y), [4, 16], criterion="divergence", **kw)
    onset = training_threshold(net, F.cross_entropy, (X, y), [4, 16], criterion="onset", **kw)
    assert np.all(onset.per_seed <= div.per_seed * (1 + 0.05))


def test_sweep_key_settings_are_written_exactly_and_stably():
    """The trial settings in lr_sweep's key: 0 and 0.0 one setting (an int where the default
    is a float re-measured before), arrays element by element (their repr rounds: 0.999
    and 0.99900001 were one key), tensors like the tuple they hold, a callable by name (a
    memory address would never match in another process)."""
    import torch

    from nets.learning_rates.lr_search import _model_tag, _trial_settings

    assert _trial_settings("sgd", {"momentum": 0}) == _trial_settings("sgd", {"momentum": 0.0})
    assert (_trial_settings("adam", {"betas": np.array([0.9, 0.99900001])})
            != _trial_settings("adam", {"betas": np.array([0.9, 0.999])}))
    assert (_trial_settings("adam", {"betas": torch.tensor([0.9, 0.999], dtype=torch.float64)})
            == _trial_settings("adam", {"betas": (0.9, 0.999)}))
    assert "0x" not in _trial_settings("sgd", {"extra": np.linalg.norm})
    # the model tag takes bfloat16 weights (it went through .numpy(), which refuses them)
    net = torch.nn.Linear(3, 2).to(torch.bfloat16)
    X, y = torch.randn(4, 3, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.long)
    assert len(_model_tag(net, torch.nn.functional.cross_entropy, X, y)) == 12


def test_a_growth_window_of_fewer_than_three_steps_is_refused():
    """fit_growth_rate reads fewer than 3 points as "no growth", so a window of 2 steps of
    20 judged a run that left w₀ by 1e10 (α = 4/λ on least squares) stable, and lr_sweep
    returned 2e7 × 2/λ (an outside check). The oracle: gradient descent at α = 4/λ
    multiplies the top component by |1 − αλ| = 3 a step."""
    p, model, loss, data, lam = _quadratic(1)
    with pytest.raises(ValueError, match="at least 3 steps"):
        run_trial(model, loss, data, model.state_dict(), 4 / lam, p.N, 20, window=0.1)
    r = run_trial(model, loss, data, model.state_dict(), 4 / lam, p.N, 20, window=0.15)
    assert r.diverged and r.growth_rate == pytest.approx(math.log(3.0), rel=0.02)


def test_bisection_ends_when_the_bracket_is_one_float_wide():
    """rel_tol below float64 resolution (1 + 1e-16 == 1) looped forever, a training run
    per turn; it now stops at adjacent floats around the edge."""
    res = bisect_max_lr(lambda a: a > 1.0, 0.3, rel_tol=1e-16)
    assert res.lo <= 1.0 < res.hi and res.hi / res.lo - 1 < 1e-15
    assert res.n_trials < 80


def test_training_threshold_trains_past_a_parameter_the_loss_does_not_use(tiny_mlp):
    """An auxiliary head the loss never reaches got no gradient and the SGD trial raised
    torch's "appears to not have been used in the graph", where torch.optim.SGD skips it.
    The oracle: the same network without the head, on the same batches, gives the same
    thresholds to the last bit (heavy ball, so the momentum buffers are in it too)."""
    import torch
    import torch.nn.functional as F

    from nets.learning_rates.lr_search import training_threshold

    model, X, y = tiny_mlp(N=40)

    class WithAux(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model
            self.aux = torch.nn.Linear(6, 2).double()

        def forward(self, x):
            return self.net(x)

    opts = dict(steps=12, seeds=(0, 1), lr0=1.0, momentum=0.9, progress=False)
    with_aux = training_threshold(WithAux(), F.cross_entropy, (X, y), [8], **opts)
    plain = training_threshold(model, F.cross_entropy, (X, y), [8], **opts)
    np.testing.assert_array_equal(with_aux.per_seed, plain.per_seed)


def test_adam_threshold_warns_about_train_mode_layers_as_the_sgd_one_does(tiny_mlp):
    """adam_threshold runs its trials in eval mode, as training_threshold does, but said
    nothing about a model left in train mode with dropout (an outside check)."""
    import torch
    import torch.nn.functional as F

    import nets

    model, X, y = tiny_mlp(N=40)
    drop = torch.nn.Sequential(model, torch.nn.Dropout(0.1)).train()
    with pytest.warns(UserWarning, match="adam_threshold: the model has layers in train mode"):
        nets.adam_threshold(drop, F.cross_entropy, (X, y), [8], warmup_steps=2, steps=8,
                            seeds=(0,), lr0=0.1, rel_tol=0.5)
