"""Spiked Wishart (sample covariance) model, the BBP transition (Baik, Ben Arous &
Péché 2005; Paul 2007; docs/references.md "Spiked models"; docs/theory.md §4).

S = X Xᵀ/n, X p×n with columns N(0, Σ), Σ = σ²·diag(ℓ/σ², 1, …, 1): population spike
ℓ on a bulk of scale σ² (= noise_var), ratio q = p/n (= ratio).  In units λ/σ² the
model is the standard one with spike L = ℓ/σ²:

    top eigenvalue → ℓ(1 + qσ²/(ℓ − σ²))     if ℓ > σ²(1 + √q),  else σ²(1 + √q)²,
    squared overlap → (1 − q/(L − 1)²)/(1 + q/(L − 1))  above threshold, else 0,
    √n(λ/σ² − ψ) → N(0, (2/β) L² (1 − q/(L − 1)²)).

The model is multiplicative (free multiplicative convolution with MP), so ℓ < 0 has no
meaning here; "negative spikes" are handled symmetrically by the additive models only.
ratio = 0 (no sampling noise: a batch of the whole data, B = N, as `mp_edges` allows) is
the population itself: the spike ℓ (if above σ²), overlap 1.
A spike below the bulk (0 < ℓ < σ²(1 − √q), q < 1) gives a bottom outlier
ℓ(1 + qσ²/(ℓ − σ²)) < σ²(1 − √q)²: ``side="bottom"`` returns it (or the left edge).
"""

from __future__ import annotations

import math

from .validation import as_float, guard_module


def _args(spike, ratio, noise_var):
    ell = as_float("spike", spike, positive=True)
    q = as_float("ratio", ratio, nonnegative=True)     # 0: no sampling noise (B = N)
    s2 = as_float("noise_var", noise_var, positive=True)
    return ell, q, s2


def _psi(L, q):
    return L * (1.0 + q / (L - 1.0))


def spiked_wishart_outlier(spike, ratio, noise_var=1.0, side: str = "top") -> float:
    """BBP limit of the top eigenvalue (``side="top"``) or of the bottom eigenvalue of
    the continuous part (``side="bottom"``, q < 1 only) of the spiked sample covariance."""
    ell, q, s2 = _args(spike, ratio, noise_var)
    L = ell / s2
    rq = math.sqrt(q)
    if side == "top":
        return s2 * _psi(L, q) if L > 1.0 + rq else s2 * (1.0 + rq) ** 2
    if side == "bottom":
        if q >= 1.0:
            raise ValueError("ratio must be < 1 for a bottom outlier (for q ≥ 1 the bottom is the atom at 0)")
        return s2 * _psi(L, q) if L < 1.0 - rq else s2 * (1.0 - rq) ** 2
    raise ValueError(f"side must be 'top' or 'bottom', got {side!r}")


def spiked_wishart_overlap(spike, ratio, noise_var=1.0) -> float:
    """Squared overlap of the top sample eigenvector with the population spike direction:
    (1 − q/(L − 1)²)/(1 + q/(L − 1)), L = ℓ/σ², above threshold; 0 below."""
    ell, q, s2 = _args(spike, ratio, noise_var)
    L = ell / s2
    if L <= 1.0 + math.sqrt(q):
        return 0.0
    return (1.0 - q / (L - 1.0) ** 2) / (1.0 + q / (L - 1.0))


def spiked_wishart_outlier_variance(spike, ratio, n, noise_var=1.0, beta=1.0) -> float:
    """Variance of the top eigenvalue at sample size n >= 1 (need not be an integer):
    σ⁴(2/β)L²(1 − q/(L − 1)²)/n."""
    ell, q, s2 = _args(spike, ratio, noise_var)
    n = as_float("n", n, positive=True)
    if n < 1:                    # as spiked_wigner_outlier_variance: a sample size is >= 1
        raise ValueError(f"n (the sample size) must be >= 1, got {n}")
    beta = as_float("beta", beta, positive=True)
    L = ell / s2
    if L <= 1.0 + math.sqrt(q):
        raise ValueError("spike must be above the BBP threshold σ²(1 + √ratio)")
    return s2 ** 2 * (2.0 / beta) * L * L * (1.0 - q / (L - 1.0) ** 2) / n


# every public function above: errors name the caller's arguments, results are finite
guard_module(globals())
