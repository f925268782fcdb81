import numpy as np
import pytest

import rmt


def test_batch_noise_factor_values():
    assert rmt.batch_noise_factor(8) == pytest.approx(1 / 8)
    assert rmt.batch_noise_factor(8, 64) == pytest.approx(1 / 8 - 1 / 64)
    assert rmt.batch_noise_factor(64, 64) == 0.0
    assert rmt.batch_noise_factor(8, 64, replacement=True) == pytest.approx(1 / 8)


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
    # with replacement the exact factor is (N-1)/N · 1/B in units of the ddof=1 variance
    expected = c * S2 * ((N - 1) / N if replacement else 1.0)
    est = means.var(ddof=1)
    se = expected * np.sqrt(2 / (reps - 1)) * 1.5  # kurtosis allowance for exponential data
    assert abs(est - expected) / se < 4


@pytest.mark.parametrize("kw, exc", [
    (dict(B=0), ValueError), (dict(B=-1), ValueError), (dict(B=10, N=5), ValueError),
    (dict(B=float("nan")), ValueError), (dict(B="8"), TypeError), (dict(B=4, N=0), ValueError),
])
def test_batch_noise_factor_bad_input(kw, exc):
    with pytest.raises(exc, match="B|N"):
        rmt.batch_noise_factor(**kw)
