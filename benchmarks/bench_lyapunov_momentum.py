"""Is the momentum miss a mean-square artefact? The almost-sure (typical-path) limit
against the measured real-training thresholds.

The directional mean-square limit α_ms = 2(1+ρ)λ/(λ² + (1+ρ)/(1−ρ)·c·s²)
(`rmt.lr.sgd_momentum_ms_max_lr`) agrees with real SGD on the digits nets at ρ = 0 but
sits 1.4–2.6× below the measured divergence threshold at ρ = 0.9 on the MLP. A mean square
is dominated by rare large excursions; a typical path is stable up to the α where the
top Lyapunov exponent of the same one-direction model (h_t ~ N(λ, c·s²)) crosses zero,
`rmt.lr.sgd_momentum_as_max_lr`. This compares both with the measured thresholds stored
by `bench_lr_transfer.py` (results/bench_lr_transfer.json, MLP and CNN, 8 seeds;
results/bench_lr_transfer_mse.json, the MSE network, 3 seeds), using the λ, s_u² and N
stored there. No training is run.

    python benchmarks/bench_lyapunov_momentum.py     # ~1 min; --quick: shorter paths
"""

from __future__ import annotations

import json

import numpy as np
from _common import RESULTS, base_parser, write_json


def main(argv=None):
    from rmt.lr import sgd_momentum_as_max_lr, sgd_momentum_ms_max_lr

    p = base_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    steps = 5000 if args.quick else 20000
    rows = {}
    for fname in ("bench_lr_transfer.json", "bench_lr_transfer_mse.json"):
        path = RESULTS / fname
        if not path.exists():
            print("missing", path, "(run bench_lr_transfer.py first)")
            continue
        for net, d in json.loads(path.read_text())["nets"].items():
            st = d["study"]
            Bs = np.asarray(st["batch_sizes"], dtype=float)
            lam, s2, N = float(st["lam"]), float(st["s2"]), int(st["N"])
            row = dict(lam=lam, s2=s2, N=N, batch_sizes=Bs.tolist())
            for m in (0.0, 0.9):
                key = f"m{m:g}"
                if f"measured_{key}" not in st:
                    continue
                meas = np.asarray(st[f"measured_{key}"], dtype=float)
                ms = sgd_momentum_ms_max_lr(Bs, lam, s2, N, m)
                as_ = sgd_momentum_as_max_lr(Bs, lam, s2, N, m, steps=steps, seed=0)
                row[key] = dict(measured=meas.tolist(), mean_square=ms.tolist(),
                                almost_sure=as_.tolist(),
                                measured_over_ms=(meas / ms).round(3).tolist(),
                                measured_over_as=(meas / as_).round(3).tolist())
                print(f"{net:4s} ρ={m:g}  measured/mean-square {np.round(meas / ms, 2).tolist()}  "
                      f"measured/almost-sure {np.round(meas / as_, 2).tolist()}", flush=True)
            rows[net] = row
    print("wrote", write_json("bench_lyapunov_momentum", {"steps": steps, "nets": rows}, args.out))


if __name__ == "__main__":
    main()
