"""The held-out tabular networks of `benchmarks/bench_heldout_tabular.py`: each variant is
what its name says, trained (loss well below the untrained ln 2) and reproducible."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import import_benchmark, same_weights


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
    assert same_weights(model, again)


def test_layer_norm_block_is_a_symmetry_of_the_jacobian(bench):
    """Scaling the weights before a LayerNorm (eps = 0; with torch's eps the symmetry holds
    up to eps/variance) leaves the outputs unchanged, so the Jacobian annihilates that
    block's own weight vector (J_blk·w_blk = 0, float64), and the split covers every
    parameter once."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.LayerNorm(6, eps=0.0),
                                torch.nn.GELU(),
                                torch.nn.Linear(6, 3)).eval()
    X = torch.randn(7, 5)
    z0, Jb, Jr, w_blk = bench.linearized_outputs(model, X, ("0.weight", "0.bias"))
    assert z0.shape == (7, 3) and Jb.shape == (7, 3, 36) and Jr.shape == (7, 3, 12 + 21)
    assert float((Jb @ w_blk).abs().max()) < 1e-6 * float(Jb.abs().max() * w_blk.norm())
    torch.testing.assert_close(z0, model.double()(X.double()))


def test_small_b_exponent_of_exact_power_laws():
    """The bootstrap exponent of `bench_adam` (used for the tabular Adam rows): seeds that
    all follow α = 0.01·√B give exactly 1/2 with a zero-width interval; a seed spread that
    is the same relative at every B leaves the slope of the means at 1/2 inside the
    interval; B > max_b is not fitted."""
    import numpy as np

    bench_adam = import_benchmark("bench_adam")
    B = np.array([8, 32, 128, 512])
    exact = np.outer(0.01 * np.sqrt(B), np.ones(4))
    exact[3] = 1.0                                          # B = 512: outside max_b = 128
    e = bench_adam.small_b_exponent(B, exact, np.random.default_rng(0), n_boot=200)
    assert e["exponent"] == pytest.approx(0.5) and e["ci_low"] == pytest.approx(0.5)
    assert e["ci_high"] == pytest.approx(0.5)
    spread = np.outer(0.01 * np.sqrt(B), [0.8, 0.9, 1.1, 1.2])
    e = bench_adam.small_b_exponent(B, spread, np.random.default_rng(0), n_boot=500)
    assert e["exponent"] == pytest.approx(0.5) and e["ci_low"] < 0.5 < e["ci_high"]


def test_rederive_uses_the_momentum_curve(bench):
    """A row stored with λ'(B) (before the fix) is converted to λ'_m = λ + (1+m)/(1−m)·(λ' − λ)
    once: its directional shape is 1/λ'_m and its default the linearised threshold times
    1 − (1 − r)·λ/λ'_m (r ≤ 1), worked by hand; re-deriving the converted row changes nothing."""
    import numpy as np

    row = {"real": [1.0, 2.0, 4.0, 8.0], "lam": 1.0, "lam_prime": [3.0, 2.0, 1.5, 1.1],
           "linearized": [1.0, 2.0, 4.0, 8.0], "secant_ratio": 0.8}
    out = bench.rederive(row, 0.9)
    eff = 1.0 + 19.0 * (np.array([3.0, 2.0, 1.5, 1.1]) - 1.0)       # 39, 20, 10.5, 2.9
    np.testing.assert_allclose(out["lam_prime"], eff)
    np.testing.assert_allclose(out["default_correction"], 1 - 0.2 / eff)
    lin = np.array([1.0, 2.0, 4.0, 8.0])
    shape = lin * (1 - 0.2 / eff)                                   # real = lin: ratio = shape
    np.testing.assert_allclose(out["transfer_default"]["B32"],
                               shape / shape[1] * 2.0 / np.array(row["real"]))
    np.testing.assert_allclose(out["transfer_directional"]["B512"],
                               eff[3] / eff * 8.0 / np.array(row["real"]))
    again = bench.rederive(out, 0.9)
    np.testing.assert_allclose(again["lam_prime"], eff)
    np.testing.assert_allclose(again["worst_default"], out["worst_default"])
