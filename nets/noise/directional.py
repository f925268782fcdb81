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

`micro_batch="auto"` (the default of the λ'(B) predictions, not of the measurement
functions here) keeps the exact per-sample pass (m = 1) while it writes at most
AUTO_PER_SAMPLE_NUMBERS = 2²⁷ numbers (N·P: the digits networks, whose pass costs about
one full-data product), and otherwise picks m = max(1, ⌊N/256⌋), about 256 groups. Why:
a vmapped per-group product writes one P-vector per group whatever m is, so on a large
network it costs about as much as a per-sample one (301k-parameter MLP, N = 1797: one
per-sample product ≈ 0.01–0.04 of a full-data product, a group of 8 about the same).
The pass then costs ≈ 256 group products however large N is, for the same (unbiased)
s_u²; the price is the partition's extra variance, which the standard error carries
(+0.3 % against the exhaustive s_u² on that MLP).

Isotropic noise. docs/theory.md §2 models ε with i.i.d. entries of variance c(B,N)·σ²; its
directional variance is then s_v² = Pσ² for *every* unit v. On a real network the
isotropic estimate is the average over random unit directions: with A =
(1/(N−1)) Σ_i (C_i − C)², E_v[s_v²] = tr(A)/P = (1/P) Σ_jk σ²_jk = P·σ²_avg, where
σ²_jk is the per-sample variance of entry (j, k) and σ²_avg their mean over all P²
entries. `isotropic_noise` estimates P·σ²_avg with Rademacher directions v = z/√P.

Sampled estimate (default; `exact=True` gives the exhaustive pass). With the exact
shift C̄u (one full-data product per direction), every group contributes an unbiased
term t_g = m·G/(G−1)·‖(C̄_g − C̄)u‖², and s_u² = (1/G) Σ_g t_g. The groups are visited
in a random order (`numpy.random.SeedSequence(seed, spawn_key=(7,))`) in stages of
doubling size, starting at `min_samples` samples; after each stage the mean of the
n terms seen is the estimate and √(1 − n/G)·std(t)/√n its standard error (simple random
sampling without replacement, finite-population correction) for m = 1; for m > 1, whose
target is the per-sample value that one partition only estimates, std(t)/√n (with the
correction, a quarter of the seeds fell beyond 2 standard errors at m = 8; `exact=True`
reports the same, the partition's own variance). Sampling stops once the
standard error is at most `rel_error` × the estimate, or at `max_samples` samples, or
when every group is used (then the result equals the exhaustive one and the standard
error reverts to std(t)/√G, the data set's own sampling error). Because the stopping
rule looks at the data, the error bar is approximate: on a small MLP, 83 % of 30 seeds
fell within 2 standard errors and all within 3 (`tests/test_noise_estimators.py`).
Cost: k full-data products for the shift plus n·m/N (k-vector) per-sample products,
reported as `full_products`; memory: one chunk of groups × P × k (`nets.utils.memory`;
products in the operator's dtype, sums in float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from nets.curvature.loss_check import mean_reduction_check
from nets.curvature.operators import ModelCurvatureOperator, curvature_operator
from nets.utils.autocast import outside_autocast
from nets.utils.memory import capped_sample_chunk, product_chunk
from nets.utils.progress import progress_counter, redraw
from nets.utils.results import Result, result
from rmt.validation import as_bool, as_float, as_int, resolved_seed

__all__ = ["NoiseEstimate", "directional_noise", "isotropic_noise",
           "directional_noise_from_operator", "isotropic_noise_from_operator",
           "DEFAULT_REL_ERROR", "DEFAULT_MIN_SAMPLES", "AUTO_GROUPS", "AUTO_PER_SAMPLE_NUMBERS",
           "auto_micro_batch", "resolve_micro_batch", "large_per_sample_pass", "group_chunk",
           "fetch_groups", "micro_batch_partition"]

#: relative standard error the sampled estimate stops at (module docstring)
DEFAULT_REL_ERROR = 0.05
#: samples of the first stage of the sampled estimate
DEFAULT_MIN_SAMPLES = 256
#: about this many micro-batch groups with micro_batch="auto" (module docstring)
AUTO_GROUPS = 256
#: micro_batch="auto" keeps the per-sample pass while N·P is at most this (module docstring)
AUTO_PER_SAMPLE_NUMBERS = 1 << 27


def large_per_sample_pass(N: int, P: int) -> bool:
    """Whether a per-sample pass over N samples of P parameters writes more than
    AUTO_PER_SAMPLE_NUMBERS numbers: the one rule behind micro_batch="auto" here and
    max_samples="auto" in `nets.noise.resolved_noise` (module docstring)."""
    return int(N) * int(P) > AUTO_PER_SAMPLE_NUMBERS


def auto_micro_batch(N: int, P: int | None = None) -> int:
    """m for micro_batch="auto" (module docstring): 1 when the per-sample pass is small
    (`large_per_sample_pass`), else max(1, ⌊N / AUTO_GROUPS⌋) (P None: the latter)."""
    if P is not None and not large_per_sample_pass(N, P):
        return 1
    return max(1, int(N) // AUTO_GROUPS)


def resolve_micro_batch(micro_batch, N: int, P: int | None = None) -> int:
    """An int m ≥ 1 from `micro_batch` (an int or "auto") for N samples of P parameters."""
    if isinstance(micro_batch, str):
        if micro_batch != "auto":
            raise ValueError(f'micro_batch must be an int >= 1 or "auto", got {micro_batch!r}')
        return auto_micro_batch(N, P)
    return as_int("micro_batch", micro_batch, minimum=1)


@result
class NoiseEstimate(Result):
    """s2 : the per-sample variance estimate (s_u², or P·σ²_avg for isotropic);
    stderr : its standard error (over groups for a direction; over probe directions for
    the isotropic average); n_groups : G; micro_batch : m; lam : uᵀCu (the Rayleigh
    quotient of the mean curvature, averaged over probes for isotropic); num_probes;
    per_probe : s_v² of each probe direction (isotropic) or (s_u²,) ; seed;
    n_used : groups whose products entered (n_groups when exhaustive); exact : True when
    every group was used; full_products : cost in full-data curvature products."""

    s2: float
    stderr: float
    n_groups: int
    micro_batch: int
    lam: float
    num_probes: int
    per_probe: np.ndarray
    seed: int | None
    n_used: int | None = None
    exact: bool = True
    full_products: float | None = None


def _groups(N: int, m: int, seed) -> np.ndarray:
    """(G, m) sample indices: identity order for m = 1, else a seeded random partition."""
    G = N // m
    if N < 2:       # the option was not the cause (it read as if the caller had set it)
        raise ValueError(f"the data hold N={N} sample: the noise across samples (s², the "
                         "batch-noise forms) needs at least 2; at B = N = 1 there is no batch "
                         "noise and the limit is F/λ₁ (nets.top_eigenvalues)")
    if G < 2:
        raise ValueError(f"micro_batch={m} leaves fewer than 2 groups of the N={N} samples")
    if m == 1:
        return np.arange(N)[:, None]
    return np.random.default_rng(seed).permutation(N)[: G * m].reshape(G, m)


def micro_batch_partition(N: int, micro_batch, seed, P: int | None = None
                          ) -> tuple[int, np.ndarray]:
    """(m, idx): the group size for `micro_batch` (an int or "auto") and the (G, m) sample
    indices of the seeded partition (module docstring)."""
    m = resolve_micro_batch(micro_batch, N, P)
    return m, _groups(N, m, seed)


def group_chunk(op: ModelCurvatureOperator, total: int, k: int, m: int = 1, *,
                chunk_size=None, memory=None, cap: int | None = 4096) -> int:
    """Groups of m samples per vmapped call of `op.group_products` along k vectors:
    `chunk_size` if given, else `nets.utils.memory.product_chunk` for op's parameters,
    sample size, dtype and device."""
    if chunk_size is not None:
        return as_int("chunk_size", chunk_size, minimum=1)
    return product_chunk(total, op.P, k, m, op.source.first_sample_numel(),
                         torch.finfo(op.dtype).bits // 8, memory=memory, device=op.device,
                         cap=cap)


def sample_chunk(op: ModelCurvatureOperator, chunk_size=None) -> int:
    """Samples per call of a per-sample pass over op's data holding about one P-vector
    per sample (per-sample gradients, products along one vector): `chunk_size` if given,
    else `nets.utils.memory.capped_sample_chunk` for op's parameters, sample size, dtype
    and device (at most 256, fewer where the memory budget says so)."""
    if chunk_size is not None:
        return as_int("chunk_size", chunk_size, minimum=1)
    return capped_sample_chunk(op.N, op.P, op.source.first_sample_numel(),
                               torch.finfo(op.dtype).bits // 8, device=op.device)


def fetch_groups(op: ModelCurvatureOperator, rows: np.ndarray):
    """Inputs and targets of the groups `rows` (g, m) as (g, m, ...) tensors on op's device."""
    X, Y = op.source.take(rows.reshape(-1), device=op.device, dtype=op.dtype)
    return X.reshape(rows.shape + X.shape[1:]), Y.reshape(rows.shape + Y.shape[1:])


def _subset_rng(seed) -> np.random.Generator:
    """The generator of the random group order of the sampled estimate: an independent
    stream derived from `seed` (spawn key 7), so the micro-batch partition is unchanged."""
    entropy = seed.entropy if isinstance(seed, np.random.SeedSequence) else seed
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(7,)))


@dataclass(frozen=True)
class _Columns:
    """Raw output of `_noise_columns` (per column of U)."""

    s2: np.ndarray
    stderr: np.ndarray
    lam: np.ndarray
    n_groups: int
    n_used: int
    terms: np.ndarray          # (n_used, k) per-group terms t_g (the sampled ones)
    full_products: float       # cost in full-data curvature products


def _check_sampling(rel_error, max_samples, min_samples, exact):
    exact = as_bool("exact", exact)
    rel_error = as_float("rel_error", rel_error, positive=True)
    if max_samples is not None:
        max_samples = as_int("max_samples", max_samples, minimum=2)
    min_samples = as_int("min_samples", min_samples, minimum=2)
    return rel_error, max_samples, min_samples


def _noise_columns(op: ModelCurvatureOperator, U: torch.Tensor, micro_batch: int, seed,
                   chunk_size, progress=None, *, rel_error=DEFAULT_REL_ERROR, max_samples=None,
                   min_samples=DEFAULT_MIN_SAMPLES, exact=False, memory=None,
                   criterion="each") -> _Columns:
    """For each column u of U (P, k): s_u² from the per-group terms
    t_g = m·G/(G−1)·‖(C̄_g − C̄)u‖² (module docstring, "Sampled estimate").

    exact=True: every group; else groups in a seeded random order, in stages of doubling
    size (from min_samples/m groups) until the relative standard error is ≤ rel_error
    (criterion "each": for every column; "mean": for the mean over the columns) or
    max_samples samples or all groups are used."""
    N = op.N
    m, idx = micro_batch_partition(N, micro_batch, seed, op.P)
    G = idx.shape[0]
    P, k = U.shape
    U = U.to(op.dtype)
    chunk = group_chunk(op, G, k, m, chunk_size=chunk_size, memory=memory,
                        cap=max(1, 4096 // m))
    # shift = C̄ U on the used samples: exact, so every term is unbiased on its own
    used = op.subset(idx.reshape(-1)) if G * m < N else op
    shift = used.matmat(U).to(torch.float64)
    if not bool(torch.isfinite(shift).all()):
        raise ValueError("a curvature product is NaN or inf: the loss is not twice "
                         "differentiable to a finite value at these parameters and data")
    shift_lo = shift.to(op.dtype)          # exact: shift was computed in op.dtype
    order = np.arange(G) if exact else _subset_rng(seed).permutation(G)
    cap_groups = G if (exact or max_samples is None) else max(2, min(G, max_samples // m))
    target = G if exact else min(cap_groups, max(2, -(-min_samples // m)))
    sq: list[np.ndarray] = []
    done = 0
    bar = progress_counter(progress, total=cap_groups, desc="per-sample products")
    try:
        while True:
            for a in range(done, target, chunk):
                rows = idx[order[a:min(a + chunk, target)]]                    # (g, m)
                Xg, Yg = fetch_groups(op, rows)
                # difference in the products' dtype (no (g, P, k) float64 copy), squared
                # norm accumulated in float64
                D = op.group_products(Xg, Yg, U) - shift_lo                   # (g, P, k)
                sq.append(torch.linalg.vector_norm(D, dim=1, dtype=torch.float64)
                          .square().cpu().numpy())                             # (g, k)
                del D
                if bar is not None:
                    bar.update(rows.shape[0])
            done = target
            t = m * G / (G - 1) * np.concatenate(sq, axis=0)                   # (n, k)
            if not np.all(np.isfinite(t)):
                raise ValueError("a per-sample curvature product is NaN or inf: the loss is not "
                                 "twice differentiable to a finite value at these parameters "
                                 "and data")
            s2, se = _mean_and_stderr(t, G, m)
            if done >= cap_groups:
                break
            if criterion == "mean":
                ok = _mean_and_stderr(t.mean(axis=1, keepdims=True), G, m)
                ok = bool(ok[1][0] <= rel_error * abs(ok[0][0]))
            else:
                ok = bool(np.all(se <= rel_error * np.abs(s2)))
            if ok:
                break
            target = min(cap_groups, 2 * done)
    finally:
        if bar is not None:
            bar.total = bar.n               # stopped early at the target precision: done
            redraw(bar)
            bar.close()
    lam = (U.to(torch.float64) * shift).sum(dim=0).cpu().numpy()
    cost = (G * m) / N * (k + done * m * k / (G * m))
    return _Columns(s2=s2, stderr=se, lam=lam, n_groups=G, n_used=done, terms=t,
                    full_products=float(cost))


def _mean_and_stderr(t: np.ndarray, G: int, m: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the per-group terms t (n, k) and its standard error.

    m = 1, n = G (every sample): the mean is the exhaustive value; its standard error is
    the sampling error of the data set itself, std(t)/√G. m = 1, n < G (a uniformly random
    subset drawn without replacement): the standard error of the mean as an estimate of
    the exhaustive value, √(1 − n/G)·std(t)/√n (finite-population correction).
    m > 1: the target is the per-sample value, which one random partition into groups
    only estimates, so the error is std(t)/√n whatever n — no finite-population
    correction (with it, sampling 64 of 75 groups reported a smaller error than using all
    75, and a quarter of the seeds fell outside 2 standard errors; an outside sweep)."""
    n = t.shape[0]
    mean = t.mean(axis=0)
    sd = t.std(axis=0, ddof=1) if n > 1 else np.full(t.shape[1], np.nan)
    if n >= G or m > 1:
        return mean, sd / math.sqrt(n)
    return mean, math.sqrt(1.0 - n / G) * sd / math.sqrt(n)


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


@outside_autocast
def directional_noise_from_operator(op: ModelCurvatureOperator, u, *, micro_batch=1,
                                    chunk_size=None, seed=0, progress=None,
                                    rel_error=DEFAULT_REL_ERROR, max_samples=None,
                                    min_samples=DEFAULT_MIN_SAMPLES, exact=False,
                                    memory=None) -> NoiseEstimate:
    """s_u² for the data and curvature kind held by `op` (module docstring); u is
    normalised to unit length first. micro_batch : m ≥ 1 or "auto" (module docstring).
    chunk_size : groups per vmapped chunk (None: from
    the memory budget `memory`, `nets.utils.memory`). rel_error, max_samples,
    min_samples, exact : the sampled estimate (module docstring); exact=True visits
    every group."""
    check_noise_operator(op)
    seed = resolved_seed("seed", seed)          # None: one int from fresh entropy, recorded
    rel_error, max_samples, min_samples = _check_sampling(rel_error, max_samples, min_samples,
                                                          exact)
    u = _as_direction(u, op.P, op.device)
    micro_batch = resolve_micro_batch(micro_batch, op.N, op.P)
    r = _noise_columns(op, u[:, None], micro_batch, seed, chunk_size, progress,
                       rel_error=rel_error, max_samples=max_samples, min_samples=min_samples,
                       exact=exact, memory=memory)
    return NoiseEstimate(s2=float(r.s2[0]), stderr=float(r.stderr[0]), n_groups=r.n_groups,
                         micro_batch=int(micro_batch), lam=float(r.lam[0]), num_probes=1,
                         per_probe=r.s2.copy(),
                         seed=None if (micro_batch == 1 and r.n_used == r.n_groups) else seed,
                         n_used=r.n_used, exact=r.n_used == r.n_groups,
                         full_products=r.full_products)


@outside_autocast
def isotropic_noise_from_operator(op: ModelCurvatureOperator, *, num_probes=10, micro_batch=1,
                                  chunk_size=None, seed=0, progress=None,
                                  rel_error=DEFAULT_REL_ERROR, max_samples=None,
                                  min_samples=DEFAULT_MIN_SAMPLES, exact=False,
                                  memory=None) -> NoiseEstimate:
    """P·σ²_avg = E_v[s_v²] over Rademacher unit directions v = z/√P drawn from
    `numpy.random.default_rng(seed)` (module docstring). All probes share one pass
    (k = num_probes columns). stderr combines the spread over probes, std_v(s_v²)/√k,
    and, when the groups were subsampled or are micro-batches (m > 1: the partition's own
    variance, shared by every probe, does not average out over them), the groups' error
    of the probe mean."""
    check_noise_operator(op)
    k = as_int("num_probes", num_probes, minimum=1)
    micro_batch = resolve_micro_batch(micro_batch, op.N, op.P)
    seed = resolved_seed("seed", seed)          # None: one int from fresh entropy, recorded
    rel_error, max_samples, min_samples = _check_sampling(rel_error, max_samples, min_samples,
                                                          exact)
    rng = np.random.default_rng(seed)
    Z = rng.choice(np.array([-1.0, 1.0]), size=(op.P, k)) / math.sqrt(op.P)
    U = torch.from_numpy(Z).to(op.device)
    r = _noise_columns(op, U, micro_batch, seed, chunk_size, progress, rel_error=rel_error,
                       max_samples=max_samples, min_samples=min_samples, exact=exact,
                       memory=memory, criterion="mean")
    s2 = r.s2
    se = float(s2.std(ddof=1) / math.sqrt(k)) if k > 1 else float("nan")
    if r.n_used < r.n_groups or micro_batch > 1:
        se_sample = float(_mean_and_stderr(r.terms.mean(axis=1, keepdims=True), r.n_groups,
                                           micro_batch)[1][0])
        se = math.hypot(se, se_sample) if k > 1 else se_sample
    return NoiseEstimate(s2=float(s2.mean()), stderr=se, n_groups=r.n_groups,
                         micro_batch=int(micro_batch), lam=float(r.lam.mean()), num_probes=k,
                         per_probe=s2, seed=seed, n_used=r.n_used,
                         exact=r.n_used == r.n_groups, full_products=r.full_products)


@outside_autocast
def directional_noise(model, loss_fn, data, u, *, micro_batch=1, kind="hessian", params=None,
                      policy=None, chunk_size=None, device=None, dtype=None, seed=0,
                      progress=None, rel_error=DEFAULT_REL_ERROR, max_samples=None,
                      exact=False, memory=None) -> NoiseEstimate:
    """s_u² = (1/(N−1)) Σ_i ‖(C_i − C)u‖² (module docstring) on `data` (an (X, y) pair, a
    torch Dataset or a re-iterable of (x, y) batches; `nets.utils.data_source`).

    u : direction (P,) in the flat parameter space of `params` (normalised here);
    micro_batch : m ≥ 1 (per-micro-batch products rescaled by m; unbiased) or "auto"
    (per-sample while N·P ≤ 2²⁷, else m = max(1, ⌊N/256⌋); module docstring);
    kind : "hessian" or "ggn"; chunk_size : groups per vmapped chunk (memory; None: from
    `memory`, a budget in bytes or None for a share of the free memory).
    rel_error, max_samples : the sampled estimate stops at this relative standard error
    or this many samples; exact=True: every sample (the exhaustive pass).
    Samples are fetched chunk by chunk by random access, never all at once.
    loss_fn must be the plain mean of per-sample losses: a summed loss (s_u² off by the
    number of samples in each evaluation) or a weighted mean (class weights, ignore_index)
    warns (`nets.curvature.loss_check.check_mean_reduced`).
    """
    op = curvature_operator(model, loss_fn, data, kind=kind, params=params, device=device,
                            dtype=dtype, policy=policy, cache_graph=False)
    mean_reduction_check(model, loss_fn, op.source)       # warns on a summed / weighted loss
    return directional_noise_from_operator(op, u, micro_batch=micro_batch, chunk_size=chunk_size,
                                           seed=seed, progress=progress, rel_error=rel_error,
                                           max_samples=max_samples, exact=exact, memory=memory)


@outside_autocast
def isotropic_noise(model, loss_fn, data, *, num_probes=10, micro_batch=1, kind="hessian",
                    params=None, policy=None, chunk_size=None, device=None, dtype=None, seed=0,
                    progress=None, rel_error=DEFAULT_REL_ERROR, max_samples=None, exact=False,
                    memory=None) -> NoiseEstimate:
    """Isotropic-model noise P·σ²_avg = E_v[s_v²] (random unit v) on `data`; sampling
    options and the loss check as `directional_noise`."""
    op = curvature_operator(model, loss_fn, data, kind=kind, params=params, device=device,
                            dtype=dtype, policy=policy, cache_graph=False)
    mean_reduction_check(model, loss_fn, op.source)       # warns on a summed / weighted loss
    return isotropic_noise_from_operator(op, num_probes=num_probes, micro_batch=micro_batch,
                                         chunk_size=chunk_size, seed=seed, progress=progress,
                                         rel_error=rel_error, max_samples=max_samples,
                                         exact=exact, memory=memory)
