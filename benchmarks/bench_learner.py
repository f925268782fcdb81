"""On-the-fly learner vs tuned SGD + momentum and tuned Adam on the digits MLP and CNN.

Runs `paper_checks.experiments.learner_comparison.compare` (20 epochs, B = 32, the lr
grids of that module, `--seeds` seeds) and prints one row per (network, method): final
training loss (mean, min, max over seeds) and its ratio to tuned SGD + momentum, test
accuracy, divergences and the learner's curvature share of wall time. Writes
benchmarks/results/bench_learner.json.

    python benchmarks/bench_learner.py              # ~1.5 min on one quiet core
"""

from __future__ import annotations

from _common import base_parser, setup_torch, write_json


def main(argv=None):
    from paper_checks.experiments.learner_comparison import compare

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args(argv)
    setup_torch(args)
    res = compare(models=("mlp", "cnn"), seeds=args.seeds, quick=args.quick,
                  progress=lambda msg: print(msg, flush=True))
    rows = res.summary()
    for r in rows:
        ratio = res.loss_ratio(r["model"], r["method"])
        r["loss_ratio_to_sgd"] = ratio
        print(f"{r['model']:4s} {r['method']:8s} loss {r['loss_mean']:.3g} "
              f"[{r['loss_min']:.3g}, {r['loss_max']:.3g}] ({ratio:.2f}× SGD)  "
              f"acc {100 * r['test_acc_mean']:.2f} %  diverged {r['diverged']}/{r['runs']}  "
              f"overhead {r['overhead_mean']:.0%}", flush=True)
    print("wrote", write_json("bench_learner", {"summary": rows, "config": res.config}, args.out))


if __name__ == "__main__":
    main()
