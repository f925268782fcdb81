"""The held-out 1-D convolutional network of `benchmarks/bench_heldout_conv1d.py`: the
architecture its docstring states, trained (loss below the untrained ln 4) and
reproducible."""

from __future__ import annotations

import math

import torch
from conftest import import_benchmark, same_weights


def test_network_is_built_trained_and_reproducible():
    bench = import_benchmark("bench_heldout_conv1d")
    model, loss_fn, (X, y) = bench.trained_conv1d(steps=150)
    assert X.shape == (1200, 24) and set(y.tolist()) == {0, 1, 2, 3} and not model.training
    assert sum(p.numel() for p in model.parameters()) == 2076
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 8, (5,)),
                                                                               (8, 8, (5,))]
    assert abs(float(X.mean())) < 1e-5 and abs(float(X.std(0).mean()) - 1) < 1e-3
    with torch.no_grad():
        loss = float(loss_fn(model(X), y))
    assert loss < 0.8 * math.log(4)
    again, _, _ = bench.trained_conv1d(steps=150)
    assert same_weights(model, again)
