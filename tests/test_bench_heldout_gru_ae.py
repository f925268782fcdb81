"""The held-out GRU and autoencoder of `benchmarks/bench_heldout_gru_ae.py`: the
architectures and data its docstring states, the GRU's data handed over as a DataLoader
that the package reads as the same samples, and training that is reproducible."""

from __future__ import annotations

import math

import torch
from conftest import import_benchmark, same_weights

import nets


def test_gru_network_and_its_loader():
    bench = import_benchmark("bench_heldout_gru_ae")
    model, loss_fn, loader = bench.trained("gru", epochs=1)
    assert sum(p.numel() for p in model.parameters()) == 1107 and not model.training
    assert isinstance(loader, torch.utils.data.DataLoader)
    X, y = bench.sequences()
    assert X.shape == (1000, 12, 4) and set(y.tolist()) == {0, 1, 2}
    Xs, ys = nets.as_data_source(loader).tensors()
    assert torch.equal(Xs, X) and torch.equal(ys, y)
    # the class signal is on channel c: its mean over the second half differs by class
    late = X[:, 6:, :].mean(1)
    means = torch.stack([late[y == c].mean(0) for c in range(3)])
    assert means[0, 0] > means[1, 0] + 0.3
    again, _, _ = bench.trained("gru", epochs=1)
    assert same_weights(model, again)
    with torch.no_grad():
        assert float(loss_fn(model(X), y)) < math.log(3)


def test_autoencoder_and_its_target():
    bench = import_benchmark("bench_heldout_gru_ae")
    model, loss_fn, (X, Y) = bench.trained("ae", epochs=2)
    assert sum(p.numel() for p in model.parameters()) == 4744
    assert X.shape == (1797, 64) and torch.equal(X, Y)
    torch.manual_seed(0)                          # the recipe's initialisation
    with torch.no_grad():
        start = float(loss_fn(bench.autoencoder()(X), X))
        assert float(loss_fn(model(X), X)) < 0.9 * start
