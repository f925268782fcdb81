"""Cost of the λ'(B) prediction forms at scale, in full-data HVPs, time and peak memory.

For each problem (the digits MLP; CIFAR-shaped synthetic data through a small CNN):
one full-data HVP is timed, then each noise estimate is timed and expressed as a
multiple of it, with its result against the exhaustive form (exact=True) where that
is affordable. Ratios are measured in the same run. Peak memory: `tracemalloc` does not
see torch's allocator, so the CPU figure is the growth of the process's peak RSS
(`resource.getrusage`), an upper bound; on CUDA `torch.cuda.max_memory_allocated`.

Usage: python -m benchmarks.bench_scale [--quick] [--device cuda]
Prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _peak_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _cifar_like(N, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (N,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    return model.to(device).eval(), (X.to(device), y.to(device))


def bench(name, model, data, device, *, exact_ok=True):
    from nets.algorithms.lanczos import eigsh
    from nets.curvature.operators import hessian_operator
    from nets.noise.directional import directional_noise_from_operator, isotropic_noise_from_operator

    op = hessian_operator(model, F.cross_entropy, data, device=device)
    v = torch.randn(op.P, dtype=op.dtype, device=op.device)
    op.matvec(v)
    _, t_hvp = _timed(lambda: op.matvec(v))
    top, t_top = _timed(lambda: eigsh(op, k=1, which="LA", tol=1e-6, seed=0))
    u = top.vectors[:, 0]
    row = dict(problem=name, N=op.N, P=op.P, hvp_s=round(t_hvp, 4),
               top_eig_hvps=round(t_top / t_hvp, 1), cache_graph=op.cache_graph)
    est, t = _timed(lambda: directional_noise_from_operator(op, u, seed=0))
    row.update(directional_hvps=round(t / t_hvp, 1), directional_s2=est.s2,
               directional_rel_se=est.stderr / est.s2, directional_used=est.n_used)
    if exact_ok:
        ex, t = _timed(lambda: directional_noise_from_operator(op, u, exact=True))
        row.update(directional_exact_hvps=round(t / t_hvp, 1), directional_exact_s2=ex.s2)
    est, t = _timed(lambda: isotropic_noise_from_operator(op, num_probes=10, seed=0))
    row.update(isotropic_hvps=round(t / t_hvp, 1), isotropic_used=est.n_used)
    row["peak_mb"] = round(_peak_mb(device), 1)
    return row


def bench_resolved(model, data, device, Bs):
    from nets.algorithms.lanczos import eigsh
    from nets.curvature.operators import hessian_operator
    from nets.noise.resolved_noise import resolved_batch_top_eigenvalue, resolved_noise_from_operator
    op = hessian_operator(model, F.cross_entropy, data, device=device)
    v = torch.randn(op.P, dtype=op.dtype, device=op.device)
    op.matvec(v)
    _, t_hvp = _timed(lambda: op.matvec(v))
    top = eigsh(op, k=10, which="LA", tol=1e-6, seed=0)
    out = {}
    for label, kw in (("scaled", {}), ("exact", dict(exact=True))):
        rn, t = _timed(lambda: resolved_noise_from_operator(op, top.vectors, min_batch=min(Bs),
                                                            seed=0, **kw))
        r = resolved_batch_top_eigenvalue(rn, Bs, n_batches=500, seed=0)
        out[label] = dict(hvps=round(t / t_hvp, 1), counted_products=rn.full_products,
                          kept=int(rn.index.size), candidates=rn.n_candidates,
                          mean=np.round(r["mean"], 4).tolist())
    return dict(problem="digits resolved", batch_sizes=list(Bs), **out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    from nets.training.loops import trained_digits_mlp
    model, data = trained_digits_mlp(0)
    print(json.dumps(bench("digits MLP", model.to(args.device),
                           tuple(t.to(args.device) for t in data), args.device)), flush=True)
    for N in ([1000] if args.quick else [1000, 5000]):
        m, d = _cifar_like(N, device=args.device)
        print(json.dumps(bench(f"CIFAR-shaped CNN N={N}", m, d, args.device,
                               exact_ok=N <= 1000)), flush=True)
    if not args.quick:
        print(json.dumps(bench_resolved(model, data, args.device, [8, 32, 128, 512])),
              flush=True)


if __name__ == "__main__":
    main()
