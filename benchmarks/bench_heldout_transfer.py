"""Two new networks, held out: the directional transfer, the subspace linearised network, and its correction along u.

The forms were fixed before these networks' thresholds were measured (SGD, m = 0):

* directional: lr(B) ∝ 1/λ'(B), λ'(B) = λ₁ + c(B, N)·s_u²/λ₁ (`transfer_lr`);
* linearised: the threshold of the linearised network in its top-200 Gauss–Newton
  directions under the real protocol (`linearized_threshold(rank=200)`, k = 10, over the
  measured thresholds' eight batch sequences; the stored rows before this revision used
  three, which on the BatchNorm CNN missed the rare batches that set its small-B threshold);
* corrected linearised: that threshold × [1 − (1 − s_lin/s_real)·λ₁/λ'(B)], where s_lin
  and s_real are the secant curvatures of the linearised and the real network along the
  top eigenvector u where the loss first reaches 10× its start
  (`bench_quadratic_model.secant_along_top`). Reasoning: a growing oscillation along u
  reaches the criterion at the same amplitude in both models, and there the lr that
  sustains it scales as 1/secant, so the network's own nonlinearity rescales the
  linearised threshold by s_lin/s_real — for the part of the instability that is the
  deterministic curvature along u, the fraction λ₁/λ'(B) of λ'(B) (with momentum
  λ₁/λ'_m(B)); the batch-noise part is left as the linearised network has it.
* tried and not kept (session 39): the same correction with the Adam form's share,
  q(B) = min(1, α_lin(B)·λ₁/(2(1+m))), the share of the heavy-ball edge 2(1+m)/λ₁ at which
  the linearised network fails ("corrected_q"). The summary re-derives every stored
  file's forms from its stored thresholds (`rederive`: arithmetic, nothing re-measured).

Each is anchored at the measured threshold at B₀ = 32 or 512 and compared with the real
divergence threshold (loss ever > 10× start within 200 steps, 8 seeds, `training_threshold`)
at B = 8, 32, 128, 512. Networks: digits MLPs trained with the package's recipe that no
form was developed on — "gelu" (64-48-10, GELU, seed 2) and "tanh64" (64-64-10, tanh,
seed 3) — and a convolutional net with BatchNorm set up the way a user would ("bn_cnn":
conv 8 → BN → ReLU → max-pool → conv 16 → BN → ReLU → 2×2 average pool → linear, 1,946
parameters, trained on the 8×8 digit images scaled to [0, 1] with SGD lr 0.1, m = 0.9,
B = 64, 15 epochs, seed 0; measured and predicted in eval mode, BatchNorm on its running
statistics, as the real trials of `training_threshold` run). The three development
networks ("mlp", "cnn", "mlp_relu") are re-derived the same way against their thresholds
measured by `bench_lr_transfer.py` (seeds 0–7); without that run, the summary falls back
to the three-sequence results of `bench_linearized_rank.py` and `bench_quadratic_model.py`.
Networks with a loss quadratic in the outputs (½‖f − e_y‖², whose linearised network is
the quadratic model): the development MSE MLP ("mse", thresholds measured here over eight
seeds) and, held out, "mse_gelu" and "mse_tabular" (HELD_OUT_MSE), each run with that loss.

    python benchmarks/bench_heldout_transfer.py --net gelu      # ~5 min, one thread
    python benchmarks/bench_heldout_transfer.py --net tanh64
    python benchmarks/bench_heldout_transfer.py --net gelu --momentum 0.9
    python benchmarks/bench_heldout_transfer.py --net bn_cnn     # ~12 min
    python benchmarks/bench_heldout_transfer.py --net res_gn     # ~9 min (user-style, HELD_OUT_USER)
    python benchmarks/bench_heldout_transfer.py --net ln_mlp --momentum 0.9   # ~4.5 min
    python benchmarks/bench_heldout_transfer.py --net attn       # attention (HELD_OUT_ATTN)
    python benchmarks/bench_heldout_transfer.py --net attn --momentum 0.9
    python benchmarks/bench_heldout_transfer.py --net synth_silu [--momentum 0.9]   # other data
    python benchmarks/bench_heldout_transfer.py --net mlp        # a development net (~5 min)
    python benchmarks/bench_heldout_transfer.py --net mlp --momentum 0.9   # its m = 0.9 forms (~5 min)
    python benchmarks/bench_heldout_transfer.py --net mse_tabular --momentum 0.9   # ~4 min
    python benchmarks/bench_heldout_transfer.py --net gelu --momentum 0.9 --nesterov   # torch's
        # Nesterov instead of heavy ball (real thresholds always measured here; 3–9 min)
    python benchmarks/bench_heldout_transfer.py --net summary    # every net from stored JSON
    python benchmarks/bench_heldout_transfer.py --net summary --resecant   # + secant ratios (~2 min)
    python benchmarks/bench_heldout_transfer.py --net bn_cnn --reuse-real   # forms only (~7 min)
"""

from __future__ import annotations

import json
import time

import numpy as np
from _common import (
    RESULTS,
    base_parser,
    environment,
    half_mse_onehot,
    setup_torch,
    stored_parts,
    trained_breast_cancer_mlp,
    trained_mse_mlp,
    write_json,
    write_part,
)
from bench_criterion import BATCH_SIZES, network, study, transfer_ratios

from nets.learning_rates.along_top import rescaling_as_derived
from nets.learning_rates.transfer import momentum_caveat_silenced
from rmt.lr import momentum_factor

HELD_OUT = {"gelu": dict(seed=2, hidden=(48,), activation="gelu"),
            "tanh64": dict(seed=3, hidden=(64,), activation="tanh")}
HELD_OUT_CNN = ("bn_cnn",)
#: user-style nets added later (session 39, predictions written down before their
#: thresholds were measured): a residual CNN with GroupNorm and in-place ReLUs, and an MLP
#: with LayerNorm and SiLU; both with dropout in training, measured in eval mode
HELD_OUT_USER = ("res_gn", "ln_mlp")
#: an attention network added in session 44 (a held-out sweep of a hand-written variant
#: came first): each 8×8 image as 8 row tokens, torch's nn.MultiheadAttention
HELD_OUT_ATTN = ("attn",)
#: development networks whose forms can be re-derived here over eight sequences (their
#: measured thresholds: `bench_lr_transfer.py`, seeds 0–7)
DEVELOPMENT = ("mlp", "cnn", "mlp_relu")
#: a development network with another loss (½‖f − e_y‖², `_common.trained_mse_mlp`): its
#: stored study has three seeds, so its thresholds are measured here over eight
OTHER_LOSS = ("mse",)
#: held-out networks trained and measured with ½‖f − e_y‖² (`_common.half_mse_onehot`): the
#: GELU digits MLP of HELD_OUT trained on it, and the breast-cancer MLP 30-48-32-2 (GELU,
#: SiLU) of bench_heldout_tabular.py trained on it (SGD lr 0.05, m = 0.9, B = 32, 30 epochs)
HELD_OUT_MSE = ("mse_gelu", "mse_tabular")
#: a network on data no form has seen (session 51, first measured by an outside check):
#: sklearn's make_classification (3,000 samples, 24 features, 4 classes), MLP 24-64-64-4
#: with SiLU and dropout 0.1, trained the way a user would (SGD lr 0.05, m = 0.9, B = 64)
HELD_OUT_SYNTH = ("synth_silu",)
ALL_NETS = (*DEVELOPMENT, *HELD_OUT, *HELD_OUT_CNN, *HELD_OUT_USER, *HELD_OUT_ATTN, *OTHER_LOSS,
            *HELD_OUT_MSE, *HELD_OUT_SYNTH)
#: batch sequences of the linearised threshold: the measured thresholds' eight (seeds 0–7),
#: so model and measurement see the same batches (`transfer_lr`'s default)
LIN_SEEDS = 8


def trained_bn_cnn(seed=0, epochs=15):
    """(model in eval mode, (X, y)): the "bn_cnn" of the module docstring."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch import nn

    from nets.training.loops import train

    torch.manual_seed(seed)
    digits = load_digits()
    X = torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    train(net, F.cross_entropy, (X, y), epochs=epochs, lr=0.1, batch_size=64, momentum=0.9,
          seed=seed)
    return net.eval(), (X, y)


def user_style_network(name):
    """(untrained model, (X, y)) of a HELD_OUT_USER network: "res_gn" conv 1→8 (ReLU) →
    residual block [conv 8→8, GroupNorm(2 groups), ReLU, conv 8→8, + input, ReLU] → dropout
    0.1 → global average pool → linear 8→10 on the 8×8 images; "ln_mlp" 64 → 64 (LayerNorm,
    SiLU) → dropout 0.1 → 32 (SiLU) → 10 on the flattened images (both scaled to [0, 1])."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1, self.norm, self.conv2 = (nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(2, c),
                                                 nn.Conv2d(c, c, 3, padding=1))

        def forward(self, x):
            return F.relu(x + self.conv2(F.relu(self.norm(self.conv1(x)), inplace=True)))

    digits = load_digits()
    y = torch.tensor(digits.target)
    if name == "res_gn":
        X = torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32)
        net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(inplace=True), Residual(8),
                            nn.Dropout(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    else:
        X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
        net = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.SiLU(), nn.Dropout(0.1),
                            nn.Linear(64, 32), nn.SiLU(), nn.Linear(32, 10))
    return net, (X, y)


USER_STYLE_EPOCHS = {"res_gn": 40, "ln_mlp": 15}


def trained_user_style(name, seed=0):
    """(model in eval mode, (X, y)): a HELD_OUT_USER network trained the way bn_cnn is
    (SGD lr 0.1, m = 0.9, B = 64, dropout active) for USER_STYLE_EPOCHS[name] epochs (the
    small residual net needs 40 to fit the data: 79 % training accuracy after 15)."""
    import torch
    import torch.nn.functional as F

    from nets.training.loops import train

    torch.manual_seed(seed)
    net, data = user_style_network(name)
    train(net, F.cross_entropy, data, epochs=USER_STYLE_EPOCHS[name], lr=0.1, batch_size=64,
          momentum=0.9, seed=seed)
    return net.eval(), data


def trained_row_attention(seed=0, epochs=60):
    """(model in eval mode, (X, y)): the "attn" network — each digit image as 8 tokens (its
    rows, pixels scaled to [0, 1]), token embedding 8 → 16 plus a learned position
    embedding, one single-head `nn.MultiheadAttention` block with a residual connection
    and LayerNorm, mean over tokens, linear 16 → 10 (1,562 parameters); trained with SGD
    lr 0.05, m = 0.9, B = 64 for 60 epochs (at lr 0.1 it oscillates and stalls)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch import nn

    from nets.training.loops import train

    class RowAttention(nn.Module):
        def __init__(self, d=16, tokens=8, width=8):
            super().__init__()
            self.emb = nn.Linear(width, d)
            self.pos = nn.Parameter(0.1 * torch.randn(tokens, d))
            self.att = nn.MultiheadAttention(d, 1, batch_first=True)
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, 10)

        def forward(self, x):
            h = self.emb(x) + self.pos
            h = self.norm(h + self.att(h, h, h, need_weights=False)[0])
            return self.head(h.mean(1))

    torch.manual_seed(seed)
    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32).reshape(-1, 8, 8)
    y = torch.tensor(digits.target)
    net = RowAttention()
    train(net, F.cross_entropy, (X, y), epochs=epochs, lr=0.05, batch_size=64, momentum=0.9,
          seed=seed)
    return net.eval(), (X, y)


def trained_synth_silu(seed=0, epochs=20):
    """(model in eval mode, (X, y)): the "synth_silu" network of HELD_OUT_SYNTH —
    make_classification(n_samples=3000, n_features=24, n_informative=12, n_classes=4,
    n_clusters_per_class=2, class_sep=1.0, random_state=7), standardised; MLP 24 → 64
    (SiLU) → dropout 0.1 → 64 (SiLU) → 4; SGD lr 0.05, m = 0.9, B = 64, `epochs` epochs
    with dropout active (`nets.training.loops.train`)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import make_classification
    from torch import nn

    from nets.training.loops import train

    Xn, yn = make_classification(n_samples=3000, n_features=24, n_informative=12, n_classes=4,
                                 n_clusters_per_class=2, class_sep=1.0, random_state=7)
    Xn = (Xn - Xn.mean(0)) / Xn.std(0)
    X, y = torch.tensor(Xn, dtype=torch.float32), torch.tensor(yn)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(24, 64), nn.SiLU(), nn.Dropout(0.1), nn.Linear(64, 64),
                        nn.SiLU(), nn.Linear(64, 4))
    train(net, F.cross_entropy, (X, y), epochs=epochs, lr=0.05, batch_size=64, momentum=0.9,
          seed=seed)
    return net.eval(), (X, y)


def trained_mse_tabular(seed=0, epochs=30):
    """(model in eval mode, (X, y), loss_fn): the "mse_tabular" network of HELD_OUT_MSE,
    the plain breast-cancer MLP of bench_heldout_tabular.py trained on ½‖f − e_y‖²."""
    model, data = trained_breast_cancer_mlp(half_mse_onehot, seed=seed, epochs=epochs)
    return model, data, half_mse_onehot


def held_out_network(name):
    """(model, (X, y)) of a held-out cross-entropy network."""
    from nets.training.loops import trained_digits_mlp

    if name in HELD_OUT_USER:
        return trained_user_style(name)
    if name in HELD_OUT_ATTN:
        return trained_row_attention()
    if name in HELD_OUT_SYNTH:
        return trained_synth_silu()
    return trained_bn_cnn() if name == "bn_cnn" else trained_digits_mlp(**HELD_OUT[name])


def transfer_network(name):
    """(model, (X, y), loss_fn) of any network this script measures."""
    import torch.nn.functional as F

    if name in (*DEVELOPMENT, *OTHER_LOSS):
        return network(name)
    if name == "mse_gelu":
        return trained_mse_mlp(**HELD_OUT["gelu"])
    if name == "mse_tabular":
        return trained_mse_tabular()
    return (*held_out_network(name), F.cross_entropy)


def transfers(real, shape):
    """The shape anchored at the measured threshold at B₀ = 32 and at 512, divided by the
    measured thresholds: {"B32": (n_B,), "B512": (n_B,)}."""
    real, shape = np.asarray(real, float), np.asarray(shape, float)
    return {f"B{B0}": transfer_ratios(real, shape, B0) for B0 in (32, 512)}


def rule_ratios(real, exponent):
    """lr ∝ B^exponent anchored at the measured threshold at B₀ = 32 and 512, ÷ measured
    (the linear rule: 1, the square-root rule: ½, a constant lr: 0)."""
    return transfers(real, np.asarray(BATCH_SIZES, float) ** exponent)


def worst(transfer):
    """[smallest, largest] ratio of a `transfers` dict over both anchors."""
    return [float(min(v.min() for v in transfer.values())),
            float(max(v.max() for v in transfer.values()))]


def default_form_row(model, loss_fn, data, *, momentum=0.0, seeds=tuple(range(8)),
                     progress=False):
    """(row, real, default) of a held-out network: the real divergence thresholds
    (`training_threshold`, 200 steps, `seeds`) at `BATCH_SIZES`, `transfer_lr`'s default
    form anchored at the measured threshold at B₀ = 32 over the same sequences, and the
    row — every form's shape and transfers (`rows`), the default's transfers and worst
    ratio, its correction, and the seconds of both parts."""
    from nets import transfer_lr
    from nets.learning_rates.lr_search import training_threshold

    t0 = time.perf_counter()
    real = training_threshold(model, loss_fn, data, BATCH_SIZES, seeds=seeds, steps=200,
                              momentum=momentum, progress=progress)
    t1 = time.perf_counter()
    default = transfer_lr(model, loss_fn, data, BATCH_SIZES,
                          reference=(32, float(real.lr[BATCH_SIZES.index(32)])),
                          momentum=momentum, n_seeds=len(seeds), progress=progress)
    t2 = time.perf_counter()
    out = rows(real.lr, default.lam, default.effective_curvature, default.linearized_lr,
               default.secant_ratio, momentum)
    t = transfers(real.lr, default.shape)
    out.update(real_stderr=real.stderr, transfer_default=t, worst_default=worst(t),
               default_correction=default.correction, correction_applied=default.correction_applied,
               seconds_real=t1 - t0, seconds_forms=t2 - t1, momentum=momentum)
    return out, real, default


def heldout_main(doc, name, tag, run):
    """The command line of a one-network held-out bench (bench_heldout_regression,
    bench_heldout_token): --momentum and --seed (the checkpoint's training seed); the row
    `run(momentum, seed)` is written to benchmarks/results/<name>.json as the part
    "<tag>_m<momentum>_seed<seed>"."""
    p = base_parser(doc.splitlines()[0], quick=False)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="training seed of the checkpoint")
    args = p.parse_args()
    setup_torch(args)
    path, stored = stored_parts(name, args.out)
    t0 = time.perf_counter()
    part = run(args.momentum, args.seed)
    write_part(name, path, stored, f"{tag}_m{args.momentum:g}_seed{args.seed}", part, t0)


def rules_row(label, out, real, default, **fields):
    """`default_form_row`'s row completed for a held-out bench: the linear, √B and constant
    rules anchored like the forms, the default's shape, λ₁, 2/λ₁, s_lin/s_real, the
    linearised thresholds, the real per-seed thresholds and `fields`; prints a summary
    headed `label` and returns the row."""
    rules = {name: rule_ratios(real.lr, e) for name, e in
             (("linear", 1.0), ("sqrt", 0.5), ("constant", 0.0))}
    out.update(real_per_seed=real.per_seed, default_shape=default.shape,
               deterministic_limit=2.0 / default.lam, lam=default.lam,
               secant_ratio=default.secant_ratio, linearized_lr=default.linearized_lr,
               **fields,
               **{f"transfer_{k}_rule": v for k, v in rules.items()},
               **{f"worst_{k}_rule": worst(v) for k, v in rules.items()})
    t = out["transfer_default"]
    print(f"{label}, λ₁ {default.lam:.3f}\n"
          f"   real {np.round(real.lr, 4)} ± {np.round(real.stderr, 4)}  s_lin/s_real "
          f"{default.secant_ratio:.3f}  real/lin {np.round(real.lr / default.linearized_lr, 2)}\n"
          f"   transfer (default) from 32: {np.round(t['B32'], 3)}, from 512: {np.round(t['B512'], 3)}\n"
          f"   worst: default {np.round(out['worst_default'], 3)}, directional "
          f"{np.round(out['worst_directional'], 3)}, rules linear / √B / constant "
          f"{[np.round(out[f'worst_{k}_rule'], 2).tolist() for k in rules]}  "
          f"({out['seconds_real']:.0f} s + {out['seconds_forms']:.0f} s)", flush=True)
    return out


def share_q(lam, lin, momentum=0.0, nesterov=False):
    """q(B) = min(1, α_lin(B)·λ₁/(2(1+m))) (module docstring: tried, not kept; Nesterov:
    its edge 2(1+m)/(1+2m))."""
    edge = momentum_factor(momentum, "nesterov" if nesterov else "heavy_ball")
    return np.minimum(1.0, np.asarray(lin, float) * float(lam) / edge)


def rows(real, lam, lam_prime, lin, secant_ratio, momentum=0.0, nesterov=False):
    """Every form's shape and transfers; `lam_prime` is λ'_m(B), the curve at `momentum`.
    The corrections as derived, for any s_lin/s_real (transfer_lr applies its own for
    s_lin/s_real ≤ 1 only)."""
    lin_a = np.asarray(lin, float)
    pred = lin_a * rescaling_as_derived(secant_ratio, lam / np.asarray(lam_prime, float))
    q = share_q(lam, lin_a, momentum, nesterov)
    pred_q = lin_a * rescaling_as_derived(secant_ratio, q)
    out = {"real": real, "lam": lam, "lam_prime": lam_prime, "linearized": lin,
           "secant_ratio": secant_ratio, "corrected": pred, "share_q": q, "corrected_q": pred_q}
    for name, shape in (("directional", 1.0 / np.asarray(lam_prime, float)),
                        ("linearized", lin), ("corrected", pred), ("corrected_q", pred_q)):
        t = transfers(real, shape)
        out[f"transfer_{name}"] = t
        out[f"worst_{name}"] = worst(t)
    return out


def measure(name, momentum=0.0, reuse_real=False, nesterov=False):
    """Real thresholds (8 seeds) and the three forms on a held-out network at `momentum`
    (torch's Nesterov with `nesterov`; its real thresholds are always measured here);
    the linearised threshold and its correction are `transfer_lr(form="linearized")`'s
    (rank 200, the 8 measured batch sequences, tolerance 10, 200 steps; with momentum the correction
    uses λ'_ρ(B), the directional form 1/λ'_ρ(B))."""
    from nets import transfer_lr
    from nets.learning_rates.lr_search import training_threshold

    model, data, loss_fn = transfer_network(name)
    with momentum_caveat_silenced():
        lin = transfer_lr(model, loss_fn, data, BATCH_SIZES, reference=(8, 1.0),
                          momentum=momentum, nesterov=nesterov, form="linearized", factor=10.0,
                          steps=200, n_seeds=LIN_SEEDS)
    limit = np.asarray(lin.stability_limit, float)        # the directional local limit
    stored_real = RESULTS / f"{output_name(name, momentum, nesterov)}.json"
    if name in DEVELOPMENT and not nesterov:   # measured by bench_lr_transfer.py, seeds 0–7
        st = study(name)
        real_lr = np.asarray(st[f"measured_m{momentum:g}"], float)
        real_se = np.asarray(st[f"measured_stderr_m{momentum:g}"], float)
    elif reuse_real and stored_real.exists():   # the thresholds do not depend on the form
        old = json.loads(stored_real.read_text())
        real_lr, real_se = np.asarray(old["real"], float), np.asarray(old["real_stderr"], float)
    else:
        real = training_threshold(model, loss_fn, data, BATCH_SIZES,
                                  criterion="divergence", momentum=momentum,
                                  nesterov=nesterov, steps=200,
                                  seeds=tuple(range(8)), progress=False, unbracketed="nan",
                                  lr0=lambda B: float(np.interp(B, lin.batch_sizes, limit)))
        real_lr, real_se = real.lr, real.stderr
    out = rows(real_lr, lin.lam, lin.effective_curvature, lin.linearized_lr, lin.secant_ratio,
               momentum, nesterov)
    out["real_stderr"] = real_se
    out["momentum"] = momentum
    out["nesterov"] = nesterov
    out["rank"], out["linearized_seeds"] = lin.rank, LIN_SEEDS
    return out


def rederive(stored_row):
    """A stored file's row with its forms re-derived from its stored thresholds, λ₁, λ'_m(B)
    and secant ratio (pure arithmetic: nothing is re-measured)."""
    r = dict(stored_row)
    r.update(rows(r["real"], r["lam"], r["lam_prime"], r["linearized"], r["secant_ratio"],
                  r.get("momentum", 0.0), r.get("nesterov", False)))
    return r


def secant_ratio_now(name):
    """s_lin/s_real along u at k = 10 on `name`'s checkpoint (`loss_along_top`, Lanczos
    seed 0 as in `measure`): the crossing solved with the exact loss. The stored rows
    before session 47 read it at the first grid point above 10·f(0) (kept in those files as
    `secant_ratio_grid`; the corrected rows moved by at most 0.03 in their worst ratio)."""
    from nets.learning_rates.along_top import loss_along_top

    model, data, loss_fn = transfer_network(name)
    return loss_along_top(model, loss_fn, data, factor=10.0, seed=0).secant_ratio


def output_name(name, momentum=0.0, nesterov=False):
    return (f"bench_heldout_transfer_{name}" + ("" if momentum == 0 else f"_m{momentum:g}")
            + ("_nesterov" if nesterov else ""))


def stored(name):
    """A development network's row from the stored JSON files (three linearised
    sequences, `bench_linearized_rank.py`)."""
    st = study(name)
    q = json.loads((RESULTS / f"bench_quadratic_model_{name}.json").read_text())["along_top"]
    lin = json.loads((RESULTS / f"bench_linearized_rank_{name}.json").read_text())["m0"]["ranks"]["r200"]["lr"]
    return rows(np.asarray(st["measured_m0"], float), st["lam"], 2.0 / np.asarray(st["local_limit_m0"], float),
                np.asarray(lin, float),
                q["linearized"]["k10"]["secant_over_lam"] / q["real"]["k10"]["secant_over_lam"])


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--net", choices=(*ALL_NETS, "summary"), default="summary")
    p.add_argument("--momentum", type=float, default=0.0, help="heavy-ball momentum")
    p.add_argument("--nesterov", action="store_true", help="torch's Nesterov momentum instead")
    p.add_argument("--reuse-real", action="store_true",
                   help="take the measured thresholds from the stored JSON (re-derive the forms only)")
    p.add_argument("--resecant", action="store_true",
                   help="with --net summary: re-measure each stored net's secant ratio along u "
                        "(loss_along_top, crossing solved since session 47) before re-deriving")
    args = p.parse_args(argv)
    setup_torch(args)
    if args.resecant and args.net != "summary":
        p.error("--resecant goes with --net summary")
    if args.net != "summary":
        out = {"environment": environment(), "net": args.net, **HELD_OUT.get(args.net, {}),
               "batch_sizes": list(BATCH_SIZES),
               **measure(args.net, args.momentum, args.reuse_real, args.nesterov)}
        print("wrote", write_json(output_name(args.net, args.momentum, args.nesterov), out,
                                  args.out))
        return
    table = {}
    for name in DEVELOPMENT:                # re-derived over eight sequences where run
        path = RESULTS / f"{output_name(name)}.json"
        table[name] = json.loads(path.read_text()) if path.exists() else stored(name)
    for name in (n for n in ALL_NETS if n not in DEVELOPMENT):
        path = RESULTS / f"{output_name(name)}.json"
        if path.exists():
            table[name] = json.loads(path.read_text())
    for name in ALL_NETS:                   # with momentum, where run
        for nest, suffix in ((False, "_m0.9"), (True, "_m0.9_nesterov")):
            path = RESULTS / f"{output_name(name, 0.9, nest)}.json"
            if path.exists():
                table[f"{name}{suffix}"] = json.loads(path.read_text())
    if args.resecant:
        ratios = {}
        for name, r in table.items():
            base = name.removesuffix("_nesterov").removesuffix("_m0.9")
            if base not in ratios:
                ratios[base] = secant_ratio_now(base)
            if "secant_ratio_grid" not in r:
                r["secant_ratio_grid"] = r["secant_ratio"]
            r["secant_ratio"] = ratios[base]
    for name, r in table.items():           # every form from the stored thresholds
        table[name] = rederive(r)
        base = name.removesuffix("_nesterov").removesuffix("_m0.9")
        path = RESULTS / f"{output_name(base, r.get('momentum', 0.0), r.get('nesterov', False))}.json"
        if path.exists():
            write_json(path.stem, table[name], str(path))
    for name, r in table.items():
        print(f"{name}: real {np.round(np.asarray(r['real'], float), 3)}; worst transfer "
              + ", ".join(f"{k} {np.round(r[f'worst_{k}'], 2)}" for k in ("directional", "linearized", "corrected")))
    print("wrote", write_json("bench_heldout_transfer", {"environment": environment(), "nets": table}, args.out))


if __name__ == "__main__":
    main()
