"""The linearised network on the held-out ReLU MLP: does it carry that network's SGD thresholds?

`bench_lr_transfer.py --nets mlp_relu` measured the real divergence thresholds of a ReLU
MLP 64-64-32 (seed 1) that no SGD form was developed on; the directional transfer misses
there by up to 2.3× (m = 0). This runs `nets.linearized_threshold` (cross-entropy of the
linearised logits z_i + J_i e, the real protocol: seeded batches, 200 steps, loss ever
> k× start) on that network for m = 0 and 0.9, 2 seeds, k = 10 with k = 3 and 100 read
from the same runs, and writes the per-seed thresholds to
benchmarks/results/bench_linearized_relu.json ({momentum: {k: [[seed thresholds] per B]}})
for comparison with the real ones in bench_lr_transfer_relu.json.

    python benchmarks/bench_linearized_relu.py [--out FILE]   # ~40 min on two cores
"""

import argparse
import json
from pathlib import Path

import torch
from _common import RESULTS
from bench_criterion import network

from nets import linearized_threshold

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS / "bench_linearized_relu.json"),
                    help="JSON file to write (default: the committed result)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, data, loss = network("mlp_relu")
    out = {}
    for m in (0.0, 0.9):
        thr = linearized_threshold(model, loss, data, [8, 32, 128, 512], momentum=m,
                                   factor=10.0, extra_factors=(3.0, 100.0), steps=200, seeds=(0, 1),
                                   progress=False)
        out[m] = {k: thr.at(k).tolist() for k in (3.0, 10.0, 100.0)}
        print(m, out[m], flush=True)
    Path(args.out).write_text(json.dumps(out))
