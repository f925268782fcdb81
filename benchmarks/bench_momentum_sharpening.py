"""Why heavy-ball SGD (m = 0.9) at large B fails below its linearised network: the weights sharpen on the way.

At m = 0 the r = 200 linearised network, corrected along u, carries the real divergence
threshold across B within ~15 % (`bench_heldout_transfer.py`); with m = 0.9 the real
threshold at B = 512 is 0.53–0.86× the linearised one on four networks, although the
local heavy-ball limit α·λ₁ < 2(1+m) is nowhere near crossed at the checkpoint. This
script follows real runs from the checkpoint and reads λ₁, the full-data loss and
‖w_t − w₀‖ every 10 steps (`nets.lr_search.self_stabilisation(every=10)`), at 0.8× and
1.2× the measured threshold (B = 512, m = 0.9, and m = 0 at 1.2× its own threshold for
comparison; seed 0), on the two held-out MLPs of `bench_heldout_transfer.py`.

    python benchmarks/bench_momentum_sharpening.py          # ~3 min, one thread
"""

from __future__ import annotations

import json

import numpy as np
from _common import RESULTS, base_parser, environment, setup_torch, write_json
from bench_heldout_transfer import HELD_OUT, output_name

B = 512
CASES = ((0.9, 0.8), (0.9, 1.2), (0.0, 1.2))       # (momentum, × measured threshold)


def follow(name):
    import torch.nn.functional as F

    from nets import top_eigenvalues
    from nets.learning_rates.lr_search import self_stabilisation
    from nets.training.loops import trained_digits_mlp

    model, data = trained_digits_mlp(**HELD_OUT[name])
    lam = float(top_eigenvalues(model, F.cross_entropy, data, k=1, seed=0, policy="eval")[0])
    rows = []
    for m, mult in CASES:
        stored = json.loads((RESULTS / f"{output_name(name, m)}.json").read_text())
        threshold = float(stored["real"][stored["batch_sizes"].index(B)])
        lr = mult * threshold
        st = self_stabilisation(model, F.cross_entropy, data, factor=lr * lam, batch_size=B,
                                steps=200, momentum=m, seed=0, every=10)
        edge = 2 * (1 + m) / lr
        first = st.trace_lam[:4]                                   # steps 0 … 30
        print(f"{name} m={m:g} lr={lr:.3g} ({mult:g}× threshold): λ₁·α/(2(1+m)) at start "
              f"{st.trace_lam[0] / edge:.2f}, largest in steps ≤ 30 {np.nanmax(first) / edge:.2f}; "
              f"loss/start max {np.nanmax(st.trace_loss_ratio):.3g}, last "
              f"{st.trace_loss_ratio[-1]:.3g}; ‖Δw‖ at step 10, 20: "
              f"{np.round(st.trace_distance[1:3], 1)}", flush=True)
        rows.append({"momentum": m, "multiple": mult, "threshold": threshold, "lr": lr,
                     "edge_lam": edge, **st.to_dict()})
    return {"lam": lam, "runs": rows}


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    setup_torch(args)
    out = {"environment": environment(), "batch_size": B, "cases": CASES,
           "nets": {name: follow(name) for name in HELD_OUT}}
    print("wrote", write_json("bench_momentum_sharpening", out, args.out))


if __name__ == "__main__":
    main()
