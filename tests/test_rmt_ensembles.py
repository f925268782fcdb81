"""Exact finite-n identities for the dense and tridiagonal samplers (normalisation
oracles, docs/references.md "Bulk laws"), checked with z-scores against the standard error."""

import numpy as np
import pytest

from rmt.ensembles import block_sizes, goe, gue, profile_wigner, spiked_additive, spiked_multiplicative, wishart
from rmt.tridiagonal import hermite_tridiagonal, laguerre_tridiagonal

Z_MAX = 4.5


def zscore(samples, expected):
    samples = np.asarray(samples, dtype=float)
    return (samples.mean() - expected) / (samples.std(ddof=1) / np.sqrt(samples.size))


def traces_dense(h):
    h2 = h @ h
    return np.trace(h2).real, np.sum(np.abs(h2) ** 2)  # tr H², tr H⁴ = ‖H²‖_F²


def tridiag_dense(d, e):
    return np.diag(d) + np.diag(e, 1) + np.diag(e, -1)


N_SMALL, REPS = 8, 3000


def test_goe_raw_moments_dense():
    rng = np.random.default_rng(1)
    t2, t4 = np.array([traces_dense(goe(N_SMALL, rng, "raw")) for _ in range(REPS)]).T
    n = N_SMALL
    assert abs(zscore(t2, n * n + n)) < Z_MAX
    assert abs(zscore(t4, 2 * n ** 3 + 5 * n ** 2 + 5 * n)) < Z_MAX


def test_goe_raw_moments_tridiagonal():
    rng = np.random.default_rng(2)
    n = N_SMALL
    t2, t4 = np.array([traces_dense(tridiag_dense(*hermite_tridiagonal(n, 1, rng, "raw")))
                       for _ in range(REPS)]).T
    assert abs(zscore(t2, n * n + n)) < Z_MAX
    assert abs(zscore(t4, 2 * n ** 3 + 5 * n ** 2 + 5 * n)) < Z_MAX


def test_gue_raw_fourth_moment_dense_and_tridiagonal():
    rng = np.random.default_rng(3)
    n = N_SMALL
    expected = 2 * n ** 3 + n  # Harer–Zagier
    dense = [traces_dense(gue(n, rng, "raw"))[1] for _ in range(REPS)]
    tri = [traces_dense(tridiag_dense(*hermite_tridiagonal(n, 2, rng, "raw")))[1] for _ in range(REPS)]
    assert abs(zscore(dense, expected)) < Z_MAX
    assert abs(zscore(tri, expected)) < Z_MAX
    # and the Hermitian sampler really is Hermitian with E|h_12|² = 1
    h = gue(4, rng, "raw")
    assert np.allclose(h, h.conj().T)


def test_semicircle_normalisation_is_raw_over_sqrt_n():
    n = 50
    a = goe(n, np.random.default_rng(7), "raw")
    b = goe(n, np.random.default_rng(7), "semicircle")
    assert np.allclose(a / np.sqrt(n), b)
    d1, e1 = hermite_tridiagonal(n, 1, np.random.default_rng(8), "raw")
    d2, e2 = hermite_tridiagonal(n, 1, np.random.default_rng(8), "semicircle")
    assert np.allclose(d1 / np.sqrt(n), d2) and np.allclose(e1 / np.sqrt(n), e2)


@pytest.mark.parametrize("p,n", [(6, 10), (12, 5)])
def test_wishart_second_moment_dense_and_tridiagonal(p, n):
    rng = np.random.default_rng(4)
    expected = p * (n + p + 1) / n
    dense = [np.sum(wishart(p, n, rng) ** 2) for _ in range(REPS)]
    tri = []
    for _ in range(REPS):
        d, e = laguerre_tridiagonal(p, n, 1, rng)
        tri.append(np.sum(d ** 2) + 2 * np.sum(e ** 2))
    assert abs(zscore(dense, expected)) < Z_MAX
    assert abs(zscore(tri, expected)) < Z_MAX



def _complex_wishart(p, n, beta, rng):
    """X Xᴴ/n for X p×n with i.i.d. entries of E|x|² = 1: complex (β = 2), or quaternion
    (β = 4, each entry as the 2×2 complex block [[z, w], [−w̄, z̄]], so every eigenvalue of
    the 2p×2p matrix appears twice): its p eigenvalues, ascending, by numpy alone."""
    if beta == 2:
        X = (rng.standard_normal((p, n)) + 1j * rng.standard_normal((p, n))) / np.sqrt(2)
        return np.linalg.eigvalsh(X @ X.conj().T / n)
    z = (rng.standard_normal((p, n)) + 1j * rng.standard_normal((p, n))) / 2
    w = (rng.standard_normal((p, n)) + 1j * rng.standard_normal((p, n))) / 2
    X = np.block([[z, w], [-w.conj(), z.conj()]])
    return np.linalg.eigvalsh(X @ X.conj().T / n)[::2]


@pytest.mark.parametrize("beta", [2, 4])
@pytest.mark.parametrize("p,n", [(6, 10), (12, 5)])
def test_laguerre_tridiagonal_at_beta_2_and_4_is_the_complex_and_quaternion_wishart(beta, p, n):
    """β ≠ 1: E tr S = p and E tr S² = p(p + n − 1 + 2/β)/n for S = X Xᴴ/n (β = 2:
    p(p + n)/n; β = 4: p(p + n − 1/2)/n), with z-scores; and λ_max against dense complex /
    quaternion Wishart matrices (two-sample z)."""
    rng = np.random.default_rng(11 + beta)
    k = min(p, n)
    t1, t2, top = [], [], []
    for _ in range(REPS):
        d, e = laguerre_tridiagonal(p, n, beta, rng)
        assert d.shape == (k,) and e.shape == (k - 1,)
        t1.append(d.sum())
        t2.append(np.sum(d ** 2) + 2 * np.sum(e ** 2))
        top.append(np.linalg.eigvalsh(tridiag_dense(d, e))[-1])
    assert abs(zscore(t1, p)) < Z_MAX
    assert abs(zscore(t2, p * (p + n - 1 + 2 / beta) / n)) < Z_MAX
    dense = np.array([_complex_wishart(p, n, beta, rng)[-1] for _ in range(REPS)])
    top = np.array(top)
    z = (top.mean() - dense.mean()) / np.sqrt(top.var(ddof=1) / REPS + dense.var(ddof=1) / REPS)
    assert abs(z) < Z_MAX, (top.mean(), dense.mean())


@pytest.mark.parametrize("beta", [1, 2, 4])
def test_laguerre_tridiagonal_spectrum_is_marchenko_pastur_at_every_beta(beta):
    """One large draw (p = 400, n = 1000, γ = 0.4): the eigenvalues fill the
    Marchenko–Pastur support [(1 − √γ)², (1 + √γ)²], with mean 1 and second moment 1 + γ."""
    from scipy.linalg import eigvalsh_tridiagonal
    p, n = 400, 1000
    g = p / n
    d, e = laguerre_tridiagonal(p, n, beta, seed=3)
    ev = eigvalsh_tridiagonal(d, e)
    assert ev.mean() == pytest.approx(1.0, abs=0.02)
    assert np.mean(ev ** 2) == pytest.approx(1 + g, abs=0.04)
    assert ev[-1] == pytest.approx((1 + np.sqrt(g)) ** 2, abs=0.06)
    assert ev[0] == pytest.approx((1 - np.sqrt(g)) ** 2, abs=0.03)

def test_spiked_laguerre_matches_dense_spiked_wishart_trace():
    # E tr S = (ℓ + p − 1)·σ² for Σ = diag(ℓ, 1, …): the spike enters only b₁₁
    rng = np.random.default_rng(5)
    p, n, ell = 5, 7, 4.0
    pop = np.r_[ell, np.ones(p - 1)]
    dense = [np.trace(wishart(p, n, rng, population=pop)) for _ in range(REPS)]
    tri = [laguerre_tridiagonal(p, n, 1, rng, spike=ell)[0].sum() for _ in range(REPS)]
    assert abs(zscore(dense, ell + p - 1)) < Z_MAX
    assert abs(zscore(tri, ell + p - 1)) < Z_MAX
    # second moment: E tr S² for Σ: (tr Σ² (n+1) + (tr Σ)²)/n
    tri2 = []
    for _ in range(REPS):
        d, e = laguerre_tridiagonal(p, n, 1, rng, spike=ell)
        tri2.append(np.sum(d ** 2) + 2 * np.sum(e ** 2))
    expected = (np.sum(pop ** 2) * (n + 1) + np.sum(pop) ** 2) / n
    assert abs(zscore(tri2, expected)) < Z_MAX


def test_profile_wigner_entry_variances():
    rng = np.random.default_rng(6)
    S = np.array([[4.0, 0.5], [0.5, 0.25]])
    f = np.array([0.4, 0.6])
    P = 400
    h = profile_wigner(P, S, f, rng)
    assert np.allclose(h, h.T)
    sizes = block_sizes(P, f)
    assert list(sizes) == [160, 240]
    blocks = [slice(0, 160), slice(160, 400)]
    for a in range(2):
        for b in range(2):
            x = h[blocks[a], blocks[b]]
            if a == b:
                x = x[np.triu_indices(x.shape[0], 1)]
            x = x.ravel() * np.sqrt(P)
            # sample variance vs S[a, b]; SE of a Gaussian variance is S·√(2/(k−1))
            se = S[a, b] * np.sqrt(2.0 / (x.size - 1))
            assert abs(np.mean(x ** 2) - S[a, b]) / se < Z_MAX


def test_spiked_models_are_exact_algebra():
    rng = np.random.default_rng(9)
    h = goe(30, rng)
    u = rng.standard_normal(30)
    hs = spiked_additive(h, 2.0, u)
    un = u / np.linalg.norm(u)
    assert np.allclose(hs - h, 2.0 * np.outer(un, un))
    G = np.diag(np.r_[5.0, np.ones(29)])
    W = wishart(30, 60, rng)
    M = spiked_multiplicative(G, W)
    Gh = np.diag(np.sqrt(np.diag(G)))
    assert np.allclose(M, Gh @ W @ Gh)


def test_bad_input_names_argument():
    with pytest.raises(ValueError, match="normalization"):
        goe(5, 0, "unit")
    with pytest.raises(ValueError, match="n"):
        goe(0, 0)
    with pytest.raises(TypeError, match="rng"):
        goe(5, "seed")
    with pytest.raises(ValueError, match="variance"):
        wishart(3, 4, 0, variance=-1.0)
    with pytest.raises(ValueError, match="block_variances"):
        profile_wigner(10, [[1.0, 2.0], [0.5, 1.0]], [0.5, 0.5], 0)
    with pytest.raises(ValueError, match="block_fractions"):
        profile_wigner(10, [[1.0, 0.5], [0.5, 1.0]], [0.5, 0.6], 0)
    with pytest.raises(ValueError, match="spike"):
        spiked_additive(np.eye(3), float("nan"))
    with pytest.raises(ValueError, match="G"):
        spiked_multiplicative(-np.eye(3), np.eye(3))


def test_spiked_models_refuse_non_square_or_non_symmetric_input():
    """spiked_additive(ones((2, 3))) failed inside numpy's broadcasting; a non-symmetric W
    was multiplied silently; symmetry is judged relative to the matrices' own scale."""
    with pytest.raises(ValueError, match="H"):
        spiked_additive(np.ones((2, 3)), 1.0)
    for s in (1.0, 1e-12, 1e12):
        with pytest.raises(ValueError, match="W"):
            spiked_multiplicative(np.eye(2), s * np.array([[1.0, 2.0], [0.0, 1.0]]))
        with pytest.raises(ValueError, match="G"):
            spiked_multiplicative(s * np.array([[1.0, 0.5], [0.0, 1.0]]), np.eye(2))
        W = s * np.array([[2.0, 1.0], [1.0, 3.0]])
        assert np.allclose(spiked_multiplicative(4 * np.eye(2), W), 4 * W)
    from rmt.ensembles import check_profile
    with pytest.raises(ValueError, match="block_variances"):
        check_profile(1e-20 * np.array([[1.0, 2.0], [0.5, 1.0]]), [0.5, 0.5])


def test_tridiagonal_eigvals_checks_which_and_lengths_at_every_size():
    from rmt.tridiagonal import tridiagonal_eigvals

    with pytest.raises(ValueError, match="which"):
        tridiagonal_eigvals([1.0], [], "middle")            # n = 1 skipped the check
    with pytest.raises(ValueError, match="which"):
        tridiagonal_eigvals([1.0, 2.0], [0.5], "middle")
    with pytest.raises(ValueError, match="off"):
        tridiagonal_eigvals([1.0, 2.0], [0.5, 1.0])
    with pytest.raises(ValueError, match="off"):
        tridiagonal_eigvals([1.0], [0.5])
    assert tridiagonal_eigvals([1.5], [], "bottom") == 1.5
    # [[1, 2], [2, 1]]: eigenvalues −1 and 3
    assert tridiagonal_eigvals([1.0, 1.0], [2.0], "top") == pytest.approx(3.0, rel=1e-14)
    assert tridiagonal_eigvals([1.0, 1.0], [2.0], "bottom") == pytest.approx(-1.0, rel=1e-14)


def test_a_negative_seed_is_named_once():
    """`goe(3, seed=-1)` said 'seed seed must be >= 0'."""
    from rmt.ensembles import goe

    with pytest.raises(ValueError, match=r"^seed must be >= 0, got -1$"):
        goe(3, seed=-1)
    with pytest.raises(ValueError, match=r"^rng seed must be >= 0, got -2$"):
        goe(3, -2)
