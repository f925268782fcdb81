"""Symbolic (sympy) derivations of the closed forms used in `rmt` (docs/theory.md §2, §4, §5).

Each ``derive_*`` function *derives* its result from the defining equation (a Stieltjes
transform equation, a characteristic polynomial, a stability condition) rather than
restating it, and returns a frozen :class:`Derivation` holding the sympy symbols, the
expressions (and conditions) obtained along the way, and their LaTeX. Results are cached
(``functools.lru_cache``); each derivation takes well under a second.

Conventions: Stieltjes transform ``g(z) = ∫ dμ(x)/(x − z)`` (so ``g(z) ~ −1/z`` as
``z → ∞`` and ``g < 0``, ``g' > 0`` to the right of the support); Wishart ratio
``q = p/n``; batch noise factor ``c(B, N) = 1/B − 1/N``.

    >>> from rmt.symbolic import derive_spiked_wigner
    >>> d = derive_spiked_wigner()
    >>> d.exprs["outlier"]
    theta + v/theta
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import sympy as sp

from .validation import as_bool

__all__ = [
    "Derivation",
    "derive_spiked_wigner",
    "derive_spiked_wishart",
    "derive_momentum_factors",
    "derive_lr_laws",
    "derive_directional_stability",
    "derive_momentum_mean_square",
    "derive_nesterov_mean_square",
    "derive_adam_mean_square",
    "derive_critical_batch_size",
    "lr_scaling_exponent",
]


@dataclass(frozen=True, eq=False)
class Derivation:
    """Result of a symbolic derivation.

    Attributes
    ----------
    name : what was derived.
    symbols : name → sympy Symbol used in the expressions.
    exprs : name → derived sympy expression (or relation, for conditions).
    latex : name → ``sympy.latex`` of the corresponding entry of ``exprs``.
    """

    name: str
    symbols: Mapping[str, sp.Symbol]
    exprs: Mapping[str, sp.Basic]
    latex: Mapping[str, str]

    def lambdify(self, key: str, *args: str):
        """Numpy function of the symbols named in ``args`` (in that order) for ``exprs[key]``."""
        if key not in self.exprs:
            raise KeyError(f"key must be one of {sorted(self.exprs)}, got {key!r}")
        missing = [a for a in args if a not in self.symbols]
        if missing:
            raise KeyError(f"unknown symbol name(s) {missing}; known: {sorted(self.symbols)}")
        return sp.lambdify([self.symbols[a] for a in args], self.exprs[key], "numpy")


def _make(name: str, symbols: dict, exprs: dict) -> Derivation:
    return Derivation(
        name=name,
        symbols=MappingProxyType(dict(symbols)),
        exprs=MappingProxyType(dict(exprs)),
        latex=MappingProxyType({k: sp.latex(v) for k, v in exprs.items()}),
    )


def _single(solutions, what: str):
    sols = list(solutions)
    if len(sols) != 1:
        raise RuntimeError(f"expected one solution for {what}, got {sols}")  # pragma: no cover
    return sols[0]


# --------------------------------------------------------------------------- spiked Wigner

@functools.lru_cache(maxsize=None)
def derive_spiked_wigner() -> Derivation:
    """Outlier, threshold and overlap of ``W + θuuᵀ``, W semicircle of variance v.

    1. The semicircle Stieltjes transform solves ``v g² + z g + 1 = 0``; of its two roots
       the one with ``z·g(z) → −1`` as ``z → ∞`` is selected (computed by a limit). With
       sympy's principal square root this expression is the transform for real
       ``z > 2√v`` (right of the support, where the top outlier lives); negative spikes
       follow by the symmetry ``θ → −θ, z → −z``.
    2. The bulk edges are where the discriminant ``z² − 4v`` vanishes: ``±2√v``.
    3. Outlier: ``1 + θ g(z) = 0``; substituting ``g = −1/θ`` into the quadratic and
       solving for z gives ``z(θ) = θ + v/θ``.
    4. Threshold: z(θ) is the outlier only where it is increasing (where the chosen
       branch really takes the value −1/θ); ``z'(θ) = 0`` at ``θ_c = √v`` and
       ``z(θ_c) = 2√v`` is the edge. Outlier exists iff ``θ > √v``.
    5. Overlap ``|⟨u, û⟩|² = 1/(θ² g'(z))`` with ``g'`` from implicit differentiation of
       the quadratic, ``g' = −g/(2vg + z)``, at ``(z, g) = (θ + v/θ, −1/θ)``: ``1 − v/θ²``.

    exprs: ``stieltjes_equation``, ``stieltjes`` (chosen branch), ``edge``,
    ``outlier``, ``threshold``, ``outlier_condition``, ``overlap``.
    """
    z, g = sp.symbols("z g")
    theta, v = sp.symbols("theta v", positive=True)
    eq = v * g**2 + z * g + 1
    roots = sp.solve(eq, g)
    branch = _single([r for r in roots if sp.limit(z * r, z, sp.oo) == -1],
                     "the branch with g ~ -1/z")
    disc = sp.discriminant(eq, g)
    edge = max(sp.solve(sp.Eq(disc, 0), z), key=lambda e: e.subs(v, 1))
    outlier = sp.simplify(_single(sp.solve(eq.subs(g, -1 / theta), z), "z(theta)"))
    threshold = _single(sp.solve(sp.diff(outlier, theta), theta), "z'(theta) = 0")
    edge_check = sp.simplify(outlier.subs(theta, threshold) - edge)
    if edge_check != 0:  # pragma: no cover - guards the derivation
        raise RuntimeError(f"outlier at threshold differs from the edge by {edge_check}")
    g_prime = -sp.diff(eq, z) / sp.diff(eq, g)  # implicit differentiation
    g_prime_at = sp.simplify(g_prime.subs(g, -1 / theta).subs(z, outlier))
    overlap = sp.simplify(sp.expand(1 / (theta**2 * g_prime_at)))
    return _make(
        "spiked Wigner (BBP for the semicircle)",
        {"z": z, "g": g, "theta": theta, "v": v},
        {
            "stieltjes_equation": sp.Eq(eq, 0),
            "stieltjes": branch,
            "edge": edge,
            "outlier": outlier,
            "threshold": threshold,
            "outlier_condition": sp.StrictGreaterThan(theta, threshold),
            "overlap": overlap,
        },
    )


# --------------------------------------------------------------------------- spiked Wishart

@functools.lru_cache(maxsize=None)
def derive_spiked_wishart() -> Derivation:
    """BBP outlier, threshold and overlap for ``S = Σ^{1/2}XXᵀΣ^{1/2}/n``, ``q = p/n``.

    Population ``Σ`` has bulk eigenvalue σ² and one spike ℓ.

    1. Silverstein–Bai equation for ``H = δ_{σ²}``:
       ``m = 1/(σ²(1 − q − q z m) − z)``, i.e. the MP quadratic
       ``qσ² z m² + (z − σ²(1 − q)) m + 1 = 0``; its discriminant gives the edges
       ``σ²(1 ± √q)²``.
    2. Companion transform ``m̲ = −(1 − q)/z + q m`` (of ``XᵀΣX/n``); eliminating m and
       solving for z gives the inverse ``z(m̲) = −1/m̲ + qσ²/(1 + σ² m̲)``.
    3. A population spike ℓ gives a sample outlier where ``1 + ℓ m̲(z) = 0``
       (Baik–Silverstein 2006): ``ψ(ℓ) = z(−1/ℓ) = ℓ(1 + qσ²/(ℓ − σ²))``.
    4. Threshold: ψ is the outlier only where increasing; ``ψ'(ℓ) = 0`` at
       ``ℓ_c = σ²(1 + √q)`` and ``ψ(ℓ_c) = σ²(1 + √q)²`` is the right MP edge.
    5. Overlap of the sample and population spike eigenvectors:
       ``ℓψ'(ℓ)/ψ(ℓ) = (1 − qσ⁴/(ℓ − σ²)²)/(1 + qσ²/(ℓ − σ²))`` (Paul 2007; the general
       ``αψ'(α)/ψ(α)`` form of Bai–Yao / Mestre 2008).

    exprs: ``mp_equation``, ``edge_right``, ``edge_left``, ``companion_inverse``,
    ``outlier``, ``threshold``, ``outlier_condition``, ``overlap``.
    """
    z, m = sp.symbols("z m")
    mc = sp.Symbol(r"\underline{m}")
    ell, q, s2 = sp.symbols("ell q sigma^2", positive=True)
    # 1. Silverstein–Bai with a point-mass population at sigma^2, cleared of denominators
    sb = sp.expand(m * (s2 * (1 - q - q * z * m) - z) - 1)
    mp_eq = sp.expand(-sb)  # q s2 z m^2 + (z - s2 (1 - q)) m + 1
    edges = sp.solve(sp.Eq(sp.discriminant(mp_eq, m), 0), z)
    edges = sorted(edges, key=lambda e: float(e.subs({s2: 1, q: sp.Rational(1, 4)})))
    edge_left, edge_right = [sp.factor(e) for e in edges]
    # 2. companion transform; solve for z as a function of mc
    in_mc = sp.together(mp_eq.subs(m, (mc + (1 - q) / z) / q))
    num = sp.factor(sp.numer(in_mc))
    z_sols = [s for s in sp.solve(num, z) if s != 0]
    z_of_mc = sp.simplify(_single(z_sols, "z(m_companion)"))
    # 3. outlier from 1 + ell * m_companion = 0
    outlier = sp.factor(sp.simplify(z_of_mc.subs(mc, -1 / ell)))
    # 4. threshold: psi'(ell) = 0 on ell > sigma^2
    crit = sp.solve(sp.diff(outlier, ell), ell)
    thr = [c for c in crit if sp.simplify(c - s2).subs({s2: 1, q: sp.Rational(1, 4)}) > 0]
    threshold = sp.factor(_single(thr, "psi'(ell) = 0 above sigma^2"))
    edge_check = sp.simplify(outlier.subs(ell, threshold) - edge_right)
    if edge_check != 0:  # pragma: no cover
        raise RuntimeError(f"outlier at threshold differs from the edge by {edge_check}")
    overlap = sp.factor(sp.simplify(ell * sp.diff(outlier, ell) / outlier))
    return _make(
        "spiked Wishart (BBP)",
        {"z": z, "m": m, "m_companion": mc, "ell": ell, "q": q, "sigma2": s2},
        {
            "mp_equation": sp.Eq(mp_eq, 0),
            "edge_left": edge_left,
            "edge_right": edge_right,
            "companion_inverse": z_of_mc,
            "outlier": outlier,
            "threshold": threshold,
            "outlier_condition": sp.StrictGreaterThan(ell, threshold),
            "overlap": overlap,
        },
    )


# --------------------------------------------------------------------------- momentum

@functools.lru_cache(maxsize=None)
def derive_momentum_factors() -> Derivation:
    """Stability limits ``α·h < F`` of heavy-ball, EMA and Nesterov momentum on ``f = h x²/2``.

    Write each method as a linear map on ``(x_t, ·)``; its characteristic polynomial is
    ``p(μ) = μ² − T μ + D``, and (Jury) both roots lie in the unit disc iff ``|D| < 1``,
    ``p(1) > 0`` and ``p(−1) > 0``. For heavy ball and EMA ``D = ρ`` (resp. β₁) < 1 and
    ``p(1) = αh > 0`` (resp. ``(1 − β₁)αh``), so the only way a root leaves the unit disc
    as α grows is through ``μ = −1``; solving ``p(−1) = 0`` for ``α h`` gives ``F``. For
    Nesterov ``D = ρ(1 − αh)`` depends on α, but ``|D| ≤ ρ < 1`` for ``0 < αh ≤ 2`` and
    ``p(1) = αh > 0``, and its ``p(−1) = 0`` root ``F_N ≤ 2``, so there too the first exit
    is through −1:

    * heavy ball ``x⁺ = x − αh x + ρ(x − x⁻)``: ``F = 2(1 + ρ)``;
    * EMA ``m⁺ = β₁m + (1 − β₁)h x``, ``x⁺ = x − α m⁺``: ``F = 2(1 + β₁)/(1 − β₁)``;
    * Nesterov as torch (``v⁺ = ρv + g``, ``x⁺ = x − α(g + ρv⁺)``; state (x, v), the map
      of :func:`derive_nesterov_mean_square` without noise): ``F = 2(1 + ρ)/(1 + 2ρ)``.

    exprs: ``heavy_ball``, ``ema``, ``nesterov`` (each F) and ``<kind>_charpoly``.
    """
    alpha, h = sp.symbols("alpha h", positive=True)
    rho, beta1 = sp.symbols("rho beta1", nonnegative=True)
    mu = sp.Symbol("mu")
    hb = sp.Matrix([[1 + rho - alpha * h, -rho], [1, 0]])  # (x_t, x_{t-1})
    ema = sp.Matrix([[1 - alpha * (1 - beta1) * h, -alpha * beta1],
                     [(1 - beta1) * h, beta1]])  # (x_t, m_t)
    nag = sp.Matrix([[1 - alpha * (1 + rho) * h, -alpha * rho**2],
                     [h, rho]])  # (x_t, v_t): x⁺ = x − α(1 + ρ)h x − αρ²v, v⁺ = h x + ρv
    out = {}
    for key, M in (("heavy_ball", hb), ("ema", ema), ("nesterov", nag)):
        p = M.charpoly(mu).as_expr()
        a = _single(sp.solve(p.subs(mu, -1), alpha), f"{key} boundary")
        out[f"{key}_charpoly"] = p
        out[key] = sp.factor(sp.simplify(a * h))
    return _make("momentum stability factors",
                 {"alpha": alpha, "h": h, "rho": rho, "beta1": beta1, "mu": mu}, out)


# --------------------------------------------------------------------------- lr laws

def _lr_symbols():
    B, N, lam, s2 = sp.symbols("B N lambda s^2", positive=True)
    g2, gv, eps = sp.symbols("gbar^2 sigma_g^2 epsilon", positive=True)
    rho, beta1 = sp.symbols("rho beta1", nonnegative=True)
    return dict(B=B, N=N, lam=lam, s2=s2, g2=g2, gv=gv, eps=eps, rho=rho, beta1=beta1)


@functools.lru_cache(maxsize=None)
def derive_lr_laws() -> Derivation:
    """Stability-limit learning rate as a function of batch size (docs/theory.md §5).

    The batch curvature ``λ'(B) = λ + c s²/λ`` with ``c = 1/B − 1/N``; the boundary
    ``α·λ_eff = F`` is solved for α, F taken from :func:`derive_momentum_factors`:

    * SGD (heavy-ball ρ): ``λ_eff = λ'`` → ``α = 2(1 + ρ)/(λ + c s²/λ)``;
    * Adam (EMA β₁, isotropic preconditioner ``1/(√(ḡ² + c σ_g²) + ε)``):
      ``λ_eff = λ'/(√(ḡ² + c σ_g²) + ε)`` →
      ``α = 2(1 + β₁)/(1 − β₁)·(√(ḡ² + c σ_g²) + ε)/(λ + c s²/λ)``.

    exprs: ``c``, ``batch_curvature``, ``sgd``, ``adam`` (with finite N) and
    ``sgd_inf``, ``adam_inf`` (N = ∞), ``sgd_at_N`` (= 2(1+ρ)/λ).
    """
    S = _lr_symbols()
    B, N, lam, s2 = S["B"], S["N"], S["lam"], S["s2"]
    alpha = sp.Symbol("alpha", positive=True)
    mf = derive_momentum_factors()
    F_hb = mf.exprs["heavy_ball"].subs(mf.symbols["rho"], S["rho"])
    F_ema = mf.exprs["ema"].subs(mf.symbols["beta1"], S["beta1"])
    c = 1 / B - 1 / N
    lam_b = lam + c * s2 / lam
    precond = sp.sqrt(S["g2"] + c * S["gv"]) + S["eps"]
    sgd = _single(sp.solve(sp.Eq(alpha * lam_b, F_hb), alpha), "SGD boundary")
    adam = _single(sp.solve(sp.Eq(alpha * lam_b / precond, F_ema), alpha), "Adam boundary")
    exprs = {
        "c": c,
        "batch_curvature": lam_b,
        "sgd": sgd,
        "adam": adam,
        "sgd_inf": sp.simplify(sp.limit(sgd, N, sp.oo)),
        "adam_inf": sp.limit(adam, N, sp.oo),
        "sgd_at_N": sp.simplify(sgd.subs(B, N)),
    }
    return _make("learning rate vs batch size", {**S, "alpha": alpha}, exprs)


_OPTIMIZERS = ("sgd", "adam")


def lr_scaling_exponent(optimizer: str, *, finite_N: bool = False, regime: str = "small"):
    """Exponent ``k`` of ``α_max(B) ∝ B^k``, derived by a sympy limit.

    ``k = lim d log α / d log B = lim B α'(B)/α(B)`` as ``B → 0⁺`` (``regime="small"``)
    or ``B → ∞`` (``regime="large"``, N = ∞ only), for the stability-limit laws of
    :func:`derive_lr_laws` (with N = ∞, or N kept symbolic if ``finite_N``).
    Returns a sympy number: ``'sgd'`` → 1 (linear scaling), ``'adam'`` → 1/2
    (square-root scaling); both → 0 at large B (saturation). ``optimizer`` is
    case-insensitive; anything else raises ValueError (TypeError if not a str).
    """
    if not isinstance(optimizer, str):
        raise TypeError(f"optimizer must be a str, got {type(optimizer).__name__}")
    key = optimizer.lower()
    if key not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    finite_N = as_bool("finite_N", finite_N)
    if regime not in ("small", "large"):
        raise ValueError(f"regime must be 'small' or 'large', got {regime!r}")
    if regime == "large" and finite_N:
        raise ValueError("regime='large' needs finite_N=False (B cannot exceed N)")
    return _scaling_exponent(key, finite_N, regime)


@functools.lru_cache(maxsize=None)
def _scaling_exponent(key: str, finite_N: bool, regime: str):
    d = derive_lr_laws()
    B = d.symbols["B"]
    alpha = d.exprs[key] if finite_N else d.exprs[f"{key}_inf"]
    return _elasticity_limit(alpha, B, 0 if regime == "small" else sp.oo)


def _elasticity_limit(alpha, B, point):
    """lim d log α / d log B = lim B α'(B)/α(B) as B → point (0⁺ or ∞)."""
    elasticity = sp.simplify(B * sp.diff(alpha, B) / alpha)
    return sp.limit(elasticity, B, point, "+") if point == 0 else sp.limit(elasticity, B, point)


# --------------------------------------------------------------------------- directional

@functools.lru_cache(maxsize=None)
def derive_directional_stability() -> Derivation:
    """Mean-square stability of one SGD step along the outlier direction u (docs/theory.md §5).

    With ``H u = λu``, ``H_B = H + ε``, ``e₁ = uᵀεu`` (mean 0) and ``e₂ = ‖εu‖²``
    (mean ``c s²``): ``‖(I − αH_B)u‖² = 1 − 2α(λ + e₁) + α²(λ² + 2λe₁ + e₂)``; its
    expectation is ``1 − 2αλ + α²(λ² + c s²)``; ``< 1`` for ``0 < α < 2λ/(λ² + c s²)``,
    which equals ``2/(λ + c s²/λ)`` (the directional SGD limit).
    """
    alpha, lam, s2, c = sp.symbols("alpha lambda s_u^2 c", positive=True)
    e1, e2 = sp.symbols("e1 e2", real=True)
    sq_norm = 1 - 2 * alpha * (lam + e1) + alpha**2 * (lam**2 + 2 * lam * e1 + e2)
    mean_sq = sp.expand(sq_norm.subs({e1: 0, e2: c * s2}))
    roots = [r for r in sp.solve(sp.Eq(mean_sq, 1), alpha) if r != 0]
    bound = sp.simplify(_single(roots, "nonzero root"))
    same = sp.simplify(bound - 2 / (lam + c * s2 / lam))
    return _make("directional mean-square stability",
                 {"alpha": alpha, "lam": lam, "s2": s2, "c": c, "e1": e1, "e2": e2},
                 {"mean_square": mean_sq, "condition": sp.StrictLessThan(mean_sq, 1),
                  "alpha_max": bound, "difference_from_directional": same})


@functools.lru_cache(maxsize=None)
def derive_momentum_mean_square() -> Derivation:
    """Mean-square stability of heavy-ball SGD with multiplicative batch noise.

    **Directional (one-direction) form.** Along the outlier u the iteration is
    ``x_{t+1} = a_t x_t − ρ x_{t−1}``, ``a_t = 1 + ρ − α h_t``, with the batch curvature
    ``h_t`` independent across steps, mean λ and variance ``σ² = c(B,N)·s_u²`` (the same
    ``uᵀE[ε²]u`` as the SGD directional form; without-replacement batches). The second
    moments ``(P, Q, R) = (E x_t², E x_t x_{t−1}, E x_{t−1}²)`` evolve by a 3×3 linear map
    ``M``; it is a positive map, so its spectral radius is an eigenvalue and the boundary
    is ``det(M − I) = 0``. Its nonzero root is

        α* = 2(1 + ρ)λ / (λ² + (1 + ρ)/(1 − ρ)·c s²)  =  2(1 + ρ)/λ'_ρ(B),
        λ'_ρ(B) = λ + (1 + ρ)/(1 − ρ)·c s²/λ:

    momentum multiplies the numerator by (1 + ρ) but the noise term by (1 + ρ)/(1 − ρ)
    (19 at ρ = 0.9). ρ = 0 gives ``2/λ'`` and σ² = 0 gives ``2(1 + ρ)/λ``.

    **Exact (matrix) form.** For ``e_{t+1} = ((1+ρ)I − αH_B)e_t − ρe_{t−1}`` the fixed
    point of the second-moment map, written in the eigenbasis of ``H`` (entries j, k with
    curvatures λ_j, λ_k), reads ``α L_jk P_jk = α²(K_jk P_jk + E[εPε]_jk)`` with

        L_jk = (1 − ρ)(λ_j + λ_k),
        K_jk = λ_jλ_k − ρ(λ_j² + λ_k² − 2ρλ_jλ_k)/(1 − ρ²),

    derived here from the cross moment ``C = E e_t e_{t−1}ᵀ`` (``C + ρCᵀ = ĀP``). So the
    threshold is ``α* = 1/μ_max`` of the symmetric pencil ``(K∘ + E[ε·ε], L∘)``
    (`nets.learning_rates.stability.ms_stability_threshold`, ``method="pencil"``); at ρ = 0
    ``K∘P = HPH`` and it is the SGD pencil.

    exprs: ``second_moment_map`` (M), ``alpha_max``, ``effective_curvature`` (λ'_ρ),
    ``noise_gain`` ((1+ρ)/(1−ρ)), ``alpha_max_rho0`` and ``alpha_max_noiseless`` (limits),
    ``L`` and ``K`` (exact form), ``K_rho0``.
    """
    alpha, lam, c, s2 = sp.symbols("alpha lambda c s_u^2", positive=True)
    rho = sp.Symbol("rho", nonnegative=True)
    sig2 = c * s2
    abar = 1 + rho - alpha * lam
    a2 = abar**2 + alpha**2 * sig2                     # E a_t²
    M = sp.Matrix([[a2, -2 * rho * abar, rho**2],      # P' = E a² P − 2ρ ā Q + ρ² R
                   [abar, -rho, 0],                     # Q' = ā P − ρ Q
                   [1, 0, 0]])                          # R' = P
    det = sp.factor((M - sp.eye(3)).det())
    roots = [r for r in sp.solve(det, alpha) if sp.simplify(r) != 0]
    a_star = sp.factor(sp.simplify(_single(roots, "nonzero mean-square root")))
    gain = (1 + rho) / (1 - rho)
    lam_eff = lam + gain * c * s2 / lam
    # exact form: elementwise coefficients of the fixed-point equation
    lj, lk, Pjk = sp.symbols("lambda_j lambda_k P_jk", positive=True)
    Cjk, Ckj = sp.symbols("C_jk C_kj")
    aj, ak = 1 + rho - alpha * lj, 1 + rho - alpha * lk
    sol = sp.solve([sp.Eq(Cjk + rho * Ckj, aj * Pjk), sp.Eq(Ckj + rho * Cjk, ak * Pjk)],
                   [Cjk, Ckj], dict=True)[0]
    D = sp.expand(sp.simplify((1 - rho**2 - aj * ak + rho * (aj * sol[Cjk] + ak * sol[Ckj]) / Pjk)
                              * (1 - rho**2)) / (1 - rho**2))
    D = sp.simplify(D)
    L = sp.factor(sp.simplify(sp.diff(D, alpha).subs(alpha, 0)))
    K = sp.simplify(-sp.diff(D, alpha, 2) / 2)
    exprs = {
        "second_moment_map": M,
        "boundary_determinant": det,
        "alpha_max": a_star,
        "effective_curvature": lam_eff,
        "noise_gain": gain,
        "difference_from_closed_form": sp.simplify(a_star - 2 * (1 + rho) / lam_eff),
        "alpha_max_rho0": sp.simplify(a_star.subs(rho, 0)),
        "alpha_max_noiseless": sp.simplify(a_star.subs(s2, 0)),
        "L": L,
        "K": K,
        "K_rho0": sp.simplify(K.subs(rho, 0)),
    }
    return _make("heavy-ball mean-square stability",
                 {"alpha": alpha, "lam": lam, "c": c, "s2": s2, "rho": rho,
                  "lambda_j": lj, "lambda_k": lk}, exprs)


def _root_factored(expr):
    """Simplify with every square root's radicand factored first (√((3ρ + 1)²) → 3ρ + 1
    for ρ ≥ 0, which `sp.simplify` alone leaves)."""
    expr = expr.replace(lambda a: isinstance(a, sp.Pow) and a.exp == sp.S.Half,
                        lambda a: sp.sqrt(sp.factor(a.base)))
    return sp.factor(sp.simplify(expr))


@functools.lru_cache(maxsize=None)
def derive_nesterov_mean_square() -> Derivation:
    """Mean-square stability of Nesterov SGD with multiplicative batch noise (one direction).

    torch's Nesterov (dampening 0): ``v⁺ = ρv + g``, ``w⁺ = w − α(g + ρv⁺)``. Along the
    outlier u with ``g = h_t w`` (batch curvature h_t independent across steps, mean λ,
    variance ``σ² = c(B,N)·s_u²``) the state (w, v) evolves by

        w⁺ = (1 − α(1 + ρ)h_t) w − αρ² v,   v⁺ = h_t w + ρ v,

    in which h_t multiplies only the current state (the position-only form of Nesterov has
    h_t and h_{t−1} in one step, correlated coefficients; this one has none). The second
    moments ``(P, Q, R) = (E w², E wv, E v²)`` follow a 3×3 linear map ``M``; ``det(M − I)``
    is α times a quadratic ``a α² + b α − 2λ(1 − ρ²)`` with ``a = ρ(1 + 2ρ)λ(λ² + σ²) > 0``,
    so exactly one root is positive:

        α* = 4λ(1 − ρ²) / (b + √(b² + 8ρ(1 + 2ρ)(1 − ρ²)λ²(λ² + σ²))),
        b = (1 + ρ)σ² + (1 − ρ − 4ρ²)λ².

    (That the spectral radius of M crosses 1 there, and not earlier through a complex pair,
    is checked numerically in the tests.) ρ = 0 gives ``2λ/(λ² + σ²) = 2/λ'`` and σ² = 0
    the deterministic (Jury) limit ``2(1 + ρ)/((1 + 2ρ)λ)``; the small-noise expansion
    ``α* ≈ F_N/(λ + g_N σ²/λ)``, ``F_N = 2(1 + ρ)/(1 + 2ρ)``, has the noise gain
    ``g_N = (1 + ρ)(1 + 2ρ)/(1 + 3ρ)`` (exprs ``noise_gain``; 1.44 at ρ = 0.9 against
    heavy ball's (1 + ρ)/(1 − ρ) = 19), while for large noise ``α* → 2(1 − ρ)λ/σ²``, the
    same noise-dominated limit as heavy ball: the effective curvature ``F_N/α*`` is not
    linear in σ² (``rmt.lr.sgd_nesterov_ms_max_lr``).

    exprs: ``second_moment_map``, ``quadratic`` (the factor of det(M − I)/α), ``alpha_max``,
    ``difference_from_closed_form`` (the root sympy's ``solve`` returns minus the closed
    form above, simplified symbolically: 0 as an identity in λ, c, s², ρ; the root is
    picked as the one equal to the closed form at one rational point), ``alpha_max_rho0``,
    ``alpha_max_noiseless``, ``noise_gain``.
    """
    alpha, lam, c, s2 = sp.symbols("alpha lambda c s_u^2", positive=True)
    rho = sp.Symbol("rho", nonnegative=True)
    sig2 = c * s2
    Eh, Eh2 = lam, lam**2 + sig2
    A1 = 1 - alpha * (1 + rho) * Eh                          # E A_t, A_t = 1 − α(1+ρ)h_t
    A2 = 1 - 2 * alpha * (1 + rho) * Eh + alpha**2 * (1 + rho) ** 2 * Eh2   # E A_t²
    Ah = Eh - alpha * (1 + rho) * Eh2                        # E A_t h_t
    k = alpha * rho**2
    M = sp.Matrix([[A2, -2 * k * A1, k**2],                  # P' = E(Aw − kv)²
                   [Ah, rho * A1 - k * Eh, -k * rho],         # Q' = E(Aw − kv)(hw + ρv)
                   [Eh2, 2 * rho * Eh, rho**2]])              # R' = E(hw + ρv)²
    det = sp.factor((M - sp.eye(3)).det())
    quad = sp.expand(sp.cancel(det / alpha))
    roots = sp.solve(quad, alpha)
    b = (1 + rho) * sig2 + (1 - rho - 4 * rho**2) * lam**2
    closed = 4 * lam * (1 - rho**2) / (
        b + sp.sqrt(b**2 + 8 * rho * (1 + 2 * rho) * (1 - rho**2) * lam**2 * (lam**2 + sig2)))
    # the positive root: the one that the closed form equals at a generic point (which of
    # the two roots; the identity itself is then checked symbolically, exprs
    # difference_from_closed_form)
    point = {lam: sp.Rational(7, 10), c: sp.Rational(1, 10), s2: 3, rho: sp.Rational(9, 10)}
    a_star = _single([r for r in roots if abs(float((r - closed).subs(point))) < 1e-12],
                     "positive Nesterov root")
    F = 2 * (1 + rho) / (1 + 2 * rho)
    x = sp.Symbol("x", positive=True)                         # x = σ²/λ², small
    lam_eff_over_lam = sp.series((F / (closed * lam)).subs(s2, x * lam**2 / c), x, 0, 2).removeO()
    gain = _root_factored(sp.diff(lam_eff_over_lam, x))
    exprs = {
        "second_moment_map": M,
        "quadratic": quad,
        "alpha_max": closed,
        "difference_from_closed_form": sp.simplify(a_star - closed),
        "alpha_max_rho0": sp.simplify(closed.subs(rho, 0)),
        "alpha_max_noiseless": _root_factored(closed.subs(s2, 0)),
        "noise_gain": gain,
    }
    return _make("Nesterov mean-square stability",
                 {"alpha": alpha, "lam": lam, "c": c, "s2": s2, "rho": rho}, exprs)


@functools.lru_cache(maxsize=None)
def derive_adam_mean_square() -> Derivation:
    """Mean-square stability of Adam with a frozen preconditioner (EMA momentum β₁).

    With D frozen, Adam on the preconditioned curvature is ``m ← β₁m + (1−β₁)g``,
    ``z ← z − α m``; with ``m = (1−β₁)v`` this is heavy ball ``v ← β₁v + g``,
    ``z ← z − α(1−β₁)v``. The boundary of :func:`derive_momentum_mean_square` (its 3×3
    second-moment map, ρ = β₁) with the step ``α(1−β₁)`` substituted is solved for α:

        α* = F/λ̃'_β,   F = 2(1+β₁)/(1−β₁),   λ̃'_β = λ̃ + (1+β₁)/(1−β₁)·c s̃²/λ̃.

    β₁ = 0 gives ``2/(λ̃ + c s̃²/λ̃)`` (the deterministic form with the batch shift).
    Noise model of the warmed state: an isotropic preconditioner ``1/√(ḡ² + c σ_g²)``
    (ε = 0) scales the curvature by it and the noise by its square, λ̃ = λ/√(ḡ² + cσ_g²),
    s̃² = s²/(ḡ² + cσ_g²); with N = ∞ the small-B exponent of α* is derived by a limit
    (1/2: the square-root rule) and the small-B limit ``2λσ_g√B/s²`` does not depend on
    β₁; the noise term equals λ̃ at ``B = (1+β₁)/(1−β₁)·s²/λ²``, the batch size up to
    which momentum keeps the noise-dominated (√B) regime.

    exprs: ``alpha_max`` (in λ̃, s̃², c), ``difference_from_closed_form``,
    ``alpha_max_beta0``, ``noise_model`` (α* with the isotropic preconditioner, N = ∞),
    ``small_B_exponent``, ``small_B_limit``, ``noise_crossover_batch_size``.
    """
    hb = derive_momentum_mean_square()
    a_hb, lam, c, s2, rho = (hb.symbols[k] for k in ("alpha", "lam", "c", "s2", "rho"))
    alpha = sp.Symbol("alpha", positive=True)
    beta1 = sp.Symbol("beta1", nonnegative=True)
    det = hb.exprs["boundary_determinant"].subs({a_hb: alpha * (1 - beta1), rho: beta1})
    roots = [r for r in sp.solve(det, alpha) if sp.simplify(r) != 0]
    a_star = sp.factor(sp.simplify(_single(roots, "nonzero Adam mean-square root")))
    F = 2 * (1 + beta1) / (1 - beta1)
    closed = F / (lam + (1 + beta1) / (1 - beta1) * c * s2 / lam)
    # noise model: isotropic preconditioner 1/√(ḡ² + c σ_g²), N = ∞ (c = 1/B)
    B, lam0, s20, g2, gv = sp.symbols("B lambda_H s_H^2 gbar^2 sigma_g^2", positive=True)
    p = sp.sqrt(g2 + gv / B)
    model = sp.simplify(a_star.subs({lam: lam0 / p, s2: s20 / p**2, c: 1 / B}))
    exponent = sp.simplify(_elasticity_limit(model, B, 0))
    small = sp.simplify(sp.limit(model / sp.sqrt(B), B, 0, "+") * sp.sqrt(B))
    noise_eq = sp.Eq(lam0 / p, (1 + beta1) / (1 - beta1) * (s20 / p**2) / B / (lam0 / p))
    crossover = sp.simplify(_single(sp.solve(noise_eq, B), "noise crossover"))
    exprs = {
        "alpha_max": a_star,
        "difference_from_closed_form": sp.simplify(a_star - closed),
        "alpha_max_beta0": sp.simplify(a_star.subs(beta1, 0)),
        "noise_model": model,
        "small_B_exponent": exponent,
        "small_B_limit": small,
        "noise_crossover_batch_size": crossover,
    }
    return _make("Adam mean-square stability (frozen preconditioner)",
                 {"alpha": alpha, "lam": lam, "c": c, "s2": s2, "beta1": beta1, "B": B,
                  "lambda_H": lam0, "s2_H": s20, "g2": g2, "gv": gv}, exprs)


@functools.lru_cache(maxsize=None)
def derive_critical_batch_size() -> Derivation:
    """Batch size where the SGD stability limit is half its saturated value ``2/λ``.

    Solves ``α(B) = (2/λ)/2`` for B using :func:`derive_lr_laws` (ρ = 0): ``B* = s²/λ²``
    for N = ∞, and ``B*_N = 1/(λ²/s² + 1/N)`` (= ``B*N/(B* + N)``) for finite N.
    """
    d = derive_lr_laws()
    B, rho = d.symbols["B"], d.symbols["rho"]
    sat = d.exprs["sgd_at_N"].subs(rho, 0)
    b_inf = _single(sp.solve(sp.Eq(d.exprs["sgd_inf"].subs(rho, 0), sat / 2), B), "B* (N=inf)")
    b_fin = _single(sp.solve(sp.Eq(d.exprs["sgd"].subs(rho, 0), sat / 2), B), "B* (finite N)")
    return _make("critical batch size", dict(d.symbols),
                 {"saturated_lr": sat, "critical_batch_size": sp.simplify(b_inf),
                  "critical_batch_size_finite_N": sp.simplify(b_fin)})
