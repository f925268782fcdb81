"""Learning rates from one curvature/noise measurement pass (docs/theory.md §3, §5).

From a trained model and its data, ONE pass measures

* λ_1, u — top eigenpair of the full-data Hessian H (thick-restart Lanczos, `nets.algorithms.lanczos`);
* s_u² = (1/(N−1)) Σ_i ‖(H_i − H)u‖² — directional noise along u (per-sample HVPs,
  `nets.noise.directional`);
* Pσ² — isotropic noise (average per-sample entry variance of H_i times P, `nets.noise.directional`);
* ḡ, Σ_jj, tr Σ, tr(HΣ) — per-sample gradient statistics (`nets.noise.gradient_noise`);

and turns them into, for each batch size B (c = c(B, N) = 1/B − 1/N):

    SGD stability limit   α = 2(1+ρ)/λ'(B),  λ'(B) = λ_1 + c·s²/λ_1
                          s² = s_u² (directional), or Pσ² (isotropic; clipped at the
                          semicircle edge 2√(cPσ²) below threshold, or unclipped)
    critical batch size   B* = s_u²/λ_1²  (α halves from its B = ∞ value at B ≈ B*)
    Adam, closed form     rmt.lr.adam_max_lr with the u²-weighted preconditioner inputs
                          ḡ_u² = Σ_j u_j² ḡ_j², Σ_u = Σ_j u_j² Σ_jj  (directional s_u²)
    Adam, measured        2(1+β₁)/(1−β₁) / E_S[λ_max(D^{1/2} H_B D^{1/2})],
                          D = diag(1/(√v + eps)), v_j = ḡ_j² + c·Σ_jj, averaged over
                          `n_batches` random batches S of size B (a composed operator,
                          never a P×P matrix)
    SGD, measured         2(1+ρ)/E_S[λ_max(H_B)] (the naive batch-spectrum estimate)
    McCandlish            B_simple = tr Σ/|ḡ|², B_noise = tr(HΣ)/ḡᵀHḡ and the greedy
                          optimum ε_opt(B) = ε_max/(1 + c·B_noise)
    min damping           δ_min(B) = α_dir(B)·λ_noise(B)/2 with the isotropic noise edge
                          λ_noise = 2√(c·Pσ²) (curvature of a direction with no signal)

Which "learning rate": every α above is a **stability limit** (largest step for which
the quadratic model of the batch loss does not diverge) except `greedy_optimal`
(McCandlish et al. 2018: the step maximising the expected one-step decrease). None of
them is the SDE-matching rule of Malladi et al. (2022), which prescribes how to *change*
Adam's hyper-parameters with B (`rmt.lr.malladi_adam_scaling`), not a limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

import rmt.lr as rlr
from rmt.validation import as_array, as_batch_sizes, as_float, as_int
from rmt.sampling import batch_noise_factor
from nets.noise.gradient_noise import gradient_noise
from nets.algorithms.lanczos import eigsh
from nets.noise.directional import directional_noise_from_operator, isotropic_noise_from_operator
from nets.curvature.operators import CurvatureOperator, batch_hessian_operator, hessian_operator

__all__ = ["LRTable", "lr_table", "predict_max_lr", "ScalingFit", "fit_scaling_exponent",
           "DiagonalScaledOperator"]


class DiagonalScaledOperator(CurvatureOperator):
    """D^{1/2} A D^{1/2} for a diagonal D = diag(d) ≥ 0 and a curvature operator A."""

    def __init__(self, base: CurvatureOperator, diag):
        d = torch.as_tensor(diag, dtype=base.dtype, device=base.device)
        if d.ndim != 1 or d.shape[0] != base.P:
            raise ValueError(f"diag must have shape ({base.P},), got {tuple(d.shape)}")
        if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
            raise ValueError("diag must be finite and non-negative")
        super().__init__(base.P, base.dtype, base.device, base.param_names)
        self.base = base
        self.sqrt_d = torch.sqrt(d)

    def _matmat(self, V):
        s = self.sqrt_d[:, None]
        return s * self.base.matmat(s * V)

    def _matvec(self, v):
        return self.sqrt_d * self.base.matvec(self.sqrt_d * v)


def _isotropic_s2(op, n_probes, seed):
    """Pσ² (module docstring of `nets.noise.directional`): Rademacher estimate with `n_probes`
    directions, or exact (n_probes=None) as the mean of s²_{e_j} over the P unit vectors
    (P passes: small models only)."""
    if n_probes is not None:
        return isotropic_noise_from_operator(op, num_probes=n_probes, seed=seed).s2
    eye = torch.eye(op.P, dtype=torch.float64)
    return float(np.mean([directional_noise_from_operator(op, e).s2 for e in eye]))


@dataclass(frozen=True)
class LRTable:
    """Predicted (and batch-measured) learning rates per batch size; see module docstring.

    Scalars: N, P, lam (λ_1), s2_dir (s_u²), s2_iso (Pσ²), B_star (s_u²/λ_1²), B_star_iso
    (Pσ²/λ_1²), B_simple, B_noise, eps_max, momentum (heavy-ball ρ), beta1, eps,
    grad_mean_sq_u, grad_var_u (u²-weighted ḡ_j², Σ_jj), n_batches, seed.
    Arrays over batch_sizes: sgd_iso_clipped, sgd_iso_unclipped, sgd_directional,
    sgd_momentum (directional with ρ), sgd_measured (2(1+ρ)/E λ_max(H_B); NaN if not
    measured), lam_batch_mean/std, adam_closed, adam_measured, adam_lam_mean/std
    (λ_max(D^{1/2}H_BD^{1/2})), greedy_optimal, min_damping.
    """

    batch_sizes: np.ndarray
    N: int
    P: int
    lam: float
    s2_dir: float
    s2_iso: float
    B_star: float
    B_star_iso: float
    B_simple: float
    B_noise: float
    eps_max: float
    momentum: float
    beta1: float
    eps: float
    grad_mean_sq_u: float
    grad_var_u: float
    sgd_iso_clipped: np.ndarray
    sgd_iso_unclipped: np.ndarray
    sgd_directional: np.ndarray
    sgd_momentum: np.ndarray
    sgd_measured: np.ndarray
    lam_batch_mean: np.ndarray
    lam_batch_std: np.ndarray
    adam_closed: np.ndarray
    adam_measured: np.ndarray
    adam_lam_mean: np.ndarray
    adam_lam_std: np.ndarray
    greedy_optimal: np.ndarray
    min_damping: np.ndarray
    n_batches: int
    seed: int

    def as_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}


def _measure(model, loss_fn, dataset, *, dtype, device, chunk_size, iso_probes, seed,
             hessian_samples, tol, mccandlish):
    H = hessian_operator(model, loss_fn, dataset, device=device, dtype=dtype,
                         chunk_size=chunk_size)
    top = eigsh(H, k=1, which="LA", tol=tol, seed=seed)
    lam = float(top.values[0])
    if not lam > 0:
        raise ValueError(f"the top Hessian eigenvalue is not positive ({lam}); no stability limit")
    u = top.vectors[:, 0]
    s2_dir = directional_noise_from_operator(H, u).s2
    s2_iso = _isotropic_s2(H, iso_probes, seed)
    gn = gradient_noise(model, loss_fn, dataset, chunk_size=chunk_size,
                        hessian_samples=hessian_samples, device=device, dtype=dtype, seed=seed,
                        hessian=mccandlish)
    return H, lam, u, s2_dir, s2_iso, gn


def lr_table(model, loss_fn, dataset, batch_sizes, momentum=0.0, beta1=0.0, eps=1e-8,
             n_batches=4, measure=True, iso_probes=4, hessian_samples=128, chunk_size=256,
             dtype=torch.float64, device=None, seed=0, tol=1e-8, mccandlish=True) -> LRTable:
    """Predicted learning rates for every B in `batch_sizes` from one measurement pass.

    momentum: heavy-ball ρ for `sgd_momentum`; beta1, eps: Adam's EMA momentum factor
    2(1+β₁)/(1−β₁) and ε (β₁ = 0 is RMSprop without momentum). measure: also average
    λ_max(H_B) and λ_max(D^{1/2}H_BD^{1/2}) over `n_batches` random batches (without
    replacement, numpy Generator seeded by `seed`; one "batch" at B = N). iso_probes:
    Hutchinson probes for Pσ² (None: exact, P probes). hessian_samples: samples used for
    tr(HΣ) (None: all); mccandlish=False skips tr(HΣ) and ḡᵀHḡ (B_noise, eps_max,
    greedy_optimal NaN). Products run in `dtype` (float64 by default) on `device`.
    """
    if not (isinstance(dataset, (tuple, list)) and len(dataset) == 2):
        raise TypeError("dataset must be a pair (X, y) of tensors")
    N = int(dataset[0].shape[0])
    bs = as_batch_sizes(batch_sizes, N)
    momentum = as_float("momentum", momentum, nonnegative=True)
    beta1 = as_float("beta1", beta1, nonnegative=True)
    if momentum >= 1 or beta1 >= 1:
        raise ValueError("momentum and beta1 must be < 1")
    eps = as_float("eps", eps, nonnegative=True)
    n_batches = as_int("n_batches", n_batches, minimum=1)
    H, lam, u, s2_dir, s2_iso, gn = _measure(
        model, loss_fn, dataset, dtype=dtype, device=device, chunk_size=chunk_size,
        iso_probes=None if iso_probes is None else as_int("iso_probes", iso_probes, minimum=1),
        seed=seed, hessian_samples=hessian_samples, tol=tol, mccandlish=mccandlish)
    P = H.P
    u2 = (u.to(torch.float64) ** 2).cpu().numpy()
    g2u = float(u2 @ gn.mean ** 2)
    vu = float(u2 @ gn.var)
    c = np.array([batch_noise_factor(b, N) for b in bs])
    sig2 = s2_iso / P
    iso_c = rlr.sgd_max_lr_isotropic(bs.astype(float), lam, sig2, P, N, clip=True)
    iso_u = rlr.sgd_max_lr_isotropic(bs.astype(float), lam, sig2, P, N, clip=False)
    sgd_dir = rlr.sgd_max_lr(bs.astype(float), lam, s2_dir, N)
    sgd_mom = rlr.sgd_max_lr(bs.astype(float), lam, s2_dir, N, momentum=momentum)
    adam_closed = rlr.adam_max_lr(bs.astype(float), lam, s2_dir, g2u, vu, N, eps=eps, beta1=beta1)
    F_adam = rlr.momentum_factor(beta1, "ema")
    F_sgd = rlr.momentum_factor(momentum, "heavy_ball")
    greedy = (rlr.mccandlish_optimal_lr(bs.astype(float), gn.eps_max, gn.B_noise, N)
              if math.isfinite(gn.eps_max) and gn.eps_max > 0 and math.isfinite(gn.B_noise)
              else np.full(len(bs), np.nan))
    lam_noise = 2.0 * np.sqrt(c * s2_iso)
    damping = sgd_dir * lam_noise / 2.0

    nan = np.full(len(bs), np.nan)
    lam_m, lam_s, alam_m, alam_s = nan.copy(), nan.copy(), nan.copy(), nan.copy()
    if measure:
        rng = np.random.default_rng(seed)
        gbar2 = torch.as_tensor(gn.mean ** 2, dtype=torch.float64)
        var = torch.as_tensor(gn.var, dtype=torch.float64)
        for i, (b, ci) in enumerate(zip(bs, c)):
            reps = 1 if b == N else n_batches
            tops, atops = [], []
            v = gbar2 + ci * var
            Dg = 1.0 / (torch.sqrt(v) + eps)
            for r in range(reps):
                idx = np.arange(N) if b == N else np.sort(rng.choice(N, int(b), replace=False))
                HB = batch_hessian_operator(model, loss_fn, dataset, idx, device=device,
                                            dtype=dtype, chunk_size=chunk_size, cache_graph=True)
                tops.append(float(eigsh(HB, k=1, which="LA", tol=tol, seed=seed + r,
                                        return_vectors=False).values[0]))
                atops.append(float(eigsh(DiagonalScaledOperator(HB, Dg), k=1, which="LA", tol=tol,
                                         seed=seed + r, return_vectors=False).values[0]))
            lam_m[i], lam_s[i] = np.mean(tops), (np.std(tops, ddof=1) if reps > 1 else 0.0)
            alam_m[i], alam_s[i] = np.mean(atops), (np.std(atops, ddof=1) if reps > 1 else 0.0)
    return LRTable(
        batch_sizes=bs, N=N, P=P, lam=lam, s2_dir=s2_dir, s2_iso=s2_iso,
        B_star=rlr.critical_batch_size(lam, s2_dir), B_star_iso=rlr.critical_batch_size(lam, s2_iso),
        B_simple=gn.B_simple, B_noise=gn.B_noise, eps_max=gn.eps_max, momentum=momentum,
        beta1=beta1, eps=eps, grad_mean_sq_u=g2u, grad_var_u=vu,
        sgd_iso_clipped=np.asarray(iso_c), sgd_iso_unclipped=np.asarray(iso_u),
        sgd_directional=np.asarray(sgd_dir), sgd_momentum=np.asarray(sgd_mom),
        sgd_measured=F_sgd / lam_m, lam_batch_mean=lam_m, lam_batch_std=lam_s,
        adam_closed=np.asarray(adam_closed), adam_measured=F_adam / alam_m,
        adam_lam_mean=alam_m, adam_lam_std=alam_s, greedy_optimal=np.asarray(greedy),
        min_damping=np.asarray(damping), n_batches=n_batches, seed=int(seed))


def predict_max_lr(model, loss_fn, dataset, batch_sizes, optimizer="sgd", momentum=0.0,
                   seed=0) -> np.ndarray:
    """Predicted maximal stable learning rate per batch size (directional form).

    optimizer "sgd": 2(1+ρ)/λ'(B), λ'(B) = λ_1 + c(B,N)·s_u²/λ_1 (`rmt.lr.sgd_max_lr`),
    ρ = `momentum` (heavy ball). optimizer "adam": `rmt.lr.adam_max_lr` with directional
    s_u², the u²-weighted ḡ_j² and Σ_jj, eps = 1e-8 and β₁ = `momentum` (EMA factor
    2(1+β₁)/(1−β₁)). A **stability limit**, not a greedy optimum or SDE-matching rule.
    Returns a numpy array aligned with `batch_sizes`.
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    kw = dict(momentum=momentum) if optimizer == "sgd" else dict(beta1=momentum)
    t = lr_table(model, loss_fn, dataset, batch_sizes, measure=False, iso_probes=1, seed=seed,
                 mccandlish=False, **kw)
    return t.sgd_momentum.copy() if optimizer == "sgd" else t.adam_closed.copy()


@dataclass(frozen=True)
class ScalingFit:
    """Slope of log α against log B: exponent, stderr, (ci_low, ci_high) at `level`,
    intercept, n points, dof, max_batch used."""

    exponent: float
    stderr: float
    ci_low: float
    ci_high: float
    intercept: float
    n: int
    dof: int
    level: float
    max_batch: float | None


def fit_scaling_exponent(batch_sizes, lrs, max_batch=None, level=0.95) -> ScalingFit:
    """Least-squares fit log α = a + k·log B over the points with B ≤ max_batch.

    lrs: array (n_B,) or (n_B, n_seeds) (each seed a separate point; NaNs are missing
    measurements and are dropped; a non-positive lr raises ValueError).
    The confidence interval is the t-interval k ± t_{level, n−2}·se(k); with exactly two
    points the slope is returned with an infinite interval.
    """
    bs = as_array("batch_sizes", batch_sizes, ndim=1)
    a = np.asarray(lrs, dtype=float)
    if a.shape[0] != bs.shape[0]:
        raise ValueError(f"lrs must have {bs.shape[0]} rows (one per batch size), got {a.shape[0]}")
    if a.ndim == 1:
        a = a[:, None]
    x = np.repeat(bs, a.shape[1]).astype(float)
    yv = a.reshape(-1)
    if np.any(np.isfinite(yv) & (yv <= 0)):
        raise ValueError("lrs must be > 0 (NaN marks a missing measurement and is dropped)")
    keep = np.isfinite(yv)
    if max_batch is not None:
        keep &= x <= as_float("max_batch", max_batch, positive=True)
    x, yv = np.log(x[keep]), np.log(yv[keep])
    n = x.size
    if n < 2 or np.ptp(x) == 0:
        raise ValueError("need at least two distinct batch sizes with positive lrs to fit")
    X = np.c_[np.ones(n), x]
    coef, *_ = np.linalg.lstsq(X, yv, rcond=None)
    dof = n - 2
    if dof > 0:
        resid = yv - X @ coef
        s2 = float(resid @ resid) / dof
        se = math.sqrt(s2 / float(((x - x.mean()) ** 2).sum()))
        t = stats.t.ppf(0.5 + level / 2, dof)
        lo, hi = coef[1] - t * se, coef[1] + t * se
    else:
        se, lo, hi = math.inf, -math.inf, math.inf
    return ScalingFit(float(coef[1]), float(se), float(lo), float(hi), float(coef[0]), n, dof,
                      float(level), max_batch)
