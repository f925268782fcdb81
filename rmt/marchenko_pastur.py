"""Marchenko–Pastur law of a real Wishart matrix S = X Xᵀ/n (docs/references.md "Bulk laws").

X is p×n with i.i.d. entries of variance σ²; the ratio is q = p/n (the *dimension over
the number of samples*; other libraries use its inverse).  As p, n → ∞ the spectrum of
S tends to MP(q, σ²):

    edges  λ± = σ²(1 ± √q)²,
    density  √((λ₊ − x)(x − λ₋)) / (2π σ² q x)   on [λ₋, λ₊],
    plus an atom of mass 1 − 1/q at 0 when q > 1.

Stieltjes transform g(z) = ∫ dμ(x)/(x − z) (package convention) solves, for σ² = 1,

    q z g² + (z − 1 + q) g + 1 = 0,
    g(z) = (−(z − 1 + q) + √(z − λ₊)·√(z − λ₋)) / (2 q z),

with g ~ −1/z at infinity and Im g > 0 for Im z > 0; g(z; σ²) = g(z/σ²; 1)/σ².  The
product of principal roots puts the cut on [λ₋, λ₊] and produces the pole
−(1 − 1/q)/z of the atom automatically when q > 1.
"""

from __future__ import annotations

import numpy as np

from .validation import as_array, as_float, guard_module, refuse_singular_points


def _check(ratio, variance):
    q = as_float("ratio", ratio, positive=True)
    s2 = as_float("variance", variance, positive=True)
    return q, s2


def mp_edges(ratio, variance=1.0) -> tuple[float, float]:
    """Return (λ₋, λ₊) = σ²(1 ∓ √q)² (the continuous part; atom at 0 when q > 1, so
    for q > 1 the support is (0, λ₊) — what `rmt.outliers.find_outlier` needs).
    q = 0 is allowed (the degenerate law δ_{σ²}: no sampling noise, e.g. B = N)."""
    q = as_float("ratio", ratio, nonnegative=True)
    s2 = as_float("variance", variance, positive=True)
    return float(s2 * (1.0 - np.sqrt(q)) ** 2), float(s2 * (1.0 + np.sqrt(q)) ** 2)


def mp_atom(ratio) -> float:
    """Mass of the atom at 0: max(0, 1 − 1/q)."""
    q = as_float("ratio", ratio, positive=True)
    return max(0.0, 1.0 - 1.0 / q)


def mp_density(x, ratio, variance=1.0) -> np.ndarray:
    """Density of the continuous part (integrates to min(1, 1/q))."""
    q, s2 = _check(ratio, variance)
    lo, hi = mp_edges(q, s2)
    x = as_array("x", x, allow_empty=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.sqrt(np.clip((hi - x) * (x - lo), 0.0, None)) / (2.0 * np.pi * s2 * q * x)
    return np.where((x > lo) & (x < hi), d, 0.0)


def mp_stieltjes(z, ratio, variance=1.0) -> np.ndarray:
    """g(z) = ∫ dμ(x)/(x − z) for MP(q, σ²) including the atom; complex array.

    On the real support the upper boundary value g(x + i0) is returned. Infinite at z = 0
    when q >= 1 (the atom's pole, or the hard edge at q = 1): ValueError there.
    """
    q, s2 = _check(ratio, variance)
    z = as_array("z", z, dtype=complex, allow_empty=True)
    if q >= 1:          # exactly 0 only: beside it g is finite (or overflows: the guard says so)
        refuse_singular_points("z", z, (0.0,), "g(z) (the atom or hard edge at 0)")
    z = z / s2
    lo, hi = mp_edges(q, 1.0)
    z = np.where((z.imag == 0) & (z.real >= lo) & (z.real <= hi), z + 1e-300j, z)
    root = np.sqrt(z - hi) * np.sqrt(z - lo)
    b = z + (q - 1.0)              # not z − 1 + q: that rounds z away when |z| ≪ 1 = q
    plus, minus = b + root, root - b
    with np.errstate(divide="ignore", invalid="ignore"):
        # the two forms (−b + root)/(2qz) = −2/(b + root) (their product: root² − b² =
        # −4qz); each point uses the one whose sum does not cancel: −2/(b + root) at large
        # |z|, (root − b)/(2qz) near the atom (q > 1, z → 0, where b + root = O(z) and the
        # first form lost every digit below |z| ≈ 1e-8: g(1e-17; q=2) came out 9e15, not −5e16)
        g = np.where(np.abs(plus) >= np.abs(minus), -2.0 / plus, minus / (2.0 * q * z))
    return g / s2


def mp_stieltjes_derivative(z, ratio, variance=1.0) -> np.ndarray:
    """g'(z) = ∫ dμ(x)/(x − z)²; from the quadratic, dg/dz = −(q g² + g)/(2 q z g + z − 1 + q)
    (σ² = 1 units, then g'(z; σ²) = g'(z/σ²; 1)/σ⁴). Infinite at the edges and at the
    atom (ValueError there)."""
    q, s2 = _check(ratio, variance)
    z = as_array("z", z, dtype=complex, allow_empty=True)
    # tolerance relative to each point (4 ulps of it): at σ² = 1e-20 an absolute one
    # refused every |z| below 1e-15, legitimate points 5× beyond the edge included
    refuse_singular_points("z", z, mp_edges(q, s2) + ((0.0,) if q > 1 else ()),
                           "g'(z) (an edge or the atom)")
    w = z / s2
    g = mp_stieltjes(w, q, 1.0)
    with np.errstate(over="ignore", invalid="ignore"):     # g² overflowing: the guard refuses
        return -(q * g * g + g) / (2.0 * q * w * g + w + (q - 1.0)) / s2 ** 2


# every public function above: errors name the caller's arguments, results are finite
guard_module(globals())
