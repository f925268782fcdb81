"""Tests for nets.training.loops: exact optimizer steps, determinism, evaluation with uneven
chunks, the cached digits checkpoint, and weights-only checkpoint loading."""

import math
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from nets.training.data import gaussian_mixture, load_digits, teacher_student_regression
from nets.training.loops import (
    accuracy,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    train,
    trained_digits_mlp,
)
from nets.training.models import MLP, count_parameters

ce = nn.functional.cross_entropy


def _params(m):
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def _full_grad(model, loss_fn, X, y, params):
    def f(p):
        return loss_fn(functional_call(model, p, (X,)), y)

    return grad(f)(params)


def test_full_batch_sgd_with_momentum_matches_the_update_rule():
    """batch_size = N: epoch t is one step; v ← ρv + g, θ ← θ − αv, recomputed by hand."""
    X, y = gaussian_mixture(50, 4, 3, 2.0, seed=0, dtype=torch.float64)
    model = MLP(4, (6,), 3, seed=0).double()
    ref = MLP(4, (6,), 3, seed=0).double()
    lr, rho, wd = 0.3, 0.9, 0.01
    res = train(model, ce, (X, y), epochs=3, lr=lr, batch_size=50, momentum=rho,
                weight_decay=wd, seed=0)
    theta = _params(ref)
    v = {k: torch.zeros_like(t) for k, t in theta.items()}
    losses = []
    for _ in range(3):
        losses.append(float(ce(functional_call(ref, theta, (X,)), y)))
        g = _full_grad(ref, ce, X, y, theta)
        for k in theta:
            gk = g[k] + wd * theta[k]
            v[k] = rho * v[k] + gk if _ > 0 else gk
            theta[k] = theta[k] - lr * v[k]
    for k, t in _params(model).items():
        torch.testing.assert_close(t, theta[k], rtol=1e-12, atol=1e-12)
    # on-the-fly epoch loss with one batch is the loss before that step
    np.testing.assert_allclose(res.losses, losses, rtol=1e-12)
    assert res.steps == 3 and res.epochs == 3 and not res.diverged


def test_training_reduces_loss_and_counts_steps():
    X, y = load_digits()
    model = MLP(64, (16,), 10, seed=0)
    loss0, acc0 = evaluate(model, ce, (X, y))
    res = train(model, ce, (X, y), epochs=4, lr=0.05, batch_size=100, momentum=0.9, seed=1)
    assert res.steps == 4 * math.ceil(1797 / 100)  # uneven last batch is used
    assert res.final_loss < 0.3 * loss0
    assert res.final_accuracy > acc0 + 0.5
    assert res.losses[-1] < res.losses[0]
    assert res.accuracies.shape == (4,) and res.wall_time > 0
    # final numbers are a full-data evaluation of the returned model
    assert evaluate(model, ce, (X, y)) == (res.final_loss, res.final_accuracy)


def test_same_seed_bit_identical_different_seed_differs():
    X, y = load_digits()
    runs = []
    for seed in (3, 3, 4):
        m = MLP(64, (16,), 10, seed=0)
        r = train(m, ce, (X, y), epochs=2, lr=0.1, batch_size=64, seed=seed)
        runs.append((_params(m), r.losses))
    (p1, l1), (p2, l2), (p3, l3) = runs
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert np.array_equal(l1, l2)
    assert not all(torch.equal(p1[k], p3[k]) for k in p1)


def test_train_leaves_global_rng_and_mode_alone():
    X, y = gaussian_mixture(40, 3, 2, seed=0)
    m = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    m.eval()
    state = torch.random.get_rng_state()
    train(m, ce, (X, y), epochs=2, lr=0.1, batch_size=10, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())
    assert not m.training
    # dropout masks come from the seeded fork: reproducible too
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    b = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    b.load_state_dict(a.state_dict())
    train(a, ce, (X, y), epochs=2, lr=0.1, batch_size=10, seed=5)
    torch.manual_seed(999)
    train(b, ce, (X, y), epochs=2, lr=0.1, batch_size=10, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_evaluate_exact_with_uneven_chunks_and_accuracy_oracle():
    X, y = gaussian_mixture(103, 5, 4, 1.0, seed=2, dtype=torch.float64)
    m = MLP(5, (7,), 4, seed=1).double()
    full, acc_full = evaluate(m, ce, (X, y), chunk_size=None)
    chunked, acc_chunk = evaluate(m, ce, (X, y), chunk_size=10)
    assert math.isclose(full, chunked, rel_tol=1e-13)
    with torch.no_grad():
        out = m(X)
    assert math.isclose(full, float(ce(out, y)), rel_tol=1e-13)
    expect = float((out.argmax(1) == y).double().mean())
    assert acc_full == acc_chunk == accuracy(m, (X, y), chunk_size=7) == expect


def test_adam_regression_and_divergence():
    X, y = teacher_student_regression(200, 5, hidden=4, noise=0.05, seed=0)
    mse = nn.functional.mse_loss
    m = MLP(5, (16,), 1, seed=0)
    loss0, acc = evaluate(m, mse, (X, y))
    assert acc is None
    res = train(m, mse, (X, y), epochs=30, lr=1e-2, batch_size=20, optimizer="adam", seed=0)
    assert res.accuracies is None and res.final_accuracy is None
    assert res.final_loss < 0.3 * loss0
    with pytest.raises(ValueError, match="accuracy"):
        accuracy(m, (X, y))
    # plain SGD with a huge step on least squares blows up: reported, not raised
    lin = nn.Linear(5, 1)
    big = train(lin, mse, (X * 10, y), epochs=20, lr=10.0, batch_size=200, seed=0)
    assert big.diverged and big.epochs < 20 and not math.isfinite(big.losses[-1])


def test_train_bad_input():
    X, y = gaussian_mixture(20, 3, 2, seed=0)
    m = MLP(3, (4,), 2)
    kw = dict(epochs=1, lr=0.1, batch_size=5)
    with pytest.raises(ValueError, match="batch_size"):
        train(m, ce, (X, y), epochs=1, lr=0.1, batch_size=21)
    with pytest.raises(ValueError, match="batch_size"):
        train(m, ce, (X, y), epochs=1, lr=0.1, batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        train(m, ce, (X, y), epochs=1, lr=0.0, batch_size=5)
    with pytest.raises(ValueError, match="optimizer"):
        train(m, ce, (X, y), optimizer="lbfgs", **kw)
    with pytest.raises(ValueError, match="momentum"):
        train(m, ce, (X, y), momentum=1.0, **kw)
    with pytest.raises(ValueError, match="epochs"):
        train(m, ce, (X, y), epochs=0, lr=0.1, batch_size=5)
    Xn = X.clone()
    Xn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train(m, ce, (Xn, y), **kw)
    with pytest.raises(ValueError, match="empty"):
        train(m, ce, (X[:0], y[:0]), **kw)
    with pytest.raises(TypeError, match="data"):
        train(m, ce, X, **kw)
    with pytest.raises(TypeError, match="model"):
        train(lambda x: x, ce, (X, y), **kw)
    bad = MLP(3, (4,), 2)
    with torch.no_grad():
        bad.net[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="parameter"):
        train(bad, ce, (X, y), **kw)


def test_trained_digits_mlp_accuracy_and_cache_isolation():
    model, (X, y), res = trained_digits_mlp(return_result=True)
    assert X.shape == (1797, 64) and count_parameters(model) == 64 * 32 + 32 + 32 * 10 + 10
    with torch.no_grad():
        pred = model(X).argmax(1)
    acc = int((pred == y).sum()) / len(y)
    assert acc > 0.95 and acc == res.final_accuracy
    assert not model.training
    # callers cannot corrupt the cache
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    X.zero_()
    model2, (X2, y2) = trained_digits_mlp()
    assert float(X2.abs().sum()) > 0
    with torch.no_grad():
        assert int((model2(X2).argmax(1) == y2).sum()) / len(y2) == acc
    # a different seed is a different (still accurate) network
    model3, _ = trained_digits_mlp(seed=1)
    assert not torch.equal(model3.net[0].weight, model2.net[0].weight)
    assert accuracy(model3, (X2, y2)) > 0.95


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_checkpoint_roundtrip_and_weights_only_refusal(tmp_path):
    a = MLP(8, (5,), 3, seed=0)
    b = MLP(8, (5,), 3, seed=1)
    path = save_checkpoint(a, tmp_path / "ck" / "a.pt")
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]
    load_checkpoint(b, path)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(b, tmp_path / "missing.pt")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"net.0.weight": _Evil(marker)}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(b, evil)
    assert not marker.exists()
