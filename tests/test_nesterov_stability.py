"""Mean-square stability of Nesterov SGD with batch noise.

Oracles: sympy limits of the derivation; a Monte-Carlo simulation of the scalar
iteration against the derived second-moment map (z-scores); exact enumeration of every
batch of a tiny problem (the second-moment operator built densely from all C(N, B)
subsets of the (e, v) state) — no code shared with `ms_stability_threshold`; the closed
form against that exact threshold on least squares.
"""

from itertools import combinations

import numpy as np
import pytest
import sympy as sp
from conftest import spiked_least_squares

from nets.learning_rates.stability import ms_stability_threshold
from rmt.lr import (
    momentum_effective_curvature,
    momentum_factor,
    momentum_noise_gain,
    sgd_max_lr,
    sgd_momentum_ms_max_lr,
    sgd_nesterov_ms_max_lr,
)
from rmt.symbolic import derive_nesterov_mean_square


def test_derivation_limits():
    d = derive_nesterov_mean_square()
    lam, c, s2, rho = (d.symbols[k] for k in ("lam", "c", "s2", "rho"))
    assert sp.simplify(d.exprs["alpha_max_rho0"] - 2 / (lam + c * s2 / lam)) == 0
    assert sp.simplify(d.exprs["alpha_max_noiseless"] - 2 * (1 + rho) / ((1 + 2 * rho) * lam)) == 0
    assert d.exprs["difference_from_closed_form"] == 0
    assert sp.simplify(d.exprs["noise_gain"] - (1 + rho) * (1 + 2 * rho) / (1 + 3 * rho)) == 0
    # the closed form is a root of the derived quadratic at a generic point
    vals = {lam: 1.3, c: 0.2, s2: 7.0, rho: 0.8}
    a = float(d.exprs["alpha_max"].subs(vals))
    assert abs(float(d.exprs["quadratic"].subs(vals).subs(d.symbols["alpha"], a))) < 1e-10


def _map(a, lam, sig2, r):
    """The (E w², E wv, E v²) map written out by hand (w⁺ = A w − aρ² v, v⁺ = h w + ρ v)."""
    Eh2 = lam ** 2 + sig2
    EA, EA2 = 1 - a * (1 + r) * lam, 1 - 2 * a * (1 + r) * lam + a * a * (1 + r) ** 2 * Eh2
    k = a * r * r
    return np.array([[EA2, -2 * k * EA, k * k],
                     [lam - a * (1 + r) * Eh2, r * EA - k * lam, -k * r],
                     [Eh2, 2 * r * lam, r * r]])


def test_second_moment_map_matches_monte_carlo():
    lam, sig2, r, a, T, n = 1.0, 0.6, 0.9, 0.5, 12, 200_000
    rng = np.random.default_rng(0)
    w, v = np.ones(n), np.zeros(n)
    for _ in range(T):
        h = lam + np.sqrt(sig2) * rng.standard_normal(n)
        v = r * v + h * w                       # torch: buf ← ρ buf + g
        w = w - a * (h * w + r * v)             # w ← w − α(g + ρ buf)
    pred = np.linalg.matrix_power(_map(a, lam, sig2, r), T) @ np.array([1.0, 0.0, 0.0])
    for sim, p in zip((w * w, w * v, v * v), pred):
        z = (sim.mean() - p) / (sim.std() / np.sqrt(n))
        assert abs(z) < 4, (sim.mean(), p, z)


def test_closed_form_is_the_first_crossing_of_the_spectral_radius():
    rng = np.random.default_rng(1)
    for _ in range(60):
        lam = rng.uniform(0.1, 3)
        sig2 = lam ** 2 * 10 ** rng.uniform(-3, 3)
        r = rng.choice([0.3, 0.6, 0.9, 0.99])
        c = 1.0                                  # B = 1, N = None: σ² = s2
        a_star = sgd_nesterov_ms_max_lr(1, lam, sig2, None, r)
        radius = lambda a: np.max(np.abs(np.linalg.eigvals(_map(a, lam, c * sig2, r))))
        assert radius(a_star * (1 - 1e-6)) < 1 < radius(a_star * (1 + 1e-4))
        assert max(radius(a) for a in np.linspace(1e-3, 0.999, 200) * a_star) < 1


def test_closed_form_limits_and_momentum_factor():
    assert momentum_factor(0.9, "nesterov") == pytest.approx(3.8 / 2.8)
    Bs = np.array([1, 4, 16, 64, 100])
    np.testing.assert_allclose(sgd_nesterov_ms_max_lr(Bs, 1.3, 5.0, 100, 0.0),
                               sgd_max_lr(Bs, 1.3, 5.0, 100), rtol=1e-13)
    assert sgd_nesterov_ms_max_lr(100, 1.3, 5.0, 100, 0.9) == pytest.approx(3.8 / 2.8 / 1.3)
    # noise-dominated: the same 2(1 − ρ)λ/σ² as heavy ball
    lam, s2 = 1.0, 1e8
    assert sgd_nesterov_ms_max_lr(1, lam, s2, None, 0.9) == pytest.approx(
        sgd_momentum_ms_max_lr(1, lam, s2, None, 0.9), rel=1e-6)
    with pytest.raises(ValueError, match="momentum"):
        sgd_nesterov_ms_max_lr(4, 1.0, 1.0, 100, 1.0)


def test_effective_curvature():
    lam, curve = 0.5, np.array([0.5, 0.6, 2.0, 40.0])
    hb = momentum_effective_curvature(lam, curve, 0.9)
    np.testing.assert_allclose(hb, lam + 19 * (curve - lam), rtol=1e-13)
    nv = momentum_effective_curvature(lam, curve, 0.9, nesterov=True)
    s2 = lam * (curve - lam)                     # σ² at B = 1, N = None
    alpha = np.array([sgd_nesterov_ms_max_lr(1, lam, s, None, 0.9) for s in s2])
    np.testing.assert_allclose(nv, momentum_factor(0.9, "nesterov") / alpha, rtol=1e-12)
    assert nv[0] == pytest.approx(lam)
    np.testing.assert_allclose(momentum_effective_curvature(lam, curve, 0.0, nesterov=True), curve)
    assert isinstance(momentum_effective_curvature(lam, 0.7, 0.5, nesterov=True), float)
    # a batch curvature below λ (a negative variance) is no noise in both conventions,
    # never an amplified curvature below λ (heavy ball gave 1 + 19·(0.5 − 1) = −8.5)
    for nest in (False, True):
        assert momentum_effective_curvature(1.0, 0.5, 0.9, nesterov=nest) == pytest.approx(1.0)


def _enumerated_threshold(X, B, rho):
    """Exact α* from every batch: T = mean over subsets of A_S ⊗ A_S on the state (e, v),
    A_S = [[I − α(1+ρ)H_S, −αρ²I], [H_S, ρI]]; bisection on ρ(T) − 1."""
    N, d = X.shape
    Hs = np.einsum("ni,nj->nij", X, X)
    subsets = [list(s) for s in combinations(range(N), B)]
    I = np.eye(d)

    def radius(a):
        T = 0.0
        for S in subsets:
            HS = Hs[S].mean(0)
            A = np.block([[I - a * (1 + rho) * HS, -a * rho ** 2 * I], [HS, rho * I]])
            T = T + np.kron(A, A)
        return np.max(np.abs(np.linalg.eigvals(T / len(subsets))))

    lam = np.linalg.eigvalsh(Hs.mean(0))[-1]
    lo, hi = 1e-4, 2 * (1 + rho) / ((1 + 2 * rho) * lam) * (1 + 1e-9)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if radius(mid) < 1 else (lo, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("rho", [0.6, 0.9])
def test_oracle_matches_subset_enumeration(rho):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((6, 3)) * np.array([2.0, 1.0, 0.5])
    for B in (1, 2, 6):
        exact = _enumerated_threshold(X, B, rho)
        got = ms_stability_threshold(X, B, momentum=rho, nesterov=True)
        assert got.method == "brentq" and got.nesterov
        assert got.alpha == pytest.approx(exact, rel=1e-7)
    with pytest.raises(ValueError, match="pencil"):
        ms_stability_threshold(X, 2, momentum=rho, method="pencil", nesterov=True)


def test_one_dimension_closed_form_is_exact():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(50) * rng.uniform(0.5, 2, 50)
    h = x ** 2
    s2 = np.var(h, ddof=1)
    for rho in (0.5, 0.9):
        for B in (1, 3, 10, 50):
            exact = ms_stability_threshold(x[:, None], B, momentum=rho, nesterov=True).alpha
            assert sgd_nesterov_ms_max_lr(B, h.mean(), s2, 50, rho) == pytest.approx(exact, rel=1e-8)


def test_closed_form_within_5_percent_on_spiked_least_squares():
    """One direction 10× the others (the directional model's premise), N = 200, d = 8."""
    N = 200
    X, lam, s2 = spiked_least_squares(N=N, d=8)
    r = [sgd_nesterov_ms_max_lr(B, lam, s2, N, 0.9)
         / ms_stability_threshold(X, B, momentum=0.9, nesterov=True).alpha
         for B in (1, 4, 16, 64, 200)]
    assert max(abs(np.array(r) - 1)) < 0.05, np.round(r, 3)
    # heavy ball's closed form at the same ρ is far off for Nesterov at large B
    assert sgd_momentum_ms_max_lr(200, lam, s2, N, 0.9) / ms_stability_threshold(
        X, 200, momentum=0.9, nesterov=True).alpha > 2.0


def test_extreme_scales_keep_the_noise_dominated_limit():
    """σ²/λ² beyond the float range of the quadratic's coefficients: the limit is the
    noise-dominated 2(1 − ρ)λ/σ² (heavy ball and Nesterov alike), not 0."""
    from rmt.lr import sgd_momentum_ms_max_lr

    c = 1 / 8 - 1 / 100
    for lam, s2 in ((1.0, 1e308), (1e-300, 1.0), (1.0, 1e160)):
        expect = 2 * (1 - 0.5) * lam / (c * s2)
        assert sgd_nesterov_ms_max_lr(8, lam, s2, 100, 0.5) == pytest.approx(expect, rel=1e-9)
        assert sgd_momentum_ms_max_lr(8, lam, s2, 100, 0.5) == pytest.approx(expect, rel=1e-9)


def test_nesterov_limit_keeps_its_digits_as_momentum_approaches_one():
    """c = 2(1 − ρ²) was formed as 1 − ρ·ρ, which loses 1 − ρ's last digits for ρ within
    ~1e-8 of 1 (5e-10 relative at ρ = 1 − 1e-9; an outside audit). The reference is the
    boundary's positive root, a·u² + b·u − c = 0 (`rmt.lr._nesterov_alpha`'s docstring),
    in 60-digit arithmetic."""
    from mpmath import mp, mpf, sqrt

    from rmt.lr import sgd_nesterov_ms_max_lr

    mp.dps = 60
    for rho in (1 - 1e-6, 1 - 1e-9, 1 - 1e-12):
        for s2 in (1e3, 1e50):
            r, x = mpf(rho), mpf(s2)                  # λ = 1, B = 1, N = ∞: x = σ²/λ² = s²
            a = r * (1 + 2 * r) * (1 + x)
            b = (1 + r) * x + (1 - r - 4 * r * r)
            c = 2 * (1 - r) * (1 + r)
            exact = (sqrt(b * b + 4 * a * c) - b) / (2 * a) if b < 0 else 2 * c / (b + sqrt(b * b + 4 * a * c))
            got = float(sgd_nesterov_ms_max_lr(1, 1.0, s2, None, rho))
            assert abs(got - float(exact)) <= 4e-16 * float(exact), (rho, s2, got, float(exact))


def test_nesterov_noise_gain_is_the_small_noise_slope_of_the_closed_form():
    """momentum_noise_gain(ρ, nesterov=True) = (1 + ρ)(1 + 2ρ)/(1 + 3ρ) (1.4378 at ρ = 0.9,
    the docstring's 1.44), and it is the slope g_N of λ'_N = F_N/α*(σ²) ≈ λ + g_N·σ²/λ at
    σ² → 0, α* the Nesterov limit written out here in 50-digit mpmath (derivative by
    mpmath.diff); heavy ball's (1 + ρ)/(1 − ρ) for comparison."""
    import mpmath as mp
    with mp.workdps(50):
        lam = mp.mpf("1.7")
        for rho in (0.3, 0.6, 0.9):
            r = mp.mpf(rho)
            F = 2 * (1 + r) / (1 + 2 * r)

            def eff(sig2):
                b = (1 + r) * sig2 + (1 - r - 4 * r * r) * lam ** 2
                alpha = 4 * lam * (1 - r * r) / (b + mp.sqrt(b * b + 8 * r * (1 + 2 * r) * (1 - r * r)
                                                             * lam ** 2 * (lam ** 2 + sig2)))
                return F / alpha

            assert abs(eff(mp.mpf(0)) - lam) < mp.mpf("1e-40")
            slope = float(mp.diff(eff, mp.mpf(0)) * lam)
            got = momentum_noise_gain(rho, nesterov=True)
            assert got == pytest.approx(slope, rel=1e-12)
            assert got == pytest.approx((1 + rho) * (1 + 2 * rho) / (1 + 3 * rho), rel=1e-14)
            assert momentum_noise_gain(rho) == pytest.approx((1 + rho) / (1 - rho), rel=1e-14)
    assert round(momentum_noise_gain(0.9, nesterov=True), 2) == 1.44
    assert momentum_noise_gain(0.0, nesterov=True) == 1.0
