"""Simulated batch Hessians with additive (Wigner-type) per-sample noise.

A finite population of N per-sample Hessians is built explicitly,

    H_i = H + Z_i − Z̄,   H = λ_top·e₁e₁ᵀ + λ_bottom·e₂e₂ᵀ   (P×P, bulk exactly 0),

Z_i symmetric with i.i.d. N(0, σ²) off-diagonal and N(0, 2σ²) diagonal entries (GOE
normalisation), centred so that the empirical Hessian (1/N)Σ H_i is exactly H. A batch
is a uniformly random subset S of size B drawn **without replacement** (docs/theory.md §1), and
H_B = (1/B) Σ_{i∈S} H_i. Nothing here uses the theory: the per-sample entry variance
σ² fed to the predictions is *measured* from the population (mean over off-diagonal
entries of the ddof=1 variance), as a practitioner would.

The population is stored as upper triangles in float32 (N × P(P+1)/2), batch means are
accumulated in float64; no P×P matrix per sample is ever formed.
"""

from __future__ import annotations

import numpy as np


def simulate_batch_wigner(P: int, N: int, lam_top: float, lam_bottom: float, sigma2: float,
                          batch_sizes, n_batches: int, rng: np.random.Generator,
                          bar=lambda it, desc: it) -> dict:
    """Top/bottom eigenvalues and top/bottom eigenvector overlaps of H_B.

    Returns a dict with P, N, lam_top, lam_bottom, sigma2 (measured), batch_sizes and
    arrays of shape (len(batch_sizes), n_batches): "top", "bottom", "overlap_top"
    (|⟨e₁, û_top⟩|²), "overlap_bottom" (|⟨e₂, û_bottom⟩|²).
    """
    iu = np.triu_indices(P)
    on_diag = iu[0] == iu[1]
    T = iu[0].size
    Z = np.empty((N, T), dtype=np.float32)
    chunk = max(1, 2_000_000 // T)
    scale = np.where(on_diag, np.sqrt(2.0 * sigma2), np.sqrt(sigma2)).astype(np.float32)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        Z[s:e] = rng.standard_normal((e - s, T), dtype=np.float32) * scale
    Z -= Z.mean(axis=0, dtype=np.float64).astype(np.float32)
    sigma2_hat = float(np.mean(Z[:, ~on_diag].var(axis=0, ddof=1, dtype=np.float64)))

    bs = [int(b) for b in batch_sizes]
    out = {k: np.empty((len(bs), n_batches)) for k in ("top", "bottom", "overlap_top", "overlap_bottom")}
    M = np.zeros((P, P))
    for i, B in enumerate(bar(bs, "batch sizes")):
        for r in range(n_batches):
            idx = rng.choice(N, size=B, replace=False)
            eps = Z[idx].mean(axis=0, dtype=np.float64)
            M[iu] = eps
            M.T[iu] = eps
            M[0, 0] += lam_top
            M[1, 1] += lam_bottom
            w, V = np.linalg.eigh(M)
            out["top"][i, r] = w[-1]
            out["bottom"][i, r] = w[0]
            out["overlap_top"][i, r] = V[0, -1] ** 2
            out["overlap_bottom"][i, r] = V[1, 0] ** 2
    out.update(P=P, N=N, lam_top=lam_top, lam_bottom=lam_bottom, sigma2=sigma2_hat,
               batch_sizes=np.array(bs))
    return out


def default_setup(ctx) -> dict:
    """Problem sizes for checks 1–3 (shared, so the simulation runs once per job).

    σ² is chosen so that the semicircle variance v = P·σ²/B equals 0.5 at B = 8: the
    top spike λ=1 is then supercritical for B ≥ 4 (θ² > v) and the bulk edge takes over
    at B ≤ 2 (B = 1: v/λ² = 4, far enough below the transition for the overlap check to
    judge its 0); the bottom spike −1.5 is supercritical for B ≥ 2. B = 3N/4 and 7N/8
    are where c = 1/B − 1/N and the plain 1/B differ by 3× and 7×, so the finite-population
    factor is tested at B < N, not only at B = N (where ε ≡ 0 trivially).
    """
    P = ctx.pick(300, 80)
    N = ctx.pick(1024, 256)
    return dict(P=P, N=N, lam_top=1.0, lam_bottom=-1.5, sigma2=0.5 * 8 / P,
                batch_sizes=ctx.pick([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 896, 1024],
                                     [1, 2, 8, 32, 128, 192, 224, 256]),
                n_batches=ctx.pick(40, 16))


def shared_simulation(ctx) -> dict:
    """The simulation of `default_setup`, cached in `ctx.cache` for the three checks."""
    setup = default_setup(ctx)
    key = ("batch_wigner", tuple(sorted((k, str(v)) for k, v in setup.items())))
    if key not in ctx.cache:
        ctx.cache[key] = simulate_batch_wigner(rng=ctx.rng("batch_wigner"), bar=ctx.bar, **setup)
    return ctx.cache[key]
