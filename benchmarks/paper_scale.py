"""Paper-scale run plan (docs/theory.md §7): batch-Hessian spectra of VGG-16 / WideResNet-28-10
on CIFAR-100, on a CUDA GPU. UNMEASURED in this repository (no GPU was available).

What it does, per checkpoint: for every batch size B in `--batch-sizes` (default
1, 2, 4, …, 1024) and every seed in 0..`--seeds`−1, draw B training samples without
replacement (`numpy.random.default_rng(seed·7919 + B)`), build the batch Hessian H_B
(`nets.curvature.operators.batch_hessian_operator`, BatchNorm in eval mode by default:
`--policy`), run `--steps` Lanczos steps (default 100, full reorthogonalisation,
float64 recurrence and basis) on HVPs computed in `--dtype` (float32 or bfloat16), and
store λ_max, λ_min, the Ritz values/weights, timings and the HVP count under the key
"<model>/<checkpoint>/B=<B>/seed=<seed>" in a JSON-lines store
(`nets.utils.jsonl_store.JsonlStore`): an interrupted run resumes where it stopped.
The full-data λ_1(H) (B = N) is measured once per checkpoint with `eigsh` on chunks of
`--chunk` samples.

Cost model (printed by `--plan`, no GPU needed): one HVP on B samples costs ≈ 2-3
gradient evaluations of B samples (measured ratio on CPU: benchmarks/README.md); the
sweep needs Σ_B seeds·steps HVPs with total sample count seeds·steps·Σ_B B
(≈ 10·100·2047 ≈ 2·10⁶ sample-HVPs per checkpoint, i.e. ~40 epochs-worth of
gradient work on CIFAR-100 per checkpoint, plus the full-data eigsh).

Usage (on a GPU machine):

    python benchmarks/paper_scale.py --root /data/cifar --model vgg16 \
        --checkpoint ckpt/vgg16_epoch100.pt --dtype bfloat16 --out results/vgg16.jsonl
    python benchmarks/paper_scale.py --plan --model wrn28_10     # print the plan only

Without CUDA (and without `--plan`) it stops with an explanatory error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import RESULTS, environment


class LowPrecisionProducts:
    """Workaround, used for --dtype bfloat16: present an operator whose products run in
    bfloat16 to `nets.algorithms.lanczos` as a float32 operator. nets.algorithms.lanczos derives its breakdown
    threshold from the operator dtype's eps (10·eps·√P·‖A‖, about ‖A‖ for bfloat16), so
    on a raw bfloat16 operator it stops after one step (measured on the digits MLP:
    `lanczos(op_bf16, 30)` returns 1 step, λ_max 0.0034 instead of 0.266). Through this
    wrapper the recurrence (float64) sees float32 eps; the products keep bfloat16 cost
    and bfloat16 error (≈ 1.6e-2 relative on the digits MLP)."""

    def __new__(cls, inner, report_dtype=torch.float32):
        from nets.curvature.operators import CurvatureOperator

        class _Wrapped(CurvatureOperator):
            def __init__(self):
                super().__init__(inner.P, report_dtype, inner.device, inner.param_names)
                self.inner = inner

            def _matvec(self, v):
                return self.inner.matvec(v)

            def _matmat(self, V):
                return self.inner.matmat(V)

        return _Wrapped()


MODELS = {"vgg16": dict(name="vgg16", n_classes=100),
          "wrn28_10": dict(name="wrn28_10", n_classes=100)}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", help="folder holding cifar-100-python/ (nets.load_cifar)")
    p.add_argument("--model", choices=sorted(MODELS), default="vgg16")
    p.add_argument("--checkpoint", action="append", default=[],
                   help="state dict saved by nets.training.loops.save_checkpoint (repeatable); "
                        "none: the freshly initialised network")
    p.add_argument("--batch-sizes", default=",".join(str(2 ** i) for i in range(11)))
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="precision of the HVPs; the Lanczos recurrence is always float64")
    p.add_argument("--policy", choices=("eval", "train_batch_stats"), default="eval")
    p.add_argument("--chunk", type=int, default=256, help="samples per chunk inside one HVP")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=str(RESULTS / "paper_scale.jsonl"))
    p.add_argument("--plan", action="store_true", help="print the plan and cost model, run nothing")
    return p.parse_args(argv)


def plan(args) -> dict:
    Bs = [int(b) for b in args.batch_sizes.split(",")]
    n_runs = len(Bs) * args.seeds * max(1, len(args.checkpoint))
    sample_hvps = args.seeds * args.steps * sum(Bs) * max(1, len(args.checkpoint))
    return {"model": args.model, "batch_sizes": Bs, "seeds": args.seeds, "steps": args.steps,
            "dtype": args.dtype, "lanczos_runs": n_runs, "hvps": n_runs * args.steps,
            "sample_hvps": sample_hvps, "epochs_equivalent_hvp_work": sample_hvps / 50_000}


def main(argv=None):
    args = parse(argv)
    pl = plan(args)
    if args.plan:
        for k, v in pl.items():
            print(f"{k:28s} {v}")
        return pl
    if not str(args.device).startswith("cuda") or not torch.cuda.is_available():
        raise SystemExit(
            "paper_scale.py needs a CUDA GPU (VGG-16 / WRN-28-10 batch-Hessian spectra for "
            "B up to 1024 are days of CPU time): torch.cuda.is_available() is "
            f"{torch.cuda.is_available()}, --device {args.device}. Use --plan to print the "
            "plan without running it.")
    if not args.root:
        raise SystemExit("--root is required: the folder holding cifar-100-python/")

    from nets.algorithms.lanczos import eigsh, lanczos
    from nets.curvature.operators import batch_hessian_operator, hessian_operator
    from nets.training.data import load_cifar
    from nets.training.loops import load_checkpoint
    from nets.training.models import make_model
    from nets.utils.jsonl_store import JsonlStore

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    X, y = load_cifar(args.root, "cifar100", train=True)
    X, y = X.to(device), y.to(device)
    N = X.shape[0]
    store = JsonlStore(Path(args.out))
    Bs = pl["batch_sizes"]
    ckpts = args.checkpoint or [None]
    print(environment(device), flush=True)
    for ck in ckpts:
        model = make_model(**MODELS[args.model]).to(device)
        if ck is not None:
            load_checkpoint(model, ck, map_location=device)
        model.eval()
        tag = f"{args.model}/{Path(ck).stem if ck else 'init'}"

        def full():
            op = hessian_operator(model, F.cross_entropy, (X, y), dtype=dtype,
                                  policy=args.policy, chunk_size=args.chunk)
            if dtype == torch.bfloat16:
                op = LowPrecisionProducts(op)
            t0 = time.perf_counter()
            tol = 1e-4 if dtype == torch.float32 else 1e-2     # bfloat16 products: ~1e-2 noise
            r = eigsh(op, k=1, which="LA", tol=tol, seed=0, return_vectors=False)
            torch.cuda.synchronize()
            return {"lambda_max": float(r.values[0]), "residual": float(r.residuals[0]),
                    "hvps": r.num_matvecs, "seconds": time.perf_counter() - t0}

        rec = store.get_or_compute(f"{tag}/full", full)
        print(f"{tag}: full-data λ_max = {rec['lambda_max']:.4g} ({rec['seconds']:.0f} s)", flush=True)
        for B in Bs:
            for seed in range(args.seeds):
                key = f"{tag}/B={B}/seed={seed}"
                if key in store:
                    continue
                idx = np.random.default_rng(seed * 7919 + B).choice(N, size=B, replace=False)
                op = batch_hessian_operator(model, F.cross_entropy, (X, y), idx, dtype=dtype,
                                            policy=args.policy,
                                            chunk_size=min(B, args.chunk))
                if dtype == torch.bfloat16:
                    op = LowPrecisionProducts(op)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                r = lanczos(op, args.steps, seed=seed)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                store.put(key, {"B": B, "seed": seed, "lambda_max": float(r.ritz_values[-1]),
                                "lambda_min": float(r.ritz_values[0]),
                                "ritz_values": r.ritz_values, "ritz_weights": r.ritz_weights,
                                "steps": r.num_steps, "seconds": dt,
                                "seconds_per_hvp": dt / r.num_steps, "dtype": args.dtype})
                print(f"{key}: λ_max {r.ritz_values[-1]:.4g}  λ_min {r.ritz_values[0]:.4g}  "
                      f"{dt:.1f} s", flush=True)
    return pl


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
