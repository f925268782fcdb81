"""The held-out tabular networks of `benchmarks/bench_heldout_tabular.py`: each variant is
what its name says, trained (loss well below the untrained ln 2) and reproducible."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import import_benchmark


@pytest.fixture(scope="module")
def bench():
    return import_benchmark("bench_heldout_tabular")


@pytest.mark.parametrize("name", ["plain", "ln_smooth"])
def test_variants_are_built_trained_and_reproducible(bench, name):
    spec = bench.VARIANTS[name]
    model, loss_fn, (X, y) = bench.trained_tabular_mlp(**spec, epochs=5)
    assert X.shape == (569, 30) and set(y.tolist()) == {0, 1} and not model.training
    has_ln = any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert has_ln == spec["layer_norm"] and loss_fn.label_smoothing == spec["smoothing"]
    with torch.no_grad():
        loss = float(loss_fn(model(X), y))
    assert loss < 0.5 * math.log(2) + spec["smoothing"]
    again, _, _ = bench.trained_tabular_mlp(**spec, epochs=5)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)
