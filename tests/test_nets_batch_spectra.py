"""λ'_1(B): measured batch top eigenvalues and their predictions (docs/theory.md §2–§3)."""

import numpy as np
import pytest
import torch
from torch import nn

import rmt
from nets.algorithms.spectra import bottom_eigenvalues, top_eigenvalues
from nets.curvature.operators import hessian_operator
from nets.noise.batch_spectra import measure_batch_top_eigenvalue, predict_batch_top_eigenvalue
from nets.noise.directional import directional_noise

CE = nn.functional.cross_entropy


def test_top_and_bottom_eigenvalues_entry_points_match_dense(tiny_mlp):
    model, X, y = tiny_mlp()
    H = hessian_operator(model, CE, (X, y)).to_dense().numpy()
    ev = np.linalg.eigvalsh(H)
    top = top_eigenvalues(model, CE, (X, y), k=3, chunk_size=7)
    assert isinstance(top, np.ndarray) and top.dtype == np.float64
    np.testing.assert_allclose(top, ev[::-1][:3], rtol=1e-8)
    np.testing.assert_allclose(bottom_eigenvalues(model, CE, (X, y), k=2), ev[:2], rtol=1e-8)
    from nets.curvature.operators import ggn_operator
    evg = np.linalg.eigvalsh(ggn_operator(model, CE, (X, y)).to_dense().numpy())
    np.testing.assert_allclose(top_eigenvalues(model, CE, (X, y), k=2, kind="ggn"),
                               evg[::-1][:2], rtol=1e-8)
    # float32 products: the same eigenvalue to float32 accuracy
    t32 = top_eigenvalues(model, CE, (X, y), dtype=torch.float32)
    assert abs(t32[0] - ev[-1]) < 1e-5 * abs(ev[-1])


def test_measured_values_are_dense_batch_top_eigenvalues(tiny_mlp):
    model, X, y = tiny_mlp(1)
    res = measure_batch_top_eigenvalue(model, CE, (X, y), [4, 30], n_batches=3, seed=2)
    assert set(res.keys()) >= {"mean", "std", "values", "indices"}
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


def test_prediction_formulas_and_the_B_equals_N_limit(tiny_mlp):
    model, X, y = tiny_mlp(2)
    N = X.shape[0]
    pred = predict_batch_top_eigenvalue(model, CE, (X, y), [2, 10, N], seed=1,
                                        form=["directional", "isotropic"])
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
    from nets.curvature.operators import ggn_operator
    pg = predict_batch_top_eigenvalue(model, CE, (X, y), [2, 10], kind="ggn")
    lam_g = np.linalg.eigvalsh(ggn_operator(model, CE, (X, y)).to_dense().numpy())[-1]
    assert pg["lam"] == pytest.approx(lam_g, rel=1e-7)
    assert pg["s2_directional"] > 0 and np.all(pg["directional"] > lam_g)


def test_bad_input(tiny_mlp):
    model, X, y = tiny_mlp()
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


def test_a_top_eigenvalue_of_zero_is_refused_not_rounded():
    """A concave loss of a linear map, −mean((Σ_k o_k)²): H = −(2/N)·Σ_i g_i g_iᵀ is
    negative semidefinite with a large null space, so its top eigenvalue is 0 and comes
    out as a rounding error (7e-15 here) that a plain `> 0` test let through: λ'(B) of
    14 and a critical batch size of 1e16."""
    from nets.learning_rates.lr_prediction import predict_max_lr
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    model = nn.Linear(5, 3, bias=False)

    def concave(o, t):
        return -(o.sum(1) ** 2).mean()

    H = torch.func.hessian(lambda w: concave(X.double() @ w.reshape(3, 5).T, y))(
        model.weight.detach().double().reshape(-1))
    ev = torch.linalg.eigvalsh(H)
    assert abs(float(ev[-1])) < 1e-12 and float(ev[0]) < -1     # the oracle: top = 0
    with pytest.raises(ValueError, match="not positive"):
        predict_batch_top_eigenvalue(model, concave, (X, y), [4, 16])
    with pytest.raises(ValueError, match="not positive"):
        predict_max_lr(model, concave, (X, y), [4, 16])


# ------------------------------------------------------------------------------------
# Issue acceptance: digits MLP, directional vs isotropic (and subspace) prediction of λ'_1(B)

BATCHES = [8, 32, 128, 512]
# per-batch λ'_1 is heavy-tailed at small B (std ≈ 0.6× the mean at B = 8): more batches there
N_BATCHES = {8: 320, 32: 160, 128: 80, 512: 80}


@pytest.fixture(scope="module")
def digits_curves():
    from nets.training.loops import trained_digits_mlp
    model, (X, y) = trained_digits_mlp(seed=0)
    # subspace_dim=None: k = number of outputs (10 classes), the rule fixed in
    # nets.noise.subspace_noise.default_subspace_dim before looking at any result
    pred = predict_batch_top_eigenvalue(model, CE, (X, y), BATCHES, form="all", seed=0,
                                        num_probes=10)
    runs = [measure_batch_top_eigenvalue(model, CE, (X, y), [B], n_batches=N_BATCHES[B], seed=1)
            for B in BATCHES]
    meas = {key: np.array([r[key][0] for r in runs]) for key in ("mean", "std", "stderr")}
    for key in ("values", "converged", "indices"):
        meas[key] = [r[key][0] for r in runs]
    return pred, meas


@pytest.mark.slow
def test_digits_directional_prediction_tracks_measurement(digits_curves):
    pred, meas = digits_curves
    ratio = pred["directional"] / meas["mean"]
    # noise concentrates on the outlier direction (docs/theory.md §3): s_u² ≫ P·σ²_avg
    assert pred["s2_directional"] > 20 * pred["s2_isotropic"]
    # the isotropic form underpredicts strongly at small B, and at every B
    assert np.all(pred["isotropic"] < meas["mean"])
    assert np.all(pred["isotropic"][:2] < 0.35 * meas["mean"][:2])
    # the plain (second-order) directional form: within 20 % at B = 512 and within 40 %
    # throughout. Against 400–2000 measured batches per B the ratio predicted/measured is
    # 1.15, 0.72, 0.77, 0.91 at B = 8, 32, 128, 512, so it misses 20 % at every B (strict
    # xfail below; the sample-resolved form further down meets it); it is still 3–10×
    # closer than the isotropic form at B ≤ 32.
    assert abs(ratio[-1] - 1) < 0.2, ratio
    assert np.all(np.abs(ratio - 1) < 0.4), ratio
    iso_err = np.abs(pred["isotropic"] / meas["mean"] - 1)
    assert np.all(np.abs(ratio - 1)[:2] < 0.5 * iso_err[:2]), (ratio, iso_err)
    assert np.all(meas["converged"][0]) and np.all(np.diff(meas["mean"]) < 0)


@pytest.mark.slow
def test_digits_subspace_prediction(digits_curves):
    """Quasi-degenerate (Löwdin, top-k eigenspace, k = 10 outputs) form, nets.noise.subspace_noise.
    Ratio subspace/measured ≈ 0.87, 0.71, 0.87, 0.97 at B = 8, 32, 128, 512 — it does not
    close the B = 32 gap (see the xfail below)."""
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


# the second-order forms miss the 20 % (strict xfails, kept as measured limits)
MISSES_20_PERCENT = {
    "directional": "the plain second-order directional form misses 20% at B=32 and 128 "
                   "(ratio ≈ 0.72–0.77): per-sample curvatures are heavy-tailed and single "
                   "samples are not small perturbations of the batch there (the "
                   "sample-resolved form meets the criterion, test below)",
    "subspace": "the quasi-degenerate subspace form (k = 10) is also > 20 % low at B = 32 "
                "(ratio ≈ 0.71): the missing shift comes from single heavy samples whose "
                "curvature spikes lie outside the top-10 eigenspace and are not small "
                "perturbations (a larger k partly captures them: k = 64 gives 0.89, k = 100 "
                "gives 0.94; the sample-resolved form below resolves them)",
}


@pytest.mark.slow
@pytest.mark.parametrize("form", [pytest.param(f, marks=pytest.mark.xfail(strict=True, reason=r))
                                  for f, r in MISSES_20_PERCENT.items()])
def test_digits_second_order_form_within_20_percent_at_every_B(digits_curves, form):
    pred, meas = digits_curves
    ratio = pred[form] / meas["mean"]
    assert np.all(np.abs(ratio - 1) < 0.2), ratio


@pytest.mark.slow
def test_digits_resolved_directional_within_20_percent_at_every_B(digits_curves):
    """Issue acceptance: the sample-resolved directional form (nets.noise.resolved_noise: the
    subspace form plus each sample's own curvature spike kept exactly when γ_i/B > λ_1, a
    rule fixed before comparing) is within 20 % of the measured mean at every B.
    Against 2000/1000/400/200 measured batches it is 1.01, 1.02, 1.08, 0.97; on five
    other digits MLPs (seeds 1, 2; ReLU; width 64; 3 epochs) 0.95–1.11."""
    pred, meas = digits_curves
    ratio = pred["resolved"] / meas["mean"]
    assert np.all(np.abs(ratio - 1) < 0.2), ratio
    # not by Monte-Carlo luck: the model's own sampling error is small against 20 %
    assert np.all(pred["resolved_stderr"] < 0.03 * pred["resolved"])
    # the resolved samples matter exactly where the second-order forms fail
    assert pred["resolved_n"][0] > 1 and pred["resolved_n"][-1] == 0
    # a minority of samples (γ_i > 8·λ_1) can ever be resolved in this B range
    assert 0 < pred["resolved_m"] < 0.5 * pred["N"]


@pytest.mark.slow
def test_digits_resolved_is_right_batch_by_batch(digits_curves):
    """Paired check on the measured batches themselves: the model's λ'_1 for each batch
    correlates with the measured one (ρ > 0.9) and their means agree within 10 %."""
    from nets.algorithms.lanczos import eigsh
    from nets.curvature.operators import curvature_operator
    from nets.noise.resolved_noise import resolved_batch_top_eigenvalue, resolved_noise_from_operator
    from nets.training.loops import trained_digits_mlp
    pred, meas = digits_curves
    model, (X, y) = trained_digits_mlp(seed=0)
    op = curvature_operator(model, CE, (X, y))
    top = eigsh(op, k=10, which="LA", tol=1e-8, seed=0)
    # every sample (not the sampled population), so the measured batches can be replayed
    rn = resolved_noise_from_operator(op, top.vectors, min_batch=8, seed=0, max_samples=None)
    res = resolved_batch_top_eigenvalue(rn, BATCHES, indices=meas["indices"])
    for j, B in enumerate(BATCHES):
        v, p = meas["values"][j], res["values"][j]
        assert abs(p.mean() / v.mean() - 1) < 0.1, (B, p.mean(), v.mean())
        assert np.corrcoef(p, v)[0, 1] > 0.9, B


def test_measure_sweep_resumes_from_store_bit_identically(tmp_path):
    import torch as _torch
    import torch.nn.functional as _F

    from nets.noise.batch_spectra import measure_batch_top_eigenvalue as _measure
    from nets.utils.jsonl_store import JsonlStore as _Store

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


# ------------------------------------------------------------------------------------
# One function per form, each against an oracle built from dense per-sample Hessians
# (torch.func.hessian in conftest; no operator or noise code of the package)

from nets.noise import batch_spectra as bs  # noqa: E402

FORM_BS = [2, 4, 8, 30]


@pytest.fixture(scope="module")
def dense_problem():
    from conftest import build_tiny_mlp, per_sample_dense_hessians
    model, X, y = build_tiny_mlp(3, N=30, heavy=(4, 11))
    Hs, H, ev, V = per_sample_dense_hessians(model, CE, X, y)
    return model, X, y, Hs, H, ev, V


@pytest.fixture(scope="module")
def pred_all(dense_problem):
    model, X, y = dense_problem[:3]
    return predict_batch_top_eigenvalue(model, CE, (X, y), FORM_BS, form="all", subspace_dim=3,
                                        num_probes=40, seed=0)


def _c(Bs, N):
    Bs = np.asarray(Bs, dtype=float)
    return 1.0 / Bs - 1.0 / N


def test_form_functions_closed_forms():
    # c(4, 16) = 3/16: λ + c·s²/λ = 2 + (3/16)·8/2
    np.testing.assert_allclose(bs.directional_form(2.0, 8.0, [4, 16], 16).values, [2.75, 2.0])
    # v = c(2, 4)·16 = 4 > λ² = 1: unclipped λ + v/λ = 5, clipped edge 2√v = 4
    assert bs.isotropic_form(1.0, 16.0, [2], 4).values[0] == pytest.approx(5.0)
    clipped = bs.isotropic_form(1.0, 16.0, [2, 4], 4, s2_stderr=1.0, clip=True)
    np.testing.assert_allclose(clipped.values, [4.0, 1.0])
    assert clipped.stderr[0] == pytest.approx(0.25 / 2.0)        # d(2√v)/dv · c·se = c·se/√v
    with pytest.raises(ValueError, match="lam"):
        bs.directional_form(-1.0, 1.0, [2], 4)


def test_directional_form_vs_dense_per_sample_hessians(dense_problem, pred_all, monkeypatch):
    model, X, y, Hs, H, ev, V = dense_problem
    N = X.shape[0]
    # form="directional" runs neither the isotropic probes nor the subspace pass
    for name in ("isotropic_noise_from_operator", "_sampled_forms"):
        monkeypatch.setattr(bs, name, lambda *a, **k: pytest.fail("computed an unrequested form"))
    pred = predict_batch_top_eigenvalue(model, CE, (X, y), FORM_BS, seed=0)
    monkeypatch.undo()
    assert pred.forms == ("directional",)
    assert pred.isotropic is None and pred.subspace is None and pred.resolved is None
    lam, u = ev[0], V[:, 0]
    d = np.einsum("nij,j->ni", Hs - H, u)
    sq = (d * d).sum(axis=1)
    s2 = sq.sum() / (N - 1)
    se = np.std(sq * N / (N - 1), ddof=1) / np.sqrt(N)
    c = _c(FORM_BS, N)
    assert pred.lam == pytest.approx(lam, rel=1e-9)
    assert pred.s2_directional == pytest.approx(s2, rel=1e-8)
    assert pred.s2_directional_stderr == pytest.approx(se, rel=1e-6)
    np.testing.assert_allclose(pred.directional, lam + c * s2 / lam, rtol=1e-8)
    np.testing.assert_allclose(pred.directional_stderr, c * se / lam, rtol=1e-6, atol=1e-15)
    assert pred.critical_batch_size == pytest.approx(s2 / lam ** 2, rel=1e-8)
    # form="all" gives the same directional curve (its u comes from a k=3 Lanczos run)
    np.testing.assert_allclose(pred_all.directional, pred.directional, rtol=1e-7)


def test_isotropic_form_vs_dense_entry_variance(dense_problem, pred_all, monkeypatch):
    model, X, y, Hs, H, ev, V = dense_problem
    N, P = Hs.shape[:2]
    monkeypatch.setattr(bs, "directional_noise_from_operator",
                        lambda *a, **k: pytest.fail("ran the directional pass"))
    pred = predict_batch_top_eigenvalue(model, CE, (X, y), FORM_BS, form="isotropic",
                                        num_probes=40, seed=0)
    monkeypatch.undo()
    assert pred.forms == ("isotropic",) and pred.directional is None
    # P·σ²_avg = (1/P) Σ_jk var_i(H_i[j, k]) (ddof 1): the dense entry variances
    target = ((Hs - H) ** 2).sum(axis=0).sum() / (N - 1) / P
    z = (pred.s2_isotropic - target) / pred.s2_isotropic_stderr
    assert abs(z) < 4, (pred.s2_isotropic, target, z)
    assert pred.s2_isotropic_stderr < 0.2 * target               # the z-test has power
    lam, c = ev[0], _c(FORM_BS, N)
    zc = (pred.isotropic - (lam + c * target / lam))[:-1] / pred.isotropic_stderr[:-1]
    assert np.all(np.abs(zc) < 4), zc
    v = c * pred.s2_isotropic
    clipped = np.where(lam ** 2 > v, lam + v / lam, 2 * np.sqrt(v))
    np.testing.assert_allclose(pred.isotropic_clipped, clipped, rtol=1e-12)
    np.testing.assert_allclose(pred_all.isotropic, pred.isotropic, rtol=1e-7)


def _dense_subspace_model(Hs, H, ev, V, k, Bs, n, seed):
    """E_S λ_max(Λ_k + a_S + c·D/λ_1) from dense per-sample Hessians (mean, stderr)."""
    N, P = Hs.shape[:2]
    U = V[:, :k]
    E = Hs - H
    a = np.einsum("pi,npq,qj->nij", U, E, U)
    R = np.einsum("pq,nqj->npj", np.eye(P) - U @ U.T, E @ U)
    D = np.einsum("npi,npj->ij", R, R) / (N - 1)
    rng = np.random.default_rng(seed)
    out = []
    for B, c in zip(Bs, _c(Bs, N)):
        idx = np.stack([rng.choice(N, B, replace=False) for _ in range(n)])
        z = np.linalg.eigvalsh(np.diag(ev[:k]) + a[idx].mean(axis=1) + c * D / ev[0])[:, -1]
        out.append((z.mean(), z.std(ddof=1) / np.sqrt(n)))
    return np.array(out).T


def test_subspace_form_vs_dense_model(dense_problem, pred_all):
    model, X, y, Hs, H, ev, V = dense_problem
    mean, se = _dense_subspace_model(Hs, H, ev, V, 3, FORM_BS[:-1], 3000, seed=11)
    z = (pred_all.subspace[:-1] - mean) / np.hypot(se, pred_all.subspace_stderr[:-1])
    assert np.all(np.abs(z) < 4), (pred_all.subspace, mean, z)
    assert pred_all.subspace[-1] == pytest.approx(ev[0], rel=1e-9)     # B = N: c = 0, a_S = 0
    assert pred_all.subspace_k == 3
    np.testing.assert_allclose(pred_all.subspace_lams, ev[:3], rtol=1e-8)
    single = predict_batch_top_eigenvalue(model, CE, (X, y), FORM_BS, form="subspace",
                                          subspace_dim=3, seed=0)
    assert single.forms == ("subspace",) and single.resolved is None
    assert np.array_equal(single.subspace, pred_all.subspace)


def test_resolved_form_vs_dense_batches(dense_problem, pred_all):
    model, X, y, Hs, H, ev, V = dense_problem
    N = X.shape[0]
    gamma = np.linalg.eigvalsh(Hs)[:, -1] / ev[0]                # per-sample spikes / λ_1
    assert pred_all.resolved_m == np.sum(gamma > FORM_BS[0])
    # mean number of resolved samples per batch: B·#{γ_i > B·λ_1}/N (Monte-Carlo, 2000)
    expect = np.array([B * np.sum(gamma > B) / N for B in FORM_BS])
    assert np.all(np.abs(pred_all.resolved_n - expect) < 0.15 + 0.05 * expect)
    assert expect[2] == 0 and pred_all.resolved_n[2] == 0
    # no sample resolved at B = 8: the subspace model
    mean, se = _dense_subspace_model(Hs, H, ev, V, 3, [8], 3000, seed=12)
    assert abs(pred_all.resolved[2] - mean[0]) < 4 * np.hypot(se[0], pred_all.resolved_stderr[2])
    # at B = 2, 4 (heavy samples resolved): close to the true mean top eigenvalue of the
    # dense batch Hessians, and closer than the second-order directional form at B = 4
    rng = np.random.default_rng(13)
    true = np.array([np.mean([np.linalg.eigvalsh(Hs[rng.choice(N, B, replace=False)].mean(0))[-1]
                              for _ in range(2000)]) for B in FORM_BS[:2]])
    # (B = 2 of N = 30 is the form's worst case: half the batch resolved, c ≈ 0.47; it
    # reads +9 % / +6 % at B = 2 / 4 — the consistent basis [U, (I − UUᵀ)v_h] drops the
    # resolved sample's R_i v_i = 0 on v_i's part in U; the earlier, inconsistent basis
    # read about +2 % here and 3–40× where v_h lies nearly inside U)
    err = np.abs(pred_all.resolved[:2] / true - 1)
    assert np.all(err < np.array([0.12, 0.08])), err
    assert err[1] < np.abs(pred_all.directional[1] / true[1] - 1)
    single = predict_batch_top_eigenvalue(model, CE, (X, y), FORM_BS, form="resolved",
                                          subspace_dim=3, seed=0)
    assert single.forms == ("resolved",) and single.subspace is None
    assert np.array_equal(single.resolved, pred_all.resolved)


def test_prediction_result_object(pred_all):
    import json
    d = pred_all.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text)["forms"] == list(bs.FORMS)
    assert len(repr(pred_all).splitlines()) <= 12
    assert pred_all["resolved"] is pred_all.resolved
    with pytest.raises(KeyError):
        pred_all["nonsense"]
    import matplotlib.pyplot as plt
    plt.figure()                        # plot() draws on the current axes
    ax = pred_all.plot()
    assert len(ax.get_lines()) == 5                                # 4 forms + clipped variant
    plt.close(ax.figure)
    with pytest.raises(ValueError, match="form"):
        predict_batch_top_eigenvalue(None, CE, None, [2], form="wigner")


def test_measured_result_object_and_plot(tiny_mlp):
    import json
    model, X, y = tiny_mlp(1)
    meas = measure_batch_top_eigenvalue(model, CE, (X, y), [4, 8], n_batches=3, seed=2)
    assert isinstance(meas, bs.BatchTopEigenvalues)
    assert meas.n_batches == 3 and meas.kind == "hessian" and meas.seed == 2
    json.dumps(meas.to_dict(), allow_nan=False)
    assert len(repr(meas).splitlines()) <= 12
    pred = predict_batch_top_eigenvalue(model, CE, (X, y), [4, 8], seed=0)
    import matplotlib.pyplot as plt
    plt.figure()                        # plot() draws on the current axes
    ax = pred.plot(measured=meas)
    assert len(ax.get_lines()) >= 2
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), pred.directional)
    plt.close(ax.figure)


def test_data_forms_give_the_same_numbers(dense_problem, pred_all):
    from torch.utils.data import DataLoader, TensorDataset
    model, X, y = dense_problem[:3]
    ref = measure_batch_top_eigenvalue(model, CE, (X, y), [3, 9], n_batches=3, seed=4)
    ds = TensorDataset(X, y)
    for data in (ds, DataLoader(ds, batch_size=7, shuffle=False)):
        pred = predict_batch_top_eigenvalue(model, CE, data, FORM_BS, form="all", subspace_dim=3,
                                            num_probes=40, seed=0)
        for key in bs.FORMS + ("lam", "s2_directional", "s2_isotropic"):
            np.testing.assert_allclose(pred[key], pred_all[key], rtol=1e-6, err_msg=key)
        meas = measure_batch_top_eigenvalue(model, CE, data, [3, 9], n_batches=3, seed=4)
        for a, b in zip(meas.indices, ref.indices):
            assert np.array_equal(a, b)
        np.testing.assert_allclose(np.concatenate(meas.values), np.concatenate(ref.values),
                                   rtol=1e-6)


def test_store_key_changes_with_every_setting(tmp_path, tiny_mlp):
    """A changed tol, dtype, policy, parameter set, model or data recomputes (a new
    record) instead of returning the stored values; the same settings read them back."""
    from nets.utils.jsonl_store import JsonlStore
    model, X, y = tiny_mlp(4)
    path = tmp_path / "m.jsonl"

    def run(m=model, data=(X, y), **kw):
        return measure_batch_top_eigenvalue(m, CE, data, [5], n_batches=2, seed=1, store=path, **kw)

    ref = run()
    variants = [dict(tol=1e-6), dict(dtype=torch.float32), dict(policy="eval"),
                dict(params=["2.weight"]), dict(replacement=True), dict(kind="ggn")]
    outs = []
    for n, kw in enumerate(variants, start=2):
        outs.append(run(**kw))
        assert len(JsonlStore(path)) == n, kw
    assert not np.array_equal(outs[3].values[0], ref.values[0])     # other parameters
    import copy
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved[0].bias.add_(1e-3)
    changed = run(m=moved)
    assert len(JsonlStore(path)) == len(variants) + 2
    assert not np.array_equal(changed.values[0], ref.values[0])
    X2 = X.clone()
    X2[17, 2] += 1e-3
    run(data=(X2, y))
    assert len(JsonlStore(path)) == len(variants) + 3
    again = run()
    assert len(JsonlStore(path)) == len(variants) + 3
    assert np.array_equal(again.values[0], ref.values[0])


def test_one_batch_has_no_error_bar():
    """n_batches=1 reported std = stderr = 0, a zero-width error bar on one random draw
    (ten seeds read 0.83–1.47; an outside sweep): NaN, as a one-probe trace's."""
    import json

    import torch.nn.functional as F
    from torch import nn

    from nets.noise.batch_spectra import measure_batch_top_eigenvalue

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    one = measure_batch_top_eigenvalue(model, F.cross_entropy, (X, y), [8], n_batches=1, seed=2)
    assert np.isnan(one.std[0]) and np.isnan(one.stderr[0]) and np.isfinite(one.mean[0])
    json.dumps(one.to_dict(), allow_nan=False)
