"""Memory and time of one Hessian-vector product on an (X, y) pair without `chunk_size`:
the default chunks (sized from the measured autograd graph per sample,
`nets.curvature.operators.default_chunk_size`) against one chunk of all N samples (what
the default was before session 42) and against an explicit chunk of 500.

Problem: a CNN with BatchNorm and Dropout (policy "eval"; 123,178 parameters) on N
CIFAR-shaped random images with random labels, float32, one thread. Each setting runs in
its own child process, so its peak RSS (`resource.getrusage`) is its own; the product is
timed twice after the operator is built (the second is reported). The products must
agree to float32 round-off.

Usage: python -m benchmarks.bench_default_chunks [--N 10000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 16, 96), nn.ReLU(), nn.Dropout(0.3), nn.Linear(96, 10))


def images(N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, 3, 32, 32, generator=g),
            torch.randint(0, 10, (N,), generator=g))


def one(N: int, chunk: str) -> dict:
    """One setting in this process: chunk "default", "all" (= N) or an integer."""
    import nets

    torch.set_num_threads(1)
    model, data = cnn(), images(N)
    size = None if chunk == "default" else N if chunk == "all" else int(chunk)
    op = nets.hessian_operator(model, F.cross_entropy, data, policy="eval", chunk_size=size,
                               cache_graph=False)
    v = torch.randn(op.P, generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(2):
        t = time.perf_counter()
        hv = op @ v
        times.append(time.perf_counter() - t)
    return dict(chunk=chunk, chunk_size=op.chunk_size, N=N, P=op.P,
                graph_kb_per_sample=round(op._graph_bytes_per_sample() / 1e3, 1),
                hvp_s=round(times[-1], 2), vHv=float(v @ hv),
                peak_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=10000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(one(args.N, args.child)))
        return
    rows = []
    for chunk in ("default", "500", "all"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_default_chunks",
                              "--N", str(args.N), "--child", chunk],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    ref = rows[-1]["vHv"]
    summary = dict(rows=rows, max_rel_diff_vHv=max(abs(r["vHv"] - ref) / abs(ref) for r in rows),
                   memory_ratio_all_over_default=round(rows[-1]["peak_gib"] / rows[0]["peak_gib"], 2),
                   time_ratio_all_over_default=round(rows[-1]["hvp_s"] / rows[0]["hvp_s"], 2))
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(summary, fh, indent=1)


if __name__ == "__main__":
    main()
