"""Curvature products over data shards with `torch.distributed` (docs/theory.md §1).

The full-data Hessian is a weighted sum of shard Hessians. With the N samples split
over R ranks into shards S_r of sizes N_r (Σ_r N_r = N, sizes may differ),

    H v = (1/N) Σ_i ∇²ℓ_i(w) v = Σ_r (N_r/N) · H_r v,      H_r = (1/N_r) Σ_{i∈S_r} ∇²ℓ_i(w),

so each rank computes its local product H_r v with an ordinary operator of
`nets.curvature.operators` (itself exact over uneven batches inside the shard), scales it by
N_r/N and an `all_reduce(SUM)` leaves H v on every rank. Weighting by shard size
makes uneven shards exact (averaging the R shard products with equal weight, a peer
defect, would be biased). The GGN works the same way.

How the eigensolver runs: **replicated**. Every rank runs the same algorithm
(`nets.algorithms.lanczos.eigsh`, `lanczos`, scipy's `eigsh` through `to_scipy()`, ...) with the
same seed, in lock-step: each product is a collective call, so all ranks must call
`matvec`/`matmat` the same number of times in the same order. Before every product
the input vector is broadcast from rank `root` (P numbers, cheap next to the product),
so round-off differences between ranks' copies of the Krylov basis (different BLAS,
different hardware) can never mix different vectors into one sum; results on rank
`root` are the reference and the others agree with them to round-off.

Launch with `torchrun` (one process per GPU or per CPU worker), e.g.

    torchrun --nproc_per_node=2 benchmarks/distributed_top_eigs.py --backend gloo

where each process calls `torch.distributed.init_process_group(backend)`, takes its
shard with `shard_dataset(dataset)` and builds `distributed_hessian_operator(...)`.
Use backend "gloo" on CPU and "nccl" with CUDA tensors (`device=f"cuda:{local_rank}"`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from nets.curvature.operators import CurvatureOperator, ModelCurvatureOperator, curvature_operator
from rmt.validation import as_int

__all__ = [
    "DistributedCurvatureOperator",
    "distributed_hessian_operator",
    "distributed_ggn_operator",
    "shard_bounds",
    "shard_dataset",
]


def _require_initialized(group=None):
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call "
                           "torch.distributed.init_process_group(backend) first (e.g. under torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_bounds(N, world_size, rank) -> tuple[int, int]:
    """[start, stop) of rank `rank`'s contiguous shard of N samples over `world_size`
    ranks: sizes differ by at most one (the first N mod world_size ranks get one more),
    as `numpy.array_split`. Every rank gets at least one sample (N ≥ world_size)."""
    N = as_int("N", N, minimum=1)
    world_size = as_int("world_size", world_size, minimum=1)
    rank = as_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
    if N < world_size:
        raise ValueError(f"N={N} samples cannot give each of world_size={world_size} ranks a shard")
    base, extra = divmod(N, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_dataset(dataset, rank=None, world_size=None):
    """This rank's contiguous shard (X[a:b], y[a:b]) of a dataset pair (X, y), with
    bounds from `shard_bounds`. rank/world_size default to the initialised process
    group's."""
    if not (isinstance(dataset, (tuple, list)) and len(dataset) == 2
            and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in dataset)):
        raise TypeError("dataset must be a pair (X, y) of tensors or arrays")
    X, y = dataset
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"dataset inputs and targets differ in length: {X.shape[0]} vs {y.shape[0]}")
    if rank is None or world_size is None:
        r, w = _require_initialized()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    a, b = shard_bounds(X.shape[0], world_size, rank)
    return X[a:b], y[a:b]


class DistributedCurvatureOperator(CurvatureOperator):
    """Σ_r (N_r/N) A_r over the ranks of a process group, A_r = this rank's local
    operator (a `ModelCurvatureOperator` over its shard of N_r samples).

    Same interface as `CurvatureOperator` (`P`, `dtype`, `device`, `matvec`, `matmat`,
    `to_scipy`, `num_matvecs`), so `nets.algorithms.lanczos` runs on it unchanged; every product is
    a collective (module docstring: replicated, lock-step use). Extra: `gradient()`,
    `loss()` (full-data, by the same weighted all-reduce), `N` (total samples),
    `local_N`, `rank`, `world_size`.

    sync_inputs : broadcast each input vector from `root` before the product (default
        True; see the module docstring). Set False only when every rank is known to hold
        bit-identical inputs.
    Collectives use the operator's dtype; the backend must support it (gloo: float32/
    float64 on CPU; nccl: CUDA tensors, including bfloat16).
    """

    def __init__(self, local_op: ModelCurvatureOperator, group=None, root: int = 0,
                 sync_inputs: bool = True):
        if not isinstance(local_op, CurvatureOperator):
            raise TypeError(f"local_op must be a CurvatureOperator, got {type(local_op).__name__}")
        local_N = getattr(local_op, "N", None)
        if local_N is None:
            raise TypeError("local_op must carry its sample count N (a ModelCurvatureOperator)")
        rank, world = _require_initialized(group)
        self.group, self.rank, self.world_size = group, rank, world
        self.root = as_int("root", root, minimum=0)
        if self.root >= world:
            raise ValueError(f"root must be < world_size={world}, got {root}")
        self.sync_inputs = bool(sync_inputs)
        super().__init__(local_op.P, local_op.dtype, local_op.device, local_op.param_names)
        self.local_op = local_op
        self.local_N = int(local_N)
        # every rank must act on the same parameter space: max P == min P over ranks
        sizes = torch.tensor([float(self.P), -float(self.P)], dtype=torch.float64,
                             device=self._comm_device())
        self._all_reduce(sizes, op=dist.ReduceOp.MAX)
        if int(sizes[0]) != self.P or int(-sizes[1]) != self.P:
            raise ValueError(f"ranks hold operators of different sizes P (this rank: {self.P})")
        meta = torch.tensor([float(self.local_N)], dtype=torch.float64, device=self._comm_device())
        self._all_reduce(meta, op=dist.ReduceOp.SUM)
        self.N = int(round(float(meta[0])))
        self.weight = self.local_N / self.N          # N_r / N

    # -- communication -----------------------------------------------------------
    def _comm_device(self):
        return self.device

    def _all_reduce(self, t, op=dist.ReduceOp.SUM):
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def _sync(self, t: torch.Tensor) -> torch.Tensor:
        if not self.sync_inputs or self.world_size == 1:
            return t
        t = t.contiguous().clone()
        src = self.root if self.group is None else dist.get_global_rank(self.group, self.root)
        dist.broadcast(t, src=src, group=self.group)
        return t

    # -- products ----------------------------------------------------------------
    def _matvec(self, v):
        v = self._sync(v)
        out = self.local_op.matvec(v).to(self.dtype) * self.weight
        return self._all_reduce(out.contiguous())

    def _matmat(self, V):
        V = self._sync(V)
        out = self.local_op.matmat(V).to(self.dtype) * self.weight
        return self._all_reduce(out.contiguous())

    # -- full-data extras ----------------------------------------------------------
    def gradient(self) -> torch.Tensor:
        """Full-data gradient Σ_r (N_r/N) ∇L_r(w), on every rank."""
        g = self.local_op.gradient().to(self.dtype) * self.weight
        return self._all_reduce(g.contiguous())

    def loss(self) -> float:
        """Full-data mean loss Σ_r (N_r/N) L_r(w), on every rank."""
        t = torch.tensor([self.local_op.loss() * self.weight], dtype=torch.float64,
                         device=self._comm_device())
        return float(self._all_reduce(t)[0])


def _distributed(kind, model, loss_fn, shard, params, device, dtype, policy, chunk_size,
                 cache_graph, group, root, sync_inputs):
    local = curvature_operator(model, loss_fn, shard, kind=kind, params=params, device=device,
                               dtype=dtype, policy=policy, chunk_size=chunk_size,
                               cache_graph=cache_graph)
    return DistributedCurvatureOperator(local, group=group, root=root, sync_inputs=sync_inputs)


def distributed_hessian_operator(model: nn.Module, loss_fn: Callable, shard, *, params=None,
                                 policy=None, chunk_size=None, device=None, dtype=None,
                                 cache_graph="auto", group=None, root: int = 0,
                                 sync_inputs: bool = True) -> DistributedCurvatureOperator:
    """Full-data Hessian H = Σ_r (N_r/N) H_r from this rank's `shard` (a dataset pair or
    an iterable of (x, y) batches); the other arguments as `nets.curvature.operators.
    hessian_operator`, plus the process `group`, the broadcast `root` and `sync_inputs`
    (DistributedCurvatureOperator). Collective: call on every rank."""
    return _distributed("hessian", model, loss_fn, shard, params, device, dtype, policy,
                        chunk_size, cache_graph, group, root, sync_inputs)


def distributed_ggn_operator(model: nn.Module, loss_fn: Callable, shard, *, params=None,
                             policy=None, chunk_size=None, device=None, dtype=None,
                             cache_graph="auto", group=None, root: int = 0,
                             sync_inputs: bool = True) -> DistributedCurvatureOperator:
    """Full-data GGN G = Σ_r (N_r/N) G_r from this rank's shard (as
    `distributed_hessian_operator`)."""
    return _distributed("ggn", model, loss_fn, shard, params, device, dtype, policy,
                        chunk_size, cache_graph, group, root, sync_inputs)
