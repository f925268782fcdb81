"""The paper's theorem (docs/theory.md §2): extremal eigenvalues of the batch Hessian.

Model: H_B = H + ε, with ε a Wigner-type matrix whose P×P entries have equal variance
c(B, N)·σ² (``sigma2`` = per-sample variance of one Hessian entry, c from
``batch_noise_factor``).  Its spectrum is a semicircle of variance v = P·c(B, N)·σ².
H's outliers λ₁ (top) and λ_P (bottom) move to the spiked-Wigner limits

    λ'₁ = λ₁ + v/λ₁  if λ₁ > √v,  else  2√v;
    λ'_P = λ_P + v/λ_P  if λ_P < −√v,  else −2√v,

and with the clip the batch extremes are at least as large in magnitude as the
empirical ones.  At B = N (without replacement) c = 0, so the inputs come back.
"""

from __future__ import annotations

from .sampling import batch_noise_factor
from .spiked_wigner import spiked_wigner_outlier
from .validation import as_float, guard_module


def batch_noise_variance(sigma2, P, B, N=None, replacement: bool = False) -> float:
    """v = P·c(B, N)·σ²: variance of the semicircle of ε = H_B − H."""
    s2 = as_float("sigma2", sigma2, nonnegative=True)
    P = as_float("P", P, positive=True)
    return P * batch_noise_factor(B, N, replacement) * s2


def batch_hessian_extremes(lam_top, lam_bottom, sigma2, P, B, N=None,
                           replacement: bool = False) -> tuple[float, float]:
    """Return (λ'₁, λ'_P), the predicted top and bottom eigenvalues of the batch Hessian.

    ``lam_top`` is the top empirical eigenvalue (a positive outlier is the interesting
    case) and ``lam_bottom`` the bottom one; each is pushed outward by v/λ, or replaced
    by the edge ±2√v when it is inside the threshold (|λ| ≤ √v).  A spike of the
    "wrong" sign (lam_top ≤ 0 or lam_bottom ≥ 0) cannot create an outlier on that side,
    so the edge ±2√v is returned there.
    """
    top = as_float("lam_top", lam_top)
    bottom = as_float("lam_bottom", lam_bottom)
    if bottom > top:
        raise ValueError(f"lam_bottom must be <= lam_top, got {bottom} > {top}")
    v = batch_noise_variance(sigma2, P, B, N, replacement)
    if v == 0.0:
        return top, bottom
    edge = 2.0 * v ** 0.5
    new_top = spiked_wigner_outlier(top, v) if top > 0 else edge
    new_bottom = spiked_wigner_outlier(bottom, v) if bottom < 0 else -edge
    return new_top, new_bottom


# every public function above: errors name the caller's arguments, results are finite
guard_module(globals())
