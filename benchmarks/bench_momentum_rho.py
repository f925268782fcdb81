"""Real divergence thresholds against the momentum ρ, heavy ball and Nesterov, at B = 128 and 512.

A measurement, not a form: `training_threshold` (loss ever > 10× its start within 200
steps, 8 seeds, torch's heavy-ball or Nesterov update) at ρ = 0.8, 0.9, 0.95 on one of the
networks of `bench_heldout_transfer.py`. Written down before it was run (docs/real_training.md):
(j) on the GELU net, where heavy ball and Nesterov fail near one step at B = 512 and
ρ = 0.9, α/(1 − ρ) is the same within 25 % for the three ρ and both optimizers (the
threshold follows the long-run step); (k) on the tanh 64-64 net, where the large-B
threshold follows each optimizer's local edge, heavy ball ÷ Nesterov stays above 1.5.
Each row also carries both deterministic edges, 2(1+ρ)/λ₁ (heavy ball) and
2(1+ρ)/((1+2ρ)λ₁) (Nesterov).

    python benchmarks/bench_momentum_rho.py --net gelu      # ~4 min, one thread
    python benchmarks/bench_momentum_rho.py --net tanh64
"""

from __future__ import annotations

import numpy as np
from _common import base_parser, environment, setup_torch, write_json
from bench_heldout_transfer import ALL_NETS, transfer_network

from rmt.lr import momentum_factor

RHOS = (0.8, 0.9, 0.95)
BATCH_SIZES = (128, 512)
SEEDS = tuple(range(8))


def measure(name):
    """{"rho…_hb"/"rho…_nesterov": thresholds, stderr, α/(1 − ρ), edge} and λ₁."""
    from nets.learning_rates.lr_search import _top_direction, training_threshold

    model, data, loss_fn = transfer_network(name)
    _, lam = _top_direction(model, loss_fn, data, 0)
    out = {"lam": lam}
    for rho in RHOS:
        for nest in (False, True):
            r = training_threshold(model, loss_fn, data, BATCH_SIZES, momentum=rho,
                                   nesterov=nest, steps=200, seeds=SEEDS, progress=False,
                                   unbracketed="nan", lr0=lambda B: 1.0)
            edge = momentum_factor(rho, "nesterov" if nest else "heavy_ball") / lam
            out[f"rho{rho:g}_{'nesterov' if nest else 'hb'}"] = {
                "lr": r.lr, "stderr": r.stderr, "long_run_step": r.lr / (1.0 - rho),
                "edge": edge, "lr_over_edge": r.lr / edge}
    return out


def verdicts(row):
    """(j): max/min of α/(1 − ρ) at B = 512 over ρ and both optimizers; (k): heavy ball ÷
    Nesterov at B = 512 per ρ."""
    steps = [row[f"rho{r:g}_{k}"]["long_run_step"][-1] for r in RHOS for k in ("hb", "nesterov")]
    ratio = [row[f"rho{r:g}_hb"]["lr"][-1] / row[f"rho{r:g}_nesterov"]["lr"][-1] for r in RHOS]
    return {"long_run_step_spread_B512": float(np.max(steps) / np.min(steps)),
            "hb_over_nesterov_B512": [float(x) for x in ratio]}


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--net", choices=ALL_NETS, default="gelu")
    args = p.parse_args(argv)
    setup_torch(args)
    row = measure(args.net)
    out = {"environment": environment(), "net": args.net, "batch_sizes": list(BATCH_SIZES),
           "rhos": list(RHOS), "seeds": list(SEEDS), **row, **verdicts(row)}
    print({k: out[k] for k in ("long_run_step_spread_B512", "hb_over_nesterov_B512")})
    print("wrote", write_json(f"bench_momentum_rho_{args.net}", out, args.out))


if __name__ == "__main__":
    main()
