"""transfer_lr and the real-training thresholds of lr_search.

Oracles: a linear least-squares model whose Hessian is built densely with
torch.func.hessian (λ, u, per-sample s_u² — no package curvature code), the closed
transfer rule computed by hand from them, and full-batch gradient descent on that
quadratic, whose divergence threshold is exactly 2(1+m)/λ_max.
"""

import json

import numpy as np
import pytest
import torch

from nets.learning_rates import lr_search
from nets.learning_rates.lr_search import training_threshold
from nets.learning_rates.transfer import scaling_rule, transfer_lr


def _problem(N=64, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d, generator=g, dtype=torch.float64)
    X[:, 0] *= 3.0
    w = torch.randn(d, 1, generator=g, dtype=torch.float64)
    y = X @ w + 0.3 * torch.randn(N, 1, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    loss = lambda out, t: 0.5 * ((out - t) ** 2).mean()
    return model, loss, X, y


def _dense_lam_s2(X):
    """Per-sample Hessians of 0.5(xᵀw − y)² are x xᵀ, via torch.func.hessian."""
    f = lambda w, x: 0.5 * (x @ w) ** 2
    Hs = torch.stack([torch.func.hessian(f)(torch.zeros(X.shape[1], dtype=X.dtype), x) for x in X])
    H = Hs.mean(0)
    lam, V = torch.linalg.eigh(H)
    u = V[:, -1]
    r = Hs @ u - H @ u
    return float(lam[-1]), float((r ** 2).sum() / (len(X) - 1))


@pytest.mark.parametrize("m", [0.0, 0.9])
def test_transfer_matches_dense_closed_form(m):
    model, loss, X, y = _problem()
    N = len(X)
    lam, s2 = _dense_lam_s2(X)
    Bs = [1, 4, 16, 64]
    res = transfer_lr(model, loss, (X, y), Bs, reference=(4, 0.1), momentum=m, seed=0)
    gain = (1 + m) / (1 - m)
    eff = lambda B: lam + gain * (1 / B - 1 / N) * s2 / lam
    expect = np.array([0.1 * eff(4) / eff(B) for B in Bs])
    np.testing.assert_allclose(res.lr, expect, rtol=1e-5)
    assert res.lr[1] == pytest.approx(0.1, rel=1e-12)
    assert res.lam == pytest.approx(lam, rel=1e-6)
    assert res.critical_batch_size == pytest.approx(s2 / lam ** 2, rel=1e-5)
    np.testing.assert_allclose(res.stability_limit, [2 * (1 + m) / eff(B) for B in Bs], rtol=1e-5)
    assert np.all(res.lr_stderr >= 0)
    json.dumps(res.to_dict())
    if m == 0.9:   # momentum with batch noise: the small-B limit falls below plain SGD's
        plain = transfer_lr(model, loss, (X, y), [1], reference=(4, 0.1), momentum=0.0)
        assert res.stability_limit[0] < plain.stability_limit[0]


def test_transfer_reads_optimizer_and_validates():
    model, loss, X, y = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    r = transfer_lr(model, loss, (X, y), [8], reference=(8, 0.2), optimizer=opt)
    assert r.momentum == 0.5 and r.lr[0] == pytest.approx(0.2)
    with pytest.raises(ValueError):
        transfer_lr(model, loss, (X, y), [8], reference=(8, 0.2), optimizer="adam")
    with pytest.raises(TypeError, match="reference"):
        transfer_lr(model, loss, (X, y), [8], reference=0.2)
    with pytest.raises(ValueError, match="form"):
        transfer_lr(model, loss, (X, y), [8], reference=(8, 0.2), form="nope")
    np.testing.assert_allclose(scaling_rule([8, 32], reference=(8, 0.1), rule="linear"), [0.1, 0.4])
    np.testing.assert_allclose(scaling_rule([8, 32], reference=(8, 0.1), rule="sqrt"), [0.1, 0.2])
    np.testing.assert_allclose(scaling_rule([8, 32], reference=(8, 0.1), rule="constant"), [0.1, 0.1])


@pytest.mark.parametrize("criterion,m", [("divergence", 0.5), ("onset", 0.0), ("final", 0.0)])
def test_full_batch_threshold_is_deterministic_limit(criterion, m):
    """At B = N every step is gradient descent on the quadratic: unstable iff α > 2(1+m)/λ."""
    model, loss, X, y = _problem()
    lam, _ = _dense_lam_s2(X)
    res = training_threshold(model, loss, (X, y), [len(X)], criterion=criterion, momentum=m,
                             steps=120, seeds=(0,), lr0=1.0 / lam, rel_tol=0.02)
    limit = 2 * (1 + m) / lam
    assert res.lr[0] == pytest.approx(limit, rel=0.04), (criterion, res.lr[0], limit)
    assert res.lo[0, 0] <= res.hi[0, 0]


def test_threshold_resumes_without_rerunning(tmp_path, monkeypatch):
    model, loss, X, y = _problem()
    path = tmp_path / "thr.jsonl"
    kw = dict(criterion="divergence", steps=40, seeds=(0, 1), lr0=0.1, store=path)
    first = training_threshold(model, loss, (X, y), [4, 16], **kw)
    assert first.per_seed.shape == (2, 2) and np.all(np.isfinite(first.stderr))

    def boom(*a, **k):
        raise AssertionError("a stored (B, seed) was run again")

    monkeypatch.setattr(lr_search, "training_trial", boom)
    again = training_threshold(model, loss, (X, y), [4, 16], **kw)
    np.testing.assert_array_equal(first.per_seed, again.per_seed)
    json.dumps(again.to_dict())


def test_threshold_validates():
    model, loss, X, y = _problem()
    with pytest.raises(ValueError, match="criterion"):
        training_threshold(model, loss, (X, y), [4], criterion="bogus")
    with pytest.raises(ValueError, match="batch_sizes"):
        training_threshold(model, loss, (X, y), [1000])
    with pytest.raises(ValueError, match="momentum"):
        training_threshold(model, loss, (X, y), [4], momentum=1.0)


def test_self_stabilisation_linear_model_keeps_its_curvature():
    """A linear model under MSE has a weight-independent Hessian 2XᵀX/N: λ₁ after any stable
    run equals λ₁ before (oracle: dense eigvalsh), and the model itself is not modified."""
    from nets.learning_rates.lr_search import self_stabilisation

    g = torch.Generator().manual_seed(3)
    X = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.randn(64, 1, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(5, 1, bias=False).double()
    before = model.weight.detach().clone()
    st = self_stabilisation(model, torch.nn.functional.mse_loss, (X, y), factor=1.0,
                            batch_size=16, steps=30, seed=0)
    lam = float(torch.linalg.eigvalsh(2.0 * X.T @ X / len(X))[-1])
    assert st.lam_before == pytest.approx(lam, rel=1e-8)
    assert st.lam_after == pytest.approx(lam, rel=1e-8)
    assert st.lr == pytest.approx(1.0 / lam)
    assert torch.equal(model.weight, before)
    assert st.to_dict()["steps"] == 30
    with pytest.raises(ValueError, match="batch_size"):
        self_stabilisation(model, torch.nn.functional.mse_loss, (X, y), batch_size=65)
    with pytest.raises(ValueError, match="momentum"):
        self_stabilisation(model, torch.nn.functional.mse_loss, (X, y), batch_size=16, momentum=1.0)


def test_unbracketed_threshold_is_nan_or_raises(tmp_path, monkeypatch):
    """A (B, seed) whose criterion never fires gives NaN with unbracketed="nan" (the other
    B are still measured, exactly) and raises by default, also when read from a store."""
    model, loss, X, y = _problem()
    fake = lambda model, loss_fn, X, y, a, B, **k: B == 4 and a > 0.5   # B = 16 never fires
    monkeypatch.setattr(lr_search, "training_trial", fake)
    path = tmp_path / "thr.jsonl"
    kw = dict(criterion="divergence", steps=40, seeds=(0,), lr0=0.1, rel_tol=0.01)
    thr = training_threshold(model, loss, (X, y), [4, 16], unbracketed="nan", store=path, **kw)
    assert thr.lr[0] == pytest.approx(0.5, rel=0.01) and np.isnan(thr.lr[1])
    assert thr.n_trials > 41                       # the unbracketed search ran 1 + 40 trials
    with pytest.raises(RuntimeError, match="no divergent learning rate"):
        training_threshold(model, loss, (X, y), [4, 16], **kw)
    with pytest.raises(RuntimeError, match="stored"):
        training_threshold(model, loss, (X, y), [4, 16], store=path, **kw)
    with pytest.raises(ValueError, match="unbracketed"):
        training_threshold(model, loss, (X, y), [4], unbracketed="skip")
