"""The held-out ELU CNN of `benchmarks/bench_heldout_elu_cnn.py`: the architecture its
docstring states (2,618 parameters, average pooling, no max-pool or normalisation),
trained below chance and reproducible, and the rule ratios worked by hand."""

from __future__ import annotations

import math

import numpy as np
import torch
from conftest import import_benchmark, same_weights


def test_network_is_built_trained_and_reproducible():
    bench = import_benchmark("bench_heldout_elu_cnn")
    model, loss_fn, (X, y) = bench.trained_elu_cnn(epochs=2)
    assert X.shape == (1797, 1, 8, 8) and not model.training
    assert sum(p.numel() for p in model.parameters()) == 2618
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"Conv2d", "ELU", "AvgPool2d", "Linear"} <= kinds
    assert not kinds & {"MaxPool2d", "BatchNorm2d", "Dropout", "LayerNorm"}
    with torch.no_grad():
        loss = float(loss_fn(model(X), y))
    assert loss < 0.5 * math.log(10)
    again, _, _ = bench.trained_elu_cnn(epochs=2)
    assert same_weights(model, again)


def test_rule_ratios_by_hand():
    bench = import_benchmark("bench_heldout_elu_cnn")
    real = np.array([1.0, 2.0, 4.0, 8.0])              # ∝ √B over B = 8, 32, 128, 512
    sq = bench.rule_ratios(real, 0.5)
    np.testing.assert_allclose(sq["B32"], 1.0)
    np.testing.assert_allclose(bench.rule_ratios(real, 1.0)["B32"], [0.5, 1.0, 2.0, 4.0])
