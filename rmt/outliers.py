"""Outliers created by a rank-one additive spike on an arbitrary bulk
(Benaych-Georges & Nadakuditi 2011; docs/references.md "Any bulk"; docs/theory.md §2 general form).

For X with limiting spectral law μ (Stieltjes g(z) = ∫ dμ(x)/(x − z)) and a spike
θ·u uᵀ with u independent of X (or X orthogonally invariant), the eigenvalues of
X + θ u uᵀ outside supp μ converge to the solutions z of

    1 + θ·g(z) = 0,

and the squared overlap of the outlier eigenvector with u converges to

    |⟨u, û⟩|² = 1/(θ²·g'(z)),      g'(z) = ∫ dμ(x)/(x − z)² > 0 on ℝ \\ supp μ.

For θ > 0 the root lies to the right of the support (g < 0 there), for θ < 0 to the
left (g > 0).  On (right edge, ∞), g is negative and increasing to 0 with
|g(z)| ≤ 1/(z − right edge), so the root, if any, lies in (edge, edge + θ]; it exists
iff 1 + θ·g(edge⁺) < 0.  If there is none the function returns the edge and overlap 0
("below threshold return the bulk edge").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from .validation import as_float, guard_module


@dataclass(frozen=True)
class Outlier:
    """Result of ``find_outlier``: ``location`` (the outlier, or the edge if none),
    ``squared_overlap`` (0 if none), ``is_outlier`` and ``residual`` = |1 + θ g(z)|."""

    location: float
    squared_overlap: float
    is_outlier: bool
    residual: float


def _real_g(stieltjes, z: float) -> float:
    val = complex(np.asarray(stieltjes(z)).reshape(()))
    return val.real


def find_outlier(spike, stieltjes, support, stieltjes_derivative=None,
                 edge_offset: float = 1e-12) -> Outlier:
    """Solve 1 + θ g(z) = 0 outside ``support`` = (left edge, right edge) by brentq.

    ``support`` must hold the whole law, atoms included: g has a pole at an atom, and an
    atom outside the pair hides every outlier beyond it. For Marchenko–Pastur with q > 1
    (atom at 0) pass (0, λ₊), not `mp_edges(q)` = (λ₋, λ₊), its continuous part only
    (q = 2, θ = −0.5: the bottom outlier −0.30 is found with (0, λ₊), missed with
    (λ₋, λ₊)).

    ``stieltjes(z)`` returns g at real z outside the support (package convention);
    ``stieltjes_derivative`` returns g'(z) (central difference if omitted).  The edge
    value g(edge⁺) is evaluated at edge ± ``edge_offset``·scale, scale the bulk's own
    size: its half-width (right − left)/2 (for a point mass |edge|, or |θ| for δ₀), the
    offset at least 4 ulps of the edge.  The problem is homogeneous (support, θ, z → s·…
    and g → g/s give location → s·location, the same overlap), and so is the answer at
    every scale.
    """
    theta = as_float("spike", spike)
    if isinstance(support, (str, bytes)) or np.ndim(support) != 1 or len(support) != 2:
        raise TypeError(f"support must be a pair (left edge, right edge), got "
                        f"{type(support).__name__} {support!r}")
    lo = as_float("support[0]", support[0])
    hi = as_float("support[1]", support[1])
    edge_offset = as_float("edge_offset", edge_offset, positive=True)
    if edge_offset > 1e-3:
        raise ValueError(f"edge_offset must be a small relative offset (<= 1e-3), got {edge_offset}")
    if lo > hi:
        raise ValueError("support must be (left edge, right edge) with left <= right")
    # the bulk's own scale, never an absolute floor: with max(1, |edges|, |θ|) a bulk of
    # width 1e-12 was tested at edge + 1e-12, past the outlier (θ = 2√v at v = 1e-24
    # returned the edge and overlap 0 instead of 2.5·√v and 0.75)
    half = 0.5 * hi - 0.5 * lo
    scale = half if half > 0 else max(abs(lo), abs(hi)) or abs(theta)
    if theta == 0.0:
        return Outlier(hi, 0.0, False, 1.0)
    if theta > 0:
        edge, sgn = hi, 1.0
    else:
        edge, sgn = lo, -1.0
    h = lambda z: 1.0 + theta * _real_g(stieltjes, z)  # noqa: E731
    off = max(edge_offset * scale, 4 * np.finfo(float).eps * abs(edge))
    z_in = edge + sgn * off
    if h(z_in) >= 0.0:
        return Outlier(edge, 0.0, False, 0.0)
    z_out = edge + sgn * (abs(theta) * (1.0 + 1e-9) + off)
    a, b = (z_in, z_out) if sgn > 0 else (z_out, z_in)
    z = brentq(h, a, b, xtol=1e-14 * max(scale, off), rtol=4 * np.finfo(float).eps, maxiter=500)
    if not abs(h(z)) <= 1e-6:
        raise ValueError(f"spike={theta:g}: the outlier equation could not be solved to "
                         f"precision (residual {abs(h(z)):.3g}; g is not resolved in floating "
                         "point that far from the support)")
    if stieltjes_derivative is not None:
        gp = complex(np.asarray(stieltjes_derivative(z)).reshape(())).real
        overlap = 1.0 / (theta * theta * gp) if gp > 0 else 0.0
    else:
        # 1/(θ² g') = g²/g' = 1/(d/dz (−1/g)) at the root (g = −1/θ there): the derivative
        # of −1/g ≈ z − mean stays O(1) where g' itself underflows (|θ| ≳ 1e150)
        d = 1e-6 * max(abs(z - edge), 1e-8 * scale)
        slope = (1.0 / _real_g(stieltjes, z - d) - 1.0 / _real_g(stieltjes, z + d)) / (2 * d)
        overlap = 1.0 / slope if slope > 0 else 0.0
    return Outlier(float(z), float(min(max(overlap, 0.0), 1.0)), True, abs(h(z)))


def outlier_location(spike, stieltjes, support) -> float:
    """The outlier of a spike θ on a bulk with Stieltjes ``stieltjes``, or the edge."""
    return find_outlier(spike, stieltjes, support).location


def outlier_overlap(spike, stieltjes, support, stieltjes_derivative=None) -> float:
    """Squared overlap 1/(θ² g'(z)) at the outlier, or 0 if there is none."""
    return find_outlier(spike, stieltjes, support, stieltjes_derivative).squared_overlap


# every public function above: errors name the caller's arguments, results are finite
guard_module(globals())
