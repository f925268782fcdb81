"""The transfer ratios of `benchmarks/bench_heldout_transfer.py`
against values worked by hand (the correction's own: tests/test_lr_transfer.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import import_benchmark


@pytest.fixture(scope="module")
def bench():
    return import_benchmark("bench_heldout_transfer")


def test_transfer_ratios_by_hand(bench):
    real = np.array([1.0, 2.0, 4.0, 8.0])
    shape = real * np.array([1.0, 1.0, 1.0, 2.0])        # one point off by 2×
    t = bench.transfers(real, shape)
    np.testing.assert_allclose(t["B32"], [1.0, 1.0, 1.0, 2.0])
    np.testing.assert_allclose(t["B512"], [0.5, 0.5, 0.5, 1.0])
    r = bench.rows(real, 1.0, [2.0, 1.5, 1.2, 1.0], shape, 0.5)
    assert r["worst_linearized"] == [0.5, 2.0]
    assert bench.output_name("gelu") == "bench_heldout_transfer_gelu"
    assert bench.output_name("gelu", 0.9) == "bench_heldout_transfer_gelu_m0.9"
    np.testing.assert_allclose(r["corrected"], shape * (1 - 0.5 / np.array([2.0, 1.5, 1.2, 1.0])))


def test_mse_tabular_network_is_trained_on_half_mse(bench):
    import torch

    model, (X, y), loss_fn = bench.trained_mse_tabular(epochs=3)
    assert X.shape == (569, 30) and not model.training
    with torch.no_grad():
        out = model(X)
        onehot = torch.nn.functional.one_hot(y, 2).to(out.dtype)
        by_hand = 0.5 * ((out - onehot) ** 2).sum(1).mean()
        assert float(loss_fn(out, y)) == pytest.approx(float(by_hand), rel=1e-6)
        assert float(by_hand) < 0.25      # below predicting 0.5 for both classes: ½(0.5² + 0.5²)
    assert {"mse_gelu", "mse_tabular"} <= set(bench.HELD_OUT_MSE)
