"""Bulk laws (semicircle, Marchenko–Pastur) and free convolutions with a semicircle,
against quadrature, exact reductions, closed forms from docs/references.md and sampled
matrices."""

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.linalg import eigvalsh

from rmt.ensembles import goe, wishart
from rmt.free_convolution import (
    discrete_stieltjes,
    sc_mp_density,
    sc_mp_edges,
    semicircle_free_convolution,
    semicircle_free_convolution_density,
    semicircle_free_convolution_edges,
)
from rmt.marchenko_pastur import mp_atom, mp_density, mp_edges, mp_stieltjes, mp_stieltjes_derivative
from rmt.semicircle import semicircle_density, semicircle_edges, semicircle_stieltjes, semicircle_stieltjes_derivative
from rmt.tracy_widom import TW_MEAN, TW_VARIANCE
from rmt.tridiagonal import hermite_tridiagonal, sample_spiked_goe_top, tridiagonal_eigvals

Z_POINTS = [3.0 + 0j, -2.7 + 0j, 1.0 + 1.0j, -0.5 + 0.2j, 0.3 + 2.0j]


def stieltjes_quad(density, lo, hi, z, atom=0.0):
    re = quad(lambda x: (density(x) / (x - z)).real, lo, hi, limit=200)[0]
    im = quad(lambda x: (density(x) / (x - z)).imag, lo, hi, limit=200)[0]
    return re + 1j * im + atom / (0.0 - z)


def test_semicircle_stieltjes_refuses_the_pole_of_variance_zero():
    with pytest.raises(ValueError, match="z=0 is a singular point"):
        semicircle_stieltjes(0.0, variance=0.0)
    np.testing.assert_allclose(semicircle_stieltjes([2.0, 1j], variance=0.0), [-0.5, 1j])


@pytest.mark.parametrize("v", [1.0, 0.37])
def test_semicircle_stieltjes_matches_quadrature_and_branch(v):
    lo, hi = semicircle_edges(v)
    for z in Z_POINTS:
        z = z * np.sqrt(v)
        assert semicircle_stieltjes(z, v) == pytest.approx(
            stieltjes_quad(lambda x: semicircle_density(x, v), lo, hi, z), abs=1e-8)
        if z.imag > 0:
            assert semicircle_stieltjes(z, v).imag > 0
    assert semicircle_stieltjes(1e6, v) == pytest.approx(-1e-6, rel=1e-5)
    # derivative by central difference
    z = 3.1 * np.sqrt(v)
    fd = (semicircle_stieltjes(z + 1e-6, v) - semicircle_stieltjes(z - 1e-6, v)) / 2e-6
    assert semicircle_stieltjes_derivative(z, v).real == pytest.approx(fd.real, rel=1e-6)
    # density integrates to 1 and has variance v
    assert quad(lambda x: semicircle_density(x, v), lo, hi)[0] == pytest.approx(1.0, abs=1e-8)
    assert quad(lambda x: x * x * semicircle_density(x, v), lo, hi)[0] == pytest.approx(v, rel=1e-8)


@pytest.mark.parametrize("q,s2", [(0.5, 2.0), (2.0, 1.0)])
def test_mp_stieltjes_matches_quadrature_with_atom(q, s2):
    lo, hi = mp_edges(q, s2)
    for z in [hi + 1.0 + 0j, 1.0 + 1.0j, -1.0 + 0j, -1.0 + 0.2j, 0.1 + 0.05j]:
        exact = stieltjes_quad(lambda x: mp_density(x, q, s2), lo, hi, z, mp_atom(q))
        assert mp_stieltjes(z, q, s2) == pytest.approx(exact, abs=1e-7)
    z = hi + 0.7
    fd = (mp_stieltjes(z + 1e-6, q, s2) - mp_stieltjes(z - 1e-6, q, s2)) / 2e-6
    assert mp_stieltjes_derivative(z, q, s2).real == pytest.approx(fd.real, rel=1e-6)
    mass = quad(lambda x: mp_density(x, q, s2), lo, hi, limit=200)[0]
    assert mass + mp_atom(q) == pytest.approx(1.0, abs=1e-7)


def test_semicircle_edges_and_stieltjes_vs_dense_goe():
    rng = np.random.default_rng(11)
    n = 1000
    tops, bottoms, gs = [], [], []
    z = 0.5 + 0.3j
    for _ in range(4):
        lam = eigvalsh(goe(n, rng))
        tops.append(lam[-1])
        bottoms.append(lam[0])
        gs.append(np.mean(1.0 / (lam - z)))
    # the extremes sit within a few Tracy–Widom widths (≈ n^{-2/3}) of ±2
    assert abs(np.mean(tops) - 2.0) < 0.05 and abs(np.mean(bottoms) + 2.0) < 0.05
    # linear statistics have O(1/n) fluctuations and bias
    assert abs(np.mean(gs) - semicircle_stieltjes(z)) < 5e-3
    # histogram vs the semicircle density
    edges = np.linspace(-2, 2, 9)
    frac = np.histogram(lam, edges)[0] / n
    expect = [quad(semicircle_density, a, b)[0] for a, b in zip(edges[:-1], edges[1:])]
    assert np.max(np.abs(frac - expect)) < 0.01


def test_tridiagonal_top_eigenvalue_is_tracy_widom():
    # n^{2/3}(λ_max − 2) → TW₁ (Bornemann mean −1.2065, variance 1.6078)
    rng = np.random.default_rng(12)
    n, reps = 5000, 200
    x = np.array([n ** (2 / 3) * (sample_spiked_goe_top(n, 0.0, rng) - 2.0) for _ in range(reps)])
    se = np.sqrt(TW_VARIANCE[1] / reps)
    assert abs(x.mean() - TW_MEAN[1]) / se < 4.0
    assert x.var(ddof=1) == pytest.approx(TW_VARIANCE[1], rel=4 * np.sqrt(2.0 / reps) * 1.3)
    # bottom eigenvalue of the unspiked model mirrors the top
    d, e = hermite_tridiagonal(n, 1, rng)
    assert abs(tridiagonal_eigvals(d, e, "bottom") + 2.0) < 10 * n ** (-2 / 3)


@pytest.mark.parametrize("beta", [1, 2, 4])
def test_tw_edge_mean_and_std_match_the_beta_hermite_ensemble(beta):
    """tw_edge_mean/std against the top eigenvalue of the β-Hermite tridiagonal model
    (n = 4000, 1,500 matrices): z-score of the mean, ratio of the spreads. At β = 4 the
    edge limit is 2^{−1/6}·TW_4 in this normalisation (Tracy–Widom's GSE scaling
    differs); without that factor the mean misses by z ≈ 15."""
    from rmt.tracy_widom import tw_edge_mean, tw_edge_std

    rng = np.random.default_rng(40 + beta)
    n, reps = 4000, 1500
    top = np.array([tridiagonal_eigvals(*hermite_tridiagonal(n, float(beta), rng))
                    for _ in range(reps)])
    sd = tw_edge_std(n, beta)
    # finite-n bias of the mean: O(n^{-2/3}) in the scaled variable, ≲ 0.05·sd here
    assert abs(top.mean() - tw_edge_mean(n, beta)) / (sd / np.sqrt(reps)) < 4.5
    assert top.std(ddof=1) / sd == pytest.approx(1.0, abs=0.08)


@pytest.mark.parametrize("p,n,s2", [(500, 1000, 2.0), (1000, 500, 1.0)])
def test_mp_edges_atom_and_stieltjes_vs_sampled_wishart(p, n, s2):
    rng = np.random.default_rng(13)
    q = p / n
    lam = eigvalsh(wishart(p, n, rng, variance=s2))
    lo, hi = mp_edges(q, s2)
    # Johnstone (2001): λ_max ≈ hi + s2·scale·TW₁, scale symmetric in (p, n)
    scale = s2 * (np.sqrt(n) + np.sqrt(p)) * (1 / np.sqrt(n) + 1 / np.sqrt(p)) ** (1 / 3) / n
    assert abs(lam[-1] - hi - TW_MEAN[1] * scale) < 5 * np.sqrt(TW_VARIANCE[1]) * scale
    if q < 1:
        assert abs(lam[0] - lo) < 0.03 * hi
    else:  # exactly p − n zero eigenvalues
        assert np.sum(lam < 1e-9 * hi) == p - n
        assert abs(lam[p - n] - lo) < 0.03 * hi
    for z in [hi + 0.5, 1.0 + 0.5j, -0.5]:
        assert abs(np.mean(1.0 / (lam - z)) - mp_stieltjes(z, q, s2)) < 5e-3


def test_deformed_wigner_two_atom_edge_reference_value():
    left, right = semicircle_free_convolution_edges([-1.5, 1.5], [0.5, 0.5], 1.0)
    assert right == pytest.approx(3.04885, abs=1e-5)  # docs/references.md
    assert left == pytest.approx(-right, abs=1e-12)


def test_free_convolution_at_real_points_inside_the_support_is_the_boundary_value():
    """Real x on the support: g(x + i0), whose imaginary part is π × the density; real x
    off it: the real physical root (the density there is 0)."""
    atoms = [-1.0, 1.0]
    x = np.array([-2.0, -1.0, 0.5, 1.0, 2.5, 3.0, -4.0])
    g = semicircle_free_convolution(x, atoms, None, 1.0).g
    ref = semicircle_free_convolution(x + 1e-8j, atoms, None, 1.0).g
    assert np.allclose(g, ref, atol=1e-6)
    lo, hi = semicircle_free_convolution_edges(atoms, None, 1.0)
    on = (x > lo) & (x < hi)
    assert np.all(g[on].imag > 1e-3) and np.all(g[~on].imag == 0)
    # the density integrates to one
    assert quad(lambda t: semicircle_free_convolution(t, atoms, None, 1.0).g.imag / np.pi,
                lo, hi, limit=200)[0] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="eta"):
        semicircle_free_convolution_density([0.0], atoms, None, 1.0, eta=-1e-3)
    with pytest.raises(ValueError, match="noise_var"):
        semicircle_free_convolution_density([0.0], atoms, None, 0.0)
    with pytest.raises(ValueError, match="maxiter"):
        semicircle_free_convolution([1j], atoms, None, 1.0, maxiter=0)
    with pytest.raises(ValueError, match="Im z"):
        semicircle_free_convolution([1 - 1j], atoms, None, 1.0)


def test_free_convolution_reductions():
    z = np.array([2.5 + 0j, 0.3 + 0.1j, -1.0 + 1.0j, -4.0 + 0j])
    # A = δ₀: the semicircle itself
    r = semicircle_free_convolution(z, [0.0], [1.0], 0.8)
    assert np.allclose(r.g, semicircle_stieltjes(z, 0.8), atol=1e-12)
    assert np.max(r.residual) < 1e-12
    # v → 0: the discrete spectrum itself (off the atoms)
    atoms, w = [-1.0, 0.5, 2.0], [0.2, 0.5, 0.3]
    z2 = np.array([3.0 + 0j, 0.0 + 0.5j, -2.0 + 0j])
    r0 = semicircle_free_convolution(z2, atoms, w, 1e-12)
    assert np.allclose(r0.g, discrete_stieltjes(z2, atoms, w), atol=1e-9)
    # Im g > 0 on the upper half plane and the density's first two moments
    x = np.linspace(-4.5, 4.5, 9001)
    dens = semicircle_free_convolution_density(x, [-1.5, 1.5], [0.5, 0.5], 1.0)
    dx = x[1] - x[0]
    assert np.sum(dens) * dx == pytest.approx(1.0, abs=1e-4)
    assert np.sum(dens * x) * dx == pytest.approx(0.0, abs=1e-6)
    assert np.sum(dens * x * x) * dx == pytest.approx(1.5 ** 2 + 1.0, abs=1e-3)
    support = x[dens > 1e-4]
    assert support.max() == pytest.approx(3.04885, abs=5e-3)


def test_deformed_wigner_vs_sampled_matrix():
    rng = np.random.default_rng(14)
    n = 1000
    A = np.r_[np.full(n // 2, -1.5), np.full(n // 2, 1.5)]
    tops, bottoms, hist = [], [], []
    grid = np.linspace(-3.5, 3.5, 8)
    for _ in range(4):
        lam = eigvalsh(goe(n, rng) + np.diag(A))
        tops.append(lam[-1])
        bottoms.append(lam[0])
        hist.append(np.histogram(lam, grid)[0] / n)
    edge = semicircle_free_convolution_edges([-1.5, 1.5], [0.5, 0.5], 1.0)[1]
    assert abs(np.mean(tops) - edge) < 0.04 and abs(np.mean(bottoms) + edge) < 0.04
    # wrong laws are far: a semicircle of the same variance would give 2√3.25 = 3.61
    x = np.linspace(-3.5, 3.5, 7001)
    dens = semicircle_free_convolution_density(x, [-1.5, 1.5], [0.5, 0.5], 1.0)
    cdf = np.concatenate([[0], np.cumsum((dens[1:] + dens[:-1]) / 2) * (x[1] - x[0])])
    expect = np.diff(np.interp(grid, x, cdf))
    assert np.max(np.abs(np.mean(hist, axis=0) - expect)) < 0.01


def test_sc_mp_edge_reference_and_limits():
    left, right = sc_mp_edges(0.5, 0.5)
    assert right == pytest.approx(3.308, abs=1e-3)  # docs/references.md
    # s² → 0 gives back the MP edges
    l0, r0 = sc_mp_edges(1e-12, 0.3)
    lo, hi = mp_edges(0.3)
    assert r0 == pytest.approx(hi, abs=1e-4) and l0 == pytest.approx(lo, abs=1e-4)
    # density: mass 1, mean 1 (MP mean), variance s² + c, support = edges
    x = np.linspace(-1.5, 4.0, 5501)
    d = sc_mp_density(x, 0.5, 0.5)
    dx = x[1] - x[0]
    assert np.sum(d) * dx == pytest.approx(1.0, abs=1e-3)
    assert np.sum(d * x) * dx == pytest.approx(1.0, abs=1e-3)
    assert np.sum(d * (x - 1) ** 2) * dx == pytest.approx(1.0, abs=2e-3)
    assert x[d > 1e-3].max() == pytest.approx(right, abs=0.01)
    assert x[d > 1e-3].min() == pytest.approx(left, abs=0.01)


def test_sc_mp_edge_vs_sampled_matrix():
    rng = np.random.default_rng(15)
    p, n, s2 = 1000, 2000, 0.5
    tops = [eigvalsh(np.sqrt(s2) * goe(p, rng) + wishart(p, n, rng), subset_by_index=[p - 1, p - 1])[0]
            for _ in range(3)]
    assert abs(np.mean(tops) - sc_mp_edges(s2, p / n)[1]) < 0.05  # docs/references.md sample: 3.29


# ---- scale and refusals (an outside audit) -------------------------------------------

def _mp_quad(z, q, deriv):
    """∫ dμ(x)/(x − z)^(1 + deriv) for MP(q, 1) by mpmath quadrature, atom included."""
    import mpmath as mpm

    mpm.mp.dps = 30
    lo, hi = (1 - mpm.sqrt(q)) ** 2, (1 + mpm.sqrt(q)) ** 2
    dens = lambda x: mpm.sqrt((hi - x) * (x - lo)) / (2 * mpm.pi * q * x)  # noqa: E731
    k = 1 + deriv
    atom = max(0, 1 - 1 / mpm.mpf(q))
    return float(mpm.quad(lambda x: dens(x) / (x - z) ** k, [lo, hi]) + atom / (0 - mpm.mpf(z)) ** k)


@pytest.mark.parametrize("s", [1e-20, 1e-10, 1.0, 1e10])
def test_stieltjes_derivatives_accept_every_point_off_the_edges_at_any_scale(s):
    """The singular-point test was absolute (4·eps·(1 + |edge|) ≈ 8.9e-16): at v = 1e-40
    semicircle_stieltjes_derivative(1e-19) — five times the edge — was refused, as were
    mp_stieltjes_derivative(±1e-19, 0.5, 1e-20). Oracles: g'(z) = (z/√(z² − 4v) − 1)/(2v)
    (mpmath) and MP quadrature; g'(s·z; s²·v) = g'(z; v)/s²."""
    import mpmath as mpm

    mpm.mp.dps = 30
    v = s * s
    for t in (5.0, -2.5, 2.0 * (1 + 1e-12)):
        z = t * 2 * s                       # t × the edge
        zz, vv = mpm.mpf(z), mpm.mpf(v)
        want = float((zz / (mpm.sign(zz) * mpm.sqrt(zz * zz - 4 * vv)) - 1) / (2 * vv))
        assert semicircle_stieltjes_derivative(z, v).real == pytest.approx(want, rel=1e-9 if t < 2.1 else 1e-12)
    for z in (-10.0, 10.0, 0.05):           # MP(0.5): support (0.0858, 2.914), σ² = s
        got = mp_stieltjes_derivative(z * s, 0.5, s).real * s * s
        assert got == pytest.approx(_mp_quad(z, 0.5, 1), rel=1e-10)
    with pytest.raises(ValueError, match=r"z=2e-20 is a singular point"):
        semicircle_stieltjes_derivative(2e-20, 1e-40)
    with pytest.raises(ValueError, match=r"z=4e-20 is a singular point"):
        mp_stieltjes_derivative([1e-19, 4e-20], 1.0, 1e-20)


def test_stieltjes_near_a_pole_or_hard_edge_at_zero():
    """z = 0 exactly is refused; |z| <= 8.9e-16 was refused too (absolute tolerance). Near
    the atom (q > 1) −2/(b + root) cancelled: g(1e-17; q = 2) came out 9.0e15, not −5e16."""
    assert semicircle_stieltjes(1e-17, 0.0) == pytest.approx(-1e17, rel=1e-15)
    with pytest.raises(ValueError, match="z=0 is a singular point"):
        semicircle_stieltjes(0.0, 0.0)
    for q in (2.0, 2.5):
        for z in (1e-17, 1e-10, -1e-8, 1e-3):
            # atom (1 − 1/q) at 0 plus the continuous part, whose g(0) = 1/(q − 1) ... by quadrature
            want = _mp_quad(z, q, 0)
            assert mp_stieltjes(z, q).real == pytest.approx(want, rel=1e-10)
            assert mp_stieltjes(z * 1e-20, q, 1e-20).real * 1e-20 == pytest.approx(want, rel=1e-10)
        for z in (1e-10, -1e-5):
            assert mp_stieltjes_derivative(z, q).real == pytest.approx(_mp_quad(z, q, 1), rel=1e-8)
    # q = 1: hard edge at 0, g(z) = (−z − √(z² − 4z))/(2z) for z < 0
    for z in (-1e-17, -1e-10):
        assert mp_stieltjes(z, 1.0).real == pytest.approx((-z - np.sqrt(z * z - 4 * z)) / (2 * z), rel=1e-12)
    with pytest.raises(ValueError, match="z=0 is a singular point"):
        mp_stieltjes(0.0, 1.0)


def test_free_convolution_without_noise_refuses_a_real_z_on_an_atom():
    """v = 0: g = g_A, a real z on an atom is its pole (it returned −0.5 + 2.5e9j)."""
    with pytest.raises(ValueError, match="z=1.0 is an atom"):
        semicircle_free_convolution(1.0, [0.0, 1.0], None, 0.0)
    r = semicircle_free_convolution([0.5, 3.0, 1.0 + 1j], [0.0, 1.0], None, 0.0)
    assert np.allclose(r.g, [0.5 / -0.5 + 0.5 / 0.5, 0.5 / -3 + 0.5 / -2, 0.5 / (-1 - 1j) + 0.5 / -1j])
    # with noise the same point is on the support: the boundary value
    assert semicircle_free_convolution(1.0, [0.0, 1.0], None, 0.5).g.imag > 0


@pytest.mark.parametrize("s", [1e-12, 1e-8, 1e-4, 1e8])
def test_free_convolution_is_homogeneous(s):
    """atoms, z → s·…, v → s²v: g → g/s, density → density/s. The absolute tolerances
    and η made g 2–50 % wrong at s = 1e-12 and the density 11–16 % off at s = 1e-8 with
    mass outside the support."""
    a, v = np.array([-1.5, 1.5]), 1.0
    z = np.array([3.2, 0.7 + 0.05j, -1.0 + 1e-3j, 0.2, -3.5])
    g1 = semicircle_free_convolution(z, a, None, v).g
    np.testing.assert_allclose(semicircle_free_convolution(s * z, s * a, None, s * s * v).g * s, g1, rtol=1e-12)
    x = np.linspace(-3.2, 3.2, 9)
    d1 = semicircle_free_convolution_density(x, a, None, v)
    np.testing.assert_allclose(semicircle_free_convolution_density(s * x, s * a, None, s * s * v) * s, d1,
                               rtol=1e-12, atol=1e-12)
    # one atom at c: the semicircle of variance v centred at c (closed form)
    c, var = 0.3 * s, 0.04 * s * s
    xs = c + np.linspace(-0.45, 0.45, 7) * s
    want = np.sqrt(np.clip(4 * var - (xs - c) ** 2, 0, None)) / (2 * np.pi * var)
    np.testing.assert_allclose(semicircle_free_convolution_density(xs, [c], None, var), want, rtol=1e-6,
                               atol=1e-6 * want.max())


def test_sc_mp_density_keeps_the_shape_of_x():
    """A scalar x gave shape (1,); the other densities give ()."""
    d = sc_mp_density(1.0, 0.0, 0.25)
    assert np.shape(d) == () and np.shape(mp_density(1.0, 0.25)) == ()
    # s² = 0 is MP(0.25): √((2.25 − 1)(1 − 0.25))/(2π·0.25)
    assert float(d) == pytest.approx(np.sqrt(1.25 * 0.75) / (2 * np.pi * 0.25), rel=1e-12)
    assert sc_mp_density([1.0], 0.5, 0.5).shape == (1,)
    assert sc_mp_density(np.ones((2, 3)), 0.5, 0.5).shape == (2, 3)
    assert sc_mp_density([], 0.5, 0.5).shape == (0,)
