"""Behaviour a mutation-testing audit found unpinned (session 56): one test per gap.

Oracles are independent of the package: dense float64 Hessians and Jacobians
(`torch.func.hessian` / `jacrev` through `functional_call`), closed forms, hand-written
loops, and the documented rules written out.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dense_oracles import flat_state
from dense_oracles import output_jacobians as dense_jacobians
from torch import nn

CE = F.cross_entropy


def _chunks(X, y, k):
    B = X.shape[0] // k
    return X[:k * B].reshape(k, B, *X.shape[1:]), y[:k * B].reshape(k, B)


def _dense_hessian_of(model, loss_fn, X, y, names=None):
    flat, state = flat_state(model, names)
    return torch.func.hessian(
        lambda w: loss_fn(torch.func.functional_call(model, state(w), (X,)), y))(flat)


# ---------------------------------------------------------------- SideBySideHessians
def test_side_by_side_refuses_a_model_that_drops_the_batch_dimension(tiny_mlp):
    """A model whose output's first dimension is not the chunk's samples is named (else
    the chunk Hessians are those of a silently different loss)."""
    from nets.curvature.side_by_side import SideBySideHessians

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return self.lin(x).sum(0)            # (3,): the batch dimension is gone

    torch.manual_seed(0)
    model = Pooled().double()
    _, X, y = tiny_mlp(seed=0, N=12)
    Xc, Yc = _chunks(X, y, 3)
    with pytest.raises(ValueError, match="batch dimension"):
        SideBySideHessians(model, lambda out, t: (out ** 2).sum(), Xc, Yc)
    with pytest.raises(TypeError, match="loss_fn"):
        SideBySideHessians(tiny_mlp(seed=0)[0], "cross_entropy", Xc, Yc)


def test_side_by_side_casts_float32_chunks_to_the_operator_dtype(tiny_mlp):
    """float32 inputs of a float64 model are cast (as every operator does): the products
    are the dense float64 Hessians at the float32 inputs read as float64."""
    from nets.curvature.side_by_side import SideBySideHessians

    model, X, y = tiny_mlp(seed=2, N=12)
    Xc, Yc = _chunks(X.float(), y, 2)
    op = SideBySideHessians(model, CE, Xc, Yc)
    V = torch.randn(op.P, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = op.matmat(V)
    for j in range(2):
        Hj = _dense_hessian_of(model, CE, Xc[j].double(), Yc[j])
        np.testing.assert_allclose(out[:, j].numpy(), (Hj @ V[:, j]).numpy(), rtol=1e-10,
                                   atol=1e-12, err_msg=f"chunk {j}")


def test_side_by_side_with_a_parameter_the_loss_is_linear_in(tiny_mlp):
    """A parameter whose gradient is constant (the loss is linear in it: here the output
    bias under a mean-of-outputs loss term) has a gradient without a graph; its products
    are the dense Hessian's (zero rows there), not an autograd error."""
    from nets.curvature.side_by_side import SideBySideHessians

    model, X, y = tiny_mlp(seed=4, N=12)

    def loss(out, t):            # linear in the output bias: ∇_b L = 1/(3B), constant
        return out.mean()

    Xc, Yc = _chunks(X, y, 2)
    op = SideBySideHessians(model, loss, Xc, Yc)
    V = torch.randn(op.P, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = op.matmat(V)
    for j in range(2):
        Hj = _dense_hessian_of(model, loss, Xc[j], Yc[j])
        np.testing.assert_allclose(out[:, j].numpy(), (Hj @ V[:, j]).numpy(), rtol=1e-10,
                                   atol=1e-12, err_msg=f"chunk {j}")
    assert torch.all(out[-3:] == 0), "the output bias (last 3 parameters) has no curvature"


# ---------------------------------------------------------------- SampleJacobians
def test_sample_jacobians_accept_exactly_max_outputs(tiny_mlp):
    """max_outputs refuses *more* outputs per sample: C = max_outputs is accepted."""
    from nets.curvature.operators import hessian_operator
    from nets.curvature.sample_jacobians import SampleJacobians

    model, X, y = tiny_mlp(seed=0, N=8)
    op = hessian_operator(model, CE, (X, y), dtype=torch.float64)
    assert SampleJacobians(op, max_outputs=3).C == 3
    with pytest.raises(ValueError, match="max_outputs"):
        SampleJacobians(op, max_outputs=2)


# ---------------------------------------------------------------- ggn_spikes
def test_ggn_spikes_clip_negative_output_curvature():
    """γ_i, v_i = J_iᵀc_i are the top eigenpair of J_iᵀ Λ_i⁺ J_i with Λ_i's negative
    eigenvalues clipped to 0 (not their absolute values): against dense eigh on P×P."""
    from nets.noise.ggn_samples import ggn_spikes

    g = torch.Generator().manual_seed(3)
    n, C, P = 4, 3, 7
    J = torch.randn(n, C, P, generator=g, dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(n, C, C, generator=g, dtype=torch.float64))[0]
    ev = torch.tensor([[-5.0, 0.5, 1.0], [-3.0, -1.0, 2.0], [0.2, 0.7, 1.5], [-9.0, 0.1, 0.3]],
                      dtype=torch.float64)
    Lam = Q @ torch.diag_embed(ev) @ Q.transpose(1, 2)
    K = J @ J.transpose(1, 2)
    gamma, c = ggn_spikes(Lam, K)
    Lplus = Q @ torch.diag_embed(ev.clamp_min(0)) @ Q.transpose(1, 2)
    G = J.transpose(1, 2) @ Lplus @ J                                    # (n, P, P)
    w, V = torch.linalg.eigh(G)
    np.testing.assert_allclose(gamma.numpy(), w[:, -1].numpy(), rtol=1e-10,
                               err_msg="γ_i is the top eigenvalue of J_iᵀΛ_i⁺J_i")
    v = (J.transpose(1, 2) @ c[:, :, None])[:, :, 0]                     # (n, P)
    np.testing.assert_allclose(torch.linalg.vector_norm(v, dim=1).numpy(), 1.0, rtol=1e-10)
    np.testing.assert_allclose((v * V[:, :, -1]).sum(1).abs().numpy(), 1.0, rtol=1e-8,
                               err_msg="v_i is the top eigenvector up to sign")


# ---------------------------------------------------------------- linear_outputs
def test_tangent_outputs_leave_frozen_parameters_out(tiny_mlp):
    """The coordinates are the trainable parameters only (a frozen one is no direction),
    as for the stored Jacobians of those parameters."""
    from nets.learning_rates.linear_outputs import TangentOutputs

    model, X, _ = tiny_mlp(seed=3, N=10)
    model[0].bias.requires_grad_(False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    J = dense_jacobians(model, X, names)
    lin = TangentOutputs(model, X)
    assert lin.D == J.shape[2] == 57 - 6
    E = torch.randn(lin.D, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lin.full(E) - lin.z[:, :, None],
                               torch.einsum("nkp,pg->nkg", J, E), rtol=1e-10, atol=1e-12)


def test_tangent_outputs_full_covers_a_last_chunk_of_one_sample(tiny_mlp):
    """N = 3·chunk + 1: the last chunk holds one sample and is still in `full`."""
    from nets.learning_rates.linear_outputs import TangentOutputs

    model, X, _ = tiny_mlp(seed=6, N=22)
    J = dense_jacobians(model, X)
    lin = TangentOutputs(model, X, chunk_size=7)
    E = torch.randn(lin.D, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = model(X)
    full = lin.full(E)
    assert full.shape == (22, 3, 3)
    torch.testing.assert_close(full, z[:, :, None] + torch.einsum("nkp,pg->nkg", J, E),
                               rtol=1e-10, atol=1e-12)


def _dense_q(model, X, u):
    flat, state = flat_state(model)
    out = []
    for i in range(len(X)):
        H = torch.func.hessian(lambda w, i=i: torch.func.functional_call(
            model, state(w), (X[i:i + 1],)).reshape(-1))(flat)
        out.append(torch.einsum("p,kpq,q->k", u, H, u))
    return torch.stack(out)


def test_second_derivative_along_runs_the_model_in_eval_mode(tiny_mlp):
    """A model in train mode with Dropout: q is that of the eval-mode network (as the
    module says), deterministic, and the model's own mode is left as it was."""
    from nets.learning_rates.linear_outputs import second_derivative_along

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    _, X, _ = tiny_mlp(seed=1, N=6)
    u = torch.randn(57, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    u /= u.norm()
    model.train()
    q = second_derivative_along(model, X, u)
    assert model.training
    want = _dense_q(model.eval(), X, u)
    torch.testing.assert_close(q, want, rtol=1e-8, atol=1e-10)


def test_second_derivative_along_keeps_forward_ad_where_one_sample_sits_on_a_kink():
    """One of 16 checked samples has a ReLU pre-activation within ±h of 0 (its central
    difference is no derivative): the median check keeps the exact forward-over-forward
    q (0 everywhere for a piecewise-linear net), not the difference on every sample."""
    from nets.learning_rates.linear_outputs import second_derivative_along

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(16, 2, dtype=torch.float64, generator=g)
    with torch.no_grad():                 # sample 0 lands 1e-7 from unit 0's kink
        w, b = model[0].weight[0], model[0].bias[0]
        X[0] -= ((X[0] @ w + b) - 1e-7) * w / (w @ w)
    u = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    u[6] = 1.0                            # model[0].bias[0]: moves unit 0's pre-activation
    q = second_derivative_along(model, X, u, step=1e-4)
    assert torch.count_nonzero(q) == 0, "a ReLU network has no second derivative off kinks"


# ---------------------------------------------------------------- sharpness gap
def test_sharpness_gap_needs_two_samples():
    from nets.learning_rates.sharpness_gap import sharpness_gap_terms

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    X = torch.randn(1, 3, dtype=torch.float64)
    y = torch.tensor([1])
    with pytest.raises(ValueError, match="at least 2"):
        sharpness_gap_terms(model, CE, (X, y), torch.ones(8, dtype=torch.float64))


class _RunningStatNorms(nn.Module):
    """InstanceNorm1d on running statistics (eval, track_running_stats) and a direct
    F.batch_norm call with torch's default training=False (running statistics; F.batch_norm
    hands `training` to the function mode explicitly, so the mode's own default is moot)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.inorm = nn.InstanceNorm1d(2, affine=True, track_running_stats=True)
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.b = nn.Parameter(torch.linspace(-0.2, 0.3, 6))
        self.register_buffer("rm", torch.linspace(-0.3, 0.4, 6))
        self.register_buffer("rv", torch.linspace(0.5, 2.0, 6))
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.inorm(self.a(x).reshape(-1, 2, 3)).reshape(-1, 6)
        h = F.batch_norm(torch.tanh(h), self.rm, self.rv, self.w, self.b)
        return self.out(torch.tanh(h))


def test_sharpness_gap_leaves_running_statistic_norms_as_they_are():
    """Norm layers that use running statistics are affine in their input; the decomposed
    (input-statistics) pass must not replace them: S = uᵀHu and ‖∇S‖² against dense
    float64 Hessians (∇S by central differences of uᵀH(θ)u)."""
    from nets.learning_rates.sharpness_gap import sharpness_gap_terms

    torch.manual_seed(1)
    model = _RunningStatNorms().double()
    with torch.no_grad():
        model.inorm.running_mean.copy_(torch.tensor([0.3, -0.2]))
        model.inorm.running_var.copy_(torch.tensor([0.6, 1.7]))
    model.eval()
    g = torch.Generator().manual_seed(2)
    X = torch.randn(10, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (10,), generator=g)
    flat, state = flat_state(model)
    loss = lambda w: CE(torch.func.functional_call(model, state(w), (X,)), y)  # noqa: E731
    H = torch.func.hessian(loss)(flat)
    u = torch.linalg.eigh(H)[1][:, -1]
    t = sharpness_gap_terms(model, CE, (X, y), u)
    assert t.S == pytest.approx(float(u @ H @ u), rel=1e-9)
    h = 1e-4
    s_at = lambda w: float(u @ torch.func.hessian(loss)(w) @ u)  # noqa: E731
    gS = torch.tensor([(s_at(flat + h * e) - s_at(flat - h * e)) / (2 * h)
                       for e in torch.eye(flat.numel(), dtype=torch.float64)])
    assert t.stabilisation == pytest.approx(float(gS @ gS), rel=1e-5)


# ---------------------------------------------------------------- along_top
def test_interpolated_crossing_at_the_grid_start_and_at_a_non_finite_point():
    """`LossAlongTop.at` on the grid alone: already above k at the first point → that
    point; the bracket's upper loss not finite → the upper point (no interpolation)."""
    from nets.learning_rates.along_top import _interpolated

    xs = np.array([0.1, 0.2, 0.4, 0.8])
    sec = np.array([1.0, 1.1, 1.3, 1.7])
    up = np.array([5.0, 6.0, 7.0, 8.0])
    assert _interpolated(xs, up, up, sec, 3.0) == (0.1, 1.0)
    withnan = np.array([1.5, 2.0, np.nan, 9.0])
    A, s = _interpolated(xs, withnan, withnan, sec, 3.0)
    assert (A, s) == (pytest.approx(0.4, rel=1e-14), pytest.approx(1.3, rel=1e-14))


def test_loss_along_top_runs_a_train_mode_model_in_eval_mode(tiny_mlp):
    """Dropout in train mode: the profile is that of the eval-mode network, identical to
    the one of the same network built in eval mode (and the model's mode is kept)."""
    from nets.learning_rates.along_top import loss_along_top

    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).double()
    _, X, y = tiny_mlp(seed=3, N=30)
    ref = loss_along_top(net.eval(), CE, (X, y), factor=3.0, n=8)
    got = loss_along_top(net.train(), CE, (X, y), factor=3.0, n=8)
    assert net.training
    np.testing.assert_allclose(got.real_plus, ref.real_plus, rtol=1e-10)
    np.testing.assert_allclose(got.real_minus, ref.real_minus, rtol=1e-10)
    assert got.secant_ratio == pytest.approx(ref.secant_ratio, rel=1e-9)


def test_loss_along_top_refuses_zero_loss_and_negative_curvature(tiny_mlp, dense_hessian):
    from nets.learning_rates.along_top import loss_along_top

    model, X, y = tiny_mlp(seed=0, N=20)
    with torch.no_grad():
        target = model(X)
    with pytest.raises(ValueError, match="positive"):        # f(0) = 0: no ratio f(x)/f(0)
        loss_along_top(model, F.mse_loss, (X, target), n=4)
    H = dense_hessian(model, CE, X, y)
    ev, V = torch.linalg.eigh(H)
    assert ev[0] < 0, "the oracle point needs a negative Hessian eigenvalue"
    with pytest.raises(ValueError, match="λ₁ > 0"):
        loss_along_top(model, CE, (X, y), n=4, direction=V[:, 0])


# ---------------------------------------------------------------- CurvatureMonitor
def _mon_data(N=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 6, generator=g, dtype=torch.float64)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 1).long()
    return X, y


def _mon_model(seed=0):
    from nets.training.models import MLP
    return MLP(6, (5,), 3, activation="tanh", seed=seed).double()


def test_monitor_full_batch_sharpness_is_lambda_and_batch_size_is_bounded():
    """B = N: the only batch is the data, so the measured batch sharpness is λ₁ itself
    (std and stderr 0) without drawing batches; B > N is refused."""
    from nets.learning_rates.monitor import CurvatureMonitor

    X, y = _mon_data()
    mon = CurvatureMonitor(_mon_model(), CE, (X, y), batch_size=40, n_batches=3, lr=0.1)
    r = mon.record(0)
    assert (r.batch_sharpness, r.batch_sharpness_std, r.batch_sharpness_stderr) == \
        (r.lam, 0.0, 0.0)
    with pytest.raises(ValueError, match="batch_size must be <= N = 40"):
        CurvatureMonitor(_mon_model(), CE, (X, y), batch_size=41, batch_sizes=(2, 40))


def test_monitor_lr_zero_has_no_edge_plateau_or_transfer():
    """An lr of 0 (a warm-up's first step) is recorded; edge, plateau and the transfer
    column are NaN, the max_lr table is still 2/λ'(B')."""
    from nets.learning_rates.monitor import CurvatureMonitor

    X, y = _mon_data(seed=1)
    N = X.shape[0]
    mon = CurvatureMonitor(_mon_model(1), CE, (X, y), batch_size=8, n_batches=0,
                           batch_sizes=(2, 8, 40))
    r = mon.record(0, lr=0.0)
    assert r.lr == 0.0
    assert math.isnan(r.edge) and math.isnan(r.plateau)
    assert all(math.isnan(t) for t in r.transfer_lr)
    lp = lambda b: r.lam + (1.0 / b - 1.0 / N) * r.s2 / r.lam  # noqa: E731
    np.testing.assert_allclose(r.max_lr, [2.0 / lp(b) for b in (2, 8, 40)], rtol=1e-12)


# ---------------------------------------------------------------- directional noise
def test_directional_noise_first_stage_and_cost_accounting(tiny_mlp):
    """The sampled estimate starts at ⌈min_samples/m⌉ groups (at least min_samples
    samples); full_products counts the shift and the group products over the G·m used
    samples: (G·m/N)·(1 + n_used/G) for one direction. The seed is recorded only where
    the result depends on it."""
    from nets.curvature.operators import hessian_operator
    from nets.noise.directional import directional_noise_from_operator

    model, X, y = tiny_mlp(seed=2, N=30)
    op = hessian_operator(model, CE, (X, y))
    u = torch.randn(op.P, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r = directional_noise_from_operator(op, u, micro_batch=4, min_samples=9, rel_error=1e9,
                                        seed=5)
    G = 30 // 4
    assert r.n_groups == G and r.n_used == 3, "first stage: ceil(9 / 4) = 3 groups"
    assert r.full_products == pytest.approx(G * 4 / 30 * (1 + 3 / G), rel=1e-12)
    assert r.seed == 5
    e = directional_noise_from_operator(op, u, exact=True, seed=5)
    assert e.exact and e.seed is None, "the exhaustive per-sample value does not use the seed"
    assert e.full_products == pytest.approx(2.0, rel=1e-12)


# ---------------------------------------------------------------- gradient noise
def test_gradient_noise_stderr_is_nonnegative_where_curvature_along_the_mean_is_negative():
    """B_noise_stderr = tr_HSigma_stderr/|ḡᵀHḡ|: a standard error, ≥ 0 also where ḡᵀHḡ < 0
    (a concave loss: here minus a least-squares loss, H = −2XᵀX/N)."""
    from nets.noise.gradient_noise import gradient_noise

    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 3, dtype=torch.float64, generator=g)
    y = torch.randn(20, 1, dtype=torch.float64, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    loss = lambda out, t: -((out - t) ** 2).mean()  # noqa: E731
    gn = gradient_noise(model, loss, (X, y), hessian_samples=5, seed=1)
    assert gn.gHg < 0
    assert gn.tr_HSigma_stderr > 0
    assert gn.B_noise_stderr == pytest.approx(gn.tr_HSigma_stderr / abs(gn.gHg), rel=1e-12)


# ---------------------------------------------------------------- batch spectra
def test_clipped_isotropic_form_takes_a_tiny_negative_noise_estimate_as_zero():
    """s2 may round to a tiny negative (zero noise): the clipped form reads it as 0
    (λ'(B) = λ, finite), and a negative standard error is refused."""
    from nets.noise.batch_spectra import isotropic_form

    out = isotropic_form(2.0, -1e-12, [2, 5, 10], 10, clip=True)
    np.testing.assert_allclose(out.values, 2.0, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="s2_stderr"):
        isotropic_form(2.0, 1.0, [2], 10, s2_stderr=-0.1)


def test_measured_batch_sharpness_stderr_is_std_over_root_n(tiny_mlp):
    """stderr = std (ddof 1) / √n_batches, per batch size."""
    from nets.noise.batch_spectra import measure_batch_top_eigenvalue

    model, X, y = tiny_mlp(seed=1, N=20)
    res = measure_batch_top_eigenvalue(model, CE, (X, y), [4, 8], n_batches=3, seed=2)
    assert np.all(res.std > 0)
    np.testing.assert_allclose(res.stderr, res.std / np.sqrt(3), rtol=1e-14)
