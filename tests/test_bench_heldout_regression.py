"""The held-out regression MLP of `benchmarks/bench_heldout_regression.py`: the
architecture, data and target its docstring states, and training that is reproducible
and fits."""

from __future__ import annotations

import torch
from conftest import import_benchmark, same_weights


def test_regression_network_and_its_target():
    bench = import_benchmark("bench_heldout_regression")
    model, loss_fn, (X, y) = bench.trained(epochs=2)
    assert sum(p.numel() for p in model.parameters()) == 4321 and not model.training
    assert X.shape == (1797, 64) and y.shape == (1797, 1)
    digits = torch.round(y[:, 0] * 2.87 + 4.5)
    assert set(digits.tolist()) == set(range(10))
    torch.testing.assert_close(y[:, 0], (digits - 4.5) / 2.87)
    again, _, _ = bench.trained(epochs=2)
    assert same_weights(model, again)
    torch.manual_seed(0)                          # the recipe's initialisation
    with torch.no_grad():
        start = float(loss_fn(bench.regression_mlp()(X), y))
        assert float(loss_fn(model(X), y)) < 0.5 * start
