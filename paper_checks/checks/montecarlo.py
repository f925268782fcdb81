"""Monte-Carlo summaries and the tolerance rules shared by the checks.

Rule used for simulated means (stated in each check's `tolerance`):

    |mean − predicted| ≤ z·SE + rel·|predicted − reference|

SE = sample std/√n (Monte-Carlo error); the second term is an allowance for the
finite-size corrections the asymptotic theorem ignores, stated as a fraction of the
*predicted shift* (predicted − the unperturbed value), so that it vanishes where the
prediction is the unperturbed value itself (e.g. B = N, where ε ≡ 0 exactly). A
numerical floor of FLOOR·max(1, |predicted|) absorbs float32 storage round-off.
"""

from __future__ import annotations

import numpy as np

FLOOR = 1e-6


def mean_se(samples: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, standard error) along `axis` (std with ddof=1; 0 for one sample)."""
    x = np.asarray(samples, dtype=float)
    n = x.shape[axis]
    m = x.mean(axis=axis)
    s = x.std(axis=axis, ddof=1) if n > 1 else np.zeros_like(m)
    return m, s, s / np.sqrt(n)


def within(mean, se, predicted, reference, z: float, rel: float) -> np.ndarray:
    """Elementwise tolerance rule of the module docstring; returns a bool array."""
    mean, se, predicted, reference = (np.asarray(a, dtype=float)
                                      for a in (mean, se, predicted, reference))
    allow = z * se + rel * np.abs(predicted - reference)
    return np.abs(mean - predicted) <= allow + FLOOR * np.maximum(1.0, np.abs(predicted))


def rejected(mean, se, predicted, reference, z: float, rel: float) -> np.ndarray:
    """Where an alternative model is *shown* wrong: finite prediction and measurement
    outside `within`'s tolerance. A NaN prediction is not a rejection (`within` is False
    for it, so "the alternative must fail somewhere" passed for a broken alternative)."""
    predicted, mean = np.asarray(predicted, dtype=float), np.asarray(mean, dtype=float)
    return (np.isfinite(predicted) & np.isfinite(mean)
            & ~within(mean, se, predicted, reference, z, rel))


def zscore(mean, se, predicted) -> np.ndarray:
    """(mean − predicted)/SE, inf where SE = 0 and they differ, 0 where both agree."""
    mean, se, predicted = (np.asarray(a, dtype=float) for a in (mean, se, predicted))
    diff = mean - predicted
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, diff / np.where(se > 0, se, 1.0),
                     np.where(np.abs(diff) <= FLOOR * np.maximum(1.0, np.abs(predicted)), 0.0,
                              np.sign(diff) * np.inf))
    return z


def fit_power_law(x, y) -> tuple[float, float]:
    """Least-squares slope k and intercept of log y = k log x + b."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    k, b = np.polyfit(lx, ly, 1)
    return float(k), float(b)


def bootstrap_exponent(x, samples, rng: np.random.Generator, n_boot: int = 2000,
                       level: float = 0.95) -> dict:
    """Power-law exponent of mean(samples[i]) vs x[i], with a bootstrap CI.

    samples: list of 1-d arrays (replicates at each x). Each bootstrap draw resamples the
    replicates at every x with replacement and refits the slope. Returns
    {"exponent", "intercept", "ci_low", "ci_high", "se"}.
    """
    x = np.asarray(x, float)
    reps = [np.asarray(s, float) for s in samples]
    k, b = fit_power_law(x, [r.mean() for r in reps])
    boots = np.empty(n_boot)
    for j in range(n_boot):
        ym = [r[rng.integers(0, r.size, r.size)].mean() for r in reps]
        boots[j] = fit_power_law(x, ym)[0]
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return {"exponent": k, "intercept": b, "ci_low": float(lo), "ci_high": float(hi),
            "se": float(boots.std(ddof=1))}


def fmt(x, digits: int = 4) -> str:
    """Compact number formatting for table cells."""
    x = float(x)
    if not np.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"
