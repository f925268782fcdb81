"""Check 5 — GGN: multiplicative (Wishart-type) noise, λ'₁ = ℓ(1 + qσ²/(ℓ − σ²)),
q = P·c(B, N) (docs/theory.md §4).

Simulation: a finite population of N per-sample GGN terms G_i = x_i x_iᵀ (rank one,
PSD; K = 1 output), x_i ~ N(0, Σ) with Σ = I + (ℓ_pop − 1)e₁e₁ᵀ. The empirical GGN is
G = (1/N) Σ_i G_i; batches of size B are drawn without replacement and the top
eigenvalue of G_B = (1/B) Σ_{i∈S} G_i computed (through the B×B Gram matrix when
B < P). Theory: `rmt.spiked_wishart_outlier(ℓ, q, σ²)` with ℓ = the top eigenvalue of G
and σ² = its mean bulk eigenvalue (both measured from the population, the batch being
drawn from it), q = P·c(B, N); also shown with q = P/B (no finite-population factor).
At B = N, q = 0 and G_B = G exactly (rmt.spiked_wishart_outlier requires q > 0, so the
check uses λ' = ℓ there, which is the definition of no noise).

Pass iff every B is within 4·SE + 5%·|pred − ℓ| AND the q = P/B model violates the same
rule at some B < N (with a finite prediction). B = 3N/4 and 7N/8 are included for that:
before, the q = P/B model was rejected only at B = N, where every model is exact (an
injected 1/B in place of c(B, N) passed; an outside review).
"""

from __future__ import annotations

import numpy as np

from ..result import judged
from . import _plotting as pl
from . import montecarlo as mc

NAME = "ggn_wishart"
CLAIM = ("Batch GGN (sum of B rank-one PSD terms) follows the spiked Wishart/BBP law with "
         "ratio q = P·c(B,N): λ'₁ = ℓ(1 + qσ²/(ℓ−σ²)) ≈ ℓ + qσ², a 1/B upward shift.")
REQUIRES = ("rmt.spiked_wishart:spiked_wishart_outlier", "rmt.sampling:batch_noise_factor")
Z, REL = 4.0, 0.05


def _predict(ell, s2, P, B, N):
    from rmt import batch_noise_factor, spiked_wishart_outlier

    q = P * batch_noise_factor(float(B), N)
    return ell if q == 0 else spiked_wishart_outlier(ell, q, s2)


def run(ctx):
    rng = ctx.rng(NAME)
    P = ctx.pick(300, 120)
    N = ctx.pick(4096, 512)
    ell_pop = 10.0
    # 3N/4 and 7N/8: where the finite-population factor differs most from 1/B short of
    # B = N (at B = N every model is exact; the model without it was rejected only there)
    Bs = np.array(ctx.pick([4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3072, 3584, 4096],
                           [4, 16, 64, 256, 384, 448, 512]))
    reps = ctx.pick(40, 16)
    X = rng.standard_normal((N, P))
    X[:, 0] *= np.sqrt(ell_pop)
    evals = np.linalg.eigvalsh(X.T @ X / N)
    ell, s2 = float(evals[-1]), float(evals[:-1].mean())
    tops = np.empty((len(Bs), reps))
    for i, B in enumerate(ctx.bar(list(Bs), "batch sizes")):
        for r in range(reps):
            XB = X[rng.choice(N, size=int(B), replace=False)]
            M = XB @ XB.T / B if B < P else XB.T @ XB / B
            tops[i, r] = np.linalg.eigvalsh(M)[-1]
    mean, std, se = mc.mean_se(tops)
    pred = np.array([_predict(ell, s2, P, B, N) for B in Bs])
    pred_nofpc = np.array([_predict(ell, s2, P, B, None) for B in Bs])
    ok = mc.within(mean, se, pred, ell, Z, REL)
    ok_nofpc = mc.within(mean, se, pred_nofpc, ell, Z, REL)
    grid = np.unique(np.concatenate([np.geomspace(Bs.min(), N, 200), Bs.astype(float)]))
    failures = [f"B={B}: measured {m:.4g}±{s:.2g} vs predicted {p:.4g}"
                for B, m, s, p, good in zip(Bs, mean, se, pred, ok) if not good]
    if not mc.rejected(mean, se, pred_nofpc, ell, Z, REL)[Bs < N].any():
        failures.append("the model without the finite-population factor (q = P/B) was not "
                        "rejected at any B < N")
    i = int(np.argmin(np.abs(Bs - 16)))
    return judged(
        name=NAME, claim=CLAIM,
        predicted=f"λ'₁(B={Bs[i]})={pred[i]:.4g}; ℓ={ell:.4g}",
        measured=f"{mean[i]:.4g}±{se[i]:.1g}",
        tolerance=f"every B: |mean−pred| ≤ {Z:g}·SE + {REL:.0%}·|pred−ℓ| (P={P}, N={N}, "
                  f"{reps} batches/B); q = P/B model must fail at some B < N",
        failures=failures,
        details={"P": P, "N": N, "population_spike": ell_pop, "ell_empirical": ell,
                 "sigma2_empirical_bulk": s2, "within": ok, "within_without_fpc": ok_nofpc,
                 "z_scores": mc.zscore(mean, se, pred),
                 "caption": f"Top eigenvalue of batch GGN sums of rank-one terms (P={P}, "
                            f"N={N}) vs the spiked-Wishart (BBP) law with q = P·c(B,N)."},
        series={"batch_sizes": Bs, "measured_mean": mean, "measured_std": std,
                "measured_se": se, "predicted": pred, "predicted_no_fpc": pred_nofpc,
                "grid_B": grid,
                "curve_predicted": [_predict(ell, s2, P, B, N) for B in grid],
                "curve_no_fpc": [_predict(ell, s2, P, B, None) for B in grid]},
    )


def plot(result):
    fig, (ax,) = pl.new_figure()
    g = result.array("grid_B")
    pl.curve(ax, g, result.array("curve_predicted"), "BBP, q = P·(1/B − 1/N)")
    pl.curve(ax, g, result.array("curve_no_fpc"), "BBP, q = P/B", "C3", "--")
    pl.measured_points(ax, result.array("batch_sizes"), result.array("measured_mean"),
                       result.array("measured_std"))
    pl.log2_ticks(ax, result.array("batch_sizes"))
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("top eigenvalue of G_B")
    ax.legend(fontsize=8)
    pl.verdict_title(ax, result, f"batch GGN, P={result.details['P']}, N={result.details['N']}")
    return fig
