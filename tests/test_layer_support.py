"""Networks beyond MLPs and CNNs: attention, recurrent layers, random forwards, dict
outputs, optimizers the monitor reads. Oracles are dense float64 matrices built with
torch.func from the model alone, or the same model written so that torch's vmap works."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dense_oracles import flat_state
from torch import nn

import nets
from nets.curvature.operators import hessian_operator
from nets.utils.vmapping import vmap_or_loop


def _flat_loss(model, loss_fn, X, y):
    flat, state = flat_state(model)
    return (lambda w: loss_fn(torch.func.functional_call(model, state(w), (X,)), y)), flat


def _fd_hessian(loss, flat, h=1e-5):
    """Dense Hessian from central differences of the gradient, column by column
    (error O(h²) ≈ 1e-10 here), symmetrised. Used for attention layers: a dense
    torch.func.hessian / jacrev(jacrev) of this flat-vector loss came out asymmetric
    (0.04) on nn.TransformerEncoderLayer, while the operator matches these differences
    to 5e-10."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.func.grad(loss)
    eye = torch.eye(flat.numel(), dtype=flat.dtype)
    with sdpa_kernel(SDPBackend.MATH):
        cols = [(g(flat + h * e) - g(flat - h * e)) / (2 * h) for e in eye]
    H = torch.stack(cols, dim=1)
    return 0.5 * (H + H.T)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.t(x).mean(1))


def _attention_problem(seed, N):
    """A float64 `_Attention` in eval mode, N sequences (3 × 4) with 3 classes, and its
    finite-difference dense Hessian H; returns (model, X, y, H, generator)."""
    torch.manual_seed(seed)
    model = _Attention().double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(N, 3, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    loss, flat = _flat_loss(model, F.cross_entropy, X, y)
    return model, X, y, _fd_hessian(loss, flat), g


def test_attention_layers_get_twice_differentiable_kernels():
    """nn.TransformerEncoderLayer (scaled_dot_product_attention, eval fast path): the
    Hessian's top eigenvalue equals the dense one; the GGN runs; flags are restored."""
    model, X, y, H, _ = _attention_problem(0, 24)
    top = float(torch.linalg.eigvalsh(H)[-1])
    fast = torch.backends.mha.get_fastpath_enabled()
    got = nets.top_eigenvalues(model, F.cross_entropy, (X, y), k=1, tol=1e-10)
    assert got[0] == pytest.approx(top, rel=1e-7)
    ggn = nets.top_eigenvalues(model, F.cross_entropy, (X, y), kind="ggn")
    assert np.isfinite(ggn).all() and ggn[0] > 0
    assert torch.backends.mha.get_fastpath_enabled() == fast


class _Recurrent(nn.Module):
    def __init__(self, cell, explicit_h0=False):
        super().__init__()
        self.r = cell(3, 5, batch_first=True)
        self.fc = nn.Linear(5, 3)
        self.explicit_h0 = explicit_h0

    def forward(self, x):
        if self.explicit_h0:           # a state vmap can batch: the same function
            o, _ = self.r(x, x.new_zeros(1, x.shape[0], 5))
        else:
            o, _ = self.r(x)
        return self.fc(o[:, -1])


@pytest.mark.parametrize("cell", [nn.GRU, nn.RNN])
def test_recurrent_layers_per_sample_passes_fall_back_to_a_loop(cell):
    """torch's GRU/RNN build their zero state with the un-vmapped batch size and fail
    under vmap; the per-sample passes then loop, with the same numbers as a model whose
    state vmap can batch."""
    torch.manual_seed(0)
    a = _Recurrent(cell).double()
    b = _Recurrent(cell, explicit_h0=True).double()
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(2)
    X = torch.randn(40, 4, 3, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    pa = nets.predict_batch_top_eigenvalue(a, F.cross_entropy, (X, y), [4, 16], seed=0)
    pb = nets.predict_batch_top_eigenvalue(b, F.cross_entropy, (X, y), [4, 16], seed=0)
    np.testing.assert_allclose(pa["directional"], pb["directional"], rtol=1e-9)
    opt = nets.CurvatureAdaptiveSGD(a, F.cross_entropy, (X, y), batch_size=8,
                                    curvature_batch_size=16, lanczos_steps=6)
    assert opt._side_by_side_fails and opt.lr > 0


def test_vmap_or_loop_matches_a_loop_and_keeps_real_errors():
    def not_vmappable(x):
        return x * float(x.sum().item())         # .item() is refused under vmap
    X = torch.arange(12.0).reshape(4, 3)
    f = vmap_or_loop(not_vmappable)
    out = f(X)
    assert f.looped
    np.testing.assert_allclose(out.numpy(), np.stack([not_vmappable(x).numpy() for x in X]))
    with pytest.raises(RuntimeError, match="boom"):
        vmap_or_loop(lambda x: (_ for _ in ()).throw(RuntimeError("boom")))(X)
    g = vmap_or_loop(lambda x, w: x @ w, in_dims=(0, None))
    np.testing.assert_allclose(g(X, torch.ones(3)).numpy(), X.sum(1).numpy())
    assert not g.looped


def test_random_forward_is_refused_and_the_rng_is_untouched():
    class FunctionalDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(F.dropout(torch.tanh(self.a(x)), 0.5, self.training))

    torch.manual_seed(0)
    model = FunctionalDropout().train()
    X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match="forward is not repeatable"):
        nets.top_eigenvalues(model, F.cross_entropy, (X, y))
    assert torch.equal(torch.random.get_rng_state(), state)
    ev = nets.top_eigenvalues(model, F.cross_entropy, (X, y), policy="eval")
    model.eval()
    assert ev[0] == pytest.approx(nets.top_eigenvalues(model, F.cross_entropy, (X, y))[0],
                                  rel=1e-6)


def test_instance_norm_with_running_stats_in_train_mode_needs_a_policy():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, track_running_stats=True),
                          nn.Flatten(), nn.Linear(32, 3)).train()
    X, y = torch.randn(10, 1, 6, 6), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="InstanceNorm2d.*train mode"):
        nets.top_eigenvalues(model, F.cross_entropy, (X, y))
    assert np.isfinite(nets.top_eigenvalues(model, F.cross_entropy, (X, y), policy="eval")).all()


def test_ggn_without_forward_mode_uses_the_double_vjp(tiny_mlp):
    """The reverse-mode Jv (used when a layer lacks forward AD) equals the jvp path."""
    model, X, y = tiny_mlp(seed=4, N=16)
    op1 = nets.ggn_operator(model, F.cross_entropy, (X, y))
    op2 = nets.ggn_operator(model, F.cross_entropy, (X, y))
    op2._no_forward_ad = True
    V = torch.randn(op1.P, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(op2.matmat(V).numpy(), op1.matmat(V).numpy(), rtol=1e-10,
                               atol=1e-13)


def test_dict_and_sequence_outputs_set_the_subspace_size():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 4)

        def forward(self, x):
            return {"logits": self.a(x)}

    torch.manual_seed(0)
    X, y = torch.randn(48, 5), torch.randint(0, 4, (48,))

    def loss(o, t):
        return F.cross_entropy(o["logits"], t)
    r = nets.predict_batch_top_eigenvalue(DictOut(), loss, (X, y), [8, 16], form="subspace")
    assert np.isfinite(r["subspace"]).all()
    from nets.noise.subspace_noise import default_subspace_dim
    seq = nn.Sequential(nn.Linear(5, 7))                       # (1, T, 7) per-token output
    assert default_subspace_dim(seq, (torch.randn(4, 6, 5), torch.zeros(4)), 1000) == 7


class _Dense(nn.Module):
    """Per-position logits over 5 classes on a length-3 signal, channels first (N, C, L) as
    F.cross_entropy takes them, or channels last (N, L, C) with the loss permuting."""

    def __init__(self, last):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.last = nn.Conv1d(2, 5, 3, padding=1).double(), last

    def forward(self, x):
        o = self.conv(x)
        return o.transpose(1, 2) if self.last else o


def test_subspace_dim_is_the_number_of_classes_in_either_layout():
    """The k rule read the outputs' last dimension, so dense logits (N, C, L) got k = L
    (an outside sweep: at L = 1, k = 1 and the subspace form 21 % low against a Monte-Carlo
    oracle, 1.057 for 1.344). k is now the dimension the integer class targets lack, in
    either layout, and the two layouts give the same predictions; regression targets keep
    the last dimension."""
    from nets.noise.subspace_noise import default_subspace_dim

    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 2, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (40, 3), generator=g)
    first, last = _Dense(False), _Dense(True)
    ce_first = F.cross_entropy
    ce_last = (lambda o, t: F.cross_entropy(o.transpose(1, 2), t))
    assert default_subspace_dim(first, (X, y), 1000) == 5
    assert default_subspace_dim(last, (X, y), 1000) == 5
    assert default_subspace_dim(first, (X, y), 4) == 4                     # capped at P
    assert default_subspace_dim(first, (X, torch.randn(40, 5, 3, dtype=torch.float64)),
                                1000) == 3                                 # regression: last
    a = nets.predict_batch_top_eigenvalue(first, ce_first, (X, y), [4, 16], form="subspace")
    b = nets.predict_batch_top_eigenvalue(last, ce_last, (X, y), [4, 16], form="subspace")
    np.testing.assert_allclose(a["subspace"], b["subspace"], rtol=1e-9)


def test_subspace_dim_counts_only_the_outputs_the_loss_reads():
    """A model returning (logits, features) with the loss on the logits got k = classes +
    feature width (22 for 10 + 12; an outside trial: the subspace and resolved forms moved
    1–3 % with an output the loss never reads). k is now the logits' own, by the class rule,
    and the predictions are the plain model's."""
    from nets.noise.subspace_noise import default_subspace_dim

    torch.manual_seed(0)
    a, b = nn.Linear(6, 12).double(), nn.Linear(12, 4).double()

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = a, b

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    class WithFeatures(Plain):
        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h), {"features": h}

    g = torch.Generator().manual_seed(2)
    X = torch.randn(60, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (60,), generator=g)

    def on_logits(o, t):
        return F.cross_entropy(o[0], t)

    def on_both(o, t):
        return F.cross_entropy(o[0], t) + 0.1 * o[1]["features"].pow(2).mean()
    assert default_subspace_dim(WithFeatures(), (X, y), 1000, on_logits) == 4
    assert default_subspace_dim(WithFeatures(), (X, y), 1000, on_both) == 4 + 12
    assert default_subspace_dim(WithFeatures(), (X, y), 1000) == 4 + 12     # no loss: all
    p = nets.predict_batch_top_eigenvalue(Plain(), F.cross_entropy, (X, y), [4, 16],
                                          form=["subspace", "resolved"])
    w = nets.predict_batch_top_eigenvalue(WithFeatures(), on_logits, (X, y), [4, 16],
                                          form=["subspace", "resolved"])
    assert p["subspace_k"] == w["subspace_k"] == 4
    np.testing.assert_allclose(w["subspace"], p["subspace"], rtol=1e-9)
    np.testing.assert_allclose(w["resolved"], p["resolved"], rtol=1e-9)


def test_monitor_reads_nesterov_and_refuses_sgd_limits_for_adam():
    from rmt.lr import momentum_effective_curvature

    torch.manual_seed(0)
    X, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    rho = 0.9
    for opt, factor in ((torch.optim.SGD(model.parameters(), lr=0.05, momentum=rho,
                                         nesterov=True), 2 * (1 + rho) / (1 + 2 * rho)),
                        (torch.optim.SGD(model.parameters(), lr=0.05, momentum=rho,
                                         dampening=0.5), 2 * (1 + rho) / 0.5),
                        (torch.optim.Adam(model.parameters(), lr=1e-3), float("nan"))):
        mon = nets.CurvatureMonitor(model, F.cross_entropy, (X, y), batch_size=16,
                                    batch_sizes=[16, 64], n_batches=0, budget=1.0)
        if np.isnan(factor):
            with pytest.warns(UserWarning, match="attached to Adam, whose stability limit"):
                hook = mon.attach(opt)
        else:
            hook = mon.attach(opt)
        opt.zero_grad()
        F.cross_entropy(model(X[:16]), y[:16]).backward()
        opt.step()
        hook.remove()
        rec = mon.records[-1]
        if np.isnan(factor):
            assert np.isnan(rec.max_lr).all() and np.isnan(rec.plateau)
            assert np.isnan(rec.transfer_lr).all() and np.isnan(rec.edge)
        else:
            # the mean-square limit of predict_max_lr: F/λ'_ρ(B'), exactly F/λ₁ at B' = N
            nest = bool(opt.param_groups[0]["nesterov"])
            eff = momentum_effective_curvature(rec.lam, rec.lam_prime, rho, nesterov=nest)
            assert rec.max_lr[0] == pytest.approx(factor / eff, rel=1e-12)
            assert rec.max_lr[1] * rec.lam == pytest.approx(factor, rel=1e-12)
            assert rec.edge == pytest.approx(factor / 0.05, rel=1e-12)
            assert rec.max_lr[0] < factor / rec.lam_prime       # below the deterministic one


def test_learner_overhead_fraction_counts_the_constructor():
    torch.manual_seed(0)
    X, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = nets.CurvatureAdaptiveSGD(model, F.cross_entropy, (X, y), batch_size=16,
                                    curvature_batch_size=32)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(X[:16]), y[:16]).backward()
        opt.step()
    assert 0 < opt.overhead_fraction() <= 1


def test_transfer_lr_names_the_reference_and_refuses_bools():
    torch.manual_seed(0)
    X, y = torch.randn(48, 5), torch.randint(0, 3, (48,))
    model = nn.Sequential(nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"reference\[0\]"):
        nets.transfer_lr(model, F.cross_entropy, (X, y), [8, 16], reference=(64, 0.1))
    with pytest.raises(TypeError, match="batch_sizes"):
        nets.transfer_lr(model, F.cross_entropy, (X, y), [True, 16], reference=(16, 0.1))


def test_hessian_operator_on_attention_matches_dense_products():
    model, X, y, H, g = _attention_problem(3, 10)
    op = hessian_operator(model, F.cross_entropy, (X, y))
    V = torch.randn(op.P, 2, dtype=torch.float64, generator=g)
    np.testing.assert_allclose(op.matmat(V).numpy(), (H @ V).numpy(), rtol=1e-7, atol=1e-8)


def test_adam_preconditioner_instance_sets_beta1():
    torch.manual_seed(0)
    X, y = torch.randn(48, 5), torch.randint(0, 3, (48,))
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.99))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    ps = nets.preconditioned_batch_sharpness(model, F.cross_entropy, (X, y), [8],
                                             preconditioner=opt, n_batches=2)
    assert ps.beta1 == 0.5
    assert ps.lr[0] * ps.mean[0] == pytest.approx(2 * 1.5 / 0.5, rel=1e-12)
    pa = nets.predict_adam_max_lr(model, F.cross_entropy, (X, y), [8], preconditioner=opt)
    assert pa.beta1 == 0.5
    with pytest.raises(ValueError, match="betas"):
        nets.preconditioned_batch_sharpness(model, F.cross_entropy, (X, y), [8],
                                            preconditioner=opt, beta1=0.9)


def test_training_thresholds_accept_train_mode_models_and_a_dtype():
    """The trials train an eval-mode copy, so the curvature step does too; dtype= casts
    that copy with the data."""
    torch.manual_seed(0)
    X, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 3))
    from nets.lr_search import self_stabilisation, training_threshold  # import by name
    r = training_threshold(model, F.cross_entropy, (X, y), [16], steps=10, seeds=(0,))
    assert np.isfinite(r.lr).all() and r.lr[0] > 0
    s = self_stabilisation(model, F.cross_entropy, (X, y), batch_size=16, steps=5)
    assert s.lam_before > 0
    r64 = training_threshold(model.eval(), F.cross_entropy, (X, y), [16], steps=10, seeds=(0,),
                             dtype=torch.float64)
    assert np.isfinite(r64.lr).all()
    assert next(model.parameters()).dtype == torch.float32        # the caller's model


def test_weight_norm_hessians_warn():
    from torch.nn.utils.parametrizations import weight_norm
    model = nn.Sequential(weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    with pytest.warns(UserWarning, match="weight_norm") as record:
        op = nets.hessian_operator(model, F.cross_entropy, (X, y))
    assert sum("weight_norm" in str(w.message) for w in record) == 1    # warned once
    assert op.P == sum(p.numel() for p in model.parameters())          # and still built


def test_sharpness_gap_names_a_layer_without_forward_mode():
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    u = torch.randn(sum(p.numel() for p in model.parameters()))
    with pytest.raises(ValueError, match="forward-mode derivative"):
        nets.sharpness_gap_terms(model, F.cross_entropy, (X, y), u)


def test_data_and_wrapper_mistakes_get_messages_that_say_what_to_do():
    from torch.utils.data import Dataset
    torch.manual_seed(0)
    X, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    ref = nets.top_eigenvalues(model, F.cross_entropy, (X, y))
    np.testing.assert_allclose(nets.top_eigenvalues(model, F.cross_entropy, (X, y.tolist())), ref)
    with pytest.raises(TypeError, match="exactly two tensors"):
        nets.top_eigenvalues(model, F.cross_entropy, (X, y, y))

    class Dicts(Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return {"x": X[i], "y": int(y[i])}
    with pytest.raises(TypeError, match=r"keys \['x', 'y'\]"):
        nets.top_eigenvalues(model, F.cross_entropy, Dicts())
    with pytest.raises(TypeError, match="model.module"):
        nets.top_eigenvalues(nn.DataParallel(model), F.cross_entropy, (X, y))
    one = nets.top_eigenvalues(model, lambda o, t: F.cross_entropy(o, t).reshape(1), (X, y))
    np.testing.assert_allclose(one, ref, rtol=1e-6)
    ae = nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 6))
    samples = [(X[i], X[i].clone()) for i in range(32)]      # per-sample pairs in a list
    with pytest.raises(ValueError, match="rows of X"):
        nets.CurvatureAdaptiveSGD(ae, F.mse_loss, samples, batch_size=8,
                                  curvature_batch_size=32)
    with pytest.warns(UserWarning, match="summed"):
        nets.CurvatureAdaptiveSGD(ae, nn.MSELoss(reduction="sum"), (X, X.clone()),
                                  batch_size=8, curvature_batch_size=32)


class _FloatAttention(nn.Module):
    """nn.MultiheadAttention in float32: where torch picks its fused CPU attention kernel,
    which has no forward-mode derivative."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(4, 8)
        self.att = nn.MultiheadAttention(8, 1, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x)
        return self.fc((h + self.att(h, h, h, need_weights=False)[0]).mean(1))


def test_forward_mode_models_of_the_network_run_through_fused_attention():
    """The linearised network's Jacobian products, the loss profile along u and the curved
    model go through forward-mode AD; on a float32 nn.MultiheadAttention they used to stop
    at torch's fused kernel (NotImplementedError). J·V against central differences of the
    float64 copy's outputs (math kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nets.learning_rates.along_top import loss_along_top
    from nets.learning_rates.linearized import output_jacobians

    torch.manual_seed(0)
    model = _FloatAttention().eval()
    g = torch.Generator().manual_seed(1)
    X = torch.rand(48, 5, 4, generator=g)
    y = torch.randint(0, 3, (48,), generator=g)
    P = sum(p.numel() for p in model.parameters())
    V = torch.randn(P, 2, generator=g, dtype=torch.float64)
    JV, z = output_jacobians(model, X, basis=V.float())
    ref = _FloatAttention().double().eval()
    ref.load_state_dict(model.state_dict())
    flat, state = flat_state(ref)
    h = 1e-6
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        for j in range(2):
            plus = torch.func.functional_call(ref, state(flat + h * V[:, j]), (X.double(),))
            minus = torch.func.functional_call(ref, state(flat - h * V[:, j]), (X.double(),))
            fd = ((plus - minus) / (2 * h)).reshape(48, -1)
            np.testing.assert_allclose(JV[:, :, j].double().numpy(), fd.numpy(), rtol=1e-3,
                                       atol=1e-4 * float(fd.abs().max()))
    prof = loss_along_top(model, F.cross_entropy, (X, y), seed=0)
    assert np.isfinite(prof.secant_ratio)
    kw = dict(seeds=(0,), steps=10, rank=4, progress=False)
    flat_thr = nets.linearized_threshold(model, F.cross_entropy, (X, y), [8], **kw)
    bent_thr = nets.linearized_threshold(model, F.cross_entropy, (X, y), [8], curved=True, **kw)
    assert np.isfinite(flat_thr.lr).all() and np.isfinite(bent_thr.lr).all()


def test_twice_differentiable_nests_and_restores_once():
    """Entered inside itself the context changes nothing; the outer exit restores the
    attention fast-path flag (the inner exit does not)."""
    from nets.curvature.params import twice_differentiable

    fast = torch.backends.mha.get_fastpath_enabled()
    with twice_differentiable():
        assert not torch.backends.mha.get_fastpath_enabled()
        with twice_differentiable():
            assert not torch.backends.mha.get_fastpath_enabled()
        assert not torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.mha.get_fastpath_enabled() == fast


def test_a_submodule_used_twice_is_left_as_it_was(dense_hessian):
    """nn.ModuleList([l, l]) (weight sharing by reuse): every product leaves the user's
    Parameters in both places (torch's functional_call put plain tensors back into the
    second occurrence; after a Gauss–Newton product the shared layer then had no
    requires_grad and later operators dropped it: P 42 → 12) and the numbers stay the dense
    oracle's."""
    import torch.nn as nn

    import nets

    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            lin = nn.Linear(5, 5)
            self.layers, self.out = nn.ModuleList([lin, lin]), nn.Linear(5, 2)

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return self.out(x)

    torch.manual_seed(7)
    X, y = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    model = Reused().double()
    loss = nn.MSELoss()
    import copy

    # the oracle on a copy: torch's functional_call, which it uses, corrupts such a model
    want = torch.linalg.eigvalsh(dense_hessian(copy.deepcopy(model), loss, X, y)).flip(0)[:2]
    before = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)]
    for kind in ("hessian", "ggn", "hessian"):
        nets.top_eigenvalues(model, loss, (X, y), k=2, kind=kind)
        after = list(model.named_parameters(remove_duplicate=False))
        assert [n for n, _ in after] == [n for n, _ in before]
        assert all(a is b and isinstance(a, nn.Parameter) and a.requires_grad
                   for (_, a), (_, b) in zip(after, before)), kind
    op = nets.hessian_operator(model, loss, (X, y))
    assert op.P == 42
    np.testing.assert_allclose(nets.top_eigenvalues(model, loss, (X, y), k=2), want.numpy(),
                               rtol=1e-8)


def test_entry_points_leave_a_max_norm_embedding_as_it_was():
    """nn.Embedding(max_norm=...) renormalises the rows it looks up in place: the loss
    check's and the subspace form's forwards on the caller's own module rewrote the
    caller's weights (max |ΔW| 3.4 from building a Hessian operator; an outside sweep).
    Every entry point now leaves the module's parameters and buffers bit for bit."""
    from nets.curvature.loss_check import check_mean_reduced
    from nets.noise.subspace_noise import subspace_noise

    torch.manual_seed(0)
    X, y = torch.randint(0, 20, (48, 5)), torch.randint(0, 4, (48,))

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 6, max_norm=0.5)
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.emb(x).mean(1)))

    model = Bag().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert (before["emb.weight"].norm(dim=1) > 0.5).any()      # rows a forward would rescale
    nets.hessian_operator(model, F.cross_entropy, (X, y))
    check_mean_reduced(model, F.cross_entropy, (X, y))
    subspace_noise(model, F.cross_entropy, (X, y), seed=0, progress=False)      # default k
    nets.predict_max_lr(model, F.cross_entropy, (X, y), [4, 16], progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_tied_parameter_is_selected_by_any_of_its_names():
    """`dec.weight = emb.weight` registers one tensor under two names; named_parameters()
    lists the first only, so params=["dec.weight"] was refused as 'not in the model' and
    a predicate on "dec." silently dropped the tied weight (P = 30 of 270)."""
    from nets.curvature.params import select_parameter_names

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 8)
            self.dec = nn.Linear(8, 30)
            self.dec.weight = self.emb.weight

        def forward(self, x):
            return self.dec(torch.tanh(self.emb(x).mean(1)))

    torch.manual_seed(0)
    model = TiedLM().double()
    X, y = torch.randint(0, 30, (24, 4)), torch.randint(0, 30, (24,))
    assert select_parameter_names(model, ["dec.weight"]) == ["emb.weight"]
    assert select_parameter_names(model, "dec.weight") == ["emb.weight"]
    assert select_parameter_names(model, lambda n, p: n.startswith("dec.")) == \
        ["emb.weight", "dec.bias"]
    with pytest.raises(ValueError, match="'dec.weight' is tied to 'emb.weight'"):
        select_parameter_names(model, ["emb.weight", "dec.weight"])
    with pytest.raises(ValueError, match="not in the model"):
        select_parameter_names(model, ["enc.weight"])
    # the operator on the tied weight: its dense float64 Hessian from double backward
    op = hessian_operator(model, F.cross_entropy, (X, y), params=["dec.weight"])
    w = model.emb.weight
    g = torch.autograd.grad(F.cross_entropy(model(X), y), w, create_graph=True)[0].reshape(-1)
    H = torch.stack([torch.autograd.grad(g[i], w, retain_graph=True)[0].reshape(-1)
                     for i in range(g.numel())])
    np.testing.assert_allclose(op.to_dense().numpy(), H.detach().numpy(), rtol=1e-9, atol=1e-12)


def test_a_forward_that_casts_between_dtypes_is_named():
    """A model with a float64 and a float32 layer (the forward casting between them) was
    told 'pass dtype=', and with dtype= that the data layout was wrong ('Samples are the
    rows of X'): both messages now name the casts."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(10, 16).double()
            self.b = nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x.double())).float())

    X, y = torch.randn(12, 10, dtype=torch.float64), torch.randint(0, 4, (12,))
    with pytest.raises(ValueError, match="mixed dtypes.*casts between dtypes"):
        hessian_operator(Mixed(), F.cross_entropy, (X, y))
    with pytest.raises(TypeError, match="casts between dtypes itself.*one dtype"):
        hessian_operator(Mixed(), F.cross_entropy, (X, y), dtype=torch.float64)


class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(6, 16), nn.Linear(16, 3)


class _WeightCache(_Base):
    """Caches its output weight on the first call (read 0.42 for 0.71, silently)."""

    def __init__(self):
        super().__init__()
        self._w = None

    def forward(self, x):
        if self._w is None:
            self._w = self.l2.weight * 1.0
        return F.linear(torch.tanh(self.l1(x)), self._w, self.l2.bias)


class _ClassCache(_Base):
    """Caches its output weight where the instance's attributes do not reach: a class
    attribute."""

    table: dict = {}

    def forward(self, x):
        w = self.table.setdefault("w", self.l2.weight * 1.0)
        return F.linear(torch.tanh(self.l1(x)), w, self.l2.bias)


class _ShapeCache(_Base):
    """Caches a constant table keyed by the input width: harmless."""

    def __init__(self):
        super().__init__()
        self._table = None

    def forward(self, x):
        if self._table is None:
            self._table = torch.ones(x.shape[1], dtype=x.dtype)
        return self.l2(torch.tanh(self.l1(x * self._table)))


class _Counter(_Base):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.l2(torch.tanh(self.l1(x)))


class _Checkpointed(_Base):
    reentrant = False

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        h = checkpoint(lambda t: torch.tanh(self.l1(t)), x, use_reentrant=self.reentrant)
        return self.l2(h)


class _Reentrant(_Checkpointed):
    reentrant = True


def test_models_torch_func_cannot_run_are_refused_with_their_cause():
    """From a sweep of wrapped and modified models: a forward caching a weight-derived
    tensor gave a silently wrong curvature (fresh) or torch's 'Can't call numpy()' (after a
    user call); a step counter buffer, activation checkpointing and TorchScript failed
    with torch.func's own messages or blamed the data layout."""
    import warnings

    X = torch.randn(20, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    data = (X, y)
    fresh = _WeightCache().double()     # each forward of the package fills and clears it
    a = nets.top_eigenvalues(fresh, F.cross_entropy, data, 1, seed=0, tol=1e-10)
    assert fresh._w is None                             # no call left a cache
    plain = _Base().double()
    plain.forward = lambda x: plain.l2(torch.tanh(plain.l1(x)))
    np.testing.assert_allclose(a, nets.top_eigenvalues(plain, F.cross_entropy, data, 1, seed=0,
                                                       tol=1e-10), rtol=1e-9)
    _ClassCache.table.clear()
    with pytest.raises(ValueError, match=r"stores tensor\(s\) computed from the parameters"):
        hessian_operator(_ClassCache().double(), F.cross_entropy, data)
    _ClassCache.table.clear()
    primed = _WeightCache().double()
    primed(X)
    with pytest.raises(ValueError, match="earlier forward"):
        hessian_operator(primed, F.cross_entropy, data)
    for cls, says in ((_Counter, "in place"), (_Checkpointed, "checkpointing"),
                      (_Reentrant, "checkpointing")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")             # checkpoint's own requires_grad note
            with pytest.raises(ValueError, match=says):
                hessian_operator(cls().double().eval(), F.cross_entropy, data)
    scripted = torch.jit.script(nn.Sequential(nn.Linear(6, 3)).double())
    assert scripted(X).shape == (20, 3)                 # it runs; the package cannot use it
    with pytest.raises(TypeError, match="is a TorchScript module"):
        hessian_operator(scripted, F.cross_entropy, data)
    ok = _ShapeCache().double()
    plain = _Base().double()
    plain.forward = lambda x: plain.l2(torch.tanh(plain.l1(x)))
    a = nets.top_eigenvalues(ok, F.cross_entropy, data, 1, seed=0)
    b = nets.top_eigenvalues(plain, F.cross_entropy, data, 1, seed=0)
    np.testing.assert_allclose(a, b, rtol=1e-10)


class _Logged(_Base):
    """Keeps its hidden activation for logging: written by every forward, never read."""

    def __init__(self):
        super().__init__()
        self.feat = None

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        self.feat = h
        return self.l2(h)


def test_forwards_that_write_attributes_without_reading_them_back_are_accepted():
    """Were refused as weight caches ("stores tensor(s) computed from the parameters" /
    "an earlier forward"): an activation kept for logging, and the hook-based
    torch.nn.utils.spectral_norm, which recomputes `weight` from `weight_orig` before each
    forward; with the check bypassed their curvature equalled the oracle's. Entry points
    that train a copy then failed in deepcopy on the grad-carrying attribute, and the
    package's tensors (escaped from vmap) were left on the caller's modules."""
    import warnings

    from nets.learning_rates.lr_search import training_threshold

    X = torch.randn(20, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    logged = _Logged().double()
    F.cross_entropy(logged(X), y).backward()          # a user's step: feat carries a graph
    kept = logged.feat
    plain = _Base().double()                          # the same weights, nothing kept
    plain.forward = lambda x: plain.l2(torch.tanh(plain.l1(x)))
    loss, flat = _flat_loss(plain, F.cross_entropy, X, y)
    lam = float(torch.linalg.eigvalsh(torch.func.hessian(loss)(flat))[-1])
    assert nets.top_eigenvalues(logged, F.cross_entropy, (X, y), 1, seed=0, tol=1e-10)[0] == \
        pytest.approx(lam, rel=1e-9)
    assert np.isfinite(nets.predict_max_lr(logged, F.cross_entropy, (X, y), [4, 16])).all()
    assert np.isfinite(training_threshold(logged, F.cross_entropy, (X, y), [8], steps=8,
                                          seeds=(0,)).lr).all()
    assert logged.feat is kept                        # the caller's attribute, untouched

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sn = nn.Sequential(nn.utils.spectral_norm(nn.Linear(6, 5)), nn.Tanh(),
                           nn.Linear(5, 3)).double()
    F.cross_entropy(sn(X), y).backward()              # train mode: one power iteration
    sn.eval()
    layer = sn[0]

    def sn_loss(w):                                   # W = W_orig / (uᵀ W_orig v), u, v fixed
        wo, b, w2, b2 = torch.split(w, [30, 5, 15, 3])
        W = wo.view(5, 6)
        W = W / torch.dot(layer.weight_u, W @ layer.weight_v)
        return F.cross_entropy(torch.tanh(X @ W.T + b) @ w2.view(3, 5).T + b2, y)

    names = [n for n, _ in sn.named_parameters()]
    assert names == ["0.bias", "0.weight_orig", "2.weight", "2.bias"]
    p = dict(sn.named_parameters())
    w0 = torch.cat([p[n].detach().reshape(-1) for n in
                    ("0.weight_orig", "0.bias", "2.weight", "2.bias")])
    lam_sn = float(torch.linalg.eigvalsh(torch.func.hessian(sn_loss)(w0))[-1])
    assert nets.top_eigenvalues(sn, F.cross_entropy, (X, y), 1, seed=0, tol=1e-10)[0] == \
        pytest.approx(lam_sn, rel=1e-9)
    assert np.isfinite(training_threshold(sn, F.cross_entropy, (X, y), [8], steps=8,
                                          seeds=(0,)).lr).all()


def test_a_train_mode_spectral_norm_is_named_as_not_repeatable():
    """Its power iteration changes the output by ~1e-5 from call to call, below the
    repeatability tolerance, and was blamed on statistics over the batch."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(1)
    X = torch.randn(20, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    model = nn.Sequential(spectral_norm(nn.Linear(5, 4)), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    with pytest.raises(ValueError, match="not repeatable"):
        nets.predict_max_lr(model, F.cross_entropy, (X, y), [4])


def test_the_hook_based_weight_norm_warns_too():
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    with pytest.warns(UserWarning, match="uses weight_norm.*g·v/‖v‖") as record:
        op = nets.hessian_operator(model, F.cross_entropy, (X, y))
    assert sum("uses weight_norm" in str(w.message) for w in record) == 1    # warned once
    assert op.P == sum(p.numel() for p in model.parameters())          # and still built


def test_param_layout_offsets_and_unflatten_follow_named_parameters():
    """offsets[i] = Σ_{j<i} numels[j]: each name's slice of the flat vector, by hand."""
    from nets.curvature.params import ParamLayout

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    lay = ParamLayout.from_module(model)
    assert lay.numels == (12, 4, 8, 2) and lay.offsets == (0, 12, 16, 24) and lay.P == 26
    vec = torch.arange(26, dtype=torch.float64)
    for (name, p), off, t in zip(model.named_parameters(), lay.offsets, lay.unflatten(vec)):
        assert t.shape == p.shape
        assert torch.equal(t.reshape(-1), vec[off:off + p.numel()]), name
