"""Behaviour a mutation-testing audit (session 56, round b) found unpinned: one test per
gap, in least_squares, stability, subspace/resolved noise, lr_prediction, transfer and
the linearised thresholds.

Oracles are independent of the package: numpy closed forms, dense second-moment maps
built by hand-written loops over every batch, and the documented rules written out.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch


# ---------------------------------------------------------------- least_squares
def test_top_eigenpair_sign_convention_largest_entry_nonnegative():
    """`top_eigenpair` documents its sign: u's largest-magnitude entry is >= 0 (numpy's
    eigh sign is arbitrary, so without the flip it varies with the data)."""
    from nets.learning_rates.least_squares import LeastSquaresProblem

    flipped = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((40, 5)) * np.array([3.0, 1.0, 1.0, 1.0, 1.0])
        p = LeastSquaresProblem(X, rng.standard_normal(40))
        lam, u = p.top_eigenpair()
        ev, V = np.linalg.eigh(X.T @ X / 40)
        assert lam == pytest.approx(ev[-1], rel=1e-12)
        assert abs(abs(u @ V[:, -1]) - 1.0) < 1e-10, "u is not the top eigenvector"
        assert u[np.argmax(np.abs(u))] > 0, f"seed {seed}: largest-magnitude entry of u is negative"
        flipped += V[np.argmax(np.abs(V[:, -1])), -1] < 0
    assert flipped > 0, "test premise: numpy's eigh returned a negative sign for some seed"


def test_least_squares_problem_refuses_a_single_row():
    """N = 1 has no (N−1) normalisation for the noise: refused at construction."""
    from nets.learning_rates.least_squares import LeastSquaresProblem

    with pytest.raises(ValueError, match="at least 2 rows"):
        LeastSquaresProblem(np.ones((1, 3)), np.ones(1))
    LeastSquaresProblem(np.ones((2, 3)), np.ones(2))          # two rows are fine


# ---------------------------------------------------------------- stability
def _one_dim_threshold(h_i, B, replacement):
    """Closed form for d = 1: α* = 2h/(h² + κ·(1/N)Σ(h_i − h)²), κ = 1/B with
    replacement, (N − B)/(B(N − 1)) without (the second moment of e_{t+1} = (1 − αh_B)e_t
    is E(1 − αh_B)² = 1 − 2αh + α²(h² + Var h_B))."""
    N = h_i.size
    h = h_i.mean()
    var_pop = np.mean((h_i - h) ** 2)
    kappa = 1.0 / B if replacement else (N - B) / (B * (N - 1))
    return 2.0 * h / (h * h + kappa * var_pop)


def test_threshold_curve_passes_replacement_through():
    """`ms_threshold_curve(..., replacement=True)` is the with-replacement threshold at
    every B (κ = 1/B), the 1-d closed form — not the without-replacement one."""
    from nets.learning_rates.stability import ms_stability_threshold, ms_threshold_curve

    rng = np.random.default_rng(3)
    x = rng.standard_normal(12) * np.linspace(0.5, 3.0, 12)
    Bs = np.array([1, 3, 8, 12])
    for replacement in (True, False):
        want = np.array([_one_dim_threshold(x * x, b, replacement) for b in Bs])
        curve = ms_threshold_curve(x[:, None], Bs, replacement=replacement)
        np.testing.assert_allclose(curve, want, rtol=1e-9,
                                   err_msg=f"curve, replacement={replacement}")
        single = [ms_stability_threshold(x[:, None], int(b), replacement=replacement).alpha
                  for b in Bs]
        np.testing.assert_allclose(single, want, rtol=1e-9)
    # the two differ (the test's premise), most at B = N where ε ≡ 0 without replacement
    assert _one_dim_threshold(x * x, 12, False) > 1.3 * _one_dim_threshold(x * x, 12, True)


def test_threshold_mode_is_a_positive_unit_second_moment():
    """`mode` is the worst-case second moment Σ: unit Frobenius norm, sign fixed so that
    it is positive semi-definite (trace > 0) whatever sign eigh returned."""
    from nets.learning_rates.stability import ms_stability_threshold

    for seed in range(8):
        rng = np.random.default_rng(seed)
        A = rng.standard_normal((20, 3)) * np.array([2.0, 1.0, 0.5])
        thr = ms_stability_threshold(A, 4)
        S = thr.mode
        assert np.linalg.norm(S) == pytest.approx(1.0, rel=1e-10)
        assert np.trace(S) > 0, f"seed {seed}: mode has negative trace {np.trace(S)}"
        assert np.linalg.eigvalsh(0.5 * (S + S.T))[0] > -1e-8, f"seed {seed}: mode not PSD"



def _enumerated_second_moment_matrix(A, B, alpha):
    """The map Σ ↦ mean over every B-subset S of (I − αH_S)Σ(I − αH_S), H_S the subset's
    mean of H_i = a_i a_iᵀ, as a (d², d²) matrix on row-major vec(Σ) (hand-written)."""
    N, d = A.shape
    M = np.zeros((d * d, d * d))
    subsets = list(itertools.combinations(range(N), B))
    for S in subsets:
        HS = A[list(S)].T @ A[list(S)] / B
        G = np.eye(d) - alpha * HS
        M += np.kron(G, G)
    return M / len(subsets)


@pytest.mark.parametrize("d", [1, 2])
def test_spectral_radius_of_small_problems_matches_enumeration(d):
    """ρ(T_α) for d = 1, 2 (the dense path, d² ≤ 16) against every batch enumerated: for
    d = 1 it is E_S(1 − αh_S)², the per-step growth of E e²."""
    from nets.learning_rates.stability import ms_spectral_radius

    A = np.random.default_rng(5).standard_normal((7, d)) * np.linspace(1.0, 2.0, d)
    for B, alpha in ((2, 0.3), (3, 0.9), (7, 0.5)):
        want = float(np.max(np.abs(np.linalg.eigvals(_enumerated_second_moment_matrix(A, B, alpha)))))
        got = ms_spectral_radius(A, B, alpha)
        assert got == pytest.approx(want, rel=1e-10), f"d={d} B={B} alpha={alpha}"
    if d == 1:
        h = A[:, 0] ** 2
        want = np.mean([(1 - 0.3 * h[list(S)].mean()) ** 2 for S in itertools.combinations(range(7), 2)])
        assert ms_spectral_radius(A, 2, 0.3) == pytest.approx(want, rel=1e-12)


def test_threshold_keeps_a_nearly_flat_direction_with_large_per_sample_curvature():
    """A direction whose mean curvature is 1e-9·λ₁ (per-sample curvatures ±1 of both
    signs, weights allowed by `PerSampleHessians`) is part of the range (cut 1e-12·λ₁):
    with diagonal H_i the coordinates decouple and α* is the smaller 1-d closed form,
    ≈ 6e-9 here — the flat direction's batch noise decides. Dropping it would instead
    refuse the problem (or, worse, report the other direction's O(1) threshold)."""
    from nets.learning_rates.stability import PerSampleHessians, ms_stability_threshold

    N = 4
    x = np.array([1.0, 1.5, 0.7, 1.2])
    s = np.array([1.0, -1.0, 1.0, -1.0 + N * 1e-9])          # mean 1e-9
    A = np.zeros((N, 2, 2))
    A[:, 0, 0] = x
    A[:, 1, 1] = 1.0
    w = np.stack([np.ones(N), s], axis=1)
    hs = PerSampleHessians(A, w)
    np.testing.assert_allclose(hs.mean(), np.diag([np.mean(x * x), np.mean(s)]), atol=1e-15)
    want = min(_one_dim_threshold(x * x, 2, False), _one_dim_threshold(s, 2, False))
    assert want < 1e-8, "test premise: the flat direction decides"
    thr = ms_stability_threshold(hs, 2)
    assert thr.alpha == pytest.approx(want, rel=1e-5), (thr.alpha, want)


# ---------------------------------------------------------------- subspace_noise
def test_micro_batch_moments_centre_on_the_used_samples_mean(tiny_mlp, per_sample_hessians):
    """N = 30 in groups of m = 4 uses 28 samples: the group means' mean μ ≠ 0, and D, S, C
    are the centred sums m/(G−1)·Σ_g (x̄_g − μ)ᵀQ(x̄_g − μ) etc. — checked exactly against
    dense float64 per-sample Hessians on the returned partition."""
    import torch.nn.functional as F

    from nets.curvature.operators import hessian_operator
    from nets.noise.subspace_noise import micro_batch_moments

    model, X, y = tiny_mlp(seed=2, N=30)
    Hs, H, ev, V = per_sample_hessians(model, F.cross_entropy, X, y)
    k = 2
    U = V[:, :k].copy()
    op = hessian_operator(model, F.cross_entropy, (X, y))
    mom = micro_batch_moments(op, torch.from_numpy(U), torch.from_numpy(H @ U), micro_batch=4,
                              seed=1)
    groups = mom.groups
    G, m = groups.shape
    assert (G, m) == (7, 4) and np.unique(groups).size == 28
    xbar = np.stack([(Hs[g].mean(axis=0) - H) @ U for g in groups])          # (G, P, k)
    mu = xbar.mean(axis=0)
    assert np.abs(mu).max() > 1e-3, "test premise: the unused samples make μ non-zero"
    dev = xbar - mu
    a = np.einsum("pi,gpj->gij", U, dev)
    R = dev - np.einsum("pi,gij->gpj", U, a)
    scale = m / (G - 1)
    D = scale * np.einsum("gpi,gpj->ij", R, R)
    S = scale * np.einsum("gji,gjl->il", a, a)
    asym = 0.5 * (a + a.transpose(0, 2, 1))
    flat = asym.reshape(G, -1)
    np.testing.assert_allclose(mom.D, 0.5 * (D + D.T), rtol=1e-9, atol=1e-13, err_msg="D")
    np.testing.assert_allclose(mom.S, 0.5 * (S + S.T), rtol=1e-9, atol=1e-13, err_msg="S")
    np.testing.assert_allclose(mom.C, scale * flat.T @ flat, rtol=1e-9, atol=1e-13, err_msg="C")


def _scalar_subspace_noise(a, lam=2.0, D=0.0):
    """A k = 1 `SubspaceNoise` built by hand: H_U = [[λ]], a_i given (centred), D."""
    from nets.noise.subspace_noise import SubspaceNoise

    a = np.asarray(a, float) - np.mean(a)
    N = a.size
    return SubspaceNoise(lam=np.array([lam]), H_U=np.array([[lam]]), a=a.reshape(N, 1, 1),
                         D=np.array([[D]]), S=np.array([[np.sum(a * a) / (N - 1)]]), N=N, P=3,
                         k=1, vectors=torch.eye(3, 1, dtype=torch.float64)), a


def test_subspace_gaussian_method_has_the_ddof1_batch_variance():
    """method="gaussian": a_S ~ N(0, c·(1/(N−1))Σ a_i²) — the variance of a without-
    replacement batch mean, c = 1/B − 1/N. With k = 1, D = 0 the model is z = λ + a_S, so
    its sample variance over many batches is c·Σa_i²/(N−1) (N = 5: 25 % above /N), and it
    matches the exact variance of the resampled batch means."""
    from nets.noise.subspace_noise import subspace_batch_top_eigenvalue

    sn, a = _scalar_subspace_noise([3.0, -1.0, 0.5, 2.0, -4.0])
    N, B = 5, 2
    c = 1.0 / B - 1.0 / N
    want = c * np.sum(a * a) / (N - 1)
    exact = np.var([a[list(S)].mean() for S in itertools.combinations(range(N), B)])
    assert want == pytest.approx(exact, rel=1e-12), "oracle: finite-population variance"
    res = subspace_batch_top_eigenvalue(sn, [B], method="gaussian", n_batches=200_000, seed=4)
    z = res["values"][0]
    assert z.mean() == pytest.approx(2.0, abs=4 * math.sqrt(want / z.size))
    assert np.var(z) == pytest.approx(want, rel=0.02), (np.var(z), want)


def test_a_covariance_falls_back_to_the_rows_ddof1_covariance():
    """Without micro-batch moments `a_covariance()` is the stored rows' own covariance of
    vec(a_i) with ddof 1 (numpy's np.cov), not the /n second moment."""
    from nets.noise.subspace_noise import SubspaceNoise

    rng = np.random.default_rng(7)
    a = rng.standard_normal((6, 2, 2))
    a = 0.5 * (a + a.transpose(0, 2, 1)) + 0.3                 # not centred: rows of a sample
    sn = SubspaceNoise(lam=np.ones(2), H_U=np.eye(2), a=a, D=np.zeros((2, 2)),
                       S=np.zeros((2, 2)), N=40, P=5, k=2,
                       vectors=torch.eye(5, 2, dtype=torch.float64), samples=np.arange(6))
    np.testing.assert_allclose(sn.a_covariance(), np.cov(a.reshape(6, 4).T, ddof=1),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["resample", "gaussian"])
def test_subspace_model_with_replacement_uses_the_iid_batch_factor(method):
    """replacement=True: c = (1 − 1/N)/B (i.i.d. draws, in units of the ddof-1 per-sample
    variance; B > N allowed), so with a_i ≡ 0 the k = 1 model is deterministic,
    z = λ + c·D/λ exactly; without replacement c = 1/B − 1/N."""
    from nets.noise.subspace_noise import subspace_batch_top_eigenvalue

    sn, _ = _scalar_subspace_noise(np.zeros(5), lam=2.0, D=3.0)
    for replacement, Bs in ((True, [2, 7]), (False, [2, 5])):
        res = subspace_batch_top_eigenvalue(sn, Bs, method=method, n_batches=16,
                                            replacement=replacement, seed=0)
        c = np.array([0.8 / b if replacement else 1.0 / b - 1.0 / 5 for b in Bs])
        np.testing.assert_allclose(res["c"], c, rtol=1e-14, err_msg=f"c, replacement={replacement}")
        np.testing.assert_allclose(res["mean"], 2.0 + c * 3.0 / 2.0, rtol=1e-12,
                                   err_msg=f"mean, replacement={replacement}")


# ---------------------------------------------------------------- linearized
def test_thresholds_at_refuses_a_tolerance_above_the_tracked_one():
    """`at(k)` reads thresholds off running maxima that stop being tracked above
    `tracked_up_to`: any k above it is refused (values there are only lower bounds)."""
    from nets.learning_rates.linearized import LinearizedThresholds

    grid = np.geomspace(0.1, 10.0, 8)[None]
    worst = np.array([[[1.0, 1.5, 3.0, 8.0, 12.0, 40.0, 40.0, 40.0]]])
    thr = LinearizedThresholds(np.array([4]), np.array([1.0]), np.array([np.nan]),
                               np.array([[1.0]]), (0,), 0.0, 10, 10.0, 1.0, grid, worst, 3,
                               tracked_up_to=10.0)
    assert thr.at(10.0)[0, 0] == pytest.approx(math.sqrt(grid[0, 3] * grid[0, 4]))
    assert thr.at(2.0)[0, 0] == pytest.approx(math.sqrt(grid[0, 1] * grid[0, 2]))
    for k in (10.5, 15.0, 19.9):
        with pytest.raises(ValueError, match="above the largest tolerance tracked"):
            thr.at(k)


def test_checked_output_shape_refuses_jacobians_above_max_bytes(tiny_mlp):
    """The Jacobians of N samples × K outputs × D directions take N·K·D·itemsize bytes:
    exactly that much is accepted, one byte less refused."""
    from nets.learning_rates.linearized import checked_output_shape

    model, X, _ = tiny_mlp(seed=0, N=10)
    need = 10 * 3 * 57 * 4                                          # float32
    assert checked_output_shape(model, X, 57, dtype=torch.float32, max_bytes=need) == (3,)
    with pytest.raises(ValueError, match="max_bytes"):
        checked_output_shape(model, X, 57, dtype=torch.float32, max_bytes=need - 1)
    with pytest.raises(ValueError, match="max_bytes"):
        checked_output_shape(model, X, 57, dtype=torch.float64, max_bytes=need + 1)


def test_refined_runs_brackets_at_once_and_lowers_the_grid_step_by_step():
    """The fine grid starts one coarse point below the first crossing (two calls per run
    when bracketed at once); where the fine pass crosses more than a coarse step lower, the
    start moves down one coarse step at a time (here twice) until it is bracketed."""
    from nets.learning_rates.linearized import first_crossing, refined_runs

    coarse = np.geomspace(0.01, 100.0, 31)
    calls = {"steady": 0, "soft": 0}

    def steady(grid):
        calls["steady"] += 1
        return np.where(np.asarray(grid) > 1.05, 20.0, 1.0)

    def soft(grid):                                       # the fine pass crosses at 0.6
        calls["soft"] += 1
        grid = np.asarray(grid)
        edge = 1.05 if len(grid) == len(coarse) else 0.6
        return np.where(grid > edge, 20.0, 1.0)

    j = int(np.argmax(coarse > 1.05))
    grid, worst = refined_runs([steady], coarse, (10.0,), 16)
    assert calls["steady"] == 2, "a run bracketed at once is run on the coarse and fine grid only"
    assert grid[0] == pytest.approx(coarse[j - 1]) and grid[-1] == pytest.approx(coarse[j + 1])
    calls.update(steady=0, soft=0)
    grid, worst = refined_runs([steady, soft], coarse, (10.0,), 16)
    assert grid[0] == pytest.approx(coarse[j - 3]), "lowered by two coarse steps"
    assert calls == {"steady": 4, "soft": 4}
    crossings = [first_crossing(grid, w, 10.0) for w in worst]
    assert 0.5 < crossings[1] < 0.7 and 1.0 < crossings[0] < 1.2, crossings


def test_curved_subspace_form_uses_the_unit_projection_of_u(tiny_mlp):
    """In the subspace form the curved term runs along ũ = Vᵀu/‖Vᵀu‖ (unit), with q the
    outputs' second derivative along V·ũ — checked against torch.func (jvp of jvp) on the
    flat parameters."""
    from dense_oracles import flat_state

    from nets.learning_rates.linear_outputs import StoredOutputs
    from nets.learning_rates.linearized import _curved, output_jacobians

    model, X, _ = tiny_mlp(seed=1, N=8)
    P, r = 57, 5
    g = torch.Generator().manual_seed(3)
    V, _ = torch.linalg.qr(torch.randn(P, r, generator=g, dtype=torch.float64))
    u = V @ torch.tensor([0.6, -0.5, 0.3, 0.2, 0.1], dtype=torch.float64)
    u = u + 0.07 * torch.randn(P, generator=g, dtype=torch.float64)
    u = u / u.norm()
    t = V.T @ u
    assert 0.5 < float(t.norm()) < 0.95, "test premise: u partly outside the span"
    lin = StoredOutputs(*output_jacobians(model, X, basis=V, dtype=torch.float64))
    cur = _curved(lin, model, X, u, V, 256)
    t_hat = t / t.norm()
    torch.testing.assert_close(cur.u, t_hat, rtol=1e-12, atol=1e-12)
    flat, state = flat_state(model)
    v = V @ t_hat

    def z(w):
        return torch.func.functional_call(model, state(w), (X,))

    def dz(w):
        return torch.func.jvp(z, (w,), (v,))[1]

    q = torch.func.jvp(dz, (flat,), (v,))[1]
    torch.testing.assert_close(cur.q, q, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- transfer
def test_transfer_lr_refuses_sgd_dampening(tiny_mlp):
    """SGD dampening is refused by every transfer form (the linearised and real thresholds
    run torch's heavy ball without it), before any measurement; momentum alone is fine."""
    import torch.nn.functional as F

    from nets.learning_rates.transfer import momentum_caveat_silenced, transfer_lr

    model, X, y = tiny_mlp(seed=0, N=24)
    damped = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    for form in ("directional", "linearized"):
        with pytest.raises(ValueError, match="dampening is not supported"):
            transfer_lr(model, F.cross_entropy, (X, y), [4, 8], reference=(8, 0.1),
                        optimizer=damped, form=form)
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with momentum_caveat_silenced():
        res = transfer_lr(model, F.cross_entropy, (X, y), [4, 8], reference=(8, 0.1),
                          optimizer=plain, form="directional")
    assert res.lr[1] == pytest.approx(0.1) and res.momentum == pytest.approx(0.9)


def test_transfer_lr_refuses_a_reference_batch_larger_than_the_data(tiny_mlp):
    """B₀ > N is refused, naming B0 (batches are drawn without replacement)."""
    import torch.nn.functional as F

    from nets.learning_rates.transfer import transfer_lr

    model, X, y = tiny_mlp(seed=0, N=24)
    with pytest.raises(ValueError, match=r"reference\[0\] \(B0\) must be <= N=24"):
        transfer_lr(model, F.cross_entropy, (X, y), [4, 8], reference=(25, 0.1),
                    form="directional")


def test_linearized_transfer_scales_the_seed_error_by_the_correction(tiny_mlp):
    """form="linearized": a(B) = α_lin(B)·corr(B), so its seed standard error is
    stderr(α_lin)·|corr| — checked against `linearized_threshold` run on its own with
    the same protocol (same batch sequences: the same thresholds)."""
    import warnings

    import torch.nn.functional as F

    from nets.learning_rates.linearized import linearized_threshold
    from nets.learning_rates.transfer import transfer_lr

    model, X, y = tiny_mlp(seed=0, N=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = transfer_lr(model, F.cross_entropy, (X, y), [4, 16], reference=(16, 0.1),
                          steps=30, n_seeds=3, rank=None)
        lin = linearized_threshold(model, F.cross_entropy, (X, y), [4, 16], factor=10.0,
                                   steps=30, seeds=(0, 1, 2), seed=0)
    assert res.correction_applied and np.all(res.correction < 0.95), \
        "test premise: the secant correction applies"
    np.testing.assert_allclose(res.linearized_lr, lin.lr, rtol=1e-12)
    np.testing.assert_allclose(res.shape, lin.lr * res.correction, rtol=1e-12)
    np.testing.assert_allclose(res.shape_stderr, lin.stderr * res.correction, rtol=1e-12,
                               err_msg="shape_stderr is not stderr(α_lin)·|corr|")


# ---------------------------------------------------------------- lr_prediction
def test_optimizer_settings_drop_dampening_without_momentum_and_refuse_it_with_nesterov():
    """torch applies dampening only inside the momentum buffer: at ρ = 0 it is read as 0
    (F = 2, not 2/(1−τ)); Nesterov with dampening is refused (torch refuses it too)."""
    from nets.learning_rates.lr_prediction import OptimizerSettings, optimizer_settings

    s = optimizer_settings(OptimizerSettings("sgd", 0.0, 0.5, False, 0.9, 0.999, 1e-8))
    assert s.dampening == 0.0 and s.sgd_factor == pytest.approx(2.0)
    s = optimizer_settings(OptimizerSettings("sgd", 0.5, 0.5, False, 0.9, 0.999, 1e-8))
    assert s.dampening == 0.5 and s.sgd_factor == pytest.approx(2 * 1.5 / 0.5)
    with pytest.raises(ValueError, match="nesterov needs momentum > 0 and dampening = 0"):
        optimizer_settings(OptimizerSettings("sgd", 0.9, 0.5, True, 0.9, 0.999, 1e-8))
    with pytest.raises(ValueError):          # torch's own rule, for comparison
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9,
                        dampening=0.5, nesterov=True)


def test_lr_table_min_damping_is_the_directional_lr_times_the_noise_edge():
    """min_damping(B) = α_dir(B)·λ_noise(B)/2, λ_noise = 2√(c·Pσ²), c = 1/B − 1/N — from
    numpy closed forms on a least-squares problem (λ₁, s_u², Pσ² exact; α_dir = 2/(λ₁ +
    c·s_u²/λ₁)); it vanishes at B = N."""
    from nets.learning_rates.least_squares import spiked_regression
    from nets.learning_rates.lr_prediction import lr_table

    p = spiked_regression(60, 5, 4.0, noise_std=0.3, rng=2)
    model, loss_fn, data = p.torch_problem(w=0.5 * p.minimizer())
    bs = np.array([1, 4, 15, 60])
    t = lr_table(model, loss_fn, data, bs, measure=False, mccandlish=False, num_probes=None,
                 seed=0)
    lam, u = p.top_eigenpair()
    s2, iso = p.directional_noise(u), p.isotropic_noise()
    c = 1.0 / bs - 1.0 / p.N
    alpha = 2.0 / (lam + c * s2 / lam)
    np.testing.assert_allclose(t.sgd_directional, alpha, rtol=1e-7)
    np.testing.assert_allclose(t.min_damping, alpha * np.sqrt(c * iso), rtol=1e-7, atol=1e-15)
    assert t.min_damping[-1] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- resolved_noise
def test_complement_noise_horvitz_thompson_pairs_weight_the_diagonal_once():
    """With priority-sampled spikes (weights ω_i = 1/π_i ≠ 1) the Horvitz–Thompson sum
    YᵀY = Σ_ab Ω_ab γ_aγ_b t_a t_bᵀ (G_ab − t_aᵀt_b) weighs a pair a ≠ b by ω_aω_b and a
    diagonal term by ω_a (its own inclusion probability), and
    D_h = D − (Σ_a ω_a[γ_a(t_a w_aᵀ + w_a t_aᵀ) − γ_a² q_a t_a t_aᵀ] + YᵀY/N)/(N − 1),
    q_a = 1 − ‖t_a‖² — written out as loops."""
    from types import SimpleNamespace

    from nets.noise.resolved_noise import _complement_noise

    rng = np.random.default_rng(11)
    N, k, m = 50, 2, 4
    T = 0.4 * rng.standard_normal((k, m))
    Vv = rng.standard_normal((6, m))
    Gv = Vv.T @ Vv / 6.0
    Gv = Gv / np.sqrt(np.outer(np.diag(Gv), np.diag(Gv)))            # unit spike vectors
    wts = np.array([1.0, 2.5, 4.0, 1.7])
    rn = SimpleNamespace(subspace=SimpleNamespace(N=N, D=np.array([[3.0, 0.2], [0.2, 2.0]])),
                         weight=wts, gamma=rng.uniform(5, 20, size=N), index=np.array([3, 9, 17, 40]),
                         T=T, w=rng.standard_normal((m, k)), Gv=Gv)
    sel = np.arange(m)
    g = rn.gamma[rn.index]
    corr = np.zeros((k, k))
    for a in range(m):
        ta, wa = T[:, a], rn.w[a]
        corr += wts[a] * (g[a] * (np.outer(ta, wa) + np.outer(wa, ta))
                          - g[a] ** 2 * (1 - ta @ ta) * np.outer(ta, ta))
    YY = np.zeros((k, k))
    for a in range(m):
        for b in range(m):
            om = wts[a] if a == b else wts[a] * wts[b]
            YY += om * g[a] * g[b] * (Gv[a, b] - T[:, a] @ T[:, b]) * np.outer(T[:, a], T[:, b])
    want = rn.subspace.D - (corr + YY / N) / (N - 1)
    np.testing.assert_allclose(_complement_noise(rn, sel), 0.5 * (want + want.T), rtol=1e-12,
                               atol=1e-12)
    # with every candidate kept (weights 1) it is the exact sum
    rn.weight = None
    got = _complement_noise(rn, sel)
    YY1 = sum(g[a] * g[b] * (Gv[a, b] - T[:, a] @ T[:, b]) * np.outer(T[:, a], T[:, b])
              for a in range(m) for b in range(m))
    corr1 = sum(g[a] * (np.outer(T[:, a], rn.w[a]) + np.outer(rn.w[a], T[:, a]))
                - g[a] ** 2 * (1 - T[:, a] @ T[:, a]) * np.outer(T[:, a], T[:, a]) for a in range(m))
    want1 = rn.subspace.D - (corr1 + YY1 / N) / (N - 1)
    np.testing.assert_allclose(got, 0.5 * (want1 + want1.T), rtol=1e-12, atol=1e-12)


def test_measured_limit_is_nan_where_the_mean_batch_sharpness_is_not_positive():
    """The "measured" columns F/E λ_max: a batch Hessian with no positive curvature has no
    stability limit — NaN, not a negative "maximal learning rate" (−2.78 for E λ = −0.72)."""
    from nets.learning_rates.lr_prediction import _limit

    out = _limit(2.0, [-0.72, 0.0, 0.5, 4.0])
    assert np.isnan(out[0]) and np.isnan(out[1]), out
    np.testing.assert_allclose(out[2:], [4.0, 0.5], rtol=1e-15)


def test_lr_table_adam_batch_sharpness_mean_and_ddof1_spread_on_least_squares():
    """adam_lam_mean/std: mean and ddof-1 spread of λ_max(D^{1/2}H_S D^{1/2}) over the
    recorded batches, D = 1/(√(ḡ² + c·Σ_jj) + ε) from the per-sample gradients — all by
    numpy on a least-squares problem (H_S = X_SᵀX_S/B, g_i = x_i(x_iᵀw − y_i))."""
    from nets.learning_rates.least_squares import spiked_regression
    from nets.learning_rates.lr_prediction import lr_table

    p = spiked_regression(40, 4, 4.0, noise_std=0.3, rng=5)
    w = 0.5 * p.minimizer()
    model, loss_fn, data = p.torch_problem(w=w)
    bs = [2, 8]
    t = lr_table(model, loss_fn, data, bs, n_batches=3, mccandlish=False, num_probes=None,
                 hessian_samples=None, seed=1)
    G = p.X * (p.X @ w - p.y)[:, None]
    gbar2, var = G.mean(0) ** 2, G.var(0, ddof=1)
    for i, B in enumerate(bs):
        c = 1.0 / B - 1.0 / p.N
        d = 1.0 / (np.sqrt(gbar2 + c * var) + 1e-8)
        tops = []
        for idx in t.batch_indices[i]:
            XS = p.X[idx]
            HS = XS.T @ XS / B
            tops.append(np.linalg.eigvalsh(np.sqrt(d)[:, None] * HS * np.sqrt(d)[None, :])[-1])
        assert len(tops) == 3
        assert t.adam_lam_mean[i] == pytest.approx(np.mean(tops), rel=1e-6)
        assert t.adam_lam_std[i] == pytest.approx(np.std(tops, ddof=1), rel=1e-5), \
            f"B={B}: adam_lam_std is not the ddof-1 spread"


def test_top_pencil_cuts_the_gram_relative_to_its_largest_eigenvalue():
    """`_top_pencil(A, Gram, floor)` restricts to Gram eigenvalues above floor × the
    largest: with Gram = diag(5, 3e-10) and floor 1e-10 the second direction (3e-10 <
    5e-10) is dropped and the answer is A₁₁/5; at floor 5e-11 it is kept (the full
    generalised problem, whose top is A₂₂/3e-10)."""
    from nets.noise.resolved_noise import _top_pencil

    A = np.array([[2.0, 0.0], [0.0, 1e-9]])
    Gram = np.diag([5.0, 3e-10])
    assert _top_pencil(A, Gram, 1e-10) == pytest.approx(2.0 / 5.0, rel=1e-12)
    assert _top_pencil(A, Gram, 5e-11) == pytest.approx(1e-9 / 3e-10, rel=1e-9)


def test_diagonal_scaled_operator_is_d_half_h_d_half_and_refuses_negative_entries(
        tiny_mlp, dense_hessian):
    """DiagonalScaledOperator(H, d) multiplies by D^{1/2} H D^{1/2} (dense float64 oracle);
    a negative or non-finite entry of d (not a preconditioner 1/(√v̂ + ε)) is refused."""
    import torch.nn.functional as F

    from nets.curvature.operators import hessian_operator
    from nets.learning_rates.lr_prediction import DiagonalScaledOperator

    model, X, y = tiny_mlp(seed=0, N=12)
    H = dense_hessian(model, F.cross_entropy, X, y)
    op = hessian_operator(model, F.cross_entropy, (X, y))
    d = torch.linspace(0.2, 3.0, 57, dtype=torch.float64)
    v = torch.randn(57, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = d.sqrt() * (H @ (d.sqrt() * v))
    torch.testing.assert_close(DiagonalScaledOperator(op, d).matvec(v), want, rtol=1e-9,
                               atol=1e-11)
    for bad in (-0.1, float("nan"), float("inf")):
        e = d.clone()
        e[7] = bad
        with pytest.raises(ValueError, match="finite and non-negative"):
            DiagonalScaledOperator(op, e)


def test_optimizer_settings_warn_about_coupled_decay_in_any_group_and_refuse_bool_momentum():
    """Coupled weight decay is warned about when any parameter group has it (biases and
    norms are often put in a first group without decay); momentum=True is a TypeError
    (float(True) = 1.0 would otherwise read as momentum 1)."""
    import warnings

    from nets.learning_rates.lr_prediction import optimizer_settings

    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([{"params": [a], "weight_decay": 0.0},
                           {"params": [b], "weight_decay": 0.05}], lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match=r"weight_decay=0\.05 is not modelled"):
        optimizer_settings(opt)
    plain = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert optimizer_settings(plain).momentum == pytest.approx(0.9)
    for flag in (True, np.bool_(True)):
        with pytest.raises(TypeError, match="bool"):
            optimizer_settings("sgd", momentum=flag)


def test_optimizer_settings_refuse_betas_that_are_not_a_pair():
    """betas must be exactly (β₁, β₂): three values are refused by name, not unpacked."""
    from nets.learning_rates.lr_prediction import optimizer_settings

    with pytest.raises(ValueError, match=r"betas must be a pair"):
        optimizer_settings("adam", betas=(0.9, 0.999, 0.5))
    s = optimizer_settings("adam", betas=[0.8, 0.99])
    assert (s.beta1, s.beta2) == (0.8, 0.99)


# ---------------------------------------------------------------- adam_linearized
def test_linearized_adam_correction_is_measured_at_the_first_sequences_warm_state(tiny_mlp):
    """λ̃ and r of the correction come from the warmed state of the *first* seed of each B
    (`secant_at_warmed_states(warm_seed=seeds[0])`), not another sequence's."""
    import warnings

    import torch.nn.functional as F

    from nets.learning_rates.adam_linearized import (
        linearized_adam_threshold,
        secant_at_warmed_states,
    )

    model, X, y = tiny_mlp(seed=0, N=24)
    kw = dict(betas=(0.9, 0.999), warmup_steps=10, warmup_lr=1e-2, factor=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = linearized_adam_threshold(model, F.cross_entropy, (X, y), [4], steps=10,
                                        seeds=(3, 5), lr_range=(1e-3, 1e2), n_grid=6, **kw)
        lam3, r3 = secant_at_warmed_states(model, F.cross_entropy, (X, y), [4], warm_seed=3, **kw)
        lam5, _ = secant_at_warmed_states(model, F.cross_entropy, (X, y), [4], warm_seed=5, **kw)
    assert abs(lam3[0] - lam5[0]) > 1e-3 * lam3[0], "test premise: the warm states differ"
    assert lin.lam_precond[0] == pytest.approx(lam3[0], rel=1e-7)
    np.testing.assert_allclose(lin.secant_ratio, r3, rtol=1e-6, equal_nan=True)


def test_uncorrected_batch_sizes_are_named_for_nan_and_for_ratios_above_one():
    """The warning names the B where r is NaN and, separately, where r > 1 (the real loss
    along ũ flatter than the linearised one); r ≤ 1 everywhere: no warning."""
    import warnings

    from nets.learning_rates.adam_linearized import _warn_uncorrected

    with pytest.warns(UserWarning) as rec:
        _warn_uncorrected(np.array([0.5, 1.6, np.nan]), [4, 8, 16], 10.0)
    msg = str(rec[0].message)
    assert "NaN at B = [16]" in msg and "above 1 at B = [8]" in msg and "1.6" in msg, msg
    with pytest.warns(UserWarning, match=r"above 1 at B = \[4\]"):
        _warn_uncorrected(np.array([1.2, 0.9]), [4, 8], 10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_uncorrected(np.array([0.5, 1.0]), [4, 8], 10.0)


def test_preconditioned_top_direction_is_d_half_times_the_eigenvector(tiny_mlp, dense_hessian):
    """`_preconditioned_top` returns (λ̃, D^{1/2}ũ): ũ the top eigenvector of
    D^{1/2} H D^{1/2} with D = 1/(√v̂ + ε) from the Adam state, written out here from the
    optimizer's exp_avg_sq and step (a returned ũ itself, or D·ũ, is another direction)."""
    import torch.nn.functional as F

    from nets.learning_rates.adam_linearized import _preconditioned_top

    model, X, y = tiny_mlp(seed=3, N=40)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    g = torch.Generator().manual_seed(0)
    for _ in range(7):
        idx = torch.randperm(40, generator=g)[:8]
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    opt.zero_grad()
    b2 = opt.param_groups[0]["betas"][1]
    D = torch.cat([1.0 / ((opt.state[p]["exp_avg_sq"] / (1 - b2 ** int(opt.state[p]["step"])))
                          .sqrt() + 1e-8).reshape(-1) for p in model.parameters()]).double()
    H = dense_hessian(model, F.cross_entropy, X, y)
    s = D.sqrt()
    ev, V = torch.linalg.eigh(s[:, None] * H * s[None, :])
    lam, d = _preconditioned_top(model, F.cross_entropy, (X, y), opt, 0)
    assert lam == pytest.approx(float(ev[-1]), rel=1e-8)
    want = s * V[:, -1]
    cos = float(torch.dot(d, want) / (d.norm() * want.norm()))
    assert abs(cos) > 1 - 1e-8, f"the direction is not D^1/2 u (|cos| = {abs(cos):.6f})"


def test_curved_adam_model_takes_its_second_derivative_along_a_unit_direction(tiny_mlp,
                                                                              monkeypatch):
    """The curved Adam model keeps ½(dᵀe)²·q with q = d²z(w + t·d)/dt²: both factors scale
    with |d|², so the direction must be the unit D^{1/2}ũ (without the normalisation the
    term is |d|⁴ times too large). Checked on what reaches the second-derivative pass."""
    import torch.nn.functional as F

    import nets.learning_rates.adam_linearized as al

    seen = []
    real = al.second_derivative_along

    def recording(model, X, d, **kw):
        seen.append(float(d.norm()))
        return real(model, X, d, **kw)
    monkeypatch.setattr(al, "second_derivative_along", recording)
    model, X, y = tiny_mlp(seed=4, N=40)
    al.linearized_adam_threshold(model, F.cross_entropy, (X, y), [8], warmup_steps=3, steps=5,
                                 seeds=(0,), n_grid=4, curved=True, lr_range=(1e-3, 1.0))
    assert seen and all(abs(n - 1.0) < 1e-10 for n in seen), seen
