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

    python benchmarks/bench_linearized.py            # MLP, CNN, MSE MLP: ~40 min on two cores
"""

from __future__ import annotations

import json

import numpy as np
from _common import RESULTS, base_parser, environment, setup_torch, trained_mse_mlp, write_json
from bench_criterion import BATCH_SIZES, FACTORS, MOMENTA, SEEDS, STEPS

# real thresholds of bench_criterion (file, momenta measured there)
REAL = {"mlp": ("bench_criterion.json", MOMENTA), "cnn": ("bench_criterion_cnn.json", (0.0,)),
        "mse": ("bench_criterion.json", MOMENTA)}


def network(name):
    import torch.nn.functional as F
    from bench_lr_transfer import trained_cnn

    from nets.training.loops import trained_digits_mlp

    if name == "mse":
        model, data, loss = trained_mse_mlp(0)
        return model, data, loss
    model, data = trained_digits_mlp(0) if name == "mlp" else trained_cnn(0)
    return model, data, F.cross_entropy


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


def main(argv=None):
    from nets.learning_rates.linearized import linearized_threshold

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--nets", default="mlp,cnn,mse")
    p.add_argument("--seeds", type=int, default=len(SEEDS))
    args = p.parse_args(argv)
    setup_torch(args)
    out = {"environment": environment(), "batch_sizes": list(BATCH_SIZES), "factors": list(FACTORS),
           "seeds": list(range(args.seeds)), "steps": STEPS, "nets": {}}
    for name in args.nets.split(","):
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
