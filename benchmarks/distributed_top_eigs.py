"""Launcher example: top Hessian eigenvalues over data shards with torch.distributed.

    torchrun --standalone --nproc_per_node=2 benchmarks/distributed_top_eigs.py            # CPU, gloo
    torchrun --standalone --nproc_per_node=8 benchmarks/distributed_top_eigs.py \
        --backend nccl --device cuda                                                      # one GPU per rank

Each rank takes its contiguous shard of the digits data (`nets.curvature.distributed.shard_dataset`,
sizes differ by at most one), builds `distributed_hessian_operator` and runs the same
`nets.algorithms.lanczos.eigsh` with the same seed (replicated Lanczos; every product is an
all-reduce of the shard products weighted by N_r/N). Rank 0 checks the result against a
single-process operator on the full data (`--check`), prints the eigenvalues and the
time per distributed product, and writes benchmarks/results/distributed_top_eigs_<world>.json
(or `--out FILE`; run under torchrun, e.g. `torchrun --standalone --nproc_per_node=2
benchmarks/distributed_top_eigs.py --check --out /tmp/d.json`).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import environment, write_json

from nets.algorithms.lanczos import eigsh
from nets.curvature.distributed import distributed_hessian_operator, shard_dataset
from nets.curvature.operators import hessian_operator
from nets.training.loops import trained_digits_mlp


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="gloo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--dtype", default="float64")
    p.add_argument("--check", action="store_true", help="compare with one process on rank 0")
    p.add_argument("--out", default=None,
                   help="JSON file to write (default: benchmarks/results/distributed_top_eigs_"
                        "<world>.json, the committed result)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)
    try:
        model, data = trained_digits_mlp()
        model = model.to(device)
        shard = shard_dataset(data)
        op = distributed_hessian_operator(model, F.cross_entropy, shard, dtype=dtype,
                                          device=device, cache_graph=True)
        dist.barrier()
        t0 = time.perf_counter()
        res = eigsh(op, k=args.k, which="LA", tol=1e-8, seed=0, return_vectors=False)
        dt = time.perf_counter() - t0
        out = {"world_size": world, "backend": args.backend, "N": op.N, "local_N": op.local_N,
               "P": op.P, "top": res.values, "residuals": res.residuals,
               "matvecs": res.num_matvecs, "seconds": dt, "seconds_per_product": dt / res.num_matvecs}
        if rank == 0:
            if args.check:
                single = hessian_operator(model, F.cross_entropy, data, dtype=dtype, device=device)
                ref = eigsh(single, k=args.k, which="LA", tol=1e-8, seed=0,
                            return_vectors=False).values
                out["max_rel_diff_vs_single_process"] = float(np.max(np.abs(res.values - ref) / np.abs(ref)))
            print(f"world {world} ({args.backend}): shard sizes sum to N={op.N} (rank 0 holds "
                  f"{op.local_N}); top-{args.k} {np.array2string(res.values, precision=8)}; "
                  f"{res.num_matvecs} products, {dt * 1e3 / res.num_matvecs:.2f} ms each", flush=True)
            if "max_rel_diff_vs_single_process" in out:
                print(f"max relative difference vs one process: "
                      f"{out['max_rel_diff_vs_single_process']:.1e}")
            path = write_json(f"distributed_top_eigs_{world}", {"environment": environment(device), **out},
                              args.out)
            print(f"wrote {path}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
