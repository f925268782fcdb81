"""The loss profiles along the top Hessian eigenvector (`nets.learning_rates.along_top`)
against exact answers that share no code with it: the dense float64 Hessian
(`torch.func.hessian`) for λ₁ and the small-amplitude secant; for a model linear in its
parameters the real and linearised profiles are the same function; for a linear model
under a quadratic loss the secant curvature is λ₁ at every amplitude (the profile is a
parabola)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nets.learning_rates.along_top import loss_along_top


def _classification(seed=0, N=64, d=5, K=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, d, generator=g), torch.randint(0, K, (N,), generator=g)


def _top_eigenvalue(dense_hessian, model, loss_fn, X, y):
    H = dense_hessian(model.double(), loss_fn, X.double(), y)
    return float(torch.linalg.eigvalsh(H)[-1])


def test_softmax_regression_profiles_coincide(dense_hessian):
    torch.manual_seed(0)
    X, y = _classification()
    model = torch.nn.Linear(5, 3)
    prof = loss_along_top(model, F.cross_entropy, (X, y), factor=3.0, n=20)
    np.testing.assert_allclose(prof.real_plus, prof.linearized_plus, rtol=1e-10)
    np.testing.assert_allclose(prof.real_minus, prof.linearized_minus, rtol=1e-10)
    assert prof.secant_ratio == pytest.approx(1.0, rel=1e-10)
    lam = _top_eigenvalue(dense_hessian, model, F.cross_entropy, X, y)
    assert prof.lam == pytest.approx(lam, rel=1e-6)
    assert prof.real_secant[0] == pytest.approx(1.0, abs=1e-3)


def test_linear_least_squares_secant_is_lambda_everywhere(dense_hessian):
    g = torch.Generator().manual_seed(4)
    X = torch.randn(50, 4, generator=g, dtype=torch.float64)
    y = torch.randn(50, 1, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(4, 1).double()     # one output: λ₁ simple, u defined up to sign
    prof = loss_along_top(model, F.mse_loss, (X, y), factor=10.0, n=25)
    lam = _top_eigenvalue(dense_hessian, model, F.mse_loss, X, y)
    assert prof.lam == pytest.approx(lam, rel=1e-6)
    np.testing.assert_allclose(prof.real_secant, 1.0, rtol=1e-5)
    np.testing.assert_allclose(prof.linearized_secant, 1.0, rtol=1e-5)
    # the amplitude where max f(±x) = f(0) + |x·gᵀu| + λx²/2 first reaches 10 f(0): the
    # positive root of λA²/2 + |b|A − 9 f(0) = 0, b = gᵀu (dense gradient and eigenvector)
    H = dense_hessian(model, F.mse_loss, X, y)
    u = torch.linalg.eigh(H)[1][:, -1]
    from dense_oracles import flat_state
    flat, state = flat_state(model)
    f = lambda w: F.mse_loss(torch.func.functional_call(model, state(w), (X,)), y)
    L0 = float(f(flat))
    b = abs(float(torch.func.grad(f)(flat) @ u))
    A = (-b + np.sqrt(b * b + 2 * lam * 9.0 * L0)) / lam
    assert prof.amplitude_real == pytest.approx(A, rel=1e-8)
    assert prof.amplitude_linearized == pytest.approx(A, rel=1e-8)
    x = prof.amplitudes
    above = np.flatnonzero(np.maximum(prof.real_plus, prof.real_minus) > 10.0)
    assert x[above[0] - 1] < A <= x[above[0]]                 # inside the grid's bracket


def test_nonlinear_network_profiles_differ_and_at_reads_other_tolerances(tiny_mlp, dense_hessian):
    model, X, y = tiny_mlp(seed=1, N=40)
    prof = loss_along_top(model, F.cross_entropy, (X, y), factor=3.0, n=30)
    lam = _top_eigenvalue(dense_hessian, model, F.cross_entropy, X, y)
    assert prof.lam == pytest.approx(lam, rel=1e-6)
    assert prof.real_secant[0] == pytest.approx(1.0, abs=1e-3)
    rel = np.abs(prof.real_plus / prof.linearized_plus - 1)
    assert rel[0] < 1e-4 and rel[-1] > 1e-2
    assert prof.at(3.0)["real"] == (prof.amplitude_real, prof.secant_real)
    assert prof.at(3.0)["linearized"] == (prof.amplitude_linearized, prof.secant_linearized)
    assert prof.secant_ratio == pytest.approx(prof.secant_linearized / prof.secant_real)
    assert np.isnan(prof.at(1e12)["real"][0])                  # never reached on the grid
    assert set(prof.to_dict()) >= {"lam", "secant_ratio", "amplitudes"}
    # dense oracle on the profile's grid: f(w ± x·u) (real) and the loss of z0 ± x·J u
    # (linearised), u the dense Hessian's top eigenvector (its sign is arbitrary: compare
    # max and min of the ± pair), then A_k the first x with max f(±x) > k·f(0)
    from dense_oracles import flat_state
    flat, state = flat_state(model)
    H = dense_hessian(model, F.cross_entropy, X, y)
    u = torch.linalg.eigh(H)[1][:, -1]
    out = lambda w: torch.func.functional_call(model, state(w), (X,))
    z0, Ju = torch.func.jvp(out, (flat,), (u,))
    L0 = float(F.cross_entropy(z0, y))
    assert prof.L0 == pytest.approx(L0, rel=1e-12)
    xs = prof.amplitudes
    dense = {"real": lambda x: F.cross_entropy(out(flat + x * u), y),
             "linearized": lambda x: F.cross_entropy(z0 + x * Ju, y)}
    for name, f in dense.items():
        with torch.no_grad():
            fp = np.array([float(f(float(x))) for x in xs])
            fm = np.array([float(f(-float(x))) for x in xs])
        plus, minus = getattr(prof, f"{name}_plus"), getattr(prof, f"{name}_minus")
        np.testing.assert_allclose(np.maximum(plus, minus), np.maximum(fp, fm) / L0, rtol=1e-6)
        np.testing.assert_allclose(np.minimum(plus, minus), np.minimum(fp, fm) / L0, rtol=1e-6)
        sec = (fp + fm - 2 * L0) / xs ** 2 / lam
        np.testing.assert_allclose(getattr(prof, f"{name}_secant"), sec, rtol=1e-5, atol=1e-6)
        for k in (3.0, 5.0, 20.0):
            above = np.flatnonzero(np.maximum(fp, fm) > k * L0)
            assert above.size and above[0] > 0, (name, k)
            A, s_A = prof.at(k)[name]
            assert xs[above[0] - 1] <= A <= xs[above[0]], (name, k, A)
            with torch.no_grad():
                fA = np.array([float(f(A)), float(f(-A))])
            if k == 3.0:     # the profile's own tolerance: solved with the exact loss
                assert fA.max() / L0 == pytest.approx(k, rel=1e-7), name
                assert s_A == pytest.approx((fA.sum() - 2 * L0) / A ** 2 / lam, rel=1e-6)
            else:            # another tolerance: interpolated between grid points
                assert fA.max() / L0 == pytest.approx(k, rel=0.03), (name, k)
                assert s_A == pytest.approx((fA.sum() - 2 * L0) / A ** 2 / lam, rel=0.03)
    assert prof.at(5.0)["real"][0] > prof.amplitude_real


class _Scaled(torch.nn.Module):
    def __init__(self, net, s):
        super().__init__()
        self.net, self.s = net, s

    def forward(self, x):
        return self.s * self.net(x)


def test_profile_is_unchanged_by_the_scale_of_the_outputs_and_targets():
    """Outputs and targets multiplied by s under the squared error: the same problem with
    loss and λ₁ × s² in the same weights (an exact identity), so f(±x)/f(0), the amplitude
    where it first exceeds k and the secant ratio do not change, up to the grids' spacing
    — also where the loss is large (f(0) beyond the plain grid's reach for k = 10)."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(60, 4, generator=g, dtype=torch.float64)
    y = torch.sin(X[:, :1] + X[:, 1:2])
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 1)).double()
    for small_s, large_s in ((1.0, 60.0), (1.0, 5.0)):
        a = loss_along_top(_Scaled(net, small_s), F.mse_loss, (X, small_s * y), n=40)
        b = loss_along_top(_Scaled(net, large_s), F.mse_loss, (X, large_s * y), n=40)
        assert b.lam == pytest.approx(a.lam * (large_s / small_s) ** 2, rel=1e-6)
        assert np.isfinite(a.secant_ratio) and np.isfinite(b.secant_ratio)
        # the same weights: A_k (a weight-space distance) and the ratio, to the solver's
        # precision, although the grid (units 1/√λ₁, stretched with f(0)) moves
        assert b.secant_ratio == pytest.approx(a.secant_ratio, rel=1e-7)
        assert b.amplitude_real == pytest.approx(a.amplitude_real, rel=1e-7)
        assert b.amplitude_linearized == pytest.approx(a.amplitude_linearized, rel=1e-7)
    assert b.L0 > 1.5 and a.L0 < 1.0                  # the large loss needs the stretched grid


def test_secant_ratio_is_unchanged_when_the_loss_is_multiplied(tiny_mlp):
    """loss × c: λ₁ × c, the grid (units 1/√λ₁) moves, f(±x)/f(0) does not; read at the
    first grid point above k·f(0) the ratio moved by up to ~4 % (1–9 % in transfer_lr's
    default lr, an outside sweep) — solved inside the bracket it is the same number."""
    model, X, y = tiny_mlp(seed=2, N=60)
    ref = loss_along_top(model, F.cross_entropy, (X, y))
    for c in (0.07, 3.0, 250.0):
        prof = loss_along_top(model, lambda z, t, c=c: c * F.cross_entropy(z, t), (X, y))
        assert prof.lam == pytest.approx(c * ref.lam, rel=1e-6)
        assert prof.secant_ratio == pytest.approx(ref.secant_ratio, rel=1e-7), c
        assert prof.amplitude_real == pytest.approx(ref.amplitude_real, rel=1e-7), c
        assert prof.secant_real == pytest.approx(ref.secant_real, rel=1e-7), c


def test_a_profile_the_grid_does_not_reach_far_enough_is_followed_past_it(tiny_mlp):
    """A tolerance the grid ends short of (the loss of an untrained net grows ~linearly
    along u): the amplitude is doubled past the grid's end until max f(±x) > k·f(0), then
    solved — against a dense oracle on the same direction; NaN only past 2⁴⁰× the end."""
    import nets.learning_rates.along_top as along_top

    model, X, y = tiny_mlp(seed=0, N=40)
    k = 200.0
    prof = loss_along_top(model, F.cross_entropy, (X, y), factor=k, n=12, span=(0.02, 2.0))
    assert np.maximum(prof.real_plus, prof.real_minus).max() < k      # the grid falls short
    assert prof.amplitude_real > prof.amplitudes[-1]
    from dense_oracles import flat_state
    net, Xd = model.double(), X.double()
    flat, state = flat_state(net)
    loss = lambda w: F.cross_entropy(torch.func.functional_call(net, state(w), (Xd,)), y)
    u = torch.linalg.eigh(torch.func.hessian(loss)(flat))[1][:, -1]
    f = lambda x: float(loss(flat + x * u))
    A = prof.amplitude_real
    assert max(f(A), f(-A)) / prof.L0 == pytest.approx(k, rel=1e-7)
    along_top_doublings = along_top.BEYOND_GRID_DOUBLINGS
    try:
        along_top.BEYOND_GRID_DOUBLINGS = 0
        short = loss_along_top(model, F.cross_entropy, (X, y), factor=k, n=12, span=(0.02, 2.0))
    finally:
        along_top.BEYOND_GRID_DOUBLINGS = along_top_doublings
    assert np.isnan(short.amplitude_real) and np.isnan(short.secant_ratio)


def test_refuses_bad_input(tiny_mlp):
    model, X, y = tiny_mlp()
    with pytest.raises(ValueError, match="factor"):
        loss_along_top(model, F.cross_entropy, (X, y), factor=1.0)
    with pytest.raises(ValueError, match="span"):
        loss_along_top(model, F.cross_entropy, (X, y), span=(2.0, 1.0))
    with pytest.raises(TypeError, match="model"):
        loss_along_top(lambda x: x, F.cross_entropy, (X, y))


def test_crossing_with_non_finite_losses():
    """A non-finite loss counts as above k·f(0) (as divergence does in lr_search): on the
    grid, inside the bracket and past the grid's end; the crossing is still solved where the
    loss is finite, and the secant is NaN, not a number, where it is not."""
    from nets.learning_rates.along_top import _crossing

    lam, L0, k = 2.0, 1.0, 10.0
    parabola = lambda x: L0 + 0.5 * lam * x * x                        # noqa: E731
    A_true = np.sqrt(2 * (k - 1) * L0 / lam)
    xs = np.geomspace(0.1, 10.0, 12)

    def profile(f):
        plus = np.array([f(x) for x in xs]) / L0
        return plus, plus.copy()

    blows = lambda x: parabola(x) if abs(x) < 3.2 else float("nan")   # noqa: E731
    plus, minus = profile(blows)       # NaN on the grid past 3.2: the first "hit" (4.04)
    A, s = _crossing(xs, plus, minus, k, blows, L0, lam)
    assert A == pytest.approx(A_true, rel=1e-8) and s == pytest.approx(1.0, rel=1e-8)
    early = lambda x: parabola(x) if abs(x) < 2.9 else float("inf")   # noqa: E731
    A, s = _crossing(xs, *profile(early), 5.0 * k, early, L0, lam)
    assert A == pytest.approx(2.9, rel=1e-6) and np.isnan(s)          # reached by blowing up
    short = np.geomspace(0.01, 0.5, 6)                                 # past the grid's end
    plus = np.array([parabola(x) for x in short]) / L0
    A, s = _crossing(short, plus, plus, k, blows, L0, lam)
    assert A == pytest.approx(A_true, rel=1e-8) and s == pytest.approx(1.0, rel=1e-8)
