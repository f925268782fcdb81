"""Exact mean-square SGD thresholds of the digits MLP's Gauss–Newton quadratic, in growing subspaces.

The one-direction (directional) mean-square limit 2(1+m)λ/(λ² + (1+m)/(1−m)·c·s_u²) is
what `transfer_lr` uses. This script asks what the *exact* mean-square theory of the
quadratic model says when more directions are kept: the per-sample GGN factors
G_i = R_iᵀR_i of the trained digits MLP are projected onto the top r eigenvectors of
G = (1/N)Σ G_i, and `nets.learning_rates.stability.ms_threshold_curve` (the exact
mean-square oracle, heavy-ball momentum included) gives α*(B) for r = 1, 5, 20, 60. The
measured real-training divergence thresholds (8 seeds, benchmarks/bench_lr_transfer.py)
are compared.

    python benchmarks/bench_ms_subspace.py            # ~1 min on one core
    python benchmarks/bench_ms_subspace.py --net mlp_relu --out benchmarks/results/bench_ms_subspace_relu.json

`--net mlp_relu`: the held-out ReLU MLP 64-64-32 (seed 1) of `bench_lr_transfer.py
--nets mlp_relu`, against its measured thresholds in bench_lr_transfer_relu.json.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from _common import RESULTS, base_parser, environment, setup_torch

BATCH_SIZES = (8, 32, 128, 512)
RANKS = (1, 5, 20, 60)


def main(argv=None):
    from bench_criterion import network, study

    from nets.learning_rates.stability import PerSampleHessians, ms_threshold_curve
    from paper_checks.checks.sgd_scaling_mlp import ggn_factors

    p = base_parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--net", choices=("mlp", "mlp_relu"), default="mlp")
    args = p.parse_args(argv)
    setup_torch(args)
    model, (X, _), _ = network(args.net)
    Rt = ggn_factors(model, X).double()                       # (N, K, P)
    N, _, P = Rt.shape
    R_all = Rt.reshape(-1, P)
    w, V = np.linalg.eigh((R_all.T @ R_all / N).numpy())
    w, V = w[::-1], np.ascontiguousarray(V[:, ::-1][:, :max(RANKS)])
    A = torch.einsum("nkp,pr->nrk", Rt, torch.from_numpy(V)).numpy()     # (N, r, K)
    measured = {}
    try:
        st = study(args.net)
        measured = {m: st[f"measured_m{m:g}"] for m in (0.0, 0.9)}
    except (OSError, KeyError, ValueError):
        pass
    out = {"environment": environment(), "net": args.net, "batch_sizes": list(BATCH_SIZES), "ranks": list(RANKS),
           "top_ggn_eigenvalues": w[:5].tolist(), "oracle": {}, "measured": measured}
    for m in (0.0, 0.9):
        for r in RANKS:
            a = ms_threshold_curve(PerSampleHessians(np.ascontiguousarray(A[:, :r, :])),
                                   list(BATCH_SIZES), momentum=m)
            out["oracle"][f"m{m:g}_r{r}"] = a.tolist()
            line = f"m={m:g} r={r:2d}: α* {np.round(a, 4)}  α*(512)/α*(8) {a[-1] / a[0]:.1f}"
            if m in measured:
                line += f"  measured/α* {np.round(np.asarray(measured[m]) / a, 2)}"
            print(line, flush=True)
        if m in measured:
            print(f"m={m:g} measured α(512)/α(8) {measured[m][-1] / measured[m][0]:.1f}")
    from nets.utils.atomic import atomic_write
    path = RESULTS / "bench_ms_subspace.json" if args.out is None else args.out
    atomic_write(path, lambda fh: fh.write(json.dumps(out, indent=1)), binary=False)
    print("wrote", path)


if __name__ == "__main__":
    main()
