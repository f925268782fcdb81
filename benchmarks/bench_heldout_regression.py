"""Held out (session 54): SGD transfer on a scalar-output regression MLP with a squared-error loss.

A kind of network none of the forms was developed on — one output per sample, a
regression target, Softplus units — with its recipe and the prediction written down
before any threshold was measured:

* "digit_value": a 64-48-24-1 Softplus MLP (4,321 parameters) regressing the digit's
  value from the 1,797 standardised digits (`nets.load_digits()`), target
  (digit − 4.5)/2.87, `F.mse_loss` on (N, 1) outputs and (N, 1) targets; trained with
  `nets.training.loops.train` (SGD lr 0.02, momentum 0.9, B = 32, 60 epochs, init from
  `torch.manual_seed(seed)`).

Measured as in `bench_heldout_transfer.py` (`default_form_row`): the real divergence
threshold (loss ever > 10× start within 200 steps, `training_threshold`, batch sequences
0–7) at B = 8, 32, 128, 512 and `transfer_lr`'s default form anchored at B₀ = 32 and 512,
with the other forms re-derived from it and the linear, √B and constant rules anchored
the same way. Its linearised network runs with the exact quadratic form of the full-data
loss (`nets.learning_rates.linearized`, a squared error is quadratic in the outputs).

Predicted before the run: with m = 0 the default transfer within 15 % at every B from
both anchors (the squared-error MLPs measured so far: 0.64–1.15, three of four within
15 %); with m = 0.9 a miss of 20 %, too high upward from B₀ = 32 (as on 25 of 28 cases).

    python benchmarks/bench_heldout_regression.py                  # ~5 min, one thread
    python benchmarks/bench_heldout_regression.py --momentum 0.9
"""

from __future__ import annotations

from bench_heldout_transfer import default_form_row, heldout_main, rules_row

SEEDS = tuple(range(8))


def regression_mlp():
    """The 64-48-24-1 Softplus MLP (module docstring), untrained."""
    from torch import nn

    return nn.Sequential(nn.Linear(64, 48), nn.Softplus(), nn.Linear(48, 24), nn.Softplus(),
                         nn.Linear(24, 1))


def trained(seed=0, epochs=60):
    """(model in eval mode, loss_fn, (X, y)) at the checkpoint."""
    import torch
    import torch.nn.functional as F

    from nets import load_digits
    from nets.training.loops import train

    torch.manual_seed(seed)
    X, digit = load_digits()
    y = ((digit.float() - 4.5) / 2.87).reshape(-1, 1)
    model = regression_mlp()
    train(model, F.mse_loss, (X, y), epochs=epochs, lr=0.02, batch_size=32, momentum=0.9,
          seed=seed)
    return model.eval(), F.mse_loss, (X, y)


def run(momentum, seed=0, progress=False):
    import torch

    model, loss_fn, data = trained(seed)
    X, y = data
    with torch.no_grad():
        loss = float(loss_fn(model(X), y))
    out, real, default = default_form_row(model, loss_fn, data, momentum=momentum, seeds=SEEDS,
                                          progress=progress)
    return rules_row(f"digit_value m = {momentum}: loss {loss:.4f}", out, real, default,
                     checkpoint_loss=loss)


def main():
    heldout_main(__doc__, "bench_heldout_regression", "digit_value", run)


if __name__ == "__main__":
    main()
