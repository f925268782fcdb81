"""Tests for rmt.lr: contract forms, anchors, stability oracles, vectorisation, bad input."""

import itertools
import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

import rmt
from rmt import lr as L


def _random_points(n=25, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        N = int(rng.integers(50, 5000))
        B = float(rng.integers(1, N + 1))
        yield dict(B=B, N=N, lam=float(rng.uniform(0.1, 10)), s2=float(rng.uniform(0, 50)),
                   rho=float(rng.uniform(0, 0.99)))


# ---------------------------------------------------------------- public contract forms

def test_sgd_max_lr_contract_form():
    for p in _random_points():
        c = rmt.batch_noise_factor(p["B"], p["N"])
        expected = 2 * (1 + p["rho"]) / (p["lam"] + c * p["s2"] / p["lam"])
        got = L.sgd_max_lr(p["B"], p["lam"], p["s2"], N=p["N"], momentum=p["rho"])
        assert type(got) is float
        assert got == pytest.approx(expected, rel=1e-12)
        # equivalent saturating form (2(1+rho)/lam) / (1 + B* c)
        bstar = L.critical_batch_size(p["lam"], p["s2"])
        assert got == pytest.approx(2 * (1 + p["rho"]) / p["lam"] / (1 + bstar * c), rel=1e-12)


def test_adam_max_lr_contract_form():
    rng = np.random.default_rng(1)
    for _ in range(25):
        N = int(rng.integers(100, 10000))
        B = float(rng.integers(1, N))
        lam, s2 = rng.uniform(0.1, 5), rng.uniform(0, 20)
        g2, gv, eps, b1 = rng.uniform(0, 1), rng.uniform(0, 5), rng.uniform(0, 1e-3), rng.uniform(0, 0.99)
        c = 1 / B - 1 / N
        expected = 2 * (1 + b1) / (1 - b1) * (math.sqrt(g2 + c * gv) + eps) / (lam + c * s2 / lam)
        got = L.adam_max_lr(B, lam, s2, g2, gv, N=N, eps=eps, beta1=b1)
        assert type(got) is float
        assert got == pytest.approx(expected, rel=1e-12)


def test_ema_factor_38_at_0p9_and_heavy_ball_factor():
    assert L.momentum_factor(0.9, "ema") == pytest.approx(38.0, rel=1e-12)
    assert L.momentum_factor(0.9, "heavy_ball") == pytest.approx(3.8, rel=1e-12)
    # adam with no noise, lam'=lam: 38 * sqrt(g2) / lam
    assert L.adam_max_lr(10, 2.0, 0.0, 0.04, 1.0, N=10, beta1=0.9) == pytest.approx(38 * 0.2 / 2.0)


@pytest.mark.parametrize("kind", ["heavy_ball", "ema"])
def test_momentum_factor_is_the_spectral_stability_boundary(kind):
    """Spectral radius of the two-step iteration on f = h x²/2 crosses 1 at alpha*h = F."""
    h = 1.7
    for beta in (0.0, 0.3, 0.9):
        F = L.momentum_factor(beta, kind)

        def radius(alpha):
            if kind == "heavy_ball":
                M = np.array([[1 + beta - alpha * h, -beta], [1.0, 0.0]])
            else:
                M = np.array([[1 - alpha * (1 - beta) * h, -alpha * beta], [(1 - beta) * h, beta]])
            return np.max(np.abs(np.linalg.eigvals(M)))

        assert radius(0.99 * F / h) < 1.0
        assert radius(1.01 * F / h) > 1.0


def test_min_damping_and_critical_batch_size():
    assert L.min_damping(0.1, 3.0) == pytest.approx(0.15)
    assert L.critical_batch_size(2.0, 12.0) == pytest.approx(3.0)
    # damped step on a direction with true curvature 0 and batch curvature lam_noise:
    # multiplier 1 - lr*lam/delta has modulus < 1 iff delta > lr*lam/2
    lr, lam = 0.3, 5.0
    d = L.min_damping(lr, lam)
    assert abs(1 - lr * lam / (1.01 * d)) < 1 < abs(1 - lr * lam / (0.99 * d))


def test_heavy_ball_anchor_and_optimal_rate():
    lr, rho = L.heavy_ball(1.0, 0.01)
    assert lr == pytest.approx(3.306, abs=5e-4)
    assert rho == pytest.approx(0.669, abs=5e-4)
    # oracle: worst-case spectral radius over the spectrum [mu, L] equals sqrt(rho),
    # and perturbing lr or rho makes it worse (Polyak optimality)
    mu, Lmax = 0.01, 1.0
    lams = np.linspace(mu, Lmax, 400)

    def worst(a, b):
        return max(np.max(np.abs(np.roots([1, -(1 + b - a * x), b]))) for x in lams)

    assert worst(lr, rho) == pytest.approx(math.sqrt(rho), rel=1e-4)
    for a, b in [(lr * 1.05, rho), (lr * 0.95, rho), (lr, rho * 1.05), (lr, rho * 0.95)]:
        assert worst(a, b) > worst(lr, rho) + 1e-4
    lr_p, rho_p = L.heavy_ball(1.0, 0.01, variant="paper")
    assert lr_p == lr and rho_p == pytest.approx(math.sqrt(rho), rel=1e-12)
    for (a, b) in [(lr, rho), (lr_p, rho_p)]:
        assert a * Lmax < 2 * (1 + b)  # within the stability limit


# ---------------------------------------------------------------- laws in B

def test_sgd_increasing_in_B_saturates_at_N_and_replacement_form():
    N, lam, s2 = 1000, 2.0, 400.0
    Bs = np.arange(1, N + 1)
    a = L.sgd_max_lr(Bs, lam, s2, N=N)
    assert a.shape == Bs.shape
    assert np.all(np.diff(a) > 0)
    assert a[-1] == 2 / lam  # exactly: c(N, N) = 0
    bstar = L.critical_batch_size(lam, s2)
    a_rep = L.sgd_max_lr(Bs, lam, s2, N=N, replacement=True)
    # with replacement c = (1 − 1/N)/B: B* shrinks by (1 − 1/N)
    np.testing.assert_allclose(a_rep, (2 / lam) * Bs / (Bs + bstar * (1 - 1 / N)), rtol=1e-12)
    np.testing.assert_allclose(L.sgd_max_lr(Bs, lam, s2), (2 / lam) * Bs / (Bs + bstar),
                               rtol=1e-12)                                      # N=None
    # linear for B << B*, half the saturated value at B = B*
    assert L.sgd_max_lr(2.0, lam, s2) / L.sgd_max_lr(1.0, lam, s2) == pytest.approx(2, rel=0.01)
    assert L.sgd_max_lr(bstar, lam, s2) == pytest.approx(1 / lam, rel=1e-12)


def test_small_batch_slopes_sgd_1_adam_half():
    B = np.array([1e-4, 2e-4])
    a = L.sgd_max_lr(B, 1.0, 100.0)
    assert math.log(a[1] / a[0]) / math.log(2) == pytest.approx(1.0, abs=1e-4)
    a = L.adam_max_lr(B, 1.0, 100.0, 0.01, 1.0)
    assert math.log(a[1] / a[0]) / math.log(2) == pytest.approx(0.5, abs=1e-3)
    # large-batch saturation of adam at 2*sqrt(g2)/lam
    assert L.adam_max_lr(1e12, 1.0, 100.0, 0.01, 1.0) == pytest.approx(0.2, rel=1e-6)


def test_vectorised_matches_scalar_and_keeps_shape():
    Bs = np.array([[1, 2, 3], [10, 20, 64]])
    for f, args in [(L.sgd_max_lr, (1.5, 7.0)), (L.batch_curvature, (1.5, 7.0)),
                    (L.adam_max_lr, (1.5, 7.0, 0.1, 2.0)),
                    (L.mccandlish_optimal_lr, (0.5, 30.0))]:
        arr = f(Bs, *args, N=64)
        assert isinstance(arr, np.ndarray) and arr.shape == Bs.shape
        loop = np.array([[f(float(b), *args, N=64) for b in row] for row in Bs])
        np.testing.assert_allclose(arr, loop, rtol=1e-14)
    np.testing.assert_allclose(L.noise_factor(Bs, 64),
                               [[rmt.batch_noise_factor(b, 64) for b in r] for r in Bs])
    assert type(L.sgd_max_lr(np.float64(4.0), 1.0, 1.0)) is float
    assert type(L.sgd_max_lr(np.array(4.0), 1.0, 1.0)) is float


def test_isotropic_clipped_model_factor_two():
    lam, sigma2, P = 1.0, 0.01, 200
    Bs = np.arange(1, 2001)
    v = P * sigma2 / Bs
    clipped = L.sgd_max_lr_isotropic(Bs, lam, sigma2, P)
    unclipped = L.sgd_max_lr_isotropic(Bs, lam, sigma2, P, clip=False)
    np.testing.assert_allclose(unclipped, L.sgd_max_lr(Bs, lam, P * sigma2), rtol=1e-14)
    above = lam > np.sqrt(v)
    np.testing.assert_allclose(clipped[above], unclipped[above], rtol=1e-14)
    np.testing.assert_allclose(clipped[~above], 2 / (2 * np.sqrt(v[~above])), rtol=1e-14)
    # above threshold alpha lies in [1/lam, 2/lam]: at most a factor two
    assert np.all(clipped[above] >= 1 / lam) and np.all(clipped[above] <= 2 / lam)
    b_thr = P * sigma2 / lam**2  # v = lam^2
    assert L.sgd_max_lr_isotropic(b_thr, lam, sigma2, P) == pytest.approx(1 / lam, rel=1e-12)
    # edge continuous at the threshold
    top = L.isotropic_batch_curvature(np.array([b_thr * (1 - 1e-9), b_thr * (1 + 1e-9)]), lam, sigma2, P)
    assert top[0] == pytest.approx(top[1], rel=1e-6)


# ---------------------------------------------------------------- rescaling, damping

def test_rescale_round_trip_and_branch():
    rng = np.random.default_rng(3)
    for _ in range(20):
        N = 10000
        lam, s2 = rng.uniform(0.5, 5), rng.uniform(0, 100)
        bc = float(rng.integers(max(2, int(s2 / lam**2) + 2), 5000))  # lam above sqrt(c s2)
        b = float(rng.integers(1, N))
        measured = L.batch_curvature(bc, lam, s2, N=N)
        assert L.underlying_curvature(measured, bc, s2, N=N) == pytest.approx(lam, rel=1e-10)
        assert L.rescale_curvature(measured, bc, b, s2, N=N) == pytest.approx(
            L.batch_curvature(b, lam, s2, N=N), rel=1e-10)
    # below the model minimum 2 sqrt(c s2): strict raises, non-strict gives lam'/2
    with pytest.raises(ValueError, match="lam_measured"):
        L.underlying_curvature(1.0, 4, 16.0)
    assert L.underlying_curvature(1.0, 4, 16.0, strict=False) == 0.5
    # exactly at the threshold λ² = c·s² batch_curvature rounds one ulp below 2λ: the
    # round trip returns λ, not an error
    at = L.batch_curvature(1, 1e-4, 1e-8)
    assert L.underlying_curvature(at, 1, 1e-8) == pytest.approx(1e-4, rel=1e-7)


def test_min_damping_at_batch_keeps_delta_times_B():
    Bs = np.array([8, 16, 64, 512])
    d = L.min_damping_at_batch(0.1, 2.0, 32, Bs)
    np.testing.assert_allclose(d * Bs, 0.1 * 2.0 / 2 * 32, rtol=1e-14)
    d_sc = L.min_damping_at_batch(0.1, 2.0, 32, Bs, power=0.5)
    # semicircle edge 2 sqrt(P c sigma2) scaling
    edge = L.isotropic_batch_curvature(Bs, 1e-9, 1.0, 100.0)
    edge_ref = L.isotropic_batch_curvature(32, 1e-9, 1.0, 100.0)
    np.testing.assert_allclose(d_sc, 0.1 * 2.0 * edge / edge_ref / 2, rtol=1e-10)
    with pytest.raises(ValueError, match="B_ref"):
        L.min_damping_at_batch(0.1, 2.0, 64, 8, N=64)


# ---------------------------------------------------------------- McCandlish

def _quadratic_problem(seed=4, d=5, N=40):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d))
    H = A @ A.T + 0.5 * np.eye(d)
    grads = rng.standard_normal((N, d)) * rng.uniform(0.5, 2, d) + rng.standard_normal(d)
    return H, grads


def test_mccandlish_optimal_lr_minimises_expected_one_step_loss():
    H, grads = _quadratic_problem()
    N = len(grads)
    G = grads.mean(0)
    Sigma = np.cov(grads.T, bias=True)  # with replacement: Cov(g_B) = Sigma_pop / B
    eps_max = L.mccandlish_eps_max(G @ G, G @ H @ G)
    b_noise = L.mccandlish_b_noise(np.trace(H @ Sigma), G @ H @ G)
    for B in (1, 4, 32):
        second = np.outer(G, G) + Sigma / B

        def expected_change(eps):  # E[L(w - eps g_B)] - L(w) for the quadratic
            return -eps * G @ G + 0.5 * eps**2 * np.trace(H @ second)

        best = minimize_scalar(expected_change, bounds=(0, 10 * eps_max), method="bounded",
                               options={"xatol": 1e-12}).x
        assert L.mccandlish_optimal_lr(B, eps_max, b_noise) == pytest.approx(best, rel=1e-6)
    assert L.mccandlish_b_simple(np.trace(Sigma), G @ G) == pytest.approx(np.trace(Sigma) / (G @ G))
    assert L.mccandlish_optimal_lr(N, eps_max, b_noise, N=N) == pytest.approx(eps_max)


def test_mccandlish_two_batch_estimate_exact_by_enumeration():
    """E|g_B|² over all subsets (without replacement) recovers |G|² and tr S² (ddof=1)."""
    rng = np.random.default_rng(5)
    N, d = 7, 3
    grads = rng.standard_normal((N, d)) + 0.7
    G = grads.mean(0)
    trS = np.trace(np.cov(grads.T, ddof=1))

    def mean_sq(B):
        return np.mean([np.sum(grads[list(s)].mean(0) ** 2)
                        for s in itertools.combinations(range(N), B)])

    g2, ts = L.mccandlish_two_batch_estimate(2, mean_sq(2), 5, mean_sq(5), N=N)
    assert g2 == pytest.approx(G @ G, rel=1e-12)
    assert ts == pytest.approx(trS, rel=1e-12)


def test_malladi_scaling():
    out = L.malladi_adam_scaling(4.0, 1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    assert out["lr"] == pytest.approx(2e-3)
    assert out["beta1"] == pytest.approx(0.6)
    assert out["beta2"] == pytest.approx(0.996)
    assert out["eps"] == pytest.approx(5e-9)
    with pytest.raises(ValueError, match="beta1"):
        L.malladi_adam_scaling(20.0, 1e-3, beta1=0.9)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("call, name", [
    (lambda: L.sgd_max_lr(0, 1.0, 1.0), "B"),
    (lambda: L.sgd_max_lr(-3, 1.0, 1.0), "B"),
    (lambda: L.sgd_max_lr(65, 1.0, 1.0, N=64), "B"),
    (lambda: L.sgd_max_lr([1, 65], 1.0, 1.0, N=64), "B"),
    (lambda: L.sgd_max_lr([1, float("nan")], 1.0, 1.0), "B"),
    (lambda: L.sgd_max_lr([0, 2], 1.0, 1.0), "B"),
    (lambda: L.sgd_max_lr(8, 0.0, 1.0), "lam"),
    (lambda: L.sgd_max_lr(8, -1.0, 1.0), "lam"),
    (lambda: L.sgd_max_lr(8, float("nan"), 1.0), "lam"),
    (lambda: L.sgd_max_lr(8, 1.0, -1.0), "s2"),
    (lambda: L.sgd_max_lr(8, 1.0, 1.0, N=-5), "N"),
    (lambda: L.sgd_max_lr(8, 1.0, 1.0, momentum=1.0), "momentum"),
    (lambda: L.sgd_max_lr(8, 1.0, 1.0, momentum=-0.1), "momentum"),
    (lambda: L.sgd_max_lr(8, 1.0, 1.0, momentum_kind="polyak"), "kind"),
    (lambda: L.critical_batch_size(0.0, 1.0), "lam"),
    (lambda: L.critical_batch_size(1.0, -1.0), "s2"),
    (lambda: L.adam_max_lr(8, 1.0, 1.0, -0.1, 1.0), "grad_mean_sq"),
    (lambda: L.adam_max_lr(8, 1.0, 1.0, 0.1, float("nan")), "grad_var"),
    (lambda: L.adam_max_lr(8, 1.0, 1.0, 0.1, 1.0, eps=-1.0), "eps"),
    (lambda: L.adam_max_lr(8, 1.0, 1.0, 0.1, 1.0, beta1=1.0), "beta1"),
    (lambda: L.min_damping(0.0, 1.0), "lr"),
    (lambda: L.min_damping(0.1, -1.0), "lam_noise"),
    (lambda: L.heavy_ball(0.0, 0.01), "lam_max"),
    (lambda: L.heavy_ball(1.0, -0.01), "lam_min"),
    (lambda: L.heavy_ball(1.0, 2.0), "lam_min"),
    (lambda: L.heavy_ball(1.0, 0.1, variant="nesterov"), "variant"),
    (lambda: L.isotropic_batch_curvature(8, 1.0, 1.0, 0), "P"),
    (lambda: L.isotropic_batch_curvature(8, 1.0, -1.0, 10), "sigma2"),
    (lambda: L.mccandlish_b_noise(1.0, 0.0), "g_h_g"),
    (lambda: L.mccandlish_two_batch_estimate(8, 1.0, 4, 2.0), "B_small"),
])
def test_bad_input_value_errors_name_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize("call", [
    lambda: L.sgd_max_lr("8", 1.0, 1.0),
    lambda: L.sgd_max_lr(8, None, 1.0),
    lambda: L.heavy_ball(True, 0.1),
    lambda: L.sgd_max_lr(8, 1.0, 1.0, replacement="yes"),
])
def test_bad_input_type_errors(call):
    with pytest.raises(TypeError):
        call()


# ---------------------------------------------------------------- almost-sure (Lyapunov) limit

def _gauss_log_mean(alpha, lam, var):
    """E log|1 − αh|, h ~ N(λ, var), by quadrature (the oracle for ρ = 0)."""
    from scipy import integrate, stats
    sd = math.sqrt(var)
    f = lambda h: math.log(abs(1.0 - alpha * h)) * stats.norm.pdf(h, lam, sd)
    pole = 1.0 / alpha
    a, b = lam - 12 * sd, lam + 12 * sd
    pts = [pole] if a < pole < b else None
    return integrate.quad(f, a, b, points=pts, limit=400)[0]


def test_lyapunov_exponent_at_zero_momentum_matches_quadrature():
    from rmt.lr import heavy_ball_lyapunov_exponent
    lam, var, T = 0.3, 0.8, 40000
    for alpha in (0.5, 2.0, 4.0):
        g = heavy_ball_lyapunov_exponent(alpha, lam, var, 0.0, steps=T, seed=3)
        # per-step terms log|1 − αh_t| have sd ≲ 1.5 here: 4 standard errors
        assert abs(g - _gauss_log_mean(alpha, lam, var)) < 4 * 1.5 / math.sqrt(T)


def test_almost_sure_limit_oracles():
    from scipy.optimize import brentq

    from rmt.lr import sgd_momentum_as_max_lr, sgd_momentum_ms_max_lr
    lam, s2, N = 0.266, 6.38, 1797
    # ρ = 0: the root of E log|1 − αh| = 0 (quadrature), within the path's sampling error
    B = 32
    var = (1 / B - 1 / N) * s2
    root = brentq(lambda a: _gauss_log_mean(a, lam, var), 0.5, 50.0)
    got = sgd_momentum_as_max_lr(B, lam, s2, N, 0.0, steps=40000, seed=1)
    assert got == pytest.approx(root, rel=0.05)
    # no noise: the deterministic heavy-ball limit 2(1 + ρ)/λ
    for m in (0.0, 0.5, 0.9):
        assert sgd_momentum_as_max_lr(8, lam, 0.0, None, m, steps=2000) == pytest.approx(
            2 * (1 + m) / lam, rel=1e-4)
    # Jensen: a typical path is stable wherever the mean square is
    Bs = np.array([8, 128])
    for m in (0.0, 0.9):
        a_s = sgd_momentum_as_max_lr(Bs, lam, s2, N, m, steps=8000)
        assert np.all(a_s >= sgd_momentum_ms_max_lr(Bs, lam, s2, N, m) * 0.98)
    # a 2-D B keeps its shape, entry by entry the scalar limit
    grid = np.array([[8, 32], [128, 512]])
    a2 = sgd_momentum_as_max_lr(grid, lam, s2, N, 0.5, steps=2000)
    assert a2.shape == (2, 2)
    assert a2[1, 0] == sgd_momentum_as_max_lr(128, lam, s2, N, 0.5, steps=2000)
    with pytest.raises(ValueError):
        sgd_momentum_as_max_lr(8, lam, s2, N, 1.0)


@pytest.mark.parametrize("replacement", [False, True])
def test_array_batch_sizes_give_the_scalar_noise_factor(replacement):
    """Every lr function takes B as an array; with replacement and finite N the array
    path once gave 1/B instead of (1 − 1/N)/B (7 % off sgd_max_lr at N = 10, B = 4)."""
    N, Bs = 10, np.array([1.0, 4.0, 10.0])
    scalar = [rmt.batch_noise_factor(B, N, replacement=replacement) for B in Bs]
    closed = (1 - 1 / N) / Bs if replacement else 1 / Bs - 1 / N
    np.testing.assert_allclose(scalar, closed, rtol=1e-15)
    np.testing.assert_allclose(L.noise_factor(Bs, N, replacement), closed, rtol=1e-15)
    np.testing.assert_allclose(L.sgd_max_lr(Bs, 1.0, 10.0, N, replacement=replacement),
                               [L.sgd_max_lr(B, 1.0, 10.0, N, replacement=replacement)
                                for B in Bs], rtol=1e-15)


def _gauss_log_mean_standardised(u, x):
    """E log|1 − uη|, η ~ N(1, x), by quadrature in z = (η − 1)/√x with the pole split
    out (usable for x ≫ 1, where the integrand in η is too wide for _gauss_log_mean)."""
    from scipy import integrate
    s = u * math.sqrt(x)
    f = lambda z: math.log(abs(1.0 - u - s * z)) * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    pole = (1.0 - u) / s
    edges = sorted({-12.0, 12.0, *([pole] if -12.0 < pole < 12.0 else [])})
    return sum(integrate.quad(f, a, b, limit=400, epsabs=1e-13, epsrel=1e-12)[0]
               for a, b in zip(edges[:-1], edges[1:]))


def _mc_lyapunov(alphas, lam, var, rho, *, paths=400, steps=4000, burn=400, seed=11):
    """Independent Lyapunov estimate: many heavy-ball paths in parallel after a burn-in,
    the same draws for every α. Returns (mean γ, its standard error) per α."""
    rng = np.random.default_rng(seed)
    a = np.asarray(alphas, dtype=float)[:, None]
    x, xp = np.ones((a.shape[0], paths)), np.zeros((a.shape[0], paths))
    acc = np.zeros_like(x)
    for t in range(burn + steps):
        h = lam + math.sqrt(var) * rng.standard_normal(paths)
        x, xp = (1 + rho - a * h) * x - rho * xp, x
        n = np.hypot(x, xp)
        x, xp = x / n, xp / n
        if t >= burn:
            acc += np.log(n)
    g = acc / steps
    return g.mean(axis=1), g.std(axis=1) / math.sqrt(paths)


def test_almost_sure_limit_with_large_noise():
    """With x = c·s²/λ² ≳ 10⁴ the bracket's test of γ at half the mean-square limit (where
    the true γ is O(1/x), below the path's sampling error) failed: "no stable step found
    below the mean-square limit". The mean-square limit is now the trusted lower end.
    Oracles: ρ = 0 the root of E log|1 − uη| = 0 by quadrature (1.5574·10⁻³ at x = 10⁶);
    ρ > 0 an independent many-path Monte Carlo with burn-in changing sign across it."""
    from scipy.optimize import brentq
    lam = 2.0
    x = 1e6
    u = brentq(lambda v: _gauss_log_mean_standardised(v, x), 1e-4, 1e-2, xtol=1e-15)
    assert u == pytest.approx(1.5574e-3, rel=1e-4)
    got = L.sgd_momentum_as_max_lr(1, lam, x * lam * lam, None, 0.0, seed=0)
    assert got == pytest.approx(u / lam, rel=0.05)      # seed spread about 1 % here
    for rho, x in ((0.9, 3e4), (0.5, 1e5)):
        var = x * lam * lam
        got = L.sgd_momentum_as_max_lr(1, lam, var, None, rho, seed=0)
        assert got >= L.sgd_momentum_ms_max_lr(1, lam, var, None, rho)
        g, se = _mc_lyapunov([0.85 * got, 1.15 * got], lam, var, rho)
        assert g[0] + 4 * se[0] < 0 < g[1] - 4 * se[1]


def test_almost_sure_limit_is_never_below_the_mean_square_limit():
    """The result is at least the mean-square limit (Jensen), by construction, also where
    the estimated γ would have put it a hair below (no noise: 2(1 + ρ)/λ to 10⁻⁶)."""
    lam = 0.7
    for m in (0.0, 0.5, 0.9):
        ms = L.sgd_momentum_ms_max_lr(8, lam, 0.0, None, m)
        a = L.sgd_momentum_as_max_lr(8, lam, 0.0, None, m, steps=2000)
        assert ms <= a <= ms * (1 + 2e-6)
        assert ms == pytest.approx(2 * (1 + m) / lam, rel=1e-15)


def test_almost_sure_limit_seed_is_validated_and_a_generator_gives_one_path():
    with pytest.raises(ValueError, match=r"^seed must be an int seed >= 0"):
        L.sgd_momentum_as_max_lr(8, 1.0, 2.0, 64, 0.5, steps=50, seed=-1)
    with pytest.raises(TypeError, match=r"^seed must be"):
        L.sgd_momentum_as_max_lr(8, 1.0, 2.0, 64, 0.5, steps=50, seed=1.5)
    with pytest.raises(ValueError, match=r"^seed must be"):
        L.heavy_ball_lyapunov_exponent(0.5, 1.0, 1.0, 0.5, steps=50, seed=-1)
    # a Generator yields one int seed (as_seed's rule), and every α of the call shares its path
    drawn = int(np.random.default_rng(5).integers(0, 2**63 - 1))
    a = L.sgd_momentum_as_max_lr(8, 1.0, 2.0, 64, 0.5, steps=500,
                                 seed=np.random.default_rng(5))
    assert a == L.sgd_momentum_as_max_lr(8, 1.0, 2.0, 64, 0.5, steps=500, seed=drawn)
    assert math.isfinite(L.sgd_momentum_as_max_lr(8, 1.0, 2.0, 64, 0.5, steps=500, seed=None))


@pytest.mark.parametrize("B, lam, s2, rho", [
    (1, 1e300, 1e308, 0.9), (1, 1e150, 1e308, 0.99), (1, 1.0, 1e300, 1 - 1e-12),
    (4, 1.0, 1e308, 0.9), (1, 1e-10, 1e300, 0.9), (3, 1e-200, 1e-10, 0.5),
    (1, 2.0, 3.0, 0.9)])
def test_heavy_ball_and_adam_mean_square_limits_are_scale_safe(B, lam, s2, rho):
    """gain·c·s² overflowed float64 (λ = 1e300, s² = 1e308, ρ = 0.9) and both functions
    returned 0.0 for a limit of 3.8e-300. Oracle: the closed form
    2(1 + ρ)λ/(λ² + (1 + ρ)/(1 − ρ)·c·s²) in 50-digit mpmath (Adam's: that over 1 − ρ)."""
    import mpmath as mp
    mp.mp.dps = 50
    L_, S_, r = mp.mpf(lam), mp.mpf(s2), mp.mpf(rho)
    c = mp.mpf(1) / B
    hb = 2 * (1 + r) * L_ / (L_**2 + (1 + r) / (1 - r) * c * S_)
    got = L.sgd_momentum_ms_max_lr(B, lam, s2, None, rho)
    # abs=0: pytest.approx's default abs=1e-12 would accept any answer ~1e-300 (one off by
    # the gain 19 passed); rel=1e-9 still holds for the subnormal results (≥ 39 bits here)
    assert got > 0 and got == pytest.approx(float(hb), rel=1e-9, abs=0)
    assert L.adam_ms_max_lr(B, lam, s2, None, rho) == pytest.approx(float(hb / (1 - r)),
                                                                     rel=1e-9, abs=0)


def test_mean_square_limit_at_B_equal_N_ignores_an_overflowing_noise_ratio():
    """c = 0 (B = N) with s²/λ = inf: no noise, the deterministic 2(1 + ρ)/λ, not 0·inf."""
    got = L.sgd_momentum_ms_max_lr(np.array([1, 10]), 1e-10, 1e300, 10, 0.9)
    assert got[1] == pytest.approx(3.8e10, rel=1e-15)
    assert got[0] == pytest.approx(3.8 * 1e-10 / (19 * 0.9 * 1e300), rel=1e-12)


def test_adam_max_lr_refuses_an_infinite_preconditioner():
    """grad_mean_sq + c·grad_var = 0 with eps = 0 made D = 1/0 and returned 0.0."""
    for args, kw in (((10, 1.0, 1.0, 0.0, 5.0), dict(N=10)),
                     ((8, 1.0, 1.0, 0.0, 0.0), {}),
                     (([5, 10], 1.0, 1.0, 0.0, 5.0), dict(N=10))):
        with pytest.raises(ValueError, match="grad_mean_sq.*eps"):
            L.adam_max_lr(*args, **kw)
    # with eps > 0, or any gradient moment, it is finite and positive
    assert L.adam_max_lr(10, 1.0, 1.0, 0.0, 5.0, N=10, eps=1e-8) == pytest.approx(2e-8)
    assert L.adam_max_lr(5, 1.0, 1.0, 0.0, 5.0, N=10) > 0


def test_docstrings_state_what_sgd_max_lr_and_momentum_factor_return():
    """sgd_max_lr with momentum is the fixed-batch deterministic limit, not the mean-square
    one (18.8× above it at B = 1, λ = 1, s² = 100, ρ = 0.9); it accepts Nesterov; the
    almost-sure limit's accuracy is Monte-Carlo, not the bisection tolerance."""
    det = L.sgd_max_lr(1, 1.0, 100.0, momentum=0.9)
    ms = L.sgd_momentum_ms_max_lr(1, 1.0, 100.0, None, 0.9)
    assert det == pytest.approx(3.8 / 101) and ms == pytest.approx(3.8 / 1901)
    assert L.sgd_max_lr(1, 1.0, 100.0, momentum=0.9, momentum_kind="nesterov") == pytest.approx(
        2 * 1.9 / 2.8 / 101)
    doc = " ".join(L.sgd_max_lr.__doc__.split())
    assert "nesterov" in doc and "sgd_momentum_ms_max_lr" in doc and "deterministic" in doc
    assert "Both come" not in L.momentum_factor.__doc__
    assert "Monte-Carlo" in L.sgd_momentum_as_max_lr.__doc__
