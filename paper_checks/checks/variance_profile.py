"""Check 4 — field-dependent noise: with a variance profile the outlier depends on where
the spike lives, not on the average variance (docs/theory.md §3).

Simulation: P×P symmetric Wigner-type matrices W with independent entries of variance
S[a,b]/P for a coordinate in block a and one in block b (two blocks, fractions f), plus a
spike θ·e_j e_jᵀ with e_j inside block 1 (high variance) or block 2 (low variance).
Top eigenvalue over n independent matrices per (θ, block).

Theory: `rmt.profile_outlier(θ, S, f, w)` with w = (1, 0) or (0, 1) (QVE
−1/m_a = z + Σ_b f_b S_ab m_b, outlier at 1 + θ Σ_a w_a m_a(z) = 0), against the
isotropic prediction `rmt.spiked_wigner_outlier(θ, s̄)` with the average variance
s̄ = Σ_ab f_a S_ab f_b.

Pass iff every (θ, block) is within 4·SE + 5%·|pred − θ| of profile_outlier AND the
isotropic prediction violates the same rule for at least one (θ, block).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from ..result import judged
from . import _plotting as pl
from . import montecarlo as mc

NAME = "variance_profile"
CLAIM = ("Field-dependent (variance-profile) noise: the outlier of a spike depends on the "
         "block the spike lives in (QVE prediction), not on the average noise variance.")
REQUIRES = ("rmt.variance_profile:profile_outlier", "rmt.spiked_wigner:spiked_wigner_outlier")
Z, REL = 4.0, 0.05
PROFILE = np.array([[4.0, 1.0], [1.0, 0.25]])
FRACTIONS = np.array([0.5, 0.5])


def _sample_top(P, sizes, S, theta, j, reps, rng):
    blk = np.repeat(np.arange(len(sizes)), sizes)
    sd = np.sqrt(S[blk][:, blk] / P)
    tops = np.empty(reps)
    for r in range(reps):
        G = rng.standard_normal((P, P))
        W = (np.triu(G) + np.triu(G, 1).T) * sd
        W[j, j] += theta
        tops[r] = scipy.linalg.eigvalsh(W, subset_by_index=[P - 1, P - 1])[0]
    return tops


def run(ctx):
    from rmt import profile_edge, profile_outlier, spiked_wigner_outlier

    rng = ctx.rng(NAME)
    P = ctx.pick(400, 120)
    thetas = np.array(ctx.pick([3.5, 4.5, 6.0], [4.5]))
    reps = ctx.pick(24, 10)
    sizes = np.round(FRACTIONS * P).astype(int)
    sizes[-1] = P - sizes[:-1].sum()
    f = sizes / P
    sbar = float(f @ PROFILE @ f)
    coords = [0, P - 1]                        # a coordinate in block 1, one in block 2
    weights = [np.array([1.0, 0.0]), np.array([0.0, 1.0])]
    samples = np.empty((len(thetas), 2, reps))
    jobs = [(i, a) for i in range(len(thetas)) for a in range(2)]
    for i, a in ctx.bar(jobs, "spikes × blocks"):
        samples[i, a] = _sample_top(P, sizes, PROFILE, thetas[i], coords[a], reps, rng)
    mean, std, se = mc.mean_se(samples)
    pred = np.array([[profile_outlier(t, PROFILE, f, w) for w in weights] for t in thetas])
    iso = np.array([spiked_wigner_outlier(t, sbar) for t in thetas])
    ref = thetas[:, None] * np.ones((1, 2))
    ok = mc.within(mean, se, pred, ref, Z, REL)
    ok_iso = mc.within(mean, se, iso[:, None] * np.ones((1, 2)), ref, Z, REL)
    failures = [f"θ={thetas[i]}, block {a + 1}: measured {mean[i, a]:.4g}±{se[i, a]:.2g} vs "
                f"profile prediction {pred[i, a]:.4g}"
                for i, a in jobs if not ok[i, a]]
    if not mc.rejected(mean, se, iso[:, None] * np.ones((1, 2)), ref, Z, REL).any():
        failures.append("the isotropic (average-variance) prediction was not rejected anywhere")
    grid = np.linspace(min(thetas.min(), 2.0), thetas.max() * 1.05, ctx.pick(25, 8))
    curves = np.array([[profile_outlier(t, PROFILE, f, w) for t in grid] for w in weights])
    curve_iso = np.array([spiked_wigner_outlier(t, sbar) for t in grid])
    k = len(thetas) // 2
    return judged(
        name=NAME, claim=CLAIM,
        predicted=f"θ={thetas[k]:g}: block1 {pred[k, 0]:.4g}, block2 {pred[k, 1]:.4g} "
                  f"(isotropic {iso[k]:.4g})",
        measured=f"block1 {mean[k, 0]:.4g}±{se[k, 0]:.1g}, block2 {mean[k, 1]:.4g}±{se[k, 1]:.1g}",
        tolerance=f"|mean−pred| ≤ {Z:g}·SE + {REL:.0%}·|pred−θ| for every θ and block (P={P}, "
                  f"{reps} matrices each); isotropic model must fail somewhere",
        failures=failures,
        details={"P": P, "profile": PROFILE, "fractions": f, "average_variance": sbar,
                 "edge": profile_edge(PROFILE, f), "within": ok, "within_isotropic": ok_iso,
                 "z_profile": mc.zscore(mean, se, pred),
                 "z_isotropic": mc.zscore(mean, se, iso[:, None]),
                 "caption": "Top eigenvalue of a spiked Wigner-type matrix with a two-block "
                            "variance profile S = [[4, 1], [1, 1/4]]: spike in block 1 vs block 2, "
                            "QVE prediction vs the isotropic average-variance prediction."},
        series={"theta": thetas, "mean_block1": mean[:, 0], "mean_block2": mean[:, 1],
                "std_block1": std[:, 0], "std_block2": std[:, 1],
                "se_block1": se[:, 0], "se_block2": se[:, 1],
                "pred_block1": pred[:, 0], "pred_block2": pred[:, 1], "pred_isotropic": iso,
                "grid_theta": grid, "curve_block1": curves[0], "curve_block2": curves[1],
                "curve_isotropic": curve_iso},
    )


def plot(result):
    fig, (ax,) = pl.new_figure()
    g = result.array("grid_theta")
    pl.curve(ax, g, result.array("curve_block1"), "QVE, spike in block 1 (S₁₁=4)", "C0")
    pl.curve(ax, g, result.array("curve_block2"), "QVE, spike in block 2 (S₂₂=1/4)", "C2")
    pl.curve(ax, g, result.array("curve_isotropic"), "isotropic (average variance)", "C3", "--")
    th = result.array("theta")
    pl.measured_points(ax, th, result.array("mean_block1"), result.array("std_block1"),
                       label="simulated, block 1", color="C0")
    pl.measured_points(ax, th, result.array("mean_block2"), result.array("std_block2"),
                       label="simulated, block 2", color="C2", fmt="s")
    ax.set_xlabel("spike θ")
    ax.set_ylabel("top eigenvalue")
    ax.legend(fontsize=8)
    pl.verdict_title(ax, result, f"two-block variance profile, P={result.details['P']}")
    return fig
