"""Per-sample Jacobian pieces (nets.curvature.sample_jacobians) against dense per-sample
Jacobians from torch.func.jacrev of the flat parameter vector, float64."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dense_oracles import output_jacobians
from torch import nn

from nets.curvature.operators import hessian_operator
from nets.curvature.sample_jacobians import SampleJacobians, _layer_gram

CE = F.cross_entropy


class ConvNet(nn.Module):
    """Conv2d (padding 'same', dilation), strided Conv2d, BatchNorm (eval), Conv1d, Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding="same", dilation=2)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c3 = nn.Conv1d(6, 5, 2, padding=1, bias=False)
        self.fc = nn.Linear(5 * 26, 7)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = self.bn(self.c2(x)).flatten(2)                 # (g, 6, 25)
        return self.fc(torch.tanh(self.c3(x)).flatten(1))


class SeqNet(nn.Module):
    """Linear on sequences, LayerNorm, and a layer applied twice (shared weights)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.shared = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.ln(self.a(x)))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.b(h).mean(1)


def _case(name):
    torch.manual_seed(0)
    if name == "conv":
        model = ConvNet().double()
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
        model.eval()
        X = torch.randn(7, 3, 10, 10, dtype=torch.float64)
        y = torch.randint(0, 7, (7,))
    else:
        model = SeqNet().double()
        X = torch.randn(6, 5, 4, dtype=torch.float64)
        y = torch.randint(0, 3, (6,))
    return model, X, y


@pytest.mark.parametrize("name", ["conv", "seq"])
def test_pieces_matchoutput_jacobians(name):
    model, X, y = _case(name)
    op = hessian_operator(model, CE, (X, y), dtype=torch.float64)
    sj = SampleJacobians(op)
    if name == "conv":
        assert sj.ghost == ("c1", "c2", "c3", "fc") and sj.formed == ("bn.weight", "bn.bias")
    else:   # the shared layer is called twice: its Jacobians are formed
        assert sj.ghost == ("a", "b")
        assert set(sj.formed) == {"ln.weight", "ln.bias", "shared.weight", "shared.bias"}
    J = output_jacobians(model, X)
    out, K = sj.grams(X)
    np.testing.assert_allclose(K.numpy(), (J @ J.transpose(1, 2)).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.numpy(), model(X).detach().reshape(X.shape[0], -1).numpy(),
                               rtol=1e-12)
    g = torch.Generator().manual_seed(1)
    V = torch.randn(op.P, 3, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(sj.jvp(X, V).numpy(), (J @ V).numpy(), rtol=1e-10, atol=1e-12)
    cot = torch.randn(X.shape[0], sj.C, 2, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(sj.vjp_sum(X, cot).numpy(),
                               torch.einsum("ncp,nck->pk", J, cot).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sj.vjp_each(X, cot[:, :, 0]).numpy(),
                               torch.einsum("ncp,nc->np", J, cot[:, :, 0]).numpy(),
                               rtol=1e-10, atol=1e-12)


def test_parameter_subset_and_layers_that_mix_samples():
    """Only the selected parameters count; with BatchNorm on batch statistics (train mode)
    the batched backward would couple samples, so every Jacobian is formed per sample."""
    model, X, y = _case("conv")
    names = ["c2.weight", "bn.weight", "fc.bias"]
    op = hessian_operator(model, CE, (X, y), dtype=torch.float64, params=names)
    sj = SampleJacobians(op)
    assert sj.ghost == ("c2",) and sj.formed == ("bn.weight", "fc.bias")
    J = output_jacobians(model, X, names)
    np.testing.assert_allclose(sj.grams(X)[1].numpy(), (J @ J.transpose(1, 2)).numpy(),
                               rtol=1e-10, atol=1e-12)
    model.train()
    op = hessian_operator(model, CE, (X, y), dtype=torch.float64, policy="eval")
    assert SampleJacobians(op).batched                  # the policy puts BatchNorm in eval
    mixed = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    Xm = torch.randn(6, 3, dtype=torch.float64)
    op = hessian_operator(mixed, CE, (Xm, torch.randint(0, 2, (6,))), dtype=torch.float64,
                          policy="train_batch_stats")
    # a sample's Jacobian under batch statistics depends on its batch (the Grams, one sample
    # alone, and the products, the chunk's statistics, disagreed by 33 %): refused
    with pytest.raises(ValueError, match="train_batch_stats"):
        SampleJacobians(op)


@pytest.mark.parametrize("T,din,dout", [(1, 5, 2), (3, 60, 40), (40, 5, 2)])
def test_layer_gram_branches_agree_with_formed_gradients(T, din, dout):
    """Each branch of the per-layer Gram (vectors T = 1; the double sum over positions,
    chosen for wide layers at few positions; formed weight gradients, for many positions)
    against Σ_t δ_t a_tᵀ formed explicitly."""
    g = torch.Generator().manual_seed(T)
    A = torch.randn(4, T, din, generator=g, dtype=torch.float64)
    D = torch.randn(4, 3, T, dout, generator=g, dtype=torch.float64)
    W = torch.einsum("gctd,gte->gcde", D, A).reshape(4, 3, -1)
    b = D.sum(2)
    want = W @ W.transpose(1, 2) + b @ b.transpose(1, 2)
    np.testing.assert_allclose(_layer_gram(A, D, True).numpy(), want.numpy(), rtol=1e-12)


def test_refusals():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return {"logits": self.fc(x)}

    X = torch.randn(4, 3)
    op = hessian_operator(DictOut(), lambda o, y: CE(o["logits"], y), (X, torch.tensor([0, 1, 0, 1])))
    with pytest.raises(TypeError, match="one tensor"):
        SampleJacobians(op)
    op = hessian_operator(nn.Linear(3, 50), CE, (X, torch.tensor([0, 1, 0, 1])))
    with pytest.raises(ValueError, match="max_outputs"):
        SampleJacobians(op, max_outputs=10)
    with pytest.raises(TypeError, match="ModelCurvatureOperator"):
        SampleJacobians("op")


def test_a_weight_also_read_outside_its_layer_is_formed():
    """A decoder tied to an encoder's weight (read with F.linear, not through the module):
    the encoder's per-layer share would miss that use; the two-sample check at
    construction moves it to the formed path, and K_i stays exact."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(5, 4, bias=False)
            self.mid = nn.Linear(4, 4)

        def forward(self, x):
            return F.linear(torch.tanh(self.mid(self.enc(x))), self.enc.weight.T)

    torch.manual_seed(3)
    model = Tied().double()
    X = torch.randn(6, 5, dtype=torch.float64)
    op = hessian_operator(model, F.mse_loss, (X, torch.randn(6, 5, dtype=torch.float64)),
                          dtype=torch.float64)
    sj = SampleJacobians(op)
    assert sj.ghost == ("mid",) and sj.formed == ("enc.weight",)
    J = output_jacobians(model, X)
    np.testing.assert_allclose(sj.grams(X)[1].numpy(), (J @ J.transpose(1, 2)).numpy(),
                               rtol=1e-10, atol=1e-12)



class _SmallLeak(nn.Module):
    """An encoder whose weight is also read outside its module, with a small factor `eps`
    (a functional side path): its per-layer share of K_i misses a relative ~eps·|x|² part."""

    def __init__(self, eps):
        super().__init__()
        self.enc = nn.Linear(5, 4)
        self.dec = nn.Linear(4, 3)
        self.eps = eps

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x))) + self.eps * F.linear(x, self.enc.weight)[:, :3]


@pytest.mark.parametrize("dtype,eps,rtol", [(torch.float64, 1e-6, 1e-12),
                                            (torch.float32, 1e-4, 3e-6)])
def test_a_weight_read_outside_its_layer_with_a_small_factor_is_formed(dtype, eps, rtol):
    """The construction check's tolerance is tight enough for a small side use: a weight read
    outside its layer with factor 1e-6 (float64; K_i of the per-layer path off by ~1e-6)
    or 1e-4 (float32; off by ~1e-4, float32 rounding ~1e-7) still moves the layer to the
    formed path, and K_i matches dense jacrev Jacobians (float64) to rounding."""
    torch.manual_seed(3)
    model = _SmallLeak(eps).double()
    X = torch.randn(6, 5, dtype=torch.float64)
    op = hessian_operator(model, F.mse_loss, (X, torch.randn(6, 3, dtype=torch.float64)),
                          dtype=dtype)
    sj = SampleJacobians(op)
    assert sj.ghost == ("dec",) and sj.formed == ("enc.weight", "enc.bias")
    J = output_jacobians(model, X)
    K = (J @ J.transpose(1, 2)).numpy()
    got = sj.grams(X.to(dtype))[1].numpy()
    assert np.abs(got - K).max() <= rtol * np.abs(K).max()

def test_gauss_newton_pass_does_not_depend_on_the_chunking():
    from nets.noise.ggn_samples import _chunk, ggn_sample_pass
    model, X, y = _case("conv")
    op = hessian_operator(model, CE, (X, y), dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(op.P, 3, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(0)))[0]
    sj = SampleJacobians(op)
    assert sj.bytes_per_sample > 0
    assert _chunk(op, sj, None, 1) == 1 and _chunk(op, sj, None, "1GB") == X.shape[0]
    a = ggn_sample_pass(op, U)
    b = ggn_sample_pass(op, U, chunk_size=3)                # uneven chunks
    for f in ("gamma", "a", "D", "S"):
        np.testing.assert_allclose(getattr(b, f), getattr(a, f), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(b.GU.numpy(), a.GU.numpy(), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_grams_inside_a_callers_no_grad_or_inference_mode(mode):
    model, X, y = _case("conv")
    op = hessian_operator(model, CE, (X, y), dtype=torch.float64)
    want = SampleJacobians(op).grams(X)[1]
    with mode():
        got = SampleJacobians(op).grams(X)[1]
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12)


class _Clipped(nn.Module):
    """A Linear whose output is clipped in place (Hardtanh(inplace=True) style)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(self.a(x).clamp_(-0.5, 0.5))


class _Keyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(input=torch.tanh(self.a(input=x)))


class _Flattened(nn.Module):
    """A token MLP that flattens (N, T, d) to (N·T, d) before its Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5 * 4, 3)

    def forward(self, x):
        n = x.shape[0]
        h = torch.tanh(self.a(x.reshape(n * 4, 3)))
        return self.b(h.reshape(n, 20))


@pytest.mark.parametrize("cls", [_Clipped, _Keyword, _Flattened])
def test_layers_the_per_layer_path_cannot_read_take_the_formed_path(cls):
    """From an outside sweep: an in-place clip after a Linear gave K_i 3.4× too large on
    the samples it clipped (the two-sample check used unclipped ones); a layer called
    with a keyword raised IndexError; a Linear on (N·T, d) rows raised an einsum error.
    Each now takes the formed path, exactly."""
    torch.manual_seed(1)
    model = cls().double()
    shape = (8, 4, 3) if cls is _Flattened else (8, 4)
    X = torch.randn(*shape, dtype=torch.float64)
    if cls is _Clipped:
        X[:2] *= 0.05                     # the check's two samples stay inside the clip
        X[2:] *= 4.0
    op = hessian_operator(model, CE, (X, torch.randint(0, 3, (8,))), dtype=torch.float64)
    sj = SampleJacobians(op)
    J = output_jacobians(model, X)
    np.testing.assert_allclose(sj.grams(X)[1].numpy(), (J @ J.transpose(1, 2)).numpy(),
                               rtol=1e-10, atol=1e-12)


def test_an_embedding_padding_row_is_no_direction():
    """nn.Embedding(padding_idx=…): backward gives the padding row no gradient but forward
    mode carried its tangent, so J v disagreed with the Grams and the Gauss–Newton
    operator was not symmetric (uᵀGv 0.2234, vᵀGu 0.2316)."""
    from nets.curvature.operators import ggn_operator

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4, padding_idx=0)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.emb(x).mean(1)))

    torch.manual_seed(2)
    model = Bag().double()
    X = torch.randint(0, 10, (12, 5))
    X[:, -1] = 0                                      # every sample holds padding
    y = torch.randint(0, 3, (12,))
    G = ggn_operator(model, CE, (X, y))
    g = torch.Generator().manual_seed(0)
    u, v = (torch.randn(G.P, generator=g, dtype=torch.float64) for _ in range(2))
    assert float(u @ G.matvec(v)) == pytest.approx(float(v @ G.matvec(u)), rel=1e-12)
    sj = SampleJacobians(G)
    J = output_jacobians(model, X)                    # reverse mode: padding row zero
    V = torch.randn(G.P, 2, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(sj.jvp(X, V).numpy(), (J @ V).numpy(), rtol=1e-10, atol=1e-12)



def test_a_padding_row_tied_to_a_decoder_keeps_its_decoder_path():
    """The padding row's tangent was zeroed for the lookup; tied to a decoder (the same
    weight read by F.linear) that also dropped its decoder path from J v alone: the
    Gauss–Newton operator was asymmetric (1.7 % of its norm) with negative eigenvalues.
    J v now comes from the pullback of Jᵀ; against the dense JᵀΛJ of reverse-mode J."""
    from nets.curvature.operators import ggn_operator

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4, padding_idx=0)

        def forward(self, x):
            h = torch.tanh(self.emb(x).mean(1))
            return nn.functional.linear(h, self.emb.weight)     # logits over the 6 tokens

    torch.manual_seed(3)
    model = Tied().double()
    X = torch.randint(0, 6, (10, 4))
    X[:, -1] = 0
    y = torch.randint(0, 6, (10,))
    G = ggn_operator(model, CE, (X, y))
    dense = G.to_dense()
    J = output_jacobians(model, X)                              # (N, C, P), reverse mode
    with torch.no_grad():
        p = torch.softmax(model(X), 1)
    Lam = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / len(X)
    want = torch.einsum("ncp,ncd,ndq->pq", J, Lam, J)
    np.testing.assert_allclose(dense.numpy(), want.numpy(), rtol=1e-10, atol=1e-13)
    sj = SampleJacobians(G)
    V = torch.randn(G.P, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    np.testing.assert_allclose(sj.jvp(X, V).numpy(), (J @ V).numpy(), rtol=1e-10, atol=1e-12)
