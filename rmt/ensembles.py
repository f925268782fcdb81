"""Dense random-matrix ensembles (samplers only; laws live in semicircle.py etc.).

Normalisations (state them, because peer libraries mix them up):

* ``normalization="semicircle"`` (default): off-diagonal variance 1/n, diagonal
  variance 2/n (GOE) or 1/n (GUE), so the spectrum tends to the semicircle on [−2, 2].
* ``normalization="raw"``: GOE off-diagonal variance 1, diagonal variance 2
  (H = (A + Aᵀ)/√2, A i.i.d. N(0, 1)); GUE E|h_ij|² = 1, diagonal N(0, 1).  Exact
  finite-n identities: GOE E tr H² = n² + n, E tr H⁴ = 2n³ + 5n² + 5n; GUE
  E tr H⁴ = 2n³ + n (Harer–Zagier).  "raw" = √n × "semicircle".

The tridiagonal samplers in tridiagonal.py use the same two conventions, so a dense
and a tridiagonal matrix with the same ``normalization`` have the same spectrum law at
every finite n.  All randomness comes from the keyword ``seed`` — an int >= 0 seeds
``numpy.random.default_rng(seed)``, a ``numpy.random.Generator`` is drawn from directly,
None draws fresh entropy — or, equivalently, from ``rng`` (the older name of the same
argument; give at most one of the two).
"""

from __future__ import annotations

import numpy as np

from .validation import as_array, as_float, as_int, guard_module, rng_from

_NORMALIZATIONS = ("semicircle", "raw")
MAX_DENSE = 2 ** 20        # n×n float64 beyond this (8 TiB) cannot be allocated


def _norm_scale(normalization: str, n: int) -> float:
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    return 1.0 / np.sqrt(n) if normalization == "semicircle" else 1.0


def goe(n, rng=None, normalization: str = "semicircle", *, seed=None) -> np.ndarray:
    """Sample an n×n GOE matrix H = (A + Aᵀ)/√2 · scale (see module docstring)."""
    n = as_int("n", n, minimum=1, maximum=MAX_DENSE)
    scale = _norm_scale(normalization, n)
    rng = rng_from(rng, seed)
    a = rng.standard_normal((n, n))
    h = (a + a.T) * (scale / np.sqrt(2.0))
    return h


def gue(n, rng=None, normalization: str = "semicircle", *, seed=None) -> np.ndarray:
    """Sample an n×n GUE matrix (Hermitian, E|h_ij|² = 1 raw, diagonal N(0, 1) raw)."""
    n = as_int("n", n, minimum=1, maximum=MAX_DENSE)
    scale = _norm_scale(normalization, n)
    rng = rng_from(rng, seed)
    a = (rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))) / np.sqrt(2.0)
    return (a + a.conj().T) * (scale / np.sqrt(2.0))


def wishart(p, n, rng=None, variance=1.0, population=None, *, seed=None) -> np.ndarray:
    """Real sample covariance S = X Xᵀ/n with X p×n, columns N(0, σ²·Σ).

    ``population`` (optional, length p, nonnegative: a zero is a direction without noise)
    gives Σ = diag(population); the
    spiked Wishart model is population = (ℓ, 1, …, 1).  E tr S² = p(n + p + 1)/n for
    Σ = I, σ² = 1.  Spectrum → MP(q = p/n, σ²).
    """
    p = as_int("p", p, minimum=1, maximum=MAX_DENSE)
    n = as_int("n", n, minimum=1, maximum=MAX_DENSE)
    s2 = as_float("variance", variance, positive=True)
    rng = rng_from(rng, seed)
    x = rng.standard_normal((p, n)) * np.sqrt(s2)
    if population is not None:
        pop = as_array("population", population, ndim=1, nonnegative=True)
        if pop.shape[0] != p:
            raise ValueError(f"population must have length p={p}, got {pop.shape[0]}")
        x *= np.sqrt(pop)[:, None]
    return x @ x.T / n


def check_profile(block_variances, block_fractions):
    """Validate a block variance profile; return (S, f) as arrays.

    S (K×K) must be symmetric, finite and non-negative; f (length K) positive and
    summing to 1 (within 1e-9).  Errors name the argument.
    """
    S = as_array("block_variances", block_variances)
    if S.ndim == 0:
        S = S.reshape(1, 1)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"block_variances must be a square matrix, got shape {S.shape}")
    if np.any(S < 0):
        raise ValueError("block_variances must be non-negative")
    if not _symmetric(S, rtol=1e-12, atol=1e-14):
        raise ValueError("block_variances must be symmetric")
    if not np.any(S > 0):
        raise ValueError("block_variances must not be identically zero")
    f = as_array("block_fractions", block_fractions, ndim=1)
    if f.shape[0] != S.shape[0]:
        raise ValueError(f"block_fractions must have length {S.shape[0]}, one per block of "
                         f"block_variances (shape {S.shape}; a scalar is one block), got "
                         f"{f.shape[0]}")
    if np.any(f <= 0):
        raise ValueError("block_fractions must be positive")
    if abs(f.sum() - 1.0) > 1e-9:
        raise ValueError(f"block_fractions must sum to 1, got {f.sum()}")
    return 0.5 * (S + S.T), f


def block_sizes(P, block_fractions) -> np.ndarray:
    """Integer block sizes summing to P, as close as possible to P·f (largest remainder)."""
    P = as_int("P", P, minimum=1)
    f = as_array("block_fractions", block_fractions, ndim=1, nonnegative=True)
    if abs(f.sum() - 1.0) > 1e-9:
        raise ValueError(f"block_fractions must sum to 1, got {f.sum()}")
    raw = P * f
    sizes = np.floor(raw).astype(int)
    rem = P - sizes.sum()
    sizes[np.argsort(-(raw - sizes))[:rem]] += 1
    return sizes


def profile_wigner(P, block_variances, block_fractions, rng=None, *, seed=None) -> np.ndarray:
    """Real symmetric P×P Wigner-type matrix with a block variance profile.

    Entry (j, k) with j in block a and k in block b is N(0, S[a, b]/P) (diagonal too),
    independent up to symmetry.  Block a holds round(P·f[a]) consecutive coordinates
    (see ``block_sizes``).  The limiting resolvent diagonal solves the QVE of
    variance_profile.py.
    """
    S, f = check_profile(block_variances, block_fractions)
    P = as_int("P", P, minimum=1, maximum=MAX_DENSE)
    rng = rng_from(rng, seed)
    labels = np.repeat(np.arange(len(f)), block_sizes(P, f))
    sd = np.sqrt(S[labels][:, labels] / P)
    a = rng.standard_normal((P, P))
    upper = np.triu(a)
    h = upper + np.triu(upper, 1).T
    return h * sd


def spiked_additive(H, spike, vector=None) -> np.ndarray:
    """Return H + θ·u uᵀ (u unit, default e₁); ``H`` is not modified."""
    H = as_array("H", H, ndim=2)
    if H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square matrix, got shape {H.shape}")
    theta = as_float("spike", spike)
    n = H.shape[0]
    if vector is None:
        u = np.zeros(n)
        u[0] = 1.0
    else:
        u = as_array("vector", vector, ndim=1)
        nrm = np.linalg.norm(u)
        if u.shape[0] != n or nrm == 0:
            raise ValueError("vector must be a non-zero vector of length H.shape[0]")
        u = u / nrm
    return H + theta * np.outer(u, u)


def _symmetric(M, rtol=1e-5, atol=1e-8) -> bool:
    """M ≈ Mᵀ entrywise to `rtol` and `atol`·max|M| (by default numpy's allclose defaults,
    the absolute part relative to M's scale, so that the check does not depend on units)."""
    return bool(np.allclose(M, M.T, rtol=rtol, atol=atol * np.max(np.abs(M))))


def spiked_multiplicative(G, W) -> np.ndarray:
    """Return G^{1/2} W G^{1/2} for symmetric PSD G (e.g. a population covariance with a
    spike) and symmetric W (e.g. a white Wishart matrix): the multiplicative model of
    docs/theory.md §4.  G^{1/2} is the symmetric PSD square root (eigendecomposition)."""
    G = as_array("G", G, ndim=2)
    W = as_array("W", W, ndim=2)
    if G.shape != W.shape or G.shape[0] != G.shape[1]:
        raise ValueError("G and W must be square matrices of equal shape")
    for name, M in (("G", G), ("W", W)):
        if not _symmetric(M):
            raise ValueError(f"{name} must be symmetric")
    w, v = np.linalg.eigh(G)
    if w.min() < -1e-10 * max(1.0, abs(w).max()):
        raise ValueError("G must be positive semi-definite")
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return root @ W @ root


# every public function above: errors name the caller's arguments, results are finite
guard_module(globals())
