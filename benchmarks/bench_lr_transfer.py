"""Learning-rate transfer in real training: digits MLP and CNN, more seeds, all criteria.

For each network (the trained digits MLP of `nets.training.loops.trained_digits_mlp`, and
a SmallCNN trained on the 8×8 digits with the same recipe) and heavy-ball momentum
m ∈ {0, 0.9}:

1. the real training thresholds by bisection over `--seeds` seeds
   (`nets.learning_rates.lr_search.training_threshold`), criteria "divergence"
   (loss > 10× start), "final" (loss after T steps > start) and "onset" (growth of the
   component along the top Hessian eigenvector), at B = 8 … 512;
2. their ratio to the local mean-square limit 2(1+m)/λ'_m(B) and to the deterministic
   momentum factor 2(1+m)/λ'(B) (the absolute level; no correction factor);
3. `nets.transfer_lr` anchored at the measured divergence threshold at B₀ = 32 and 512
   against the measured thresholds, and the linear / sqrt / constant rules;
4. self-stabilisation: λ₁ of the full-data Hessian before and after 200 steps at
   α = 4/λ₁ (B = 512, m = 0), above the onset.

Writes benchmarks/results/bench_lr_transfer.json and a resumable JSON-lines store of
every bisection (benchmarks/results/lr_transfer_store.jsonl): interrupt and re-run.
"""

from __future__ import annotations

import numpy as np
from _common import RESULTS, base_parser, environment, setup_torch


def trained_cnn(seed=0):
    import torch.nn.functional as F

    from nets.training.data import load_digits
    from nets.training.loops import DIGITS_RECIPE, train
    from nets.training.models import SmallCNN

    X, y = load_digits(standardize=True)
    X = X.reshape(-1, 1, 8, 8)
    model = SmallCNN(in_channels=1, n_classes=10, image_size=8, width=8, activation="tanh",
                     seed=seed)
    train(model, F.cross_entropy, (X, y), epochs=DIGITS_RECIPE["epochs"], lr=DIGITS_RECIPE["lr"],
          batch_size=DIGITS_RECIPE["batch_size"], momentum=DIGITS_RECIPE["momentum"], seed=seed)
    model.eval()
    return model, (X, y)


def main(argv=None):
    import json

    from bench_criterion import network

    from nets.learning_rates.lr_search import self_stabilisation, training_threshold
    from nets.learning_rates.transfer import momentum_caveat_silenced, transfer_lr
    from nets.utils.atomic import atomic_write
    from nets.utils.jsonl_store import JsonlStore
    from paper_checks.checks.lr_transfer import transfer_study

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--nets", default="mlp,cnn",
                   help="comma-separated: mlp, cnn (cross-entropy), mse (the MLP trained on "
                        "½‖f − e_y‖²), mlp_relu (held out: a ReLU MLP 64-64-32, seed 1)")
    p.add_argument("--criteria", default="divergence,final,onset")
    p.add_argument("--measured-batches", type=int, default=200,
                   help="batches per B for the measured-λ' diagnostic transfer (0: skip)")
    args = p.parse_args(argv)
    setup_torch(args)
    Bs = [8, 32, 128, 512] if args.quick else [8, 16, 32, 64, 128, 256, 512]
    seeds = tuple(range(args.seeds))
    store = JsonlStore(RESULTS / "lr_transfer_store.jsonl")
    out = {"environment": environment(), "batch_sizes": Bs, "seeds": list(seeds),
           "steps": args.steps, "nets": {}}
    for name in args.nets.split(","):
        model, data, loss = network(name)
        res = {"study": transfer_study(model, loss, data, Bs, seeds=seeds, steps=args.steps,
                                       store=store, form="directional", extra_forms=("resolved",),
                                       measured_batches=args.measured_batches, progress=True)}
        for crit in args.criteria.split(","):
            if crit == "divergence":
                continue
            for m in (0.0, 0.9):
                with momentum_caveat_silenced():    # only its local limit is used
                    local = transfer_lr(model, loss, data, Bs, reference=(Bs[0], 1.0),
                                        momentum=m, form="directional")
                thr = training_threshold(   # NaN where the criterion never fires (onset)
                    model, loss, data, Bs, criterion=crit, momentum=m,
                    steps=args.steps if crit != "onset" else 60, seeds=seeds, store=store,
                    tag=f"bench_{name}", progress=True, unbracketed="nan",
                    lr0=lambda B, l=local: float(np.interp(B, l.batch_sizes, l.stability_limit)))
                res[f"{crit}_m{m:g}"] = {"lr": thr.lr, "stderr": thr.stderr,
                                         "level_ms": thr.lr / local.stability_limit}
        res["self_stabilisation"] = self_stabilisation(model, loss, data).to_dict()
        out["nets"][name] = res
        st = res["study"]
        print(f"\n== {name}: λ₁={st['lam']:.4g}, s_u²={st['s2']:.4g}, B*={st['critical_batch_size']:.4g}")
        for m in ("0", "0.9"):
            print(f" m={m}: measured {np.round(st[f'measured_m{m}'], 4)}")
            print(f"   level measured/(2(1+m)/λ'_m) {np.round(st[f'level_m{m}'], 3)}")
            print(f"   level measured/(2(1+m)/λ')   {np.round(st[f'level_deterministic_m{m}'], 3)}")
            for B0 in (32, 512):
                print(f"   transfer/measured B0={B0}: {np.round(st[f'ratio_B{B0}_m{m}'], 3)}")
                for f in ("resolved", "measuredcurv"):
                    if f"ratio_{f}_B{B0}_m{m}" in st:
                        print(f"   {f} transfer/measured B0={B0}: {np.round(st[f'ratio_{f}_B{B0}_m{m}'], 3)}")
                for rule in ("linear", "sqrt", "constant"):
                    print(f"   {rule:8s}/measured B0={B0}: {np.round(st[f'{rule}_B{B0}_m{m}'], 3)}")
        for k, v in res.items():
            if k not in ("study", "self_stabilisation"):
                print(f" {k}: lr {np.round(v['lr'], 4)}, level {np.round(v['level_ms'], 3)}")
        print(" self-stabilisation:", res["self_stabilisation"])
    from nets.utils.jsonio import to_jsonable
    path = RESULTS / "bench_lr_transfer.json" if args.out is None else args.out
    text = json.dumps(to_jsonable(out), indent=1)
    atomic_write(path, lambda fh: fh.write(text), binary=False)
    print("wrote", path)


if __name__ == "__main__":
    main()
