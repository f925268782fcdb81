"""SLQ spectral density and Hutchinson trace against the dense Hessian of a tiny MLP."""

import numpy as np
import pytest
import torch
from torch import nn

from nets.algorithms.hutchinson import hutchinson_trace
from nets.algorithms.slq import slq_density
from nets.curvature.operators import hessian_operator

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
