"""Cost of the curvature primitives, as ratios (the "Quality bars" of benchmarks/README.md).

For each model (digits MLP 64-32-10, a wide MLP 64-256-256-10, SmallCNN on 8×8
digits images) and dtype (float64, float32), on the full digits set (N = 1797) in one
chunk, this measures the median wall time of

  grad        one full-data gradient, plain autograd (`loss.backward()`)
  grad_func   the same through the operator (`op.gradient()`, torch.func)
  hvp         one Hessian-vector product from scratch, `op.matvec(v)` with
              cache_graph=False: forward + backward + pullback every product
  hvp_cached  the same with cache_graph=True (the gradient graph is kept; a product
              is one pullback through it)
  lanczos     `nets.lanczos(op, m)` (full reorthogonalisation), per step
  eigsh       `nets.algorithms.lanczos.eigsh(op, k=5)`, per operator product
  matmat_k    `op.matmat(V)` with k columns (torch.func.vmap) vs k sequential matvecs
  bfloat16    error of bfloat16 products and what nets.algorithms.lanczos does with them
  variants    forward-over-reverse (jvp∘grad) and reverse-over-reverse (vjp∘grad)
              HVPs as bare torch.func functions (no operator), and torch.compile of
              the bare HVPs (opt-in with `--compile`; compile time reported separately)

and prints the ratios against the bars: Lanczos step ≤ 1.2× HVP, HVP ≤ 3× gradient.
Run: `python benchmarks/bench_core.py [--device cuda] [--quick]`.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from _common import base_parser, environment, fmt_time, print_table, race, setup_torch, write_json
from torch.func import functional_call, grad, jvp, vjp

from nets.algorithms.lanczos import eigsh, lanczos
from nets.algorithms.slq import slq_density
from nets.curvature.operators import CurvatureOperator, hessian_operator
from nets.training.data import load_digits
from nets.training.loops import trained_digits_mlp
from nets.training.models import MLP, SmallCNN

#: bar -> limit. "_cached": the operator as built by default for these data sizes
#: (cache_graph="auto" keeps the graph); without suffix: every product from scratch.
BARS = {"lanczos_step_over_hvp_cached_est": 1.2, "lanczos_step_over_hvp_est": 1.2,
        "lanczos80_step_over_hvp_cached_est": 1.2, "slq8x80_step_over_product_est": 1.2,
        "hvp_cached_over_grad": 3.0, "hvp_over_grad": 3.0}


def make_models(quick: bool):
    model, (X, y) = trained_digits_mlp()
    out = [("mlp 64-32-10", model, X, y)]
    if not quick:
        out.append(("mlp 64-256-256-10", MLP(64, (256, 256), 10, seed=1).eval(), X, y))
    Xi, yi = load_digits(as_images=True)
    out.append(("smallcnn w8", SmallCNN(1, 10, 8, width=8, seed=2).eval(), Xi, yi))
    return out


class DiagonalOperator(CurvatureOperator):
    """diag(d): products cost next to nothing, so Lanczos on it times the recurrence's
    own bookkeeping (dot products, two-pass reorthogonalisation, tridiagonal solves)."""

    def __init__(self, d):
        super().__init__(d.numel(), d.dtype, d.device)
        self.d = d

    def _matvec(self, v):
        return self.d * v

    def _matmat(self, V):
        return self.d[:, None] * V


def bare_hvps(model, X, y):
    """Pure torch.func HVPs on a flat vector (no operator machinery)."""
    names = [n for n, _ in model.named_parameters()]
    prims = tuple(p.detach() for _, p in model.named_parameters())
    shapes = [p.shape for p in prims]
    sizes = [p.numel() for p in prims]

    def loss(*ps):
        return F.cross_entropy(functional_call(model, dict(zip(names, ps)), (X,)), y)

    g = grad(loss, argnums=tuple(range(len(prims))))

    def unflat(v):
        return tuple(c.view(s) for c, s in zip(torch.split(v, sizes), shapes))

    def fwd_over_rev(v):
        return torch.cat([t.reshape(-1) for t in jvp(g, prims, unflat(v))[1]])

    def rev_over_rev(v):
        _, pull = vjp(g, *prims)
        return torch.cat([t.reshape(-1) for t in pull(unflat(v))])

    return fwd_over_rev, rev_over_rev


def bf16_check(label, model0, X0, y0, device):
    """bfloat16 products: their error, and what nets.algorithms.lanczos makes of them (raw, and
    through benchmarks/paper_scale.LowPrecisionProducts, which shows them as float32)."""
    from paper_scale import LowPrecisionProducts

    model = copy.deepcopy(model0).to(device)
    X, y = X0.to(device), y0.to(device)
    ref = hessian_operator(model, F.cross_entropy, (X, y), dtype=torch.float64, cache_graph=True)
    low = hessian_operator(model, F.cross_entropy, (X, y), dtype=torch.bfloat16, cache_graph=True)
    v = torch.randn(ref.P, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    hv = ref.matvec(v)
    out = {"model": label, "P": ref.P,
           "hvp_rel_err": float((low.matvec(v) - hv).norm() / hv.norm())}
    top = float(lanczos(ref, 30, seed=0).ritz_values[-1])
    raw = lanczos(low, 30, seed=0)
    wrapped = lanczos(LowPrecisionProducts(low), 30, seed=0)
    out.update(top_float64=top, raw_bf16_steps=raw.num_steps, raw_bf16_top=float(raw.ritz_values[-1]),
               wrapped_bf16_steps=wrapped.num_steps, wrapped_bf16_top=float(wrapped.ritz_values[-1]),
               wrapped_top_rel_err=abs(float(wrapped.ritz_values[-1]) - top) / abs(top))
    return out


def bench_one(label, model0, X0, y0, dtype, device, args):
    rep = args.repeats
    model = copy.deepcopy(model0).to(device=device, dtype=dtype)
    X = X0.to(device=device, dtype=dtype)
    y = y0.to(device)
    row = {"model": label, "dtype": str(dtype).replace("torch.", ""), "N": int(X.shape[0])}
    op = hessian_operator(model, F.cross_entropy, (X, y), cache_graph=False)
    opc = hessian_operator(model, F.cross_entropy, (X, y), cache_graph=True)
    P = op.P
    row["P"] = P
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(P, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    def grad_autograd():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(X), y).backward()

    fr, rr = bare_hvps(model, X, y)
    m = 20 if args.quick else 30
    ks = (4,) if args.quick else (8,)
    Vs = {k: torch.randn(P, k, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
          for k in ks}
    fast = {"grad": grad_autograd, "grad_func": op.gradient,
            "hvp": lambda: op.matvec(v), "hvp_cached": lambda: opc.matvec(v),
            "hvp_bare_fwd_over_rev": lambda: fr(v), "hvp_bare_rev_over_rev": lambda: rr(v)}
    diag = DiagonalOperator(torch.linspace(-1.0, 2.0, P, dtype=dtype, device=device))
    fast["lanczos_bookkeeping"] = lambda: lanczos(diag, m, seed=0)
    fast["lanczos_bookkeeping_m80"] = lambda: lanczos(diag, 80, seed=0)
    if P <= 20_000:       # 8 probes × 81 basis vectors of float64 stay small
        fast["slq_bookkeeping_8x80"] = lambda: slq_density(diag, 8, 80, seed=0)
    for k, V in Vs.items():
        fast[f"matmat{k}"] = (lambda V=V: op.matmat(V))
        fast[f"seq{k}"] = (lambda V=V, k=k: [op.matvec(V[:, i]) for i in range(k)])
        fast[f"matmat{k}_cached"] = (lambda V=V: opc.matmat(V))
        fast[f"seq{k}_cached"] = (lambda V=V, k=k: [opc.matvec(V[:, i]) for i in range(k)])
    n_eig = eigsh(opc, k=5, tol=1e-8, seed=0).num_matvecs

    def loop(o, n):
        return lambda: [o.matvec(v) for _ in range(n)]

    # long-running samples are compared with equally long ones: m steps vs m products
    slow = {"hvp_x_m": loop(op, m), "lanczos": lambda: lanczos(op, m, seed=0),
            "hvp_cached_x_m": loop(opc, m), "lanczos_cached": lambda: lanczos(opc, m, seed=0),
            "hvp_cached_x_eigsh": loop(opc, n_eig),
            "eigsh_cached": lambda: eigsh(opc, k=5, tol=1e-8, seed=0)}
    tf = race(fast, device, repeats=max(rep, 5), min_time=0.02)
    ts = race(slow, device, repeats=3, warmup=0)
    t = {k: v["min"] for k, v in tf.items()}
    row["median_s"] = {k: v["median"] for k, v in {**tf, **ts}.items()}
    row["lanczos_steps"] = m
    row["eigsh_matvecs"] = n_eig
    t["lanczos_step"] = ts["lanczos"]["min"] / m
    t["lanczos_step_cached"] = ts["lanczos_cached"]["min"] / m
    t["eigsh_per_matvec_cached"] = ts["eigsh_cached"]["min"] / n_eig
    row["lanczos_step_over_hvp"] = ts["lanczos"]["min"] / ts["hvp_x_m"]["min"]
    row["lanczos_step_over_hvp_cached"] = ts["lanczos_cached"]["min"] / ts["hvp_cached_x_m"]["min"]
    row["eigsh_matvec_over_hvp_cached"] = ts["eigsh_cached"]["min"] / ts["hvp_cached_x_eigsh"]["min"]
    row["lanczos_overhead_per_step_us"] = (ts["lanczos_cached"]["min"] - ts["hvp_cached_x_m"]["min"]) / m * 1e6
    # robust estimate: 1 + (recurrence bookkeeping per step, timed on a diagonal operator
    # with many short samples) / (one product, many short samples)
    book = tf["lanczos_bookkeeping"]["min"] / m
    row["lanczos_bookkeeping_per_step_us"] = book * 1e6
    row["lanczos_step_over_hvp_est"] = 1 + book / tf["hvp"]["min"]
    row["lanczos_step_over_hvp_cached_est"] = 1 + book / tf["hvp_cached"]["min"]
    book80 = tf["lanczos_bookkeeping_m80"]["min"] / 80
    row["lanczos80_bookkeeping_per_step_us"] = book80 * 1e6
    row["lanczos80_step_over_hvp_cached_est"] = 1 + book80 / tf["hvp_cached"]["min"]
    if "slq_bookkeeping_8x80" in tf and "matmat8_cached" in tf:
        bslq = tf["slq_bookkeeping_8x80"]["min"] / (8 * 80)
        row["slq8x80_bookkeeping_per_probe_step_us"] = bslq * 1e6
        # per probe-step: one column of a vmapped 8-column product + the bookkeeping
        row["slq8x80_step_over_product_est"] = 1 + bslq / (tf["matmat8_cached"]["min"] / 8)
    for k in ks:
        row[f"vmap{k}_speedup"] = t[f"seq{k}"] / t[f"matmat{k}"]
        row[f"vmap{k}_speedup_cached"] = t[f"seq{k}_cached"] / t[f"matmat{k}_cached"]
    if args.compile and label.startswith("mlp 64-32"):
        for name, fn in (("fwd_over_rev", fr), ("rev_over_rev", rr)):
            try:
                t0 = time.perf_counter()
                cfn = torch.compile(fn)
                cfn(v)
                row[f"compile_{name}_time_s"] = time.perf_counter() - t0
                tc = race({"eager": lambda: fn(v), "compiled": lambda: cfn(v)}, device,
                          repeats=max(rep, 5), min_time=0.02)
                t[f"hvp_compiled_{name}"] = tc["compiled"]["min"]
                row[f"compile_{name}_speedup"] = tc["eager"]["min"] / tc["compiled"]["min"]
                ref = fn(v)
                row[f"compile_{name}_rel_err"] = float((cfn(v) - ref).abs().max() / ref.abs().max())
                # against the operator's own (eager) product
                row[f"compile_{name}_speedup_vs_operator"] = t["hvp"] / tc["compiled"]["min"]
            except Exception as exc:  # noqa: BLE001 - record why compile is unavailable
                row[f"compile_{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    row["times_s"] = t
    row["hvp_over_grad"] = t["hvp"] / t["grad"]
    row["hvp_cached_over_grad"] = t["hvp_cached"] / t["grad"]
    row["operator_overhead_hvp"] = t["hvp"] / min(t["hvp_bare_fwd_over_rev"], t["hvp_bare_rev_over_rev"])
    row["rev_over_fwd"] = t["hvp_bare_rev_over_rev"] / t["hvp_bare_fwd_over_rev"]
    return row


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--compile", action="store_true",
                   help="also measure torch.compile of the bare HVPs (digits MLP only; "
                        "compiling takes 20-60 s per dtype on 2 CPU cores)")
    p.add_argument("--dtypes", default="float64,float32")
    p.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 accuracy check")
    p.add_argument("--models", default="mlp,wide,cnn",
                   help="subset of: mlp (64-32-10), wide (64-256-256-10), cnn (SmallCNN)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 3)
    device = setup_torch(args)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    rows = []
    wanted = {"mlp": "mlp 64-32", "wide": "mlp 64-256", "cnn": "smallcnn"}
    keep = [wanted[m] for m in args.models.split(",")]
    for label, model, X, y in make_models(args.quick):
        if not any(label.startswith(k) for k in keep):
            continue
        for dt in dtypes:
            r = bench_one(label, model, X, y, dt, device, args)
            rows.append(r)
            tt = r["times_s"]
            print(f"{label:18s} {r['dtype']:8s} P={r['P']:6d}  grad {fmt_time(tt['grad'])}  "
                  f"hvp {fmt_time(tt['hvp'])}  hvp_cached {fmt_time(tt['hvp_cached'])}  "
                  f"lanczos step {fmt_time(tt['lanczos_step'])}", flush=True)
    bf16 = []
    if not args.no_bf16:
        for label, model, X, y in make_models(args.quick):
            if any(label.startswith(k) for k in keep):
                b = bf16_check(label, model, X, y, device)
                bf16.append(b)
                print(f"bfloat16 {label}: HVP rel. error {b['hvp_rel_err']:.1e}; lanczos(30) on the raw "
                      f"bf16 operator: {b['raw_bf16_steps']} step(s), top {b['raw_bf16_top']:.4g}; "
                      f"through LowPrecisionProducts: {b['wrapped_bf16_steps']} steps, top "
                      f"{b['wrapped_bf16_top']:.4g} vs float64 {b['top_float64']:.4g} "
                      f"(rel. err {b['wrapped_top_rel_err']:.1e})", flush=True)
    print()
    cols = [("model", "model"), ("dtype", "dtype"), ("P", "P"),
            ("hvp_over_grad", "HVP/grad"), ("hvp_cached_over_grad", "HVPc/grad"),
            ("lanczos_step_over_hvp", "LzStep/HVP"), ("lanczos_step_over_hvp_cached", "LzStepC/HVPc"),
            ("eigsh_matvec_over_hvp_cached", "eigsh/HVPc"),
            ("lanczos_overhead_per_step_us", "Lz ovh µs"),
            ("lanczos_bookkeeping_per_step_us", "Lz book µs"),
            ("lanczos_step_over_hvp_est", "LzStep/HVP est"),
            ("lanczos_step_over_hvp_cached_est", "LzStepC/HVPc est"),
            ("lanczos80_step_over_hvp_cached_est", "Lz80C est"),
            ("slq8x80_step_over_product_est", "SLQ8x80 est"), ("operator_overhead_hvp", "op/bare"),
            ("rev_over_fwd", "rev/fwd bare")]
    ks = (4,) if args.quick else (8,)
    cols += [(f"vmap{k}_speedup", f"vmap{k} x") for k in ks]
    cols += [(f"vmap{k}_speedup_cached", f"vmap{k}c x") for k in ks]
    print_table(rows, cols)
    for r in rows:
        for name in ("fwd_over_rev", "rev_over_rev"):
            if f"compile_{name}_speedup" in r:
                print(f"torch.compile {name} ({r['model']}, {r['dtype']}): "
                      f"{r[f'compile_{name}_speedup']:.2f}x over eager bare, "
                      f"{r[f'compile_{name}_speedup_vs_operator']:.2f}x over op.matvec, after "
                      f"{r[f'compile_{name}_time_s']:.1f} s compile "
                      f"(rel. diff {r[f'compile_{name}_rel_err']:.1e})")
            elif f"compile_{name}_error" in r:
                print(f"torch.compile {name} ({r['model']}, {r['dtype']}): failed: "
                      f"{r[f'compile_{name}_error']}")
    bars = {}
    for key, bar in BARS.items():
        if not any(key in r for r in rows):
            continue
        worst = max(r[key] for r in rows if key in r)
        bars[key] = {"bar": bar, "worst": worst, "met": worst <= bar,
                     "per_row": {f"{r['model']} {r['dtype']}": r[key] for r in rows if key in r}}
        print(f"bar {key} <= {bar}: worst measured {worst:.2f} -> {'MET' if worst <= bar else 'MISSED'}")
    path = write_json("bench_core", {"environment": environment(device), "args": vars(args),
                                     "bars": bars, "rows": rows, "bfloat16": bf16}, args.out)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
