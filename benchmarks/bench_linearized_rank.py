"""The linearised network in its top-r Gauss–Newton subspace: how many directions does the threshold need?

`nets.linearized_threshold` reproduces real SGD thresholds at m = 0 on the digits MLP, CNN
and the held-out ReLU MLP (docs/real_training.md), but it holds every sample's full Jacobian, N·K·P
numbers (472 MB for the ReLU MLP's P = 6,570; 40 min for its two momenta). With
`rank=r` the displacement is kept in the span of the top-r eigenvectors of the full-data
Gauss–Newton matrix and only J·V (N·K·r numbers) is formed (docs/theory.md §5.6). This
script measures, per network, momentum and r ∈ {20, 60, 200, 400}, the threshold under
the real protocol (seeded batches, 200 steps, loss ever > 10× start; 3 seeds), its wall
time side by side with the full model (`--full-nets`, default the MLP and the CNN; the
ReLU MLP's full model is read from bench_linearized_relu.json, 2 seeds), the Jacobian
memory ratio P/r, and real ÷ subspace against the 8-seed measured thresholds with the
B-shape as a transfer from B₀ = 32 and 512.

    python benchmarks/bench_linearized_rank.py --nets mlp --threads 1               # ~60 min
    python benchmarks/bench_linearized_rank.py --nets cnn --momenta 0 --threads 1   # ~30 min
    python benchmarks/bench_linearized_rank.py --nets mlp_relu --full-nets '' --threads 1  # ~30 min

(the stored results: these three commands, the first two side by side on two cores).
"""

from __future__ import annotations

import json
import time

import numpy as np
from _common import RESULTS, base_parser, environment, setup_torch, write_json
from bench_criterion import BATCH_SIZES, network, study, transfer_ratios

RANKS = (20, 60, 200, 400)
SEEDS = (0, 1, 2)
FACTOR = 10.0


def stored_full(name, m):
    """Per-B mean of the stored full-model thresholds (k = 10) where this script does not
    recompute them: bench_linearized_relu.json for the ReLU MLP, else None."""
    if name != "mlp_relu":
        return None
    d = json.loads((RESULTS / "bench_linearized_relu.json").read_text())
    return np.nanmean(np.asarray(d[f"{m:.1f}"]["10.0"], float), 1)


def main(argv=None):
    from nets import linearized_threshold

    p = base_parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--nets", default="mlp,cnn")
    p.add_argument("--full-nets", default="mlp,cnn")
    p.add_argument("--momenta", default="0,0.9")
    args = p.parse_args(argv)
    setup_torch(args)
    for name in args.nets.split(","):
        model, data, loss = network(name)
        st = study(name)
        N, P = len(data[0]), sum(q.numel() for q in model.parameters())
        K = int(model.eval()(data[0][:1]).shape[1])
        out = {"environment": environment(), "net": name, "N": N, "P": P,
               "batch_sizes": list(BATCH_SIZES), "seeds": list(SEEDS), "factor": FACTOR}
        ranks = [*RANKS, P] if name in args.full_nets.split(",") else list(RANKS)
        for m in (float(v) for v in args.momenta.split(",")):
            real = np.asarray(st[f"measured_m{m:g}"], float)
            rows = {}
            for r in ranks:
                t0 = time.perf_counter()
                thr = linearized_threshold(model, loss, data, BATCH_SIZES, momentum=m,
                                           factor=FACTOR, steps=200, seeds=SEEDS, rank=r,
                                           progress=False)
                row = {"rank": thr.rank, "lr": thr.lr, "stderr": thr.stderr, "per_seed": thr.per_seed,
                       "time_s": time.perf_counter() - t0, "jacobian_bytes": N * K * thr.rank * 4,
                       "real_over_model": real / thr.lr}
                for B0 in (32, 512):
                    row[f"transfer_B{B0}"] = transfer_ratios(real, thr.lr, B0)
                rows[f"r{thr.rank}"] = row
                print(f"{name} m={m:g} r={thr.rank}: {np.round(thr.lr, 4)} ({row['time_s']:.0f} s); "
                      f"real ÷ model {np.round(row['real_over_model'], 2)}; transfer B0=32 "
                      f"{np.round(row['transfer_B32'], 2)}, B0=512 {np.round(row['transfer_B512'], 2)}",
                      flush=True)
            full = rows.get(f"r{P}", {}).get("lr")
            full = stored_full(name, m) if full is None else full
            if full is not None:
                for row in rows.values():
                    row["over_full"] = row["lr"] / full
                print(f"{name} m={m:g} ÷ full model: " + "; ".join(
                    f"{k} {np.round(v['over_full'], 2)}" for k, v in rows.items()), flush=True)
            out[f"m{m:g}"] = {"real": real, "full": full, "ranks": rows}
        print("wrote", write_json(f"bench_linearized_rank_{name}", out, args.out))


if __name__ == "__main__":
    main()
