"""Held out, built by an outside check (session 52): SGD transfer on an ELU CNN with average pooling.

An architecture none of the forms was developed on, with the recipe written down before
any threshold was measured: the 8×8 digit images (`nets.load_digits(as_images=True)`,
standardised, all 1,797) through Conv2d(1→6, 3×3, pad 1) – ELU – AvgPool(2) –
Conv2d(6→12, 3×3, pad 1) – ELU – AvgPool(2) – Linear(48→32) – ELU – Linear(32→10)
(2,618 parameters; no max-pool, normalisation or dropout), trained as the outside check
did (init from `torch.manual_seed(seed)`, SGD lr 0.05, momentum 0.9, B = 64, 20 epochs
reshuffled by a generator seeded `seed`, cross-entropy: `nets.training.loops.train`, the
same weights bit for bit) and measured in eval mode.

Measured and predicted as in `bench_heldout_transfer.py` (`default_form_row`): the real
divergence threshold (loss ever > 10× start within 200 steps, `training_threshold`,
batch sequences 0–7) at B = 8, 32, 128, 512 and `transfer_lr`'s default form anchored at
B₀ = 32 and 512, with the other forms re-derived from it and the linear and √B rules
anchored the same way. `--part oos`: the same checkpoint's thresholds re-measured over
batch sequences 8–15, which the default form's linearised network (run on 0–7) never
saw, and the stored default shape re-anchored at them — the out-of-sample check.

    python benchmarks/bench_heldout_elu_cnn.py --seed 0          # ~7 min on one thread
    python benchmarks/bench_heldout_elu_cnn.py --seed 0 --part oos   # ~5 min
"""

from __future__ import annotations

import time

import numpy as np
from _common import base_parser, setup_torch, stored_parts, write_part
from bench_heldout_transfer import BATCH_SIZES, default_form_row, rule_ratios, transfers, worst

SEEDS = tuple(range(8))
OUT_OF_SAMPLE_SEEDS = tuple(range(8, 16))


def elu_avg_cnn():
    """The network (module docstring), untrained."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ELU(), nn.AvgPool2d(2),
                         nn.Conv2d(6, 12, 3, padding=1), nn.ELU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(48, 32), nn.ELU(), nn.Linear(32, 10))


def trained_elu_cnn(seed=0, epochs=20):
    """(model in eval mode, loss_fn, (X, y)) at the checkpoint (module docstring)."""
    import torch
    import torch.nn.functional as F

    from nets import load_digits
    from nets.training.loops import train

    X, y = load_digits(as_images=True)
    torch.manual_seed(seed)
    model = elu_avg_cnn()
    # the outside check's own loop (a fresh randperm per epoch from a generator seeded
    # `seed`, torch SGD) is this one: the same weights, bit for bit
    train(model, F.cross_entropy, (X, y), epochs=epochs, lr=0.05, batch_size=64,
          momentum=0.9, seed=seed)
    return model.eval(), F.cross_entropy, (X, y)


def run_transfer(seed, progress=False):
    import torch

    model, loss_fn, data = trained_elu_cnn(seed)
    with torch.no_grad():
        out_ = model(data[0])
        loss = float(loss_fn(out_, data[1]))
        acc = float((out_.argmax(1) == data[1]).float().mean())
    out, real, default = default_form_row(model, loss_fn, data, seeds=SEEDS, progress=progress)
    lin, sq = rule_ratios(real.lr, 1.0), rule_ratios(real.lr, 0.5)
    out.update(checkpoint_loss=loss, checkpoint_accuracy=acc, real_per_seed=real.per_seed,
               default_shape=default.shape, deterministic_limit=2.0 / default.lam,
               transfer_linear_rule=lin, worst_linear_rule=worst(lin),
               transfer_sqrt_rule=sq, worst_sqrt_rule=worst(sq))
    t = out["transfer_default"]
    print(f"ELU CNN seed {seed}: loss {loss:.4f}, accuracy {acc:.4f}, λ₁ {default.lam:.3f}\n"
          f"   real {np.round(real.lr, 4)} ± {np.round(real.stderr, 4)}  s_lin/s_real "
          f"{default.secant_ratio:.3f}  real/lin {np.round(real.lr / default.linearized_lr, 2)}\n"
          f"   transfer (default) from 32: {np.round(t['B32'], 3)}, from 512: {np.round(t['B512'], 3)}\n"
          f"   worst: default {np.round(out['worst_default'], 3)}, directional "
          f"{np.round(out['worst_directional'], 3)}, linear rule {np.round(worst(lin), 2)}, √B "
          f"{np.round(worst(sq), 2)}  ({out['seconds_real']:.0f} s + {out['seconds_forms']:.0f} s)",
          flush=True)
    return out


def run_out_of_sample(seed, stored, progress=False):
    """Thresholds over batch sequences 8–15 and the stored default shape re-anchored."""
    from nets.learning_rates.lr_search import training_threshold

    if "default_shape" not in stored:
        raise SystemExit(f"run --seed {seed} (--part transfer) first: no stored default shape")
    model, loss_fn, data = trained_elu_cnn(seed)
    t0 = time.perf_counter()
    real = training_threshold(model, loss_fn, data, BATCH_SIZES, seeds=OUT_OF_SAMPLE_SEEDS,
                              steps=200, progress=progress)
    t = transfers(real.lr, stored["default_shape"])
    out = {"real": real.lr, "real_stderr": real.stderr, "real_per_seed": real.per_seed,
           "transfer_default": t, "worst_default": worst(t),
           "seconds_real": time.perf_counter() - t0}
    print(f"ELU CNN seed {seed}, sequences 8–15: real {np.round(real.lr, 4)} ± "
          f"{np.round(real.stderr, 4)}\n   stored default shape re-anchored from 32: "
          f"{np.round(t['B32'], 3)}, from 512: {np.round(t['B512'], 3)}; worst "
          f"{np.round(worst(t), 3)}", flush=True)
    return out


def main():
    p = base_parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--seed", type=int, default=0, help="training seed of the checkpoint")
    p.add_argument("--part", choices=("transfer", "oos"), default="transfer")
    args = p.parse_args()
    setup_torch(args)
    path, stored = stored_parts("bench_heldout_elu_cnn", args.out)
    t0 = time.perf_counter()
    key = f"seed{args.seed}"
    if args.part == "oos":
        part = run_out_of_sample(args.seed, stored.get(key, {}))
        key += "_oos"
    else:
        part = run_transfer(args.seed)
    write_part("bench_heldout_elu_cnn", path, stored, key, part, t0)


if __name__ == "__main__":
    main()
