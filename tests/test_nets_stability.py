"""Oracles for the exact mean-square stability threshold (nets.learning_rates.stability).

- explicit d²×d² second-moment matrix built by enumerating every batch (d=3, N=6, all B,
  with and without replacement) — independent of the c(B,N) algebra;
- Monte-Carlo E‖e_t‖² of simulated SGD against tr T_α^t(Σ_0) (z-score);
- B = N gives 2/λ_max(H); d = 1 gives 2h/(h² + c(B,N)s²); heavy-ball momentum at B = N
  gives 2(1+ρ)/λ_max and matches an enumerated 2d×2d construction.
"""

import itertools

import numpy as np
import pytest
from scipy.optimize import brentq

import rmt
from nets.learning_rates.least_squares import spike_for_critical_batch, spiked_regression
from nets.learning_rates.stability import (
    PerSampleHessians,
    ms_spectral_radius,
    ms_stability_threshold,
    second_moment_operator,
)


def _tiny(seed=0, N=6, d=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, d)) * np.array([2.0, 1.0, 0.5])[:d]


def _batches(N, B, replacement):
    if replacement:
        return [list(t) for t in itertools.product(range(N), repeat=B)]
    return [list(t) for t in itertools.combinations(range(N), B)]


def _dense_T(Hs, B, alpha, replacement, momentum=0.0):
    N, d, _ = Hs.shape
    batches = _batches(N, B, replacement)
    I = np.eye(d)
    T = 0.0
    for s in batches:
        HB = Hs[s].mean(axis=0)
        if momentum == 0.0:
            M = I - alpha * HB
        else:
            M = np.block([[(1 + momentum) * I - alpha * HB, -momentum * I], [I, 0 * I]])
        T = T + np.kron(M, M)
    return T / len(batches)


def _dense_threshold(Hs, B, replacement, momentum=0.0):
    lam = np.linalg.eigvalsh(Hs.mean(axis=0))[-1]
    hi = 2 * (1 + momentum) / lam
    rho = lambda a: np.max(np.abs(np.linalg.eigvals(_dense_T(Hs, B, a, replacement, momentum)))) - 1
    if rho(hi * (1 - 1e-12)) < 0:
        return hi
    return brentq(rho, 1e-3 * hi, hi, xtol=1e-14, rtol=1e-13)


@pytest.mark.parametrize("replacement", [False, True])
def test_threshold_matches_enumerated_dense_operator(replacement):
    X = _tiny()
    hs = PerSampleHessians(X)
    Hs = hs.dense()
    bs = range(1, 7) if not replacement else range(1, 5)
    for B in bs:
        ref = _dense_threshold(Hs, B, replacement)
        pencil = ms_stability_threshold(hs, B, replacement=replacement)
        brent = ms_stability_threshold(hs, B, replacement=replacement, method="brentq")
        assert pencil.alpha == pytest.approx(ref, rel=1e-9)
        assert brent.alpha == pytest.approx(ref, rel=1e-8)
        # the operator itself equals the enumerated matrix on symmetric inputs
        op = second_moment_operator(hs, B, 0.7 * ref, replacement)
        S = np.random.default_rng(B).standard_normal((3, 3))
        S = S + S.T
        dense = (_dense_T(Hs, B, 0.7 * ref, replacement) @ S.ravel())
        np.testing.assert_allclose(op @ S.ravel(), dense, rtol=1e-12, atol=1e-12)


def test_full_rank_factors_from_dense_hessians():
    """General per-sample Hessians (rank 2, one negative weight) via from_dense."""
    rng = np.random.default_rng(3)
    A = rng.standard_normal((6, 3, 2))
    Hs = np.einsum("ndk,nek->nde", A * np.array([1.0, 0.3]), A)
    Hs[0] -= 0.05 * np.eye(3)  # one indefinite sample, mean still PD
    hs = PerSampleHessians.from_dense(Hs)
    np.testing.assert_allclose(hs.dense(), Hs, atol=1e-12)
    for B in (1, 3, 5):
        ref = _dense_threshold(Hs, B, False)
        assert ms_stability_threshold(hs, B).alpha == pytest.approx(ref, rel=1e-9)


def test_full_batch_is_two_over_lambda_max():
    p = spiked_regression(200, 20, 4.0, rng=1)
    lam = np.linalg.eigvalsh(p.hessian())[-1]
    r = ms_stability_threshold(p, p.N, check=True)
    assert r.alpha == pytest.approx(2 / lam, rel=1e-10)
    assert r.rho_check == pytest.approx(1.0, abs=1e-9)


def test_one_dimensional_closed_form():
    rng = np.random.default_rng(5)
    x = rng.standard_exponential(40) + 0.1
    h = np.mean(x ** 2)
    s2 = np.var(x ** 2, ddof=1)
    for B in (1, 3, 10, 40):
        for repl in (False, True):
            c = rmt.batch_noise_factor(B, 40, replacement=repl)     # units of the ddof=1 s2
            exact = 2 * h / (h ** 2 + c * s2)
            assert ms_stability_threshold(x[:, None], B, replacement=repl).alpha == pytest.approx(exact, rel=1e-12)


def test_monte_carlo_second_moment_growth():
    """Simulated SGD on realizable least squares: mean ‖e_t‖² equals tr T_α^t(Σ_0)."""
    X = _tiny(seed=2)
    N, d = X.shape
    hs = PerSampleHessians(X)
    Hs = hs.dense()
    B, R, t = 2, 40000, 12
    a_star = ms_stability_threshold(hs, B).alpha
    rng = np.random.default_rng(11)
    e0 = np.array([1.0, -0.5, 0.25])
    for frac in (0.5, 0.9):
        alpha = frac * a_star
        op = second_moment_operator(hs, B, alpha)
        S = np.outer(e0, e0).ravel()
        for _ in range(t):
            S = op @ S
        exact = np.trace(S.reshape(d, d))
        e = np.tile(e0, (R, 1))
        for _ in range(t):
            idx = np.argsort(rng.random((R, N)), axis=1)[:, :B]
            HB = Hs[idx].mean(axis=1)
            e = e - alpha * np.einsum("rij,rj->ri", HB, e)
        sq = np.sum(e * e, axis=1)
        z = (sq.mean() - exact) / (sq.std(ddof=1) / np.sqrt(R))
        assert abs(z) < 4, (frac, sq.mean(), exact, z)
    # the with-replacement operator predicts a different value here: the test can tell
    op_r = second_moment_operator(hs, B, 0.9 * a_star, replacement=True)
    S = np.outer(e0, e0).ravel()
    for _ in range(t):
        S = op_r @ S
    assert abs(np.trace(S.reshape(d, d)) - exact) > 8 * sq.std(ddof=1) / np.sqrt(R)
    # and above α* the second moment grows: ρ > 1
    assert ms_spectral_radius(hs, B, 1.05 * a_star) > 1.0 > ms_spectral_radius(hs, B, 0.95 * a_star)


def test_heavy_ball_momentum():
    X = _tiny(seed=4, d=2)
    hs = PerSampleHessians(X)
    Hs = hs.dense()
    rho = 0.5
    lam = np.linalg.eigvalsh(hs.mean())[-1]
    assert ms_stability_threshold(hs, 6, momentum=rho).alpha == pytest.approx(2 * (1 + rho) / lam, rel=1e-9)
    for B in (1, 3):
        ref = _dense_threshold(Hs, B, False, momentum=rho)
        assert ms_stability_threshold(hs, B, momentum=rho).alpha == pytest.approx(ref, rel=1e-7)


def test_bad_inputs():
    X = _tiny()
    with pytest.raises(ValueError, match="B"):
        ms_stability_threshold(X, 7)
    with pytest.raises(ValueError, match="B"):
        ms_stability_threshold(X, 0)
    with pytest.raises(ValueError, match="momentum"):
        ms_stability_threshold(X, 2, momentum=1.0)
    with pytest.raises(ValueError, match="factors"):
        PerSampleHessians(np.ones((1, 3)))
    with pytest.raises(ValueError, match="contains NaN"):
        ms_stability_threshold(np.full((6, 3), np.nan), 2)
    Hneg = -np.repeat(np.eye(2)[None], 4, axis=0)
    with pytest.raises(ValueError, match="positive"):
        ms_stability_threshold(PerSampleHessians.from_dense(Hneg), 2)


def test_spike_for_critical_batch_population_value():
    """B* = 2 + (d−1)σ_b²/ℓ: realised B* of a large sample within 10% of the target."""
    d, target = 60, 30.0
    ell = spike_for_critical_batch(target, d)
    p = spiked_regression(20000, d, ell, rng=0)
    assert p.info["population_B_star"] == pytest.approx(target)
    # empirical λ_1 carries an O(√(d/N)) upward bias; the directional B* is within 10%
    assert p.critical_batch_size() == pytest.approx(target, rel=0.1)


def test_rank_deficient_data_uses_the_span():
    """d > N: directions outside the data span are frozen (H_i v = 0 for all i) and
    dropped; the threshold equals that of the problem written in the span's basis."""
    rng = np.random.default_rng(8)
    X = rng.standard_normal((5, 8))
    Q, _ = np.linalg.qr(X.T)                      # (8, 5) orthonormal basis of the span
    for B in (1, 2, 5):
        a = ms_stability_threshold(X, B).alpha
        assert a == pytest.approx(ms_stability_threshold(X @ Q, B).alpha, rel=1e-9)
        dense = PerSampleHessians.from_dense(PerSampleHessians(X).dense())
        assert ms_stability_threshold(dense, B).alpha == pytest.approx(a, rel=1e-8)


def test_isotropic_gaussian_reference_value():
    """docs/references.md: with replacement, B = 1, isotropic Gaussian d = 50: α* ≈ 0.0384.
    Population value: E[xxᵀSxxᵀ] = 2S + tr(S)I, so α* = 2/(d + 2) = 0.03846; a sample of
    N = 20000 carries O(√(d/N)) fluctuations (a few %)."""
    X = np.random.default_rng(0).standard_normal((20000, 50))
    a = ms_stability_threshold(X, 1, replacement=True).alpha
    assert a == pytest.approx(2 / 52, rel=0.03)
    assert a == pytest.approx(0.0384, rel=0.03)


def test_rank_deficient_data_every_method_and_momentum():
    """The same span rule for brentq, heavy ball and Nesterov: on the full space the frozen
    directions hold ρ(T_α) at 1 for every α, and brentq (Nesterov's only method) followed
    round-off — 30× to 10⁶× too small, with check reading 1. The enumerated oracle on the
    span's coordinates is the truth."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((4, 6))
    Q, _ = np.linalg.qr(X.T)
    Xs = X @ Q                                                # (4, 4): the span's basis
    Hs = np.einsum("ni,nj->nij", Xs, Xs)
    for kw in (dict(method="brentq"), dict(momentum=0.5, method="brentq"),
               dict(momentum=0.5)):
        got = ms_stability_threshold(X, 2, check=True, **kw)
        want = _dense_threshold(Hs, 2, False, kw.get("momentum", 0.0))
        assert got.alpha == pytest.approx(want, rel=1e-8)
        assert got.rho_check == pytest.approx(1.0, abs=1e-6)
    nest = ms_stability_threshold(X, 2, momentum=0.5, nesterov=True).alpha
    assert nest == pytest.approx(ms_stability_threshold(Xs, 2, momentum=0.5, nesterov=True).alpha,
                                 rel=1e-8)


def test_curve_takes_each_batch_size_as_given_and_tiny_curvature_is_kept():
    """ms_threshold_curve read B = 2.7 as 2 (the scalar path refuses it); a positive
    definite H whose smallest eigenvalue (2e-13 of the largest) comes from one sample's
    tiny feature was refused as 'not positive definite'."""
    from nets.learning_rates.stability import ms_threshold_curve

    X = _tiny(seed=1)
    with pytest.raises(TypeError, match="integer"):
        ms_threshold_curve(X, [2.7, 3])
    np.testing.assert_allclose(ms_threshold_curve(X, [2.0, 3]),
                               [ms_stability_threshold(X, B).alpha for B in (2, 3)])
    rng = np.random.default_rng(0)
    Y = np.column_stack([rng.standard_normal(100), np.zeros(100)])
    Y[7, 1] = 5e-6
    base = ms_stability_threshold(Y[:, :1], 4).alpha
    assert ms_stability_threshold(Y, 4).alpha == pytest.approx(base, rel=1e-8)
    # per-sample curvature of both signs cancelling in the mean: still refused
    bad = PerSampleHessians.from_dense(np.stack([np.diag([1.0, 1.0]), np.diag([1.0, -1.0])]))
    with pytest.raises(ValueError, match="not positive definite"):
        ms_stability_threshold(bad, 1)


def test_a_stack_of_symmetric_matrices_read_as_factors_is_said():
    """(N, d, d) arrays are factors F_i (H_i = F_i F_iᵀ); per-sample Hessians passed as
    such gave a threshold 6× too low without a word. A warning names from_dense."""
    X = _tiny(seed=2, N=7, d=3)
    Hs = np.einsum("ni,nj->nij", X, X)
    with pytest.warns(UserWarning, match="from_dense"):
        ms_stability_threshold(Hs, 7)
    right = ms_stability_threshold(PerSampleHessians.from_dense(Hs), 7).alpha
    assert right == pytest.approx(2 / np.linalg.eigvalsh(Hs.mean(0))[-1], rel=1e-10)
