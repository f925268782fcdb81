"""Curvature during training: `CurvatureMonitor` (docs/theory.md §3, §5).

Attach the monitor to any training loop — call ``monitor.maybe_record(step)`` every
step (or every k steps), or ``monitor.attach(optimizer)`` to record from an optimizer
step hook. At each record it measures, at the current weights:

* λ₁, the top eigenvalue of the full-data Hessian (or GGN), by thick-restart Lanczos
  (:func:`nets.algorithms.lanczos.eigsh`) **warm-started** from the previous record's
  top eigenvector, stopping as soon as the pair has converged (on the digits MLPs and
  CNN, records every few steps took 10–17 products warm against 12–19 cold, and 20 for
  each before the solver tested convergence after every product);
* s_u² = (1/(N−1)) Σ_i ‖(H_i − H)u‖² along that eigenvector u
  (:func:`nets.noise.directional.directional_noise_from_operator`, sampled to relative
  standard error `noise_rel_error`), and the critical batch size B* = s_u²/λ₁²;
* the predicted batch sharpness λ'(B) = λ₁ + c(B, N)·s_u²/λ₁ (c = 1/B − 1/N) at the
  training batch B = `batch_size`;
* the measured batch sharpness E_S λ_max(H_S) over `n_batches` random batches S of size
  B (:func:`nets.noise.batch_spectra.measure_batch_top_eigenvalue`), mean ± standard
  error (`n_batches=0` skips it);
* the table of stability-limit learning rates α_max(B') = F/λ'_ρ(B') for every B' in
  `batch_sizes` — the mean-square limit of `predict_max_lr`: F = 2(1 + ρ) and
  λ'_ρ = λ₁ + (1 + ρ)/(1 − ρ)·(λ'(B') − λ₁) for heavy ball (F/(1 − τ) with dampening τ),
  Nesterov's own limit for torch's Nesterov (:func:`rmt.lr.momentum_effective_curvature`),
  2/λ'(B') without momentum — and, when the training learning rate α is known (from the
  attached optimizer or passed as `lr`), its batch-size transfer α·λ'_ρ(B)/λ'_ρ(B');
* the edge-of-stochastic-stability plateau :func:`eoss_plateau`: the λ₁* at which the
  predicted batch sharpness reaches the deterministic edge, λ'(B; λ₁*) = F/α (`edge`).

**Budget.** Every record costs a few full-data products; the monitor times itself and
skips a due record while its spent time would exceed `budget` (default 0.1) of the
wall time since it started, taking it at the first later call that fits. The first
record is always taken. `overhead()` reports the measured fraction.

**Resumable records.** With `path`, every record is one JSON line
(:class:`nets.utils.jsonl_store.JsonlStore`, written atomically) keyed by its step; the
first line holds the settings — with the number of parameters, the model's dtype, a
fingerprint of its structure and the loss, and one of the data — and a monitor opened on
the same file with other settings, or for another model, loss or data, is refused, as is
a second monitor writing a step the file already holds (two runs writing different steps
are not told apart, e.g. one resumed at a later step than the other's). A run killed and restarted
from a checkpoint re-reads its records: steps already recorded are skipped (nothing
duplicated) and none is lost. The warm-start
vector is not stored: the first record after a restart starts cold. Each record also
stores a fingerprint of the weights and buffers it was measured at (`state_dict`,
`nets.utils.fingerprints`). When a monitor on that file is at the step of the file's
first record (``maybe_record`` / ``record``: a run starting from scratch), its weights
must be the ones stored there, else it is another run on the same path (another
initialisation; another learning rate or batch order too when that record is after a
step), whose records would be mixed with the stored ones: refused with a ValueError.
A run restarted from a checkpoint later than that step is not checked (its retraced
steps need not be bit-identical: non-deterministic kernels, batch order not restored);
nor is a file whose first record was written before the fingerprint was stored.

**Parameters measured.** λ₁ and the rest are over the parameters selected when the
monitor was built (`params`, default the trainable ones, as written in the file's
settings); a record after a layer was frozen or unfrozen since then is refused with a
ValueError, as the learner refuses it: build a new monitor (with its own path).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Callable

import numpy as np
import torch

from nets.algorithms.lanczos import eigsh
from nets.curvature.loss_check import mean_reduction_check
from nets.curvature.operators import check_policy, curvature_operator
from nets.curvature.params import ParamLayout, check_model, refuse_changed_params
from nets.learning_rates.lr_prediction import optimizer_settings, warn_partial_optimizer
from nets.noise.batch_spectra import measure_batch_top_eigenvalue
from nets.noise.directional import directional_noise_from_operator
from nets.utils.autocast import outside_caller_contexts
from nets.utils.callers import caller_stacklevel
from nets.utils.data_source import as_data_source, model_place
from nets.utils.fingerprints import code_fingerprint, data_fingerprint, digest, tensor_bytes
from nets.utils.jsonio import to_jsonable
from nets.utils.jsonl_store import JsonlStore
from nets.utils.modes import kept_modes, kept_rng
from nets.utils.results import Result, result
from rmt.lr import batch_curvature, momentum_effective_curvature, momentum_factor, noise_factor
from rmt.validation import as_batch_sizes, as_float, as_int, as_unit_interval, resolved_seed

__all__ = ["CurvatureMonitor", "MonitorRecord", "CurvatureTracker", "eoss_plateau"]


def eoss_plateau(lr, batch_size, s2, N=None, *, momentum=0.0, factor=None) -> float:
    """The full-data sharpness λ₁* at the edge of stochastic stability.

    Solves λ'(B; λ₁*) = λ₁* + c(B, N)·s²/λ₁* = F/α with F = 2(1 + ρ) (heavy-ball ρ), i.e.
    the larger root λ₁* = (a + √(a² − 4cs²))/2, a = F/α. If SGD's batch sharpness settles
    at the stability limit F/α (Andreyev & Beneventano 2024), λ₁ of the full-data Hessian
    settles at λ₁* ≤ F/α, lower the smaller B. Returns nan when a² < 4cs² (the batch
    noise alone puts λ' above F/α for every λ₁: no plateau). With B = N (c = 0): F/α,
    the full-batch edge of stability (Cohen et al. 2021). factor : F itself, overriding
    2(1 + ρ) (Nesterov momentum or dampening, `OptimizerSettings.sgd_factor`).
    """
    momentum = as_unit_interval("momentum", momentum)  # rmt.lr would name it "beta"
    F = momentum_factor(momentum) if factor is None else as_float("factor", factor, positive=True)
    a = F / as_float("lr", lr, positive=True)
    c = float(noise_factor(batch_size, N, name="batch_size"))
    s2 = as_float("s2", s2, nonnegative=True)
    disc = a * a - 4.0 * c * s2
    return float("nan") if disc < 0 else 0.5 * (a + math.sqrt(disc))


@result
class MonitorRecord(Result):
    """One record of :class:`CurvatureMonitor` (module docstring).

    step; time : wall seconds since the monitor started; loss : the training loss passed
    in (nan if none); lr, momentum : the optimizer's α, ρ (nan / 0 if unknown);
    lam, lam_residual, lam_converged : λ₁ and its Lanczos residual; s2, s2_stderr : s_u²
    and its standard error — when sampled (to `noise_rel_error`), against its value on all
    N samples; when every sample is used (small N), the data set's own sampling error
    std/√N, which can be the larger of the two (`nets.noise.directional`);
    b_star : s_u²/λ₁²; batch_size : B; lam_prime : predicted λ'(B);
    batch_sharpness, batch_sharpness_std, batch_sharpness_stderr : measured
    E λ_max(H_B) over n_batches batches (nan if n_batches = 0); plateau : eoss_plateau(α)
    (nan if α unknown); batch_sizes, max_lr, transfer_lr : the lr table (transfer nan
    if α unknown); cost : wall seconds of this record; num_matvecs : full-data products
    for λ₁; overhead : the monitor's time fraction when this record was taken; edge : the
    deterministic edge F/α of the optimizer (nan if α or F unknown).
    """

    step: int
    time: float
    loss: float
    lr: float
    momentum: float
    lam: float
    lam_residual: float
    lam_converged: bool
    s2: float
    s2_stderr: float
    b_star: float
    batch_size: int
    lam_prime: float
    batch_sharpness: float
    batch_sharpness_std: float
    batch_sharpness_stderr: float
    plateau: float
    batch_sizes: tuple
    max_lr: tuple
    transfer_lr: tuple
    cost: float
    num_matvecs: int
    overhead: float
    edge: float = float("nan")

    @classmethod
    def from_dict(cls, d: dict) -> "MonitorRecord":
        kw = {}
        for k in (f.name for f in cls.__dataclass_fields__.values()):
            v = d[k]
            if k in ("step", "batch_size", "num_matvecs"):
                kw[k] = int(v)
            elif k == "lam_converged":
                kw[k] = bool(v)
            elif k == "batch_sizes":
                kw[k] = tuple(int(x) for x in v)
            elif k in ("max_lr", "transfer_lr"):
                kw[k] = tuple(float(x) for x in v)
            else:
                kw[k] = float(v)            # also turns "nan" back into a float
        return cls(**kw)


def _as_loss_value(loss) -> float:
    """The training loss a record carries: a real number or a one-element tensor (NaN or
    inf kept: it is what the run had), TypeError naming `loss` otherwise."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1 or loss.is_complex():
            raise TypeError(f"loss must be a number or a one-element real tensor, got a tensor "
                            f"of shape {tuple(loss.shape)}")
        return float(loss.detach())
    if isinstance(loss, (bool, np.bool_)) or not isinstance(loss, (int, float, np.integer,
                                                                     np.floating)):
        raise TypeError(f"loss must be a real number, got {type(loss).__name__}")
    return float(loss)


class CurvatureTracker:
    """The curvature machinery shared by :class:`CurvatureMonitor` and the learner.

    Holds the model, loss and data settings, builds a fresh operator at the current
    weights, and finds the top eigenpair by `eigsh` warm-started from the previous top
    eigenvector (cold, from `seed`, the first time); `noise(op, u)` gives s_u².
    """

    def __init__(self, model, loss_fn, data, *, kind="hessian", tol=1e-6, params=None,
                 policy=None, chunk_size=None, device=None, dtype=None, seed=0):
        if kind not in ("hessian", "ggn"):
            raise ValueError(f"kind must be 'hessian' or 'ggn', got {kind!r}")
        check_policy(model, policy)
        if chunk_size is not None:      # refused here, not in the first step's hook
            chunk_size = as_int("chunk_size", chunk_size, minimum=1)
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.kind, self.params, self.policy = kind, params, policy
        self.chunk_size, self.device, self.dtype = chunk_size, device, dtype
        self.tol = as_float("tol", tol, positive=True)
        self.seed = resolved_seed("seed", seed)     # None: one int from fresh entropy, recorded
        self.v0 = None

    def operator(self, data=None):
        return curvature_operator(self.model, self.loss_fn, self.data if data is None else data,
                                  kind=self.kind, params=self.params, policy=self.policy,
                                  chunk_size=self.chunk_size, device=self.device,
                                  dtype=self.dtype)

    def top(self, op):
        """EigenResult of the top eigenpair of `op`, warm-started; keeps the vector."""
        v0 = self.v0 if self.v0 is not None and self.v0.shape[0] == op.P else None
        res = eigsh(op, k=1, which="LA", tol=self.tol, seed=self.seed, v0=v0,
                    progress=False)                     # inside a training loop: never a bar
        self.v0 = res.vectors[:, 0].detach().clone()
        return res

    def noise(self, op, u, *, rel_error=0.1, seed=0, micro_batch=1):
        return directional_noise_from_operator(op, u, micro_batch=micro_batch, seed=seed,
                                               rel_error=rel_error, progress=False)


def _default_batch_sizes(N: int, B: int) -> tuple:
    sizes = {int(2 ** k) for k in range(0, 20) if 2 ** k <= N} | {int(B), int(N)}
    return tuple(sorted(s for s in sizes if s >= 2 or s in (B, N)))


def warn_eval_mode_layers(model: torch.nn.Module, who: str) -> None:
    """One UserWarning when the model is in eval mode but has layers that act differently
    in train mode (BatchNorm, Dropout, RReLU) and no policy was given: the curvature
    products follow the model's mode, so a later ``model.train()`` makes the next
    curvature update raise inside ``opt.step()``. The modes are flipped to read them and
    restored. (`who`: the object built, named in the message; the monitor did not warn,
    an outside sweep.)"""
    from nets.curvature.operators import describe_layers, train_mode_layers

    if any(m.training for m in model.modules()):
        return
    with kept_modes(model):                  # every flag restored on exit
        model.train()
        found = list(train_mode_layers(model))
    if found:
        warnings.warn(
            f"{who}: the model is in eval mode and has layers that act "
            f"differently in train mode ({describe_layers(found)}) and policy=None: the "
            "curvature follows the model's mode, so training it after model.train() makes "
            "the next curvature update raise inside opt.step(); pass policy='eval' (running "
            "statistics, no dropout: what is measured now) or policy='train_batch_stats'",
            UserWarning, stacklevel=caller_stacklevel())


def _warn_batch_norm_in_training(model) -> None:
    """With policy="eval" on a model in train mode whose BatchNorm layers normalise by the
    batch's statistics, the monitor measures the eval-mode function (running statistics),
    not the loss the optimizer trains, and the per-sample noise has no train-mode version
    (policy='train_batch_stats' is refused): said once. On a small BatchNorm CNN after 6
    steps the eval-mode λ₁ was 2.8× the train-mode one, and max_lr as much too low, with
    nothing said (an outside sweep)."""
    from nets.curvature.operators import describe_layers, train_mode_layers

    norms = [(name, m, kind) for name, m, kind in train_mode_layers(model)
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if norms:
        warnings.warn(
            f"CurvatureMonitor: policy='eval' measures the model on its running statistics "
            f"({describe_layers(norms)} are in train mode), not the batch-normalised loss "
            "the optimizer trains; the two can differ several-fold early in training (λ₁ "
            "2.8× on a small BatchNorm CNN after 6 steps), and the records say nothing of "
            "the train-mode curvature", UserWarning, stacklevel=caller_stacklevel())


class CurvatureMonitor:
    """Records λ₁, s_u², B*, batch sharpness and the lr table during training.

    Parameters
    ----------
    model, loss_fn, data : the network, the mean-reduced loss and the training data in any
        form of `nets.utils.data_source` (pair, Dataset, non-shuffling DataLoader); a summed
        or weighted-mean loss warns once, at construction (`check_mean_reduced`).
    batch_size : the training batch B.
    every : record every `every` steps (None: as often as the budget allows).
    budget : the largest fraction of wall time the monitor may use (default 0.1).
    n_batches : batches of size B for the measured batch sharpness (0: skip).
    batch_sizes : B' of the lr table (default powers of 2 from 2 up to N, with B and N; 1 only where B is 1).
    train_size : N, the size of the training set, when `data` is a subset of it (a few
        hundred samples keep each record to seconds): the batch noise c(B, N) = 1/B − 1/N of
        every limit and the table's range use it (default: len(data); with a 200-sample
        subset of 3,000 the noise term read 0.38× its value). λ₁ and s_u² are estimated on
        `data`, and the measured batch sharpness draws its batches from `data` (B < len(data)).
    lr, momentum : the training α and heavy-ball ρ if no optimizer is attached.
    path : JSON-lines file for resumable records (None: in memory only).
    tol : Lanczos relative residual for λ₁ and the batch sharpness; noise_rel_error :
        target relative standard error of s_u².
    kind, params, policy, chunk_size, device, dtype, seed : as everywhere in `nets`.
    """

    def __init__(self, model, loss_fn, data, *, batch_size, every=None, budget=0.1,
                 n_batches=4, batch_sizes=None, train_size=None, lr=None, momentum=0.0,
                 path=None, tol=1e-6, noise_rel_error=0.1, kind="hessian", params=None,
                 policy=None, chunk_size=None, device=None, dtype=None, seed=0,
                 clock: Callable = None):
        check_model(model)
        source = as_data_source(data, name="data")
        self.n_data = int(source.N)
        if self.n_data < 2:
            raise ValueError(f"data: the monitor needs at least 2 samples (s_u² is a variance "
                             f"across samples), got N={self.n_data}")
        self.N = (self.n_data if train_size is None
                  else as_int("train_size", train_size, minimum=self.n_data))
        self.batch_size = as_int("batch_size", batch_size, minimum=1)
        if self.batch_size > self.N:
            raise ValueError(f"batch_size must be <= N = {self.N}, got {self.batch_size}")
        self.every = None if every is None else as_int("every", every, minimum=1)
        self.budget = as_float("budget", budget, positive=True)
        if not self.budget <= 1:
            raise ValueError(f"budget must be a fraction in (0, 1], got {self.budget}")
        self.n_batches = as_int("n_batches", n_batches, minimum=0)
        if batch_sizes is None:
            batch_sizes = _default_batch_sizes(self.N, self.batch_size)
        self.batch_sizes = tuple(int(b) for b in as_batch_sizes(batch_sizes, self.N))
        self.lr = None if lr is None else as_float("lr", lr, positive=True)
        self.momentum = as_unit_interval("momentum", momentum)
        if policy == "train_batch_stats":        # refused now, not at the first record
            raise ValueError("CurvatureMonitor: per-sample curvature noise is undefined with "
                             "policy='train_batch_stats' (batch statistics couple the samples); "
                             "use policy='eval'")
        self.noise_rel_error = as_float("noise_rel_error", noise_rel_error, positive=True)
        self.seed = as_int("seed", seed, minimum=0)
        if policy is None:
            warn_eval_mode_layers(model, "CurvatureMonitor")
        elif policy == "eval":
            _warn_batch_norm_in_training(model)
        self.tracker = CurvatureTracker(model, loss_fn, data, kind=kind, tol=tol, params=params,
                                        policy=policy, chunk_size=chunk_size, device=device,
                                        dtype=dtype, seed=self.seed)
        mean_reduction_check(model, loss_fn, source)      # once: a summed / weighted loss warns
        if clock is not None and not callable(clock):   # it failed at the first record()
            raise TypeError(f"clock must be a zero-argument callable returning seconds (like "
                            f"time.perf_counter) or None, got {type(clock).__name__}")
        self._clock = time.perf_counter if clock is None else clock
        layout = ParamLayout.from_module(model, params)
        model_dtype = model_place(model)[1]
        self.config = dict(batch_size=self.batch_size, n_batches=self.n_batches,
                           batch_sizes=list(self.batch_sizes), tol=self.tracker.tol,
                           noise_rel_error=self.noise_rel_error, kind=kind, policy=policy,
                           seed=self.seed, N=self.N, params=list(layout.names),
                           # the records' edge, plateau and limits use them: a file written
                           # at lr 0.1 was handed back to a run at lr 1.0 (an outside audit)
                           lr=self.lr, momentum=self.momentum,
                           dtype=None if dtype is None else str(dtype),
                           chunk_size=chunk_size,
                           device=None if device is None else str(torch.device(device)),
                           P=int(layout.P),
                           model_dtype=None if model_dtype is None else str(model_dtype),
                           structure=code_fingerprint(model, loss_fn),
                           data=data_fingerprint(source) if path is not None else None)
        self.records: list[MonitorRecord] = []
        self.store = None
        self._run_start = None          # (step, weights fingerprint) of the file's first record
        if path is not None:
            self.store = JsonlStore(path, name="path")
            if "config" in self.store:
                stored = self.store["config"]      # a file written before a key existed
                differ = [k for k, v in self.config.items() if k in stored and stored[k] != v]
                if differ:
                    said = {"structure": "the model's structure or the loss",
                            "data": "the data", "P": "the number of parameters",
                            "model_dtype": "the model's dtype"}
                    what = ", ".join(said.get(k, f"{k} ({stored[k]!r} there, {self.config[k]!r} "
                                                  "here)") for k in differ)
                    raise ValueError(f"{path} holds records with other settings or of another "
                                     f"run (differing: {what}); use another path")
            else:
                self.store.put("config", self.config)
            self.records = sorted((MonitorRecord.from_dict(v) for k, v in self.store.items()
                                   if k.startswith("step=")), key=lambda r: r.step)
            # the weights the file's run had at its first record (module docstring), if
            # stored: a run at that step must have them too
            if self.records:
                first = self.store[f"step={self.records[0].step}"]
                if "weights" in first:
                    self._run_start = (self.records[0].step, first["weights"])
        self._optimizer = None
        self._settings = None
        self._hook = None
        self._unsupported = False
        self._steps = 0
        self._t_start = None
        self.time_spent = 0.0
        self._last_cost = 0.0
        self._next_step = 0
        if self.records and self.every is not None:      # resumed: keep the schedule
            self._next_step = self.records[-1].step + self.every

    # -- scheduling -------------------------------------------------------------------
    def start(self) -> None:
        """Start the wall clock the budget is measured against (else: the first call)."""
        if self._t_start is None:
            self._t_start = self._clock()

    def elapsed(self) -> float:
        return 0.0 if self._t_start is None else self._clock() - self._t_start

    def overhead(self) -> float:
        """Measured fraction of wall time (since start) spent in the monitor."""
        e = self.elapsed()
        return self.time_spent / e if e > 0 else float("nan")

    def recorded_steps(self) -> list[int]:
        return [r.step for r in self.records]

    def due(self, step: int) -> bool:
        """Whether `maybe_record(step)` would measure now (schedule and budget)."""
        if step in self._done_steps():
            return False
        if self.every is not None and step < self._next_step:
            return False
        if self.time_spent == 0.0:
            return True
        e = self.elapsed()
        return self.time_spent + self._last_cost <= self.budget * (e + self._last_cost)

    def _done_steps(self):
        return {r.step for r in self.records}

    def _weights_fingerprint(self) -> str:
        """Hash of the exact bytes of the model's weights and buffers (its `state_dict`,
        what a checkpoint restores; `nets.utils.fingerprints`)."""
        return digest(*(tensor_bytes(t) for t in self.tracker.model.state_dict().values()))

    def _check_same_run(self, step: int) -> None:
        """At the step of the file's first record (once), refuse unless the weights are
        those the file's run had there (module docstring)."""
        if self._run_start is None or step != self._run_start[0]:
            return
        if self._weights_fingerprint() != self._run_start[1]:
            raise ValueError(
                f"{self.store.path} holds records of another run: the weights at step {step}, "
                "its first record, differ from those its run had there (another "
                "initialisation, checkpoint, learning rate or batch order), and its records "
                "would be mixed with this run's; give each run its own path")
        self._run_start = None           # the same run: checked once

    def _check_same_lr(self, rec, lr) -> None:
        """Refuse to hand back a stored record measured at another learning rate or
        momentum than this run has now (where both are known): the weights check of the
        first record cannot see a run that differs only in its lr (an outside audit)."""
        a, rho, _, _ = self._lr_momentum(lr)
        pairs = [("lr", rec.lr, a), ("momentum", rec.momentum, rho)]
        for name, was, now in pairs:
            if was is None or now is None or not (math.isfinite(was) and math.isfinite(now)):
                continue
            if not math.isclose(was, now, rel_tol=1e-9, abs_tol=0.0):
                raise ValueError(
                    f"{self.store.path if self.store is not None else 'the records'}: step "
                    f"{rec.step} was recorded at {name} = {was:g} and this run has {now:g}: "
                    "the file holds records of another run; give each run its own path")

    def _check_params(self) -> None:
        """Refuse a record over another parameter set than the monitor was built for (a
        layer frozen or unfrozen since: module docstring), as the learner does."""
        refuse_changed_params(
            self.config["params"],
            ParamLayout.from_module(self.tracker.model, self.tracker.params).names,
            "the CurvatureMonitor",
            f"its records measure the set it was built with (P = {self.config['P']}, written "
            "in its file's settings) — build a new CurvatureMonitor (with its own path) after "
            "freezing or unfreezing layers, or pass params= to name a fixed set")

    def maybe_record(self, step: int, *, loss=None, lr=None):
        """Record at `step` if due (module docstring); returns the record or None. At the
        step of its file's first record the weights are checked against those stored
        there (module docstring; ValueError for another run)."""
        step = as_int("step", step, minimum=0)
        self._check_same_run(step)
        self.start()
        if not self.due(step):
            return None
        return self.record(step, loss=loss, lr=lr)

    def attach(self, optimizer: torch.optim.Optimizer, *, start_step: int = 0):
        """Record from a step post-hook of `optimizer` (lr and momentum read from its
        first parameter group — with a warning when the groups' learning rates differ;
        groups added later are read at the next step; torch SGD's Nesterov momentum and
        dampening change the limit's factor, and for Adam/RMSprop the SGD lr table is nan;
        an optimizer over part of the model is warned about as in `predict_max_lr`; an lr
        of 0, a warm-up's first step, is recorded with no edge, plateau or transfer); steps are counted
        from `start_step` (pass the step a resumed run restarts at). Returns the hook
        handle (``.remove()`` detaches)."""
        if not (hasattr(optimizer, "param_groups")
                and hasattr(optimizer, "register_step_post_hook")):
            # refused before anything is kept: a failed attach left the monitor unusable
            raise TypeError("optimizer must be a torch.optim.Optimizer (param_groups and "
                            f"register_step_post_hook), got {type(optimizer).__name__}")
        start_step = as_int("start_step", start_step, minimum=0)
        if self._hook is not None:        # attached before: one hook, one count per step
            self._hook.remove()
        self._optimizer = optimizer
        self._steps = as_int("start_step", start_step, minimum=0)
        done = self.recorded_steps()
        if done and self._steps == 0:
            # start_step=0 on a store with records: most likely a resumed run that did not
            # say where it restarts (a restart from a checkpoint before the last record,
            # with its step passed, is fine: the steps already stored are skipped)
            warnings.warn(f"attach: the store already holds records up to step {max(done)} but "
                          "steps are counted from start_step=0: if this run resumes from a "
                          "checkpoint, pass the step it restarts at (start_step=), or its "
                          "records are labelled with the wrong steps and those already "
                          "stored skipped; if it is a new run, give it a new path (a run whose "
                          "weights at a stored step differ is refused at that step)",
                          UserWarning, stacklevel=caller_stacklevel())
        warn_partial_optimizer(self.tracker.model, optimizer, self.tracker.params,
                               group_lrs=False)     # said below, with what is recorded
        self._read_settings()
        if self._settings is not None and self._settings.name != "sgd":
            warnings.warn(f"CurvatureMonitor: attached to {type(optimizer).__name__}, whose "
                          "stability limit is not SGD's: λ₁ and the noise are recorded, the "
                          "SGD lr table (max_lr, transfer_lr), edge and plateau are nan; the "
                          "adaptive optimizer's limit is nets.predict_adam_max_lr / "
                          "nets.preconditioned_batch_sharpness", UserWarning,
                          stacklevel=caller_stacklevel())

        def hook(opt, args, kwargs):
            self._steps += 1
            if len(opt.param_groups) != self._n_groups:     # add_param_group since
                self._read_settings()
            self.maybe_record(self._steps)

        self._hook = optimizer.register_step_post_hook(hook)
        self.start()
        return self._hook

    def _read_settings(self):
        """The attached optimizer's stability settings (torch's SGD / Adam / RMSprop: their
        factor; the package's learner: heavy ball with its momentum; otherwise none, with
        a warning saying why)."""
        from nets.learning_rates.learner import CurvatureAdaptiveSGD

        optimizer = self._optimizer
        self._n_groups = len(optimizer.param_groups)
        self._unsupported = False
        self._settings = None
        if isinstance(optimizer, CurvatureAdaptiveSGD):
            wd = float(optimizer.param_groups[0].get("weight_decay") or 0.0)
            if wd > 0:          # said for torch's SGD, silent for the learner (a sweep)
                warnings.warn(f"CurvatureMonitor: the learner's weight_decay={wd:g} is not in "
                              "the monitor's curvature (the learner adds it to its own, λ + "
                              "weight_decay); the recorded limits are those of the loss "
                              f"without it, too high by about (λ₁ + {wd:g})/λ₁",
                              UserWarning, stacklevel=caller_stacklevel())
            return
        try:
            self._settings = optimizer_settings(optimizer)
        except (TypeError, ValueError) as err:
            self._unsupported = True
            warnings.warn(f"CurvatureMonitor: no stability limit for this "
                          f"{type(optimizer).__name__} ({err}); supported: SGD, Adam/AdamW, "
                          "RMSprop without momentum, the package's learner, with one setting "
                          "over the parameter groups; its lr table and plateau are nan",
                          UserWarning, stacklevel=caller_stacklevel())
            return
        lrs = {float(g["lr"]) for g in optimizer.param_groups}
        if len(lrs) > 1:
            warnings.warn(f"CurvatureMonitor: the parameter groups train at different learning "
                          f"rates ({sorted(lrs)}); the recorded lr, edge, plateau and transfer "
                          "use the first group's", UserWarning, stacklevel=caller_stacklevel())

    def _lr_momentum(self, lr):
        """(α, ρ, F, nesterov): the training lr, its momentum, the factor F of the SGD
        limits (F/α the deterministic edge, F/λ'_ρ the mean-square limit) and whether the
        momentum is Nesterov's. F = 2(1 + ρ), or `OptimizerSettings.sgd_factor` for an
        attached torch SGD (Nesterov, dampening); nan for an attached Adam/RMSprop, whose
        limit is not SGD's (`nets.adam`), or an optimizer with no limit here: the lr table
        (max_lr and transfer_lr), edge and plateau are then nan."""
        if self._optimizer is None:
            alpha = self.lr if lr is None else as_float("lr", lr, nonnegative=True)
            return alpha, self.momentum, momentum_factor(self.momentum), False
        # an explicit lr replaces the attached optimizer's lr only: it replaced its
        # momentum too (with the constructor's 0), and max_lr read 5.7× high (a sweep)
        g = self._optimizer.param_groups[0]
        alpha = float(g["lr"]) if lr is None else as_float("lr", lr, nonnegative=True)
        mom = g.get("momentum", 0.0)
        rho = float(mom if mom else 0.0)
        s = self._settings
        if self._unsupported:
            return alpha, rho, float("nan"), False
        if s is None:
            return alpha, rho, momentum_factor(rho), False
        if s.name != "sgd":
            return alpha, 0.0, float("nan"), False
        s = dataclasses.replace(s, momentum=rho, dampening=s.dampening if rho else 0.0,
                                nesterov=bool(s.nesterov) and rho > 0)
        return alpha, rho, s.sgd_factor, s.nesterov

    # -- measurement --------------------------------------------------------------------
    def measure(self, step: int = 0, *, loss=None, lr=None) -> MonitorRecord:
        """Measure at the current weights (module docstring) without storing; refused
        (ValueError) when the trainable parameters changed since the monitor was built."""
        self._check_params()
        if loss is not None:            # checked before the measurement moves any state
            loss = _as_loss_value(loss)
        t0 = self._clock()
        tr = self.tracker
        model = tr.model
        with (torch.enable_grad(), outside_caller_contexts(), kept_modes(model),
              kept_rng(model_place(model)[0])):
            op = tr.operator()
            eig = tr.top(op)
            lam = float(eig.values[0])
            # a top eigenvalue at round-off (a concave loss: 5e-30 of either sign) is no
            # curvature: its limits read 0.67-17.8 at B = 1 by seed, 3e29 at B = N, where
            # predict_max_lr refuses it (an outside sweep)
            positive = lam > 0 and not eig.is_zero(0)
            u = tr.v0
            if positive:
                nz = tr.noise(op, u, rel_error=self.noise_rel_error, seed=self.seed + step)
                s2, s2_se = float(nz.s2), float(nz.stderr)
            else:
                s2, s2_se = float("nan"), float("nan")
            B, N = self.batch_size, self.N
            bs_mean = bs_std = bs_se = float("nan")
            if self.n_batches and B < self.n_data:
                m = measure_batch_top_eigenvalue(
                    model, tr.loss_fn, tr.data, [B], n_batches=self.n_batches, kind=tr.kind,
                    tol=tr.tol, params=tr.params, policy=tr.policy, chunk_size=tr.chunk_size,
                    device=tr.device, dtype=tr.dtype, seed=self.seed + step, progress=False)
                bs_mean, bs_std, bs_se = (float(m["mean"][0]), float(m["std"][0]),
                                          float(m["stderr"][0]))
            elif self.n_batches and B == N:
                bs_mean, bs_std, bs_se = lam, 0.0, 0.0
        a, rho, F, nesterov = self._lr_momentum(lr)
        # an lr of 0 (a warm-up's first step) is recorded, but has no edge or transfer
        known = a is not None and a > 0 and math.isfinite(F)
        ok = positive and math.isfinite(s2)
        Bs = np.asarray(self.batch_sizes)
        nanv = tuple(float("nan") for _ in Bs)
        lam_prime = float(batch_curvature(B, lam, s2, N)) if ok else float("nan")
        if ok:          # the mean-square λ'_ρ(B') of predict_max_lr (module docstring)
            eff = np.atleast_1d(momentum_effective_curvature(
                lam, np.atleast_1d(batch_curvature(Bs, lam, s2, N)), rho, nesterov=nesterov))
            eff_B = float(momentum_effective_curvature(lam, lam_prime, rho, nesterov=nesterov))
        max_lr = tuple(F / eff) if ok else nanv
        transfer = tuple(a * eff_B / eff) if ok and known else nanv
        plateau = eoss_plateau(a, B, s2, N, factor=F) if ok and known else float("nan")
        cost = self._clock() - t0
        return MonitorRecord(
            step=int(step), time=self.elapsed(),
            loss=float("nan") if loss is None else loss,
            lr=float("nan") if a is None else float(a), momentum=float(rho), lam=lam,
            lam_residual=float(eig.residuals[0]), lam_converged=bool(eig.converged[0]),
            s2=s2, s2_stderr=s2_se, b_star=s2 / lam ** 2 if ok else float("nan"),
            batch_size=B, lam_prime=lam_prime, batch_sharpness=bs_mean,
            batch_sharpness_std=bs_std, batch_sharpness_stderr=bs_se, plateau=plateau,
            batch_sizes=tuple(int(b) for b in Bs), max_lr=tuple(map(float, max_lr)),
            transfer_lr=tuple(map(float, transfer)), cost=float(cost),
            num_matvecs=int(eig.num_matvecs), overhead=float("nan"),
            edge=F / a if known else float("nan"))

    def record(self, step: int, *, loss=None, lr=None) -> MonitorRecord:
        """Measure now and keep (and write) the record; a step already recorded is
        returned as it is (never measured or written twice; at the step of its file's
        first record, after the check of `maybe_record`)."""
        step = as_int("step", step, minimum=0)
        self._check_same_run(step)
        for r in self.records:
            if r.step == step:
                self._check_same_lr(r, lr)
                return r
        self.start()
        t0 = self._clock()
        rec = self.measure(step, loss=loss, lr=lr)
        dt = self._clock() - t0
        self.time_spent += dt
        self._last_cost = dt
        e = self.elapsed()
        rec = MonitorRecord(**{**{k: getattr(rec, k) for k in rec.keys()},
                               "overhead": self.time_spent / e if e > 0 else float("nan")})
        if self.store is not None:
            try:
                self.store.put(f"step={step}", {**rec.to_dict(),
                                                "weights": self._weights_fingerprint()})
            except KeyError as err:         # the file gained this step from another writer
                raise ValueError(f"{self.store.path}: step {step} was written by another "
                                 "monitor on the same file; give each run its own path") from err
        self.records.append(rec)
        self.records.sort(key=lambda r: r.step)
        if self.every is not None:
            self._next_step = step + self.every
        return rec

    # -- reading ------------------------------------------------------------------------
    def trace(self, key: str) -> np.ndarray:
        """One field over the records, in step order (numpy array)."""
        fields = [f.name for f in dataclasses.fields(MonitorRecord)]
        if key not in fields:
            raise ValueError(f"key must be a field of the records ({', '.join(fields)}), "
                             f"got {key!r}")
        return np.asarray([getattr(r, key) for r in self.records])

    def to_dict(self) -> dict:
        return to_jsonable(dict(config=self.config, records=[r.to_dict() for r in self.records],
                                time_spent=self.time_spent, overhead=self.overhead()))

    def plot(self, ax=None):
        """λ₁, measured and predicted batch sharpness, the optimizer's edge F/α and the
        EoSS plateau against the step; returns the axes."""
        if ax is None:
            import matplotlib.pyplot as plt
            ax = plt.gca()
        steps = self.trace("step")
        ax.plot(steps, self.trace("lam"), "o-", ms=3, label="λ₁ (full data)")
        if np.isfinite(self.trace("batch_sharpness")).any():
            ax.errorbar(steps, self.trace("batch_sharpness"),
                        yerr=self.trace("batch_sharpness_stderr"), fmt="s-", ms=3, capsize=2,
                        label=f"batch sharpness (B={self.batch_size})")
        ax.plot(steps, self.trace("lam_prime"), "--", label="predicted λ'(B)")
        edge = self.trace("edge")
        if np.isfinite(edge).any():
            ax.plot(steps, edge, "k:", label="edge F/α")
            ax.plot(steps, self.trace("plateau"), "-.", label="EoSS plateau λ₁*")
        ax.set_xlabel("step")
        ax.set_ylabel("curvature")
        ax.legend(fontsize=7)
        return ax

