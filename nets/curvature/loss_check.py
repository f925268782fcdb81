"""Is `loss_fn` mean-reduced? A cheap check for the package's one loss convention.

Every curvature and learning-rate function assumes `loss_fn(outputs, targets)` returns
the **mean** of the per-sample losses, L_S = (1/|S|) Σ_{i∈S} ℓ_i, so that H = ∇²L is an
average and the batch noise scales like c(B, N) = 1/B − 1/N. A summed loss
(`reduction="sum"`) silently multiplies every eigenvalue by the batch size and every
predicted learning rate by its inverse.

`check_mean_reduced` evaluates the model once on n = min(`sample`, N) samples spread
over the data, then compares the loss of that batch with the mean of the n per-sample
values ℓ_i = loss_fn(outputs[i:i+1], targets[i:i+1]) (the same outputs: one forward
pass, so dropout and BatchNorm in train mode see one batch):

    ratio = L_batch / mean_i ℓ_i   (1 for a mean-reduced loss, n for a summed one)

and warns (UserWarning) when the ratio is within 1 % of n. It also warns when the ratio
is more than 1 % from 1 (or a per-sample value is not finite while the batch value is):
the loss is then a weighted mean — class weights, `ignore_index`, padded tokens — whose
per-sample decomposition the noise-based predictions do not model. The model's buffers
(BatchNorm running statistics) are restored afterwards.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch

from nets.utils.data_source import as_data_source, model_place

__all__ = ["check_mean_reduced", "loss_name"]

#: relative tolerance for "the batch loss is n × the mean of the per-sample losses"
RTOL = 1e-2


def loss_name(loss_fn) -> str:
    """A readable name for `loss_fn` (function, functools.partial or module)."""
    while isinstance(loss_fn, functools.partial):
        loss_fn = loss_fn.func
    return getattr(loss_fn, "__name__", type(loss_fn).__name__)


def _scalar(v) -> float:
    if not isinstance(v, torch.Tensor) or v.numel() != 1:
        raise TypeError("loss_fn must return a scalar")
    return float(v.detach().reshape(()))


def mean_reduction_ratio(model, loss_fn, data, *, sample: int = 8) -> float:
    """L_batch / mean_i ℓ_i on the first min(sample, N) samples (module docstring);
    NaN when it cannot be told (one sample, a zero mean, a loss that fails on one
    sample, a per-sample value that is not finite)."""
    return _ratio(*_batch_and_samples(model, loss_fn, data, sample=sample))


def _ratio(batch, per) -> float:
    """L_batch / mean_i ℓ_i; NaN when it cannot be told."""
    if per is None:
        return math.nan
    mean = float(np.mean(per))
    if not (math.isfinite(mean) and math.isfinite(batch)) or mean == 0.0:
        return math.nan
    return batch / mean


def _batch_and_samples(model, loss_fn, data, *, sample: int):
    """(L_batch, [ℓ_i]) on the first min(sample, N) samples from one forward pass; (nan,
    None) when it cannot be told."""
    if not isinstance(sample, (int, np.integer)) or isinstance(sample, bool) or sample < 2:
        raise ValueError(f"sample must be an int >= 2, got {sample!r}")
    src = as_data_source(data)
    n = min(int(sample), src.N)
    if n < 2:
        return math.nan, None
    device, dtype = model_place(model)
    idx = np.unique(np.linspace(0, src.N - 1, n).round().astype(np.int64))   # spread out
    X, Y = src.take(idx, device=device, dtype=dtype)
    saved = {k: b.detach().clone() for k, b in model.named_buffers()}
    try:
        with torch.no_grad():
            out = model(X)
            batch = _scalar(loss_fn(out, Y))
            per = [_scalar(loss_fn(out[i:i + 1], Y[i:i + 1])) for i in range(len(idx))]
    except (RuntimeError, ValueError, TypeError, IndexError):
        return math.nan, None
    finally:
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(saved[k])
    return batch, per


def check_mean_reduced(model, loss_fn, data, *, sample: int = 64) -> float:
    """Warn (UserWarning) when `loss_fn` looks summed over the batch instead of averaged,
    or is a weighted mean (class weights, ignore_index, padding; module docstring).

    Returns the ratio L_batch / mean_i ℓ_i on n = min(`sample`, N) samples spread over
    `data` (any form of `nets.utils.data_source`): ≈ 1 for a mean-reduced loss, ≈ n for
    a summed one, NaN when it cannot be told. Costs one forward pass on n samples and n
    one-sample loss evaluations; never raises for a loss it cannot evaluate per sample.
    """
    src = as_data_source(data)
    n = min(int(sample), src.N) if isinstance(sample, (int, np.integer)) else sample
    batch, per = _batch_and_samples(model, loss_fn, src, sample=sample)
    ratio = _ratio(batch, per)
    if isinstance(n, int) and n >= 2 and math.isfinite(ratio) and abs(ratio - n) <= RTOL * n:
        warnings.warn(
            f"loss_fn {loss_name(loss_fn)!r} looks summed over the batch: on {n} samples it "
            f"returns {ratio:.4g}× the mean of its per-sample values. Curvatures and learning "
            "rates here assume a mean-reduced loss; use reduction=\"mean\" (e.g. "
            "F.cross_entropy(outputs, targets, reduction=\"mean\")).",
            UserWarning, stacklevel=3)
    elif per is not None and math.isfinite(batch) and (
            not all(math.isfinite(v) for v in per)
            or (math.isfinite(ratio) and abs(ratio - 1.0) > RTOL)):
        warnings.warn(
            f"loss_fn {loss_name(loss_fn)!r} is not the plain mean of its per-sample values: "
            f"on {n} samples it returns {ratio:.4g}× their mean (or a sample's own value is "
            "not finite) — a weighted mean, as with class weights, ignore_index or padded "
            "tokens. The per-sample curvature noise, the batch-size predictions and the "
            "learning rates assume L = (1/N)·Σ ℓ_i and are off for it (by 10-70 % in tests); "
            "the plain curvatures (top_eigenvalues, measured batch spectra) are exact. Use an "
            "unweighted mean-reduced loss for the predictions.",
            UserWarning, stacklevel=3)
    return ratio
