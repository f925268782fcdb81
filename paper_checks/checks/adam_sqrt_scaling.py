"""Check 8 — Adam square-root scaling: α_max(B) ∝ √B in the noise-dominated regime
(docs/theory.md §5, "Adam / adaptive").

Problem: `nets.learning_rates.least_squares.spiked_regression` with label noise, at its least-squares
minimizer ŵ: the mean gradient is exactly 0 and the per-sample gradients g_i = x_i r_i
have per-coordinate variance Σ_jj. The theory says Adam's stationary second moment is
v_j = ḡ_j² + c(B,N)·Σ_jj = c·Σ_jj, so its (frozen) preconditioner D = diag(1/√v) ∝ √B
and the error obeys e ← e − α·D·H_B·e (β₁ = 0, ε = 0).

The preconditioner is *measured*, not taken from that formula: Adam's own second-moment
EMA (β₂ = 0.999, bias-corrected, V_STEPS steps) over the mini-batch gradients at ŵ, batches
of size B from shuffled epochs as a data loader draws them, gives v̂(B) and D(B) =
diag(1/√v̂). (Until a referee's review the check set D = D₀/√c from the formula, which made
every number the SGD check's shifted by exactly ½ — it could not fail.) Reported: the
exponent of mean v̂ against B, and v̂/(c·Σ_jj).

Three curves: the isotropic closed form `rmt.lr.adam_max_lr(B, λ₁, s_u², 0, mean Σ_jj, N)`;
the exact mean-square threshold of the iteration with the measured D(B) (oracle:
`nets.learning_rates.stability.ms_stability_threshold` on the factors x_i·√D(B)); and the
measured almost-sure divergence threshold with the same D(B) (R runs per B, growth-rate
criterion, `_quadratic_runs`). Exponent of log α vs log B over B ≤ B*/6 with a bootstrap
CI over runs.

Pass iff (a) measured exponent within 0.15 of 1/2; (b) oracle exponent within 0.1 of 1/2;
(c) closed form within [0.6, 1.1]× oracle at every B; (d) measured ≥ 0.95× oracle.
"""

from __future__ import annotations

import numpy as np

from ..result import judged
from . import montecarlo as mc
from ._quadratic_runs import GROWTH_TOL, growth_rates, steps_for, threshold_from_grid
from .sgd_scaling_least_squares import plot_scaling

NAME = "adam_sqrt_scaling"
CLAIM = ("Adam (adaptive preconditioning): the largest stable learning rate grows like √B "
         "for B ≪ B* (square-root rule), fitted exponent vs 1/2.")
REQUIRES = ("rmt.lr:adam_max_lr", "nets.learning_rates.least_squares:spiked_regression",
            "nets.learning_rates.stability:ms_threshold_curve")
TOL_MEASURED, TOL_ORACLE, RATIO_BAND, MS_FLOOR = 0.15, 0.1, (0.6, 1.1), 0.95
BETA2 = 0.999


def adam_second_moment(g, B, steps, rng, beta2=BETA2):
    """Adam's bias-corrected second-moment EMA v̂ after `steps` mini-batch gradients
    (means of `g`'s rows over batches of size B from shuffled epochs, the last partial
    batch of an epoch dropped), as torch.optim.Adam computes it (ε not added)."""
    N = g.shape[0]
    v = np.zeros(g.shape[1])
    perm, pos = rng.permutation(N), 0
    for _ in range(steps):
        if pos + B > N:
            perm, pos = rng.permutation(N), 0
        gb = g[perm[pos:pos + B]].mean(axis=0)
        pos += B
        v = beta2 * v + (1.0 - beta2) * gb * gb
    return v / (1.0 - beta2 ** steps)


def run(ctx):
    from nets.learning_rates.least_squares import spike_for_critical_batch, spiked_regression
    from nets.learning_rates.stability import ms_stability_threshold
    from rmt import batch_noise_factor
    from rmt.lr import adam_max_lr, critical_batch_size

    rng = ctx.rng(NAME)
    N, d = ctx.pick(2048, 512), ctx.pick(128, 32)
    prob = spiked_regression(N, d, spike_for_critical_batch(ctx.pick(48.0, 16.0), d),
                             bulk_var=1.0, noise_std=1.0, direction="random", rng=rng)
    X = prob.X
    r = X @ prob.minimizer() - prob.y
    g = X * r[:, None]                                # per-sample gradients at ŵ (mean 0)
    sigma_jj = g.var(axis=0, ddof=1)
    grad_mean_sq = float(np.mean(g.mean(axis=0) ** 2))
    lam, u = prob.top_eigenpair()
    s2 = prob.directional_noise(u)
    Bstar = critical_batch_size(lam, s2)
    Bs = np.array([b for b in ctx.pick([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024],
                                       [1, 2, 4, 16, 64, 256]) if b < N])
    c = np.array([batch_noise_factor(float(B), N) for B in Bs])
    pred = np.array([adam_max_lr(float(B), lam, s2, grad_mean_sq, float(sigma_jj.mean()), N)
                     for B in Bs])
    v_steps = ctx.pick(4000, 2000)
    v_hat = np.array([adam_second_moment(g, int(B), v_steps, rng) for B in Bs])
    precond = 1.0 / np.sqrt(v_hat)                    # D(B), one row per B
    k_v = mc.fit_power_law(Bs, v_hat.mean(axis=1))[0]
    v_over_theory = v_hat.mean(axis=1) / (c * sigma_jj.mean())
    oracle = np.array([ms_stability_threshold(X * np.sqrt(D)[None, :], int(B)).alpha
                       for B, D in zip(Bs, precond)])

    Bm = Bs[Bs <= ctx.pick(256, 64)]
    runs, n_grid = ctx.pick(4, 3), 40
    steps = [steps_for(int(B), d, 1, ctx.pick(40, 20), ctx.pick(300, 150)) for B in Bm]
    meas = np.full((len(Bm), runs), np.nan)
    for i, B in enumerate(ctx.bar(list(Bm), "Adam runs per B")):
        D = precond[i]
        grid = oracle[i] * np.geomspace(0.7, 2.6, n_grid)
        for k in range(runs):
            rate = growth_rates(X, int(B), n_grid, lambda E, G: E - grid * (D[:, None] * G),
                                steps[i], rng)
            meas[i, k] = threshold_from_grid(grid, rate, GROWTH_TOL / steps[i])

    cut = max(Bstar / 6.0, 2.0)
    fit = mc.bootstrap_exponent(Bm[Bm <= cut], list(meas[Bm <= cut]), rng)
    k_oracle = mc.fit_power_law(Bs[Bs <= cut], oracle[Bs <= cut])[0]
    k_pred = mc.fit_power_law(Bs[Bs <= cut], pred[Bs <= cut])[0]
    ratio = pred / oracle
    failures = []
    if not abs(fit["exponent"] - 0.5) <= TOL_MEASURED:
        failures.append(f"measured small-B exponent {fit['exponent']:.3f} [{fit['ci_low']:.3f}, "
                        f"{fit['ci_high']:.3f}] not within {TOL_MEASURED} of 1/2")
    if not abs(k_oracle - 0.5) <= TOL_ORACLE:
        failures.append(f"oracle small-B exponent {k_oracle:.3f} not within {TOL_ORACLE} of 1/2")
    failures += [f"B={B}: closed form {p:.4g} vs oracle {o:.4g} (ratio {p / o:.3f})"
                 for B, p, o in zip(Bs, pred, oracle)
                 if not RATIO_BAND[0] <= p / o <= RATIO_BAND[1]]
    below = ~(meas >= MS_FLOOR * oracle[: len(Bm), None])
    failures += [f"B={B}: measured divergence at {np.nanmin(m):.4g} < {MS_FLOOR}×oracle {o:.4g}"
                 for B, m, o, b in zip(Bm, meas, oracle, below.any(axis=1)) if b]
    grid_B = np.geomspace(1, Bs.max(), 200)
    curve = np.array([adam_max_lr(float(B), lam, s2, grad_mean_sq, float(sigma_jj.mean()), N)
                      for B in grid_B])
    return judged(
        name=NAME, claim=CLAIM,
        predicted=f"exponent 1/2 (B≪B*={Bstar:.3g}); local fit of adam_max_lr {k_pred:.3f}",
        measured=f"exponent {fit['exponent']:.3f} [{fit['ci_low']:.3f}, {fit['ci_high']:.3f}] "
                 f"(95% bootstrap CI); oracle {k_oracle:.3f}; Adam's measured v̂ ∝ B^{k_v:.3f}, "
                 f"v̂/(c·Σ) {v_over_theory.min():.3f}–{v_over_theory.max():.3f}",
        tolerance=f"|k_meas−½| ≤ {TOL_MEASURED}, |k_oracle−½| ≤ {TOL_ORACLE} over B ≤ B*/6; "
                  f"closed form/oracle ∈ {list(RATIO_BAND)}; measured ≥ {MS_FLOOR}×oracle",
        failures=failures,
        details={"N": N, "d": d, "lambda1": lam, "s_u2": s2, "B_star": Bstar,
                 "grad_var_mean": float(sigma_jj.mean()),
                 "grad_var_spread": float(sigma_jj.std() / sigma_jj.mean()),
                 "grad_mean_sq": grad_mean_sq, "fit_measured": fit, "k_oracle": k_oracle,
                 "k_predicted": k_pred, "closed_over_oracle": ratio, "runs": runs, "steps": steps,
                 "v_steps": v_steps, "beta2": BETA2, "k_second_moment": k_v,
                 "v_over_c_sigma": v_over_theory,
                 "caption": "Adam-preconditioned (measured EMA second moment, β₁ = 0) least "
                            "squares at the minimum with label noise: largest stable step vs B "
                            "— isotropic closed form, exact mean-square oracle, measured "
                            "divergence threshold, fitted small-B exponent (log-log)."},
        series={"batch_sizes": Bs, "predicted": pred, "oracle": oracle,
                "measured_batch_sizes": Bm, "measured_runs": meas,
                "measured_mean": np.nanmean(meas, axis=1), "measured_std": np.nanstd(meas, axis=1),
                "grid_B": grid_B, "curve_predicted": curve,
                "fit_B": Bm[Bm <= cut],
                "fit_line": np.exp(fit["intercept"]) * Bm[Bm <= cut].astype(float) ** fit["exponent"]},
    )


def plot(result):
    return plot_scaling(result, title=f"Adam (frozen v) on least squares, "
                                      f"B*={result.details['B_star']:.3g}")
