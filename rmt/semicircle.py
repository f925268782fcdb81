"""Wigner semicircle law of variance v (docs/references.md "Bulk laws").

Density ρ(x) = √(4v − x²)/(2πv) on [−2√v, 2√v].  Stieltjes transform in the package
convention g(z) = ∫ dρ(x)/(x − z) solves the quadratic

    v·g² + z·g + 1 = 0,      g(z) = (−z + √(z − 2√v)·√(z + 2√v)) / (2v) = −2/(z + √(z − 2√v)·√(z + 2√v)),

with the branch g(z) ~ −1/z at infinity and Im g > 0 for Im z > 0 (the product of two
principal square roots has its cut exactly on the support).  R-transform R(w) = v·w.
"""

from __future__ import annotations

import numpy as np

from .validation import as_array, as_float, guard_module, refuse_singular_points


def semicircle_edges(variance=1.0) -> tuple[float, float]:
    """Return the support (−2√v, 2√v) of the semicircle of variance v."""
    v = as_float("variance", variance, nonnegative=True)
    r = 2.0 * float(np.sqrt(v))
    return -r, r


def semicircle_density(x, variance=1.0) -> np.ndarray:
    """Density √(4v − x²)/(2πv) (zero outside the support); v > 0."""
    v = as_float("variance", variance, positive=True)
    x = as_array("x", x, allow_empty=True)
    return np.sqrt(np.clip(4.0 * v - x * x, 0.0, None)) / (2.0 * np.pi * v)


def semicircle_stieltjes(z, variance=1.0) -> np.ndarray:
    """g(z) = ∫ dρ(x)/(x − z) for the semicircle of variance v (complex array).

    Valid for every z off the support; on the support (real z) it returns the limit
    from the upper half plane, g(x + i0) = (−x + i√(4v − x²))/(2v).  v = 0 gives −1/z.
    """
    v = as_float("variance", variance, nonnegative=True)
    z = as_array("z", z, dtype=complex, allow_empty=True)
    if v == 0.0:
        refuse_singular_points("z", z, (0.0,), "g(z) = −1/z (the pole of variance 0)")
        return -1.0 / z
    r = 2.0 * np.sqrt(v)
    # on the real support give the upper boundary value (add +i0)
    zz = np.where((z.imag == 0) & (np.abs(z.real) <= r), z + 1e-300j, z)
    root = np.sqrt(zz - r) * np.sqrt(zz + r)
    # (−z + root)/(2v) written as −2/(z + root): no cancellation for large |z|
    return -2.0 / (zz + root)


def semicircle_stieltjes_derivative(z, variance=1.0) -> np.ndarray:
    """g'(z) = ∫ dρ(x)/(x − z)² = −g/(2v·g + z) (differentiate v g² + z g + 1 = 0).
    Infinite at the edges ±2√v (ValueError there: a real z within 4 ulps of an edge,
    relative to the edge, so every z off the edges is accepted at any scale v)."""
    v = as_float("variance", variance, nonnegative=True)
    g = semicircle_stieltjes(z, v)
    z = as_array("z", z, dtype=complex, allow_empty=True)
    r = 2.0 * np.sqrt(v)
    refuse_singular_points("z", z, (-r, r), "g'(z) (an edge)")
    return -g / (2.0 * v * g + z)


# every public function above: errors name the caller's arguments, results are finite
guard_module(globals())
