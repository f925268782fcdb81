"""The heavy-ball growth-rate estimator of `benchmarks/bench_momentum_linear.py` (the
linear model's almost-sure threshold) against exact answers: the deterministic spectral
radius at B = N, heavy ball included, and the one-dimensional i.i.d. product, whose
Lyapunov exponent is a plain average."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import import_benchmark


@pytest.fixture(scope="module")
def bench():
    return import_benchmark("bench_momentum_linear")


def _factors(seed, N=12, K=2, P=5):
    return torch.randn(N, K, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ggn_eigenvalues(R):
    return np.linalg.eigvalsh(torch.einsum("nkp,nkq->pq", R, R).numpy() / R.shape[0])


def _log_spectral_radius(lams, alpha, m):
    """log max_k |z| over the roots of z² − (1 + m − αλ_k)·z + m (heavy ball on λ_k)."""
    return float(np.log(max(np.abs(np.roots([1.0, -(1.0 + m - alpha * lam), m])).max()
                            for lam in lams)))


@pytest.mark.parametrize("m", [0.0, 0.9])
def test_full_batch_growth_rate_is_the_log_spectral_radius(bench, m):
    R = _factors(1)
    lams = _ggn_eigenvalues(R)
    alphas = np.array([0.3, 0.9, 1.1, 1.5]) * 2 * (1 + m) / lams[-1]
    got = bench.growth_rates(R, R.shape[0], m, alphas, 1500, 0)
    want = [_log_spectral_radius(lams, a, m) for a in alphas]
    np.testing.assert_allclose(got, want, atol=2e-3)


@pytest.mark.parametrize("m", [0.0, 0.9])
def test_full_batch_threshold_is_the_deterministic_limit(bench, m):
    from paper_checks.checks._quadratic_runs import GROWTH_TOL, threshold_from_grid

    R = _factors(2)
    limit = 2 * (1 + m) / _ggn_eigenvalues(R)[-1]
    grid = limit * np.geomspace(0.7, 1.4, 81)
    steps = 600
    got = threshold_from_grid(grid, bench.growth_rates(R, R.shape[0], m, grid, steps, 0),
                              GROWTH_TOL / steps)
    assert got == pytest.approx(limit, rel=0.01)


def test_one_dimensional_iid_product_rate_is_the_mean_log(bench):
    # P = K = 1, B = 1: e ← (1 − α x_i²) e with i uniform at each step, so the rate is
    # (1/N) Σ log|1 − α x_i²|; x_i² ∈ [2, 3] and α = 0.8 keep 1 − αx² in [−1.4, −0.6]
    N, alpha, steps = 40, 0.8, 4000
    x2 = np.linspace(2.0, 3.0, N)
    R = torch.from_numpy(np.sqrt(x2)).reshape(N, 1, 1)
    terms = np.log(np.abs(1 - alpha * x2))
    got = bench.growth_rates(R, 1, 0.0, np.array([alpha]), steps, 3)[0]
    se = terms.std() / np.sqrt(steps // 2)
    assert abs(got - terms.mean()) < 4 * se, (got, terms.mean(), se)
