"""SLQ spectral density and Hutchinson trace against the dense Hessian of a tiny MLP."""

import numpy as np
import pytest
import torch
from torch import nn

from nets.algorithms.hutchinson import hutchinson_trace
from nets.algorithms.slq import slq_density
from nets.curvature.operators import CurvatureOperator, hessian_operator

CE = nn.functional.cross_entropy


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    op = hessian_operator(model, CE, (X, y), chunk_size=16)
    H = op.to_dense().numpy()
    return op, H


def test_weights_are_probability_vectors_and_density_integrates_to_one(mlp):
    op, H = mlp
    d = slq_density(op, num_probes=6, num_steps=25, seed=3)
    np.testing.assert_allclose(d.weights.sum(axis=1), 1.0, rtol=1e-12)
    assert np.all(d.weights >= 0)
    ev = np.linalg.eigvalsh(H)
    lo, hi = d.support()
    assert ev[0] - 1e-8 <= lo and hi <= ev[-1] + 1e-8          # Ritz values interlace
    sigma = 0.02 * (ev[-1] - ev[0])
    grid = np.linspace(ev[0] - 8 * sigma, ev[-1] + 8 * sigma, 4001)
    rho = d.density(grid, sigma)
    assert np.all(rho >= 0)
    assert np.trapezoid(rho, grid) == pytest.approx(1.0, abs=1e-6)


def test_each_probe_is_exact_gauss_quadrature(mlp):
    op, H = mlp
    m = 10
    d = slq_density(op, num_probes=4, num_steps=m, seed=5)
    Z = np.random.default_rng(5).choice([-1.0, 1.0], size=(op.P, 4))   # documented probes
    Hj = np.eye(op.P)
    for j in range(1, 2 * m):
        Hj = Hj @ H
        exact = np.einsum("pk,pq,qk->k", Z, Hj, Z) / op.P
        scale = max(1.0, np.abs(exact).max())
        np.testing.assert_allclose(d.probe_moments(j), exact, atol=1e-9 * scale)


def test_full_krylov_density_is_the_probe_weighted_spectrum(mlp):
    op, H = mlp
    ev, Q = np.linalg.eigh(H)
    d = slq_density(op, num_probes=1, num_steps=op.P, seed=7)
    z = np.random.default_rng(7).choice([-1.0, 1.0], size=(op.P, 1))[:, 0]
    w = (Q.T @ z) ** 2 / op.P
    sigma = 0.01
    grid = np.linspace(ev[0] - 0.1, ev[-1] + 0.1, 301)
    ref = (w[None, :] * np.exp(-0.5 * ((grid[:, None] - ev[None, :]) / sigma) ** 2)).sum(1)
    ref /= sigma * np.sqrt(2 * np.pi)
    np.testing.assert_allclose(d.density(grid, sigma), ref, atol=1e-7 * ref.max())


def test_moments_match_dense_traces_within_monte_carlo_error(mlp):
    op, H = mlp
    d = slq_density(op, num_probes=40, num_steps=20, seed=11)
    for j, exact in [(1, np.trace(H) / op.P), (2, np.trace(H @ H) / op.P)]:
        est, se = d.moment(j)
        assert se > 0
        assert abs(est - exact) / se < 4, (j, est, exact, se)
    assert d.moment(0)[0] == pytest.approx(1.0, rel=1e-12)


def test_hutchinson_trace_z_score_and_blocking(mlp):
    op, H = mlp
    r = hutchinson_trace(op, num_probes=64, seed=2)
    est, se = r.estimate, r.stderr
    assert se > 0
    assert abs(est - np.trace(H)) / se < 4
    r2 = hutchinson_trace(op, num_probes=64, seed=2, block_size=5)
    est2, se2 = r2.estimate, r2.stderr
    assert est2 == pytest.approx(est, rel=1e-12) and se2 == pytest.approx(se, rel=1e-9)
    # Rademacher quadratic forms are exact for a diagonal operator: zero variance
    from nets.curvature.operators import CurvatureOperator

    class Diag(CurvatureOperator):
        def __init__(self, d):
            super().__init__(len(d), torch.float64, "cpu")
            self.d = torch.as_tensor(d)

        def _matmat(self, V):
            return self.d[:, None] * V
    rd = hutchinson_trace(Diag(np.arange(5.0)), num_probes=3, seed=0)
    est_d, se_d = rd.estimate, rd.stderr
    assert est_d == pytest.approx(10.0) and se_d == pytest.approx(0.0, abs=1e-12)


def test_bad_arguments(mlp):
    op, _ = mlp
    with pytest.raises(ValueError, match="num_probes"):
        slq_density(op, num_probes=0)
    with pytest.raises(ValueError, match="sigma"):
        slq_density(op, num_probes=1, num_steps=3).density([0.0, 1.0], -1.0)
    with pytest.raises(ValueError, match="num_probes"):
        hutchinson_trace(op, num_probes=0)


class _Dense(CurvatureOperator):
    """A symmetric matrix as an operator whose products run in `dtype`."""

    def __init__(self, A, dtype):
        super().__init__(A.shape[0], dtype, "cpu")
        self.A = torch.as_tensor(A, dtype=dtype)

    def _matmat(self, V):
        return self.A @ V.to(self.A.dtype)


def test_float32_products_keep_a_small_bulk_below_an_outlier():
    """One eigenvalue 1 and a bulk in [0, 3e-5]: float32 products resolve the bulk (their
    round-off is ~1e-8), but a breakdown test of 10·eps32·√P·‖A‖ = 3.8e-5 (P = 1000)
    stopped every probe after 3 steps and lumped the bulk into one node."""
    rng = np.random.default_rng(0)
    P = 1000
    ev = np.r_[1.0, rng.uniform(0, 3e-5, P - 1)]
    Q, _ = np.linalg.qr(rng.standard_normal((P, P)))
    A = (Q * ev) @ Q.T
    d64 = slq_density(_Dense(A, torch.float64), num_probes=4, num_steps=40, seed=0)
    d32 = slq_density(_Dense(A, torch.float32), num_probes=4, num_steps=40, seed=0)
    assert [r.num_steps for r in d32.lanczos] == [40] * 4
    assert not any(r.breakdown for r in d32.lanczos)
    for t in np.quantile(ev[1:], [0.1, 0.5, 0.9]):
        cdf = [np.sum(d.weights * (d.nodes <= t)) / d.num_probes for d in (d64, d32)]
        assert abs(cdf[0] - cdf[1]) < 1e-3, (t, cdf)


def test_float32_low_rank_operator_quadrature_matches_float64():
    """Rank 4: float64 products stop at the invariant subspace (5 steps); a dense float32
    matmul's round-off there (up to ~1e-5·‖A‖, summation over P) may keep a probe going
    with a round-off direction, which must leave the quadrature unchanged."""
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((300, 300)))
    A = (Q * np.r_[4.0, 2.0, 1.0, 0.5, np.zeros(296)]) @ Q.T        # 5 distinct eigenvalues
    d64 = slq_density(_Dense(A, torch.float64), num_probes=3, num_steps=20, seed=0)
    d32 = slq_density(_Dense(A, torch.float32), num_probes=3, num_steps=20, seed=0)
    assert all(r.breakdown and r.num_steps <= 6 for r in d64.lanczos)
    for j in range(1, 6):
        np.testing.assert_allclose(d32.probe_moments(j), d64.probe_moments(j), rtol=1e-5)
    for t in (-0.1, 0.1, 0.7, 1.5, 3.0):                 # the mass at each eigenvalue
        cdf = [np.sum(d.weights * (d.nodes <= t), axis=1) for d in (d64, d32)]
        np.testing.assert_allclose(cdf[1], cdf[0], atol=1e-5)


def test_generator_seed_is_recorded_as_the_int_drawn(mlp):
    op, _ = mlp
    d = slq_density(op, num_probes=2, num_steps=5, seed=np.random.default_rng(5))
    assert isinstance(d.seed, int)
    assert d.to_dict()["seed"] == d.seed
    again = slq_density(op, num_probes=2, num_steps=5, seed=d.seed)
    np.testing.assert_array_equal(again.nodes, d.nodes)
    assert slq_density(op, num_probes=1, num_steps=3, seed=4).seed == 4


def test_hutchinson_stderr_squared_is_the_rademacher_variance_over_num_probes():
    """stderr² must estimate Var(zᵀAz)/k without bias. Oracle: for Rademacher z,
    Var(zᵀAz) = 2(‖A‖_F² − Σ_i A_ii²) exactly (dense numpy). Over R = 800 seeds with k = 4
    probes each, k·stderr² is the ddof=1 sample variance, unbiased for it; the z-score
    uses the spread of k·stderr² over the seeds (dropping the 1/√k would give a ratio k,
    ddof=0 a ratio (k − 1)/k = 0.75, > 7 standard errors off here)."""
    rng = np.random.default_rng(123)
    P, k, R = 12, 4, 800
    M = rng.standard_normal((P, P))
    A = (M + M.T) / 2
    var = 2.0 * (np.sum(A * A) - np.sum(np.diag(A) ** 2))
    op = _Dense(A, torch.float64)
    s2 = np.array([k * hutchinson_trace(op, num_probes=k, seed=s).stderr ** 2 for s in range(R)])
    z = (s2.mean() - var) / (s2.std(ddof=1) / np.sqrt(R))
    assert abs(z) < 4, (s2.mean() / var, z)
    # one run with many probes: stderr ≈ √(Var/k), to the sampling error of a variance
    big = hutchinson_trace(op, num_probes=4000, seed=7)
    assert big.stderr ** 2 * 4000 == pytest.approx(var, rel=0.15)
    assert abs(big.estimate - np.trace(A)) < 4 * np.sqrt(var / 4000)


def test_slq_moment_stderr_squared_is_the_rademacher_variance_over_num_probes():
    """moment(j)'s standard error² must estimate Var(zᵀA^jz/P)/k without bias (ddof = 1).
    Oracle: Var(zᵀBz) = 2(‖B‖_F² − Σ_i B_ii²) for Rademacher z and symmetric B = A^j (dense
    numpy); the per-probe moments are exact for j < 2·num_steps. Over R = 600 seeds with
    k = 4 probes, the mean of k·se² against it, as a z-score from its spread over seeds
    (ddof = 0 would give a ratio 0.75, > 7 standard errors off)."""
    rng = np.random.default_rng(321)
    P, k, R = 10, 4, 600
    M = rng.standard_normal((P, P))
    A = (M + M.T) / 2
    op = _Dense(A, torch.float64)
    ds = [slq_density(op, num_probes=k, num_steps=3, seed=s) for s in range(R)]
    for j in (1, 2):
        Bj = np.linalg.matrix_power(A, j)
        var = 2.0 * (np.sum(Bj * Bj) - np.sum(np.diag(Bj) ** 2)) / P ** 2
        s2 = np.array([k * d.moment(j)[1] ** 2 for d in ds])
        z = (s2.mean() - var) / (s2.std(ddof=1) / np.sqrt(R))
        assert abs(z) < 4, (j, s2.mean() / var, z)
