"""Why heavy-ball SGD (m = 0.9) at large B fails below its linearised network: the weights sharpen on the way.

At m = 0 the r = 200 linearised network, corrected along u, carries the real divergence
threshold across B within ~15 % (`bench_heldout_transfer.py`); with m = 0.9 the real
threshold at B = 512 is 0.53–0.86× the linearised one on four networks, although the
local heavy-ball limit α·λ₁ < 2(1+m) is nowhere near crossed at the checkpoint. This
script follows real runs from the checkpoint and reads λ₁, the full-data loss and
‖w_t − w₀‖ every 10 steps (`nets.lr_search.self_stabilisation(every=10)`), at 0.8× and
1.2× the measured threshold (B = 512, m = 0.9, and m = 0 at 1.2× its own threshold for
comparison; seed 0), on the two held-out MLPs of `bench_heldout_transfer.py`.

Two further parts say where the sharpening comes from:

* ``--part full_batch``: the same real-vs-linearised comparison without batch noise.
  At B = N every step is the full-data gradient, so the runs are deterministic; the real
  divergence threshold (`training_threshold`, one seed: the batch order is immaterial)
  and the r = 200 linearised one (`linearized_threshold`) at m = 0 and 0.9, on the two
  held-out and the two development MLPs. If the momentum miss at B = 512 were the
  network's deterministic nonlinearity under heavy ball, it would be there at B = N too.
* ``--part drift``: how far batch noise alone carries the weights. With a constant
  full-data gradient and batch noise ξ_k of covariance c(B, N)·Σ (Σ the per-sample
  gradient covariance, c = 1/B − 1/N), heavy ball (torch convention) moves the weights
  after t steps by a noise part of mean square

      E‖Δw_t‖²_noise = α²·c(B, N)·tr Σ · Σ_{j=1..t} ((1 − m^j)/(1 − m))²

  (each ξ_k enters with weight α·(1 − m^{t−k+1})/(1 − m)). Compared with ‖w₁₀ − w₀‖ of
  the traced runs above (tr Σ from `nets.gradient_noise`).

* ``--part curvature``: does the drift sharpen the network beyond its linearisation? At the
  measured B = 512 threshold α of each net (m = 0.9, and m = 0 on the GELU net), random
  displacements δ with the heavy-ball noise-drift covariance after t = 5 and 10 steps,
  α²·c(B, N)·Σ·Σ_j((1 − m^j)/(1 − m))² (sampled as a Gaussian combination of the
  centred per-sample gradients), alone ("noise") and plus the constant-gradient drift
  −α·Σ_j(1 − m^j)/(1 − m)·ḡ ("noise+gradient"); at w₀ + δ the top Hessian eigenvalue of
  the real network and of the linearised one (Jᵀ∇²ℓ(z + Jδ)J with the checkpoint's J:
  what the linearised network sees there), three samples each. The ratio real ÷
  linearised says how much of the drift's sharpening the linearised network misses.

* ``--part path``: the real run and the linearised network (all P directions) on the same
  batches from w₀, B = 512, just below and above the measured threshold (m = 0.9 on the
  GELU, tanh and development MLPs and the CNN; m = 0 on the GELU net): the full-data loss
  of both every step, where the two paths part, and the top eigenvalue of the real
  Hessian at w_t and of the linearised Gauss–Newton matrix at e_t, against the heavy-ball
  edge 2(1 + m)/α, three seeds. Here the sharpening is read along the run's own path.

    python benchmarks/bench_momentum_sharpening.py                     # ~3 min, one thread
    python benchmarks/bench_momentum_sharpening.py --part full_batch   # ~5 min
    python benchmarks/bench_momentum_sharpening.py --part drift        # seconds (reads the first)
    python benchmarks/bench_momentum_sharpening.py --part curvature    # ~15 min
    python benchmarks/bench_momentum_sharpening.py --part path         # ~5 min
"""

from __future__ import annotations

import copy
import json

import numpy as np
from _common import RESULTS, base_parser, environment, setup_torch, write_json
from bench_heldout_transfer import HELD_OUT, held_out_network, output_name

B = 512
CASES = ((0.9, 0.8), (0.9, 1.2), (0.0, 1.2))       # (momentum, × measured threshold)


def follow(name):
    import torch.nn.functional as F

    from nets import top_eigenvalues
    from nets.learning_rates.lr_search import self_stabilisation

    model, data = held_out_network(name)
    lam = float(top_eigenvalues(model, F.cross_entropy, data, k=1, seed=0, policy="eval")[0])
    rows = []
    for m, mult in CASES:
        stored = json.loads((RESULTS / f"{output_name(name, m)}.json").read_text())
        threshold = float(stored["real"][stored["batch_sizes"].index(B)])
        lr = mult * threshold
        st = self_stabilisation(model, F.cross_entropy, data, factor=lr * lam, batch_size=B,
                                steps=200, momentum=m, seed=0, every=10)
        edge = 2 * (1 + m) / lr
        first = st.trace_lam[:4]                                   # steps 0 … 30
        print(f"{name} m={m:g} lr={lr:.3g} ({mult:g}× threshold): λ₁·α/(2(1+m)) at start "
              f"{st.trace_lam[0] / edge:.2f}, largest in steps ≤ 30 {np.nanmax(first) / edge:.2f}; "
              f"loss/start max {np.nanmax(st.trace_loss_ratio):.3g}, last "
              f"{st.trace_loss_ratio[-1]:.3g}; ‖Δw‖ at step 10, 20: "
              f"{np.round(st.trace_distance[1:3], 1)}", flush=True)
        rows.append({"momentum": m, "multiple": mult, "threshold": threshold, "lr": lr,
                     "edge_lam": edge, **st.to_dict()})
    return {"lam": lam, "runs": rows}


FULL_BATCH_NETS = ("gelu", "tanh64", "mlp", "mlp_relu")


def _net(name):
    import torch.nn.functional as F

    if name in HELD_OUT:
        return (*held_out_network(name), F.cross_entropy)
    from bench_criterion import network
    return network(name)


def _threshold_512(name, m):
    """The measured B = 512 threshold (8 seeds) of `name` at momentum m."""
    if name in HELD_OUT:
        r = json.loads((RESULTS / f"{output_name(name, m)}.json").read_text())
        return float(r["real"][r["batch_sizes"].index(B)])
    from bench_criterion import BATCH_SIZES, study
    return float(study(name)[f"measured_m{m:g}"][list(BATCH_SIZES).index(B)])


def _stored_ratio_512(name, m):
    """real ÷ linearised (r = 200) at B = 512 from the stored results (NaN if absent)."""
    if name in HELD_OUT:
        path = RESULTS / f"{output_name(name, m)}.json"
        if not path.exists():
            return float("nan")
        r = json.loads(path.read_text())
        i = r["batch_sizes"].index(B)
        return float(r["real"][i] / r["linearized"][i])
    from bench_criterion import BATCH_SIZES
    lin = json.loads((RESULTS / f"bench_linearized_rank_{name}.json").read_text())
    if f"m{m:g}" not in lin:
        return float("nan")
    lin = lin[f"m{m:g}"]["ranks"]["r200"]["lr"]
    return _threshold_512(name, m) / float(lin[list(BATCH_SIZES).index(B)])


def full_batch():
    """Real and linearised (r = 200) divergence thresholds at B = N, m = 0 and 0.9."""
    from nets.learning_rates.linearized import linearized_threshold
    from nets.learning_rates.lr_search import training_threshold

    out = {}
    for name in FULL_BATCH_NETS:
        model, data, loss = _net(name)
        N = len(data[0])
        for m in (0.0, 0.9):
            lin = linearized_threshold(model, loss, data, [N], momentum=m, factor=10.0, steps=200,
                                       seeds=(0,), rank=200, progress=False)
            real = training_threshold(model, loss, data, [N], momentum=m, steps=200, seeds=(0,),
                                      factor=10.0, progress=False, lr0=float(lin.lr[0]))
            row = {"N": N, "momentum": m, "real": float(real.lr[0]), "linearized": float(lin.lr[0]),
                   "ratio": float(real.lr[0] / lin.lr[0]),
                   "ratio_B512": _stored_ratio_512(name, m)}
            out[f"{name}_m{m:g}"] = row
            print(f"{name} m={m:g}: B = N real {row['real']:.3g}, linearised {row['linearized']:.3g}, "
                  f"real/lin {row['ratio']:.2f} (B = 512: {row['ratio_B512']:.2f})", flush=True)
    return out


def _gains(momentum, steps):
    """(1 − m^j)/(1 − m) for j = 1..steps: the total weight heavy ball gives a gradient
    j steps after it entered the buffer (1 at m = 0)."""
    j = np.arange(1, steps + 1)
    return (1 - momentum ** j) / (1 - momentum) if momentum else np.ones(steps)


def noise_drift_rms(lr, momentum, steps, c, trace):
    """√E‖Δw_t‖² of the batch-noise part of heavy ball after `steps` steps (module docstring)."""
    return float(lr * np.sqrt(c * trace * np.sum(_gains(momentum, steps) ** 2)))


def gradient_drift(lr, momentum, steps, grad_norm):
    """‖Δw_t‖ of heavy ball under a constant gradient of norm `grad_norm` (no curvature):
    α·‖ḡ‖·Σ_{j=1..t} (1 − m^j)/(1 − m) — the deterministic part beside the noise."""
    return float(lr * grad_norm * np.sum(_gains(momentum, steps)))


def drift():
    """Predicted noise drift at step 10 against the traced runs' ‖w₁₀ − w₀‖."""
    from nets.noise.gradient_noise import gradient_noise

    traced = json.loads((RESULTS / "bench_momentum_sharpening.json").read_text())["nets"]
    out = {}
    for name, rec in traced.items():
        model, data, loss = _net(name)
        N = len(data[0])
        gn = gradient_noise(model, loss, data, hessian=False, progress=False)
        trace, c = float(gn.trace_cov), 1.0 / B - 1.0 / N
        gnorm = float(np.sqrt(gn.mean_sq_norm))
        rows = []
        for run in rec["runs"]:
            i = run["trace_steps"].index(10)
            pred = noise_drift_rms(run["lr"], run["momentum"], 10, c, trace)
            grad = gradient_drift(run["lr"], run["momentum"], 10, gnorm)
            rows.append({"momentum": run["momentum"], "multiple": run["multiple"], "lr": run["lr"],
                         "predicted_noise_drift": pred, "constant_gradient_drift": grad,
                         "measured_distance": run["trace_distance"][i],
                         "loss_ratio": run["trace_loss_ratio"][i]})
            print(f"{name} m={run['momentum']:g} {run['multiple']:g}×: ‖Δw₁₀‖ measured "
                  f"{run['trace_distance'][i]:.2f} (loss/start {run['trace_loss_ratio'][i]:.3g}); "
                  f"noise drift {pred:.2f}, constant-gradient drift {grad:.2f}", flush=True)
        out[name] = {"trace_cov": trace, "grad_norm": gnorm, "c": c, "runs": rows}
    return out


CURVATURE_CASES = (("gelu", 0.9), ("tanh64", 0.9), ("mlp", 0.9), ("cnn", 0.9),
                   ("mlp_relu", 0.9), ("gelu", 0.0))


def top_real_and_linearized(model, loss_fn, X, y, delta, *, delta_linearized=None, tol=1e-5):
    """(λ₁ of the real Hessian at w₀ + δ, λ₁ of Jᵀ∇²_zℓ(z + Jδ')J/N with J at w₀) for a
    cross-entropy `loss_fn`, float64, by scipy Lanczos on matrix-free products; δ' =
    `delta_linearized` (default δ)."""
    import torch
    from scipy.sparse.linalg import LinearOperator, eigsh
    from torch.func import functional_call, grad, jvp, vjp

    from nets.curvature.params import flatten_parameters, unflatten_to_dict

    net = copy.deepcopy(model).double().eval()
    w0 = flatten_parameters(net)
    Xd, P, N = X.double(), len(w0), len(X)

    def f(w):
        return functional_call(net, unflatten_to_dict(net, w), (Xd,))

    def top(mv):
        op = LinearOperator((P, P), matvec=lambda v: mv(torch.as_tensor(np.ravel(v))).numpy(),
                            dtype=np.float64)
        return float(eigsh(op, k=1, which="LA", tol=tol)[0][0])

    g = grad(lambda w: loss_fn(f(w), y))
    w = w0 + torch.as_tensor(delta, dtype=torch.float64)
    real = top(lambda v: jvp(g, (w,), (v,))[1])
    z0, back = vjp(f, w0)
    d_lin = delta if delta_linearized is None else delta_linearized
    p = torch.softmax(z0 + jvp(f, (w0,), (torch.as_tensor(d_lin, dtype=torch.float64),))[1], 1)

    def lin_mv(v):
        Jv = jvp(f, (w0,), (v,))[1]
        return back((p * Jv - p * (p * Jv).sum(1, keepdim=True)) / N)[0]

    return real, top(lin_mv)


def curvature(samples=3, steps=(5, 10)):
    """λ₁ real vs linearised at drifted points (module docstring, ``--part curvature``)."""
    import torch

    from nets.noise.gradient_noise import per_sample_gradients

    out = {}
    for name, m in CURVATURE_CASES:
        model, (X, y), loss = _net(name)
        N, alpha = len(X), _threshold_512(name, m)
        G = torch.as_tensor(np.asarray(per_sample_gradients(model, loss, (X, y)))).double()
        gbar = G.mean(0)
        C = G - gbar
        c = 1.0 / B - 1.0 / N
        lam_r, lam_l = top_real_and_linearized(model, loss, X, y, torch.zeros(G.shape[1]))
        gen = torch.Generator().manual_seed(0)
        row = {"momentum": m, "lr": alpha, "lam": lam_r, "lam_linearized": lam_l,
               "edge": alpha * lam_r / (2 * (1 + m)), "ratio_B512": _stored_ratio_512(name, m)}
        for t in steps:
            gains = _gains(m, t)
            for kind in ("noise", "noise+gradient"):
                rr, ll = [], []
                for _ in range(samples):
                    z = torch.randn(N, generator=gen, dtype=torch.float64)
                    d = alpha * np.sqrt(c * np.sum(gains ** 2)) * (C.T @ z) / np.sqrt(N - 1)
                    if kind == "noise+gradient":
                        d = d - alpha * float(np.sum(gains)) * gbar
                    a, b = top_real_and_linearized(model, loss, X, y, d)
                    rr.append(a / lam_r)
                    ll.append(b / lam_r)
                row[f"t{t}_{kind}"] = {"real": rr, "linearized": ll,
                                      "real_over_linearized": list(np.divide(rr, ll))}
                print(f"{name} m={m:g} α={alpha:.3g} t={t} {kind}: λ₁/λ₁(w₀) real "
                      f"{np.round(rr, 2)}, linearised {np.round(ll, 2)}, real ÷ linearised "
                      f"{np.round(np.divide(rr, ll), 2)}", flush=True)
        out[f"{name}_m{m:g}"] = row
    return out


PATH_CASES = (("gelu", 0.9, 0.87), ("gelu", 0.9, 1.12), ("tanh64", 0.9, 0.9), ("tanh64", 0.9, 1.12),
              ("mlp", 0.9, 0.9), ("mlp", 0.9, 1.12), ("cnn", 0.9, 1.12), ("gelu", 0.0, 0.94))
PATH_EVERY = (0, 4, 8, 12, 16, 20, 30, 40)


def side_by_side(model, loss, X, y, *, lr, momentum, batch_size, seed, steps, every=PATH_EVERY):
    """Real heavy ball (torch's convention v ← m·v + g, w ← w − α·v) and the same on the
    linearised network (all P directions, `output_jacobians`), from w₀ with a zero buffer,
    on one batch sequence (`torch.randperm(N, generator)[:B]`, generator seeded by `seed`).
    Returns per step t = 0…steps the full-data loss ÷ start of both, ‖w_t − w₀‖, ‖e_t‖ and
    ‖(w_t − w₀) − e_t‖, and at the steps in `every` λ₁ of the real Hessian at w_t and of
    the linearised Gauss–Newton matrix at e_t (`top_real_and_linearized`); a run stops
    once the real loss exceeds 10⁴× its start."""
    import torch
    from torch.func import functional_call

    from nets.curvature.params import flatten_parameters, unflatten_to_dict
    from nets.learning_rates.linearized import output_jacobians

    model = copy.deepcopy(model).eval()
    J, z0 = output_jacobians(model, X)
    N, P = len(X), J.shape[2]
    w0 = flatten_parameters(model)
    L0 = float(loss(z0, y))

    def real_loss(w, idx=None):
        xb, yb = (X, y) if idx is None else (X[idx], y[idx])
        return loss(functional_call(model, unflatten_to_dict(model, w), (xb,)), yb)

    gen = torch.Generator().manual_seed(seed)
    w, vr = w0.clone(), torch.zeros(P)
    e, vl = torch.zeros(P), torch.zeros(P)
    rec = {k: [] for k in ("loss_real", "loss_linearized", "distance_real",
                           "distance_linearized", "separation")}
    lam = {"step": [], "real": [], "linearized": []}
    for t in range(steps + 1):
        if t:
            idx = torch.randperm(N, generator=gen)[:batch_size]
            zb = (z0[idx] + J[idx] @ e).requires_grad_(True)
            gz, = torch.autograd.grad(loss(zb, y[idx]), zb)
            vl = momentum * vl + torch.einsum("bkp,bk->p", J[idx], gz)
            e = e - lr * vl
            wq = w.clone().requires_grad_(True)
            g, = torch.autograd.grad(real_loss(wq, idx), wq)
            vr = momentum * vr + g
            w = w - lr * vr
        with torch.no_grad():
            lr_, ll_ = float(real_loss(w)) / L0, float(loss(z0 + J @ e, y)) / L0
        d = w - w0
        for k, v in zip(rec, (lr_, ll_, float(d.norm()), float(e.norm()), float((d - e).norm()))):
            rec[k].append(v if np.isfinite(v) else float("inf"))
        if t in every and np.isfinite(lr_) and lr_ < 1e3:
            a, b = top_real_and_linearized(model, loss, X, y, d.double(),
                                           delta_linearized=e.double())
            lam["step"].append(t)
            lam["real"].append(a)
            lam["linearized"].append(b)
        if not np.isfinite(lr_) or lr_ > 1e4:
            break
    return {"seed": seed, "loss_start": L0, **rec, "lam": lam}


def paths(seeds=(0, 1, 2), steps=40):
    """``--part path``: `side_by_side` at B = 512 and `multiple` × the measured threshold
    for each case of `PATH_CASES`, with the summaries: largest α·λ₁/(2(1 + m)) of each
    model, the first step where the paths part (‖Δ‖ > ¼‖e‖), the largest loss ÷ start."""
    out = {}
    for name, m, mult in PATH_CASES:
        model, (X, y), loss = _net(name)
        alpha = mult * _threshold_512(name, m)
        edge = 2 * (1 + m) / alpha
        runs = []
        for seed in seeds:
            r = side_by_side(model, loss, X, y, lr=alpha, momentum=m, batch_size=B, seed=seed,
                             steps=steps)
            lam = r["lam"]
            er, el = np.asarray(lam["real"]) / edge, np.asarray(lam["linearized"]) / edge
            sep = np.asarray(r["separation"]) > 0.25 * np.maximum(r["distance_linearized"], 1e-12)
            r.update({"max_edge_real": float(er.max()), "max_edge_linearized": float(el.max()),
                      "separates_at": int(np.argmax(sep)) if sep.any() else None,
                      "max_loss_real": float(np.max(r["loss_real"])),
                      "max_loss_linearized": float(np.max(r["loss_linearized"]))})
            runs.append(r)
            print(f"{name} m={m:g} {mult:g}× (α={alpha:.3g}) seed {seed}: max loss/start real "
                  f"{r['max_loss_real']:.3g}, linearised {r['max_loss_linearized']:.3g}; "
                  f"α·λ₁/(2(1+m)) at steps {lam['step']}: real {np.round(er, 2)}, linearised "
                  f"{np.round(el, 2)}; paths separate (‖Δ‖ > 0.25‖e‖) at step "
                  f"{r['separates_at']}", flush=True)
        out[f"{name}_m{m:g}_x{mult:g}"] = {"net": name, "momentum": m, "multiple": mult,
                                           "lr": alpha, "edge_lam": edge,
                                           "loss_start": runs[0]["loss_start"], "runs": runs}
    return out


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--part", choices=("trace", "full_batch", "drift", "curvature", "path"),
                   default="trace")
    args = p.parse_args(argv)
    setup_torch(args)
    if args.part == "trace":
        out = {"environment": environment(), "batch_size": B, "cases": CASES,
               "nets": {name: follow(name) for name in HELD_OUT}}
        print("wrote", write_json("bench_momentum_sharpening", out, args.out))
        return
    body = {"full_batch": full_batch, "drift": drift, "curvature": curvature,
            "path": paths}[args.part]()
    out = {"environment": environment(), "batch_size": B, args.part: body}
    print("wrote", write_json(f"bench_momentum_sharpening_{args.part}", out, args.out))


if __name__ == "__main__":
    main()
