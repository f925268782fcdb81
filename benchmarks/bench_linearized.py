"""Is the soft threshold the cross-entropy's own saturation? The linearised network under the real protocol.

`bench_criterion.py` found that on the cross-entropy MLP the real divergence threshold at
small B is a loss tolerance (it moves 5.8× between k = 3 and k = 100 at B = 8) while the
network's per-sample quadratic model is sharp. The quadratic model drops two different
nonlinearities at once:

* the **loss's**: the cross-entropy of the logits, ℓ(z) = logsumexp(z) − z_y, has a
  bounded gradient (‖p − e_y‖ ≤ √2) and a curvature diag(p) − ppᵀ that vanishes as the
  softmax saturates, so along a growing oscillation its secant curvature falls like
  1/amplitude and the loss grows linearly in the logits, not quadratically;
* the **network's**: the Jacobian J_i = ∂z_i/∂w itself changes with the weights.

This script separates them. The linearised network keeps the first and drops the
second: every sample's logits are z_i(w₀ + e) = z_i(w₀) + J_i e (J_i its Jacobian at the
checkpoint, all 2,410 directions), its loss the exact cross-entropy of those logits. Its
per-sample Hessian at e = 0 is J_iᵀ(diag p_i − p_i p_iᵀ)J_i, the Gauss–Newton matrix,
so its second-order expansion is exactly the quadratic model of `bench_criterion.py`.
Heavy ball on it with the real protocol: the same seeded batches as the real trials of
seed s (`torch.randperm(N, generator=Generator().manual_seed(s))[:B]` at every step),
200 steps from e = 0 with a zero buffer, the full-data loss after every step, unstable
iff it ever exceeds k× its start; 48 learning rates side by side per (B, m, seed), the
threshold of each k the geometric midpoint of the first grid step whose running maximum
exceeds k (as for the quadratic model). Reported against the real thresholds of
`bench_criterion.json` (same seeds, same k): if real ÷ linearised ≈ 1 at every k while
real ÷ quadratic is not, the softness is the loss's saturation and a model that keeps
the cross-entropy of linearised logits predicts it; if not, the network's nonlinearity
matters.

The thresholds come from `nets.learning_rates.linearized.linearized_threshold` with its
default grid (coarse 10⁻³…10²/λ₁, then 48 points between the brackets of k = 3 and 100:
no real threshold is used to place it), k = 10 with k = 3 and 100 read from the same
runs. Networks: the digits MLP (where the question was asked), the digits CNN (not used
to develop it: the held-out case) and the MSE-loss MLP (a quadratic loss: there the
linearised network is the quadratic model, and the real threshold is sharp).

Adam (`--adam-nets mlp,mse`): the same question for Adam β = (0.9, 0.999), ε = 1e-8,
with the real protocol of `nets.learning_rates.adam.adam_threshold` (warm-up of 500 real
steps at 1e-4 with batches of B from seed s, then 100 steps at α with the batches of
seed s + 7919): the linearisation is taken at each warmed model, Adam runs on it from the
warmed (exp_avg, exp_avg_sq, step), against the re-measured real Adam thresholds of
`bench_criterion.json` at k = 3, 10, 100.

    python benchmarks/bench_linearized.py            # MLP, CNN, MSE MLP: ~40 min on two cores
    python benchmarks/bench_linearized.py --nets '' --adam-nets mlp,mse    # ~10 min
"""

from __future__ import annotations

import json

import numpy as np
from _common import RESULTS, base_parser, environment, setup_torch, write_json
from bench_criterion import BATCH_SIZES, FACTORS, MOMENTA, SEEDS, STEPS, network

# real thresholds of bench_criterion (file, momenta measured there)
REAL = {"mlp": ("bench_criterion.json", MOMENTA), "cnn": ("bench_criterion_cnn.json", (0.0,)),
        "mse": ("bench_criterion.json", MOMENTA)}


def compare(name, m, thr, real, quadratic=None):
    """Real ÷ linearised (and ÷ the quadratic model's, where given) per k and both
    softnesses, printed and returned."""
    key = f"m{m:g}"
    row = {"lam": thr.lam}
    lin = {}
    for k in FACTORS:
        per = thr.at(k)
        lin[k] = np.nanmean(per, 1)
        r = np.asarray(real[key][f"k{k:g}"]["lr"], float)
        row[f"k{k:g}"] = {"lr": lin[k], "per_seed": per, "real": r, "real_over_linearized": r / lin[k]}
        if quadratic is not None:
            q = np.nanmean(np.asarray(quadratic[key][f"k{k:g}"], float), 1)
            row[f"k{k:g}"]["real_over_quadratic"] = r / q
        for B0 in (32, 512):                 # the linearised shape as a transfer rule
            i0 = BATCH_SIZES.index(B0)
            row[f"k{k:g}"][f"transfer_B{B0}"] = r[i0] * lin[k] / lin[k][i0] / r
        print(f"{name} m={m:g} k={k:g}: linearised {np.round(lin[k], 4)}, real {np.round(r, 4)}, "
              f"real ÷ linearised {np.round(r / lin[k], 2)}, transfer B0=32 "
              f"{np.round(row[f'k{k:g}']['transfer_B32'], 2)}, B0=512 "
              f"{np.round(row[f'k{k:g}']['transfer_B512'], 2)}", flush=True)
    span = np.log(FACTORS[-1] / FACTORS[0])
    row["softness"] = np.log(lin[FACTORS[-1]] / lin[FACTORS[0]]) / span
    row["real_softness"] = np.asarray(real[key]["softness"], float)
    print(f"{name} m={m:g} softness: linearised {np.round(row['softness'], 2)}, real "
          f"{np.round(row['real_softness'], 2)}", flush=True)
    return row


def adam_rows(name, seeds):
    """Linearised-Adam thresholds per k (n_B, n_seeds) at the warmed states, with the
    real ones of bench_criterion.json (module docstring)."""
    from nets.learning_rates.adam import restored_adam, warm_adam_state
    from nets.learning_rates.linearized import (
        first_crossing,
        flat_adam_state,
        linearized_adam_max_loss,
        output_jacobians,
        refined_runs,
    )

    model, (X, y), loss = network(name)
    betas, coarse = (0.9, 0.999), np.geomspace(1e-4, 10.0, 31)
    per = {f"k{k:g}": np.full((len(BATCH_SIZES), len(seeds)), np.nan) for k in FACTORS}
    for i, B in enumerate(BATCH_SIZES):
        for j, s in enumerate(seeds):
            warm = warm_adam_state(model, loss, X, y, B, warmup_steps=500, warmup_lr=1e-4,
                                   betas=betas, seed=s)
            state = flat_adam_state(restored_adam(warm.model, warm, 1e-4))
            J, z0 = output_jacobians(warm.model, X)

            def run(grid, J=J, z0=z0, state=state, B=B, s=s):
                return linearized_adam_max_loss(J, z0, y, loss, B, grid, 100, s + 7919,
                                                state=state, betas=betas)

            grid, (worst,) = refined_runs([run], coarse, FACTORS, 48)
            for k in FACTORS:
                per[f"k{k:g}"][i, j] = first_crossing(grid, worst, k)
    real = json.loads((RESULTS / "bench_criterion.json").read_text())["adam"][name]
    row = {}
    for k in FACTORS:
        kk = f"k{k:g}"
        lin = np.nanmean(per[kk], 1)
        r = np.asarray(real[kk]["lr"], float)
        row[kk] = {"lr": lin, "per_seed": per[kk], "real": r, "real_over_linearized": r / lin}
        print(f"adam {name} k={k:g}: linearised {np.round(lin, 4)}, real {np.round(r, 4)}, "
              f"real ÷ linearised {np.round(r / lin, 2)}", flush=True)
    span = np.log(FACTORS[-1] / FACTORS[0])
    row["softness"] = np.log(row[f"k{FACTORS[-1]:g}"]["lr"] / row[f"k{FACTORS[0]:g}"]["lr"]) / span
    row["real_softness"] = np.asarray(real["softness"], float)
    print(f"adam {name} softness: linearised {np.round(row['softness'], 2)}, real "
          f"{np.round(row['real_softness'], 2)}", flush=True)
    return row


def main(argv=None):
    from nets.learning_rates.linearized import linearized_threshold

    p = base_parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--nets", default="mlp,cnn,mse")
    p.add_argument("--seeds", type=int, default=len(SEEDS))
    p.add_argument("--adam-nets", default="", help="comma-separated (mlp, cnn, mse) or ''")
    args = p.parse_args(argv)
    setup_torch(args)
    out = {"environment": environment(), "batch_sizes": list(BATCH_SIZES), "factors": list(FACTORS),
           "seeds": list(range(args.seeds)), "steps": STEPS, "nets": {}}
    path = RESULTS / "bench_linearized.json"
    if args.out is None and path.exists():           # keep the parts this call does not redo
        stored = json.loads(path.read_text())
        out["nets"], out["adam"] = stored.get("nets", {}), stored.get("adam", {})
    out.setdefault("adam", {})
    for name in filter(None, args.adam_nets.split(",")):
        out["adam"][name] = adam_rows(name, tuple(range(args.seeds)))
        write_json("bench_linearized", out, args.out)
    for name in filter(None, args.nets.split(",")):
        fname, momenta = REAL[name]
        stored = json.loads((RESULTS / fname).read_text())
        real, quad = stored["real"][name], stored["surrogate"] if name == "mlp" else None
        model, data, loss = network(name)
        out["nets"][name] = {}
        for m in momenta:
            thr = linearized_threshold(model, loss, data, BATCH_SIZES, momentum=m, factor=10.0,
                                       extra_factors=(FACTORS[0], FACTORS[-1]), steps=STEPS,
                                       seeds=tuple(range(args.seeds)), progress=False)
            out["nets"][name][f"m{m:g}"] = compare(name, m, thr, real, quad)
        write_json("bench_linearized", out, args.out)
    print("wrote", write_json("bench_linearized", out, args.out))


if __name__ == "__main__":
    main()
