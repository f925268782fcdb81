"""Spiked Wigner / Wishart outliers and overlaps, above and below threshold, against
simulation (dense and O(n) tridiagonal) with z-scores; the general outlier equation;
the paper's batch-Hessian theorem; bad input."""

import math

import numpy as np
import pytest
from numpy.linalg import eigvalsh
from scipy.linalg import eigh

import rmt
from rmt.ensembles import goe, wishart
from rmt.free_convolution import semicircle_free_convolution_edges, semicircle_free_convolution_outlier
from rmt.marchenko_pastur import mp_edges, mp_stieltjes, mp_stieltjes_derivative
from rmt.outliers import find_outlier
from rmt.semicircle import semicircle_edges, semicircle_stieltjes, semicircle_stieltjes_derivative
from rmt.spiked_wigner import spiked_wigner_outlier_variance
from rmt.spiked_wishart import spiked_wishart_outlier_variance
from rmt.tracy_widom import TW_MEAN, TW_VARIANCE
from rmt.tridiagonal import sample_spiked_wishart_top


def top_pair(m):
    n = m.shape[0]
    w, v = eigh(m, subset_by_index=[n - 1, n - 1])
    return w[0], v[:, 0]


def bottom_pair(m):
    w, v = eigh(m, subset_by_index=[0, 0])
    return w[0], v[:, 0]


def test_closed_forms():
    assert rmt.spiked_wigner_outlier(2.0, 1.0) == pytest.approx(2.5)
    assert rmt.spiked_wigner_outlier(0.5, 1.0) == pytest.approx(2.0)
    assert rmt.spiked_wigner_outlier(0.5, 1.0, clip=False) == pytest.approx(2.5)
    assert rmt.spiked_wigner_outlier(-3.0, 4.0) == pytest.approx(-3 - 4 / 3)
    assert rmt.spiked_wigner_outlier(-1.0, 4.0) == pytest.approx(-4.0)
    assert rmt.spiked_wigner_overlap(2.0, 1.0) == pytest.approx(0.75)
    assert rmt.spiked_wigner_overlap(0.9, 1.0) == 0.0
    assert rmt.spiked_wishart_outlier(3.0, 0.5) == pytest.approx(3.75)
    assert rmt.spiked_wishart_outlier(1.5, 0.5) == pytest.approx((1 + math.sqrt(0.5)) ** 2)
    assert rmt.spiked_wishart_outlier(6.0, 0.5, noise_var=2.0) == pytest.approx(7.5)
    assert rmt.spiked_wishart_overlap(3.0, 0.5) == pytest.approx((1 - 0.5 / 4) / 1.25)
    assert rmt.spiked_wishart_overlap(1.5, 0.5) == 0.0


@pytest.mark.parametrize("theta,v", [(2.0, 1.0), (-3.0, 2.0), (0.7, 1.0), (-1.1, 1.5)])
def test_general_outlier_equation_reproduces_spiked_wigner(theta, v):
    res = find_outlier(theta, lambda z: semicircle_stieltjes(z, v), semicircle_edges(v),
                       lambda z: semicircle_stieltjes_derivative(z, v))
    assert res.location == pytest.approx(rmt.spiked_wigner_outlier(theta, v), rel=1e-10)
    assert res.squared_overlap == pytest.approx(rmt.spiked_wigner_overlap(theta, v), abs=1e-9)
    assert res.is_outlier == (theta * theta > v)
    # numerical derivative path gives the same overlap
    res2 = find_outlier(theta, lambda z: semicircle_stieltjes(z, v), semicircle_edges(v))
    assert res2.squared_overlap == pytest.approx(res.squared_overlap, abs=1e-5)


@pytest.mark.parametrize("theta,v", [(2.0, 1.0), (-2.0, 1.0), (3.0, 2.0)])
def test_spiked_wigner_above_threshold_vs_dense_simulation(theta, v):
    rng = np.random.default_rng(21)
    n, reps = 1000, 10
    lams, ovs = [], []
    for _ in range(reps):
        m = np.sqrt(v) * goe(n, rng)
        m[0, 0] += theta
        lam, vec = top_pair(m) if theta > 0 else bottom_pair(m)
        lams.append(lam)
        ovs.append(vec[0] ** 2)
    pred = rmt.spiked_wigner_outlier(theta, v)
    se = math.sqrt(spiked_wigner_outlier_variance(theta, v, n) / reps)
    assert abs(np.mean(lams) - pred) / se < 4.0
    # overlap fluctuates at O(n^{-1/2}); sample SE plus an O(1/n) allowance
    se_ov = np.std(ovs, ddof=1) / math.sqrt(reps)
    assert abs(np.mean(ovs) - rmt.spiked_wigner_overlap(theta, v)) < 4 * se_ov + 2e-3


def test_spiked_wigner_below_threshold_vs_dense_simulation():
    rng = np.random.default_rng(22)
    n, theta, v, reps = 1000, 0.6, 1.5, 6
    lams, ovs = [], []
    for _ in range(reps):
        m = np.sqrt(v) * goe(n, rng)
        m[0, 0] += theta
        lam, vec = top_pair(m)
        lams.append(lam)
        ovs.append(vec[0] ** 2)
    # sticks to the edge 2√v: Tracy–Widom centring and scale √v·n^{-2/3}
    scale = math.sqrt(v) * n ** (-2 / 3)
    tw_mean = rmt.spiked_wigner_outlier(theta, v) + TW_MEAN[1] * scale
    assert abs(np.mean(lams) - tw_mean) < 4 * math.sqrt(TW_VARIANCE[1] / reps) * scale + 2 * scale
    # delocalised top eigenvector: overlap O(1/n), theory 0 (above threshold it is ≥ 0.3 here)
    assert np.mean(ovs) < 0.05
    assert rmt.spiked_wigner_overlap(theta, v) == 0.0


def test_sample_spiked_goe_top_mean_and_variance_z_scores():
    rng = np.random.default_rng(23)
    n, reps, theta = 10_000, 200, 2.0
    x = np.array([rmt.sample_spiked_goe_top(n, theta, rng) for _ in range(reps)])
    var = spiked_wigner_outlier_variance(theta, 1.0, n)  # 2(1 − 1/θ²)/n
    assert abs(x.mean() - (theta + 1 / theta)) / math.sqrt(var / reps) < 4.0
    # sample variance: relative SE √(2/(reps−1)) for Gaussian fluctuations
    assert abs(x.var(ddof=1) / var - 1.0) < 4 * math.sqrt(2 / (reps - 1))
    # the tridiagonal sampler and the dense GOE agree (same normalisation)
    dense = []
    for _ in range(6):
        m = goe(800, rng)
        m[0, 0] += theta
        dense.append(top_pair(m)[0])
    assert abs(np.mean(dense) - (theta + 1 / theta)) / math.sqrt(
        spiked_wigner_outlier_variance(theta, 1.0, 800) / 6) < 4.0
    # below threshold it sticks to the edge
    y = [rmt.sample_spiked_goe_top(n, 0.5, rng) for _ in range(20)]
    assert abs(np.mean(y) - 2.0) < 3 * n ** (-2 / 3)


@pytest.mark.parametrize("ell,s2", [(3.0, 1.0), (6.0, 2.0)])
def test_spiked_wishart_above_threshold_vs_dense_simulation(ell, s2):
    rng = np.random.default_rng(24)
    p, n, reps = 400, 800, 10
    q = p / n
    pop = np.r_[ell / s2, np.ones(p - 1)]
    lams, ovs = [], []
    for _ in range(reps):
        lam, vec = top_pair(wishart(p, n, rng, variance=s2, population=pop))
        lams.append(lam)
        ovs.append(vec[0] ** 2)
    pred = rmt.spiked_wishart_outlier(ell, q, s2)
    se = math.sqrt(spiked_wishart_outlier_variance(ell, q, n, s2) / reps)
    assert abs(np.mean(lams) - pred) / se < 4.0
    se_ov = np.std(ovs, ddof=1) / math.sqrt(reps)
    assert abs(np.mean(ovs) - rmt.spiked_wishart_overlap(ell, q, s2)) < 4 * se_ov + 3e-3


def test_spiked_wishart_below_threshold_vs_dense_simulation():
    rng = np.random.default_rng(25)
    p, n, ell, reps = 400, 800, 1.3, 4
    pop = np.r_[ell, np.ones(p - 1)]
    lams, ovs = [], []
    for _ in range(reps):
        lam, vec = top_pair(wishart(p, n, rng, population=pop))
        lams.append(lam)
        ovs.append(vec[0] ** 2)
    # Johnstone (2001) scale of the largest eigenvalue of S = XXᵀ/n
    scale = (math.sqrt(n) + math.sqrt(p)) * (1 / math.sqrt(n) + 1 / math.sqrt(p)) ** (1 / 3) / n
    tw_mean = rmt.spiked_wishart_outlier(ell, p / n) + TW_MEAN[1] * scale
    assert abs(np.mean(lams) - tw_mean) < 4 * math.sqrt(TW_VARIANCE[1] / reps) * scale + 2 * scale
    assert np.mean(ovs) < 0.1  # theory 0 (finite-n O(1/n), enhanced near threshold); ℓ = 3 gives 0.7
    assert rmt.spiked_wishart_overlap(ell, p / n) == 0.0


def test_spiked_wishart_bottom_outlier_vs_dense_simulation():
    # a population eigenvalue below the bulk, ℓ < 1 − √q, detaches below the left edge
    rng = np.random.default_rng(30)
    p, n, ell, reps = 300, 1200, 0.2, 6
    q = p / n
    pred = rmt.spiked_wishart_outlier(ell, q, side="bottom")
    assert pred == pytest.approx(ell * (1 + q / (ell - 1)))
    assert pred < mp_edges(q)[0]
    pop = np.r_[ell, np.ones(p - 1)]
    lams = [bottom_pair(wishart(p, n, rng, population=pop))[0] for _ in range(reps)]
    se = np.std(lams, ddof=1) / math.sqrt(reps)
    assert abs(np.mean(lams) - pred) < 4 * se + 2e-3
    assert rmt.spiked_wishart_outlier(0.8, q, side="bottom") == pytest.approx(mp_edges(q)[0])


@pytest.mark.parametrize("p,n,ell", [(5000, 10000, 3.0), (10000, 5000, 5.0)])
def test_spiked_wishart_tridiagonal_z_score(p, n, ell):
    rng = np.random.default_rng(26)
    reps = 100
    x = np.array([sample_spiked_wishart_top(p, n, ell, rng) for _ in range(reps)])
    q = p / n
    se = math.sqrt(spiked_wishart_outlier_variance(ell, q, n) / reps)
    assert abs(x.mean() - rmt.spiked_wishart_outlier(ell, q)) / se < 4.0


def test_additive_spike_on_marchenko_pastur_bulk_vs_simulation():
    # a bulk that is not a semicircle: W Wishart (q = 0.5) + θ e₁e₁ᵀ, 1 + θ g_MP(z) = 0
    rng = np.random.default_rng(27)
    p, n, theta, reps = 500, 1000, 2.0, 12
    res = find_outlier(theta, lambda z: mp_stieltjes(z, 0.5), mp_edges(0.5),
                       lambda z: mp_stieltjes_derivative(z, 0.5))
    assert res.is_outlier and res.residual < 1e-12
    lams, ovs = [], []
    for _ in range(reps):
        m = wishart(p, n, rng)
        m[0, 0] += theta
        lam, vec = top_pair(m)
        lams.append(lam)
        ovs.append(vec[0] ** 2)
    se = np.std(lams, ddof=1) / math.sqrt(reps)
    assert abs(np.mean(lams) - res.location) < 4 * se + 5e-3
    # a semicircle of the same mean and variance would predict θ + 0.5/θ + 1 (0.083 lower)
    assert abs(np.mean(lams) - (theta + 0.5 / theta + 1.0)) > 3 * se
    se_ov = np.std(ovs, ddof=1) / math.sqrt(reps)
    assert abs(np.mean(ovs) - res.squared_overlap) < 4 * se_ov + 3e-3
    # spike too small: edge returned
    small = find_outlier(0.3, lambda z: mp_stieltjes(z, 0.5), mp_edges(0.5))
    assert not small.is_outlier and small.location == mp_edges(0.5)[1]


def test_deformed_wigner_isolated_eigenvalue_outlier_vs_simulation():
    rng = np.random.default_rng(28)
    n, a_star, reps = 1000, 3.0, 8
    pred = semicircle_free_convolution_outlier(a_star, [-1.5, 1.5], [0.5, 0.5], 1.0)
    assert pred == pytest.approx(3.0 + 0.5 / 4.5 + 0.5 / 1.5)
    A = np.r_[a_star, np.full(n // 2, -1.5), np.full(n // 2 - 1, 1.5)]
    tops = [top_pair(goe(n, rng) + np.diag(A))[0] for _ in range(reps)]
    se = np.std(tops, ddof=1) / math.sqrt(reps)
    assert abs(np.mean(tops) - pred) < 4 * se + 5e-3
    assert abs(pred - (a_star + 1 / a_star)) > 5 * se  # bulk-blind formula rejected
    # an isolated eigenvalue inside the critical point is swallowed: edge returned
    edge = semicircle_free_convolution_edges([-1.5, 1.5], [0.5, 0.5], 1.0)[1]
    assert semicircle_free_convolution_outlier(1.8, [-1.5, 1.5], [0.5, 0.5], 1.0) == edge


def test_deformed_wigner_outlier_inside_an_internal_gap_vs_simulation():
    """A = ±10 (half each) + W (v = 1) has a gap around 0; an isolated eigenvalue θ = 1
    of A there gives an outlier at θ + v·Σ w/(θ − a) = 0.990 inside the gap (it used to
    be reported as the right bulk edge, 11.44); θ = 9.8 is inside the bulk."""
    rng = np.random.default_rng(29)
    n, reps, theta = 800, 6, 1.0
    pred = semicircle_free_convolution_outlier(theta, [-10.0, 10.0], None, 1.0)
    assert pred == pytest.approx(theta + 0.5 / 11.0 + 0.5 / -9.0)
    A = np.r_[theta, np.full(n // 2, -10.0), np.full(n // 2 - 1, 10.0)]
    near = []
    for _ in range(reps):
        lam = eigvalsh(goe(n, rng) + np.diag(A))
        inner = lam[np.abs(lam) < 5]                 # the gap holds the outlier alone
        assert inner.size == 1
        near.append(inner[0])
    se = np.std(near, ddof=1) / math.sqrt(reps)
    assert abs(np.mean(near) - pred) < 4 * se + 5e-3
    with pytest.raises(ValueError, match="spike"):
        semicircle_free_convolution_outlier(9.8, [-10.0, 10.0], None, 1.0)


def test_batch_hessian_extremes_is_spiked_wigner_with_v_P_c_sigma2():
    P, sigma2, N = 2000, 1e-4, 5000
    for B in [8, 64, 512, 5000]:
        c = rmt.batch_noise_factor(B, N)
        v = P * c * sigma2
        top, bottom = rmt.batch_hessian_extremes(0.5, -0.2, sigma2, P, B, N)
        if B == N:
            assert (top, bottom) == (0.5, -0.2)
        else:
            assert top == pytest.approx(rmt.spiked_wigner_outlier(0.5, v))
            assert bottom == pytest.approx(rmt.spiked_wigner_outlier(-0.2, v))
    # B = 8: v = 2000·(1/8 − 1/5000)·1e-4 = 0.02496: top above, bottom below threshold
    top, bottom = rmt.batch_hessian_extremes(0.5, -0.1, sigma2, P, 8, N)
    v = P * (1 / 8 - 1 / N) * sigma2
    assert top == pytest.approx(0.5 + v / 0.5)
    assert bottom == pytest.approx(-2 * math.sqrt(v))


def test_batch_hessian_extremes_vs_simulated_batch_noise():
    # ε with i.i.d. entries of variance c·σ² added to H = diag(λ₁, 0, …, λ_P)
    rng = np.random.default_rng(29)
    P, sigma2, B, N = 1000, 0.002, 16, 1024
    c = rmt.batch_noise_factor(B, N)
    v = P * c * sigma2
    H = np.zeros(P)
    H[0], H[-1] = 1.0, -0.8
    top_pred, bottom_pred = rmt.batch_hessian_extremes(1.0, -0.8, sigma2, P, B, N)
    tops, bottoms = [], []
    for _ in range(4):
        m = np.sqrt(v) * goe(P, rng) + np.diag(H)
        lam = eigh(m, eigvals_only=True)
        tops.append(lam[-1])
        bottoms.append(lam[0])
    sd_top = math.sqrt(spiked_wigner_outlier_variance(1.0, v, P) / 4)
    sd_bot = math.sqrt(spiked_wigner_outlier_variance(-0.8, v, P) / 4)
    assert abs(np.mean(tops) - top_pred) / sd_top < 4.0
    assert abs(np.mean(bottoms) - bottom_pred) / sd_bot < 4.0


def test_bad_input_raises_naming_argument():
    with pytest.raises(ValueError, match="B"):
        rmt.batch_hessian_extremes(1.0, -1.0, 1e-3, 100, 200, 100)  # B > N
    with pytest.raises(ValueError, match="B"):
        rmt.batch_hessian_extremes(1.0, -1.0, 1e-3, 100, 0, 100)
    with pytest.raises(ValueError, match="sigma2"):
        rmt.batch_hessian_extremes(1.0, -1.0, -1e-3, 100, 10, 100)
    with pytest.raises(ValueError, match="lam_top"):
        rmt.batch_hessian_extremes(float("nan"), -1.0, 1e-3, 100, 10, 100)
    with pytest.raises(ValueError, match="noise_var"):
        rmt.spiked_wigner_outlier(1.0, -1.0)
    with pytest.raises(ValueError, match="spike"):
        rmt.spiked_wigner_overlap(float("nan"), 1.0)
    with pytest.raises(TypeError, match="spike"):
        rmt.spiked_wigner_outlier("big", 1.0)
    with pytest.raises(ValueError, match="ratio"):
        rmt.spiked_wishart_outlier(2.0, -0.5)
    with pytest.raises(ValueError, match="noise_var"):
        rmt.spiked_wishart_overlap(2.0, 0.5, noise_var=0.0)
    with pytest.raises(ValueError, match="spike"):
        rmt.spiked_wishart_outlier(-2.0, 0.5)
    with pytest.raises(ValueError, match="n"):
        rmt.sample_spiked_goe_top(0, 1.0)
    with pytest.raises(ValueError, match="spike"):
        rmt.sample_spiked_goe_top(10, float("inf"))


def test_spiked_wishart_at_ratio_zero_is_the_population():
    """ratio = 0 (B = N: no sampling noise) is the continuous limit q → 0: the spike
    itself with overlap 1 above the bulk σ², the bulk edge σ² below (it was refused
    while mp_edges accepted q = 0)."""
    for ell, s2 in ((3.0, 1.0), (0.5, 0.2), (7.0, 2.0)):
        near = (rmt.spiked_wishart_outlier(ell, 1e-14, s2), rmt.spiked_wishart_overlap(ell, 1e-14, s2))
        at = (rmt.spiked_wishart_outlier(ell, 0.0, s2), rmt.spiked_wishart_overlap(ell, 0.0, s2))
        np.testing.assert_allclose(at, near, rtol=1e-6)
        assert at == (ell, 1.0)
    assert rmt.spiked_wishart_outlier(0.5, 0.0, 1.0) == 1.0
    assert rmt.spiked_wishart_overlap(0.5, 0.0, 1.0) == 0.0
    assert rmt.spiked_wishart_outlier(0.5, 0.0, 1.0, side="bottom") == 0.5


# ---- scale: the outlier of a bulk of any size (an outside audit) ---------------------

@pytest.mark.parametrize("v", [1e-30, 1e-24, 1e-16, 1.0, 1e24])
@pytest.mark.parametrize("with_derivative", [True, False])
def test_find_outlier_on_a_semicircle_of_any_scale(v, with_derivative):
    """Closed form θ + v/θ, overlap 1 − v/θ² at every scale: the edge was probed at
    edge + 1e-12·max(1, |edges|, |θ|), past the outlier of a bulk of width ≲ 1e-12, so
    v = 1e-24, θ = 2√v gave the edge 2√v, overlap 0, is_outlier False (vs 2.5√v, 0.75)."""
    r = math.sqrt(v)
    deriv = (lambda z: semicircle_stieltjes_derivative(z, v)) if with_derivative else None
    for t in (2.0, -3.0, 1.2):
        o = find_outlier(t * r, lambda z: semicircle_stieltjes(z, v), semicircle_edges(v), deriv)
        assert o.is_outlier
        assert o.location / r == pytest.approx(t + 1.0 / t, rel=1e-12)
        assert o.squared_overlap == pytest.approx(1.0 - 1.0 / t**2, rel=1e-6)
    below = find_outlier(0.5 * r, lambda z: semicircle_stieltjes(z, v), semicircle_edges(v), deriv)
    assert not below.is_outlier and below.location == semicircle_edges(v)[1] and below.squared_overlap == 0


@pytest.mark.parametrize("s2", [1e-14, 1e-12, 1.0, 1e12])
@pytest.mark.parametrize("q", [0.5, 0.2])
def test_additive_spike_on_marchenko_pastur_of_any_scale(s2, q):
    """1 + θ g = 0 with θ = 2σ², g = −1/(2σ²) in MP's quadratic q w g² + (w − 1 + q) g + 1
    = 0 (w = z/σ², g in σ² = 1 units): w = 2(3 − q)/(2 − q), and g' = (1 − q/2)/((1 − q)(w − 1))
    gives the overlap 1/(θ² g') = (1 − q)(w − 1)/(2 − q). At σ² = 1e-12, q = 0.5 the edge
    2.914σ² came back instead of 3.333σ² (overlap 0 instead of 0.778)."""
    w = 2 * (3 - q) / (2 - q)
    for deriv in (None, lambda z: mp_stieltjes_derivative(z, q, s2)):
        o = find_outlier(2 * s2, lambda z: mp_stieltjes(z, q, s2), mp_edges(q, s2), deriv)
        assert o.is_outlier
        assert o.location / s2 == pytest.approx(w, rel=1e-12)
        assert o.squared_overlap == pytest.approx((1 - q) * (w - 1) / (2 - q), rel=1e-6)


def test_find_outlier_on_a_point_mass():
    """δ_c (support (c, c)): g = 1/(c − z), the outlier c + θ for every θ ≠ 0, overlap 1."""
    for c, t in ((0.0, 1e-20), (0.0, -3.0), (1e-30, 2e-30), (5.0, 1e-3)):
        o = find_outlier(t, lambda z: 1.0 / (c - z), (c, c), lambda z: 1.0 / (c - z) ** 2)
        assert o.location == pytest.approx(c + t, rel=1e-12)
        assert o.squared_overlap == pytest.approx(1.0, rel=1e-9)


def test_spiked_wishart_outlier_variance_refuses_a_sample_size_below_one():
    """n = 0.5 returned 31.5 (spiked_wigner_outlier_variance refuses n < 1)."""
    with pytest.raises(ValueError, match="n"):
        spiked_wishart_outlier_variance(3.0, 0.5, 0.5)
    assert spiked_wishart_outlier_variance(3.0, 0.5, 1.0) == pytest.approx(2 * 9 * (1 - 0.5 / 4))


def test_deformed_wigner_spike_absorbed_below_the_atoms_gives_the_left_edge():
    """A = ±1 (symmetric), v = 1: θ = ∓1.1 lies outside ω's range on both sides
    (v Σ w/(θ − a)² ≈ 50 > 1), so the outlier is absorbed into the bulk edge on the spike's
    side; by symmetry the left result is minus the right one."""
    atoms, w = [-1.0, 1.0], [0.5, 0.5]
    right = semicircle_free_convolution_outlier(1.1, atoms, w, 1.0)
    left = semicircle_free_convolution_outlier(-1.1, atoms, w, 1.0)
    assert right > 1.1 and left == pytest.approx(-right, rel=1e-10)


def test_atoms_of_zero_weight_do_not_move_the_edges():
    """An atom of weight 0 is no part of the law: edges as without it (it sat beyond the
    others, so reading it as the outermost atom moved the right edge)."""
    with_zero = semicircle_free_convolution_edges([0.0, 1.0, 5.0], [0.5, 0.5, 0.0], 1.0)
    without = semicircle_free_convolution_edges([0.0, 1.0], [0.5, 0.5], 1.0)
    np.testing.assert_allclose(with_zero, without, rtol=1e-12)
