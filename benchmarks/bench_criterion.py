"""How sharp is a real-training "divergence threshold"? Loss tolerance k, real nets against their quadratic model.

`bench_lr_transfer.py` measures the largest SGD learning rate at which the full-data loss
never exceeds k = 10× its start within 200 steps. This script asks how much that number
depends on k, i.e. whether it marks an instability or a loss tolerance:

1. **Real training** (`nets.learning_rates.lr_search.training_threshold`, criterion
   "divergence", `factor=k`, 3 seeds, B = 8 … 512, heavy-ball m ∈ {0, 0.9}) at
   k = 3, 10 and 100 on the digits MLP, the digits CNN and the MSE-loss MLP. The k = 10
   column is re-measured with the same 3 seeds. For each k: the level (measured ÷ the
   local mean-square limit 2(1+m)/λ'_m(B) of `bench_lr_transfer.json`) and the
   directional transfer anchored at B₀ = 32 and 512, and the softness
   d log α / d log k between k = 3 and 100 (0 for a sharp edge). On the MLP also
   k = 10⁶: does the loss ever blow up, or only rise?
2. **The MLP's quadratic model under the same protocol**: every sample's loss replaced
   by its second-order model around the checkpoint,
   ℓ_i(w₀ + e) = ℓ_i + g_iᵀe + ½‖R_i e‖² (g_i its gradient, R_iᵀR_i its Gauss–Newton
   matrix; all 2,410 directions), heavy ball on the same kind of fresh batches without
   replacement, 200 steps, the full-data model loss judged against k× its start —
   additive batch noise, multiplicative batch noise, the drift of the non-zero full
   gradient and the finite horizon are all in; only the nonlinearity is not. 32
   learning rates side by side on common batches, 2 seeds; the threshold of each k is
   the first grid step whose running maximum of the loss exceeds k× its start.
3. **Adam** (`nets.learning_rates.adam.adam_threshold`, β = (0.9, 0.999), state warmed
   500 steps at 1e-4, 100 steps at α, criterion "divergence" with `factor=k`, 3 seeds)
   at k = 3, 10, 100 on the networks of `--adam-nets`, with the mean-square transfer of
   `bench_adam_<net>.json`'s predicted curve anchored at B₀ = 32 and 512.

4. **Where a soft run goes** (MLP, one seed): 200 steps at a few lrs above the local
   limit, then the directional λ'(B) of the end point; the local margin
   α·λ'_m(B)/(2(1+m)) (> 1: mean-square unstable) before and after, the loss, and the
   typical-path growth rate per step of the full linear (Gauss–Newton) model at α
   before and after (`bench_momentum_linear.growth_rates`, 400 steps): is the end point
   locally stable for typical paths even where the mean square is not?

    python benchmarks/bench_criterion.py          # MLP + MSE MLP: ~35 min on one core
    python benchmarks/bench_criterion.py --nets cnn --seeds 2 --momenta 0 --skip-surrogate
        --adam-nets '' --out benchmarks/results/bench_criterion_cnn.json     # (one line) ~30 min

Real thresholds go to a resumable store (benchmarks/results/criterion_store.jsonl).
"""

from __future__ import annotations

import json

import numpy as np
from _common import RESULTS, base_parser, environment, trained_mse_mlp, write_json
from bench_momentum_linear import batch_ggn_times, growth_rates, network_factors, sgd_run

from nets.learning_rates.linearized import first_crossing  # the grid rule, shared

BATCH_SIZES = (8, 32, 128, 512)
MOMENTA = (0.0, 0.9)
FACTORS = (3.0, 10.0, 100.0)
EXTREME = 1e6          # MLP only: does anything ever become non-finite?
SEEDS = (0, 1, 2)
SURROGATE_SEEDS = (0, 1)
STEPS = 200


def surrogate_max_loss(R, Gi, L0, B, m, grid, steps, seed):
    """Heavy ball on the per-sample quadratic model, one column per learning rate.

    ℓ_i(e) = ℓ_i + g_iᵀe + ½‖R_i e‖², batch step v ← m·v + (1/B)Σ_{i∈S}(g_i + R_iᵀR_i e),
    e ← e − α·v from e = 0; returns the running maximum over `steps` steps of the
    full-data model loss ÷ L0 (inf for a column that became non-finite)."""
    import torch

    N, _, P = R.shape
    gen = torch.Generator().manual_seed(int(seed))
    a = torch.tensor(np.asarray(grid), dtype=R.dtype)
    E = torch.zeros(P, len(grid), dtype=R.dtype)
    V = torch.zeros_like(E)
    gbar = Gi.mean(0)
    worst = torch.ones(len(grid), dtype=torch.float64)
    dead = torch.zeros(len(grid), dtype=torch.bool)
    for _ in range(steps):
        idx = torch.randperm(N, generator=gen)[:B]
        V = m * V + batch_ggn_times(R[idx], E) + Gi[idx].mean(0)[:, None]
        E = E - a * V
        RE = torch.einsum("nkp,pc->nkc", R, E)
        L = L0 + gbar @ E + 0.5 * (RE ** 2).sum((0, 1)) / N
        dead |= ~torch.isfinite(L)
        worst = torch.maximum(worst, torch.nan_to_num(L.double() / L0, nan=0.0))
        E[:, dead], V[:, dead] = 0.0, 0.0
    worst[dead] = float("inf")
    return worst.numpy()


def transfer_ratios(measured, limit, B0):
    """Directional transfer anchored at the measured α(B₀), divided by the measured α."""
    i0 = list(BATCH_SIZES).index(B0)
    return measured[i0] * limit / limit[i0] / measured


def summary(label, lr, limit, **extra):
    """Level (lr ÷ limit) and the transfer ratios at both anchors of one threshold curve."""
    row = {"lr": lr, **extra, "level": lr / limit,
           **{f"transfer_B{B0}": transfer_ratios(lr, limit, B0) for B0 in (32, 512)}}
    print(f"{label}: threshold {np.round(lr, 4)}, level {np.round(lr / limit, 2)}, transfer "
          f"B0=32 {np.round(row['transfer_B32'], 2)}, B0=512 {np.round(row['transfer_B512'], 2)}",
          flush=True)
    return row


def softness(rows):
    """d log α / d log k between the smallest and the largest k of FACTORS."""
    lo, hi = rows[f"k{FACTORS[0]:g}"]["lr"], rows[f"k{FACTORS[-1]:g}"]["lr"]
    return np.log(hi / lo) / np.log(FACTORS[-1] / FACTORS[0])


def network(name):
    """(model, (X, y), loss_fn) of the SGD studies: the digits MLP ("mlp") or CNN ("cnn")
    with cross-entropy, the MSE-loss MLP ("mse"), or the held-out ReLU MLP 64-64-32 of
    seed 1 ("mlp_relu", cross-entropy; no SGD form was developed on it)."""
    import torch.nn.functional as F
    from bench_lr_transfer import trained_cnn

    from nets.training.loops import trained_digits_mlp

    if name == "mse":
        return trained_mse_mlp(0)
    if name == "mlp_relu":
        model, data = trained_digits_mlp(seed=1, hidden=(64, 32), activation="relu")
    else:
        model, data = trained_digits_mlp(0) if name == "mlp" else trained_cnn(0)
    return model, data, F.cross_entropy


STUDY_FILES = {"mse": "bench_lr_transfer_mse.json", "mlp_relu": "bench_lr_transfer_relu.json"}


def study(name):
    """The stored `bench_lr_transfer.py` study (measured thresholds, transfer ratios) of
    the network `network(name)`: results/bench_lr_transfer.json for "mlp" and "cnn",
    bench_lr_transfer_mse.json and bench_lr_transfer_relu.json for the other two."""
    path = RESULTS / STUDY_FILES.get(name, "bench_lr_transfer.json")
    return json.loads(path.read_text())["nets"][name]["study"]


def real_thresholds(name, store, seeds=SEEDS, momenta=MOMENTA):
    from nets.learning_rates.lr_search import training_threshold

    model, data, loss = network(name)
    ref = study(name)
    out = {}
    for m in momenta:
        key = f"m{m:g}"
        anchor = np.asarray(ref[f"measured_{key}"], float)      # bisection start: k = 10
        limit = np.asarray(ref[f"local_limit_{key}"], float)
        res = {"local_limit": limit}

        def measure(k, m=m, anchor=anchor):
            return training_threshold(model, loss, data, BATCH_SIZES, momentum=m, factor=k,
                                      seeds=seeds, steps=STEPS, store=store, progress=False,
                                      lr0=lambda B: float(anchor[BATCH_SIZES.index(B)]))

        for k in FACTORS:
            thr = measure(k)
            res[f"k{k:g}"] = summary(f"{name} m={m:g} k={k:g}", thr.lr, limit,
                                     stderr=thr.stderr, per_seed=thr.per_seed)
        res["softness"] = softness(res)
        if name == "mlp":
            thr = measure(EXTREME)
            res["extreme"] = {"factor": EXTREME, "lr": thr.lr}
            print(f"{name} m={m:g} k={EXTREME:g}: threshold {np.round(thr.lr, 1)}", flush=True)
        out[key] = res
    return out


def adam_thresholds(name):
    from bench_adam import _loss, _model

    from nets.learning_rates.adam import adam_threshold

    model, data = _model(name)
    loss = _loss(name)
    ref = json.loads((RESULTS / f"bench_adam_{name}.json").read_text())["runs"]["beta1=0.9"]
    pred, anchor = np.asarray(ref["predicted"], float), np.asarray(ref["measured"], float)
    out = {"predicted_mean_square": pred}
    for k in FACTORS:
        thr = adam_threshold(model, loss, data, BATCH_SIZES, betas=(0.9, 0.999), warmup_steps=500,
                             warmup_lr=1e-4, steps=100, seeds=SEEDS, criterion="divergence",
                             factor=k, lr0=lambda B, a=anchor: float(a[BATCH_SIZES.index(B)]))
        out[f"k{k:g}"] = summary(f"adam {name} k={k:g}", thr.lr, pred, per_seed=thr.per_seed)
    out["softness"] = softness(out)
    return out


AFTER_RUNS = ((8, 0.0, (0.5, 1.0, 1.8)), (32, 0.0, (3.0, 4.5)), (8, 0.9, (0.15, 0.3)))


def after_runs(model, X, y, R):
    """Local mean-square margin α·λ'_m(B)/(2(1+m)) of the checkpoint and of the end point
    of 200 real SGD steps at each (B, m, lr) of AFTER_RUNS, with the loss ratio and the
    typical-path growth rate per step of the full linear model at lr (R: the checkpoint's
    per-sample Gauss–Newton factors)."""
    from collections import deque

    import torch.nn.functional as F

    from nets.curvature.chunk_shares import full_data_loss
    from nets.noise.batch_spectra import predict_batch_top_eigenvalue
    from paper_checks.checks.sgd_scaling_mlp import ggn_factors
    from rmt.lr import momentum_noise_gain

    def curvature(net, B):
        p = predict_batch_top_eigenvalue(net, F.cross_entropy, (X, y), [B], form="directional",
                                         seed=0)
        return float(p["lam"]), float(p["directional"][0])

    def margin(lam, lp, R_net, B, m, lr):
        growth = float(growth_rates(R_net, B, m, [lr], 400, 0)[0])
        return lam, lp, lr * (lam + momentum_noise_gain(m) * (lp - lam)) / (2 * (1 + m)), growth

    L0 = full_data_loss(model, F.cross_entropy, X, y, 4096)
    at_start = {B: curvature(model, B) for B in {B for B, _, _ in AFTER_RUNS}}
    rows = []
    for B, m, lrs in AFTER_RUNS:
        for lr in lrs:
            before = margin(*at_start[B], R, B, m, lr)
            _, net, _ = deque(sgd_run(model, X, y, lr, B, m, 0, STEPS), maxlen=1)[0]
            after = margin(*curvature(net, B), ggn_factors(net, X), B, m, lr)
            row = {"batch_size": B, "momentum": m, "lr": lr, "lam": [before[0], after[0]],
                   "batch_curvature": [before[1], after[1]], "margin": [before[2], after[2]],
                   "linear_growth_rate": [before[3], after[3]],
                   "loss_over_start": full_data_loss(net, F.cross_entropy, X, y, 4096) / L0}
            rows.append(row)
            print(f"after 200 steps, B={B} m={m:g} lr={lr:g}: λ₁ {before[0]:.3g} → "
                  f"{after[0]:.3g}, λ'(B) {before[1]:.3g} → {after[1]:.3g}, margin "
                  f"{before[2]:.2f} → {after[2]:.2f}, linear growth/step {before[3]:.3g} → "
                  f"{after[3]:.3g}, loss {row['loss_over_start']:.2f}× start",
                  flush=True)
    return rows


def quadratic_model_thresholds(model, X, y, R, net="mlp"):
    """Thresholds of a network's per-sample quadratic model (module docstring, 2) per k:
    {"m0": {"k3": (n_B, n_seeds), ...}, "m0.9": ...}, on a grid of 32 lrs from 0.3× to 5×
    the full linear model's typical-path threshold stored by `bench_momentum_linear.py
    --net net` (`output_name(net)`)."""
    import torch
    import torch.nn.functional as F
    from bench_momentum_linear import output_name

    from nets.noise.gradient_noise import per_sample_gradients

    Gi = per_sample_gradients(model, F.cross_entropy, (X, y)).to(R.dtype)
    with torch.no_grad():
        L0 = float(F.cross_entropy(model.eval()(X), y))
    lin = json.loads((RESULTS / f"{output_name(net)}.json").read_text())["linear_as"]
    out = {}
    for m in MOMENTA:
        key, rows = f"m{m:g}", {f"k{k:g}": [] for k in FACTORS}
        for i, B in enumerate(BATCH_SIZES):
            centre = float(np.mean(lin[key][i]))
            grid = np.geomspace(0.3 * centre, 5.0 * centre, 32)
            worst = [surrogate_max_loss(R, Gi, L0, B, m, grid, STEPS, s) for s in SURROGATE_SEEDS]
            for k in FACTORS:
                rows[f"k{k:g}"].append([first_crossing(grid, w, k) for w in worst])
        out[key] = {k: np.asarray(v) for k, v in rows.items()}
        print(f"quadratic model m={m:g}: " + "; ".join(
            f"{k} {np.round(np.nanmean(v, 1), 4)}" for k, v in out[key].items()), flush=True)
    return out


def main(argv=None):
    from nets.utils.jsonl_store import JsonlStore

    p = base_parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--nets", default="mlp,mse", help="comma-separated: mlp, cnn, mse")
    p.add_argument("--seeds", type=int, default=len(SEEDS))
    p.add_argument("--momenta", default="0,0.9")
    p.add_argument("--adam-nets", default="mlp,mse", help="comma-separated, or '' to skip")
    p.add_argument("--skip-surrogate", action="store_true",
                   help="skip the MLP's quadratic model and the after-run margins (2, 4)")
    p.add_argument("--adam-only", action="store_true",
                   help="re-measure only the Adam rows (3) and replace them in the stored JSON")
    args, model, X, y, R = network_factors(__doc__.splitlines()[0], argv, parser=p)
    if args.adam_only:
        path = RESULTS / "bench_criterion.json"
        out = json.loads(path.read_text())
        out["adam"] = {name: adam_thresholds(name) for name in filter(None, args.adam_nets.split(","))}
        out["adam_environment"] = environment()
        print("wrote", write_json("bench_criterion", out, args.out))
        return
    store = JsonlStore(RESULTS / "criterion_store.jsonl")
    out = {"environment": environment(), "batch_sizes": list(BATCH_SIZES), "factors": list(FACTORS),
           "seeds": list(range(args.seeds)), "steps": STEPS, "real": {}, "surrogate": {},
           "adam": {}}
    for name in args.nets.split(","):
        out["real"][name] = real_thresholds(name, store, tuple(range(args.seeds)),
                                            tuple(float(m) for m in args.momenta.split(",")))
    for name in filter(None, args.adam_nets.split(",")):
        out["adam"][name] = adam_thresholds(name)
    if not args.skip_surrogate:
        out["after_runs"] = after_runs(model, X, y, R)
        out["surrogate"] = quadratic_model_thresholds(model, X, y, R)
    print("wrote", write_json("bench_criterion", out, args.out))


if __name__ == "__main__":
    main()
