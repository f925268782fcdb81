"""The held-out token transformer of `benchmarks/bench_heldout_token.py`: the architecture,
data and labels its docstring states, and training that is reproducible and fits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import import_benchmark, same_weights


def test_token_network_its_data_and_training():
    bench = import_benchmark("bench_heldout_token")
    X, y = bench.token_data()
    assert X.shape == (1500, 10) and X.dtype == torch.int64 and int(X.min()) >= 0 \
        and int(X.max()) < 50
    groups = torch.div(X, 13, rounding_mode="floor").clamp(max=3)
    counts = torch.stack([(groups == g).sum(1) for g in range(4)], 1)
    # the label is the most frequent group, ties to the later one (written out)
    best = counts.max(1, keepdim=True).values
    later = torch.where(counts == best, torch.arange(4), -1).max(1).values
    assert torch.equal(y, later)
    model, loss_fn, (X2, y2) = bench.trained(epochs=3)
    assert torch.equal(X, X2) and torch.equal(y, y2)
    assert sum(p.numel() for p in model.parameters()) == 3092 and not model.training
    again, _, _ = bench.trained(epochs=3)
    assert same_weights(model, again)
    torch.manual_seed(0)                          # the recipe's initialisation
    with torch.no_grad():
        start = float(F.cross_entropy(bench.token_net().eval()(X), y))
        assert float(loss_fn(model(X), y)) < 0.85 * start
