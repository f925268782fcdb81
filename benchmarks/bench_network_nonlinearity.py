"""Why is the real MLP less tolerant than its linearisation at B = 512? The network's own curvature change.

`bench_linearized.py` found the digits MLP's real divergence threshold (k = 10) within
0.76–1.11 of its linearised network's at B ≤ 128, but 0.68× it at B = 512 with heavy ball
m = 0.9 (0.83× with m = 0): there the network's own nonlinearity — its Jacobian changing
with the weights, which the linearisation freezes — destabilises. This script measures
what that nonlinearity does, in two ways:

1. **Curvature along the top eigenvector.** u is the top eigenvector of the full-data
   Hessian H(w₀) at the checkpoint. At w₀ + x·u (x on a grid) it reports the full-data
   loss ÷ L(w₀) of the real network and of the linearised one (logits z_i + x·J_i u), and
   the largest eigenvalue (`nets.eigsh`, "LA") of: the real Hessian H(w₀ + xu); the real
   Gauss–Newton matrix G(w₀ + xu) = (1/N)Σ J_i(w)ᵀ(diag p_i − p_i p_iᵀ)J_i(w), which
   differs from H by the residual term Σ (p_i − e_{y_i})ᵀ∇²z_i; and the linearised
   network's Hessian (1/N)Σ J_i(w₀)ᵀ(diag p_i − p_i p_iᵀ)J_i(w₀) at its own logits. The
   linearisation sees only the cross-entropy's change of curvature with the logits; the
   real Gauss–Newton matrix adds the change of the Jacobian; the real Hessian adds the
   residual term.
2. **Real against linearised runs with the same batches.** Heavy ball in torch's
   convention, 200 steps from the checkpoint, fresh batches `torch.randperm(N,
   Generator(seed))[:B]` (the protocol of `training_trial` and of
   `linearized_max_loss`, so both see identical batches), 3 seeds, at learning rates
   0.6, 0.8, 1.0 and 1.2 × the real 3-seed threshold of `bench_linearized.json`
   (k = 10); per run the running maximum of L/L₀ of each and the step where the real
   one peaks, and the real Hessian's top eigenvalue after 5 and 20 steps. Settings:
   (B, m) = (512, 0.9), (512, 0) and (32, 0.9) — where the real/linearised ratio is
   0.68, 0.83 and 1.11.

    python benchmarks/bench_network_nonlinearity.py      # ~10 min on two cores
"""

from __future__ import annotations

import copy
import json
import math

import torch
import torch.nn.functional as F
from _common import RESULTS, base_parser, environment, setup_torch, write_json
from bench_criterion import network
from bench_momentum_linear import sgd_run

from nets import eigsh, ggn_operator, hessian_operator
from nets.curvature.chunk_shares import full_data_loss
from nets.curvature.operators import CurvatureOperator
from nets.learning_rates.linearized import linearized_max_loss, output_jacobians

XS = (-2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0)
SETTINGS = ((512, 0.9), (512, 0.0), (32, 0.9))
FRACTIONS = (0.6, 0.8, 1.0, 1.2)
SEEDS = (0, 1, 2)
STEPS = 200
PROBE_STEPS = (5, 20)


class LinearizedHessian(CurvatureOperator):
    """Hessian of the linearised cross-entropy network at displacement e:
    (1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i with p_i = softmax(z_i + J_i e)."""

    def __init__(self, J, z0, e):
        super().__init__(J.shape[2], J.dtype, J.device)
        self.Jf = J.reshape(-1, J.shape[2])
        self.p = torch.softmax(z0 + J @ e, dim=1)
        self.N, self.K = J.shape[:2]

    def _matmat(self, V):
        JV = (self.Jf @ V).reshape(self.N, self.K, -1)
        p = self.p[:, :, None]
        HJV = p * JV - p * (p * JV).sum(1, keepdim=True)
        return self.Jf.T @ HJV.reshape(self.N * self.K, -1) / self.N


def top(op):
    return float(eigsh(op, k=1, which="LA", tol=1e-6, return_vectors=False, progress=False).values[0])


def shifted(model, w):
    net = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(w, net.parameters())
    return net


def along_top_direction(model, data, J, z0):
    X, y = data
    w0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    res = eigsh(hessian_operator(model, F.cross_entropy, data), k=1, which="LA", tol=1e-8, progress=False)
    u = res.vectors[:, 0].to(w0.dtype)
    L0 = full_data_loss(model, F.cross_entropy, X, y, 4096)
    rows = []
    for x in XS:
        net = shifted(model, w0 + x * u)
        e = (x * u).to(J.dtype)
        rows.append({
            "x": x,
            "loss_real": full_data_loss(net, F.cross_entropy, X, y, 4096) / L0,
            "loss_linearized": float(F.cross_entropy(z0 + J @ e, y)) / L0,
            "lam_real_hessian": top(hessian_operator(net, F.cross_entropy, data)),
            "lam_real_ggn": top(ggn_operator(net, F.cross_entropy, data)),
            "lam_linearized": top(LinearizedHessian(J, z0, e)),
        })
    return {"lam1": float(res.values[0]), "rows": rows}


def real_run(model, data, B, m, lr, seed):
    """Running max of L/L₀ over STEPS heavy-ball steps (`bench_momentum_linear.sgd_run`),
    the step of the max, and the real Hessian's top eigenvalue after each of PROBE_STEPS
    (stops at a non-finite loss)."""
    X, y = data
    worst, at, lams = 1.0, 0, {}
    for t, net, _ in sgd_run(model, X, y, lr, B, m, seed, STEPS):
        L = full_data_loss(net, F.cross_entropy, X, y, 4096)
        if t == 0:
            L0 = L
            continue
        if not math.isfinite(L):
            return math.inf, t, lams
        if L / L0 > worst:
            worst, at = L / L0, t
        if t in PROBE_STEPS:
            lams[str(t)] = top(hessian_operator(net, F.cross_entropy, (X, y)))
    return worst, at, lams


def runs(model, data, J, z0, B, m, real_threshold):
    y = data[1]
    out = []
    for f in FRACTIONS:
        lr = f * real_threshold
        for s in SEEDS:
            worst, at, lams = real_run(model, data, B, m, lr, s)
            lin = float(linearized_max_loss(J, z0, y, F.cross_entropy, B, m, [lr], STEPS, s)[0])
            out.append({"fraction": f, "lr": lr, "seed": s, "real_max": worst, "real_peak_step": at,
                        "linearized_max": lin, "real_lam1": lams})
    return out


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0], quick=False)
    args = p.parse_args(argv)
    setup_torch(args)
    model, data, _ = network("mlp")
    J, z0 = output_jacobians(model, data[0])
    stored = json.loads((RESULTS / "bench_linearized.json").read_text())["nets"]["mlp"]
    out = {"environment": environment(), "steps": STEPS, "seeds": list(SEEDS),
           "along_u": along_top_direction(model, data, J, z0), "runs": {}}
    for B, m in SETTINGS:
        k10 = stored[f"m{m:g}"]["k10"]
        i = [8, 32, 128, 512].index(B)
        key = f"B{B}_m{m:g}"
        out["runs"][key] = {"real_threshold": k10["real"][i], "linearized_threshold": k10["lr"][i],
                            "rows": runs(model, data, J, z0, B, m, k10["real"][i])}
        write_json("bench_network_nonlinearity", out, args.out)
    print("wrote", write_json("bench_network_nonlinearity", out, args.out))


if __name__ == "__main__":
    main()
