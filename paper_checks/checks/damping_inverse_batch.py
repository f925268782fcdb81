"""Check 9 — minimal damping of second-order steps scales like α/B (docs/theory.md §5, "Damping").

Problem: `nets.learning_rates.least_squares.spiked_regression` (realizable), a strong spike λ₁ in a random
direction u over a bulk of variance 1 in d − 1 directions. The damped step uses a rank-one
curvature estimate Ĥ = λ₁uuᵀ (the dominant curvature, as a low-rank/K-FAC estimate
captures; ≈ 0 elsewhere): e ← e − α(Ĥ + δI)⁻¹H_B e, at fixed α = 1. In the bulk directions
the step is (α/δ)·H_B, whose curvature there is pure batch noise (the Marchenko–Pastur
bulk of H_B, ≈ (d−1)/B for B ≪ d).

Measured: the smallest damping δ for which the iteration does not diverge (growth-rate
criterion, R runs per B, `_quadratic_runs`), for several B. Predicted:
`rmt.lr.min_damping(α, λ'_noise(B))` with λ'_noise(B) the right edge of the bulk of H_B,
`rmt.marchenko_pastur.mp_edges(q, 1)` with q = (d−1)·c(B,N); and the pure 1/B law
`rmt.lr.min_damping_at_batch(..., power=1)` anchored at the smallest B.

Pass iff (a) the fitted exponent of δ_min vs B over B ≤ d/8 is within 0.2 of −1 (the
edge-based prediction is itself only ∝ 1/B for q ≫ 1: its own exponent is reported);
(b) measured δ_min within [0.5, 1.1]× the edge prediction at every B (the edge is the
worst single direction; a random-direction iteration can tolerate a little less).
What (b) tests is that the edge is a safe bound within 2×, not that it is the threshold:
measured, the ratio slides from 0.98 (B = 1) to 0.56 (B = 64) while the measured δ_min
follows the plain α/B law anchored at B = 1 within 0.96–1.16. The edge (1 + √q)² of one
fixed H_B carries a 2√q term that fresh batches do not pay: the mean-square condition
of the bulk iteration, δ > α·(1 + (d + 1)·c(B,N))/2 from E[H_B²] = (1 + (d + 1)c)·I for
Gaussian rows (a scratch estimate, not judged), gives 129 / 2.45 at B = 1 / 64 against
140.5 / 2.48 measured, so the edge form's exponent is −0.87 where the measured one is
−1.00. The report gives both ratios.
"""

from __future__ import annotations

import numpy as np

from ..result import judged
from . import _plotting as pl
from . import montecarlo as mc
from ._quadratic_runs import (
    GROWTH_TOL,
    growth_rates,
    outside_grid_failures,
    steps_for,
    threshold_from_grid,
)

NAME = "damping_inverse_batch"
CLAIM = ("Damped second-order steps (Ĥ + δI)⁻¹g need δ > α·λ'_noise/2 with noise curvature "
         "λ'_noise ∝ 1/B, so δ_min ∝ α/B (keep δ·B fixed at fixed α; run at α = 1, the B "
         "dependence judged).")
REQUIRES = ("rmt.lr:min_damping", "rmt.lr:min_damping_at_batch",
            "rmt.marchenko_pastur:mp_edges", "nets.learning_rates.least_squares:spiked_regression")
TOL_EXPONENT, RATIO_BAND = 0.2, (0.5, 1.1)
ALPHA = 1.0


def run(ctx):
    from nets.learning_rates.least_squares import spiked_regression
    from rmt import batch_noise_factor
    from rmt.lr import min_damping, min_damping_at_batch
    from rmt.marchenko_pastur import mp_edges

    rng = ctx.rng(NAME)
    N, d = ctx.pick(2048, 512), ctx.pick(256, 64)
    prob = spiked_regression(N, d, spike=ctx.pick(40.0, 20.0), bulk_var=1.0,
                             direction="random", rng=rng)
    lam, u = prob.top_eigenpair()
    Bs = np.array(ctx.pick([1, 2, 4, 8, 16, 32, 64], [1, 2, 4, 8, 16]))
    q = np.array([(d - 1) * batch_noise_factor(float(B), N) for B in Bs])
    lam_noise = np.array([mp_edges(qi, 1.0)[1] for qi in q])
    pred = np.array([min_damping(ALPHA, ln) for ln in lam_noise])

    runs, n_grid = ctx.pick(3, 2), 40
    steps = [steps_for(int(B), d, 1, ctx.pick(25, 15), ctx.pick(300, 150)) for B in Bs]
    meas = np.full((len(Bs), runs), np.nan)
    for i, B in enumerate(ctx.bar(list(Bs), "damping runs per B")):
        grid = pred[i] * np.geomspace(0.25, 2.0, n_grid)

        def step(E, G, grid=grid):
            Gu = u @ G
            return E - ALPHA * ((G - np.outer(u, Gu)) / grid + np.outer(u, Gu) / (lam + grid))

        for k in range(runs):
            rate = growth_rates(prob.X, int(B), n_grid, step, steps[i], rng)
            meas[i, k] = threshold_from_grid(grid, rate, GROWTH_TOL / steps[i],
                                             unstable_high=False)

    law = np.asarray(min_damping_at_batch(ALPHA, 2 * np.nanmean(meas[0]) / ALPHA, float(Bs[0]),
                                          Bs.astype(float), N, power=1.0))
    cut = Bs <= d / 8
    fit = mc.bootstrap_exponent(Bs[cut], list(meas[cut]), rng)
    k_pred = mc.fit_power_law(Bs[cut], pred[cut])[0]
    mean = np.nanmean(meas, axis=1)
    ratio = mean / pred
    failures = []
    if not abs(fit["exponent"] + 1) <= TOL_EXPONENT:
        failures.append(f"δ_min exponent {fit['exponent']:.3f} [{fit['ci_low']:.3f}, "
                        f"{fit['ci_high']:.3f}] not within {TOL_EXPONENT} of −1")
    failures += [f"B={B}: measured δ_min {m:.4g} vs predicted {p:.4g} (ratio {m / p:.3f})"
                 for B, m, p in zip(Bs, mean, pred)
                 if not RATIO_BAND[0] <= m / p <= RATIO_BAND[1]]
    # a run whose threshold lies outside the grid is NaN and far outside the band: a miss,
    # never left out of the mean (nanmean alone would pass on the other runs)
    failures += outside_grid_failures(Bs, meas, (0.25, 2.0))
    return judged(
        name=NAME, claim=CLAIM,
        predicted=f"exponent −1 (edge-based local fit {k_pred:.3f}); "
                  f"δ_min(B={Bs[0]})={pred[0]:.4g}, δ_min(B={Bs[-1]})={pred[-1]:.4g}",
        measured=f"exponent {fit['exponent']:.3f} [{fit['ci_low']:.3f}, {fit['ci_high']:.3f}]; "
                 f"{mean[0]:.4g}, {mean[-1]:.4g}; measured/edge bound {ratio[0]:.2f} → "
                 f"{ratio[-1]:.2f}, measured/(α/B law from B={Bs[0]}) "
                 f"{np.min(mean / law):.2f}–{np.max(mean / law):.2f}",
        tolerance=f"|k+1| ≤ {TOL_EXPONENT} over B ≤ d/8; measured/predicted ∈ {list(RATIO_BAND)} "
                  f"(α={ALPHA}, d={d}, N={N}, {runs} runs/B)",
        failures=failures,
        details={"alpha": ALPHA, "N": N, "d": d, "lambda1": lam, "q": q,
                 "lambda_noise_edge": lam_noise, "fit_measured": fit, "k_predicted": k_pred,
                 "measured_over_predicted": ratio, "delta_times_B": mean * Bs, "steps": steps,
                 "caption": f"Least squares (d={d}): smallest stable damping of "
                            "α(Ĥ + δI)⁻¹g with a rank-one curvature estimate, vs B (log-log): "
                            "min_damping(α, MP edge of the batch noise) and the α/B law."},
        series={"batch_sizes": Bs, "predicted": pred, "law_1_over_B": law,
                "measured_runs": meas, "measured_mean": mean,
                "measured_std": np.nanstd(meas, axis=1),
                "fit_B": Bs[cut],
                "fit_line": np.exp(fit["intercept"]) * Bs[cut].astype(float) ** fit["exponent"]},
    )


def plot(result):
    fig, (ax,) = pl.new_figure()
    Bs = result.array("batch_sizes")
    pl.curve(ax, Bs, result.array("predicted"), "min_damping(α, MP edge of noise)", "C0", "o-")
    pl.curve(ax, Bs, result.array("law_1_over_B"), "α/B law (anchored at smallest B)", "C3", "--")
    pl.measured_points(ax, Bs, result.array("measured_mean"), result.array("measured_std"),
                       label="measured smallest stable δ")
    ax.plot(result.array("fit_B"), result.array("fit_line"), "-", color="C1", lw=3, alpha=0.5,
            label=f"fit, exponent {result.details['fit_measured']['exponent']:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("minimal damping δ")
    ax.legend(fontsize=8)
    pl.verdict_title(ax, result, f"damping at α={result.details['alpha']}, d={result.details['d']}")
    return fig
