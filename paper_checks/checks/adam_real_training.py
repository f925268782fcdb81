"""Check — Adam in real training: the square-root rule on a real network
(docs/theory.md §5, "Adam / adaptive"; `nets.learning_rates.adam`).

Network: the trained digits MLP (`nets.training.loops.trained_digits_mlp`, 64→32→10,
tanh, cross-entropy), Adam with β = (0.9, 0.999), ε = 1e-8.

Measured, per batch size B (warmed-state protocol of `nets.learning_rates.adam`): a copy
of the checkpoint is warmed for WARMUP steps at lr WARMUP_LR with batches of size B; the
lr is then raised to α from that (weights, Adam state) pair and the run of STEPS steps is
judged by CRITERION = "divergence" (full-data loss ever > 10× its value at the warmed
checkpoint, or non-finite). Bisection in log α per seed. The "onset" criterion (a growth
peak of the displacement along the top eigenvector of D^{1/2}HD^{1/2}) is available in
`adam_threshold` but on this network shows no growth signature at all: ⟨Δw, ũ⟩/α stays
O(1) from α = 0.003 to 0.4 while the loss rises 100-fold, so Adam's real-training limit
here is a loss (noise-floor) limit, not a curvature instability along ũ.
Separately, the fresh-state limit (no warmup, "divergence" within 8 steps): the first
step of a fresh Adam is α·g/(|g| + ε) ≈ α·sign(g), so it blows up at an α set by the
size of a sign step, not by curvature; we report the fraction of blow-ups on step one.

Predicted (judged): `transfer_lr`'s Adam default, the corrected threshold of Adam on the
linearised network from each warmed state (`linearized_adam_threshold`: the same warm-up
and trial batches as the measurement, paired seed by seed, each sample's outputs
z_i + J_i e, the loss exact, torch's Adam update from the warmed m, v; corrected along
the top preconditioned direction). Reported beside it: the mean-square limit of EMA
momentum with batch noise, α(B) = 2(1+β₁)/(1−β₁) / (λ̃ + G·c·s̃²/λ̃), G = (1+β₁)/(1−β₁)
= 19, with λ̃, s̃² of D(B)^{1/2} H D(B)^{1/2}, D(B) = 1/(√(ḡ² + c(B,N)Σ_jj) + ε) from one
per-sample gradient pass (`predict_adam_max_lr`, form "mean_square"; judged here before
the linearised form became the default), the same formula on each measured warmed state,
and the deterministic form F/(λ̃ + c·s̃²/λ̃) (noise counted once), which is right at
B = 512 but 10× too high at B = 8.
Transfer (`adam_transfer_lr`) anchored at the measured (B₀, α₀) for B₀ = 32 and B₀ = the
largest B. Exponent of the measured threshold over B ≤ 128 with a bootstrap 95 %
interval over seeds, compared with 1/2 (√B rule, also Malladi et al.'s SDE rule for the lr)
and 1 (linear rule).

Pass iff every transferred lr is within 20 % of the measured threshold at every B ≠ B₀
for both anchors (at B₀ the ratio is 1 by construction) and the exponent of the default
prediction over B ≤ FIT_MAX_B lies inside the measured exponent's 95 % interval (its
B-shape, judged with the measurement's own error; a referee noted that the exponent was
otherwise only reported). The verdict on √B is stated from the interval (contains 1/2,
lies above, or below), not judged: the paper's √B is what is being tested, whichever way
it comes out.
"""

from __future__ import annotations

import numpy as np

from ..result import judged
from . import montecarlo as mc

NAME = "adam_real_training"
CLAIM = ("Adam in real training: the largest stable lr from a warmed optimizer state vs B "
         "on the digits MLP, against the transfer along Adam on the linearised network "
         "(the default), the preconditioned mean-square prediction, the √B rule and the "
         "linear rule; fresh-state first-step limit reported separately.")
REQUIRES = ("nets.learning_rates.adam:adam_threshold", "nets.learning_rates.adam:predict_adam_max_lr",
            "nets.learning_rates.adam:adam_transfer_lr", "nets.training.loops:trained_digits_mlp",
            "nets.learning_rates.adam_linearized:linearized_adam_threshold")
COST = 300  # typical seconds on one thread (orders the parallel run only)
BETAS, EPS, WARMUP, WARMUP_LR, STEPS, TOL, FIT_MAX_B = (0.9, 0.999), 1e-8, 500, 1e-4, 100, 0.20, 128
CRITERION = "divergence"


def run(ctx):
    import torch

    from nets.learning_rates.adam import adam_threshold, adam_transfer_lr, predict_adam_max_lr
    from nets.learning_rates.adam_linearized import linearized_adam_threshold
    from nets.learning_rates.transfer import momentum_caveat_silenced
    from nets.training.loops import trained_digits_mlp

    model, (X, y) = trained_digits_mlp(seed=ctx.seed)
    loss_fn = torch.nn.functional.cross_entropy
    Bs = np.array(ctx.pick([8, 32, 128, 512], [8, 32, 128]))
    seeds = ctx.pick(tuple(range(ctx.seed, ctx.seed + 8)), (ctx.seed,))   # transfer_lr's n_seeds
    pred = predict_adam_max_lr(model, loss_fn, (X, y), Bs, betas=BETAS, eps=EPS, seed=ctx.seed)
    warm = adam_threshold(model, loss_fn, (X, y), Bs, betas=BETAS, eps=EPS, warmup_steps=WARMUP,
                          warmup_lr=WARMUP_LR, steps=STEPS, criterion=CRITERION, seeds=seeds,
                          seed=ctx.seed, progress=ctx.progress)
    lin = linearized_adam_threshold(model, loss_fn, (X, y), Bs, betas=BETAS, eps=EPS,
                                    warmup_steps=WARMUP, warmup_lr=WARMUP_LR, steps=STEPS,
                                    factor=10.0, seeds=seeds, seed=ctx.seed)
    fresh = adam_threshold(model, loss_fn, (X, y), Bs, betas=BETAS, eps=EPS, warmup_steps=0,
                           steps=8, criterion="divergence", seeds=seeds[:1], lr0=1e-2,
                           seed=ctx.seed)
    from nets.learning_rates.adam import adam_noise_floor_lr
    from nets.noise.gradient_noise import gradient_noise
    gn = gradient_noise(model, loss_fn, (X, y), hessian=False, seed=ctx.seed)
    with torch.no_grad():
        L0 = float(loss_fn(model(X), y))
    floor = adam_noise_floor_lr(gn.mean, gn.var, Bs, len(X), excess_loss=9.0 * L0, eps=EPS)
    k_floor = mc.fit_power_law(Bs[Bs <= FIT_MAX_B], floor[Bs <= FIT_MAX_B])[0]
    failures, transfers = [], {}
    for B0 in (32, int(Bs.max())):
        a0 = float(warm.lr[list(Bs).index(B0)])
        with momentum_caveat_silenced():    # the caveats this check measures
            tr = adam_transfer_lr(model, loss_fn, (X, y), Bs, reference=(B0, a0), prediction=lin)
            ms = adam_transfer_lr(model, loss_fn, (X, y), Bs, reference=(B0, a0), prediction=pred)
            det = adam_transfer_lr(model, loss_fn, (X, y), Bs, reference=(B0, a0),
                                   prediction=pred, form="deterministic")
        ratio = tr.lr / warm.lr
        i0 = list(Bs).index(B0)
        transfers[B0] = {"lr": tr.lr, "ratio": ratio, "sqrt_rule": tr.sqrt_rule,
                         "linear_rule": tr.linear_rule, "mean_square_lr": ms.lr,
                         "mean_square_ratio": ms.lr / warm.lr,
                         "deterministic_ratio": det.lr / warm.lr,
                         # reported, not judged: the same anchor carried along the
                         # noise-floor shape α_floor(B)/α_floor(B0) (a loss limit)
                         "floor_ratio": a0 * floor / floor[i0] / warm.lr}
        failures += [f"anchor B0={B0}: B={B} transfer {t:.4g} vs measured {m:.4g} (ratio {r:.2f})"
                     for B, t, m, r in zip(Bs, tr.lr, warm.lr, ratio)
                     if B != B0 and not abs(r - 1) <= TOL]
    cut = Bs <= FIT_MAX_B
    fit = mc.bootstrap_exponent(Bs[cut], list(warm.per_seed[cut]), ctx.rng(NAME))
    if len(seeds) == 1:      # one replicate per B: no bootstrap spread; use the t-interval
        from nets.learning_rates.lr_prediction import fit_scaling_exponent
        f = fit_scaling_exponent(Bs[cut], warm.lr[cut])
        fit.update(ci_low=f.ci_low, ci_high=f.ci_high, se=f.stderr)
    k_lin = mc.fit_power_law(Bs[cut], lin.corrected[cut])[0]
    k_pred = mc.fit_power_law(Bs[cut], pred.lr[cut])[0]
    k_det = mc.fit_power_law(Bs[cut], pred.lr_deterministic[cut])[0]
    if not np.isfinite(fit["ci_high"] - fit["ci_low"]):
        failures.append("exponent interval not finite")
    elif not fit["ci_low"] <= k_lin <= fit["ci_high"]:
        failures.append(f"predicted exponent {k_lin:.2f} outside the measured 95 % interval "
                        f"[{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]")
    if fit["ci_low"] <= 0.5 <= fit["ci_high"]:
        verdict = "consistent with √B (interval contains 1/2)"
    elif fit["ci_low"] > 0.5:
        verdict = "steeper than √B"
    else:
        verdict = "flatter than √B"
    fresh_first = float(np.nanmean(fresh.first_step))
    return judged(
        name=NAME, claim=CLAIM,
        predicted=f"linearised-network Adam (default) exponent {k_lin:.2f}, mean-square "
                  f"preconditioned limit {k_pred:.2f} (deterministic form {k_det:.2f}, noise "
                  f"floor {k_floor:.2f}) over B ≤ {FIT_MAX_B}; transfer within 20 %",
        measured=f"warmed {CRITERION} exponent {fit['exponent']:.2f} [{fit['ci_low']:.2f}, "
                 f"{fit['ci_high']:.2f}] ({verdict}); fresh first-step blow-ups "
                 f"{fresh_first:.0%}",
        tolerance=f"|transfer/measured − 1| ≤ {TOL} at every B ≠ B0, anchors B0 = 32, "
                  f"{int(Bs.max())}; predicted exponent inside the measured 95 % interval",
        failures=failures,
        details={"criterion": CRITERION, "warmup_steps": WARMUP, "warmup_lr": WARMUP_LR, "steps": STEPS,
                 "betas": BETAS, "eps": EPS, "seeds": list(seeds), "fit": fit,
                 "k_linearized": k_lin, "k_predicted": k_pred, "k_deterministic": k_det,
                 "k_noise_floor": k_floor,
                 "measured_over_linearized": warm.lr / lin.lr,
                 "measured_over_linearized_corrected": warm.lr / lin.corrected,
                 "secant_ratio": lin.secant_ratio, "share": lin.share,
                 "measured_over_predicted": warm.lr / pred.lr,
                 "measured_over_deterministic": warm.lr / pred.lr_deterministic,
                 "measured_over_noise_floor": warm.lr / floor, "sqrt_verdict": verdict,
                 **{f"noise_floor_transfer_over_measured_B{B0}": v["floor_ratio"]
                    for B0, v in transfers.items()},
                 **{f"transfer_over_measured_B{B0}": v["ratio"] for B0, v in transfers.items()},
                 **{f"mean_square_transfer_over_measured_B{B0}": v["mean_square_ratio"]
                    for B0, v in transfers.items()},
                 **{f"deterministic_transfer_over_measured_B{B0}": v["deterministic_ratio"]
                    for B0, v in transfers.items()},
                 "fresh_first_step_fraction": fresh_first, "n_trials": warm.n_trials,
                 "caption": "Adam on the digits MLP: measured warmed-state threshold "
                            "(points), fresh-state first-step limit (crosses), Adam on the "
                            "linearised network, corrected (green) and its transfer from "
                            "B=32 (dashed), mean-square prediction F/λ̃'_β(B) (line) and "
                            "deterministic form F/λ̃'(B) (thin), √B and linear rules "
                            "anchored at B=32."},
        series={"batch_sizes": Bs, "measured": warm.lr, "measured_stderr": warm.stderr,
                "measured_per_seed": warm.per_seed, "linearized": lin.corrected,
                "predicted": pred.lr,
                "predicted_deterministic": pred.lr_deterministic,
                "predicted_state_mean_square": np.nanmean(warm.predicted_state_mean_square, axis=1),
                "predicted_state": np.nanmean(warm.predicted_state, axis=1),
                "noise_floor": floor, "lam_precond": pred.lam, "s2_precond": pred.s2, "fresh": fresh.lr,
                "fresh_first_step": fresh.first_step[:, 0],
                **{f"transfer_{B0}": v["lr"] for B0, v in transfers.items()},
                **{f"ratio_{B0}": v["ratio"] for B0, v in transfers.items()},
                "sqrt_rule": transfers[32]["sqrt_rule"], "linear_rule": transfers[32]["linear_rule"]},
    )


def plot(result):
    from ._plotting import lr_vs_batch_axes, new_figure

    s = result.series
    B = np.asarray(s["batch_sizes"], float)
    fig, (ax,) = new_figure(width=6.0, height=4.4)
    ax.errorbar(B, s["measured"], yerr=np.nan_to_num(np.asarray(s["measured_stderr"], float)),
                fmt="o", color="k", capsize=3, label="measured (warmed state)")
    ax.plot(B, s["fresh"], "x", color="r", label="fresh state (first steps)")
    if "linearized" in s:
        ax.plot(B, s["linearized"], "-", color="C2", label="linearised network, corrected")
    ax.plot(B, s["predicted"], "-", color="C0", label="mean-square F/λ̃'_β(B)")
    if "predicted_deterministic" in s:
        ax.plot(B, s["predicted_deterministic"], "-", lw=0.8, color="C4",
                label="deterministic F/λ̃'(B)")
    # the two judged transfers: from B0 = 32 and from the largest B
    for key, ls in _transfer_keys(s):
        ax.plot(B, s[key], ls=ls, color="C2" if "linearized" in s else "C0",
                label=f"transfer from B={key.split('_')[1]}")
    ax.plot(B, s["noise_floor"], "-.", color="C1", label="noise-floor limit (loss 10× start)")
    ax.plot(B, s["sqrt_rule"], ":", color="C5", label="√B rule (B0=32)")
    ax.plot(B, s["linear_rule"], ":", color="C3", label="linear rule (B0=32)")
    lr_vs_batch_axes(ax, result, "Adam on the digits MLP (β₁ = 0.9)")
    return fig


def _transfer_keys(series):
    """(series key, line style) of each anchored transfer, in anchor order."""
    keys = sorted((k for k in series if k.startswith("transfer_")), key=lambda k: int(k.split("_")[1]))
    return [(k, ls) for k, ls in zip(keys, ("--", (0, (5, 1, 1, 1))))]
