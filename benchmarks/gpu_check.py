"""One prepared device check: CUDA tests, curvature costs at scale, λ'(B), determinism.

Run on a machine with an NVIDIA GPU (sized for one H200: about 8 minutes in all):

    python benchmarks/gpu_check.py --out "$OUT"

`--tiny` runs the same code paths on tiny networks and data in seconds (CPU by
default; `--device` chooses). Four stages, each with its own time budget, each writing
`<stage>.json` into the output folder as soon as it finishes (and partial results as
it goes), plus `summary.json` after every stage, so a time-out still leaves results:

1. tests — `pytest -m cuda tests/test_cuda.py` in a subprocess (device vs CPU float64
   on small nets: operators, Lanczos/eigsh, SLQ, directional noise, λ'(B),
   predicted max lr, CurvatureAdaptiveSGD); counts from its JUnit XML.
2. timing — on WideResNet-16-4 and PreResNet-110 with CIFAR-shaped synthetic data
   (N = 10,000, 3×32×32, chunks of each stage's `chunk` samples, set in the plans
   below), in float32 and bfloat16: one
   full-data gradient (plain autograd, the unit), one HVP, one Lanczos step (m steps
   ÷ m), top-5 eigenvalues (restarted Lanczos, product budget capped) and an SLQ
   density; every cost as a ratio to one gradient; PyHessian's HVP (and its top
   eigenvalues if the budget allows) when `pyhessian` is importable.
3. lambda — VGG-16 (15.3M parameters) on CIFAR-100-shaped synthetic data: the
   directional prediction λ'(B) = λ + c(B,N)·s_u²/λ from one pass, and the measured
   mean top eigenvalue of H_B over random batches, B = 8…1024; JSON and a figure.
4. determinism — the documented settings (CUBLAS_WORKSPACE_CONFIG=:4096:8, set by this
   script before CUDA starts; `torch.use_deterministic_algorithms(True)`; cuDNN
   benchmark off): the same seed twice must give bit-identical eigenvalues, SLQ nodes,
   predicted and measured λ'(B) and HVPs. An op without a deterministic kernel is
   recorded and the check repeated with `warn_only=True`.

Synthetic data: x ~ N(0, 1) images, labels y = argmax of a fixed random linear map of
the 4×4-average-pooled image (a learnable but random rule). Networks are at their
seeded initialisation, BatchNorm statistics calibrated on the data, then in eval mode.

Every package function is called with keyword options; options that a version of the
package does not accept are left out and listed in summary.json ("dropped_options").
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # before CUDA initialises

import argparse
import copy
import inspect
import json
import signal
import subprocess
import sys
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import RESULTS, ROOT, environment, sync, timeit, write_json

STAGES = ("tests", "timing", "lambda", "determinism")

#: full-size run (one H200, ≈ 8 min): budgets in seconds per stage
FULL = dict(
    budgets=dict(tests=90, timing=170, **{"lambda": 150}, determinism=50),
    timing=dict(models=["wrn16_4", "preresnet110"], N=10_000, image=32, n_classes=10,
                chunk=1000, repeats=3, lanczos_steps=5, top_k=5, top_max_steps=40,
                slq_probes=2, slq_steps=8, dtypes=["float32", "bfloat16"],
                pyhessian_top_iters=20),
    lam=dict(model="vgg16", N=4096, image=32, n_classes=100,
             batch_sizes=[8, 16, 32, 64, 128, 256, 512, 1024], n_batches=3, chunk=512,
             micro_batch=4, tol=1e-4, dtype="float32"),
    det=dict(model="wrn10_2", N=512, image=32, n_classes=10, chunk=256, batch_sizes=[16, 64],
             micro_batch=4, dtype="float32"),
)

#: --tiny: the same code paths in seconds on a CPU
TINY = dict(
    budgets=dict(tests=60, timing=120, **{"lambda": 120}, determinism=120),   # slack for busy CPUs
    timing=dict(models=["small_cnn"], N=32, image=8, n_classes=4, chunk=16, repeats=1,
                lanczos_steps=3, top_k=2, top_max_steps=12, slq_probes=2, slq_steps=4,
                dtypes=["float32", "bfloat16"], pyhessian_top_iters=3),
    lam=dict(model="small_cnn", N=32, image=8, n_classes=4, batch_sizes=[4, 8], n_batches=2,
             chunk=16, micro_batch=1, tol=1e-4, dtype="float32"),
    det=dict(model="small_cnn", N=16, image=8, n_classes=4, chunk=8, batch_sizes=[4, 8],
             micro_batch=1, dtype="float32"),
)


# ------------------------------------------------------------------------------ helpers
class StageTimeout(Exception):
    """Raised by the stage alarm when a stage runs past its budget."""


class Context:
    """Run-wide state: arguments, device, output folder, options dropped by `call`."""

    def __init__(self, args, cfg, device):
        self.args, self.cfg, self.device = args, cfg, device
        self.out = Path(args.out)
        self.dropped: dict[str, list[str]] = {}
        self.summary = {"tiny": bool(args.tiny), "device": str(device), "stages": {},
                        "environment": environment(device), "dropped_options": self.dropped}

    def save(self, name: str, payload: dict) -> Path:
        return write_json(name, payload, out=str(self.out / f"{name}.json"))

    def call(self, fn, *args, **kw):
        """fn(*args, **kw) with the keyword options fn accepts; the others are dropped
        and recorded (the package's signatures are moving to keyword-only options)."""
        params = inspect.signature(fn).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            drop = sorted(k for k in kw if k not in params)
            if drop:
                name = getattr(fn, "__qualname__", str(fn))
                self.dropped[name] = sorted(set(self.dropped.get(name, [])) | set(drop))
                kw = {k: v for k, v in kw.items() if k in params}
        return fn(*args, **kw)


def _alarm(signum, frame):
    raise StageTimeout()


def run_stage(ctx: Context, name: str, fn, budget: float) -> dict:
    """Run one stage under a wall-clock alarm; always write `<name>.json`."""
    rec = {"stage": name, "status": "running", "budget_s": budget}
    t0 = time.perf_counter()
    deadline = t0 + budget
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, max(budget, 1.0))
    try:
        fn(ctx, rec, deadline)
        rec["status"] = "ok"
    except StageTimeout:
        rec["status"] = "timeout"
    except Exception as exc:                      # noqa: BLE001 - recorded, next stage runs
        rec["status"] = "error"
        rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc(limit=8)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        rec["seconds"] = time.perf_counter() - t0
        if ctx.device.type == "cuda":
            rec["peak_memory_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
            torch.cuda.reset_peak_memory_stats(ctx.device)
            torch.cuda.empty_cache()
        ctx.save(name, rec)
        ctx.summary["stages"][name] = {k: rec.get(k) for k in ("status", "seconds", "error")}
        ctx.summary["dropped_options"] = ctx.dropped
        ctx.save("summary", ctx.summary)
    print(f"[gpu_check] {name}: {rec['status']} in {rec['seconds']:.1f} s", flush=True)
    return rec


def build_model(name: str, n_classes: int, image: int = 32, seed: int = 0):
    """'wrn{depth}_{widen}', 'preresnet{depth}', 'vgg16' or 'small_cnn' (the --tiny
    net: two conv layers of width 4, no BatchNorm) from nets.training.models."""
    from nets.training.models import VGG16, PreResNet, SmallCNN, WideResNet
    if name == "small_cnn":
        return SmallCNN(in_channels=3, n_classes=n_classes, image_size=image, width=4, seed=seed)
    if name == "vgg16":
        return VGG16(n_classes=n_classes, seed=seed)
    if name.startswith("wrn"):
        depth, widen = (int(v) for v in name[3:].split("_"))
        return WideResNet(depth=depth, widen=widen, n_classes=n_classes, seed=seed)
    if name.startswith("preresnet"):
        return PreResNet(depth=int(name[9:]), n_classes=n_classes, seed=seed)
    raise ValueError(f"unknown model {name!r}")


def synthetic_cifar(N: int, image: int, n_classes: int, seed: int = 0):
    """(X, y) on the CPU: X (N, 3, image, image) ~ N(0, 1) float32; y = argmax of a
    fixed random linear map of the 4×4-average-pooled image (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 3, image, image, generator=g)
    feats = F.avg_pool2d(X, 4).flatten(1)
    W = torch.randn(feats.shape[1], n_classes, generator=g)
    return X, (feats @ W).argmax(dim=1)


def chunks_of(X, y, chunk: int):
    return [(X[i:i + chunk], y[i:i + chunk]) for i in range(0, X.shape[0], chunk)]


@torch.no_grad()
def calibrate_batchnorm(model, X, chunk: int):
    """BatchNorm running statistics = the data's (cumulative average over chunks), then
    eval mode: curvature of a network whose normalisation matches its inputs."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i in range(0, min(X.shape[0], 4 * chunk), chunk):
        model(X[i:i + chunk])
    model.eval()
    return model


def prepared_model(name, n_classes, X, chunk, device, dtype=torch.float32, seed=0):
    model = build_model(name, n_classes, image=X.shape[-1], seed=seed).to(device)
    calibrate_batchnorm(model, X[: 4 * chunk].to(device), chunk)
    return model.to(dtype)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def finite_list(a) -> list:
    return [float(v) for v in np.asarray(a, dtype=float).reshape(-1)]


# ------------------------------------------------------------------------- stage: tests
def stage_tests(ctx: Context, rec: dict, deadline: float):
    """pytest -m cuda tests/test_cuda.py in a subprocess, killed at the deadline."""
    xml = ctx.out / "tests_junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_cuda.py"), f"--junitxml={xml}"]
    env = dict(os.environ)
    if ctx.device.type == "cuda":
        env["NETS_TEST_DEVICE"] = str(ctx.device)
    rec["command"] = " ".join(cmd)
    timeout = max(1.0, deadline - time.perf_counter() - 2.0)
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rec["returncode"] = p.returncode
        rec["output_tail"] = (p.stdout + p.stderr)[-4000:]
    except subprocess.TimeoutExpired as exc:
        rec["returncode"] = None
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rec["output_tail"] = out[-4000:]
        raise StageTimeout() from None
    rec.update(_junit_counts(xml))
    rec["passed_all"] = rec["returncode"] == 0 and rec.get("failures", 1) == 0 \
        and rec.get("errors", 1) == 0
    if ctx.device.type != "cuda":
        rec["note"] = "no CUDA device: the cuda-marked tests skip themselves"


def _junit_counts(path: Path) -> dict:
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed_tests"] = [c.get("name") for c in suite.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None]
    return counts


# ------------------------------------------------------------------------ stage: timing
def _gradient_fn(model, chunks, N):
    """One full-data gradient by plain autograd over the chunks (the cost unit)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        for p in params:
            p.grad = None
        for x, y in chunks:
            (F.cross_entropy(model(x), y) * (x.shape[0] / N)).backward()
        return params[0].grad
    return run


def stage_timing(ctx: Context, rec: dict, deadline: float):
    from nets.algorithms.lanczos import eigsh, lanczos
    from nets.algorithms.slq import slq_density
    from nets.curvature.operators import hessian_operator

    c, dev = ctx.cfg["timing"], ctx.device
    rec["config"] = dict(c)
    X, y = synthetic_cifar(c["N"], c["image"], c["n_classes"], seed=ctx.args.seed)
    rec["runs"] = runs = []
    ops = {}

    def left():
        return deadline - time.perf_counter()

    # pass 1: the unit costs (gradient, HVP, Lanczos step) for every model and dtype
    for name in c["models"]:
        base = prepared_model(name, c["n_classes"], X, c["chunk"], dev)
        for dt_name in c["dtypes"]:
            dt = getattr(torch, dt_name)
            r = {"model": name, "dtype": dt_name, "N": c["N"], "P": count_params(base)}
            runs.append(r)
            model = copy.deepcopy(base).to(dt)
            chunks = [(x.to(dev, dt), t.to(dev)) for x, t in chunks_of(X, y, c["chunk"])]
            t_g, _, _ = timeit(_gradient_fn(model, chunks, c["N"]), dev, repeats=c["repeats"])
            r["gradient_s"] = t_g
            op = ctx.call(hessian_operator, model, F.cross_entropy, chunks, device=dev, dtype=dt)
            v = torch.from_numpy(np.random.default_rng(0).standard_normal(op.P)).to(dev,
                                                                                  torch.float32)
            t_h, _, hv = timeit(lambda: op.matvec(v), dev, repeats=c["repeats"])
            r["hvp_s"], r["hvp_over_gradient"] = t_h, t_h / t_g
            r["hvp_finite"] = bool(torch.isfinite(hv).all())
            r["cache_graph"] = getattr(op, "cache_graph", None)
            m = c["lanczos_steps"]
            t_l, _, lr = timeit(lambda: ctx.call(lanczos, op, num_steps=m, seed=0), dev,
                                repeats=1, warmup=0)
            r["lanczos_step_s"] = t_l / lr.num_steps
            r["lanczos_step_over_hvp"] = r["lanczos_step_s"] / t_h
            r["lanczos_step_over_gradient"] = r["lanczos_step_s"] / t_g
            ops[(name, dt_name)] = (op, r)
            ctx.save("timing", rec)
            if _pyhessian_available() and dt_name == "float32":
                _time_pyhessian(ctx, r, model, chunks, t_g, left, c)
                ctx.save("timing", rec)
    # pass 2: top-k eigenvalues and SLQ while the budget allows (estimated from the HVP)
    for (_, dt_name), (op, r) in ops.items():
        tol = 1e-3 if dt_name == "float32" else 2e-2
        est = 1.3 * c["top_max_steps"] * r["hvp_s"]
        if est < left():
            sync(dev)
            t0 = time.perf_counter()
            e = ctx.call(eigsh, op, k=c["top_k"], which="LA", tol=tol,
                         max_steps=c["top_max_steps"], seed=0, return_vectors=False)
            sync(dev)
            r["top_k"] = c["top_k"]
            r["top_s"] = time.perf_counter() - t0
            r["top_over_gradient"] = r["top_s"] / r["gradient_s"]
            r["top_hvps"] = int(e.num_matvecs)
            r["top_values"] = finite_list(e.values)
            r["top_converged"] = [bool(v) for v in e.converged]
            r["top_tol"] = tol
        else:
            r["top_skipped"] = f"estimated {est:.0f} s > {left():.0f} s left"
        ctx.save("timing", rec)
        est = 1.3 * c["slq_probes"] * c["slq_steps"] * r["hvp_s"]
        if est < left():
            sync(dev)
            t0 = time.perf_counter()
            d = ctx.call(slq_density, op, num_probes=c["slq_probes"], num_steps=c["slq_steps"],
                         seed=0)
            sync(dev)
            r["slq_s"] = time.perf_counter() - t0
            r["slq_over_gradient"] = r["slq_s"] / r["gradient_s"]
            r["slq_probes"], r["slq_steps"] = c["slq_probes"], c["slq_steps"]
            r["slq_trace_over_P"] = d.moment(1)[0]
            r["slq_support"] = list(d.support())
        else:
            r["slq_skipped"] = f"estimated {est:.0f} s > {left():.0f} s left"
        ctx.save("timing", rec)


def _pyhessian_available() -> bool:
    try:
        import pyhessian  # noqa: F401
    except Exception:                              # noqa: BLE001 - any import failure
        return False
    return True


def _time_pyhessian(ctx, r, model, chunks, t_grad, left, c):
    """PyHessian (Yao et al.) on the same model and chunks: one HVP, and its top
    eigenvalues by power iteration when the budget allows."""
    from pyhessian import hessian as PyHessian
    try:
        ph = PyHessian(model, F.cross_entropy, dataloader=chunks, cuda=ctx.device.type == "cuda")
        params = [p for p in model.parameters() if p.requires_grad]
        v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(p)
             for i, p in enumerate(params)]
        t_h, _, _ = timeit(lambda: ph.dataloader_hv_product(v), ctx.device, repeats=c["repeats"])
        r["pyhessian_hvp_s"], r["pyhessian_hvp_over_gradient"] = t_h, t_h / t_grad
        r["hvp_ours_over_pyhessian"] = r["hvp_s"] / t_h
        it = c["pyhessian_top_iters"]
        if 1.3 * c["top_k"] * it * t_h < left() / 2:
            sync(ctx.device)
            t0 = time.perf_counter()
            vals, _ = ph.eigenvalues(maxIter=it, tol=1e-3, top_n=c["top_k"])
            sync(ctx.device)
            r["pyhessian_top_s"] = time.perf_counter() - t0
            r["pyhessian_top_values"] = [float(v) for v in vals]
            r["pyhessian_top_max_iter"] = it
    except Exception as exc:                       # noqa: BLE001 - a peer's failure is data
        r["pyhessian_error"] = f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------ stage: lambda
def stage_lambda(ctx: Context, rec: dict, deadline: float):
    import nets

    c, dev = ctx.cfg["lam"], ctx.device
    dt = getattr(torch, c["dtype"])
    rec["config"] = dict(c)
    X, y = synthetic_cifar(c["N"], c["image"], c["n_classes"], seed=ctx.args.seed)
    model = prepared_model(c["model"], c["n_classes"], X, c["chunk"], dev, dt)
    chunks = [(x.to(dev, dt), t.to(dev)) for x, t in chunks_of(X, y, c["chunk"])]
    rec.update(model=c["model"], P=count_params(model), N=c["N"], dtype=c["dtype"])
    Bs = [int(b) for b in c["batch_sizes"] if b <= c["N"]]
    seed = ctx.args.seed
    sync(dev)
    t0 = time.perf_counter()
    pred = ctx.call(nets.predict_batch_top_eigenvalue, model, F.cross_entropy, chunks, Bs,
                    form="directional", seed=seed, device=dev, dtype=dt,
                    micro_batch=c["micro_batch"], num_probes=1)
    sync(dev)
    rec["predict_s"] = time.perf_counter() - t0
    rec["batch_sizes"] = Bs
    rec["lam"] = float(pred["lam"])
    forms = [f for f in ("directional", "isotropic", "subspace", "resolved") if _has(pred, f)]
    rec["predicted"] = {f: finite_list(pred[f]) for f in forms}
    if _has(pred, "directional_stderr"):
        rec["predicted_stderr"] = {"directional": finite_list(pred["directional_stderr"])}
    for k in ("s2_directional", "critical_batch_size"):
        if _has(pred, k):
            rec[k] = float(pred[k])
    rec["measured"] = {"batch_sizes": [], "mean": [], "std": [], "stderr": [], "seconds": []}
    ctx.save("lambda", rec)
    _plot_lambda(ctx, rec)
    last = None
    for B in Bs:                    # per B: the draws for B do not depend on the other sizes
        left = deadline - time.perf_counter()
        if last is not None and 1.5 * last[1] * max(1.0, B / last[0]) > left:
            rec["measured"]["skipped"] = [b for b in Bs if b >= B]
            break
        sync(dev)
        t0 = time.perf_counter()
        m = ctx.call(nets.measure_batch_top_eigenvalue, model, F.cross_entropy, chunks, [B],
                     n_batches=c["n_batches"], seed=seed, tol=c["tol"], device=dev, dtype=dt)
        sync(dev)
        last = (B, time.perf_counter() - t0)
        meas = rec["measured"]
        meas["batch_sizes"].append(B)
        for k in ("mean", "std", "stderr"):
            meas[k].append(float(np.asarray(m[k]).reshape(-1)[0]))
        meas["seconds"].append(last[1])
        meas["n_batches"] = c["n_batches"]
        ctx.save("lambda", rec)
    meas = rec["measured"]
    i = [Bs.index(b) for b in meas["batch_sizes"]]
    rec["predicted_over_measured"] = {
        f: [rec["predicted"][f][j] / mu for j, mu in zip(i, meas["mean"])] for f in forms}
    ctx.save("lambda", rec)
    _plot_lambda(ctx, rec)


def _has(result, key) -> bool:
    try:
        value = result[key]
    except (KeyError, AttributeError, TypeError):
        return False
    return value is not None


def _plot_lambda(ctx: Context, rec: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    Bs = np.asarray(rec["batch_sizes"], dtype=float)
    for f, vals in rec["predicted"].items():
        ax.plot(Bs, vals, marker=".", label=f"predicted ({f})")
    se = rec.get("predicted_stderr", {}).get("directional")
    if se is not None:
        d = np.asarray(rec["predicted"]["directional"])
        ax.fill_between(Bs, d - 2 * np.asarray(se), d + 2 * np.asarray(se), alpha=0.2)
    meas = rec.get("measured", {})
    if meas.get("batch_sizes"):
        ax.errorbar(meas["batch_sizes"], meas["mean"], yerr=2 * np.asarray(meas["stderr"]),
                    fmt="o", color="k", capsize=3, label="measured (mean ± 2 s.e.)")
    ax.axhline(rec["lam"], color="gray", ls="--", lw=1, label="λ₁ (full data)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("top eigenvalue of H_B")
    ax.set_title(f"{rec['model']}, P={rec['P']:,}, N={rec['N']} ({ctx.device.type})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = ctx.out / "lambda_prime.png"
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    rec["figure"] = path.name


# ------------------------------------------------------------------- stage: determinism
def _det_quantities(ctx: Context, seed: int) -> dict:
    """Every seeded computation of the check, as raw numpy/tensor outputs."""
    import nets
    from nets.algorithms.slq import slq_density
    from nets.curvature.operators import hessian_operator

    c, dev = ctx.cfg["det"], ctx.device
    dt = getattr(torch, c["dtype"])
    X, y = synthetic_cifar(c["N"], c["image"], c["n_classes"], seed=0)
    model = prepared_model(c["model"], c["n_classes"], X, c["chunk"], dev, dt)
    chunks = [(x.to(dev, dt), t.to(dev)) for x, t in chunks_of(X, y, c["chunk"])]
    loss = F.cross_entropy
    op = ctx.call(hessian_operator, model, loss, chunks, device=dev, dtype=dt)
    v = torch.from_numpy(np.random.default_rng(seed).standard_normal(op.P)).to(dev, dt)
    out = {"hvp": op.matvec(v).detach().cpu().double().numpy()}
    out["top_eigenvalues"] = np.asarray(ctx.call(nets.top_eigenvalues, model, loss, chunks, k=2,
                                                 tol=1e-4, device=dev, dtype=dt, seed=seed))
    d = ctx.call(slq_density, op, num_probes=2, num_steps=4, seed=seed)
    out["slq_nodes"], out["slq_weights"] = d.nodes, d.weights
    pred = ctx.call(nets.predict_batch_top_eigenvalue, model, loss, chunks, c["batch_sizes"],
                    form="directional", seed=seed, device=dev, dtype=dt, num_probes=1,
                    micro_batch=c["micro_batch"])
    out["predicted_directional"] = np.asarray(pred["directional"])
    meas = ctx.call(nets.measure_batch_top_eigenvalue, model, loss, chunks, c["batch_sizes"][:1],
                    n_batches=2, seed=seed, tol=1e-4, device=dev, dtype=dt)
    out["measured_values"] = np.concatenate([np.asarray(v) for v in meas["values"]])
    return out


def _compare(a: dict, b: dict) -> dict:
    return {k: bool(np.array_equal(np.asarray(a[k]), np.asarray(b[k]))) for k in a}


def _with_settings(deterministic: bool, warn_only: bool = False):
    """Context manager: the documented reproducibility settings (or the defaults)."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        saved = (torch.are_deterministic_algorithms_enabled(),
                 torch.is_deterministic_algorithms_warn_only_enabled(),
                 torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
        try:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
            torch.backends.cudnn.benchmark = False if deterministic else saved[2]
            torch.backends.cudnn.deterministic = deterministic or saved[3]
            yield
        finally:
            torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2:]
    return cm()


def stage_determinism(ctx: Context, rec: dict, deadline: float):
    seed = ctx.args.seed
    rec["settings"] = {"CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                       "use_deterministic_algorithms": True, "cudnn.benchmark": False}
    rec["config"] = dict(ctx.cfg["det"])
    warn_only = False
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with _with_settings(True):
                a = _det_quantities(ctx, seed)
                b = _det_quantities(ctx, seed)
        except RuntimeError as exc:
            if "deterministic" not in str(exc):
                raise
            rec["strict_error"] = str(exc)[:500]
            warn_only = True
            with _with_settings(True, warn_only=True):
                a = _det_quantities(ctx, seed)
                b = _det_quantities(ctx, seed)
    rec["warn_only"] = warn_only
    rec["seconds_per_run"] = (time.perf_counter() - t0) / 2
    rec["nondeterministic_warnings"] = sorted({str(w.message)[:300] for w in caught
                                               if "deterministic" in str(w.message)})
    rec["same_seed_identical"] = _compare(a, b)
    rec["deterministic"] = all(rec["same_seed_identical"].values())
    rec["values"] = {"top_eigenvalues": finite_list(a["top_eigenvalues"]),
                     "predicted_directional": finite_list(a["predicted_directional"]),
                     "measured_values": finite_list(a["measured_values"])}
    ctx.save("determinism", rec)
    # informational: does another seed change the seeded draws (the check can fail)?
    other = _det_quantities(ctx, seed + 1)
    rec["other_seed_differs"] = {k: not v for k, v in _compare(a, other).items()}
    ctx.save("determinism", rec)
    # informational: the default settings, when time is left
    if ctx.device.type == "cuda" and deadline - time.perf_counter() > 3 * rec["seconds_per_run"]:
        with _with_settings(False):
            c1, c2 = _det_quantities(ctx, seed), _det_quantities(ctx, seed)
        rec["default_settings_identical"] = _compare(c1, c2)


# -------------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="tiny networks and data: the same code paths in seconds (CPU)")
    p.add_argument("--device", default=None,
                   help="cuda (default when available) or cpu; the full run needs cuda")
    p.add_argument("--out", default=None,
                   help="output folder (default $OUT if set, else benchmarks/results/gpu)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiply every stage's time budget (full run: 460 s in all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = os.environ.get("OUT") or str(RESULTS / "gpu")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"unknown stages {bad}; choose from {STAGES}")
    args.stages = stages
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("the full-size check needs a CUDA device (VGG-16 and WRN at "
                         "N = 10,000 take hours on a CPU); use --tiny on a CPU")
    cfg = TINY if args.tiny else FULL
    Path(args.out).mkdir(parents=True, exist_ok=True)
    ctx = Context(args, cfg, device)
    fns = {"tests": stage_tests, "timing": stage_timing, "lambda": stage_lambda,
           "determinism": stage_determinism}
    t0 = time.perf_counter()
    for name in args.stages:
        run_stage(ctx, name, fns[name], cfg["budgets"][name] * args.budget_scale)
    ctx.summary["total_seconds"] = time.perf_counter() - t0
    ctx.save("summary", ctx.summary)
    print(json.dumps(ctx.summary["stages"], indent=1), flush=True)
    return ctx.summary


if __name__ == "__main__":
    summary = main()
    sys.exit(0 if all(s["status"] == "ok" for s in summary["stages"].values()) else 1)
