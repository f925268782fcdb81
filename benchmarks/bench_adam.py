"""Adam in real training: warmed-state thresholds vs the preconditioned prediction.

For the digits MLP (cross-entropy, `--model mlp`), a ReLU 64-64-32-10 MLP on another seed
(`mlp_relu`, a network the forms were not developed on), a small CNN (`cnn`) and the MLP
trained on ½‖f − e_y‖² (`mse`), and — held out from every Adam form, measured after
the linearised form became the default — the GELU digits MLP (`gelu`) and the BatchNorm
CNN (`bn_cnn`, eval mode) of bench_heldout_transfer.py, and later its two user-style nets
(`res_gn`, a residual CNN with GroupNorm; `ln_mlp`, an MLP with LayerNorm) and its
attention network (`attn`, nn.MultiheadAttention over the images' rows), and the scalar
regression MLP of bench_heldout_regression.py (`digit_value`, session 54) and the token
transformer of bench_heldout_token.py (`token`, session 56), and for
β₁ ∈ {0.9, 0} (β₂ = 0.999, ε = 1e-8): the
warmed-state threshold (`nets.learning_rates.adam.adam_threshold`, `--criterion`,
default "divergence"), the fresh-state first-step limit, the noise-model prediction
(`predict_adam_max_lr`, mean-square and deterministic forms), transfers along both
anchored at B₀ = 32 and the largest B, and the small-B exponent with a bootstrap interval
over seeds. Writes benchmarks/results/bench_adam_<model>.json.

    python benchmarks/bench_adam.py --model mlp --batch-sizes 8 32 128 512 --seeds 8
    python benchmarks/bench_adam.py --model cnn --batch-sizes 8 32 128 512
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import write_json

MODELS = ("mlp", "mlp_relu", "cnn", "mse", "gelu", "bn_cnn", "res_gn", "ln_mlp", "attn",
          "synth_silu", "digit_value", "token")


def _model(name):
    from nets.training.loops import train, trained_digits_mlp
    from nets.training.models import SmallCNN

    if name == "mlp":
        return trained_digits_mlp(seed=0)
    if name == "mlp_relu":      # a network the Adam forms were not developed on
        return trained_digits_mlp(seed=1, hidden=(64, 32), activation="relu")
    if name == "mse":
        from _common import trained_mse_mlp
        model, data, _ = trained_mse_mlp(0)
        return model, data
    if name == "digit_value":
        # the scalar regression MLP of bench_heldout_regression (held out, session 54)
        from bench_heldout_regression import trained
        model, _, data = trained(0)
        return model, data
    if name == "token":
        # the token transformer of bench_heldout_token (held out, session 56)
        from bench_heldout_token import trained
        model, _, data = trained(0)
        return model, data
    if name in ("gelu", "bn_cnn", "res_gn", "ln_mlp", "attn", "synth_silu"):
        # held out from every Adam form (bench_heldout_transfer; res_gn and ln_mlp:
        # user-style nets added in session 39; attn, the row-token attention network, in
        # session 44; synth_silu, an MLP on make_classification data, in session 51)
        from bench_heldout_transfer import held_out_network
        return held_out_network(name)
    model, (X, y) = trained_digits_mlp(seed=0)
    X = X.reshape(-1, 1, 8, 8)
    cnn = SmallCNN(in_channels=1, image_size=8, width=8, activation="tanh", seed=0)
    train(cnn, torch.nn.functional.cross_entropy, (X, y), epochs=10, lr=0.05, batch_size=64,
          optimizer="sgd", momentum=0.9, seed=0)
    return cnn.eval(), (X, y)


def _loss(name):
    """The training loss of `_model(name)`: ½‖f − e_y‖² for "mse", the mean squared error
    for "digit_value", cross-entropy otherwise."""
    from _common import half_mse_onehot

    if name == "digit_value":
        return torch.nn.functional.mse_loss
    return half_mse_onehot if name == "mse" else torch.nn.functional.cross_entropy


def small_b_exponent(Bs, per_seed, rng, max_b=128, n_boot=2000):
    """Least-squares slope of log(mean threshold) on log B over B ≤ max_b, with a 95 %
    bootstrap interval (seeds resampled per B): {"exponent", "ci_low", "ci_high"}."""
    keep = Bs <= max_b
    x, Y = np.log(Bs[keep]), per_seed[keep]
    k = np.polyfit(x, np.log(Y.mean(1)), 1)[0]
    boots = [np.polyfit(x, np.log(np.array([r[rng.integers(0, len(r), len(r))].mean()
                                            for r in Y])), 1)[0] for _ in range(n_boot)]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {"exponent": float(k), "ci_low": float(lo), "ci_high": float(hi)}


def main():
    from nets.learning_rates.adam import adam_threshold, adam_transfer_lr, predict_adam_max_lr

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=MODELS, default="mlp")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--warmup-lr", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--criterion", choices=("divergence", "onset", "final"), default="divergence")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, (X, y) = _model(args.model)
    lf = _loss(args.model)
    Bs = np.array(args.batch_sizes)
    seeds = tuple(range(args.seeds))
    out = {"model": args.model, "criterion": args.criterion, "batch_sizes": Bs, "warmup": args.warmup,
           "warmup_lr": args.warmup_lr, "steps": args.steps, "seeds": seeds, "runs": {}}
    for b1 in (0.9, 0.0):
        betas = (b1, 0.999)
        t = time.perf_counter()
        pred = predict_adam_max_lr(model, lf, (X, y), Bs, betas=betas)
        warm = adam_threshold(model, lf, (X, y), Bs, betas=betas, warmup_steps=args.warmup,
                              warmup_lr=args.warmup_lr, steps=args.steps, seeds=seeds,
                              criterion=args.criterion)
        fresh = adam_threshold(model, lf, (X, y), Bs, betas=betas, warmup_steps=0, steps=8,
                               criterion="divergence", seeds=seeds[:1], lr0=1e-2)
        run = {"predicted": pred.lr, "form": pred.form,
               "predicted_deterministic": pred.lr_deterministic,
               "lam_precond": pred.lam, "s2_precond": pred.s2,
               "predicted_state": warm.predicted_state,
               "predicted_state_mean_square": warm.predicted_state_mean_square,
               "measured": warm.lr, "measured_per_seed": warm.per_seed,
               "fresh": fresh.lr, "fresh_first_step": fresh.first_step,
               "exponent": small_b_exponent(Bs, warm.per_seed, np.random.default_rng(0)),
               "seconds": time.perf_counter() - t}
        for B0 in (32, int(Bs.max())):
            a0 = float(warm.lr[list(Bs).index(B0)])
            for form in ("mean_square", "deterministic"):
                tr = adam_transfer_lr(model, lf, (X, y), Bs, reference=(B0, a0), prediction=pred,
                                      form=form)
                key = "" if form == "mean_square" else "_deterministic"
                run[f"transfer_{B0}_ratio{key}"] = tr.lr / warm.lr
        out["runs"][f"beta1={b1:g}"] = run
        print(f"β₁={b1:g}: measured {np.round(warm.lr, 4)} predicted {np.round(pred.lr, 4)} "
              f"fresh {np.round(fresh.lr, 4)} exponent {run['exponent']} "
              f"({run['seconds']:.0f} s)", flush=True)
    print("wrote", write_json(f"bench_adam_{args.model}", out, args.out))


if __name__ == "__main__":
    main()
