"""The on-the-fly learning-rate and momentum learner (docs/theory.md §6) as a torch optimizer.

`CurvatureAdaptiveSGD` is a `torch.optim.Optimizer` running heavy-ball SGD whose
learning rate α and momentum ρ are re-estimated from the curvature at scheduled steps
(step 6) and held in between. The class defaults are the guarded settings
(`ROBUST_SETTINGS`: κ_max 10, batch correction, safety 0.5, growth guard 1.5, doubling
warm-up from 5 steps), with which the digits MLP and CNN trained without divergence over
5 seeds (`paper_checks.experiments.learner_comparison`). The paper's unguarded rule
(`PAPER_SETTINGS`: safety 1, no batch correction, fixed period) is an opt-in; it drove a
small CNN with BatchNorm and Dropout to loss 13 and 9 % accuracy.

Drop-in use. The first curvature update runs in the constructor, so
``param_groups[0]["lr"]`` and ``["momentum"]`` hold real values before the first step.
Invalid combinations are refused in the constructor with a message saying what to do
(e.g. the directional batch correction with ``policy="train_batch_stats"``, where
per-sample curvature is undefined: the default ``batch_correction="auto"`` then uses
the "micro_batch" correction). Models with BatchNorm/Dropout in train mode need a
`policy`::

    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Dropout(0.2), nn.Linear(512, 10))
    opt = CurvatureAdaptiveSGD(model, F.cross_entropy, (X, y), batch_size=32,
                               policy="train_batch_stats", update_every=len(X) // 32)
    for xb, yb in loader:                       # model.train(): the usual loop
        opt.zero_grad(); F.cross_entropy(model(xb), yb).backward(); opt.step()

Learning-rate schedulers: the learner owns ``group["lr"]`` and ``group["momentum"]``; it
writes them at each curvature update, so a scheduler's change lasts only until the next
update. To cap or decay the learner's step use `max_lr` (or scale `safety`), not a
scheduler. The curvature products go through
:class:`nets.learning_rates.monitor.CurvatureTracker`, the machinery of
:class:`nets.learning_rates.monitor.CurvatureMonitor`.

1. **Curvature batch.** `curvature_batch_size` = B_c samples of the training set are
   chosen once, without replacement, by `numpy.random.default_rng(seed)` (or given as
   `curvature_indices`), and kept fixed for the whole run.
2. **Lanczos.** At the current weights, `lanczos_steps` = m steps of Lanczos with full
   reorthogonalisation (:func:`nets.algorithms.lanczos.lanczos`) on the Hessian (or GGN,
   `kind="ggn"`) of the mean loss over the curvature batch, H_{B_c}, from a Rademacher
   start vector seeded by `seed + update index`. Weight decay δ adds δ·I, so every Ritz
   value is shifted by δ.
3. **Extremes.** λ_max = the largest Ritz value θ_m. The small positive curvature μ is
   chosen by `mu_rule`:

   * ``"weighted"`` (default): the smallest Ritz value θ_i > 0 whose Gauss-quadrature
     weight w_i (squared first component of the Ritz vector: the mass the Ritz value
     carries in the spectral density of the start vector) is ≥ `weight_threshold`; if
     none exists, the median |θ_i| (recorded as ``mu_source="median"``);
   * ``"median"``: the median |θ_i| over the m Ritz values.

   In both cases μ is then floored at λ/`kappa_max` (``mu_source="floor"``), so the
   condition number κ = λ/μ never exceeds `kappa_max`, and capped at λ (κ ≥ 1). On
   networks the Hessian has a heavy bulk at ≈ 0, so with the weighted rule the floor
   usually decides: `kappa_max` is then the effective momentum knob.
4. **[ext] Batch-size correction** (`batch_correction`, docs/theory.md §3). λ_max was
   measured at batch B_c, but the iteration is driven by the batch Hessian at the
   training batch B = `batch_size`. Two estimates of λ'(B) are offered:

   * ``"directional"`` (or ``True``): with the directional noise
     s_u² = (1/(N−1)) Σ_i ‖(H_i − H)u‖² along the top Ritz vector u, the top batch
     curvature is λ'(B) = λ + c(B, N)·s_u²/λ (c = 1/B − 1/N); λ is recovered from the
     measurement as the larger root of λ² − λ'(B_c)λ + c(B_c, N)s_u² = 0 and moved to
     B (:func:`rmt.lr.rescale_curvature`, clipped rather than raising when the
     measurement is below the model minimum 2√(c s_u²)). s_u² is estimated on the
     same curvature batch: split it into n = B_c/b micro-batches of
     `noise_micro_batch_size` = b samples, compute m_j = H_j u (one vmapped pass of `nets.noise.directional`) and

         ŝ_u² = b/(n − 1) · Σ_j ‖m_j − m̄‖²,     m̄ = (1/n) Σ_j m_j = H_{B_c} u.

     For a u independent of the batch this is unbiased for s_u² (the micro-batches are
     a random partition of a simple random sample: E‖m_j − m̄‖² = (1/b − 1/B_c)·s_u²,
     and n(1/b − 1/B_c) = (n − 1)/b); with b = 1 it is exactly the sample variance of
     the per-sample products. **Known bias:** u is the top Ritz vector of the same
     batch, so it leans towards that batch's own fluctuation, and ŝ_u² comes out far
     above s_u² of the full-data top eigenvector (digits MLP: 34–64 on random
     128-batches vs 7.7–8.6 exact; the learner's λ'(32) was 2–7× the measured mean
     top eigenvalue of 32-sample batches). The digits spectrum has no well separated
     outlier (top three full-data eigenvalues 0.84, 0.77, 0.76 at init), outside the
     formula's premise. In practice this correction acts as a large, curvature-
     dependent safety factor. The Lanczos vectors are captured as the operator is
     applied, so u costs no extra product. μ is not corrected.
   * ``"micro_batch"``: a direct measurement, no model: λ'(B) = mean top Ritz value
     (m Lanczos steps each) over the ⌊B_c/B⌋ disjoint chunks of B consecutive
     curvature samples (the curvature indices are in random order, so each chunk is a
     simple random sample of size B): unbiased for E λ_top(H_B). Costs about one more
     Lanczos run; when B ≥ B_c nothing is changed (λ'(B) ≤ λ'(B_c) there, so keeping
     λ'(B_c) errs on the safe side).
5. **Hyper-parameters** from :func:`rmt.lr.heavy_ball` with L = λ'(B) (or λ_max) and μ:
   ``variant="polyak"`` α = 4/(√L + √μ)², ρ = ((√κ − 1)/(√κ + 1))² (the quadratic
   optimum, rate √ρ); ``variant="paper"`` the same α with ρ = (√κ − 1)/(√κ + 1) (the
   authors' PreResNet runs). Then the guards, in this order: α ← `safety`·α;
   α ← min(α, `max_lr`); α ← min(α, `max_lr_growth`·α_previous). Polyak's α puts the
   top direction at αL/(2(1 + ρ)) = κ/(κ + 1) of the heavy-ball stability limit, so any
   curvature above L (batch noise, curvature growth between updates) is unstable
   unless `safety` < 1 or the batch correction supplies the margin. The growth guard
   exists because a cross-entropy loss flattens as it approaches zero on separable
   data: the measured λ → 0, the rule's α → ∞, and the run is catapulted out even
   though α·λ'(B) stays well inside the quadratic stability region (digits MLP with
   the "micro_batch" correction: α grew ×1.5 per update to 7.4 at α·λ'(B) ≈ 0.65, and
   the next epoch's loss jumped from 0.001 to 1.4). The guard only slows this down;
   for long runs also set `max_lr`.
6. **Schedule.** Updates happen at the first `step` and then after intervals that
   start at `first_update_every` and double up to `update_every` (0, f, 3f, 7f, …,
   then every `update_every` steps): the curvature of a fresh network changes fastest
   at the start (on the digits CNN the top eigenvalue grows ≈ 10× in the first 20
   steps), so early updates are cheap insurance. `first_update_every=None` means
   `update_every` (a plain fixed period).

The iteration (Polyak's form, `velocity` d = θ_k − θ_{k−1}):

    d ← ρ·d − α·(g + δ·θ),     θ ← θ + d,

identical to `torch.optim.SGD(momentum=ρ)` while α is constant; when α changes the
velocity is *not* rescaled (torch's buffer form would rescale it by α_new/α_old).

Every update is logged as a frozen :class:`CurvatureUpdate` in `optimizer.history`;
`curvature_time` / `overhead_fraction()` report the wall time spent on curvature.
`state_dict()` carries the step count, the history and the held α, ρ, so a resumed run
continues identically (same curvature batch, same Lanczos seeds).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Callable

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import nn

from nets.algorithms.lanczos import lanczos
from nets.curvature.operators import CurvatureOperator, check_policy, curvature_operator
from nets.curvature.params import ParamLayout
from nets.learning_rates.monitor import CurvatureTracker
from nets.noise.directional import directional_noise_from_operator
from nets.training.data import check_dataset
from nets.utils.data_source import as_data_source
from nets.utils.results import Result, result
from rmt.lr import heavy_ball, rescale_curvature
from rmt.validation import as_float, as_int

__all__ = ["CurvatureUpdate", "CurvatureAdaptiveSGD", "micro_batch_directional_noise",
           "choose_mu", "ROBUST_SETTINGS", "PAPER_SETTINGS"]

#: The guarded settings (module docstring); these are the class defaults.
ROBUST_SETTINGS = dict(variant="polyak", kappa_max=10.0, batch_correction="auto",
                       noise_micro_batch_size=8, safety=0.5, max_lr_growth=1.5,
                       first_update_every=5)
#: The paper's unguarded rule, an opt-in: ``CurvatureAdaptiveSGD(..., **PAPER_SETTINGS)``.
PAPER_SETTINGS = dict(variant="polyak", kappa_max=1e3, batch_correction=False, safety=1.0,
                      max_lr_growth=None, first_update_every=None)

MU_RULES = ("weighted", "median")
CORRECTIONS = (None, "directional", "micro_batch", "auto")
VARIANTS = ("polyak", "paper")


@result
class CurvatureUpdate(Result):
    """One hyper-parameter update of :class:`CurvatureAdaptiveSGD`.

    step : optimizer steps taken before this update (the update applies from this step).
    lam_measured : top Ritz value of the curvature-batch Hessian (+ weight decay).
    lam_max : the L used for α (λ'(B) after the batch correction, else lam_measured).
    mu, kappa : the small curvature and κ = lam_max/mu; mu_source : "weighted",
        "median" or "floor" (which branch of the μ rule decided, module docstring).
    lr, momentum : the α and ρ set (after safety, max_lr and max_lr_growth).
    s2 : directional noise ŝ_u² along the top Ritz vector (nan unless the correction
        is "directional").
    top_residual : ‖H u − θ u‖ of the top Ritz pair (Lanczos residual |β_m S_m,top|).
    ritz_values, ritz_weights, residual_norms : the raw Lanczos output (ascending).
    curvature_time : wall seconds of this update; num_matvecs : products used
        (Lanczos steps + micro-batch products along u); seed : Lanczos start seed.
    """

    step: int
    lam_measured: float
    lam_max: float
    mu: float
    kappa: float
    mu_source: str
    lr: float
    momentum: float
    s2: float
    top_residual: float
    ritz_values: tuple
    ritz_weights: tuple
    residual_norms: tuple
    curvature_time: float
    num_matvecs: int
    seed: int

    def to_dict(self) -> dict:
        """Plain-JSON dict (tuples as lists)."""
        d = asdict(self)
        for k in ("ritz_values", "ritz_weights", "residual_norms"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CurvatureUpdate":
        d = dict(d)
        for k in ("ritz_values", "ritz_weights", "residual_norms"):
            d[k] = tuple(float(x) for x in d[k])
        for k in ("lam_measured", "lam_max", "mu", "kappa", "lr", "momentum", "s2",
                  "top_residual", "curvature_time"):
            d[k] = float(d[k])
        return cls(**d)


# ----------------------------------------------------------------------------- pieces

def choose_mu(ritz_values, ritz_weights, lam_max, mu_rule="weighted", weight_threshold=1e-2,
              kappa_max=1e3) -> tuple[float, str]:
    """The small positive curvature μ from Ritz values/weights (module docstring, step 3).

    Returns (μ, source) with λ_max/kappa_max ≤ μ ≤ λ_max; source is "weighted",
    "median" or "floor".
    """
    theta = np.asarray(ritz_values, dtype=float)
    w = np.asarray(ritz_weights, dtype=float)
    lam_max = as_float("lam_max", lam_max, positive=True)
    weight_threshold = as_float("weight_threshold", weight_threshold, nonnegative=True)
    kappa_max = as_float("kappa_max", kappa_max, allow_inf=True)
    if not kappa_max >= 1:
        raise ValueError(f"kappa_max must be >= 1, got {kappa_max}")
    if mu_rule not in MU_RULES:
        raise ValueError(f"mu_rule must be one of {MU_RULES}, got {mu_rule!r}")
    source = "median"
    mu = float(np.median(np.abs(theta)))
    if mu_rule == "weighted":
        cand = theta[(theta > 0) & (w >= weight_threshold)]
        if cand.size:
            mu, source = float(cand.min()), "weighted"
    floor = lam_max / kappa_max
    if not mu > floor:          # also catches mu = 0 (median of a zero spectrum)
        mu, source = floor, "floor"
    return min(mu, lam_max), source


def micro_batch_directional_noise(op, u, micro_batch_size=1) -> float:
    """ŝ_u² = b/(n − 1)·Σ_j ‖H_j u − m̄‖² over n = B_c/b micro-batches of op's data.

    `op` is a model curvature operator (:func:`nets.curvature.operators.curvature_operator`)
    holding the B_c curvature samples; H_j is the curvature of the mean loss over
    micro-batch j, m̄ the mean of the H_j u (= H_{B_c}u). This is
    :func:`nets.noise.directional.directional_noise_from_operator` (micro-batches: a random
    partition seeded with 0, products vmapped over micro-batches) with the learner's
    extra requirement that b divide B_c, so that every curvature sample is used.
    Unbiased, for fixed u, for the per-sample variance s_u² = (1/(N−1)) Σ_i ‖(H_i − H)u‖²
    of the population the curvature batch was sampled from (module docstring, step 4);
    with b = 1 it is exactly the sample variance of the per-sample products.
    """
    b = as_int("micro_batch_size", micro_batch_size, minimum=1)
    Bc = op.N
    if Bc % b:
        raise ValueError(f"micro_batch_size={b} must divide the curvature batch size {Bc}")
    if Bc // b < 2:
        raise ValueError(f"need at least 2 micro-batches, got B_c/micro_batch_size = {Bc // b}")
    return directional_noise_from_operator(op, u, micro_batch=b, seed=0).s2


class _RecordingOperator(CurvatureOperator):
    """Wraps an operator and keeps every input vector (float64), so that the Lanczos
    basis Q (the vectors `lanczos` applies the operator to, in order) is available
    afterwards without extra products."""

    def __init__(self, base: CurvatureOperator):
        super().__init__(base.P, base.dtype, base.device, base.param_names)
        self.base = base
        self.inputs: list[torch.Tensor] = []

    def matvec(self, v):
        self.num_matvecs += 1
        self.inputs.append(torch.as_tensor(v).detach().to(torch.float64).clone())
        return self.base.matvec(v)

    def matmat(self, V):
        self.num_matvecs += V.shape[1]
        V64 = torch.as_tensor(V).detach().to(torch.float64)
        self.inputs.extend(V64[:, j].clone() for j in range(V.shape[1]))
        return self.base.matmat(V)


# ----------------------------------------------------------------------------- optimizer

class CurvatureAdaptiveSGD(torch.optim.Optimizer):
    """Heavy-ball SGD with α, ρ re-estimated on the fly from Lanczos (docs/theory.md §6).

    See the module docstring for the algorithm and every rule. Use it like any
    optimizer: ``loss.backward(); opt.step(); opt.zero_grad()`` (or ``opt.step(closure)``).
    Curvature is measured inside `step` *before* the parameter update, at the weights
    the gradient was computed at, on the schedule of step 6 (the very first `step`
    measures; then after first_update_every, 2·first_update_every, … steps, capped at
    `update_every`).

    Parameters
    ----------
    model : the network; the optimizer updates all its trainable parameters (one
        parameter group), and the curvature is that of these parameters.
    loss_fn : mean-reduced ``loss_fn(model(x), y)``.
    dataset : the training set in any form of `nets.utils.data_source` (an (X, y) pair,
        a torch Dataset, a non-shuffling DataLoader); it supplies the curvature batch
        (read by random access) and N for the sampling factor c(B, N).
    batch_size : the training batch B (used by the batch correction; required).
    curvature_batch_size : B_c (default 128, capped at N); `curvature_indices` overrides.
    update_every : steps between updates (e.g. steps per epoch for "every epoch").
    first_update_every : first interval of the doubling warm-up schedule (step 6),
        capped at `update_every`; None = `update_every` throughout.
    lanczos_steps : m (default 20; capped at P).
    variant : "polyak" | "paper" (ρ squared or not, module docstring step 5).
    mu_rule, weight_threshold, kappa_max : the μ rule (step 3).
    batch_correction : False | True = "directional" | "micro_batch": estimate λ'(B)
        at the training batch (step 4).
    noise_micro_batch_size : b for ŝ_u² (must divide B_c; B_c/b ≥ 2).
    safety : multiplies α (0 < safety); max_lr : optional cap on α; max_lr_growth :
        optional cap (≥ 1) on α_new/α_previous.
    weight_decay : δ ≥ 0, added to the gradient (δθ) and to the curvature (δI).
    kind : "hessian" | "ggn"; policy : train-mode layer policy of the curvature
        products (None | "eval" | "train_batch_stats", see nets.curvature.operators).
    curvature_dtype : dtype of the products (default: the model's).
    seed : picks the curvature batch and (seed + update index) the Lanczos start.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, dataset, *, batch_size: int,
                 curvature_batch_size: int = 128, curvature_indices=None,
                 update_every: int = 50, first_update_every=5, lanczos_steps: int = 20,
                 variant: str = "polyak",
                 mu_rule: str = "weighted", weight_threshold: float = 1e-2,
                 kappa_max: float = 10.0, batch_correction="auto",
                 noise_micro_batch_size: int = 8, safety: float = 0.5, max_lr=None,
                 max_lr_growth=1.5,
                 weight_decay: float = 0.0, kind: str = "hessian", policy=None,
                 curvature_dtype=None, seed: int = 0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(outputs, targets) -> scalar mean loss")
        source = as_data_source(dataset, name="dataset")
        N = int(source.N)
        self.N = N
        self.batch_size = as_int("batch_size", batch_size, minimum=1)
        if self.batch_size > N:
            raise ValueError(f"batch_size must be <= N = {N}, got {self.batch_size}")
        self.update_every = as_int("update_every", update_every, minimum=1)
        self.first_update_every = self.update_every if first_update_every is None else min(
            as_int("first_update_every", first_update_every, minimum=1), self.update_every)
        self.lanczos_steps = as_int("lanczos_steps", lanczos_steps, minimum=2)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if mu_rule not in MU_RULES:
            raise ValueError(f"mu_rule must be one of {MU_RULES}, got {mu_rule!r}")
        self.variant, self.mu_rule = variant, mu_rule
        self.weight_threshold = as_float("weight_threshold", weight_threshold, nonnegative=True)
        if not self.weight_threshold < 1:
            raise ValueError(f"weight_threshold must be in [0, 1), got {self.weight_threshold}")
        self.kappa_max = as_float("kappa_max", kappa_max, allow_inf=True)
        if not self.kappa_max > 1:
            raise ValueError(f"kappa_max must be > 1, got {self.kappa_max}")
        if batch_correction is True:
            batch_correction = "directional"
        if batch_correction is False:
            batch_correction = None
        if batch_correction is not None and not isinstance(batch_correction, str):
            raise TypeError("batch_correction must be a bool, 'directional' or 'micro_batch', "
                            f"got {type(batch_correction).__name__}")
        if batch_correction not in CORRECTIONS:
            raise ValueError("batch_correction must be False, True, 'auto', 'directional' or "
                             f"'micro_batch', got {batch_correction!r}")
        auto = batch_correction == "auto"
        if auto:        # per-sample noise is undefined with batch statistics: measure H_B
            batch_correction = "micro_batch" if policy == "train_batch_stats" else "directional"
        elif batch_correction == "directional" and policy == "train_batch_stats":
            raise ValueError(
                "batch_correction='directional' needs per-sample curvature, which is undefined "
                "with policy='train_batch_stats' (batch statistics couple the samples); use "
                "batch_correction='micro_batch' (or 'auto'), or policy='eval'")
        self.batch_correction = batch_correction
        self.safety = as_float("safety", safety, positive=True)
        self.max_lr = None if max_lr is None else as_float("max_lr", max_lr, positive=True)
        self.max_lr_growth = None if max_lr_growth is None else as_float(
            "max_lr_growth", max_lr_growth, positive=True)
        if self.max_lr_growth is not None and self.max_lr_growth < 1:
            raise ValueError(f"max_lr_growth must be >= 1, got {self.max_lr_growth}")
        wd = as_float("weight_decay", weight_decay, nonnegative=True)
        if kind not in ("hessian", "ggn"):
            raise ValueError(f"kind must be 'hessian' or 'ggn', got {kind!r}")
        self.kind = kind
        check_policy(model, policy)
        self.policy = policy
        if curvature_dtype is not None and (not isinstance(curvature_dtype, torch.dtype)
                                            or not curvature_dtype.is_floating_point):
            raise TypeError(f"curvature_dtype must be a floating torch.dtype, got {curvature_dtype!r}")
        self.curvature_dtype = curvature_dtype
        self.seed = as_int("seed", seed, minimum=0)

        if curvature_indices is None:
            Bc = min(as_int("curvature_batch_size", curvature_batch_size, minimum=2), N)
            idx = np.random.default_rng(self.seed).choice(N, size=Bc, replace=False)
        else:
            idx = np.asarray(curvature_indices)
            if idx.ndim != 1 or idx.size < 2:
                raise ValueError("curvature_indices must be a 1-d array of at least 2 sample indices")
            if not np.issubdtype(idx.dtype, np.integer):
                raise TypeError(f"curvature_indices must be integers, got dtype {idx.dtype}")
            if idx.min() < 0 or idx.max() >= N or np.unique(idx).size != idx.size:
                raise ValueError(f"curvature_indices must be distinct indices in [0, {N})")
        self.curvature_indices = idx.astype(np.int64)
        self.curvature_batch_size = int(idx.size)
        self.noise_micro_batch_size = as_int("noise_micro_batch_size", noise_micro_batch_size,
                                             minimum=1)
        if batch_correction == "directional" and auto:
            Bc, b = self.curvature_batch_size, min(self.noise_micro_batch_size,
                                                   self.curvature_batch_size // 2)
            while Bc % b:          # the largest micro-batch <= the requested one dividing B_c
                b -= 1
            self.noise_micro_batch_size = b
        if batch_correction == "directional":
            b = self.noise_micro_batch_size
            if self.curvature_batch_size % b or self.curvature_batch_size // b < 2:
                raise ValueError(
                    f"noise_micro_batch_size={b} must divide the curvature batch size "
                    f"{self.curvature_batch_size} into at least 2 micro-batches")
        # the curvature batch, read by random access (any form of nets.utils.data_source)
        self._curv_data = check_dataset(*source.take(self.curvature_indices), name="dataset")

        self.model, self.loss_fn = model, loss_fn
        self.layout = ParamLayout.from_module(model)
        named = dict(model.named_parameters())
        params = [named[n] for n in self.layout.names]
        super().__init__(params, dict(lr=0.0, momentum=0.0, weight_decay=wd))
        self.history: list[CurvatureUpdate] = []
        self.steps_taken = 0
        self._next_update = 0
        self._interval = self.first_update_every
        self.curvature_time = 0.0
        self._wall = 0.0            # accumulated wall time inside/between step calls
        self._t_prev = None
        # the curvature machinery shared with nets.learning_rates.monitor.CurvatureMonitor
        self.tracker = CurvatureTracker(model, loss_fn, self._curv_data, kind=self.kind,
                                        policy=self.policy, dtype=self.curvature_dtype,
                                        seed=self.seed)
        # the first update now, so that param_groups[...]["lr"] holds a real value
        # before the first step (LR schedulers and loggers read it at construction)
        self._update_now()

    def _update_now(self) -> None:
        self.update_hyperparameters()
        self._next_update = self.steps_taken + self._interval
        self._interval = min(2 * self._interval, self.update_every)

    # -- the update ---------------------------------------------------------------
    def _operator(self):
        return self.tracker.operator()

    def update_hyperparameters(self) -> CurvatureUpdate:
        """Measure the curvature now and set α, ρ (normally called by `step`)."""
        t0 = time.perf_counter()
        wd = self.param_groups[0]["weight_decay"]
        for group in self.param_groups:
            for p in group["params"]:
                if not bool(torch.isfinite(p).all()):
                    raise FloatingPointError(
                        f"parameters are not finite at step {self.steps_taken} (training "
                        "diverged); no curvature can be measured")
        with torch.enable_grad():
            base = self._operator()
            op = _RecordingOperator(base) if self.batch_correction == "directional" else base
            lseed = self.seed + len(self.history)
            res = lanczos(op, self.lanczos_steps, seed=lseed)
            theta = res.ritz_values + wd
            lam = float(theta[-1])
            if not (math.isfinite(lam) and lam > 0):   # e.g. a dead ReLU network
                raise FloatingPointError(
                    f"no positive curvature found at step {self.steps_taken} (top Ritz value "
                    f"{lam}); the learner cannot set a learning rate (lower the initial "
                    "scale, add weight_decay, or use kind='ggn')")
            s2 = float("nan")
            lam_train = lam
            if self.batch_correction == "micro_batch":
                lam_train = self._micro_batch_top(lseed, wd, lam)
            elif self.batch_correction == "directional":
                if res.num_steps > 1:
                    S = eigh_tridiagonal(res.alpha, res.beta)[1]
                else:
                    S = np.ones((1, 1))
                Q = torch.stack(op.inputs[: res.num_steps])                 # (m, P)
                u = (torch.from_numpy(S[:, -1]).to(Q) @ Q)
                u = u / torch.linalg.vector_norm(u)
                s2 = micro_batch_directional_noise(base, u, self.noise_micro_batch_size)
                lam_train = float(rescale_curvature(lam, self.curvature_batch_size,
                                                    self.batch_size, s2, N=self.N,
                                                    strict=False))
        mu, source = choose_mu(theta, res.ritz_weights, lam_train, self.mu_rule,
                               self.weight_threshold, self.kappa_max)
        lr, rho = heavy_ball(lam_train, mu, variant=self.variant)
        lr *= self.safety
        if self.max_lr is not None:
            lr = min(lr, self.max_lr)
        if self.max_lr_growth is not None and self.history:
            lr = min(lr, self.max_lr_growth * self.history[-1].lr)
        for g in self.param_groups:
            g["lr"], g["momentum"] = lr, rho
        dt = time.perf_counter() - t0
        self.curvature_time += dt
        top_res = float(res.residual_norms[-1])
        rec = CurvatureUpdate(
            step=self.steps_taken, lam_measured=lam, lam_max=lam_train, mu=mu,
            kappa=lam_train / mu, mu_source=source, lr=lr, momentum=rho, s2=s2,
            top_residual=top_res, ritz_values=tuple(map(float, theta)),
            ritz_weights=tuple(map(float, res.ritz_weights)),
            residual_norms=tuple(map(float, res.residual_norms)), curvature_time=dt,
            num_matvecs=int(base.num_matvecs), seed=lseed)
        self.history.append(rec)
        return rec

    def _micro_batch_top(self, lseed, wd, lam) -> float:
        """Mean top Ritz value over the ⌊B_c/B⌋ disjoint chunks of B curvature samples
        (an unbiased estimate of E λ_top(H_B)); `lam` unchanged when B ≥ B_c."""
        B = self.batch_size
        k = self.curvature_batch_size // B
        if B >= self.curvature_batch_size or k < 1:
            return lam
        X, Y = self._curv_data
        tops = []
        for j in range(k):
            op = curvature_operator(self.model, self.loss_fn,
                                    (X[j * B:(j + 1) * B], Y[j * B:(j + 1) * B]),
                                    kind=self.kind, dtype=self.curvature_dtype,
                                    policy=self.policy, cache_graph=True)
            tops.append(float(lanczos(op, self.lanczos_steps, seed=lseed + 7919 * (j + 1))
                              .ritz_values[-1]) + wd)
        return max(float(np.mean(tops)), float(np.finfo(float).tiny))

    # -- torch.optim interface ----------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One heavy-ball step ``d ← ρd − α(g + δθ); θ ← θ + d`` (updating α, ρ first
        when due). Returns the closure's loss (or None). Raises FloatingPointError at an
        update if the parameters are not finite or no positive curvature is found."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t0 = time.perf_counter()
        if self._t_prev is not None:
            self._wall += t0 - self._t_prev
        if self.steps_taken >= self._next_update:
            self._update_now()
        for group in self.param_groups:
            lr, rho, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if wd:
                    g = g.add(p, alpha=wd)
                state = self.state[p]
                d = state.get("velocity")
                if d is None:
                    d = state["velocity"] = torch.zeros_like(p)
                d.mul_(rho).add_(g, alpha=-lr)
                p.add_(d)
        self.steps_taken += 1
        t1 = time.perf_counter()
        self._wall += t1 - t0
        self._t_prev = t1
        return loss

    @property
    def lr(self) -> float:
        return float(self.param_groups[0]["lr"])

    @property
    def momentum(self) -> float:
        return float(self.param_groups[0]["momentum"])

    @property
    def wall_time(self) -> float:
        """Wall seconds from the first `step` call to the end of the last one
        (the training loop's time as seen by the optimizer, curvature included)."""
        return self._wall

    def overhead_fraction(self, total_wall_time=None) -> float:
        """curvature_time / total wall time (default `wall_time`); nan before any step."""
        total = self._wall if total_wall_time is None else as_float(
            "total_wall_time", total_wall_time, positive=True)
        return self.curvature_time / total if total > 0 else float("nan")

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["learner"] = dict(steps_taken=self.steps_taken, next_update=self._next_update,
                             interval=self._interval, curvature_time=self.curvature_time,
                             wall_time=self._wall,
                             curvature_indices=self.curvature_indices.tolist(),
                             history=[h.to_dict() for h in self.history])
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("learner", None)
        if extra is None:
            raise ValueError("state_dict has no 'learner' entry: not from CurvatureAdaptiveSGD")
        idx = np.asarray(extra["curvature_indices"], dtype=np.int64)
        if not np.array_equal(idx, self.curvature_indices):
            raise ValueError("state_dict was saved with a different curvature batch "
                             "(curvature_indices differ: other seed or dataset)")
        super().load_state_dict(state_dict)
        self.steps_taken = int(extra["steps_taken"])
        self._next_update = int(extra["next_update"])
        self._interval = int(extra["interval"])
        self.curvature_time = float(extra["curvature_time"])
        self._wall = float(extra["wall_time"])
        self._t_prev = None
        self.history = [CurvatureUpdate.from_dict(h) for h in extra["history"]]
