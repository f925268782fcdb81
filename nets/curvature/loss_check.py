"""Is `loss_fn` mean-reduced? A cheap check for the package's one loss convention.

Every curvature and learning-rate function assumes `loss_fn(outputs, targets)` returns
the **mean** of the per-sample losses, L_S = (1/|S|) Σ_{i∈S} ℓ_i, so that H = ∇²L is an
average and the batch noise scales like c(B, N) = 1/B − 1/N. A summed loss
(`reduction="sum"`) multiplies every curvature by the number of samples in each
evaluation — which depends on `chunk_size` and on the form `data` is given in (all N at
once for a small pair, a loader's own batch size) — so its numbers are not even
consistent between calls.

`check_mean_reduced` evaluates the model once on n = min(`sample`, N) samples spread
over the data, then compares the loss of that batch with the mean of the n per-sample
values ℓ_i = loss_fn(outputs[i:i+1], targets[i:i+1]) (the same outputs: one forward
pass, so dropout and BatchNorm in train mode see one batch; a dict / tuple / namedtuple /
list output is sliced on each tensor leaf with the samples along its first dimension, its
container kept):

    ratio = L_batch / mean_i ℓ_i   (1 for a mean-reduced loss, n for a summed one)

and warns (UserWarning) when the ratio is within 1 % of n. Outputs and targets whose
shapes broadcast across samples (outputs (n, 1) against targets (n,): an elementwise loss
gives an n × n matrix of every output against every target; for a container output, the
tensor leaves the loss depends on) are refused with a ValueError when the ratio then
differs from 1 by more than float rounding. It also warns
when the ratio is more than 1 % from 1 (or a per-sample value is not finite while the
batch value is), or when the batch loss's gradient in a tensor output differs by more
than 1 % from (1/n) × the per-sample losses' gradients (`_gradient_gap`: the values alone
miss a weighted mean whose per-sample losses happen to be equal, and a broadcast whose
outputs are; both are told by the gradient): the loss is then a weighted mean — class
weights, `ignore_index`, padded tokens — whose per-sample decomposition the noise-based predictions do not model
(and whose full-data value, assembled from chunks as the chunk-size-weighted mean of the
chunks' weighted means, depends slightly on the chunking).
The model's buffers (BatchNorm running statistics) are restored afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import numpy as np
import torch

from nets.curvature.params import check_model, map_output_leaves, output_tensors
from nets.utils.autocast import outside_autocast
from nets.utils.callers import caller_stacklevel
from nets.utils.data_source import as_data_source, model_place
from nets.utils.modes import kept_attributes, kept_rng, kept_tensors

__all__ = ["check_mean_reduced", "checked_loss_value", "loss_name", "mean_reduction_check"]

#: relative tolerance for "the batch loss is n × the mean of the per-sample losses"
RTOL = 1e-2
#: with outputs and targets that broadcast across samples, the ratio's distance from 1 (past
#: float rounding) that shows the loss really pairs them: a broadcast squared error differs
#: from the per-sample one by 2·cov(outputs, targets), small on an untrained network
BROADCAST_RTOL = 1e-5


def loss_name(loss_fn) -> str:
    """A readable name for `loss_fn` (function, functools.partial or module)."""
    while isinstance(loss_fn, functools.partial):
        loss_fn = loss_fn.func
    return getattr(loss_fn, "__name__", type(loss_fn).__name__)


def _scalar(v) -> float:
    if not isinstance(v, torch.Tensor) or v.numel() != 1:
        raise TypeError("loss_fn must return a scalar")
    return float(v.detach().reshape(()))


def _ratio(batch, per) -> float:
    """L_batch / mean_i ℓ_i; NaN when it cannot be told."""
    if per is None:
        return math.nan
    mean = float(np.mean(per))
    if not (math.isfinite(mean) and math.isfinite(batch)) or mean == 0.0:
        return math.nan
    return batch / mean


def _sample_of(out, i: int, n: int):
    """Sample i of a model output of n samples: `t[i:i+1]` on every tensor leaf `t` with n
    rows (`map_output_leaves`: containers kept); other leaves (a 0-d auxiliary loss,
    non-tensors) as they are."""
    return map_output_leaves(out, lambda t: t[i:i + 1] if t.ndim > 0 and t.shape[0] == n else t)


def _leaves_read(out, loss_fn, Y) -> list:
    """The floating tensor leaves of a container output that `loss_fn(out, Y)` depends on
    (a gradient reaches them); all of its tensor leaves when that cannot be told."""
    leaves = output_tensors(out)
    if isinstance(out, torch.Tensor):
        return leaves
    floats = [t for t in leaves if t.is_floating_point() or t.is_complex()]
    if not floats:
        return leaves
    try:
        with torch.enable_grad():
            copies = {id(t): t.detach().requires_grad_(True) for t in floats}
            swapped = map_output_leaves(out, lambda t: copies.get(id(t), t))
            grads = torch.autograd.grad(loss_fn(swapped, Y), list(copies.values()),
                                        allow_unused=True)
    except (RuntimeError, ValueError, TypeError, IndexError):
        return leaves
    return [t for t, g in zip(floats, grads) if g is not None]


def _batch_and_samples(model, loss_fn, data, *, sample: int):
    """(L_batch, [ℓ_i], (output shape, target shape), gradient gap) on min(sample, N)
    samples spread over the data, from one forward pass (`_gradient_gap`); (nan, None,
    shapes or None, nan) when it cannot be told."""
    if not isinstance(sample, (int, np.integer)) or isinstance(sample, bool) or sample < 2:
        raise ValueError(f"sample must be an int >= 2, got {sample!r}")
    src = as_data_source(data)
    n = min(int(sample), src.N)
    if n < 2:
        return math.nan, None, None, math.nan
    device, dtype = model_place(model)
    idx = np.unique(np.linspace(0, src.N - 1, n).round().astype(np.int64))   # spread out
    X, Y = src.take(idx, device=device, dtype=dtype)
    shapes = None
    try:
        # active dropout must not draw from the caller's random stream; the forward runs
        # on the caller's module, whose parameters and buffers it may write (max_norm
        # embeddings, train-mode BatchNorm): both restored
        with (torch.no_grad(), kept_rng(device), kept_tensors(model), kept_attributes(model),
              _kept_loss_state(loss_fn)):
            out = model(X)
            with warnings.catch_warnings():     # torch's own broadcast warning: said below
                warnings.filterwarnings("ignore", message=".*target size.*different to the input size")
                if isinstance(Y, torch.Tensor):
                    read = [tuple(t.shape) for t in _leaves_read(out, loss_fn, Y)]
                    shapes = next(((o, tuple(Y.shape)) for o in read
                                   if _cross_sample_broadcast((o, tuple(Y.shape)))),
                                  (read[0], tuple(Y.shape)) if read else None)
                value = checked_loss_value(loss_fn, out, Y)
                if isinstance(value, torch.Tensor) and value.numel() != 1:
                    raise _NotOneNumber(tuple(value.shape))
                batch = _scalar(value)
                per = [_scalar(loss_fn(_sample_of(out, i, len(idx)), Y[i:i + 1]))
                       for i in range(len(idx))]
                gap = _gradient_gap(out, loss_fn, Y)
    except _NotOneNumber as exc:
        raise ValueError(f"loss_fn {loss_name(loss_fn)!r} returned a tensor of shape "
                         f"{exc.args[0]} on a batch of {len(idx)} samples: it must return "
                         "one number (a scalar), the mean of the per-sample losses "
                         "(reduction=\"mean\", the default of torch's losses)") from None
    except _LossRefused:
        raise                                   # the loss cannot take the data's targets
    except (RuntimeError, ValueError, TypeError, IndexError):
        return math.nan, None, shapes, math.nan
    return batch, per, shapes, gap


class _NotOneNumber(Exception):
    """loss_fn returned more than one number on a batch (reduction="none")."""


class _LossRefused(ValueError):
    """`loss_failure`'s error: kept apart from the errors that mean "cannot be told"."""


def loss_failure(loss_fn, out, Y, cause) -> ValueError:
    """The error for a loss_fn that raised `cause` on the model's outputs `out` for a batch
    of the data's targets `Y`: torch's own message kept, the shapes and dtypes named."""
    n = out.shape[0] if isinstance(out, torch.Tensor) and out.ndim else "some"
    return _LossRefused(
        f"loss_fn {loss_name(loss_fn)!r} cannot be evaluated on data: on a batch of {n} of "
        f"its samples (model outputs {_described(out)}, targets {_described(Y)}) it raised "
        f"{type(cause).__name__}: {cause}. Check that the targets are what loss_fn expects "
        "(class indices in range and of integer dtype for cross-entropy, one target per "
        "sample in the outputs' shape for a regression loss), and that loss_fn runs on any "
        "number of samples: it is evaluated on chunks, batches and single samples, as the "
        "mean of per-sample losses")


def checked_loss_value(loss_fn, out, Y):
    """loss_fn(out, Y), with `loss_failure` in place of the exceptions torch raises for
    targets a loss cannot take (IndexError, RuntimeError, ValueError, TypeError)."""
    try:
        return loss_fn(out, Y)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise loss_failure(loss_fn, out, Y, exc) from exc


def _described(value) -> str:
    """'shape (n, K) float32' for a tensor, the type's name otherwise."""
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


def _gradient_gap(out, loss_fn, Y) -> float:
    """‖∂L_batch/∂o − (1/n)·(∂ℓ_i/∂o_i)_i‖ / ‖(1/n)·(∂ℓ_i/∂o_i)_i‖ for a floating tensor
    output o of n samples: 0 for a mean of per-sample losses, whatever their values; NaN
    when it cannot be told (a container output, a loss torch cannot differentiate here).
    The values alone miss a weighted mean whose per-sample losses happen to be nearly
    equal (an untrained net: class weights [1, 1, 1, 10] gave a ratio of 1.0004, while
    λ₁ was 2× the per-sample mean's), and a broadcast across samples whose outputs are
    all equal (a zero-initialised head: ratio exactly 1, λ₁ depending on chunk_size;
    an outside sweep)."""
    if not (isinstance(out, torch.Tensor) and out.is_floating_point()
            and isinstance(Y, torch.Tensor) and out.ndim > 0 and out.shape[0] >= 2):
        return math.nan
    n = out.shape[0]

    def gradients(dtype):
        with torch.enable_grad():
            o = out.detach().to(dtype).requires_grad_(True)
            wide = Y.to(dtype) if Y.is_floating_point() else Y
            whole = torch.autograd.grad(loss_fn(o, wide).reshape(()), o)[0]
            rows = []
            for i in range(n):
                oi = o.detach()[i:i + 1].requires_grad_(True)
                rows.append(torch.autograd.grad(loss_fn(oi, wide[i:i + 1]).reshape(()), oi)[0])
            return whole, torch.cat(rows) / n

    # in float64, else in the outputs' own dtype: a loss holding float32 tensors of its own
    # (nn.CrossEntropyLoss(weight=float32)) cannot run on float64 outputs, and the
    # weighted-mean warning then read "differs by nan%" (an outside sweep)
    for dtype in dict.fromkeys((torch.float64, out.dtype)):
        try:
            whole, each = gradients(dtype)
            break
        except (RuntimeError, ValueError, TypeError, IndexError):
            continue
    else:
        return math.nan
    scale = float(each.norm())
    diff = float((whole - each).norm())
    if not (math.isfinite(scale) and math.isfinite(diff)):
        return math.nan
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def _kept_loss_state(loss_fn):
    """A loss given as an nn.Module keeps its parameters and buffers as they were: one
    that updates its own state (a running scale) was moved from 1.0 to 1.26 by the ~13
    evaluations of this check (an outside sweep)."""
    return kept_tensors(loss_fn) if isinstance(loss_fn, torch.nn.Module) else contextlib.nullcontext()


def _cross_sample_broadcast(shapes) -> bool:
    """Outputs and targets of different shapes that broadcast to more elements than
    either has (outputs (n, 1) against targets (n,) give (n, n)): an elementwise loss then
    pairs every output with every sample's target."""
    if shapes is None or shapes[0] == shapes[1]:
        return False
    try:
        full = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        return False
    return math.prod(full) > max(math.prod(shapes[0]), math.prod(shapes[1]))


@outside_autocast
def check_mean_reduced(model, loss_fn, data, *, sample: int = 64) -> float:
    """Warn (UserWarning) when `loss_fn` looks summed over the batch instead of averaged,
    or is a weighted mean (class weights, ignore_index, padding; module docstring).

    Returns the ratio L_batch / mean_i ℓ_i on n = min(`sample`, N) samples spread over
    `data` (any form of `nets.utils.data_source`): ≈ 1 for a mean-reduced loss, ≈ n for
    a summed one, NaN when it cannot be told — with a UserWarning saying so (a loss that
    fails on a single sample, one sample, a zero mean). Costs one forward pass on n
    samples and n one-sample loss evaluations. Raises TypeError for a model that is not
    an nn.Module or a loss_fn that is not callable, ValueError for NaN or inf in the
    model's parameters or buffers, for a loss that raises on the batch of n samples (its
    error kept: targets it cannot take, or a loss that needs all N samples), returns more
    than one number on it (reduction="none"), or is NaN or inf on it.
    """
    ratio = mean_reduction_check(model, loss_fn, data, sample=sample)
    if not math.isfinite(ratio):
        warnings.warn(
            f"check_mean_reduced: cannot tell whether loss_fn {loss_name(loss_fn)!r} is "
            "mean-reduced (it could not be evaluated on the batch and on each sample alone "
            "as one number each, or the per-sample values average to 0); the package's "
            "curvatures assume the mean of per-sample losses", UserWarning,
            stacklevel=caller_stacklevel())
    return ratio


@outside_autocast
def mean_reduction_check(model, loss_fn, data, *, sample: int = 64) -> float:
    """`check_mean_reduced` as every entry point runs it first: the same refusals and
    warnings, but a loss whose reduction cannot be told (NaN: a model that cannot run on
    the batch, a loss that fails on single samples) passes without a word — the entry
    point's own computation then names what is wrong with it."""
    check_model(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable: loss_fn(outputs, targets) -> scalar mean "
                        f"loss, got {type(loss_fn).__name__}")
    src = as_data_source(data)
    n = min(int(sample), src.N) if isinstance(sample, (int, np.integer)) else sample
    batch, per, shapes, gap = _batch_and_samples(model, loss_fn, src, sample=sample)
    if per is not None and not math.isfinite(batch):
        raise ValueError(f"loss_fn {loss_name(loss_fn)!r} is NaN or inf ({batch}) on {n} "
                         "samples of data at the model's parameters: no curvature or "
                         "learning rate can be computed there")
    ratio = _ratio(batch, per)
    if _cross_sample_broadcast(shapes) and ((math.isfinite(ratio)
                                             and abs(ratio - 1.0) > BROADCAST_RTOL)
                                            or gap > RTOL):
        out_shape, y_shape = shapes
        raise ValueError(
            f"data: the targets (shape {y_shape} for {y_shape[0]} samples) and the model's "
            f"outputs (shape {out_shape}) broadcast to {tuple(torch.broadcast_shapes(*shapes))} "
            f"in loss_fn {loss_name(loss_fn)!r}, which then pairs each output with every "
            "sample's target (it is not a per-sample loss: on these samples it returns "
            f"{ratio:.4g}× the mean of the per-sample values, and its gradient in the outputs "
            f"differs from their mean's by {gap:.0%}). Give the targets the outputs' "
            f"shape (e.g. y.reshape({', '.join(['-1'] + [str(d) for d in out_shape[1:]])})).")
    if isinstance(n, int) and n >= 2 and math.isfinite(ratio) and abs(ratio - n) <= RTOL * n:
        warnings.warn(
            f"loss_fn {loss_name(loss_fn)!r} looks summed over the batch: on {n} samples it "
            f"returns {ratio:.4g}× the mean of its per-sample values. Curvatures and learning "
            "rates here assume a mean-reduced loss; a summed one multiplies them by the number "
            "of samples in each evaluation, which depends on chunk_size and on the form of "
            "data, so they are neither right nor consistent. Use the loss's reduction=\"mean\" "
            "(the default of torch's losses).",
            UserWarning, stacklevel=caller_stacklevel())
    elif per is not None and math.isfinite(batch) and (
            not all(math.isfinite(v) for v in per)
            or (math.isfinite(ratio) and abs(ratio - 1.0) > RTOL) or gap > RTOL):
        how = (f"on {n} samples a sample's own value is not finite (e.g. a sample whose "
               "every target is ignored)" if not all(math.isfinite(v) for v in per)
               else f"on {n} samples it returns {ratio:.4g}× their mean and its gradient in "
                    f"the outputs differs from their mean's by {gap:.0%}")
        warnings.warn(
            f"loss_fn {loss_name(loss_fn)!r} is not the plain mean of its per-sample values: "
            f"{how} — a weighted mean, as with class weights, ignore_index or padded "
            "tokens. The per-sample curvature noise, the batch-size predictions and the "
            "learning rates assume L = (1/N)·Σ ℓ_i and are off for it (by 10-70 % in tests); "
            "the plain curvatures (top_eigenvalues, measured batch spectra) are exact, in "
            "chunks too where each chunk's share of the loss's weights can be read from the "
            "loss (a warning says where it cannot). Use an unweighted mean-reduced loss for "
            "the predictions.",
            UserWarning, stacklevel=caller_stacklevel())
    return ratio
