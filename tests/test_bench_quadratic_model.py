"""The loss profile along the top eigenvector in `benchmarks/bench_quadratic_model.py`
(part 2) against exact answers: for a model linear in its parameters (softmax
regression) the real and the linearised profiles are the same function, and at small
amplitude the even secant curvature is the top eigenvalue of the dense float64 Hessian."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import import_benchmark


@pytest.fixture(scope="module")
def bench():
    return import_benchmark("bench_quadratic_model")


def _data(seed=0, N=64, d=5, K=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, d, generator=g), torch.randint(0, K, (N,), generator=g)


def _dense_top_eigenvalue(model, X, y):
    from torch.func import functional_call, hessian

    net = copy.deepcopy(model).double()
    names = [k for k, _ in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(w):
        ps = dict(zip(names, (c.reshape(s) for c, s in zip(torch.split(w, sizes), shapes))))
        return torch.nn.functional.cross_entropy(functional_call(net, ps, (X.double(),)), y)

    return float(torch.linalg.eigvalsh(hessian(loss)(w0))[-1])


def test_linear_model_profiles_coincide_and_secant_starts_at_lambda(bench):
    torch.manual_seed(0)
    X, y = _data()
    model = torch.nn.Linear(5, 3)
    out = bench.secant_along_top(model, X, y, factors=(3.0,), n=20)
    np.testing.assert_allclose(out["real"]["plus"], out["linearized"]["plus"], rtol=1e-10)
    np.testing.assert_allclose(out["real"]["minus"], out["linearized"]["minus"], rtol=1e-10)
    lam = _dense_top_eigenvalue(model, X, y)
    assert out["lam"] == pytest.approx(lam, rel=1e-6)
    assert out["real"]["secant_over_lam"][0] == pytest.approx(1.0, abs=1e-3)


def test_nonlinear_network_profiles_differ(bench):
    torch.manual_seed(1)
    X, y = _data(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    out = bench.secant_along_top(model, X, y, factors=(3.0,), n=20)
    assert out["real"]["secant_over_lam"][0] == pytest.approx(1.0, abs=1e-3)
    rel = np.abs(out["real"]["plus"] / out["linearized"]["plus"] - 1)
    assert rel[0] < 1e-4 and rel[-1] > 1e-2
