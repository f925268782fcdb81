"""Sample-resolved form of λ'_1(B) (nets.noise.resolved_noise): dense oracles and exact limits."""

import numpy as np
import pytest
import torch
from dense_oracles import output_jacobians
from torch import nn

from nets.curvature.operators import ggn_operator, hessian_operator
from nets.noise.batch_spectra import measure_batch_top_eigenvalue
from nets.noise.resolved_noise import (
    ResolvedNoise,
    per_sample_ggn_top_eigenpairs,
    per_sample_top_eigenpairs,
    resolved_batch_top_eigenvalue,
    resolved_noise_from_operator,
)
from nets.noise.subspace_noise import subspace_batch_top_eigenvalue

CE = nn.functional.cross_entropy


@pytest.fixture(scope="module")
def dense(tiny_mlp, per_sample_hessians):
    """The `tiny_mlp` with heavy samples 3, 11, 20 (large per-sample curvature: the heavy
    tail the module is about) and its dense per-sample Hessians."""
    model, X, y = tiny_mlp(heavy=(3, 11, 20))
    return (model, X, y) + per_sample_hessians(model, CE, X, y)


def test_per_sample_top_eigenpairs_match_dense(dense):
    model, X, y, Hs, H, ev, V = dense
    N, P = Hs.shape[:2]
    op = hessian_operator(model, CE, (X, y))
    sp = per_sample_top_eigenpairs(op, seed=4, chunk_size=7)
    ev_i, vec_i = np.linalg.eigh(Hs)
    np.testing.assert_allclose(sp.gamma, ev_i[:, -1], rtol=1e-9, atol=1e-12)
    assert sp.index.tolist() == list(range(N)) and sp.vectors.shape == (P, N)
    assert np.all(sp.residual < 1e-8 * np.abs(ev_i).max())
    v = sp.vectors.numpy()
    # unit Ritz vectors with H_i v = γ_i v (to the residual) for every sample
    np.testing.assert_allclose(np.linalg.norm(v, axis=0), 1.0, rtol=1e-12)
    res = np.einsum("npq,qn->pn", Hs, v) - v * sp.gamma
    assert np.abs(res).max() < 1e-7
    # keep_above keeps exactly the samples with γ_i above it, in ascending order
    thr = float(np.median(sp.gamma))
    kept = per_sample_top_eigenpairs(op, seed=4, keep_above=thr)
    assert kept.index.tolist() == np.flatnonzero(sp.gamma > thr).tolist()
    np.testing.assert_allclose(np.abs(np.sum(kept.vectors.numpy() * v[:, kept.index], axis=0)),
                               1.0, atol=1e-8)


def _resolved(dense, k=3, min_batch=2):
    model, X, y, Hs, H, ev, V = dense
    op = hessian_operator(model, CE, (X, y))
    return resolved_noise_from_operator(op, torch.from_numpy(V[:, :k].copy()), min_batch=min_batch,
                                        seed=1)


def test_spike_quantities_match_dense(dense):
    model, X, y, Hs, H, ev, V = dense
    k = 3
    rn = _resolved(dense, k=k)
    U = V[:, :k]
    assert rn.lam1 == pytest.approx(ev[0], rel=1e-10)
    assert rn.index.tolist() == np.flatnonzero(rn.gamma > 2 * ev[0]).tolist()
    assert 0 < rn.index.size < len(Hs)
    Vk = rn.subspace.vectors.numpy()                          # same U, float64
    vecs = np.stack([np.linalg.eigh(Hs[i])[1][:, -1] for i in rn.index], axis=1)
    # Uᵀv_i, v_iᵀv_j, v_iᵀHv_j up to the sign of each v_i
    T_dense = U.T @ vecs
    s = np.sign(np.sum(rn.T * T_dense, axis=0))
    s[s == 0] = 1
    np.testing.assert_allclose(rn.T, T_dense * s, atol=1e-8)
    np.testing.assert_allclose(rn.Gv, (vecs * s).T @ (vecs * s), atol=1e-8)
    np.testing.assert_allclose(rn.VHV, (vecs * s).T @ H @ (vecs * s), atol=1e-8)
    np.testing.assert_allclose(rn.UHV, Vk.T @ H @ (vecs * s), atol=1e-8)
    Q = np.eye(H.shape[0]) - U @ U.T
    w = np.stack([(vecs[:, j] * s[j]) @ Q @ (Hs[i] - H) @ U for j, i in enumerate(rn.index)])
    np.testing.assert_allclose(rn.w, w, atol=1e-8)


def _dense_complement_noise(Hs, U, resolved):
    """D_h = (1/(N−1)) Σ (x_i − x̄)ᵀ(x_i − x̄), x_i = Q(H_i − 1[resolved]·γ_i v_i v_iᵀ − H)U
    with Q = I − UUᵀ, from dense per-sample Hessians and their own top eigenpairs."""
    N, P = Hs.shape[:2]
    H = Hs.mean(axis=0)
    Q = np.eye(P) - U @ U.T
    x = []
    for i in range(N):
        Hi = Hs[i].copy()
        if resolved[i]:
            ew, ev_ = np.linalg.eigh(Hi)
            Hi -= ew[-1] * np.outer(ev_[:, -1], ev_[:, -1])
        x.append(Q @ (Hi - H) @ U)
    x = np.stack(x)
    x -= x.mean(axis=0)
    return np.einsum("npi,npj->ij", x, x) / (N - 1)


@pytest.mark.parametrize("B", [2, 5, 12])
def test_complement_noise_with_spikes_removed_matches_dense(dense, B):
    from nets.noise.resolved_noise import _complement_noise
    model, X, y, Hs, H, ev, V = dense
    k = 3
    rn = _resolved(dense, k=k)
    resolved = rn.gamma > B * rn.lam1
    sel = np.flatnonzero(resolved[rn.index])
    np.testing.assert_allclose(_complement_noise(rn, sel), _dense_complement_noise(Hs, V[:, :k], resolved),
                               atol=1e-10)


def test_without_resolved_samples_it_is_the_subspace_form(dense):
    """For B above max γ_i/λ_1 no sample is resolved: exactly the subspace form."""
    rn = _resolved(dense)
    B = int(np.floor(rn.gamma.max() / rn.lam1)) + 1
    assert B <= len(rn.gamma)
    rng = np.random.default_rng(0)
    idx = [np.stack([rng.choice(len(rn.gamma), B, replace=False) for _ in range(20)])]
    res = resolved_batch_top_eigenvalue(rn, [B], indices=idx)
    sub = subspace_batch_top_eigenvalue(rn.subspace, [B], indices=idx)
    assert res["n_resolved"][0] == 0
    np.testing.assert_allclose(res["values"][0], sub["values"][0], rtol=1e-12)


def _least_squares_with_a_heavy_sample():
    """(X, op, H): least squares ½(xᵀw − y)² on 40 samples in 4 dimensions, sample 7's
    input ×8 (its rank-one curvature x_7x_7ᵀ dominates small batches), H = XᵀX/N."""
    g = torch.Generator().manual_seed(3)
    N, d = 40, 4
    X = torch.randn(N, d, dtype=torch.float64, generator=g)
    X[7] *= 8.0
    y = torch.randn(N, 1, dtype=torch.float64, generator=g)
    model = nn.Linear(d, 1, bias=False).double()
    loss = lambda out, t: 0.5 * ((out - t) ** 2).sum(dim=1).mean()   # noqa: E731
    return X, hessian_operator(model, loss, (X, y)), (X.T @ X / N).numpy()


def test_single_resolved_sample_with_a_complete_subspace_is_exact():
    """Rank-one per-sample curvatures (least squares, H_i = x_i x_iᵀ): a batch holding one
    dominant sample i. With U the full eigenbasis (k = P: no complement) the spike lies
    inside span(U), so the model is the remainder's exact U-block plus the rank-one spike:
    exactly the batch top eigenvalue λ_max((x_i x_iᵀ + Σ_others x_j x_jᵀ)/B), checked densely
    (the mean field f·H acts only outside span(U), empty here)."""
    X, op, H = _least_squares_with_a_heavy_sample()
    N = len(X)
    V = np.linalg.eigh(H)[1]
    U = torch.from_numpy(V[:, ::-1].copy())                           # k = P
    rn = resolved_noise_from_operator(op, U, min_batch=2, seed=0)
    B = 4
    xi = X[7].numpy()
    gam = float(xi @ xi)
    assert rn.gamma[7] == pytest.approx(gam, rel=1e-10) and gam > B * rn.lam1
    others = [i for i in range(N) if i != 7 and rn.gamma[i] <= B * rn.lam1][:B - 1]
    idx = np.array([[7] + others])
    res = resolved_batch_top_eigenvalue(rn, [B], indices=[idx])
    Xo = X[others].numpy()
    true = np.linalg.eigvalsh((np.outer(xi, xi) + Xo.T @ Xo) / B)[-1]
    assert res["values"][0][0] == pytest.approx(true, rel=1e-9)


@pytest.mark.parametrize("replacement", [False, True])
def test_with_the_whole_space_as_subspace_every_batch_is_exact(dense, replacement):
    """k = P on a cross-entropy MLP with heavy samples (per-sample Hessians indefinite at
    initialisation): no complement and no spike parts outside U, so each batch's value is
    λ_max of the dense batch Hessian mean_{i∈S} H_i itself, with resolved samples or not."""
    model, X, y, Hs, H, ev, V = dense
    P = H.shape[0]
    op = hessian_operator(model, CE, (X, y))
    rn = resolved_noise_from_operator(op, torch.from_numpy(V.copy()), min_batch=2, seed=0)
    assert rn.subspace.k == P and rn.index.size > 0
    rng = np.random.default_rng(4)
    for B in (2, 4):
        idx = (rng.integers(0, len(X), size=(60, B)) if replacement else
               np.stack([rng.choice(len(X), B, replace=False) for _ in range(60)]))
        res = resolved_batch_top_eigenvalue(rn, [B], indices=[idx], replacement=replacement)
        true = np.array([np.linalg.eigvalsh(Hs[i].mean(0))[-1] for i in idx])
        assert res["n_resolved"][0] > 0
        np.testing.assert_allclose(res["values"][0], true, rtol=1e-9, atol=1e-12)


def test_single_resolved_sample_outside_the_subspace_is_its_spike_plus_mean_field():
    """The same least-squares batch with k = 1: the spike v's part q = (I − uuᵀ)v outside
    span(u) carries the mean field (1 − 1/B)·H, span(u) the remainder's exact projection.
    The pencil on W = [u, q] written densely from the per-sample x_i alone (Rayleigh–Ritz
    of the operator uuᵀR u uᵀ + f(Q H Q + Q H u uᵀ + u uᵀ H Q) + (γ/B) v vᵀ, Q = I − uuᵀ)."""
    X, op, H = _least_squares_with_a_heavy_sample()
    N = len(X)
    u = np.linalg.eigh(H)[1][:, -1]
    rn = resolved_noise_from_operator(op, torch.from_numpy(u[:, None].copy()), min_batch=2,
                                      seed=0, exact=True)
    B = 4
    xi = X[7].numpy()
    gam = float(xi @ xi)
    others = [i for i in range(N) if i != 7 and rn.gamma[i] <= B * rn.lam1][:B - 1]
    res = resolved_batch_top_eigenvalue(rn, [B], indices=[np.array([[7] + others])])
    v = xi / np.sqrt(gam)
    q = v - u * (u @ v)
    Xo = X[others].numpy()
    # the remainder along u: the batch without sample 7, plus the complement term c·D/λ_1
    # (second order, from every sample's x_i: D = cov of Q(H_i − H)u with the spikes of
    # the samples resolved at B taken out; H_i = x_i x_iᵀ, its own top eigenpair)
    Xn = X.numpy()
    Hs = np.einsum("ni,nj->nij", Xn, Xn)
    D = _dense_complement_noise(Hs, u[:, None], (Xn ** 2).sum(1) > B * rn.lam1)
    c = 1 / B - 1 / N                     # without replacement
    rem_uu = u @ (Xo.T @ Xo / B) @ u + c * float(D[0, 0]) / rn.lam1
    f = 1 - 1 / B
    W = np.stack([u, q], axis=1)
    A = np.array([[rem_uu, f * u @ H @ q], [f * u @ H @ q, f * q @ H @ q]])
    A += gam / B * np.outer(W.T @ v, W.T @ v)
    G = W.T @ W
    L = np.linalg.cholesky(G)
    Li = np.linalg.inv(L)
    expect = np.linalg.eigvalsh(Li @ A @ Li.T)[-1]
    assert res["values"][0][0] == pytest.approx(expect, rel=1e-9)
    true = np.linalg.eigvalsh((np.outer(xi, xi) + Xo.T @ Xo) / B)[-1]
    assert res["values"][0][0] == pytest.approx(true, rel=0.1)


def test_small_batches_track_measurement_on_a_heavy_tailed_model(tiny_mlp):
    """Monte-Carlo check on a model with a few very heavy samples: the resolved form tracks
    the measured mean at small B (|z| < 4 with the measurement's standard error and a 10 %
    model allowance), where the subspace form misses the heavy samples' spikes."""
    model, X, y = tiny_mlp(seed=2, N=60, heavy=(1, 9, 17, 33, 48))
    op = hessian_operator(model, CE, (X, y))
    from nets.algorithms.lanczos import eigsh
    top = eigsh(op, k=3, which="LA", tol=1e-10, seed=0)
    rn = resolved_noise_from_operator(op, top.vectors, min_batch=4, seed=0)
    Bs = [4, 8]
    meas = measure_batch_top_eigenvalue(model, CE, (X, y), Bs, n_batches=150, seed=3)
    res = resolved_batch_top_eigenvalue(rn, Bs, indices=meas["indices"])
    sub = subspace_batch_top_eigenvalue(rn.subspace, Bs, indices=meas["indices"])
    for j in range(len(Bs)):
        ratio = res["values"][j].mean() / meas["mean"][j]
        assert abs(ratio - 1) < 0.1, ratio
        # the subspace form, on the same batches, is much further off
        assert abs(sub["values"][j].mean() / meas["mean"][j] - 1) > 2 * abs(ratio - 1)


def test_bad_inputs(dense):
    rn = _resolved(dense, min_batch=4)
    with pytest.raises(TypeError):
        resolved_batch_top_eigenvalue("x", [4])
    with pytest.raises(ValueError, match="min_batch"):
        resolved_batch_top_eigenvalue(rn, [2, 8])
    with pytest.raises(ValueError, match="min_batch"):
        resolved_batch_top_eigenvalue(rn, [4], resolve_factor=0.5)
    with pytest.raises(ValueError):
        resolved_batch_top_eigenvalue(rn, [4], resolve_factor=float("nan"))
    with pytest.raises(ValueError):
        resolved_batch_top_eigenvalue(rn, [])
    with pytest.raises(ValueError):
        resolved_batch_top_eigenvalue(rn, [4], n_batches=0)
    with pytest.raises(ValueError, match="N="):
        resolved_batch_top_eigenvalue(rn, [31])
    with pytest.raises(ValueError, match="shape"):
        resolved_batch_top_eigenvalue(rn, [4], indices=[np.zeros((3, 5), dtype=int)])
    with pytest.raises(ValueError, match="one"):
        resolved_batch_top_eigenvalue(rn, [4, 5], indices=[np.zeros((3, 4), dtype=int)])
    with pytest.raises(TypeError):
        resolved_batch_top_eigenvalue(rn, [4], replacement=1)
    model, X, y, Hs, H, ev, V = dense
    op = hessian_operator(model, CE, (X, y))
    with pytest.raises(ValueError):
        resolved_noise_from_operator(op, torch.from_numpy(V[:, :2].copy()), min_batch=0)
    with pytest.raises(ValueError, match="orthonormal"):
        resolved_noise_from_operator(op, torch.from_numpy(2 * V[:, :2]), min_batch=2)
    with pytest.raises(ValueError):
        per_sample_top_eigenpairs(op, steps=0)
    assert isinstance(rn, ResolvedNoise)


def test_with_replacement_and_seeded(dense):
    rn = _resolved(dense)
    a = resolved_batch_top_eigenvalue(rn, [3, 6], n_batches=50, replacement=True, seed=5)
    b = resolved_batch_top_eigenvalue(rn, [3, 6], n_batches=50, replacement=True, seed=5)
    np.testing.assert_array_equal(a["mean"], b["mean"])
    assert np.all(np.isfinite(a["mean"])) and np.all(a["stderr"] > 0)
    # duplicates of a resolved sample are merged into one spike of weight count·γ/B = γ_i;
    # f = 0, so the model is, densely, U(UᵀR_iU + c·D/λ_1)Uᵀ + γ_i v_i v_iᵀ with the
    # sample's remainder R_i = H_i − γ_i v_i v_iᵀ (its exact projection on U) and nothing
    # else outside U
    model, X, y, Hs, H, ev, V = dense
    i = int(rn.index[np.argmax(rn.gamma[rn.index])])
    dup = resolved_batch_top_eigenvalue(rn, [3], indices=[np.array([[i, i, i]])], replacement=True)
    assert dup["n_resolved"][0] == 3
    g, E = np.linalg.eigh(Hs[i])
    v, U = E[:, -1], V[:, :3]
    Ri = Hs[i] - g[-1] * np.outer(v, v)
    D = _dense_complement_noise(Hs, U, np.linalg.eigvalsh(Hs)[:, -1] > 3 * rn.lam1)
    c = (1 - 1 / len(X)) / 3                                    # with replacement
    M = U @ (U.T @ Ri @ U + c * D / rn.lam1) @ U.T + g[-1] * np.outer(v, v)
    assert dup["values"][0][0] == pytest.approx(np.linalg.eigvalsh(M)[-1], rel=1e-6)
    # the true top eigenvalue is γ_i: the model gives up R_i v_i = 0 on v_i's part in U
    assert rn.gamma[i] == pytest.approx(g[-1], rel=1e-8)
    assert 1.0 < dup["values"][0][0] / g[-1] < 1.2



def test_reported_stderr_is_the_standard_error_of_the_values(dense):
    """"stderr" is the Monte-Carlo standard error of "mean": sample std (ddof 1) of the
    per-batch values over √n, written out with a loop."""
    rn = _resolved(dense)
    res = resolved_batch_top_eigenvalue(rn, [3, 6], n_batches=40, replacement=True, seed=5)
    for j, z in enumerate(res["values"]):
        z = [float(v) for v in z]
        n = len(z)
        m = sum(z) / n
        assert res["mean"][j] == pytest.approx(m, rel=1e-12)
        se = (sum((v - m) ** 2 for v in z) / (n - 1)) ** 0.5 / n ** 0.5
        assert res["stderr"][j] == pytest.approx(se, rel=1e-10)


def test_unresolved_part_of_a_sampled_batch_has_the_unresolved_samples_covariance():
    """The Gaussian stand-in for the B − h unresolved samples of a batch
    (`_population_fluctuation`, exhaustive rows of weight 1): mean (B − h)μ_u and covariance
    (B − h)(1 − B/N)Σ_u, with μ_u, Σ_u the mean and the covariance (ddof 1, i.e. N_u − 1)
    of vec(a_i) over the unresolved samples — np.mean / np.cov of those rows. The draws g
    are the seeded generator's, so L (L Lᵀ = Σ_u) is read back by least squares."""
    from types import SimpleNamespace

    from nets.noise.resolved_noise import _population_fluctuation
    N, k, B, n = 40, 2, 6, 60
    r = np.random.default_rng(0)
    a = r.standard_normal((N, k, k)) * r.lognormal(0, 1, N)[:, None, None]
    a = 0.5 * (a + a.transpose(0, 2, 1))
    a -= a.mean(axis=0)                                 # centred on the full-data mean
    flat = a.reshape(N, k * k)
    sub = SimpleNamespace(N=N, n_rows=N, k=k, a=a, weights=np.ones(N),
                          a_covariance=lambda: flat.T @ flat / (N - 1))
    resolved = np.zeros(N, dtype=bool)
    resolved[[3, 11, 20, 27, 33]] = True
    idx_all = np.stack([r.choice(N, B, replace=False) for _ in range(n)])
    counts = resolved[idx_all].sum(axis=1).astype(float)
    assert 0 < np.count_nonzero(counts) < n
    out = _population_fluctuation(sub, resolved, idx_all, counts, B, False,
                                  np.random.default_rng(9)).reshape(n, k * k) * B
    mu_u = flat[~resolved].mean(axis=0)
    cov_u = np.cov(flat[~resolved].T, ddof=1)
    m_un = B - counts
    res_sum = np.array([flat[row[resolved[row]]].sum(axis=0) for row in idx_all])
    scale = np.sqrt((1.0 - B / N) * m_un)[:, None]       # √((B − h)(1 − B/N))
    Y = (out - res_sum - m_un[:, None] * mu_u) / scale
    g = np.random.default_rng(9).standard_normal((n, k * k))
    Lt = np.linalg.lstsq(g, Y, rcond=None)[0]
    np.testing.assert_allclose(g @ Lt, Y, rtol=1e-9, atol=1e-9)   # Y is linear in g
    np.testing.assert_allclose(Lt.T @ Lt, cov_u, rtol=1e-9, atol=1e-10)

def test_per_sample_top_eigenpairs_float32_is_accurate(dense):
    """float32 products: the default tolerance (1e-5 relative residual) is reached and γ_i
    agree with the dense float64 values to ~1e-5."""
    model, X, y, Hs, H, ev, V = dense
    op32 = hessian_operator(model.float(), CE, (X.float(), y))
    sp = per_sample_top_eigenpairs(op32, steps=60, seed=0)
    model.double()
    top = np.linalg.eigvalsh(Hs)[:, -1]
    np.testing.assert_allclose(sp.gamma, top, rtol=1e-4, atol=1e-6)
    assert np.all(sp.residual <= 1e-5 * np.abs(np.linalg.eigvalsh(Hs)).max(axis=1) + 1e-12)


def _dense_ggn_spikes(model, X, y):
    """Top eigenpair of each per-sample cross-entropy GGN J_iᵀ(diag p − ppᵀ)J_i, dense:
    J_i by torch.func.jacrev of the model output in the flat parameters."""
    out = []
    for G in _dense_ggn_terms(model, X):
        ev, V = torch.linalg.eigh(G)
        out.append((float(ev[-1]), V[:, -1]))
    return out


def _dense_ggn_terms(model, X):
    """(N, P, P) per-sample cross-entropy GGN terms J_iᵀ(diag p_i − p_ip_iᵀ)J_i, dense."""
    J = output_jacobians(model, X)
    with torch.no_grad():
        p = torch.softmax(model(X), 1)
    A = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return J.transpose(1, 2) @ A @ J


def test_ggn_spikes_match_dense(dense):
    model, X, y = dense[:3]
    oracle = _dense_ggn_spikes(model, X, y)
    for op in (hessian_operator(model, CE, (X, y)), ggn_operator(model, CE, (X, y))):
        sp = per_sample_ggn_top_eigenpairs(op, chunk_size=7)            # uneven chunks
        np.testing.assert_allclose(sp.gamma, [g for g, _ in oracle], rtol=1e-10)
        assert sp.products == 3 and sp.steps == 0 and np.all(sp.residual == 0)
        for j, i in enumerate(sp.index):
            assert abs(float(sp.vectors[:, j] @ oracle[i][1])) == pytest.approx(1.0, abs=1e-9)


def test_resolved_form_with_ggn_spikes_on_a_ggn_operator_is_the_lanczos_form(dense):
    """On a GGN operator the two spike passes compute the same eigenpairs, so the whole
    resolved model agrees (to the Lanczos accuracy); on the Hessian the GGN spikes are
    an approximation."""
    model, X, y = dense[:3]
    op = ggn_operator(model, CE, (X, y))
    U = torch.linalg.eigh(torch.stack([op.matvec(e) for e in torch.eye(op.P, dtype=torch.float64)]))[1][:, -4:]
    a = resolved_noise_from_operator(op, U, min_batch=2, exact=True, spikes="ggn")
    b = resolved_noise_from_operator(op, U, min_batch=2, exact=True, steps=op.P)
    np.testing.assert_allclose(a.gamma, b.gamma, rtol=1e-8)
    np.testing.assert_array_equal(a.index, b.index)
    ra = resolved_batch_top_eigenvalue(a, [2, 4, 8], n_batches=300, seed=1)
    rb = resolved_batch_top_eigenvalue(b, [2, 4, 8], n_batches=300, seed=1)
    np.testing.assert_allclose(ra["mean"], rb["mean"], rtol=1e-7)
    with pytest.raises(ValueError, match="spikes"):
        resolved_noise_from_operator(op, U, min_batch=2, spikes="dense")


def test_gauss_newton_per_sample_form_on_a_ggn_operator_is_the_products_form(dense):
    """per_sample="ggn" computes every per-sample quantity from C×C and C×k matrices; on a
    GGN operator those are the per-sample curvatures themselves, so the whole model equals
    the per-sample-products form to round-off."""
    model, X, y = dense[:3]
    op = ggn_operator(model, CE, (X, y))
    U = torch.linalg.eigh(torch.stack([op.matvec(e) for e in torch.eye(op.P, dtype=torch.float64)]))[1][:, -4:]
    a = resolved_noise_from_operator(op, U, min_batch=2, exact=True, spikes="ggn")
    b = resolved_noise_from_operator(op, U, min_batch=2, exact=True, per_sample="ggn")
    np.testing.assert_array_equal(a.index, b.index)
    for f in ("gamma", "T", "Gv", "VHV", "UHV", "w"):
        np.testing.assert_allclose(getattr(b, f), getattr(a, f), rtol=1e-9, atol=1e-12)
    for f in ("a", "D", "S", "H_U"):
        np.testing.assert_allclose(getattr(b.subspace, f), getattr(a.subspace, f), rtol=1e-9,
                                   atol=1e-12)
    ra = resolved_batch_top_eigenvalue(a, [2, 4, 8], n_batches=300, seed=1)
    rb = resolved_batch_top_eigenvalue(b, [2, 4, 8], n_batches=300, seed=1)
    np.testing.assert_allclose(rb["mean"], ra["mean"], rtol=1e-9)


def test_gauss_newton_per_sample_form_on_the_hessian_matches_dense_ggn_terms(dense):
    """On the Hessian: the fluctuations are those of the dense per-sample GGN terms
    G_i = J_iᵀ(diag p − ppᵀ)J_i about their mean, the centre (UᵀHU) the Hessian's."""
    model, X, y, Hs, H, ev, V = dense
    N = X.shape[0]
    G = _dense_ggn_terms(model, X).numpy()
    Gbar = G.mean(0)
    k = 3
    U = V[:, :k].copy()                                                 # descending
    op = hessian_operator(model, CE, (X, y))
    rn = resolved_noise_from_operator(op, torch.from_numpy(U), min_batch=2, per_sample="ggn",
                                      exact=True)
    Xs = np.einsum("npq,qk->npk", G - Gbar, U)                          # (G_i − Ḡ)U
    a = np.einsum("pj,npk->njk", U, Xs)
    R = Xs - np.einsum("pj,njk->npk", U, a)
    np.testing.assert_allclose(rn.subspace.a, a, rtol=1e-8, atol=1e-11)
    np.testing.assert_allclose(rn.subspace.D, np.einsum("npj,npk->jk", R, R) / (N - 1),
                               rtol=1e-8, atol=1e-11)
    np.testing.assert_allclose(rn.subspace.S, np.einsum("nij,njk->ik", a, a) / (N - 1),
                               rtol=1e-8, atol=1e-11)
    np.testing.assert_allclose(rn.subspace.H_U, U.T @ H @ U, rtol=1e-8, atol=1e-11)
    top = np.linalg.eigh(G)
    np.testing.assert_allclose(rn.gamma, top[0][:, -1], rtol=1e-8)
    assert rn.index.size > 0
    for j, i in enumerate(rn.index):      # v_i up to its sign: compare sign-free products
        v = top[1][i][:, -1]
        t = U.T @ v
        want = v @ (G[i] - Gbar) @ U - t @ a[i]                         # v_iᵀQ(G_i − Ḡ)U
        np.testing.assert_allclose(np.abs(rn.w[j]), np.abs(want), rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(np.outer(rn.w[j], rn.T[:, j]), np.outer(want, t),
                                   rtol=1e-7, atol=1e-10)
    with pytest.raises(ValueError, match="per_sample"):
        resolved_noise_from_operator(op, torch.from_numpy(U), min_batch=2, per_sample="dense")
    with pytest.raises(ValueError, match="max_samples"):
        resolved_noise_from_operator(op, torch.from_numpy(U), min_batch=2, per_sample="ggn",
                                     max_samples=10)


def test_predict_batch_top_eigenvalue_passes_per_sample(dense):
    from nets.noise.batch_spectra import predict_batch_top_eigenvalue
    model, X, y = dense[:3]
    kw = dict(form="resolved", kind="ggn", subspace_dim=3, n_batches_mc=200, seed=2)
    a = predict_batch_top_eigenvalue(model, CE, (X, y), [2, 4, 8], per_sample="products", **kw)
    b = predict_batch_top_eigenvalue(model, CE, (X, y), [2, 4, 8], per_sample="ggn", **kw)
    assert (a.resolved_per_sample, b.resolved_per_sample) == ("products", "ggn")
    np.testing.assert_allclose(b.resolved, a.resolved, rtol=1e-6)
    with pytest.raises(ValueError, match="per_sample"):
        predict_batch_top_eigenvalue(model, CE, (X, y), [2], per_sample="dense", **kw)


def test_per_sample_auto_picks_the_gauss_newton_form_for_large_passes(dense, monkeypatch):
    import nets.noise.resolved_noise as rnm
    model, X, y, Hs, H, ev, V = dense
    op = hessian_operator(model, CE, (X, y))
    U = torch.from_numpy(V[:, :3].copy())
    assert resolved_noise_from_operator(op, U, min_batch=2).per_sample == "products"
    monkeypatch.setattr(rnm, "large_per_sample_pass", lambda N, P: True)   # as if N·P > 2²⁷
    assert resolved_noise_from_operator(op, U, min_batch=2).per_sample == "ggn"
    assert resolved_noise_from_operator(op, U, min_batch=2, exact=True).per_sample == "products"
    assert resolved_noise_from_operator(op, U, min_batch=2, max_samples=20).per_sample == "products"


def test_per_sample_auto_keeps_the_products_where_the_residual_term_dominates(monkeypatch):
    """A regression network far from its targets with a near-zero last layer: the output
    Jacobians (so the Gauss–Newton terms) are small while the residual term r_i·∇²f_i is
    not. The Gauss–Newton directional noise is then a small fraction of the Hessian's,
    and "auto" warns and uses the per-sample products."""
    import nets.noise.resolved_noise as rnm
    monkeypatch.setattr(rnm, "large_per_sample_pass", lambda N, P: True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    with torch.no_grad():
        model[2].weight.mul_(0.01)
        model[2].bias.zero_()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(60, 5, dtype=torch.float64, generator=g)
    y = 10 * torch.randn(60, 1, dtype=torch.float64, generator=g)
    op = hessian_operator(model, nn.functional.mse_loss, (X, y))
    U = torch.linalg.eigh(torch.stack([op.matvec(e) for e in torch.eye(op.P, dtype=torch.float64)]))[1][:, -3:]
    with pytest.warns(RuntimeWarning, match="residual term dominates"):
        rn = resolved_noise_from_operator(op, U, min_batch=2)
    assert rn.per_sample == "products"
    forced = resolved_noise_from_operator(op, U, min_batch=2, per_sample="ggn")
    assert forced.per_sample == "ggn"
    assert forced.subspace.directional_s2.max() < 0.1 * rn.subspace.directional_s2.max()


def _softmax_regression():
    """(model, X, y, Hs): a 9-parameter softmax regression (2 inputs, 3 classes, 150
    samples) trained 100 full-batch steps, float64, and its dense per-sample Hessians
    (torch.func.hessian of each sample's loss in the flat weights)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    N, d, C = 150, 2, 3
    X = torch.randn(N, d, dtype=torch.float64) * torch.linspace(0.5, 3, d, dtype=torch.float64)
    y = torch.randint(0, C, (N,))
    m = torch.nn.Linear(d, C).double()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(m(X), y).backward()
        opt.step()
    w0 = torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    def one(w, i):
        return F.cross_entropy(X[i:i + 1] @ w[:C * d].reshape(C, d).T + w[C * d:], y[i:i + 1])

    return m, X, y, torch.stack([torch.func.hessian(one)(w0, i) for i in range(N)])


def test_spikes_almost_inside_a_float32_subspace_keep_the_form_right():
    """The same regression in float32 with a float32 U: the spikes' parts outside U
    (≈1e-4) are below what float32 resolves (U orthonormal to ~1e-7, products to ~1e-7),
    and the pencil's Gram floor treats them as inside U. Without it the form read 2.4×
    the dense Monte Carlo at k = 6–9 (an outside review), silently."""
    import torch.nn.functional as F

    import nets
    from nets.noise.resolved_noise import resolved_noise_from_operator

    m, X, y, Hs = _softmax_regression()
    rng = np.random.default_rng(1)
    idx = np.stack([rng.choice(len(X), 4, replace=False) for _ in range(500)])
    true = np.mean([float(torch.linalg.eigvalsh(Hs[i].mean(0))[-1]) for i in idx])
    E = torch.linalg.eigh(Hs.mean(0))[1].flip(1)
    m32 = torch.nn.Linear(2, 3)
    m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    op = nets.hessian_operator(m32, F.cross_entropy, (X.float(), y))
    for k in (4, 6, 9):
        for cross in ("exact", "nystrom"):
            rn = resolved_noise_from_operator(op, E[:, :k].float().contiguous(), min_batch=2,
                                              seed=0, cross=cross)
            assert rn.gram_floor > 1e-6                       # float32: above GRAM_CUTOFF
            res = resolved_batch_top_eigenvalue(rn, [4], indices=[idx])
            assert abs(res["mean"][0] / true - 1) < 0.01, (k, cross, res["mean"][0], true)


def test_spikes_almost_inside_the_subspace_keep_the_form_right():
    """A resolved spike v_h nearly inside span(U): the pencil's basis is [U, (I − UUᵀ)v_h],
    one operator on one space, so it stays well posed. The earlier basis [U, v_h] mixed
    the U-block's batch fluctuation with the mean field on v_h's part inside U and read
    43× the dense Monte Carlo here (a 9-parameter logistic regression, an outside check).
    Oracle: the dense per-sample Hessians (torch.func.hessian), E λ_max(H_B) over random
    batches, and the spikes' parts outside the top-k span of the dense H."""

    import torch.nn.functional as F

    import nets

    m, X, y, Hs = _softmax_regression()
    N = len(X)
    H = Hs.mean(0)
    g, v = torch.linalg.eigh(Hs)
    spiked = g[:, -1] > 2 * float(torch.linalg.eigvalsh(H)[-1])
    rng = np.random.default_rng(1)
    for B in (2, 4):
        true = np.mean([float(torch.linalg.eigvalsh(Hs[rng.choice(N, B, replace=False)].mean(0))[-1])
                        for _ in range(2000)])
        pr = nets.predict_batch_top_eigenvalue(m, F.cross_entropy, (X, y), [B], form="all",
                                               seed=0)
        assert abs(pr.resolved[0] / true - 1) < 0.05, (B, pr.resolved[0], true)
        assert abs(pr.subspace[0] / true - 1) < 0.1
        U = torch.linalg.eigh(H)[1][:, -pr.subspace_k:]
        outside = (v[spiked, :, -1] - (v[spiked, :, -1] @ U) @ U.T).norm(dim=1)
        assert float(outside.min()) < 0.25                # the case the earlier basis broke on
    # and as the subspace grows towards P (smallest outside part 0.12 → 0.004 → 0)
    op = nets.hessian_operator(m, F.cross_entropy, (X, y))
    E = torch.linalg.eigh(H)[1].flip(1)
    idx = np.stack([rng.choice(N, 4, replace=False) for _ in range(1000)])
    true = np.mean([float(torch.linalg.eigvalsh(Hs[i].mean(0))[-1]) for i in idx])
    from nets.noise.resolved_noise import resolved_noise_from_operator
    for k in (2, 3, 4, 9):
        rn = resolved_noise_from_operator(op, E[:, :k].contiguous(), min_batch=2, seed=0)
        res = resolved_batch_top_eigenvalue(rn, [4], indices=[idx])
        assert abs(res["mean"][0] / true - 1) < 0.03, (k, res["mean"][0], true)
