"""Held out, from an outside check (session 53): SGD transfer on a GRU fed by a DataLoader and an MSE autoencoder.

Two networks of kinds none of the forms was developed on, with their recipes written down
before any threshold was measured:

* "gru": nn.GRU(4 → 16, batch_first) and a linear head on the last step's output
  (1,107 parameters), cross-entropy, on 1,000 synthetic sequences of 12 steps with 4
  channels (N(0, 1) noise; class c ∈ {0, 1, 2} adds 0.8·sin(π(c + 1)t/2), t ∈ [−1, 1], to
  channel c), handed to the package as a `DataLoader(batch_size=100, shuffle=False)` —
  the way a user holds sequence data;
* "ae": a 64-32-8-32-64 tanh autoencoder (4,744 parameters) on the 1,797 standardised
  digits (`nets.load_digits()`), target = input, `F.mse_loss` (a mean over 64 outputs
  per sample: the per-sample loss is itself a mean, which the package's convention
  allows).

Both trained with `nets.training.loops.train` (SGD lr 0.05, momentum 0.9, B = 32, init
from `torch.manual_seed(seed)`, batches reshuffled by a generator seeded `seed`; 40 epochs
for the GRU, 200 for the autoencoder) and measured as in `bench_heldout_transfer.py`
(`default_form_row`): the real divergence threshold (loss ever > 10× start within 200
steps, `training_threshold`, batch sequences 0–7) at B = 8, 32, 128, 512 and
`transfer_lr`'s default form anchored at B₀ = 32 and 512, with the other forms re-derived
from it and the linear, √B and constant rules anchored the same way.

    python benchmarks/bench_heldout_gru_ae.py --net gru                  # ~6 min, one thread
    python benchmarks/bench_heldout_gru_ae.py --net gru --momentum 0.9   # ~6 min
    python benchmarks/bench_heldout_gru_ae.py --net ae                   # ~12 min
"""

from __future__ import annotations

import math
import time

from _common import base_parser, setup_torch, stored_parts, write_part
from bench_heldout_transfer import default_form_row, rules_row

SEEDS = tuple(range(8))


def sequences(N=1000, T=12, seed=0):
    """(X (N, T, 4), y (N,)): the GRU's data (module docstring)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (N,), generator=g)
    X = torch.randn(N, T, 4, generator=g)
    t = torch.linspace(-1, 1, T)
    for c in range(3):
        X[y == c, :, c] += 0.8 * torch.sin(math.pi * (c + 1) * t / 2)
    return X, y


def gru_classifier():
    """The GRU network (module docstring), untrained."""
    from torch import nn

    class GRUClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(4, 16, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            out, _ = self.gru(x)
            return self.head(out[:, -1])

    return GRUClassifier()


def autoencoder():
    """The autoencoder (module docstring), untrained."""
    from torch import nn

    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 8), nn.Tanh(),
                         nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 64))


def trained(net, seed=0, epochs=None):
    """(model in eval mode, loss_fn, data) at the checkpoint; data as the user holds it
    (`epochs` overrides the recipe's, for tests)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from nets import load_digits
    from nets.training.loops import train

    torch.manual_seed(seed)
    if net == "gru":
        X, y = sequences()
        model, loss_fn, recipe = gru_classifier(), F.cross_entropy, 40
        data = DataLoader(TensorDataset(X, y), batch_size=100, shuffle=False)
    else:
        X, _ = load_digits()
        y = X.clone()
        model, loss_fn, recipe = autoencoder(), F.mse_loss, 200
        data = (X, y)
    train(model, loss_fn, (X, y), epochs=recipe if epochs is None else epochs, lr=0.05,
          batch_size=32, momentum=0.9, seed=seed)
    return model.eval(), loss_fn, data


def run(net, momentum, seed=0, progress=False):
    import torch

    from nets import as_data_source

    model, loss_fn, data = trained(net, seed)
    X, y = as_data_source(data).tensors()
    with torch.no_grad():
        out_ = model(X)
        loss = float(loss_fn(out_, y))
        acc = float((out_.argmax(1) == y).float().mean()) if net == "gru" else float("nan")
    out, real, default = default_form_row(model, loss_fn, data, momentum=momentum, seeds=SEEDS,
                                          progress=progress)
    return rules_row(f"{net} m = {momentum}: loss {loss:.4f}, accuracy {acc:.4f}", out, real,
                     default, checkpoint_loss=loss, checkpoint_accuracy=acc)


def main():
    p = base_parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--net", choices=("gru", "ae"), required=True)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="training seed of the checkpoint")
    args = p.parse_args()
    setup_torch(args)
    path, stored = stored_parts("bench_heldout_gru_ae", args.out)
    t0 = time.perf_counter()
    part = run(args.net, args.momentum, args.seed)
    write_part("bench_heldout_gru_ae", path, stored, f"{args.net}_m{args.momentum:g}_seed{args.seed}",
               part, t0)


if __name__ == "__main__":
    main()
