"""Per-sample curvature noise along directions (docs/theory.md §3.3–§3.5 [ext], §2).

Directional noise. For a unit vector u and per-sample curvatures C_i (Hessians H_i, or
GGN terms J_iᵀΛ_iJ_i) with mean C = (1/N) Σ_i C_i,

    s_u² = (1/(N−1)) Σ_i ‖(C_i − C) u‖²,

the per-sample variance of the curvature-vector product along u. It enters the batch
prediction λ'(B) ≈ λ + c(B,N)·s_u²/λ (c = 1/B − 1/N), because uᵀE[ε²]u = c(B,N)·s_u²
for ε = C_B − C. It is computed with per-sample curvature-vector products vmapped over
samples, streamed in chunks of groups (memory: one chunk × P × #directions, never N×P).

Micro-batches. With `micro_batch=m > 1` the samples are split into G = ⌊N/m⌋ disjoint
groups by the permutation `numpy.random.default_rng(seed).permutation(N)` (the first
G·m entries, row-major into G rows of m; the N − G·m left over are not used), the
product of each group's mean curvature C̄_g u is computed (one vmapped product per
group, m× cheaper than per-sample), and

    s_u² = m/(G−1) · Σ_g ‖(C̄_g − C̄) u‖²,    C̄ = mean of the C̄_g.

This is unbiased for the per-sample s_u² over random partitions: a size-m mean drawn
without replacement from the G·m used samples has variance c(m, G·m)·S² =
(G−1)/(G·m)·S² (docs/theory.md §1), and E[(1/G)Σ_g‖(C̄_g − C̄)u‖²] equals exactly that.
With m = 1 it is the per-sample formula (all N samples, no randomness).

Isotropic noise. docs/theory.md §2 models ε with i.i.d. entries of variance c(B,N)·σ²; its
directional variance is then s_v² = Pσ² for *every* unit v. On a real network the
isotropic estimate is the average over random unit directions: with A =
(1/(N−1)) Σ_i (C_i − C)², E_v[s_v²] = tr(A)/P = (1/P) Σ_jk σ²_jk = P·σ²_avg, where
σ²_jk is the per-sample variance of entry (j, k) and σ²_avg their mean over all P²
entries. `isotropic_noise` estimates P·σ²_avg with Rademacher directions v = z/√P.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from nets.utils.progress import progress_bar
from rmt.validation import as_int, as_seed

from nets.curvature.operators import ModelCurvatureOperator, curvature_operator

__all__ = ["NoiseEstimate", "directional_noise", "isotropic_noise",
           "directional_noise_from_operator", "isotropic_noise_from_operator"]


@dataclass(frozen=True)
class NoiseEstimate:
    """s2 : the per-sample variance estimate (s_u², or P·σ²_avg for isotropic);
    stderr : its standard error (over groups for a direction; over probe directions for
    the isotropic average); n_groups : G; micro_batch : m; lam : uᵀCu (the Rayleigh
    quotient of the mean curvature, averaged over probes for isotropic); num_probes;
    per_probe : s_v² of each probe direction (isotropic) or (s_u²,) ; seed."""

    s2: float
    stderr: float
    n_groups: int
    micro_batch: int
    lam: float
    num_probes: int
    per_probe: np.ndarray
    seed: int | None


def _groups(N: int, m: int, seed) -> np.ndarray:
    """(G, m) sample indices: identity order for m = 1, else a seeded random partition."""
    G = N // m
    if G < 2:
        raise ValueError(f"micro_batch={m} leaves fewer than 2 groups of the N={N} samples")
    if m == 1:
        return np.arange(N)[:, None]
    return np.random.default_rng(seed).permutation(N)[: G * m].reshape(G, m)


def _noise_columns(op: ModelCurvatureOperator, U: torch.Tensor, micro_batch: int, seed,
                   chunk_size, progress=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """For each column u of U (P, k): the per-group values d_g = m‖(C̄_g − C̄)u‖²
    summarised as (s2 (k,), stderr (k,), lam (k,), G)."""
    m = as_int("micro_batch", micro_batch, minimum=1)
    N = op.N
    idx = _groups(N, m, seed)
    G = idx.shape[0]
    P, k = U.shape
    U = U.to(op.dtype)
    if chunk_size is None:
        chunk = max(1, min(G, 256 // m, (1 << 24) // max(P * k, 1)))
    else:
        chunk = as_int("chunk_size", chunk_size, minimum=1)
    # shift = C u on the used samples (any shift is exact; this one avoids cancellation)
    shift = (op.subset(idx.reshape(-1)).matmat(U) if G * m < N else op.matmat(U)).to(torch.float64)
    sum_d = torch.zeros(P, k, dtype=torch.float64, device=U.device)
    sq = []
    starts = progress_bar(range(0, G, chunk), progress=progress, desc="per-sample products",
                          expected_s=None if G * P * k > 10**9 else 0.0)
    for a in starts:
        rows = idx[a:a + chunk]                                            # (g, m)
        X, Y = op.source.take(rows.reshape(-1), device=op.device, dtype=op.dtype)
        Xg = X.reshape(rows.shape + X.shape[1:])
        Yg = Y.reshape(rows.shape + Y.shape[1:])
        D = op.group_products(Xg, Yg, U).to(torch.float64) - shift        # (g, P, k)
        sum_d += D.sum(dim=0)
        sq.append((D * D).sum(dim=1).cpu().numpy())                        # (g, k)
    sq = np.concatenate(sq, axis=0)                                        # ‖d_g‖², (G, k)
    if not (np.all(np.isfinite(sq)) and bool(torch.isfinite(shift).all())):
        raise ValueError("a per-sample curvature product is NaN or inf: the loss is not twice "
                         "differentiable to a finite value at these parameters and data")
    dbar = (sum_d / G)
    # Σ_g ‖(C̄_g − C̄)u‖² = Σ_g ‖d_g‖² − G‖d̄‖²  (d̄ ≈ 0 by the choice of shift)
    ss = sq.sum(axis=0) - G * (dbar * dbar).sum(dim=0).cpu().numpy()
    s2 = m * ss / (G - 1)
    # standard error of the mean of the per-group terms m‖d_g − d̄‖² (× G/(G−1))
    terms = m * sq * G / (G - 1)
    stderr = terms.std(axis=0, ddof=1) / math.sqrt(G)
    mean_prod = shift + dbar
    lam = (U.to(torch.float64) * mean_prod).sum(dim=0).cpu().numpy()
    return s2, stderr, lam, G


def check_noise_operator(op):
    if not isinstance(op, ModelCurvatureOperator):
        raise TypeError("op must be a ModelCurvatureOperator (from nets.curvature.operators)")
    if op.policy == "train_batch_stats":
        raise ValueError("per-sample curvature noise is undefined with policy='train_batch_stats' "
                         "(batch statistics couple the samples); use policy='eval'")


def _as_direction(u, P, device, name="u") -> torch.Tensor:
    if isinstance(u, np.ndarray):
        u = torch.from_numpy(np.asarray(u, dtype=np.float64))
    if not isinstance(u, torch.Tensor) or not u.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor or numpy array")
    u = u.detach().to(device=device, dtype=torch.float64).reshape(-1)
    if u.numel() != P:
        raise ValueError(f"{name} must have P={P} entries, got {u.numel()}")
    if not bool(torch.isfinite(u).all()):
        raise ValueError(f"{name} contains NaN or inf")
    n = torch.linalg.vector_norm(u)
    if float(n) == 0.0:
        raise ValueError(f"{name} must be non-zero")
    return u / n


def directional_noise_from_operator(op: ModelCurvatureOperator, u, *, micro_batch=1,
                                    chunk_size=None, seed=0, progress=None) -> NoiseEstimate:
    """s_u² for the data and curvature kind held by `op` (module docstring); u is
    normalised to unit length first. chunk_size: groups per vmapped chunk (memory)."""
    check_noise_operator(op)
    as_seed("seed", seed)
    u = _as_direction(u, op.P, op.device)
    s2, se, lam, G = _noise_columns(op, u[:, None], micro_batch, seed, chunk_size, progress)
    return NoiseEstimate(s2=float(s2[0]), stderr=float(se[0]), n_groups=G,
                         micro_batch=int(micro_batch), lam=float(lam[0]), num_probes=1,
                         per_probe=s2.copy(), seed=None if micro_batch == 1 else seed)


def isotropic_noise_from_operator(op: ModelCurvatureOperator, *, num_probes=10, micro_batch=1,
                                  chunk_size=None, seed=0, progress=None) -> NoiseEstimate:
    """P·σ²_avg = E_v[s_v²] over Rademacher unit directions v = z/√P drawn from
    `numpy.random.default_rng(seed)` (module docstring); stderr over the probes."""
    check_noise_operator(op)
    k = as_int("num_probes", num_probes, minimum=1)
    seed = as_seed("seed", seed)
    rng = np.random.default_rng(seed)
    Z = rng.choice(np.array([-1.0, 1.0]), size=(op.P, k)) / math.sqrt(op.P)
    U = torch.from_numpy(Z).to(op.device)
    s2, _, lam, G = _noise_columns(op, U, micro_batch, seed, chunk_size, progress)
    se = float(s2.std(ddof=1) / math.sqrt(k)) if k > 1 else float("nan")
    return NoiseEstimate(s2=float(s2.mean()), stderr=se, n_groups=G, micro_batch=int(micro_batch),
                         lam=float(lam.mean()), num_probes=k, per_probe=s2, seed=seed)


def directional_noise(model, loss_fn, data, u, *, micro_batch=1, kind="hessian", params=None,
                      policy=None, chunk_size=None, device=None, dtype=None, seed=0,
                      progress=None) -> NoiseEstimate:
    """s_u² = (1/(N−1)) Σ_i ‖(C_i − C)u‖² (module docstring) on `data` (an (X, y) pair, a
    torch Dataset or a re-iterable of (x, y) batches; `nets.utils.data_source`).

    u : direction (P,) in the flat parameter space of `params` (normalised here);
    micro_batch : m ≥ 1 (per-micro-batch products rescaled by m; unbiased);
    kind : "hessian" or "ggn"; chunk_size : groups per vmapped chunk (memory).
    Samples are fetched chunk by chunk by random access, never all at once.
    """
    op = curvature_operator(model, loss_fn, data, kind=kind, params=params, device=device,
                            dtype=dtype, policy=policy, cache_graph=False)
    return directional_noise_from_operator(op, u, micro_batch=micro_batch, chunk_size=chunk_size,
                                           seed=seed, progress=progress)


def isotropic_noise(model, loss_fn, data, *, num_probes=10, micro_batch=1, kind="hessian",
                    params=None, policy=None, chunk_size=None, device=None, dtype=None, seed=0,
                    progress=None) -> NoiseEstimate:
    """Isotropic-model noise P·σ²_avg = E_v[s_v²] (random unit v) on `data`."""
    op = curvature_operator(model, loss_fn, data, kind=kind, params=params, device=device,
                            dtype=dtype, policy=policy, cache_graph=False)
    return isotropic_noise_from_operator(op, num_probes=num_probes, micro_batch=micro_batch,
                                         chunk_size=chunk_size, seed=seed, progress=progress)
