"""Wigner-type matrices with a block variance profile: the quadratic vector equation
(QVE) of Ajanki, Erdős & Krüger ("Quadratic vector equations on complex upper half
plane", Mem. AMS 2019), its edge, density, and the outlier of a spike (docs/theory.md §3).

Model: a real symmetric P×P matrix whose entry (j, k), j in block a and k in block b,
has variance S[a, b]/P; block a holds the fraction f[a] of the coordinates.  The
diagonal resolvent entries of coordinates in block a tend to m_a(z), the solution of

    −1/m_a(z) = z + Σ_b f_b S[a, b] m_b(z),      a = 1..K,                (QVE)

with Im m_a > 0 for Im z > 0 (unique such solution).  The spectral law has Stieltjes
transform g(z) = Σ_a f_a m_a(z) (convention g(z) = ∫ dμ(x)/(x − z)) and is symmetric,
m(−z̄) = −m(z)‾.  On the real axis above the right edge the solution is the real,
negative one continuous from z = +∞ (m_a ≈ −1/z); we compute it with u = −m:

    u = Φ(u),   Φ_a(u) = 1/(z − (S F u)_a),   F = diag(f),

by Newton's method from u = 0.  Φ is convex and increasing, so the iterates increase
monotonically to the minimal fixed point (the physical one) whenever one exists, and
Newton breaks down (a denominator ≤ 0 or ρ(Φ') ≥ 1) when z is inside the support.
The right edge is where the Jacobian I − diag(m²)·S·F becomes singular, i.e. where the
spectral radius ρ(z) of diag(m²) S F reaches 1; (1 − ρ)² vanishes linearly there, so a
safeguarded Newton iteration on it, bracketed by solvable/unsolvable z, finds the edge.
If every row of S·F sums to the same s the law is exactly the semicircle of variance s.

A spike θ·u uᵀ with w_a = ‖u restricted to block a‖² creates an outlier at the z above
the right edge with 1 + θ Σ_a w_a m_a(z) = 0 (isotropic local law): the shift depends
on where the spike lives.  Negative spikes are symmetric (outlier below the left edge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from .ensembles import check_profile
from .validation import as_array, as_float, as_int, guard_module


@dataclass(frozen=True)
class RealQVESolution:
    """Real solution at real z above the right edge: m (negative), the spectral radius
    ``rho`` of diag(m²) S F (< 1 on the physical branch), residual max|1 + m(z + SFm)|."""

    z: float
    m: np.ndarray
    rho: float
    residual: float
    iterations: int


def _perron(u, S, f):
    sq = np.sqrt(f) * u
    T = sq[:, None] * S * sq[None, :]
    vals, vecs = np.linalg.eigh(T)
    return vals[-1], vecs[:, -1]


#: a Newton residual below this (relative to 1 + max|u|) that stops falling is the
#: fixed point to round-off: a block holding ≲ 10⁻³ of the coordinates makes |u| ~ 20–60,
#: where |Φ(u) − u| stalls above `tol`·(1 + max|u|) (an outside sweep: edges 0.9 % high,
#: valid z refused as "inside the support")
_STALL_RESIDUAL = 1e-11


def _solve_real(z, S, f, maxiter=300, tol=1e-15):
    """Monotone Newton for u = Φ(u) from u = 0; returns (u, rho, iters) or None.
    Converged when |Φ(u) − u| ≤ tol·(1 + max|u|), or when it is below
    _STALL_RESIDUAL·(1 + max|u|) and no longer halves or the next step goes backwards
    (round-off: within ~1e-9 of the edge the nearly singular I − J turns it negative)."""
    K = f.shape[0]
    SF = S * f[None, :]
    u = np.zeros(K)
    eye = np.eye(K)
    prev = math.inf
    for it in range(1, maxiter + 1):
        den = z - SF @ u
        if np.any(den <= 0):
            return None
        phi = 1.0 / den
        r = phi - u
        err = np.max(np.abs(r)) / (1.0 + np.max(np.abs(u)))
        if it > 1 and (err <= tol or (err <= _STALL_RESIDUAL and err > 0.5 * prev)):
            return _stationary(u, S, f, it)
        prev = err
        J = (phi * phi)[:, None] * SF
        rho, _ = _perron(phi, S, f)
        if rho >= 1.0:
            return None
        du = np.linalg.solve(eye - J, r)
        if not np.all(np.isfinite(du)):
            return None
        if np.any(du < -1e-12 * (1.0 + np.abs(u))):
            return _stationary(u, S, f, it) if it > 1 and err <= _STALL_RESIDUAL else None
        u = u + np.maximum(du, 0.0)
    return None


def _stationary(u, S, f, it):
    """(u, ρ, it) for a converged u when it is the physical solution (ρ < 1), else None."""
    rho, _ = _perron(u, S, f)
    return (u, rho, it) if rho < 1.0 else None


def solve_qve_real(z, block_variances, block_fractions) -> RealQVESolution:
    """Real solution m(z) of the QVE at real z outside the support (|z| > edge).

    For z < −edge the symmetric solution m(z) = −m(−z) is returned.  Raises ValueError
    if z is inside the support (no real physical solution).
    """
    S, f = check_profile(block_variances, block_fractions)
    z = as_float("z", z)
    sgn = 1.0 if z > 0 else -1.0
    a = _unit(S)                     # solved at scale 1: z/a, S/a², then m = m₁/a
    with np.errstate(over="ignore"):
        zu = abs(z) / a
    if not math.isfinite(zu):        # |z| beyond 1e308 × the scale: m = −1/z to (a/z)²
        m = np.full(f.shape, -1.0 / z)
        res = np.max(np.abs(1.0 + m * (z + (S * f[None, :]) @ m)))
        return RealQVESolution(z, m, 0.0, float(res), 0)
    Su = S / a**2
    out = _solve_real(zu, Su, f)
    if out is None:
        raise ValueError(f"z={z} is inside the support: no real solution of the QVE")
    u, rho, it = out
    mu = -sgn * u
    res = np.max(np.abs(1.0 + mu * (sgn * zu + (Su * f[None, :]) @ mu)))
    return RealQVESolution(z, mu / a, float(rho), float(res), it)


@dataclass(frozen=True)
class QVESolution:
    """Complex solution: ``m`` has shape z.shape + (K,); ``residual`` = max_a
    |1 + m_a (z + (S F m)_a)|; ``g`` = Σ_a f_a m_a (Stieltjes transform of the law)."""

    m: np.ndarray
    g: np.ndarray
    residual: np.ndarray
    iterations: int


def solve_qve(z, block_variances, block_fractions, tol=1e-13, maxiter=2000) -> QVESolution:
    """Solve the QVE at complex z with Im z > 0 (vectorised over z).

    Newton steps on F(m) = 1 + m ⊙ (z + S F m) (Jacobian diag(z + SFm) + diag(m) S F)
    are accepted when they reduce |F| and keep Im m > 0 (the unique physical solution);
    otherwise a damped fixed-point step m ← ½m − ½/(z + S F m) is taken.
    """
    S, f = check_profile(block_variances, block_fractions)
    tol = as_float("tol", tol, positive=True)
    maxiter = as_int("maxiter", maxiter, minimum=1)
    z = as_array("z", z, dtype=complex, allow_empty=True)
    if np.any(z.imag <= 0):
        raise ValueError("z must have positive imaginary part (use solve_qve_real on the real axis)")
    shape = z.shape
    a = _unit(S)                     # solved at scale 1 (z/a, S/a²; m = m₁/a): homogeneous
    with np.errstate(over="ignore"):
        zz = z.ravel() / a
    if not np.all(np.isfinite(zz)):
        raise ValueError("z is beyond 1e308 × the profile's scale √max(block_variances): "
                         "the rescaled problem overflows")
    S = S / a**2
    SF = S * f[None, :]
    K = f.shape[0]
    m = np.tile((-1.0 / zz)[:, None], (1, K))

    def resid(mm, zc):
        return 1.0 + mm * (zc[:, None] + mm @ SF.T)

    F = resid(m, zz)
    it = 0
    for it in range(1, maxiter + 1):  # noqa: B007 (read after the loop)
        err = np.max(np.abs(F), axis=1)
        act = err > tol
        if not act.any():
            break
        mm, zc, Fa = m[act], zz[act], F[act]
        jac = (zc[:, None] + mm @ SF.T)[:, :, None] * np.eye(K)[None] + mm[:, :, None] * SF[None]
        cand = mm - np.linalg.solve(jac, Fa[:, :, None])[:, :, 0]
        Fc = resid(cand, zc)
        ok = (np.max(np.abs(Fc), axis=1) < np.max(np.abs(Fa), axis=1)) & np.all(cand.imag > 0, axis=1)
        fp = 0.5 * mm - 0.5 / (zc[:, None] + mm @ SF.T)
        new = np.where(ok[:, None], cand, fp)
        m[act] = new
        F[act] = resid(new, zc)
    m = m / a
    g = m @ f
    return QVESolution(m.reshape(shape + (K,)), g.reshape(shape),
                       np.max(np.abs(F), axis=1).reshape(shape), it)


def profile_density(x, block_variances, block_fractions, eta=None) -> np.ndarray:
    """Density of the spectral law, Im g(x + iη)/π with g = Σ_a f_a m_a.

    ``eta`` = η, by default 10⁻⁹·√max S (the profile's scale), so that the density is
    homogeneous (S → c²S, x → c·x give density/c); an absolute default 10⁻⁹ smeared it
    by 16 % at c = 1e-8. A given ``eta`` is used as is."""
    x = as_array("x", x, allow_empty=True)
    S, f = check_profile(block_variances, block_fractions)
    eta = 1e-9 * _unit(S) if eta is None else as_float("eta", eta, positive=True)
    sol = solve_qve(x + 1j * eta, S, f)
    return np.clip(sol.g.imag, 0.0, None) / np.pi


def _edge(S, f, rtol=1e-13):
    rows = (S * f[None, :]).sum(axis=1)
    scale = 2.0 * np.sqrt(rows.max())
    hi = scale * 1.01  # AEK: supp ⊂ [−2√‖S F‖∞, 2√‖S F‖∞]
    lo = 0.0
    st = _solve_real(hi, S, f)
    if st is None:  # pragma: no cover - excluded by the bound above
        raise RuntimeError("QVE edge search failed at the a priori bound")
    u, rho, _ = st
    SF = S * f[None, :]
    K = f.shape[0]
    for _ in range(200):
        phi2 = u * u
        J = phi2[:, None] * SF
        du = np.linalg.solve(np.eye(K) - J, -phi2)  # du/dz
        _, v = _perron(u, S, f)
        sv = np.sqrt(f) * v
        drho = 2.0 * (sv * du) @ S @ (sv * u)
        dist = (1.0 - rho) / (2.0 * abs(drho)) if drho < 0 else np.inf
        if dist < rtol * scale or hi - lo < rtol * scale:
            return hi - min(dist, hi - lo)
        zc = hi - dist
        if not (lo < zc < hi):
            zc = 0.5 * (lo + hi)
        st = _solve_real(zc, S, f)
        if st is None:
            lo = zc
        else:
            hi = zc
            u, rho, _ = st
    return hi


def profile_edge(block_variances, block_fractions) -> float:
    """Right edge of the spectral law of the block variance profile (the left edge is its
    negative).  Flat profile (equal row sums s of S·F) gives 2√s."""
    S, f = check_profile(block_variances, block_fractions)
    a = _unit(S)
    return float(_edge(S / a**2, f) * a)


def _unit(S) -> float:
    """√max S: the profile's scale. The edge and outlier are homogeneous (S → a²S, θ → aθ
    scales them by a; overlaps are unchanged), and the solvers' tolerances are set for
    O(1) inputs — at 1e-20 or 1e40 they returned the edge for the outlier or stopped 20 %
    short — so every public function solves the rescaled problem (S/a², z/a, θ/a; m and
    g come back as m₁/a, densities as density₁/a, with profile_density's default η =
    1e-9·a)."""
    return float(np.sqrt(np.max(S)))


def _weights(spike_block_weights, K):
    w = as_array("spike_block_weights", spike_block_weights, ndim=1, nonnegative=True)
    if w.shape[0] != K:
        raise ValueError(f"spike_block_weights must have length {K} (one per block), got {w.shape[0]}")
    if abs(w.sum() - 1.0) > 1e-9:
        raise ValueError(f"spike_block_weights must sum to 1 (‖u‖ = 1), got {w.sum()}")
    return w


def profile_outlier(spike, block_variances, block_fractions, spike_block_weights) -> float:
    """Outlier of W + θ u uᵀ for W with a block variance profile (S, f), or the edge.

    Solves 1 + θ Σ_a w_a m_a(z) = 0 for z above the right edge (θ > 0), with m the real
    QVE solution; |Σ w_a m_a(z)| ≤ 1/(z − edge) puts the root in (edge, edge + θ].
    If 1 + θ Σ w_a m_a(edge⁺) ≥ 0 there is no outlier and the edge is returned.
    Negative θ: the mirror image (−outlier(−θ), below the left edge).
    """
    theta = as_float("spike", spike)
    S, f = check_profile(block_variances, block_fractions)
    w = _weights(spike_block_weights, f.shape[0])
    a = _unit(S)
    t = theta / a
    if not math.isfinite(t):
        # θ beyond 1e308 × the profile's scale: the outlier θ + O(scale²/θ) is θ itself
        return float(theta)
    return a * _outlier(t, S / a**2, f, w)


def _outlier(theta, S, f, w) -> float:
    """`profile_outlier` for a profile of scale 1 (max S = 1)."""
    if theta < 0:
        return -_outlier(-theta, S, f, w)
    e = _edge(S, f)
    if theta == 0:
        return float(e)
    scale = max(1.0, e)

    def h(z):
        st = _solve_real(z, S, f)
        if st is None:
            raise RuntimeError(f"QVE solve failed at z={z} above the edge {e}")
        return 1.0 + theta * (w @ (-st[0]))

    z_in = e + 1e-10 * scale
    if h(z_in) >= 0:
        return float(e)
    hi = e + theta * (1 + 1e-9) + 1e-10 * scale
    if not math.isfinite(hi):
        raise ValueError(f"spike={theta} is too large: the outlier's bracket (edge + spike) "
                         "overflows float64")
    z = brentq(h, z_in, hi, xtol=1e-14 * scale, rtol=1e-15)
    return float(z)


def profile_outlier_overlap(spike, block_variances, block_fractions, spike_block_weights) -> float:
    """Squared overlap of the outlier eigenvector with u: 1/(θ² Σ_a w_a m_a'(z)) at the
    outlier z (0 below threshold).  Differentiating the QVE, u = −m satisfies
    (I − diag(u²) S F) du/dz = −u², and m' = −du/dz > 0."""
    theta = as_float("spike", spike)
    S, f = check_profile(block_variances, block_fractions)
    w = _weights(spike_block_weights, f.shape[0])
    a = _unit(S)                                      # the overlap is scale-free
    theta, S = abs(theta) / a, S / a**2
    if not math.isfinite(theta):
        return 1.0                      # a spike beyond any bulk: its own eigenvector
    z = _outlier(theta, S, f, w)
    st = _solve_real(z, S, f)
    e = _edge(S, f)
    if z <= e * (1 + 1e-12) or st is None:
        return 0.0
    u = st[0]
    K = f.shape[0]
    # u = 1/(z − SFu) ⇒ (I − diag(u²) S F) du/dz = −u²;  m' = −du/dz > 0
    du = np.linalg.solve(np.eye(K) - (u * u)[:, None] * (S * f[None, :]), -(u * u))
    inv = 1.0 / theta                   # (1/θ)² / m': θ² overflows beyond ~1e154
    return float(min(1.0, inv * inv / (w @ (-du))))


# every public function above: errors name the caller's arguments, results are finite
guard_module(globals())
