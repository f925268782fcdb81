"""Adam on the linearised network from each warmed state, corrected along ũ, against real Adam.

`nets.learning_rates.adam_linearized.linearized_adam_threshold` under the real protocol
of `bench_adam.py` (warm-up 500 steps at 1e-4 with batches of B from seed s, then 100
steps at α with the batches of seed s + 7919, unstable iff the full-data loss ever
exceeds 10× its start; β₂ = 0.999, ε = 1e-8), all P directions, over the first `--seeds`
batch sequences, with the correction α_lin·(1 − (1 − r)·q) (r = s_lin/s_real along
D^{1/2}ũ, q = min(1, α_lin·λ̃/F)). Compared with the measured thresholds of
`benchmarks/results/bench_adam_<model>.json` (8 seeds): real ÷ linearised, real ÷
corrected, and both shapes as a transfer anchored at B₀ = 32 and 512, beside the
mean-square form's. Writes benchmarks/results/bench_adam_linearized_<model>_b<β₁>.json.

The correction's share q was written down after seeing the development MLP (both β₁);
the CNN and the ReLU MLP are the networks it was then run on unchanged. `--model gelu`
and `--model bn_cnn` (the GELU digits MLP and the BatchNorm CNN of
bench_heldout_transfer.py, their real thresholds from `bench_adam.py --model ...`) were
run after this form became `transfer_lr`'s Adam default.

    python benchmarks/bench_adam_linearized.py --model mlp --beta1 0.9    # ~4 min, one thread
    python benchmarks/bench_adam_linearized.py --model cnn --beta1 0.9   # ~6 min
    python benchmarks/bench_adam_linearized.py --model mlp --jacobians stored   # the same, J stored
    python benchmarks/bench_adam_linearized.py --model mlp --jacobians tangent  # through the network
    python benchmarks/bench_adam_linearized.py --model cnn --beta1 0.9 --part resecant   # stored
        # file's correction with the secant ratio re-measured (minutes; thresholds kept)
    python benchmarks/bench_adam_linearized.py --model cnn --beta1 0.9 --curved  # the curved model
        # along D^{1/2}ũ (`linearized_adam_threshold(curved=True)`), no correction

`--part scale`: the 301,066-parameter MLP 64-512-512-10 of bench_scale.py on the 1,797
digits (its stored Jacobians would need 21.6 GB, refused), one batch size and sequence
(`--scale-batch`, seed 0), β₁ = 0.9: the linearised-Adam threshold with J·e through the
network, its cost and peak RSS, against the real warmed-state threshold of the same
sequence (`adam_threshold`). Writes bench_adam_linearized_scale.json.
"""

from __future__ import annotations

import json
import time

import numpy as np
from _common import RESULTS, base_parser, environment, peak_rss_mb, setup_torch, write_json
from bench_adam import MODELS, _loss, _model
from bench_criterion import BATCH_SIZES
from bench_heldout_transfer import transfers, worst


def main(argv=None):
    from nets.learning_rates.adam_linearized import linearized_adam_threshold

    p = base_parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--model", choices=MODELS, default="mlp")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--jacobians", choices=("auto", "tangent", "stored"), default="auto",
                   help="J·e by Jacobian-vector products, stored Jacobians, or the faster (auto)")
    p.add_argument("--part", choices=("transfer", "scale", "resecant"), default="transfer")
    p.add_argument("--curved", action="store_true",
                   help="the curved model along D^{1/2}ũ instead of the correction")
    p.add_argument("--scale-batch", type=int, default=32)
    args = p.parse_args(argv)
    setup_torch(args)
    if args.part == "scale":
        print("wrote", write_json("bench_adam_linearized_scale", scale(args.scale_batch),
                                  args.out))
        return
    model, data = _model(args.model)
    loss = _loss(args.model)
    if args.part == "resecant":
        name = f"bench_adam_linearized_{args.model}_b{args.beta1:g}"
        print("wrote", write_json(name, resecant(name, model, loss, data, args.beta1), args.out))
        return
    t = time.perf_counter()
    lin = linearized_adam_threshold(model, loss, data, BATCH_SIZES, betas=(args.beta1, 0.999),
                                    seeds=tuple(range(args.seeds)), jacobians=args.jacobians,
                                    curved=args.curved, progress=False)
    seconds = time.perf_counter() - t
    stored = json.loads((RESULTS / f"bench_adam_{args.model}.json").read_text())
    run = stored["runs"][f"beta1={args.beta1:g}"]
    real = np.asarray(run["measured"], float)
    pred = np.asarray(run["predicted"], float)
    out = {"environment": environment(), "model": args.model, "beta1": args.beta1,
           "batch_sizes": list(BATCH_SIZES), "seeds": list(range(args.seeds)),
           "real_seeds": stored["seeds"], "seconds": seconds, "jacobians": args.jacobians,
           "peak_rss_mb": peak_rss_mb(), "linearized": lin.to_dict(),
           "real": real, "real_over_linearized": real / lin.lr,
           "real_over_corrected": real / lin.corrected}
    for name, shape in (("linearized", lin.lr), ("corrected", lin.corrected),
                        ("mean_square", pred)):
        tr = transfers(real, shape)
        lo, hi = out[f"worst_{name}"] = worst(tr)
        out[f"transfer_{name}"] = tr
        print(f"{args.model} β₁={args.beta1:g} {name}: B0=32 {np.round(tr['B32'], 3)}, "
              f"B0=512 {np.round(tr['B512'], 3)}, worst {lo:.2f}-{hi:.2f}", flush=True)
    print(f"real {np.round(real, 4)}; linearised {np.round(lin.lr, 4)}; secant ratio "
          f"{np.round(lin.secant_ratio, 3)}; share {np.round(lin.share, 3)}; real ÷ corrected "
          f"{np.round(real / lin.corrected, 2)} ({seconds:.0f} s)", flush=True)
    name = f"bench_adam_linearized_{args.model}_b{args.beta1:g}" + (
        "" if args.jacobians == "auto" else f"_{args.jacobians}") + ("_curved" if args.curved else "")
    print("wrote", write_json(name, out, args.out))


def resecant(name, model, loss, data, beta1):
    """A stored file's correction re-derived with the secant ratio re-measured at the same
    warmed states (`adam_linearized.secant_at_warmed_states`, the crossing along D^{1/2}ũ
    solved since session 47); its linearised thresholds are kept. The previous ratio and
    correction stay in the file as "secant_ratio_grid" and "corrected_grid"."""
    from nets.learning_rates.adam_linearized import secant_at_warmed_states, share_correction

    out = json.loads((RESULTS / f"{name}.json").read_text())
    lin = out["linearized"]
    lam, ratio = secant_at_warmed_states(model, loss, data, out["batch_sizes"],
                                         betas=(beta1, 0.999), warm_seed=out["seeds"][0])
    lin.setdefault("secant_ratio_grid", lin["secant_ratio"])
    lin.setdefault("corrected_grid", lin["corrected"])
    q, corr = share_correction(lin["lr"], lam, beta1, ratio)
    lin.update(lam_precond=lam, secant_ratio=ratio, share=q, correction=corr,
               corrected=np.asarray(lin["lr"], float) * corr)
    real = np.asarray(out["real"], float)
    out["real_over_corrected"] = real / lin["corrected"]
    tr = out["transfer_corrected"] = transfers(real, lin["corrected"])
    out["worst_corrected"] = worst(tr)
    print(f"{name}: secant ratio {np.round(lin['secant_ratio_grid'], 3)} -> {np.round(ratio, 3)}; "
          f"worst corrected {np.round(worst(transfers(real, lin['corrected_grid'])), 2)} -> "
          f"{np.round(out['worst_corrected'], 2)}", flush=True)
    return out


def scale(B):
    """The `--part scale` measurement (module docstring)."""
    import torch.nn.functional as F
    from bench_scale import wide_digits_mlp

    from nets.learning_rates.adam import adam_threshold
    from nets.learning_rates.adam_linearized import linearized_adam_threshold

    model, data = wide_digits_mlp()
    P = sum(p.numel() for p in model.parameters())
    kw = dict(betas=(0.9, 0.999), eps=1e-8, warmup_steps=500, warmup_lr=1e-4, steps=100,
              factor=10.0, seeds=(0,))
    try:
        linearized_adam_threshold(model, F.cross_entropy, data, [B], jacobians="stored", **kw)
        refused = None
    except ValueError as err:
        refused = str(err)
    rss0 = peak_rss_mb()
    t = time.perf_counter()
    lin = linearized_adam_threshold(model, F.cross_entropy, data, [B], **kw)
    t_lin = time.perf_counter() - t
    rss_lin = peak_rss_mb()
    t = time.perf_counter()
    real = adam_threshold(model, F.cross_entropy, data, [B], criterion="divergence",
                          progress=False, **kw)
    t_real = time.perf_counter() - t
    out = {"environment": environment(), "P": P, "N": len(data[0]), "batch_size": B,
           "stored_refused": refused, "seconds_linearized": t_lin, "seconds_real": t_real,
           "peak_rss_mb_before": rss0, "peak_rss_mb_after_linearized": rss_lin,
           "linearized": lin.to_dict(), "real": real.lr, "real_over_linearized":
           float(real.lr[0] / lin.lr[0]), "real_over_corrected": float(real.lr[0] / lin.corrected[0])}
    print(f"P = {P}: stored {'refused' if refused else 'ran'}; linearised {lin.lr[0]:.4g} "
          f"(corrected {lin.corrected[0]:.4g}, r {lin.secant_ratio[0]:.3f}, q {lin.share[0]:.3f}) "
          f"in {t_lin:.0f} s, peak RSS {rss0:.0f} -> {rss_lin:.0f} MB; real {real.lr[0]:.4g} "
          f"in {t_real:.0f} s", flush=True)
    return out


if __name__ == "__main__":
    main()
