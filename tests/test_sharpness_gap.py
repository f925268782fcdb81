"""Self-stabilisation rates and the stochastic sharpness gap (nets.learning_rates.sharpness_gap).

Oracles share no code with the module: dense float64 Hessians of the flattened-parameter
loss from `torch.autograd.functional.hessian` (∇S by central finite differences of
uᵀH(θ)u), per-sample gradients one sample at a time with `torch.autograd.grad`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nets.learning_rates.sharpness_gap import (
    SharpnessGapTerms,
    sharpness_gap_terms,
    stochastic_sharpness_gap,
)


@pytest.fixture(scope="module")
def small():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    shapes = [p.shape for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def flat_loss(theta, Xs=X, ys=y):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            k = int(np.prod(s))
            parts[n] = theta[i:i + k].reshape(s)
            i += k
        return F.cross_entropy(torch.func.functional_call(model, parts, (Xs,)), ys)

    H = torch.autograd.functional.hessian(flat_loss, theta0)
    u = torch.linalg.eigh(H)[1][:, -1]
    return model, X, y, flat_loss, theta0, u


def test_terms_match_dense_oracles(small):
    model, X, y, flat_loss, theta0, u = small
    P = theta0.numel()
    h = 1e-4

    def s_at(theta):
        return float(u @ torch.autograd.functional.hessian(flat_loss, theta) @ u)

    gS = torch.tensor([(s_at(theta0 + h * e) - s_at(theta0 - h * e)) / (2 * h)
                       for e in torch.eye(P, dtype=torch.float64)], dtype=torch.float64)
    th = theta0.clone().requires_grad_(True)
    gL = torch.autograd.grad(flat_loss(th), th)[0]
    dots = []
    for i in range(X.shape[0]):
        th = theta0.clone().requires_grad_(True)
        gi = torch.autograd.grad(flat_loss(th, X[i:i + 1], y[i:i + 1]), th)[0]
        dots.append(float(gi @ u))
    for chunk in (7, 40):                                     # chunked sums are exact
        t = sharpness_gap_terms(model, F.cross_entropy, (X, y), u, chunk_size=chunk)
        assert t.N == 40
        assert t.S == pytest.approx(s_at(theta0), rel=1e-10)
        assert t.stabilisation == pytest.approx(float(gS @ gS), rel=1e-6)
        assert t.sharpening_raw == pytest.approx(float(-(gL @ gS)), rel=1e-6, abs=1e-10)
        g_perp = gL - (gL @ u) * u
        assert t.sharpening == pytest.approx(float(-(g_perp @ gS)), rel=1e-6, abs=1e-10)
        assert t.v_u == pytest.approx(float(np.var(dots, ddof=1)), rel=1e-10)
        assert t.grad_norm == pytest.approx(float(gL.norm()), rel=1e-10)
    # the direction's scale does not matter (u is normalised)
    t2 = sharpness_gap_terms(model, F.cross_entropy, (X, y), 3.0 * u)
    assert t2.stabilisation == pytest.approx(t.stabilisation, rel=1e-10)


def test_gap_closed_form_and_limits():
    t = SharpnessGapTerms(sharpening=2.0, stabilisation=8.0, v_u=0.5, S=1.0, grad_norm=1.0, N=100)
    eta, B = 0.1, 10
    want = eta * 8.0 * (1 / B - 1 / 100) * 0.5 / (4 * 2.0)
    assert stochastic_sharpness_gap(eta, B, t) == pytest.approx(want, rel=1e-14)
    assert stochastic_sharpness_gap(eta, 100, t) == 0.0                   # full batch: GD
    assert stochastic_sharpness_gap(eta, 5, t) > stochastic_sharpness_gap(eta, 20, t)
    flat = SharpnessGapTerms(sharpening=-1.0, stabilisation=8.0, v_u=0.5, S=1.0, grad_norm=1.0,
                             N=100)
    assert math.isnan(stochastic_sharpness_gap(eta, B, flat))            # outside the theory


def test_bad_inputs(small):
    model, X, y, *_ , u = small
    with pytest.raises(ValueError, match="entries"):
        sharpness_gap_terms(model, F.cross_entropy, (X, y), u[:-1])
    with pytest.raises(ValueError, match="non-zero"):
        sharpness_gap_terms(model, F.cross_entropy, (X, y), torch.zeros_like(u))
    with pytest.raises(TypeError):
        sharpness_gap_terms("model", F.cross_entropy, (X, y), u)
    with pytest.raises(TypeError):
        stochastic_sharpness_gap(0.1, 8, {"sharpening": 1.0})
    with pytest.raises(ValueError):
        stochastic_sharpness_gap(-0.1, 8, SharpnessGapTerms(1.0, 1.0, 1.0, 1.0, 1.0, 10))
