"""Is the momentum gap linear or nonlinear? The digits MLP's full linear model against real training.

`transfer_lr`'s mean-square form misses real heavy-ball SGD (m = 0.9) on the digits MLP:
the real divergence threshold sits 1.4–2.6× above the local limit and the excess grows
with B, while at m = 0 it is a constant 1.1–1.2. This script separates the two possible
causes.

1. **Linear model, full matrix, typical path.** Heavy ball e ← e − α·v,
   v ← m·v + G_B e on the network's own per-sample Gauss–Newton curvature
   (G_i = R_iᵀR_i, all P directions, `paper_checks.checks.sgd_scaling_mlp.ggn_factors`),
   fresh batches without replacement, 24 learning rates side by side on common batches;
   the almost-sure (Lyapunov) threshold is where the growth rate of ‖(e, v)‖ over the
   second half of the run crosses 3/T (`paper_checks.checks._quadratic_runs`). If this
   sat at the real threshold, the mean-square criterion or the one-direction reduction
   would be the culprit.
2. **What real runs do.** From the checkpoint, SGD at 0.9× the measured real threshold
   (and, at B = 512, at the linear model's threshold) for 200 steps: λ₁, ‖w − w₀‖ and the
   full-data loss relative to its start after 5…200 steps.

The measured real thresholds are read from benchmarks/results/bench_lr_transfer.json
(bench_lr_transfer_relu.json for the ReLU MLP).

    python benchmarks/bench_momentum_linear.py          # ~10 min on one core
    python benchmarks/bench_momentum_linear.py --net mlp_relu --threads 2   # part 1 only

`--net cnn` / `--net mlp_relu` run part 1 (the linear model's threshold) on the digits
CNN or the held-out ReLU MLP 64-64-32 (P = 6,570) of `bench_lr_transfer.py`, against
their measured thresholds, into bench_momentum_linear_<net>.json; part 2 is the MLP's.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from _common import base_parser, environment, setup_torch, write_json

BATCH_SIZES = (8, 32, 128, 512)
MOMENTA = (0.0, 0.9)
SEEDS = (0, 1)
CHECKPOINTS = (5, 10, 25, 50, 100, 200)


def batch_ggn_times(RB, E):
    """(1/B)·Σ_{i∈batch} R_iᵀR_i·E for batch factors RB (B, K, P) and columns E (P, c)."""
    return torch.einsum("bkp,bkc->pc", RB, torch.einsum("bkp,pc->bkc", RB, E)) / len(RB)


def growth_rates(R, B, m, grid, steps, seed):
    """Growth rate per step of ‖(e, v)‖ over the second half, one column per lr."""
    N, _, P = R.shape
    g = torch.Generator().manual_seed(seed)
    a = torch.tensor(grid, dtype=R.dtype)
    E = torch.randn(P, len(grid), generator=g, dtype=R.dtype)
    E /= E.norm(dim=0)
    V = torch.zeros_like(E)
    log_norm = torch.zeros(len(grid), dtype=torch.float64)
    half, at_half = steps // 2, None
    for t in range(steps):
        V = m * V + batch_ggn_times(R[torch.randperm(N, generator=g)[:B]], E)
        E = E - a * V
        n = torch.sqrt((E ** 2).sum(0) + (V ** 2).sum(0))
        bad = ~torch.isfinite(n) | (n == 0)
        n = torch.where(bad, torch.ones_like(n), n)
        log_norm += torch.log(n).double() + torch.where(bad, float("inf"), 0.0).double()
        E, V = E / n, V / n
        if bad.any():                  # a diverged column: restart it to keep going
            E[:, bad] = torch.randn(P, int(bad.sum()), generator=g, dtype=R.dtype)
            V[:, bad] = 0.0
        if t + 1 == half:
            at_half = log_norm.clone()
    return torch.nan_to_num((log_norm - at_half) / (steps - half), nan=float("inf")).numpy()


def top_and_directional_noise(R):
    """λ₁ of G = (1/N)Σ R_iᵀR_i and s_u² = (1/(N−1))Σ‖(G_i − G)u‖² along its top
    eigenvector u, densely in float64 from per-sample factors R (N, K, P)."""
    Rd = R.double()
    ev, EV = torch.linalg.eigh(torch.einsum("nkp,nkq->pq", Rd, Rd) / len(Rd))
    u = EV[:, -1]
    Gu = torch.einsum("nkp,nk->np", Rd, torch.einsum("nkp,p->nk", Rd, u))
    return float(ev[-1]), float(((Gu - Gu.mean(0)) ** 2).sum() / (len(Rd) - 1))


def sgd_run(model, X, y, lr, B, m, seed, steps):
    """Real heavy-ball SGD on the cross-entropy of a deep copy of `model` (eval mode),
    fresh batches of B drawn with a generator seeded by `seed`: yields (t, net, params)
    at t = 0 (before any step) and after each of the `steps` steps."""
    from nets.learning_rates.lr_search import _flat_params, _sgd_step

    net = copy.deepcopy(model).eval()
    params = _flat_params(net)
    bufs = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(seed)
    yield 0, net, params
    for t in range(1, steps + 1):
        _sgd_step(net, params, bufs, torch.nn.functional.cross_entropy, X, y, B, gen, lr, m)
        yield t, net, params


def trajectory(model, X, y, lr, B, m, seed):
    from nets.algorithms.spectra import top_eigenvalues
    from nets.curvature.chunk_shares import full_data_loss

    F = torch.nn.functional.cross_entropy
    rows = []
    for t, net, params in sgd_run(model, X, y, lr, B, m, seed, max(CHECKPOINTS)):
        w = torch.cat([p.detach().reshape(-1) for p in params])
        if t == 0:
            w0, L0 = w.clone(), full_data_loss(net, F, X, y, 4096)
        elif t in CHECKPOINTS:
            lam = float(top_eigenvalues(net, F, (X, y), k=1, seed=0, policy="eval")[0])
            rows.append({"step": t, "lam1": lam, "displacement": float((w - w0).norm()),
                         "loss_over_start": full_data_loss(net, F, X, y, 4096) / L0})
    return rows


def network_factors(description, argv, parser=None):
    """Parse the benchmark's options (`parser`, default the base parser), set torch up, and
    return them with the network of `bench_criterion.network` named by the option --net
    (the digits MLP when the parser has no such option), its data and its per-sample
    Gauss–Newton factors R (N, K, P) float32."""
    from bench_criterion import network

    from paper_checks.checks.sgd_scaling_mlp import ggn_factors

    args = (parser or base_parser(description, quick=False)).parse_args(argv)
    setup_torch(args)
    model, (X, y), _ = network(getattr(args, "net", "mlp"))
    return args, model, X, y, ggn_factors(model, X)


def output_name(net):
    """The results file (without .json) of `--net net`: bench_momentum_linear for the MLP,
    bench_momentum_linear_<net> otherwise."""
    return "bench_momentum_linear" if net == "mlp" else f"bench_momentum_linear_{net}"


def main(argv=None):
    from bench_criterion import study, transfer_ratios

    from paper_checks.checks._quadratic_runs import GROWTH_TOL, steps_for, threshold_from_grid
    from rmt.lr import sgd_momentum_ms_max_lr

    p = base_parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--net", choices=("mlp", "cnn", "mlp_relu"), default="mlp")
    args, model, X, y, R = network_factors(__doc__.splitlines()[0], argv, parser=p)
    net = args.net
    st = study(net)
    N, K, P = R.shape
    lam, s2 = top_and_directional_noise(R)
    measured = {m: np.asarray(st[f"measured_m{m:g}"], float) for m in MOMENTA}
    out = {"environment": environment(), "net": net, "batch_sizes": list(BATCH_SIZES), "seeds": list(SEEDS),
           "ggn_lam": lam, "ggn_s2": s2, "N": N, "P": P, "measured": measured,
           "mean_square": {}, "linear_as": {}, "trajectories": {}}
    for m in MOMENTA:
        ms = np.array([float(sgd_momentum_ms_max_lr(B, lam, s2, N, m)) for B in BATCH_SIZES])
        lin = []
        for B, a_ms in zip(BATCH_SIZES, ms):
            grid = np.geomspace(0.3 * a_ms, (8.0 if m else 3.0) * a_ms, 24)
            steps = max(steps_for(B, P, K), 400)
            lin.append([threshold_from_grid(grid, growth_rates(R, B, m, grid, steps, s),
                                            GROWTH_TOL / steps) for s in SEEDS])
        lin = np.asarray(lin)
        out["mean_square"][f"m{m:g}"], out["linear_as"][f"m{m:g}"] = ms, lin
        shape = lin.mean(1)
        for B0 in (32, 512):                      # the linear threshold's B-shape, anchored
            tr = transfer_ratios(measured[m], shape, B0)
            out.setdefault("transfer", {})[f"m{m:g}_B{B0}"] = tr
            print(f"m={m:g}: linear-model shape anchored at B0={B0}, ÷ real: {np.round(tr, 2)}")
        print(f"m={m:g}: directional mean-square {np.round(ms, 4)}; linear model a.s. "
              f"{np.round(shape, 4)} (= {np.round(shape / ms, 2)} × mean-square); "
              f"real {np.round(measured[m], 4)} (= {np.round(measured[m] / shape, 2)} × "
              "linear)", flush=True)
    runs = []                             # part 2 (real trajectories): the MLP's only
    if net == "mlp":
        runs = [(m, B, 0.9 * float(measured[m][i]), "0.9x_measured")
                for m in MOMENTA for i, B in enumerate(BATCH_SIZES)]
        runs.append((0.9, 512, float(np.mean(out["linear_as"]["m0.9"][-1])), "linear_threshold"))
    for m, B, lr, tag in runs:
        rows = trajectory(model, X, y, lr, B, m, SEEDS[0])
        out["trajectories"][f"m{m:g}_B{B}_{tag}"] = {"lr": lr, "rows": rows}
        print(f"m={m:g} B={B} lr={lr:.4g} ({tag}): " + "; ".join(
            f"t={r['step']} λ₁={r['lam1']:.3g} ‖Δw‖={r['displacement']:.3g} "
            f"L/L₀={r['loss_over_start']:.2f}" for r in rows), flush=True)
    print("wrote", write_json(output_name(net), out, args.out))


if __name__ == "__main__":
    main()
