"""Cost of predicting λ'_1(B) against measuring it (digits MLP, N = 1797, P = 2410).

Times, interleaved in one process (`_common.race`, ratios of minima):

  hvp         one full-data Hessian-vector product, the operator's default (cached
              gradient graph on this small model): the unit
  directional `predict_batch_top_eigenvalue(form="directional")` (top eigenpair,
              one per-sample pass along it)
  subspace    `form="subspace"`: the k = 10 subspace form (top-10 eigenpairs,
              per-sample 10×10 projections, Monte-Carlo of the model)
  resolved    `form="resolved"`: the sample-resolved form (as subspace, plus per-sample
              Lanczos and full-data products with the candidate spikes)
  measure     `measure_batch_top_eigenvalue` at B = 8, 32, 128, 512 with the batch counts
              the acceptance test uses (320 / 160 / 80 / 80)

and the accuracy of each form against that measurement. Run:
`python benchmarks/bench_batch_prediction.py [--device cuda] [--quick] [--large]`;
`--large` measures with 2000 / 1000 / 400 / 200 batches (the README's "large
measurement", one timed repeat) and writes `bench_batch_prediction_large.json`.
`--variants`: accuracy only (no timing), the forms against 320 / 160 / 80 / 80 measured
batches on five other digits MLPs — seeds 1 and 2, ReLU, one hidden layer of 64, three
epochs (`trained_digits_mlp`'s recipe otherwise) — written to
`bench_batch_prediction_variants.json` (~3 min on one thread).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from _common import base_parser, environment, fmt_time, print_table, race, setup_torch, timeit, write_json

from nets.curvature.operators import hessian_operator
from nets.noise.batch_spectra import measure_batch_top_eigenvalue, predict_batch_top_eigenvalue
from nets.training.loops import trained_digits_mlp

BATCHES = [8, 32, 128, 512]
N_BATCHES = {8: 320, 32: 160, 128: 80, 512: 80}
N_BATCHES_LARGE = {8: 2000, 32: 1000, 128: 400, 512: 200}


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--large", action="store_true",
                   help="measure with 2000/1000/400/200 batches (one timed repeat)")
    p.add_argument("--variants", action="store_true",
                   help="accuracy of the forms on five other digits MLPs (no timing)")
    args = p.parse_args(argv)
    device = setup_torch(args)
    if args.variants:
        return variants(device, args.out)
    model, (X, y) = trained_digits_mlp(seed=0)
    model = model.to(device)
    data = (X.to(device), y.to(device))
    counts = N_BATCHES_LARGE if args.large else N_BATCHES
    nb = {B: max(4, n // (8 if args.quick else 1)) for B, n in counts.items()}
    op = hessian_operator(model, F.cross_entropy, data, device=device)
    v = torch.randn(op.P, generator=torch.Generator().manual_seed(0)).to(device, op.dtype)
    out = {}

    def predict(form):
        def fn():
            out[form] = predict_batch_top_eigenvalue(
                model, F.cross_entropy, data, BATCHES, form=form, seed=0, device=device)[form]
        return fn

    def measure():
        runs = [measure_batch_top_eigenvalue(model, F.cross_entropy, data, [B], n_batches=nb[B],
                                             seed=1, device=device) for B in BATCHES]
        out["measured"] = np.array([r["mean"][0] for r in runs])

    fns = {"directional": predict("directional"), "subspace": predict("subspace"),
           "resolved": predict("resolved"), "measure": measure}
    repeats = 1 if args.quick or args.large else min(args.repeats, 3)
    times = race(fns, device=device, repeats=repeats, warmup=0)
    hvp = timeit(lambda: op.matvec(v), device=device, repeats=5, min_time=0.3)[0]
    times["hvp"] = {"min": hvp, "median": hvp, "samples": [hvp]}
    meas = out["measured"]
    rows = []
    unit = times["hvp"]["min"]
    for name in ("directional", "subspace", "resolved", "measure"):
        t = times[name]["min"]
        row = {"what": name, "time": fmt_time(t), "hvps": f"{t / unit:.0f}",
               "vs_measure": f"{t / times['measure']['min']:.2f}"}
        if name != "measure":
            row["pred/meas"] = " / ".join(f"{r:.2f}" for r in out[name] / meas)
        rows.append(row)
    print_table(rows, [("what", "form"), ("time", "time"), ("hvps", "÷ one HVP"),
                       ("vs_measure", "÷ measurement"),
                       ("pred/meas", "predicted/measured at B=8/32/128/512")])
    name = "bench_batch_prediction_large" if args.large else "bench_batch_prediction"
    write_json(name, {"environment": environment(device), "times": times,
                                          "rows": rows, "measured": meas,
                                          "n_batches": nb, "quick": args.quick}, args.out)


VARIANTS = {"seed1": dict(seed=1), "seed2": dict(seed=2), "relu": dict(activation="relu"),
            "width64": dict(hidden=(64,)), "epochs3": dict(epochs=3)}


def variants(device, out=None):
    """predicted ÷ measured λ'_1(B) of every form on the VARIANTS digits MLPs."""
    rows, res = [], {}
    for name, kw in VARIANTS.items():
        model, (X, y) = trained_digits_mlp(**kw)
        model, data = model.to(device), (X.to(device), y.to(device))
        pred = predict_batch_top_eigenvalue(model, F.cross_entropy, data, BATCHES, form="all",
                                            seed=0, device=device)
        meas = np.array([measure_batch_top_eigenvalue(model, F.cross_entropy, data, [B],
                                                      n_batches=N_BATCHES[B], seed=1,
                                                      device=device)["mean"][0]
                         for B in BATCHES])
        res[name] = {"measured": meas, **{f: pred[f] / meas for f in
                                          ("directional", "subspace", "resolved")}}
        rows.append({"net": name, **{f: " / ".join(f"{r:.2f}" for r in res[name][f])
                                     for f in ("resolved", "directional", "subspace")}})
    print_table(rows, [("net", "digits MLP"), ("resolved", "resolved ÷ measured"),
                       ("directional", "directional"), ("subspace", "subspace")])
    write_json("bench_batch_prediction_variants", {"environment": environment(device),
                                                   "variants": VARIANTS, "results": res,
                                                   "n_batches": N_BATCHES}, out)


if __name__ == "__main__":
    main()
