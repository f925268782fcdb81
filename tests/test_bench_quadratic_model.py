"""`benchmarks/bench_quadratic_model.py` part 2: the loss profile along the top
eigenvector as the script reports it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import import_benchmark


@pytest.fixture(scope="module")
def bench():
    return import_benchmark("bench_quadratic_model")


def _data(seed=0, N=64, d=5, K=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, d, generator=g), torch.randint(0, K, (N,), generator=g)


def test_secant_along_top_reports_the_library_profile(bench):
    """The script's part 2 is `loss_along_top` read at each tolerance (its oracles are in
    tests/test_along_top.py)."""
    from nets.learning_rates.along_top import loss_along_top

    torch.manual_seed(1)
    X, y = _data(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    out = bench.secant_along_top(model, X, y, factors=(2.0, 3.0), n=20)
    for k in (2.0, 3.0):
        prof = loss_along_top(model, torch.nn.functional.cross_entropy, (X, y), factor=k, n=20)
        np.testing.assert_array_equal(out["real"]["plus"], prof.real_plus)
        A, s = prof.amplitude_linearized, prof.secant_linearized
        assert out["linearized"][f"k{k:g}"] == {"A": A, "secant_over_lam": s}
