"""Quasi-degenerate (subspace) form of λ'_1(B): oracles and exact limits."""

import numpy as np
import pytest
import torch
from torch import nn

import rmt
from nets.curvature.operators import hessian_operator
from nets.noise.batch_spectra import measure_batch_top_eigenvalue, predict_batch_top_eigenvalue
from nets.noise.directional import directional_noise
from nets.noise.subspace_noise import (
    SubspaceNoise,
    default_subspace_dim,
    subspace_batch_top_eigenvalue,
    subspace_noise,
    subspace_noise_from_operator,
)

CE = nn.functional.cross_entropy


@pytest.fixture(scope="module")
def dense(tiny_mlp, per_sample_hessians):
    """Dense float64 per-sample Hessians H_i (N, P, P), their mean H, eigenpairs of H."""
    model, X, y = tiny_mlp()
    return (model, X, y) + per_sample_hessians(model, CE, X, y)


def test_projections_match_dense_per_sample_hessians(dense):
    model, X, y, Hs, H, ev, V = dense
    N, P = Hs.shape[:2]
    k = 4
    U = V[:, :k]
    op = hessian_operator(model, CE, (X, y))
    sn = subspace_noise_from_operator(op, torch.from_numpy(U), chunk_size=7)
    Delta = Hs - H
    a = np.einsum("pi,npq,qj->nij", U, Delta, U)
    R = Delta @ U - U @ a                                     # Q (H_i − H) U
    np.testing.assert_allclose(sn.a, a, atol=1e-12)
    np.testing.assert_allclose(sn.D, np.einsum("npi,npj->ij", R, R) / (N - 1), atol=1e-12)
    np.testing.assert_allclose(sn.S, np.einsum("nij,njl->il", a, a) / (N - 1), atol=1e-12)
    np.testing.assert_allclose(sn.lam, ev[:k], rtol=1e-10)
    assert np.abs(sn.a.sum(axis=0)).max() < 1e-12
    # s_u² = S_jj + D_jj is the directional noise of nets.noise.directional along each column
    for j in range(k):
        s2 = directional_noise(model, CE, (X, y), torch.from_numpy(U[:, j])).s2
        assert sn.directional_s2[j] == pytest.approx(s2, rel=1e-10)
    # restrict(k') equals the statistics computed afresh on the first k' columns
    r = sn.restrict(2)
    fresh = subspace_noise_from_operator(op, torch.from_numpy(U[:, :2]))
    for name in ("a", "D", "S", "H_U"):
        np.testing.assert_allclose(getattr(r, name), getattr(fresh, name), atol=1e-12)
    # the entry point with eigsh gives the same span statistics (rotation-invariant traces)
    full = subspace_noise(model, CE, (X, y), k=k, seed=3)
    assert np.trace(full.D) == pytest.approx(np.trace(sn.D), rel=1e-8)
    assert np.trace(full.S) == pytest.approx(np.trace(sn.S), rel=1e-8)


def test_k_equals_P_is_exactly_the_batch_hessian(dense):
    """k = P: Q = 0, D = 0, and Λ + a_S = Uᵀ H_S U, so on the same batches the model's top
    eigenvalue is the measured batch top eigenvalue (an exact identity)."""
    model, X, y, Hs, H, ev, V = dense
    P = H.shape[0]
    sn = subspace_noise(model, CE, (X, y), k=P)
    assert np.abs(sn.D).max() < 1e-12
    meas = measure_batch_top_eigenvalue(model, CE, (X, y), [3, 12], n_batches=4, seed=5)
    for sc in (False, True):
        res = subspace_batch_top_eigenvalue(sn, [3, 12], indices=meas["indices"],
                                            self_consistent=sc)
        for j in range(2):
            np.testing.assert_allclose(res["values"][j], meas["values"][j], rtol=1e-8)
        np.testing.assert_allclose(res["mean"], meas["mean"], rtol=1e-8)


def test_k1_reduction_to_the_directional_form(dense):
    """k = 1 (complement term at z = λ): the 1×1 model is λ + a_S + c·D/λ, D = s_u² − σ_uu²,
    so E λ' = λ + c·D/λ exactly, and adding back c·σ_uu²/λ gives the docs/theory.md §3.3 directional
    form λ + c·s_u²/λ of `predict_batch_top_eigenvalue` exactly."""
    model, X, y, Hs, H, ev, V = dense
    N = X.shape[0]
    Bs = [2, 10, N]
    pred = predict_batch_top_eigenvalue(model, CE, (X, y), Bs, form=["directional", "subspace"],
                                        seed=1, subspace_dim=1, n_batches_mc=4000)
    sn = subspace_noise(model, CE, (X, y), k=1, seed=1)
    lam, D, S = sn.lam[0], sn.D[0, 0], sn.S[0, 0]
    assert pred["subspace_k"] == 1 and pred["lam"] == pytest.approx(lam, rel=1e-10)
    c = np.array([rmt.batch_noise_factor(B, N) for B in Bs])
    np.testing.assert_allclose(pred["directional"], lam + c * (D + S) / lam, rtol=1e-8)
    # per batch, exactly linear: z_S = λ + a_S + c·D/λ
    rng = np.random.default_rng(0)
    idx = [np.stack([rng.choice(N, B, replace=False) for _ in range(6)]) for B in Bs]
    res = subspace_batch_top_eigenvalue(sn, Bs, indices=idx, self_consistent=False)
    for j in range(3):
        np.testing.assert_allclose(res["values"][j],
                                   lam + sn.a[idx[j], 0, 0].mean(axis=1) + c[j] * D / lam,
                                   rtol=1e-12)
    # the Monte-Carlo mean is λ + c·D/λ within its standard error; B = N exactly λ
    z = (pred["subspace"] - (lam + c * D / lam))[:2] / pred["subspace_stderr"][:2]
    assert np.all(np.abs(z) < 4), z
    assert pred["subspace"][2] == pytest.approx(lam, rel=1e-12)


def test_self_consistent_root_and_gaussian_model(dense):
    model, X, y, Hs, H, ev, V = dense
    N = X.shape[0]
    sn = subspace_noise(model, CE, (X, y), k=3)
    res = subspace_batch_top_eigenvalue(sn, [4], n_batches=50, self_consistent=True, seed=2)
    # each value solves z = λ_max(Λ + a_S + c·D/z): recompute with the same batches
    rng = np.random.default_rng(7)
    idx = [np.stack([rng.choice(N, 4, replace=False) for _ in range(20)])]
    out = subspace_batch_top_eigenvalue(sn, [4], indices=idx, self_consistent=True)
    c = rmt.batch_noise_factor(4, N)
    A = sn.H_U + sn.a[idx[0]].mean(axis=1)
    z = out["values"][0]
    resid = z - np.linalg.eigvalsh(A + c * sn.D / z[:, None, None])[:, -1]
    assert np.abs(resid).max() < 1e-10 * np.abs(z).max()
    # D is PSD, so the self-consistent root lies between λ_1 and the z = λ_1 value
    # (z ≥ λ_1 ⇒ c·D/z ≤ c·D/λ_1 ⇒ z ≤ rs, and conversely)
    rs = subspace_batch_top_eigenvalue(sn, [4], indices=idx, self_consistent=False)["values"][0]
    lam1 = np.linalg.eigvalsh(sn.H_U)[-1]
    assert np.all((z - lam1) * (rs - z) >= -1e-12)
    assert np.any(np.abs(rs - z) > 1e-6)                      # the two variants differ
    assert res["mean"][0] > sn.lam[0]
    # Gaussian model with the resampling covariance: same mean at moderate B (z-score)
    B = 15
    r1 = subspace_batch_top_eigenvalue(sn, [B], n_batches=4000, method="resample", seed=3)
    r2 = subspace_batch_top_eigenvalue(sn, [B], n_batches=4000, method="gaussian", seed=4)
    zz = (r1["mean"] - r2["mean"]) / np.hypot(r1["stderr"], r2["stderr"])
    assert abs(zz[0]) < 4, zz


def test_default_dim_and_bad_input(dense):
    model, X, y, Hs, H, ev, V = dense
    assert default_subspace_dim(model, (X, y), 57) == 3
    assert default_subspace_dim(model, (X, y), 2) == 2
    op = hessian_operator(model, CE, (X, y))
    with pytest.raises(ValueError, match="orthonormal"):
        subspace_noise_from_operator(op, torch.ones(op.P, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="U"):
        subspace_noise_from_operator(op, torch.ones(5, 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="U"):
        subspace_noise_from_operator(op, [1.0, 2.0])
    sn = subspace_noise(model, CE, (X, y), k=2)
    assert isinstance(sn, SubspaceNoise)
    with pytest.raises(ValueError, match="batch_sizes"):
        subspace_batch_top_eigenvalue(sn, [31])
    with pytest.raises(ValueError, match="method"):
        subspace_batch_top_eigenvalue(sn, [4], method="exact")
    with pytest.raises(ValueError, match="n_batches"):
        subspace_batch_top_eigenvalue(sn, [4], n_batches=0)
    with pytest.raises(ValueError, match="k"):
        subspace_noise(model, CE, (X, y), k=58)
    with pytest.raises(ValueError, match="k"):
        sn.restrict(3)
    with pytest.raises(ValueError, match="micro_batch"):
        predict_batch_top_eigenvalue(model, CE, (X, y), [4], form="subspace", subspace_dim=2,
                                     micro_batch=2)
