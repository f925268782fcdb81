"""Mean-square stability of heavy-ball SGD with batch noise.

Oracles: sympy limits of the derivation; exact enumeration of every batch of a tiny
problem (the second-moment operator built densely from all C(N, B) subsets, spectral
radius by numpy.linalg.eigvals, threshold by bisection) — no code shared with the
pencil; the closed form against the exact pencil on least squares.
"""

from itertools import combinations

import numpy as np
import pytest
import sympy as sp
from conftest import spiked_least_squares

from nets.learning_rates.stability import ms_stability_threshold
from rmt.lr import momentum_noise_gain, sgd_max_lr, sgd_momentum_ms_max_lr
from rmt.symbolic import derive_momentum_mean_square


def test_derivation_reduces_to_sgd_and_deterministic_limits():
    d = derive_momentum_mean_square()
    lam, c, s2, rho = (d.symbols[k] for k in ("lam", "c", "s2", "rho"))
    assert sp.simplify(d.exprs["alpha_max_rho0"] - 2 / (lam + c * s2 / lam)) == 0
    assert sp.simplify(d.exprs["alpha_max_noiseless"] - 2 * (1 + rho) / lam) == 0
    assert d.exprs["difference_from_closed_form"] == 0
    lj, lk = d.symbols["lambda_j"], d.symbols["lambda_k"]
    assert sp.expand(d.exprs["K_rho0"] - lj * lk) == 0
    assert sp.expand(d.exprs["L"] - (1 - rho) * (lj + lk)) == 0
    # diagonal of the exact form gives back the directional (one-direction) threshold
    Kd = d.exprs["K"].subs(lk, lj)
    alpha_diag = d.exprs["L"].subs(lk, lj) / (Kd + c * s2)
    vals = {lj: 0.7, lam: 0.7, c: 0.1, s2: 3.0, rho: sp.Rational(9, 10)}
    assert abs(float(alpha_diag.subs(vals) - d.exprs["alpha_max"].subs(vals))) < 1e-12


def test_closed_form_matches_lambdified_derivation():
    d = derive_momentum_mean_square()
    f = d.lambdify("alpha_max", "lam", "c", "s2", "rho")
    rng = np.random.default_rng(0)
    for _ in range(5):
        lam, s2, rho = rng.uniform(0.1, 3), rng.uniform(0, 10), rng.uniform(0, 0.95)
        B, N = 7, 300
        c = 1 / B - 1 / N
        assert sgd_momentum_ms_max_lr(B, lam, s2, N, rho) == pytest.approx(f(lam, c, s2, rho), rel=1e-12)
    assert momentum_noise_gain(0.9) == pytest.approx(19.0)
    Bs = np.array([1, 4, 16, 64])
    np.testing.assert_allclose(sgd_momentum_ms_max_lr(Bs, 1.3, 5.0, 100, 0.0),
                               sgd_max_lr(Bs, 1.3, 5.0, 100), rtol=1e-13)
    with pytest.raises(ValueError, match="momentum"):
        sgd_momentum_ms_max_lr(4, 1.0, 1.0, 100, 1.0)


def _enumerated_threshold(X, B, rho):
    """Exact α* from every batch: T = mean over subsets of A_S ⊗ A_S on the state
    (e_t, e_{t−1}); bisection on ρ(T) − 1 (a monotone crossing on this bracket)."""
    N, d = X.shape
    Hs = np.einsum("ni,nj->nij", X, X)
    subsets = [list(s) for s in combinations(range(N), B)]
    I, Z = np.eye(d), np.zeros((d, d))

    def radius(a):
        T = 0.0
        for S in subsets:
            A = np.block([[(1 + rho) * I - a * Hs[S].mean(0), -rho * I], [I, Z]])
            T = T + np.kron(A, A)
        return np.max(np.abs(np.linalg.eigvals(T / len(subsets))))

    lam = np.linalg.eigvalsh(Hs.mean(0))[-1]
    lo, hi = 1e-4, 2 * (1 + rho) / lam * (1 + 1e-9)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if radius(mid) < 1 else (lo, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("rho", [0.0, 0.6, 0.9])
def test_pencil_matches_subset_enumeration(rho):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((6, 3)) * np.array([2.0, 1.0, 0.5])
    for B in (1, 2, 6):
        exact = _enumerated_threshold(X, B, rho)
        assert ms_stability_threshold(X, B, momentum=rho).alpha == pytest.approx(exact, rel=1e-8)


def test_one_dimension_closed_form_is_exact():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(50) * rng.uniform(0.5, 2, 50)
    h = x ** 2
    s2 = np.var(h, ddof=1)
    for rho in (0.0, 0.5, 0.9):
        for B in (1, 3, 10, 50):
            exact = ms_stability_threshold(x[:, None], B, momentum=rho).alpha
            assert sgd_momentum_ms_max_lr(B, h.mean(), s2, 50, rho) == pytest.approx(exact, rel=1e-9)


def test_closed_form_within_5_percent_on_spiked_least_squares():
    """A well separated outlier (the directional model's premise): design with one
    direction 10× the others, N = 200, d = 20."""
    N = 200
    X, lam, s2 = spiked_least_squares(N=N, d=20)
    worst = {}
    for rho in (0.0, 0.9):
        r = [sgd_momentum_ms_max_lr(B, lam, s2, N, rho) / ms_stability_threshold(X, B, momentum=rho).alpha
             for B in (1, 2, 4, 8, 16, 32, 64, 128, 200)]
        worst[rho] = max(abs(np.array(r) - 1))
        assert worst[rho] < 0.05, (rho, np.round(r, 3))
    # the old deterministic momentum factor 2(1+ρ)/λ' is far off at small B
    old = sgd_max_lr(4, lam, s2, N, momentum=0.9)
    assert old / ms_stability_threshold(X, 4, momentum=0.9).alpha > 2.0
