"""Matrix-free curvature operators of a network's loss (docs/theory.md §1, §4).

For parameters w ∈ R^P (all trainable parameters, or a named subset) and per-sample
losses ℓ_i(w), i = 1..N, the operators here apply, without ever forming a P×P matrix,

    H   = (1/N) Σ_i ∇²ℓ_i(w)                     hessian_operator
    G   = (1/N) Σ_i J_iᵀ Λ_i J_i                 ggn_operator   (Λ_i = ∇²_out ℓ_i, J_i = ∂out_i/∂w)
    H_B = (1/B) Σ_{i∈S} ∇²ℓ_i(w), G_B likewise  batch_hessian_operator / batch_ggn_operator
    ε   = H_B − H                                fluctuation_operator

`loss_fn(outputs, targets)` must be mean-reduced. Data come in any form of the data
contract (`nets.utils.data_source`: an (X, y) pair, a torch Dataset, or a re-iterable
of (x, y) batches such as a non-shuffling DataLoader), split into memory chunks of at
most `chunk_size` samples; batch b of size n_b contributes with weight n_b/N, so uneven
batches are averaged exactly (a peer defect is to weight them equally) — or, for a
weighted mean (class weights, ignore_index, padding), with its share of the loss's
weights, read from the loss (`nets.curvature.chunk_shares`).

Products use `torch.func`: Hessian-vector products are forward-over-reverse
(`jvp` of `grad`), GGN-vector products are `vjp ∘ (loss Hessian) ∘ jvp`; several
vectors are processed at once with `torch.func.vmap` over the probe dimension.
Parameters and buffers are detached *copies* passed through `functional_call`, so a
product never writes to the user's module (BatchNorm running statistics included).

Train-mode layers (the `policy` argument):
  * None (default): the model is used as it is, which must be deterministic: a
    BatchNorm layer, an active Dropout (p > 0) or an RReLU in train mode raises
    ValueError. Parameters and floating buffers must be finite, `loss_fn` must return a
    0-d tensor.
  * "eval": every module is switched to eval mode for the product (BatchNorm uses its
    running statistics, Dropout is the identity); flags are restored afterwards.
  * "train_batch_stats": normalisation layers use the statistics of the batch being
    multiplied (the curvature of the train-mode loss) but their running buffers are
    not written; Dropout is switched off. "The batch" is each chunk the operator
    processes (`chunk_size`, or each batch of a DataLoader): batch statistics couple
    the samples of a chunk, so with this policy the operator is the average of the
    chunks' train-mode curvatures and depends on the chunking (one chunk of all N
    samples is the full-batch train-mode curvature).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import grad, jvp, vjp, vmap

from nets.curvature.chunk_shares import loss_shares
from nets.curvature.loss_check import (
    _kept_loss_state,
    _leaves_read,
    checked_loss_value,
    loss_name,
    mean_reduction_check,
)
from nets.curvature.params import ParamLayout, call_model, check_model, make_functional, output_tensors
from nets.utils.autocast import outside_autocast, outside_caller_contexts
from nets.utils.callers import caller_stacklevel
from nets.utils.data_source import as_data_source
from nets.utils.devices import as_device, canonical_device
from nets.utils.modes import kept_attributes, kept_modes, kept_rng, tensor_attributes
from nets.utils.vmapping import vmap_or_loop
from rmt.validation import as_int


def _load_jvp_decompositions() -> None:
    """Load torch's forward-mode decompositions now, quietly: torch loads them on the first
    forward-mode product (under the same condition) and they call the deprecated
    `torch.jit.script`, whose DeprecationWarning made every forward-mode entry point (GGN
    products, the linearised forms) fail under `warnings.simplefilter("error")` or
    `pytest -W error` (an outside sweep). 0.2 s, once per process."""
    import os

    if os.environ.get("PYTORCH_JIT", "1") == "1" and __debug__:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*",
                                    category=DeprecationWarning)
            from torch._decomp import decompositions_for_jvp  # noqa: F401


_load_jvp_decompositions()

POLICIES = (None, "eval", "train_batch_stats")
#: cache_graph="auto" keeps the per-batch gradient graphs when the inputs held total at
#: most this many numbers (e.g. the full digits set, 1797×64), where the graph memory is
#: small and products get ~2–5× cheaper; larger data are streamed batch by batch.
AUTO_CACHE_INPUT_NUMEL = 1 << 18
_NORM_TYPES = (nn.modules.batchnorm._NormBase,)
_DROPOUT_TYPES = (nn.modules.dropout._DropoutNd,)
#: layers that are random in train mode whatever their parameters (randomised leaky ReLU)
_RANDOM_TYPES = (nn.RReLU,)


# ----------------------------------------------------------------------------------
# base class
# ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _explained_missing_derivatives():
    """torch's "the derivative for 'X' is not implemented" from a layer whose backward
    cannot itself be differentiated (nn.EmbeddingBag, some fused kernels), and its "Cannot
    access data pointer of Tensor that doesn't have storage" from a kernel that reads raw
    memory under torch.func's transforms (an RNN run on a PackedSequence), said in the
    package's terms."""
    try:
        yield
    except NotImplementedError as err:
        text = str(err)
        if "derivative for" not in text:
            raise
        raise NotImplementedError(
            f"the model's loss cannot be differentiated twice ({text.splitlines()[0]}): a "
            "layer's backward has no derivative in torch (e.g. nn.EmbeddingBag: use "
            "nn.Embedding followed by the mean/sum over the bag). Curvature products need "
            "second derivatives") from None
    except RuntimeError as err:
        text = str(err)
        if "doesn't have storage" not in text:
            raise
        raise RuntimeError(
            f"a layer of the model cannot run under torch.func's transforms, which every "
            f"curvature product and per-sample pass uses ({text.splitlines()[0]}): a kernel "
            "that reads raw tensor memory, e.g. nn.GRU/LSTM/RNN fed a PackedSequence "
            "(pack_padded_sequence). Run the recurrent layer on the padded batch and pick "
            "each sequence's last valid step by index (or mask the padding) instead: for a "
            "one-directional layer the same function of the weights") from None


class CurvatureOperator:
    """A symmetric P×P linear operator acting on flat parameter-space vectors.

    Attributes: `P` (int), `dtype` (the dtype products are computed in), `device`,
    `param_names` (tuple of parameter names making up the flat vector, or None),
    `num_matvecs` (running count of operator-vector products, each column of a
    `matmat` counting once).

    `matvec`/`matmat` accept torch tensors (or numpy arrays) of any floating dtype,
    compute in `self.dtype` and return a tensor of the input's floating dtype.
    Subclasses implement `_matmat(V)` for V of shape (P, k) in `self.dtype`
    (and may override `_matvec`).
    """

    P: int
    dtype: torch.dtype
    device: torch.device
    param_names: tuple[str, ...] | None = None

    def __init__(self, P: int, dtype: torch.dtype, device, param_names=None):
        self.P = int(P)
        self.dtype = dtype
        self.device = canonical_device(device)
        self.param_names = None if param_names is None else tuple(param_names)
        self.num_matvecs = 0

    # -- to implement ------------------------------------------------------------
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._matmat(v[:, None])[:, 0]

    # -- public ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.P, self.P)

    def _coerce(self, v, ndim: int, name: str) -> tuple[torch.Tensor, torch.dtype]:
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v)).to(self.device)
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {v.dtype}")
        if v.ndim != ndim or v.shape[0] != self.P:
            want = "(P,)" if ndim == 1 else "(P, k)"
            raise ValueError(f"{name} must have shape {want} with P={self.P}, got {tuple(v.shape)}")
        if v.device != self.device:
            raise ValueError(f"{name} is on device {v.device} but the operator is on {self.device}")
        return v.to(self.dtype), v.dtype

    def matvec(self, v) -> torch.Tensor:
        """H v for one vector v of shape (P,)."""
        v, out_dtype = self._coerce(v, 1, "v")
        self.num_matvecs += 1
        with outside_caller_contexts(), _explained_missing_derivatives():
            return self._matvec(v).to(out_dtype)

    def matmat(self, V) -> torch.Tensor:
        """H V for V of shape (P, k), the k columns processed together (vmap)."""
        V, out_dtype = self._coerce(V, 2, "V")
        if V.shape[1] == 0:
            return V.clone().to(out_dtype)
        self.num_matvecs += V.shape[1]
        with outside_caller_contexts(), _explained_missing_derivatives():
            return self._matmat(V).to(out_dtype)

    def __matmul__(self, other):
        if isinstance(other, (torch.Tensor, np.ndarray)) and other.ndim == 1:
            return self.matvec(other)
        return self.matmat(other)

    def to_scipy(self):
        """A `scipy.sparse.linalg.LinearOperator` with float64 numpy input/output."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            x = torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(-1)).to(self.device)
            return self.matvec(x).cpu().numpy()

        def mm(X):
            X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64)).to(self.device)
            return self.matmat(X).cpu().numpy()

        return LinearOperator((self.P, self.P), matvec=mv, rmatvec=mv, matmat=mm,
                              rmatmat=mm, dtype=np.float64)

    def to_dense(self, max_P: int = 8192, chunk: int = 256) -> torch.Tensor:
        """The P×P matrix (for tests on small models), built column block by block."""
        if self.P > max_P:
            raise ValueError(f"to_dense is for small operators: P={self.P} > max_P={max_P}")
        eye = torch.eye(self.P, dtype=self.dtype, device=self.device)
        cols = [self.matmat(eye[:, i:i + chunk]) for i in range(0, self.P, chunk)]
        return torch.cat(cols, dim=1)


class LinearCombinationOperator(CurvatureOperator):
    """Σ_j c_j A_j for operators on the same parameter space (computed in the widest
    dtype among them)."""

    def __init__(self, operators: Sequence[CurvatureOperator], coefficients: Sequence[float]):
        ops = list(operators)
        if not ops or len(ops) != len(coefficients):
            raise ValueError("operators and coefficients must be non-empty and of equal length")
        for op in ops:
            if not isinstance(op, CurvatureOperator):
                raise TypeError(f"operators must be CurvatureOperator, got {type(op).__name__}")
        P, dev = ops[0].P, ops[0].device
        for op in ops[1:]:
            if op.P != P:
                raise ValueError(f"operators act on different spaces: P={P} vs P={op.P}")
            if op.device != dev:
                raise ValueError(f"operators live on different devices: {dev} vs {op.device}")
            if ops[0].param_names is not None and op.param_names is not None \
                    and op.param_names != ops[0].param_names:
                raise ValueError("operators act on different parameter subsets (param_names differ)")
        dtype = max((op.dtype for op in ops), key=lambda d: torch.finfo(d).bits)
        super().__init__(P, dtype, dev, ops[0].param_names)
        self.operators = ops
        self.coefficients = [float(c) for c in coefficients]

    def _matmat(self, V):
        return sum(op.matmat(V) * c for c, op in zip(self.coefficients, self.operators))

    def min_over_ranks(self, value: int) -> int:
        """`value` agreed over the ranks of any sharded component (its `min_over_ranks`,
        a collective), so that choices made from this rank's own state — SLQ's probe block
        from its free memory — match across ranks; `value` itself without one."""
        for op in self.operators:
            agree = getattr(op, "min_over_ranks", None)
            if callable(agree):
                value = agree(value)
        return value


@outside_autocast
def fluctuation_operator(batch_op: CurvatureOperator, full_op: CurvatureOperator) -> CurvatureOperator:
    """ε = H_B − H (docs/theory.md §1) as the operator difference `batch_op − full_op`."""
    return LinearCombinationOperator([batch_op, full_op], [1.0, -1.0])


# ----------------------------------------------------------------------------------
# policy for train-mode layers
# ----------------------------------------------------------------------------------

def check_policy(model: nn.Module, policy) -> None:
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(f"model is wrapped in {type(model).__name__}, whose forward cannot be "
                        "called with substituted parameters; pass model.module (the same "
                        "network and weights)")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if policy is not None:
        return
    for name, m, kind in train_mode_layers(model):
        if kind == "norm":
            label = ("BatchNorm" if isinstance(m, nn.modules.batchnorm._BatchNorm)
                     else f"{type(m).__name__} (with running statistics)")
            raise ValueError(
                f"{label} layer {name!r} is in train mode; pass policy='eval' (use running "
                "statistics) or call model.eval(), or — for curvature products only, not the "
                "per-sample noise behind the batch-size predictions, learning rates and "
                "transfers — policy='train_batch_stats' (use batch statistics; buffers are "
                "never written)")
        if kind == "dropout":
            raise ValueError(
                f"Dropout layer {name!r} is active (train mode, p={m.p}): curvature products "
                "would be random; pass policy='eval' or call model.eval()")
        raise ValueError(
            f"{type(m).__name__} layer {name!r} is random in train mode: curvature products "
            "would be random; pass policy='eval' or call model.eval()")


def describe_layers(found) -> str:
    """"'name' (Type), …" for up to three (name, module, kind) of `train_mode_layers`, and
    how many more — the list the warnings about such layers print."""
    found = list(found)
    names = [f"{name!r} ({type(m).__name__})" for name, m, _ in found[:3]]
    return ", ".join(names) + (f" and {len(found) - 3} more" if len(found) > 3 else "")


def train_mode_layers(model: nn.Module):
    """(name, module, kind) for every layer that acts differently in train mode, in
    `named_modules` order: kind "norm" (BatchNorm, or another norm with running
    statistics), "dropout" (p > 0) or "random" (RReLU)."""
    for name, m in model.named_modules():
        if not m.training:
            continue
        if isinstance(m, _NORM_TYPES) and (
                isinstance(m, nn.modules.batchnorm._BatchNorm) or m.track_running_stats):
            yield name, m, "norm"
        elif isinstance(m, _DROPOUT_TYPES) and m.p > 0:
            yield name, m, "dropout"
        elif isinstance(m, _RANDOM_TYPES):
            yield name, m, "random"


def _warn_weight_norm(model: nn.Module) -> None:
    """weight_norm runs the fused `_weight_norm_interface` kernel, whose second derivative
    is not symmetric in torch (dense Hessian of a small weight-normed MLP: max |H − Hᵀ| =
    0.035; its top eigenvalues 1–4 % below those of the same network with w = g·v/‖v‖
    written out). Warn: the Hessian is unreliable there — for the parametrization
    (`torch.nn.utils.parametrizations.weight_norm`) and for the older hook
    (`torch.nn.utils.weight_norm`: λ₁ 0.5375 for 0.5385, an outside sweep)."""
    from torch.nn.utils.weight_norm import WeightNorm

    for name, m in model.named_modules():
        hooked = any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values())
        if hooked or any(type(p).__name__ == "_WeightNorm"
                         for plist in getattr(m, "parametrizations", {}).values() for p in plist):
            warnings.warn(
                f"module {name!r} uses weight_norm: torch's second derivative of its fused "
                "kernel is not symmetric, so Hessian products are off by a few per cent; "
                "write w = g·v/‖v‖ in the forward, or use the Gauss–Newton matrix where the "
                "function offers it (kind='ggn')", stacklevel=caller_stacklevel())
            return


@contextlib.contextmanager
def policy_mode(model: nn.Module, policy):
    """Temporarily set train/eval flags as `policy` says; restore them afterwards."""
    if policy is None:
        yield
        return
    saved = [(m, m.track_running_stats) for m in model.modules()
             if getattr(m, "track_running_stats", None) is not None]
    try:
        with kept_modes(model):
            for m in model.modules():
                m.training = False
                if policy == "train_batch_stats" and isinstance(m, _NORM_TYPES):
                    # batch statistics, and F.batch_norm receives no running buffers to update
                    m.training = True
                    m.track_running_stats = False
            yield
    finally:
        for m, trs in saved:
            m.track_running_stats = trs


# ----------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------

def _as_chunk_size(chunk_size):
    """None or an int >= 1 (integral numpy values and 0-d tensors too, as every count)."""
    return None if chunk_size is None else as_int("chunk_size", chunk_size, minimum=1)


def resolve_device_dtype(model: nn.Module, names, device, dtype):
    named = dict(model.named_parameters())
    sel = [named[n] for n in names]
    devs = {p.device for p in model.parameters()}
    if device is None:
        if len(devs) > 1:
            raise ValueError(f"model parameters live on several devices {sorted(map(str, devs))}; pass device=")
        device = next(iter(devs)) if devs else torch.device("cpu")
    device = as_device(device)
    if dtype is None:
        dts = {p.dtype for p in sel}
        if len(dts) > 1:
            raise ValueError(f"selected parameters have mixed dtypes {dts}; pass dtype= (every "
                             "selected parameter then runs in it: a forward that casts "
                             "between dtypes itself needs its layers in one dtype)")
        dtype = next(iter(dts))
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return device, dtype


#: a product's working memory on a batch, in units of the tensors its forward pass saves
#: for the backward (reverse-over-reverse or forward-over-reverse keep the forward graph,
#: its gradient graph and their tangents)
GRAPH_PRODUCT_FACTOR = 4
#: on CPU the default chunk (an (X, y) pair or Dataset without chunk_size) holds at most
#: this much product working memory (or the memory budget, if smaller): smaller chunks
#: stay in cache (one chunk of 10⁴ CIFAR-sized samples was 2.7x slower per product than
#: chunks of 371); on a GPU the memory budget alone sizes it
DEFAULT_CHUNK_BYTES = 256 << 20


def _graph_fits(N: int, graph_bytes_per_sample: float, device) -> bool:
    """cache_graph="auto" on data of more than AUTO_CACHE_INPUT_NUMEL input numbers: keep
    every batch's gradient graph when N × GRAPH_PRODUCT_FACTOR × (the measured graph
    bytes per sample) fits half the default memory budget (the other half is the
    products' own working memory)."""
    from nets.utils.memory import memory_budget

    return N * GRAPH_PRODUCT_FACTOR * graph_bytes_per_sample <= memory_budget(None, device) / 2


def _dotted(module_name: str, attribute: str) -> str:
    return f"{module_name}.{attribute}" if module_name else attribute


def _non_tensor_leaves(out, found: list, path: str = "output") -> None:
    """Append a description of each leaf of a dict / tuple / list output that is not a
    tensor (the containers `map_output_leaves` walks)."""
    if isinstance(out, torch.Tensor):
        return
    if isinstance(out, dict):
        for k, v in out.items():
            _non_tensor_leaves(v, found, f"{path}[{k!r}]")
    elif isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            _non_tensor_leaves(v, found, f"{path}[{i}]")
    else:
        found.append(f"{path} = {type(out).__name__}")


def _padding_rows(model: nn.Module, names) -> list[tuple[int, int]]:
    """(position in `names`, row) of each selected `nn.Embedding` weight's padding row."""
    index = {n: j for j, n in enumerate(names)}
    rows = []
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Embedding) and mod.padding_idx is not None:
            j = index.get(f"{mname}.weight" if mname else "weight")
            if j is not None:
                rows.append((j, int(mod.padding_idx) % mod.num_embeddings))
    return rows


def default_chunk_size(N: int, graph_bytes_per_sample: float, device) -> int:
    """Samples per chunk when none is given: as many as keep one product's working memory
    (GRAPH_PRODUCT_FACTOR × the measured graph bytes per sample) below the memory budget,
    and on CPU below DEFAULT_CHUNK_BYTES; all N for small models and data."""
    from nets.utils.memory import memory_budget

    cap = memory_budget(None, device)
    if torch.device(device).type == "cpu":
        cap = min(DEFAULT_CHUNK_BYTES, cap)
    per = max(GRAPH_PRODUCT_FACTOR * graph_bytes_per_sample, 1.0)
    return int(max(1, min(N, cap // per)))


def _scalar_loss(loss):
    """The loss value, checked to be one number (a 0-d tensor; a 1-element tensor is
    reshaped to 0-d, as torch's backward accepts it). Shapes are static under torch.func."""
    if isinstance(loss, torch.Tensor) and loss.ndim > 0 and loss.numel() == 1:
        return loss.reshape(())
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor (a mean-reduced loss), got {got}")
    return loss


def _coupling_rtol(t: torch.Tensor) -> float:
    """Round-off allowed between sample 0's outputs in two batches of two (`_coupling`),
    relative to the output's scale: the same kernels run on both, so only reductions
    whose order depends on the other row's values (TF32 convolutions on CUDA) differ."""
    if t.dtype == torch.float64:
        return 1e-10
    if t.dtype == torch.float32:
        return 1e-2 if t.is_cuda else 1e-5        # cuDNN runs float32 convolutions in TF32
    return 5e-2


def _coupling(mixed, alone, leaves=None) -> float:
    """The largest relative difference (to the leaf's scale) between sample 0's output in a
    batch with sample 1 (`mixed`, first row) and in a batch with a copy of itself (`alone`,
    first row) over the floating and complex leaves with the sample dimension first,
    where it exceeds `_coupling_rtol`; 0 if none does. Both batches have two rows, so the
    same kernels run on both: only a forward that mixes samples separates them.
    leaves : positions (in `output_tensors` order) of the leaves to compare, or None for
    every leaf (`_sample_leaves`)."""
    worst = 0.0
    for i, (u, v) in enumerate(zip(output_tensors(mixed), output_tensors(alone))):
        if leaves is not None and i not in leaves:
            continue
        if not ((u.is_floating_point() or u.is_complex()) and u.ndim > 0 and u.shape[0] == 2
                and v.shape == u.shape):
            continue
        u, v = u[:1].nan_to_num(), v[:1].nan_to_num()
        scale = float(torch.maximum(u.abs().max(), v.abs().max())) if u.numel() else 0.0
        diff = float((u - v).abs().max()) if u.numel() else 0.0
        if diff > _coupling_rtol(u.real if u.is_complex() else u) * scale:
            worst = max(worst, diff / scale)
    return worst


def _check_samples_independent(mixed, alone, leaves=None) -> None:
    """Refuse (ValueError) a forward whose output on sample 0 depends on the other sample
    of its batch: model(x[[0, 1]])[0] against model(x[[0, 0]])[0] beyond round-off, on
    every floating (or complex) leaf with the sample dimension first — the curvature of a
    per-sample mean loss would then depend on how the data are chunked. (Comparing a
    batch of one with a batch of two instead refused float32 models whose kernels differ
    by batch size: a LayerNorm after a large bias, 1.2e-5 of the output.)"""
    worst = _coupling(mixed, alone, leaves)
    if not worst:
        return
    raise ValueError(
        "the model's output for a sample depends on the other samples in its batch "
        f"(model(x[[0, 1]])[0] differs from model(x[[0, 0]])[0] by {worst:.2g} of the "
        "output's scale): statistics over the batch in forward — a hand-written batch "
        "normalisation such as h - h.mean(0), or another layer that mixes samples — "
        "as in a train-mode nn.BatchNorm. Curvatures of a per-sample mean loss would "
        "then depend on how the data are chunked. Normalise per sample (LayerNorm, "
        "GroupNorm), use fixed statistics, or pass policy='train_batch_stats' to "
        "normalise each chunk by its own statistics on purpose")


# ----------------------------------------------------------------------------------
# model operators
# ----------------------------------------------------------------------------------

def check_batch_dimension(many, one, n: int) -> None:
    """Refuse (ValueError) a model whose output on n > 1 samples (`many`) and on one sample
    (`one`, None when it cannot run on one) do not share the batch as their first
    dimension: a time-major output (an RNN without batch_first), or a squeeze() at the end
    of forward that drops the sample dimension of a batch of one — which the per-sample
    passes need. Tensor outputs only."""
    if not (isinstance(many, torch.Tensor) and isinstance(one, torch.Tensor) and many.ndim > 0):
        return
    if (one.ndim == many.ndim and many.ndim > 1 and one.shape[0] == many.shape[0]
            and one.shape[1] == 1 and many.shape[1] == n):
        raise ValueError(       # e.g. an RNN without batch_first: (T, N, C)
            f"the model maps {n} samples to an output of shape "
            f"{tuple(many.shape)} and one sample to {tuple(one.shape)}: the samples run "
            "along its second dimension, but the first must be the batch dimension "
            "(a time-major output, e.g. nn.RNN/GRU/LSTM without batch_first=True: "
            "use batch_first=True or transpose the output)")
    if tuple(one.shape) != (1, *many.shape[1:]):
        raise ValueError(
            f"the model maps {n} samples to an output of shape {tuple(many.shape)} but one "
            f"sample to {tuple(one.shape)}: the per-sample passes need the sample "
            "dimension kept for a batch of one (a squeeze() at the end of forward "
            "drops it; use squeeze(-1) or flatten())")


def output_precision_error(outputs, targets, loss_fn, *, order: int) -> float:
    """Relative error, ‖a − a₆₄‖/‖a₆₄‖, of the loss's derivative in the model's outputs as
    computed in the outputs' dtype (a) against float64 (a₆₄), the outputs and floating
    targets widened: order 1 the gradient ∂L/∂z, order 2 the curvature Λ·d along a seeded
    Gaussian d. NaN where there is nothing to compare (non-floating outputs, a loss that
    runs in one dtype only, a zero reference)."""
    if not (isinstance(outputs, torch.Tensor) and outputs.is_floating_point()):
        return math.nan
    g = torch.Generator(device="cpu").manual_seed(0)
    d = torch.randn(outputs.shape, generator=g, dtype=torch.float64)

    def derivative(out, target):
        with torch.enable_grad():
            if order == 1:
                return grad(lambda u: _scalar_loss(loss_fn(u, target)))(out.detach()).double().cpu()
            pull = vjp(grad(lambda u: _scalar_loss(loss_fn(u, target))), out.detach())[1]
            return pull(d.to(device=out.device, dtype=out.dtype))[0].double().cpu()

    try:
        low = derivative(outputs, targets)
        wide = (targets.double() if isinstance(targets, torch.Tensor)
                and targets.is_floating_point() else targets)
        ref = derivative(outputs.double(), wide)
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return math.nan
    scale = float(ref.norm())
    if not (scale > 0 and math.isfinite(scale)):
        return math.nan
    return float((low - ref).norm()) / scale


def warn_output_precision(outputs, targets, loss_fn, *, order: int, n: int,
                          consequence: str) -> None:
    """Warn (UserWarning) when `output_precision_error` exceeds 5 % in a dtype narrower than
    float64: the loss's gradient (order 1) or curvature (order 2) in the outputs is then
    lost to round-off — e.g. a fitted cross-entropy net whose softmax saturates (1 − p_y
    below the dtype's eps), where torch's float32 gradient drops the true class's term."""
    if not isinstance(outputs, torch.Tensor) or outputs.dtype == torch.float64:
        return
    err = output_precision_error(outputs, targets, loss_fn, order=order)
    if err > 0.05:
        what = "gradient" if order == 1 else "curvature"
        warnings.warn(
            f"the loss's {what} in the model's outputs is lost to {outputs.dtype} "
            f"round-off (on the first {n} samples it differs from float64 by {err:.0%}): "
            "e.g. a fitted cross-entropy net whose softmax saturates (1 − p_y below the "
            f"dtype's eps). {consequence}; pass dtype=torch.float64",
            UserWarning, stacklevel=caller_stacklevel())


class ModelCurvatureOperator(CurvatureOperator):
    """Full-data H or G of `loss_fn(model(x), y)` over a fixed list of batches.

    Built by `hessian_operator`/`ggn_operator`/`batch_*_operator`; see the module
    docstring. `kind` is "hessian" or "ggn". Extra methods: `batch_product(x, y, v)`
    (the curvature of one batch's mean loss times v; pure, usable under `vmap` over
    groups of samples), `gradient()`, `loss()`, `subset(indices)`.
    The parameters are copied at construction: later changes to the model's weights
    are not seen (build a new operator after a training step).
    """

    def __init__(self, model, loss_fn, data, kind="hessian", *, params=None, policy=None,
                 chunk_size=None, device=None, dtype=None, cache_graph="auto"):
        check_model(model)            # lazy parameters before their shapes are read
        if isinstance(model, torch.jit.ScriptModule):      # was blamed on the data layout
            raise TypeError("model is a TorchScript module (torch.jit.script / trace), which "
                            "torch.func cannot call with substituted parameters: pass the "
                            "eager nn.Module it was made from")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(outputs, targets) -> scalar mean loss")
        if kind not in ("hessian", "ggn"):
            raise ValueError(f"kind must be 'hessian' or 'ggn', got {kind!r}")
        check_policy(model, policy)
        if kind == "hessian":
            _warn_weight_norm(model)
        layout = ParamLayout.from_module(model, params)
        device, dtype = resolve_device_dtype(model, layout.names, device, dtype)
        super().__init__(layout.P, dtype, device, layout.names)
        self.model, self.loss_fn, self.kind, self.policy = model, loss_fn, kind, policy
        self.layout = layout
        self._dead_rows = _padding_rows(model, layout.names)     # J v by double vjp (_jv)
        self.primals, self.frozen = make_functional(model, layout.names, device=device, dtype=dtype)
        self.chunk_size = _as_chunk_size(chunk_size)
        self.source = as_data_source(data)
        self.N = self.source.N
        if cache_graph not in ("auto", True, False):
            raise TypeError(f"cache_graph must be True, False or 'auto', got {cache_graph!r}")
        graph = None            # measured graph bytes per sample, when a default needs it
        small = self.N * self.source.first_sample_numel() <= AUTO_CACHE_INPUT_NUMEL
        default_chunk = (self.chunk_size is None and self.source.form in ("pair", "dataset")
                         and policy != "train_batch_stats")
        if not small and (default_chunk or cache_graph == "auto"):
            graph = self._graph_bytes_per_sample()
        if cache_graph == "auto":
            cache_graph = small or _graph_fits(self.N, graph, device)
        self.cache_graph = cache_graph
        if default_chunk and not small:
            # bounded memory by default: an (X, y) pair used to be one chunk of all N
            # samples (graph memory ∝ N: 5.9 GB for one product at N = 10⁴ on a 123k CNN)
            self.chunk_size = default_chunk_size(self.N, graph, device)
        # in-memory pairs (views, no copy when device/dtype already match) and small
        # data are held as a batch list; anything else is streamed for every product
        self._batch_list = None
        if self.source.form == "pair" or cache_graph:
            self._batch_list = list(self._stream())
        self._cached = None
        self._shares = None             # each batch's share of the loss (_weighted_batches)
        self._no_forward_ad = False
        self._check_inputs()

    def _check_inputs(self) -> None:
        """Run the forward twice on the first two samples (the global RNG state restored
        afterwards) and refuse with a message: integer inputs to a network whose
        parameters are floating (instead of torch's dtype error deep inside a product);
        samples the model cannot run on, or an output without the batch dimension first;
        a forward that is not repeatable (dropout called as a function,
        `F.dropout(x, p, self.training)`, in train mode; noise injection), as for an
        active nn.Dropout; a forward whose output for a sample depends on the other
        samples of its batch (statistics over the batch, `h - h.mean(0)`: model(x[[0, 1]])[0]
        differs from model(x[[0, 0]])[0] beyond round-off), as for a train-mode
        nn.BatchNorm — except under policy="train_batch_stats", which asks for exactly that.
        Also refused: a forward that reads back weight-derived tensors cached on its modules,
        and one torch.func cannot transform (`_refuse_parameter_caches`, `_check_transforms`); the
        trial calls leave no attribute behind (`kept_attributes`)."""
        x, y = self.source.take(list(range(min(2, self.N))), device=self.device,
                                dtype=self.dtype)
        with kept_attributes(self.model):
            self._refuse_parameter_caches(x)
            self._trial_forwards(x, y)
            self._check_transforms(x, y)

    def _check_loss_runs(self, out, y) -> None:
        """loss_fn on the trial samples' outputs; where it raises there and again on the
        first 64 samples (a loss may need more than two: a top-k mean, groups of four), the
        error names loss_fn, the shapes and dtypes (`loss_failure`) instead of torch's
        error from inside a product (targets it cannot take: a label out of range, float
        class targets, one (1,) target per sample)."""
        try:
            with torch.no_grad(), _kept_loss_state(self.loss_fn):
                self.loss_fn(out, y)
            return
        except (RuntimeError, ValueError, TypeError, IndexError):
            pass
        n = min(self.N, 64)
        if n <= len(y):
            out_n, y_n = out, y
        else:
            x_n, y_n = self.source.take(list(range(n)), device=self.device, dtype=self.dtype)
            with torch.no_grad(), self._trial_mode():
                out_n = self._forward(self.primals, x_n)
        with torch.no_grad(), _kept_loss_state(self.loss_fn):
            checked_loss_value(self.loss_fn, out_n, y_n)

    def _trial_forwards(self, x, y) -> None:
        """The forward checks of `_check_inputs` on the samples x (targets y)."""
        try:
            with torch.no_grad(), self._trial_mode():
                a, b = (self._forward(self.primals, x) for _ in range(2))
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            if not (x.is_floating_point() or x.dtype == torch.bool):
                raise TypeError(
                    f"data inputs have dtype {x.dtype} but the model does not accept them "
                    f"({first}); integer inputs are passed as they are (token ids), so convert "
                    "images or features to floating point first, e.g. X.float()") from None
            low = first.lower()
            if any(k in low for k in ("dtype", "scalar type", "input type")):
                raise TypeError(
                    f"the model's forward fails with its parameters as {self.dtype} "
                    f"({first}): the operator runs every selected parameter in one dtype, so "
                    "a forward that casts between dtypes itself (x.double() into one layer, "
                    ".float() into the next) cannot run; give the layers one dtype "
                    "(model.double() or model.float()) and drop the casts") from None
            raise ValueError(
                f"the model cannot run on {x.shape[0]} samples of shape {tuple(x.shape[1:])} "
                f"({first}). Samples are the rows of X; a list is read as "
                "(x, y) batches (for per-sample pairs use a torch Dataset)") from None
        # (a 0-d output — a model that returns its own mean loss — is left alone)
        if isinstance(a, torch.Tensor) and x.shape[0] > 1 and a.ndim > 0 and a.shape[0] != x.shape[0]:
            raise ValueError(
                f"the model maps {x.shape[0]} samples of shape {tuple(x.shape[1:])} to an output "
                f"of shape {tuple(a.shape)}: its first dimension must be the batch dimension. "
                "Samples are the rows of X (a list is read as (x, y) batches; for per-sample "
                "pairs use a torch Dataset)")
        if isinstance(a, torch.Tensor) and x.shape[0] > 1 and a.ndim > 0:
            try:        # (train-mode BatchNorm cannot run on one sample: not checked then)
                with torch.no_grad(), self._trial_mode():
                    one = self._forward(self.primals, x[:1])
            except (RuntimeError, ValueError, TypeError, IndexError):
                one = None
            check_batch_dimension(a, one, x.shape[0])
        # a tolerance, not bitwise: some GPU kernels are not bitwise reproducible
        same = all(torch.allclose(u.nan_to_num(), v.nan_to_num(), rtol=1e-4, atol=1e-6)
                   if u.is_floating_point() else torch.equal(u, v)
                   for u, v in zip(output_tensors(a), output_tensors(b)))
        if self.kind == "ggn" and not isinstance(a, torch.Tensor):
            # J is taken of the output itself: a None / number leaf (an HF-style
            # {"logits": t, "loss": None}) failed in the first product with torch.func's
            # "expected f(*primals) to return only tensors"
            other = []
            _non_tensor_leaves(a, other)
            if other:
                raise TypeError(
                    f"kind='ggn' differentiates the model's output, which holds non-tensor "
                    f"leaves ({', '.join(other[:3])}); return only tensors from forward (drop "
                    "or wrap them) or use kind='hessian', which takes such outputs")
        self._check_loss_runs(a, y)
        if self.kind == "ggn" and isinstance(a, torch.Tensor) and a.is_floating_point():
            self._check_output_curvature(a, y)
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64:
            self._check_output_precision()
        if not same:
            raise self._not_repeatable()
        if x.shape[0] > 1 and self.policy != "train_batch_stats":
            leaves = self._sample_leaves(a, x, y)
            try:
                with torch.no_grad(), self._trial_mode():
                    alone = self._forward(self.primals, x[[0, 0]])
                    # a change below the tolerance above, from call to call, read as
                    # coupling: a train-mode parametrizations.spectral_norm's power
                    # iteration (2.6e-5) was blamed on batch statistics
                    again = (self._forward(self.primals, x[[0, 0]])
                             if _coupling(a, alone, leaves) else None)
            except (RuntimeError, ValueError, TypeError, IndexError):
                alone = again = None
            if again is not None and _coupling(again, alone, leaves):
                raise self._not_repeatable()
            if alone is not None:
                _check_samples_independent(a, alone, leaves)

    def _sample_leaves(self, out, x, y):
        """Positions of a container output's leaves that the sample-coupling check compares:
        those the loss reads (`loss_check._leaves_read`) whose first dimension is the
        sample's (1 in the model's output on one sample, when it runs on one). None for a
        tensor output (compared whole). A recurrent net returning (logits, h_n) — h_n
        (layers × directions, n, H), the batch second — was refused as mixing samples
        whenever layers × directions = 2, h_n's first dimension then matching the two-row
        probe (an outside sweep), though the loss reads the logits alone."""
        if isinstance(out, torch.Tensor):
            return None
        leaves = output_tensors(out)
        read = {id(t) for t in _leaves_read(out, self.loss_fn, y)}
        try:
            with torch.no_grad(), self._trial_mode():
                ones = output_tensors(self._forward(self.primals, x[:1]))
        except (RuntimeError, ValueError, TypeError, IndexError):
            ones = None
        if ones is not None and len(ones) != len(leaves):
            ones = None
        return {i for i, t in enumerate(leaves) if id(t) in read
                and (ones is None or (ones[i].ndim > 0 and ones[i].shape[0] == 1))}

    def _not_repeatable(self) -> ValueError:
        training = any(m.training for m in self.model.modules())
        return ValueError(
            "the model's forward is not repeatable (two calls on the same input differ): "
            "dropout called as a function, e.g. F.dropout(x, p, self.training), another "
            "random layer, or a layer that updates its state on every forward in train "
            "mode (spectral_norm's power iteration); curvature products would change "
            "from call to call. " + ("Call model.eval() or pass policy='eval'" if training
                                     else "The model is in eval mode, so its forward "
                                     "itself changes state (a buffer or attribute updated "
                                     "in forward, e.g. a running average it then uses): "
                                     "make that update conditional on self.training"))

    def _refuse_parameter_caches(self, x) -> None:
        """Refuse a forward that reads back a tensor computed from the parameters by an
        earlier forward — a cache on a module, `if self._w is None: self._w = f(W)`. Every
        later product would reuse it and miss those parameters (a net caching its output
        weight read 0.42 for 0.71, silently; primed by the user's own call, torch's "Can't
        call numpy() on Tensor that requires grad" inside Lanczos; outside sweeps).

        Told by what the output depends on: two forwards on one sample, each with its own
        parameter leaves; the second's output must reach neither the first's leaves (a cache
        kept where `call_model`'s restoring of the modules' attributes does not reach, e.g. a
        class attribute) nor the model's own parameters (a cache filled by the user's call
        before: every product substitutes them). A cache a forward fills in an instance
        attribute is put back after each forward, so every product recomputes it. A tensor
        a forward writes and does not read back is fine: an activation kept for logging,
        `weight` recomputed from `weight_orig` by the hook-based
        `torch.nn.utils.spectral_norm`/`weight_norm` before each forward (all three were
        refused as caches before), and a cache of shapes or constants."""
        names = self.layout.names
        real = dict(self.model.named_parameters())
        own = [(n, real[n]) for n in names if n in real and real[n].requires_grad]
        before = tensor_attributes(self.model)
        try:
            with torch.enable_grad(), self._trial_mode():
                first = tuple(p.detach().requires_grad_(True) for p in self.primals)
                self._forward(first, x[:1])
                stored = [_dotted(m, k) for (m, k), v in tensor_attributes(self.model).items()
                          if before.get((m, k)) is not v and v.requires_grad]
                second = tuple(p.detach().clone().requires_grad_(True) for p in self.primals)
                roots = [t for t in output_tensors(self._forward(second, x[:1]))
                         if t.is_floating_point() and t.requires_grad]
                if not roots:
                    return
                reached = torch.autograd.grad(roots, (*first, *(p for _, p in own)),
                                              [torch.ones_like(t) for t in roots],
                                              allow_unused=True)
        except Exception:  # noqa: BLE001 - the checks after this one say what is wrong with it
            return
        this_call = [n for n, g in zip(names, reached[:len(first)]) if g is not None]
        earlier = [n for (n, _), g in zip(own, reached[len(first):]) if g is not None]
        attrs = sorted({_dotted(m, k) for (m, k), v in before.items() if v.grad_fn is not None})
        if earlier:
            raise ValueError(f"module attribute(s) {attrs or '(not found)'} hold tensors computed "
                             f"from the parameters {earlier[:4]} by an earlier forward (a cache) "
                             "that the forward reads back: the curvature products would reuse "
                             "them and miss those parameters; clear the cache (set it to None) "
                             "and compute it inside forward")
        if this_call:
            where = stored or "outside its modules, e.g. a class attribute"
            raise ValueError(f"the model's forward stores tensor(s) computed from the parameters "
                             f"{this_call[:4]} ({where}: a cache) "
                             "and reads them back in later calls: the curvature products would "
                             "reuse them and miss those parameters; compute them inside forward "
                             "on every call")

    def _check_transforms(self, x, y=None) -> None:
        """One reverse-mode product on one sample, so that a forward torch.func cannot
        transform fails here with a message that names the cause, not deep inside the
        first product with torch's own (activation checkpointing: 'saved tensor hooks' or
        an autograd.Function without setup_context; a buffer updated in place in forward:
        'mutate a captured Tensor')."""
        if self.policy == "train_batch_stats":      # batch statistics: one sample is no batch
            return
        try:
            with self._trial_mode():
                out, pull = vjp(lambda *p: self._forward(p, x[:1]), *self.primals)
                if isinstance(out, torch.Tensor) and out.is_floating_point():
                    pull(torch.ones_like(out))
        except Exception as exc:  # noqa: BLE001 - only the causes named below are refused here
            if not isinstance(exc, RuntimeError):
                return
            msg = str(exc)
            first = msg.splitlines()[0]
            if "saved tensor hooks" in msg or "setup_context" in msg:
                raise ValueError(
                    "the model's forward cannot be differentiated by torch.func, which every "
                    f"curvature product uses ({first[:160]}): activation checkpointing "
                    "(torch.utils.checkpoint) or a custom autograd.Function without "
                    "setup_context; call the model without checkpointing for the "
                    "curvature (e.g. a flag that turns it off)") from None
            if "mutate a captured Tensor" in msg or "captured tensor" in msg.lower():
                raise ValueError(
                    "the model's forward updates a tensor in place that torch.func sees as "
                    f"captured ({first[:160]}): a buffer or attribute changed in forward "
                    "(a step counter, a running average) even in eval mode; make the update "
                    "conditional on self.training, or keep it out of forward") from None
        if y is None:
            return
        try:                    # the same through the loss: one with state of its own
            with self._trial_mode(), _kept_loss_state(self.loss_fn):
                grad(lambda *p: self._loss(p, x[:1], y[:1]))(*self.primals)
        except RuntimeError as exc:
            if "mutate a captured Tensor" in str(exc) or "captured tensor" in str(exc).lower():
                raise ValueError(
                    f"loss_fn {loss_name(self.loss_fn)!r} updates a tensor of its own in place "
                    f"({str(exc).splitlines()[0][:120]}): a loss with state (a running scale "
                    "or count) that changes on every call; the curvature needs a loss that "
                    "is a fixed function of the outputs — keep the update out of it (the "
                    "model and its forward are fine)") from None
        except Exception:  # noqa: BLE001 - the products say what else is wrong with it
            return

    def _graph_bytes_per_sample(self) -> float:
        """Bytes the forward pass and loss save for the backward, per sample, measured on
        the first (up to) four samples: every tensor saved by autograd counted once,
        parameters and buffers excluded (they do not grow with the batch)."""
        n = min(4, self.N)
        x, y = self.source.take(list(range(n)), device=self.device, dtype=self.dtype)
        fixed = {t.data_ptr() for t in (*self.primals, *self.frozen.values())
                 if isinstance(t, torch.Tensor)}
        seen, total = set(), [0]

        def pack(t):
            key = (t.data_ptr(), tuple(t.shape), t.dtype)
            if t.data_ptr() not in fixed and key not in seen:
                seen.add(key)
                total[0] += t.numel() * t.element_size()
            return t

        prim = [p.detach().requires_grad_(True) for p in self.primals]
        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                    self._trial_mode():
                self._loss(prim, x, y)
        except (RuntimeError, ValueError, NotImplementedError):   # _check_inputs says why
            from nets.utils.memory import ACTIVATION_FACTOR
            return float(ACTIVATION_FACTOR * x[:1].numel() * x.element_size())
        return total[0] / n

    @contextlib.contextmanager
    def _trial_mode(self):
        """The operator's policy on the model and torch's generators restored afterwards:
        the forward passes of the construction-time checks leave no trace."""
        with policy_mode(self.model, self.policy), kept_rng(self.device):
            yield

    def _stream(self):
        if self.policy == "train_batch_stats" and self.chunk_size is None \
                and self.source.form != "pair":
            # one chunk, whose batch statistics are the full data's, whatever the form: a
            # DataLoader's own batches (or a Dataset's reading chunks of 1,024) gave other
            # statistics than the (X, y) pair, 1.3 % apart on a BatchNorm MLP
            yield self.source.tensors(device=self.device, dtype=self.dtype)
            return
        yield from self.source.batches(self.chunk_size, device=self.device, dtype=self.dtype)

    def iter_batches(self):
        """The operator's data as (x, y) batches on its device, in sample order."""
        return iter(self._batch_list) if self._batch_list is not None else self._stream()

    def output_chunks(self):
        """(n_b, outputs, y_b) for each batch in order, the outputs a zero-argument callable
        (the forward pass at the current parameters, run when called; under the caller's
        no_grad and policy mode): the form `nets.curvature.chunk_shares` reads."""
        return ((x.shape[0], lambda x=x: self._forward(self.primals, x), y)
                for x, y in self.iter_batches())

    def _weighted_batches(self):
        """(x, y, ω_b): batch b enters with its share ω_b of the loss — n_b/N for a plain
        mean, W_b/W for a target-weighted one (`nets.curvature.chunk_shares`); a batch
        whose every target is ignored (ω_b = 0, its own loss 0/0) is left out."""
        if self._batch_list is not None and len(self._batch_list) == 1:
            yield (*self._batch_list[0], 1.0)
            return
        if self._shares is None:
            with torch.no_grad(), policy_mode(self.model, self.policy):
                self._shares = loss_shares(self.loss_fn, self.output_chunks(), self.N)
        for (x, y), w in zip(self.iter_batches(), self._shares, strict=True):
            if w > 0:
                yield x, y, w

    # -- functional pieces (pure functions of tensors) -----------------------------
    def _check_output_curvature(self, out, y) -> None:
        """Warn when the loss is linear in the model's outputs (its Hessian in the outputs
        Λ vanishes on a random direction): the Gauss–Newton matrix JᵀΛJ is then zero,
        as for a model ending in log_softmax with nll_loss. Zero on the two trial samples
        is checked again on the first 64 (a piecewise loss — Huber, smooth L1 — is linear
        in the outputs of some samples only: it warned with a Gauss–Newton matrix that
        was not zero)."""
        def vanishes(o, t) -> bool:
            with torch.enable_grad():
                lam = vjp(grad(lambda u: _scalar_loss(self.loss_fn(u, t))), o.detach())[1]
                g = torch.Generator(device="cpu").manual_seed(0)
                d = torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device)
                return not bool(lam(d)[0].abs().gt(0).any())

        n = min(64, self.N)
        try:
            zero = vanishes(out, y)
            if zero and n > out.shape[0]:
                x, t = self.source.take(np.arange(n), device=self.device, dtype=self.dtype)
                with torch.no_grad(), self._trial_mode():
                    o = self._forward(self.primals, x)
                zero = isinstance(o, torch.Tensor) and vanishes(o, t)
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            return
        if zero:
            warnings.warn(
                f"kind='ggn': the loss is linear in the model's outputs on the first {n} "
                "samples (its second derivative in them is zero), so the Gauss–Newton matrix "
                "is zero there — e.g. a model ending in log_softmax with nll_loss. Return "
                "logits and use F.cross_entropy (the same loss), or use kind='hessian'",
                UserWarning, stacklevel=caller_stacklevel())

    def _check_output_precision(self) -> None:
        """Warn when the loss's second derivative in the outputs is lost to the operator's
        dtype (`output_precision_error`, order 2, on the first 64 samples, > 5 %). The case
        met: a fitted cross-entropy net, where 1 − p_y falls below float32's eps (margins
        above ~17, loss ~1e-7) and torch's second derivative of the softmax loses
        p_y(1 − p_y); λ₁ came out 48 % low and predict_max_lr 48–93 % high, flagged
        converged, with nothing said (an outside sweep). dtype=torch.float64 computes it
        right (to margins ~37)."""
        n = min(64, self.N)
        try:
            x, t = self.source.take(np.arange(n), device=self.device, dtype=self.dtype)
            with torch.no_grad(), self._trial_mode():
                o = self._forward(self.primals, x)
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            return
        warn_output_precision(o, t, self.loss_fn, order=2, n=n,
                              consequence="Curvatures and learning rates are then off by up "
                                          "to 2×")

    def _forward(self, prim, x):
        state = dict(self.frozen)
        state.update(zip(self.layout.names, prim))
        return call_model(self.model, state, x)

    def _loss(self, prim, x, y):
        return _scalar_loss(self.loss_fn(self._forward(prim, x), y))

    def _pullback(self, x, y):
        """The linear map vt ↦ (curvature of batch (x, y)) · vt on parameter tuples.

        Hessian: reverse-over-reverse in torch.func, `vjp(grad(L_b))`: one forward and
        backward builds the gradient graph, each product is one pullback through it
        (measured ~2.5× a gradient on CPU, vs ~3.5× for forward-over-reverse).
        GGN: Jv by `jvp` through the network, Λ(Jv) by the pullback of the loss
        gradient w.r.t. the outputs, then the network's `vjp` pullback. A layer without
        forward-mode AD (torch's CPU LSTM kernel, "forward AD with mkldnn_rnn_layer")
        gets Jv by the double-vjp identity instead: z ↦ Jᵀz is linear, so the pullback
        of that map at z = 0 along v is Jv (one more backward pass; the operator then
        stays on this path)."""
        n = len(self.primals)
        if self.kind == "hessian":
            g = grad(lambda *p: self._loss(p, x, y), argnums=tuple(range(n)))
            return vjp(g, *self.primals)[1]
        f = lambda *p: self._forward(p, x)
        out, pull = vjp(f, *self.primals)
        # Λ·u as the pullback of the output gradient (Λ is symmetric); forward-mode
        # here trips a torch bug for mse_loss ("ZeroTensors are immutable")
        lam = vjp(grad(lambda o: _scalar_loss(self.loss_fn(o, y))), out)[1]

        def ggn_product(vt):
            return pull(lam(self._jv(f, vt, (out, pull)))[0])
        return ggn_product

    def _jv(self, f, vt, out_pull=None):
        """J v for the Jacobian J of f (a function of the primals) at the primals: forward
        mode, or, once a layer has shown it has no forward-mode derivative, the
        double-vjp identity (z ↦ Jᵀz is linear, so its pullback at z = 0 along v is Jv;
        one more backward pass). out_pull : (f(primals), its vjp pullback) if already
        built. With an `nn.Embedding(padding_idx=…)` weight selected the double-vjp identity
        is always used: torch's backward gives the padding row no gradient through the
        lookup, but forward mode carries its tangent, so J v and Jᵀ disagreed and the
        Gauss–Newton operator was not symmetric (uᵀGv 0.2234 against vᵀGu 0.2316); zeroing
        the row's tangent mended that only while the weight fed nothing else — tied to a
        decoder, the row's other path was dropped from J v alone (‖G − Gᵀ‖ 1.7 % of ‖G‖,
        negative eigenvalues −0.0076; outside sweeps). The pullback of Jᵀ is Jᵀ's exact
        transpose whatever the weight feeds."""
        if not self._no_forward_ad and not self._dead_rows:
            try:
                return jvp(f, self.primals, vt)[1]
            except NotImplementedError:
                self._no_forward_ad = True
        out, pull = vjp(f, *self.primals) if out_pull is None else out_pull
        return vjp(pull, torch.zeros_like(out))[1](tuple(vt))[0]

    def _pullbacks(self):
        """Per-batch product maps: built lazily one batch at a time (only one batch's
        graph alive), or built once and kept when `cache_graph` is set."""
        if self._cached is not None:
            return self._cached
        if self.cache_graph:
            self._cached = [(self._pullback(x, y), w, x.shape[0])
                            for x, y, w in self._weighted_batches()]
            return self._cached
        return ((self._pullback(x, y), w, x.shape[0]) for x, y, w in self._weighted_batches())

    def batch_product(self, x, y, v):
        """(curvature of loss_fn(model(x), y)) · v for one batch; flat v of length P.
        Pure in (x, y, v): usable under `vmap` over groups of samples."""
        with policy_mode(self.model, self.policy):
            return self.layout.flatten(self._pullback(x, y)(self.layout.unflatten(v)))

    def group_products(self, Xg, Yg, U):
        """Per-group curvature products, vmapped over groups: Xg (G, m, ...), Yg (G, m, ...)
        hold G groups of m samples; U (P, k). Returns (G, P, k) with [g] = C_g U where
        C_g is the curvature of the group's mean loss loss_fn(model(Xg[g]), Yg[g])."""
        lay = self.layout
        # the caller sizes (G, k) to its memory budget (nets.utils.memory.product_chunk).
        # On CPU the vectors run one after the other: one vmapped call along k vectors
        # holds k times the working set and is bound by memory traffic (nets.utils.memory)
        if U.shape[1] > 1 and U.device.type == "cpu":
            return torch.cat([self.group_products(Xg, Yg, U[:, j:j + 1])
                              for j in range(U.shape[1])], dim=2)

        def one_group(xg, yg):
            pb = self._pullback(xg, yg)
            if U.shape[1] == 1:
                return lay.flatten(pb(lay.unflatten(U[:, 0])))[:, None]
            # out_dims=0 then transpose: a product that does not depend on u (H = 0)
            # comes back unbatched, and vmap can broadcast it along dim 0 but not dim 1
            return vmap(lambda u: lay.flatten(pb(lay.unflatten(u))), in_dims=1)(U).transpose(0, 1)

        with policy_mode(self.model, self.policy):
            return vmap_or_loop(one_group)(Xg, Yg)

    def _matvec(self, v):
        vt = self.layout.unflatten(v)
        out = None
        with policy_mode(self.model, self.policy):
            for pb, w, _n in self._pullbacks():
                term = self.layout.flatten(pb(vt)) * w
                out = term if out is None else out + term
        return out

    def _matmat(self, V):
        if V.shape[1] == 1:
            return self._matvec(V[:, 0])[:, None]
        out = None
        with policy_mode(self.model, self.policy):
            for pb, w, n in self._pullbacks():
                prod = vmap(lambda v: self.layout.flatten(pb(self.layout.unflatten(v))),
                            in_dims=1)       # (k, P); see group_products for why not out_dims=1
                # columns split so one vmapped call fits the memory budget (nets.utils.memory)
                blk = self._column_block(V.shape[1], n)
                term = torch.cat([prod(V[:, a:a + blk]) for a in range(0, V.shape[1], blk)])
                term = term.transpose(0, 1) * w
                out = term if out is None else out + term
        return out

    def _column_block(self, k: int, samples: int) -> int:
        """Vectors per vmapped product on a batch of `samples` samples within the budget
        `self.memory` (bytes, or None: a share of the free memory; `nets.utils.memory`)."""
        from nets.utils.memory import chunk_count, memory_budget, product_bytes
        if getattr(self, "_sample_numel", None) is None:
            self._sample_numel = self.source.first_sample_numel()
        per = product_bytes(self.P, 1, samples, self._sample_numel,
                            torch.finfo(self.dtype).bits // 8)
        return chunk_count(k, per, memory_budget(getattr(self, "memory", None), self.device))

    # -- extras ------------------------------------------------------------------
    def gradient(self) -> torch.Tensor:
        """Full-data gradient ∇L(w) = Σ_b ω_b ∇L_b(w) as a flat vector (ω_b each batch's
        share of the loss, n_b/N for a plain mean: `_weighted_batches`)."""
        n = len(self.primals)
        out = None
        with policy_mode(self.model, self.policy):
            for x, y, w in self._weighted_batches():
                g = self.layout.flatten(grad(lambda *p: self._loss(p, x, y),
                                             argnums=tuple(range(n)))(*self.primals))
                out = g * w if out is None else out + g * w
        return out

    def loss(self) -> float:
        """Full-data loss Σ_b ω_b L_b(w) (ω_b = n_b/N for a plain mean)."""
        total = 0.0
        with torch.no_grad(), policy_mode(self.model, self.policy):
            for x, y, w in self._weighted_batches():
                total += w * float(self._loss(self.primals, x, y))
        return total

    def subset(self, indices, cache_graph=None) -> "ModelCurvatureOperator":
        """The same operator restricted to samples `indices` (positions in the sample
        order of its data); reuses the parameter copies. Samples are fetched by random
        access (`nets.utils.data_source.DataSource.take`).
        cache_graph : None (inherit), True, False or "auto" (judged on the subset)."""
        Xs, Ys = self.source.take(indices, device=self.device, dtype=self.dtype)
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.num_matvecs = 0
        new._cached = None
        new._shares = None
        new.source = as_data_source((Xs, Ys))
        new.N = new.source.N
        if cache_graph == "auto":
            new.cache_graph = Xs.numel() <= AUTO_CACHE_INPUT_NUMEL
        elif cache_graph is not None:
            new.cache_graph = bool(cache_graph)
        new._batch_list = list(new._stream())
        return new

    def batches_full_tensors(self):
        """(X, Y) of all data held by the operator, concatenated (on its device)."""
        if self._batch_list is not None and len(self._batch_list) == 1:
            return self._batch_list[0]
        return self.source.tensors(device=self.device, dtype=self.dtype)


@outside_autocast
def hessian_operator(model: nn.Module, loss_fn: Callable, data, *, params=None, policy=None,
                     chunk_size=None, device=None, dtype=None,
                     cache_graph="auto") -> ModelCurvatureOperator:
    """Full-data Hessian H = Σ_b ω_b ∇²L_b(w) = (1/N) Σ_i ∇²ℓ_i(w), ω_b = n_b/N (for a
    weighted mean, each batch's share of the weights: `nets.curvature.chunk_shares`).

    data : an (X, y) pair, a torch Dataset of (x, y) samples, or a re-iterable of (x, y)
        batches such as a non-shuffling DataLoader (`nets.utils.data_source`).
    params : None (all trainable parameters), names, or a predicate (name, tensor) -> bool.
    policy : None | "eval" | "train_batch_stats" (module docstring).
    chunk_size : at most this many samples per forward/backward pass (memory); the
        product is the exact ω_b-weighted average whatever the chunking (except with
        policy="train_batch_stats", where each chunk normalises by its own statistics).
    device, dtype : where/in what precision products run (default: the model's).
        dtype=torch.float64 gives products exact to round-off.
    cache_graph : True: keep each batch's gradient graph between products, so that a
        product costs one backward pass through it (about a gradient's cost) instead of
        a fresh forward + backward; memory grows with the data held. False: rebuild per
        product (one batch's graph alive at a time; data other than an in-memory pair
        are then streamed from their source for every product). "auto" (default): True
        when the inputs total ≤ AUTO_CACHE_INPUT_NUMEL numbers or N × GRAPH_PRODUCT_FACTOR ×
        the measured graph bytes per sample fits half the default memory budget
        (`_graph_fits`, `nets.utils.memory`). Parameters are frozen
        copies, so the cache stays valid for the operator's lifetime.

    The loss is checked as every entry point checks it
    (`nets.curvature.loss_check.check_mean_reduced`: outputs and targets that broadcast
    across samples refused, a summed or weighted-mean loss warned about), once, on up to
    64 samples of `data`: a hand-built operator got neither (an (N, 1) output against (N,)
    targets gave λ₁ 3.43 for 3.46, moving with chunk_size; an outside sweep).
    """
    return _loss_checked(model, loss_fn, data, "hessian", params=params, policy=policy,
                         chunk_size=chunk_size, device=device, dtype=dtype,
                         cache_graph=cache_graph)


@outside_autocast
def ggn_operator(model: nn.Module, loss_fn: Callable, data, *, params=None, policy=None,
                 chunk_size=None, device=None, dtype=None,
                 cache_graph="auto") -> ModelCurvatureOperator:
    """Generalised Gauss–Newton G = (1/N) Σ_i J_iᵀ Λ_i J_i (PSD for convex losses),
    applied as vjp(Λ · jvp(v)) without forming Jacobians. Arguments, and the loss check, as
    `hessian_operator`."""
    return _loss_checked(model, loss_fn, data, "ggn", params=params, policy=policy,
                         chunk_size=chunk_size, device=device, dtype=dtype,
                         cache_graph=cache_graph)


def _loss_checked(model, loss_fn, data, kind, **options) -> ModelCurvatureOperator:
    """The operator of `kind`, its loss checked once (`check_mean_reduced`) as the public
    factories promise."""
    op = ModelCurvatureOperator(model, loss_fn, data, kind, **options)
    mean_reduction_check(model, loss_fn, op.source)
    return op


@outside_autocast
def batch_hessian_operator(model, loss_fn, data, indices, *, params=None, policy=None,
                           chunk_size=None, device=None, dtype=None,
                           cache_graph="auto") -> ModelCurvatureOperator:
    """Batch Hessian H_B = (1/B) Σ_{i∈S} ∇²ℓ_i(w) for the samples S = `indices` (positions
    in the sample order of `data`, any of the three forms)."""
    pair = as_data_source(data).take(indices)
    return hessian_operator(model, loss_fn, pair, params=params, policy=policy,
                            chunk_size=chunk_size, device=device, dtype=dtype,
                            cache_graph=cache_graph)


@outside_autocast
def batch_ggn_operator(model, loss_fn, data, indices, *, params=None, policy=None,
                       chunk_size=None, device=None, dtype=None,
                       cache_graph="auto") -> ModelCurvatureOperator:
    """Batch GGN G_B = (1/B) Σ_{i∈S} J_iᵀ Λ_i J_i for S = `indices`."""
    pair = as_data_source(data).take(indices)
    return ggn_operator(model, loss_fn, pair, params=params, policy=policy,
                        chunk_size=chunk_size, device=device, dtype=dtype,
                        cache_graph=cache_graph)


@outside_autocast
def curvature_operator(model, loss_fn, data, *, kind="hessian", **kwargs) -> ModelCurvatureOperator:
    """`hessian_operator` or `ggn_operator` chosen by `kind`, without their loss check (for
    the package's own loops, whose entry point has checked the loss once)."""
    return ModelCurvatureOperator(model, loss_fn, data, kind, **kwargs)
