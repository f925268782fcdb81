"""Free additive convolutions with a semicircle (deformed Wigner matrices).

1. A ⊞ SC(v), A a discrete spectrum (atoms a_k with weights w_k, Σ w_k = 1): the law
   of A + W with W Wigner of variance v (Pastur 1972; Biane 1997).  In the package
   convention g(z) = ∫ dμ(x)/(x − z), the subordination equation reads

       g(z) = g_A(ω(z)),     ω(z) = z + v·g(z),     g_A(ω) = Σ_k w_k/(a_k − ω).

   (docs/theory.md §2.  Sources that write g_A(z − v·g(z)) use the other convention
   G = −g = ∫ dμ/(z − x), where it reads G(z) = G_A(z − v G(z)).  With g the sign in front
   of v must be +, as A = δ₀ shows: g = −1/(z + v g) ⇔ v g² + z g + 1 = 0.)
   ω is the subordination function: Im ω ≥ Im z on the upper half plane.
   Edges: z = ω − v g_A(ω) is stationary where v Σ_k w_k/(ω − a_k)² = 1; the right
   edge comes from the largest such ω (> max a_k), the left edge from the smallest.
   A finite-rank isolated eigenvalue a* of A (weight → 0) gives an outlier at
   z = a* − v g_A(a*) when a* lies beyond that critical ω (outside ω's range).

2. SC(s²) ⊞ MP(c) (MP with σ² = 1, ratio c = p/n): with G = −g the inverse is
   z(G) = 1/G + s²G + 1/(1 − cG) (sum of R-transforms), the right edge is the local
   minimum of z on (0, 1/c) (docs/references.md: s² = c = 0.5 gives ≈ 3.308).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from .validation import as_array, as_float, as_int, guard_module


def _atoms(atoms, weights):
    a = as_array("atoms", atoms).ravel()
    if weights is None:
        w = np.full(a.shape, 1.0 / a.size)
    else:
        w = as_array("weights", weights, nonnegative=True).ravel()
        if w.shape != a.shape:
            raise ValueError("weights must have the same length as atoms")
        if abs(w.sum() - 1.0) > 1e-9:
            raise ValueError(f"weights must sum to 1, got {w.sum()}")
    keep = w > 0
    return a[keep], w[keep]


def _g_atoms(z, a, w):
    """g_A(z) = Σ_k w_k/(a_k − z) for an array z of any shape (atoms a, weights w; no checks)."""
    return np.sum(w / (a - z[..., None]), axis=-1)


def discrete_stieltjes(z, atoms, weights=None):
    """g_A(z) = Σ_k w_k/(a_k − z) (uniform weights by default)."""
    a, w = _atoms(atoms, weights)
    z = as_array("z", z, dtype=complex, allow_empty=True)
    return _g_atoms(z, a, w)


@dataclass(frozen=True)
class SubordinationResult:
    """g(z) of A ⊞ SC(v), the subordination ω(z) = z + v g(z), the residual
    |ω − z − v g_A(ω)| (array) and the number of iterations used."""

    g: np.ndarray
    omega: np.ndarray
    residual: np.ndarray
    iterations: int


def _scale(a, v) -> float:
    """max(max_k |a_k|, √v) (1 for A = δ₀ without noise): the law's scale. A ⊞ SC(v) is
    homogeneous (a → s·a, v → s²v, z → s·z give g → g/s, ω → s·ω, density → density/s),
    and the solvers below work on the problem rescaled to scale 1, so that their
    tolerances and the η used on the real axis are relative to the law's own size."""
    s = max(float(np.max(np.abs(a))), math.sqrt(v))
    return s if s > 0 else 1.0


def semicircle_free_convolution(z, atoms, weights=None, noise_var=1.0, tol=1e-13,
                                maxiter=500) -> SubordinationResult:
    """Solve ω = z + v·g_A(ω) (g = g_A(ω)) for complex z with Im z > 0, or real z.

    Real z outside the support: the real root on the physical branch (F' > 0 below) is
    returned. Real z inside the support (or at an edge) has no such root: there the
    boundary value g(x + i0) is returned, solved at x + iη with η = 10⁻¹⁰·(s + |x|)
    (its imaginary part is π × the density), s = max(max|a_k|, √v) the law's scale.
    With v = 0 the law is A itself, g = g_A(z): a real z on an atom is its pole
    (ValueError).

    Newton steps on F(ω) = ω − z − v g_A(ω), F' = 1 − v g_A'(ω), are accepted when they
    reduce |F| and keep Im ω ≥ Im z (the physical branch: ω maps the upper half plane
    into itself, and there the fixed point is unique by Denjoy–Wolff); otherwise a
    fixed-point step ω ← z + v g_A(ω) (a contraction of the half plane) is taken, until
    |F| <= tol·(s + |ω|).  The iteration runs on the problem rescaled to s = 1 (atoms/s,
    v/s², z/s), so the result is homogeneous: atoms, z → c·atoms, c·z and v → c²v give
    g/c, c·ω and c·residual at every scale c (absolute tolerances made g 2–50 % wrong
    at c = 1e-12).
    """
    a, w = _atoms(atoms, weights)
    v = as_float("noise_var", noise_var, nonnegative=True)
    tol = as_float("tol", tol, positive=True)
    maxiter = as_int("maxiter", maxiter, minimum=1)
    z = as_array("z", z, dtype=complex, allow_empty=True)
    if np.any(z.imag < 0):
        raise ValueError("z must lie in the closed upper half plane (Im z >= 0)")
    if v == 0.0:
        on = (z.imag == 0) & np.isin(z.real, a)
        if on.any():
            zz = float(z.real[on].ravel()[0])
            raise ValueError(f"z={zz!r} is an atom of A, a pole of g = g_A (noise_var = 0: no "
                             "semicircle to smooth it): evaluate off the real axis or away from it")
    s = _scale(a, v)
    zf = z.ravel()
    with np.errstate(over="ignore"):
        zu = zf / s
    # |z| > 1e100·s: ω = z + v g_A(z) is exact to (s/|z|)² ≪ eps (and z/s may overflow)
    far = ~(np.abs(zu) <= 1e100)
    near = np.flatnonzero(~far)
    g, om, r = (np.empty(zf.shape, complex), np.empty(zf.shape, complex), np.empty(zf.shape))
    if far.any():
        om[far] = zf[far] + v * _g_atoms(zf[far], a, w)
        g[far] = _g_atoms(om[far], a, w)
        r[far] = np.abs(om[far] - zf[far] - v * g[far])
    au, vu, zu = a / s, v / s**2, zu[near]
    with np.errstate(divide="ignore", invalid="ignore"):      # a real z on an atom
        res = _subordinate(zu, au, w, vu, tol, maxiter)
        omu = res.omega
        slope = 1.0 - vu * np.sum(w / (au - omu[:, None].real) ** 2, axis=1)
    gu, ru, it = res.g, res.residual, res.iterations
    physical = np.isfinite(ru) & (ru <= tol * (1.0 + np.abs(omu))) & (slope > 0) & (omu.imag == 0)
    inside = np.flatnonzero((zu.imag == 0) & ~physical)
    if inside.size:                         # a real z with no physical real root: on the support
        x = zu[inside].real
        up = _subordinate(x + 1j * 1e-10 * (1.0 + np.abs(x)), au, w, vu, tol, maxiter)
        gu[inside], omu[inside], ru[inside], it = up.g, up.omega, up.residual, max(it, up.iterations)
    g[near], om[near], r[near] = gu / s, omu * s, ru * s
    return SubordinationResult(g.reshape(z.shape), om.reshape(z.shape), r.reshape(z.shape), it)


def _subordinate(z, a, w, v, tol, maxiter) -> SubordinationResult:
    """The iteration of `semicircle_free_convolution` on a flat z (no checks)."""
    real = z.imag == 0
    # real z: start at z itself (Newton is monotone from the outside); complex: lift up
    om = np.where(real, z, z + 1j * (np.sqrt(v) + np.abs(z.imag)))

    def gA(o):
        return _g_atoms(o, a, w)

    def gA1(o):
        return np.sum(w / (a - o[:, None]) ** 2, axis=1)

    F = om - z - v * gA(om)
    it = 0
    for it in range(1, maxiter + 1):  # noqa: B007 (read after the loop)
        res = np.abs(F)
        active = res > tol * (1.0 + np.abs(om))
        if not active.any():
            break
        o = om[active]
        f = F[active]
        step = f / (1.0 - v * gA1(o))
        cand = o - step
        fc = cand - z[active] - v * gA(cand)
        ok = (np.abs(fc) < np.abs(f)) & (real[active] | (cand.imag >= z[active].imag))
        fp = z[active] + v * gA(o)
        new = np.where(ok, cand, fp)
        om[active] = new
        F[active] = np.where(ok, fc, new - z[active] - v * gA(new))
    return SubordinationResult(gA(om), om, np.abs(F), it)


def semicircle_free_convolution_density(x, atoms, weights=None, noise_var=1.0, eta=None):
    """Density of A ⊞ SC(v) on a real grid: Im g(x + iη)/π (η → 0⁺; v > 0).

    ``eta`` = η, by default 10⁻⁹·s with s = max(max|a_k|, √v) the law's scale, so that
    the density is homogeneous (atoms, x → c·…, v → c²v give density/c); an absolute
    default 10⁻⁹ smeared it by 11–16 % at c = 1e-8. A given ``eta`` is used as is."""
    x = as_array("x", x, allow_empty=True)
    a, w = _atoms(atoms, weights)
    noise_var = as_float("noise_var", noise_var, positive=True)
    eta = 1e-9 * _scale(a, noise_var) if eta is None else as_float("eta", eta, positive=True)
    res = semicircle_free_convolution(x + 1j * eta, a, w, noise_var)
    return np.clip(res.g.imag, 0.0, None) / np.pi


def _critical_omega(a, w, v, side):
    """Largest (side=+1) or smallest (side=−1) ω with v Σ w/(ω − a)² = 1."""
    extreme = a.max() if side > 0 else a.min()
    phi = lambda o: v * np.sum(w / (o - a) ** 2) - 1.0  # noqa: E731
    d_hi = np.sqrt(v) * (1.0 + 1e-12)
    d_lo = 1e-300
    # phi(extreme + side·d) is decreasing in d; find the sign change by bisection in log d
    lo_d = max(np.sqrt(v * w[a == extreme].sum()) * 0.5, d_lo)
    while phi(extreme + side * lo_d) <= 0:
        lo_d *= 0.5
    d = brentq(lambda t: phi(extreme + side * t), lo_d, d_hi, xtol=1e-15 * (1 + abs(extreme)), rtol=1e-15)
    return extreme + side * d


def semicircle_free_convolution_edges(atoms, weights=None, noise_var=1.0) -> tuple[float, float]:
    """(left, right) edges of A ⊞ SC(v), v > 0: z = ω − v g_A(ω) at the outermost
    critical points v Σ w_k/(ω − a_k)² = 1 (docs/references.md: A = ±1.5, v = 1 → ±3.04885).
    Internal gaps, if any, are not reported."""
    a, w = _atoms(atoms, weights)
    v = as_float("noise_var", noise_var, positive=True)
    # homogeneous (atoms → s·atoms, v → s²v scales the edges by s): solved at scale 1, the
    # root finder's tolerances being absolute (at s = 1e-16 the edge came out 2.5 % off)
    scale = _scale(a, v)
    a, v = a / scale, v / scale**2
    out = []
    for side in (-1, 1):
        om = _critical_omega(a, w, v, side)
        out.append(float(om + v * np.sum(w / (om - a))) * scale)
    return out[0], out[1]


def semicircle_free_convolution_outlier(spike, atoms, weights=None, noise_var=1.0) -> float:
    """Outlier of A + W + (isolated eigenvalue ``spike`` = θ of A, finite rank): the z with
    ω(z) = θ, z = θ + v Σ_k w_k/(θ − a_k), which exists when θ lies in the range of ω on
    the real line, v Σ_k w_k/(θ − a_k)² < 1 (z'(θ) > 0) — beyond the outermost critical ω,
    or inside an internal gap of A where that holds (the outlier then sits in a gap of
    the bulk). A θ beyond the atoms that fails it is absorbed: the bulk edge on its side
    is returned. A θ between the atoms that fails it is inside the bulk: ValueError.
    A = δ₀ gives θ + v/θ."""
    a, w = _atoms(atoms, weights)
    theta = as_float("spike", spike)
    v = as_float("noise_var", noise_var, positive=True)
    with np.errstate(divide="ignore"):
        slope = 1.0 - v * np.sum(w / (theta - a) ** 2)
    if slope > 0:
        return float(theta + v * np.sum(w / (theta - a)))
    if a.min() < theta < a.max():
        raise ValueError(f"spike={theta:g} lies between the atoms where v·Σ w/(spike − a)² "
                         f"= {1 - slope:.4g} >= 1: it is absorbed into the bulk, no outlier")
    left, right = semicircle_free_convolution_edges(a, w, v)
    return right if theta >= a.max() else left


def sc_mp_inverse(G, s2, ratio):
    """z(G) = 1/G + s²G + 1/(1 − cG): the inverse of G = −g for SC(s²) ⊞ MP(c)."""
    G = as_array("G", G, dtype=complex, allow_empty=True)
    s2 = as_float("s2", s2, nonnegative=True)
    ratio = as_float("ratio", ratio, positive=True)
    return 1.0 / G + s2 * G + 1.0 / (1.0 - ratio * G)


def sc_mp_edges(s2, ratio) -> tuple[float, float]:
    """(left, right) edges of SC(s²) ⊞ MP(c) (MP with σ² = 1; s² > 0).

    Right: z at the unique root of z'(G) = −1/G² + s² + c/(1 − cG)² on (0, 1/c)
    (z' is increasing there).  Left: z at the root of z'(G) on G < 0 closest to 0,
    where z(G) has its local maximum.
    """
    s2 = as_float("s2", s2, positive=True)
    c = as_float("ratio", ratio, positive=True)
    zp = lambda G: -1.0 / G ** 2 + s2 + c / (1.0 - c * G) ** 2  # noqa: E731
    zf = lambda G: 1.0 / G + s2 * G + 1.0 / (1.0 - c * G)  # noqa: E731
    # near 0 the −1/G² term must dominate s² + c: start below 1/√(s² + c)
    small = min(1e-12 / (1 + c), 1e-6 / math.sqrt(s2 + c + 1.0))
    # roots searched in log|G|: G spans 1/√(s² + c) … 1/c, many decades when s² is large
    Gr = math.exp(brentq(lambda u: zp(math.exp(u)), math.log(small),
                         math.log((1.0 - 1e-15) / c), xtol=1e-15, rtol=1e-15))
    # left: walk away from 0⁻ until z' changes sign
    t = min(1e-8, small)
    while zp(-t) < 0:
        t *= 1.5
    Gl = -math.exp(brentq(lambda u: zp(-math.exp(u)), math.log(t / 1.5), math.log(t),
                          xtol=1e-15, rtol=1e-15))
    return float(zf(Gl)), float(zf(Gr))


def sc_mp_density(x, s2, ratio):
    """Density of SC(s²) ⊞ MP(c) on a real grid, from the cubic
    c s² G³ − (c x + s²) G² + (x + c − 1) G − 1 = 0 (z(G) = x cleared of fractions):
    inside the support it has one complex-conjugate pair and the density is |Im G|/π."""
    s2 = as_float("s2", s2, nonnegative=True)
    c = as_float("ratio", ratio, positive=True)
    x = as_array("x", x, allow_empty=True)
    out = np.empty(x.shape)               # the shape of x: () for a scalar, like the other densities
    flat = out.reshape(-1)
    for i, xi in enumerate(x.reshape(-1)):
        r = np.roots([c * s2, -(c * xi + s2), xi + c - 1.0, -1.0])
        flat[i] = np.abs(r.imag).max() / np.pi
    return out


# every public function above: errors name the caller's arguments, results are finite
guard_module(globals())
