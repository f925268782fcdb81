"""Measured divergence thresholds of mini-batch iterations on a least-squares quadratic.

For realizable least squares the error e = w − w* of any linear first-order method obeys
e ← e − M_k·H_B e, H_B = (1/B) Σ_{i∈S} x_i x_iᵀ with a fresh batch S (without
replacement inside the batch) at every step. Many values of a hyper-parameter (the
learning rate, or the damping) are run side by side as the columns of one d×K matrix, all
seeing the same batch sequence (common random numbers), so the measured threshold is a
clean sign change along the grid.

Divergence criterion (almost-sure, as `nets.learning_rates.lr_search`'s "growth" criterion): the
growth rate γ = d log‖e_t‖/dt over the second half of a run of T steps exceeds
GROWTH_TOL/T (= 3/T, the same margin as `nets.learning_rates.lr_search`: an e^1.5 growth over the half
run), so that finite-run noise in γ does not flag stable runs; the run length scales
like dim/B (`steps_for`) so that γ is resolved equally well at every B. The threshold is
interpolated where γ crosses the margin (`threshold_from_grid`). The columns are
renormalised every step and log-norms accumulated, so nothing overflows. This measures
the almost-sure (Lyapunov) threshold, which lies at or above the mean-square threshold
of `nets.learning_rates.stability` (mean-square stability implies almost-sure stability).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

GROWTH_TOL = 3.0


def steps_for(batch_size: int, dim: int, rank_per_sample: int = 1, sweeps: int = 40,
              min_steps: int = 300) -> int:
    """Run length for batch size B: a batch moves e only in a (B·k)-dimensional subspace
    per step (k = rank of a per-sample Hessian), so a run must sweep all `dim` directions
    `sweeps` times, T = sweeps·dim/(B·k), for the growth rate (and the 3/T margin) to be
    resolved equally well at every B; at least `min_steps`."""
    return max(int(min_steps), int(np.ceil(sweeps * dim / (batch_size * rank_per_sample))))


def least_squares_product(X: np.ndarray) -> Callable:
    """product(idx, E) = H_B E for H_i = x_i x_iᵀ (never forming H_B when B < d)."""
    d = X.shape[1]

    def product(idx, E):
        XB = X[idx]
        if len(idx) < d:
            return XB.T @ (XB @ E) / len(idx)
        return (XB.T @ XB / len(idx)) @ E

    return product


def growth_rates(X, batch_size: int, K: int, step: Callable, steps: int,
                 rng: np.random.Generator, product: Callable | None = None,
                 N: int | None = None, d: int | None = None) -> np.ndarray:
    """Lyapunov growth rate per step of each of K columns over the second half of a run.

    step(E, G) -> new E, with G = H_B E (d×K) the batch-Hessian product. The product is
    least squares on X by default; pass `product(idx, E)` (and N, d, with X=None) for
    other per-sample Hessians (e.g. a network's per-sample GGN factors).
    """
    if product is None:
        N, d = X.shape
        product = least_squares_product(X)
    B = int(batch_size)
    E = rng.standard_normal((d, K))
    E /= np.linalg.norm(E, axis=0)
    log_norm = np.zeros(K)
    half = steps // 2
    at_half = None
    for t in range(steps):
        G = product(rng.choice(N, size=B, replace=False), E)
        E = step(E, G)
        n = np.linalg.norm(E, axis=0)
        bad = ~np.isfinite(n) | (n == 0)
        n = np.where(bad, 1.0, n)
        log_norm += np.log(n) + np.where(bad, np.inf, 0.0)
        E = E / n
        if bad.any():   # a column overflowed: it has diverged; restart it to keep going
            E[:, bad] = rng.standard_normal((d, int(bad.sum())))
        if t + 1 == half:
            at_half = log_norm.copy()
    with np.errstate(invalid="ignore"):
        rate = (log_norm - at_half) / (steps - half)
    return np.where(np.isnan(rate), np.inf, rate)


def threshold_from_grid(grid: np.ndarray, rates: np.ndarray, tol: float,
                        unstable_high: bool = True) -> float:
    """Where the growth rate first crosses `tol` along an increasing grid.

    A column is diverged when its rate > tol. Scanning from the stable end (small values
    if `unstable_high`, e.g. a learning rate; large values otherwise, e.g. a damping), the
    threshold is the log-linear interpolation of (rate − tol) = 0 between the last stable
    and the first diverged grid point. NaN if the first point already diverges or none does.
    """
    g = np.asarray(grid, float)
    r = np.asarray(rates, float)
    if not unstable_high:
        g, r = g[::-1], r[::-1]
    d = r > tol
    if d[0] or not d.any():
        return float("nan")
    j = int(np.argmax(d))
    a, b = r[j - 1] - tol, r[j] - tol
    if not np.isfinite(b) or b <= a:
        return float(np.sqrt(g[j - 1] * g[j]))
    t = -a / (b - a)
    return float(np.exp(np.log(g[j - 1]) + t * (np.log(g[j]) - np.log(g[j - 1]))))


def outside_grid_failures(batch_sizes, runs: np.ndarray, span: tuple) -> list:
    """One failure per B whose runs (rows of `runs`, from `threshold_from_grid`) include a
    NaN: that run's threshold lies outside its grid, `span` × the prediction, so far
    outside any band the check allows — a miss to report, not a run to average away."""
    bad = ~np.isfinite(np.asarray(runs, float))
    return [f"B={B}: {int(n)} of {bad.shape[1]} runs' threshold outside the grid "
            f"[{span[0]:g}, {span[1]:g}]× predicted" for B, n in zip(batch_sizes, bad.sum(1)) if n]

