"""Held out, found by an outside check: SGD transfer on a 1-D convolutional SiLU network.

A network of a kind the transfer forms were never developed on, trained the way a user
might: the 24 features of a synthetic 4-class problem (`sklearn.datasets.
make_classification`, 1200 samples, 10 informative and 6 redundant features, two
clusters per class, 2 % flipped labels, `random_state=3`, standardised) read as a
sequence by Conv1d(1→8, k5) – SiLU – Conv1d(8→8, k5) – SiLU – AvgPool(4) – Linear(48→32)
– SiLU – Linear(32→4) (2,076 parameters), trained by a plain torch loop with Adam
(lr 3e-3, 400 steps of B = 64 drawn as `randperm(N)[:64]` from a generator seeded
`seed`, init from `torch.manual_seed(seed)`): a lightly trained checkpoint (loss ≈ 0.56,
≈ 80 % accuracy), far above the deterministic limit's regime — the real thresholds are
several times 2/λ₁.

Measured and predicted as in `bench_heldout_tabular.py`: the real divergence threshold
(loss ever > 10× start within 200 steps, `training_threshold` with its defaults: eight
seeds, bisection from 1/λ₁) at B = 8, 32, 128, 512; `transfer_lr`'s default form
anchored at B₀ = 32 and 512, the correction as derived, the uncorrected linearised
network and the directional form; worst transfer ratio over both anchors, secant ratio,
real ÷ linearised per B. `--momentum 0.9`: heavy ball (key "m0.9"). `--adam β₁`: Adam
from a warmed state against `transfer_lr(optimizer=torch.optim.Adam(...))` (`run_adam`).

`--part start` (B = 32 and 512, seeds 0–3): the same bisections started at lr0 = 1 instead
of 1/λ₁ — how far the threshold's definition depends on where its bisection starts when
the outcome is not monotone in α (stable runs above diverging ones).

    python benchmarks/bench_heldout_conv1d.py                  # ~10 min on one thread
    python benchmarks/bench_heldout_conv1d.py --momentum 0.9
    python benchmarks/bench_heldout_conv1d.py --part start     # ~3 min
    python benchmarks/bench_heldout_conv1d.py --adam 0.9       # Adam, β₁ = 0.9 (and 0)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, base_parser, environment, peak_rss_mb, setup_torch, write_json
from bench_heldout_transfer import BATCH_SIZES, default_form_row, transfers, worst

SEEDS = tuple(range(8))


def conv1d_silu(n_features=24, n_classes=4):
    """The network (module docstring), untrained."""
    from torch import nn

    class Conv1dSiLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(1, 8, 5, padding=2)
            self.c2 = nn.Conv1d(8, 8, 5, padding=2)
            self.pool = nn.AvgPool1d(4)
            self.f1 = nn.Linear(8 * (n_features // 4), 32)
            self.f2 = nn.Linear(32, n_classes)
            self.act = nn.SiLU()

        def forward(self, x):
            h = self.act(self.c2(self.act(self.c1(x.unsqueeze(1)))))
            return self.f2(self.act(self.f1(self.pool(h).flatten(1))))

    return Conv1dSiLU()


def synthetic_sequences():
    """(X, y): the standardised make_classification data (module docstring), float32 / int64."""
    import torch
    from sklearn.datasets import make_classification

    Xn, yn = make_classification(n_samples=1200, n_features=24, n_informative=10,
                                 n_redundant=6, n_classes=4, n_clusters_per_class=2,
                                 class_sep=1.0, flip_y=0.02, random_state=3)
    Xn = (Xn - Xn.mean(0)) / Xn.std(0)
    return torch.tensor(Xn, dtype=torch.float32), torch.tensor(yn)


def trained_conv1d(seed=0, steps=400):
    """(model in eval mode, loss_fn, (X, y)) at the checkpoint (module docstring)."""
    import torch

    X, y = synthetic_sequences()
    torch.manual_seed(seed)
    model = conv1d_silu()
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(X), generator=gen)[:64]
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    return model.eval(), loss_fn, (X, y)


def run_transfer(*, momentum=0.0, progress=False):
    out, real, default = default_form_row(*trained_conv1d(), momentum=momentum, seeds=SEEDS,
                                          progress=progress)
    out.update(real_per_seed=real.per_seed, deterministic_limit=2.0 / default.lam)
    t = out["transfer_default"]
    print(f"conv1d, m = {momentum:g}: real {np.round(real.lr, 4)} ± {np.round(real.stderr, 4)}  "
          f"2/λ₁ {2 / default.lam:.3f}  s_lin/s_real {default.secant_ratio:.3f}  "
          f"real/lin {np.round(real.lr / default.linearized_lr, 2)}\n"
          f"   transfer (default) from 32: {np.round(t['B32'], 2)}, from 512: {np.round(t['B512'], 2)}\n"
          f"   worst: default {np.round(out['worst_default'], 2)}, corrected as derived "
          f"{np.round(out['worst_corrected'], 2)}, linearised {np.round(out['worst_linearized'], 2)}, "
          f"directional {np.round(out['worst_directional'], 2)}  "
          f"({out['seconds_real']:.0f} s + {out['seconds_forms']:.0f} s)", flush=True)
    return out


def run_adam(beta1, progress=False):
    """Adam (β₂ = 0.999, ε = 1e-8): the warmed-state divergence threshold (`adam_threshold`:
    500 steps at 1e-4 with batches of B, then 100 steps at α, eight seeds) against
    `transfer_lr(optimizer=torch.optim.Adam(...))`'s default form, both anchors; the
    small-B exponent of the measured threshold (B ≤ 128, bootstrap over seeds)."""
    import torch
    from bench_adam import small_b_exponent

    from nets import adam_threshold, transfer_lr
    from nets.learning_rates.transfer import momentum_caveat_silenced

    model, loss_fn, data = trained_conv1d()
    t0 = time.perf_counter()
    real = adam_threshold(model, loss_fn, data, BATCH_SIZES, betas=(beta1, 0.999), eps=1e-8,
                          warmup_steps=500, warmup_lr=1e-4, steps=100, criterion="divergence",
                          seeds=SEEDS, progress=progress)
    t1 = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), betas=(beta1, 0.999), eps=1e-8)
    with momentum_caveat_silenced():          # the caveat is what this part measures
        pred = transfer_lr(model, loss_fn, data, BATCH_SIZES, reference=(32, float(real.lr[1])),
                           optimizer=opt, n_seeds=len(SEEDS), progress=progress)
    shape = np.asarray(pred.lr, float)
    t = transfers(real.lr, shape)
    B = np.asarray(BATCH_SIZES)
    e = small_b_exponent(B, np.asarray(real.per_seed), np.random.default_rng(0))
    out = {"real": real.lr, "real_stderr": real.stderr, "real_per_seed": real.per_seed,
           "first_step_fraction": real.first_step,
           "exponent": e, "predicted_shape": shape, "form": pred.form, "transfer": t,
           "worst": worst(t), "seconds_real": t1 - t0, "seconds_forms": time.perf_counter() - t1}
    print(f"conv1d, Adam β₁ = {beta1:g}: real {np.round(real.lr, 5)} ± {np.round(real.stderr, 5)}\n"
          f"   transfer ({pred.form}) from 32: {np.round(t['B32'], 2)}, from 512: "
          f"{np.round(t['B512'], 2)}; exponent B ≤ 128 {e['exponent']:.2f} "
          f"[{e['ci_low']:.2f}, {e['ci_high']:.2f}]  ({t1 - t0:.0f} s + {out['seconds_forms']:.0f} s)",
          flush=True)
    return out


def run_start(progress=False):
    """Thresholds at B = 32, 512, seeds 0–3, bisection from 1/λ₁ (the default) and from 1."""
    from nets.learning_rates.lr_search import training_threshold

    model, loss_fn, data = trained_conv1d()
    out = {}
    for name, lr0 in (("from_inverse_lambda", None), ("from_1", 1.0)):
        r = training_threshold(model, loss_fn, data, (32, 512), seeds=(0, 1, 2, 3), steps=200,
                               lr0=lr0, progress=progress)
        out[name] = {"lr": r.lr, "per_seed": r.per_seed}
    ratio = np.asarray(out["from_1"]["per_seed"]) / np.asarray(out["from_inverse_lambda"]["per_seed"])
    out["per_seed_ratio"] = ratio
    print(f"per-seed threshold from lr0 = 1 ÷ from 1/λ₁ (rows B = 32, 512):\n{np.round(ratio, 2)}\n"
          f"means: {np.round(out['from_inverse_lambda']['lr'], 3)} vs {np.round(out['from_1']['lr'], 3)}",
          flush=True)
    return out


def main():
    p = base_parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--part", choices=("transfer", "start"), default="transfer")
    p.add_argument("--adam", type=float, default=None, metavar="BETA1",
                   help="Adam with this β₁ instead of SGD (key adam_b<β₁>)")
    args = p.parse_args()
    setup_torch(args)
    t0 = time.perf_counter()
    if args.adam is not None:
        result = {f"adam_b{args.adam:g}": run_adam(args.adam)}
    elif args.part == "start":
        result = {"start": run_start()}
    else:
        result = {"m0" if args.momentum == 0 else f"m{args.momentum:g}":
                  run_transfer(momentum=args.momentum)}
    # each part keeps its own wall time and peak RSS (a file-level pair was the last
    # part's); the parts merge into one file
    (part,) = result.values()
    part.update(seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())
    result["environment"] = environment()
    path = Path(args.out) if args.out else RESULTS / "bench_heldout_conv1d.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored = {k: v for k, v in stored.items() if k not in ("seconds", "peak_rss_mb")}
    write_json("bench_heldout_conv1d", {**stored, **result}, str(path))


if __name__ == "__main__":
    main()
