"""Check 1 — the paper's spiked-Wigner theorem for the top eigenvalue of the batch Hessian.

Simulation (`_batch_wigner`): N explicit per-sample Hessians H_i = H + noise_i with a
spiked H (top spike λ₁ = 1), batches of size B drawn without replacement, the top
eigenvalue of H_B for n batches per B. Theory: `rmt.batch_hessian_extremes` with the
measured per-entry variance σ², v = P·c(B,N)·σ²; shown with c = 1/B − 1/N (the
finite-population factor) and with c = 1/B (without it).

Pass iff at every B  |mean − λ'₁(B)| ≤ 4·SE + 5%·|λ'₁(B) − λ₁|  (finite-P allowance
proportional to the predicted shift), AND the model without the finite-population
factor violates the same rule at some B < N (at B = N, ε ≡ 0 exactly and any model with
the factor is exact, so B = N does not count: B = 3N/4 and 7N/8 are simulated for it).
"""

from __future__ import annotations

import numpy as np

from ..result import judged
from . import _plotting as pl
from . import montecarlo as mc
from ._batch_wigner import shared_simulation

NAME = "batch_hessian_top"
CLAIM = ("Top eigenvalue of the batch Hessian: λ'₁ = λ₁ + v/λ₁ above threshold, 2√v below, "
         "v = P·c(B,N)·σ² (spiked Wigner theorem, finite-population factor c = 1/B − 1/N).")
REQUIRES = ("rmt.batch_hessian:batch_hessian_extremes", "rmt.sampling:batch_noise_factor")
SHARES = "batch_wigner"   # one simulation (ctx.cache): run in one process
Z, REL = 4.0, 0.05


def predictions(sim: dict, side: int, batch_sizes, finite_population: bool = True) -> np.ndarray:
    """λ'(B) from rmt.batch_hessian_extremes; side 0 = top, 1 = bottom."""
    from rmt import batch_hessian_extremes

    N = sim["N"] if finite_population else None
    return np.array([batch_hessian_extremes(sim["lam_top"], sim["lam_bottom"], sim["sigma2"],
                                            sim["P"], float(B), N)[side] for B in batch_sizes])


def judge_extreme(sim: dict, side: int, name: str, claim: str):
    """Shared by checks 1 (side 0, top) and 2 (side 1, bottom)."""
    key = "top" if side == 0 else "bottom"
    lam = sim["lam_top"] if side == 0 else sim["lam_bottom"]
    Bs = sim["batch_sizes"]
    mean, std, se = mc.mean_se(sim[key])
    pred = predictions(sim, side, Bs)
    pred_nofpc = predictions(sim, side, Bs, False)
    ok = mc.within(mean, se, pred, lam, Z, REL)
    ok_nofpc = mc.within(mean, se, pred_nofpc, lam, Z, REL)
    z = mc.zscore(mean, se, pred)
    grid = np.unique(np.concatenate([np.geomspace(Bs.min(), sim["N"], 200), Bs.astype(float)]))
    curve = predictions(sim, side, grid)
    curve_nofpc = predictions(sim, side, grid, False)
    c = 1.0 / grid - 1.0 / sim["N"]
    edge = (1 if side == 0 else -1) * 2 * np.sqrt(np.maximum(sim["P"] * c * sim["sigma2"], 0))

    failures = [f"B={B}: measured {m:.4g}±{s:.2g} (SE) vs predicted {p:.4g}"
                for B, m, s, p, good in zip(Bs, mean, se, pred, ok) if not good]
    if not mc.rejected(mean, se, pred_nofpc, lam, Z, REL)[Bs < sim["N"]].any():
        failures.append("the model without the finite-population factor (c = 1/B) was not "
                        "rejected at any B < N")
    ref = [int(np.argmin(np.abs(Bs - 8))), len(Bs) - 1]
    sym = "λ'₁" if side == 0 else "λ'_P"
    return judged(
        name=name, claim=claim,
        predicted="; ".join(f"{sym}(B={Bs[i]})={pred[i]:.4g}" for i in ref),
        measured="; ".join(f"{mean[i]:.4g}±{se[i]:.1g}" for i in ref)
                 + f"; max|z|={np.max(np.abs(z[np.isfinite(z)])) if np.isfinite(z).any() else 0:.2f}",
        tolerance=f"every B: |mean−pred| ≤ {Z:g}·SE + {REL:.0%}·|pred−λ| (P={sim['P']}, "
                  f"N={sim['N']}, {sim[key].shape[1]} batches/B); no-c(B,N) model must fail at some B < N",
        failures=failures,
        details={"P": sim["P"], "N": sim["N"], "lambda": lam, "sigma2_measured": sim["sigma2"],
                 "n_batches": sim[key].shape[1], "z_scores": z, "within": ok,
                 "within_without_fpc": ok_nofpc,
                 "caption": f"{'Top' if side == 0 else 'Bottom'} eigenvalue of simulated batch "
                            f"Hessians (P={sim['P']}, N={sim['N']}) vs the spiked-Wigner theorem."},
        series={"batch_sizes": Bs, "measured_mean": mean, "measured_std": std,
                "measured_se": se, "predicted": pred, "predicted_no_fpc": pred_nofpc,
                "grid_B": grid, "curve_predicted": curve, "curve_no_fpc": curve_nofpc,
                "curve_edge": edge},
    )


def run(ctx):
    return judge_extreme(shared_simulation(ctx), 0, NAME, CLAIM)


def plot_extreme(result, ylabel: str):
    fig, (ax,) = pl.new_figure()
    g = result.array("grid_B")
    pl.curve(ax, g, result.array("curve_predicted"), "theorem, c = 1/B − 1/N", "C0")
    pl.curve(ax, g, result.array("curve_no_fpc"), "theorem, c = 1/B (no finite-pop. factor)",
             "C3", "--")
    pl.curve(ax, g, result.array("curve_edge"), "bulk edge ±2√v", "0.6", ":")
    pl.measured_points(ax, result.array("batch_sizes"), result.array("measured_mean"),
                       result.array("measured_std"))
    pl.log2_ticks(ax, result.array("batch_sizes"))
    ax.set_xlabel("batch size B")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    pl.verdict_title(ax, result, f"P={result.details['P']}, N={result.details['N']}")
    return fig


def plot(result):
    return plot_extreme(result, "top eigenvalue of H_B")
