"""O(n) tridiagonal models of the β-Hermite (GOE/GUE) and β-Laguerre (Wishart)
ensembles (Dumitriu & Edelman, "Matrix models for beta ensembles", J. Math. Phys. 43,
2002), and the O(n) spiked-GOE top-eigenvalue sampler.

β-Hermite.  Dumitriu–Edelman's model is (1/√2)·tridiag with diagonal N(0, 2) and
off-diagonal χ_{β(n−1)}, χ_{β(n−2)}, …, χ_β.  Its eigenvalues have the law of a
dense GβE whose off-diagonal E|h_ij|² is β/2 (for β = 1: H = (A + Aᵀ)/2).  To agree with
the dense samplers of ensembles.py at every finite n we rescale it by √(2/β):

* ``normalization="raw"``: diagonal N(0, 2/β), off-diagonal χ_{β(n−k)}/√β — same
  eigenvalue law as ``ensembles.goe(n, normalization="raw")`` (β = 1: off-diagonal
  variance 1, diagonal 2; E tr H² = n² + n, E tr H⁴ = 2n³ + 5n² + 5n) and as
  ``ensembles.gue(..., "raw")`` (β = 2: E|h|² = 1; E tr H⁴ = 2n³ + n).
* ``normalization="semicircle"`` (default): the raw model divided by √n, spectrum →
  semicircle on [−2, 2].

β-Laguerre.  For X p×n with i.i.d. N(0, 1) entries, the Golub–Kahan bidiagonalisation
gives a lower-bidiagonal B with diagonal χ_{βn}, χ_{β(n−1)}, … and sub-diagonal
χ_{β(p−1)}, χ_{β(p−2)}, …, and X Xᵀ has the nonzero eigenvalues of B Bᵀ (β = 1 real).

Tridiagonals are returned as (diagonal, off_diagonal) arrays and never materialised.

Randomness: every sampler takes ``seed=`` — an int >= 0 seeds
``numpy.random.default_rng(seed)``, a ``numpy.random.Generator`` is drawn from directly,
None draws fresh entropy — or, equivalently, ``rng=`` (the older name of the same
argument; give at most one of the two).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import eigvalsh_tridiagonal

from .validation import as_array, as_float, as_int, guard_module, rng_from

MAX_N = 2 ** 34             # tridiagonal length beyond which the arrays cannot be allocated


def _beta(beta) -> float:
    b = as_float("beta", beta, positive=True)
    return b


def hermite_tridiagonal(n, beta=1.0, rng=None, normalization: str = "semicircle", *, seed=None):
    """Sample the β-Hermite tridiagonal model; return (diagonal, off_diagonal).

    See the module docstring for the two normalisations (both agree with the dense
    samplers of ensembles.py at finite n).
    """
    n = as_int("n", n, minimum=1, maximum=MAX_N)
    b = _beta(beta)
    if normalization not in ("semicircle", "raw"):
        raise ValueError(f"normalization must be 'semicircle' or 'raw', got {normalization!r}")
    rng = rng_from(rng, seed)
    scale = 1.0 / np.sqrt(n) if normalization == "semicircle" else 1.0
    diag = rng.standard_normal(n) * (np.sqrt(2.0 / b) * scale)
    dof = b * np.arange(n - 1, 0, -1, dtype=float)
    off = np.sqrt(rng.chisquare(dof)) * (scale / np.sqrt(b)) if n > 1 else np.zeros(0)
    return diag, off


def laguerre_tridiagonal(p, n, beta=1.0, rng=None, spike=1.0, *, seed=None):
    """Tridiagonal T with the nonzero spectrum of S = X Xᵀ/n, X p×n (β = 1: real
    Gaussian, columns N(0, Σ) with Σ = diag(spike, 1, …, 1)); return (diagonal, off).

    The population spike ℓ enters only the first bidiagonal entry, b₁₁ = √ℓ·χ_{βn}:
    the Golub–Kahan bidiagonalisation starts with a reflection acting on row 1 alone,
    and row 1 is the only row scaled by √ℓ.  The size of T is min(p, n); when p > n the
    remaining p − n eigenvalues of S are exactly 0.
    """
    p = as_int("p", p, minimum=1, maximum=MAX_N)
    n = as_int("n", n, minimum=1, maximum=MAX_N)
    b = _beta(beta)
    ell = as_float("spike", spike, positive=True)
    rng = rng_from(rng, seed)
    k = min(p, n)
    a = np.sqrt(rng.chisquare(b * np.arange(n, n - k, -1, dtype=float)))
    a[0] *= np.sqrt(ell)
    if p <= n:
        sub = np.sqrt(rng.chisquare(b * np.arange(p - 1, 0, -1, dtype=float))) if p > 1 else np.zeros(0)
        diag = a * a
        diag[1:] += sub * sub
        off = sub * a[:-1]
    else:
        sub = np.sqrt(rng.chisquare(b * np.arange(p - 1, p - 1 - k, -1, dtype=float)))
        diag = a * a + sub * sub
        off = sub[:-1] * a[1:]
    scale = 1.0 / (b * n)
    return diag * scale, off * scale


def tridiagonal_eigvals(diag, off, which: str = "top") -> float:
    """Largest ('top') or smallest ('bottom') eigenvalue of a symmetric tridiagonal,
    by bisection (LAPACK stebz via scipy ``eigvalsh_tridiagonal(select="i")``): O(n)
    memory, O(n·log(1/tol)) time; nothing else is computed."""
    diag = as_array("diag", diag, ndim=1)
    off = as_array("off", off, ndim=1, allow_empty=True)
    n = diag.shape[0]
    idx = {"top": n - 1, "bottom": 0}.get(which) if isinstance(which, str) else None
    if idx is None:                  # checked before the n = 1 shortcut, which skipped it
        raise ValueError(f"which must be 'top' or 'bottom', got {which!r}")
    if off.shape[0] != n - 1:
        raise ValueError(f"off must have length len(diag) - 1 = {n - 1}, got {off.shape[0]}")
    if n == 1:
        return float(diag[0])
    vals = eigvalsh_tridiagonal(diag, off, select="i", select_range=(idx, idx))
    if vals.size != 1:   # LAPACK's bisection gave up (entries near the float64 limit)
        raise ValueError("diag and off are too large in magnitude for the tridiagonal "
                         f"eigenvalue solver (max |entry| {max(np.abs(diag).max(), np.abs(off).max(initial=0)):.3g})")
    return float(vals[0])


def sample_spiked_goe_top(n, spike, rng=None, *, seed=None) -> float:
    """Top eigenvalue of H + θ·e₁e₁ᵀ, H a GOE normalised to the semicircle on [−2, 2]
    (off-diagonal variance 1/n, diagonal 2/n), in O(n) time and memory.

    Why the spike may sit in the (1,1) entry of the tridiagonal model: the Householder
    tridiagonalisation H = Q T Qᵀ uses reflections that act on coordinates 2..n only,
    so Q e₁ = e₁ and H + θ e₁e₁ᵀ = Q (T + θ e₁e₁ᵀ) Qᵀ: the spiked matrix is similar to
    T with θ added to T₁₁.  T has the Dumitriu–Edelman law whatever e₁ is, and by the
    orthogonal invariance of the GOE a rank-one spike along any unit u has the same
    spectrum as one along e₁.  Only the top eigenvalue is computed (bisection).

    Theory (docs/references.md, spiked Wigner, σ² = 1): for θ > 1 the top eigenvalue tends to
    θ + 1/θ with fluctuations N(0, 2(1 − 1/θ²)/n); for θ ≤ 1 it sticks to the edge 2
    (Tracy–Widom scale n^{−2/3}).  n = 10⁶ takes about a second.
    """
    n = as_int("n", n, minimum=1, maximum=MAX_N)
    theta = as_float("spike", spike)
    diag, off = hermite_tridiagonal(n, 1.0, rng_from(rng, seed), "semicircle")
    diag[0] += theta
    return tridiagonal_eigvals(diag, off, "top")


def sample_spiked_wishart_top(p, n, spike, rng=None, *, seed=None) -> float:
    """Top eigenvalue of S = X Xᵀ/n, X p×n real Gaussian with population covariance
    diag(ℓ, 1, …, 1), in O(min(p, n)) via ``laguerre_tridiagonal``.  BBP: → ℓ(1 + q/(ℓ−1))
    for ℓ > 1 + √q (q = p/n), else (1 + √q)²."""
    diag, off = laguerre_tridiagonal(p, n, 1.0, rng_from(rng, seed), spike)
    return tridiagonal_eigvals(diag, off, "top")


# every public function above: errors name the caller's arguments, results are finite
guard_module(globals())
