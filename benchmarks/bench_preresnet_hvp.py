"""One Hessian-vector product on PreResNet-8 (BatchNorm in eval mode, CIFAR-shaped data):
`nets` against PyHessian's product (plain autograd double backward through a gradient
graph that is built once and kept, which is what `pyhessian.hessian(data=(X, y))` does).

Both are timed interleaved in one process, one thread, best of `--repeats`; the ratio
ours / double-backward is what the issue's "product gap" asks about. The products agree
to float32 round-off (checked). Usage:
    python -m benchmarks.bench_preresnet_hvp [--N 500] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

if __package__ in (None, ""):     # run as a script: the repository root is not on the path
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_scale import trained_preresnet8  # noqa: E402
from nets.curvature.operators import hessian_operator


def _double_backward(model, X, y):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(X), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def hv(v):
        vs, off = [], 0
        for p in params:
            vs.append(v[off:off + p.numel()].view_as(p))
            off += p.numel()
        out = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        return torch.cat([o.reshape(-1) for o in out])
    return hv


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, (X, y) = trained_preresnet8(a.N)
    rows = {}
    for cache in (True, False):
        op = hessian_operator(model, F.cross_entropy, (X, y), cache_graph=cache)
        t0 = time.perf_counter()
        hv = _double_backward(model, X, y)
        t_build = time.perf_counter() - t0
        v = torch.randn(op.P, generator=torch.Generator().manual_seed(0))
        ref = hv(v)
        ours = op.matvec(v)
        rel = float(torch.linalg.vector_norm(ours - ref) / torch.linalg.vector_norm(ref))
        t_ours, t_db = [], []
        for _ in range(a.repeats):
            t = time.perf_counter()
            op.matvec(v)
            t_ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            hv(v)
            t_db.append(time.perf_counter() - t)
        rows["cached" if cache else "streamed"] = dict(
            ours_s=min(t_ours), double_backward_s=min(t_db), graph_build_s=t_build,
            ratio=min(t_ours) / min(t_db), rel_diff=rel, cache_graph=op.cache_graph)
    out = dict(model="PreResNet-8 (eval BN)", N=a.N, P=sum(p.numel() for p in model.parameters()),
               threads=a.threads, repeats=a.repeats, rows=rows)
    print(json.dumps(out, indent=1))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
