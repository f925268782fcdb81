"""Curvature products over data shards with `torch.distributed` (docs/theory.md §1).

The full-data Hessian is a weighted sum of shard Hessians. With the N samples split
over R ranks into shards S_r of sizes N_r (Σ_r N_r = N, sizes may differ),

    H v = (1/N) Σ_i ∇²ℓ_i(w) v = Σ_r (N_r/N) · H_r v,      H_r = (1/N_r) Σ_{i∈S_r} ∇²ℓ_i(w),

so each rank computes its local product H_r v with an ordinary operator of
`nets.curvature.operators` (itself exact over uneven batches inside the shard), scales it by
N_r/N and an `all_reduce(SUM)` leaves H v on every rank. Weighting by shard size
makes uneven shards exact (averaging the R shard products with equal weight, a peer
defect, would be biased). The GGN works the same way. A target-weighted mean (class
weights, ignore_index, padded tokens) is Σ_r (W_r/W)·L_r instead, W_r the total weight of
the shard's samples; each rank measures W_r in units of one reference sample of root's,
sent to every rank at construction (one forward pass over each shard;
`nets.curvature.chunk_shares`), and weighs its
products by W_r/W (N_r/N exactly when the two agree to round-off, and with a warning on
every rank when some rank's share cannot be read: a loss whose weights depend on the
outputs, or shards padded to different lengths). This is the single-process
operator whenever each sample's loss depends on that sample alone (policy None or
"eval"). Under policy="train_batch_stats" normalisation layers use the statistics of
each chunk, and a chunk never crosses a shard: the operator is then the average of the
shards' chunk curvatures (what data-parallel training without SyncBatchNorm sees), not
the single-process one (eigenvalues a few % apart); the constructor warns.

At construction every rank runs the single-process loss checks on its shard (a summed
loss warns) and learns every rank's sample count, P, dtype, a fingerprint of the
parameters and floating buffers (sums of x, x², and position-weighted x in float64,
compared to their round-off), the curvature kind, a checksum of the model's module
structure (`str(model)`: layers and activation modules) and of the selected parameter
names, and `root` / `sync_inputs`, in one `all_gather`; all ranks raise the same
ValueError when a shard is empty or when ranks differ in any of these (e.g. each rank
initialised its own model: the products would silently mix different Hessians). A loss
that differs per rank (its options) is not seen by this check.

How the eigensolver runs: **replicated**. Every rank runs the same algorithm
(`nets.algorithms.lanczos.eigsh`, `lanczos`, scipy's `eigsh` through `to_scipy()`, ...) with the
same seed, in lock-step: each product is a collective call, so all ranks must call
`matvec`/`matmat` the same number of times in the same order. Before every product
the input vector is broadcast from rank `root` (P numbers, cheap next to the product),
so round-off differences between ranks' copies of the Krylov basis (different BLAS,
different hardware) can never mix different vectors into one sum; results on rank
`root` are the reference and the others agree with them to round-off. An input that
differs from root's beyond round-off (ranks seeded differently: seed=None draws a seed
per rank) makes every rank raise the same ValueError at that product, its flag carried
in one extra row of the product's own all-reduce.

Launch with `torchrun` (one process per GPU or per CPU worker), e.g.

    torchrun --nproc_per_node=2 benchmarks/distributed_top_eigs.py --backend gloo

where each process calls `torch.distributed.init_process_group(backend)`, takes its
shard with `shard_dataset(dataset)` and builds `distributed_hessian_operator(...)`.
Use backend "gloo" on CPU and "nccl" with CUDA tensors (`device=f"cuda:{local_rank}"`).
"""

from __future__ import annotations

import warnings
import zlib
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from nets.curvature.chunk_shares import shard_reference, shard_weight, shares_from_weights
from nets.curvature.loss_check import mean_reduction_check
from nets.curvature.operators import (
    CurvatureOperator,
    ModelCurvatureOperator,
    curvature_operator,
    policy_mode,
)
from nets.utils.autocast import outside_autocast
from nets.utils.callers import caller_stacklevel
from nets.utils.data_source import as_data_source
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
    if X.ndim == 0 or y.ndim == 0:        # a bare IndexError before
        raise ValueError("dataset inputs and targets must have the samples along their first "
                         f"dimension, got shapes {tuple(X.shape)} and {tuple(y.shape)}")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"dataset inputs and targets differ in length: {X.shape[0]} vs {y.shape[0]}")
    if rank is None or world_size is None:
        r, w = _require_initialized()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    a, b = shard_bounds(X.shape[0], world_size, rank)
    return X[a:b], y[a:b]


# -- the constructor's consistency check ------------------------------------------------
_OK, _EMPTY, _FAILED = 0.0, 1.0, 2.0        # status codes in the exchanged table
_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
#: status, P, dtype code, N_r, Σx, Σx², Σc·x, Σ|x|, kind code, CRC of the model's module
#: structure (str(model)), CRC of the parameter names, root, sync_inputs
_META_LEN = 13
_KINDS = {"hessian": 1.0, "ggn": 2.0}


def _meta_device(group):
    """Where the small float64 metadata tensors travel: CUDA for nccl, else the CPU."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dtype_code(dt) -> float:
    return float(_DTYPES.index(dt) + 1) if dt in _DTYPES else 0.0


_GOLDEN = 0.6180339887498949
_RUNNING_STATS = ("running_mean", "running_var")


def _fingerprint(local_op) -> list[float]:
    """[Σx, Σx², Σ c_i x_i, Σ|x|] over the flat float64 parameters and floating buffers
    of the local operator, c_i = 1 + frac(i·φ) (φ the golden ratio's fractional part: no
    two positions share a weight, so a permutation changes Σ c·x too); zeros for an
    operator without parameters (`primals`). Under policy="train_batch_stats" the
    normalisation layers' running statistics are left out: that policy never reads them,
    and data-parallel training without SyncBatchNorm leaves them different per rank."""
    tensors = list(getattr(local_op, "primals", ()))
    frozen = getattr(local_op, "frozen", {}) or {}
    skip_stats = getattr(local_op, "policy", None) == "train_batch_stats"
    tensors += [frozen[n] for n in sorted(frozen) if frozen[n].is_floating_point()
                and not (skip_stats and n.rsplit(".", 1)[-1] in _RUNNING_STATS)]
    out = torch.zeros(4, dtype=torch.float64)
    offset = 0
    for t in tensors:
        x = t.detach().reshape(-1).to(torch.float64)
        i = torch.arange(offset, offset + x.numel(), device=x.device, dtype=torch.float64)
        c = 1.0 + torch.remainder(i * _GOLDEN, 1.0)
        out += torch.stack([x.sum(), (x * x).sum(), (c * x).sum(), x.abs().sum()]).cpu()
        offset += x.numel()
    return out.tolist()


def _crc(text: str) -> float:
    return float(zlib.crc32(text.encode("utf-8")))


def _local_meta(local_op, root: int, sync_inputs: bool) -> list[float]:
    model = getattr(local_op, "model", None)
    return [_OK, float(local_op.P), _dtype_code(local_op.dtype), float(local_op.N),
            *_fingerprint(local_op), _KINDS.get(getattr(local_op, "kind", None), 0.0),
            _crc(str(model)) if model is not None else 0.0,
            _crc("|".join(local_op.param_names or ())), float(root), float(bool(sync_inputs))]


def _failed_meta(status: float) -> list[float]:
    return [status] + [0.0] * (_META_LEN - 1)


def _exchange_meta(meta: list[float], group) -> np.ndarray:
    """(world_size, _META_LEN) table of every rank's metadata (one all_gather)."""
    dev = _meta_device(group)
    t = torch.tensor(meta, dtype=torch.float64, device=dev)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts).cpu().numpy()


def _check_meta(table: np.ndarray, root: int) -> None:
    """The same checks on the same table on every rank: the same ValueError everywhere."""
    ranks = np.arange(table.shape[0])
    failed = ranks[table[:, 0] == _FAILED]
    if failed.size:
        raise ValueError(f"rank(s) {failed.tolist()} could not build their local operator "
                         "(their own error says why: a check of the model, the loss or the "
                         "shard); every rank stops here instead of waiting in a collective")
    empty = ranks[table[:, 0] == _EMPTY]
    if empty.size:
        raise ValueError(f"the shard of rank(s) {empty.tolist()} is empty (0 samples): every "
                         f"rank needs at least one sample (shard_dataset gives each rank one "
                         f"when N >= world_size); sample counts per rank: "
                         f"{[int(n) for n in table[:, 3]]} (0 for an empty shard)")
    for col, what in ((11, "root"), (12, "sync_inputs")):
        if np.any(table[:, col] != table[0, col]):
            raise ValueError(f"ranks passed different {what} (per rank: "
                             f"{[int(v) for v in table[:, col]]}): every rank must pass the "
                             "same (they waited in the first product until the timeout)")
    P = table[:, 1]
    if np.any(P != P[root]):
        raise ValueError(f"ranks hold operators of different sizes P (per rank: "
                         f"{[int(p) for p in P]}): build every rank's operator from the same "
                         "model and params selection")
    codes = table[:, 2]
    if np.any(codes != codes[root]):
        names = [str(_DTYPES[int(c) - 1]) if c > 0 else "other" for c in codes]
        raise ValueError(f"ranks hold operators of different dtypes (per rank: {names}): pass "
                         "the same dtype (and a model of the same precision) on every rank")
    for col, what in ((8, "the curvature kind (Hessian / Gauss–Newton)"),
                      (9, "the model's modules (str(model): layers or activations)"),
                      (10, "the selected parameters' names")):
        if np.any(table[:, col] != table[root, col]):
            bad = ranks[table[:, col] != table[root, col]].tolist()
            raise ValueError(f"rank(s) {bad} differ from rank {root} in {what}: every rank "
                             "must build the same operator from the same model (the "
                             "products silently mixed different curvatures)")
    fp = table[:, 4:8]
    scale = np.maximum(fp[:, 3], fp[root, 3])           # Σ|x| ≥ |Σx|, 2Σ|x| ≥ |Σc·x|
    # round-off of the float64 sums (≈ P·eps relative) is all two equal states may differ
    # by: 1e-9 let a weight off by 2e-8 through (eigenvalues 5e-10 off)
    rel = max(1e-12, 4.0 * float(table[root, 1]) * np.finfo(np.float64).eps)
    tol = rel * np.stack([scale, fp[:, 1], 2 * scale], axis=1) + 1e-300
    differ = np.any(np.abs(fp[:, :3] - fp[root, :3]) > tol, axis=1)
    if differ.any():
        raise ValueError(f"rank(s) {ranks[differ].tolist()} hold model parameters or buffers "
                         f"that differ from rank {root}'s (fingerprints Σw, Σw² per rank: "
                         f"{[(float(a), float(b)) for a, b in fp[:, :2]]}): the sharded "
                         "operator needs the same model state on every rank, e.g. load one "
                         f"checkpoint everywhere or broadcast rank {root}'s state_dict "
                         "before building it")


class DistributedCurvatureOperator(CurvatureOperator):
    """Σ_r (N_r/N) A_r over the ranks of a process group, A_r = this rank's local
    operator (a `ModelCurvatureOperator` over its shard of N_r samples); Σ_r (W_r/W) A_r
    for a target-weighted mean loss (module docstring). `weight` is this rank's share.

    Same interface as `CurvatureOperator` (`P`, `dtype`, `device`, `matvec`, `matmat`,
    `to_scipy`, `num_matvecs`), so `nets.algorithms.lanczos` runs on it unchanged; every product is
    a collective (module docstring: replicated, lock-step use). Extra: `gradient()`,
    `loss()` (full-data, by the same weighted all-reduce), `N` (total samples),
    `local_N`, `rank`, `world_size`, `min_over_ranks(value)`. The constructor is a
    collective that checks the ranks agree (module docstring).

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
        # one collective: every rank's status, P, dtype, N_r and parameter fingerprint;
        # every rank then runs the same checks on the same table and raises the same error
        table = _exchange_meta(_local_meta(local_op, self.root, self.sync_inputs), group)
        _check_meta(table, self.root)
        self._sizes = [int(round(float(n))) for n in table[:, 3]]     # every rank's N_r
        self.N = sum(self._sizes)
        self.weight = self._rank_weight()            # N_r/N, or W_r/W for a weighted mean
        if world > 1 and getattr(local_op, "policy", None) == "train_batch_stats":
            warnings.warn(
                "policy='train_batch_stats' on a sharded operator: each shard (and each "
                "chunk inside it) normalises with its own batch statistics, so the operator "
                "is the average of the shards' chunk curvatures, not the single-process "
                "train-mode curvature (eigenvalues a few % apart); use policy='eval' for "
                "the same operator on any number of ranks", UserWarning,
                stacklevel=caller_stacklevel())

    def _rank_weight(self) -> float:
        """This rank's share of the full-data loss (collective). N_r/N for a plain mean;
        for a target-weighted one (class weights, ignore_index, padded tokens) W_r/W, the
        ranks' total weights W_r read from the loss with one reference sample of root's
        sent to every rank (`nets.curvature.chunk_shares.shard_weight`), so they share a
        unit. N_r/N exactly where every W_r/W is within round-off of it, and with a warning
        on every rank where some rank's weight could not be read."""
        plain = self.local_N / self.N
        local = self.local_op
        if self.world_size == 1 or not isinstance(local, ModelCurvatureOperator):
            return plain
        src = self.root if self.group is None else dist.get_global_rank(self.group, self.root)
        payload = [None]
        if self.rank == self.root:
            try:
                with torch.no_grad(), policy_mode(local.model, local.policy):
                    ref = shard_reference(local.loss_fn, local.output_chunks())
                payload = [ref if ref is None or isinstance(ref, str) else
                           tuple(t.cpu() if torch.is_tensor(t) else t for t in ref)]
            except Exception as err:        # noqa: BLE001 -- every rank must get a payload
                payload = [f"failed: root could not read a reference sample "
                           f"({type(err).__name__})"]
        dist.broadcast_object_list(payload, src=src, group=self.group)
        ref = payload[0]
        if ref == "counts":                 # tuple or dict outputs, as in one process
            return plain
        world, why = self.world_size, None
        row = torch.zeros(2 * world, dtype=torch.float64, device=_meta_device(self.group))
        if ref is None:
            why = f"no sample on rank {self.root} has a finite loss with a nonzero gradient"
        elif isinstance(ref, str):
            why = ref
        else:
            ref = tuple(t.to(self.device) if torch.is_tensor(t) else t for t in ref)
            try:
                with torch.no_grad(), policy_mode(local.model, local.policy):
                    row[self.rank] = shard_weight(local.loss_fn, local.output_chunks(), ref)
            except Exception as err:        # noqa: BLE001 -- every rank must reach the sum
                why = str(err) if isinstance(err, ValueError) else type(err).__name__
                row[world + self.rank] = 1.0
        dist.all_reduce(row, group=self.group)
        totals, failed = row[:world].tolist(), row[world:].tolist()
        if why is None and any(failed):
            why = f"rank(s) {[r for r in range(world) if failed[r]]} could not read theirs"
        shares = shares_from_weights(totals, self._sizes, self.N, ref[-1]) if why is None else None
        if why is None and shares is None:
            why = "the ranks' weights sum to zero"
        if why is not None:
            warnings.warn(
                f"loss_fn on a sharded operator: each rank's share of the loss could not be "
                f"read ({why}), so ranks are weighted by their sample counts N_r/N — exact "
                "for a plain mean, not for a weighted one (class weights, ignore_index, "
                "padded tokens) or a loss that is not a mean", UserWarning,
                stacklevel=caller_stacklevel())
            return plain
        return shares[self.rank]

    def min_over_ranks(self, value: int) -> int:
        """The minimum of the int `value` over the ranks (collective: call on every
        rank), so that a choice each rank makes from its own state (e.g. a block size from
        its free memory) is the same on all ranks and their collectives match."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=_meta_device(self.group))
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t[0])

    # -- communication -----------------------------------------------------------
    def _comm_device(self):
        return self.device

    def _all_reduce(self, t, op=dist.ReduceOp.SUM):
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def _sync(self, t: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(root's copy of t, 1.0 if this rank's own differed beyond round-off else 0.0)."""
        if not self.sync_inputs or self.world_size == 1:
            return t, 0.0
        own = t.contiguous()
        t = own.clone()
        src = self.root if self.group is None else dist.get_global_rank(self.group, self.root)
        dist.broadcast(t, src=src, group=self.group)
        # replicated use means equal inputs up to round-off; ranks seeded differently
        # (seed=None draws a seed per rank) ran their own probes against root's products
        # and got silently wrong traces on every rank but root (an outside sweep)
        tol = max(1e-6, 100 * torch.finfo(t.dtype).eps) * float(
            torch.linalg.vector_norm(t, dtype=torch.float64)) + 1e-300
        return t, float(float(torch.linalg.vector_norm(own - t, dtype=torch.float64)) > tol)

    def _reduced(self, out: torch.Tensor, mismatch: float) -> torch.Tensor:
        """All-reduce the weighted local product with this rank's input-mismatch flag in
        one extra row, so that every rank raises the same error when any rank's input
        differed from root's (instead of one rank raising and the others hanging)."""
        flat = out.reshape(out.shape[0], -1)
        flag = torch.full((1, flat.shape[1]), mismatch, dtype=flat.dtype, device=flat.device)
        buf = self._all_reduce(torch.cat([flat, flag]).contiguous())
        if float(buf[-1, 0]) > 0:
            raise ValueError(f"{int(round(float(buf[-1, 0])))} rank(s) passed an input vector "
                             f"that differs from rank {self.root}'s beyond round-off: the "
                             "algorithms run replicated, so every rank must call them with "
                             "the same seed and arguments (seed=None draws one per rank: "
                             "pass an int)")
        return buf[:-1].reshape(out.shape)

    # -- products ----------------------------------------------------------------
    def _matvec(self, v):
        v, bad = self._sync(v)
        out = self.local_op.matvec(v).to(self.dtype) * self.weight
        return self._reduced(out, bad)

    def _matmat(self, V):
        V, bad = self._sync(V)
        out = self.local_op.matmat(V).to(self.dtype) * self.weight
        return self._reduced(out, bad)

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
    _require_initialized(group)
    try:
        source = as_data_source(shard, name="shard")
        # the loss checks of hessian_operator / ggn_operator (a summed loss gave a λ₁ that
        # depended on the sharding, without a warning; an outside sweep)
        mean_reduction_check(model, loss_fn, source)
        local, failure = curvature_operator(model, loss_fn, source, kind=kind, params=params,
                                            device=device, dtype=dtype, policy=policy,
                                            chunk_size=chunk_size, cache_graph=cache_graph), None
    except Exception as e:          # noqa: BLE001 -- any failure must reach the exchange,
        local, failure = None, e    # or the other ranks wait in it (30 min under gloo)
    if failure is not None:
        # take part in the constructor's collective, so that every rank stops with an
        # error instead of the others dying in it (or waiting) when this rank leaves
        empty = isinstance(failure, ValueError) and str(failure) == "shard is empty"
        try:
            _check_meta(_exchange_meta(_failed_meta(_EMPTY if empty else _FAILED), group), root)
        except ValueError as err:
            if not empty:
                raise failure from None     # this rank's own reason (the others name it)
            raise err from failure
    return DistributedCurvatureOperator(local, group=group, root=root, sync_inputs=sync_inputs)


@outside_autocast
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


@outside_autocast
def distributed_ggn_operator(model: nn.Module, loss_fn: Callable, shard, *, params=None,
                             policy=None, chunk_size=None, device=None, dtype=None,
                             cache_graph="auto", group=None, root: int = 0,
                             sync_inputs: bool = True) -> DistributedCurvatureOperator:
    """Full-data GGN G = Σ_r (N_r/N) G_r from this rank's shard (as
    `distributed_hessian_operator`)."""
    return _distributed("ggn", model, loss_fn, shard, params, device, dtype, policy,
                        chunk_size, cache_graph, group, root, sync_inputs)
