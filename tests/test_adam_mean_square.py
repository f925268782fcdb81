"""Adam's mean-square stability limit with a frozen preconditioner (rmt.lr.adam_ms_max_lr,
rmt.symbolic.derive_adam_mean_square).

Oracles: the second-moment map of the EMA iteration itself, m_t = β₁m_{t−1} + (1−β₁)h_t z_t,
z_{t+1} = z_t − α m_t, written out by hand here on the state (z_t, m_{t−1}) (no heavy-ball
rewriting, none of the package's code), its spectral radius found by bisection; a
Monte-Carlo run of that iteration; and sympy limits."""

import numpy as np
import pytest
import sympy as sp

from rmt.lr import adam_ms_max_lr, sgd_max_lr
from rmt.symbolic import derive_adam_mean_square


def _ema_moment_map(alpha, beta, lam, var):
    """3×3 map of (E z², E z m, E m²) for the EMA iteration with h ~ (λ, var), h independent
    of the state: z' = (1 − k h) z − αβ m,  m' = β m + (1−β) h z,  k = α(1−β)."""
    k = alpha * (1 - beta)
    Eh, Eh2 = lam, lam ** 2 + var
    E1 = 1 - k * Eh                     # E[1 − k h]
    E2 = 1 - 2 * k * Eh + k ** 2 * Eh2  # E[(1 − k h)²]
    Eh1 = Eh - k * Eh2                  # E[h(1 − k h)]
    return np.array([
        [E2, -2 * alpha * beta * E1, (alpha * beta) ** 2],
        [(1 - beta) * Eh1, beta * E1 - alpha * beta * (1 - beta) * Eh, -alpha * beta ** 2],
        [(1 - beta) ** 2 * Eh2, 2 * beta * (1 - beta) * Eh, beta ** 2],
    ])


def _ema_threshold(beta, lam, var):
    def radius(a):
        return max(abs(np.linalg.eigvals(_ema_moment_map(a, beta, lam, var))))
    lo, hi = 1e-12, 2 * (1 + beta) / ((1 - beta) * lam) * 1.0001
    assert radius(hi) > 1
    for _ in range(200):
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if radius(mid) < 1 else (lo, mid)
    return np.sqrt(lo * hi)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("B", [1, 4, 32, 200])
def test_closed_form_is_the_ema_iterations_mean_square_threshold(beta, B):
    lam, s2, N = 2.5, 40.0, 256
    var = (1 / B - 1 / N) * s2
    assert adam_ms_max_lr(B, lam, s2, N, beta) == pytest.approx(_ema_threshold(beta, lam, var),
                                                                rel=1e-7)


def test_beta0_is_the_sgd_form_and_noiseless_is_the_ema_factor():
    Bs = np.array([1, 8, 64, 300])
    np.testing.assert_allclose(adam_ms_max_lr(Bs, 1.3, 7.0, 300, 0.0),
                               sgd_max_lr(Bs, 1.3, 7.0, 300), rtol=1e-13)
    assert adam_ms_max_lr(300, 1.3, 7.0, 300, 0.9) == pytest.approx(38 / 1.3, rel=1e-13)
    assert adam_ms_max_lr(5, 1.3, 0.0, 300, 0.9) == pytest.approx(38 / 1.3, rel=1e-13)


def test_monte_carlo_second_moment_grows_only_above_the_limit():
    """Gaussian h_t, 20000 paths of the EMA iteration: the sample mean of z² after 300 steps
    decays at 0.8× the limit and grows at 1.25× it (exact: e^−10.7 and e^+21.8; the
    sample mean of a heavy-tailed product undershoots, hence the margins). Moderate noise
    (c·s² = 0.05λ²): with more noise the mean square is carried by rarer paths."""
    rng = np.random.default_rng(0)
    lam, var, beta = 1.0, 0.05, 0.9
    a_star = adam_ms_max_lr(1, lam, var, None, beta)
    out = {}
    for f in (0.8, 1.25):
        a = f * a_star
        z, m = np.ones(20000), np.zeros(20000)
        for _ in range(300):
            h = lam + np.sqrt(var) * rng.standard_normal(20000)
            m = beta * m + (1 - beta) * h * z
            z = z - a * m
        out[f] = np.log(np.mean(z ** 2))
    assert out[0.8] < -5.0 and out[1.25] > 5.0, out


def test_derivation_limits():
    d = derive_adam_mean_square()
    S = d.symbols
    assert d.exprs["difference_from_closed_form"] == 0
    assert sp.simplify(d.exprs["alpha_max_beta0"]
                       - 2 * S["lam"] / (S["lam"] ** 2 + S["c"] * S["s2"])) == 0
    assert d.exprs["small_B_exponent"] == sp.Rational(1, 2)
    assert sp.simplify(sp.diff(d.exprs["small_B_limit"], S["beta1"])) == 0
    G = (1 + S["beta1"]) / (1 - S["beta1"])
    assert sp.simplify(d.exprs["noise_crossover_batch_size"]
                       - G * S["s2_H"] / S["lambda_H"] ** 2) == 0
    # the noise-model formula at a numeric point equals the closed form with λ̃, s̃² scaled
    vals = {S["B"]: 16, S["lambda_H"]: 2.0, S["s2_H"]: 30.0, S["g2"]: 0.01, S["gv"]: 4.0,
            S["beta1"]: 0.9}
    p = np.sqrt(0.01 + 4.0 / 16)
    ref = adam_ms_max_lr(16, 2.0 / p, 30.0 / p ** 2, None, 0.9)
    assert float(d.exprs["noise_model"].subs(vals)) == pytest.approx(ref, rel=1e-12)


def test_bad_beta1_is_refused():
    with pytest.raises(ValueError, match="beta1"):
        adam_ms_max_lr(8, 1.0, 1.0, 64, 1.0)
