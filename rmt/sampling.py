"""The finite-population sampling factor c(B, N) of docs/theory.md §1.

For a per-sample quantity x_i (i = 1..N) with unbiased variance
S² = (1/(N−1)) Σ (x_i − x̄)², the mean over a uniformly random batch of size B has
variance c(B, N)·S² with

    c(B, N) = 1/B − 1/N      (without replacement; Cochran, *Sampling Techniques*, §2.5)
    c(B, N) = (1/B)(1 − 1/N) (with replacement: the B draws are independent, each with
                              the population variance (1/N) Σ (x_i − x̄)² = (1 − 1/N)·S²)
    c(B, N) = 1/B            (N = ∞)

Hence every entry of the fluctuation ε = H_B − H has variance c(B, N)·σ²_jk and
ε ≡ 0 at B = N without replacement.
"""

from __future__ import annotations

from .validation import as_bool, as_float, guard_module


def batch_noise_factor(B, N=None, replacement: bool = False, *, name: str = "B") -> float:
    """Return c(B, N): the variance of a batch mean in units of the per-sample variance.

    Parameters
    ----------
    B : batch size, > 0 (need not be an integer, so that formulas can be evaluated on a
        continuum of batch sizes).
    N : data-set size >= 1, or None (or inf) for an infinite population (then c = 1/B).
        Like B it need not be an integer: c(B, N) is evaluated on a continuum of data-set
        sizes too (N = 2.5, B = 2 gives 1/2 − 1/2.5 = 0.1).
    replacement : sample with replacement (c = (1 − 1/N)/B, which tends to 1/B as N grows).
    name : the name of B in error messages (for callers whose own argument is, e.g.,
        ``B_from``), so that every message names the argument the user passed.

    Raises ValueError if B <= 0, N < 1 (a data set holds at least one sample), or B > N
    when sampling without replacement.
    """
    B = as_float(name, B, positive=True)
    replacement = as_bool("replacement", replacement)
    if N is None:
        return 1.0 / B
    N = as_float("N", N, positive=True, allow_inf=True)
    if N < 1.0:
        raise ValueError(f"N must be >= 1 (the number of samples), got N={N}")
    if N == float("inf"):
        return 1.0 / B
    if replacement:
        return (1.0 - 1.0 / N) / B
    if B > N:
        raise ValueError(f"{name} must be <= N when sampling without replacement, got {name}={B}, N={N}")
    return max(1.0 / B - 1.0 / N, 0.0)


# every public function above: errors name the caller's arguments, results are finite
guard_module(globals())
