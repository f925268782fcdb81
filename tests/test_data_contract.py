"""The data contract: an (X, y) pair, a torch Dataset of (x, y) samples and a
non-shuffling DataLoader give the same numbers (1e-6) at every data-taking entry point;
shuffling loaders and one-shot iterators are refused with clear errors.

The oracle for "same numbers" is the pair form itself: the forms share the arithmetic
after the data are read, so any difference is a data-handling bug (order, weighting of
uneven batches, dropped or duplicated samples)."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

import nets
from nets.noise.gradient_noise import gradient_noise
from nets.noise.subspace_noise import subspace_noise
from nets.training import evaluate, train
from nets.utils.data_source import as_data_source

RTOL = 1e-6


class SampleDataset(Dataset):
    """A map-style Dataset returning (x, int) samples, as user code often does."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], int(self.y[i])


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    N, d, C = 37, 5, 3
    X = torch.randn(N, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(d, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, C)).double()
    return model, X, y


def _forms(X, y):
    """Same data in every accepted form (uneven last batches on purpose)."""
    return {
        "pair": (X, y),
        "numpy_pair": (X.numpy(), y.numpy()),
        "tensor_dataset": TensorDataset(X, y),
        "sample_dataset": SampleDataset(X, y),
        "loader": DataLoader(TensorDataset(X, y), batch_size=8, shuffle=False),
        "loader_of_samples": DataLoader(SampleDataset(X, y), batch_size=10),
        "list_of_batches": [(X[i:i + 11], y[i:i + 11]) for i in range(0, len(X), 11)],
    }


def test_data_source_reads_every_form_in_order(problem):
    _, X, y = problem
    for name, data in _forms(X, y).items():
        src = as_data_source(data)
        assert src.N == len(X), name
        Xa, ya = src.tensors()
        np.testing.assert_array_equal(Xa.numpy(), X.numpy(), err_msg=name)
        np.testing.assert_array_equal(ya.numpy(), y.numpy(), err_msg=name)
        idx = np.array([5, 0, 36, 5])
        Xt, yt = src.take(idx)
        np.testing.assert_array_equal(Xt.numpy(), X[idx].numpy(), err_msg=name)
        np.testing.assert_array_equal(yt.numpy(), y[idx].numpy(), err_msg=name)
        got = torch.cat([xb for xb, _ in src.batches(chunk_size=7)])
        np.testing.assert_array_equal(got.numpy(), X.numpy(), err_msg=name)



def test_an_index_equal_to_N_is_refused_with_the_argument_named(problem):
    """Sample positions lie in [0, N): N itself (one past the end) is refused by the
    package's own ValueError naming the argument, in every form, before any read; N − 1
    and 0 are accepted."""
    from nets.utils.data_source import check_indices
    _, X, y = problem
    N = len(X)
    for name, data in _forms(X, y).items():
        src = as_data_source(data)
        with pytest.raises(ValueError, match=rf"indices must lie in \[0, {N}\)"):
            src.take([0, N])
        Xt, _ = src.take([N - 1, 0])
        np.testing.assert_array_equal(Xt.numpy(), X[[N - 1, 0]].numpy(), err_msg=name)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 5\), got range \[2, 5\]"):
        check_indices(np.array([2, 5]), 5, name="rows")
    with pytest.raises(ValueError, match="rows must lie"):
        check_indices([-1, 0], 5, name="rows")
    assert check_indices([4, 0, 4], 5).tolist() == [4, 0, 4]

class NumpySampleDataset(Dataset):
    """A Dataset returning numpy samples, the target a 0-d array (arr[i] of a numpy-backed
    dataset after .numpy())."""

    def __init__(self, X, y):
        self.X, self.y = X.numpy(), y.numpy()

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], np.asarray(self.y[i])


def test_zero_d_numpy_targets_stay_per_sample_scalars(problem):
    """The oracle: the pair form's targets (N,) and its eigenvalues; a 0-d numpy target is
    one number per sample, read as targets (N,), not (N, 1)."""
    model, X, y = problem
    data = NumpySampleDataset(X, y)
    assert data[0][1].shape == ()
    Xt, yt = as_data_source(data).take([0, 1, 2])
    assert tuple(yt.shape) == (3,)
    np.testing.assert_array_equal(yt.numpy(), y[:3].numpy())
    np.testing.assert_allclose(nets.top_eigenvalues(model, F.cross_entropy, data, k=1),
                               nets.top_eigenvalues(model, F.cross_entropy, (X, y), k=1),
                               rtol=RTOL)


def test_a_loader_without_batching_is_read_as_its_dataset(problem):
    """DataLoader(batch_size=None) yields single samples (its collate_fn applied to each):
    read as its Dataset, the pair's numbers (the oracle); a plain iterable of per-sample
    pairs is refused with a message naming its type, not 'a list'."""
    model, X, y = problem
    loader = DataLoader(NumpySampleDataset(X, y), batch_size=None)
    src = as_data_source(loader)
    assert src.N == len(X) and src.form == "dataset"
    Xa, ya = src.tensors()
    np.testing.assert_array_equal(Xa.numpy(), X.numpy())
    np.testing.assert_array_equal(ya.numpy(), y.numpy())
    np.testing.assert_allclose(nets.top_eigenvalues(model, F.cross_entropy, loader, k=2),
                               nets.top_eigenvalues(model, F.cross_entropy, (X, y), k=2),
                               rtol=RTOL)

    class Samples:
        def __iter__(self):
            return iter([(X[i], y[i]) for i in range(len(X))])

    with pytest.raises(ValueError, match="a Samples is read as \\(x, y\\) batches"):
        nets.top_eigenvalues(model, F.cross_entropy, Samples(), k=1)


@pytest.mark.parametrize("form", ["tensor_dataset", "sample_dataset", "loader",
                                  "loader_of_samples", "list_of_batches", "numpy_pair"])
def test_curvature_entry_points_agree_across_forms(problem, form):
    model, X, y = problem
    data = _forms(X, y)[form]
    ref = nets.top_eigenvalues(model, F.cross_entropy, (X, y), k=2)
    np.testing.assert_allclose(nets.top_eigenvalues(model, F.cross_entropy, data, k=2), ref,
                               rtol=RTOL)
    np.testing.assert_allclose(
        nets.top_eigenvalues(model, F.cross_entropy, data, k=1, kind="ggn", chunk_size=5),
        nets.top_eigenvalues(model, F.cross_entropy, (X, y), k=1, kind="ggn"), rtol=RTOL)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2))
    Hv = nets.hessian_operator(model, F.cross_entropy, data).matvec(v)
    Hv_ref = nets.hessian_operator(model, F.cross_entropy, (X, y)).matvec(v)
    np.testing.assert_allclose(Hv.numpy(), Hv_ref.numpy(), rtol=RTOL, atol=1e-12)
    idx = np.array([3, 30, 7, 11])
    HBv = nets.batch_hessian_operator(model, F.cross_entropy, data, idx).matvec(v)
    HBv_ref = nets.batch_hessian_operator(model, F.cross_entropy, (X, y), idx).matvec(v)
    np.testing.assert_allclose(HBv.numpy(), HBv_ref.numpy(), rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("form", ["tensor_dataset", "loader", "list_of_batches"])
def test_noise_entry_points_agree_across_forms(problem, form):
    model, X, y = problem
    data = _forms(X, y)[form]
    P = sum(p.numel() for p in model.parameters())
    u = np.random.default_rng(3).standard_normal(P)
    for fn, kw in ((nets.directional_noise, dict(u=u)),
                   (nets.directional_noise, dict(u=u, micro_batch=3, seed=4)),
                   (nets.isotropic_noise, dict(num_probes=3, seed=5))):
        kw = dict(kw)
        args = (kw.pop("u"),) if "u" in kw else ()
        got = fn(model, F.cross_entropy, data, *args, chunk_size=4, **kw)
        ref = fn(model, F.cross_entropy, (X, y), *args, **kw)
        assert got.s2 == pytest.approx(ref.s2, rel=RTOL), (fn.__name__, kw)
        assert got.stderr == pytest.approx(ref.stderr, rel=RTOL, nan_ok=True)
    sn, sn_ref = (subspace_noise(model, F.cross_entropy, d, k=2, seed=1) for d in (data, (X, y)))
    np.testing.assert_allclose(sn.S, sn_ref.S, rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(sn.D, sn_ref.D, rtol=RTOL, atol=1e-12)
    gn, gn_ref = (gradient_noise(model, F.cross_entropy, d, chunk_size=6, hessian_samples=9,
                                 seed=2) for d in (data, (X, y)))
    np.testing.assert_allclose(gn.var, gn_ref.var, rtol=RTOL)
    assert gn.B_noise == pytest.approx(gn_ref.B_noise, rel=RTOL)


def test_training_and_learner_accept_every_form(problem):
    model, X, y = problem
    ref_loss = evaluate(model, F.cross_entropy, (X, y))[0]
    for name, data in _forms(X, y).items():
        assert evaluate(model, F.cross_entropy, data, chunk_size=5)[0] == pytest.approx(
            ref_loss, rel=1e-12), name
    results = []
    for data in ((X, y), DataLoader(TensorDataset(X, y), batch_size=16)):
        m = copy.deepcopy(model)
        results.append(train(m, F.cross_entropy, data, epochs=2, lr=0.1, batch_size=8, seed=0).losses)
    np.testing.assert_array_equal(results[0], results[1])
    opt = nets.CurvatureAdaptiveSGD(model, F.cross_entropy, SampleDataset(X, y), batch_size=8,
                                    curvature_batch_size=12)
    assert opt.N == len(X)


def test_refused_forms_have_clear_errors(problem):
    model, X, y = problem
    shuffling = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)
    with pytest.raises(ValueError, match="shuffl"):
        nets.top_eigenvalues(model, F.cross_entropy, shuffling)
    with pytest.raises(ValueError, match="shuffl"):
        nets.directional_noise(model, F.cross_entropy, shuffling, np.ones(57))
    gen = ((X[i:i + 8], y[i:i + 8]) for i in range(0, len(X), 8))
    with pytest.raises(TypeError, match="one-shot"):
        nets.top_eigenvalues(model, F.cross_entropy, gen)
    with pytest.raises(TypeError, match="data must be"):
        nets.top_eigenvalues(model, F.cross_entropy, X)
    with pytest.raises(TypeError, match=r"data\[0\] must be an \(x, y\) batch"):
        nets.top_eigenvalues(model, F.cross_entropy, [X[0], X[1], X[2]])
    with pytest.raises(ValueError, match="empty"):
        nets.top_eigenvalues(model, F.cross_entropy, TensorDataset(X[:0], y[:0]))
    Xn = X.clone()
    Xn[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        nets.top_eigenvalues(model, F.cross_entropy, DataLoader(TensorDataset(Xn, y), batch_size=8))


def test_options_after_the_data_are_keyword_only(problem):
    model, X, y = problem
    with pytest.raises(TypeError):
        nets.top_eigenvalues(model, F.cross_entropy, (X, y), 1, "hessian")
    with pytest.raises(TypeError):
        nets.directional_noise(model, F.cross_entropy, (X, y), np.ones(57), 2)
    with pytest.raises(TypeError):
        nets.hessian_operator(model, F.cross_entropy, (X, y), None)


def _dense_top(model, X, y):
    """λ_max of the mean-loss Hessian on (X, y) by torch.func (the oracle)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    flat = torch.cat([params[k].reshape(-1) for k in names])

    def loss(w):
        out, i = {}, 0
        for k in names:
            n = params[k].numel()
            out[k] = w[i:i + n].reshape(params[k].shape)
            i += n
        return F.cross_entropy(torch.func.functional_call(model, out, (X,)), y)
    return float(torch.linalg.eigvalsh(torch.func.hessian(loss)(flat))[-1])


def test_loaders_reading_part_of_their_dataset(problem):
    """A sequential sampler over fewer samples than the dataset, and a BatchSampler with
    drop_last=True given as batch_sampler, were accepted with N = len(dataset): the
    products added up the samples read and divided by the dataset's length (λ₁ 23 % low),
    while the per-sample passes read every sample. The first is refused now, the second
    read as the samples it yields (with the drop_last warning); a user's own batch
    sampler that yields every index once in order works (it raised AttributeError)."""
    from torch.utils.data import BatchSampler, SequentialSampler

    model, X, y = problem
    ds = TensorDataset(X, y)
    with pytest.raises(ValueError, match="covers 30 of its dataset's 37"):
        nets.top_eigenvalues(model, F.cross_entropy,
                             DataLoader(ds, sampler=SequentialSampler(range(30)), batch_size=8))
    dropping = DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 8, drop_last=True))
    with pytest.warns(UserWarning, match="drop_last=True, so 5"):
        top = nets.top_eigenvalues(model, F.cross_entropy, dropping)[0]
    np.testing.assert_allclose(top, _dense_top(model, X[:32], y[:32]), rtol=1e-8)
    own = [list(range(i, min(i + 8, len(X)))) for i in range(0, len(X), 8)]
    top = nets.top_eigenvalues(model, F.cross_entropy, DataLoader(ds, batch_sampler=own))[0]
    np.testing.assert_allclose(top, _dense_top(model, X, y), rtol=1e-8)
    with pytest.raises(ValueError, match="batch_sampler"):
        nets.top_eigenvalues(model, F.cross_entropy, DataLoader(ds, batch_sampler=own[::-1]))


def test_random_augmentation_in_collate_is_refused(problem):
    """Noise added in a DataLoader's collate_fn (a MixUp-style recipe) was not seen:
    three identical calls gave three top eigenvalues. Refused now, like random
    augmentation in a Dataset's __getitem__, and torch's generator is left as it was."""
    from torch.utils.data import default_collate

    model, X, y = problem

    def noisy(batch):
        x, t = default_collate(batch)
        return x + 0.1 * torch.randn_like(x), t

    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match="collate_fn gives other batches"):
        nets.top_eigenvalues(model, F.cross_entropy,
                             DataLoader(TensorDataset(X, y), batch_size=8, collate_fn=noisy))
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ValueError, match="first batch differs"), warnings.catch_warnings():
        warnings.simplefilter("ignore")              # the drop_last warning
        nets.top_eigenvalues(model, F.cross_entropy, DataLoader(
            TensorDataset(X, y), batch_size=8, collate_fn=noisy, drop_last=True))


def test_dict_inputs_are_refused_with_what_to_wrap():
    """Several inputs per sample as a dict: given as an (inputs, y) pair (read as a list of
    batches) or as a Dataset's samples, the message says to wrap the model."""
    from torch.utils.data import Dataset

    import nets

    N = 12
    X1, X2, y = torch.randn(N, 3), torch.randn(N, 2), torch.randint(0, 2, (N,))

    class DictNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.a(x["a"]) + self.b(x["b"])

    class Samples(Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            return {"a": X1[i], "b": X2[i]}, y[i]

    for data in (({"a": X1, "b": X2}, y), Samples()):
        with pytest.raises(TypeError, match="wrap the model so that it takes one tensor"):
            nets.top_eigenvalues(DictNet(), torch.nn.functional.cross_entropy, data)


def test_train_batch_stats_is_one_chunk_for_every_form():
    """Under policy="train_batch_stats" the default is one chunk whose statistics are the
    full data's: a DataLoader's own batches and a Dataset's reading chunks (1,024 samples)
    gave other eigenvalues than the (X, y) pair (1.3 % apart on a BatchNorm MLP)."""
    g = torch.Generator().manual_seed(0)
    N = 1100
    X, y = torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Tanh(), torch.nn.Linear(8, 3)).double().train()
    forms = {"pair": (X, y), "dataset": TensorDataset(X, y),
             "loader": DataLoader(TensorDataset(X, y), batch_size=50)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        top = {k: nets.top_eigenvalues(model, F.cross_entropy, d, policy="train_batch_stats",
                                       dtype=torch.float64)[0] for k, d in forms.items()}
        chunked = nets.top_eigenvalues(model, F.cross_entropy, (X, y), chunk_size=50,
                                       policy="train_batch_stats", dtype=torch.float64)[0]
    assert abs(top["dataset"] / top["pair"] - 1) < 1e-10
    assert abs(top["loader"] / top["pair"] - 1) < 1e-10
    assert abs(chunked / top["pair"] - 1) > 1e-4        # chunks of 50 do differ: asked for


# ------------------------------------------------ mutation audit, round 3 (data_source)

def test_integer_targets_of_any_width_become_int64():
    X = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    for dt in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        src = as_data_source((X, y.to(dt)))
        _, yt = src.take([0, 3, 5])
        assert yt.dtype == torch.int64 and yt.tolist() == [0, 1, 2]
        assert all(yb.dtype == torch.int64 for _, yb in src.batches(chunk_size=4))


class _LastItemAugmented(Dataset):
    """Fixed samples except the last, which is drawn afresh on every read."""

    def __init__(self, n=5):
        self.X = torch.arange(2.0 * n, dtype=torch.float64).reshape(n, 2)

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        x = self.X[i] + (torch.rand(2, dtype=torch.float64) if i == len(self) - 1 else 0.0)
        return x, torch.tensor(i % 2)


def test_random_augmentation_in_the_last_item_is_refused():
    with pytest.raises(ValueError, match=r"item 4 of the dataset differs"):
        as_data_source(_LastItemAugmented(5))


def test_an_iterable_readable_once_or_running_dry_is_refused_clearly(problem):
    """An object whose __iter__ hands back one stored generator failed inside zip ("not
    enough values to unpack") after the count used the batches up (an outside trial); a
    stream that gives fewer samples on a later read was read as it came."""
    model, X, y = problem

    class Once:
        def __init__(self):
            self.gen = ((X[i:i + 8], y[i:i + 8]) for i in range(0, len(X), 8))

        def __iter__(self):
            return self.gen

    class Dry:                      # full on the first two reads (count, check), then short
        reads = 0

        def __iter__(self):
            Dry.reads += 1
            n = len(X) if Dry.reads <= 2 else len(X) - 8
            return iter([(X[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)])

    with pytest.raises(TypeError, match="one-shot"):
        nets.top_eigenvalues(model, F.cross_entropy, Once())
    with pytest.raises(ValueError, match=f"samples on this read and {len(X)} on the first"):
        nets.top_eigenvalues(model, F.cross_entropy, Dry())
