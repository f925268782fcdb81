"""Defaults that keep memory bounded and the user's state untouched at scale.

* An (X, y) pair or Dataset without `chunk_size` is split into chunks sized from the
  measured autograd graph per sample (it used to be one chunk of all N samples: one
  product on a 123k-parameter CNN with 10⁴ CIFAR-sized samples took 5.9 GB); the chunked
  operator must give the one-chunk operator's numbers.
* Reading a DataLoader leaves torch's global generator as it was.
* A layer torch itself loops over under vmap (the CPU LSTM) gives no warnings per call.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nets
import nets.curvature.operators as ops


def _conv(channels, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(channels, channels, 3, padding=1), nn.Tanh(),
                         nn.Flatten(), nn.Linear(channels * 16 * 16, 3)).double()


def _images(N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, 1, 16, 16, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (N,), generator=g))


def test_graph_memory_per_sample_is_measured_and_scales_with_the_activations():
    X, y = _images(8)
    small = nets.hessian_operator(_conv(2), F.cross_entropy, (X, y), chunk_size=8)
    big = nets.hessian_operator(_conv(8), F.cross_entropy, (X, y), chunk_size=8)
    a, b = small._graph_bytes_per_sample(), big._graph_bytes_per_sample()
    # saved activations ∝ channels (2·16·16 per conv and tanh), plus the input: per sample
    # at least the two tanh outputs, and at most a few copies of each activation
    assert 2 * 2 * 256 * 8 <= a <= 12 * 2 * 256 * 8 + 8 * 256 * 2
    assert 3.0 < b / a < 4.5


def test_a_large_pair_is_chunked_by_default_with_the_same_numbers(monkeypatch):
    X, y = _images(1100)                                    # 1100·256 inputs > 2^18
    model = _conv(4)
    monkeypatch.setattr(ops, "DEFAULT_CHUNK_BYTES", 4 << 20)          # a small machine
    op = nets.hessian_operator(model, F.cross_entropy, (X, y), cache_graph=False)
    per = ops.GRAPH_PRODUCT_FACTOR * op._graph_bytes_per_sample()
    assert op.chunk_size == int((4 << 20) // per) < 1100
    whole = nets.hessian_operator(model, F.cross_entropy, (X, y), chunk_size=1100,
                                  cache_graph=False)
    v = torch.randn(op.P, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(op @ v, whole @ v, rtol=1e-10, atol=1e-12)
    # an explicit chunk_size and train-mode batch statistics keep their meaning
    assert nets.hessian_operator(model, F.cross_entropy, (X, y), chunk_size=50).chunk_size == 50
    bn = nn.Sequential(nn.Flatten(), nn.Linear(256, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    train = nets.hessian_operator(bn, F.cross_entropy, (X, y), policy="train_batch_stats")
    assert train.chunk_size is None                       # one chunk: the full-batch statistics


def test_gradient_noise_keeps_within_an_explicit_memory_budget():
    """memory= below the default gave a *larger* per-sample chunk (500 MB: 1,265 samples
    against 256) and the Hessian pass held 32 products at once whatever the budget (8 GB,
    then out of memory, on a 14k-parameter CNN). The chunk is now capped as the default's
    is, the products per call fit the budget, and the numbers do not move."""
    import importlib

    gn = importlib.import_module("nets.noise.gradient_noise")   # the name is the function
    from nets.utils.data_source import as_data_source
    from nets.utils.memory import SAMPLE_CHUNK_CAP

    X, y = _images(300)
    model = _conv(4)
    ps = gn._PerSample(model, F.cross_entropy, None, None, None, None)
    src = as_data_source((X, y))
    default = gn._chunk(None, None, ps, src)
    for budget in (1 << 20, 50 << 20, 1 << 40):        # 1 MiB, 50 MiB, 1 TiB
        assert 1 <= gn._chunk(None, budget, ps, src) <= SAMPLE_CHUNK_CAP
    assert gn._chunk(None, 1 << 40, ps, src) == min(SAMPLE_CHUNK_CAP, 300) >= default
    H = nets.hessian_operator(model, F.cross_entropy, (X, y), chunk_size=50)
    per = ops.GRAPH_PRODUCT_FACTOR * H._graph_bytes_per_sample() * 50
    small = int(3.5 * per)
    assert gn._columns(H, 50, small, None) == 3        # three products' graphs fit
    assert gn._columns(H, 50, 1, None) == 1 and gn._columns(H, 50, 1 << 40, None) == 32
    ref = nets.gradient_noise(model, F.cross_entropy, (X, y), hessian_samples=40, seed=1,
                              chunk_size=50)
    tight = nets.gradient_noise(model, F.cross_entropy, (X, y), hessian_samples=40, seed=1,
                                chunk_size=50, memory=small)
    assert tight.tr_HSigma == pytest.approx(ref.tr_HSigma, rel=1e-10)
    assert tight.gHg == pytest.approx(ref.gHg, rel=1e-10)


def test_small_data_stay_one_chunk():
    X, y = _images(40)
    assert nets.hessian_operator(_conv(2), F.cross_entropy, (X, y)).chunk_size is None


def test_reading_a_dataloader_leaves_the_global_generator_alone():
    X, y = _images(64)
    loader = DataLoader(TensorDataset(X, y), batch_size=16)
    model = _conv(2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    op = nets.hessian_operator(model, F.cross_entropy, loader)
    op @ torch.ones(op.P, dtype=torch.float64)
    assert torch.equal(torch.get_rng_state(), before)


class _Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, 6)
        self.lstm = nn.LSTM(6, 5, batch_first=True)
        self.out = nn.Linear(5, 3)

    def forward(self, tokens):
        h, _ = self.lstm(self.emb(tokens))
        return self.out(h[:, -1])


def test_an_lstm_gives_no_vmap_fallback_warnings():
    g = torch.Generator().manual_seed(3)
    tokens, y = torch.randint(0, 12, (48, 7), generator=g), torch.randint(0, 3, (48,), generator=g)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*performance drop.*")
        pred = nets.predict_batch_top_eigenvalue(_Tagger(), F.cross_entropy, (tokens, y),
                                                 [4, 16], form="directional")
    assert pred["directional"][0] > pred["directional"][1] > pred["lam"] > 0


if __name__ == "__main__":       # pragma: no cover
    pytest.main([__file__, "-q"])
