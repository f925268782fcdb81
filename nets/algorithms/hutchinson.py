"""Hutchinson's stochastic trace estimator (Hutchinson 1990).

    tr(A) = E[zᵀ A z]   for Rademacher z (entries ±1 with probability 1/2),

estimated by the mean over `num_probes` independent probes, with its standard error
(sample standard deviation / √num_probes). Probes are applied in blocks through the
operator's `matmat` (vmap over probe vectors), never one Python call per probe.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nets.utils.autocast import outside_autocast
from nets.utils.results import Result, result
from nets.utils.seeding import resolved_seed
from rmt.validation import as_int

__all__ = ["TraceEstimate", "hutchinson_trace"]


@result
class TraceEstimate(Result):
    """Hutchinson estimate of tr(A): `estimate` (mean of the per-probe quadratic forms
    `per_probe` = zᵀAz), `stderr` (their standard deviation / √num_probes; NaN for one
    probe), `num_probes`, `seed`."""

    estimate: float
    stderr: float
    num_probes: int
    seed: int
    per_probe: np.ndarray


@outside_autocast
def hutchinson_trace(op, num_probes=32, *, seed=0, block_size=None) -> TraceEstimate:
    """Estimate of tr(op) and its standard error from `num_probes` Rademacher probes
    drawn from `numpy.random.default_rng(seed)`; `block_size` probes per matmat
    (default: all of them, capped at 2²⁴ numbers per block). The standard error is NaN
    for a single probe."""
    if not all(hasattr(op, a) for a in ("P", "matmat")):
        raise TypeError(f"op must be a CurvatureOperator, got {type(op).__name__}")
    k = as_int("num_probes", num_probes, minimum=1)
    P = op.P
    bs = max(1, min(k, (1 << 24) // max(P, 1))) if block_size is None else \
        as_int("block_size", block_size, minimum=1)
    seed = resolved_seed("seed", seed)
    rng = np.random.default_rng(seed)
    device = getattr(op, "device", torch.device("cpu"))
    quad = []
    for a in range(0, k, bs):
        # probe j is row j of default_rng(seed).choice([-1, 1], size=(num_probes, P)),
        # whatever the blocking
        Z = torch.from_numpy(rng.choice(np.array([-1.0, 1.0]), size=(min(bs, k - a), P)).T).to(device)
        AZ = op.matmat(Z).to(torch.float64)
        quad.append((Z * AZ).sum(dim=0).cpu().numpy())
    q = np.concatenate(quad)
    if not np.all(np.isfinite(q)):
        raise ValueError("the operator returned NaN or inf in a product: the loss is not "
                         "twice differentiable to a finite value at these parameters and data")
    se = float(q.std(ddof=1) / math.sqrt(k)) if k > 1 else float("nan")
    return TraceEstimate(estimate=float(q.mean()), stderr=se, num_probes=k, seed=seed,
                         per_probe=q)
