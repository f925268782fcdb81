"""Adam on the linearised network from the warmed state, and its correction along ũ.

The SGD form (`nets.learning_rates.linearized`) carried to Adam. For each batch size B and
batch sequence s the real warm-up of `adam_threshold` is run (`warm_adam_state`:
`warmup_steps` Adam steps at `warmup_lr`, batches of B from seed s); at the warmed
weights w₀ every sample's outputs are replaced by z_i + J_i e (J_i = ∂z_i/∂w at w₀, all
P directions; J·e and Jᵀ·c with the stored Jacobians or through the network,
`nets.learning_rates.linear_outputs`), the loss is the exact loss of those outputs, and torch's
Adam update (bias-corrected, ε outside the root) runs on e from the warmed
(exp_avg, exp_avg_sq, step) with the batches of the real trials (seed s + 7919),
`steps` steps, unstable iff the full-data loss ever exceeds `factor` × its start
(`linearized_adam_max_loss`; a grid of learning rates side by side, coarse 31 points
over `lr_range`, then `n_grid` points between the brackets of all sequences; the
threshold of a sequence is the geometric midpoint of its first crossing step). The
second moment adapts as in real Adam: as an oscillation grows, v grows and D = 1/(√v̂+ε)
shrinks, which the frozen-preconditioner limits of `predict_adam_max_lr` do not have.

Correction along ũ (the network's own nonlinearity). The linearised network keeps the
loss's curvature and drops the change of the Jacobian. Its size along the direction
that goes unstable is read off the loss profile: with ũ the top eigenvector of
D^{1/2} H D^{1/2} at the warmed state (λ̃ its eigenvalue) and d = D^{1/2}ũ the weight-space
direction of an oscillation along it, `loss_along_top(direction=d)` gives the ratio
r = s_lin/s_real of the linearised to the real secant curvature where the loss first
reaches `factor` × its start. The corrected threshold is

    α_corr(B) = α_lin(B)·(1 − (1 − r)·q(B)),   q(B) = min(1, α_lin(B)·λ̃(B)/F),
    F = 2(1+β₁)/(1−β₁),

i.e. the rescaling of a growing oscillation along ũ applied to the share q of the
deterministic edge F/λ̃ at which the linearised network fails (q = 1: it fails at that
edge, where the curvature along ũ alone decides; q ≪ 1: the batch noise decides, and the
correction vanishes). For SGD without momentum, where the linearised threshold sits at
the directional mean-square limit 2/λ'(B), q is λ₁/λ'(B), the share `transfer_lr` uses.
As there, it is applied only for r ≤ 1: with label smoothing the real loss along the
direction is much flatter (r = 1.6–40 on two tabular MLPs, β₁ = 0) and the bracket moved
the transfer from 0.41–2.42 to 0.13–9.88 on one of them (docs/real_training.md).
r and λ̃ are measured at the first sequence's warmed state of each B. Where r is NaN (a
loss along the direction bounded below k·f(0): `loss_along_top` follows a profile past its
grid's end, up to 2⁴⁰×) or above 1, the correction is not applied (correction 1) and a
UserWarning names those batch sizes: `corrected` then mixes corrected and uncorrected
thresholds across B, and a transfer along it can jump between neighbouring batch sizes
(5.5× on a small untrained tanh MLP when the profile stopped at its grid's end, which left
r NaN at two of three B).

Cost: per (B, sequence) a warm-up and, per step and learning rate, J·e on the batch and
on the data and Jᵀ·c on the batch — products with the stored Jacobians (N·K·P numbers
per warmed state), or Jacobian-vector products through the network (about a forward and
a backward pass each; memory: the weights and one chunk's activations per grid column),
whichever `jacobians="auto"` finds faster where J fits (`linearized.linear_model_outputs`);
per B one Lanczos run and 2n + 1 forward passes for the profile. On the digits MLP
(P = 2,410) 222 s through the network for four B × eight sequences on one thread (742 s
with the Jacobians stored, the same thresholds); on a 301k-parameter MLP, whose
Jacobians (20 GiB) do not fit, 232 s per (B, sequence) at 1 GB, against 38 s for the real
bisection: the form explains a threshold rather than saving its measurement.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from nets.algorithms.lanczos import eigsh
from nets.curvature.loss_check import mean_reduction_check
from nets.learning_rates.adam import (
    _as_betas,
    adam_factor,
    preconditioned_operator,
    restored_adam,
    warm_adam_state,
)
from nets.learning_rates.along_top import correction_applies, loss_along_top, rescaling
from nets.learning_rates.linear_outputs import CurvedOutputs, second_derivative_along
from nets.learning_rates.linearized import (
    JACOBIANS,
    checked_output_shape,
    first_crossing,
    flat_adam_state,
    linear_model_outputs,
    linearized_adam_max_loss,
    refined_runs,
    warn_unbracketed,
)
from nets.learning_rates.lr_search import (
    as_growth_factor,
    as_seeds,
    seed_mean_stderr,
    warn_train_mode_layers,
)
from nets.utils.autocast import outside_autocast
from nets.utils.callers import caller_stacklevel
from nets.utils.data_source import tensors_for
from nets.utils.plotting import in_b_order
from nets.utils.progress import progress_bar
from nets.utils.results import Result, result
from rmt.validation import as_batch_sizes, as_bool, as_float, as_int, as_range, as_seed

__all__ = ["LinearizedAdamThresholds", "linearized_adam_threshold", "share_correction"]


@result
class LinearizedAdamThresholds(Result):
    """Linearised-Adam thresholds per batch size (module docstring).

    batch_sizes (n_B,); lr : mean over sequences of the per-sequence threshold; stderr;
    per_seed (n_B, n_seeds; NaN where the grid does not bracket it); lam_precond (λ̃ at
    the first sequence's warmed state, per B); deterministic (F/λ̃); share (q);
    secant_ratio (r; NaN without `correct`); correction (1 − (1 − r)·q; 1 without
    `correct`, and where r is NaN or above 1); corrected (lr·correction); betas; eps;
    warmup_steps; warmup_lr; steps; factor; seeds."""

    batch_sizes: np.ndarray
    lr: np.ndarray
    stderr: np.ndarray
    per_seed: np.ndarray
    lam_precond: np.ndarray
    deterministic: np.ndarray
    share: np.ndarray
    secant_ratio: np.ndarray
    correction: np.ndarray
    corrected: np.ndarray
    betas: tuple
    eps: float
    warmup_steps: int
    warmup_lr: float
    steps: int
    factor: float
    seeds: tuple
    curved: bool = False

    def plot(self, ax=None, *, color="C2"):
        """Linearised (squares) and corrected (line) thresholds against B; returns the axes."""
        from nets.learning_rates.lr_search import plot_thresholds

        ax = plot_thresholds(ax, self.batch_sizes, self.lr, self.stderr, fmt="s", color=color,
                             label=f"linearised Adam (β₁={self.betas[0]:g})")
        ax.plot(*in_b_order(self.batch_sizes, self.corrected), "-", color=color,
                label="corrected along ũ")
        ax.legend(fontsize=7)
        return ax


def share_correction(lr_linearized, lam_precond, beta1, secant_ratio):
    """(q, 1 − (1 − r)·q) with q = min(1, α_lin·λ̃/F), F = 2(1+β₁)/(1−β₁) (module
    docstring), elementwise; the correction is 1 where r > 1 (`along_top.rescaling`: the
    real loss along the direction is flatter than the linearised one, outside the
    argument)."""
    q = np.minimum(1.0, np.asarray(lr_linearized, float) * np.asarray(lam_precond, float)
                   / adam_factor(beta1))
    return q, rescaling(secant_ratio, q)


@outside_autocast
def linearized_adam_threshold(model, loss_fn, data, batch_sizes, *, betas=(0.9, 0.999),
                              eps=1e-8, warmup_steps=500, warmup_lr=1e-4, steps=100,
                              factor=10.0, seeds=tuple(range(8)), lr_range=(1e-4, 10.0),
                              n_grid=48, correct=True, chunk_size=256, jacobians="auto",
                              max_bytes=4 << 30, seed=0, curved=False,
                              progress=None) -> LinearizedAdamThresholds:
    """The "divergence" threshold of Adam on the linearised network at each warmed state
    (the protocol of `adam_threshold` with criterion "divergence"), and its correction
    along ũ (module docstring). data : any form of `nets.utils.data_source`; loss_fn the
    batch mean; seeds : the batch sequences (warm-up from s, trials from s + 7919);
    lr_range : the coarse grid's ends; correct : also measure r and λ̃ (else
    correction = 1; also 1, with a UserWarning naming the batch sizes, where r is NaN or
    above 1) — both at the warmed state of the *first* seed of each B, so the
    correction (not `per_seed`) depends on the order of `seeds`: up to 0.45 % on a small
    MLP when reordered (an outside sweep); jacobians : "auto" (default; chosen once, at the first warmed
    state, and kept), "tangent" (J·e and Jᵀ·c through the network at the warmed weights,
    nothing stored) or "stored" (the N·K·P Jacobians in memory): the same numbers to
    float rounding (`linearized.linear_model_outputs`); max_bytes : the Jacobians' memory
    above which "stored" is refused and "auto" goes through the network (N·K·P·4
    bytes); seed : the Lanczos start. curved : run the curved model instead
    (`linear_outputs.CurvedOutputs`: the outputs' second derivative along the weight-space
    direction D^{1/2}ũ of the top preconditioned eigenvector, measured at the first
    sequence's warmed state of each B and used for every sequence of that B, the second
    derivative taken at each sequence's own warmed weights) and apply no correction
    (correction = 1, secant ratio and share NaN)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable")
    b1, b2 = _as_betas(betas)
    eps = as_float("eps", eps, positive=True)
    warmup_steps = as_int("warmup_steps", warmup_steps, minimum=1)
    warmup_lr = as_float("warmup_lr", warmup_lr, positive=True)
    K = as_int("steps", steps, minimum=1)
    k = as_growth_factor(factor)
    n_grid = as_int("n_grid", n_grid, minimum=4)
    lo, hi = as_range("lr_range", lr_range)
    seeds = as_seeds(seeds)
    correct, curved = as_bool("correct", correct), as_bool("curved", curved)
    seed = as_seed("seed", seed)
    max_bytes = as_float("max_bytes", max_bytes, positive=True, allow_inf=True)  # inf: no cap
    warn_train_mode_layers(model, "linearized_adam_threshold")     # as adam_threshold does
    mean_reduction_check(model, loss_fn, data)
    X, y = tensors_for(model, data)
    N = len(X)
    bs = as_batch_sizes(batch_sizes, N).tolist()
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if jacobians not in JACOBIANS:
        raise ValueError(f"jacobians must be one of {JACOBIANS}, got {jacobians!r}")
    chunk_size = as_int("chunk_size", chunk_size, minimum=1)
    out_shape = checked_output_shape(model, X, P if jacobians == "stored" else 0,
                                     dtype=torch.float32, max_bytes=max_bytes)
    coarse = np.geomspace(lo, hi, 31)
    per = np.full((len(bs), len(seeds)), np.nan)
    lam = np.full(len(bs), np.nan)
    ratio = np.full(len(bs), np.nan)
    jobs = [(i, j) for i in range(len(bs)) for j in range(len(seeds))]
    for i, j in progress_bar(jobs, progress=progress, total=len(jobs),
                             desc=f"linearised Adam threshold (β₁={b1:g})"):
        B, s = bs[i], seeds[j]
        warm = warm_adam_state(model, loss_fn, X, y, B, warmup_steps=warmup_steps,
                               warmup_lr=warmup_lr, betas=(b1, b2), eps=eps, seed=s)
        opt = restored_adam(warm.model, warm, warmup_lr)
        state = flat_adam_state(opt)
        lin, jacobians = linear_model_outputs(warm.model, X, jacobians=jacobians,
                                              chunk_size=chunk_size, max_bytes=max_bytes)
        if curved:
            if j == 0:
                lam[i], d = _preconditioned_top(warm.model, loss_fn, (X, y), opt, seed)
                d = d / d.norm()
            q = second_derivative_along(warm.model, X, d.to(state[0].dtype),
                                        chunk_size=chunk_size)
            lin = CurvedOutputs(lin, d, q)

        def run(grid, lin=lin, state=state, B=B, s=s):
            return linearized_adam_max_loss(lin, None, y, loss_fn, B, grid, K, s + 7919,
                                            state=state, betas=(b1, b2), eps=eps,
                                            out_shape=out_shape, stop_above=k)

        grid, (worst,) = refined_runs([run], coarse, (k,), n_grid)
        per[i, j] = first_crossing(grid, worst, k)
        del lin, run             # the closure holds J too: free it before the next (B, s)
        if correct and not curved and j == 0:      # λ̃, ũ only: no per-sample noise pass
            lam[i], ratio[i] = _secant_along_preconditioned_top(warm.model, loss_fn, (X, y),
                                                                opt, k, seed)
    mean, se = seed_mean_stderr(per)
    warn_unbracketed("linearized_adam_threshold", per, bs,
                     f"widen lr_range={tuple(lr_range)} (an untrained network may need a wider one)")
    F = adam_factor(b1)
    if correct and not curved:
        q, corr = share_correction(mean, lam, b1, ratio)
        _warn_uncorrected(ratio, bs, k)
    else:
        q, corr = np.full(len(bs), np.nan), np.ones(len(bs))
    return LinearizedAdamThresholds(np.array(bs), mean, se, per, lam, F / lam, q, ratio, corr,
                                    mean * corr, (b1, b2), eps, warmup_steps, warmup_lr, K, k,
                                    seeds, bool(curved))


def _warn_uncorrected(ratio, batch_sizes, factor):
    """UserWarning naming the batch sizes where the secant ratio leaves the correction out
    (NaN, or above 1: `along_top.correction_applies`)."""
    bs = np.asarray(batch_sizes)
    nan = np.isnan(ratio)
    flat = ~nan & ~correction_applies(ratio)
    if not (nan.any() or flat.any()):
        return
    parts = []
    if nan.any():
        parts.append(f"NaN at B = {bs[nan].tolist()} (a loss along ũ that never reaches "
                     f"factor = {factor:g} x its start, followed to 2^40 x the profile's grid)")
    if flat.any():
        parts.append(f"above 1 at B = {bs[flat].tolist()} (the real loss along ũ is flatter "
                     f"than the linearised one: r = {np.round(ratio[flat], 4).tolist()})")
    warnings.warn("linearized_adam_threshold: the secant ratio r is " + " and ".join(parts)
                  + "; the correction is not applied there (correction 1), so `corrected` mixes "
                  "corrected and uncorrected thresholds across batch sizes and a transfer along "
                  "it can jump between them (compare `lr`, or a smaller factor)",
                  UserWarning, stacklevel=caller_stacklevel())


def _secant_along_preconditioned_top(model, loss_fn, data, opt, factor, seed):
    """(λ̃, r): the top preconditioned eigenvalue at the optimizer's state and the secant
    ratio s_lin/s_real along its weight-space direction D^{1/2}ũ at tolerance `factor`."""
    lam, d = _preconditioned_top(model, loss_fn, data, opt, seed)
    return lam, loss_along_top(model, loss_fn, data, factor=factor, direction=d,
                               seed=seed).secant_ratio


def secant_at_warmed_states(model, loss_fn, data, batch_sizes, *, betas=(0.9, 0.999),
                            eps=1e-8, warmup_steps=500, warmup_lr=1e-4, factor=10.0,
                            warm_seed=0, seed=0):
    """(λ̃(B), r(B)) as `linearized_adam_threshold` measures them for its correction — at
    the warmed state of the batch sequence `warm_seed` (its first seed) — without the
    linearised runs: for re-deriving a stored correction (`share_correction`) after the
    secant measurement changed."""

    b1, b2 = _as_betas(betas)
    k = as_growth_factor(factor)
    X, y = tensors_for(model, data)
    bs = as_batch_sizes(batch_sizes, len(X)).tolist()
    lam, ratio = np.full(len(bs), np.nan), np.full(len(bs), np.nan)
    for i, B in enumerate(bs):
        warm = warm_adam_state(model, loss_fn, X, y, B, warmup_steps=warmup_steps,
                               warmup_lr=warmup_lr, betas=(b1, b2), eps=eps, seed=warm_seed)
        opt = restored_adam(warm.model, warm, warmup_lr)
        lam[i], ratio[i] = _secant_along_preconditioned_top(warm.model, loss_fn, (X, y), opt,
                                                            k, seed)
    return lam, ratio


def _preconditioned_top(model, loss_fn, data, opt, seed):
    """(λ̃, D^{1/2}ũ): the top eigenvalue of the preconditioned Hessian at the optimizer's
    state and its eigenvector as a weight-space direction (float64, P)."""
    A = preconditioned_operator(model, loss_fn, data, opt, dtype=torch.float64)
    top = eigsh(A, k=1, which="LA", tol=1e-8, seed=as_seed("seed", seed), progress=False)
    d = A.sqrt_d.cpu() * torch.as_tensor(np.asarray(top.vectors[:, 0]), dtype=torch.float64)
    return float(top.values[0]), d

