"""Check 3 — overlap of batch and empirical top eigenvectors: |⟨u, u_B⟩|² = 1 − v/λ₁².

Same simulation as check 1 (`_batch_wigner`). Theory: `rmt.spiked_wigner_overlap(λ₁, v)`
with v = P·c(B,N)·σ² (σ² measured), 0 below the threshold λ₁² ≤ v.

Pass iff at every B  |mean − predicted| ≤ 4·SE + 10/P. The absolute allowance 10/P covers
the O(1/P) overlap that a finite matrix keeps below threshold; batch sizes within a
factor 2 of the BBP transition (v/λ₁² in (1/2, 2)), where finite-P corrections are
O(P^{-1/3}), are plotted but not judged (listed in details).
"""

from __future__ import annotations

import numpy as np

from ..result import judged
from . import _plotting as pl
from . import montecarlo as mc
from ._batch_wigner import shared_simulation

NAME = "eigenvector_overlap"
CLAIM = ("Squared overlap between batch and empirical top eigenvectors is 1 − v/λ₁² above "
         "threshold (0 below), v = P·c(B,N)·σ².")
REQUIRES = ("rmt.spiked_wigner:spiked_wigner_overlap", "rmt.sampling:batch_noise_factor")
SHARES = "batch_wigner"   # one simulation (ctx.cache): run in one process
Z = 4.0


def _v(sim, B):
    from rmt import batch_noise_factor

    return sim["P"] * batch_noise_factor(float(B), sim["N"]) * sim["sigma2"]


def run(ctx):
    from rmt import spiked_wigner_overlap

    sim = shared_simulation(ctx)
    lam, P, Bs = sim["lam_top"], sim["P"], sim["batch_sizes"]
    mean, std, se = mc.mean_se(sim["overlap_top"])
    v = np.array([_v(sim, B) for B in Bs])
    pred = np.array([spiked_wigner_overlap(lam, vi) for vi in v])
    ratio = v / lam**2
    judged_mask = (ratio <= 0.5) | (ratio >= 2.0) | (v == 0)
    allow = Z * se + 10.0 / P
    ok = np.abs(mean - pred) <= allow
    grid = np.unique(np.concatenate([np.geomspace(Bs.min(), sim["N"], 200), Bs.astype(float)]))
    curve = np.array([spiked_wigner_overlap(lam, _v(sim, B)) for B in grid])
    failures = [f"B={B}: measured {m:.4g}±{s:.2g} vs predicted {p:.4g}"
                for B, m, s, p, good, j in zip(Bs, mean, se, pred, ok, judged_mask)
                if j and not good]
    if not judged_mask.any():
        failures.append("no batch size away from the transition to judge")
    i8 = int(np.argmin(np.abs(Bs - 16)))
    return judged(
        name=NAME, claim=CLAIM,
        predicted=f"overlap(B={Bs[i8]})={pred[i8]:.4g}",
        measured=f"{mean[i8]:.4g}±{se[i8]:.1g}",
        tolerance=f"|mean−pred| ≤ {Z:g}·SE + 10/P at B with v/λ² ∉ (1/2, 2) (P={P})",
        failures=failures,
        details={"P": P, "N": sim["N"], "v": v, "v_over_lambda2": ratio,
                 "judged": judged_mask, "within": ok,
                 "not_judged_B": Bs[~judged_mask],
                 "caption": "Squared overlap of the batch Hessian's top eigenvector with the "
                            "empirical one vs 1 − v/λ²."},
        series={"batch_sizes": Bs, "measured_mean": mean, "measured_std": std,
                "measured_se": se, "predicted": pred, "grid_B": grid, "curve_predicted": curve},
    )


def plot(result):
    fig, (ax,) = pl.new_figure()
    pl.curve(ax, result.array("grid_B"), result.array("curve_predicted"),
             "1 − v/λ² (0 below threshold)")
    pl.measured_points(ax, result.array("batch_sizes"), result.array("measured_mean"),
                       result.array("measured_std"))
    pl.log2_ticks(ax, result.array("batch_sizes"))
    ax.set_xlabel("batch size B")
    ax.set_ylabel("|⟨u, u_B⟩|²")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)
    pl.verdict_title(ax, result, f"eigenvector overlap, P={result.details['P']}")
    return fig
