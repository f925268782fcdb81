"""Check 6 — batch-Hessian spectra of a real network across B (MLP on the sklearn digits).

Model: `nets.training.loops.trained_digits_mlp(seed)` (64 → 32 → 10 tanh MLP, cross-entropy,
the package's fixed recipe). Measured: `nets.measure_batch_top_eigenvalue` — the top
eigenvalue of H_B by Lanczos for n random batches per B (without replacement; more
batches at small B, where the per-batch values are heavy-tailed). Predicted from
full-data passes, all by `nets.predict_batch_top_eigenvalue`:
- directional λ + c(B,N)·s_u²/λ and isotropic λ + c(B,N)·Pσ²_avg/λ (docs/theory.md §3 [ext]);
- subspace: the same noise on the top-k eigenspace (k = 10 outputs, `nets.noise.subspace_noise`);
- sample-resolved (`nets.noise.resolved_noise`): the subspace form plus, exactly, the top
  curvature spike of every sample in the batch with γ_i/B > λ_1 (per-sample curvatures
  are heavy-tailed; at small B one such sample sets λ'_1(B)).
Spectra: SLQ densities (`nets.algorithms.slq.slq_density`) of H_B for one batch at several B and of
H (B = N), with the predicted top eigenvalues marked.

What the judged form is made of, plainly: for each sampled batch S it takes the exact
projection of H_S onto the top-10 eigenspace of H (the mean of the per-sample k×k blocks
a_i = Uᵀ(H_i − H)U over S) and the exact spikes of the batch's resolved samples; only
the curvature noise *outside* that span enters through the random-matrix term
c(B,N)·D/λ₁. On this network that term is small: a referee who removed it saw the
prediction move by −1 / +0.4 / −1 / −5 % at B = 8 / 32 / 128 / 512 and the check still
pass. So this check shows that the growth of λ'₁(B) is carried by the per-sample
curvatures *inside* the top subspace, resampled into batches (cheaply: no product with
any H_S), not that the paper's closed form λ₁ + c·s_u²/λ₁ predicts it — that form is the
"plain directional" one reported beside it, and it misses by up to 28 % here.

Pass iff the sample-resolved directional prediction is within 20% of the measured mean
at every B ∈ {8, 32, 128, 512}, widened by z standard errors of the difference
(`within_tolerance`): |predicted − measured| ≤ 0.2·measured + z·√(SE_measured² +
SE_predicted²), z the two-sided 95 % Student-t quantile for the number of measured
batches (z ≈ 1.97 for 320 batches, 2.36 for 8: the SE itself is estimated from them).
The full run averages hundreds of batches, so its allowance is close to 20 %; --quick
averages 8 (per-batch λ'_1 is heavy-tailed, std ≈ 0.6× the mean at B = 8), and its
verdict must reflect that noise, not a tolerance meant for the full run. The plain directional form is reported with its
errors and not judged: it is second order in every sample and misses by 20–30% around
the critical batch size. The isotropic form is judged only on the claim's parenthesis: it
must fall short of the measured mean by more than the same allowance at some B.
"""

from __future__ import annotations

import numpy as np

from ..result import judged
from . import _plotting as pl

NAME = "network_batch_spectra"
CLAIM = ("On a real network (digits MLP) the batch Hessian's top eigenvalue grows as B falls, "
         "as predicted from directional (per-sample, field-dependent) curvature noise with the "
         "heavy per-sample spikes resolved (isotropic noise underestimates it; the plain "
         "second-order form is reported, not judged).")
REQUIRES = ("nets.training.loops:trained_digits_mlp", "nets.noise.batch_spectra:measure_batch_top_eigenvalue",
            "nets.noise.batch_spectra:predict_batch_top_eigenvalue", "nets.algorithms.slq:slq_density",
            "nets.curvature.operators:batch_hessian_operator")
COST = 85   # typical seconds on one thread (orders the parallel run only)
REL = 0.20
LEVEL = 0.95


def se_multiplier(n_samples, level=LEVEL):
    """Two-sided Student-t quantile t_{(1+level)/2, n−1}: how many standard errors a
    mean of `n_samples` draws (SE estimated from the same draws) may be off."""
    from scipy.stats import t

    n = np.asarray(n_samples, dtype=float)
    return t.ppf(0.5 + level / 2, np.maximum(n - 1, 1))


def within_tolerance(predicted, measured, measured_se, predicted_se=0.0, *, rel=REL, z=2.0):
    """Boolean array: |predicted − measured| ≤ rel·|measured| + z·√(measured_se² +
    predicted_se²) — the relative tolerance of the claim plus z standard errors of the
    difference of two independent Monte-Carlo estimates (z may be an array, one per
    entry, e.g. `se_multiplier(n_batches)`). NaN anywhere is False."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    se = np.hypot(np.asarray(measured_se, dtype=float), np.asarray(predicted_se, dtype=float))
    with np.errstate(invalid="ignore"):
        return np.abs(p - m) <= rel * np.abs(m) + z * se


def run(ctx):
    import torch.nn.functional as F

    from nets.algorithms.slq import slq_density
    from nets.curvature.operators import batch_hessian_operator
    from nets.noise.batch_spectra import measure_batch_top_eigenvalue, predict_batch_top_eigenvalue
    from nets.training.loops import trained_digits_mlp

    model, data = trained_digits_mlp(ctx.seed)
    model = model.to(ctx.device)
    data = (data[0].to(ctx.device), data[1].to(ctx.device))
    N = len(data[0])
    loss = F.cross_entropy
    Bs = np.array(ctx.pick([8, 32, 128, 512], [8, 128]))
    # per-batch λ'_1 is heavy-tailed at small B (std ≈ 0.6× the mean at B = 8): more batches
    n_batches = ctx.pick({8: 320, 32: 160, 128: 64, 512: 48}, {8: 8, 128: 8})
    grid_B = np.unique(np.concatenate([np.round(np.geomspace(Bs[0], N, 40)).astype(int), Bs]))
    pred = predict_batch_top_eigenvalue(model, loss, data, grid_B, form="all", seed=ctx.seed,
                                        device=ctx.device,
                                        n_batches_mc={"subspace": 2000,
                                                      "resolved": ctx.pick(1000, 100)})
    lam = float(pred["lam"])
    runs = [measure_batch_top_eigenvalue(model, loss, data, [int(B)], n_batches=n_batches[int(B)],
                                         seed=ctx.seed + 1, device=ctx.device) for B in Bs]
    at = np.searchsorted(grid_B, Bs)
    directional, isotropic = pred["directional"][at], pred["isotropic"][at]
    subspace, resolved = pred["subspace"][at], pred["resolved"][at]
    resolved_se = np.asarray(pred["resolved_stderr"], dtype=float)[at]
    mean, std, se = (np.array([r[key][0] for r in runs]) for key in ("mean", "std", "stderr"))
    rel_res = resolved / mean - 1.0
    rel_dir = directional / mean - 1.0
    rel_sub = subspace / mean - 1.0
    rel_iso = isotropic / mean - 1.0

    rng = ctx.rng(NAME)
    slq_B = [int(b) for b in ctx.pick([8, 32, 128, 512, N], [8, 128, N])]
    slq_probes, slq_steps = ctx.pick(8, 3), ctx.pick(60, 25)
    lo, hi = np.inf, -np.inf
    dens = []
    for B in ctx.bar(slq_B, "SLQ densities"):
        idx = np.arange(N) if B == N else rng.choice(N, size=B, replace=False)
        op = batch_hessian_operator(model, loss, data, idx, device=ctx.device)
        d = slq_density(op, num_probes=slq_probes, num_steps=slq_steps, seed=ctx.seed)
        dens.append(d)
        a, b = d.support()
        lo, hi = min(lo, a), max(hi, b)
    x = np.linspace(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo), 600)
    sigma = (hi - lo) / 100
    series = {"batch_sizes": Bs, "measured_mean": mean, "measured_std": std, "measured_se": se,
              "predicted_resolved": resolved, "predicted_directional": directional,
              "predicted_subspace": subspace, "predicted_isotropic": isotropic,
              "predicted_resolved_se": resolved_se,
              "grid_B": grid_B, "curve_resolved": pred["resolved"],
              "curve_resolved_stderr": pred["resolved_stderr"],
              "curve_directional": pred["directional"], "curve_subspace": pred["subspace"],
              "curve_isotropic": pred["isotropic"], "slq_batch_sizes": slq_B, "slq_x": x}
    if "isotropic_clipped" in pred:
        series["curve_isotropic_clipped"] = pred["isotropic_clipped"]
    for B, d in zip(slq_B, dens):
        series[f"slq_density_B{B}"] = d.density(x, sigma)
        j = int(np.argmin(np.abs(grid_B - B)))
        series[f"slq_marker_B{B}"] = [float(pred["resolved"][j]), float(pred["directional"][j]),
                                      float(pred["isotropic"][j])]

    z = se_multiplier([n_batches[int(B)] for B in Bs])
    ok = within_tolerance(resolved, mean, se, resolved_se, z=z)
    failures = [f"B={B}: sample-resolved {p:.4g}±{ps:.2g} vs measured {m:.4g}±{s:.2g} (SE) — "
                f"{r:+.1%}, beyond {REL:.0%} + {zz:.2f} SE"
                for B, p, ps, m, s, r, zz, good in zip(Bs, resolved, resolved_se, mean, se, rel_res,
                                                       z, ok) if not good]
    # the claim's parenthesis, judged too: the isotropic form falls short of the measured
    # mean beyond the same tolerance at some B
    if not np.any(isotropic < mean * (1.0 - REL) - np.asarray(z) * se):
        failures.append("the isotropic form does not underestimate the measured mean beyond "
                        f"{REL:.0%} + t·SE at any B")
    nb = ", ".join(f"{n_batches[int(B)]}@B={B}" for B in Bs)
    return judged(
        name=NAME, claim=CLAIM,
        predicted="sample-resolved " + ", ".join(f"B={B}: {p:.3g}" for B, p in zip(Bs, resolved))
                  + "; plain directional " + ", ".join(f"{p:.3g}" for p in directional)
                  + f" (isotropic B={Bs[0]}: {isotropic[0]:.3g})",
        measured=", ".join(f"{m:.3g}±{s:.1g}" for m, s in zip(mean, se))
                 + f" (λ₁ full data {lam:.3g})",
        tolerance=f"|sample-resolved − measured| ≤ {REL:.0%}·measured + t·SE (of the difference, "
                  f"t the 95% Student-t quantile) at every B (batches: {nb}); isotropic below "
                  f"measured by more than {REL:.0%} + t·SE at some B",
        failures=failures,
        details={"N": N, "P": int(pred["P"]), "lambda1": lam,
                 "s2_directional": float(pred["s2_directional"]),
                 "s2_directional_stderr": float(pred["s2_directional_stderr"]),
                 "s2_isotropic": float(pred["s2_isotropic"]),
                 "critical_batch_size": float(pred["critical_batch_size"]),
                 "relative_error_resolved": rel_res, "relative_error_directional": rel_dir,
                 "relative_error_subspace": rel_sub, "relative_error_isotropic": rel_iso,
                 "resolved_samples_per_batch": pred["resolved_n"][at],
                 "resolved_candidates": int(pred["resolved_m"]),
                 "n_batches": {str(int(B)): n_batches[int(B)] for B in Bs},
                 "se_multiplier": z,
                 "slq_probes": slq_probes, "slq_steps": slq_steps,
                 "caption": "Digits MLP: (left) measured top eigenvalue of H_B (mean ± std over "
                            "batches) vs the sample-resolved, plain directional, subspace and "
                            "isotropic predictions; (right) SLQ spectral densities of H_B for one "
                            "batch per B, predicted λ'_1(B) (sample-resolved, dashed) marked."},
        series=series,
    )


def plot(result):
    fig, (ax, ax2) = pl.new_figure(2, width=5.0)
    g = result.array("grid_B")
    pl.curve(ax, g, result.array("curve_resolved"), "sample-resolved (judged)", "C2")
    pl.curve(ax, g, result.array("curve_directional"), "directional, 2nd order", "C0", "--")
    pl.curve(ax, g, result.array("curve_subspace"), "subspace k=10", "C1", ":")
    pl.curve(ax, g, result.array("curve_isotropic"), "isotropic (unclipped)", "C3", "--")
    if "curve_isotropic_clipped" in result.series:
        pl.curve(ax, g, result.array("curve_isotropic_clipped"), "isotropic (clipped)", "C3", ":")
    pl.measured_points(ax, result.array("batch_sizes"), result.array("measured_mean"),
                       result.array("measured_std"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("top eigenvalue of H_B")
    ax.legend(fontsize=8)
    pl.verdict_title(ax, result, f"digits MLP, P={result.details['P']}, N={result.details['N']}")
    x = result.array("slq_x")
    for k, B in enumerate(result.series["slq_batch_sizes"]):
        col = f"C{k}"
        ax2.plot(x, result.array(f"slq_density_B{B}") + 1e-6, color=col,
                 label=f"B={B}" + (" (full data)" if B == result.details["N"] else ""))
        ax2.axvline(result.series[f"slq_marker_B{B}"][0], color=col, ls="--", lw=1)
    ax2.set_yscale("log")
    ax2.set_ylim(1e-5, None)
    ax2.set_xlabel("eigenvalue")
    ax2.set_ylabel("SLQ density (Gaussian-broadened)")
    ax2.legend(fontsize=8)
    ax2.set_title("batch-Hessian spectra; dashed: predicted λ'₁(B)", fontsize=10)
    return fig
