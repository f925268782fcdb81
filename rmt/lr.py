"""Learning rates as a function of batch size (docs/theory.md §5).

Three different things are called "the learning rate" in this literature; every function
here says which one it returns:

* **stability limit** (ours, Granziol et al. 2022): the largest step for which the
  quadratic model of the *batch* loss does not diverge, ``α·λ'(B) < 2·(momentum factor)``
  with ``λ'(B)`` the top eigenvalue of the batch Hessian;
* **greedy optimal** (McCandlish et al. 2018): the step that maximises the expected
  one-step decrease of the loss, ``ε_opt(B) = ε_max/(1 + B_noise/B)``;
* **SDE matching** (Malladi et al. 2022): hyper-parameters that keep the stochastic
  differential equation of Adam/RMSprop unchanged when the batch grows ``B → κB``.

Batch curvature model (docs/theory.md §2-§3): with ``c = c(B, N) = 1/B − 1/N``
(:func:`rmt.sampling.batch_noise_factor`; ``1/B`` with replacement or ``N = None``)

    λ'(B) = λ + c(B, N)·s²/λ,

``s² = P·σ²`` for isotropic (Wigner) noise, ``s² = s_u²`` (the per-sample variance of the
Hessian-vector product along the top eigenvector ``u``) for the directional form. The
isotropic *clipped* model replaces λ' by the semicircle edge ``2√v`` (``v = c·P·σ²``)
below the threshold ``λ ≤ √v`` (:func:`isotropic_batch_curvature`).

Batch sizes ``B`` may be scalars (the result is a ``float``) or array-likes (the result
is an ``ndarray`` of the same shape); all other arguments are scalars.
"""

from __future__ import annotations

import math

import numpy as np

from .sampling import batch_noise_factor
from .validation import (
    SEED_BOUND,
    as_array,
    as_bool,
    as_float,
    as_int,
    as_seed,
    as_unit_interval,
    guard_module,
    resolved_seed,
)

__all__ = [
    "noise_factor",
    "batch_curvature",
    "isotropic_batch_curvature",
    "momentum_factor",
    "sgd_max_lr",
    "sgd_max_lr_isotropic",
    "momentum_noise_gain",
    "sgd_momentum_ms_max_lr",
    "sgd_nesterov_ms_max_lr",
    "momentum_effective_curvature",
    "heavy_ball_lyapunov_exponent",
    "sgd_momentum_as_max_lr",
    "critical_batch_size",
    "adam_max_lr",
    "adam_ms_max_lr",
    "min_damping",
    "min_damping_at_batch",
    "heavy_ball",
    "underlying_curvature",
    "rescale_curvature",
    "mccandlish_b_simple",
    "mccandlish_b_noise",
    "mccandlish_eps_max",
    "mccandlish_optimal_lr",
    "mccandlish_two_batch_estimate",
    "malladi_adam_scaling",
]


# --------------------------------------------------------------------------- helpers

def _is_scalar(x) -> bool:
    return np.ndim(x) == 0


def _out(x, scalar: bool):
    return float(x) if scalar else np.asarray(x, dtype=float)


def noise_factor(B, N=None, replacement: bool = False, *, name: str = "B"):
    """Vectorised :func:`rmt.sampling.batch_noise_factor`: ``c(B, N) = 1/B − 1/N``.

    ``B`` scalar → float (delegates to ``batch_noise_factor``); array-like → ndarray of the
    same shape, validated the same way (every B > 0 and finite; B ≤ N without
    replacement; N >= 1). ``name`` is B's name in error messages (e.g. ``B_to``).
    """
    if _is_scalar(B):
        return batch_noise_factor(B, N, replacement, name=name)
    arr = as_array(name, B)
    if np.any(arr <= 0):
        raise ValueError(f"{name} must be > 0, got min({name})={arr.min()}")
    # entry by entry the scalar routine: one formula (a vectorised copy of it once dropped
    # the (1 − 1/N) of sampling with replacement)
    return np.array([batch_noise_factor(float(b), N, replacement, name=name)
                     for b in arr.ravel()]).reshape(arr.shape)


def _momentum(name: str, value) -> float:
    return as_unit_interval(name, value)


# --------------------------------------------------------------------------- curvature

def batch_curvature(B, lam, s2, N=None, replacement: bool = False):
    """Top eigenvalue of the batch Hessian, unclipped: ``λ'(B) = λ + c(B, N)·s²/λ``.

    Second-order perturbation of an isolated outlier ``λ > 0`` of ``H`` by the batch
    fluctuation ``ε = H_B − H`` (docs/theory.md §3): ``λ' ≈ λ + uᵀE[ε²]u/λ``, and
    ``uᵀE[ε²]u = c(B, N)·s²``. Pass ``s2 = s_u²`` for the directional form or
    ``s2 = P·σ²`` for the isotropic form without the threshold clip.
    """
    lam = as_float("lam", lam, positive=True)
    s2 = as_float("s2", s2, nonnegative=True)
    scalar = _is_scalar(B)
    c = noise_factor(B, N, replacement)
    return _out(lam + c * s2 / lam, scalar)


def isotropic_batch_curvature(B, lam, sigma2, P, N=None, clip: bool = True,
                              replacement: bool = False):
    """Top batch eigenvalue in the paper's isotropic spiked-Wigner model (docs/theory.md §2).

    The fluctuation is a Wigner matrix with semicircle variance ``v = P·c(B, N)·σ²``
    (edges ``±2√v``); the spike ``λ > 0`` gives ``λ' = λ + v/λ`` if ``λ > √v``, else the
    bulk edge ``2√v`` (``clip=True``). With ``clip=False`` the formula ``λ + v/λ`` is used
    for every B (identical to :func:`batch_curvature` with ``s2 = P·σ²``).

    Note: since ``λ + v/λ ≥ 2√v`` with equality at the threshold, the clipped model is
    continuous, and the learning rate ``2/λ'`` it implies changes by at most a factor
    two between ``B = ∞`` (``2/λ``) and the threshold batch (``2/(2λ)``); below it the
    edge ``2√v ∝ 1/√B`` takes over.
    """
    lam = as_float("lam", lam, positive=True)
    sigma2 = as_float("sigma2", sigma2, nonnegative=True)
    P = as_float("P", P, positive=True)
    clip = as_bool("clip", clip)
    scalar = _is_scalar(B)
    v = P * sigma2 * noise_factor(B, N, replacement)
    top = lam + v / lam
    if clip:
        top = np.where(lam > np.sqrt(v), top, 2.0 * np.sqrt(v))
    return _out(top, scalar)


# --------------------------------------------------------------------------- momentum

def _momentum_factor_of(momentum, momentum_kind) -> float:
    """`momentum_factor` for the sgd_max_lr functions, its errors naming their arguments."""
    if momentum_kind not in ("heavy_ball", "ema", "nesterov"):
        raise ValueError("momentum_kind must be 'heavy_ball', 'ema' or 'nesterov', got "
                         f"{momentum_kind!r}")
    return momentum_factor(_momentum("momentum", momentum), momentum_kind)


def momentum_factor(beta=0.0, kind: str = "heavy_ball") -> float:
    """Numerator ``F`` of the quadratic stability limit ``α·λ < F``.

    * ``kind="heavy_ball"`` (``x⁺ = x − α∇f + ρ(x − x⁻)``): ``F = 2(1 + ρ)``;
    * ``kind="ema"`` (Adam's first moment ``m ← β₁m + (1 − β₁)g``, ``x⁺ = x − αm``):
      ``F = 2(1 + β₁)/(1 − β₁)`` (38 at β₁ = 0.9);
    * ``kind="nesterov"`` (torch's ``v ← ρv + g``, ``x⁺ = x − α(g + ρv)``):
      ``F = 2(1 + ρ)/(1 + 2ρ)`` (1.36 at ρ = 0.9; the noiseless limit of
      :func:`rmt.symbolic.derive_nesterov_mean_square`).

    All three come from a characteristic root of the two-step recursion crossing −1
    (derived in :func:`rmt.symbolic.derive_momentum_factors`, exprs ``heavy_ball``, ``ema``
    and ``nesterov``). ``beta`` in [0, 1).
    """
    b = _momentum("beta", beta)
    if kind == "heavy_ball":
        return 2.0 * (1.0 + b)
    if kind == "ema":
        return 2.0 * (1.0 + b) / (1.0 - b)
    if kind == "nesterov":
        return 2.0 * (1.0 + b) / (1.0 + 2.0 * b)
    raise ValueError(f"kind must be 'heavy_ball', 'ema' or 'nesterov', got {kind!r}")


# --------------------------------------------------------------------------- SGD

def sgd_max_lr(B, lam, s2, N=None, momentum=0.0, *, momentum_kind: str = "heavy_ball",
               replacement: bool = False):
    """Stability-limit learning rate of SGD at batch size B (docs/theory.md §5).

    ``α_max(B) = F/λ'(B)``, ``λ'(B) = λ + c(B, N)·s²/λ`` (unclipped; directional if
    ``s2 = s_u²``), ``F`` = :func:`momentum_factor` of ``momentum_kind``:
    ``2(1 + momentum)`` for heavy-ball momentum (default), ``2(1 + β)/(1 − β)`` for
    ``"ema"``, ``2(1 + ρ)/(1 + 2ρ)`` for ``"nesterov"``. Equivalently
    ``α_max = (F/λ)/(1 + B*·c(B, N))`` with ``B* = s²/λ²`` (:func:`critical_batch_size`);
    with ``N=None`` ``α_max = (F/λ)·B/(B + B*)`` (with replacement, B* → B*(1 − 1/N)): linear in B for
    ``B ≪ B*``, saturating at ``F/λ`` (reached exactly at ``B = N`` without replacement).

    This is a *stability limit* (largest non-divergent step of the batch quadratic), not
    McCandlish's greedy-optimal step nor an SDE-matching rule.

    With ``momentum > 0`` it is the *fixed-batch deterministic* limit: the noiseless
    factor F applied to the batch curvature λ'(B) as if every step saw the same batch.
    With a fresh batch each step the mean-square limit is lower in the noise-dominated
    regime, because momentum amplifies the noise term: use
    :func:`sgd_momentum_ms_max_lr` (heavy ball) or :func:`sgd_nesterov_ms_max_lr`
    (Nesterov); e.g. at B = 1, λ = 1, s² = 100, ρ = 0.9 this function gives 0.0376 and the
    heavy-ball mean-square limit 0.0020 (18.8× lower). At momentum 0 the two coincide.
    """
    F = _momentum_factor_of(momentum, momentum_kind)
    return F / batch_curvature(B, lam, s2, N, replacement)


def sgd_max_lr_isotropic(B, lam, sigma2, P, N=None, momentum=0.0, clip: bool = True, *,
                         momentum_kind: str = "heavy_ball", replacement: bool = False):
    """Stability-limit SGD learning rate in the paper's isotropic spiked-Wigner model.

    ``α_max = F/λ'_iso(B)`` with ``λ'_iso`` from :func:`isotropic_batch_curvature`
    (``v = P·c(B,N)·σ²``; ``λ + v/λ`` above the threshold ``λ > √v``, ``2√v`` below when
    ``clip=True``). Between ``B = ∞`` and the threshold batch this model changes α by at
    most a factor two (``2/λ → 1/λ``); below threshold ``α = F/(2√v) ∝ √B``. Use
    :func:`sgd_max_lr` with the directional ``s_u²`` for the linear-scaling regime. With
    ``momentum > 0`` this is, like :func:`sgd_max_lr`, the fixed-batch deterministic limit,
    not the mean-square one.
    """
    F = _momentum_factor_of(momentum, momentum_kind)
    return F / isotropic_batch_curvature(B, lam, sigma2, P, N, clip, replacement)


def momentum_noise_gain(momentum=0.0, *, nesterov: bool = False) -> float:
    """Factor ``(1 + ρ)/(1 − ρ)`` by which heavy-ball momentum ρ multiplies the batch-noise
    term of the mean-square stability limit (:func:`sgd_momentum_ms_max_lr`); 1 at ρ = 0,
    19 at ρ = 0.9. ``nesterov``: Nesterov's small-noise gain
    ``(1 + ρ)(1 + 2ρ)/(1 + 3ρ)`` (1.44 at ρ = 0.9; its limit is not linear in the noise,
    :func:`sgd_nesterov_ms_max_lr`; derived in
    :func:`rmt.symbolic.derive_nesterov_mean_square`)."""
    m = _momentum("momentum", momentum)
    if nesterov:
        return (1.0 + m) * (1.0 + 2.0 * m) / (1.0 + 3.0 * m)
    return (1.0 + m) / (1.0 - m)


def sgd_momentum_ms_max_lr(B, lam, s2, N=None, momentum=0.0, *, replacement: bool = False):
    """Mean-square stability limit of heavy-ball SGD with batch noise, directional form.

    Along the outlier direction the batch curvature ``h_t`` has mean λ and variance
    ``c(B, N)·s²``; heavy ball ``x⁺ = x − αh_t x + ρ(x − x⁻)`` (torch's ``v ← ρv + g``,
    ``w ← w − αv`` is the same iteration) is mean-square stable iff

        α < 2(1 + ρ)/λ'_ρ(B),   λ'_ρ(B) = λ + (1 + ρ)/(1 − ρ) · c(B, N)·s²/λ

    (derived in :func:`rmt.symbolic.derive_momentum_mean_square`). At ρ = 0 this is
    :func:`sgd_max_lr`; without noise it is the deterministic ``2(1 + ρ)/λ``. Momentum
    raises the numerator by (1 + ρ) but the noise term by (1 + ρ)/(1 − ρ), so in the
    noise-dominated regime (B ≪ B*) the limit *falls* with momentum, by (1 − ρ):
    ``α ≈ 2(1 − ρ)λ/(c s²)``. The exact (matrix) form is
    `nets.learning_rates.stability.ms_stability_threshold(..., momentum=ρ)`.
    """
    m = _momentum("momentum", momentum)
    lam = as_float("lam", lam, positive=True)
    s2 = as_float("s2", s2, nonnegative=True)
    scalar = _is_scalar(B)
    c = np.asarray(noise_factor(B, N, replacement), dtype=float)
    return _out(_heavy_ball_ms_alpha(lam, c, s2, m, momentum_factor(m)), scalar)


def _heavy_ball_ms_alpha(lam, c, s2, m, F):
    """``F/(λ(1 + x))``, ``x = g·c·s²/λ²`` (g = (1 + ρ)/(1 − ρ)): the heavy-ball mean-square
    limit with numerator F (:func:`sgd_momentum_ms_max_lr`, and Adam's with its own F).

    Formed in an order that overflows only where the result does: x as
    ``g·c·(s²/λ)/λ`` and the result as ``(F/(1 + x))/λ`` (the product g·c·s² alone
    overflows at λ = 1e300, s² = 1e308 and once gave 0.0 for a limit of 3.8e-300); where x
    itself overflows, its limit ``(F/(g·c))·(λ/s²)``, which never forms g·c·s²."""
    gain = momentum_noise_gain(m)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore", under="ignore"):
        x = np.where(c > 0, gain * c * (s2 / lam) / lam, 0.0)   # no noise: 0, even if s²/λ = ∞
        noisy = (F / gain) / np.where(c > 0, c, 1.0) * (lam / s2 if s2 > 0 else 0.0)
        return np.where(np.isfinite(x), (F / (1.0 + x)) / lam, noisy)


def sgd_nesterov_ms_max_lr(B, lam, s2, N=None, momentum=0.0, *, replacement: bool = False):
    """Mean-square stability limit of Nesterov SGD with batch noise, directional form.

    torch's Nesterov (``v ← ρv + g``, ``w ← w − α(g + ρv)``, dampening 0) along the
    outlier direction, batch curvature h_t of mean λ and variance ``σ² = c(B, N)·s²``, is
    mean-square stable iff α < α* with

        α* = 4λ(1 − ρ²) / (b + √(b² + 8ρ(1 + 2ρ)(1 − ρ²)λ²(λ² + σ²))),
        b = (1 + ρ)σ² + (1 − ρ − 4ρ²)λ²

    (derived in :func:`rmt.symbolic.derive_nesterov_mean_square`). ρ = 0 gives
    :func:`sgd_max_lr`; without noise it is the deterministic ``2(1 + ρ)/((1 + 2ρ)λ)``
    (1.36/λ at ρ = 0.9, against heavy ball's 3.8/λ); in the noise-dominated regime it is
    ``2(1 − ρ)λ/σ²``, the same as heavy ball's (:func:`sgd_momentum_ms_max_lr`). So with
    Nesterov the limit changes less with B than with heavy ball at the same ρ: between
    those two regimes by (1 + ρ)/((1 − ρ)(1 + 2ρ)) = 6.8× at ρ = 0.9, against 19×.
    """
    m = _momentum("momentum", momentum)
    lam = as_float("lam", lam, positive=True)
    s2 = as_float("s2", s2, nonnegative=True)
    scalar = _is_scalar(B)
    sig2 = noise_factor(B, N, replacement) * s2
    return _out(_nesterov_alpha(lam, sig2, m), scalar)


def _nesterov_alpha(lam, sig2, m):
    """α* of :func:`sgd_nesterov_ms_max_lr` for the batch-curvature variance ``sig2``.

    In u = αλ and x = σ²/λ² (no λ² formed, so no overflow for extreme λ) the boundary is
    a·u² + b·u − c = 0 with a = ρ(1 + 2ρ)(1 + x), b = (1 + ρ)x + 1 − ρ − 4ρ², c = 2(1 − ρ²);
    its positive root is taken in the form without cancellation for the sign of b."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        x = np.asarray(sig2, dtype=float) / lam / lam
        a = m * (1.0 + 2.0 * m) * (1.0 + x)
        b = (1.0 + m) * x + (1.0 - m - 4.0 * m * m)
        c = 2.0 * (1.0 - m) * (1.0 + m)      # not 1 − m·m: ρ within 1e-8 of 1 lost 1 − ρ
        root = np.sqrt(b * b + 4.0 * a * c)
        neg = b < 0                          # only for ρ > 0, where a > 0
        u = np.where(neg, (root - b) / np.where(neg, 2.0 * a, 1.0),
                     2.0 * c / np.where(neg, 1.0, b + root))
        # x beyond 1e100 (b² would overflow past ~1e154): the limit u = 2(1 − ρ)/x, i.e.
        # α* = 2(1 − ρ)λ/σ², exact to O(1/x); computed without forming x
        return np.where(x <= 1e100, u / lam, 2.0 * (1.0 - m) * lam / np.asarray(sig2, dtype=float))


def momentum_effective_curvature(lam, batch_curvature, momentum=0.0, *, nesterov: bool = False):
    """Effective curvature λ'_ρ(B) = F/α*(B) of the mean-square limit with momentum, from
    the top eigenvalue λ and the (directional-form) batch curvature λ'(B) = λ + c·s²/λ.

    Heavy ball (F = 2(1 + ρ)): ``λ'_ρ = λ + (1 + ρ)/(1 − ρ)·(λ'(B) − λ)``
    (:func:`sgd_momentum_ms_max_lr`). Nesterov (F = 2(1 + ρ)/(1 + 2ρ)): ``F/α*`` of
    :func:`sgd_nesterov_ms_max_lr` with σ² = λ·(λ'(B) − λ), not linear in λ'(B).
    ``batch_curvature`` may be an array; ρ = 0 returns it unchanged (as float). With
    momentum a batch curvature below λ (a negative variance, e.g. an estimate's noise)
    counts as no noise, λ'_ρ = λ: the gain (1 + ρ)/(1 − ρ) would otherwise amplify it into
    a curvature below λ, or a negative one."""
    m = _momentum("momentum", momentum)
    lam = as_float("lam", lam, positive=True)
    nesterov = as_bool("nesterov", nesterov)
    scalar = _is_scalar(batch_curvature)
    curve = (as_float("batch_curvature", batch_curvature) if scalar
             else as_array("batch_curvature", batch_curvature))
    shift = np.asarray(curve, dtype=float) - lam
    if m == 0.0:
        return _out(lam + shift, scalar)
    if not nesterov:
        return _out(lam + momentum_noise_gain(m) * np.maximum(shift, 0.0), scalar)
    return _out(momentum_factor(m, "nesterov") / _nesterov_alpha(lam, lam * np.maximum(shift, 0.0), m),
                scalar)


#: longest path `heavy_ball_lyapunov_exponent` accepts (a Python loop over steps)
MAX_LYAPUNOV_STEPS = 10**7


def _lyapunov_steps(steps) -> int:
    """The path length of the almost-sure limits: an int in [10, MAX_LYAPUNOV_STEPS]."""
    steps = as_int("steps", steps, minimum=10)
    if steps > MAX_LYAPUNOV_STEPS:
        raise ValueError(f"steps must be at most {MAX_LYAPUNOV_STEPS}, got {steps}")
    return steps


def heavy_ball_lyapunov_exponent(lr, lam, var, momentum=0.0, *, steps=20000, seed=0):
    """Top Lyapunov exponent γ(α) of heavy ball along one direction with Gaussian
    multiplicative noise: ``x_{t+1} = (1 + ρ − α h_t) x_t − ρ x_{t−1}``, h_t i.i.d.
    N(λ, var), estimated from one seeded path of `steps` products of the 2×2 companion
    matrices (renormalised each step): γ = (1/T) Σ_t log‖M_t u_t‖. ``lr`` may be an array
    (all α share the same h_t, so γ(α) is a smooth function of α for a fixed seed).
    The iteration is almost surely stable (a typical path decays) iff γ < 0; the mean
    square (:func:`sgd_momentum_ms_max_lr`) asks more, E x_t² → 0."""
    m = _momentum("momentum", momentum)
    lam = as_float("lam", lam)
    var = as_float("var", var, nonnegative=True)
    steps = _lyapunov_steps(steps)
    scalar = _is_scalar(lr)
    a = np.atleast_1d(as_float("lr", lr, positive=True) if scalar else as_array("lr", lr))
    if np.any(a <= 0):
        raise ValueError("lr must be > 0")
    h = lam + math.sqrt(var) * np.random.default_rng(as_seed("seed", seed)).standard_normal(steps)
    x, xp = np.ones_like(a), np.zeros_like(a)
    acc = np.zeros_like(a)
    for t in range(steps):
        x, xp = (1.0 + m - a * h[t]) * x - m * xp, x
        n = np.maximum(np.hypot(x, xp), 1e-300)   # an exactly annihilated path: γ → very negative
        acc += np.log(n)
        x, xp = x / n, xp / n
    g = acc / steps
    return float(g[0]) if scalar else g


def sgd_momentum_as_max_lr(B, lam, s2, N=None, momentum=0.0, *, replacement: bool = False,
                           steps=20000, seed=0):
    """Almost-sure (typical-path) stability limit of heavy-ball SGD in the directional
    model of :func:`sgd_momentum_ms_max_lr` (h_t ~ N(λ, c(B, N)·s²)): the α at which
    :func:`heavy_ball_lyapunov_exponent` γ(α) crosses 0 on one seeded path (for ρ = 0 the
    root of E log|1 − αh| = 0).

    The bracket starts *at* the mean-square limit α_ms, taken as stable without estimating
    γ there: by Jensen γ ≤ ½ log of the mean-square growth rate, so the true γ(α_ms) ≤ 0,
    and the almost-sure limit is never below α_ms (the result is ≥ α_ms by construction).
    Estimating γ near α_ms is not reliable once the noise is large: there the true γ is
    O(1/x), x = c·s²/λ², while the path's sampling error is O(1/√(x·steps)), larger once
    x ≳ steps (at any α ≲ α_ms, so halving α does not help), besides an O(1/steps)
    start-up bias (the path starts at (1, 0), not along the growing direction); a test
    there once made the function fail for x ≳ 10⁴ (ρ = 0, x = 10⁶: limit 1.56·10⁻³/λ,
    α_ms ≈ 2·10⁻⁶/λ). The upper end doubles from 2(1 + ρ)/λ until γ ≥ 0; the bracket is
    then narrowed by passes of 16 geometrically spaced α evaluated together on the same
    path, keeping the *largest* α with γ < 0 as the new lower end (an estimate pushed above
    0 near α_ms by sampling error is passed over), until it is 10⁻⁶ relative wide.

    Accuracy: 10⁻⁶ is only the bisection tolerance. The result is a Monte-Carlo estimate
    from one path of `steps` steps, and its seed-to-seed spread is percent-level at the
    default 20,000 steps (relative sd over 8 seeds 2.3 % at ρ = 0.9, x = 1; 1.1 % at ρ = 0.3,
    x = 10; 0.9 % at ρ = 0.99, x = 10⁻³), falling as 1/√steps. Without noise it returns
    2(1 + ρ)/λ (= α_ms) to the bisection tolerance. ``seed``: an int >= 0 or a numpy
    Generator (one int is drawn from it), as in :func:`rmt.validation.as_seed`; every α
    of one call shares the path of that seed (None draws one fresh seed per call).
    Array-like B gives an ndarray of B's shape."""
    m = _momentum("momentum", momentum)
    lam = as_float("lam", lam, positive=True)
    s2 = as_float("s2", s2, nonnegative=True)
    steps = _lyapunov_steps(steps)
    seed = _path_seed(seed)
    scalar = _is_scalar(B)
    cs = np.atleast_1d(noise_factor(B, N, replacement)).ravel()
    ms_all = np.atleast_1d(sgd_momentum_ms_max_lr(B, lam, s2, N, m,
                                                  replacement=replacement)).ravel()

    def gamma(alpha, var):
        return heavy_ball_lyapunov_exponent(alpha, lam, var, m, steps=steps, seed=seed)

    out = []
    for c, ms in zip(cs, ms_all):
        var = float(c) * s2
        lo = float(ms)                 # stable by Jensen: not estimated (see the docstring)
        hi = max(2.0 * (1.0 + m) / lam, 2.0 * lo)
        for _ in range(200):
            if not gamma(hi, var) < 0:
                break
            hi *= 2.0
        while hi / lo >= 1 + 1e-6:     # 16 interior points per pass on the shared path
            grid = np.geomspace(lo, hi, 18)[1:-1]
            down = np.flatnonzero(gamma(grid, var) < 0)
            j = int(down[-1]) if down.size else -1       # the largest stable α of the pass
            lo, hi = (grid[j] if j >= 0 else lo), (grid[j + 1] if j + 1 < len(grid) else hi)
        out.append(math.sqrt(lo * hi))
    return out[0] if scalar else np.array(out).reshape(np.shape(B))


def _path_seed(seed):
    """The seed of the path: `resolved_seed` (errors name ``seed``; None → fresh entropy),
    a BitGenerator drawn once, so that every α of one call sees the same h_t."""
    seed = resolved_seed("seed", seed)
    if isinstance(seed, np.random.BitGenerator):
        seed = int(np.random.default_rng(seed).integers(0, SEED_BOUND))
    return seed


def critical_batch_size(lam, s2) -> float:
    """Critical batch size ``B* = s²/λ²`` of the stability-limit law (docs/theory.md §5).

    At ``B = B*`` (N = ∞) the SGD stability limit is half its saturated value ``2/λ``
    (with replacement at finite N at ``B*(1 − 1/N)``, without at ``B*N/(N + B*)``); below
    it the limit grows linearly in B, above it saturates.
    Analogous to (but not the same quantity as) McCandlish's ``B_noise``.
    """
    lam = as_float("lam", lam, positive=True)
    s2 = as_float("s2", s2, nonnegative=True)
    return s2 / lam ** 2


# --------------------------------------------------------------------------- Adam

def adam_max_lr(B, lam, s2, grad_mean_sq, grad_var, N=None, eps=0.0, beta1=0.0, *,
                replacement: bool = False):
    """Stability-limit learning rate of Adam/RMSprop, isotropic closed form (docs/theory.md §5).

    With an isotropic (scalar) preconditioner ``D = 1/(√v + eps)``,
    ``v = grad_mean_sq + c(B, N)·grad_var`` (mean squared gradient plus batch gradient
    noise per coordinate), stability needs ``α·D·λ'(B) < 2(1 + β₁)/(1 − β₁)``:

        α_max(B) = 2(1 + β₁)/(1 − β₁) · (√(grad_mean_sq + c·grad_var) + eps) / λ'(B),
        λ'(B) = λ + c·s²/λ.

    For ``B → 0`` (noise-dominated) α_max ∝ √B (square-root scaling); for large B it
    saturates. Two crossovers set the shape: the curvature noise stops mattering above
    B* = s²/λ² (λ' → λ), the gradient noise in v above B_g = grad_var/grad_mean_sq. When
    B_g > B* the limit *falls* as 1/√B between them (λ' is already flat while the noise
    that enlarges √v shrinks), so a decreasing α_max(B) is what the formula says there,
    not an error. This is a *stability limit*; for the SDE-matching rule see
    :func:`malladi_adam_scaling`. ``grad_mean_sq + c·grad_var = 0`` with ``eps = 0`` (no
    gradient at all, e.g. ``grad_mean_sq = 0`` at ``B = N``) makes D infinite and is
    refused (ValueError).
    """
    g2 = as_float("grad_mean_sq", grad_mean_sq, nonnegative=True)
    gv = as_float("grad_var", grad_var, nonnegative=True)
    eps = as_float("eps", eps, nonnegative=True)
    F = momentum_factor(_momentum("beta1", beta1), "ema")
    lam_b = batch_curvature(B, lam, s2, N, replacement)
    c = noise_factor(B, N, replacement)
    v = np.asarray(g2 + c * gv, dtype=float)
    if eps == 0.0 and np.any(v == 0.0):
        # D = 1/(√v + eps) = 1/0: no finite preconditioner (this once returned α_max = 0.0)
        raise ValueError(
            "grad_mean_sq + c(B, N)*grad_var is 0 with eps = 0 (grad_mean_sq="
            f"{g2}, grad_var={gv}, B={B}, N={N}): the preconditioner 1/(sqrt(v) + eps) is "
            "infinite, so there is no stability limit; pass eps > 0 or a nonzero gradient "
            "moment")
    return _out(F * (np.sqrt(v) + eps) / lam_b, _is_scalar(B))


def adam_ms_max_lr(B, lam, s2, N=None, beta1=0.0, *, replacement: bool = False):
    """Mean-square stability limit of Adam/RMSprop with a frozen preconditioner, directional
    form, from the *preconditioned* curvature λ̃ and noise s̃² (docs/theory.md §5).

    With the second moment frozen, D = diag(1/(√v̂ + ε)), Adam in the coordinates
    z = D^{-1/2}w is EMA momentum ``m ← β₁m + (1−β₁)g``, ``z ← z − α m`` on the curvature
    A_B = D^{1/2} H_B D^{1/2}. Writing m = (1−β₁)v turns it into heavy ball with step
    α(1−β₁) and momentum β₁, so :func:`sgd_momentum_ms_max_lr` applies to α(1−β₁):

        α < F/λ̃'_β(B),   F = 2(1+β₁)/(1−β₁),   λ̃'_β(B) = λ̃ + (1+β₁)/(1−β₁)·c(B,N)·s̃²/λ̃,

    λ̃ the top eigenvalue of D^{1/2} H D^{1/2} and s̃² the directional noise of the
    preconditioned per-sample curvatures along its eigenvector
    (`nets.learning_rates.adam.preconditioned_noise`). Derived in
    :func:`rmt.symbolic.derive_adam_mean_square`. At β₁ = 0 it is the deterministic form
    F/λ̃'(B) (= 2/λ̃'); at β₁ > 0 the noise term is amplified (×19 at β₁ = 0.9) and the
    noise-dominated limit is 2λ̃/(c·s̃²) *whatever β₁* — with the noise-model preconditioner
    (λ̃ ∝ √B, s̃² ∝ B while the gradient noise dominates v̂) that is the square-root rule,
    which with β₁ = 0.9 holds up to (1+β₁)/(1−β₁)·B̃*, B̃* = s̃²/λ̃², instead of B̃*.
    A **stability limit** of the local model (not the fresh-state first step)."""
    b = _momentum("beta1", beta1)
    lam = as_float("lam", lam, positive=True)
    s2 = as_float("s2", s2, nonnegative=True)
    c = np.asarray(noise_factor(B, N, replacement), dtype=float)
    # the heavy-ball limit for the step α(1 − β₁): numerator F = 2(1 + β₁)/(1 − β₁) (dividing
    # the heavy-ball result by 1 − β₁ afterwards would lose it where that result is subnormal)
    return _out(_heavy_ball_ms_alpha(lam, c, s2, b, momentum_factor(b, "ema")), _is_scalar(B))


# --------------------------------------------------------------------------- damping

def min_damping(lr, lam_noise) -> float:
    """Smallest stable damping ``δ_min = α·λ'/2`` for damped second-order steps.

    In a direction where the curvature estimate is ≈ 0 but the batch curvature is the
    noise value λ', the step ``α·(Ĥ + δ)⁻¹g`` multiplies the error by ``1 − αλ'/δ``;
    stability (``|·| < 1``) needs ``δ > αλ'/2`` (docs/theory.md §5). ``lr`` is the step size
    actually used (any of the three kinds).
    """
    lr = as_float("lr", lr, positive=True)
    lam_noise = as_float("lam_noise", lam_noise, nonnegative=True)
    return lr * lam_noise / 2.0


def min_damping_at_batch(lr, lam_noise_ref, B_ref, B, N=None, power=1.0,
                         replacement: bool = False):
    """``δ_min(B) = α·λ'_noise(B)/2`` from a noise curvature measured at batch ``B_ref``.

    The noise curvature is rescaled as ``λ'_noise(B) = λ'_noise(B_ref)·(c(B)/c(B_ref))^power``.
    ``power=1`` (default) is the Wishart/GGN regime ``P ≫ B`` where the MP edge
    ``σ²(1 + √q)² ≈ σ²q ∝ c(B, N)``, which gives docs/theory.md's rule ``δ_min ∝ α/B`` (keep
    ``δ·B`` fixed at fixed α); ``power=0.5`` is the semicircle edge ``2√v ∝ √c``.
    """
    lr = as_float("lr", lr, positive=True)
    lam_noise_ref = as_float("lam_noise_ref", lam_noise_ref, nonnegative=True)
    power = as_float("power", power, positive=True)
    c_ref = noise_factor(as_float("B_ref", B_ref, positive=True), N, replacement, name="B_ref")
    if c_ref == 0.0:
        raise ValueError("B_ref must be < N (at B_ref = N the noise curvature is zero and "
                         "cannot be rescaled)")
    scalar = _is_scalar(B)
    c = noise_factor(B, N, replacement)
    return _out(lr * lam_noise_ref * (c / c_ref) ** power / 2.0, scalar)


# --------------------------------------------------------------------------- heavy ball

def heavy_ball(lam_max, lam_min, *, variant: str = "polyak"):
    """Quadratic-optimal heavy-ball hyper-parameters for ``μ ≤ H ≤ L`` (Polyak 1964).

    ``variant="polyak"``: ``α = 4/(√L + √μ)²``, ``ρ = ((√κ − 1)/(√κ + 1))²``, κ = L/μ;
    the convergence rate is √ρ (μ = 0.01, L = 1 → α = 3.306, ρ = 0.669).
    ``variant="paper"``: the same α with ``ρ = (√κ − 1)/(√κ + 1)`` (used in the authors'
    PreResNet runs, docs/theory.md §6). Both are within the stability limit ``α·L < 2(1+ρ)``.

    The returned α is an *optimal-rate* step for the deterministic quadratic, not a
    stability limit. Returns ``(lr, momentum)``.
    """
    L = as_float("lam_max", lam_max, positive=True)
    mu = as_float("lam_min", lam_min, positive=True)
    if mu > L:
        raise ValueError(f"lam_min must be <= lam_max, got lam_min={mu}, lam_max={L}")
    sk = math.sqrt(L / mu)
    lr = 4.0 / (math.sqrt(L) + math.sqrt(mu)) ** 2
    r = (sk - 1.0) / (sk + 1.0)
    if r * r >= 1.0 if variant == "polyak" else r >= 1.0:
        raise ValueError(f"lam_max/lam_min = {L / mu:.3g} is too large: the momentum rounds to 1")
    if variant == "polyak":
        return lr, r * r
    if variant == "paper":
        return lr, r
    raise ValueError(f"variant must be 'polyak' or 'paper', got {variant!r}")


# --------------------------------------------------------------------------- rescaling

def underlying_curvature(lam_measured, B, s2, N=None, replacement: bool = False,
                         strict: bool = True, *, B_name: str = "B") -> float:
    """Invert ``λ' = λ + c(B, N)·s²/λ`` for the empirical (B = N) curvature λ.

    Solves ``λ² − λ'λ + c·s² = 0`` and returns the larger root
    ``λ = (λ' + √(λ'² − 4c·s²))/2`` (the branch λ > √(c·s²) on which λ' increases with λ,
    i.e. the supercritical spike). If ``λ'² < 4c·s²`` the measurement is below the
    minimum ``2√(c·s²)`` the model allows: ``strict=True`` raises ValueError, otherwise
    the discriminant is clipped to 0 (λ = λ'/2).
    """
    lam_m = as_float("lam_measured", lam_measured, positive=True)
    s2 = as_float("s2", s2, nonnegative=True)
    strict = as_bool("strict", strict)
    c = batch_noise_factor(B, N, replacement, name=B_name)
    # λ = λ'/2·(1 + √(1 − r)), r = 4c·s²/λ'² (computed without squaring λ', which overflows)
    r = 4.0 * c * s2 / lam_m / lam_m
    if r > 1.0:
        # within a few ulps of the minimum (batch_curvature's own output at λ = √(c·s²)
        # rounds one ulp below 2λ): that minimum, not an error
        if strict and r > 1.0 + 8 * np.finfo(float).eps:
            raise ValueError(
                f"lam_measured={lam_m} is below the model minimum 2*sqrt(c*s2)="
                f"{2 * math.sqrt(c) * math.sqrt(s2)}: no underlying curvature (pass strict=False to clip)")
        r = 1.0
    return 0.5 * lam_m * (1.0 + math.sqrt(1.0 - r))


def rescale_curvature(lam_measured, B_from, B_to, s2, N=None, replacement: bool = False,
                      strict: bool = True):
    """Move a top curvature measured at batch ``B_from`` to batch ``B_to`` (docs/theory.md §6).

    Removes ``c(B_from)·s²/λ`` and adds ``c(B_to)·s²/λ``, with the underlying λ from
    :func:`underlying_curvature` (larger root of ``λ² − λ'λ + c(B_from)s² = 0``).
    ``B_to`` may be an array.
    """
    lam = underlying_curvature(lam_measured, B_from, s2, N, replacement, strict, B_name="B_from")
    scalar = _is_scalar(B_to)
    c = noise_factor(B_to, N, replacement, name="B_to")
    return _out(lam + c * as_float("s2", s2) / lam, scalar)


# --------------------------------------------------------------------------- McCandlish

def mccandlish_b_simple(trace_sigma, grad_sq_norm) -> float:
    """McCandlish et al. (2018) simple noise scale ``B_simple = tr Σ / |G|²``.

    ``Σ`` is the per-sample gradient covariance, ``G`` the full-batch gradient.
    """
    t = as_float("trace_sigma", trace_sigma, nonnegative=True)
    g = as_float("grad_sq_norm", grad_sq_norm, positive=True)
    return t / g


def mccandlish_b_noise(trace_h_sigma, g_h_g) -> float:
    """McCandlish et al. (2018) noise scale ``B_noise = tr(HΣ) / (GᵀHG)``.

    Requires ``GᵀHG > 0`` (locally convex along the gradient).
    """
    t = as_float("trace_h_sigma", trace_h_sigma, nonnegative=True)
    q = as_float("g_h_g", g_h_g, positive=True)
    return t / q


def mccandlish_eps_max(grad_sq_norm, g_h_g) -> float:
    """Greedy-optimal full-batch step ``ε_max = |G|²/(GᵀHG)`` (McCandlish et al. 2018)."""
    g = as_float("grad_sq_norm", grad_sq_norm, nonnegative=True)
    q = as_float("g_h_g", g_h_g, positive=True)
    return g / q


def mccandlish_optimal_lr(B, eps_max, b_noise, N=None, replacement: bool = False):
    """Greedy-optimal learning rate ``ε_opt(B) = ε_max/(1 + B_noise·c(B, N))``.

    With ``N=None`` this is McCandlish et al.'s ``ε_max/(1 + B_noise/B)``; a finite N uses
    the without-replacement factor ``c = 1/B − 1/N`` (so ``ε_opt(N) = ε_max``). This is
    the step minimising the expected loss after one step of the quadratic model — a
    *greedy optimum*, roughly half the stability limit when the noise is small.
    """
    eps_max = as_float("eps_max", eps_max, positive=True)
    b_noise = as_float("b_noise", b_noise, nonnegative=True)
    scalar = _is_scalar(B)
    c = noise_factor(B, N, replacement)
    return _out(eps_max / (1.0 + b_noise * c), scalar)


def mccandlish_two_batch_estimate(B_small, sq_norm_small, B_big, sq_norm_big, N=None,
                                  replacement: bool = False):
    """Unbiased ``(|G|², tr Σ)`` from mean squared gradient norms at two batch sizes.

    Uses ``E|G_B|² = |G|² + c(B, N)·tr Σ`` (McCandlish et al. 2018, App. A; finite-N
    factor c from :func:`rmt.sampling.batch_noise_factor`) at two batch sizes and solves
    the 2×2 linear system. The estimates can be negative from noisy inputs; they are
    returned as computed. Returns ``(grad_sq_norm, trace_sigma)``.
    """
    ns = as_float("sq_norm_small", sq_norm_small, nonnegative=True)
    nb = as_float("sq_norm_big", sq_norm_big, nonnegative=True)
    cs = batch_noise_factor(B_small, N, replacement, name="B_small")
    cb = batch_noise_factor(B_big, N, replacement, name="B_big")
    if not cs > cb:
        raise ValueError(f"B_small must be < B_big, got B_small={B_small}, B_big={B_big}")
    trace_sigma = (ns - nb) / (cs - cb)
    grad_sq = (cs * nb - cb * ns) / (cs - cb)
    return grad_sq, trace_sigma


# --------------------------------------------------------------------------- Malladi

def malladi_adam_scaling(kappa, lr, beta1=0.9, beta2=0.999, eps=1e-8) -> dict:
    """SDE-matching Adam/RMSprop hyper-parameters when the batch grows ``B → κB``.

    Malladi et al. (2022) square-root rule: ``η → √κ·η``, ``1 − β_i → κ(1 − β_i)``,
    ``ε → ε/√κ``. This keeps Adam's SDE approximation unchanged; it is neither a
    stability limit nor a greedy optimum. Raises ValueError if ``κ(1 − β_i) > 1``.
    Returns ``{"lr", "beta1", "beta2", "eps"}``.
    """
    kappa = as_float("kappa", kappa, positive=True)
    lr = as_float("lr", lr, positive=True)
    b1 = _momentum("beta1", beta1)
    b2 = _momentum("beta2", beta2)
    eps = as_float("eps", eps, nonnegative=True)
    out = {"lr": math.sqrt(kappa) * lr, "eps": eps / math.sqrt(kappa)}
    for name, b in (("beta1", b1), ("beta2", b2)):
        one_minus = kappa * (1.0 - b)
        if one_minus > 1.0:
            raise ValueError(f"kappa*(1-{name}) = {one_minus} > 1: {name} would be negative")
        out[name] = 1.0 - one_minus
        if out[name] >= 1.0:
            raise ValueError(f"kappa={kappa:g} is too small: 1 - kappa*(1-{name}) rounds to 1 "
                             "(an average over no steps)")
    return out


# every public function above: errors name the caller's arguments, results are finite
guard_module(globals())
