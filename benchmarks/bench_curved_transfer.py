"""The curved linearised network: the linearised network plus its outputs' second derivative along u.

`transfer_lr`'s linearised form freezes the network's Jacobian. Where a growing
oscillation along the top Hessian eigenvector u makes the real network sharper than its
linearisation — the digits MLP at B = 512 with momentum, where the real Gauss–Newton
matrix's top eigenvalue at w₀ ± 0.5·u is 1.4× the linearised one
(`bench_network_nonlinearity.py`) — the linearised threshold is too high. The leading
term of that change is the outputs' second derivative along u,
q_i = d²/dt² z_i(w₀ + t·u), which makes the Jacobian along u grow with the displacement:
J(w₀ + x·u)·u = J·u + x·q to first order. The curved model keeps it,

    z_i(e) = z_i + J_i e + ½ (uᵀe)² q_i,

every other direction linear (`linear_outputs.CurvedOutputs`;
`linearized_threshold(curved=True)`: one forward-over-forward pass over the data more).
Nothing is fitted: q is measured at the checkpoint, as J is.

For each stored network of `bench_heldout_transfer.py` (its eight-seed real divergence
thresholds, k = 10, 200 steps, B = 8 / 32 / 128 / 512) this runs the curved model in the
same top-200 Gauss–Newton subspace over the same eight batch sequences and reports its
transfer (anchored at B₀ = 32 and at 512) beside the stored linearised and corrected
(`transfer_lr` default) forms. Two parts on the digits MLP check the model itself:
`--part along_u` the top eigenvalue of the curved model's Hessian at w₀ + x·u (u the top
Hessian eigenvector) beside the real and linearised ones stored by
`bench_network_nonlinearity.py`; `--part full` the curved model in every direction over
the three batch sequences of `bench_linearized.py`, against its stored real and
linearised thresholds (k = 10, 200 steps, m = 0 and 0.9). `--part line --momentum m`
(digits MLP, top-200 subspace, eight sequences) replaces the quadratic term by the
network's *exact* outputs along u — z_i(w₀ + a·u) and its derivative tabulated at 801
points of a ∈ [−10, 10] and interpolated by cubic Hermite splines (linear beyond), the
other directions linear — to see how much of the curved model's large-B agreement is the
change along u itself rather than its quadratic truncation (which never saturates).

    python benchmarks/bench_curved_transfer.py --net mlp --momentum 0.9   # ~2–3 min, one thread
    python benchmarks/bench_curved_transfer.py --part along_u             # ~1.5 min
    python benchmarks/bench_curved_transfer.py --part full                # ~5 min
    python benchmarks/bench_curved_transfer.py --part line --momentum 0.9 # ~4.5 min
    python benchmarks/bench_curved_transfer.py --net summary              # table of the stored rows
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from _common import RESULTS, base_parser, environment, setup_torch, write_json
from bench_heldout_transfer import BATCH_SIZES, LIN_SEEDS, output_name, transfer_network, transfers, worst

from nets.learning_rates.linearized import linearized_threshold

NETS = ("mlp", "cnn", "mlp_relu", "gelu", "tanh64", "bn_cnn", "res_gn", "ln_mlp", "mse", "mse_gelu",
        "mse_tabular")


def measure(name, momentum=0.0, nesterov=False, rank=200):
    """The curved model's thresholds and transfers on a stored `bench_heldout_transfer` row."""
    row = json.loads((RESULTS / f"{output_name(name, momentum, nesterov)}.json").read_text())
    model, data, loss_fn = transfer_network(name)
    t0 = time.perf_counter()
    res = linearized_threshold(model, loss_fn, data, BATCH_SIZES, momentum=momentum,
                               nesterov=nesterov, factor=10.0, steps=200,
                               seeds=tuple(range(LIN_SEEDS)), rank=rank, curved=True,
                               progress=False)
    seconds = time.perf_counter() - t0
    real = np.asarray(row["real"], float)
    out = {"net": name, "momentum": momentum, "nesterov": nesterov, "rank": rank,
           "real": real.tolist(), "linearized": row["linearized"], "corrected": row["corrected"],
           "curved": res.lr.tolist(), "curved_stderr": res.stderr.tolist(), "seconds": seconds,
           "real_over_linearized": (real / np.asarray(row["linearized"], float)).tolist(),
           "real_over_curved": (real / res.lr).tolist()}
    t = transfers(real, res.lr)
    out["transfer_curved"] = {k: v.tolist() for k, v in t.items()}
    out["worst_curved"] = worst(t)
    out["worst_linearized"] = row["worst_linearized"]
    out["worst_corrected"] = row["worst_corrected"]
    return out


def along_u():
    """Top eigenvalue of the curved model's Hessian at w₀ + x·u (MLP), beside the stored
    real and linearised ones. Its Hessian at e = x·u is (1/N)Σ Ĵ_iᵀ(diag p_i − p_i p_iᵀ)Ĵ_i
    + (1/N)Σ (p_i − e_{y_i})·q_i uuᵀ with Ĵ_i = J_i + x·q_i uᵀ, p_i its softmax."""
    import torch.nn.functional as F
    from bench_criterion import network
    from bench_network_nonlinearity import top

    from nets import eigsh, hessian_operator
    from nets.curvature.operators import CurvatureOperator
    from nets.learning_rates.linear_outputs import second_derivative_along
    from nets.learning_rates.linearized import output_jacobians

    model, (X, y), _ = network("mlp")
    J, z0 = output_jacobians(model, X)
    res = eigsh(hessian_operator(model, F.cross_entropy, (X, y)), k=1, which="LA", tol=1e-8,
                progress=False)
    u = torch.as_tensor(np.asarray(res.vectors[:, 0])).to(J.dtype)
    q = second_derivative_along(model, X, u)
    Ju = torch.einsum("nkp,p->nk", J, u)

    class CurvedHessian(CurvatureOperator):
        def __init__(self, x):
            super().__init__(J.shape[2], J.dtype, J.device)
            self.x = x
            self.p = torch.softmax(z0 + x * Ju + 0.5 * x * x * q, 1)
            self.r = float(((self.p - F.one_hot(y, z0.shape[1])) * q).sum(1).mean())

        def _matmat(self, V):
            JV = torch.einsum("nkp,pg->nkg", J, V) + self.x * q[:, :, None] * (u @ V)[None, None]
            p = self.p[:, :, None]
            HJV = p * JV - p * (p * JV).sum(1, keepdim=True)
            back = torch.einsum("nkp,nkg->pg", J, HJV) + self.x * u[:, None] * torch.einsum(
                "nk,nkg->g", q, HJV)[None]
            return back / len(y) + self.r * u[:, None] * (u @ V)[None]

    stored = json.loads((RESULTS / "bench_network_nonlinearity.json").read_text())["along_u"]["rows"]
    L0 = float(F.cross_entropy(z0, y))
    rows = []
    for r in stored:
        x = r["x"]
        zc = z0 + x * Ju + 0.5 * x * x * q
        rows.append({"x": x, "lam_curved": top(CurvedHessian(x)), "lam_real": r["lam_real_hessian"],
                     "lam_linearized": r["lam_linearized"],
                     "loss_curved": float(F.cross_entropy(zc, y)) / L0, "loss_real": r["loss_real"],
                     "loss_linearized": r["loss_linearized"]})
        print({k: round(v, 3) for k, v in rows[-1].items()}, flush=True)
    return {"lam1": float(res.values[0]), "rows": rows}


def full_model():
    """The curved model in every direction (MLP, seeds 0–2) against the stored real and
    linearised k = 10 thresholds of `bench_linearized.py`."""
    import torch.nn.functional as F
    from bench_criterion import network

    model, data, _ = network("mlp")
    stored = json.loads((RESULTS / "bench_linearized.json").read_text())["nets"]["mlp"]
    out = {}
    for m in (0.0, 0.9):
        k10 = stored[f"m{m:g}"]["k10"]
        res = linearized_threshold(model, F.cross_entropy, data, BATCH_SIZES, momentum=m,
                                   factor=10.0, steps=200, seeds=(0, 1, 2), curved=True,
                                   progress=False)
        real = np.asarray(k10["real"], float)
        out[f"m{m:g}"] = {"real": real.tolist(), "linearized": k10["lr"], "curved": res.lr.tolist(),
                          "real_over_linearized": (real / np.asarray(k10["lr"], float)).tolist(),
                          "real_over_curved": (real / res.lr).tolist()}
        print(m, {k: np.round(v, 3).tolist() for k, v in out[f"m{m:g}"].items()}, flush=True)
    return out


LINE_A, LINE_M = 10.0, 801          # the table along u: a ∈ [−A, A], M points


class LineOutputs:
    """Linear outputs (`base`, coordinates D) with the part along the unit direction t
    (a = tᵀe) replaced by the network's exact outputs along the parameter direction u
    (= V·t): z_i(e) = base_i(e) − a·J_i u + [z_i(w₀ + a·u) − z_i], the exact term from a
    cubic Hermite interpolation of the table zt (M, N, K) and its derivative dzt."""

    def __init__(self, base, t, zt, dzt):
        self.base, self.z = base, base.z
        self.N, self.K, self.D = base.N, base.K, base.D
        self.dtype, self.device = base.dtype, base.device
        self.u = torch.as_tensor(t).to(self.dtype)
        self.zt, self.dzt = zt.to(self.dtype), dzt.to(self.dtype)
        self.Ju = self.dzt[(LINE_M - 1) // 2]
        self.h = 2 * LINE_A / (LINE_M - 1)

    def _interp(self, a, rows):
        x = (a.clamp(-LINE_A, LINE_A) + LINE_A) / self.h
        k = x.floor().clamp(0, LINE_M - 2).long()
        s = (x - k)[None, None, :]
        z0, z1 = (self.zt[j][:, rows].permute(1, 2, 0) for j in (k, k + 1))
        d0, d1 = (self.dzt[j][:, rows].permute(1, 2, 0) * self.h for j in (k, k + 1))
        s2, s3 = s * s, s * s * s
        val = (2 * s3 - 3 * s2 + 1) * z0 + (s3 - 2 * s2 + s) * d0 + (3 * s2 - 2 * s3) * z1 + (s3 - s2) * d1
        der = ((6 * s2 - 6 * s) * z0 + (3 * s2 - 4 * s + 1) * d0 + (6 * s - 6 * s2) * z1
               + (3 * s2 - 2 * s) * d1) / self.h
        beyond = a.abs() > LINE_A                     # linear continuation past the table
        edge = torch.sign(a) * LINE_A
        val = torch.where(beyond[None, None], val + der * (a - edge)[None, None], val)
        return val, der

    def _bend(self, rows, E):
        a = self.u @ E
        val, _ = self._interp(a, rows)
        return val - self.z[rows][:, :, None] - self.Ju[rows][:, :, None] * a[None, None, :]

    def batch(self, idx, E):
        return self.base.batch(idx, E) + self._bend(idx, E)

    def pullback(self, idx, C, E=None):
        _, der = self._interp(self.u @ E, idx)
        extra = torch.einsum("bkg,bkg->g", der - self.Ju[idx][:, :, None], C)
        return self.base.pullback(idx, C, E) + self.u[:, None] * extra[None, :]

    def full(self, E):
        return self.base.full(E) + self._bend(torch.arange(self.N), E)


def line_model(momentum):
    """The exact-along-u model on the digits MLP (module docstring), through
    `linearized_threshold`'s own loop with its curved hook swapped for `LineOutputs`."""
    import copy

    import torch.nn.functional as F
    from bench_criterion import network
    from torch.func import functional_call, jvp

    import nets.learning_rates.linearized as lin_mod
    from nets.learning_rates.linear_outputs import CurvedOutputs, _as_tangent

    class Line(LineOutputs, CurvedOutputs):     # accepted wherever linear outputs are
        pass

    def line(lin, model, X, u, basis, chunk_size):
        t = basis.T @ u.to(torch.float64)
        t = t / t.norm()
        net = copy.deepcopy(model).eval()
        params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}
        tan = _as_tangent(net, params, basis @ t)

        def f(p):
            return functional_call(net, p, (X,)).reshape(len(X), -1)

        zt, dzt = [], []
        with torch.no_grad():
            for a in np.linspace(-LINE_A, LINE_A, LINE_M):
                z, dz = jvp(f, ({k: v + float(a) * tan[k] for k, v in params.items()},), (tan,))
                zt.append(z)
                dzt.append(dz)
        return Line(lin, t, torch.stack(zt), torch.stack(dzt))

    model, data, _ = network("mlp")
    saved, lin_mod._curved = lin_mod._curved, line
    try:
        res = linearized_threshold(model, F.cross_entropy, data, BATCH_SIZES, momentum=momentum,
                                   factor=10.0, steps=200, seeds=tuple(range(LIN_SEEDS)),
                                   rank=200, curved=True, progress=False)
    finally:
        lin_mod._curved = saved
    name = output_name("mlp", momentum)
    row = json.loads((RESULTS / f"{name}.json").read_text())
    curved = json.loads((RESULTS / f"{name.replace('heldout_transfer', 'curved_transfer')}.json").read_text())
    real = np.asarray(row["real"], float)
    out = {"momentum": momentum, "real": real.tolist(), "line": res.lr.tolist(),
           "real_over_line": (real / res.lr).tolist(),
           "real_over_curved": curved["real_over_curved"],
           "real_over_linearized": curved["real_over_linearized"],
           "worst_line": worst(transfers(real, res.lr)), "worst_curved": curved["worst_curved"],
           "worst_corrected": row["worst_corrected"]}
    print({k: np.round(v, 3).tolist() for k, v in out.items()}, flush=True)
    return out


def summary():
    rows = []
    for f in sorted(RESULTS.glob("bench_curved_transfer_*.json")):
        r = json.loads(f.read_text())
        if "net" not in r:
            continue
        # the default's (corrected) column from its own file, which `bench_heldout_transfer
        # --net summary [--resecant]` keeps current; the copy stored here is from the run
        held = RESULTS / f"{output_name(r['net'], r['momentum'], r['nesterov'])}.json"
        if held.exists():
            r["worst_corrected"] = json.loads(held.read_text())["worst_corrected"]
        rows.append(r)
        print(f"{r['net']:12s} m={r['momentum']:<4g}{' N' if r['nesterov'] else '  '} "
              f"curved {r['worst_curved'][0]:.2f}–{r['worst_curved'][1]:.2f}  "
              f"corrected {r['worst_corrected'][0]:.2f}–{r['worst_corrected'][1]:.2f}  "
              f"linearised {r['worst_linearized'][0]:.2f}–{r['worst_linearized'][1]:.2f}  "
              f"real/curved {' / '.join(f'{x:.2f}' for x in r['real_over_curved'])}")
    return rows


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--net", default="mlp", choices=(*NETS, "summary"))
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--part", default="transfer", choices=("transfer", "along_u", "full", "line"))
    args = p.parse_args(argv)
    setup_torch(args)
    if args.part == "line":
        out = {"environment": environment(), "line": line_model(args.momentum)}
        print("wrote", write_json(f"bench_curved_transfer_mlp_line_m{args.momentum:g}", out,
                                  args.out))
        return
    if args.part != "transfer":
        out = {"environment": environment(), args.part: (along_u if args.part == "along_u"
                                                         else full_model)()}
        print("wrote", write_json(f"bench_curved_transfer_mlp_{args.part}", out, args.out))
        return
    if args.net == "summary":
        summary()
        return
    out = measure(args.net, args.momentum, args.nesterov)
    out["environment"] = environment()
    name = output_name(args.net, args.momentum, args.nesterov).replace("heldout_transfer", "curved_transfer")
    print(json.dumps({k: out[k] for k in ("real_over_curved", "worst_curved", "worst_corrected",
                                          "seconds")}))
    print("wrote", write_json(name, out, args.out))


if __name__ == "__main__":
    main()
