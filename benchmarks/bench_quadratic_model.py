"""Where real training fails before the linear model's typical path: is it the gradient noise and the loss criterion?

On the digits CNN (m = 0) and the held-out ReLU MLP 64-64-32, real SGD diverges at
0.63–0.78× the threshold of the network's full linear model with multiplicative batch
noise only (`bench_momentum_linear.py --net cnn|mlp_relu`, typical path), while the
linearised network — which adds the additive gradient noise, the drift of the non-zero
gradient, the finite horizon, the criterion "loss ever > k× start", and the
cross-entropy of the linearised logits — matches it. This script drops the last of
these and keeps the rest: the per-sample **quadratic model** around the checkpoint,

    ℓ_i(w₀ + e) = ℓ_i + g_iᵀe + ½‖R_i e‖²      (g_i its gradient, R_iᵀR_i its Gauss–Newton matrix),

heavy ball on fresh batches without replacement, 200 steps from e = 0, the full-data
model loss judged against k× its start (k = 3, 10, 100), 32 learning rates side by
side, 2 seeds (`bench_criterion.quadratic_model_thresholds`, the model run on the tanh MLP in
`bench_criterion.py`). Its grid spans 0.3…5× the stored typical-path threshold. If real ÷
quadratic ≈ 1 at k = 10 where real ÷ typical path is 0.6–0.8, the early failure is the
additive noise with the loss criterion, with no nonlinearity needed.

Part 2, what the nonlinearity does along the top eigenvector u of the Hessian: the
full-data loss f(x) = L(w₀ + x·u) of the real network and of the linearised network
(logits z_i + x·J_i u, exact cross-entropy), and its even secant curvature
s(x) = (f(x) + f(−x) − 2f(0))/x² (→ λ₁ as x → 0 for the real network, → uᵀGu, the
Gauss–Newton curvature along u, for the linearised one), read at the amplitude A_k where
max(f(A), f(−A)) first exceeds k·f(0). s(A_k)/λ₁ > 1: the loss sharpens on the way to
the criterion (a confident checkpoint losing confidence), < 1: it saturates.

    python benchmarks/bench_quadratic_model.py --net cnn                    # ~5 min
    python benchmarks/bench_quadratic_model.py --net mlp                    # ~10 min
    python benchmarks/bench_quadratic_model.py --net mlp_relu --threads 2   # ~10 min

(the stored results: cnn and mlp with one thread, mlp_relu with two). The MLP's row
repeats `bench_criterion.py`'s quadratic model against the 8-seed thresholds.
"""

from __future__ import annotations

import json

import numpy as np
from _common import RESULTS, base_parser, environment, write_json
from bench_criterion import (
    BATCH_SIZES,
    FACTORS,
    MOMENTA,
    STEPS,
    SURROGATE_SEEDS,
    quadratic_model_thresholds,
    study,
    transfer_ratios,
)
from bench_momentum_linear import network_factors, output_name


def secant_along_top(model, X, y, factors=FACTORS, n=60):
    """Part 2 (module docstring): {"lam", "x", "real": {...}, "linearized": {...}} with, per
    model, f(±x)/f(0) on a geometric grid of n amplitudes 0.02…20/√λ₁ and, per k of
    `factors`, the amplitude A_k and s(A_k)/λ₁ (`nets.learning_rates.along_top`)."""
    import torch.nn.functional as F

    from nets.learning_rates.along_top import loss_along_top

    # one profile per k: each solves its own crossing with the exact loss (`.at(k)` would
    # interpolate on the grid); the grid is the same for every k while f(0) is small
    profs = {k: loss_along_top(model, F.cross_entropy, (X, y), factor=k, n=n) for k in factors}
    prof = profs[max(factors)]
    out = {"lam": prof.lam, "L0": prof.L0, "x": prof.amplitudes}
    for name in ("real", "linearized"):
        row = {"plus": getattr(prof, f"{name}_plus"), "minus": getattr(prof, f"{name}_minus"),
               "secant_over_lam": getattr(prof, f"{name}_secant")}
        for k in factors:
            A, s = profs[k].at(k)[name]
            row[f"k{k:g}"] = {"A": A, "secant_over_lam": s}
        out[name] = row
        print(f"along u ({name}): s(A_k)/λ₁ " + ", ".join(
            f"k={k:g} {row[f'k{k:g}']['secant_over_lam']:.2f} (A√λ₁={row[f'k{k:g}']['A'] * prof.lam ** 0.5:.2f})"
            for k in factors), flush=True)
    return out


def main(argv=None):
    import torch
    import torch.nn.functional as F

    p = base_parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--net", choices=("mlp", "cnn", "mlp_relu"), default="cnn")
    args, model, X, y, R = network_factors(__doc__.splitlines()[0], argv, parser=p)
    net = args.net
    with torch.no_grad():
        L0 = float(F.cross_entropy(model.eval()(X), y))
    typical = json.loads((RESULTS / f"{output_name(net)}.json").read_text())["linear_as"]
    st = study(net)
    out = {"environment": environment(), "net": net, "batch_sizes": list(BATCH_SIZES),
           "seeds": list(SURROGATE_SEEDS), "steps": STEPS, "factors": list(FACTORS), "L0": L0}
    out["along_top"] = secant_along_top(model, X, y)
    thresholds = quadratic_model_thresholds(model, X, y, R, net=net)
    for m in MOMENTA:
        key = f"m{m:g}"
        real = np.asarray(st[f"measured_{key}"], float)
        centre = np.asarray(typical[key], float).mean(1)
        per = thresholds[key]
        q = np.nanmean(np.asarray(per["k10"]), 1)
        row = {"typical_path": centre, "real_k10": real, "per_seed": per,
               "quadratic": {k: np.nanmean(np.asarray(v), 1) for k, v in per.items()},
               "real_over_quadratic_k10": real / q, "real_over_typical": real / centre,
               "quadratic_over_typical_k10": q / centre}
        for B0 in (32, 512):
            row[f"transfer_B{B0}"] = transfer_ratios(real, q, B0)
        out[key] = row
        print(f"{net} m={m:g}: quadratic model k=3/10/100 "
              + "; ".join(f"{k} {np.round(v, 4)}" for k, v in row["quadratic"].items())
              + f"\n  typical path {np.round(centre, 4)}; real (k=10) {np.round(real, 4)}; real ÷ "
              f"quadratic {np.round(real / q, 2)}; real ÷ typical {np.round(real / centre, 2)}; "
              f"transfer B0=32 {np.round(row['transfer_B32'], 2)}, B0=512 "
              f"{np.round(row['transfer_B512'], 2)}", flush=True)
    print("wrote", write_json(f"bench_quadratic_model_{net}", out, args.out))


if __name__ == "__main__":
    main()
