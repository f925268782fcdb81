"""Adam's stability limit in real training: the preconditioned sharpness and its threshold.

Which quantity. Adam (torch convention, bias-corrected) updates

    m ← β₁m + (1−β₁)g_B,  v ← β₂v + (1−β₂)g_B²,  w ← w − α·m̂ / (√v̂ + ε),
    m̂ = m/(1−β₁ᵗ),  v̂ = v/(1−β₂ᵗ).

With the second moment frozen, P = diag(√v̂ + ε) is a fixed preconditioner and, in the
coordinates z = P^{1/2}w, Adam is EMA-momentum gradient descent on the preconditioned
curvature P^{-1/2} H_B P^{-1/2}. Its local (quadratic-model) stability limit is

    α_max = 2(1+β₁)/(1−β₁) / λ_max(P^{-1/2} H_B P^{-1/2})       (38/λ at β₁ = 0.9)

(Cohen et al. 2022, "adaptive edge of stability"). `preconditioned_operator` builds the
composed operator D^{1/2} H_B D^{1/2}, D = P^{-1} = diag(1/(√v̂ + ε)), from the actual
state of a `torch.optim.Adam` (never a P×P matrix), and
`preconditioned_batch_sharpness` averages its top eigenvalue over random batches S.

So the state matters: P is built from v at the moment the lr is raised. A **fresh**
state has v = 0 and the first step is α·g/(|g| + ε) ≈ α·sign(g) — a step of length
≈ α·√P whatever the curvature; runs that blow up on step one measure that sign-step
limit (which falls with B only through how the sign pattern of g_B lines up with the
curvature), not the curvature limit above. The **warmed-state protocol**
(`adam_threshold`, module section below) therefore first runs `warmup_steps` Adam steps
at a small stated lr `warmup_lr` at the same batch size B (so v̂ ≈ E[g_B²] = ḡ² +
c(B,N)·Σ_jj, the noise model of the square-root rule), then raises the lr to α from that
warmed (model, optimizer) state and judges the run. `warmup_steps=0` gives the fresh-state
(first-step) limit, reported separately.

Random-matrix prediction from one pass (`predict_adam_max_lr`). The same forms as for
SGD, applied to the preconditioned per-sample curvatures A_i = D^{1/2} H_i D^{1/2}: with
the top eigenpair (λ̃, ũ) of A = D^{1/2} H D^{1/2} and the directional noise

    s̃² = (1/(N−1)) Σ_i ‖(A_i − A) ũ‖²,

the batch-shifted curvature is λ̃'(B) = λ̃ + c(B,N)·s̃²/λ̃. Two forms of the limit:

* "mean_square" (default, `rmt.lr.adam_ms_max_lr`): with D frozen, EMA momentum is heavy
  ball with step α(1−β₁) and momentum β₁, whose mean-square limit under batch noise
  amplifies the noise term by G = (1+β₁)/(1−β₁):
  α_max(B) = F/(λ̃ + G·c(B,N)·s̃²/λ̃), F = 2(1+β₁)/(1−β₁);
* "deterministic": α_max(B) = F/λ̃'(B), the EMA factor against the batch-shifted
  curvature (the noise counted once, as for plain SGD).

They coincide at β₁ = 0. D(B) is taken from the noise model
D = diag(1/(√(ḡ_j² + c(B,N)·Σ_jj) + ε)) (per-sample gradient mean ḡ and variance Σ_jj,
`nets.noise.gradient_noise`) — the state a warmup at batch size B reaches — or from given
optimizer states. In the noise-dominated regime D ≈ √B·Σ^{-1/2}, so λ̃ ∝ √B and s̃² ∝ B:
the mean-square form tends to 2λ̃/(c·s̃²) ∝ √B whatever β₁, and with β₁ = 0.9 that regime
lasts up to B ≈ G·s̃²/λ̃² (19× further than at β₁ = 0); where ḡ² dominates v, D stops
growing with B and α_max saturates. `adam_transfer_lr` rescales a known-good (B₀, α₀)
along either curve.

None of these is Malladi et al.'s SDE rule (`rmt.lr.malladi_adam_scaling`), which says how
to change α, β, ε together to keep the same dynamics, not where Adam becomes unstable.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import numpy as np
import torch

from nets.algorithms.lanczos import eigsh
from nets.curvature.chunk_shares import data_shares, full_data_loss, given_or_read_shares
from nets.curvature.loss_check import mean_reduction_check
from nets.curvature.operators import _as_chunk_size, curvature_operator
from nets.curvature.params import check_model
from nets.learning_rates.lr_prediction import DiagonalScaledOperator, _limit, adam_state_settings
from nets.learning_rates.lr_search import (
    Trial,
    Unbracketed,
    as_growth_factor,
    as_seeds,
    bisect_max_lr,
    check_start_loss,
    plot_thresholds,
    seed_mean_stderr,
    warn_train_mode_layers,
)
from nets.noise.directional import sample_chunk
from nets.utils.autocast import outside_autocast
from nets.utils.callers import caller_stacklevel
from nets.utils.data_source import as_data_source, tensors_for
from nets.utils.modes import model_copy
from nets.utils.plotting import in_b_order
from nets.utils.progress import progress_bar
from nets.utils.results import Result, result
from nets.utils.seeding import resolved_seed
from rmt.lr import adam_ms_max_lr, momentum_noise_gain
from rmt.sampling import batch_noise_factor
from rmt.validation import as_array, as_batch_sizes, as_float, as_int, as_seed

__all__ = ["adam_factor", "adam_preconditioner", "preconditioned_operator",
           "PreconditionedSharpness", "preconditioned_batch_sharpness",
           "PreconditionedNoise", "preconditioned_noise", "noise_model_preconditioner",
           "AdamPrediction", "ADAM_FORMS", "predict_adam_max_lr", "adam_transfer_lr", "AdamTransfer",
           "adam_noise_floor_lr",
           "WarmState", "warm_adam_state", "AdamTrial", "adam_trial", "AdamThresholds",
           "adam_threshold", "ADAM_CRITERIA"]

ADAM_CRITERIA = ("onset", "final", "divergence")


def _as_betas(betas) -> tuple:
    """(β₁, β₂) as floats, each in [0, 1) (TypeError unless a pair)."""
    if isinstance(betas, (str, bytes)) or np.ndim(betas) != 1 or len(betas) != 2:
        raise TypeError(f"betas must be a pair (β₁, β₂), got {betas!r}")
    b1, b2 = (as_float(f"betas[{i}]", b) for i, b in enumerate(betas))
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"betas must lie in [0, 1), got ({b1:g}, {b2:g})")
    return b1, b2


def adam_factor(beta1: float) -> float:
    """F = 2(1+β₁)/(1−β₁): EMA-momentum stability factor (2 at β₁ = 0, 38 at 0.9)."""
    b = as_float("beta1", beta1, nonnegative=True)
    if b >= 1:
        raise ValueError(f"beta1 must be in [0, 1), got {b}")
    return 2.0 * (1.0 + b) / (1.0 - b)


# ------------------------------------------------------------------ the preconditioner

def _trainable(model, params=None):
    from nets.curvature.params import ParamLayout
    layout = ParamLayout.from_module(model, params)
    named = dict(model.named_parameters())
    return layout, [named[n] for n in layout.names]


@outside_autocast
def adam_preconditioner(model, optimizer, *, params=None) -> torch.Tensor:
    """D = 1/(√v̂ + ε) as a flat float64 vector in the parameter order of the curvature
    operators, from a `torch.optim.Adam`/`AdamW` `optimizer` stepping `model`'s parameters.

    v̂ = exp_avg_sq/(1 − β₂ᵗ) (torch's bias correction, t = the state's step count;
    with amsgrad=True max_exp_avg_sq, the running maximum torch divides by); ε is the
    group's eps, added outside the square root as torch does. A parameter with no state
    yet (fresh optimizer, or one that never got a gradient) has v̂ = 0, so D = 1/ε there.
    That is *not* the fresh-state limit: a fresh Adam's first step is
    α·g/(|g| + ε) ≈ α·sign(g) (its v̂ already holds that step's g²), not α·g/ε;
    `preconditioned_batch_sharpness` and `predict_adam_max_lr` warn when such
    coordinates carry gradient or curvature. ε = 0 with v̂ = 0 is refused (D infinite).
    """
    vhat, eps = _adam_second_moment(model, optimizer, params)
    if not torch.all(eps > 0):
        bad = int(((vhat == 0) & (eps == 0)).sum())
        if bad:
            raise ValueError(f"optimizer: eps=0 and {bad} coordinate(s) with v̂ = 0 (no state, or "
                             "no gradient yet): D = 1/(√v̂ + ε) is infinite there; use eps > 0")
    return 1.0 / (vhat.sqrt() + eps)


def _adam_second_moment(model, optimizer, params=None):
    """(v̂, ε): the bias-corrected second moment torch divides by and each coordinate's
    eps, flat float64 on the CPU in the curvature operators' order (v̂ = 0 for a
    parameter without state)."""
    if not isinstance(optimizer, torch.optim.Adam):
        raise TypeError(f"optimizer must be a torch.optim.Adam or AdamW, got {type(optimizer).__name__}")
    _, plist = _trainable(model, params)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    vs, es = [], []
    for p in plist:
        if id(p) not in group_of:
            raise ValueError("optimizer does not step every selected parameter of model "
                             "(build it on this model's parameters, or, for an optimizer over "
                             "part of them, pass params= naming the parameters it steps)")
        g = group_of[id(p)]
        st = optimizer.state.get(p, {})
        if "exp_avg_sq" in st:
            t = float(st["step"])
            if t <= 0:          # 1 − β₂⁰ = 0: read as "holds NaN or inf (a diverged step?)"
                raise ValueError("optimizer: its state for a parameter of shape "
                                 f"{tuple(p.shape)} is at step 0 (moments initialised, never "
                                 "stepped), where the bias-corrected v̂ is 0/0; take a step "
                                 "first, or pass a fresh optimizer (no state)")
            if g.get("amsgrad") and "max_exp_avg_sq" not in st:
                raise ValueError("optimizer: amsgrad=True but its state has no max_exp_avg_sq "
                                 "(amsgrad was switched on after it stepped); torch's next step "
                                 "will fail on it too — set amsgrad as it was stepped")
            v = st["max_exp_avg_sq"] if g.get("amsgrad") else st["exp_avg_sq"]
            vhat = v.detach().to(torch.float64) / (1.0 - float(g["betas"][1]) ** t)
            if not bool(torch.isfinite(vhat).all()):
                raise ValueError("optimizer: its second-moment state (exp_avg_sq) holds NaN or "
                                 "inf for a parameter of shape "
                                 f"{tuple(p.shape)} (a diverged step?); restore a finite state")
        else:
            vhat = torch.zeros_like(p, dtype=torch.float64)
        vs.append(vhat.reshape(-1).cpu())
        es.append(torch.full((p.numel(),), float(g["eps"]), dtype=torch.float64))
    return torch.cat(vs), torch.cat(es)


def _saturated(model, optimizer, params=None):
    """Mask of the coordinates whose D = 1/(√v̂ + ε) sits at its ceiling: √v̂ ≤ ε (no state,
    or a gradient that vanished while the state was accumulated), where ε, not the
    gradient, sets D (within 2× of 1/ε)."""
    vhat, eps = _adam_second_moment(model, optimizer, params)
    return vhat.sqrt() <= eps


def _warn_saturated(who, model, loss_fn, src, optimizer, mask, top_weight, *, params, policy,
                    device, dtype):
    """UserWarning when coordinates at D = 1/ε (`_saturated`) matter: they carry at least
    1 % of a top preconditioned eigenvector (`top_weight`, the largest Σ_saturated ũ_j²
    over the eigenvectors computed), or a full-data gradient above ε (a frozen-D step
    α·g/ε longer than a sign step α)."""
    n = int(mask.sum())
    if n == 0:
        return
    g = curvature_operator(model, loss_fn, src, params=params, policy=policy, device=device,
                           dtype=dtype).gradient().detach().to(torch.float64).cpu()
    eps = float(optimizer.param_groups[0]["eps"])
    n_grad = int((g[mask].abs() > eps).sum())
    if top_weight < 0.01 and n_grad == 0:
        return
    warnings.warn(f"{who}: {n} of the {mask.numel()} coordinates have √v̂ ≤ ε in the optimizer's "
                  f"state (no state yet, a gradient that vanished while it was accumulated, "
                  f"e.g. a bias before a BatchNorm warmed in train mode, or an ε above the "
                  f"gradients' scale), so D = 1/(√v̂ + ε) sits "
                  f"at its ceiling 1/ε = {1 / eps:.3g} there; they carry {top_weight:.1%} of the "
                  f"top preconditioned eigenvector and {n_grad} of them a gradient above ε, so the "
                  "limit is set by ε. It is not the fresh-state limit: a fresh Adam's first step "
                  "is lr·sign(g), not lr·g/ε. Warm the optimizer on this model (in the mode it "
                  "is measured in), freeze the parameters that get no gradient, or, if ε was "
                  "chosen this large, read the limit as that of SGD with step lr/ε",
                  UserWarning, stacklevel=caller_stacklevel())


def noise_model_preconditioner(grad_mean, grad_var, batch_size, N, *, eps=1e-8) -> torch.Tensor:
    """D(B) = 1/(√(ḡ_j² + c(B,N)·Σ_jj) + ε): the stationary Adam state at batch size B
    when the weights barely move (E[g_B,j²] = ḡ_j² + c·Σ_jj, c = 1/B − 1/N)."""
    c = batch_noise_factor(int(batch_size), int(N))
    g = torch.as_tensor(np.asarray(grad_mean), dtype=torch.float64)
    s = torch.as_tensor(np.asarray(grad_var), dtype=torch.float64)
    eps = as_float("eps", eps, nonnegative=True)
    v = g ** 2 + c * s
    if eps == 0 and bool((v == 0).any()):
        raise ValueError(f"eps=0 and {int((v == 0).sum())} coordinate(s) with ḡ_j² + c·Σ_jj = 0 "
                         f"at B={int(batch_size)} (no sample gives them a gradient, e.g. an "
                         "unused parameter, or at B = N a zero mean gradient): D = 1/(√v + ε) is "
                         "infinite there; use eps > 0")
    return 1.0 / (torch.sqrt(v) + eps)


@outside_autocast
def preconditioned_operator(model, loss_fn, data, preconditioner, *, indices=None, params=None,
                            policy=None, chunk_size=None, device=None, dtype=None):
    """The composed operator D^{1/2} H_S D^{1/2} (H_S: Hessian of the samples `indices`,
    or of all data), D = `preconditioner`: a flat vector 1/(√v̂ + ε) or a torch Adam
    optimizer stepping `model` (read with `adam_preconditioner`)."""
    opts = dict(params=params, policy=policy, chunk_size=chunk_size, device=device, dtype=dtype)
    if isinstance(preconditioner, torch.optim.Optimizer):
        preconditioner = adam_preconditioner(model, preconditioner, params=params)
    elif _as_diagonal(preconditioner) is None:
        raise TypeError("preconditioner must be a torch Adam optimizer or a flat vector D, "
                        "got None")
    if indices is not None:
        data = as_data_source(data).take(np.asarray(indices))
    base = curvature_operator(model, loss_fn, data, **opts)
    return DiagonalScaledOperator(base, torch.as_tensor(preconditioner).to(base.device),
                                  name="preconditioner")


# ------------------------------------------------------------------ batch sharpness

@result
class PreconditionedSharpness(Result):
    """E_S λ_max(D^{1/2} H_S D^{1/2}) over random batches S: batch_sizes, mean, std
    (ddof=1; NaN for one batch), values (n_B, n_batches), lr = F/mean (the stability
    limit it implies), beta1, n_batches, seed."""

    batch_sizes: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    values: np.ndarray
    lr: np.ndarray
    beta1: float
    n_batches: int
    seed: int


def _beta1_from(preconditioner, beta1, default=0.9) -> float:
    """β₁ for the factor 2(1+β₁)/(1−β₁): an Adam optimizer given as the preconditioner
    sets it (its `betas[0]`); an explicit `beta1` must then agree; else `beta1`, or the
    default."""
    own = None
    if isinstance(preconditioner, torch.optim.Optimizer):
        betas = preconditioner.param_groups[0].get("betas")
        if betas is not None:
            own = float(betas[0])
    if beta1 is None:
        return default if own is None else own
    b = as_float("beta1", beta1, nonnegative=True)
    if own is not None and abs(b - own) <= 1e-6:       # a float32 0.9 is the optimizer's 0.9
        return own
    if own is not None and b != own:
        raise ValueError(f"beta1={b} disagrees with the preconditioner optimizer's betas[0]={own}"
                         " (leave beta1 out to use the optimizer's)")
    return b


def _as_diagonal(preconditioner):
    """A given D (a flat tensor, numpy array or sequence of numbers) as it is, None as
    None; anything else refused by `rmt.validation.as_array`, naming `preconditioner` (a
    string reached torch's "new(): invalid data type 'str'")."""
    if preconditioner is not None and not torch.is_tensor(preconditioner):
        as_array("preconditioner", preconditioner)
    return preconditioner


def _checked_preconditioner(preconditioner, batch_sizes, model, params):
    """(preconditioner, representative optimizer, its settings) with every optimizer in
    it checked (`lr_prediction.adam_state_settings`): a given optimizer is its own
    representative; a callable B -> optimizer or D is evaluated once per batch size and
    replaced by the table of its values, its optimizers must agree on betas and eps (one
    factor F, one ε) and the first represents them. A D, a callable of D's or None: (it,
    None, None)."""
    if isinstance(preconditioner, torch.optim.Optimizer):
        return preconditioner, preconditioner, adam_state_settings(model, preconditioner, params)
    if not callable(preconditioner):
        return _as_diagonal(preconditioner), None, None
    table = {int(B): preconditioner(int(B)) for B in batch_sizes}
    opts = [o for o in table.values() if isinstance(o, torch.optim.Optimizer)]
    if not opts:
        return (lambda B: table[int(B)]), None, None
    if len(opts) != len(table):
        raise ValueError("preconditioner: the callable gives an optimizer for some batch sizes "
                         "and a D for others; give one kind")
    settings = [adam_state_settings(model, o, params) for o in opts]
    first = settings[0]
    for B, st in zip(table, settings):
        if (st.beta1, st.beta2, st.eps) != (first.beta1, first.beta2, first.eps):
            raise ValueError(f"preconditioner: the optimizers of the callable differ in betas or "
                             f"eps (B = {B}: {(st.beta1, st.beta2, st.eps)} against "
                             f"{(first.beta1, first.beta2, first.eps)}); the prediction is for one "
                             "β₁ and one ε")
    return (lambda B: table[int(B)]), opts[0], first


def _saturation_masks(preconditioner, rep, batch_sizes, model, params):
    """{B: `_saturated` mask} for the optimizer(s) of a checked preconditioner (one given
    optimizer, or a callable's table of them, `_checked_preconditioner`), else None. A
    callable of optimizers skipped the check, and a fresh Adam (every D = 1/ε) gave its
    ε-set limits unwarned where the optimizer itself was warned about (an outside sweep)."""
    if rep is None:
        return None
    return {int(B): _saturated(model, preconditioner if isinstance(preconditioner,
                                                                   torch.optim.Optimizer)
                               else preconditioner(int(B)), params) for B in batch_sizes}


def _any_mask(masks):
    """The coordinates saturated at some batch size of `_saturation_masks`."""
    return torch.stack(list(masks.values())).any(0)


def _precond_for(preconditioner, model, B, params):
    if callable(preconditioner) and not isinstance(preconditioner, torch.optim.Optimizer):
        preconditioner = preconditioner(int(B))
    if isinstance(preconditioner, torch.optim.Optimizer):
        return adam_preconditioner(model, preconditioner, params=params)
    return torch.as_tensor(preconditioner, dtype=torch.float64)


@outside_autocast
def preconditioned_batch_sharpness(model, loss_fn, data, batch_sizes, *, preconditioner,
                                   n_batches=5, beta1=None, tol=1e-6, params=None, policy=None,
                                   chunk_size=None, device=None, dtype=None, seed=0,
                                   progress=None) -> PreconditionedSharpness:
    """λ_max(D^{1/2} H_S D^{1/2}) on `n_batches` random batches S of each size B (drawn
    without replacement by `numpy.random.default_rng(seed)`), and α = F/mean with
    F = 2(1+β₁)/(1−β₁). preconditioner: a flat D, a torch Adam optimizer on `model`, or
    a callable B -> either (one state per batch size). beta1 : None — the optimizer's
    betas[0] when the preconditioner is one, else 0.9.

    An optimizer given as the preconditioner is checked as `lr_prediction.optimizer_settings`
    checks one (`lr_prediction.adam_state_settings`): parameter groups that differ in betas
    or eps, and maximize=True, are refused; coupled weight decay, per-group learning rates
    (F/λ̃ is for one β₁ and one lr on every coordinate) and parameters it does not update
    are warned about; with amsgrad D is read from max_exp_avg_sq. A UserWarning says when
    coordinates whose D sits at its ceiling 1/ε (√v̂ ≤ ε: no state, a fresh optimizer)
    carry the top eigenvector or a gradient (`adam_preconditioner`)."""
    check_model(model)
    src = as_data_source(data)
    bs = as_batch_sizes(batch_sizes, src.N)
    mean_reduction_check(model, loss_fn, src)       # a summed loss: warned, as elsewhere
    _as_chunk_size(chunk_size)
    if src.form == "pair":
        # NaN or inf anywhere in tensors already in memory (one batch of the pair: its
        # check); the drawn batches check only their samples, and a Dataset is not read
        # whole for it (20,000 items cost 20x the measurement itself)
        next(src.batches())
    preconditioner, rep, _ = _checked_preconditioner(preconditioner, bs, model, params)
    beta1 = _beta1_from(rep, beta1)
    n_batches = as_int("n_batches", n_batches, minimum=1)
    seed = resolved_seed("seed", seed)          # None: one int from fresh entropy, recorded
    rng = np.random.default_rng(seed)
    vals = np.empty((len(bs), n_batches))
    masks = _saturation_masks(preconditioner, rep, bs, model, params)
    vectors, top_weight = masks is not None and any(bool(m.any()) for m in masks.values()), 0.0
    jobs = [(i, k) for i in range(len(bs)) for k in range(n_batches)]
    for i, k in progress_bar(jobs, progress=progress, total=len(jobs), desc="preconditioned λ_max"):
        d = _precond_for(preconditioner, model, bs[i], params)
        idx = rng.choice(src.N, size=int(bs[i]), replace=False)
        op = preconditioned_operator(model, loss_fn, src, d, indices=idx, params=params,
                                     policy=policy, chunk_size=chunk_size, device=device,
                                     dtype=dtype)
        top = eigsh(op, k=1, which="LA", tol=tol, seed=int(rng.integers(2**31)),
                    return_vectors=vectors, progress=False)      # under the batches' bar
        vals[i, k] = float(top.values[0])
        if vectors:
            u = torch.as_tensor(np.asarray(top.vectors[:, 0]), dtype=torch.float64)
            top_weight = max(top_weight, float((u[masks[int(bs[i])]] ** 2).sum()))
    if vectors:
        _warn_saturated("preconditioned_batch_sharpness", model, loss_fn, src, rep,
                        _any_mask(masks), top_weight, params=params, policy=policy,
                        device=device, dtype=dtype)
    mean = vals.mean(1)
    std = vals.std(1, ddof=1) if n_batches > 1 else np.full(len(bs), np.nan)   # one batch: unknown
    # NaN where the mean batch top eigenvalue is ≤ 0: no such limit (it returned −31 as a
    # "maximal learning rate" on a concave state; an outside sweep), as lr_table's columns
    return PreconditionedSharpness(bs, mean, std, vals, _limit(adam_factor(beta1), mean),
                                   float(beta1), n_batches, seed)


# ------------------------------------------------------------------ one-pass prediction

@result
class PreconditionedNoise(Result):
    """Top eigenpair of A = D^{1/2} H D^{1/2} and its per-sample noise along it:
    lam (λ̃), s2 (s̃² = (1/(N−1)) Σ_i ‖(A_i − A)ũ‖²), B_star (s̃²/λ̃²), N, P,
    vector (ũ, float64 numpy), direction (D^{-1/2}ũ: ⟨direction, Δw⟩ is the component of
    a weight change along ũ in the preconditioned coordinates z = D^{-1/2}w), zero_tol
    (|λ̃| at or below it is round-off; `positive`)."""

    lam: float
    s2: float
    B_star: float
    N: int
    P: int
    vector: np.ndarray
    direction: np.ndarray
    zero_tol: float = 0.0

    @property
    def positive(self) -> bool:
        """Whether λ̃ is positive beyond the products' round-off (`EigenResult.is_zero`):
        only then is there a stability limit F/λ̃'."""
        return bool(self.lam > 0 and abs(self.lam) > self.zero_tol)


@outside_autocast
def preconditioned_noise(model, loss_fn, data, preconditioner, *, tol=1e-8, params=None,
                         policy=None, chunk_size=None, device=None, dtype=None,
                         seed=0, progress=None) -> PreconditionedNoise:
    """One pass: λ̃, ũ of D^{1/2} H D^{1/2} (Lanczos) and s̃² from per-sample Hessian-vector
    products H_i(D^{1/2}ũ), vmapped in chunks of `chunk_size` samples (None: at most 256,
    fewer where the memory budget says so, `nets.noise.directional.sample_chunk`),
    scaled by D^{1/2} (float64 sums; H ũ' recomputed as the mean of the per-sample
    products). A given optimizer is checked as by the entry points (maximize and other
    optimizers refused, `lr_prediction.adam_state_settings`), with their warning when
    coordinates at D = 1/ε (no state: a fresh optimizer) carry the top direction.
    progress: bars over the Lanczos products and the per-sample chunks."""
    optimizer = sat = None
    if isinstance(preconditioner, torch.optim.Optimizer):
        optimizer = preconditioner
        adam_state_settings(model, optimizer, params)
        sat = _saturated(model, optimizer, params)
        preconditioner = adam_preconditioner(model, optimizer, params=params)
    d = torch.as_tensor(preconditioner, dtype=torch.float64)
    H = curvature_operator(model, loss_fn, data, params=params, policy=policy, device=device,
                           dtype=dtype)
    A = DiagonalScaledOperator(H, d.to(H.device), name="preconditioner")
    top = eigsh(A, k=1, which="LA", tol=tol, seed=as_seed("seed", seed), progress=progress)
    lam = float(top.values[0])
    if not lam * lam > 0:           # s²/λ² below: a ZeroDivisionError at eps = 1e300
        raise ValueError(f"the preconditioned top eigenvalue is {lam:.3g}: zero, or so small "
                         "that its square underflows (an eps or a preconditioner far too "
                         "large for the curvature)")
    u = torch.as_tensor(np.asarray(top.vectors[:, 0]), dtype=H.dtype, device=H.device)
    sq = A.sqrt_d
    w = sq * u
    X, Y = H.source.tensors(device=H.device, dtype=H.dtype)
    N = len(X)
    chunk = sample_chunk(H, chunk_size)
    tot = torch.zeros(H.P, dtype=torch.float64, device=H.device)
    ss = 0.0
    for s in progress_bar(range(0, N, chunk), progress=progress,
                          desc="preconditioned per-sample products"):
        R = H.group_products(X[s:s + chunk, None], Y[s:s + chunk, None], w[:, None])[:, :, 0]
        R = (R * sq).to(torch.float64)
        tot += R.sum(0)
        ss += float((R ** 2).sum())
    mean = tot / N
    s2 = max(ss - N * float(mean @ mean), 0.0) / (N - 1)
    un = u.to(torch.float64).cpu()
    if sat is not None and bool(sat.any()):
        _warn_saturated("preconditioned_noise", model, loss_fn, H.source, optimizer, sat,
                        float((un[sat] ** 2).sum()), params=params, policy=policy,
                        device=device, dtype=dtype)
    return PreconditionedNoise(lam, s2, s2 / lam ** 2, N, H.P, un.numpy(),
                               (un / sq.to(torch.float64).cpu()).numpy(),
                               zero_tol=float(top.zero_tol))


@result
class AdamPrediction(Result):
    """Predicted Adam stability limit per batch size (module docstring):
    batch_sizes, lr (the `form`'s limit), lam (λ̃(B), top of D(B)^{1/2} H D(B)^{1/2}),
    s2 (s̃²(B)), lam_batch (λ̃'(B) = λ̃ + c·s̃²/λ̃), beta1, eps, N, preconditioner
    ("noise_model" or "given"); form ("mean_square" or "deterministic"),
    lr_mean_square (F/λ̃'_β(B), λ̃'_β = λ̃ + G·c·s̃²/λ̃, G = (1+β₁)/(1−β₁),
    `rmt.lr.adam_ms_max_lr`), lr_deterministic (F/λ̃'(B)), noise_gain G; seed (the int
    the Lanczos starts and noise passes were seeded with: drawn from fresh entropy for
    seed=None, so that passing it back repeats the prediction)."""

    batch_sizes: np.ndarray
    lr: np.ndarray
    lam: np.ndarray
    s2: np.ndarray
    lam_batch: np.ndarray
    beta1: float
    eps: float
    N: int
    preconditioner: str
    form: str
    lr_mean_square: np.ndarray
    lr_deterministic: np.ndarray
    noise_gain: float
    seed: int | None = None


ADAM_FORMS = ("mean_square", "deterministic")
#: transfer forms that run Adam on a model of the network (`linearized_adam_threshold`)
ADAM_MODEL_FORMS = ("linearized", "curved")


def warn_adam_transfer(form, beta1, batch_sizes, reference_batch_size, *, who):
    """The measured caveat of an Adam transfer of `form` with β₁ = `beta1`: for the model
    forms `transfer.warn_momentum_upward` (batch sizes above B₀, β₁ > 0); for the
    mean-square or deterministic limit, any B ≠ B₀. Measured for the mean-square form
    (docs/real_training.md; benchmarks/results/bench_adam_linearized_*_b0.9.json and
    *_b0.json, `worst_mean_square`; bench_heldout_tabular.json's adam rows): with β₁ = 0.9
    it missed the real warmed-state threshold by more than 20 % on 8 of 9 networks
    (0.30–2.49×), and with β₁ = 0 on 15 of 17 network instances (0.24–4.22×: it met only
    on the digits MLP and CNN it was developed on; it said nothing there before, an
    outside check), too high and too low, upward and downward alike."""
    from nets.learning_rates.transfer import MomentumCaveat, warn_momentum_upward

    if not math.isfinite(beta1):
        return
    if form in ADAM_MODEL_FORMS:
        warn_momentum_upward(beta1, batch_sizes, reference_batch_size, who=who)
    elif np.any(np.asarray(batch_sizes) != reference_batch_size):
        measured = ("8 of 9 networks measured at beta1 = 0.9 (0.30-2.49x)" if beta1 > 0 else
                    "15 of 17 measured network instances (0.24-4.22x; it met only on the two "
                    "digits networks it was developed on)")
        warnings.warn(f"{who}: with beta1 = {beta1:g} the transfer along Adam's stability limit "
                      f"missed the real warmed-state threshold by more than 20 % on {measured}, "
                      "in either direction; use the linearised form (the default) — anchored "
                      "at the largest batch size you will use when beta1 > 0 — or measure "
                      "(nets.learning_rates.adam.adam_threshold)",
                      MomentumCaveat, stacklevel=caller_stacklevel())


@outside_autocast
def predict_adam_max_lr(model, loss_fn, data, batch_sizes, *, betas=None, eps=None,
                        form="mean_square", preconditioner=None, tol=1e-8, params=None,
                        policy=None, chunk_size=None, device=None, dtype=None, seed=0,
                        progress=None) -> AdamPrediction:
    """Adam's stability limit α_max(B) for every B (module docstring).

    form : "mean_square" (default) — F/(λ̃ + G·c(B,N)·s̃²/λ̃), G = (1+β₁)/(1−β₁), the
        mean-square limit of EMA momentum with batch noise (`rmt.lr.adam_ms_max_lr`);
        "deterministic" — F/(λ̃ + c·s̃²/λ̃), the deterministic EMA factor applied to the
        batch-shifted preconditioned curvature. Both are returned (`lr_mean_square`,
        `lr_deterministic`); they coincide at β₁ = 0. F = 2(1+β₁)/(1−β₁).

    preconditioner : None — the noise model D(B) = 1/(√(ḡ² + c(B,N)Σ_jj) + ε) from one
        per-sample gradient pass (the state a warmup at B reaches); or a callable
        B -> D / Adam optimizer (e.g. the measured warmed states).
    betas : None — an Adam optimizer given as the preconditioner sets β₁ (its betas), else
        (0.9, 0.999); β₁ sets the factor 2(1+β₁)/(1−β₁). Each in [0, 1).
    eps : None — the optimizer's when it is the preconditioner, else 1e-8 (the noise
        model's ε). A given betas or eps must agree with such an optimizer's; it is checked
        as `preconditioned_batch_sharpness` checks one (groups that differ in betas or eps
        and maximize refused, coupled weight decay and per-group lrs warned about, amsgrad
        read from max_exp_avg_sq, coordinates at D = 1/ε that matter warned about).
    Cost per B: one Lanczos on the full-data preconditioned Hessian and one per-sample
    HVP pass.
    """
    from nets.noise.gradient_noise import gradient_noise

    src = as_data_source(data)
    mean_reduction_check(model, loss_fn, src)
    N = src.N
    bs = as_batch_sizes(batch_sizes, N)
    if form not in ADAM_FORMS:
        raise ValueError(f"form must be one of {ADAM_FORMS}, got {form!r}")
    if betas is not None:
        betas = _as_betas(betas)
    preconditioner, rep, own = _checked_preconditioner(preconditioner, bs, model, params)
    b1 = _beta1_from(rep, None if betas is None else betas[0])
    if own is not None:
        if betas is not None and betas[1] != own.beta2:
            raise ValueError(f"betas[1]={betas[1]} disagrees with the preconditioner optimizer's "
                             f"betas[1]={own.beta2} (leave betas out to use the optimizer's)")
        if eps is not None and as_float("eps", eps, nonnegative=True) != own.eps:
            raise ValueError(f"eps={eps} disagrees with the preconditioner optimizer's "
                             f"eps={own.eps} (leave eps out to use the optimizer's)")
        eps = own.eps
    eps = 1e-8 if eps is None else as_float("eps", eps, nonnegative=True)
    seed = resolved_seed("seed", seed)          # None: one int from fresh entropy, recorded
    F = adam_factor(b1)
    kind = "given"
    if preconditioner is None:
        kind = "noise_model"
        gn = gradient_noise(model, loss_fn, src, hessian=False, params=params, policy=policy,
                            chunk_size=chunk_size, device=device, seed=seed,
                            progress=progress)      # (minutes at P = 1M: it had no bar)

        def preconditioner(B):
            return noise_model_preconditioner(gn.mean, gn.var, B, N, eps=eps)
    lam, s2 = np.empty(len(bs)), np.empty(len(bs))
    masks = _saturation_masks(preconditioner, rep, bs, model, params)
    top_weight = 0.0
    for i, B in enumerate(progress_bar(list(bs), progress=progress, desc="Adam prediction")):
        d = _precond_for(preconditioner, model, B, params)
        pn = preconditioned_noise(model, loss_fn, src, d, tol=tol, params=params, policy=policy,
                                  chunk_size=chunk_size, device=device, dtype=dtype, seed=seed,
                                  progress=progress)
        if not pn.positive:       # round-off λ̃ (1e-15) gave limits of 1e13-1e31 (a sweep)
            raise ValueError(f"the top eigenvalue of D^1/2 H D^1/2 at B = {int(B)} is not "
                             f"positive ({pn.lam:.3g}, zero to precision below "
                             f"{pn.zero_tol:.2g}); no stability limit")
        lam[i], s2[i] = pn.lam, pn.s2
        if masks is not None and bool(masks[int(B)].any()):
            top_weight = max(top_weight,
                             float((torch.as_tensor(pn.vector)[masks[int(B)]] ** 2).sum()))
    if masks is not None:
        _warn_saturated("predict_adam_max_lr", model, loss_fn, src, rep, _any_mask(masks),
                        top_weight, params=params, policy=policy, device=device, dtype=dtype)
    c = np.array([batch_noise_factor(int(B), N) for B in bs])
    lam_b = lam + c * s2 / lam
    det = F / lam_b
    ms = np.array([adam_ms_max_lr(int(B), lm, sv, N, b1) for B, lm, sv in zip(bs, lam, s2)])
    return AdamPrediction(bs, ms if form == "mean_square" else det, lam, s2, lam_b, b1,
                          float(eps), N, kind, form=form, lr_mean_square=ms,
                          lr_deterministic=det, noise_gain=momentum_noise_gain(b1),
                          seed=seed if isinstance(seed, int) else None)


def adam_noise_floor_lr(grad_mean, grad_var, batch_sizes, N, *, excess_loss, eps=1e-8) -> np.ndarray:
    """The lr at which Adam's stationary noise floor reaches `excess_loss` above the minimum.

    Small-α quadratic model in z = D^{-1/2}w: the iterate noise has covariance
    solves the Lyapunov equation AS + SA = α·D^{1/2}Σ_B D^{1/2}, so the excess loss
    E[½ zᵀAz] = ½tr(AS) ≈ (α/4)·tr(DΣ_B) (EMA momentum does not change it at small α),
    Σ_B = c(B,N)·diag(Σ_jj). Hence
    α_floor(B) = 4·excess_loss / (c·Σ_j D_j(B)Σ_jj), D(B) the noise-model preconditioner;
    noise-dominated D_j = (cΣ_jj)^{-1/2} gives α_floor ∝ 1/√c ≈ √B — the square-root rule
    as a *loss* (noise-floor) limit, not a curvature limit. On the digits MLP the measured
    loss-threshold (`adam_threshold(criterion="divergence")`) follows this shape within
    ±20 % for B = 8…128 at about 0.25× its absolute value. Where the batch noise c·tr(DΣ)
    vanishes (B = N, or Σ = 0) there is no noise floor: α_floor = inf, the formula's limit.
    grad_mean and grad_var: per-coordinate arrays of one length."""
    N = as_int("N", N, minimum=1)               # 5.5 was truncated to 5
    bs = as_batch_sizes(batch_sizes, N)
    mean = np.asarray(grad_mean, dtype=float)
    var = np.asarray(grad_var, dtype=float)
    if mean.shape != var.shape or mean.ndim != 1 or mean.size == 0:
        raise ValueError(f"grad_mean and grad_var must be non-empty 1-D arrays of one length "
                         f"(one entry per parameter), got shapes {mean.shape} and {var.shape}")
    # a NaN, negative or infinite variance read as "no noise floor" (inf), the answer for
    # a zero one (an outside sweep)
    if not (np.isfinite(mean).all() and np.isfinite(var).all() and (var >= 0).all()):
        raise ValueError("grad_mean must be finite and grad_var finite and >= 0 (per-coordinate "
                         "variances)")
    excess_loss = as_float("excess_loss", excess_loss, positive=True)
    out = np.empty(len(bs))
    for i, B in enumerate(bs):
        c = batch_noise_factor(int(B), int(N))
        d = noise_model_preconditioner(mean, var, B, N, eps=eps).numpy()
        noise = c * float(d @ var)
        out[i] = 4.0 * excess_loss / noise if noise > 0 else math.inf
    return out


@result
class AdamTransfer(Result):
    """A known-good Adam lr carried across batch sizes along the predicted curve:
    batch_sizes, lr (α₀·α_pred(B)/α_pred(B₀)), reference (B₀, α₀), predicted (the
    AdamPrediction's absolute stability limits; for form "linearized" the corrected
    linearised-Adam thresholds), sqrt_rule (α₀√(B/B₀)), linear_rule (α₀·B/B₀), form,
    beta1 (β₁ of the transfer; NaN if not recorded), seed (the int the prediction was
    seeded with, drawn from fresh entropy for seed=None; None when a given `prediction`
    did not record one)."""

    batch_sizes: np.ndarray
    lr: np.ndarray
    reference: tuple
    predicted: np.ndarray
    sqrt_rule: np.ndarray
    linear_rule: np.ndarray
    form: str
    beta1: float = float("nan")
    seed: int | None = None

    def with_reference(self, reference) -> "AdamTransfer":
        """The same transfer anchored at another (B₀, α₀), B₀ one of `batch_sizes`: the
        stored predicted curve is reused (no new measurement), as
        `LRTransfer.with_reference`."""
        from nets.learning_rates.transfer import reference_index

        i0, B0, a0 = reference_index(self.batch_sizes, reference)
        bs = np.asarray(self.batch_sizes, dtype=float)
        pred = np.asarray(self.predicted, dtype=float)
        warn_adam_transfer(self.form, self.beta1, self.batch_sizes, B0,
                           who="AdamTransfer.with_reference")         # adam_transfer_lr's caveat
        return dataclasses.replace(self, lr=a0 * (pred / pred[i0]), reference=(B0, a0),
                                   sqrt_rule=a0 * np.sqrt(bs / B0), linear_rule=a0 * (bs / B0))

    def plot(self, ax=None, *, measured=None):
        """lr(B) (log-log) with the √B and linear rules through the reference and
        `measured` (an `AdamThresholds`, plotted ± stderr) if given; returns the axes."""
        import matplotlib.pyplot as plt

        from nets.learning_rates.transfer import finish_lr_axes

        ax = plt.gca() if ax is None else ax
        B, lr, sqrt_rule, linear_rule = in_b_order(self.batch_sizes, self.lr, self.sqrt_rule,
                                                   self.linear_rule)
        ax.plot(B, lr, "-", color="C0", label=f"adam_transfer_lr ({self.form})")
        ax.plot(B, sqrt_rule, ":", color="C1", label="√B rule")
        ax.plot(B, linear_rule, ":", color="C2", label="linear rule")
        if measured is not None:
            ax.errorbar(measured.batch_sizes, measured.lr, yerr=measured.stderr, fmt="o",
                        color="k", capsize=2, label="measured (warmed state)")
        return finish_lr_axes(ax, self.reference, "Adam learning rate")


@outside_autocast
def adam_transfer_lr(model, loss_fn, data, batch_sizes, *, reference, betas=None,
                     eps=1e-8, form=None, prediction=None, params=None, policy=None,
                     chunk_size=None, device=None, dtype=None, seed=0,
                     linearized=None, progress=None) -> AdamTransfer:
    """Transfer (B₀, α₀) to every B: α(B) = α₀·α_pred(B)/α_pred(B₀), with α_pred, for
    form="linearized" (the default), the corrected thresholds of Adam on the linearised
    network at the warmed states (`nets.learning_rates.adam_linearized.linearized_adam_threshold`;
    pass its result as `prediction`, or its keyword options as the dict `linearized`, e.g.
    {"seeds": range(8), "warmup_steps": 500, "warmup_lr": 1e-4, "steps": 100,
    "factor": 10} — give the anchor's protocol; minutes of CPU on a few-thousand-parameter
    network), form="curved" the same run on the curved model (`linearized_adam_threshold(
    curved=True)`: the outputs' second derivative along D^{1/2}ũ kept, no correction), or
    the "mean_square" or "deterministic" limit of `predict_adam_max_lr` (seconds; or of a
    given `prediction`, an AdamPrediction whose batch sizes include B₀ and every B).
    form=None: a given `prediction`'s own form (an AdamPrediction's `form`; "curved" or
    "linearized" for a `linearized_adam_threshold` result, by its `curved` flag),
    "linearized" without one. Which form transferred on which network: docs/real_training.md (the
    linearised one within 20 % on five of twelve network/β₁ pairs, the mean-square one on
    three; neither on every one with β₁ = 0.9). betas : None — a given `prediction`'s
    (its β₁ is recorded and sets the momentum caveat), else (0.9, 0.999); given together
    with a prediction, its β₁ must agree with the prediction's."""
    forms = (*ADAM_FORMS, *ADAM_MODEL_FORMS)
    own = None if prediction is None else _beta1_of(prediction)
    if betas is not None:
        betas = _as_betas(betas)
        if own is not None and betas[0] != own:
            raise ValueError(f"betas[0]={betas[0]} disagrees with the prediction's beta1={own} "
                             "(leave betas out to use the prediction's)")
    betas = (0.9, 0.999) if betas is None else betas
    if form is None:        # a given prediction's own form (its `lr` is that form's)
        if isinstance(prediction, AdamPrediction):
            form = prediction.form
        elif prediction is not None and hasattr(prediction, "curved"):
            form = "curved" if prediction.curved else "linearized"
        else:
            form = "linearized"
    if form not in forms:
        raise ValueError(f"form must be one of {forms}, got {form!r}")
    from nets.learning_rates.transfer import _reference

    B0, a0 = _reference(reference)
    N = as_data_source(data).N
    if B0 > N:
        raise ValueError(f"reference[0] (B0) must be <= N={N} (batches are drawn without "
                         f"replacement), got {B0}")
    bs = as_batch_sizes(batch_sizes)
    allb = np.unique(np.r_[bs, B0])
    given_prediction = prediction is not None
    if not given_prediction:
        seed = resolved_seed("seed", seed)      # None: one int from fresh entropy, recorded
    if prediction is None and form in ADAM_MODEL_FORMS:
        from nets.learning_rates.adam_linearized import linearized_adam_threshold
        from nets.learning_rates.transfer import refuse_params_for_linearized

        refuse_params_for_linearized(params)
        opts = dict(linearized or {})
        if "curved" in opts:
            raise ValueError("linearized: pass the model as form='curved' or 'linearized', "
                             "not as the option 'curved'")
        clash = sorted(k for k in ("betas", "eps", "seed", "progress") if k in opts)
        if clash:   # (a raw "got multiple values for keyword argument" TypeError before)
            raise ValueError(f"linearized: {', '.join(clash)} are adam_transfer_lr's own "
                             "arguments (they set the linearised runs too); pass them there, "
                             "not in the linearized dict")
        prediction = linearized_adam_threshold(model, loss_fn, data, allb, betas=betas,
                                               eps=eps, seed=seed, progress=progress,
                                               curved=form == "curved", **opts)
    elif prediction is None:
        prediction = predict_adam_max_lr(model, loss_fn, data, allb, betas=betas, eps=eps,
                                         form=form, params=params, policy=policy,
                                         chunk_size=chunk_size, device=device, dtype=dtype,
                                         seed=seed, progress=progress)
    need = "corrected" if form in ADAM_MODEL_FORMS else f"lr_{form}"
    if not hasattr(prediction, need):
        raise TypeError(f"prediction: a {type(prediction).__name__} has no {need!r} for "
                        f"form={form!r} (forms 'linearized' and 'curved' take "
                        "linearized_adam_threshold's result, the other forms "
                        "predict_adam_max_lr's)")
    if form in ADAM_MODEL_FORMS and bool(prediction.curved) != (form == "curved"):
        raise ValueError(f"prediction: form={form!r} needs linearized_adam_threshold's result "
                         f"with curved={form == 'curved'}, got curved={prediction.curved}")
    values = getattr(prediction, need)
    table = dict(zip(np.asarray(prediction.batch_sizes).tolist(), np.asarray(values, float)))
    missing = [int(b) for b in allb if int(b) not in table]
    if missing:
        raise ValueError(f"prediction has no value for batch sizes {missing}")
    pred = np.array([table[int(b)] for b in bs])
    lr = a0 * (pred / table[B0])         # x/x is exactly 1: lr at B₀ is a0 itself
    b1 = float(betas[0]) if own is None else own             # a given prediction's own β₁
    warn_adam_transfer(form, b1, bs, B0, who="adam_transfer_lr")
    used = getattr(prediction, "seed", None) if given_prediction else seed
    return AdamTransfer(bs, lr, (B0, a0), pred, a0 * np.sqrt(bs / B0), a0 * (bs / B0), form, b1,
                        seed=used if isinstance(used, int) else None)


def _beta1_of(prediction):
    """β₁ a prediction was made at: an AdamPrediction's beta1, a LinearizedAdamThresholds'
    betas[0]; None if it records neither."""
    if hasattr(prediction, "beta1"):
        return float(prediction.beta1)
    betas = getattr(prediction, "betas", None)
    return None if betas is None else float(betas[0])


# ------------------------------------------------------------------ the threshold protocol
#
# Per (B, seed): warm a copy of the model and a fresh torch Adam for `warmup_steps` steps
# at `warmup_lr` on random batches of size B (torch.Generator(seed)); that (weights,
# optimizer state) pair is the checkpoint. Each trial restores it, sets the lr to α and
# runs `steps` steps on another seeded batch sequence (the same for every α). Criteria:
#   "onset"      — unstable iff c_t = ⟨D^{-1/2}(w_t − w_0), ũ⟩, the displacement along the
#                  top eigenvector ũ of D^{1/2} H D^{1/2} at the warmed state (z-coordinates),
#                  has a growth peak: max_t |c_t| > growth_factor × median_t |c_t|
#                  (default 10), or anything non-finite. Not a slope fit over the end of the
#                  run: real Adam self-stabilises (the oscillation inflates v, which shrinks
#                  D — the adaptive edge of stability) within a few steps, so the growth is
#                  a transient peak. A stable run's c_t is a noise-driven stationary process,
#                  max/median ≈ 2.5–4 (noisy least squares: ≈ 2.3 up to 1.2× the prediction,
#                  17 at 2×, 28 at 4×).
#                  A loss above `factor` × start after step 1 also counts as unstable (for
#                  every criterion: the sign-step blow-up, flagged `first_step_blowup`);
#   "final"      — unstable iff the full-data loss after `steps` steps exceeds its start;
#   "divergence" — unstable iff the full-data loss ever exceeds `factor` × start, or
#                  anything non-finite.
# warmup_steps = 0 is the fresh-state protocol (first step ≈ α·sign(g)).


@result
class WarmState(Result):
    """A warmed checkpoint: model (a copy, eval mode), optimizer_state (torch Adam
    state_dict), batch_size, warmup_steps, warmup_lr, betas, eps, seed, loss (full data)."""

    model: object
    optimizer_state: dict
    batch_size: int
    warmup_steps: int
    warmup_lr: float
    betas: tuple
    eps: float
    seed: int
    loss: float


def _batches(N, B, steps, seed):
    gen = torch.Generator().manual_seed(int(seed))
    for _ in range(steps):
        yield torch.randperm(N, generator=gen)[:B]


def _adam(net, lr, betas, eps):
    return torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr,
                            betas=tuple(betas), eps=eps)


def restored_adam(net, warm, lr):
    """A torch Adam on `net`'s trainable parameters at lr with `warm`'s state (a fresh one
    if `warm.warmup_steps == 0`). The state is loaded from a copy: Optimizer.load_state_dict
    keeps the given tensors (exp_avg, exp_avg_sq, step) when dtype and device match and
    Adam updates them in place, so loading `warm.optimizer_state` itself would advance the
    warm state with every run started from it."""
    opt = _adam(net, lr, warm.betas, warm.eps)
    if warm.warmup_steps > 0:
        opt.load_state_dict(copy.deepcopy(warm.optimizer_state))
    for g in opt.param_groups:
        g["lr"] = float(lr)
    return opt


@outside_autocast
def warm_adam_state(model, loss_fn, X, y, batch_size, *, warmup_steps, warmup_lr,
                    betas=(0.9, 0.999), eps=1e-8, seed=0, chunk_shares="auto") -> WarmState:
    """Run `warmup_steps` Adam steps at `warmup_lr` (batch size B, batches from
    torch.Generator(seed)) on a copy of `model` (eval mode); return the warmed pair.
    Refuses (ValueError) a batch size outside 1…N (a negative one drew N − |B| samples, one
    above N drew N, both recorded as given) and a warm-up that leaves a non-finite weight
    (eps = 0 with a coordinate whose gradient stays zero: Adam's 0/0). chunk_shares: as
    for `adam_trial`, for the warmed state's full-data loss."""
    N = len(X)
    batch_size = as_int("batch_size", batch_size, minimum=1, maximum=N)
    warmup_steps = as_int("warmup_steps", warmup_steps, minimum=0)
    warmup_lr = as_float("warmup_lr", warmup_lr, positive=True)
    betas, eps = _as_betas(betas), as_float("eps", eps, nonnegative=True)
    seed = as_int("seed", seed, minimum=0)
    net = model_copy(model)
    net.train(False)
    opt = _adam(net, warmup_lr, betas, eps)
    for idx in _batches(N, batch_size, warmup_steps, seed):
        opt.zero_grad(set_to_none=True)
        loss_fn(net(X[idx]), y[idx]).backward()
        opt.step()
    bad = [n for n, p in net.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        why = ("eps=0 and a coordinate whose gradient stayed zero (Adam's step is 0/0 there); "
               "use eps > 0" if eps == 0 else f"the warm-up diverged at warmup_lr={warmup_lr:g}")
        raise ValueError(f"warm_adam_state: parameter {bad[0]!r} is not finite after "
                         f"{warmup_steps} warm-up steps: {why}")
    return WarmState(net, copy.deepcopy(opt.state_dict()), batch_size, warmup_steps,
                     warmup_lr, tuple(betas), eps, seed,
                     full_data_loss(net, loss_fn, X, y, 4096,
                                    given_or_read_shares(chunk_shares, net, loss_fn, X, y, 4096)))


class _FrozenAdam:
    """Adam with its second moment held at the restored state: m ← β₁m + (1−β₁)g,
    w ← w − α·m̂·D, D = 1/(√v̂ + ε) fixed (the linearised dynamics the prediction is about).
    A parameter the warm-up gave no gradient (no state: e.g. an unused head) is skipped
    while its gradient is None, as torch's Adam skips it; it has no v̂ to freeze, so a
    gradient for it is refused."""

    def __init__(self, params, opt, lr):
        self.params, self.lr = params, lr
        g = opt.param_groups[0]
        self.b1, b2, eps = g["betas"][0], g["betas"][1], g["eps"]
        self.m, self.D, self.t = [], [], []
        if not any("exp_avg_sq" in opt.state.get(p, {}) for p in params):
            raise ValueError("second_moment='frozen' needs a warmed state (warmup_steps > 0)")
        for p in params:
            st = opt.state.get(p, {})
            if "exp_avg_sq" not in st:          # never had a gradient in the warm-up
                self.m.append(None)
                self.D.append(None)
                self.t.append(0.0)
                continue
            t = float(st["step"])
            self.m.append(st["exp_avg"].detach().clone())
            self.D.append(1.0 / ((st["exp_avg_sq"] / (1.0 - b2 ** t)).sqrt() + eps))
            self.t.append(t)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for k, p in enumerate(self.params):
            if p.grad is None:
                continue
            if self.D[k] is None:
                raise ValueError("second_moment='frozen': a parameter that got no gradient in the "
                                 "warm-up (no Adam state, no v̂ to freeze) got one in the run; "
                                 "use second_moment='adaptive'")
            self.t[k] += 1
            self.m[k].mul_(self.b1).add_(p.grad, alpha=1.0 - self.b1)
            p.sub_(self.lr / (1.0 - self.b1 ** self.t[k]) * self.m[k] * self.D[k])


@result
class AdamTrial(Trial):
    """A `nets.learning_rates.lr_search.Trial` of Adam from a warmed state (onset:
    growth_rate is max_t|c_t| / median_t|c_t|), with first_step_blowup (unstable
    already after step 1)."""

    first_step_blowup: bool = False


def adam_trial(warm: WarmState, loss_fn, X, y, lr, *, steps, criterion="onset",
               direction=None, factor=10.0, growth_factor=10.0, second_moment="adaptive",
               seed=0, chunk_shares="auto") -> AdamTrial:
    """Restore `warm`, set the lr to α = `lr`, run `steps` steps and judge by `criterion`
    (module section comment). direction: flat D^{-1/2}ũ (`PreconditionedNoise.direction`)
    for "onset". Batches: torch.Generator(seed + 7919), the same for every α.
    chunk_shares: each 4,096-sample chunk's share of the full-data loss (None: the plain
    n_b/N; "auto": read here, `nets.curvature.chunk_shares.data_shares`)."""
    if criterion not in ADAM_CRITERIA:
        raise ValueError(f"criterion must be one of {ADAM_CRITERIA}, got {criterion!r}")
    if criterion == "onset" and direction is None:
        raise ValueError("criterion='onset' needs direction= (PreconditionedNoise.direction)")
    net = model_copy(warm.model)
    opt = restored_adam(net, warm, lr)
    params = [p for p in net.parameters() if p.requires_grad]
    if second_moment not in ("adaptive", "frozen"):
        raise ValueError(f"second_moment must be 'adaptive' or 'frozen', got {second_moment!r}")
    if second_moment == "frozen":
        opt = _FrozenAdam(params, opt, float(lr))
    w0 = torch.cat([p.detach().reshape(-1) for p in params]).double()
    q = None if direction is None else torch.as_tensor(np.asarray(direction), dtype=torch.float64)
    L0 = warm.loss
    check_start_loss(L0)
    shares = given_or_read_shares(chunk_shares, net, loss_fn, X, y, 4096)
    max_loss = loss_t = L0
    proj, unstable, reason, first, t = [], False, "stable", False, 0
    for t, idx in enumerate(_batches(len(X), warm.batch_size, int(steps), seed + 7919), start=1):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(X[idx]), y[idx])
        if not torch.isfinite(loss):
            unstable, reason, max_loss = True, f"non-finite batch loss at step {t}", math.inf
            break
        loss.backward()
        opt.step()
        if criterion == "onset":
            w = torch.cat([p.detach().reshape(-1) for p in params]).double()
            c = float(torch.dot(w - w0, q))
            if not math.isfinite(c):
                unstable, reason = True, f"non-finite parameters at step {t}"
                break
            proj.append(abs(c))
        if criterion == "divergence" or t == steps or t == 1:
            loss_t = full_data_loss(net, loss_fn, X, y, 4096, shares)
            if not math.isfinite(loss_t):
                unstable, reason, max_loss = True, f"non-finite loss at step {t}", math.inf
                break
            max_loss = max(max_loss, loss_t)
            if loss_t > factor * L0 and (criterion == "divergence" or t == 1):
                # a first-step blow-up ends every criterion's run: it is the sign-step limit
                unstable = True
                reason = f"loss {loss_t:.4g} > {factor:g} x start {L0:.4g} at step {t}"
                break
    first = unstable and t == 1
    rate = math.nan
    if not unstable and criterion == "final" and loss_t > L0:
        unstable, reason = True, f"final loss {loss_t:.4g} > start {L0:.4g}"
    if not unstable and criterion == "onset":
        rate = max(proj) / max(float(np.median(proj)), 1e-300)
        if rate > growth_factor:
            unstable, reason = True, f"max|c_t| = {rate:.3g} x median > {growth_factor:g}"
    return AdamTrial(lr=float(lr), batch_size=warm.batch_size, steps=int(steps),
                     criterion=criterion, unstable=bool(unstable), initial_loss=float(L0),
                     max_loss=float(max_loss), final_loss=float(loss_t), growth_rate=float(rate),
                     steps_run=int(t), reason=reason, first_step_blowup=bool(first))


@result
class AdamThresholds(Result):
    """Measured Adam thresholds per batch size (warmed-state protocol, module comment).

    batch_sizes; lr (mean over seeds of √(lo·hi)); stderr; per_seed, lo, hi (n_B, n_seeds);
    first_step (n_B, n_seeds: fraction of the bisection's unstable trials that blew up on
    step one); lam_precond, s2_precond (n_B, n_seeds: λ̃ and s̃² at the warmed state);
    predicted_state (deterministic form F/(λ̃ + c·s̃²/λ̃) from the warmed state itself,
    n_B × n_seeds; the bisection's default start) and predicted_state_mean_square
    (F/(λ̃ + G·c·s̃²/λ̃), `rmt.lr.adam_ms_max_lr`); criterion, betas, eps, warmup_steps,
    warmup_lr, steps, rel_tol, seeds, n_trials."""

    batch_sizes: np.ndarray
    lr: np.ndarray
    stderr: np.ndarray
    per_seed: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    first_step: np.ndarray
    lam_precond: np.ndarray
    s2_precond: np.ndarray
    predicted_state: np.ndarray
    predicted_state_mean_square: np.ndarray
    criterion: str
    betas: tuple
    eps: float
    warmup_steps: int
    warmup_lr: float
    steps: int
    rel_tol: float
    seeds: tuple
    n_trials: int

    def plot(self, ax=None, *, label=None, color="k"):
        """Measured thresholds ± stderr against B (log-log); returns the axes."""
        return plot_thresholds(ax, self.batch_sizes, self.lr, self.stderr, fmt="o", color=color,
                               label=label or f"measured Adam ({self.criterion}, "
                                              f"β₁={self.betas[0]:g})")


@outside_autocast
def adam_threshold(model, loss_fn, data, batch_sizes, *, betas=(0.9, 0.999), eps=1e-8,
                   warmup_steps=500, warmup_lr=1e-4, steps=100, criterion="divergence",
                   seeds=tuple(range(8)), factor=10.0, growth_factor=10.0, second_moment="adaptive",
                   rel_tol=0.05, lr0=None, unbracketed="raise",
                   device=None, dtype=None, seed=0, progress=None) -> AdamThresholds:
    """Largest stable Adam lr per batch size from a warmed state (module comment), by
    bisection in log α (`nets.learning_rates.lr_search.bisect_max_lr`, to hi/lo ≤ 1+rel_tol).

    warmup_steps, warmup_lr : the stated warmup at each B (0: fresh state — the first-step
        limit, with criterion "divergence"). criterion : "divergence" (the default, as for
        `training_threshold`, and the protocol `linearized_adam_threshold` and
        `transfer_lr` model), "final" or "onset". seeds : the batch sequences (default
        0–7, as theirs). steps : run length at α. lr0 : bisection start
        (float, callable B -> float, or None: the warmed state's own prediction
        F/(λ̃ + c·s̃²/λ̃)). unbracketed : "raise" (the default) or "nan", as for
        `training_threshold`: a (B, seed) whose bisection finds no bracket (a bounded loss
        that never reaches `factor` × its start) is NaN, and so is the mean at that B,
        while the other entries are still measured. The model is not modified.
    """
    check_model(model)
    if criterion not in ADAM_CRITERIA:
        raise ValueError(f"criterion must be one of {ADAM_CRITERIA}, got {criterion!r}")
    if unbracketed not in ("raise", "nan"):
        raise ValueError(f"unbracketed must be 'raise' or 'nan', got {unbracketed!r}")
    warn_train_mode_layers(model, "adam_threshold")
    mean_reduction_check(model, loss_fn, data)
    X, y = tensors_for(model, data, device=device, dtype=dtype)
    if device is not None or dtype is not None:     # the trials train copies: cast one
        model = model_copy(model).to(device=device, dtype=dtype)
    N = len(X)
    bs = as_batch_sizes(batch_sizes, N)
    warmup_steps = as_int("warmup_steps", warmup_steps, minimum=0)
    steps = as_int("steps", steps, minimum=8)
    warmup_lr = as_float("warmup_lr", warmup_lr, positive=True)
    seeds = as_seeds(seeds)
    factor = as_growth_factor(factor)
    growth_factor = as_growth_factor(growth_factor, "growth_factor")    # never checked
    rel_tol = as_float("rel_tol", rel_tol, positive=True)               # (an outside sweep)
    if second_moment not in ("adaptive", "frozen"):
        raise ValueError(f"second_moment must be 'adaptive' or 'frozen', got {second_moment!r}")
    if lr0 is not None and not callable(lr0):
        lr0 = as_float("lr0", lr0, positive=True)
    betas = _as_betas(betas)
    eps = as_float("eps", eps, nonnegative=True)
    F = adam_factor(betas[0])
    shares = data_shares(model, loss_fn, X, y, 4096)       # once for every warm-up and trial
    shape = (len(bs), len(seeds))
    per, lo, hi, first, lam, s2, pst, pms = (np.full(shape, np.nan) for _ in range(8))
    n_trials = 0
    jobs = [(i, j) for i in range(len(bs)) for j in range(len(seeds))]
    for i, j in progress_bar(jobs, progress=progress, total=len(jobs), desc="Adam threshold"):
        B, s = int(bs[i]), seeds[j]
        warm = warm_adam_state(model, loss_fn, X, y, B, warmup_steps=warmup_steps,
                               warmup_lr=warmup_lr, betas=betas, eps=eps, seed=s,
                               chunk_shares=shares)
        direction = None
        if warmup_steps > 0:
            opt = restored_adam(warm.model, warm, warmup_lr)
            pn = preconditioned_noise(warm.model, loss_fn, (X, y), opt, seed=seed)
            lam[i, j], s2[i, j] = pn.lam, pn.s2
            if pn.positive:     # else no limit of that state (NaN; the bisection starts at 1e-2)
                pst[i, j] = F / (pn.lam + batch_noise_factor(B, N) * pn.s2 / pn.lam)
                pms[i, j] = adam_ms_max_lr(B, pn.lam, pn.s2, N, betas[0])
            direction = pn.direction
        elif criterion == "onset":
            raise ValueError("criterion='onset' needs a warmed state (warmup_steps > 0)")
        a0 = as_float("lr0(B)", lr0(B), positive=True) if callable(lr0) else lr0
        if a0 is None:
            a0 = pst[i, j] if math.isfinite(pst[i, j]) else 1e-2
        trials = []

        def is_unstable(a):
            r = adam_trial(warm, loss_fn, X, y, a, steps=steps, criterion=criterion,
                           direction=direction, factor=factor,
                           growth_factor=growth_factor, second_moment=second_moment,
                           seed=s, chunk_shares=shares)
            trials.append(r)
            return r

        try:
            res = bisect_max_lr(is_unstable, float(a0), rel_tol=rel_tol)
        except Unbracketed:
            if unbracketed == "raise":
                raise
            n_trials += len(trials)             # the entry stays NaN
            continue
        per[i, j], lo[i, j], hi[i, j] = res.alpha, res.lo, res.hi
        bad = [r for r in trials if r.unstable]
        first[i, j] = np.mean([r.first_step_blowup for r in bad]) if bad else np.nan
        n_trials += res.n_trials
    mean, se = seed_mean_stderr(per)
    return AdamThresholds(bs, mean, se, per, lo, hi, first, lam, s2, pst, pms, criterion,
                          tuple(betas), float(eps), warmup_steps, warmup_lr, steps,
                          float(rel_tol), seeds, n_trials)
