"""SideBySideHessians: k chunk Hessians in one pullback, against dense float64 oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nets.algorithms.lanczos import lanczos_batch
from nets.curvature.side_by_side import ColumnCountError, SideBySideHessians


def _chunks(X, y, k):
    B = X.shape[0] // k
    return X[:k * B].reshape(k, B, *X.shape[1:]), y[:k * B].reshape(k, B)


def test_columns_are_chunk_hessians(tiny_mlp, dense_hessian):
    model, X, y = tiny_mlp(seed=3, N=24)
    k = 3
    Xc, Yc = _chunks(X, y, k)
    op = SideBySideHessians(model, F.cross_entropy, Xc, Yc)
    V = torch.randn(op.P, k, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = op.matmat(V)
    for j in range(k):
        Hj = dense_hessian(model, F.cross_entropy, Xc[j], Yc[j])
        np.testing.assert_allclose(out[:, j].numpy(), (Hj @ V[:, j]).numpy(), rtol=1e-10,
                                   atol=1e-12)
    # the graph is reused: a second product with other vectors is exact as well
    out2 = op.matmat(2.0 * V)
    np.testing.assert_allclose(out2.numpy(), 2.0 * out.numpy(), rtol=1e-12, atol=1e-14)
    assert op.num_matvecs == 2 * k


def test_lanczos_side_by_side_finds_each_chunk_top(tiny_mlp, dense_hessian):
    model, X, y = tiny_mlp(seed=5, N=20)
    k = 2
    Xc, Yc = _chunks(X, y, k)
    op = SideBySideHessians(model, F.cross_entropy, Xc, Yc)
    res = lanczos_batch(op, op.P, num_vectors=k, seed=1)
    for j in range(k):
        top = np.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, Xc[j], Yc[j]).numpy())[-1]
        assert res[j].ritz_values[-1] == pytest.approx(top, rel=1e-8)


def test_wrong_column_count_and_bad_shapes(tiny_mlp):
    model, X, y = tiny_mlp(seed=0, N=12)
    Xc, Yc = _chunks(X, y, 3)
    op = SideBySideHessians(model, F.cross_entropy, Xc, Yc)
    with pytest.raises(ColumnCountError, match="one column per chunk"):
        op.matmat(torch.ones(op.P, 2, dtype=torch.float64))
    with pytest.raises(ColumnCountError):
        op.matvec(torch.ones(op.P, dtype=torch.float64))
    with pytest.raises(ValueError, match="same k and B"):
        SideBySideHessians(model, F.cross_entropy, Xc, Yc[:2])
    with pytest.raises(TypeError, match="model"):
        SideBySideHessians(lambda x: x, F.cross_entropy, Xc, Yc)


def test_unused_parameter_and_train_mode_policy():
    """A parameter the loss never touches gets zero products; BatchNorm in train mode
    with policy="train_batch_stats" uses each chunk's own batch statistics."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 5)
            self.bn = nn.BatchNorm1d(5)
            self.b = nn.Linear(5, 3)
            self.unused = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.b(torch.tanh(self.bn(self.a(x))))

    model = Net().double().train()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(16, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    Xc, Yc = _chunks(X, y, 2)
    with pytest.raises(ValueError, match="policy"):
        SideBySideHessians(model, F.cross_entropy, Xc, Yc)
    op = SideBySideHessians(model, F.cross_entropy, Xc, Yc, policy="train_batch_stats")
    V = torch.randn(op.P, 2, dtype=torch.float64, generator=g)
    out = op.matmat(V)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    at = int(np.sum(sizes[:names.index("unused")]))
    assert torch.all(out[at:at + 2] == 0)
    # oracle: batch norm written out, differentiated by torch.func.hessian (the native
    # batch_norm in training mode gave an asymmetric dense Hessian under torch.func here:
    # its double backward through functional_call is not a usable oracle)
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def manual_loss(w, x, t):
        st = dict(zip(names, (c.view(sh) for c, sh in zip(torch.split(w, sizes), shapes))))
        h = x @ st["a.weight"].T + st["a.bias"]
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + model.bn.eps)
        h = torch.tanh(h * st["bn.weight"] + st["bn.bias"])
        return F.cross_entropy(h @ st["b.weight"].T + st["b.bias"], t)

    for j in range(2):
        Hj = torch.func.hessian(manual_loss)(flat, Xc[j], Yc[j])
        np.testing.assert_allclose(out[:, j].numpy(), (Hj @ V[:, j]).numpy(), rtol=1e-9,
                                   atol=1e-12)
    assert model.training and model.bn.training


def test_chunks_of_other_sizes_in_inputs_and_targets_are_refused(tiny_mlp):
    """(k, B) must agree in both: same k but another B is named, not left to the loss."""
    model, X, y = tiny_mlp(seed=1, N=24)
    with pytest.raises(ValueError, match="same k and B"):
        SideBySideHessians(model, F.cross_entropy, X[:24].reshape(3, 8, -1),
                           y[:18].reshape(3, 6))
