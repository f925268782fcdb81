"""Held out from another data set: SGD transfer on a tabular MLP with LayerNorm and label smoothing.

Every network the transfer forms were developed or tested on so far is a digits network
trained with plain cross-entropy. This script runs `transfer_lr` the way a user would on
a different problem — the sklearn breast-cancer data (569 samples, 30 standardised
features, 2 classes), an MLP 30-48-32-2 with GELU and SiLU, trained by a plain torch loop
(SGD lr 0.05, m = 0.9, B = 32, 30 epochs, seed 0) — in four variants: with or without a
LayerNorm after the first layer, and with `nn.CrossEntropyLoss(label_smoothing=0.05)` or
plain cross-entropy.

Measured: the real divergence threshold (loss ever > 10× start within 200 steps, eight
seeds, `training_threshold`, SGD m = 0) at B = 8, 32, 128, 512. Predicted, each anchored at
the measured threshold at B₀ = 32 and 512: `transfer_lr`'s default (the linearised network
in its top-200 Gauss–Newton directions over the same eight batch sequences, corrected
along u where that correction applies), the correction as derived applied regardless
of the secant ratio (`along_top.rescaling_as_derived`), the uncorrected linearised network, and the
directional form. Reported: worst transfer ratio over both anchors, the secant ratio
s_lin/s_real along u, real ÷ linearised per B.

`--part spherical` (LayerNorm variant, m = 0): why the real network is *more* stable than
its linearisation at small B. The weights (W₁, b₁) before the LayerNorm are a
scale-invariant block (outputs unchanged under (W₁, b₁) → c·(W₁, b₁), so J_blk·w_blk = 0 and
the gradient is orthogonal to w_blk): every SGD step raises ‖w_blk‖² by α²‖g_blk‖², and the
curvature of the block falls as 1/‖w_blk‖² — the real network lowers its own effective
learning rate, a fixed Jacobian cannot. The part measures the block's norm and λ₁ after
200 real steps near the measured threshold (B = 8, 32, 512, seed 0), and the threshold
(bisection, 8 sequences, the real protocol) of the all-P linearised network with and
without the spherical map z = z₀ + s·J_blk·e_blk + J_rest·e_rest,
s = ‖w_blk‖/‖w_blk + e_blk‖ (the linearisation in the block's direction only, which keeps
the symmetry), side by side.

`--part adam_state` (plain variant, β = (0.9, 0.999)): the warmed Adam preconditioner
D = 1/(√v̂ + ε) after the protocol's warm-up (500 steps at 1e-4, batches of B, seed 0)
against the noise-model state D(B) = 1/(√(ḡ² + c(B,N)·Σ_jj) + ε) that the mean-square
prediction uses (ḡ, Σ_jj the per-sample gradient mean and variance at the checkpoint):
median and geometric mean of D_warm/D(B) over the coordinates, and how far the warm-up
moved the weights, at B = 8 and 512.

`--momentum 0.9`: the same with heavy-ball SGD (key "m0.9"). `--adam 0.9,0`: Adam with
β₁ = 0.9 and 0 (β₂ = 0.999, ε = 1e-8): the warmed-state divergence threshold (500 steps at
1e-4 with batches of size B, then 100 steps at α; `adam_threshold`, eight seeds) against
`transfer_lr(optimizer=torch.optim.Adam(...), form="mean_square")`; keys "adam_b0.9",
"adam_b0"; with `--adam-form linearized` the linearised-Adam form (`transfer_lr`'s Adam
default since a later revision) over the same eight sequences instead (keys
"adam_b0.9_linearized", …). Results of every part merge into
one JSON.

    python benchmarks/bench_heldout_tabular.py            # ~8 min on one thread (4 variants)
    python benchmarks/bench_heldout_tabular.py --variants ln,smooth
    python benchmarks/bench_heldout_tabular.py --momentum 0.9
    python benchmarks/bench_heldout_tabular.py --train-seed 1        # another trained instance
    python benchmarks/bench_heldout_tabular.py --part spherical      # ~3 min, 2 threads
    python benchmarks/bench_heldout_tabular.py --part adam_state     # ~20 s
    python benchmarks/bench_heldout_tabular.py --adam 0.9,0
    python benchmarks/bench_heldout_tabular.py --adam 0.9,0 --adam-form linearized --variants plain
    python benchmarks/bench_heldout_tabular.py --part rederive       # stored SGD rows' forms, seconds
    python benchmarks/bench_heldout_tabular.py --part resecant       # + re-measured secant ratios (~1 min)
"""

from __future__ import annotations

import time

import numpy as np
from _common import base_parser, environment, setup_torch, trained_breast_cancer_mlp, write_json
from bench_adam import small_b_exponent
from bench_heldout_transfer import BATCH_SIZES, default_form_row, rows, transfers, worst

SEEDS = tuple(range(8))
#: the fields of an SGD row (`run_variant`); a variant's m = 0 row sits at its top level
#: beside the other parts' keys
SGD_KEYS = ("real", "lam", "lam_prime", "linearized", "secant_ratio", "real_stderr",
            "correction_applied", "seconds_real", "seconds_forms", "momentum",
            "lam_prime_effective")
VARIANTS = {"plain": dict(layer_norm=False, smoothing=0.0),
            "ln": dict(layer_norm=True, smoothing=0.0),
            "smooth": dict(layer_norm=False, smoothing=0.05),
            "ln_smooth": dict(layer_norm=True, smoothing=0.05)}


def trained_tabular_mlp(*, layer_norm, smoothing, seed=0, epochs=30):
    """(model in eval mode, loss_fn, (X, y)) for one variant of the module docstring
    (`_common.trained_breast_cancer_mlp` with the variant's cross-entropy)."""
    from torch import nn

    loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)
    model, data = trained_breast_cancer_mlp(loss_fn, layer_norm=layer_norm, seed=seed,
                                            epochs=epochs)
    return model, loss_fn, data


def run_variant(name, *, momentum=0.0, train_seed=0, progress=False):
    out, real, default = default_form_row(*trained_tabular_mlp(**VARIANTS[name], seed=train_seed),
                                          momentum=momentum, seeds=SEEDS, progress=progress)
    out["lam_prime_effective"] = True
    print(f"{name}, m = {momentum:g}: real {np.round(real.lr, 4)}  s_lin/s_real {default.secant_ratio:.3f}  "
          f"real/lin {np.round(real.lr / default.linearized_lr, 2)}\n"
          f"   worst transfer: default {np.round(out['worst_default'], 2)}, corrected as derived "
          f"{np.round(out['worst_corrected'], 2)}, linearised {np.round(out['worst_linearized'], 2)}, "
          f"directional {np.round(out['worst_directional'], 2)}  "
          f"({out['seconds_real']:.0f} s + {out['seconds_forms']:.0f} s)", flush=True)
    return out


def secant_ratio_now(name):
    """s_lin/s_real along u at k = 10 of a stored variant ("<variant>" or
    "<variant>_seed<k>"), re-measured with the crossing solved (`loss_along_top` since
    session 47; the rows before read it at the first grid point above 10·f(0), kept as
    "secant_ratio_grid")."""
    from nets.learning_rates.along_top import loss_along_top

    base, _, seed = name.partition("_seed")
    model, loss_fn, data = trained_tabular_mlp(**VARIANTS[base], seed=int(seed or 0))
    return loss_along_top(model, loss_fn, data, factor=10.0, seed=0).secant_ratio


def adam_resecant(name, row, beta1):
    """A stored linearised-Adam row (`run_adam(form="linearized")`) with its secant ratios
    re-measured at the same warmed states (`adam_linearized.secant_at_warmed_states`) and
    its corrected shape, transfer and as-derived columns re-derived; the linearised
    thresholds are kept (old values as "secant_ratio_grid", "worst_grid")."""
    from nets.learning_rates.adam_linearized import secant_at_warmed_states, share_correction
    from nets.learning_rates.along_top import rescaling_as_derived

    base, _, seed = name.partition("_seed")
    model, loss_fn, data = trained_tabular_mlp(**VARIANTS[base], seed=int(seed or 0))
    lam, r = secant_at_warmed_states(model, loss_fn, data, BATCH_SIZES, betas=(beta1, 0.999),
                                     warm_seed=SEEDS[0])
    lin, real = np.asarray(row["linearized"], float), np.asarray(row["real"], float)
    q, corr = share_correction(lin, lam, beta1, r)
    shape = lin * corr
    out = dict(row)
    out.setdefault("secant_ratio_grid", row["secant_ratio"])
    out.setdefault("worst_grid", row["worst"])
    t = transfers(real, shape)
    B = np.asarray(BATCH_SIZES)
    out.update(secant_ratio=r, share=q, predicted_shape=shape, transfer=t, worst=worst(t),
               predicted_exponent=float(np.polyfit(np.log(B[B <= 128]),
                                                   np.log(shape[B <= 128]), 1)[0]),
               worst_as_derived=worst(transfers(real, lin * rescaling_as_derived(r, q))))
    print(f"{name} Adam β₁ = {beta1:g}: r {np.round(row['secant_ratio'], 3)} -> {np.round(r, 3)}; "
          f"worst {np.round(row['worst'], 2)} -> {np.round(out['worst'], 2)}", flush=True)
    return out


def rederive(row, momentum):
    """A stored SGD row (m = 0 or "m0.9") with every form re-derived from its stored
    thresholds (pure arithmetic, `bench_heldout_transfer.rows`), the default as
    `transfer_lr` computes it (the correction where s_lin/s_real ≤ 1), and the directional
    form from λ'_m(B) = λ₁ + (1+m)/(1−m)·(λ'(B) − λ₁). Rows stored before session 39 hold
    λ'(B) in "lam_prime" (the m = 0 curve: with momentum their directional and
    as-derived columns used the m = 0 shape, a bug; `transfer_lr`'s own default was
    right); they are converted once and flagged "lam_prime_effective"."""
    from nets.learning_rates.transfer import secant_correction
    from rmt.lr import momentum_noise_gain

    r = dict(row)
    lam, lam_b = float(r["lam"]), np.asarray(r["lam_prime"], float)
    if not r.get("lam_prime_effective", False):
        lam_b = lam + momentum_noise_gain(momentum) * (lam_b - lam)
    r.update(rows(r["real"], lam, lam_b, r["linearized"], r["secant_ratio"], momentum))
    correction = secant_correction(lam, lam_b, r["secant_ratio"])      # transfer_lr's own
    t = transfers(r["real"], np.asarray(r["linearized"], float) * correction)
    r.update(transfer_default=t, worst_default=worst(t), default_correction=correction,
             momentum=momentum, lam_prime_effective=True)
    return r


def run_adam(name, beta1, *, form=None, train_seed=0, progress=False):
    import torch

    from nets import adam_threshold, transfer_lr

    model, loss_fn, data = trained_tabular_mlp(**VARIANTS[name], seed=train_seed)
    t0 = time.perf_counter()
    real = adam_threshold(model, loss_fn, data, BATCH_SIZES, betas=(beta1, 0.999), eps=1e-8,
                          warmup_steps=500, warmup_lr=1e-4, steps=100, criterion="divergence",
                          seeds=SEEDS, progress=progress)
    t1 = time.perf_counter()
    reference = (32, float(real.lr[1]))
    extra = {}
    if form == "linearized":
        # the thresholds transfer_lr's linearised Adam form computes (its protocol is
        # linearized_adam_threshold's defaults), run once and read apart: uncorrected, as
        # transferred (corrected where r ≤ 1) and corrected as derived (for any r)
        from nets import adam_transfer_lr, linearized_adam_threshold
        from nets.learning_rates.along_top import rescaling_as_derived

        lin = linearized_adam_threshold(model, loss_fn, data, BATCH_SIZES, betas=(beta1, 0.999),
                                        eps=1e-8, seeds=SEEDS)
        pred = adam_transfer_lr(model, loss_fn, data, BATCH_SIZES, reference=reference,
                                betas=(beta1, 0.999), eps=1e-8, form=form, prediction=lin)
        r, q = np.asarray(lin.secant_ratio, float), np.asarray(lin.share, float)
        derived = np.asarray(lin.lr, float) * rescaling_as_derived(r, q)
        extra = {"secant_ratio": r, "share": q, "linearized": lin.lr,
                 "worst_uncorrected": worst(transfers(real.lr, np.asarray(lin.lr, float))),
                 "worst_as_derived": worst(transfers(real.lr, derived))}
    else:
        opt = torch.optim.Adam(model.parameters(), betas=(beta1, 0.999), eps=1e-8)
        pred = transfer_lr(model, loss_fn, data, BATCH_SIZES, reference=reference,
                           optimizer=opt, form=form or "mean_square", progress=progress)
    shape = np.asarray(pred.lr, float)
    t = transfers(real.lr, shape)
    B = np.asarray(BATCH_SIZES)
    out = {"real": real.lr, "real_stderr": real.stderr, "real_per_seed": real.per_seed,
           "exponent": small_b_exponent(B, np.asarray(real.per_seed), np.random.default_rng(0)),
           "predicted_exponent": float(np.polyfit(np.log(B[B <= 128]),
                                                  np.log(shape[B <= 128]), 1)[0]),
           "predicted_shape": shape,
           # the mean-square limit of each warmed state itself (mean over seeds)
           "predicted_state_mean_square": np.asarray(real.predicted_state_mean_square).mean(1),
           "transfer_state_mean_square": transfers(
               real.lr, np.asarray(real.predicted_state_mean_square).mean(1)),
           "form": pred.form, "transfer": t, "worst": worst(t), "seconds_real": t1 - t0,
           "seconds_forms": time.perf_counter() - t1, **extra}
    e = out["exponent"]
    print(f"{name}, Adam beta1 = {beta1:g}: real {np.round(real.lr, 5)}  worst transfer "
          f"({pred.form}) {np.round(out['worst'], 2)}; exponent B <= 128 {e['exponent']:.2f} "
          f"[{e['ci_low']:.2f}, {e['ci_high']:.2f}] predicted {out['predicted_exponent']:.2f} "
          f"({t1 - t0:.0f} s)" + (f"; r {np.round(extra['secant_ratio'], 2)}, uncorrected "
                                  f"{np.round(extra['worst_uncorrected'], 2)}, as derived "
                                  f"{np.round(extra['worst_as_derived'], 2)}" if extra else ""),
          flush=True)
    return out


def linearized_outputs(model, X, block):
    """(z₀ (N, K), J_blk (N, K, P_blk), J_rest (N, K, P − P_blk), w_blk) in float64 for the
    parameter names in `block` (the scale-invariant group) and the rest: the columns of
    `output_jacobians` of a float64 copy of the model, split by parameter."""
    import copy

    import torch

    from nets.learning_rates.linearized import output_jacobians

    net = copy.deepcopy(model).double()
    J, z0 = output_jacobians(net, X.double(), dtype=torch.float64)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    in_block = torch.cat([torch.full((p.numel(),), n in block) for n, p in named])
    w_blk = torch.cat([p.detach().reshape(-1) for n, p in named if n in block])
    return z0, J[:, :, in_block], J[:, :, ~in_block], w_blk


def spherical_threshold(parts, loss_fn, y, B, seed, *, spherical, steps=200, factor=10.0,
                        rel_tol=0.03):
    """Divergence threshold (loss ever > factor × start within `steps` steps; `bisect_max_lr`
    in log α from 1 to hi/lo ≤ 1 + rel_tol) of SGD on the all-P linearised network, with
    the spherical map on the block or without; batches as `training_threshold` draws them
    (torch.Generator seeded by `seed`, randperm[:B] per step)."""
    import math

    import torch

    from nets.learning_rates.lr_search import bisect_max_lr

    z0, Jb, Jr, w_blk = parts
    N, nb = len(y), Jb.shape[2]
    n0 = w_blk.norm()

    def outputs(e, idx=slice(None)):
        eb, er = e[:nb], e[nb:]
        s = n0 / (w_blk + eb).norm() if spherical else 1.0
        return z0[idx] + s * (Jb[idx] @ eb) + Jr[idx] @ er

    L0 = float(loss_fn(z0, y))

    def diverges(lr):
        gen = torch.Generator().manual_seed(seed)
        e = torch.zeros(nb + Jr.shape[2], dtype=torch.float64, requires_grad=True)
        for _ in range(steps):
            idx = torch.randperm(N, generator=gen)[:B]
            g, = torch.autograd.grad(loss_fn(outputs(e, idx), y[idx]), e)
            with torch.no_grad():
                e -= lr * g
                L = float(loss_fn(outputs(e), y))
            if not math.isfinite(L) or L > factor * L0:
                return True
        return False

    return bisect_max_lr(diverges, 1.0, rel_tol=rel_tol).alpha


def run_spherical(stored_real):
    """The `--part spherical` of the module docstring (LayerNorm variant, m = 0)."""
    import copy

    import torch

    from nets import top_eigenvalues

    model, loss_fn, (X, y) = trained_tabular_mlp(**VARIANTS["ln"])
    block = ("0.weight", "0.bias")
    parts = linearized_outputs(model, X, block)
    z0, Jb, _, w_blk = parts
    out = {"block": block, "symmetry_residual": float((Jb @ w_blk).abs().max()),
           "block_norm_sq": float(w_blk.norm() ** 2),
           "lam": float(top_eigenvalues(model, loss_fn, (X, y), k=1, seed=0)[0])}
    real = np.asarray(stored_real, float)
    traces = {}
    for B, frac in ((8, 1.0), (32, 1.0), (512, 0.93)):
        lr = frac * float(real[list(BATCH_SIZES).index(B)])
        net = copy.deepcopy(model).eval()
        params = [p for p in net.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(0)
        for _ in range(200):
            idx = torch.randperm(len(X), generator=gen)[:B]
            g = torch.autograd.grad(loss_fn(net(X[idx]), y[idx]), params)
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.sub_(lr * gi)
        sq = sum(float(p.detach().norm() ** 2) for n, p in net.named_parameters() if n in block)
        traces[f"B{B}"] = {"lr": lr, "block_norm_sq_after": sq,
                           "lam_after": float(top_eigenvalues(net, loss_fn, (X, y), k=1,
                                                              seed=0)[0])}
    out["real_runs"] = traces
    for spherical in (False, True):
        th = np.array([np.mean([spherical_threshold(parts, loss_fn, y, B, s, spherical=spherical)
                                for s in SEEDS]) for B in BATCH_SIZES])
        key = "spherical" if spherical else "plain"
        out[f"linearized_{key}"] = th
        out[f"real_over_{key}"] = real / th
        out[f"worst_{key}"] = worst(transfers(real, th))
        print(f"LayerNorm, all-P linearised ({key}): {np.round(th, 3)}, real / it "
              f"{np.round(real / th, 2)}", flush=True)
    print("real runs (block norm² from "
          f"{out['block_norm_sq']:.1f}, λ₁ from {out['lam']:.3f}): "
          + ", ".join(f"{k}: {v['block_norm_sq_after']:.1f}, {v['lam_after']:.3f}"
                      for k, v in traces.items()), flush=True)
    return out


def run_adam_state():
    """The `--part adam_state` of the module docstring."""
    import torch

    from nets.learning_rates.adam import (
        adam_preconditioner,
        noise_model_preconditioner,
        restored_adam,
        warm_adam_state,
    )
    from nets.noise.gradient_noise import gradient_noise

    model, loss_fn, (X, y) = trained_tabular_mlp(**VARIANTS["plain"])
    params = list(model.parameters())
    gn = gradient_noise(model, loss_fn, (X, y), hessian=False)    # ḡ, Σ_jj: the prediction's
    out = {}
    for B in (8, 512):
        warm = warm_adam_state(model, loss_fn, X, y, B, warmup_steps=500, warmup_lr=1e-4,
                               betas=(0.9, 0.999), eps=1e-8, seed=0)
        D = adam_preconditioner(warm.model, restored_adam(warm.model, warm, 1e-4)).double()
        ratio = D / noise_model_preconditioner(gn.mean, gn.var, B, len(X), eps=1e-8)
        moved = torch.cat([(a - b).detach().reshape(-1)
                           for a, b in zip(warm.model.parameters(), params)]).norm()
        out[f"B{B}"] = {"median_ratio": float(ratio.median()),
                        "geometric_mean_ratio": float(torch.exp(torch.log(ratio).mean())),
                        "warmup_distance": float(moved)}
        print(f"B = {B}: D_warm / D(B) median {out[f'B{B}']['median_ratio']:.3f}, geometric "
              f"mean {out[f'B{B}']['geometric_mean_ratio']:.3f}; the warm-up moved the "
              f"weights {float(moved):.3f}", flush=True)
    return out


def main():
    import json
    import os

    from _common import RESULTS

    p = base_parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--train-seed", type=int, default=0,
                   help="seed of the network's training (results under '<variant>_seed<k>' "
                        "for k > 0)")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--part", choices=("transfer", "spherical", "adam_state", "rederive",
                                      "resecant"),
                   default="transfer")
    p.add_argument("--adam", default="", help="comma-separated beta1 values (Adam part)")
    p.add_argument("--adam-form", default=None,
                   help="transfer_lr's Adam form (default: its default, mean_square); "
                        "'linearized' stores under adam_b<beta1>_linearized")
    args = p.parse_args()
    setup_torch(args)
    names = [v for v in args.variants.split(",") if v]
    default = RESULTS / "bench_heldout_tabular.json"
    path = default if args.out is None else args.out
    # the file accumulates every part's rows: a new --out starts from the stored results
    # (`--part rederive --out NEW` re-derived nothing and wrote an empty file; an audit)
    source = path if args.out is None or os.path.exists(path) else default
    try:
        stored = json.loads(open(source).read())
    except (OSError, ValueError):
        stored = {}
    res = stored.get("variants", {})
    if args.part == "spherical":
        res.setdefault("ln", {})["spherical"] = run_spherical(res["ln"]["real"])
        names = []
    elif args.part == "adam_state":
        res.setdefault("plain", {})["adam_state"] = run_adam_state()
        names = []
    elif args.part in ("rederive", "resecant"):   # every stored SGD row, thresholds kept
        for name, row in res.items():
            if args.part == "resecant":
                ratio = secant_ratio_now(name)
                for r in (row, row.get("m0.9")):
                    if r is not None and "secant_ratio" in r:
                        r.setdefault("secant_ratio_grid", r["secant_ratio"])
                        r["secant_ratio"] = ratio
                for key in [k for k in row if k.startswith("adam_b") and k.endswith("_linearized")]:
                    row[key] = adam_resecant(name, row[key], float(key[6:].split("_")[0]))
            if "real" in row:
                row.update(rederive({k: v for k, v in row.items() if k in SGD_KEYS}, 0.0))
            if "m0.9" in row:
                row["m0.9"] = rederive(row["m0.9"], 0.9)
            print(f"{name}: default m = 0 {np.round(row.get('worst_default', [np.nan] * 2), 2)}, "
                  f"m = 0.9 {np.round(row.get('m0.9', {}).get('worst_default', [np.nan] * 2), 2)}; "
                  f"directional m = 0.9 "
                  f"{np.round(row.get('m0.9', {}).get('worst_directional', [np.nan] * 2), 2)}")
        names = []
    for name in names:
        row = res.setdefault(name if args.train_seed == 0 else f"{name}_seed{args.train_seed}", {})
        if args.adam:
            for b1 in (float(b) for b in args.adam.split(",")):
                key = f"adam_b{b1:g}" + (f"_{args.adam_form}" if args.adam_form else "")
                row[key] = run_adam(name, b1, form=args.adam_form, train_seed=args.train_seed)
        elif args.momentum:
            row[f"m{args.momentum:g}"] = run_variant(name, momentum=args.momentum,
                                                     train_seed=args.train_seed)
        else:
            row.update(run_variant(name, train_seed=args.train_seed))
    write_json("bench_heldout_tabular", {"environment": environment(), "batch_sizes": BATCH_SIZES,
                                         "seeds": SEEDS, "variants": res}, args.out)


if __name__ == "__main__":
    main()
