"""The quadratic-model runner of `benchmarks/bench_criterion.py` against closed forms.

With every sample's gradient equal to g and the full batch (B = N), the model is
deterministic heavy ball on L0 + gᵀe + ½eᵀGe, stable iff α < 2(1+m)/λ_max(G) (Jury).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import import_benchmark


@pytest.fixture(scope="module")
def bench():
    return import_benchmark("bench_criterion")


@pytest.mark.parametrize("m", [0.0, 0.5, 0.9])
def test_deterministic_quadratic_edge(bench, m):
    gen = torch.Generator().manual_seed(3)
    N, K, P = 6, 2, 5
    R = torch.randn(N, K, P, generator=gen, dtype=torch.float64)
    G = torch.einsum("nkp,nkq->pq", R, R) / N
    lam = float(torch.linalg.eigvalsh(G)[-1])
    Gi = torch.randn(1, P, generator=gen, dtype=torch.float64).expand(N, P).clone()
    edge = 2.0 * (1.0 + m) / lam
    grid = np.array([0.9 * edge, 1.1 * edge])
    worst = bench.surrogate_max_loss(R, Gi, 5.0, N, m, grid, 300, seed=0)
    assert worst[0] < 1e3                     # bounded below the edge
    assert worst[1] > 1e6                     # grows geometrically above it
    assert bench.first_crossing(grid, worst, 1e6) == pytest.approx(np.sqrt(0.99) * edge)


def test_first_crossing_edges(bench):
    grid = np.array([1.0, 2.0, 4.0])
    assert np.isnan(bench.first_crossing(grid, [1.0, 1.5, 2.0], 3.0))     # never
    assert np.isnan(bench.first_crossing(grid, [5.0, 6.0, 7.0], 3.0))     # from the bottom
    assert bench.first_crossing(grid, [1.0, 5.0, 7.0], 3.0) == pytest.approx(np.sqrt(2.0))
