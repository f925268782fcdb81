"""Empirical maximal stable learning rate by bisection (docs/theory.md §5: "measure it").

Which "learning rate": the **measured stability limit** of a finite run — the largest
constant step size α for which K steps of the optimizer, started from a fixed
checkpoint w_0 with a fixed batch sequence (seed), do not diverge. It is compared with
the mean-square threshold (`nets.learning_rates.stability`) and the predictions of
`nets.learning_rates.lr_prediction`; it is neither McCandlish's greedy-optimal step nor an
SDE-matching rule.

Divergence criteria (`criterion=`):

* ``"growth"`` (default for SGD / SGD+momentum): fit a least-squares line to
  log‖w_t − w_0‖ over the last `window` fraction of the run; the run diverged iff the
  fitted slope (growth rate per step) exceeds `growth_threshold` (default 3/K, i.e. an
  exponential growth that multiplies ‖w − w_0‖ by e^1.5 over the last half of the run)
  or any parameter/loss becomes NaN/inf. Below the threshold the iterates converge or
  fluctuate around a stationary law (slope ≈ 0, or ≈ 0.7/K for still-diffusing noise);
  above it ‖w_t − w_0‖ grows like e^{γt} with γ the (almost-sure) Lyapunov exponent.
  This is not a fixed blow-up factor: a run is judged by its fitted rate.
* ``"loss"`` (default for Adam): Adam does not blow up exponentially when unstable — its
  second-moment estimate v grows with the oscillation and caps the step, so it
  oscillates at a higher loss instead. We call a run **stable iff every loss is finite
  and the time-averaged full-data loss over the last `window` of the run does not
  exceed the full-data loss at w_0** (so w_0 must be a checkpoint above the noise floor,
  e.g. a partly trained one). Measured on noisy least squares, Adam's window loss rises
  smoothly with α (≈ ∝ α²/B at small B; no exponential growth of ‖w − w_0‖ even 100×
  above the predicted stability limit), so this criterion measures where Adam's noise
  floor reaches the starting loss — it scales like √B, but it is a noise-floor limit,
  not the edge-of-stability limit α·λ_max(D^{1/2}H_BD^{1/2}) < 2(1+β₁)/(1−β₁) of
  `nets.learning_rates.lr_prediction`, and we say so when reporting it.

Trials run the model in eval mode (`net.train(False)`: deterministic per-sample losses,
no dropout, BatchNorm on running statistics), matching the curvature operators.

Bisection is done in log α: expand from `alpha0` by factors of 2 until the bracket
[lo stable, hi diverged] is found, then halve log(hi/lo) until hi/lo ≤ 1 + rel_tol.
`lr_sweep` repeats it over batch sizes and seeds and writes each finished (B, seed) to a
`JsonlStore` under a key holding the checkpoint, model, loss, data and every setting; a
re-run skips the keys already stored.

Real training of a nonlinear network from a checkpoint: `training_threshold` (criteria
"divergence", "final", "onset"; see the section below), returning `TrainingThresholds`
with the mean over seeds, standard errors and per-seed values; resumable the same way.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch

from nets.curvature.chunk_shares import data_shares, full_data_loss, given_or_read_shares
from nets.curvature.loss_check import mean_reduction_check
from nets.curvature.params import check_model
from nets.utils.autocast import outside_autocast
from nets.utils.callers import caller_stacklevel
from nets.utils.data_source import tensors_for
from nets.utils.jsonl_store import JsonlStore
from nets.utils.modes import model_copy
from nets.utils.plotting import batch_size_axis, in_b_order
from nets.utils.results import Result, result
from rmt.validation import (
    as_batch_sizes,
    as_bool,
    as_float,
    as_int,
    as_seed,
    as_unit_interval,
    resolved_seed,
)

__all__ = ["TrialResult", "run_trial", "bisect_max_lr", "BisectionResult", "lr_sweep",
           "fit_growth_rate", "TRAINING_CRITERIA", "Trial", "TrainingTrial", "training_trial",
           "TrainingThresholds", "training_threshold", "SelfStabilisation",
           "self_stabilisation"]


@dataclass(frozen=True)
class TrialResult:
    """One training run: lr, batch_size, steps, seed, optimizer, diverged (bool),
    growth_rate (fitted slope of log‖w_t − w_0‖ per step over the window), initial_loss
    and final_loss (time-average of the full-data loss over the window; NaN when not
    evaluated), final_distance ‖w_K − w_0‖, criterion, reason (a short string)."""

    lr: float
    batch_size: int
    steps: int
    seed: int
    optimizer: str
    diverged: bool
    growth_rate: float
    initial_loss: float
    final_loss: float
    final_distance: float
    criterion: str
    reason: str


def fit_growth_rate(distances, window=0.5) -> float:
    """Least-squares slope of log(distances) over the last `window` fraction (per step).
    Zero distances are ignored; returns 0 if fewer than 3 positive points remain, +inf
    if any distance is NaN/inf."""
    d = np.asarray(distances, dtype=float)
    if not np.all(np.isfinite(d)):
        return math.inf
    start = int(len(d) * (1.0 - window))
    t = np.arange(len(d))[start:]
    d = d[start:]
    ok = d > 0
    if ok.sum() < 3:
        return 0.0
    return float(np.polyfit(t[ok], np.log(d[ok]), 1)[0])


def _check_trial_inputs(dataset, state_dict):
    """Refuse empty data and NaN/inf in data or checkpoint before any training step
    (otherwise every trial looks 'diverged' and bisection halves down to nonsense)."""
    from nets.training.data import check_dataset
    from nets.utils.data_source import as_data_source

    X, y = check_dataset(*as_data_source(dataset, name="dataset").tensors(), name="dataset")
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    for k, v in state_dict.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"state_dict entry {k!r} contains NaN or inf")
    return X, y


@outside_autocast
def run_trial(model, loss_fn, dataset, state_dict, lr, batch_size, steps, optimizer="sgd",
              momentum=0.0, betas=(0.9, 0.999), eps=1e-8, seed=0, replacement=False,
              criterion=None, window=0.5, growth_threshold=None, n_loss_evals=20,
              loss_factor=1.0) -> TrialResult:
    """Train `steps` steps from `state_dict` at constant lr and batch size; judge divergence.

    Batches: a fresh uniformly random subset of size B at every step (without replacement
    inside the batch unless `replacement`), drawn from a `torch.Generator` seeded with
    `seed`, so all trials with the same seed see the same batch sequence. optimizer:
    "sgd" (heavy-ball `momentum`, torch convention v ← ρv + g, w ← w − αv) or "adam"
    (torch.optim.Adam with `betas`, `eps`). The model passed in is not modified.
    criterion "loss" compares the window-averaged full-data loss with
    `loss_factor` × the loss at w_0 (module docstring; default factor 1).
    """
    X, y = _check_trial_inputs(dataset, state_dict)
    N = len(X)
    lr = as_float("lr", lr, positive=True)
    B = as_int("batch_size", batch_size, minimum=1)
    steps = as_int("steps", steps, minimum=8)
    if not replacement and B > N:
        raise ValueError(f"batch_size must be <= N={N}, got {B}")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    criterion = criterion or ("loss" if optimizer == "adam" else "growth")
    if criterion not in ("growth", "loss"):
        raise ValueError(f"criterion must be 'growth' or 'loss', got {criterion!r}")
    window = as_float("window", window, positive=True)
    if window > 1:
        raise ValueError(f"window must be in (0, 1], got {window}")
    if steps - int(steps * (1.0 - window)) < 3:
        # fit_growth_rate reads fewer than 3 points as "no growth": a window of 2 steps
        # judged a run that left w₀ by 1e10 stable, and lr_sweep returned 2e7 × 2/λ
        raise ValueError(f"window × steps must hold at least 3 steps (the growth fit's "
                         f"points), got window={window:g} of steps={steps}")
    thr = 3.0 / steps if growth_threshold is None else as_float("growth_threshold", growth_threshold)
    loss_factor = as_float("loss_factor", loss_factor, positive=True)

    net = model_copy(model)
    net.load_state_dict(state_dict)
    net.train(False)
    params = [p for p in net.parameters() if p.requires_grad]
    w0 = [p.detach().clone() for p in params]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    else:
        opt = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)
    gen = torch.Generator().manual_seed(int(seed))
    shares = data_shares(net, loss_fn, X, y, 4096) if criterion == "loss" else None
    init_loss = full_data_loss(net, loss_fn, X, y, 4096, shares) if criterion == "loss" else math.nan
    start = int(steps * (1.0 - window))
    eval_at = set(np.linspace(start, steps - 1, max(1, n_loss_evals)).astype(int).tolist())
    dist = np.empty(steps)
    losses = []
    reason = "stable"
    diverged = False
    for t in range(steps):
        if replacement:
            idx = torch.randint(N, (B,), generator=gen)
        else:
            idx = torch.randperm(N, generator=gen)[:B]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(X[idx]), y[idx])
        if not torch.isfinite(loss):
            diverged, reason = True, "non-finite loss"
            dist[t:] = math.inf
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            sq = sum(float(((p - q) ** 2).sum()) for p, q in zip(params, w0))
        dist[t] = math.sqrt(sq) if math.isfinite(sq) else math.inf
        if not math.isfinite(dist[t]):
            diverged, reason = True, "non-finite parameters"
            dist[t:] = math.inf
            break
        if criterion == "loss" and t in eval_at:
            losses.append(full_data_loss(net, loss_fn, X, y, 4096, shares))
    rate = fit_growth_rate(dist, window)
    final_loss = float(np.mean(losses)) if losses and not diverged else math.nan
    if not diverged:
        if criterion == "growth" and rate > thr:
            diverged, reason = True, f"growth rate {rate:.3g} > {thr:.3g}"
        elif criterion == "loss" and not (math.isfinite(final_loss)
                                          and final_loss <= loss_factor * init_loss):
            diverged, reason = True, f"window loss {final_loss:.4g} > {loss_factor:g} × initial {init_loss:.4g}"
    return TrialResult(lr, B, steps, int(seed), optimizer, bool(diverged), float(rate),
                       float(init_loss), final_loss, float(dist[-1]), criterion, reason)


@dataclass(frozen=True)
class BisectionResult:
    """lo (largest α found stable), hi (smallest α found diverged), alpha = √(lo·hi),
    n_trials, and history [(α, diverged, growth_rate), …] in evaluation order."""

    lo: float
    hi: float
    alpha: float
    n_trials: int
    history: tuple

    def as_dict(self):
        return asdict(self)


_MAX_EXPAND = 40          # doublings/halvings before a bisection gives up


class Unbracketed(RuntimeError):
    """A bisection found no stable/unstable bracket: the predicate never fired while α
    was doubled, or always fired while it was halved. `unbracketed="nan"` catches this
    class only; any other error of a trial (out of memory, a shape error) propagates and
    is never stored."""


def bisect_max_lr(is_diverged, alpha0, rel_tol=0.02, max_expand=_MAX_EXPAND) -> BisectionResult:
    """Bisection in log α for the stability edge of a monotone-in-α predicate.

    is_diverged: callable α -> bool or TrialResult (its `.diverged` is used).
    Starting at `alpha0`, α is doubled (or halved) until a stable/diverged bracket is
    found, then log(hi/lo) is halved until hi/lo ≤ 1 + rel_tol.
    """
    alpha0 = as_float("alpha0", alpha0, positive=True)
    rel_tol = as_float("rel_tol", rel_tol, positive=True)
    hist = []

    def div(a):
        r = is_diverged(a)
        d = bool(r.diverged) if hasattr(r, "diverged") else bool(r)
        g = float(getattr(r, "growth_rate", math.nan))
        hist.append((float(a), d, g))
        return d

    a = alpha0
    if div(a):
        hi = a
        for _ in range(max_expand):
            a *= 0.5
            if not div(a):
                break
            hi = a                  # the bracket's top: the last unstable α seen
        else:
            raise Unbracketed(f"no stable learning rate found while halving from {alpha0:.3g} "
                               f"to {a:.3g} ({max_expand} halvings)")
        lo = a
    else:
        lo = a
        for _ in range(max_expand):
            a *= 2.0
            if div(a):
                break
        else:
            raise Unbracketed(
                f"no divergent learning rate found while doubling from {alpha0:.3g} to "
                f"{a:.3g} ({max_expand} doublings). In lr_sweep with a bounded-gradient loss "
                "(cross-entropy, BCE) the 'growth' criterion may never fire: use "
                "criterion='loss' or training_threshold; in training_threshold or "
                "adam_threshold the loss never left its tolerance (a 'final' or 'onset' "
                "criterion that cannot fire, a bounded loss, or a loss at its floor): pass "
                "unbracketed='nan' to keep the other batch sizes")
        hi = a
        lo = a / 2.0
    while hi / lo > 1.0 + rel_tol:
        mid = math.sqrt(lo * hi)
        if not lo < mid < hi:       # the bracket is one float wide: a rel_tol below float
            break                   # resolution (1e-16) looped forever
        if div(mid):
            hi = mid
        else:
            lo = mid
    return BisectionResult(lo, hi, math.sqrt(lo * hi), len(hist), tuple(hist))


@outside_autocast
def lr_sweep(model, loss_fn, dataset, state_dict, batch_sizes, seeds=(0,), steps=1000,
             optimizer="sgd", alpha0=None, rel_tol=0.02, store=None, tag="",
             trial_fn=None, **trial_kwargs) -> dict:
    """Measured maximal stable lr for every (B, seed); resumable.

    alpha0: starting guess, a float or a callable B -> float (e.g. a prediction); default
    1e-2. steps: K, an int or a callable B -> int (e.g. a fixed number of epochs: at
    small B a run shorter than an epoch may never meet the rare high-curvature samples
    that make it diverge). store: a `JsonlStore`, a path, or None (in memory). Each finished (B, seed) is
    stored with its bisection result under a key that holds everything the result
    depends on: "{tag}|{model tag}|{optimizer}|B={B}|seed={seed}|K={steps}|tol={rel_tol}|
    alpha0={α₀(B)}|{trial settings}" — the model tag is `training_threshold`'s (the
    checkpoint `state_dict` loaded into the model: weights and buffers, the model's
    structure and the loss, which parameters train, the data), the trial settings every
    keyword of `run_trial` (its defaults updated by **trial_kwargs: momentum, betas, eps,
    criterion, window, growth_threshold, replacement, n_loss_evals, loss_factor). Keys
    already in the store are skipped (no trial is run for them); a re-run with another
    checkpoint, data, loss or setting measures afresh beside them. Records written under
    the earlier key "{tag}|{optimizer}|B=…|seed=…|K=…" (which left all that out, so a
    run with other settings read them back) are not reused: those (B, seed) are measured
    again. trial_fn defaults to `run_trial` (same signature; a wrapper of it shares its
    keys, since its identity is not in them — a trial_fn that judges runs differently
    needs its own `tag`); **trial_kwargs go to it.

    Returns {"batch_sizes": array, "seeds": tuple, "alpha": array (n_B, n_seeds),
    "lo": …, "hi": …, "keys": list} (`nets.utils.jsonio.to_jsonable` makes it JSON-ready).
    """
    trial_fn = run_trial if trial_fn is None else trial_fn
    if store is not None and not isinstance(store, JsonlStore):
        store = JsonlStore(store)
    bs = as_batch_sizes(batch_sizes).tolist()
    seeds = as_seeds(seeds)
    X, y = _check_trial_inputs(dataset, state_dict)
    rel_tol = as_float("rel_tol", rel_tol, positive=True)
    # what the stored results depend on besides (B, seed, K, α₀): the checkpoint, model,
    # loss and data (training_threshold's tag) and every setting of the trials
    net = model_copy(model)
    net.load_state_dict(state_dict)
    mtag = _model_tag(net, loss_fn, X, y)
    del net
    settings = _trial_settings(optimizer, trial_kwargs)
    out = {k: np.full((len(bs), len(seeds)), np.nan) for k in ("alpha", "lo", "hi")}
    keys = []
    for i, B in enumerate(bs):
        for j, s in enumerate(seeds):
            K = as_int("steps", steps(B) if callable(steps) else steps, minimum=8)
            a0 = alpha0(B) if callable(alpha0) else (1e-2 if alpha0 is None else alpha0)
            a0 = as_float("alpha0", a0, positive=True)
            key = (f"{tag}|{mtag}|{optimizer}|B={B}|seed={s}|K={K}|tol={rel_tol!r}"
                   f"|alpha0={a0!r}|{settings}")
            keys.append(key)
            if store is not None and key in store:
                rec = store[key]
            else:
                res = bisect_max_lr(
                    lambda a: trial_fn(model, loss_fn, dataset, state_dict, a, B, K,
                                       optimizer=optimizer, seed=s, **trial_kwargs),
                    a0, rel_tol=rel_tol)
                rec = res.as_dict()
                rec.update(batch_size=B, seed=s, optimizer=optimizer, steps=K)
                if store is not None:
                    store.put(key, rec)
            for k in ("alpha", "lo", "hi"):
                out[k][i, j] = float(rec[k])
    out.update(batch_sizes=np.array(bs), seeds=seeds, keys=keys)
    return out


def _trial_settings(optimizer, trial_kwargs) -> str:
    """Every keyword setting of `run_trial` but the per-trial ones (lr, batch size, steps,
    seed) — its defaults updated by `trial_kwargs`, the criterion resolved as `run_trial`
    does — as "name=value|…" in name order, for `lr_sweep`'s store key. Numbers are written
    exactly as floats (repr of float(v)), so 0 and 0.0 are one setting and 0.9 and 0.9000001
    two; arrays and tensors element by element the same way (their repr rounds); a callable
    by its module and qualified name (two different closures of one name are not told
    apart: give them their own `tag`)."""
    import inspect

    per_trial = {"model", "loss_fn", "dataset", "state_dict", "lr", "batch_size", "steps",
                 "optimizer", "seed"}
    out = {k: p.default for k, p in inspect.signature(run_trial).parameters.items()
           if k not in per_trial and p.default is not inspect.Parameter.empty}
    out.update(trial_kwargs)
    if out.get("criterion") is None:
        out["criterion"] = "loss" if optimizer == "adam" else "growth"

    def text(v):
        if isinstance(v, (bool, np.bool_, str)) or v is None:
            return str(v)
        if isinstance(v, (int, float, np.integer, np.floating)):
            return repr(float(v))
        if isinstance(v, (torch.Tensor, np.ndarray)):
            return text(np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                        .tolist())
        if isinstance(v, (tuple, list)):
            return "(" + ",".join(text(x) for x in v) + ")"
        if callable(v):
            return f"{getattr(v, '__module__', '')}.{getattr(v, '__qualname__', type(v).__name__)}"
        return repr(v)

    return "|".join(f"{k}={text(v)}" for k, v in sorted(out.items()))


# =============================================================================
# Real-training thresholds of a nonlinear network, from a checkpoint
# =============================================================================
#
# `training_threshold` measures, by bisection in log α and separately for each seed (each
# seed fixes the batch sequence), the largest constant learning rate at which SGD (with or
# without heavy-ball momentum) started from the model's current parameters is judged
# stable by one of three named criteria:
#
#   "divergence" — unstable iff the full-data loss ever exceeds `factor` × its value at
#                  the checkpoint, or anything becomes non-finite, within `steps` steps;
#   "final"      — unstable iff the full-data loss after `steps` steps exceeds its start;
#   "onset"      — unstable iff the component c_t = ⟨w_t − w_0, u⟩ of the displacement
#                  along the top Hessian eigenvector u grows in the first `steps` steps:
#                  the least-squares slope of log|c_t| over the second half of the run
#                  exceeds `growth_threshold` (default 3/steps) — or the run diverges
#                  by the "divergence" rule (a run that blew up is past any onset: the
#                  slope alone, fitted after the blow-up, called runs at 95× their start
#                  loss stable, an outside sweep). This is the local (quadratic-model)
#                  instability the stability formulas are about; the network has not yet
#                  had time to reduce its curvature (catapult). Onset ≤ divergence holds
#                  per trial by construction, not per bisection (outcomes need not be
#                  monotone in α).
#
# "final" often lies between the other two where the network self-stabilises; that is not
# guaranteed: the
# end loss is not monotone in α near the edge (on a small tanh MLP at B = 64 it went
# 0.47, 1.96, 0.49, 2.36× its start over α = 12…19, and "final" came out 2.4× above
# "divergence"), and a bisection of a non-monotone outcome returns one of its edges.
# All trials run the model in eval mode.

TRAINING_CRITERIA = ("divergence", "final", "onset")


@result
class Trial(Result):
    """One training run at one learning rate, as judged by a named criterion — the
    outcome shared by `training_trial` (SGD from a checkpoint) and
    `nets.learning_rates.adam.adam_trial` (Adam from a warmed state): lr, batch_size,
    steps, criterion, unstable (bool), initial_loss, max_loss, final_loss (full-data),
    growth_rate (the onset statistic; NaN for the other criteria), steps_run, reason."""

    lr: float
    batch_size: int
    steps: int
    criterion: str
    unstable: bool
    initial_loss: float
    max_loss: float
    final_loss: float
    growth_rate: float
    steps_run: int
    reason: str

    @property
    def diverged(self) -> bool:          # read by `bisect_max_lr`
        return self.unstable


@result
class TrainingTrial(Trial):
    """A `Trial` of SGD from the checkpoint, with its momentum (Nesterov or heavy ball) and
    batch-order seed (onset criterion: growth_rate is the slope of log|⟨w_t − w_0, u⟩| per
    step)."""

    momentum: float = 0.0
    seed: int = 0
    nesterov: bool = False


def _flat_params(net):
    return [p for p in net.parameters() if p.requires_grad]


def _sgd_step(net, params, bufs, loss_fn, X, y, batch_size, gen, lr, momentum, nesterov=False):
    """One SGD step in torch's convention (heavy ball: v ← m·v + g_B, w ← w − α·v;
    `nesterov`: v ← m·v + g_B, w ← w − α·(g_B + m·v)) on a uniformly random batch of
    `batch_size` distinct samples drawn with `gen`; returns the batch loss (a tensor)."""
    idx = torch.randperm(len(X), generator=gen)[:batch_size]
    loss = loss_fn(net(X[idx]), y[idx])
    # a parameter the loss does not reach (an auxiliary head) gets no gradient and is left
    # as torch's optimizers leave it, momentum buffer included; without allow_unused it
    # raised where a training run with torch.optim.SGD goes on
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g, b in zip(params, grads, bufs):
            if g is None:
                continue
            if momentum:
                b.mul_(momentum).add_(g)
                g = g.add(b, alpha=momentum) if nesterov else b
            p.sub_(lr * g)
    return loss


def _top_direction(model, loss_fn, data, seed, progress=False):
    """Unit top eigenvector of the full-data Hessian (k=1 Lanczos), as a flat tensor; in
    eval mode, as the trials train (a model left in train mode is not refused)."""
    from nets.algorithms.lanczos import eigsh
    from nets.curvature.operators import curvature_operator

    op = curvature_operator(model, loss_fn, data, kind="hessian", policy="eval")
    top = eigsh(op, k=1, which="LA", tol=1e-8, seed=seed, progress=progress)
    u = torch.as_tensor(np.asarray(top.vectors[:, 0]), dtype=torch.float64)
    return u / u.norm(), float(top.values[0])


def warn_train_mode_layers(model, who: str) -> None:
    """One UserWarning naming the model's layers that act differently in train mode
    (BatchNorm / InstanceNorm with running statistics, active Dropout, RReLU) when any is
    in train mode: the trials run a copy in eval mode, not the model as it would train."""
    from nets.curvature.operators import describe_layers, train_mode_layers

    found = list(train_mode_layers(model))
    if found:
        warnings.warn(
            f"{who}: the model has layers in train mode ({describe_layers(found)}); the "
            "trials run it in eval mode (BatchNorm on its running statistics, no dropout), "
            "not as it would train. Call model.eval() first to run those thresholds "
            "knowingly; a train-mode threshold needs your own training runs",
            UserWarning, stacklevel=caller_stacklevel())


def check_start_loss(L0) -> None:
    """The trials' criteria compare the loss with its start (k× it, or above it): refuse a
    start that is not finite and positive (e.g. a Gaussian NLL below 0)."""
    if not (math.isfinite(L0) and L0 > 0):
        raise ValueError(f"the loss at the checkpoint must be finite and positive (the "
                         f"criteria compare the loss with multiples of its start), got {L0}")


@outside_autocast
def training_trial(model, loss_fn, X, y, lr, batch_size, *, steps, momentum=0.0, seed=0,
                   criterion="divergence", factor=10.0, direction=None,
                   growth_threshold=None, chunk_size=4096, nesterov=False,
                   chunk_shares="auto") -> TrainingTrial:
    """Train `steps` SGD steps from the model's parameters at constant lr; judge stability.

    Update (torch's heavy-ball convention): v ← m·v + g_B, w ← w − α·v (`nesterov`:
    w ← w − α·(g_B + m·v), torch's Nesterov), with g_B the
    gradient of the mean loss on a fresh uniformly random batch of `batch_size` distinct
    samples per step (torch.Generator seeded by `seed`: same seed, same batches). X, y are
    the full data tensors; the model is not modified (a deep copy is trained, eval mode).
    criterion: "divergence" (loss ever > factor × start, or non-finite), "final" (loss at
    the end > start), "onset" (growth of ⟨w_t − w_0, direction⟩, or divergence;
    `direction` is the flat unit top eigenvector). chunk_shares: each `chunk_size` chunk's
    share of the full-data loss (`nets.curvature.chunk_shares.data_shares`: None for the
    plain n_b/N), or "auto" to read them here (one forward pass; `training_threshold`
    reads them once for all its trials).
    """
    if criterion not in TRAINING_CRITERIA:
        raise ValueError(f"criterion must be one of {TRAINING_CRITERIA}, got {criterion!r}")
    if criterion == "onset" and direction is None:
        raise ValueError("criterion='onset' needs the top eigenvector (direction=)")
    # every option checked here too (an outside sweep: B > N, lr = -1 or NaN, momentum 1,
    # nesterov='yes' ran; empty data met a ZeroDivisionError)
    check_model(model)
    if not (torch.is_tensor(X) and torch.is_tensor(y)) or X.ndim == 0 or y.ndim == 0 \
            or len(X) != len(y) or len(X) == 0:
        raise ValueError("X and y must be tensors holding the same number (>= 1) of samples "
                         "(all the data; training_threshold takes any data form)")
    if X.is_floating_point() and not bool(torch.isfinite(X).all()):
        raise ValueError("X contains NaN or inf")
    lr = as_float("lr", lr, positive=True)
    batch_size = as_int("batch_size", batch_size, minimum=1, maximum=len(X))
    steps = as_int("steps", steps, minimum=1)
    momentum = as_unit_interval("momentum", momentum)
    nesterov = as_bool("nesterov", nesterov)
    seed = as_int("seed", seed, minimum=0)
    factor = as_growth_factor(factor)
    chunk_size = as_int("chunk_size", chunk_size, minimum=1)
    if growth_threshold is not None:
        growth_threshold = as_float("growth_threshold", growth_threshold)
    if criterion == "onset":
        P = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if not (torch.is_tensor(direction) and direction.numel() == P
                and bool(torch.isfinite(direction).all())):
            raise ValueError(f"direction must be a finite tensor of the P={P} trainable "
                             "parameters' entries (the flat top eigenvector)")
    net = model_copy(model)
    net.train(False)
    params = _flat_params(net)
    w0 = torch.cat([p.detach().reshape(-1) for p in params]).double()
    bufs = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(seed)
    shares = given_or_read_shares(chunk_shares, net, loss_fn, X, y, chunk_size)
    L0 = full_data_loss(net, loss_fn, X, y, chunk_size, shares)
    check_start_loss(L0)
    max_loss, loss_t, proj = L0, L0, []
    unstable, reason, t = False, "stable", 0
    for t in range(1, steps + 1):
        _sgd_step(net, params, bufs, loss_fn, X, y, batch_size, gen, lr, momentum, nesterov)
        if criterion == "onset":
            w = torch.cat([p.detach().reshape(-1) for p in params]).double()
            c = float(torch.dot(w - w0, direction))
            if not math.isfinite(c):
                unstable, reason, max_loss, loss_t = True, "non-finite parameters", math.inf, math.nan
                break
            proj.append(abs(c))
        if criterion in ("divergence", "onset") or t == steps:
            loss_t = full_data_loss(net, loss_fn, X, y, chunk_size, shares)
            if not math.isfinite(loss_t):
                unstable, reason, max_loss = True, "non-finite loss", math.inf
                break
            max_loss = max(max_loss, loss_t)
            if criterion in ("divergence", "onset") and loss_t > factor * L0:
                unstable, reason = True, f"loss {loss_t:.4g} > {factor:g} x start {L0:.4g} at step {t}"
                break
    rate = math.nan
    if criterion == "final" and not unstable and loss_t > L0:
        unstable, reason = True, f"final loss {loss_t:.4g} > start {L0:.4g}"
    if criterion == "onset" and not unstable:
        thr = 3.0 / steps if growth_threshold is None else growth_threshold
        rate = fit_growth_rate(proj, 0.5)
        if rate > thr:
            unstable, reason = True, f"growth rate along u {rate:.3g} > {thr:.3g}"
    return TrainingTrial(lr=float(lr), batch_size=int(batch_size), steps=int(steps),
                         criterion=criterion, unstable=bool(unstable), initial_loss=float(L0),
                         max_loss=float(max_loss), final_loss=float(loss_t),
                         growth_rate=float(rate), steps_run=int(t), reason=reason,
                         momentum=float(momentum), seed=int(seed), nesterov=bool(nesterov))


@result
class TrainingThresholds(Result):
    """Measured real-training learning-rate thresholds per batch size.

    batch_sizes (n_B,); lr : mean over seeds of the per-seed threshold √(lo·hi) (n_B,);
    stderr : standard error over seeds (std ddof=1 / √n_seeds; NaN for one seed);
    per_seed, lo, hi : (n_B, n_seeds); seeds; criterion; momentum; steps (n_B,); factor;
    rel_tol; n_trials (total training runs, resumed ones included); store_keys; nesterov."""

    batch_sizes: np.ndarray
    lr: np.ndarray
    stderr: np.ndarray
    per_seed: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    seeds: tuple
    criterion: str
    momentum: float
    steps: np.ndarray
    factor: float
    rel_tol: float
    n_trials: int
    store_keys: tuple
    nesterov: bool = False

    def plot(self, ax=None, *, label=None, color="k"):
        """Measured thresholds ± stderr against B (log-log); returns the axes."""
        m = f"m={self.momentum:g}" + (", Nesterov" if self.nesterov else "")
        return plot_thresholds(ax, self.batch_sizes, self.lr, self.stderr, fmt="o", color=color,
                               label=label or f"measured ({self.criterion}, {m})")


def plot_thresholds(ax, batch_sizes, lr, stderr, *, fmt, color, label):
    """Thresholds ± stderr (NaN drawn as no bar) against B on log-log axes (the current
    axes if `ax` is None); returns the axes."""
    import matplotlib.pyplot as plt

    ax = plt.gca() if ax is None else ax
    B, lr, stderr = in_b_order(batch_sizes, lr, stderr)     # "s-" draws a line through them
    ax.errorbar(B, lr, yerr=np.nan_to_num(stderr), fmt=fmt, color=color, capsize=3,
                label=label)
    batch_size_axis(ax)
    ax.set_yscale("log")
    ax.set_ylabel("learning rate")
    return ax


def as_seeds(seeds) -> tuple:
    """The batch-sequence seeds: one int or a sequence of them, not empty and without
    repeats (a repeated seed repeats its batches, so the standard error would count one
    measurement twice — (0, 0, 0) reported a standard error of 0). Each below 2⁶³ (the
    generators' int64); a Python sequence is read as it is (numpy made ints straddling
    2⁶³ floats: a transfer's seeds seed … seed + n_seeds − 1 crashed with a float-seed
    TypeError)."""
    items = seeds if isinstance(seeds, (range, list, tuple)) else np.atleast_1d(seeds).tolist()
    out = tuple(as_seed("seeds", s) for s in items)
    if not all(isinstance(s, int) for s in out):
        raise TypeError(f"seeds must be ints >= 0 (one batch sequence each), got {seeds!r}")
    if not out:
        raise ValueError("seeds must not be empty")
    if max(out) >= 2 ** 63:
        raise ValueError(f"seeds must be below 2**63 (one batch sequence each), got {max(out)}")
    if len(set(out)) < len(out):
        raise ValueError(f"seeds must not repeat (each is one batch sequence), got {out}")
    return out


def as_growth_factor(factor, name: str = "factor") -> float:
    """The divergence criterion's k (loss ever > k× its start): a float > 1."""
    k = as_float(name, factor, positive=True)
    if not k > 1:
        raise ValueError(f"{name} must be > 1 (loss ever > factor × its start), got {factor}")
    return k


def seed_mean_stderr(per):
    """Mean over seeds (axis 1 of `per`, shape (n_B, n_seeds)) and its standard error
    std(ddof=1)/√n_seeds (NaN for one seed)."""
    per = np.asarray(per, dtype=float)
    n = per.shape[1]
    se = per.std(axis=1, ddof=1) / np.sqrt(n) if n > 1 else np.full(per.shape[0], np.nan)
    return per.mean(axis=1), se


def _model_tag(model, loss_fn, X, y) -> str:
    """12 hex digits of the weights and buffers, the model's structure and the loss
    (`nets.utils.fingerprints`), which parameters train, the targets and the inputs (all
    their bytes: the first MiB and the sums missed rows permuted beyond it)."""
    import hashlib

    from nets.utils.fingerprints import code_fingerprint, raw_bytes

    h = hashlib.sha1()       # raw_bytes: the bytes .numpy().tobytes() gave, bfloat16 too
    state = model.state_dict()
    for p in state.values():
        h.update(raw_bytes(p))
    # buffers registered with persistent=False are not in the state dict (a scale changed
    # from 1 to 2 reused the stored thresholds); hashed only where there are any, so the
    # keys of every other model are as before
    for name, b in model.named_buffers():
        if name not in state:
            h.update(name.encode() + raw_bytes(b))
    h.update(raw_bytes(X))
    h.update(raw_bytes(y))
    h.update(str(len(X)).encode())
    h.update(code_fingerprint(model, loss_fn).encode())
    h.update(",".join(n for n, p in model.named_parameters() if p.requires_grad).encode())
    return h.hexdigest()[:12]


@outside_autocast
def training_threshold(model, loss_fn, data, batch_sizes, *, criterion="divergence",
                       optimizer="sgd", momentum=None, nesterov=None, steps=200, seeds=tuple(range(8)),
                       factor=10.0, lr0=None, rel_tol=0.03, growth_threshold=None,
                       unbracketed="raise", store=None, tag="", chunk_size=4096, device=None,
                       dtype=None, seed=0, progress=None) -> TrainingThresholds:
    """Real training threshold of SGD (± heavy-ball or Nesterov momentum) per batch size, by
    bisection.

    From the model's current parameters (the checkpoint; the model is not modified), for
    each B and each seed in `seeds` (the batch sequence; default eight, 0–7, the sequences
    `transfer_lr` and `linearized_threshold` use by default — at small B the threshold's
    seed-to-seed spread is 20–30 % on the digits nets and a few sequences can miss the
    rare batches that set it), bisect in log α for the edge
    between runs judged stable and unstable by `criterion` ("divergence": full-data loss
    ever > `factor` × start or non-finite; "final": loss after `steps` steps > start;
    "onset": ⟨w_t − w_0, u⟩ along the top Hessian eigenvector u grows in the first
    `steps` steps, fitted slope of log|·| > `growth_threshold`, default 3/steps, or the
    run diverges by the "divergence" rule — the full-data loss is evaluated every step).
    Bisection (`bisect_max_lr`) starts at `lr0` (float, callable B -> float, or None:
    1/λ₁ from a k=1 Lanczos) and stops at hi/lo ≤ 1 + rel_tol. Outcomes need not be
    monotone in α near the edge, so a start that differs in its last digit (λ₁ from
    another BLAS, thread count or dtype) can move a seed's threshold by tens of per cent:
    pass an explicit, rounded lr0 for a measurement that must repeat across machines.

    optimizer: "sgd" or a `torch.optim.SGD` instance whose momentum and nesterov flag are
    read (dampening is refused); momentum, nesterov: None (the optimizer's; 0 and False for
    "sgd") or values, which must agree with an instance's.
    unbracketed: what a (B, seed) whose bisection finds no stable/unstable bracket (the
    criterion never fires while doubling α, or always fires while halving) gives:
    "raise" (`Unbracketed`, a RuntimeError; the default) or "nan" (that entry is NaN, so
    is the mean over seeds at that B; the other B are still measured — e.g. for the
    "onset" criterion). Any other error of a trial propagates and is not stored.
    steps: an int or a callable B -> int. store: a `JsonlStore`, a path or None; every
    finished (B, seed) is written at once and re-runs skip stored keys (resumable).
    seed: seeds the Lanczos start of the onset direction and the default lr0.
    Returns a `TrainingThresholds` (mean over seeds, standard error, per-seed values).
    """
    from nets.utils.progress import progress_bar

    check_model(model)
    if criterion not in TRAINING_CRITERIA:
        raise ValueError(f"criterion must be one of {TRAINING_CRITERIA}, got {criterion!r}")
    if unbracketed not in ("raise", "nan"):
        raise ValueError(f"unbracketed must be 'raise' or 'nan', got {unbracketed!r}")
    momentum, nesterov = _read_momentum(optimizer, momentum, nesterov)
    from nets.learning_rates.lr_prediction import warn_partial_optimizer
    warn_partial_optimizer(model, optimizer)
    warn_train_mode_layers(model, "training_threshold")
    mean_reduction_check(model, loss_fn, data)
    X, y = tensors_for(model, data, device=device, dtype=dtype)
    if device is not None or dtype is not None:
        # the trials train copies of the model: cast it with the data (floating
        # parameters and buffers only), never the caller's module
        model = model_copy(model).to(device=device, dtype=dtype)
    N = len(X)
    bs = as_batch_sizes(batch_sizes, N).tolist()
    seeds = as_seeds(seeds)
    factor = as_growth_factor(factor)
    rel_tol = as_float("rel_tol", rel_tol, positive=True)
    if lr0 is not None and not callable(lr0):
        lr0 = as_float("lr0", lr0, positive=True)
    chunk_size = as_int("chunk_size", chunk_size, minimum=1)
    if growth_threshold is not None:
        growth_threshold = as_float("growth_threshold", growth_threshold)
    if store is not None and not isinstance(store, JsonlStore):
        store = JsonlStore(store)
    direction, lam = None, None
    if criterion == "onset" or lr0 is None:
        direction, lam = _top_direction(model, loss_fn, (X, y), as_seed("seed", seed),
                                        progress=progress)
    if lr0 is None:
        lr0 = 1.0 / lam
    mtag = _model_tag(model, loss_fn, X, y)
    shares = data_shares(model, loss_fn, X, y, chunk_size)    # once for every trial
    shape = (len(bs), len(seeds))
    per, lo, hi = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    Ks, keys, n_trials = [], [], 0
    jobs = [(i, j) for i in range(len(bs)) for j in range(len(seeds))]
    for i, j in progress_bar(jobs, progress=progress, total=len(jobs),
                             desc=f"lr threshold ({criterion}, m={momentum:g})"):
        ntag = "|nesterov" if nesterov else ""           # heavy-ball keys as before
        B, s = bs[i], seeds[j]
        K = as_int("steps", steps(B) if callable(steps) else steps, minimum=8)
        if len(Ks) <= i:
            Ks.append(K)
        a0 = as_float("lr0(B)", lr0(B), positive=True) if callable(lr0) else lr0
        # the start matters (outcomes are not always monotone in α), so do the onset's
        # growth threshold and which parameters train (_model_tag)
        # '|div': onset trials count a diverging run (records of the slope-only rule,
        # written before, are not reused)
        gtag = f"|growth={growth_threshold}|div" if criterion == "onset" else ""
        # settings by repr (":g" and ".6g" rounded: lr0 = 0.05000004 reused 0.05's rows,
        # where the last digit of lr0 can move a seed's threshold)
        key = (f"{tag}|{mtag}|{criterion}|m={float(momentum)!r}{ntag}|B={B}|seed={s}|K={K}"
               f"|factor={float(factor)!r}|tol={float(rel_tol)!r}|lr0={float(a0)!r}{gtag}")
        keys.append(key)
        if store is not None and key in store:
            rec = store[key]
        else:
            rec = {"batch_size": B, "seed": s, "steps": K, "momentum": momentum,
                   "nesterov": nesterov, "criterion": criterion}
            try:
                res = bisect_max_lr(
                    lambda a: training_trial(model, loss_fn, X, y, a, B, steps=K,
                                             momentum=momentum, seed=s, criterion=criterion,
                                             factor=factor, direction=direction,
                                             growth_threshold=growth_threshold,
                                             chunk_size=chunk_size, nesterov=nesterov,
                                             chunk_shares=shares),
                    a0, rel_tol=rel_tol, max_expand=_MAX_EXPAND)
                rec.update(lo=res.lo, hi=res.hi, alpha=res.alpha, n_trials=res.n_trials)
            except Unbracketed as err:
                if unbracketed == "raise":
                    raise
                # the first trial and every doubling/halving ran: 1 + _MAX_EXPAND trials
                rec.update(lo=math.nan, hi=math.nan, alpha=math.nan,
                           n_trials=1 + _MAX_EXPAND, unbracketed=str(err))
            if store is not None:
                store.put(key, rec)
        if "unbracketed" in rec and unbracketed == "raise":
            raise Unbracketed(f"{rec['unbracketed']} (stored for {key})")
        per[i, j], lo[i, j], hi[i, j] = (float(rec["alpha"]), float(rec["lo"]),
                                         float(rec["hi"]))
        n_trials += int(rec["n_trials"])
    mean, se = seed_mean_stderr(per)
    return TrainingThresholds(np.array(bs), mean, se, per, lo, hi, seeds, criterion,
                              float(momentum), np.array(Ks), factor, rel_tol, n_trials,
                              tuple(keys), nesterov)


def _read_momentum(optimizer, momentum, nesterov=None) -> tuple[float, bool]:
    """(momentum, nesterov) from `optimizer` ("sgd" or a torch.optim.SGD instance) or the
    explicit `momentum` / `nesterov` (None: the optimizer's, 0 and False for "sgd"; given
    with an instance they must agree with it); refuses other optimizers, dampening, and
    Nesterov without momentum (as torch does)."""
    if nesterov is not None and not isinstance(nesterov, (bool, np.bool_)):
        raise TypeError(f"nesterov must be a bool or None, got {type(nesterov).__name__}")
    if isinstance(optimizer, str):
        if optimizer.lower() != "sgd":
            raise ValueError(f"optimizer must be 'sgd' or a torch.optim.SGD, got {optimizer!r}")
        m = 0.0 if momentum is None else as_float("momentum", momentum, nonnegative=True)
        nest = False
    elif isinstance(optimizer, torch.optim.SGD):
        from nets.learning_rates.lr_prediction import _group_settings

        try:                           # the groups must agree (momentum, Nesterov, …)
            _group_settings(optimizer)
        except ValueError as err:
            raise ValueError(f"{str(err).split(';')[0]}; the trials train every parameter "
                             "with one setting: pass optimizer='sgd' with the momentum= and "
                             "nesterov= you want") from None
        g = optimizer.param_groups[0]
        if g.get("dampening", 0.0) and g.get("momentum", 0.0):
            raise ValueError("optimizer: SGD dampening is not supported")
        if g.get("maximize"):
            raise ValueError("optimizer: SGD(maximize=True) is not supported")
        from nets.learning_rates.lr_prediction import max_weight_decay

        wd = max_weight_decay(optimizer)
        if wd > 0:
            warnings.warn(f"optimizer: weight_decay={wd:g} is not applied; the trials train "
                          "without it (its coupled decay adds weight_decay to every curvature)",
                          UserWarning, stacklevel=caller_stacklevel())
        m = float(g.get("momentum", 0.0))
        nest = bool(g.get("nesterov", False))
        if momentum is not None and as_float("momentum", momentum, nonnegative=True) != m:
            raise ValueError(f"momentum={momentum!r} conflicts with the optimizer's own "
                             f"momentum={m!r}; give momentum once")
        if nesterov is not None and bool(nesterov) != nest:
            raise ValueError(f"nesterov={nesterov!r} conflicts with the optimizer's own "
                             f"nesterov={nest!r}; give nesterov once")
    else:
        raise TypeError(f"optimizer must be 'sgd' or a torch.optim.SGD instance, "
                        f"got {type(optimizer).__name__}")
    if nesterov is not None:
        nest = bool(nesterov)
    if not m < 1:
        raise ValueError(f"momentum must be in [0, 1), got {m}")
    if nest and m == 0:
        raise ValueError("nesterov=True needs momentum > 0")
    return m, nest


@result
class SelfStabilisation(Result):
    """λ₁ of the full-data Hessian before and after a run above the local stability limit.

    lam_before, lam_after : top eigenvalue at the checkpoint and after the run; lr =
    factor/lam_before; factor; batch_size; steps; momentum; loss_start, loss_max,
    loss_last : mini-batch losses of the run (first, largest, last); seed. With `every=k`:
    trace_steps (the steps 0, k, 2k, … at which the run was read, until it stopped),
    trace_lam λ₁ there, trace_loss_ratio the full-data loss over its start and
    trace_distance ‖w_t − w₀‖ (None without `every`)."""

    lam_before: float
    lam_after: float
    lr: float
    factor: float
    batch_size: int
    steps: int
    momentum: float
    loss_start: float
    loss_max: float
    loss_last: float
    seed: int
    trace_steps: np.ndarray | None = None
    trace_lam: np.ndarray | None = None
    trace_loss_ratio: np.ndarray | None = None
    trace_distance: np.ndarray | None = None


@outside_autocast
def self_stabilisation(model, loss_fn, data, *, factor=4.0, batch_size=512, steps=200,
                       momentum=0.0, seed=0, every=None) -> SelfStabilisation:
    """Run SGD at α = factor/λ₁ (above the deterministic limit 2/λ₁ when factor > 2) from
    the checkpoint and measure λ₁ again: a network that reduces its own curvature when
    pushed past the local limit (catapult, self-stabilisation) ends with λ₁·α < 2.

    Heavy-ball momentum `momentum`; batches of `batch_size` drawn without replacement by
    `torch.Generator().manual_seed(seed)`; the model is not modified (a copy is trained,
    in eval mode). λ₁ by `nets.algorithms.spectra.top_eigenvalues` (k = 1, eval mode too).
    every : also read λ₁, the full-data loss and the distance travelled every `every`
    steps (one Lanczos run each; the run stops early once that loss is non-finite or
    above 10⁶× its start)."""
    from nets.algorithms.spectra import top_eigenvalues

    check_model(model)
    warn_train_mode_layers(model, "self_stabilisation")     # as the threshold searches do
    X, y = tensors_for(model, data)
    factor = as_float("factor", factor, positive=True)
    B = as_int("batch_size", batch_size, minimum=1, maximum=len(X))
    steps = as_int("steps", steps, minimum=1)
    momentum = as_unit_interval("momentum", momentum)
    # None: one int from fresh entropy, recorded; an int (torch.Generator seeds the batches)
    seed = as_int("seed", resolved_seed("seed", seed), minimum=0)
    lam0 = float(top_eigenvalues(model, loss_fn, (X, y), k=1, seed=seed, policy="eval")[0])
    net = model_copy(model).eval()
    params = _flat_params(net)
    bufs = [torch.zeros_like(p) for p in params]
    every = None if every is None else as_int("every", every, minimum=1)
    lr = factor / lam0
    gen = torch.Generator().manual_seed(seed)
    w0 = [p.detach().clone() for p in params]
    trace = []
    shares = data_shares(net, loss_fn, X, y, 4096)

    def read(t):
        with torch.no_grad():
            L = full_data_loss(net, loss_fn, X, y, 4096, shares)
            dist = math.sqrt(sum(float(((p - q) ** 2).sum()) for p, q in zip(params, w0)))
        lam = (float(top_eigenvalues(net, loss_fn, (X, y), k=1, seed=seed, policy="eval")[0])
               if math.isfinite(L) else math.nan)
        trace.append((t, lam, L, dist))
        return math.isfinite(L) and L <= 1e6 * trace[0][2]

    losses = []
    if every is not None:
        read(0)
    for t in range(1, steps + 1):
        loss = _sgd_step(net, params, bufs, loss_fn, X, y, B, gen, lr, momentum)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        if every is not None and t % every == 0 and not read(t):
            break
    if trace and trace[-1][0] == len(losses):          # read at the last step already
        lam1 = trace[-1][1]
    else:
        lam1 = (float(top_eigenvalues(net, loss_fn, (X, y), k=1, seed=seed, policy="eval")[0])
                if math.isfinite(losses[-1]) else math.nan)
    extra = {}
    if every is not None:
        tr = np.array(trace, dtype=float)
        extra = dict(trace_steps=tr[:, 0].astype(int), trace_lam=tr[:, 1],
                     trace_loss_ratio=tr[:, 2] / tr[0, 2], trace_distance=tr[:, 3])
    return SelfStabilisation(lam0, lam1, lr, factor, B, steps, momentum, losses[0],
                             max(losses), losses[-1], seed, **extra)
