"""The linearised network's Hessian operator of `benchmarks/bench_network_nonlinearity.py`
against a dense float64 `torch.func.hessian` of the linearised loss e ↦ CE(z₀ + J e)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_mlp, import_benchmark


@pytest.fixture(scope="module")
def bench():
    return import_benchmark("bench_network_nonlinearity")


def _dense(op):
    return op.matmat(torch.eye(op.P, dtype=torch.float64))


@pytest.mark.parametrize("scale", [0.0, 0.7])
def test_linearized_hessian_matches_dense_oracle(bench, scale):
    from nets.learning_rates.linearized import output_jacobians

    model, X, y = build_tiny_mlp(2, N=20)
    J, z0 = output_jacobians(model, X, dtype=torch.float64)
    e = scale * torch.randn(J.shape[2], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    dense = torch.func.hessian(lambda w: F.cross_entropy(z0 + torch.einsum("nkp,p->nk", J, w), y))(e)
    got = _dense(bench.LinearizedHessian(J, z0, e))
    torch.testing.assert_close(got, dense, rtol=1e-9, atol=1e-12)


def test_at_the_checkpoint_it_is_the_gauss_newton_matrix(bench):
    from nets import ggn_operator
    from nets.learning_rates.linearized import output_jacobians

    model, X, y = build_tiny_mlp(4, N=16)
    J, z0 = output_jacobians(model, X, dtype=torch.float64)
    got = _dense(bench.LinearizedHessian(J, z0, torch.zeros(J.shape[2], dtype=torch.float64)))
    torch.testing.assert_close(got, _dense(ggn_operator(model, F.cross_entropy, (X, y))),
                               rtol=1e-9, atol=1e-12)
