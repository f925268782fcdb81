"""The on-the-fly learning-rate and momentum learner (docs/theory.md §6) as a torch optimizer.

`CurvatureAdaptiveSGD` is a `torch.optim.Optimizer` running heavy-ball SGD whose
learning rate α and momentum ρ are re-estimated from the curvature at scheduled steps
(step 6) and held in between. The class defaults are the guarded settings
(`ROBUST_SETTINGS`: the batch curvature measured on chunks of B samples, μ at the floor
λ/κ_max with κ_max 10, safety 0.5, the hold rule, growth guard 1.5, doubling warm-up
from 5 steps). The paper's unguarded rule (`PAPER_SETTINGS`: safety 1, no batch
correction, weighted μ, α re-set from the curvature at every update, fixed period) is an
opt-in; it drove a small CNN with BatchNorm and Dropout to loss 13 and 9 % accuracy.

Measured (`paper_checks.experiments.learner_comparison.compare()`, digits, 5 seeds, 20
epochs, B = 32): no divergence on the MLP or the CNN; final training loss 1.6× (MLP) and
3.6× (CNN) that of SGD + momentum 0.9 at its tuned lr, test accuracy 98.6 % vs 97.8 %
(MLP) and 98.2 % vs 98.5 % (CNN); curvature 17 % (MLP) and 14 % (CNN) of wall time
(25 % and 20 % before the chunk runs went side by side, step 4; the CNN's ratio was 3.0×
then, the same rule with products equal to rounding). The CNN's ratio moves between 2×
and 5× under small changes of the settings (seed-to-seed spread, 5 seeds), so read it
as "a few times". The previous defaults (directional correction, α re-set at every
update) gave 9.8× and 54× at 49 % and 54 % overhead.

Drop-in use. The first curvature update runs in the constructor, so
``param_groups[0]["lr"]`` and ``["momentum"]`` hold real values before the first step.
Invalid combinations are refused in the constructor with a message saying what to do
(e.g. the directional batch correction with ``policy="train_batch_stats"``, where
per-sample curvature is undefined; ``batch_correction="auto"`` picks "micro_batch"
there and "directional" otherwise). Models with BatchNorm/Dropout in train mode need a
`policy`; so does such a model built in eval mode and trained in train mode: with
``policy=None`` the curvature products follow the model's mode, and the first update
after ``model.train()`` would raise inside ``opt.step()`` (the constructor warns when it
sees such layers in eval mode with no policy). ``batch_size=1`` with
``policy="train_batch_stats"`` is refused there when a BatchNorm would normalise over
one value per channel (the "micro_batch" chunk runs take batches of B = 1 sample)::

    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Dropout(0.2), nn.Linear(512, 10))
    opt = CurvatureAdaptiveSGD(model, F.cross_entropy, (X, y), batch_size=32,
                               policy="train_batch_stats", update_every=len(X) // 32)
    for xb, yb in loader:                       # model.train(): the usual loop
        opt.zero_grad(); F.cross_entropy(model(xb), yb).backward(); opt.step()

Learning-rate schedulers: the learner owns ``group["lr"]`` and ``group["momentum"]``; it
writes them at each curvature update, and a change made from outside (a scheduler's
``step()``) is undone at the next step, with a warning the first time, so `history` holds
the learning rates training uses. The scheduler does not know this: its
``get_last_lr()`` (and ``last_lr`` in its state) reports the values it wrote, which
training never used; read ``opt.lr`` / ``opt.momentum`` or `history` instead. To cap or
decay the learner's step use `max_lr` (or scale `safety`), not a scheduler. It has one
parameter group (`add_param_group` is refused). The curvature products go through
:class:`nets.learning_rates.monitor.CurvatureTracker`, the machinery of
:class:`nets.learning_rates.monitor.CurvatureMonitor`.

1. **Curvature batch.** `curvature_batch_size` = B_c samples of the training set are
   chosen once, without replacement, by `numpy.random.default_rng(seed)` (or given as
   `curvature_indices`), and kept fixed for the whole run.
2. **Lanczos.** At the current weights, `lanczos_steps` = m steps of Lanczos with full
   reorthogonalisation (:func:`nets.lanczos`) on the Hessian (or GGN,
   `kind="ggn"`) of the mean loss over the curvature batch, H_{B_c}, from a Rademacher
   start vector seeded by `seed + update index`. Weight decay δ adds δ·I, so every Ritz
   value is shifted by δ.
3. **Extremes.** λ_max = the largest Ritz value θ_m. The small positive curvature μ is
   chosen by `mu_rule`:

   * ``"floor"`` (default): μ = λ/`kappa_max`, so κ = κ_max and ρ is fixed by it
     (0.27 at κ_max = 10 with Polyak's ρ). With the weighted rule below, the floor
     decided at all 140 updates of the previous defaults' 10 digits runs (the Ritz
     values of weight ≥ 1 % sit in the near-zero bulk; unfloored, κ ranged from 15 to
     10⁴ between updates of one run), so "floor" states what happens and needs no
     Ritz weights, which lets the default skip the Lanczos run on H_{B_c} (step 4);
   * ``"weighted"`` (the paper's): the smallest Ritz value θ_i > 0 whose Gauss-quadrature
     weight w_i (squared first component of the Ritz vector: the mass the Ritz value
     carries in the spectral density of the start vector) is ≥ `weight_threshold`; if
     none exists, the median |θ_i| (recorded as ``mu_source="median"``);
   * ``"median"``: the median |θ_i| over the m Ritz values.

   With "weighted" and "median", μ is then floored at λ/`kappa_max`
   (``mu_source="floor"``), so the condition number κ = λ/μ never exceeds `kappa_max`,
   and capped at λ (κ ≥ 1). `kappa_max` is the effective momentum knob: raising it to
   100 (ρ = 0.67) left 3 of 5 digits CNN runs stuck at loss ≈ 2.3 and the other two
   at 0.5 and 1.1 (α set from the low curvature at initialisation, then the curvature
   rose ≈ 10×); with 10 none of 10 failed.
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
     Measured against the batch sharpness along tuned SGD's trajectory this model
     fails on the digits MLP even with the exact s_u² (λ'(32) = 29 predicted, 2.1
     measured at step 45), so it is no longer the default.
   * ``"micro_batch"`` (default): a direct measurement, no model: λ'(B) = mean top
     Ritz value over the k = ⌊B_c/B⌋ disjoint chunks of B consecutive curvature
     samples (the curvature indices are in random order, so each chunk is a simple
     random sample of size B): an estimate of E λ_top(H_B), the batch sharpness whose
     edge 2(1 + ρ)/α bounds stable heavy-ball SGD (edge of stochastic stability,
     docs/theory.md §5). Its standard error over the chunks, std/√k, is recorded
     (``lam_stderr``) and used by the hold rule (step 5). Chunk j's Lanczos run starts
     from its own top Ritz vector of the previous update and takes
     `batch_lanczos_steps` steps (default 5: along 4 digits runs the warm 5-step value
     was 0.93–1.00 of a cold 30-step run at 35 of 36 updates, 0.75 once, early); the
     first update (and ``batch_lanczos_steps=None``) starts cold from a Rademacher
     vector seeded by seed + update index + 7919(j + 1) with `lanczos_steps` steps.
     With the Hessian the k chunk runs go side by side, one pullback per Lanczos step
     for all chunks (`nets.curvature.side_by_side.SideBySideHessians`: the parameters
     stacked k times, a block-diagonal Hessian); the GGN, or a run that stops early,
     takes the chunks one by one. Both give the same values to rounding.
     With ``mu_rule="floor"`` nothing else is needed, so the Lanczos run on H_{B_c}
     of step 2 is skipped (``lam_measured`` is then λ'(B) too, and the recorded Ritz
     values are those of all chunk runs, weights divided by k); with the other μ
     rules the H_{B_c} run is kept and the chunks start from its top Ritz vector.
     When B ≥ B_c nothing is changed (λ'(B) ≤ λ'(B_c) there, so keeping λ'(B_c) errs
     on the safe side).
5. **Hyper-parameters** from :func:`rmt.lr.heavy_ball` with L = λ'(B) (or λ_max) and μ:
   ``variant="polyak"`` α = 4/(√L + √μ)², ρ = ((√κ − 1)/(√κ + 1))² (the quadratic
   optimum, rate √ρ); ``variant="paper"`` the same α with ρ = (√κ − 1)/(√κ + 1) (the
   authors' PreResNet runs). Then the guards, in this order: α ← `safety`·α (the
   *target*, ``lr_target``); the hold rule (`hold_lr`, below); α ← min(α, `max_lr`);
   α ← min(α, `max_lr_growth`·α_previous). Polyak's α puts the
   top direction at αL/(2(1 + ρ)) = κ/(κ + 1) of the heavy-ball stability limit, so any
   curvature above L (batch noise, curvature growth between updates) is unstable
   unless `safety` < 1 or the batch correction supplies the margin. The growth guard
   exists because a cross-entropy loss flattens as it approaches zero on separable
   data: the measured λ → 0, the rule's α → ∞, and the run is catapulted out even
   though α·λ'(B) stays well inside the quadratic stability region (digits MLP with
   the "micro_batch" correction: α grew ×1.5 per update to 7.4 at α·λ'(B) ≈ 0.65, and
   the next epoch's loss jumped from 0.001 to 1.4). The guard only slows this down.

   **Hold rule** (`hold_lr=True`, default; stated from the edge-of-stability picture,
   docs/theory.md §5.6). Two facts make a rule α ∝ 1/λ'(B) wrong in both directions:
   (i) at a fixed α the batch sharpness rises until it meets the edge 2(1 + ρ)/α and
   stays there, the network stabilising itself (progressive sharpening), so
   re-setting α to a fraction of the edge at every update ratchets α down by that
   fraction each time (previous defaults, digits CNN seed 0: α 0.21 → 0.005 in 700
   steps, while tuned SGD runs at 0.03 with momentum 0.9); (ii) late in training
   the cross-entropy loss flattens, the measured λ'(B) falls and the rule's α rises
   into catapults (above; also on the digits CNN with the hold rule but increases
   allowed throughout: α 0.17 → 0.25 at step 875, final loss 1.17 after 0.011 at
   epoch 17). So, at every update after the
   first, with α_p the previous α, L = λ'(B) and se its standard error:

   * if α_p·(L − 2·se) > 2(1 + ρ) (the measured sharpness is above the edge by more
     than two standard errors): α = the target (a cut);
   * else, during the warm-up (the interval since the previous update is shorter
     than `update_every`, step 6) and if the target is above α_p: α = the target
     (then the growth guard);
   * else α = α_p (``held=True``).

   So after the warm-up α never rises, and it falls only on evidence of instability.
   Cutting to the edge instead of the target (no safety margin) left the digits CNN
   at mean final loss 0.44 instead of 0.004, so a cut keeps the margin. `hold_lr=False` gives α = the target
   at every update (the paper's rule).
6. **Schedule.** Updates happen at the first `step` and then after intervals that
   start at `first_update_every` and double up to `update_every` (0, f, 3f, 7f, …,
   then every `update_every` steps): the curvature of a fresh network changes fastest
   at the start (on the digits CNN the top eigenvalue grows ≈ 10× in the first 20
   steps), so early updates are cheap insurance. `first_update_every=None` means
   `update_every` (a plain fixed period, no warm-up: with the hold rule α then never
   rises after the first update). Since after the warm-up the updates only guard
   against instability, `update_every` can be long; it sets both the cost and the
   length of the warm-up (the comparison uses 5 epochs).

The iteration (Polyak's form, `velocity` d = θ_k − θ_{k−1}):

    d ← ρ·d − α·(g + δ·θ),     θ ← θ + d,

identical to `torch.optim.SGD(momentum=ρ)` while α is constant; when α changes the
velocity is *not* rescaled (torch's buffer form would rescale it by α_new/α_old).

Every update is logged as a frozen :class:`CurvatureUpdate` in `optimizer.history`;
`curvature_time` / `overhead_fraction()` report the wall time spent on curvature.
`state_dict()` carries the step count, the history, the held α, ρ and the chunks' warm
start vectors, so a resumed run continues identically (same curvature batch, same
Lanczos seeds and starts).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict
from typing import Callable

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import nn

from nets.algorithms.lanczos import lanczos, lanczos_batch, rademacher_vectors, zero_tolerance
from nets.curvature.loss_check import mean_reduction_check
from nets.curvature.operators import CurvatureOperator, check_policy, curvature_operator
from nets.curvature.params import ParamLayout, refuse_changed_params
from nets.curvature.side_by_side import ColumnCountError, SideBySideHessians
from nets.learning_rates.monitor import CurvatureTracker, warn_eval_mode_layers
from nets.noise.directional import directional_noise_from_operator
from nets.training.data import check_dataset
from nets.utils.autocast import outside_autocast, outside_caller_contexts
from nets.utils.callers import caller_stacklevel
from nets.utils.data_source import as_data_source
from nets.utils.fingerprints import digest, tensor_bytes
from nets.utils.jsonio import to_jsonable
from nets.utils.results import Result, result
from rmt.lr import heavy_ball, rescale_curvature
from rmt.validation import as_bool, as_float, as_int

__all__ = ["CurvatureUpdate", "CurvatureAdaptiveSGD", "micro_batch_directional_noise",
           "choose_mu", "ROBUST_SETTINGS", "PAPER_SETTINGS"]

#: The guarded settings (module docstring); these are the class defaults.
ROBUST_SETTINGS = dict(variant="polyak", mu_rule="floor", kappa_max=10.0,
                       batch_correction="micro_batch",
                       noise_micro_batch_size=8, safety=0.5, max_lr_growth=1.5,
                       first_update_every=5, hold_lr=True, batch_lanczos_steps=5)
#: The paper's unguarded rule, an opt-in: ``CurvatureAdaptiveSGD(..., **PAPER_SETTINGS)``.
PAPER_SETTINGS = dict(variant="polyak", mu_rule="weighted", kappa_max=1e3,
                      batch_correction=False, safety=1.0,
                      max_lr_growth=None, first_update_every=None, hold_lr=False)

MU_RULES = ("weighted", "median", "floor")
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
    lr, momentum : the α and ρ set (after safety, the hold rule, max_lr and max_lr_growth).
    s2 : directional noise ŝ_u² along the top Ritz vector (nan unless the correction
        is "directional").
    top_residual : ‖H u − θ u‖ of the top Ritz pair (Lanczos residual |β_m S_m,top|).
    ritz_values, ritz_weights, residual_norms : the raw Lanczos output (ascending).
    curvature_time : wall seconds of this update; num_matvecs : products used
        (Lanczos steps + micro-batch products along u); seed : Lanczos start seed.
    lr_target : safety × the rule's α before the hold rule and the caps; held : whether
        the hold rule kept the previous α; lam_stderr : standard error of lam_max over
        the chunks (nan unless the "micro_batch" correction measured ≥ 2 chunks).
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
    lr_target: float = float("nan")
    held: bool = False
    lam_stderr: float = float("nan")

    def to_dict(self) -> dict:
        """Plain-JSON dict (tuples as lists; NaN/inf as "nan"/"inf", the package's one
        convention, read back by `from_dict`)."""
        d = asdict(self)
        for k in ("ritz_values", "ritz_weights", "residual_norms"):
            d[k] = list(d[k])
        return to_jsonable(d)

    @classmethod
    def from_dict(cls, d: dict) -> "CurvatureUpdate":
        d = dict(d)
        for k in ("ritz_values", "ritz_weights", "residual_norms"):
            d[k] = tuple(float(x) for x in d[k])
        for k in ("lam_measured", "lam_max", "mu", "kappa", "lr", "momentum", "s2",
                  "top_residual", "curvature_time", "lr_target", "lam_stderr"):
            if k in d:
                d[k] = float(d[k])
        if "held" in d:
            d["held"] = bool(d["held"])
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
    if mu_rule == "floor":
        if not math.isfinite(kappa_max):
            raise ValueError("mu_rule='floor' needs a finite kappa_max (mu = lam_max/kappa_max)")
        return lam_max / kappa_max, "floor"
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


@outside_autocast
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
    # exact: every micro-batch, as promised (the default sampling stopped at 256 of 512
    # groups once its error was 5 %: s² 3.8 % high; an outside audit)
    return directional_noise_from_operator(op, u, micro_batch=b, seed=0, progress=False,
                                           exact=True).s2


def _stderr(values) -> float:
    """Standard error of the mean of `values` (nan for fewer than 2)."""
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")


def _top_ritz_vector(res, inputs) -> torch.Tensor:
    """The unit top Ritz vector Q·S[:, top] of a Lanczos run, from the basis vectors
    the operator was applied to (recorded by `_RecordingOperator`, no extra product)."""
    if res.num_steps > 1:
        S = eigh_tridiagonal(res.alpha, res.beta)[1]
    else:
        S = np.ones((1, 1))
    Q = torch.stack(inputs[: res.num_steps])                                 # (m, P)
    u = torch.from_numpy(S[:, -1]).to(Q) @ Q
    return u / torch.linalg.vector_norm(u)


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
    the gradient was computed at, on the schedule of step 6: the constructor measures
    (so that `lr` holds a value at once; the first `step` measures again if the weights
    changed since, e.g. a checkpoint loaded after building the optimizer), then after
    first_update_every, 2·first_update_every, … steps, capped at `update_every`.

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
    lanczos_steps : m (default 20; capped at P): steps of the H_{B_c} run and of cold
        chunk runs.
    batch_lanczos_steps : steps of a warm-started chunk run (default 5; None: every
        chunk run cold with `lanczos_steps`), step 4.
    variant : "polyak" | "paper" (ρ squared or not, module docstring step 5).
    mu_rule, weight_threshold, kappa_max : the μ rule (step 3; default "floor":
        μ = λ/kappa_max).
    batch_correction : "micro_batch" (default) | False | True = "directional" |
        "auto": estimate λ'(B) at the training batch (step 4).
    noise_micro_batch_size : b for ŝ_u² (must divide B_c; B_c/b ≥ 2).
    safety : multiplies α (0 < safety); max_lr : optional cap on α; max_lr_growth :
        optional cap (≥ 1) on α_new/α_previous.
    hold_lr : the hold rule (step 5, default True): keep α while the measured batch
        sharpness is inside the edge 2(1 + ρ)/α, cut it only beyond, raise it only
        during the warm-up. False: α = the target at every update.
    weight_decay : δ ≥ 0, added to the gradient (δθ) and to the curvature (δI).
    kind : "hessian" | "ggn"; policy : train-mode layer policy of the curvature
        products (None | "eval" | "train_batch_stats", see nets.curvature.operators).
        None follows the model's mode at each update: a model with BatchNorm, Dropout
        or RReLU built in eval mode and then switched to ``model.train()`` makes the
        next update raise (a warning at construction says so); pass the policy the
        training needs from the start.
    curvature_dtype : dtype of the products (default: the model's).
    seed : picks the curvature batch and (seed + update index) the Lanczos start.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, dataset, *, batch_size: int,
                 curvature_batch_size: int = 128, curvature_indices=None,
                 update_every: int = 50, first_update_every=5, lanczos_steps: int = 20,
                 variant: str = "polyak",
                 mu_rule: str = "floor", weight_threshold: float = 1e-2,
                 kappa_max: float = 10.0, batch_correction="micro_batch",
                 noise_micro_batch_size: int = 8, safety: float = 0.5, max_lr=None,
                 max_lr_growth=1.5, hold_lr: bool = True, batch_lanczos_steps=5,
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
        self.batch_lanczos_steps = None if batch_lanczos_steps is None else as_int(
            "batch_lanczos_steps", batch_lanczos_steps, minimum=2)
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
        if mu_rule == "floor" and not math.isfinite(self.kappa_max):
            raise ValueError("kappa_max must be finite with mu_rule='floor' (mu = lam_max/kappa_max)")
        if isinstance(batch_correction, (bool, np.bool_)):
            batch_correction = "directional" if batch_correction else None
        elif not isinstance(batch_correction, str):     # None was taken for False
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
        hold_lr = as_bool("hold_lr", hold_lr)
        self.hold_lr = hold_lr
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
        mean_reduction_check(model, loss_fn, dataset)      # warns on a summed loss
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
        # the model runs on these samples, deterministically (the operator's checks, on 2)
        Xc, Yc = self._curv_data
        curvature_operator(model, loss_fn, (Xc[:2], Yc[:2]), kind=self.kind, policy=self.policy,
                           dtype=self.curvature_dtype, cache_graph=False)
        if (policy == "train_batch_stats" and self.batch_size == 1
                and batch_correction == "micro_batch" and self.curvature_batch_size > 1):
            # the chunk runs take batches of B = 1: batch statistics over one sample
            try:
                curvature_operator(model, loss_fn, (Xc[:1], Yc[:1]), kind=self.kind,
                                   policy=self.policy, dtype=self.curvature_dtype,
                                   cache_graph=False)
            except ValueError as err:
                if "more than 1 value per channel" not in str(err):
                    raise
                raise ValueError(
                    "batch_size=1 with policy='train_batch_stats': the 'micro_batch' "
                    "correction measures the curvature of batches of B = 1 sample, and a "
                    "BatchNorm layer has no batch statistics over one value per channel "
                    f"(torch: {err}); use policy='eval' (running statistics), "
                    "batch_correction=False, or a batch_size of at least 2") from None
        if policy is None:
            warn_eval_mode_layers(model, "CurvatureAdaptiveSGD")

        self.model, self.loss_fn = model, loss_fn
        self.layout = ParamLayout.from_module(model)
        named = dict(model.named_parameters())
        params = [named[n] for n in self.layout.names]
        super().__init__(params, dict(lr=0.0, momentum=0.0, weight_decay=wd))
        self.history: list[CurvatureUpdate] = []
        self._has_chunks = self.batch_size < self.curvature_batch_size   # ≥ 1 chunk of B
        self._chunks_only = (self.batch_correction == "micro_batch" and self.mu_rule == "floor"
                             and self._has_chunks)
        self._chunk_vectors: dict[int, torch.Tensor] = {}
        self._side_by_side_fails = False
        self._outside_change_warned = False
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
        # before the first step (LR schedulers and loggers read it at construction);
        # its time is training time too (else overhead_fraction could exceed 1)
        self._update_now()
        self._wall += self.history[-1].curvature_time
        self._measured_weights = self._weights_digest()

    def _weights_digest(self) -> str:
        """A hash of every parameter's exact bytes (`nets.utils.fingerprints`): whether the
        weights moved."""
        return digest(*(tensor_bytes(p) for group in self.param_groups for p in group["params"]))

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
        # the operators are built over what is trainable now, the steps update the
        # construction-time set: a layer frozen or unfrozen since then made the saved
        # warm-start vectors the wrong size (a Lanczos shape error), or silently set α
        # from the curvature of a layer the learner never updates
        refuse_changed_params(self.layout.names, ParamLayout.from_module(self.model).names,
                              "the learner",
                              "the learner measures and updates the set it was built with — "
                              "build a new CurvatureAdaptiveSGD after freezing or unfreezing "
                              "layers")
        for group in self.param_groups:
            for p in group["params"]:
                if not bool(torch.isfinite(p).all()):
                    raise FloatingPointError(
                        f"parameters are not finite at step {self.steps_taken} (training "
                        "diverged); no curvature can be measured")
        lseed = self.seed + len(self.history)
        s2 = float("nan")
        tops = ()
        with torch.enable_grad(), outside_caller_contexts():
            if self._chunks_only:
                # step 2 on the chunks only: no B_c run is needed (module docstring)
                theta, weights, resid, tops, nmv = self._batch_tops(lseed, wd, None)
                lam = lam_train = float(np.mean(tops))
            else:
                base = self._operator()
                op = _RecordingOperator(base) if self.batch_correction is not None else base
                res = lanczos(op, self.lanczos_steps, seed=lseed)
                theta, weights, resid = res.ritz_values + wd, res.ritz_weights, res.residual_norms
                lam = lam_train = float(theta[-1])
                self._check_positive(lam, res.ritz_values, base.dtype)
                if self.batch_correction is not None:
                    u = _top_ritz_vector(res, op.inputs)
                chunk_matvecs = 0
                if self.batch_correction == "micro_batch" and self._has_chunks:
                    *_, tops, chunk_matvecs = self._batch_tops(lseed, wd, u)
                    lam_train = float(np.mean(tops))
                elif self.batch_correction == "directional":
                    s2 = micro_batch_directional_noise(base, u, self.noise_micro_batch_size)
                    # the spike formula acts on the curvature without the weight decay δ:
                    # δ·I shifts every eigenvalue and leaves s² alone, so λ'(B) − δ must
                    # not depend on δ (lam included it: lr 6–8 % high at δ = 0.2–0.5)
                    lam_train = float(rescale_curvature(lam - wd, self.curvature_batch_size,
                                                        self.batch_size, s2, N=self.N,
                                                        strict=False)) + wd
                nmv = int(base.num_matvecs) + chunk_matvecs
            self._check_positive(lam_train, np.atleast_1d(theta) - wd, self._products_dtype)
        mu, source = choose_mu(theta, weights, lam_train, self.mu_rule,
                               self.weight_threshold, self.kappa_max)
        lr, rho = heavy_ball(lam_train, mu, variant=self.variant)
        lr *= self.safety
        lr_target = lr
        held = False
        se = _stderr(tops)
        if self.hold_lr and self.history:
            lr, held = self._hold(lr, rho, lam_train, se)
        if self.max_lr is not None:
            lr = min(lr, self.max_lr)
        if self.max_lr_growth is not None and self.history:
            lr = min(lr, self.max_lr_growth * self.history[-1].lr)
        for g in self.param_groups:
            g["lr"], g["momentum"] = lr, rho
        dt = time.perf_counter() - t0
        self.curvature_time += dt
        rec = CurvatureUpdate(
            step=self.steps_taken, lam_measured=lam, lam_max=lam_train, mu=mu,
            kappa=lam_train / mu, mu_source=source, lr=lr, momentum=rho, s2=s2,
            top_residual=float(resid[-1]), ritz_values=tuple(map(float, theta)),
            ritz_weights=tuple(map(float, weights)),
            residual_norms=tuple(map(float, resid)), curvature_time=dt,
            num_matvecs=int(nmv), seed=lseed, lr_target=lr_target, held=held,
            lam_stderr=se)
        self.history.append(rec)
        return rec

    def _hold(self, lr, rho, lam_b, se) -> tuple[float, bool]:
        """The hold rule (module docstring, step 5): returns (α, held); `se` is the
        standard error of lam_b (NaN: no chunks, taken as 0)."""
        prev = self.history[-1].lr
        warmup = self.steps_taken - self.history[-1].step < self.update_every
        se = 0.0 if not math.isfinite(se) else se
        if prev * (lam_b - 2.0 * se) > 2.0 * (1.0 + rho):
            # significantly outside the stability region: cut — never a rise (with safety
            # above (κ+1)/κ the target exceeded α_prev here: 2.38 → 2.66 at safety 1.5,
            # 5.4 → 9.2 → 14.4 at 3, on evidence of instability; an outside audit)
            return min(lr, prev), False
        if warmup and lr > prev:
            return lr, False           # warm-up: rise towards the target
        return prev, True

    @staticmethod
    def _check_positive(lam, values=(), dtype=None) -> None:
        """Refuse a top Ritz value that is not positive (a dead ReLU network), or positive
        only at the products' round-off (in `dtype`): |λ| ≤ `zero_tolerance` of max|values|,
        the Ritz values of the run (`EigenResult.is_zero`'s test). A concave loss gave 1.1e-16, the
        learner set lr = 1e16 and one step took ‖w‖ from 0.56 to 1.7e16 (an outside sweep)."""
        scale = max((abs(float(v)) for v in values), default=0.0)
        zero = dtype is not None and abs(lam) <= zero_tolerance(dtype, scale)
        if not (math.isfinite(lam) and lam > 0) or zero:
            raise FloatingPointError(
                f"no positive curvature found (top Ritz value {lam:.3g}"
                + (", zero to the products' precision" if zero and lam > 0 else "")
                + "); the learner cannot set a learning rate (lower the initial scale, add "
                "weight_decay, or use kind='ggn')")

    @property
    def _products_dtype(self) -> torch.dtype:
        """The dtype the curvature products run in: `curvature_dtype`, else the trained
        parameters'."""
        if self.curvature_dtype is not None:
            return self.curvature_dtype
        return next(p.dtype for g in self.param_groups for p in g["params"])

    def _batch_tops(self, lseed, wd, u):
        """Top Ritz values of the ⌊B_c/B⌋ disjoint chunks of B consecutive curvature
        samples (module docstring, step 4). Chunk j starts from `u` if given, else from
        its own top Ritz vector of the previous update (`batch_lanczos_steps` steps), or
        cold: `lanczos_steps` steps from a Rademacher vector seeded lseed + 7919(j + 1).
        The k runs go side by side (`nets.curvature.side_by_side`: one pullback per
        step for all chunks) when the curvature is the Hessian and every chunk starts
        the same way, else one chunk after the other; the two agree to rounding.
        Returns (pooled Ritz values, pooled weights / k, pooled residuals, tops, products)."""
        B = self.batch_size
        k = self.curvature_batch_size // B
        starts = [u if u is not None else self._chunk_vectors.get(j) for j in range(k)]
        warm = [v is not None and self.batch_lanczos_steps is not None for v in starts]
        runs = None
        if self.kind == "hessian" and k > 1 and len(set(warm)) == 1:
            runs = self._chunk_runs_side_by_side(lseed, starts, warm[0])
        if runs is None:
            runs = [self._chunk_run(j, lseed, starts[j], warm[j]) for j in range(k)]
        thetas, weights, resid, tops, nmv = [], [], [], [], 0
        for j, (res, vec, n) in enumerate(runs):
            self._chunk_vectors[j] = vec
            thetas.append(res.ritz_values + wd)
            weights.append(res.ritz_weights / k)
            resid.append(res.residual_norms)
            tops.append(float(res.ritz_values[-1]) + wd)
            nmv += n
        order = np.argsort(np.concatenate(thetas), kind="stable")
        return (np.concatenate(thetas)[order], np.concatenate(weights)[order],
                np.concatenate(resid)[order], tuple(tops), nmv)

    def _chunk_data(self, j):
        X, Y = self._curv_data
        B = self.batch_size
        return X[j * B:(j + 1) * B], Y[j * B:(j + 1) * B]

    def _chunk_run(self, j, lseed, v0, warm):
        """One chunk's Lanczos run on its own operator: (result, top Ritz vector, products)."""
        op = _RecordingOperator(curvature_operator(
            self.model, self.loss_fn, self._chunk_data(j), kind=self.kind,
            dtype=self.curvature_dtype, policy=self.policy, cache_graph=True))
        if warm:
            res = lanczos(op, self.batch_lanczos_steps, v0=v0)
        else:
            res = lanczos(op, self.lanczos_steps, seed=lseed + 7919 * (j + 1))
        return res, _top_ritz_vector(res, op.inputs).to(torch.float64), op.num_matvecs

    def _chunk_runs_side_by_side(self, lseed, starts, warm):
        """All k chunk runs as one `lanczos_batch` on `SideBySideHessians` (column j is
        chunk j); None when a run stops early (an invariant subspace), which leaves
        fewer columns than chunks, or when the model cannot run under `vmap` (e.g.
        torch's recurrent kernels): the caller then runs the chunks one by one."""
        if self._side_by_side_fails:
            return None
        B = self.batch_size
        k = self.curvature_batch_size // B
        X, Y = self._curv_data
        X, Y = X[:k * B], Y[:k * B]
        try:
            base = SideBySideHessians(self.model, self.loss_fn, X.reshape(k, B, *X.shape[1:]),
                                      Y.reshape(k, B, *Y.shape[1:]), policy=self.policy,
                                      dtype=self.curvature_dtype)
        except (RuntimeError, NotImplementedError):
            # a layer without a vmap batching rule (torch's GRU/LSTM/RNN kernels): the
            # chunks run one by one from now on
            self._side_by_side_fails = True
            return None
        op = _RecordingOperator(base)
        if warm:
            V0 = torch.stack([v.to(torch.float64) for v in starts], dim=1)
            steps = self.batch_lanczos_steps
        else:
            V0 = torch.from_numpy(np.concatenate(
                [rademacher_vectors(base.P, 1, lseed + 7919 * (j + 1)) for j in range(k)])).T
            steps = self.lanczos_steps
        try:
            results = lanczos_batch(op, steps, num_vectors=k, v0=V0.to(base.device))
        except ColumnCountError:
            return None
        # chunk j's basis is every k-th recorded column, starting at j
        return [(res, _top_ritz_vector(res, op.inputs[j::k]), res.num_steps)
                for j, res in enumerate(results)]

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
        elif self.steps_taken == 0 and self._weights_digest() != self._measured_weights:
            # weights loaded after the constructor: its measurement was of other weights,
            # so it is replaced (the hold and growth rules must not start from it)
            self.history.pop()
            self._chunk_vectors.clear()          # nor the warm starts it left
            self.tracker.v0 = None
            self.update_hyperparameters()
        self._restore_owned()
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

    def _restore_owned(self) -> None:
        """Undo a change of lr / momentum made outside the learner (module docstring)."""
        last = self.history[-1]
        for g in self.param_groups:
            if g["lr"] != last.lr or g["momentum"] != last.momentum:
                if not self._outside_change_warned:
                    self._outside_change_warned = True
                    warnings.warn(
                        f"CurvatureAdaptiveSGD: lr/momentum were changed from outside (to "
                        f"{g['lr']!r}/{g['momentum']!r}, e.g. by an lr scheduler); the learner "
                        f"sets them itself and uses its own ({last.lr:.4g}/{last.momentum:.4g}): "
                        "cap it with max_lr or scale it with safety instead", UserWarning,
                        stacklevel=caller_stacklevel())
                g["lr"], g["momentum"] = last.lr, last.momentum

    def add_param_group(self, param_group) -> None:
        if getattr(self, "tracker", None) is not None:
            raise ValueError("CurvatureAdaptiveSGD has one parameter group, the model's "
                             "trainable parameters; add_param_group is not supported")
        super().add_param_group(param_group)

    @property
    def lr(self) -> float:
        """The learning rate the learner set (its last update's): what the next step uses,
        also between a scheduler's change of param_groups and the step that undoes it."""
        return float(self.history[-1].lr)

    @property
    def momentum(self) -> float:
        """The momentum the learner set (its last update's; see `lr`)."""
        return float(self.history[-1].momentum)

    @property
    def wall_time(self) -> float:
        """Wall seconds from the first `step` call to the end of the last one, plus
        the constructor's curvature update (the training loop's time as seen by the
        optimizer, curvature included; so `overhead_fraction()` ≤ 1)."""
        return self._wall

    def overhead_fraction(self, total_wall_time=None) -> float:
        """curvature_time / total wall time (default `wall_time`); nan before any step."""
        total = self._wall if total_wall_time is None else as_float(
            "total_wall_time", total_wall_time, positive=True)
        return self.curvature_time / total if total > 0 else float("nan")

    def state_dict(self) -> dict:
        sd = super().state_dict()
        for g in sd["param_groups"]:        # the learner's own values, not a scheduler's
            g["lr"], g["momentum"] = self.lr, self.momentum
        sd["learner"] = dict(batch_size=self.batch_size, curvature_data=self._curvature_data_hash(),
                             steps_taken=self.steps_taken, next_update=self._next_update,
                             interval=self._interval, curvature_time=self.curvature_time,
                             wall_time=self._wall,
                             curvature_indices=self.curvature_indices.tolist(),
                             history=[h.to_dict() for h in self.history],
                             chunk_vectors={str(j): v.clone() for j, v in
                                            self._chunk_vectors.items()})
        return sd

    def _curvature_data_hash(self) -> str:
        """16 hex digits of the curvature batch's inputs and targets, as float64 / int64
        values (the same samples in another precision or integer width are the same data)."""
        def canonical(t):
            t = t.detach().cpu()
            return t.to(torch.float64) if t.is_floating_point() else t.to(torch.int64)
        Xc, Yc = self._curv_data
        return digest(tensor_bytes(canonical(Xc)), tensor_bytes(canonical(Yc)))

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("learner", None)
        if extra is None:
            raise ValueError("state_dict has no 'learner' entry: not from CurvatureAdaptiveSGD")
        saved_B = extra.get("batch_size")      # absent in states saved before it was kept
        if saved_B is not None and int(saved_B) != self.batch_size:
            raise ValueError(f"state_dict was saved with batch_size={int(saved_B)}, this learner "
                             f"trains with batch_size={self.batch_size}: its learning rate and "
                             "curvature correction are for the other batch size")
        idx = np.asarray(extra["curvature_indices"], dtype=np.int64)
        if not np.array_equal(idx, self.curvature_indices):
            raise ValueError("state_dict was saved with a different curvature batch "
                             "(curvature_indices differ: other seed or dataset)")
        saved_data = extra.get("curvature_data")  # absent in states saved before it was kept
        if saved_data is not None and saved_data != self._curvature_data_hash():
            raise ValueError("state_dict was saved on other data: the samples of the curvature "
                             "batch (same indices) differ, so its measurements and warm-start "
                             "vectors are not this dataset's")
        super().load_state_dict(state_dict)
        self.steps_taken = int(extra["steps_taken"])
        self._next_update = int(extra["next_update"])
        self._interval = int(extra["interval"])
        self.curvature_time = float(extra["curvature_time"])
        self._wall = float(extra["wall_time"])
        self._t_prev = None
        self.history = [CurvatureUpdate.from_dict(h) for h in extra["history"]]
        self._chunk_vectors = {int(j): torch.as_tensor(v, dtype=torch.float64).clone()
                               for j, v in extra.get("chunk_vectors", {}).items()}
