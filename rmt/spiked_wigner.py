"""Spiked Wigner model W + θ·v vᵀ, W with semicircle law of variance σ² (= noise_var).

Theorem (Féral & Péché 2007; Benaych-Georges & Nadakuditi 2011; docs/references.md "Spiked
models"; docs/theory.md §2): as n → ∞,

    top eigenvalue → θ + σ²/θ        if θ > σ,   else the edge 2σ,
    |⟨v, v̂⟩|²      → 1 − σ²/θ²       if θ > σ,   else 0,
    √n(λ − (θ + σ²/θ)) → N(0, (2/β) σ² (1 − σ²/θ²))   above threshold.

This is 1 + θ g(z) = 0 with the semicircle g (outliers.py) in closed form.  Negative
spikes are symmetric: they produce an outlier θ + σ²/θ < −2σ below the bulk (the
returned value is then the *bottom* eigenvalue), or the left edge −2σ.
"""

from __future__ import annotations

import math

from .validation import as_bool, as_float, guard_module


def spiked_wigner_outlier(spike, noise_var, clip=True) -> float:
    """Limit of the extreme eigenvalue on the side of the spike θ.

    Returns θ + v/θ if |θ| > √v; otherwise ±2√v (the bulk edge on the side of sign θ,
    + for θ = 0) when ``clip`` is True, or θ + v/θ regardless when ``clip`` is False
    (the unclipped formula; infinite at θ = 0 is refused).  ``noise_var`` = v ≥ 0 is the
    variance of the semicircle (edges ±2√v).
    """
    theta = as_float("spike", spike)
    v = as_float("noise_var", noise_var, nonnegative=True)
    clip = as_bool("clip", clip)
    if v == 0.0:
        return theta
    if clip and theta * theta <= v:
        return math.copysign(2.0 * math.sqrt(v), theta) if theta != 0 else 2.0 * math.sqrt(v)
    if theta == 0.0:
        raise ValueError("spike must be non-zero when clip=False (θ + v/θ diverges)")
    return theta + v / theta


def spiked_wigner_overlap(spike, noise_var) -> float:
    """Limit of the squared overlap |⟨v, v̂⟩|² = 1 − v/θ² above threshold, 0 below."""
    theta = as_float("spike", spike)
    v = as_float("noise_var", noise_var, nonnegative=True)
    if theta * theta <= v:
        return 0.0 if v > 0 else 1.0
    return 1.0 - v / (theta * theta)


def spiked_wigner_outlier_variance(spike, noise_var, n, beta=1.0) -> float:
    """Variance of the outlier at size n: (2/β)·v·(1 − v/θ²)/n above threshold
    (docs/references.md; the spike along a delocalised or e₁ direction of a GOE/GUE)."""
    theta = as_float("spike", spike)
    v = as_float("noise_var", noise_var, nonnegative=True)
    n = as_float("n", n, positive=True)
    if n < 1:
        raise ValueError(f"n (the matrix size) must be >= 1, got {n}")
    beta = as_float("beta", beta, positive=True)
    if theta * theta <= v:
        raise ValueError("spike must be above the threshold |θ| > √noise_var")
    return (2.0 / beta) * v * (1.0 - v / theta ** 2) / n


# every public function above: errors name the caller's arguments, results are finite
guard_module(globals())
