"""Models and losses the package's per-sample decomposition does not fit: said, not
silently computed.

Oracles: the loss's own value on the batch against its per-sample values (a weighted
mean differs from the plain mean), the loss's second derivative in the outputs (zero for
log_softmax + nll_loss), dense float64 GGN eigenvalues, and the start loss itself.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nets import linearized_threshold, predict_max_lr, top_eigenvalues
from nets.curvature.loss_check import check_mean_reduced
from nets.learning_rates.lr_search import training_threshold


def _data(N=80, seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 6, generator=g, dtype=torch.float64)
    y = torch.arange(N) % classes
    return X, y


def _mlp(out=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, out)).double()


def _quiet(fn):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in rec if "jit" not in str(w.message)]


@pytest.mark.parametrize("loss", [
    lambda o, t: F.cross_entropy(o, t, weight=torch.tensor([5.0, 1, 1, 0.2], dtype=o.dtype)),
    lambda o, t: F.cross_entropy(o, torch.where(torch.arange(len(t)) % 3 == 0, -100, t),
                                 ignore_index=-100),
], ids=["class_weights", "ignore_index"])
def test_a_weighted_mean_loss_is_said(loss):
    X, y = _data()
    model = _mlp()
    # the oracle: the batch loss is not the mean of the one-sample losses
    with torch.no_grad():
        out = model(X)
        per = torch.stack([loss(out[i:i + 1], y[i:i + 1]) for i in range(len(X))])
        assert not torch.allclose(loss(out, y), per.nanmean(), rtol=1e-2)
    with pytest.warns(UserWarning, match="not the plain mean of its per-sample values") as rec:
        check_mean_reduced(model, loss, (X, y))
    assert not any("nan×" in str(w.message) for w in rec)       # an ignored sample: NaN
    with pytest.warns(UserWarning, match="weighted mean"):
        predict_max_lr(model, loss, (X, y), [8])
    with pytest.warns(UserWarning, match="weighted mean"):
        linearized_threshold(model, loss, (X, y), [8], rank=4, seeds=(0,), steps=5)
    _, said = _quiet(lambda: check_mean_reduced(model, F.cross_entropy, (X, y)))
    assert said == []                            # the plain mean passes quietly


def test_a_weighted_loss_with_float32_weights_reports_its_gradient_gap():
    """nn.CrossEntropyLoss(weight=float32) cannot run on the float64 copy of the outputs
    the gradient comparison makes, so the warning read "differs ... by nan%" (an outside
    sweep); it now compares in the outputs' own dtype. The oracle: the gap computed here
    from the batch gradient and the per-sample gradients, written out."""
    X, y = _data(N=64)                       # the check reads up to 64 samples: all of them
    model = _mlp().float()
    loss = nn.CrossEntropyLoss(weight=torch.tensor([5.0, 1, 1, 0.2]))
    with pytest.warns(UserWarning, match="not the plain mean") as rec:
        check_mean_reduced(model, loss, (X.float(), y))
    text = " ".join(str(w.message) for w in rec)
    assert "nan%" not in text
    with torch.no_grad():
        out = model(X.float())
    o = out.detach().requires_grad_(True)
    whole = torch.autograd.grad(loss(o, y), o)[0]
    each = torch.cat([torch.autograd.grad(loss(o[i:i + 1], y[i:i + 1]), o)[0][i:i + 1]
                      for i in range(64)]) / 64
    gap = float((whole - each).norm() / each.norm())
    assert gap > 0.1 and f"by {gap:.0%}" in text


def test_targets_that_broadcast_across_samples_are_refused():
    """Outputs (N, 1) against targets (N,): F.mse_loss broadcasts them to N × N, every
    output against every target. The oracle: that loss equals the mean over all pairs
    (i, j) of (o_i − y_j)², not the per-sample mean. Refused by every entry point; a loss
    that reshapes the targets itself, and targets of the outputs' shape, pass quietly."""
    X, _ = _data()
    y = torch.sin(X[:, 0])                                     # (N,)
    model = _mlp(out=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(X)
        pairs = ((out - y[None, :]) ** 2).mean()               # (N, 1) − (1, N): all pairs
        assert float(F.mse_loss(out, y)) == pytest.approx(float(pairs), rel=1e-12)
        assert abs(float(F.mse_loss(out, y[:, None])) / float(pairs) - 1) > 1e-3
    for call in (lambda: check_mean_reduced(model, F.mse_loss, (X, y)),
                 lambda: top_eigenvalues(model, F.mse_loss, (X, y)),
                 lambda: predict_max_lr(model, F.mse_loss, (X, y), [8]),
                 lambda: training_threshold(model, F.mse_loss, (X, y), [8], seeds=(0,)),
                 lambda: linearized_threshold(model, F.mse_loss, (X, y), [8], rank=4,
                                              seeds=(0,), steps=5)):
        with pytest.raises(ValueError, match=r"broadcast to \(64, 64\).*y.reshape\(-1, 1\)"):
            call()
    _, said = _quiet(lambda: check_mean_reduced(model, F.mse_loss, (X, y[:, None])))
    assert said == []
    own = (lambda o, t: F.mse_loss(o.reshape(-1), t))           # reshapes the outputs itself
    ratio, said = _quiet(lambda: check_mean_reduced(model, own, (X, y)))
    assert said == [] and ratio == pytest.approx(1.0, rel=1e-9)


class _Wrapped(nn.Module):
    """The MLP's logits inside a container: a tuple (with an auxiliary per-sample leaf), a
    dict, a namedtuple, or a tuple with a value head."""
    Out = __import__("collections").namedtuple("Out", "logits aux")

    def __init__(self, how, out=4):
        super().__init__()
        self.net, self.how = _mlp(out=out), how

    def forward(self, x):
        o = self.net(x)
        if self.how == "tuple":
            return o, o.sum(-1)
        if self.how == "dict":
            return {"logits": o}
        if self.how == "value":                     # a value head (N, 1) beside the logits
            return o, o[:, :1]
        return self.Out(o, o[:, 0])


def _logits(o):
    return o.logits if hasattr(o, "logits") else o[0] if isinstance(o, tuple) else o["logits"]


@pytest.mark.parametrize("how", ["tuple", "dict", "namedtuple"])
def test_container_outputs_get_the_same_loss_checks_as_a_tensor(how):
    """The per-sample losses slice every leaf of a tuple / dict / namedtuple output along
    the samples: a summed and a weighted loss are said as for a tensor output (the oracle:
    the tensor output's own ratio), and targets that broadcast against the leaf the loss
    reads are refused."""
    X, y = _data()
    model = _Wrapped(how)
    summed = (lambda o, t: F.cross_entropy(_logits(o), t, reduction="sum"))
    with pytest.warns(UserWarning, match="looks summed"):
        ratio = check_mean_reduced(model, summed, (X, y))
    with pytest.warns(UserWarning, match="looks summed"):
        want = check_mean_reduced(model.net, lambda o, t: F.cross_entropy(o, t, reduction="sum"),
                                  (X, y))
    assert ratio == pytest.approx(want, rel=1e-12) and want == pytest.approx(64, rel=1e-9)
    w = torch.tensor([5.0, 1, 1, 0.2], dtype=torch.float64)
    with pytest.warns(UserWarning, match="weighted mean"):
        predict_max_lr(model, lambda o, t: F.cross_entropy(_logits(o), t, weight=w), (X, y), [8])
    ratio, said = _quiet(lambda: top_eigenvalues(model, lambda o, t: F.cross_entropy(_logits(o), t),
                                                 (X, y), k=1))
    assert said == []
    reg = _Wrapped(how, out=1)
    t = torch.sin(X[:, 0])                                        # (N,) against (N, 1)
    with pytest.raises(ValueError, match=r"broadcast to \(64, 64\)"):
        top_eigenvalues(reg, lambda o, t: F.mse_loss(_logits(o), t), (X, t), k=1)
    # a leaf the loss does not read may broadcast: a weighted loss on the others is only said
    with pytest.warns(UserWarning, match="weighted mean"):
        check_mean_reduced(_Wrapped("value"), lambda o, t: F.cross_entropy(o[0], t, weight=w),
                           (X, y))


@pytest.mark.parametrize("how", ["tuple", "dict"])
def test_linearised_forms_refuse_a_container_output_and_name_the_alternative(how):
    """The linearised / curved forms push one output tensor forward (z0 + J·δ): a tuple or
    dict output is refused with a TypeError naming form='directional', which gives the
    tensor model's own transfer (the oracle: the same network returning its logits)."""
    from nets import linearized_threshold, transfer_lr

    X, y = _data(N=40)
    model = _Wrapped(how)
    loss = (lambda o, t: F.cross_entropy(_logits(o), t))
    kw = dict(reference=(16, 0.5), rank=4, n_seeds=1, steps=5)
    for call in (lambda: transfer_lr(model, loss, (X, y), [4, 16], **kw),
                 lambda: transfer_lr(model, loss, (X, y), [4, 16], form="curved", **kw),
                 lambda: transfer_lr(model, loss, (X, y), [4, 16], optimizer="adam",
                                     reference=(16, 0.01), n_seeds=1, steps=5),
                 lambda: linearized_threshold(model, loss, (X, y), [4], rank=4, seeds=(0,),
                                              steps=5)):
        with pytest.raises(TypeError, match="returns one tensor.*form='directional'"):
            call()
    got = transfer_lr(model, loss, (X, y), [4, 16], reference=(16, 0.5), form="directional")
    want = transfer_lr(model.net, F.cross_entropy, (X, y), [4, 16], reference=(16, 0.5),
                       form="directional")
    np.testing.assert_allclose(got.lr, want.lr, rtol=1e-9)


class _BatchStandardised(nn.Module):
    """A hand-written batch normalisation (h − mean over the batch) / std: each sample's
    output depends on the other samples of its batch."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 8).to(dtype), nn.Linear(8, 4).to(dtype)

    def forward(self, x):
        h = self.a(x)
        h = (h - h.mean(0, keepdim=True)) / (h.std(0, keepdim=True, unbiased=False) + 1e-3)
        return self.b(torch.tanh(h))


def test_a_model_that_mixes_samples_is_refused():
    """The oracle: the model's output on one sample alone differs from its output in a
    batch, so the curvature depends on the chunking (a pair in one chunk against chunks of
    8). Refused at every entry point with the cause named; per-sample normalisation
    (LayerNorm), float32 round-off and policy='train_batch_stats' pass."""
    X, y = _data()
    model = _BatchStandardised()
    with torch.no_grad():
        assert not torch.allclose(model(X[:1]), model(X[:2])[:1], rtol=1e-3)
    for call in (lambda: top_eigenvalues(model, F.cross_entropy, (X, y), k=1),
                 lambda: top_eigenvalues(model, F.cross_entropy,
                                         torch.utils.data.DataLoader(
                                             torch.utils.data.TensorDataset(X, y), batch_size=8),
                                         k=1),
                 lambda: predict_max_lr(model, F.cross_entropy, (X, y), [8]),
                 lambda: top_eigenvalues(_BatchStandardised(torch.float32), F.cross_entropy,
                                         (X.float(), y), k=1)):
        with pytest.raises(ValueError, match="depends on the other samples in its batch"):
            call()
    ok, said = _quiet(lambda: top_eigenvalues(model, F.cross_entropy, (X, y), k=1,
                                              policy="train_batch_stats"))
    assert np.isfinite(ok).all()
    torch.manual_seed(0)
    norm = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 4))
    for net, data in ((norm.double(), (X, y)), (_mlp().float(), (X.float(), y))):
        vals, said = _quiet(lambda: top_eigenvalues(net, F.cross_entropy, data, k=1))
        assert np.isfinite(vals).all() and said == []
    # float32 round-off amplified far beyond eps (a LayerNorm after a large bias: the
    # batch-1 and batch-2 kernels differ by ~2e-5 of the output) is not a coupling
    # (seed 7: a batch of one against a batch of two differed by 1.2e-5 and was refused;
    # the check compares two batches of two, x[[0, 1]] and x[[0, 0]], the same kernels —
    # also for a model that casts its input inside forward)
    class CastIn(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x.float())

    for seed in (6, 7, 8):
        torch.manual_seed(seed)
        wide = nn.Linear(64, 256)
        with torch.no_grad():
            wide.bias.fill_(1000.0)
        wide = nn.Sequential(wide, nn.LayerNorm(256), nn.Linear(256, 4)).eval()
        Xw, yw = torch.randn(16, 64), torch.randn(16, 4)
        for net in (wide, CastIn(wide)):
            vals, said = _quiet(lambda: top_eigenvalues(net, F.mse_loss, (Xw, yw), k=1))
            assert np.isfinite(vals).all()

    class ComplexMix(nn.Module):                 # complex outputs are checked too
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 2)

        def forward(self, x):
            h = self.lin(x)
            h = h - h.mean(0)
            return torch.complex(h, 0.5 * h)

    def cplx(o, t):
        return ((o.real - t) ** 2 + o.imag ** 2).mean()

    with pytest.raises(ValueError, match="depends on the other samples in its batch"):
        top_eigenvalues(ComplexMix().double(), cplx, (X, torch.randn(len(X), 2, dtype=X.dtype)), k=1)


def test_a_recurrent_net_returning_its_hidden_state_is_not_read_as_mixing_samples():
    """nn.GRU's h_n is (layers × directions, n, H), the batch second: with a bidirectional
    layer its first dimension is 2, the probe's batch size, and a model returning
    (logits, h_n) was refused as mixing samples though the loss reads the logits alone (an
    outside sweep). The oracle: the dense Hessian of the loss written on the logits, and a
    mixing leaf that the loss reads is still refused."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 4, 3, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)

    class BiGRU(nn.Module):
        def __init__(self, mix=False):
            super().__init__()
            torch.manual_seed(0)
            self.rnn = nn.GRU(3, 4, bidirectional=True, batch_first=True).double()
            self.fc = nn.Linear(8, 3).double()
            self.mix = mix

        def forward(self, x):
            o, h = self.rnn(x)
            logits = self.fc(o[:, -1])
            if self.mix:
                logits = logits - logits.mean(0)
            return logits, h

    def on_logits(out, t):
        return F.cross_entropy(out[0], t)

    model = BiGRU()
    with torch.no_grad():
        assert tuple(model(X)[1].shape) == (2, 24, 4)
    got = top_eigenvalues(model, on_logits, (X, y), k=1)
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(w):
        state, i = {}, 0
        for n, p in model.named_parameters():
            state[n] = w[i:i + p.numel()].view_as(p)
            i += p.numel()
        assert list(state) == names
        return on_logits(torch.func.functional_call(model, state, (X,)), y)

    dense = torch.func.hessian(loss)(flat)
    assert got[0] == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-8)
    with pytest.raises(ValueError, match="depends on the other samples in its batch"):
        top_eigenvalues(BiGRU(mix=True), on_logits, (X, y), k=1)


def test_a_sparse_embedding_is_measured_with_dense_gradients_and_left_sparse():
    """nn.Embedding(sparse=True) made every entry point raise torch's "reshape is not
    implemented for sparse tensors" (an outside sweep); sparse=True only changes how the
    weight's gradient is stored, so the products now run it dense. The oracle: the dense
    Hessian of the same lookup written with the weight as a plain tensor; the user's
    module keeps sparse=True."""
    import nets

    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 12, (40, 5), generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(0)

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(12, 4, sparse=True).double()
            self.fc = nn.Linear(4, 3).double()

        def forward(self, x):
            return self.fc(self.emb(x).mean(1))

    model = Bag()
    got = nets.top_eigenvalues(model, F.cross_entropy, (X, y), k=1)
    noise = nets.gradient_noise(model, F.cross_entropy, (X, y), hessian=False)
    assert model.emb.sparse is True
    E0, W0, b0 = (t.detach() for t in (model.emb.weight, model.fc.weight, model.fc.bias))

    def loss(w):
        E, W, b = w[:48].view(12, 4), w[48:60].view(3, 4), w[60:]
        return F.cross_entropy(E[X].mean(1) @ W.T + b, y)

    flat = torch.cat([E0.reshape(-1), W0.reshape(-1), b0])
    dense = torch.func.hessian(loss)(flat)
    assert got[0] == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-8)
    per = torch.stack([torch.func.grad(lambda w: F.cross_entropy(
        w[:48].view(12, 4)[X[i:i + 1]].mean(1) @ w[48:60].view(3, 4).T + w[60:], y[i:i + 1]))(flat)
        for i in range(len(X))])
    assert noise.trace_cov == pytest.approx(float(per.var(0).sum()), rel=1e-9)


def test_training_threshold_says_it_runs_train_mode_layers_in_eval_mode():
    """A model with train-mode BatchNorm or active Dropout is measured in eval mode (the
    oracle: the same threshold as model.eval()); one warning per call says so, none for an
    eval-mode model."""
    X, y = _data(N=40)
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4)).double()
    with torch.no_grad():
        bn(X)                                         # running statistics away from 0 / 1
    drop = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 4)).double()
    kw = dict(seeds=(0,), steps=10)
    for net, layer in ((bn, "BatchNorm1d"), (drop, "Dropout")):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            got = training_threshold(net, F.cross_entropy, (X, y), [4], **kw)
        said = [str(w.message) for w in rec if "in train mode" in str(w.message)]
        assert len(said) == 1 and layer in said[0] and "eval mode" in said[0]
        assert net.training                           # the caller's model is left as it was
        want, quiet = _quiet(lambda: training_threshold(copy.deepcopy(net).eval(),
                                                        F.cross_entropy, (X, y), [4], **kw))
        assert not any("in train mode" in m for m in quiet)
        np.testing.assert_array_equal(got.lr, want.lr)


def test_thresholds_refuse_a_start_loss_that_is_not_positive():
    X, _ = _data()
    target = torch.randn(len(X), 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    class Gauss(nn.Module):             # mean and log-variance; the Gaussian NLL can be < 0
        def __init__(self):
            super().__init__()
            self.net = _mlp(out=2)

        def forward(self, x):
            return self.net(x)

    def nll(o, t):
        return F.gaussian_nll_loss(o[:, :1], t, torch.exp(o[:, 1:]))

    model = Gauss()
    with torch.no_grad():
        model.net[2].bias.copy_(torch.tensor([0.0, -6.0]))   # tiny variance: NLL ≪ 0
        model.net[2].weight.mul_(0.0)
        start = float(nll(model(X), torch.zeros_like(target)))
    assert start < 0
    with pytest.raises(ValueError, match="must be finite and positive"):
        training_threshold(model, nll, (X, torch.zeros_like(target)), [8], seeds=(0,),
                           steps=10, lr0=0.01)


def test_a_forward_that_squeezes_the_sample_dimension_is_refused_clearly():
    X, y = _data()

    class Binary(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp(out=1)

        def forward(self, x):
            return self.net(x).squeeze()              # (n,) for n > 1 but () for n = 1

    with pytest.raises(ValueError, match="squeeze"):
        top_eigenvalues(Binary(), F.binary_cross_entropy_with_logits, (X, (y % 2).double()), k=1)
    # gradient_noise's per-sample pass gave torch's raw "Target size ... must be the same
    # as input size" (an outside sweep): it checks the outputs first now
    from nets import gradient_noise

    with pytest.raises(ValueError, match="squeeze"):
        gradient_noise(Binary(), F.binary_cross_entropy_with_logits, (X, (y % 2).double()),
                       hessian=False)


def test_a_packed_sequence_is_named_where_torch_func_cannot_run_it():
    """An RNN fed a PackedSequence raised torch's "Cannot access data pointer of Tensor that
    doesn't have storage" from inside the products and the per-sample pass (an outside
    sweep); the error now names the layer and what to do. (Plain autograd can run it;
    torch.func, which every product uses, cannot.)"""
    from nets import gradient_noise

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 5, (16,), generator=g)
    X = torch.zeros(16, 4, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        X[i, :n] = torch.randint(1, 9, (n,), generator=g)
    y = torch.randint(0, 3, (16,), generator=g)

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.rnn = nn.Embedding(9, 3), nn.GRU(3, 4, batch_first=True)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            p = nn.utils.rnn.pack_padded_sequence(self.emb(x), (x != 0).sum(1).cpu(),
                                                  batch_first=True, enforce_sorted=False)
            return self.fc(self.rnn(p)[1][-1])

    for call in (lambda: top_eigenvalues(Packed().double(), F.cross_entropy, (X, y), k=1),
                 lambda: gradient_noise(Packed().double(), F.cross_entropy, (X, y), hessian=False)):
        with pytest.raises(RuntimeError, match="PackedSequence"):
            call()


def test_a_time_major_output_is_named_as_such():
    """A model returning (T, N, C) (an RNN without batch_first) with T = 2 maps two samples
    to (2, 2, C) and one to (2, 1, C): the check blamed a squeeze() (an outside sweep);
    it now names the time-major layout. With T ≠ 2 the first-dimension check says it."""
    g = torch.Generator().manual_seed(0)

    class TimeMajor(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(4, 3).double()

        def forward(self, x):                          # x (N, T, 4) → (T, N, 3)
            return self.lin(x).transpose(0, 1)

    loss = (lambda o, t: F.cross_entropy(o.transpose(0, 1).reshape(-1, 3), t.reshape(-1)))
    for T, match in ((2, "time-major output"), (5, "first dimension must be the batch")):
        X = torch.randn(20, T, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (20, T), generator=g)
        with pytest.raises(ValueError, match=match) as err:
            top_eigenvalues(TimeMajor(), loss, (X, y), k=1)
        assert "squeeze" not in str(err.value)


def test_a_layer_without_a_second_derivative_is_named():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (40, 5), generator=g)
    labels = torch.arange(40) % 3

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.EmbeddingBag(20, 4, mode="mean")
            self.out = nn.Linear(4, 3)

        def forward(self, t):
            return self.out(self.emb(t))

    with pytest.raises(NotImplementedError, match="cannot be differentiated twice.*EmbeddingBag"):
        top_eigenvalues(Bag().double(), F.cross_entropy, (tokens, labels), k=1)


def test_a_loss_linear_in_the_outputs_has_a_zero_ggn_and_is_said():
    X, y = _data()
    base = _mlp()

    class LogProbs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = base

        def forward(self, x):
            return F.log_softmax(self.net(x), dim=1)

    with pytest.warns(UserWarning, match="linear in the model's outputs"):
        g = top_eigenvalues(LogProbs(), F.nll_loss, (X, y), k=1, kind="ggn")
    assert g[0] == pytest.approx(0.0, abs=1e-12)
    # the same loss split at the logits: a non-zero GGN, quietly
    logits, said = _quiet(lambda: top_eigenvalues(base, F.cross_entropy, (X, y), k=1, kind="ggn"))
    assert logits[0] > 1e-3 and said == []
    # and the Hessian of the log-prob model is that of the logits one (the same function)
    h_lp = top_eigenvalues(LogProbs(), F.nll_loss, (X, y), k=1)
    h_lg = top_eigenvalues(base, F.cross_entropy, (X, y), k=1)
    np.testing.assert_allclose(h_lp, h_lg, rtol=1e-8)


def test_a_piecewise_loss_linear_on_the_first_samples_is_not_called_zero():
    """Smooth L1 is linear in the outputs where |residual| > beta: with the first two
    samples there, the check warned "the Gauss–Newton matrix is zero" for one whose top
    eigenvalue is not (the dense float64 GGN's, below)."""
    X, _ = _data()
    model = _mlp()
    with torch.no_grad():
        out = model(X)
    # targets: the first two samples far off (linear zone), the rest within beta
    t = out.clone()
    t[:2] += 5.0
    t[2:] += 0.1

    def loss(o, tt):
        return F.smooth_l1_loss(o, tt, beta=0.5)

    top, said = _quiet(lambda: top_eigenvalues(model, loss, (X, t), k=1, kind="ggn"))
    assert said == []
    params = dict(model.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def outputs(w):
        i, d = 0, {}
        for k, p in params.items():
            d[k] = w[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
        return torch.func.functional_call(model, d, (X,))
    J = torch.func.jacrev(outputs)(flat).reshape(-1, flat.numel())
    o = outputs(flat).detach()
    lam = torch.autograd.functional.hessian(lambda u: loss(u, t), o).reshape(o.numel(), o.numel())
    G = J.T @ lam @ J
    assert top[0] > 1e-3
    np.testing.assert_allclose(top[0], float(torch.linalg.eigvalsh(G)[-1]), rtol=1e-8)


def test_eigenvalues_short_of_the_tolerance_are_said():
    """The plain arrays of top/bottom_eigenvalues carry no convergence flags: a value short
    of the tolerance is said (forced here by a product budget too small to converge)."""
    from nets.algorithms.lanczos import eigsh
    from nets.algorithms.spectra import _values
    from nets.curvature.operators import curvature_operator

    X, y = _data()
    model = _mlp()
    op = curvature_operator(model, F.cross_entropy, (X, y), kind="ggn")
    short = eigsh(op, k=2, which="SA", tol=1e-10, max_steps=6)
    assert not short.converged.all()
    with pytest.warns(UserWarning, match="short of the tolerance"):
        np.testing.assert_array_equal(_values(short, 1e-10), short.values)
    _, said = _quiet(lambda: top_eigenvalues(model, F.cross_entropy, (X, y), k=1, kind="ggn"))
    assert said == []


def test_hand_built_operators_check_the_loss():
    """The public operator factories check the loss as the entry points do: outputs (N, 1)
    against targets (N,) under a hand-written squared error (every output paired with every
    target) are refused — the operators took them silently, λ₁ 3.43 for 3.46 and moving with
    chunk_size — and a summed loss warns (it gave ~N × λ₁)."""
    from nets.curvature.operators import batch_ggn_operator, batch_hessian_operator, ggn_operator, hessian_operator

    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randn(40, generator=g, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    mse = lambda out, t: ((out - t) ** 2).mean()                      # noqa: E731
    summed = lambda out, t: ((out - t) ** 2).sum()                    # noqa: E731
    idx = np.arange(10)
    makers = (lambda f, t: hessian_operator(model, f, (X, t)),
              lambda f, t: ggn_operator(model, f, (X, t)),
              lambda f, t: batch_hessian_operator(model, f, (X, t), idx),
              lambda f, t: batch_ggn_operator(model, f, (X, t), idx))
    for make in makers:
        with pytest.raises(ValueError, match="broadcast"):
            make(mse, y)
        with pytest.warns(UserWarning, match="summed"):
            make(summed, y[:, None])
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*loss_fn")
            make(mse, y[:, None])


def test_ggn_of_an_output_with_non_tensor_leaves_is_refused_by_name():
    """An HF-style output {"logits": t, "loss": None} works with kind="hessian"; the
    Gauss–Newton operator, which differentiates the output itself, failed in its first
    product with torch.func's "expected f(*primals) to return only tensors"."""
    X, y = _data()

    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def forward(self, x):
            return {"logits": self.net(x), "loss": None}

    def loss(out, t):
        return F.cross_entropy(out["logits"], t)

    h, _ = _quiet(lambda: top_eigenvalues(Dict(), loss, (X, y), k=1))
    np.testing.assert_allclose(h, top_eigenvalues(_mlp(), F.cross_entropy, (X, y), k=1),
                               rtol=1e-8)
    with pytest.raises(TypeError, match=r"output\['loss'\] = NoneType.*kind='hessian'"):
        top_eigenvalues(Dict(), loss, (X, y), k=1, kind="ggn")


def _saturated_linear_net():
    """A linear 5 → 3 classifier fitted far beyond float32's softmax (margins > 25, where
    1 − p_y < eps₃₂ for margins above ~17) on 40 samples, with their labels."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 5, generator=g)
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    with torch.no_grad():
        net.weight.mul_(200.0)
        net.bias.zero_()
        top2 = net(X).topk(2, dim=1).values
        X = X[(top2[:, 0] - top2[:, 1]) > 25][:40]
        y = net(X).argmax(1)
    assert len(X) == 40 and float(F.cross_entropy(net(X), y)) < 1e-7
    return net, X, y


def test_a_saturated_softmax_in_float32_is_warned_about():
    """A fitted cross-entropy net whose softmax saturates (1 − p_y below float32's eps):
    torch's second derivative drops p_y(1 − p_y), and λ₁ came out 48 % low, flagged
    converged, with nothing said (an outside sweep). The float64 copy is right (dense
    oracle) and says nothing."""
    import warnings

    import torch.nn.functional as F

    import nets

    net, X, y = _saturated_linear_net()
    with pytest.warns(UserWarning, match="lost to torch.float32 round-off"):
        nets.hessian_operator(net, F.cross_entropy, (X, y))
    wide = torch.nn.Linear(5, 3).double()
    wide.load_state_dict(net.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        op = nets.hessian_operator(wide, F.cross_entropy, (X.double(), y))
    flat = torch.cat([wide.weight.detach().reshape(-1), wide.bias.detach()])

    def loss(w):
        return F.cross_entropy(X.double() @ w[:15].view(3, 5).T + w[15:], y)

    dense = torch.func.hessian(loss)(flat)
    top = float(torch.linalg.eigvalsh(dense)[-1])
    assert float(torch.linalg.eigvalsh(op.to_dense())[-1]) == pytest.approx(top, rel=1e-4)
    low = nets.hessian_operator(net, F.cross_entropy, (X, y))     # what float32 gives
    assert float(torch.linalg.eigvalsh(low.to_dense().double())[-1]) < 0.9 * top
    with warnings.catch_warnings():                    # an ordinary float32 net: silent
        warnings.simplefilter("error", UserWarning)
        nets.hessian_operator(torch.nn.Linear(5, 3), F.cross_entropy, (X, y))


def test_gradient_noise_warns_where_float32_loses_the_saturated_gradient():
    """With hessian=False no operator is built, so its curvature check never ran, and on a
    saturated float32 net torch's gradient drops the true class's term (p_y rounds to 1):
    tr Σ came out half the float64 value with nothing said (an outside sweep read 15–78 %
    off). The oracle: per-sample float64 gradients of the same linear map, written out."""
    import warnings

    import torch.nn.functional as F

    import nets

    net, X, y = _saturated_linear_net()
    with pytest.warns(UserWarning, match="gradient in the model's outputs is lost to torch.float32"):
        low = nets.gradient_noise(net, F.cross_entropy, (X, y), hessian=False)
    wide = torch.nn.Linear(5, 3).double()
    wide.load_state_dict(net.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        right = nets.gradient_noise(wide, F.cross_entropy, (X.double(), y), hessian=False)
    W, b, Xd = wide.weight.detach(), wide.bias.detach(), X.double()
    p = torch.softmax(Xd @ W.T + b, dim=1)
    r = p - F.one_hot(y, 3).double()                      # ∂ℓ_i/∂z_i, exact in float64
    G = torch.cat([(r[:, :, None] * Xd[:, None, :]).reshape(len(X), -1), r], dim=1)
    oracle = float(G.var(0, unbiased=True).sum())
    assert right.trace_cov == pytest.approx(oracle, rel=1e-9)
    assert abs(low.trace_cov / oracle - 1) > 0.15          # what float32 gives, unwarned before
    with warnings.catch_warnings():                    # an ordinary float32 net: silent
        warnings.simplefilter("error", UserWarning)
        nets.gradient_noise(torch.nn.Linear(5, 3), F.cross_entropy, (X, y), hessian=False)


def test_a_weighted_mean_or_broadcast_is_told_by_its_gradient_even_where_values_agree():
    """The check compared loss values only: on an untrained net (nearly equal per-sample
    losses) class weights [1, 1, 1, 10] read a ratio of 1.0004 and nothing was said, with
    λ₁ 2× the per-sample mean's; outputs all equal (a zero head) made a broadcast MSE equal
    to the per-sample one, and λ₁ then moved with chunk_size (an outside sweep). The
    oracle: the dense Hessian of the batch loss against the mean of the per-sample ones."""
    X, y = _data(N=24)
    model = _mlp()
    with torch.no_grad():                          # small logits: equal per-sample losses
        model[2].weight.mul_(1e-3)
        model[2].bias.zero_()
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 1, 1, 10], dtype=torch.float64))
    with torch.no_grad():
        out = model(X)
        per = torch.stack([weighted(out[i:i + 1], y[i:i + 1]) for i in range(len(X))])
        assert float(weighted(out, y)) == pytest.approx(float(per.mean()), rel=1e-2)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [(n, p.shape) for n, p in model.named_parameters()]

    def loss_on(idx, fn):
        def f(w):
            parts, i = {}, 0
            for n, s in shapes:
                parts[n] = w[i:i + s.numel()].view(s)
                i += s.numel()
            return fn(torch.func.functional_call(model, parts, (X[idx],)), y[idx])
        return f

    H = torch.func.hessian(loss_on(slice(None), weighted))(flat)
    H_mean = sum(torch.func.hessian(loss_on([i], weighted))(flat) for i in range(len(X))) / len(X)
    assert float((H - H_mean).norm()) > 0.5 * float(H_mean.norm())    # not a per-sample mean
    with pytest.warns(UserWarning, match="not the plain mean.*gradient in the outputs"):
        check_mean_reduced(model, weighted, (X, y))

    zero = _mlp(out=1)
    with torch.no_grad():
        zero[2].weight.zero_()
        zero[2].bias.fill_(0.3)
    t = torch.sin(X[:, 0])                          # (N,) against outputs (N, 1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = zero(X)
        assert float(F.mse_loss(o, t)) == pytest.approx(float(F.mse_loss(o, t[:, None])), rel=1e-12)
    with pytest.raises(ValueError, match=r"broadcast to \(24, 24\).*gradient in the outputs"):
        top_eigenvalues(zero, F.mse_loss, (X, t))
    _, said = _quiet(lambda: check_mean_reduced(model, F.cross_entropy, (X, y)))
    assert said == []                              # the plain mean, small logits: quiet


def test_a_loss_with_state_of_its_own_is_named_and_left_as_it_was():
    """A loss module updating a buffer in place got torch's raw functorch error (naming
    neither loss_fn nor the cause), after the checks had moved its buffer 1.0 → 1.26."""
    X, y = _data(N=12)
    model = _mlp()

    class Running(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.ones((), dtype=torch.float64))

        def forward(self, o, t):
            value = F.cross_entropy(o, t)
            with torch.no_grad():
                self.scale.mul_(0.9).add_(0.1 * value)
            return value / self.scale

    loss = Running()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="'Running' updates a tensor of its own in place"):
            top_eigenvalues(model, loss, (X, y))
    assert float(loss.scale) == 1.0


@pytest.mark.parametrize("case", ["label out of range", "float class targets",
                                  "one target per sample as (1,)"])
def test_targets_the_loss_cannot_take_are_named(case):
    """A loss that raises on the data's own targets is named with the outputs' and
    targets' shapes and dtypes, the loss's message kept (torch's IndexError and
    RuntimeErrors reached the user from inside the curvature code)."""
    from torch.utils.data import Dataset

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    model = nn.Linear(5, 3)
    if case == "label out of range":
        data, what = (X, torch.full((40,), 5)), "out of bounds"
    elif case == "float class targets":
        data, what = (X, y.float()), "float32"
    else:
        class OneEach(Dataset):
            def __len__(self):
                return 40

            def __getitem__(self, i):
                return X[i], y[i:i + 1]
        data, what = OneEach(), r"\(\d+, 1\) int64"
    for call in (lambda: predict_max_lr(model, F.cross_entropy, data, [8]),
                 lambda: top_eigenvalues(model, F.cross_entropy, data),
                 lambda: check_mean_reduced(model, F.cross_entropy, data)):
        with pytest.raises(ValueError, match=f"loss_fn 'cross_entropy' cannot be evaluated on data.*{what}"):
            call()


def test_a_model_with_every_parameter_frozen_is_named_as_such():
    model = nn.Sequential(nn.Linear(4, 3))
    model.requires_grad_(False)
    X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    for call in (lambda: top_eigenvalues(model, F.cross_entropy, (X, y)),
                 lambda: training_threshold(model, F.cross_entropy, (X, y), [4], seeds=(0,),
                                            steps=5)):
        with pytest.raises(ValueError, match="no trainable parameters"):
            call()


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_losses_that_need_more_than_two_samples_still_run(kind):
    """The operators' trial evaluates the loss on two samples; a loss that needs more (a
    top-k mean, groups of four, one that raises below three samples) is tried on 64 before
    it is refused — such losses ran before the named-targets check and still do."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(64, 5, generator=g), torch.randn(64, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))

    def topk(o, t):
        return ((o - t) ** 2).flatten().topk(8).values.mean()

    def groups(o, t):
        return ((o - t) ** 2).view(-1, 4).mean(1).mean()

    def needs_three(o, t):
        if len(t) < 3:
            raise ValueError("needs three samples")
        return F.mse_loss(o, t)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for loss in (topk, groups, needs_three):
            top = top_eigenvalues(model, loss, (X, y), kind=kind)
            assert np.isfinite(top).all() and top[0] > 0
