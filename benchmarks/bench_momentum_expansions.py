"""Which part of the network's nonlinearity sets the real threshold the linearised network misses.

The linearised network (outputs z + J·e, the loss exact) carries the real divergence
threshold across B on cross-entropy networks at m = 0, but with heavy-ball momentum
(m = 0.9) the real threshold at large B is 0.54–0.87× the linearised one on the digits
MLPs, and on networks trained with ½‖f − e_y‖² the real network is 1.3–5× *more* stable
than its linearisation (`bench_heldout_transfer.py`). Two models of the network that keep
more of it than the linearisation, each run under the real protocol (divergence: the
full-data loss ever > 10× its start within 200 steps, heavy ball in torch's convention,
the same eight batch sequences, seeds 0–7), say which part matters:

* **frozen gates** (`FrozenGates`): every elementwise activation σ is replaced by its
  tangent at the checkpoint's own pre-activation of that sample, σ(a) → σ(a₀) + σ'(a₀)·(a − a₀),
  every max-pool keeps each sample's checkpoint choices, and every other layer (Linear,
  convolution, BatchNorm in eval mode, average pooling) stays as it is. The outputs are
  then a polynomial in the weights (bilinear for one hidden layer): the layers still
  multiply each other, so the Jacobian changes as the weights move (the mechanism of the
  catapult in a two-layer linear network), but no unit saturates or switches. For a
  ReLU network this is the real network as long as no unit changes sign and no pooling
  choice changes. At w₀ outputs and gradients equal the real network's. Thresholds by
  `training_threshold` on the model fed [sample index, features] per row
  (`FrozenGates.inputs`), so batches and protocol are those of the real runs.
* **second-order outputs** (`SecondOrderOutputs`): z(w₀ + e) = z + J·e + ½·∂²z[e, e] through
  the network (nested forward-mode products), the loss exact — the next order of the
  linearisation, which holds activation curvature and layer coupling to second order
  only. Thresholds by `linearized_max_loss` on a grid of 41 learning rates from 1/20 to 5×
  the measured threshold (spacing 1.16×).

Networks: the development digits MLP (tanh, "mlp"; and trained on ½‖f − e_y‖², "mse"),
the ReLU MLP ("mlp_relu"), the held-out GELU and tanh MLPs ("gelu", "tanh64"), the
MSE-trained GELU digits MLP and GELU/SiLU breast-cancer MLP ("mse_gelu", "mse_tabular"),
and, added after them with a prediction written down first (docs/real_training.md), the development
CNN (tanh, max-pool, "cnn"), the held-out BatchNorm CNN (ReLU, max-pool, "bn_cnn") and the
plain cross-entropy breast-cancer MLPs of bench_heldout_tabular.py ("tabular",
"tabular_seed1"; GELU/SiLU, train seeds 0 and 1, their stored "plain" rows). Real thresholds, the r = 200
linearised ones and their correction along u are read from
`bench_heldout_transfer.py`'s stored results for the same network and momentum.

    python benchmarks/bench_momentum_expansions.py --net gelu --momentum 0.9          # ~2.5 min
    python benchmarks/bench_momentum_expansions.py --net gelu --momentum 0.9 --second-order  # +~12 min
    python benchmarks/bench_momentum_expansions.py --net gelu --momentum 0.9 --adam   # ~1 min
    python benchmarks/bench_momentum_expansions.py --net summary

`--adam` runs Adam (β₁ = --momentum, β₂ = 0.999) with warmed state on the frozen-gate
network under `bench_adam.py`'s protocol, against the real thresholds that
`bench_adam_linearized.py` stored for the net (held-out GELU MLP, BatchNorm CNN, and the
development nets). A run writes benchmarks/results/bench_momentum_expansions_<net>_m<m>.json whole: without
--second-order it drops a second-order result stored there before.
"""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from _common import RESULTS, base_parser, environment, setup_torch, write_json
from torch import nn
from torch.func import grad, jvp, vmap

from nets.learning_rates.linear_outputs import TangentOutputs

NETS = ("mlp", "mlp_relu", "gelu", "tanh64", "mse", "mse_gelu", "mse_tabular", "cnn", "bn_cnn",
        "tabular", "tabular_seed1")
#: the plain cross-entropy breast-cancer MLPs of bench_heldout_tabular.py (train seeds 0, 1)
TABULAR = {"tabular": 0, "tabular_seed1": 1}
#: second-order grid: this many points from LO to HI times the measured threshold
GRID = (1 / 20, 5.0, 41)
#: activations applied element by element (replaced by their per-sample tangent)
ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ELU, nn.LeakyReLU)
#: leaf modules that are affine maps of their input in eval mode (kept as they are)
AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d,
          nn.BatchNorm3d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
          nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)


class _Tangent(nn.Module):
    """σ replaced by its tangent b + s·a, (b, s) per sample of the data (buffers)."""

    def __init__(self, owner, offset, slope):
        super().__init__()
        self.owner = [owner]                 # a list: not registered as a submodule
        self.register_buffer("offset", offset)
        self.register_buffer("slope", slope)

    def forward(self, a):
        i = self.owner[0].index
        return self.offset[i] + self.slope[i] * a


class _FrozenMaxPool(nn.Module):
    """Max-pooling with each window's choice fixed at the checkpoint (per sample)."""

    def __init__(self, owner, indices):
        super().__init__()
        self.owner = [owner]
        self.register_buffer("indices", indices)

    def forward(self, a):
        ind = self.indices[self.owner[0].index]
        return a.flatten(2).gather(2, ind.flatten(2)).reshape(ind.shape)


class FrozenGates(nn.Module):
    """The frozen-gate network of the module docstring, for `model` at its current weights
    and the data X (N, ...): every elementwise activation (ELEMENTWISE) becomes its tangent
    at each sample's checkpoint pre-activation, every MaxPool2d keeps each sample's
    checkpoint choices, every other leaf module must be affine in eval mode (AFFINE;
    ValueError otherwise — nonlinearities called as functions inside a forward() are not
    seen). Input: `inputs(X)`, each row the sample's index followed by its flattened
    features, so that batches drawn from it find their own gates. The copy is in eval
    mode (BatchNorm on its running statistics)."""

    def __init__(self, model, X):
        super().__init__()
        self.net = copy.deepcopy(model).eval()
        self.shape = tuple(X.shape[1:])
        self.index = None
        targets = []
        for name, mod in self.net.named_modules():
            if len(list(mod.children())):
                continue
            if isinstance(mod, (*ELEMENTWISE, nn.MaxPool2d)):
                targets.append((name, mod))
            elif not isinstance(mod, AFFINE):
                raise ValueError(f"frozen gates: {type(mod).__name__} ({name}) is neither an "
                                 f"elementwise activation, a MaxPool2d nor affine in eval mode")
        seen = {}
        hooks = [mod.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append(a[0]))
                 for n, mod in targets]
        with torch.no_grad():
            self.net(X)
        for h in hooks:
            h.remove()
        for name, mod in targets:
            if len(seen.get(name, ())) != 1:
                raise ValueError(f"frozen gates: {name} must run exactly once per forward "
                                 f"(ran {len(seen.get(name, ()))} times)")
            a0 = seen[name][0]
            if isinstance(mod, nn.MaxPool2d):
                _, ind = F.max_pool2d(a0, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                      ceil_mode=mod.ceil_mode, return_indices=True)
                new = _FrozenMaxPool(self, ind)
            else:
                a = a0.detach().clone().requires_grad_(True)
                out = mod(a)
                (slope,) = torch.autograd.grad(out.sum(), a)
                new = _Tangent(self, (out - slope * a).detach(), slope.detach())
            parent, _, leaf = name.rpartition(".")
            setattr(self.net.get_submodule(parent) if parent else self.net, leaf, new)

    @staticmethod
    def inputs(X):
        """(N, 1 + features): the sample index, then the sample's features."""
        idx = torch.arange(len(X), dtype=X.dtype, device=X.device)[:, None]
        return torch.cat([idx, X.reshape(len(X), -1)], 1)

    def forward(self, xa):
        self.index = xa[:, 0].round().long()
        try:
            return self.net(xa[:, 1:].reshape(len(xa), *self.shape))
        finally:
            self.index = None          # no batch's tensor outlives the call (copy-safe)


class SecondOrderOutputs(TangentOutputs):
    """`linear_outputs.TangentOutputs` with outputs to second order, z + J·e + ½·∂²z[e, e],
    and the matching batch gradient (J + ∂²z[e, ·])ᵀ·C = ∇(Cᵀz) + ∇²(Cᵀz)·e at w₀
    (forward-over-reverse) at the batch's displacements E."""

    def _expand(self, xb, E):
        def one(t):
            def tangent(p):
                return jvp(lambda q: self._outs(q, xb), (p,), (t,))[1]

            first, second = jvp(tangent, (self.params,), (t,))
            return first + 0.5 * second

        with torch.no_grad():
            return vmap(one)(self._tangents(E)).permute(1, 2, 0)

    def batch(self, idx, E):
        return self.z[idx][:, :, None] + self._expand(self.X[idx], E)

    def pullback(self, idx, C, E=None):
        xb = self.X[idx]

        def one(c, t):
            def h(p):
                return (self._outs(p, xb) * c).sum()

            g0, hv = jvp(grad(h), (self.params,), (t,))
            return {k: g0[k] + hv[k] for k in g0}

        with torch.no_grad():
            g = vmap(one)(C.permute(2, 0, 1).to(self.dtype), self._tangents(E))
            return torch.cat([g[k].reshape(C.shape[2], -1) for k, _, _ in self.shapes], 1).T

    def full(self, E):
        return self.z[:, :, None] + torch.cat([self._expand(self.X[s:s + self.chunk], E)
                                               for s in range(0, self.N, self.chunk)])


def network(name):
    """(model, (X, y), loss_fn) of a network of NETS."""
    from bench_heldout_transfer import transfer_network

    if name in TABULAR:
        from bench_heldout_tabular import trained_tabular_mlp

        model, loss_fn, data = trained_tabular_mlp(layer_norm=False, smoothing=0.0,
                                                   seed=TABULAR[name])
        return model, data, loss_fn
    return transfer_network(name)


def stored_transfer(name, momentum):
    """The stored real thresholds and linearised forms of `name` at `momentum`
    (bench_heldout_transfer.py; the tabular nets: bench_heldout_tabular.py's "plain" rows)."""
    from bench_heldout_transfer import output_name as transfer_name

    if name in TABULAR:
        key = "plain" + ("_seed1" if TABULAR[name] else "")
        v = json.loads((RESULTS / "bench_heldout_tabular.json").read_text())["variants"][key]
        return v if momentum == 0 else v[f"m{momentum:g}"]
    return json.loads((RESULTS / f"{transfer_name(name, momentum)}.json").read_text())


def network_tensors(name):
    """(model, X, y, loss_fn) of a network of NETS, its data as tensors."""
    from nets.utils.data_source import as_data_source

    model, data, loss_fn = network(name)
    X, y = as_data_source(data, name="data").tensors()
    return model, X, y, loss_fn


def measure(name, momentum, *, second_order=False, seeds=8):
    from bench_heldout_transfer import BATCH_SIZES

    from nets.learning_rates.linearized import first_crossing, linearized_max_loss
    from nets.learning_rates.lr_search import training_threshold

    model, X, y, loss_fn = network_tensors(name)
    st = stored_transfer(name, momentum)
    real = np.asarray(st["real"], float)
    out = {"net": name, "momentum": momentum, "batch_sizes": list(BATCH_SIZES),
           "real": real, "real_stderr": st["real_stderr"], "linearized": st["linearized"],
           "corrected": st["corrected"], "seeds": seeds}
    gated = FrozenGates(model, X)
    t = time.perf_counter()
    res = training_threshold(gated, loss_fn, (FrozenGates.inputs(X), y), BATCH_SIZES,
                             criterion="divergence", momentum=momentum, steps=200,
                             seeds=tuple(range(seeds)), progress=False, unbracketed="nan",
                             lr0=lambda B: float(np.interp(B, BATCH_SIZES, real)))
    out["frozen_gates"], out["frozen_gates_stderr"] = res.lr, res.stderr
    out["frozen_gates_s"] = time.perf_counter() - t
    if second_order:
        lin = SecondOrderOutputs(model, X)
        per, t = [], time.perf_counter()
        for B, r in zip(BATCH_SIZES, real, strict=True):
            grid = np.geomspace(GRID[0] * r, GRID[1] * r, GRID[2])
            per.append([first_crossing(grid, linearized_max_loss(lin, None, y, loss_fn, B,
                                                                 momentum, grid, 200, s,
                                                                 stop_above=10.0), 10.0)
                        for s in range(seeds)])
        out["second_order_per_seed"] = per
        out["second_order"] = np.nanmean(np.asarray(per, float), axis=1)
        out["second_order_unbracketed"] = int(np.isnan(np.asarray(per, float)).sum())
        out["second_order_s"] = time.perf_counter() - t
    return out


def measure_adam(name, beta1, *, seeds=8):
    """Adam with warmed state on the frozen-gate network, the protocol of `bench_adam.py`
    (500 warm-up steps at 1e-4, then 100 steps at α, divergence k = 10, `adam_threshold`),
    against the real thresholds stored by `bench_adam_linearized.py` for that net and β₁."""
    from nets.learning_rates.adam import adam_threshold

    model, X, y, loss_fn = network_tensors(name)
    st = json.loads((RESULTS / f"bench_adam_linearized_{name}_b{beta1:g}.json").read_text())
    Bs, real = list(st["batch_sizes"]), np.asarray(st["real"], float)
    gated = FrozenGates(model, X)
    t = time.perf_counter()
    res = adam_threshold(gated, loss_fn, (FrozenGates.inputs(X), y), Bs, betas=(beta1, 0.999),
                         warmup_steps=500, warmup_lr=1e-4, steps=100, criterion="divergence",
                         seeds=tuple(range(seeds)),
                         lr0=lambda B: float(np.interp(B, Bs, real)))
    return {"net": name, "optimizer": "adam", "beta1": beta1, "batch_sizes": Bs, "real": real,
            "linearized": st["linearized"], "real_over_corrected": st["real_over_corrected"],
            "seeds": seeds, "frozen_gates": res.lr, "frozen_gates_stderr": res.stderr,
            "frozen_gates_s": time.perf_counter() - t}


def output_name(name, momentum, adam=False):
    return (f"bench_momentum_expansions_{name}_" + ("adam_b" if adam else "m")
            + f"{momentum:g}")


def summary():
    rows = []
    for name in NETS:
        for m in (0.0, 0.9):
            path = RESULTS / f"{output_name(name, m)}.json"
            if not path.exists():
                continue
            r = json.loads(path.read_text())
            real = np.asarray(r["real"], float)
            row = {"net": name, "m": m,
                   "real/linearized": real / np.asarray(r["linearized"], float),
                   "real/corrected": real / np.asarray(r["corrected"], float),
                   "real/frozen_gates": real / np.asarray(r["frozen_gates"], float)}
            if "second_order" in r:
                row["real/second_order"] = real / np.asarray(r["second_order"], float)
            rows.append(row)
            path = RESULTS / f"{output_name(name, m, adam=True)}.json"
            if path.exists():
                r = json.loads(path.read_text())
                real = np.asarray(r["real"], float)
                rows.append({"net": name, "m": f"Adam β₁ = {m:g}",
                             "real/corrected": np.asarray(r["real_over_corrected"], float),
                             "real/frozen_gates": real / np.asarray(r["frozen_gates"], float)})
    return rows


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--net", default="gelu", choices=(*NETS, "summary"))
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--second-order", action="store_true")
    p.add_argument("--adam", action="store_true",
                   help="Adam (β₁ = --momentum) with warmed state, frozen gates only")
    p.add_argument("--seeds", type=int, default=8)
    args = p.parse_args(argv)
    if args.net == "summary":
        for row in summary():
            print(row["net"], row["m"], *(f"{k} {np.round(v, 2).tolist()}" for k, v in row.items()
                                          if k.startswith("real/")))
        return
    device = setup_torch(args)
    if args.adam:
        out = measure_adam(args.net, args.momentum, seeds=args.seeds)
        corrected = np.asarray(out["real_over_corrected"], float)
    else:
        out = measure(args.net, args.momentum, second_order=args.second_order, seeds=args.seeds)
        corrected = np.asarray(out["real"], float) / np.asarray(out["corrected"], float)
    out["environment"] = environment(device)
    path = write_json(output_name(args.net, args.momentum, adam=args.adam), out, args.out)
    real = np.asarray(out["real"], float)
    print(args.net, args.momentum, "adam" if args.adam else "sgd", "real/frozen_gates",
          np.round(real / np.asarray(out["frozen_gates"], float), 3).tolist(),
          "real/corrected", np.round(corrected, 3).tolist(),
          *(["real/second_order", np.round(real / out["second_order"], 3).tolist()]
            if "second_order" in out else []), "→", path)


if __name__ == "__main__":
    main()
