"""The linearised network's outputs (`nets.learning_rates.linear_outputs`).

Oracle: the per-sample Jacobians built densely, one `torch.func.jacrev` per sample
(tests/dense_oracles.py, float64; no code shared with the products checked), and the
three products written out with them: z_idx + J_idx·E, Σ J_iᵀ C_i, z + J·E. A network
with BatchNorm is checked in eval mode (its running statistics), as the class runs it.
The curved model's second derivative is checked against the dense Hessian of every
output (`torch.func.hessian`) and against the network itself along u (error O(x³)).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dense_oracles import flat_state
from dense_oracles import output_jacobians as dense_jacobians

from nets.learning_rates.linear_outputs import (
    CurvedOutputs,
    StoredOutputs,
    TangentOutputs,
    as_linear_outputs,
    second_derivative_along,
)
from nets.learning_rates.linearized import linearized_adam_max_loss, linearized_max_loss


def _conv_bn(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.BatchNorm2d(3),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(48, 4))
    net.double()
    with torch.no_grad():                  # non-trivial running statistics
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(seed + 1)
    return net.eval(), torch.randn(20, 1, 4, 4, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("which", ["mlp", "conv_bn"])
def test_products_match_dense_jacobians(which, tiny_mlp):
    if which == "mlp":
        model, X, _ = tiny_mlp(seed=3, N=25)
    else:
        model, X = _conv_bn()
    J = dense_jacobians(model, X)
    with torch.no_grad():
        z = model(X).reshape(len(X), -1)
    N, K, P = J.shape
    mode = model.training
    g = torch.Generator().manual_seed(7)
    E = torch.randn(P, 4, generator=g, dtype=torch.float64)
    idx = torch.tensor([3, 0, 17, 9])
    C = torch.randn(len(idx), K, 4, generator=g, dtype=torch.float64)
    expect_batch = z[idx][:, :, None] + torch.einsum("bkp,pg->bkg", J[idx], E)
    expect_pull = torch.einsum("bkp,bkg->pg", J[idx], C)
    expect_full = z[:, :, None] + torch.einsum("nkp,pg->nkg", J, E)
    for lin in (TangentOutputs(model, X, chunk_size=7), StoredOutputs(J, z)):
        assert (lin.N, lin.K, lin.D) == (N, K, P)
        torch.testing.assert_close(lin.z, z, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lin.batch(idx, E), expect_batch, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lin.pullback(idx, C), expect_pull, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lin.full(E), expect_full, rtol=1e-10, atol=1e-12)
    assert model.training is mode           # the module passed in is not modified


def test_runs_agree_with_stored_jacobians(tiny_mlp):
    from nets.learning_rates.adam import restored_adam, warm_adam_state
    from nets.learning_rates.linearized import flat_adam_state

    model, X, y = tiny_mlp(seed=4, N=40)
    J = dense_jacobians(model, X)
    with torch.no_grad():
        z = model(X)
    tangent = TangentOutputs(model, X)
    lrs = np.geomspace(0.05, 50.0, 9)
    a = linearized_max_loss(J, z, y, F.cross_entropy, 8, 0.5, lrs, 30, 2)
    b = linearized_max_loss(tangent, None, y, F.cross_entropy, 8, 0.5, lrs, 30, 2)
    np.testing.assert_allclose(b, a, rtol=1e-9)
    assert a[0] < 10 < a[-1]                 # the grid brackets a crossing
    warm = warm_adam_state(model, F.cross_entropy, X, y, 8, warmup_steps=10, warmup_lr=1e-2,
                           betas=(0.9, 0.999), eps=1e-8, seed=1)
    state = flat_adam_state(restored_adam(warm.model, warm, 1e-2))
    Jw = dense_jacobians(warm.model, X)
    with torch.no_grad():
        zw = warm.model(X)
    lrs = np.geomspace(1e-3, 10.0, 9)
    a = linearized_adam_max_loss(Jw, zw, y, F.cross_entropy, 8, lrs, 20, 5, state=state)
    b = linearized_adam_max_loss(TangentOutputs(warm.model, X), None, y, F.cross_entropy, 8,
                                 lrs, 20, 5, state=state)
    np.testing.assert_allclose(b, a, rtol=1e-9)


def test_as_linear_outputs_and_bad_input(tiny_mlp):
    model, X, _ = tiny_mlp()
    t = TangentOutputs(model, X)
    assert as_linear_outputs(t) is t
    J = torch.zeros(len(X), 3, 4)
    s = as_linear_outputs(J, torch.zeros(len(X), 3))
    assert isinstance(s, StoredOutputs) and s.D == 4
    with pytest.raises(ValueError, match="z must be None"):
        as_linear_outputs(t, torch.zeros(len(X), 3))
    with pytest.raises(ValueError, match="J must be"):
        StoredOutputs(J, torch.zeros(len(X), 2))
    with pytest.raises(TypeError, match="model"):
        TangentOutputs(lambda x: x, X)
    with pytest.raises(ValueError, match="chunk_size"):
        TangentOutputs(model, X, chunk_size=0)


def test_linear_model_outputs_choices(tiny_mlp):
    from nets.learning_rates.linearized import linear_model_outputs

    model, X, _ = tiny_mlp(seed=5, N=30)
    lin, choice = linear_model_outputs(model, X, jacobians="auto", max_bytes=100)
    assert choice == "tangent" and isinstance(lin, TangentOutputs)   # J does not fit
    lin, choice = linear_model_outputs(model, X)                     # fits: the faster one
    assert choice in ("tangent", "stored")
    assert isinstance(lin, TangentOutputs if choice == "tangent" else StoredOutputs)
    lin, choice = linear_model_outputs(model, X, jacobians="stored", dtype=torch.float64)
    assert choice == "stored" and lin.J.dtype == torch.float64
    torch.testing.assert_close(lin.J, dense_jacobians(model, X), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="max_bytes"):
        linear_model_outputs(model, X, jacobians="stored", max_bytes=100)
    with pytest.raises(ValueError, match="jacobians"):
        linear_model_outputs(model, X, jacobians="dense")


def _dense_second_derivative(model, X, u):
    """q_ik = uᵀ ∇²_w z_ik u, from the dense Hessian of every output (torch.func.hessian)."""
    flat, state = flat_state(model)
    out = []
    for i in range(len(X)):
        H = torch.func.hessian(lambda w, i=i: torch.func.functional_call(
            model, state(w), (X[i:i + 1],)).reshape(-1))(flat)          # (K, P, P)
        out.append(torch.einsum("p,kpq,q->k", u, H, u))
    return torch.stack(out)


@pytest.mark.parametrize("which", ["mlp", "conv_bn"])
def test_second_derivative_along_matches_dense_hessians(which, tiny_mlp):
    if which == "mlp":
        model, X, _ = tiny_mlp(seed=4, N=9)
    else:
        model, X = _conv_bn(seed=2)
        X = X[:9]
    P = sum(p.numel() for p in model.parameters())
    u = torch.randn(P, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u /= u.norm()
    q = second_derivative_along(model, X, u, chunk_size=4)
    expect = _dense_second_derivative(model, X, u)
    assert float(expect.abs().max()) > 1e-3                  # a non-trivial oracle
    torch.testing.assert_close(q, expect, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="P="):
        second_derivative_along(model, X, u[:-1])
    with pytest.raises(ValueError, match="chunk_size"):
        second_derivative_along(model, X, u, chunk_size=0)
    with pytest.raises(ValueError, match="step"):
        second_derivative_along(model, X, u, step=0.0)


def test_curved_outputs_are_the_second_order_model_along_u(tiny_mlp):
    """Along e = x·u the curved model is the network's Taylor expansion to second order
    (its error falls as x³); the pullback is the adjoint of the batch outputs' derivative
    at E (autograd through `batch`); a zero q is the linear model exactly."""
    model, X, _ = tiny_mlp(seed=6, N=12)
    flat, state = flat_state(model)
    J = dense_jacobians(model, X)
    with torch.no_grad():
        z = model(X).reshape(len(X), -1)
    P = J.shape[2]
    g = torch.Generator().manual_seed(11)
    u = torch.randn(P, generator=g, dtype=torch.float64)
    u /= u.norm()
    curved = CurvedOutputs(StoredOutputs(J, z), u, second_derivative_along(model, X, u))
    errors = []
    for x in (0.2, 0.1, 0.05):
        with torch.no_grad():
            real = torch.func.functional_call(model, state(flat + x * u), (X,)).reshape(len(X), -1)
        errors.append(float((curved.full((x * u)[:, None])[:, :, 0] - real).abs().max()))
    assert errors[0] / errors[1] == pytest.approx(8.0, rel=0.15)
    assert errors[1] / errors[2] == pytest.approx(8.0, rel=0.15)
    linear_error = float((StoredOutputs(J, z).full((0.05 * u)[:, None])[:, :, 0] - real).abs().max())
    assert errors[2] < 0.05 * linear_error
    idx = torch.tensor([4, 0, 9])
    E = torch.randn(P, 3, generator=g, dtype=torch.float64)
    C = torch.randn(len(idx), z.shape[1], 3, generator=g, dtype=torch.float64)
    Er = E.clone().requires_grad_(True)
    (curved.batch(idx, Er) * C).sum().backward()
    torch.testing.assert_close(curved.pullback(idx, C, E), Er.grad, rtol=1e-10, atol=1e-12)
    flat_model = CurvedOutputs(StoredOutputs(J, z), u, torch.zeros_like(z))
    for a, b in ((flat_model.full(E), StoredOutputs(J, z).full(E)),
                 (flat_model.pullback(idx, C, E), StoredOutputs(J, z).pullback(idx, C))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert as_linear_outputs(curved) is curved
    with pytest.raises(ValueError, match="entries"):
        CurvedOutputs(StoredOutputs(J, z), u[:-1], z)
    with pytest.raises(ValueError, match="shape"):
        CurvedOutputs(StoredOutputs(J, z), u, z[:-1])


def test_second_derivative_falls_back_to_a_difference_where_forward_ad_stops():
    """SiLU has no forward derivative of its derivative in torch: the central difference
    in float64 is used, and matches the dense Hessians."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.SiLU(), torch.nn.Linear(5, 3)).double()
    X = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    P = sum(p.numel() for p in model.parameters())
    u = torch.randn(P, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u /= u.norm()
    torch.testing.assert_close(second_derivative_along(model, X, u),
                               _dense_second_derivative(model, X, u), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("norm", ["layer", "instance"])
def test_second_derivative_where_torchs_forward_over_forward_is_wrong(norm):
    """torch 2.13's second forward derivative of layer_norm and instance_norm is wrong
    (no error raised; so is torch.func.hessian there): the check against the central
    difference catches it and the difference is used, which matches reverse-over-reverse
    autograd of t ↦ z(w₀ + t·u)."""
    torch.manual_seed(0)
    if norm == "layer":
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Tanh(),
                                    torch.nn.Linear(6, 3)).double()
        X = torch.randn(7, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    else:
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.InstanceNorm2d(2, affine=True),
                                    torch.nn.Tanh(), torch.nn.Flatten(),
                                    torch.nn.Linear(8, 3)).double()
        X = torch.randn(7, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    P = sum(p.numel() for p in model.parameters())
    u = torch.randn(P, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u /= u.norm()
    flat, state = flat_state(model)
    t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    out = torch.func.functional_call(model.eval(), state(flat + t * u), (X,)).reshape(len(X), -1)
    expect = torch.zeros_like(out)
    for i in range(out.shape[0]):
        for k in range(out.shape[1]):
            (d1,) = torch.autograd.grad(out[i, k], t, create_graph=True, retain_graph=True)
            (d2,) = torch.autograd.grad(d1, t, retain_graph=True)
            expect[i, k] = d2.detach()
    params = {k: v.detach() for k, v in model.named_parameters()}
    from nets.learning_rates.linear_outputs import _as_tangent, _second_derivative
    raw = _second_derivative(model.eval(), params, X, _as_tangent(model, params, u), 4, None)
    assert float((raw - expect).abs().max()) > 1e-3 * float(expect.abs().max())   # torch's bug
    torch.testing.assert_close(second_derivative_along(model, X, u), expect, rtol=1e-5,
                               atol=1e-6 * float(expect.abs().max()))       # O(h²), h = 1e-4
