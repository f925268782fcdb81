"""Tracy–Widom constants (Bornemann, "On the numerical evaluation of distributions in
random matrix theory", Markov Process. Relat. Fields 16, 2010; docs/references.md).

For a Wigner matrix normalised to the semicircle on [−2, 2],
n^{2/3}(λ_max − 2) → TW_β.  Means and variances of TW_β, and F_β(0).  The mean
converges slowly (corrections O(n^{−2/3}) in the scaled variable).
"""

from __future__ import annotations

from .validation import as_float, as_int, guard_module

TW_MEAN = {1: -1.2065335745820, 2: -1.771086807411, 4: -2.306884893241}
TW_VARIANCE = {1: 1.607781034581, 2: 0.8131947928329, 4: 0.5177237207726}
TW_CDF_AT_ZERO = {1: 0.83190806620295, 2: 0.96937282835526}


def _args(n, beta, radius):
    n = as_float("n", n, positive=True)
    beta = as_int("beta", beta)
    if beta not in TW_MEAN:
        raise ValueError(f"beta must be 1, 2 or 4, got {beta}")
    return n, beta, as_float("radius", radius, positive=True)


def tw_edge_mean(n: int, beta: int = 1, radius: float = 2.0) -> float:
    """Leading-order mean of the top eigenvalue of an n×n GβE with semicircle on
    [−radius, radius]: radius·(1 + TW mean·n^{−2/3}/2)."""
    n, beta, radius = _args(n, beta, radius)
    return radius * (1.0 + TW_MEAN[beta] * n ** (-2.0 / 3.0) / 2.0)


def tw_edge_std(n: int, beta: int = 1, radius: float = 2.0) -> float:
    """Leading-order standard deviation of the top eigenvalue: radius/2·√Var·n^{−2/3}."""
    n, beta, radius = _args(n, beta, radius)
    return radius / 2.0 * TW_VARIANCE[beta] ** 0.5 * n ** (-2.0 / 3.0)


# every public function above: errors name the caller's arguments, results are finite
guard_module(globals())
