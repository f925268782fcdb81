"""Each chunk's share of a weighted-mean loss (nets.curvature.chunk_shares).

Oracles: dense float64 `torch.func.hessian` of the loss on all samples at once (one
evaluation, no chunks), the loss itself on all samples, and the shares written out from
the targets (class weights summed per chunk)."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import flat_dense_hessian
from torch import nn

from nets import hessian_operator, top_eigenvalues
from nets.curvature.chunk_shares import data_shares, full_data_loss, loss_shares
from nets.lr_search import training_threshold


def _sorted_problem(N=48, seed=0):
    """A float64 4-class MLP; targets sorted by class so chunks differ in their weights."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(N, 5, dtype=torch.float64, generator=g)
    y = torch.sort(torch.randint(0, 4, (N,), generator=g)).values
    return model, X, y


WEIGHT = torch.tensor([4.0, 1.0, 0.5, 2.0], dtype=torch.float64)


def _class_weighted(o, t):
    return F.cross_entropy(o, t, weight=WEIGHT)


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def test_shares_of_class_weights_are_the_weights_summed_per_chunk():
    model, X, y = _sorted_problem()
    with torch.no_grad():
        chunks = [(len(y[i:i + 10]), model(X[i:i + 10]), y[i:i + 10]) for i in range(0, len(X), 10)]
    got = loss_shares(_class_weighted, chunks, len(X))
    W = np.array([float(WEIGHT[y[i:i + 10]].sum()) for i in range(0, len(X), 10)])
    np.testing.assert_allclose(got, W / W.sum(), rtol=1e-12)
    # the loss put back together from its chunks is the loss on all samples
    with torch.no_grad():
        whole = float(_class_weighted(model(X), y))
    shares = data_shares(model, _class_weighted, X, y, 10)
    assert full_data_loss(model, _class_weighted, X, y, 10, shares) == pytest.approx(whole, rel=1e-12)


def test_a_plain_mean_keeps_the_sample_counts_exactly():
    model, X, y = _sorted_problem()
    with torch.no_grad():
        chunks = [(len(y[i:i + 10]), model(X[i:i + 10]), y[i:i + 10]) for i in range(0, len(X), 10)]
    assert loss_shares(F.cross_entropy, chunks, len(X)) == [10 / 48] * 4 + [8 / 48]
    assert data_shares(model, F.cross_entropy, X, y, 10) is None
    # a loss that couples the samples or is not a mean: the counts, with a warning that
    # chunked numbers of it are not exact (the root mean square passes the gradient's
    # parallel test on one output per sample; its value gives it away)
    coupled = lambda o, t: F.cross_entropy(o - o.mean(0), t)
    rmse = lambda o, t: F.mse_loss(o[:, 0], t.double()).sqrt()
    for loss in (coupled, rmse):
        with pytest.warns(UserWarning, match="share of the loss could not be read"):
            assert loss_shares(loss, chunks, len(X)) == [10 / 48] * 4 + [8 / 48]


def test_tuple_outputs_keep_the_counts_and_chunking_stays_exact():
    """Outputs given as a tuple are not split here: the shares are the sample counts (a
    tuple's len() is its number of items: chunks weighted 2/N each gave λ₁ −63 %)."""
    model, X, y = _sorted_problem()

    class Pair(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            z = self.inner(x)
            return z, z.detach()

    net = Pair(model)
    loss = lambda out, t: F.cross_entropy(out[0], t)
    lam = float(torch.linalg.eigvalsh(flat_dense_hessian(model, F.cross_entropy, X, y))[-1])
    got = _quiet(lambda: top_eigenvalues(net, loss, (X, y), k=1, chunk_size=7))
    assert float(got[0]) == pytest.approx(lam, rel=1e-10)


def test_a_reference_is_found_past_a_chunks_first_ignored_samples():
    """Only the last two targets of each chunk of 10 count: the reference must be looked
    for beyond the first eight samples (it fell back to the counts: λ₁ +31 %)."""
    model, X, y = _sorted_problem(N=30)
    yi = torch.where(torch.arange(30) % 10 < 8, -100, y)
    loss = lambda o, t: F.cross_entropy(o, t, ignore_index=-100)
    lam = float(torch.linalg.eigvalsh(flat_dense_hessian(model, loss, X, yi))[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)            # no fallback warning
        warnings.filterwarnings("ignore", message=".*not the plain mean")
        got = top_eigenvalues(model, loss, (X, yi), k=1, chunk_size=10)
    assert float(got[0]) == pytest.approx(lam, rel=1e-10)


@pytest.mark.parametrize("chunk", [7, 16])
def test_chunked_curvature_of_a_weighted_mean_is_exact(chunk):
    """Class weights on class-sorted data: chunks weighted by sample counts moved λ₁ by a
    few per cent (n_b/N is not the chunk's share of the loss); the dense Hessian of the
    loss on all samples is the oracle, for chunk_size and a DataLoader alike."""
    model, X, y = _sorted_problem()
    lam = float(torch.linalg.eigvalsh(flat_dense_hessian(model, _class_weighted, X, y))[-1])
    by_chunk = _quiet(lambda: top_eigenvalues(model, _class_weighted, (X, y), k=1,
                                              chunk_size=chunk))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=chunk)
    by_loader = _quiet(lambda: top_eigenvalues(model, _class_weighted, loader, k=1))
    assert float(by_chunk[0]) == pytest.approx(lam, rel=1e-8)
    assert float(by_loader[0]) == pytest.approx(lam, rel=1e-8)
    # the counts' weighting, the earlier behaviour, is measurably off here
    op = _quiet(lambda: hessian_operator(model, _class_weighted, (X, y), chunk_size=chunk))
    assert op._shares != pytest.approx([len(b[0]) / len(X) for b in op.iter_batches()], rel=1e-3)


def test_a_chunk_whose_every_target_is_ignored_drops_out():
    """The first 10 targets ignored, chunks of 8: the first chunk's own loss is 0/0. It
    was counted as 8 of 48 samples (λ₁ low by 8/48) and made training_threshold refuse a
    NaN start loss; it now adds nothing, as in the loss on all samples."""
    model, X, y = _sorted_problem()
    yi = torch.where(torch.arange(len(y)) < 10, -100, y)
    loss = lambda o, t: F.cross_entropy(o, t, ignore_index=-100)
    lam = float(torch.linalg.eigvalsh(flat_dense_hessian(model, loss, X, yi))[-1])
    got = _quiet(lambda: top_eigenvalues(model, loss, (X, yi), k=1, chunk_size=8))
    assert float(got[0]) == pytest.approx(lam, rel=1e-8)
    with torch.no_grad():
        whole = float(loss(model(X), yi))
    assert full_data_loss(model, loss, X, yi, 8, data_shares(model, loss, X, yi, 8)) == \
        pytest.approx(whole, rel=1e-12)
    kw = dict(steps=10, seeds=(0,), lr0=0.5, rel_tol=0.1)
    one = _quiet(lambda: training_threshold(model, loss, (X, yi), [8], **kw))
    chunked = _quiet(lambda: training_threshold(model, loss, (X, yi), [8], chunk_size=8, **kw))
    np.testing.assert_allclose(chunked.lr, one.lr, rtol=1e-12)


def test_one_chunk_matching_its_count_does_not_turn_the_others_plain():
    """Class weights 4, 1, ½, 2: chunk 0 weighs 20 of 60 (its share is its count, ⅓),
    chunks 1 and 2 weigh 10 and 30: every share must still be its weight's (a check of
    'all chunks plain' read as 'any' would put every chunk back on the counts)."""
    model, X, y = _sorted_problem(N=30)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1] + [1] * 10 + [3] * 5 + [0] * 5)
    with torch.no_grad():
        chunks = [(10, model(X[i:i + 10]), y[i:i + 10]) for i in range(0, 30, 10)]
    W = np.array([float(WEIGHT[y[i:i + 10]].sum()) for i in range(0, 30, 10)])
    got = loss_shares(_class_weighted, chunks, 30)
    np.testing.assert_allclose(W, [20, 10, 30])
    np.testing.assert_allclose(got, W / W.sum(), rtol=1e-12)


def test_full_data_loss_by_counts_over_a_ragged_last_chunk():
    """The plain path Σ_b n_b·L_b / N against the loss on all samples (chunks of 7 over
    48 samples: a last chunk of 6)."""
    model, X, y = _sorted_problem()
    with torch.no_grad():
        whole = float(F.cross_entropy(model(X), y))
    assert full_data_loss(model, F.cross_entropy, X, y, 7) == pytest.approx(whole, rel=1e-13)


def test_a_share_above_one_is_refused_with_the_counts():
    """A 'loss' in which the appended sample's gradient grows with the chunk (its share
    t = n_b + 1 > 1) is not a weighted mean: the counts, with a warning naming the share,
    never a zero share."""
    model, X, y = _sorted_problem()
    grows = lambda o, t: F.cross_entropy(o, t, reduction="sum") * len(t) / 100.0
    with torch.no_grad():
        chunks = [(len(y[i:i + 10]), model(X[i:i + 10]), y[i:i + 10]) for i in range(0, 48, 10)]
    with pytest.warns(UserWarning, match=r"share of a chunk read 11, not in \(0, 1\]"):
        assert loss_shares(grows, chunks, 48) == [10 / 48] * 4 + [8 / 48]


def test_output_dependent_weights_are_refused_in_float32_too():
    """A focal loss normalised by its own factors, in float32 with float32 class weights
    a float64 copy cannot take: the checks run in float32 with slack 1e-4 (it fails them by
    ~4 %), so the counts come back with a warning (with slack 0.1 its shares were taken:
    λ₁ −15 %)."""
    model, X, y = _sorted_problem()
    model = model.float()
    w32 = WEIGHT.float()

    def focal(o, t):
        ce = F.cross_entropy(o, t, weight=w32, reduction="none")
        f = (1.0 - torch.exp(-F.cross_entropy(o, t, reduction="none"))) ** 2
        return (f * ce).sum() / (f * w32[t]).sum()

    with torch.no_grad():
        chunks = [(len(y[i:i + 10]), model(X[i:i + 10].float()), y[i:i + 10])
                  for i in range(0, 48, 10)]
    with pytest.warns(UserWarning, match="not a target-weighted mean"):
        assert loss_shares(focal, chunks, 48) == [10 / 48] * 4 + [8 / 48]
    # a genuine weighted mean on the same float32 path passes, to float32 round-off
    weighted = lambda o, t: F.cross_entropy(o, t, weight=w32)
    W = np.array([float(WEIGHT[y[i:i + 10]].sum()) for i in range(0, 48, 10)])
    np.testing.assert_allclose(loss_shares(weighted, chunks, 48), W / W.sum(), rtol=1e-5)


def test_shares_are_read_under_inference_mode():
    model, X, y = _sorted_problem()
    with torch.inference_mode():
        chunks = [(len(y[i:i + 10]), model(X[i:i + 10]), y[i:i + 10]) for i in range(0, 48, 10)]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = loss_shares(_class_weighted, chunks, 48)
            assert loss_shares(F.cross_entropy, chunks, 48) == [10 / 48] * 4 + [8 / 48]
    W = np.array([float(WEIGHT[y[i:i + 10]].sum()) for i in range(0, 48, 10)])
    np.testing.assert_allclose(got, W / W.sum(), rtol=1e-12)


def test_evaluate_reports_the_weighted_loss_in_chunks():
    from nets.training.loops import evaluate

    model, X, y = _sorted_problem()
    with torch.no_grad():
        whole = float(_class_weighted(model(X), y))
    loss, acc = evaluate(model, _class_weighted, (X, y), chunk_size=7)
    assert loss == pytest.approx(whole, rel=1e-12)
    plain, _ = evaluate(model, F.cross_entropy, (X, y), chunk_size=7)
    with torch.no_grad():
        assert plain == pytest.approx(float(F.cross_entropy(model(X), y)), rel=1e-13)
