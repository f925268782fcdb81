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



@pytest.mark.parametrize("alpha", [0.0, -0.0, float("nan")])
def test_gap_without_sharpening_is_nan_not_an_error(alpha):
    """α = 0 exactly (no progressive sharpening; e.g. ∇L ∥ u so ∇L⊥ = 0) is outside the
    theory like α < 0: nan, not a division by zero; a tiny α > 0 gives the finite formula."""
    t = SharpnessGapTerms(sharpening=alpha, stabilisation=8.0, v_u=0.5, S=1.0, grad_norm=1.0,
                          N=100)
    assert math.isnan(stochastic_sharpness_gap(0.1, 10, t))
    tiny = SharpnessGapTerms(sharpening=1e-300, stabilisation=8.0, v_u=0.5, S=1.0,
                             grad_norm=1.0, N=100)
    want = 0.1 * 8.0 * (1 / 10 - 1 / 100) * 0.5 / (4 * 1e-300)
    assert stochastic_sharpness_gap(0.1, 10, tiny) == pytest.approx(want, rel=1e-14)

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


class _Chans(nn.Module):
    """(n, 6) -> (n, 2, 3) -> InstanceNorm1d(2) -> (n, 6)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.InstanceNorm1d(2, affine=True)

    def forward(self, h):
        return self.norm(h.reshape(-1, 2, 3)).reshape(-1, 6)


def _hand_norm(kind, h, w, b, eps=1e-5):
    """The oracle's normalisation, written out (no torch norm kernel): LayerNorm over the
    6 features, or InstanceNorm over 3 features in each of 2 channels."""
    z = h if kind.startswith("layer") else h.reshape(-1, 2, 3)
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    z = (z - mu) / torch.sqrt(var + eps)
    if kind == "instance":
        z = (z * w[:, None] + b[:, None]).reshape(-1, 6)
    elif w is not None:
        z = z * w + b
    return z


def _finite_difference_oracle(model, hand_loss, h=1e-4):
    """For a hand-written copy of `model` — hand_loss(the model's parameters, in order) →
    loss, no torch norm kernel — θ₀, its H·v by double backward, the top eigenvector u
    of its dense Hessian, ∇S = ∇(uᵀHu) by central differences of step h, and ∇L."""
    import types

    shapes = [p.shape for p in model.parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    P = theta0.numel()

    def flat_loss(theta):
        parts, i = [], 0
        for sh in shapes:
            k = int(np.prod(sh))
            parts.append(theta[i:i + k].reshape(sh))
            i += k
        return hand_loss(parts)

    def hvp(theta, v):
        th = theta.clone().requires_grad_(True)
        gr = torch.autograd.grad(flat_loss(th), th, create_graph=True)[0]
        return torch.autograd.grad(gr @ v, th)[0]

    eye = torch.eye(P, dtype=torch.float64)
    H = torch.stack([hvp(theta0, e) for e in eye])
    u = torch.linalg.eigh((H + H.T) / 2)[1][:, -1]
    gS = torch.stack([(u @ hvp(theta0 + h * e, u) - u @ hvp(theta0 - h * e, u)) / (2 * h)
                      for e in eye])
    th = theta0.clone().requires_grad_(True)
    gL = torch.autograd.grad(flat_loss(th), th)[0]
    return types.SimpleNamespace(theta0=theta0, hvp=hvp, u=u, gS=gS, gL=gL)


@pytest.mark.parametrize("kind", ["layer_affine", "layer_plain", "instance"])
def test_terms_with_norm_layers_match_finite_differences(kind):
    # torch's LayerNorm / InstanceNorm kernels have a wrong third derivative (β was 4-6 %
    # low, α 6-7 % high): the oracle is a hand-written network without them, ∇S by central
    # differences of uᵀHu with H·u by double backward of that network
    g = torch.Generator().manual_seed(2)
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    torch.manual_seed(2)
    norm = {"layer_affine": lambda: nn.LayerNorm(6),
            "layer_plain": lambda: nn.LayerNorm(6, elementwise_affine=False),
            "instance": _Chans}[kind]()
    model = nn.Sequential(nn.Linear(4, 6), norm, nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))

    def hand_loss(parts):
        W1, b1, *mid, W2, b2 = parts
        h = _hand_norm(kind, X @ W1.T + b1, *(mid or [None, None]))
        return F.cross_entropy(torch.tanh(h) @ W2.T + b2, y)

    o = _finite_difference_oracle(model, hand_loss)
    theta0, hvp, u, gS, gL = o.theta0, o.hvp, o.u, o.gS, o.gL
    g_perp = gL - (gL @ u) * u
    t = sharpness_gap_terms(model, F.cross_entropy, (X, y), u)
    assert t.S == pytest.approx(float(u @ hvp(theta0, u)), rel=1e-10)
    assert t.stabilisation == pytest.approx(float(gS @ gS), rel=1e-5)
    assert t.sharpening == pytest.approx(float(-(g_perp @ gS)), rel=1e-5)
    assert t.sharpening_raw == pytest.approx(float(-(gL @ gS)), rel=1e-4)   # h² error
    # the third-order pass leaves the model's weights as they were
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), theta0)


def test_batch_norm_on_batch_statistics_matches_finite_differences():
    """policy='train_batch_stats' on a small CNN with BatchNorm2d (one chunk: the
    statistics of the whole data): torch's batch-norm kernel in training mode has a wrong
    third derivative too (β 1.1 % off); against a hand-written network (conv, the
    normalisation over (n, h, w) written out, tanh, linear), ∇S by central differences."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(24, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    torch.manual_seed(4)
    bn = nn.BatchNorm2d(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), bn, nn.Tanh(), nn.Flatten(),
                          nn.Linear(32, 3)).double()
    with torch.no_grad():
        for p in bn.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))

    def hand_loss(parts):
        Wc, bc, w, b, W2, b2 = parts
        h = F.conv2d(X, Wc, bc, padding=1)
        mu = h.mean((0, 2, 3), keepdim=True)
        var = ((h - mu) ** 2).mean((0, 2, 3), keepdim=True)
        h = (h - mu) / torch.sqrt(var + 1e-5) * w[None, :, None, None] + b[None, :, None, None]
        return F.cross_entropy(torch.tanh(h).reshape(len(X), -1) @ W2.T + b2, y)

    o = _finite_difference_oracle(model, hand_loss)
    theta0, hvp, u, gS = o.theta0, o.hvp, o.u, o.gS
    running = (bn.running_mean.clone(), bn.running_var.clone())
    t = sharpness_gap_terms(model, F.cross_entropy, (X, y), u, policy="train_batch_stats",
                            chunk_size=len(X))
    assert t.S == pytest.approx(float(u @ hvp(theta0, u)), rel=1e-10)
    assert t.stabilisation == pytest.approx(float(gS @ gS), rel=1e-5)
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])


def test_summed_and_weighted_losses_warn(small):
    import warnings
    model, X, y, *_, u = small
    summed = lambda out, t: F.cross_entropy(out, t, reduction="sum")
    weighted = lambda out, t: F.cross_entropy(
        out, t, weight=torch.tensor([1.0, 4.0, 0.2], dtype=torch.float64))
    for loss, what in [(summed, "summed"), (weighted, "weighted mean")]:
        with pytest.warns(UserWarning, match=what) as rec:
            sharpness_gap_terms(model, loss, (X, y), u)
        assert any(what in str(w.message) for w in rec)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        plain = sharpness_gap_terms(model, F.cross_entropy, (X, y), u)
    assert not [w for w in rec if "loss_fn" in str(w.message)]
    assert np.isfinite(plain.S) and plain.S > 0
