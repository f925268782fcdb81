"""Paper-scale check (only with `--scale paper --data DIR`, on a CUDA GPU): batch-Hessian
top eigenvalues of VGG-16 and WideResNet-28-10 on CIFAR-100 across B (docs/theory.md §7).

For each network: train with SGD (lr 0.05, momentum 0.9, weight decay 5e-4, B = 128) for
a few epochs from the package's seeded initialisation (`nets.training.loops.train`), switch to
eval mode (BatchNorm running statistics: `policy="eval"`), then on a fixed random subset
of N_c training images (the curvature data set; c(B, N_c) uses N_c):
measured λ'₁(B) (`nets.measure_batch_top_eigenvalue`, n batches per B) vs the directional
and isotropic predictions (`nets.predict_batch_top_eigenvalue`, micro-batched noise pass).

Pass iff the directional prediction is within 20% of the measured mean at every B for
both networks (the rule of the digits check).
"""

from __future__ import annotations

import numpy as np

from ..context import MissingDependency
from ..result import judged
from . import _plotting as pl

NAME = "cifar_batch_spectra"
CLAIM = ("VGG-16 and WRN-28-10 on CIFAR-100: the batch Hessian's top eigenvalue grows as B "
         "falls, as predicted by λ + c(B,N)·s_u²/λ (directional noise).")
REQUIRES = ("nets.training.data:load_cifar", "nets.training.models:VGG16", "nets.training.models:WideResNet",
            "nets.training.loops:train", "nets.noise.batch_spectra:measure_batch_top_eigenvalue",
            "nets.noise.batch_spectra:predict_batch_top_eigenvalue")
REL = 0.20
SETTINGS = dict(epochs={"vgg16": 10, "wrn28_10": 3}, lr=0.05, momentum=0.9, weight_decay=5e-4,
                train_batch=128, curvature_N=5000, batch_sizes=[2, 8, 32, 128, 512, 1024],
                n_batches=5, micro_batch=16)


def _models():
    from nets.training.models import VGG16, WideResNet

    return {"vgg16": lambda seed: VGG16(n_classes=100, seed=seed),
            "wrn28_10": lambda seed: WideResNet(depth=28, widen=10, n_classes=100, seed=seed)}


def run(ctx):
    import torch
    import torch.nn.functional as F

    from nets.noise.batch_spectra import measure_batch_top_eigenvalue, predict_batch_top_eigenvalue
    from nets.training.data import load_cifar
    from nets.training.loops import train

    if ctx.data is None:
        raise MissingDependency("--scale paper needs --data (CIFAR-100 folder)")
    if ctx.device != "cuda" or not torch.cuda.is_available():
        raise MissingDependency("--scale paper needs a CUDA GPU")
    X, y = load_cifar(ctx.data, "cifar100", train=True)
    X, y = X.to(ctx.device), y.to(ctx.device)
    rng = ctx.rng(NAME)
    sub = torch.as_tensor(np.sort(rng.choice(len(X), size=min(SETTINGS["curvature_N"], len(X)),
                                             replace=False)), device=X.device)
    data_c = (X[sub], y[sub])
    Nc = len(sub)
    Bs = np.array([b for b in SETTINGS["batch_sizes"] if b < Nc])
    series, details, failures = {"batch_sizes": Bs}, {"settings": SETTINGS, "N_curvature": Nc}, []
    for name, make in ctx.bar(list(_models().items()), "networks"):
        model = make(ctx.seed).to(ctx.device)
        tr = train(model, F.cross_entropy, (X, y), epochs=SETTINGS["epochs"][name],
                   lr=SETTINGS["lr"], batch_size=min(SETTINGS["train_batch"], len(X)), optimizer="sgd",
                   momentum=SETTINGS["momentum"], weight_decay=SETTINGS["weight_decay"],
                   seed=ctx.seed, device=ctx.device)
        model.eval()
        pred = predict_batch_top_eigenvalue(model, F.cross_entropy, data_c, Bs,
                                            form=["directional", "isotropic"], seed=ctx.seed,
                                            device=ctx.device, policy="eval",
                                            micro_batch=SETTINGS["micro_batch"])
        meas = measure_batch_top_eigenvalue(model, F.cross_entropy, data_c, Bs,
                                            n_batches=SETTINGS["n_batches"], seed=ctx.seed + 1,
                                            device=ctx.device, policy="eval")
        rel = pred["directional"] / meas["mean"] - 1.0
        failures += [f"{name} B={B}: directional {p:.4g} vs measured {m:.4g} ({r:+.1%})"
                     for B, p, m, r in zip(Bs, pred["directional"], meas["mean"], rel)
                     if not abs(r) <= REL]
        series.update({f"{name}_measured_mean": meas["mean"], f"{name}_measured_std": meas["std"],
                       f"{name}_directional": pred["directional"],
                       f"{name}_isotropic": pred["isotropic"]})
        details[name] = {"P": int(pred["P"]), "lambda1": float(pred["lam"]),
                         "s2_directional": float(pred["s2_directional"]),
                         "s2_isotropic": float(pred["s2_isotropic"]),
                         "relative_error_directional": rel,
                         "final_train_loss": float(tr.final_loss),
                         "final_train_accuracy": tr.final_accuracy, "train_seconds": tr.wall_time}
    details["caption"] = ("CIFAR-100: measured top eigenvalue of H_B (mean ± std) vs directional "
                          "and isotropic predictions, VGG-16 and WRN-28-10.")
    names = list(_models())
    return judged(
        name=NAME, claim=CLAIM,
        predicted="; ".join(f"{n} B={Bs[0]}: {series[f'{n}_directional'][0]:.3g}" for n in names),
        measured="; ".join(f"{n}: {series[f'{n}_measured_mean'][0]:.3g}" for n in names),
        tolerance=f"|directional/measured − 1| ≤ {REL:.0%} at every B, both networks",
        failures=failures, details=details, series=series)


def plot(result):
    names = [k.removesuffix("_directional") for k in result.series if k.endswith("_directional")]
    fig, axes = pl.new_figure(len(names), width=4.8)
    Bs = result.array("batch_sizes")
    for ax, n in zip(axes, names):
        pl.curve(ax, Bs, result.array(f"{n}_directional"), "directional", "C0")
        pl.curve(ax, Bs, result.array(f"{n}_isotropic"), "isotropic", "C3", "--")
        pl.measured_points(ax, Bs, result.array(f"{n}_measured_mean"),
                           result.array(f"{n}_measured_std"))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("top eigenvalue of H_B")
        ax.legend(fontsize=8)
        pl.verdict_title(ax, result, n)
    return fig
