"""λ'_1(B): measured batch top eigenvalues and their predictions (THEORY.md §2–§3)."""

import numpy as np
import pytest
import torch
from torch import nn

import rmt
from nets.batch_spectra import measure_batch_top_eigenvalue, predict_batch_top_eigenvalue
from nets.noise import directional_noise
from nets.operators import hessian_operator
from nets.spectra import bottom_eigenvalues, top_eigenvalues

CE = nn.functional.cross_entropy


def tiny(seed=0, N=30):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(N, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    return model, X, y


def test_top_and_bottom_eigenvalues_entry_points_match_dense():
    model, X, y = tiny()
    H = hessian_operator(model, CE, (X, y)).to_dense().numpy()
    ev = np.linalg.eigvalsh(H)
    top = top_eigenvalues(model, CE, (X, y), k=3, batch_size=7)
    assert isinstance(top, np.ndarray) and top.dtype == np.float64
    np.testing.assert_allclose(top, ev[::-1][:3], rtol=1e-8)
    np.testing.assert_allclose(bottom_eigenvalues(model, CE, (X, y), k=2), ev[:2], rtol=1e-8)
    from nets.operators import ggn_operator
    evg = np.linalg.eigvalsh(ggn_operator(model, CE, (X, y)).to_dense().numpy())
    np.testing.assert_allclose(top_eigenvalues(model, CE, (X, y), k=2, kind="ggn"),
                               evg[::-1][:2], rtol=1e-8)
    # float32 products: the same eigenvalue to float32 accuracy
    t32 = top_eigenvalues(model, CE, (X, y), dtype=torch.float32)
    assert abs(t32[0] - ev[-1]) < 1e-5 * abs(ev[-1])


def test_measured_values_are_dense_batch_top_eigenvalues():
    model, X, y = tiny(1)
    res = measure_batch_top_eigenvalue(model, CE, (X, y), [4, 30], n_batches=3, seed=2)
    assert set(res) >= {"mean", "std", "values", "indices"}
    for j, B in enumerate([4, 30]):
        idx = res["indices"][j]
        assert idx.shape == (3, B)
        assert all(len(set(row.tolist())) == B for row in idx)          # without replacement
        dense = [np.linalg.eigvalsh(hessian_operator(model, CE, (X[r], y[r])).to_dense().numpy())[-1]
                 for r in idx]
        np.testing.assert_allclose(res["values"][j], dense, rtol=1e-7)
        assert res["mean"][j] == pytest.approx(np.mean(dense), rel=1e-7)
    # B = N: every batch is the full data set
    assert res["std"][1] < 1e-9 * abs(res["mean"][1])
    assert res["mean"][1] == pytest.approx(top_eigenvalues(model, CE, (X, y))[0], rel=1e-7)


def test_prediction_formulas_and_the_B_equals_N_limit():
    model, X, y = tiny(2)
    N = X.shape[0]
    pred = predict_batch_top_eigenvalue(model, CE, (X, y), [2, 10, N], seed=1)
    lam = top_eigenvalues(model, CE, (X, y))[0]
    assert pred["lam"] == pytest.approx(lam, rel=1e-7)
    op = hessian_operator(model, CE, (X, y))
    H = op.to_dense()
    ev, Q = torch.linalg.eigh(H)
    s2 = directional_noise(model, CE, (X, y), Q[:, -1]).s2
    assert pred["s2_directional"] == pytest.approx(s2, rel=1e-6)
    c = np.array([rmt.batch_noise_factor(B, N) for B in [2, 10, N]])
    np.testing.assert_allclose(pred["directional"], lam + c * s2 / lam, rtol=1e-6)
    np.testing.assert_allclose(pred["isotropic"], lam + c * pred["s2_isotropic"] / lam, rtol=1e-12)
    assert pred["directional"][-1] == pytest.approx(lam) and pred["isotropic"][-1] == pytest.approx(lam)
    assert np.all(np.diff(pred["directional"]) < 0)                 # shift ∝ c(B, N)
    clipped = [rmt.spiked_wigner_outlier(lam, ci * pred["s2_isotropic"], clip=True) for ci in c]
    np.testing.assert_allclose(pred["isotropic_clipped"], clipped, rtol=1e-6)
    # GGN version: λ is the top eigenvalue of the dense GGN
    from nets.operators import ggn_operator
    pg = predict_batch_top_eigenvalue(model, CE, (X, y), [2, 10], kind="ggn")
    lam_g = np.linalg.eigvalsh(ggn_operator(model, CE, (X, y)).to_dense().numpy())[-1]
    assert pg["lam"] == pytest.approx(lam_g, rel=1e-7)
    assert pg["s2_directional"] > 0 and np.all(pg["directional"] > lam_g)


def test_bad_input():
    model, X, y = tiny()
    with pytest.raises(ValueError, match="batch_sizes"):
        measure_batch_top_eigenvalue(model, CE, (X, y), [31])
    with pytest.raises(ValueError, match="batch_sizes"):
        predict_batch_top_eigenvalue(model, CE, (X, y), [0])
    with pytest.raises(ValueError, match="n_batches"):
        measure_batch_top_eigenvalue(model, CE, (X, y), [4], n_batches=0)
    with pytest.raises(ValueError, match="kind"):
        measure_batch_top_eigenvalue(model, CE, (X, y), [4], kind="fisher")
    Xn = X.clone()
    Xn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        predict_batch_top_eigenvalue(model, CE, (Xn, y), [4])


# ------------------------------------------------------------------------------------
# Issue acceptance: digits MLP, directional vs isotropic (and subspace) prediction of λ'_1(B)

BATCHES = [8, 32, 128, 512]


@pytest.fixture(scope="module")
def digits_curves():
    from nets.training import trained_digits_mlp
    model, (X, y) = trained_digits_mlp(seed=0)
    # subspace_k="auto": k = number of outputs (10 classes), the rule fixed in
    # nets.subspace_noise.default_subspace_dim before looking at any result
    pred = predict_batch_top_eigenvalue(model, CE, (X, y), BATCHES, seed=0, num_probes=10,
                                        subspace_k="auto")
    meas = measure_batch_top_eigenvalue(model, CE, (X, y), BATCHES, n_batches=80, seed=1)
    return pred, meas


@pytest.mark.slow
def test_digits_directional_prediction_tracks_measurement(digits_curves):
    pred, meas = digits_curves
    ratio = pred["directional"] / meas["mean"]
    # noise concentrates on the outlier direction (THEORY §3): s_u² ≫ P·σ²_avg
    assert pred["s2_directional"] > 20 * pred["s2_isotropic"]
    # the isotropic form underpredicts strongly at small B, and at every B
    assert np.all(pred["isotropic"] < meas["mean"])
    assert np.all(pred["isotropic"][:2] < 0.35 * meas["mean"][:2])
    # the directional form: within 20 % at B = 512 and within 40 % throughout. Over five
    # measurement seeds (80 batches each) the ratio predicted/measured was 1.18–1.27 at
    # B = 8, 0.68–0.78 at B = 32, 0.71–0.78 at B = 128 and 0.90–0.93 at B = 512, so the
    # issue's 20 % at every B is missed (strict xfail below); it is still 3–10× closer
    # than the isotropic form at B ≤ 32.
    assert abs(ratio[-1] - 1) < 0.2, ratio
    assert np.all(np.abs(ratio - 1) < 0.4), ratio
    iso_err = np.abs(pred["isotropic"] / meas["mean"] - 1)
    assert np.all(np.abs(ratio - 1)[:2] < 0.5 * iso_err[:2]), (ratio, iso_err)
    assert np.all(meas["converged"][0]) and np.all(np.diff(meas["mean"]) < 0)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue criterion 'directional within 20% at every B' "
                   "is missed at B=32 and 128 (ratio ≈ 0.68–0.78) and at B=8 (1.18–1.27): the digits MLP's top "
                   "eigenvalue is not a separated outlier (λ1≈0.27, λ2≈0.23) and the "
                   "second-order shift c·s²/λ exceeds λ there")
def test_digits_directional_within_20_percent_at_every_B(digits_curves):
    pred, meas = digits_curves
    ratio = pred["directional"] / meas["mean"]
    assert np.all(np.abs(ratio - 1) < 0.2), ratio


@pytest.mark.slow
def test_digits_subspace_prediction(digits_curves):
    """Quasi-degenerate (Löwdin, top-k eigenspace, k = 10 outputs) form, nets.subspace_noise.
    Measured (n_batches=80): ratio subspace/measured ≈ 0.80, 0.74, 0.85, 1.02 at
    B = 8, 32, 128, 512 — it does not close the B = 32 gap (see the xfail below)."""
    pred, meas = digits_curves
    assert pred["subspace_k"] == 10
    lams = pred["subspace_lams"]
    assert lams[0] == pytest.approx(pred["lam"], rel=1e-6)       # float32 products
    assert lams[1] > 0.8 * lams[0]                          # quasi-degenerate top
    ratio = pred["subspace"] / meas["mean"]
    # Monte-Carlo error of the k×k resampling is negligible against the measurement's
    assert np.all(pred["subspace_stderr"] < 0.25 * meas["stderr"])
    assert abs(ratio[-1] - 1) < 0.2, ratio
    assert np.all(np.abs(ratio - 1) < 0.35), ratio
    # at the intermediate B = 32, 128 (around the critical batch size s_u²/λ² ≈ 90) it
    # underpredicts, like the directional form (measurement > prediction + 2 stderr)
    mid = np.isin(pred["batch_sizes"], [32, 128])
    assert np.all((meas["mean"] - pred["subspace"])[mid] > 2 * meas["stderr"][mid]), ratio


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the quasi-degenerate subspace form (k = 10) is also "
                   "> 20 % low at B = 32 (ratio ≈ 0.74): the missing shift comes from the "
                   "complement, (z − Q H_B Q)⁻¹ ≠ 1/z when c·s²/λ² ≫ 1, not from near-"
                   "degeneracy of the top outliers (moving more complement directions into the exact "
                   "block closes it: k = 64 gives 0.89, k = 100 gives 0.94; k = P is exact)")
def test_digits_subspace_within_20_percent_at_every_B(digits_curves):
    pred, meas = digits_curves
    ratio = pred["subspace"] / meas["mean"]
    assert np.all(np.abs(ratio - 1) < 0.2), ratio


def test_measure_sweep_resumes_from_store_bit_identically(tmp_path):
    import torch as _torch
    import torch.nn.functional as _F
    from nets.batch_spectra import measure_batch_top_eigenvalue as _measure
    from nets.jsonl_store import JsonlStore as _Store

    g = _torch.Generator().manual_seed(0)
    model = _torch.nn.Sequential(_torch.nn.Linear(4, 5), _torch.nn.Tanh(), _torch.nn.Linear(5, 3)).double()
    X = _torch.randn(40, 4, generator=g, dtype=_torch.float64)
    y = _torch.randint(0, 3, (40,), generator=g)
    path = tmp_path / "sweep.jsonl"
    ref = _measure(model, _F.cross_entropy, (X, y), [4, 8, 16], n_batches=3, seed=5)
    # an interrupted sweep: only B=8 finished
    part = _measure(model, _F.cross_entropy, (X, y), [8], n_batches=3, seed=5, store=path)
    assert np.array_equal(part["values"][0], ref["values"][1])
    full = _measure(model, _F.cross_entropy, (X, y), [4, 8, 16], n_batches=3, seed=5, store=path)
    for a, b in zip(full["values"], ref["values"]):
        assert np.array_equal(a, b)
    assert len(_Store(path)) == 3  # B=8 was read back, not recomputed or duplicated
    # a stored record is what is returned: corrupting it shows up in the result
    again = _measure(model, _F.cross_entropy, (X, y), [8], n_batches=3, seed=5, store=path)
    assert np.array_equal(again["indices"][0], ref["indices"][1])
