"""The λ'(B) prediction forms and `lr_table` at real scale: cost, accuracy, peak memory.

Bars (issue 13; each row reports measured vs bar and met / missed):

* ``directional`` — wide digits MLP 64-512-512-10 (≈300k parameters, N = 1797, trained
  briefly): the directional form of λ'(B) costs ≤ 40 full-data HVPs in all, the top
  eigenpair included (the sampled noise pass itself ≤ ~10);
* ``resolved`` / ``resolved_5000`` / ``resolved_cnn`` — the sample-resolved form (top-10
  eigenpairs + `resolved_noise_from_operator`, defaults: every sample; the ``_sampled``
  rows: a sampled population of 512 rows) costs ≤ 150 full-data HVPs in all and is within 15 % of the measured λ'(B)
  (`measure_batch_top_eigenvalue`, its standard error reported) at B = 8…512, on the
  same MLP (N = 1797, and N = 5000 with jittered copies, the size the bar names) and on
  a ≈290k-parameter CNN on CIFAR-shaped synthetic data; peak memory ≤ 8 GiB;
* ``resolved_ggn`` / ``resolved_5000_ggn`` — the same with the per-sample spikes of the
  Gauss–Newton terms from C×C Jacobian Grams (`spikes="ggn"`) instead of per-sample
  Lanczos runs;
* ``resolved_gn`` / ``resolved_5000_gn`` / ``resolved_cnn_gn`` — the default
  `per_sample="auto"`, which picks every per-sample quantity from the Gauss–Newton
  factors here (`per_sample="ggn"`, after its check of the directional noise,
  `nets.noise.ggn_samples`: C×C and C×k matrices per sample, no per-sample curvature
  product); ``resolved_cnn_chance`` — no bar: the Gauss–Newton form and its check on the
  at-chance CNN; ``resolved_small`` — no bar: both per-sample forms against measurement on
  the small digits MLP after 5 epochs, where the residual term still matters;
* ``resolved_cnn_diagnosis`` — no bar: on a smaller copy of that CNN (N = 500), the
  resolved form with every candidate against the capped one, and its parts (spikes
  alone, the complement term) against measurement (README, "Predictions at scale");
* ``resolved_cnn_spikes`` — no bar: per-sample Hessian against GGN spikes on that CNN and
  on the wide MLP, with the cost of a Jacobian-based GGN spike pass;
* ``lr_table`` — `nets.lr_table` (defaults) on the wide MLP with N = 5000 (the digits
  plus jittered copies) in under 5 minutes on 2 cores;
* ``preresnet`` — PreResNet-8 (basic blocks, ≈78k parameters, BatchNorm in eval mode
  after brief training) on N = 2000 CIFAR-shaped images: top-5 eigenvalues and the
  directional λ'(B) curve each within 15 minutes and 8 GiB; SLQ's cost per probe-step;
* ``scaling`` — time and peak memory of one HVP and of the sampled directional pass
  against N and P, with fitted growth exponents.

Costs are multiples of one full-data HVP timed in the same process (median of 3, after
a warm-up), so they are comparable across machines; "counted" figures are the
library's own product counts (`num_matvecs`, `full_products`). Peak memory is the
process's peak RSS (`resource.getrusage`; every row runs in its own child process
unless --inline, so each row's figure is its own). On CUDA `torch.cuda.max_memory_allocated`.

Usage: python -m benchmarks.bench_scale [--quick] [--rows directional,resolved,...]
       [--device cuda] [--threads 1] [--out benchmarks/results/bench_scale.json]
Prints one JSON object per row; writes all rows to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# run as `python -m benchmarks.bench_scale` (its documented form, and how every row's child
# process is started) the scripts' folder is not on the path that `_common` is found on
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb  # noqa: E402

ROWS = ("directional", "resolved", "resolved_ggn", "resolved_gn", "resolved_small",
        "resolved_sampled",
        "resolved_5000", "resolved_5000_ggn", "resolved_5000_gn", "resolved_5000_sampled",
        "resolved_cnn", "resolved_cnn_gn", "resolved_cnn_chance", "resolved_cnn_diagnosis",
        "resolved_cnn_spikes", "lr_table", "preresnet",
        "scaling", "transfer", "transfer_momentum", "transfer_resecant")
GiB = 2**30
BATCH_SIZES = (8, 32, 128, 512)


# ------------------------------------------------------------------------ helpers
def _peak_gib(device="cpu") -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / GiB
    return peak_rss_mb() * 2**20 / GiB


def _timed(fn, label=None):
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    if label:
        _log(f"{label}: {dt:.1f} s")
    return out, dt


def _log(msg):
    """Progress on stderr (a row's partial results survive a timeout)."""
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


def _hvp_seconds(op, reps=3) -> float:
    """Median wall time of one full-data HVP (after one warm-up product)."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(op.P, generator=g, dtype=torch.float64).to(op.device)
    op.matvec(v)
    ts = [_timed(lambda: op.matvec(v))[1] for _ in range(reps)]
    op.num_matvecs -= reps + 1
    return float(np.median(ts))


def _bar(value, bar, *, upper=True) -> str:
    ok = value <= bar if upper else value >= bar
    return "met" if ok else f"missed by {100 * (value / bar - 1):+.0f} %"


def _r(x, n=4):
    return None if x is None else round(float(x), n)


def _load_info() -> dict:
    return dict(loadavg=[round(x, 2) for x in os.getloadavg()],
                torch_threads=torch.get_num_threads())


# ------------------------------------------------------------------------ problems
def wide_digits_mlp(N=None, seed=0, epochs=3):
    """MLP 64-512-512-10 (tanh, 301,066 parameters) trained briefly (`epochs` of SGD,
    lr 0.05, momentum 0.9, batch 64) on the standardised digits; N > 1797 appends
    jittered copies (x + 0.3·N(0, 1), same label) — a stand-in for a larger data set."""
    from nets.training.data import load_digits
    from nets.training.loops import train
    from nets.training.models import MLP
    X, y = load_digits(standardize=True)
    if N is not None and N > X.shape[0]:
        g = torch.Generator().manual_seed(seed + 1)
        reps = -(-N // X.shape[0])
        Xr = X.repeat(reps, 1)[:N]
        Xr[X.shape[0]:] += 0.3 * torch.randn(N - X.shape[0], X.shape[1], generator=g)
        X, y = Xr, y.repeat(reps)[:N]
    model = MLP(64, (512, 512), 10, activation="tanh", seed=seed)
    train(model, F.cross_entropy, (X, y), epochs=epochs, lr=0.05, batch_size=64,
          optimizer="sgd", momentum=0.9, seed=seed)
    return model.eval(), (X, y)


class CifarCNN(nn.Module):
    """conv(3→32, s2)·ReLU·conv(32→64, s2)·ReLU·conv(64→128, s2)·ReLU·flatten·
    Linear(2048→96)·ReLU·Linear(96→10): 290,922 parameters for 32×32×3 inputs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.f1 = nn.Linear(2048, 96)
        self.f2 = nn.Linear(96, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(x))
        return self.f2(F.relu(self.f1(x.flatten(1))))


def cifar_like(N, seed=0):
    """N CIFAR-shaped images (3×32×32) with labels that a linear map of a smoothed
    copy of the image decides (learnable, not random), for a network to fit briefly."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 3, 32, 32, generator=g)
    X = F.avg_pool2d(X, 3, stride=1, padding=1) * 3.0        # spatially correlated
    W = torch.randn(3 * 8 * 8, 10, generator=g)
    y = (F.avg_pool2d(X, 4).flatten(1) @ W).argmax(1)
    return X, y


def trained_cnn(N, seed=0, recipe="adam"):
    """`CifarCNN` trained on `cifar_like(N)`. recipe "adam": 6 epochs of Adam, lr 1e-3,
    batch 64 (N = 2000: training accuracy 90 %, loss 0.33 — a network near a minimum);
    "sgd": the earlier recipe, 2 epochs of SGD lr 0.02, momentum 0.9, which stays at
    chance (12.4 %; kept so the diagnosis rows measured on it stay reproducible)."""
    from nets.training.loops import train
    X, y = cifar_like(N, seed)
    torch.manual_seed(seed)
    model = CifarCNN()
    if recipe == "adam":
        train(model, F.cross_entropy, (X, y), epochs=6, lr=1e-3, batch_size=64,
              optimizer="adam", seed=seed)
    else:
        train(model, F.cross_entropy, (X, y), epochs=2, lr=0.02, batch_size=64,
              optimizer="sgd", momentum=0.9, seed=seed)
    return model.eval(), (X, y)


def _train_accuracy(model, data) -> float:
    X, y = data
    with torch.no_grad():
        return float(sum((model(X[s:s + 500]).argmax(1) == y[s:s + 500]).sum()
                         for s in range(0, X.shape[0], 500)) / X.shape[0])


def trained_preresnet8(N, seed=0, epochs=1):
    """PreResNet-8 (basic blocks, 10 classes) trained `epochs` on `cifar_like(N)`, then
    switched to eval mode (BatchNorm on its running statistics)."""
    from nets.training.loops import train
    from nets.training.models import PreResNet
    X, y = cifar_like(N, seed)
    model = PreResNet(depth=8, n_classes=10, seed=seed)
    train(model, F.cross_entropy, (X, y), epochs=epochs, lr=0.05, batch_size=64,
          optimizer="sgd", momentum=0.9, seed=seed)
    return model.eval(), (X, y)


# ------------------------------------------------------------------------ measured λ'(B)
def measured_curve(model, data, batch_sizes, n_batches, seed=0):
    """measure_batch_top_eigenvalue per batch size (n_batches[j] batches at B_j)."""
    from nets.noise.batch_spectra import measure_batch_top_eigenvalue
    mean, se, t = [], [], 0.0
    for B, n in zip(batch_sizes, n_batches):
        r, dt = _timed(lambda: measure_batch_top_eigenvalue(
            model, F.cross_entropy, data, [B], n_batches=n, tol=1e-6, seed=seed))
        mean.append(float(r.mean[0]))
        se.append(float(r.stderr[0]))
        t += dt
    return np.array(mean), np.array(se), t


def _compare(pred, meas, se):
    rel = pred / meas - 1.0
    return dict(pred=np.round(pred, 5).tolist(), measured=np.round(meas, 5).tolist(),
                measured_rel_se=np.round(se / meas, 4).tolist(),
                rel_err=np.round(rel, 4).tolist(), max_abs_rel_err=_r(np.abs(rel).max()))


# ------------------------------------------------------------------------ rows
def _mkey(m) -> str:
    return m if isinstance(m, str) else f"m{m}"


def row_directional(quick, device):
    from nets.algorithms.lanczos import eigsh
    from nets.curvature.operators import hessian_operator
    from nets.noise.batch_spectra import directional_form
    from nets.noise.directional import directional_noise_from_operator
    model, data = wide_digits_mlp()
    op = hessian_operator(model, F.cross_entropy, data, device=device)
    t_hvp = _hvp_seconds(op)
    top, t_top = _timed(lambda: eigsh(op, k=1, which="LA", tol=1e-6, seed=0))
    top_counted = op.num_matvecs
    u = top.vectors[:, 0]
    lam = float(top.values[0])
    row = dict(row="directional", problem="digits MLP 64-512-512-10", N=op.N, P=op.P,
               dtype=str(op.dtype), cache_graph=op.cache_graph, hvp_s=_r(t_hvp),
               top_eig_hvps=_r(t_top / t_hvp, 1), top_eig_counted=top_counted, lam=lam)
    curves = {}
    # the predictions' default ("auto": about 256 micro-batch groups), per-sample (m = 1)
    # and micro-batches of 8 (all unbiased for the same s_u²)
    for m in ("auto", 1, 8):
        est, t_dir = _timed(lambda: directional_noise_from_operator(op, u, seed=0, micro_batch=m))
        curves[m] = directional_form(lam, est.s2, BATCH_SIZES, op.N, s2_stderr=est.stderr)
        total = (t_top + t_dir) / t_hvp
        row[_mkey(m)] = dict(
            micro_batch=est.micro_batch,
            noise_hvps=_r(t_dir / t_hvp, 1), noise_counted=_r(est.full_products, 2),
            noise_used=est.n_used, n_groups=est.n_groups, s2=est.s2,
            s2_rel_se=_r(est.stderr / est.s2), total_hvps=_r(total, 1),
            total_s=_r(t_top + t_dir, 2),
            bar_total=f"{total:.1f} ≤ 40 HVPs: {_bar(total, 40)}",
            bar_noise=f"{t_dir / t_hvp:.1f} ≤ ~10 HVPs: {_bar(t_dir / t_hvp, 10)}")
    if not quick:
        ex, t_ex = _timed(lambda: directional_noise_from_operator(op, u, exact=True))
        row.update(exact_hvps=_r(t_ex / t_hvp, 1), exact_s2=ex.s2)
        for m in ("auto", 1, 8):
            row[_mkey(m)]["vs_exact"] = _r(row[_mkey(m)]["s2"] / ex.s2 - 1)
        meas, se, t_meas = measured_curve(model, data, BATCH_SIZES, (100, 60, 30, 20))
        row.update({f"curve_{_mkey(m)}": _compare(curves[m].values, meas, se)
                    for m in ("auto", 1, 8)}, measure_s=_r(t_meas, 1))
    row["peak_gib"] = _r(_peak_gib(device), 3)
    return row


def _resolved(name, model, data, device, quick, n_meas, max_samples=None, spikes="lanczos",
              per_sample="products"):
    from nets.algorithms.lanczos import eigsh
    from nets.curvature.operators import hessian_operator
    from nets.noise.resolved_noise import resolved_batch_top_eigenvalue, resolved_noise_from_operator
    op = hessian_operator(model, F.cross_entropy, data, device=device)
    t_hvp = _hvp_seconds(op)
    top, t_top = _timed(lambda: eigsh(op, k=10, which="LA", tol=1e-6, seed=0), "top-10")
    top_counted = op.num_matvecs
    rn, t_rn = _timed(lambda: resolved_noise_from_operator(op, top.vectors, min_batch=min(BATCH_SIZES),
                                                           seed=0, max_samples=max_samples,
                                                           spikes=spikes, per_sample=per_sample),
                      "resolved noise")
    r, t_mc = _timed(lambda: resolved_batch_top_eigenvalue(rn, BATCH_SIZES, n_batches=1000, seed=0))
    total = (t_top + t_rn + t_mc) / t_hvp
    peak = _peak_gib(device)
    row = dict(problem=name, N=op.N, P=op.P, max_samples=max_samples, spikes=spikes,
               per_sample=per_sample, per_sample_used=rn.per_sample, ggn_check=rn.ggn_check,
               train_accuracy=_r(_train_accuracy(model, data), 4),
               dtype=str(op.dtype),
               cache_graph=op.cache_graph,
               hvp_s=_r(t_hvp), top10_hvps=_r(t_top / t_hvp, 1), top10_counted=top_counted,
               resolved_hvps=_r(t_rn / t_hvp, 1), resolved_counted=_r(rn.full_products, 1),
               montecarlo_hvps=_r(t_mc / t_hvp, 1), candidates=rn.n_candidates,
               kept=int(rn.index.size), cross=rn.cross, lam1=rn.lam1,
               rows=rn.subspace.n_rows,
               total_hvps=_r(total, 1), total_s=_r(t_top + t_rn + t_mc, 1),
               peak_gib_prediction=_r(peak, 3),
               bar_total=f"{total:.1f} ≤ 150 HVPs: {_bar(total, 150)}",
               bar_memory=f"{peak:.2f} ≤ 8 GiB: {_bar(peak, 8)}")
    if not quick:
        meas, se, t_meas = measured_curve(model, data, BATCH_SIZES, n_meas)
        cmp_ = _compare(r["mean"], meas, se)
        row.update(curve=cmp_, measure_s=_r(t_meas, 1), n_measured=list(n_meas),
                   bar_accuracy=f"max |pred/meas − 1| = {100 * cmp_['max_abs_rel_err']:.1f} % "
                                f"≤ 15 %: {_bar(cmp_['max_abs_rel_err'], 0.15)}")
    row["peak_gib"] = _r(_peak_gib(device), 3)
    return row


def row_resolved(quick, device):
    model, data = wide_digits_mlp()
    return dict(row="resolved", **_resolved("digits MLP 64-512-512-10", model, data, device,
                                            quick, (200, 100, 40, 20)))


def row_resolved_ggn(quick, device):
    model, data = wide_digits_mlp()
    return dict(row="resolved_ggn", **_resolved("digits MLP 64-512-512-10", model, data, device,
                                                quick, (200, 100, 40, 20), spikes="ggn"))


def row_resolved_gn(quick, device):
    model, data = wide_digits_mlp()
    return dict(row="resolved_gn", **_resolved("digits MLP 64-512-512-10", model, data, device,
                                               quick, (200, 100, 40, 20), per_sample="auto"))


def row_resolved_small(quick, device):
    """The two per-sample forms side by side on the small digits MLP (64-32-10, tanh,
    5 epochs of SGD + momentum): a network where the Hessian's top eigenvalue (0.55) is
    well above the Gauss–Newton one (0.37), i.e. the residual term still matters."""
    from nets.training.data import load_digits
    from nets.training.loops import train
    from nets.training.models import MLP
    X, y = load_digits(standardize=True)
    model = MLP(64, (32,), 10, activation="tanh", seed=0)
    train(model, F.cross_entropy, (X, y), epochs=5, lr=0.05, batch_size=64, optimizer="sgd",
          momentum=0.9, seed=0)
    model.eval()
    rows = {ps: _resolved("digits MLP 64-32-10", model, (X, y), device, quick,
                          (300, 150, 60, 30), per_sample=ps) for ps in ("products", "ggn")}
    return dict(row="resolved_small", **{f"{ps}_{k}": v for ps, r in rows.items()
                                         for k, v in r.items()})


def row_resolved_sampled(quick, device):
    model, data = wide_digits_mlp()
    return dict(row="resolved_sampled", **_resolved("digits MLP 64-512-512-10", model, data,
                                                    device, quick, (200, 100, 40, 20),
                                                    max_samples=512))


def row_resolved_5000(quick, device, max_samples=None, name="resolved_5000", spikes="lanczos",
                      per_sample="products"):
    N = 2000 if quick else 5000
    model, data = wide_digits_mlp(N=N)
    return dict(row=name, **_resolved("digits MLP 64-512-512-10 + jittered copies",
                                      model, data, device, quick, (200, 100, 40, 20),
                                      max_samples=max_samples, spikes=spikes,
                                      per_sample=per_sample))


def row_resolved_5000_gn(quick, device):
    return row_resolved_5000(quick, device, name="resolved_5000_gn", per_sample="auto")


def row_resolved_5000_ggn(quick, device):
    return row_resolved_5000(quick, device, name="resolved_5000_ggn", spikes="ggn")


def row_resolved_5000_sampled(quick, device):
    return row_resolved_5000(quick, device, max_samples=512, name="resolved_5000_sampled")


def row_resolved_cnn(quick, device, per_sample="products", name="resolved_cnn"):
    model, data = trained_cnn(500 if quick else 2000)
    return dict(row=name, **_resolved("CIFAR-shaped CNN (CifarCNN, Adam-trained)", model, data,
                                      device, quick, (200, 100, 40, 20), per_sample=per_sample))


def row_resolved_cnn_chance(quick, device):
    """The at-chance CNN (`trained_cnn(recipe="sgd")`, N = 2000): the Gauss–Newton form's
    prediction and the check `per_sample="auto"` runs before using it (no measurement:
    the measured curve of this network is in the `resolved_cnn_diagnosis` notes)."""
    from nets.algorithms.lanczos import eigsh
    from nets.curvature.operators import hessian_operator
    from nets.noise.resolved_noise import (
        _gauss_newton_noise_check,
        resolved_batch_top_eigenvalue,
        resolved_noise_from_operator,
    )
    model, data = trained_cnn(500 if quick else 2000, recipe="sgd")
    op = hessian_operator(model, F.cross_entropy, data, device=device)
    top = eigsh(op, k=10, which="LA", tol=1e-6, seed=0)
    rn = resolved_noise_from_operator(op, top.vectors, min_batch=min(BATCH_SIZES), seed=0,
                                      per_sample="ggn")
    r = resolved_batch_top_eigenvalue(rn, BATCH_SIZES, n_batches=1000, seed=0)
    check = _gauss_newton_noise_check(op, rn.subspace, 0, None, None)   # what "auto" checks
    return dict(row="resolved_cnn_chance", N=op.N,
                train_accuracy=_r(_train_accuracy(model, data), 4),
                lam1=rn.lam1, ggn_pred=np.round(r["mean"], 4).tolist(),
                candidates=rn.n_candidates, check={k: _r(v, 5) for k, v in check.items()},
                peak_gib=_r(_peak_gib(device), 3))


def row_resolved_cnn_gn(quick, device):
    return row_resolved_cnn(quick, device, per_sample="auto", name="resolved_cnn_gn")


def row_resolved_cnn_diagnosis(quick, device):
    """Why the resolved form overshoots on the CIFAR-shaped CNN, on a smaller copy
    (N = 500, or 200 with --quick): every candidate kept against 1/8 of them (the
    priority cap; the same model, the same batches), and two parts of the exhaustive
    model at each B against the measured mean — the resolved spikes alone (top of
    Σ_{i∈h} (γ_i/B) v_i v_iᵀ on the batch's resolved samples) and the top eigenvalue of
    the complement term c·D_h(B)/λ_1 (`_complement_noise`)."""
    from nets.algorithms.lanczos import eigsh
    from nets.curvature.operators import hessian_operator
    from nets.noise.resolved_noise import _complement_noise, resolved_batch_top_eigenvalue, resolved_noise_from_operator
    from rmt.sampling import batch_noise_factor
    N = 200 if quick else 500
    Bs = (8, 16, 32, 128)
    model, data = trained_cnn(N, recipe="sgd")
    op = hessian_operator(model, F.cross_entropy, data, device=device)
    top = eigsh(op, k=10, which="LA", tol=1e-6, seed=0)
    rn, t_rn = _timed(lambda: resolved_noise_from_operator(op, top.vectors, min_batch=8, seed=0,
                                                           max_candidates=None), "every candidate")
    capped = resolved_noise_from_operator(op, top.vectors, min_batch=8, seed=0,
                                          max_candidates=max(1, rn.n_candidates // 8))
    full = resolved_batch_top_eigenvalue(rn, Bs, n_batches=1000, seed=0)
    cap = resolved_batch_top_eigenvalue(capped, Bs, n_batches=1000, seed=0)
    rng = np.random.default_rng(1)
    spikes, comp = [], []
    for B in Bs:
        res = rn.gamma > B * rn.lam1
        sel = np.flatnonzero(res[rn.index])
        c = batch_noise_factor(B, rn.subspace.N, replacement=False)
        comp.append(float(np.linalg.eigvalsh(c * _complement_noise(rn, sel) / rn.lam1)[-1]))
        tops = []
        for _ in range(400):
            idx = rng.choice(rn.subspace.N, size=B, replace=False)
            h = idx[res[idx]]
            if h.size:
                p = rn.proxy[h]
                g = np.sqrt(rn.gamma[h] / B)
                tops.append(np.linalg.eigvalsh(rn.Gv[np.ix_(p, p)] * np.outer(g, g))[-1])
            else:
                tops.append(0.0)
        spikes.append(float(np.mean(tops)))
    meas, se, t_meas = measured_curve(model, data, Bs, (200, 100, 60, 30))
    ov = np.abs(rn.Gv[np.triu_indices(rn.Gv.shape[0], 1)])
    return dict(row="resolved_cnn_diagnosis", problem="CIFAR-shaped CNN (CifarCNN), small N",
                N=op.N, P=op.P, batch_sizes=list(Bs), lam1=rn.lam1,
                candidates=rn.n_candidates, kept_capped=int(capped.index.size),
                gamma_quantiles_50_90_100=np.round(np.quantile(rn.gamma, [0.5, 0.9, 1.0]), 3).tolist(),
                spike_overlap_mean_abs=_r(ov.mean()) if ov.size else None,
                every_candidate=np.round(full["mean"], 4).tolist(),
                capped=np.round(cap["mean"], 4).tolist(),
                spikes_only=np.round(spikes, 4).tolist(),
                complement_term_top=np.round(comp, 4).tolist(),
                measured=np.round(meas, 4).tolist(), measured_rel_se=np.round(se / meas, 4).tolist(),
                every_candidate_vs_measured=np.round(full["mean"] / meas, 3).tolist(),
                resolved_s=_r(t_rn, 1), peak_gib=_r(_peak_gib(device), 3))


def _ggn_spikes(model, X, chunk=16):
    """Top eigenvalue of every per-sample cross-entropy GGN J_iᵀ(diag p − ppᵀ)J_i, from the
    C×C matrix A^{1/2} J_iJ_iᵀ A^{1/2} (per-sample Jacobians by vmap(jacrev))."""
    from torch.func import functional_call, jacrev, vmap
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = vmap(jacrev(lambda p, x: functional_call(model, p, (x[None],))[0]), in_dims=(None, 0))
    out = []
    for s in range(0, X.shape[0], chunk):
        J = jac(params, X[s:s + chunk])
        Jm = torch.cat([v.reshape(v.shape[0], v.shape[1], -1) for v in J.values()], dim=2)
        with torch.no_grad():
            p = torch.softmax(functional_call(model, params, (X[s:s + chunk],)), 1)
        A = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        ev, V = torch.linalg.eigh(A)
        Ah = V @ torch.diag_embed(ev.clamp_min(0).sqrt()) @ V.transpose(1, 2)
        out.append(torch.linalg.eigvalsh(Ah @ (Jm @ Jm.transpose(1, 2)) @ Ah)[:, -1])
    return torch.cat(out).double().numpy()


def row_resolved_cnn_spikes(quick, device):
    """What the per-sample spikes of that CNN are: for n samples, the top eigenvalue of
    each per-sample Hessian (`per_sample_top_eigenpairs`) against that of its GGN (exact,
    from the C×C Jacobian Gram), both extremes of a few per-sample Hessians, and the
    network's training accuracy; the same on the wide digits MLP, with the cost of the two
    per-sample passes in HVPs of the same n samples."""
    from nets.algorithms.lanczos import eigsh
    from nets.curvature.operators import hessian_operator
    from nets.noise.resolved_noise import per_sample_top_eigenpairs
    n = 64 if quick else 256
    out = dict(row="resolved_cnn_spikes", problem="per-sample Hessian vs GGN spikes", n=n)
    for name, (model, (X, y)) in (("cnn", trained_cnn(500, recipe="sgd")), ("mlp", wide_digits_mlp())):
        with torch.no_grad():
            acc = float((model(X).argmax(1) == y).float().mean())
        Xs, ys = X[:n], y[:n]
        op = hessian_operator(model, F.cross_entropy, (Xs, ys), device=device)
        t_h = _hvp_seconds(op)
        sp, t_l = _timed(lambda: per_sample_top_eigenpairs(op, seed=0))
        g, t_j = _timed(lambda: _ggn_spikes(model, Xs))
        ends = []
        for i in range(3):
            o1 = hessian_operator(model, F.cross_entropy, (X[i:i + 1], y[i:i + 1]), device=device)
            ends.append([float(eigsh(o1, k=1, which=w, tol=1e-6, seed=0).values[0])
                         for w in ("SA", "LA")])
        r = g / sp.gamma
        out[name] = dict(train_accuracy=_r(acc), P=op.P,
                         hessian_spike_q50_q100=np.round(np.quantile(sp.gamma, [0.5, 1.0]), 3).tolist(),
                         ggn_spike_q50_q100=np.round(np.quantile(g, [0.5, 1.0]), 3).tolist(),
                         ggn_over_hessian_q5_q50_q95=np.round(np.quantile(r, [0.05, 0.5, 0.95]), 3).tolist(),
                         per_sample_hessian_min_max=np.round(ends, 3).tolist(),
                         lanczos_pass_hvps=_r(t_l / t_h, 1), jacobian_pass_hvps=_r(t_j / t_h, 1))
        _log(f"{name}: {out[name]}")
    return out


def row_lr_table(quick, device):
    from nets.learning_rates.lr_prediction import lr_table
    N = 2000 if quick else 5000
    model, data = wide_digits_mlp(N=N)
    tab, t = _timed(lambda: lr_table(model, F.cross_entropy, data, list(BATCH_SIZES), seed=0,
                                     device=device))
    d = tab.to_dict() if hasattr(tab, "to_dict") else {}
    keep = {k: d[k] for k in ("lam", "s2_dir", "s2_iso") if k in d}
    return dict(row="lr_table", problem="digits MLP 64-512-512-10 + jittered copies", N=N,
                P=sum(p.numel() for p in model.parameters()), seconds=_r(t, 1),
                bar=f"{t:.0f} s ≤ 300 s: {_bar(t, 300)}", **keep,
                peak_gib=_r(_peak_gib(device), 3))


def row_transfer(quick, device, momentum=0.0):
    """`transfer_lr`'s default (SGD, m = 0: the top-200 linearised network over eight batch
    sequences, corrected along u) on the 301k-parameter MLP, against the real divergence
    thresholds it predicts (`training_threshold`, the same eight sequences, k = 10, 200
    steps): its cost against the measurement's, side by side in one process, and its worst
    transfer over the anchors B₀ = 32 and 512 (session 39; written down first: within 15 %).
    Row "transfer_momentum": the same with m = 0.9 (written down first: the transfer from
    B₀ = 32 to 512 above 1, from 512 to 8 below 1 — the direction `transfer_lr` warns of)."""
    import numpy as np
    from bench_heldout_transfer import transfers, worst

    from nets.learning_rates.lr_search import training_threshold
    from nets.learning_rates.transfer import momentum_caveat_silenced, transfer_lr
    model, data = wide_digits_mlp()
    seeds = (0,) if quick else tuple(range(8))
    with momentum_caveat_silenced():        # the momentum caveat: measured here
        pred, t_pred = _timed(lambda: transfer_lr(model, F.cross_entropy, data,
                                                  list(BATCH_SIZES), reference=(32, 1.0),
                                                  momentum=momentum, n_seeds=len(seeds),
                                                  device=device, progress=False))
    limit = np.asarray(pred.stability_limit, float)
    real, t_real = _timed(lambda: training_threshold(
        model, F.cross_entropy, data, list(BATCH_SIZES), steps=200, seeds=seeds, momentum=momentum,
        lr0=lambda B: float(np.interp(B, pred.batch_sizes, limit)), unbracketed="nan",
        device=device, progress=False))
    t = transfers(real.lr, pred.shape)             # anchored at B₀ = 32 and 512
    lo, hi = worst(t)
    return dict(row="transfer" if momentum == 0 else "transfer_momentum",
                problem=f"digits MLP 64-512-512-10, SGD m = {momentum:g}, B = 8/32/128/512",
                N=len(data[0]), P=sum(p.numel() for p in model.parameters()),
                n_seeds=len(seeds), rank=pred.rank, secant_ratio=_r(pred.secant_ratio),
                measured=[_r(x) for x in real.lr], measured_stderr=[_r(x) for x in real.stderr],
                linearized=[_r(x) for x in pred.linearized_lr], correction=[_r(x) for x in pred.correction],
                worst_transfer=[_r(lo, 3), _r(hi, 3)],
                upward_32_to_512=_r(t["B32"][3], 3), downward_512_to_8=_r(t["B512"][0], 3),
                seconds_prediction=_r(t_pred, 1), seconds_measurement=_r(t_real, 1),
                cost_ratio=_r(t_pred / t_real, 3), peak_gib=_r(_peak_gib(device), 3))


def row_transfer_momentum(quick, device):
    return row_transfer(quick, device, momentum=0.9)


def row_transfer_resecant(quick, device):
    """The stored rows "transfer" and "transfer_momentum" (results/bench_scale.json)
    re-derived with the 301k MLP's secant ratio re-measured (`loss_along_top`, the crossing
    solved since session 47; they were run with it read on the grid): the correction
    1 − (1 − r)·λ₁/λ'_m(B) keeps its share λ₁/λ'_m(B) = (1 − c_old)/(1 − r_old), the
    measured and linearised thresholds are kept."""
    from _common import RESULTS
    from bench_heldout_transfer import transfers, worst

    from nets.learning_rates.along_top import loss_along_top, rescaling_as_derived
    stored = json.loads((RESULTS / "bench_scale.json").read_text())
    model, data = wide_digits_mlp()
    r_new = loss_along_top(model, F.cross_entropy, data, factor=10.0, seed=0).secant_ratio
    out = dict(row="transfer_resecant", secant_ratio=_r(r_new))
    for key in ("transfer", "transfer_momentum"):
        old = stored[key]
        share = (1 - np.asarray(old["correction"], float)) / (1 - old["secant_ratio"])
        corr = rescaling_as_derived(r_new, share)
        t = transfers(old["measured"], np.asarray(old["linearized"], float) * corr)
        out[key] = dict(secant_ratio_grid=old["secant_ratio"], correction=[_r(x) for x in corr],
                        worst_transfer=[_r(x, 3) for x in worst(t)],
                        upward_32_to_512=_r(t["B32"][3], 3), downward_512_to_8=_r(t["B512"][0], 3))
    return out


def row_preresnet(quick, device):
    from nets.algorithms.lanczos import eigsh
    from nets.algorithms.slq import slq_density
    from nets.curvature.operators import hessian_operator
    from nets.noise.batch_spectra import directional_form
    from nets.noise.directional import directional_noise_from_operator
    N = 500 if quick else 2000
    model, data = trained_preresnet8(N)
    op = hessian_operator(model, F.cross_entropy, data, device=device, policy="eval")
    t_hvp = _hvp_seconds(op, reps=1 if not quick else 1)
    top5, t5 = _timed(lambda: eigsh(op, k=5, which="LA", tol=1e-4, seed=0), "top-5")
    _log(f"hvp {t_hvp:.2f} s; top-5 {top5.values} in {op.num_matvecs} products")
    c5 = op.num_matvecs
    p5 = _peak_gib(device)
    op.num_matvecs = 0
    top1, t1 = _timed(lambda: eigsh(op, k=1, which="LA", tol=1e-4, seed=0), "top-1")
    c1 = op.num_matvecs
    est, t_dir = _timed(lambda: directional_noise_from_operator(op, top1.vectors[:, 0], seed=0),
                        "directional noise")
    curve = directional_form(float(top1.values[0]), est.s2, [b for b in BATCH_SIZES if b <= op.N], op.N,
                             s2_stderr=est.stderr)
    op.num_matvecs = 0
    probes, steps = 2, 4
    _, t_slq = _timed(lambda: slq_density(op, num_probes=probes, num_steps=steps, seed=0))
    per_ps = t_slq / (probes * steps) / t_hvp
    t_curve = t1 + t_dir
    peak = _peak_gib(device)
    extra = {}
    if quick:
        # the counts do not depend on N; time one HVP at the bar's N = 2000 and scale
        m2, d2 = trained_preresnet8(2000)
        op2 = hessian_operator(m2, F.cross_entropy, d2, device=device, policy="eval")
        h2 = _hvp_seconds(op2, reps=1)
        extra = dict(hvp_s_N2000=_r(h2, 2),
                     top5_min_at_N2000_extrapolated=_r(t5 / t_hvp * h2 / 60, 1),
                     curve_min_at_N2000_extrapolated=_r(t_curve / t_hvp * h2 / 60, 1))
        _log(f"N=2000 hvp {h2:.2f} s: {extra}")
    return dict(row="preresnet", **extra, problem="PreResNet-8 (eval BN), CIFAR-shaped", N=op.N, P=op.P,
                cache_graph=op.cache_graph, hvp_s=_r(t_hvp, 2),
                top5=np.round(top5.values, 5).tolist(), top5_converged=top5.converged.tolist(),
                top5_s=_r(t5, 1), top5_hvps=_r(t5 / t_hvp, 1), top5_counted=c5,
                top5_peak_gib=_r(p5, 3),
                curve_s=_r(t_curve, 1), curve_hvps=_r(t_curve / t_hvp, 1), top1_counted=c1,
                noise_hvps=_r(t_dir / t_hvp, 1), noise_used=est.n_used,
                s2_rel_se=_r(est.stderr / est.s2), curve=np.round(curve.values, 5).tolist(),
                slq_hvps_per_probe_step=_r(per_ps, 2), slq_counted=op.num_matvecs,
                peak_gib=_r(peak, 3),
                bar_top5=f"{t5 / 60:.1f} min ≤ 15 min: {_bar(t5, 900)}",
                bar_curve=f"{t_curve / 60:.1f} min ≤ 15 min: {_bar(t_curve, 900)}",
                bar_memory=f"{peak:.2f} ≤ 8 GiB: {_bar(peak, 8)}")


def _scaling_point(kind, size, device):
    """(hvp_s, directional pass s, peak GiB) for one (model, N) point, in this process."""
    from nets.curvature.operators import hessian_operator
    from nets.noise.directional import directional_noise_from_operator
    from nets.training.models import MLP
    if kind == "N":
        X = torch.randn(size, 64, generator=torch.Generator().manual_seed(0))
        width = 256
    else:
        X = torch.randn(1000, 64, generator=torch.Generator().manual_seed(0))
        width = size
    y = X[:, :10].argmax(1)
    model = MLP(64, (width, width), 10, activation="tanh", seed=0).eval()
    op = hessian_operator(model, F.cross_entropy, (X, y), device=device)
    t = _hvp_seconds(op)
    u = torch.randn(op.P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, td = _timed(lambda: directional_noise_from_operator(op, u, seed=0, exact=True))
    return dict(N=op.N, P=op.P, hvp_s=t, pass_s=td, peak_gib=_peak_gib(device))


def row_scaling(quick, device):
    """Each point in its own child process (so peak RSS is its own); exponents are
    least-squares slopes of log(time) and log(peak RSS − baseline) on log N or log P."""
    Ns = (1000, 2000, 4000) if quick else (1000, 2000, 4000, 8000, 16000)
    widths = (64, 128, 256) if quick else (64, 128, 256, 512, 1024)
    pts = {"N": [], "P": []}
    for kind, sizes in (("N", Ns), ("P", widths)):
        for s in sizes:
            pts[kind].append(_child(["--point", f"{kind}:{s}", "--device", device]))
    out = dict(row="scaling", problem="MLP 64-w-w-10 on Gaussian inputs (exhaustive pass)")
    for kind in ("N", "P"):
        p = pts[kind]
        x = np.log([q[kind] for q in p])
        fit = lambda key: _r(np.polyfit(x, np.log([q[key] for q in p]), 1)[0], 2)
        out[f"vs_{kind}"] = [{k: _r(v, 4) for k, v in q.items()} for q in p]
        out[f"exp_{kind}"] = dict(hvp=fit("hvp_s"), directional_exact=fit("pass_s"),
                                  peak_rss=fit("peak_gib"))
    return out


# ------------------------------------------------------------------------ driver
def _child(args):
    cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--inline", *args]
    # from the repository root whatever the caller's directory (started from benchmarks/,
    # every row was recorded as an import error and the script still exited 0)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), cwd=root)
    if res.returncode != 0:
        return dict(error=res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--inline", action="store_true", help="run rows in this process")
    ap.add_argument("--point", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.point is not None:
        kind, size = args.point.split(":")
        print(json.dumps(_scaling_point(kind, int(size), args.device)), flush=True)
        return
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise SystemExit(f"unknown rows {bad}; choose from {ROWS}")
    results = []
    for name in rows:
        if args.inline:
            t0 = time.perf_counter()
            row = globals()[f"row_{name}"](args.quick, args.device)
            row.update(wall_s=_r(time.perf_counter() - t0, 1), quick=args.quick, **_load_info())
        else:
            row = _child(["--rows", name, "--device", args.device, "--threads",
                          str(args.threads)] + (["--quick"] if args.quick else []))
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        path = Path(args.out)
        old = json.loads(path.read_text()) if path.exists() else {}
        old.update({r.get("row", f"row{i}"): r for i, r in enumerate(results)})
        path.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()
