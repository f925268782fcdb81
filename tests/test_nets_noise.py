"""Directional and isotropic curvature noise against dense per-sample Hessians."""

import numpy as np
import pytest
import torch
from dense_oracles import flat_state
from torch import nn
from torch.func import functional_call

import rmt
from nets.curvature.operators import hessian_operator
from nets.noise.directional import (
    directional_noise,
    directional_noise_from_operator,
    isotropic_noise,
    isotropic_noise_from_operator,
)

CE = nn.functional.cross_entropy
MSE = nn.functional.mse_loss


def make(kind_of_data, seed=0, N=15):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 10)
    if kind_of_data == "classifier":
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        X = torch.randn(N, 5, dtype=torch.float64, generator=g)
        y = torch.randint(0, 3, (N,), generator=g)
        return model, X, y, CE
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(N, 3, dtype=torch.float64, generator=g)
    y = torch.randn(N, 2, dtype=torch.float64, generator=g)
    return model, X, y, MSE


def per_sample_curvatures(model, loss_fn, X, y, kind="hessian"):
    """Dense C_i (N, P, P): Hessians by torch.func.hessian, or J_iᵀΛ_iJ_i."""
    w, state = flat_state(model)

    def out(w, x):
        return functional_call(model, state(w), (x,))
    Cs = []
    for i in range(X.shape[0]):
        x, t = X[i:i + 1], y[i:i + 1]
        if kind == "hessian":
            Cs.append(torch.func.hessian(lambda w: loss_fn(out(w, x), t))(w))
        else:
            J = torch.func.jacrev(lambda w: out(w, x))(w)[0]              # (C, P)
            L = torch.func.hessian(lambda o: loss_fn(o, t))(out(w, x))[0, :, 0, :]
            Cs.append(J.T @ L @ J)
    return torch.stack(Cs)


def dense_s2(C, u):
    D = (C - C.mean(0)) @ u
    return float((D * D).sum() / (C.shape[0] - 1))


@pytest.mark.parametrize("data", ["classifier", "regressor"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_directional_noise_matches_dense_per_sample_oracle(data, kind):
    model, X, y, loss_fn = make(data)
    C = per_sample_curvatures(model, loss_fn, X, y, kind)
    u = torch.from_numpy(np.random.default_rng(1).standard_normal(C.shape[1]))
    u = u / u.norm()
    est = directional_noise(model, loss_fn, (X, y), 3.0 * u, kind=kind, chunk_size=4)
    exact = dense_s2(C, u)
    assert est.s2 == pytest.approx(exact, rel=1e-8)
    assert est.lam == pytest.approx(float(u @ C.mean(0) @ u), rel=1e-8, abs=1e-14)
    assert est.n_groups == X.shape[0] and est.micro_batch == 1 and est.stderr > 0


@pytest.mark.parametrize("m,N", [(3, 15), (4, 15)])
def test_micro_batch_estimate_uses_the_documented_partition(m, N):
    model, X, y, loss_fn = make("classifier", seed=2, N=N)
    C = per_sample_curvatures(model, loss_fn, X, y)
    u = torch.from_numpy(np.random.default_rng(3).standard_normal(C.shape[1]))
    u = u / u.norm()
    est = directional_noise(model, loss_fn, (X, y), u, micro_batch=m, seed=9)
    G = N // m
    groups = np.random.default_rng(9).permutation(N)[: G * m].reshape(G, m)
    Cg = torch.stack([C[g].mean(0) for g in groups])                 # group means
    D = (Cg - Cg.mean(0)) @ u
    exact = m * float((D * D).sum()) / (G - 1)
    assert est.n_groups == G
    assert est.s2 == pytest.approx(exact, rel=1e-8)


def test_micro_batch_estimate_is_unbiased_for_per_sample_variance():
    model, X, y, loss_fn = make("classifier", seed=4, N=24)
    op = hessian_operator(model, loss_fn, (X, y))
    u = torch.from_numpy(np.random.default_rng(5).standard_normal(op.P))
    exact = directional_noise_from_operator(op, u).s2
    ests = np.array([directional_noise_from_operator(op, u, micro_batch=4, seed=s).s2
                     for s in range(60)])
    z = (ests.mean() - exact) / (ests.std(ddof=1) / np.sqrt(len(ests)))
    assert abs(z) < 4


def test_fluctuation_second_moment_is_c_times_s2():
    """E_S ‖(H_B − H)u‖² = c(B, N)·s_u² exactly (sampling without replacement)."""
    model, X, y, loss_fn = make("classifier", seed=6, N=20)
    C = per_sample_curvatures(model, loss_fn, X, y)
    H = C.mean(0)
    u = torch.from_numpy(np.random.default_rng(7).standard_normal(C.shape[1]))
    u = u / u.norm()
    s2 = directional_noise(model, loss_fn, (X, y), u).s2
    rng = np.random.default_rng(8)
    N, B, reps = 20, 5, 4000
    Cu = (C @ u).numpy()
    Hu = (H @ u).numpy()
    vals = np.empty(reps)
    for r in range(reps):
        idx = rng.choice(N, size=B, replace=False)
        vals[r] = np.sum((Cu[idx].mean(0) - Hu) ** 2)
    expected = rmt.batch_noise_factor(B, N) * s2
    z = (vals.mean() - expected) / (vals.std(ddof=1) / np.sqrt(reps))
    assert abs(z) < 4


def test_isotropic_noise_estimates_trace_of_the_noise_covariance():
    model, X, y, loss_fn = make("classifier", seed=1)
    C = per_sample_curvatures(model, loss_fn, X, y)
    Dc = C - C.mean(0)
    A = torch.einsum("ijk,ikl->jl", Dc, Dc) / (C.shape[0] - 1)
    P = C.shape[1]
    exact = float(torch.trace(A)) / P                                 # = P·σ²_avg
    sig2 = (Dc ** 2).sum(0) / (C.shape[0] - 1)                        # σ²_jk
    assert exact == pytest.approx(P * float(sig2.mean()), rel=1e-12)
    est = isotropic_noise(model, loss_fn, (X, y), num_probes=40, seed=3)
    assert abs(est.s2 - exact) / est.stderr < 4
    # each probe value is the directional noise along that (unit Rademacher) probe
    z = np.random.default_rng(3).choice([-1.0, 1.0], size=(P, 40))[:, 0] / np.sqrt(P)
    assert est.per_probe[0] == pytest.approx(dense_s2(C, torch.from_numpy(z)), rel=1e-8)
    # one probe: stderr NaN, written "nan" as by every result (a bare NaN was written: not
    # JSON, and json.dumps(..., allow_nan=False) raised; an outside sweep)
    import json

    one = isotropic_noise(model, loss_fn, (X, y), num_probes=1, seed=3)
    d = json.loads(json.dumps(one.to_dict(), allow_nan=False))
    assert d["stderr"] == "nan" and d["s2"] == pytest.approx(one.s2)


def test_bad_input():
    model, X, y, loss_fn = make("classifier")
    op = hessian_operator(model, loss_fn, (X, y))
    with pytest.raises(ValueError, match="u must have"):
        directional_noise_from_operator(op, torch.ones(op.P + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-zero"):
        directional_noise_from_operator(op, torch.zeros(op.P, dtype=torch.float64))
    with pytest.raises(ValueError, match="micro_batch"):
        directional_noise_from_operator(op, torch.ones(op.P, dtype=torch.float64), micro_batch=8)
    with pytest.raises(ValueError, match="micro_batch"):
        directional_noise_from_operator(op, torch.ones(op.P, dtype=torch.float64), micro_batch=0)
    with pytest.raises(ValueError, match="num_probes"):
        isotropic_noise_from_operator(op, num_probes=0)
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double().train()
    with pytest.raises(ValueError, match="train_batch_stats"):
        directional_noise(bn, loss_fn, (X, y), torch.ones(47, dtype=torch.float64),
                          policy="train_batch_stats")


def test_summed_and_weighted_losses_warn():
    # a summed loss multiplied s_u² by the samples per evaluation (0.85 → 646 on a
    # 120-sample MLP) and a class-weighted mean changed it, both without a word
    import warnings
    model, X, y, _ = make("classifier", N=15)
    u = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    summed = lambda out, t: nn.functional.cross_entropy(out, t, reduction="sum")
    weighted = lambda out, t: nn.functional.cross_entropy(
        out, t, weight=torch.tensor([1.0, 4.0, 0.2], dtype=torch.float64))
    for loss, what in [(summed, "summed"), (weighted, "weighted mean")]:
        for call in (lambda f: directional_noise(model, f, (X, y), u, exact=True),
                     lambda f: isotropic_noise(model, f, (X, y), num_probes=2, exact=True)):
            with pytest.warns(UserWarning, match=what) as rec:
                call(loss)
            assert any(what in str(w.message) for w in rec)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        plain = [directional_noise(model, CE, (X, y), u, exact=True),
                 isotropic_noise(model, CE, (X, y), num_probes=2, exact=True)]
    assert not [w for w in rec if "loss_fn" in str(w.message)]
    assert all(np.isfinite(e.s2) and e.s2 > 0 for e in plain)


def test_isotropic_stderr_combines_probe_spread_and_micro_batch_error():
    """With k > 1 probes and micro-batches (m = 3, N = 15: G = 5 groups, none left over),
    the documented stderr is √(std_v(s_v²)²/k + se_groups²): the spread over probes plus
    the groups' error of the probe mean, se_groups = std_g(mean_v t_gv)/√G with
    t_gv = m·G/(G−1)·‖(C̄_g − C̄)v‖². Everything by hand from the dense per-sample Hessians,
    the documented partition default_rng(seed).permutation(N) and the documented probes
    v = z/√P (z the rows of default_rng(seed).choice([−1, 1], (P, k)))."""
    m, N, k, seed = 3, 15, 6, 4
    model, X, y, loss_fn = make("classifier", seed=2, N=N)
    C = per_sample_curvatures(model, loss_fn, X, y).numpy()
    P, G = C.shape[1], N // m
    V = np.random.default_rng(seed).choice([-1.0, 1.0], size=(P, k)) / np.sqrt(P)
    groups = np.random.default_rng(seed).permutation(N)[: G * m].reshape(G, m)
    Cg = np.stack([C[g].mean(0) for g in groups])                   # (G, P, P)
    D = np.einsum("gij,jv->giv", Cg - Cg.mean(0), V)                 # (G, P, k)
    t = m * G / (G - 1) * (D ** 2).sum(1)                           # (G, k)
    s2_v = t.mean(0)
    se_probes = s2_v.std(ddof=1) / np.sqrt(k)
    se_groups = t.mean(1).std(ddof=1) / np.sqrt(G)
    est = isotropic_noise(model, loss_fn, (X, y), num_probes=k, micro_batch=m, seed=seed,
                          exact=True)
    np.testing.assert_allclose(est.per_probe, s2_v, rtol=1e-8)
    assert est.s2 == pytest.approx(s2_v.mean(), rel=1e-8)
    assert np.hypot(se_probes, se_groups) > 1.02 * max(se_probes, se_groups)   # both matter
    assert est.stderr == pytest.approx(np.hypot(se_probes, se_groups), rel=1e-8)
