"""Learning rates from one curvature/noise measurement pass (docs/theory.md §3, §5).

From a trained model and its data, ONE pass measures

* λ_1, u — top eigenpair of the full-data Hessian H (thick-restart Lanczos, `nets.algorithms.lanczos`);
* s_u² = (1/(N−1)) Σ_i ‖(H_i − H)u‖² — directional noise along u (per-sample HVPs,
  `nets.noise.directional`);
* Pσ² — isotropic noise (average per-sample entry variance of H_i times P, `nets.noise.directional`);
* ḡ, Σ_jj, tr Σ, tr(HΣ) — per-sample gradient statistics (`nets.noise.gradient_noise`);

and turns them into, for each batch size B (c = c(B, N) = 1/B − 1/N):

    SGD stability limit   α = F/λ'(B),  λ'(B) = λ_1 + c·s²/λ_1,  F = 2 for plain SGD
                          s² = s_u² (directional), or Pσ² (isotropic; clipped at the
                          semicircle edge 2√(cPσ²) below threshold, or unclipped)
    momentum              heavy ball ρ (torch SGD, dampening τ): the mean-square limit
                          α = 2(1+ρ)/((1−τ)·λ'_ρ(B)), λ'_ρ = λ_1 + (1+ρ)/(1−ρ)·c·s²/λ_1
                          (`rmt.lr.sgd_momentum_ms_max_lr`: momentum amplifies the
                          batch-noise term by (1+ρ)/(1−ρ)); Nesterov (nesterov=True):
                          F/λ'(B) with F = 2(1+ρ)/(1+2ρ) (Jury's criterion for
                          z² − (1+ρ)(1−h)z + ρ(1−h), h = αλ; no mean-square form derived)
    critical batch size   B* = s_u²/λ_1²  (α halves from its B = ∞ value at B ≈ B*)
    Adam, closed form     rmt.lr.adam_max_lr with the u²-weighted preconditioner inputs
                          ḡ_u² = Σ_j u_j² ḡ_j², Σ_u = Σ_j u_j² Σ_jj  (directional s_u²).
                          Which quantity: a scalar-preconditioner (one √v for all
                          coordinates, along the *unpreconditioned* top direction u) model
                          of the warmed-state curvature limit. It ignores how D rotates the
                          top direction, so on networks it can be several times too high
                          (5.7–9.8× on a digits MLP); it is NOT the fresh-state first-step
                          limit (≈ α·sign(g)). For real training use
                          `nets.learning_rates.adam` (D^{1/2}HD^{1/2} with the actual state,
                          `predict_adam_max_lr`, `adam_threshold`).
    Adam, measured        2(1+β₁)/(1−β₁) / E_S[λ_max(D^{1/2} H_B D^{1/2})],
                          D = diag(1/(√v + eps)), v_j = ḡ_j² + c·Σ_jj, averaged over the
                          same random batches S as the SGD measurement (a composed
                          operator, never a P×P matrix): the warmed-state (noise-model D)
                          curvature limit, the quantity `nets.learning_rates.adam` measures
    SGD, measured         F/E_S[λ_max(H_B)] (the naive batch-spectrum estimate;
                          `nets.noise.batch_spectra.measure_batch_top_eigenvalue`)
    McCandlish            B_simple = tr Σ/|ḡ|², B_noise = tr(HΣ)/ḡᵀHḡ and the greedy
                          optimum ε_opt(B) = ε_max/(1 + c·B_noise)
    min damping           δ_min(B) = α_dir(B)·λ_noise(B)/2 with the isotropic noise edge
                          λ_noise = 2√(c·Pσ²) (curvature of a direction with no signal)

The optimizer's hyper-parameters (ρ, τ, Nesterov; β₁, β₂, ε) are read by
`optimizer_settings` from a name, a `torch.optim.Optimizer` class (its defaults) or an
instance (its first param group). The loss must be mean-reduced; `lr_table` warns when
it looks summed (`nets.curvature.loss_check`).

Which "learning rate": every α above is a **stability limit** (largest step for which
the quadratic model of the batch loss does not diverge) except `greedy_optimal`
(McCandlish et al. 2018: the step maximising the expected one-step decrease). None of
them is the SDE-matching rule of Malladi et al. (2022), which prescribes how to *change*
Adam's hyper-parameters with B (`rmt.lr.malladi_adam_scaling`), not a limit.
"""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import torch
from scipy import stats

import rmt.lr as rlr
from nets.algorithms.lanczos import eigsh
from nets.curvature.loss_check import mean_reduction_check
from nets.curvature.operators import CurvatureOperator, curvature_operator
from nets.noise.batch_spectra import measure_batch_top_eigenvalue
from nets.noise.directional import (
    directional_noise_from_operator,
    isotropic_noise_from_operator,
)
from nets.noise.gradient_noise import gradient_noise
from nets.utils.autocast import outside_autocast
from nets.utils.callers import caller_stacklevel
from nets.utils.data_source import as_data_source
from nets.utils.jsonio import from_jsonable
from nets.utils.plotting import batch_size_axis, in_b_order
from nets.utils.progress import progress_bar, wants_progress
from nets.utils.results import Result, result
from nets.utils.seeding import resolved_seed
from rmt.sampling import batch_noise_factor
from rmt.validation import as_array, as_batch_sizes, as_float, as_int, as_unit_interval

__all__ = ["LRTable", "lr_table", "predict_max_lr", "OptimizerSettings", "optimizer_settings",
           "ScalingFit", "fit_scaling_exponent", "DiagonalScaledOperator"]


# ----------------------------------------------------------------- optimizer settings

#: optimizer names and the torch class whose defaults they take
_NAMED = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
          "rmsprop": torch.optim.RMSprop}


@result
class OptimizerSettings(Result):
    """The hyper-parameters the stability limits depend on (see `optimizer_settings`).

    name: the family, "sgd", "adam" (Adam, AdamW) or "rmsprop". SGD: momentum (heavy-ball
    ρ), dampening (τ), nesterov. Adam/RMSprop: beta1 (β₁; 0 for RMSprop), beta2 (β₂;
    RMSprop's alpha), eps. The fields of the other family hold torch's defaults
    (ρ = 0 for Adam; β = (0.9, 0.999), eps = 1e-8 for SGD): an `LRTable` fills both
    its SGD and its Adam columns from one settings object.
    """

    name: str
    momentum: float
    dampening: float
    nesterov: bool
    beta1: float
    beta2: float
    eps: float

    def __post_init__(self):
        if self.name not in ("sgd", "adam", "rmsprop"):
            raise ValueError("OptimizerSettings: name must be the family 'sgd', 'adam' "
                             f"(Adam, AdamW) or 'rmsprop', got {self.name!r}")

    @property
    def sgd_factor(self) -> float:
        """F in α_max = F/λ' for the SGD columns: 2(1+ρ)/(1−τ), or 2(1+ρ)/(1+2ρ) (Nesterov)."""
        if self.nesterov:
            return rlr.momentum_factor(self.momentum, "nesterov")
        return rlr.momentum_factor(self.momentum, "heavy_ball") / (1.0 - self.dampening)

    @property
    def adam_factor(self) -> float:
        """F = 2(1+β₁)/(1−β₁) for the Adam columns (EMA first moment)."""
        return rlr.momentum_factor(self.beta1, "ema")


def _class_defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty}


_KEYS = ("momentum", "dampening", "nesterov", "betas", "eps", "alpha", "centered",
         "maximize", "amsgrad", "decoupled_weight_decay")


def _group_settings(opt: torch.optim.Optimizer) -> dict:
    """Hyper-parameters of the first param group (all groups must agree on them; betas
    given as a list, as from a config file, read as the tuple; dampening, which torch
    ignores without momentum, only where the momentum is not 0)."""
    def read(g):
        out = {k: (tuple(g[k]) if isinstance(g[k], list) else g[k]) for k in _KEYS if k in g}
        if "dampening" in out and "momentum" in out and _same(out["momentum"], 0.0):
            out["dampening"] = 0.0
        return out

    groups = opt.param_groups
    first = read(groups[0])
    for g in groups[1:]:
        other = read(g)
        differ = sorted(k for k in set(first) | set(other)
                        if k not in first or k not in other or not _same(first[k], other[k]))
        if differ:
            said = ", ".join(f"{k} ({first.get(k)!r} and {other.get(k)!r})" for k in differ)
            raise ValueError(f"optimizer: param groups differ in {said}; "
                             "the stability limit needs one setting (build the optimizer with "
                             "one setting for every group; where settings are taken instead "
                             "of an optimizer, pass optimizer_settings for the group you want)")
    return first


def _source(optimizer) -> tuple[type, dict, bool]:
    """(torch class, hyper-parameters, fixed?) for a name, class, instance or settings."""
    if isinstance(optimizer, OptimizerSettings):
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam,
               "rmsprop": torch.optim.RMSprop}[optimizer.name]
        hp = dict(momentum=optimizer.momentum, dampening=optimizer.dampening,
                  nesterov=optimizer.nesterov, betas=(optimizer.beta1, optimizer.beta2),
                  eps=optimizer.eps, alpha=optimizer.beta2)
        if optimizer.name == "rmsprop":
            hp["momentum"] = 0.0
        return cls, hp, True
    if isinstance(optimizer, str):
        key = optimizer.lower()
        if key not in _NAMED:
            raise ValueError(f"optimizer must be one of {sorted(_NAMED)}, a torch.optim.Optimizer "
                             f"class or instance, got {optimizer!r}")
        return _NAMED[key], _class_defaults(_NAMED[key]), False
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer, _class_defaults(optimizer), False
    if isinstance(optimizer, torch.optim.Optimizer):
        hp = _group_settings(optimizer)     # weight decay may differ by group (biases, norms)
        hp["weight_decay"] = max_weight_decay(optimizer)
        return type(optimizer), hp, True
    raise TypeError(f"optimizer must be a name ({sorted(_NAMED)}), a torch.optim.Optimizer "
                    f"class or instance, got {type(optimizer).__name__}")


def _family(cls) -> str:
    if issubclass(cls, torch.optim.SGD):
        return "sgd"
    if issubclass(cls, torch.optim.Adam):
        return "adam"
    if issubclass(cls, torch.optim.RMSprop):
        return "rmsprop"
    raise ValueError(f"optimizer: no stability limit for {cls.__name__}; supported: SGD (heavy "
                     "ball, Nesterov), Adam/AdamW, RMSprop")


def max_weight_decay(optimizer: torch.optim.Optimizer) -> float:
    """The largest `weight_decay` over the optimizer's parameter groups (0 if none)."""
    return max(float(g.get("weight_decay") or 0.0) for g in optimizer.param_groups)


def warn_partial_optimizer(model, optimizer, params=None, *, group_lrs=True) -> None:
    """Warn when a torch optimizer instance updates only some of the model's trainable
    parameters while no `params=` selection says which: the limits would then be those of
    every parameter (curvature, thresholds), not of the ones it trains. With `group_lrs`,
    also when its parameter groups train at different learning rates: every limit and
    transfer here is one learning rate applied to all parameters."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return
    lrs = sorted({float(g["lr"]) for g in optimizer.param_groups if "lr" in g})
    if group_lrs and len(lrs) > 1:
        warnings.warn(f"optimizer: its parameter groups train at different learning rates "
                      f"({', '.join(f'{v:g}' for v in lrs)}); the limits and transfers here are "
                      "for one learning rate applied to every parameter (a per-group lr "
                      "rescales that group's curvature, which is not modelled)",
                      UserWarning, stacklevel=caller_stacklevel())
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    free = [p for p in model.parameters() if p.requires_grad]
    missing = sum(p.numel() for p in free if id(p) not in trained)
    if trained and free and not trained & {id(p) for p in free}:
        # (whatever params= selects: an optimizer of another model trains none of them)
        warnings.warn("optimizer: it updates none of the model's trainable parameters — is it "
                      "another model's optimizer (or one built before the model was copied)? "
                      "Its settings are read, but it does not train this model",
                      UserWarning, stacklevel=caller_stacklevel())
    elif params is None and missing and len(trained & {id(p) for p in free}):
        total = sum(p.numel() for p in free)
        warnings.warn(f"optimizer: it updates only {total - missing} of the model's {total} "
                      "trainable parameters, but the limits here are for all of them; freeze "
                      "the others (requires_grad=False) or pass params= (the curvature forms)",
                      UserWarning, stacklevel=caller_stacklevel())


def _check_unmodelled(hp: dict, cls, *, amsgrad_state=False) -> None:
    """Settings of an optimizer that no limit here models: maximize (refused: the limits are
    for minimisation), weight decay and AMSGrad (warned: the limits are those without;
    `amsgrad_state`: the Adam state is read, whose max_exp_avg_sq models it — no warning)."""
    if hp.get("maximize"):
        raise ValueError(f"optimizer: {cls.__name__}(maximize=True) is not supported; the "
                         "stability limits are for minimising the loss")
    wd = float(hp.get("weight_decay") or 0.0)
    decoupled = issubclass(cls, torch.optim.AdamW) or bool(hp.get("decoupled_weight_decay"))
    if wd > 0 and not decoupled:        # AdamW's decay only contracts the weights
        adaptive = issubclass(cls, (torch.optim.Adam, torch.optim.RMSprop))
        bound = ("(λ̃ + weight_decay·max_i D_i)/λ̃, D = 1/(√v̂ + ε) the preconditioner and λ̃ the "
                 "preconditioned sharpness" if adaptive else "(λ₁ + weight_decay)/λ₁")
        # the factor is the top curvature's rise (Weyl); the noise term of a mean-square
        # limit is read along the top direction, which the decay can turn (RMSprop on a
        # small MLP: 1.077 against (λ₁ + wd)/λ₁ = 1.066), so it is not a strict bound
        warnings.warn(f"optimizer: weight_decay={wd:g} is not modelled; the limits are those of "
                      "the loss without it (coupled L2 decay adds it to every curvature, so "
                      f"they are too high, by about the factor {bound} — the top curvature's "
                      "rise)", UserWarning, stacklevel=caller_stacklevel())
    if hp.get("amsgrad") and not amsgrad_state:
        warnings.warn("optimizer: amsgrad=True is not modelled; the Adam limits use a "
                      "second moment without a running maximum (the noise model from the "
                      "per-sample gradients at the current weights, or a warmed Adam state)",
                      UserWarning, stacklevel=caller_stacklevel())


def _override(hp: dict, key: str, value, fixed: bool, what: str) -> None:
    if value is None:
        return
    if fixed and key in hp and _same(hp[key], value) is False:
        raise ValueError(f"{key}={value!r} conflicts with the {what}'s own {key}={hp[key]!r}; "
                         f"give {key} once")
    hp[key] = value


def _same(a, b) -> bool:
    try:
        return bool(np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float),
                                rtol=0, atol=0))
    except (TypeError, ValueError):
        return a == b


def _unit_interval(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)):          # float(True) read momentum=True as 1.0
        raise TypeError(f"{name} must be a real number in [0, 1), got bool {value}")
    return as_unit_interval(name, value)                # a string "0.9" is not a number


def optimizer_settings(optimizer="sgd", *, momentum=None, betas=None, eps=None,
                       nesterov=None) -> OptimizerSettings:
    """The hyper-parameters that set the stability limit, from a name or a torch optimizer.

    optimizer : "sgd", "adam", "adamw" or "rmsprop" (torch's defaults for that class), a
        `torch.optim.Optimizer` subclass (its constructor defaults, read with
        `inspect.signature`), an instance (its `param_groups[0]`; all groups must agree)
        or an `OptimizerSettings`.
    momentum : SGD's heavy-ball ρ only (torch SGD `momentum`). Adam has no "momentum":
        its first-moment factor β₁ is `betas[0]`, so momentum= with an Adam optimizer is
        a ValueError (one argument, one meaning).
    betas : Adam's (β₁, β₂); eps : Adam's/RMSprop's ε. Not for SGD (ValueError).
    nesterov : SGD's Nesterov flag (None: the optimizer's; a bool otherwise). Not for
        Adam/RMSprop (ValueError).
    An override of a value that an instance (or settings object) already fixes must
    agree with it. RMSprop is supported without momentum and uncentred (β₁ = 0,
    β₂ = alpha). Nesterov momentum and SGD dampening change the stability factor
    (`OptimizerSettings.sgd_factor`).
    """
    cls, hp, fixed = _source(optimizer)
    family = _family(cls)
    _check_unmodelled(hp, cls)
    what = "optimizer"
    if momentum is not None and family != "sgd":
        hint = (" (Adam's β₁ is betas[0]: pass betas=(β₁, β₂))" if family == "adam"
                else " (RMSprop is supported without momentum)")
        raise ValueError(f"momentum is SGD's heavy-ball ρ and does not apply to {cls.__name__}{hint}")
    if betas is not None and family != "adam":
        raise ValueError(f"betas are Adam's (β₁, β₂) and do not apply to {cls.__name__}")
    if eps is not None and family == "sgd":
        raise ValueError(f"eps is Adam's/RMSprop's ε and does not apply to {cls.__name__}")
    if nesterov is not None:
        if family != "sgd":
            raise ValueError(f"nesterov is SGD's flag and does not apply to {cls.__name__}")
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be a bool or None, got {type(nesterov).__name__}")
        nesterov = bool(nesterov)
    _override(hp, "momentum", momentum, fixed, what)
    _override(hp, "betas", None if betas is None else tuple(betas), fixed, what)
    _override(hp, "eps", eps, fixed, what)
    _override(hp, "nesterov", nesterov, fixed, what)
    adam = _class_defaults(torch.optim.Adam)
    if family == "sgd":
        rho = _unit_interval("momentum", hp.get("momentum", 0.0))
        tau = _unit_interval("dampening", hp.get("dampening", 0.0))
        if rho == 0:
            tau = 0.0          # torch applies dampening inside the momentum buffer only
        nesterov = bool(hp.get("nesterov", False))
        if nesterov and (rho <= 0 or tau != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0")
        b1, b2 = adam["betas"]
        return OptimizerSettings("sgd", rho, tau, nesterov, float(b1), float(b2), float(adam["eps"]))
    if family == "adam":
        b = hp.get("betas", adam["betas"])
        if len(tuple(b)) != 2:
            raise ValueError(f"betas must be a pair (β₁, β₂), got {b!r}")
        b1, b2 = (_unit_interval(f"betas[{i}]", x) for i, x in enumerate(b))
        e = as_float("eps", hp.get("eps", adam["eps"]), nonnegative=True)
        return OptimizerSettings("adam", 0.0, 0.0, False, b1, b2, e)
    if float(hp.get("momentum", 0.0)) != 0.0:
        raise ValueError("momentum: RMSprop is supported without momentum (momentum=0), got "
                         f"momentum={hp['momentum']}")
    if bool(hp.get("centered", False)):
        raise ValueError("optimizer: a centred RMSprop (centered=True) is not supported; "
                         "build it with centered=False")
    b2 = _unit_interval("alpha", hp.get("alpha", 0.99))
    e = as_float("eps", hp.get("eps", 1e-8), nonnegative=True)
    return OptimizerSettings("rmsprop", 0.0, 0.0, False, 0.0, b2, e)


def adam_state_settings(model, optimizer, params=None) -> OptimizerSettings:
    """The settings of a torch Adam/AdamW whose *state* is read as the preconditioner
    D = 1/(√v̂ + ε) (`nets.learning_rates.adam`), through the checks of `optimizer_settings`
    and `warn_partial_optimizer`: parameter groups that differ in betas, eps, amsgrad or
    maximize and maximize=True are refused; coupled weight decay, per-group learning rates
    and parameters it does not update are warned about. amsgrad=True is not warned about:
    the preconditioner is then read from max_exp_avg_sq, the second moment torch divides by."""
    if not isinstance(optimizer, torch.optim.Adam):
        raise TypeError(f"optimizer must be a torch.optim.Adam or AdamW, got "
                        f"{type(optimizer).__name__}")
    cls, hp, _ = _source(optimizer)
    _check_unmodelled(hp, cls, amsgrad_state=True)
    warn_partial_optimizer(model, optimizer, params)
    b1, b2 = (float(b) for b in hp["betas"])
    return optimizer_settings(OptimizerSettings("adam", 0.0, 0.0, False, b1, b2,
                                                float(hp["eps"])))


# ----------------------------------------------------------------- operators

class DiagonalScaledOperator(CurvatureOperator):
    """D^{1/2} A D^{1/2} for a diagonal D = diag(d) ≥ 0 and a curvature operator A; `name`
    is d's name in error messages (the caller's argument, e.g. "preconditioner")."""

    def __init__(self, base: CurvatureOperator, diag, *, name: str = "diag"):
        d = torch.as_tensor(diag, dtype=base.dtype, device=base.device)
        if d.ndim != 1 or d.shape[0] != base.P:
            raise ValueError(f"{name} must have shape ({base.P},), got {tuple(d.shape)}")
        if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
            raise ValueError(f"{name} must be finite and non-negative (a diagonal "
                             "preconditioner D, e.g. 1/(√v̂ + ε))")
        super().__init__(base.P, base.dtype, base.device, base.param_names)
        self.base = base
        self.sqrt_d = torch.sqrt(d)

    def _matmat(self, V):
        s = self.sqrt_d[:, None]
        return s * self.base.matmat(s * V)

    def _matvec(self, v):
        return self.sqrt_d * self.base.matvec(self.sqrt_d * v)


def _isotropic_s2(op, num_probes, *, chunk_size, seed, progress, micro_batch=1):
    """Pσ² (module docstring of `nets.noise.directional`): Rademacher estimate with
    `num_probes` directions, or exact (num_probes=None) as the mean of s²_{e_j} over the
    P unit vectors (P passes: small models only)."""
    if num_probes is not None:
        return isotropic_noise_from_operator(op, num_probes=num_probes, chunk_size=chunk_size,
                                             seed=seed, progress=progress,
                                             micro_batch=micro_batch).s2
    eye = torch.eye(op.P, dtype=torch.float64)
    bar = progress_bar(eye, progress=progress, total=op.P, desc="exact Pσ²")
    return float(np.mean([directional_noise_from_operator(op, e, chunk_size=chunk_size).s2
                          for e in bar]))


# ----------------------------------------------------------------- the table

_SCALARS = ("N", "P", "lam", "s2_dir", "s2_iso", "B_star", "B_star_iso", "B_simple",
            "B_noise", "B_noise_stderr", "eps_max", "momentum", "beta1", "eps", "grad_mean_sq_u", "grad_var_u")
_COLUMNS = ("sgd_iso_clipped", "sgd_iso_unclipped", "sgd_directional", "sgd_momentum",
            "sgd_measured", "lam_batch_mean", "lam_batch_std", "adam_closed", "adam_measured",
            "adam_lam_mean", "adam_lam_std", "greedy_optimal", "min_damping")
#: the learning-rate columns `LRTable.plot` draws, with their labels
_LR_COLUMNS = {"sgd_directional": "SGD, directional",
               "sgd_momentum": "SGD with momentum (mean-square limit)",
               "sgd_iso_clipped": "SGD, isotropic (clipped)",
               "sgd_measured": "fixed-batch limit F/E λ_max(H_B) (no momentum noise gain)",
               "adam_closed": "Adam, closed form",
               "adam_measured": "Adam, from measured batch curvature",
               "greedy_optimal": "greedy optimum (McCandlish)"}


@result
class LRTable(Result):
    """Predicted (and batch-measured) learning rates per batch size; see module docstring.

    Scalars: N, P, lam (λ_1), s2_dir (s_u²), s2_iso (Pσ²), B_star (s_u²/λ_1²), B_star_iso
    (Pσ²/λ_1²), B_simple, B_noise (± B_noise_stderr), eps_max, the optimizer settings — optimizer (family
    name), momentum (heavy-ball ρ), dampening, nesterov, beta1, beta2, eps — and
    grad_mean_sq_u, grad_var_u (u²-weighted ḡ_j², Σ_jj), n_batches, seed.
    Arrays over batch_sizes: sgd_iso_clipped, sgd_iso_unclipped, sgd_directional
    (plain SGD), sgd_momentum (heavy ball ρ, dampening τ: the mean-square limit
    2(1+ρ)/((1−τ)·λ'_ρ(B)), λ'_ρ = λ_1 + (1+ρ)/(1−ρ)·c·s_u²/λ_1,
    `rmt.lr.sgd_momentum_ms_max_lr`; Nesterov: its mean-square limit
    `rmt.lr.sgd_nesterov_ms_max_lr`),
    sgd_measured (F/E λ_max(H_B), F = `OptimizerSettings.sgd_factor`; NaN if not
    measured or where E λ_max(H_B) ≤ 0: the fixed-batch limit — the momentum factor applied to the measured mean
    batch sharpness, with no (1+ρ)/(1−ρ) gain on the batch noise — so with momentum it is
    NOT the momentum limit `sgd_momentum` and can lie far above it at small B: ρ = 0.9,
    τ = 0.5, N = 150 gave 14× at B = 2; without momentum the two agree up to the
    measurement), lam_batch_mean/std,
    adam_closed, adam_measured (F/E λ_max(D^{1/2}H_BD^{1/2})), adam_lam_mean/std — the
    "measured" columns are limits from measured batch curvature, not measured training
    thresholds (those: `nets.lr_search.training_threshold`, `adam_threshold`),
    greedy_optimal, min_damping. batch_indices: one (n_batches, B) array of sample
    indices per batch size, the batches both measurements used (empty if not measured).
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
    seed: object
    optimizer: str = "sgd"
    dampening: float = 0.0
    nesterov: bool = False
    beta2: float = 0.999
    batch_indices: tuple = ()
    B_noise_stderr: float = float("nan")

    @classmethod
    def from_dict(cls, d: dict) -> "LRTable":
        """The table back from `to_dict()` (or its JSON): lists become numpy arrays and
        "nan"/"inf" strings floats."""
        d = from_jsonable(dict(d))
        kw = dict(d)
        kw["batch_sizes"] = np.asarray(d["batch_sizes"], dtype=np.int64)
        for k in _COLUMNS:
            kw[k] = np.asarray(d[k], dtype=float)
        for k in _SCALARS[2:] + ("dampening", "beta2"):
            kw[k] = float(d.get(k, math.nan) if k == "B_noise_stderr" else d[k])  # older JSON
        kw["batch_indices"] = tuple(np.asarray(i, dtype=np.int64).reshape(-1, int(b))
                                    for i, b in zip(d.get("batch_indices", ()), d["batch_sizes"]))
        return cls(**kw)

    def plot(self, ax=None):
        """The learning-rate columns against B on log-log axes (columns that are all NaN
        are left out; measured ones as markers). Returns the axes."""
        if ax is None:
            import matplotlib.pyplot as plt
            ax = plt.gca()
        for key, label in _LR_COLUMNS.items():
            B, y, directional = in_b_order(self.batch_sizes, getattr(self, key),
                                           self.sgd_directional)
            if key == "sgd_momentum" and np.allclose(y, directional, equal_nan=True):
                continue
            if not np.any(np.isfinite(y) & (y > 0)):
                continue
            style = "o" if key.endswith("measured") else "-"
            ax.plot(B, y, style, label=label)
        batch_size_axis(ax)
        ax.set_yscale("log")
        ax.set_ylabel("learning rate α")
        ax.set_title(f"stability limits ({self.optimizer}; B* = {self.B_star:.3g})")
        ax.legend(fontsize="small")
        return ax


#: lr_table's default Lanczos tolerance, the one predict_max_lr uses
LANCZOS_TOL = 1e-8


def _checked_call(model, loss_fn, data, batch_sizes, *, seed, progress, params, policy, device,
                  dtype):
    """The data source, batch sizes, resolved seed and operator options of an lr_table /
    predict_max_lr call, after the checks both make (progress's type, the loss's reduction)."""
    src = as_data_source(data)
    bs = as_batch_sizes(batch_sizes, src.N)
    seed = resolved_seed("seed", seed)
    wants_progress(progress)
    mean_reduction_check(model, loss_fn, src)
    return src, bs, seed, dict(params=params, policy=policy, device=device, dtype=dtype)


def _directional_pass(model, loss_fn, src, *, tol, opts, chunk_size, seed, progress,
                      micro_batch):
    """H, λ_1, u and s_u²: everything the SGD limits need."""
    H = curvature_operator(model, loss_fn, src, chunk_size=chunk_size, **opts)
    top = eigsh(H, k=1, which="LA", tol=tol, seed=seed, progress=progress)
    lam = float(top.values[0])
    if not lam > 0 or top.is_zero(0):
        raise ValueError(f"the top Hessian eigenvalue is not positive ({lam:.3g}, zero to "
                         f"precision below {top.zero_tol:.2g}); no stability limit")
    u = top.vectors[:, 0]
    s2_dir = directional_noise_from_operator(H, u, chunk_size=chunk_size, progress=progress,
                                             micro_batch=micro_batch, seed=seed).s2
    return H, lam, u, s2_dir


def _noise_pass(model, loss_fn, src, *, num_probes, hessian_samples, mccandlish, tol, opts,
                chunk_size, seed, progress, micro_batch):
    """The table's measurement pass: `_directional_pass`, Pσ² and the gradient statistics
    (per-sample gradients, chunked within the memory budget unless chunk_size is given)."""
    H, lam, u, s2_dir = _directional_pass(model, loss_fn, src, tol=tol, opts=opts,
                                          chunk_size=chunk_size, seed=seed, progress=progress,
                                          micro_batch=micro_batch)
    s2_iso = _isotropic_s2(H, num_probes, chunk_size=chunk_size, seed=seed, progress=progress,
                           micro_batch=micro_batch)
    gn = gradient_noise(model, loss_fn, src, hessian_samples=hessian_samples, hessian=mccandlish,
                        chunk_size=chunk_size, seed=seed, progress=progress, **opts)
    return H, lam, u, s2_dir, s2_iso, gn


def _limit(factor, mean_top) -> np.ndarray:
    """F / E λ_max(H_B) where the mean batch top eigenvalue is positive, NaN elsewhere: a
    batch Hessian with no positive curvature has no such limit (a one-parameter tanh net at
    B = 1 had E λ_max = −0.72, and the columns read −2.78 and −34.5 as "maximal learning
    rates"; an outside sweep)."""
    top = np.asarray(mean_top, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(top > 0, factor / top, np.nan)


def _sgd_limit(opt, Bf, lam, s2_dir, N) -> np.ndarray:
    """The SGD column `predict_max_lr` returns: heavy ball's mean-square limit (dampening
    τ: step α(1−τ)), or Nesterov's (`rmt.symbolic.derive_nesterov_mean_square`)."""
    if opt.nesterov:
        return np.asarray(rlr.sgd_nesterov_ms_max_lr(Bf, lam, s2_dir, N, opt.momentum))
    return (np.asarray(rlr.sgd_momentum_ms_max_lr(Bf, lam, s2_dir, N, opt.momentum))
            / (1.0 - opt.dampening))


def _adam_batch_tops(model, loss_fn, src, bs, indices, gbar2, var, eps, *, tol, opts,
                     chunk_size, seed, progress):
    """λ_max(D^{1/2} H_S D^{1/2}) on the given batches S, D = diag(1/(√(ḡ² + c·Σ) + eps))."""
    N = src.N
    total = sum(len(i) for i in indices)
    seeds = iter(np.random.default_rng(seed).integers(2**31, size=total))
    bar = progress_bar(range(total), progress=progress, total=total, desc="Adam batch λ_max")
    it = iter(bar)
    means, stds = np.empty(len(bs)), np.empty(len(bs))
    for i, (b, idx_B) in enumerate(zip(bs, indices)):
        c = batch_noise_factor(int(b), N)
        Dg = 1.0 / (torch.sqrt(gbar2 + c * var) + eps)
        tops = []
        for idx in idx_B:
            next(it, None)
            HB = curvature_operator(model, loss_fn, src.take(np.asarray(idx)),
                                    chunk_size=chunk_size, **opts)
            tops.append(float(eigsh(DiagonalScaledOperator(HB, Dg), k=1, which="LA", tol=tol,
                                    seed=int(next(seeds)), return_vectors=False,
                                    progress=False).values[0]))   # under the batches' bar
        means[i] = np.mean(tops)
        stds[i] = np.std(tops, ddof=1) if len(tops) > 1 else 0.0
    next(it, None)
    return means, stds


@outside_autocast
def lr_table(model, loss_fn, data, batch_sizes, *, optimizer="sgd", momentum=None, betas=None,
             eps=None, nesterov=None, n_batches=4, measure=True, num_probes=4, hessian_samples=32,
             mccandlish=True, tol=LANCZOS_TOL, micro_batch="auto", params=None, policy=None,
             chunk_size=None, device=None, dtype=None, seed=0, progress=None) -> LRTable:
    """Predicted learning rates for every B in `batch_sizes` from one measurement pass.

    data : an (X, y) pair, a torch Dataset or a non-shuffling DataLoader / re-iterable of
        (x, y) batches (`nets.utils.data_source`); `loss_fn` mean-reduced (a summed loss
        triggers a UserWarning, `nets.curvature.loss_check.check_mean_reduced`).
    optimizer, momentum, betas, eps, nesterov : see `optimizer_settings`. The SGD columns use its
        momentum factor, the Adam columns its β₁ and ε (torch's Adam defaults for an SGD
        optimizer; ρ = 0 for an Adam one).
    measure : also measure λ_max(H_B) with `measure_batch_top_eigenvalue(...,
        n_batches=n_batches, seed=seed)` (same seed, same batches, same values as calling
        it directly) and λ_max(D^{1/2}H_BD^{1/2}) on those same batches.
    num_probes : Hutchinson probes for Pσ² (None: exact, P passes). hessian_samples :
        importance-sampled draws for tr(HΣ), one full-data Hessian product each (None:
        all samples, exact; `nets.noise.gradient_noise`; B_noise_stderr says how well);
        mccandlish=False skips tr(HΣ) and ḡᵀHḡ (B_noise, eps_max, greedy_optimal NaN).
        tol : Lanczos relative residual.
    micro_batch : group size of the noise passes for s_u² and Pσ², an int m ≥ 1 or "auto"
        (per-sample while N·P ≤ 2²⁷, else m = ⌊N/256⌋; `nets.noise.directional`).
    params, policy, chunk_size, device, dtype : as `nets.curvature.operators.hessian_operator`
        (dtype None: the model's). seed : int, numpy Generator or None (fresh entropy:
        the int drawn is recorded). progress : forwarded to every long inner call
        (True/False/None).
    """
    opt = optimizer_settings(optimizer, momentum=momentum, betas=betas, eps=eps,
                             nesterov=nesterov)
    warn_partial_optimizer(model, optimizer, params)
    n_batches = as_int("n_batches", n_batches, minimum=1)
    if not isinstance(measure, bool) or not isinstance(mccandlish, bool):
        raise TypeError("measure and mccandlish must be bools")
    num_probes = None if num_probes is None else as_int("num_probes", num_probes, minimum=1)
    tol = as_float("tol", tol, positive=True)
    src, bs, seed, opts = _checked_call(model, loss_fn, data, batch_sizes, seed=seed,
                                        progress=progress, params=params, policy=policy,
                                        device=device, dtype=dtype)
    N = src.N
    H, lam, u, s2_dir, s2_iso, gn = _noise_pass(
        model, loss_fn, src, num_probes=num_probes, hessian_samples=hessian_samples,
        mccandlish=mccandlish, tol=tol, opts=opts, chunk_size=chunk_size, seed=seed,
        progress=progress, micro_batch=micro_batch)
    P = H.P
    Bf = bs.astype(float)
    u2 = (u.to(torch.float64) ** 2).cpu().numpy()
    g2u = float(u2 @ gn.mean ** 2)
    vu = float(u2 @ gn.var)
    c = np.array([batch_noise_factor(b, N) for b in bs])
    iso_c = rlr.sgd_max_lr_isotropic(Bf, lam, s2_iso / P, P, N, clip=True)
    iso_u = rlr.sgd_max_lr_isotropic(Bf, lam, s2_iso / P, P, N, clip=False)
    sgd_dir = np.asarray(rlr.sgd_max_lr(Bf, lam, s2_dir, N))
    sgd_mom = _sgd_limit(opt, Bf, lam, s2_dir, N)
    adam_closed = rlr.adam_max_lr(Bf, lam, s2_dir, g2u, vu, N, eps=opt.eps, beta1=opt.beta1)
    greedy = (rlr.mccandlish_optimal_lr(Bf, gn.eps_max, gn.B_noise, N)
              if math.isfinite(gn.eps_max) and gn.eps_max > 0 and math.isfinite(gn.B_noise)
              else np.full(len(bs), np.nan))
    damping = sgd_dir * np.sqrt(c * s2_iso)          # α_dir · λ_noise/2, λ_noise = 2√(c Pσ²)

    nan = np.full(len(bs), np.nan)
    lam_m, lam_s, alam_m, alam_s, indices = nan, nan, nan, nan, ()
    if measure:
        mb = measure_batch_top_eigenvalue(model, loss_fn, data, bs, n_batches=n_batches,
                                          kind="hessian", tol=tol, chunk_size=chunk_size,
                                          seed=seed, progress=progress, **opts)
        lam_m, lam_s = np.asarray(mb["mean"], dtype=float), np.asarray(mb["std"], dtype=float)
        indices = tuple(np.asarray(i, dtype=np.int64) for i in mb["indices"])
        gbar2 = torch.as_tensor(gn.mean ** 2, dtype=torch.float64)
        var = torch.as_tensor(gn.var, dtype=torch.float64)
        alam_m, alam_s = _adam_batch_tops(model, loss_fn, src, bs, indices, gbar2, var, opt.eps,
                                          tol=tol, opts=opts, chunk_size=chunk_size, seed=seed,
                                          progress=progress)
    return LRTable(
        batch_sizes=bs, N=N, P=P, lam=lam, s2_dir=s2_dir, s2_iso=s2_iso,
        B_star=rlr.critical_batch_size(lam, s2_dir), B_star_iso=rlr.critical_batch_size(lam, s2_iso),
        B_simple=gn.B_simple, B_noise=gn.B_noise, B_noise_stderr=gn.B_noise_stderr,
        eps_max=gn.eps_max, momentum=opt.momentum,
        beta1=opt.beta1, eps=opt.eps, grad_mean_sq_u=g2u, grad_var_u=vu,
        sgd_iso_clipped=np.asarray(iso_c), sgd_iso_unclipped=np.asarray(iso_u),
        sgd_directional=sgd_dir, sgd_momentum=sgd_mom,
        sgd_measured=_limit(opt.sgd_factor, lam_m), lam_batch_mean=lam_m, lam_batch_std=lam_s,
        adam_closed=np.asarray(adam_closed), adam_measured=_limit(opt.adam_factor, alam_m),
        adam_lam_mean=alam_m, adam_lam_std=alam_s, greedy_optimal=np.asarray(greedy),
        min_damping=np.asarray(damping), n_batches=n_batches, seed=seed,
        optimizer=opt.name, dampening=opt.dampening, nesterov=opt.nesterov, beta2=opt.beta2,
        batch_indices=indices)


@outside_autocast
def predict_max_lr(model, loss_fn, data, batch_sizes, *, optimizer="sgd", momentum=None,
                   nesterov=None, num_probes=None, micro_batch="auto", params=None,
                   policy=None, chunk_size=None, device=None, dtype=None, seed=0,
                   progress=None) -> np.ndarray:
    """Predicted maximal stable learning rate per batch size (directional, mean-square).

    optimizer SGD (name, class or instance): plain SGD 2/λ'(B), λ'(B) = λ_1 +
    c(B,N)·s_u²/λ_1 (`rmt.lr.sgd_max_lr`); heavy-ball momentum ρ (`momentum`, or the
    instance's; dampening τ) the mean-square limit 2(1+ρ)/((1−τ)·λ'_ρ(B)),
    λ'_ρ = λ_1 + (1+ρ)/(1−ρ)·c·s_u²/λ_1 (`rmt.lr.sgd_momentum_ms_max_lr`; this is
    `LRTable.sgd_momentum`); Nesterov (`nesterov=True`, or an instance's): its mean-square limit
    `rmt.lr.sgd_nesterov_ms_max_lr` (2(1+ρ)/((1+2ρ)λ_1) without noise, the same
    2(1−ρ)λ_1/(c·s_u²) as heavy ball when the noise dominates).
    Adam/AdamW/RMSprop: the mean-square limit of the preconditioned iteration
    (`nets.learning_rates.adam.predict_adam_max_lr`, form "mean_square"):
    F/(λ̃ + (1+β₁)/(1−β₁)·c·s̃²/λ̃), F = 2(1+β₁)/(1−β₁), λ̃ and s̃² of D(B)^{1/2}HD(B)^{1/2}
    with the noise-model state D(B) = 1/(√(ḡ² + c(B,N)Σ_jj) + ε) a warmup at batch size B
    reaches; β₁ = betas[0] and ε from the optimizer (torch's defaults for "adam"; β₁ = 0
    for RMSprop); passing `momentum` with Adam is a ValueError (see `optimizer_settings`).
    It costs one Lanczos run and one per-sample pass per batch size. The scalar closed
    form `LRTable.adam_closed` is not used: it ignores how D rotates the top direction
    (5.7–9.8× too high on the digits MLP).
    A **stability limit** of the local model, not a greedy optimum or SDE-matching rule:
    real networks sit above it by a factor (1.1–2.6 for SGD, 1.8–4 for Adam on the digits
    nets, docs/real_training.md), which `transfer_lr` / `adam_transfer_lr` carry from a measured anchor.
    Other options as `lr_table`; the result is its `sgd_momentum` column (same seed, same
    numbers), from λ_1 and s_u² only — none of the table's other measurements
    (`num_probes` is not used: given, it is warned about). Returns a numpy array aligned
    with `batch_sizes`.
    """
    opt = optimizer_settings(optimizer, momentum=momentum, nesterov=nesterov)
    warn_partial_optimizer(model, optimizer, params)
    if num_probes is not None:
        warnings.warn("predict_max_lr: num_probes is not used (the limits need the top "
                      "curvature and its noise only; the isotropic probes are lr_table's) and "
                      "is ignored", UserWarning, stacklevel=caller_stacklevel())
    if opt.name != "sgd":
        from nets.learning_rates.adam import predict_adam_max_lr

        if not (isinstance(micro_batch, str) and micro_batch == "auto"):
            warnings.warn(f"predict_max_lr: micro_batch is not used by the {opt.name} limit "
                          "(its per-sample passes take every sample, chunked by chunk_size) "
                          "and is ignored", UserWarning,
                          stacklevel=caller_stacklevel())

        src = as_data_source(data)
        bs = as_batch_sizes(batch_sizes, src.N)
        pred = predict_adam_max_lr(model, loss_fn, src, bs, betas=(opt.beta1, opt.beta2),
                                   eps=opt.eps, form="mean_square", params=params,
                                   policy=policy, chunk_size=chunk_size,
                                   device=device, dtype=dtype,
                                   seed=seed, progress=progress)
        return np.asarray(pred.lr, dtype=float).copy()
    # lr_table's checks and its λ₁, s_u² pass — not its isotropic probes and per-sample
    # gradients, which the limit does not read (on a 670k-parameter MLP they made the call
    # 5.8× slower and took 4.4 GiB where it needs 0.70)
    src, bs, seed, opts = _checked_call(model, loss_fn, data, batch_sizes, seed=seed,
                                        progress=progress, params=params, policy=policy,
                                        device=device, dtype=dtype)
    _, lam, _, s2_dir = _directional_pass(model, loss_fn, src, tol=LANCZOS_TOL, opts=opts,
                                          chunk_size=chunk_size, seed=seed, progress=progress,
                                          micro_batch=micro_batch)
    return _sgd_limit(opt, bs.astype(float), lam, s2_dir, src.N)


# ----------------------------------------------------------------- scaling exponents

@result
class ScalingFit(Result):
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
    points the slope is returned with an infinite interval. batch_sizes must be > 0 and
    level in (0, 1) (ValueError otherwise).
    """
    bs = as_array("batch_sizes", batch_sizes, ndim=1)
    if np.any(bs <= 0):
        raise ValueError(f"batch_sizes must be > 0 (log B is fitted), got {bs.tolist()}")
    level = as_float("level", level, positive=True)
    if not level < 1:
        raise ValueError(f"level must be a confidence level in (0, 1), got {level}")
    a = np.asarray(lrs, dtype=float)
    if a.shape[0] != bs.shape[0]:
        raise ValueError(f"lrs must have {bs.shape[0]} rows (one per batch size), got {a.shape[0]}")
    if a.ndim == 1:
        a = a[:, None]
    x = np.repeat(bs, a.shape[1]).astype(float)
    yv = a.reshape(-1)
    if np.any(np.isinf(yv)) or np.any(np.isfinite(yv) & (yv <= 0)):
        raise ValueError("lrs must be finite and > 0 (NaN marks a missing measurement and is "
                         "dropped)")
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
