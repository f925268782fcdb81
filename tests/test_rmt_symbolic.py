"""Tests for rmt.symbolic: derived expressions against numeric rmt functions and oracles."""

import dataclasses
import math

import numpy as np
import pytest
import sympy as sp
from scipy.integrate import quad

import rmt
from rmt import lr as L
from rmt import symbolic as S

# ---------------------------------------------------------------- spiked Wigner

def test_wigner_stieltjes_branch_matches_semicircle_integral():
    d = S.derive_spiked_wigner()
    g = d.lambdify("stieltjes", "z", "v")
    for v in (0.3, 2.0):
        r = 2 * math.sqrt(v)
        for z in (1.1 * r, 3.0 * r):
            dens = lambda x: math.sqrt(max(4 * v - x * x, 0.0)) / (2 * math.pi * v)
            integral = quad(lambda x: dens(x) / (x - z), -r, r, epsabs=1e-13)[0]
            assert g(z, v) == pytest.approx(integral, rel=1e-9)
    assert d.exprs["edge"] == 2 * sp.sqrt(d.symbols["v"])


def test_wigner_outlier_and_overlap_match_rmt():
    d = S.derive_spiked_wigner()
    out = d.lambdify("outlier", "theta", "v")
    ov = d.lambdify("overlap", "theta", "v")
    thr = d.lambdify("threshold", "v")
    edge = d.lambdify("edge", "v")
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = rng.uniform(0.1, 4)
        theta = thr(v) * rng.uniform(1.01, 5)
        assert out(theta, v) == pytest.approx(theta + v / theta, rel=1e-12)  # docs/references.md
        assert rmt.spiked_wigner_outlier(theta, v) == pytest.approx(out(theta, v), rel=1e-10)
        assert rmt.spiked_wigner_overlap(theta, v) == pytest.approx(ov(theta, v), rel=1e-10)
        below = thr(v) * rng.uniform(0.05, 0.99)
        assert rmt.spiked_wigner_outlier(below, v) == pytest.approx(edge(v), rel=1e-10)
        assert rmt.spiked_wigner_overlap(below, v) == 0.0


def test_wigner_threshold_is_where_branch_takes_minus_one_over_theta():
    d = S.derive_spiked_wigner()
    g = d.lambdify("stieltjes", "z", "v")
    out = d.lambdify("outlier", "theta", "v")
    v = 1.3
    for theta in (1.2, 2.0, 5.0):  # above sqrt(v) ~ 1.14
        assert g(out(theta, v), v) == pytest.approx(-1 / theta, rel=1e-12)
    for theta in (0.5, 1.0):  # below: 1 + theta g(z) = 0 has no solution there
        assert abs(g(out(theta, v), v) + 1 / theta) > 1e-3
    cond = d.exprs["outlier_condition"]
    assert bool(cond.subs({d.symbols["theta"]: 2, d.symbols["v"]: 1}))
    assert not bool(cond.subs({d.symbols["theta"]: sp.Rational(1, 2), d.symbols["v"]: 1}))


def test_wigner_latex():
    lx = S.derive_spiked_wigner().latex
    assert "\\theta" in lx["outlier"] and "v" in lx["outlier"]
    assert "\\theta" in lx["overlap"] and "\\sqrt{v}" in lx["threshold"]
    assert "z" in lx["stieltjes"]


# ---------------------------------------------------------------- spiked Wishart

def test_mp_equation_satisfied_by_mp_density_integral():
    d = S.derive_spiked_wishart()
    sy = d.symbols
    eq = d.exprs["mp_equation"].lhs
    lo_f, hi_f = d.lambdify("edge_left", "q", "sigma2"), d.lambdify("edge_right", "q", "sigma2")
    inv = d.lambdify("companion_inverse", "m_companion", "q", "sigma2")
    for q, s2 in ((0.25, 1.0), (0.6, 2.5)):
        lo, hi = lo_f(q, s2), hi_f(q, s2)
        assert lo == pytest.approx(s2 * (1 - math.sqrt(q)) ** 2, rel=1e-12)
        assert hi == pytest.approx(s2 * (1 + math.sqrt(q)) ** 2, rel=1e-12)
        dens = lambda x: math.sqrt(max((hi - x) * (x - lo), 0.0)) / (2 * math.pi * s2 * q * x)
        for z in (1.2 * hi, 3 * hi):
            m = quad(lambda x: dens(x) / (x - z), lo, hi, epsabs=1e-13)[0]
            resid = float(eq.subs({sy["m"]: m, sy["z"]: z, sy["q"]: q, sy["sigma2"]: s2}))
            assert abs(resid) < 1e-9
            m_comp = -(1 - q) / z + q * m
            assert inv(m_comp, q, s2) == pytest.approx(z, rel=1e-9)


def test_wishart_outlier_and_overlap_match_rmt_and_references():
    d = S.derive_spiked_wishart()
    out = d.lambdify("outlier", "ell", "q", "sigma2")
    ov = d.lambdify("overlap", "ell", "q", "sigma2")
    thr = d.lambdify("threshold", "q", "sigma2")
    edge = d.lambdify("edge_right", "q", "sigma2")
    rng = np.random.default_rng(1)
    for _ in range(20):
        q, s2 = rng.uniform(0.05, 3), rng.uniform(0.2, 3)
        ell = thr(q, s2) * rng.uniform(1.01, 4)
        # docs/references.md closed forms (sigma^2 = 1 after rescaling by sigma^2)
        l1 = ell / s2
        assert out(ell, q, s2) == pytest.approx(s2 * l1 * (1 + q / (l1 - 1)), rel=1e-12)
        assert ov(ell, q, s2) == pytest.approx((1 - q / (l1 - 1) ** 2) / (1 + q / (l1 - 1)), rel=1e-12)
        assert rmt.spiked_wishart_outlier(ell, q, s2) == pytest.approx(out(ell, q, s2), rel=1e-10)
        assert rmt.spiked_wishart_overlap(ell, q, s2) == pytest.approx(ov(ell, q, s2), rel=1e-10)
        below = s2 + (thr(q, s2) - s2) * rng.uniform(0.05, 0.99)
        assert rmt.spiked_wishart_outlier(below, q, s2) == pytest.approx(edge(q, s2), rel=1e-10)
        assert rmt.spiked_wishart_overlap(below, q, s2) == 0.0


def test_wishart_latex():
    lx = S.derive_spiked_wishart().latex
    assert "\\ell" in lx["outlier"] and "\\sigma^{2}" in lx["outlier"] and "q" in lx["outlier"]
    assert "\\underline{m}" in lx["companion_inverse"]
    assert "\\sqrt{q}" in lx["threshold"]


# ---------------------------------------------------------------- momentum and lr laws

def test_momentum_factors_match_rmt_lr():
    d = S.derive_momentum_factors()
    hb = d.lambdify("heavy_ball", "rho")
    ema = d.lambdify("ema", "beta1")
    for b in np.random.default_rng(2).uniform(0, 0.99, 10):
        assert hb(b) == pytest.approx(L.momentum_factor(b, "heavy_ball"), rel=1e-13)
        assert ema(b) == pytest.approx(L.momentum_factor(b, "ema"), rel=1e-13)
    assert d.exprs["ema"].subs(d.symbols["beta1"], sp.Rational(9, 10)) == 38



def _nesterov_spectral_radius(u, rho):
    """Spectral radius of torch's noiseless Nesterov map at αh = u, by numpy eigenvalues
    of its 2×2 matrix written out here: with h = 1, v⁺ = x + ρv and
    x⁺ = x − α(x + ρv⁺) = (1 − u(1 + ρ))x − uρ²v."""
    M = np.array([[1.0 - u * (1.0 + rho), -u * rho * rho], [1.0, rho]])
    return max(abs(np.linalg.eigvals(M)))


def test_momentum_factors_include_nesterov_with_the_right_constant_term():
    """derive_momentum_factors once derived only heavy ball and EMA although
    momentum_factor's docstring credited it with every kind; Nesterov's constant term is
    ρ(1 − αh), not ρ. Oracle: the numpy spectral radius of the map crossing 1."""
    d = S.derive_momentum_factors()
    rho, alpha, h, mu = (d.symbols[k] for k in ("rho", "alpha", "h", "mu"))
    nag = d.lambdify("nesterov", "rho")
    const = sp.Poly(d.exprs["nesterov_charpoly"], mu).all_coeffs()[-1]
    assert sp.simplify(const - rho * (1 - alpha * h)) == 0
    for r in (0.1, 0.5, 0.9, 0.99):
        F = nag(r)
        assert F == pytest.approx(L.momentum_factor(r, "nesterov"), rel=1e-13)
        assert _nesterov_spectral_radius(F * (1 - 1e-6), r) < 1 < _nesterov_spectral_radius(
            F * (1 + 1e-6), r)
        # below F the map is a contraction at every αh (no earlier exit through a complex pair)
        assert all(_nesterov_spectral_radius(u, r) < 1 for u in np.linspace(1e-3, F, 200)[:-1])


def test_nesterov_mean_square_difference_is_a_symbolic_identity():
    """difference_from_closed_form was the difference at one rational point (0 there),
    documented as 0: now the symbolic difference. Oracle: the closed form substituted
    into the quadratic, simplified here, and both roots of the quadratic in mpmath at
    random points (one of them equal to the closed form)."""
    import mpmath as mp
    d = S.derive_nesterov_mean_square()
    assert d.exprs["difference_from_closed_form"] == 0
    assert "at one rational point" in S.derive_nesterov_mean_square.__doc__
    alpha, lam, c, s2, rho = (d.symbols[k] for k in ("alpha", "lam", "c", "s2", "rho"))
    quad_ = d.exprs["quadratic"]
    closed = d.exprs["alpha_max"]
    assert sp.simplify(quad_.subs(alpha, closed)) == 0
    coeffs = sp.Poly(quad_, alpha).all_coeffs()
    rng = np.random.default_rng(4)
    mp.mp.dps = 30
    for _ in range(6):
        pt = {lam: float(rng.uniform(0.1, 3)), c: float(rng.uniform(0, 1)),
              s2: float(rng.uniform(0, 10)), rho: float(rng.uniform(0.05, 0.99))}
        a, b, k = (mp.mpf(str(sp.N(q.subs(pt), 40))) for q in coeffs)
        pos = (-b + mp.sqrt(b * b - 4 * a * k)) / (2 * a)
        assert float(pos) == pytest.approx(float(closed.subs(pt)), rel=1e-12)

def test_lr_laws_match_rmt_lr_functions():
    d = S.derive_lr_laws()
    sgd = d.lambdify("sgd", "B", "N", "lam", "s2", "rho")
    sgd_inf = d.lambdify("sgd_inf", "B", "lam", "s2", "rho")
    adam = d.lambdify("adam", "B", "N", "lam", "s2", "g2", "gv", "eps", "beta1")
    adam_inf = d.lambdify("adam_inf", "B", "lam", "s2", "g2", "gv", "eps", "beta1")
    rng = np.random.default_rng(3)
    for _ in range(20):
        N = int(rng.integers(100, 10000))
        B = float(rng.integers(1, N))
        lam, s2, rho = rng.uniform(0.1, 5), rng.uniform(0.01, 30), rng.uniform(0, 0.95)
        g2, gv, eps, b1 = rng.uniform(0.01, 1), rng.uniform(0.01, 5), rng.uniform(1e-8, 1e-2), rng.uniform(0, 0.95)
        assert sgd(B, N, lam, s2, rho) == pytest.approx(
            L.sgd_max_lr(B, lam, s2, N=N, momentum=rho), rel=1e-11)
        assert sgd_inf(B, lam, s2, rho) == pytest.approx(L.sgd_max_lr(B, lam, s2, momentum=rho), rel=1e-11)
        assert adam(B, N, lam, s2, g2, gv, eps, b1) == pytest.approx(
            L.adam_max_lr(B, lam, s2, g2, gv, N=N, eps=eps, beta1=b1), rel=1e-11)
        assert adam_inf(B, lam, s2, g2, gv, eps, b1) == pytest.approx(
            L.adam_max_lr(B, lam, s2, g2, gv, eps=eps, beta1=b1), rel=1e-11)


def test_sgd_law_increasing_in_B_and_saturates_at_N():
    d = S.derive_lr_laws()
    sy = d.symbols
    assert sp.simplify(d.exprs["sgd_at_N"] - 2 * (1 + sy["rho"]) / sy["lam"]) == 0
    # d alpha / dB = 2(1+rho) lam s2 N^2 / (...)^2 > 0: check sign over random points
    dadb = d.exprs["sgd"].diff(sy["B"])
    f = sp.lambdify([sy["B"], sy["N"], sy["lam"], sy["s2"], sy["rho"]], dadb, "numpy")
    rng = np.random.default_rng(4)
    N = 1000.0
    B = rng.uniform(1, N, 200)
    assert np.all(f(B, N, rng.uniform(0.1, 5, 200), rng.uniform(0.01, 50, 200), rng.uniform(0, 0.9, 200)) > 0)


def test_scaling_exponents_exact():
    for finite in (False, True):
        e_sgd = S.lr_scaling_exponent("sgd", finite_N=finite)
        e_adam = S.lr_scaling_exponent("adam", finite_N=finite)
        assert e_sgd == sp.Integer(1) and isinstance(e_sgd, sp.Integer)
        assert e_adam == sp.Rational(1, 2) and isinstance(e_adam, sp.Rational)
    assert S.lr_scaling_exponent("SGD") == 1
    assert S.lr_scaling_exponent("sgd", regime="large") == 0
    assert S.lr_scaling_exponent("adam", regime="large") == 0


def test_scaling_exponent_bad_input():
    with pytest.raises(ValueError, match="lamb"):
        S.lr_scaling_exponent("lamb")
    with pytest.raises(TypeError, match="optimizer"):
        S.lr_scaling_exponent(3)
    with pytest.raises(TypeError, match="optimizer"):
        S.lr_scaling_exponent(["sgd"])
    with pytest.raises(ValueError, match="regime"):
        S.lr_scaling_exponent("sgd", regime="medium")


# ---------------------------------------------------------------- directional and B*

def test_directional_stability_bound_matches_sgd_max_lr():
    d = S.derive_directional_stability()
    assert d.exprs["difference_from_directional"] == 0
    amax = d.lambdify("alpha_max", "lam", "s2", "c")
    rng = np.random.default_rng(5)
    for _ in range(10):
        N = 500
        B = float(rng.integers(1, N))
        lam, s2 = rng.uniform(0.1, 5), rng.uniform(0, 30)
        c = rmt.batch_noise_factor(B, N)
        assert amax(lam, s2, c) == pytest.approx(L.sgd_max_lr(B, lam, s2, N=N), rel=1e-12)


def test_directional_mean_square_expression_is_exact_expectation():
    """Exact average over a finite mean-zero ensemble of symmetric fluctuations."""
    d = S.derive_directional_stability()
    ms = d.lambdify("mean_square", "alpha", "lam", "s2", "c")
    rng = np.random.default_rng(6)
    n, K = 6, 50
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    lam = 3.0
    H = Q @ np.diag([lam, 1.0, 0.5, 0.2, 0.1, 0.0]) @ Q.T
    u = Q[:, 0]
    E = rng.standard_normal((K, n, n))
    E = (E + E.transpose(0, 2, 1)) / 2
    E -= E.mean(0)  # exactly mean zero
    e2 = np.mean(np.sum((E @ u) ** 2, axis=1))  # = c s^2
    for alpha in (0.05, 0.2, 0.6):
        exact = np.mean([np.sum((u - alpha * (H + Ek) @ u) ** 2) for Ek in E])
        assert ms(alpha, lam, e2, 1.0) == pytest.approx(exact, rel=1e-12)
    amax = d.lambdify("alpha_max", "lam", "s2", "c")(lam, e2, 1.0)
    assert np.mean([np.sum((u - 0.99 * amax * (H + Ek) @ u) ** 2) for Ek in E]) < 1
    assert np.mean([np.sum((u - 1.01 * amax * (H + Ek) @ u) ** 2) for Ek in E]) > 1


def test_critical_batch_size_matches_and_halves_lr():
    d = S.derive_critical_batch_size()
    bs = d.lambdify("critical_batch_size", "lam", "s2")
    bsN = d.lambdify("critical_batch_size_finite_N", "N", "lam", "s2")
    rng = np.random.default_rng(7)
    for _ in range(10):
        lam, s2, N = rng.uniform(0.1, 3), rng.uniform(0.1, 100), 1e5
        assert bs(lam, s2) == pytest.approx(L.critical_batch_size(lam, s2), rel=1e-12)
        assert L.sgd_max_lr(bsN(N, lam, s2), lam, s2, N=N) == pytest.approx(1 / lam, rel=1e-10)
        assert L.sgd_max_lr(bs(lam, s2), lam, s2) == pytest.approx(1 / lam, rel=1e-10)
    assert "\\lambda" in d.latex["critical_batch_size"] and "s^{2}" in d.latex["critical_batch_size"]


# ---------------------------------------------------------------- result object

def test_derivation_is_frozen_cached_and_checks_keys():
    d = S.derive_spiked_wigner()
    assert S.derive_spiked_wigner() is d
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.name = "x"
    with pytest.raises(TypeError):
        d.exprs["outlier"] = 0
    with pytest.raises(KeyError):
        d.lambdify("nope", "theta")
    with pytest.raises(KeyError):
        d.lambdify("outlier", "theta", "w")
    assert all(isinstance(s, str) and s for s in d.latex.values())
