"""Shared small test problems and dense float64 oracles.

Fixtures (each returns a function, so a test can pick seeds and sizes):

* `tiny_mlp(seed=0, N=30, heavy=())` – a float64 5→6→3 tanh MLP (P = 57) and N
  classification samples with 3 classes; inputs of the samples in `heavy` are scaled ×6.
* `dense_hessian(model, loss_fn, X, y)` – the exact Hessian ∇²_w loss_fn(model_w(X), y)
  (P, P) by `torch.func.hessian`, w the concatenation of `model.named_parameters()` in
  order (each flattened row-major); buffers are held fixed.
* `per_sample_hessians(model, loss_fn, X, y)` – the dense per-sample Hessians H_i
  (N, P, P), their mean H and the eigenpairs of H in descending order.

These are independent of the package: no operator or parameter layout of `nets` is used.
`import_benchmark(name)` imports a script of `benchmarks/` (for tests of its own helpers).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dense_oracles import flat_state
from torch import nn


def build_tiny_mlp(seed=0, N=30, heavy=()):
    """A float64 5→6→3 tanh MLP (initialised from `torch.manual_seed(seed)`) and data
    (X (N, 5), y (N,)) from a generator seeded `seed + 1`; samples listed in `heavy` get
    inputs scaled ×6 (large per-sample curvature)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(N, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    for i in heavy:
        X[i] *= 6.0
    return model, X, y


def flat_dense_hessian(model, loss_fn, X, y):
    """∇²_w loss_fn(model_w(X), y) at the model's current weights, by torch.func.hessian
    on the flat vector of all named parameters (detached; buffers fixed)."""
    flat, state = flat_state(model)
    return torch.func.hessian(
        lambda w: loss_fn(torch.func.functional_call(model, state(w), (X,)), y))(flat)


def same_weights(a, b) -> bool:
    """Whether two modules hold bit-for-bit equal parameters (a benchmark's training,
    run twice, is reproducible)."""
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def per_sample_dense_hessians(model, loss_fn, X, y):
    """(Hs, H, ev, V): Hs[i] = ∇²ℓ_i (N, P, P) as numpy float64, H = mean_i Hs[i], and
    its eigenvalues `ev` in descending order with eigenvectors as the columns of `V`."""
    Hs = np.stack([flat_dense_hessian(model, loss_fn, X[i:i + 1], y[i:i + 1]).numpy()
                   for i in range(X.shape[0])])
    H = Hs.mean(axis=0)
    ev, V = np.linalg.eigh(H)
    return Hs, H, ev[::-1].copy(), V[:, ::-1].copy()


def spiked_least_squares(N=200, d=20, seed=1, spike=10.0):
    """Least squares with one design direction `spike`× the others (a well separated top
    eigenvalue, the directional model's premise): (X (N, d), λ₁, s_u²) with H = XᵀX/N,
    u its top eigenvector and s_u² the per-sample variance of H_i u (ddof 1), by numpy."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, d))
    X[:, 0] *= spike
    H = X.T @ X / N
    lam_all, V = np.linalg.eigh(H)
    lam, u = lam_all[-1], V[:, -1]
    Hu = X * (X @ u)[:, None]
    return X, lam, ((Hu - H @ u) ** 2).sum() / (N - 1)


@pytest.fixture(scope="session")
def tiny_mlp():
    return build_tiny_mlp


@pytest.fixture(scope="session")
def dense_hessian():
    return flat_dense_hessian


@pytest.fixture(scope="session")
def per_sample_hessians():
    return per_sample_dense_hessians


def import_benchmark(name: str):
    """The module `benchmarks/<name>.py`, imported with that folder briefly on sys.path
    (its scripts import each other and `_common` by plain name)."""
    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(bench)
