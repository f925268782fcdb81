"""Tracy–Widom constants (Bornemann, "On the numerical evaluation of distributions in
random matrix theory", Markov Process. Relat. Fields 16, 2010; docs/references.md).

For a Wigner matrix normalised to the semicircle on [−2, 2],
n^{2/3}(λ_max − 2) → s_β·TW_β.  Means and variances of TW_β, and F_β(0).  The mean
converges slowly (corrections O(n^{−2/3}) in the scaled variable).

s_β = 1 for β = 1, 2. Bornemann's β = 4 law is Tracy and Widom's GSE distribution, whose
edge scaling counts the quaternion matrix differently: for the n×n β = 4 Hermite
ensemble on [−2, 2] (`rmt.tridiagonal.hermite_tridiagonal(n, 4)`, the Dumitriu–Edelman
model) the limit is 2^{−1/6}·TW_4 — simulated at n = 2·10⁴ (2,000 matrices): mean
−2.058 ± 0.014 and variance 0.409 against 2^{−1/6}·(−2.3069) = −2.055 and
2^{−1/3}·0.5177 = 0.411 (the unscaled constants miss the mean by z = 17).
"""

from __future__ import annotations

from .validation import as_float, as_int, guard_module

TW_MEAN = {1: -1.2065335745820, 2: -1.771086807411, 4: -2.306884893241}
TW_VARIANCE = {1: 1.607781034581, 2: 0.8131947928329, 4: 0.5177237207726}
TW_CDF_AT_ZERO = {1: 0.83190806620295, 2: 0.96937282835526}
TW_EDGE_SCALE = {1: 1.0, 2: 1.0, 4: 2.0 ** (-1.0 / 6.0)}     # s_β of the module docstring


def _args(n, beta, radius):
    n = as_float("n", n, positive=True)
    if n < 1:
        raise ValueError(f"n (the matrix size) must be >= 1, got {n}")
    beta = as_int("beta", beta)
    if beta not in TW_MEAN:
        raise ValueError(f"beta must be 1, 2 or 4, got {beta}")
    return n, beta, as_float("radius", radius, positive=True)


def tw_edge_mean(n: int, beta: int = 1, radius: float = 2.0) -> float:
    """Leading-order mean of the top eigenvalue of an n×n GβE with semicircle on
    [−radius, radius]: radius·(1 + s_β·TW mean·n^{−2/3}/2)."""
    n, beta, radius = _args(n, beta, radius)
    return radius * (1.0 + TW_EDGE_SCALE[beta] * TW_MEAN[beta] * n ** (-2.0 / 3.0) / 2.0)


def tw_edge_std(n: int, beta: int = 1, radius: float = 2.0) -> float:
    """Leading-order standard deviation of the top eigenvalue: radius/2·s_β·√Var·n^{−2/3}."""
    n, beta, radius = _args(n, beta, radius)
    return radius / 2.0 * TW_EDGE_SCALE[beta] * TW_VARIANCE[beta] ** 0.5 * n ** (-2.0 / 3.0)


# every public function above: errors name the caller's arguments, results are finite
guard_module(globals())
