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
    # the share tried and not kept, q = min(1, α_lin·λ/(2(1+m))): α_lin = 1, 2, 4, 16, λ = 1
    np.testing.assert_allclose(r["share_q"], [0.5, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(r["corrected_q"], shape * (1 - 0.5 * np.array([0.5, 1.0, 1.0, 1.0])))
    m = bench.rows(real, 1.0, [2.0, 1.5, 1.2, 1.0], shape, 0.5, momentum=0.9)   # edge 3.8
    np.testing.assert_allclose(m["share_q"], [1 / 3.8, 2 / 3.8, 1.0, 1.0])
    np.testing.assert_allclose(m["corrected"], r["corrected"])      # λ'_m given: no m inside
    again = bench.rederive({**m, "momentum": 0.9, "corrected_q": None})
    np.testing.assert_allclose(again["corrected_q"], m["corrected_q"])


def test_user_style_networks_are_built_as_documented(bench):
    import torch

    res, (X, y) = bench.user_style_network("res_gn")
    assert X.shape == (1797, 1, 8, 8) and res(X[:4]).shape == (4, 10)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in res.modules())
    mlp, (X, _) = bench.user_style_network("ln_mlp")
    assert X.shape == (1797, 64) and mlp(X[:4]).shape == (4, 10)
    assert any(isinstance(m, torch.nn.LayerNorm) for m in mlp.modules())
    assert set(bench.HELD_OUT_USER) == {"res_gn", "ln_mlp"}


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


def test_synthetic_data_network_is_built_as_documented(bench):
    import torch

    model, (X, y) = bench.trained_synth_silu(epochs=1)
    assert X.shape == (3000, 24) and set(y.tolist()) == {0, 1, 2, 3} and not model.training
    np.testing.assert_allclose(X.mean(0).numpy(), 0.0, atol=1e-5)      # standardised
    np.testing.assert_allclose(X.std(0, unbiased=False).numpy(), 1.0, atol=1e-4)
    assert sum(p.numel() for p in model.parameters()) == 24 * 64 + 64 + 64 * 64 + 64 + 64 * 4 + 4
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert "synth_silu" in bench.ALL_NETS and "synth_silu" in bench.HELD_OUT_SYNTH
