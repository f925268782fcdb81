import numpy as np
import pytest

import rmt


def test_batch_noise_factor_values():
    assert rmt.batch_noise_factor(8) == pytest.approx(1 / 8)
    assert rmt.batch_noise_factor(8, 64) == pytest.approx(1 / 8 - 1 / 64)
    assert rmt.batch_noise_factor(64, 64) == 0.0
    assert rmt.batch_noise_factor(8, 64, replacement=True) == pytest.approx((1 - 1 / 64) / 8)
    assert rmt.batch_noise_factor(8, float("inf"), replacement=True) == pytest.approx(1 / 8)


@pytest.mark.parametrize("replacement", [False, True])
def test_batch_mean_variance_is_exact_by_enumeration(replacement):
    """Var(batch mean) = c(B, N)·S² exactly, S² the ddof=1 variance, over every batch."""
    import itertools

    x = np.random.default_rng(3).standard_normal(6)
    B = 3
    batches = (itertools.product(range(6), repeat=B) if replacement
               else itertools.combinations(range(6), B))
    means = np.array([x[list(b)].mean() for b in batches])     # each batch equally likely
    exact = np.mean((means - x.mean()) ** 2)
    c = rmt.batch_noise_factor(B, 6, replacement=replacement)
    assert c * x.var(ddof=1) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("replacement", [False, True])
def test_batch_mean_variance_matches_monte_carlo(replacement):
    rng = np.random.default_rng(0)
    N, B, reps = 50, 7, 40000
    x = rng.standard_exponential(N)
    S2 = x.var(ddof=1)
    means = np.empty(reps)
    for r in range(reps):
        idx = rng.choice(N, size=B, replace=replacement)
        means[r] = x[idx].mean()
    c = rmt.batch_noise_factor(B, N, replacement=replacement)
    expected = c * S2
    est = means.var(ddof=1)
    se = expected * np.sqrt(2 / (reps - 1)) * 1.5  # kurtosis allowance for exponential data
    assert abs(est - expected) / se < 4


@pytest.mark.parametrize("kw, exc", [
    (dict(B=0), ValueError), (dict(B=-1), ValueError), (dict(B=10, N=5), ValueError),
    (dict(B=float("nan")), ValueError), (dict(B="8"), TypeError), (dict(B=4, N=0), ValueError),
    (dict(B=0.25, N=0.5, replacement=True), ValueError),      # would give c = −4
])
def test_batch_noise_factor_bad_input(kw, exc):
    with pytest.raises(exc, match="B|N"):
        rmt.batch_noise_factor(**kw)


def test_batch_noise_factor_takes_a_continuum_of_data_set_sizes():
    """Like B (documented: need not be an integer), N is a real >= 1: c(2, 2.5) =
    1/2 − 1/2.5, with replacement (1 − 1/2.5)/2 (was silently accepted, now documented)."""
    assert rmt.batch_noise_factor(2, 2.5) == pytest.approx(0.5 - 0.4, rel=1e-14)
    assert rmt.batch_noise_factor(2, 2.5, replacement=True) == pytest.approx(0.6 / 2, rel=1e-14)
    assert "integer" in rmt.batch_noise_factor.__doc__.split("N :")[1].split("replacement")[0]
    with pytest.raises(ValueError, match="N"):
        rmt.batch_noise_factor(1, 0.5)
