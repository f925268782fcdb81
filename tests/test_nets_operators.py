"""Curvature operators against dense float64 oracles (torch.func.hessian / jacrev)."""

import copy

import numpy as np
import pytest
import torch
from dense_oracles import flat_state
from torch import nn
from torch.func import functional_call

from nets.curvature.operators import (
    batch_ggn_operator,
    batch_hessian_operator,
    fluctuation_operator,
    ggn_operator,
    hessian_operator,
)

CE = nn.functional.cross_entropy
MSE = nn.functional.mse_loss


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(seed + 100)
    X = torch.randn(15, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (15,), generator=g)
    return model, X, y


def tiny_regressor(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(seed + 200)
    X = torch.randn(12, 3, dtype=torch.float64, generator=g)
    Y = torch.randn(12, 2, dtype=torch.float64, generator=g)
    return model, X, Y


def flat_loss(model, loss_fn, X, y, params=None):
    """w ↦ loss_fn(model_w(X), y) on the flat vector of the parameters named in `params`
    (default all, in `named_parameters` order), by `dense_oracles.flat_state` (no package
    parameter layout); the others and the buffers held fixed."""
    flat, state = flat_state(model, params)

    def f(w):
        return loss_fn(functional_call(model, state(w), (X,)), y)
    return f, flat


def dense_hessian(model, loss_fn, X, y, params=None):
    f, w = flat_loss(model, loss_fn, X, y, params)
    return torch.func.hessian(f)(w)


def dense_hessian_autograd(model, loss_fn, X, y):
    """Row-by-row double backward with torch.autograd: the oracle for train-mode
    BatchNorm, where torch.func.hessian (and jacrev∘jacrev) of torch 2.13 return a wrong
    matrix (checked against finite differences of the gradient)."""
    ps = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    state = dict(model.named_buffers())
    state.update(zip(names, ps))
    loss = loss_fn(functional_call(model, state, (X,)), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, ps, create_graph=True)])
    rows = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(g[i], ps, retain_graph=True)])
            for i in range(g.numel())]
    return torch.stack(rows)


def dense_ggn(model, loss_fn, X, y):
    w, state = flat_state(model)

    def out(w):
        return functional_call(model, state(w), (X,))
    J = torch.func.jacrev(out)(w)                                   # (N, C, P)
    o = out(w)
    Lam = torch.func.hessian(lambda z: loss_fn(z, y))(o)            # (N, C, N, C)
    return torch.einsum("iap,iajb,jbq->pq", J, Lam, J)


CASES = [("classifier", tiny_classifier, CE), ("regressor", tiny_regressor, MSE)]


@pytest.mark.parametrize("name,make,loss_fn", CASES)
def test_hessian_matches_dense_oracle_with_uneven_batches(name, make, loss_fn):
    model, X, y = make()
    H = dense_hessian(model, loss_fn, X, y)
    cuts = [0, 7, 12, X.shape[0]] if X.shape[0] == 15 else [0, 7, 10, X.shape[0]]
    batches = [(X[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    op = hessian_operator(model, loss_fn, batches)
    assert op.P == H.shape[0] and op.N == X.shape[0]
    rng = np.random.default_rng(0)
    V = torch.from_numpy(rng.standard_normal((op.P, 4)))
    scale = H.abs().max()
    for j in range(4):
        assert torch.allclose(op.matvec(V[:, j]), H @ V[:, j], rtol=0, atol=1e-10 * scale)
    assert torch.allclose(op.matmat(V), H @ V, rtol=0, atol=1e-10 * scale)
    assert torch.allclose(op @ V[:, 0], H @ V[:, 0], rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(op.to_scipy() @ V[:, 1].numpy(), (H @ V[:, 1]).numpy(),
                               rtol=0, atol=1e-10 * float(scale))
    assert torch.allclose(op.to_dense(), H, rtol=0, atol=1e-10 * scale)
    # equal weighting of the uneven batches (the peer defect) would be visibly wrong
    naive = sum(dense_hessian(model, loss_fn, xb, yb) for xb, yb in batches) / len(batches)
    assert (naive - H).abs().max() > 1e-4 * scale


@pytest.mark.parametrize("name,make,loss_fn", CASES)
def test_dataset_pair_with_batch_size_and_cached_graph(name, make, loss_fn):
    model, X, y = make()
    H = dense_hessian(model, loss_fn, X, y)
    for bs, cache in [(4, False), (5, True), (None, True)]:
        op = hessian_operator(model, loss_fn, (X, y), chunk_size=bs, cache_graph=cache)
        D1 = op.to_dense()
        D2 = op.to_dense()      # second pass reuses the cache when enabled
        assert torch.allclose(D1, H, rtol=0, atol=1e-10 * H.abs().max())
        assert torch.allclose(D2, D1, rtol=0, atol=1e-13 * H.abs().max())


@pytest.mark.parametrize("name,make,loss_fn", CASES)
def test_ggn_matches_dense_JtLJ(name, make, loss_fn):
    model, X, y = make()
    G = dense_ggn(model, loss_fn, X, y)
    op = ggn_operator(model, loss_fn, [(X[:7], y[:7]), (X[7:10], y[7:10]), (X[10:], y[10:])])
    D = op.to_dense()
    assert torch.allclose(D, G, rtol=0, atol=1e-10 * G.abs().max())
    ev = torch.linalg.eigvalsh(D)
    assert ev.min() > -1e-12 * ev.max()             # PSD for convex losses
    # the GGN differs from the Hessian of a non-linear network
    H = dense_hessian(model, loss_fn, X, y)
    assert (H - G).abs().max() > 1e-3 * G.abs().max()


def test_batch_and_fluctuation_operators():
    model, X, y = tiny_classifier(1)
    idx = np.array([0, 3, 4, 9, 14])
    H = dense_hessian(model, CE, X, y)
    HB = dense_hessian(model, CE, X[idx], y[idx])
    full = hessian_operator(model, CE, (X, y))
    bop = batch_hessian_operator(model, CE, (X, y), idx)
    assert torch.allclose(bop.to_dense(), HB, rtol=0, atol=1e-12)
    assert torch.allclose(full.subset(idx).to_dense(), HB, rtol=0, atol=1e-12)
    for cache in ("auto", False):
        sub = full.subset(idx, cache_graph=cache)
        assert sub.N == len(idx) and sub.cache_graph == (cache == "auto")
        assert torch.allclose(sub.to_dense(), HB, rtol=0, atol=1e-12)
    eps = fluctuation_operator(bop, full)
    assert torch.allclose(eps.to_dense(), HB - H, rtol=0, atol=1e-12)
    assert eps.P == full.P and eps.param_names == full.param_names
    # at B = N the fluctuation vanishes exactly
    eps_all = fluctuation_operator(batch_hessian_operator(model, CE, (X, y), np.arange(15)), full)
    assert eps_all.to_dense().abs().max() < 1e-14
    GB = batch_ggn_operator(model, CE, (X, y), idx).to_dense()
    assert torch.allclose(GB, dense_ggn(model, CE, X[idx], y[idx]), rtol=0, atol=1e-12)


def test_parameter_subset_is_the_dense_block():
    model, X, y = tiny_classifier(2)
    H = dense_hessian(model, CE, X, y)
    names = ["2.weight", "2.bias"]
    op = hessian_operator(model, CE, (X, y), params=names)
    assert op.param_names == tuple(names) and op.P == 12 + 3
    off = 4 * 5 + 4
    assert torch.allclose(op.to_dense(), H[off:, off:], rtol=0, atol=1e-12)
    op2 = hessian_operator(model, CE, (X, y), params=lambda n, p: n.startswith("0."))
    assert torch.allclose(op2.to_dense(), H[:off, :off], rtol=0, atol=1e-12)


def test_gradient_and_loss_match_autograd():
    model, X, y = tiny_classifier(3)
    op = hessian_operator(model, CE, [(X[:4], y[:4]), (X[4:], y[4:])])
    model.zero_grad()
    loss = CE(model(X), y)
    loss.backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(op.gradient(), g, rtol=0, atol=1e-14)
    assert op.loss() == pytest.approx(loss.item(), rel=1e-14)


def test_float32_products_and_dtype_round_trip():
    model, X, y = tiny_classifier(4)
    H = dense_hessian(model, CE, X, y)
    op32 = hessian_operator(model, CE, (X, y), dtype=torch.float32)
    assert op32.dtype == torch.float32 and op32.primals[0].dtype == torch.float32
    v = torch.randn(op32.P, dtype=torch.float64)
    out = op32.matvec(v)
    assert out.dtype == torch.float64                   # cast back to the input's dtype
    assert torch.allclose(out, H @ v, rtol=0, atol=1e-5 * float((H @ v).abs().max()))
    # float32 model evaluated in float64 on request
    m32 = copy.deepcopy(model).float()
    op64 = hessian_operator(m32, CE, (X.float(), y), dtype=torch.float64)
    H32 = dense_hessian(m32.double(), CE, X.float().double(), y)
    assert torch.allclose(op64.to_dense(), H32, rtol=0, atol=1e-12)


class BNNet(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def _bn_model():
    torch.manual_seed(5)
    m = BNNet().double()
    with torch.no_grad():      # non-trivial running statistics
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(6)
    X = torch.randn(10, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (10,), generator=g)
    return m, X, y


def _buffers(m):
    return {n: b.clone() for n, b in m.named_buffers()}


def test_batchnorm_train_mode_needs_policy_and_buffers_never_change():
    m, X, y = _bn_model()
    m.train()
    before = _buffers(m)
    with pytest.raises(ValueError, match="policy"):
        hessian_operator(m, CE, (X, y))
    # policy="eval": the Hessian of the eval-mode network (running statistics)
    op = hessian_operator(m, CE, [(X[:6], y[:6]), (X[6:], y[6:])], policy="eval")
    D = op.to_dense()
    ref = copy.deepcopy(m).eval()
    assert torch.allclose(D, dense_hessian(ref, CE, X, y), rtol=0, atol=1e-12)
    # policy="train_batch_stats": batch statistics, per batch, buffers untouched
    op_t = hessian_operator(m, CE, (X, y), policy="train_batch_stats")
    Dt = op_t.to_dense()
    ref_t = copy.deepcopy(m).train()
    ref_t.bn.track_running_stats = False
    ref_t.bn.running_mean = None
    ref_t.bn.running_var = None
    assert torch.allclose(Dt, dense_hessian_autograd(ref_t, CE, X, y), rtol=0, atol=1e-12)
    assert (Dt - D).abs().max() > 1e-3            # the two policies really differ
    Dt_stream = hessian_operator(m, CE, (X, y), policy="train_batch_stats",
                                 cache_graph=False).to_dense()
    assert torch.allclose(Dt_stream, Dt, rtol=0, atol=1e-13)
    op_t.gradient()
    ggn_operator(m, CE, (X, y), policy="train_batch_stats").to_dense()
    after = _buffers(m)
    for n in before:
        assert torch.equal(before[n], after[n]), n  # bit-identical
    assert m.training and m.bn.training and m.bn.track_running_stats   # flags restored


def test_batchnorm_eval_mode_model_needs_no_policy():
    m, X, y = _bn_model()
    m.eval()
    before = _buffers(m)
    D = hessian_operator(m, CE, (X, y)).to_dense()
    assert torch.allclose(D, dense_hessian(m, CE, X, y), rtol=0, atol=1e-12)
    assert all(torch.equal(before[n], b) for n, b in m.named_buffers())


def test_active_dropout_is_rejected():
    torch.manual_seed(0)
    m = BNNet(dropout=0.5).double()
    m.train()
    m.bn.eval()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="Dropout"):
        hessian_operator(m, CE, (X, y))
    op = hessian_operator(m, CE, (X, y), policy="eval")
    D = op.to_dense()
    assert torch.allclose(D, dense_hessian(copy.deepcopy(m).eval(), CE, X, y), rtol=0, atol=1e-12)
    assert torch.allclose(D, op.to_dense(), rtol=0, atol=0)     # deterministic


def test_bad_input_raises_clear_errors():
    model, X, y = tiny_classifier()
    with pytest.raises(ValueError, match="empty"):
        hessian_operator(model, CE, (X[:0], y[:0]))
    with pytest.raises(ValueError, match="empty"):
        hessian_operator(model, CE, [])
    Xn = X.clone()
    Xn[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hessian_operator(model, CE, (Xn, y))
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="parameter"):
        hessian_operator(bad, CE, (X, y))
    with pytest.raises(ValueError, match="first dimension"):
        hessian_operator(model, CE, (X, y[:-1]))
    with pytest.raises(ValueError, match="policy"):
        hessian_operator(model, CE, (X, y), policy="train")
    with pytest.raises(ValueError, match="params"):
        hessian_operator(model, CE, (X, y), params=["nope.weight"])
    with pytest.raises(TypeError, match="model"):
        hessian_operator(lambda x: x, CE, (X, y))
    with pytest.raises(TypeError, match="dtype"):
        hessian_operator(model, CE, (X, y), dtype=torch.int64)
    with pytest.raises(ValueError, match="chunk_size"):
        hessian_operator(model, CE, (X, y), chunk_size=0)
    with pytest.raises(ValueError, match="indices"):
        batch_hessian_operator(model, CE, (X, y), [0, 15])
    op = hessian_operator(model, CE, (X, y))
    with pytest.raises(ValueError, match="shape"):
        op.matvec(torch.zeros(op.P + 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        op.matvec(torch.zeros(op.P, dtype=torch.int64))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            hessian_operator(model, CE, (X, y), device="cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="device='mps' is not available"):
            hessian_operator(model, CE, (X, y), device="mps")
    # 'cpu:0' is the CPU (its tensors report no index): same products, no refusal
    v = torch.randn(op.P, dtype=torch.float64, device="cpu:0")
    for dev in ("cpu:0", torch.device("cpu", 0)):
        torch.testing.assert_close(hessian_operator(model, CE, (X, y), device=dev).matvec(v),
                                   op.matvec(v))
    other = hessian_operator(model, CE, (X, y), params=["2.bias"])
    with pytest.raises(ValueError, match="P="):
        fluctuation_operator(other, op)
