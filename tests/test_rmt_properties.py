"""Property-based checks (hypothesis) of the analytical formulas: monotone shift in B,
continuity at the phase transition, symmetry for negative spikes, flat profile →
isotropic semicircle, invariance to the order of blocks."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rmt
from rmt.outliers import find_outlier
from rmt.semicircle import semicircle_edges, semicircle_stieltjes

SETTINGS = settings(max_examples=25, deadline=None)
SLOW = settings(max_examples=12, deadline=None)      # ~1 s per example (QVE solves)
pos = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)


@SETTINGS
@given(lam=st.floats(0.01, 100.0), lam_b=st.floats(-100.0, -0.01), sigma2=st.floats(1e-6, 1e-1),
       P=st.integers(10, 10_000), N=st.integers(2, 5000))
def test_batch_shift_is_monotone_decreasing_in_B(lam, lam_b, sigma2, P, N):
    Bs = sorted({1, max(1, N // 7), max(1, N // 3), max(1, N // 2), N})
    tops, bottoms = zip(*[rmt.batch_hessian_extremes(lam, lam_b, sigma2, P, B, N) for B in Bs])
    assert all(a >= b * (1 - 1e-12) for a, b in zip(tops, tops[1:]))
    assert all(a <= b * (1 - 1e-12) for a, b in zip(bottoms, bottoms[1:]))
    assert tops[-1] == lam and bottoms[-1] == lam_b  # B = N: no noise
    assert tops[0] >= lam and bottoms[0] <= lam_b  # larger in magnitude


@SETTINGS
@given(v=pos, eps=st.floats(1e-12, 1e-7))
def test_continuity_at_the_phase_transition(v, eps):
    r = math.sqrt(v)
    for th in (r * (1 + eps), r * (1 - eps)):
        assert rmt.spiked_wigner_outlier(th, v) == pytest.approx(2 * r, rel=1e-6)
        assert rmt.spiked_wigner_overlap(th, v) == pytest.approx(0.0, abs=1e-6)
    q = min(v, 50.0)
    th = 1 + math.sqrt(q)
    for ell in (th * (1 + eps), th * (1 - eps)):
        assert rmt.spiked_wishart_outlier(ell, q) == pytest.approx((1 + math.sqrt(q)) ** 2, rel=1e-6)
        assert rmt.spiked_wishart_overlap(ell, q) == pytest.approx(0.0, abs=1e-5)


@SETTINGS
@given(theta=st.floats(0.01, 50.0), v=st.floats(0.01, 10.0))
def test_negative_spikes_are_symmetric(theta, v):
    assert rmt.spiked_wigner_outlier(-theta, v) == -rmt.spiked_wigner_outlier(theta, v)
    assert rmt.spiked_wigner_overlap(-theta, v) == rmt.spiked_wigner_overlap(theta, v)
    g = lambda z: semicircle_stieltjes(z, v)  # noqa: E731
    a = find_outlier(theta, g, semicircle_edges(v))
    b = find_outlier(-theta, g, semicircle_edges(v))
    assert b.location == pytest.approx(-a.location, rel=1e-9)
    assert b.squared_overlap == pytest.approx(a.squared_overlap, abs=1e-9)
    top, bottom = rmt.batch_hessian_extremes(theta, -theta, v, 1, 1)
    assert bottom == pytest.approx(-top, rel=1e-12)


def _random_profile(seed, K):
    rng = np.random.default_rng(seed)
    f = rng.dirichlet(np.ones(K)) * 0.8 + 0.2 / K
    A = rng.uniform(0.1, 3.0, (K, K))
    return (A + A.T) / 2, f / f.sum()


def _flatten(A, f, s):
    """Symmetric scaling D A D with equal row sums of (D A D)·diag(f), times s."""
    d = np.ones(len(f))
    for _ in range(5000):
        d = np.sqrt(d / (A @ (f * d)))
    S = s * d[:, None] * A * d[None, :]
    assert np.allclose((S * f).sum(axis=1), s, rtol=1e-10)
    return S


@SETTINGS
@given(seed=st.integers(0, 10_000), K=st.integers(1, 4), s=st.floats(0.1, 5.0),
       theta_ratio=st.floats(0.2, 4.0))
def test_flat_profile_reduces_to_isotropic(seed, K, s, theta_ratio):
    A, f = _random_profile(seed, K)
    S = _flatten(A, f, s)
    w = np.random.default_rng(seed + 1).dirichlet(np.ones(K))
    theta = theta_ratio * math.sqrt(s)
    assert rmt.profile_edge(S, f) == pytest.approx(2 * math.sqrt(s), rel=1e-9)
    assert rmt.profile_outlier(theta, S, f, w) == pytest.approx(rmt.spiked_wigner_outlier(theta, s), rel=1e-8)


@SLOW
@given(seed=st.integers(0, 10_000), K=st.integers(2, 4), theta=st.floats(0.3, 6.0))
def test_invariant_to_the_order_of_blocks(seed, K, theta):
    S, f = _random_profile(seed, K)
    rng = np.random.default_rng(seed + 2)
    w = rng.dirichlet(np.ones(K))
    perm = rng.permutation(K)
    Sp, fp, wp = S[np.ix_(perm, perm)], f[perm], w[perm]
    assert rmt.profile_edge(Sp, fp) == pytest.approx(rmt.profile_edge(S, f), rel=1e-10)
    assert rmt.profile_outlier(theta, Sp, fp, wp) == pytest.approx(rmt.profile_outlier(theta, S, f, w), rel=1e-10)
    # and the outlier is continuous and increasing in θ
    o1 = rmt.profile_outlier(theta, S, f, w)
    o2 = rmt.profile_outlier(theta * 1.01, S, f, w)
    assert o2 >= o1 - 1e-12 and o2 - o1 < 0.1 * theta


@SLOW
@given(seed=st.integers(0, 10_000), K=st.integers(1, 3), eps=st.floats(1e-9, 1e-6))
def test_profile_outlier_continuous_at_its_threshold(seed, K, eps):
    from rmt.variance_profile import solve_qve_real
    S, f = _random_profile(seed, K)
    w = np.random.default_rng(seed + 3).dirichlet(np.ones(K))
    e = rmt.profile_edge(S, f)
    m_edge = solve_qve_real(e * (1 + 1e-13), S, f).m
    theta_c = -1.0 / (w @ m_edge)  # 1 + θ_c Σ w_a m_a(edge) = 0
    below = rmt.profile_outlier(theta_c * (1 - eps), S, f, w)
    above = rmt.profile_outlier(theta_c * (1 + eps), S, f, w)
    assert below == pytest.approx(e, rel=1e-12)
    # above threshold the outlier leaves the edge quadratically: z − e = O(ε²)
    assert e <= above < e * (1 + 1e-3)
