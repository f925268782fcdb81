"""Adam with a frozen preconditioner, full linear model, against the one-direction mean-square form and real Adam.

For the trained digits MLP and each B: the noise-model state D(B) = 1/(√(ḡ² + c(B,N)Σ_jj) + ε)
(`nets.learning_rates.adam.noise_model_preconditioner`), the per-sample Gauss–Newton factors
scaled by D^{1/2} (all P directions), and EMA momentum β₁ as heavy ball with step α(1−β₁)
(`bench_momentum_linear.growth_rates`: 24 learning rates on common batches, typical-path
threshold where the growth rate crosses 3/T). Compared with the one-direction mean-square
form F/(λ̃ + G·c·s̃²/λ̃) on the same preconditioned GGN (`rmt.lr.adam_ms_max_lr`) and with
the measured warmed-state thresholds stored by `bench_adam.py --model mlp`.

    python benchmarks/bench_adam_linear.py            # ~10 min on one core
"""

from __future__ import annotations

import json

import numpy as np
import torch
from _common import RESULTS, environment, write_json
from bench_momentum_linear import growth_rates, network_factors, top_and_directional_noise

BATCH_SIZES = (8, 32, 128, 512)
BETAS1 = (0.9, 0.0)
SEEDS = (0, 1)


def main(argv=None):
    from nets.learning_rates.adam import noise_model_preconditioner
    from nets.noise.gradient_noise import gradient_noise
    from paper_checks.checks._quadratic_runs import GROWTH_TOL, steps_for, threshold_from_grid
    from rmt.lr import adam_ms_max_lr

    args, model, X, y, R = network_factors(__doc__.splitlines()[0], argv)
    N, K, P = R.shape
    gn = gradient_noise(model, torch.nn.functional.cross_entropy, (X, y), hessian=False, seed=0)
    measured = json.loads((RESULTS / "bench_adam_mlp.json").read_text())["runs"]
    out = {"environment": environment(), "batch_sizes": list(BATCH_SIZES), "seeds": list(SEEDS),
           "runs": {}}
    for b1 in BETAS1:
        real = np.asarray(measured[f"beta1={b1:g}"]["measured"], float)
        ms, lin, lams, s2s = [], [], [], []
        for B in BATCH_SIZES:
            Rs = R * noise_model_preconditioner(gn.mean, gn.var, B, N).float().sqrt()[None, None, :]
            lam, s2 = top_and_directional_noise(Rs)
            a_ms = adam_ms_max_lr(B, lam, s2, N, b1)
            grid = np.geomspace(0.05 * a_ms, (8.0 if b1 else 3.0) * a_ms, 32)
            steps = max(steps_for(B, P, K), 400)
            lin.append([threshold_from_grid(grid, growth_rates(Rs, B, b1, grid * (1 - b1), steps, s),
                                            GROWTH_TOL / steps) for s in SEEDS])
            ms.append(a_ms)
            lams.append(lam)
            s2s.append(s2)
        ms, lin = np.asarray(ms), np.asarray(lin)
        out["runs"][f"beta1={b1:g}"] = {"lam_precond_ggn": lams, "s2_precond_ggn": s2s,
                                        "mean_square": ms, "linear_as": lin, "measured": real}
        print(f"β₁={b1:g}: one-direction mean-square {np.round(ms, 4)}; full linear model "
              f"{np.round(lin.mean(1), 4)} (= {np.round(lin.mean(1) / ms, 2)} × it); real "
              f"{np.round(real, 4)} (= {np.round(real / lin.mean(1), 2)} × linear)", flush=True)
    print("wrote", write_json("bench_adam_linear", out, args.out))


if __name__ == "__main__":
    main()
