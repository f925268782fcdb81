"""Sharded curvature products with torch.distributed (gloo, 2 CPU processes).

Oracle: the single-process full-data operator of nets.curvature.operators and a dense float64
Hessian from torch.func.hessian. Shards are deliberately uneven (200 / 101 samples,
with different chunk sizes inside each shard), so a product that averaged the shards
with equal weight would be off by O(1) and fail the 1e-10 comparisons.
"""

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nets.algorithms.lanczos import eigsh
from nets.curvature.distributed import (
    DistributedCurvatureOperator,
    distributed_ggn_operator,
    distributed_hessian_operator,
    shard_bounds,
    shard_dataset,
)
from nets.curvature.operators import ggn_operator, hessian_operator
from nets.training.data import load_digits
from nets.training.models import MLP

N_SAMPLES = 301
SPLIT = 200                         # rank 0: samples [0, 200), rank 1: [200, 301)
CHUNKS = {0: 64, 1: 37}             # uneven chunks inside each shard, too
K = 3


def _problem():
    X, y = load_digits(dtype=torch.float64)
    X, y = X[:N_SAMPLES], y[:N_SAMPLES]
    model = MLP(64, (8,), 10, activation="tanh", seed=3).double().eval()
    return model, (X, y)


def _probes(P):
    return torch.from_numpy(np.random.default_rng(7).standard_normal((P, 4)))


def _worker(rank, world_size, store_path, out_dir):
    if os.path.exists("/sys/class/net/lo"):          # Linux loopback: no DNS lookups
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world_size)
    try:
        model, (X, y) = _problem()
        lo, hi = (0, SPLIT) if rank == 0 else (SPLIT, N_SAMPLES)
        shard = (X[lo:hi], y[lo:hi])
        op = distributed_hessian_operator(model, F.cross_entropy, shard, dtype=torch.float64,
                                          chunk_size=CHUNKS[rank])
        V = _probes(op.P)
        res = eigsh(op, k=K, which="LA", tol=1e-12, seed=0)
        out = dict(
            N=op.N, local_N=op.local_N,
            matvec=op.matvec(V[:, 0]).numpy(),
            matmat=op.matmat(V).numpy(),
            dense=op.to_dense().numpy(),
            top=res.values, converged=res.converged,
            bottom=eigsh(op, k=1, which="SA", tol=1e-12, seed=1).values,
            gradient=op.gradient().numpy(), loss=op.loss(),
        )
        gop = distributed_ggn_operator(model, F.cross_entropy, shard_dataset((X, y)),
                                       dtype=torch.float64)
        out["ggn_matvec"] = gop.matvec(V[:, 1]).numpy()
        out["ggn_local_N"] = gop.local_N
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **out)
    finally:
        dist.destroy_process_group()


def _run_workers(tmp):
    store = os.path.join(tmp, "store")
    mp.start_processes(_worker, args=(2, store, tmp), nprocs=2, join=True, start_method="spawn")
    return [dict(np.load(os.path.join(tmp, f"rank{r}.npz"))) for r in range(2)]


@pytest.fixture(scope="module")
def distributed_results():
    """The two ranks' results. Starting two gloo processes on a loaded shared machine
    failed once at setup in a full local run (not reproduced); a failed start is retried
    once in a fresh directory (a wrong product still fails the tests below)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return _run_workers(tmp)
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        with tempfile.TemporaryDirectory() as tmp:
            return _run_workers(tmp)


@pytest.fixture(scope="module")
def single_process():
    model, (X, y) = _problem()
    op = hessian_operator(model, F.cross_entropy, (X, y), dtype=torch.float64)
    gop = ggn_operator(model, F.cross_entropy, (X, y), dtype=torch.float64)
    prims = tuple(p.detach().clone() for p in model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def loss(*ps):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ps)), (X,)), y)

    blocks = torch.func.hessian(loss, argnums=tuple(range(len(prims))))(*prims)
    dense = torch.cat([torch.cat([blocks[i][j].reshape(prims[i].numel(), prims[j].numel())
                                  for j in range(len(prims))], dim=1)
                       for i in range(len(prims))], dim=0)
    return op, gop, dense.numpy()


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def test_shard_sizes_add_up(distributed_results):
    r0, r1 = distributed_results
    assert int(r0["local_N"]) == SPLIT and int(r1["local_N"]) == N_SAMPLES - SPLIT
    assert int(r0["N"]) == int(r1["N"]) == N_SAMPLES


def test_products_match_single_process(distributed_results, single_process):
    op, gop, _ = single_process
    V = _probes(op.P)
    for r in distributed_results:
        assert _rel(r["matvec"], op.matvec(V[:, 0]).numpy()) < 1e-10
        assert _rel(r["matmat"], op.matmat(V).numpy()) < 1e-10
        assert _rel(r["gradient"], op.gradient().numpy()) < 1e-10
        assert abs(float(r["loss"]) - op.loss()) < 1e-10 * abs(op.loss())
        assert _rel(r["ggn_matvec"], gop.matvec(V[:, 1]).numpy()) < 1e-10


def test_dense_matches_autograd_hessian(distributed_results, single_process):
    _, _, dense = single_process
    for r in distributed_results:
        assert _rel(r["dense"], dense) < 1e-10


def test_eigenvalues_match_single_process_and_dense(distributed_results, single_process):
    op, _, dense = single_process
    ref = eigsh(op, k=K, which="LA", tol=1e-12, seed=0).values
    evals = np.linalg.eigvalsh(dense)
    assert np.allclose(ref, evals[::-1][:K], rtol=1e-10, atol=0)
    for r in distributed_results:
        assert bool(np.all(r["converged"]))
        assert np.allclose(r["top"], ref, rtol=1e-10, atol=0)
        assert abs(float(r["bottom"][0]) - evals[0]) < 1e-10 * np.max(np.abs(evals))


def test_equal_shard_weighting_would_be_detectably_wrong(single_process):
    # guards the test design: the biased (equal-weight) average differs at O(1e-3) or more
    op, _, _ = single_process
    model, (X, y) = _problem()
    a = hessian_operator(model, F.cross_entropy, (X[:SPLIT], y[:SPLIT]), dtype=torch.float64)
    b = hessian_operator(model, F.cross_entropy, (X[SPLIT:], y[SPLIT:]), dtype=torch.float64)
    v = _probes(op.P)[:, 0]
    biased = 0.5 * (a.matvec(v) + b.matvec(v))
    assert _rel(biased.numpy(), op.matvec(v).numpy()) > 1e-3


def test_shard_bounds_cover_exactly_once():
    for N, R in [(10, 3), (7, 7), (301, 2), (1000, 6)]:
        bounds = [shard_bounds(N, R, r) for r in range(R)]
        assert bounds[0][0] == 0 and bounds[-1][1] == N
        assert all(bounds[i][1] == bounds[i + 1][0] for i in range(R - 1))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    X, y = torch.arange(10.0)[:, None], torch.arange(10)
    parts = [shard_dataset((X, y), rank=r, world_size=3)[1] for r in range(3)]
    assert torch.equal(torch.cat(parts), y)


def test_bad_input():
    with pytest.raises(ValueError, match="world_size"):
        shard_bounds(3, 4, 0)
    with pytest.raises(ValueError, match="rank"):
        shard_bounds(10, 2, 2)
    with pytest.raises(TypeError, match="dataset"):
        shard_dataset([1, 2, 3], rank=0, world_size=1)
    model, data = _problem()
    op = hessian_operator(model, F.cross_entropy, data, dtype=torch.float64)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            DistributedCurvatureOperator(op)
    with pytest.raises(TypeError, match="local_op"):
        DistributedCurvatureOperator("not an operator")
