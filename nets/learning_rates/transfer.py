"""Batch-size transfer of a learning rate known at one batch size (docs/theory.md §5).

Given a learning rate α₀ that works (or is the measured threshold) at batch size B₀, the
learning rate at batch size B is α(B) = α₀·a(B)/a(B₀), where a(B) is the shape of the
threshold in B; only the ratio is used, and the anchor carries the absolute level (no
fitted correction factor is involved). The curvature forms take the mean-square limit

    a(B) = α_ms(B) = 2(1 + ρ)/λ'_ρ(B),   λ'_ρ(B) = λ + (1 + ρ)/(1 − ρ) · (λ'(B) − λ),

with λ the full-data top Hessian eigenvalue, λ'(B) the predicted top eigenvalue of the
batch Hessian (`nets.noise.batch_spectra.predict_batch_top_eigenvalue`, e.g. the
directional form λ'(B) = λ + c(B,N)·s_u²/λ) and ρ the heavy-ball momentum. λ'_ρ is the
mean-square stability limit of heavy-ball SGD with batch noise
(`rmt.lr.sgd_momentum_ms_max_lr`, derived in `rmt.symbolic.derive_momentum_mean_square`):
momentum amplifies the batch-noise part of the curvature by (1 + ρ)/(1 − ρ). At ρ = 0
this is α(B) = α₀·λ'(B₀)/λ'(B). On real networks the absolute limit 2(1+ρ)/λ'_ρ is
conservative: the real divergence threshold sits 1.3–3× above it (the bounded
cross-entropy gradient caps a growing oscillation; docs/theory.md §5.6).

What is transferred is a stability limit. A measured threshold "the loss stays below k×
its start" is one only where it hardly depends on k; on cross-entropy networks at small
B it is a loss tolerance instead (it moves ~5× between k = 3 and k = 100 on the digits
MLP and CNN at B = 8, ~1.2× at B = 512), so there the transfer holds for one tolerance
only (docs/theory.md §5.6, benchmarks/bench_criterion.py).

Which form. "linearized" (default) transfers the threshold of the network's linearised
model itself, corrected along the top eigenvector for the network's own nonlinearity:

    α(B) = α₀ · a(B)/a(B₀),   a(B) = α_lin(B) · [1 − (1 − s_lin/s_real)·λ/λ'_ρ(B)],

with α_lin(B) the divergence threshold of the linearised network in its top-`rank`
Gauss–Newton directions under the real protocol (`nets.linearized_threshold`, the same
tolerance `factor` and `steps` as the measured anchor should have), s_lin/s_real the
ratio of the linearised to the real secant curvature along u where the loss first
reaches `factor`× its start (`nets.learning_rates.along_top`), and λ/λ'_ρ(B) the share
of the effective curvature that is the deterministic curvature along u (the batch-noise
share is left as the linearised network has it). The correction is applied only where
its premise holds (`along_top.correction_applies`), s_lin/s_real ≤ 1 (the real loss along u at least as sharp as the
linearised one): where the real loss along u is flatter (s_lin/s_real > 1 — measured
2.8–32 on four tabular MLPs with label smoothing, with and without LayerNorm) the bracket
would raise the large-B threshold above the linearised network's, while the real
threshold there is 0.78–0.90× it; the form is then the uncorrected linearised threshold
and a warning says so (`correction_applied=False`; benchmarks/bench_heldout_tabular.py).
It captures what the local limit misses on confident cross-entropy networks — the
bounded cross-entropy gradient caps a growing oscillation, and the loss sharpens along u —
and is the form that transferred within 15 % on six digits networks at m = 0 (over eight
batch sequences), three of them held out when the form was fixed, and on two user-style
networks added later with the prediction written down first (a residual CNN with
GroupNorm, an MLP with LayerNorm; docs/real_training.md, benchmarks/bench_heldout_transfer.py), where the
directional form missed the held-out ones by up to 2×. With momentum (m = 0.9) neither
form meets 20 % on every network: at large B the real network's layers, multiplying each
other, grow its Jacobian along the momentum drift and its units switch (both
destabilising) or saturate (stabilising), and a model with a fixed Jacobian has none of
these (measured, not modelled: docs/theory.md §5.6, benchmarks/bench_momentum_expansions.py).
The miss has a direction: transferred upward from a small B₀ the lr came out too high on
most networks measured, downward from a large B₀ too low, so with momentum anchor at the
largest batch size you will use (`warn_momentum_upward` says so when asked for B > B₀).
Cost: the top-`rank` Lanczos basis, N·K·rank Jacobian entries and a few hundred linearised
steps per learning rate and batch size (minutes on one CPU thread for a 2k–7k-parameter
network on 1,797 samples), against seconds for the directional form. Check `rank` by
doubling it (`rank_check=True`).

"curved" runs the linearised network with one more term, the outputs' second derivative
along the top eigenvector u, z_i(e) = z_i + J_i e + ½(uᵀe)²·d²z_i/dt²(w₀ + t·u)
(`linear_outputs.CurvedOutputs`): the change of the Jacobian along u that the secant
correction stands for, kept in the dynamics instead of applied afterwards (so no
correction), at the cost of one more pass over the data. On a digits tanh MLP at B = 512
with momentum it closes the linearisation's gap (real ÷ model 0.83 → 1.03), partly by
overshooting (the network's exact outputs along u give 0.88), and is
measured against the default on eleven networks (28 rows) in docs/real_training.md
(benchmarks/bench_curved_transfer.py): closer with momentum on the tanh MLPs, no better on
GELU, LayerNorm, ReLU-residual or MSE networks, and worse without momentum on the digits
MLP and CNN, so it is not the default.

Nesterov momentum (torch's nesterov=True) is supported the same way: its mean-square limit
F_N/λ'_ρ(B) (`rmt.lr.sgd_nesterov_ms_max_lr`, F_N = 2(1+ρ)/(1+2ρ); the same limit as heavy
ball where the noise dominates, 2.8× lower at ρ = 0.9 where it does not) sets λ'_ρ(B) and
the stability limit, and the linearised network runs Nesterov's update. Measured on seven
digits networks at ρ = 0.9 (docs/real_training.md) the default form met 20 % on one (the CNN, 0.88–1.10)
and missed on six (0.64–1.78; closer than heavy ball's default on six of the seven), the
directional form met on one other (the tanh MLP, 0.92–1.06); `warn_momentum_upward` warns
for any B ≠ B₀ with Nesterov.

"directional" (one per-sample pass along u), "resolved", "subspace" (Monte-Carlo over
batches on the top eigenspace) and "isotropic" transfer 1/λ'_ρ(B) of the corresponding
`predict_batch_top_eigenvalue` form (the first equation above) and are reported the same
way.

Also here: the classical rules `scaling_rule(batch_sizes, reference, rule)` for
"linear" (α ∝ B), "sqrt" (α ∝ √B) and "constant".
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings

import numpy as np

from nets.learning_rates.along_top import correction_applies, rescaling
from nets.learning_rates.lr_prediction import optimizer_settings, warn_partial_optimizer
from nets.learning_rates.lr_search import as_growth_factor, as_seeds
from nets.utils.autocast import outside_autocast
from nets.utils.callers import caller_stacklevel
from nets.utils.data_source import as_data_source
from nets.utils.plotting import batch_size_axis, in_b_order
from nets.utils.results import Result, result
from nets.utils.seeding import resolved_seed
from rmt.lr import momentum_effective_curvature, momentum_factor, momentum_noise_gain
from rmt.validation import as_batch_sizes, as_bool, as_float, as_int

__all__ = ["transfer_lr", "LRTransfer", "scaling_rule", "secant_correction", "warn_momentum_upward",
           "warn_momentum_one_pass",
           "refuse_params_for_linearized",
           "momentum_caveat_silenced", "TRANSFER_FORMS",
           "CLASSICAL_RULES"]

MODEL_FORMS = ("linearized", "curved")      # thresholds of a model of the network, per B
TRANSFER_FORMS = (*MODEL_FORMS, "directional", "resolved", "subspace", "isotropic")
_LINEARIZED_RANK = 200
CLASSICAL_RULES = ("linear", "sqrt", "constant")


@result
class LRTransfer(Result):
    """Learning rate per batch size, transferred from a reference (B₀, α₀).

    batch_sizes (n_B,); lr (n_B,) and lr_stderr (propagated from the noise estimate, or
    from the seed spread of the linearised thresholds: NaN from one batch sequence, where
    it is unknown; 0 at B₀); form (the shape used); rule (the
    equation, text); shape a(B) (n_B,) the unanchored threshold shape, lr = α₀·a/a(B₀);
    shape_stderr (n_B,): for "linearized"/"curved" the seed standard error of a(B), independent
    across B; for the curvature forms |a(B) − a⁺(B)| with a⁺ the shape at the noise
    estimate raised by one standard error, which moves every B together;
    reference_batch_size B₀, reference_lr α₀, reference_shape a(B₀); momentum ρ;
    nesterov; noise_gain (1+ρ)/(1−ρ) (Nesterov: its small-noise gain
    (1+ρ)(1+2ρ)/(1+3ρ), as λ'_ρ is not linear in the noise there); lam (λ₁); s2 (s_u²,
    directional pass; None otherwise); batch_curvature λ'(B) and effective_curvature
    λ'_ρ(B) (n_B,), reference_curvature λ'_ρ(B₀); critical_batch_size B* = s_u²/λ² and its
    momentum version B*_ρ = noise_gain·B*; stability_limit F/λ'_ρ(B) (the absolute local
    limit, for comparison; F = 2(1+ρ), Nesterov 2(1+ρ)/(1+2ρ)); N; seed. Forms "linearized"
    and "curved" only (None otherwise): linearized_lr α_lin(B) (n_B,), the linearised (or
    curved) network's threshold; correction the bracket 1 − (1 − s_lin/s_real)·λ/λ'_ρ(B)
    (n_B,; ones where not applied, and for "curved"); correction_applied (False where
    s_lin/s_real > 1, module docstring, where it is NaN — a loss along u bounded below the
    tolerance, with a warning — and for "curved"); secant_ratio s_lin/s_real (NaN
    for "curved"); rank; factor and
    steps of the threshold; rank_change (n_B,) the anchored shape at 2·rank over the one
    at rank (`rank_check=True`)."""

    batch_sizes: np.ndarray
    lr: np.ndarray
    lr_stderr: np.ndarray
    form: str
    rule: str
    shape: np.ndarray
    shape_stderr: np.ndarray
    reference_batch_size: int
    reference_lr: float
    reference_shape: float
    momentum: float
    noise_gain: float
    lam: float
    s2: float | None
    batch_curvature: np.ndarray
    effective_curvature: np.ndarray
    reference_curvature: float
    critical_batch_size: float | None
    critical_batch_size_momentum: float | None
    stability_limit: np.ndarray
    N: int
    seed: int
    linearized_lr: np.ndarray | None = None
    correction: np.ndarray | None = None
    secant_ratio: float | None = None
    rank: int | None = None
    factor: float | None = None
    steps: int | None = None
    rank_change: np.ndarray | None = None
    correction_applied: bool | None = None
    nesterov: bool = False

    def with_reference(self, reference) -> LRTransfer:
        """The same transfer anchored at another (B₀, α₀), B₀ one of `batch_sizes` (a
        reference B₀ outside them anchors `transfer_lr` but is not kept): the stored shape is
        reused (no new measurement) and the error re-propagated."""
        B0 = _reference(reference)[0]
        if B0 == self.reference_batch_size and B0 not in self.batch_sizes:
            raise ValueError(f"with_reference: B0 = {B0} was this transfer's reference but is not "
                             "one of its batch_sizes, so its shape there was not kept; give "
                             "transfer_lr batch_sizes that include B0 to re-anchor at it")
        i0, B0, lr0 = reference_index(self.batch_sizes, reference)
        measured = self.form in MODEL_FORMS
        if measured:                            # the caveats of transfer_lr itself
            warn_momentum_upward(self.momentum, self.batch_sizes, B0, nesterov=self.nesterov,
                                 who="with_reference")
        else:
            warn_momentum_one_pass(self.momentum, self.batch_sizes, B0, self.form,
                                   nesterov=self.nesterov, who="with_reference")
        lr, se = _anchor(self.shape, self.shape_stderr, i0, lr0, coherent=not measured)
        # rank_change is a ratio of anchored shapes: re-anchored too (it kept the old B0)
        change = None if self.rank_change is None else self.rank_change / self.rank_change[i0]
        return dataclasses.replace(self, lr=lr, lr_stderr=se, reference_batch_size=B0,
                                   reference_lr=lr0, reference_shape=float(self.shape[i0]),
                                   reference_curvature=float(self.effective_curvature[i0]),
                                   rank_change=change)

    def plot(self, ax=None, *, rules=CLASSICAL_RULES, measured=None):
        """lr(B) ± stderr (log-log), the reference point, the classical `rules` through it,
        and `measured` (a `TrainingThresholds`) if given; returns the axes."""
        import matplotlib.pyplot as plt

        ax = plt.gca() if ax is None else ax
        B, lr, lr_stderr = in_b_order(self.batch_sizes, self.lr, self.lr_stderr)
        ax.errorbar(B, lr, yerr=lr_stderr, fmt="-",
                    color="C0", capsize=2, label=f"transfer_lr ({self.form}, m={self.momentum:g})")
        ref = (self.reference_batch_size, self.reference_lr)
        for k, r in enumerate(rules):
            ax.plot(B, scaling_rule(B, reference=ref, rule=r), ":", color=f"C{k + 1}", label=r)
        if measured is not None:
            measured.plot(ax=ax)
        return finish_lr_axes(ax, ref)


def finish_lr_axes(ax, reference, ylabel="learning rate"):
    """Mark the reference (B₀, α₀), log-log axes, labels and legend; returns `ax`."""
    ax.plot([reference[0]], [reference[1]], "s", color="C3", mfc="none", ms=10,
            label="reference")
    batch_size_axis(ax)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return ax


def scaling_rule(batch_sizes, *, reference, rule="linear") -> np.ndarray:
    """Classical rules through (B₀, α₀): "linear" α₀·B/B₀, "sqrt" α₀·√(B/B₀), "constant" α₀."""
    B0, lr0 = _reference(reference)
    B = np.asarray(batch_sizes, dtype=float)
    if rule == "linear":
        return lr0 * (B / B0)
    if rule == "sqrt":
        return lr0 * np.sqrt(B / B0)
    if rule == "constant":
        return np.full(B.shape, lr0)
    raise ValueError(f"rule must be one of {CLASSICAL_RULES}, got {rule!r}")


def _reference(reference):
    try:
        B0, lr0 = reference
    except (TypeError, ValueError):
        raise TypeError(f"reference must be a pair (B0, lr0), got {reference!r}") from None
    return as_int("reference[0] (B0)", B0, minimum=1), as_float("reference[1] (lr0)", lr0,
                                                                  positive=True)


def reference_index(batch_sizes, reference) -> tuple[int, int, float]:
    """(i0, B0, lr0): `reference` = (B0, lr0) checked, and the position of B0 in
    `batch_sizes` (a `with_reference` re-anchors only at a B the result holds)."""
    B0, lr0 = _reference(reference)
    hits = np.flatnonzero(np.asarray(batch_sizes) == B0)
    if not len(hits):
        raise ValueError(f"reference[0] (B0) must be one of batch_sizes "
                         f"{np.asarray(batch_sizes).tolist()}, got {B0}")
    return int(hits[0]), B0, lr0


def _momentum_of(opt) -> float:
    if opt.name != "sgd":
        raise ValueError(f"transfer_lr supports SGD (heavy-ball or Nesterov momentum) and "
                         f"Adam, got {opt.name!r}")
    if opt.dampening:
        raise ValueError("transfer_lr: SGD dampening is not supported: its linearised and "
                         "real-training thresholds run torch's heavy ball and Nesterov without "
                         "it (predict_max_lr and lr_table give dampening's mean-square limit "
                         "2(1+ρ)/((1−τ)λ'_ρ)); after its first step heavy ball with dampening τ "
                         "is heavy ball at lr α(1−τ), so transfer the lr without dampening and "
                         "divide by 1−τ")
    return float(opt.momentum)


def refuse_params_for_linearized(params) -> None:
    """The linearised forms train every parameter that requires grad, as the real training
    they predict does; a `params` selection (which parameters' curvature is measured)
    would mix a subset's λ₁ with the whole network's thresholds, so it is refused."""
    if params is not None:
        raise ValueError("params= selects the parameters whose curvature is measured, but the "
                         "linearised form trains every parameter that requires grad (as real "
                         "training does); freeze the others with requires_grad=False, or use "
                         "a curvature form (SGD: form='directional'; Adam: form='mean_square')")


def secant_correction(lam, effective_curvature, secant_ratio) -> np.ndarray:
    """1 − (1 − s_lin/s_real)·λ/λ'_ρ(B) where s_lin/s_real ≤ 1, else 1: the linearised
    threshold's correction for the network's own nonlinearity along u (module docstring;
    `nets.learning_rates.along_top.rescaling`), per effective curvature."""
    return rescaling(secant_ratio, float(lam) / np.asarray(effective_curvature, float))


#: the start of `warn_momentum_upward`'s message after the caller's name
MOMENTUM_CAVEAT = "with momentum"


class MomentumCaveat(UserWarning):
    """The measured caveats of a transfer (`warn_momentum_upward`, `warn_momentum_one_pass`,
    and the Adam limit forms' caveat `adam.warn_adam_transfer`, at any β₁): one category,
    so that code which measures those transfers itself can silence exactly them."""


@contextlib.contextmanager
def momentum_caveat_silenced():
    """Context in which the `MomentumCaveat` warnings stay quiet — for code that measures
    those transfers itself (the main job's checks, the benchmarks), not for users."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MomentumCaveat)
        yield


def warn_momentum_upward(momentum, batch_sizes, reference_batch_size, *, who="transfer_lr",
                         nesterov=False):
    """Warn when a linearised-form transfer with momentum (heavy ball ρ, or Adam's β₁) is
    asked for batch sizes above the reference B₀. Measured (docs/real_training.md, 31 network/optimizer
    cases with ρ or β₁ = 0.9, SGD and Adam): the transfer from B₀ = 32 to B = 512
    overestimated the real divergence threshold on 28 (by up to 3.4× on the digits-like
    nets, 9.9× on a held-out GRU) — the real network sharpens along the momentum drift at
    large B, its linearisation does not — and the transfer from B₀ = 512 to B = 8 erred
    low on 28 (0.078–0.94×).

    With `nesterov` (ρ > 0) it warns for any B ≠ B₀: measured on seven digits networks
    (docs/real_training.md, ρ = 0.9) the Nesterov transfer missed 20 % on six (0.64–1.78×; 9 of the 13
    misses too high, most of them at B = 128 from either anchor)."""
    Bs = np.asarray(batch_sizes)
    if nesterov and momentum > 0 and np.any(Bs != reference_batch_size):
        warnings.warn(f"{who}: {MOMENTUM_CAVEAT} ({momentum:g}, Nesterov) the transfer missed "
                      "the real divergence threshold by more than 20 % on 6 of 7 measured "
                      "networks (0.64-1.78x), mostly too high (9 of 13 misses) and from "
                      "either anchor; measure at the batch size you will use "
                      "(nets.lr_search.training_threshold(..., nesterov=True))",
                      MomentumCaveat, stacklevel=caller_stacklevel())
        return
    if momentum > 0 and np.any(Bs > reference_batch_size):
        warnings.warn(f"{who}: {MOMENTUM_CAVEAT} ({momentum:g}) the transfer to batch sizes above "
                      f"the reference B0 = {reference_batch_size} overestimated the real "
                      "divergence threshold in 28 of 31 measured cases (up to 3.4x at "
                      "B = 512 from B0 = 32 on digits-like nets, 9.9x on a GRU), while the "
                      "transfer to smaller B erred low; "
                      "anchor at the largest batch size you will use, or measure "
                      "(nets.lr_search.training_threshold / adam_threshold)",
                      MomentumCaveat, stacklevel=caller_stacklevel())


def warn_momentum_one_pass(momentum, batch_sizes, reference_batch_size, form, *,
                           who="transfer_lr", nesterov=False):
    """Warn when a one-pass form (directional, resolved, subspace, isotropic) transfers
    with momentum to any B ≠ B₀. Measured for the directional form (docs/real_training.md;
    `benchmarks/results/bench_heldout_transfer_*_m0.9*.json`, `bench_heldout_tabular_*`;
    ρ = 0.9): with heavy ball it missed the real divergence threshold by more than 20 % on
    17 of 20 network instances (0.12–6.6×), with Nesterov on 6 of 7 (0.37–2.7×), too high
    and too low, from either anchor; the other one-pass forms share its momentum model
    λ'_ρ(B). The linearised forms have their own caveat (`warn_momentum_upward`)."""
    if not (momentum > 0 and np.any(np.asarray(batch_sizes) != reference_batch_size)):
        return
    measured = ("6 of 7 measured networks (0.37-2.7x)" if nesterov else
                "17 of 20 measured network instances (0.12-6.6x)")
    warnings.warn(f"{who}: {MOMENTUM_CAVEAT} ({momentum:g}{', Nesterov' if nesterov else ''}) "
                  f"the {form} form's transfer (measured for the directional form) missed the "
                  f"real divergence threshold by more than 20 % on {measured}, too high and "
                  "too low, from either anchor; measure at the batch size you will use "
                  "(nets.lr_search.training_threshold)", MomentumCaveat,
                  stacklevel=caller_stacklevel())


def _anchor(shape, spread, i0, lr0, *, coherent):
    """lr = α₀·a/a(B₀) and its standard error (`LRTransfer.shape_stderr` for `spread`):
    coherent, |α₀·a⁺/a⁺(B₀) − lr| with a⁺ = a − spread; independent, lr·√(r² + r(B₀)²)
    with r = spread/a (zero at B₀ itself)."""
    lr = lr0 * (shape / shape[i0])         # x/x is exactly 1: lr at B₀ is lr0 itself
    if coherent:
        hi = shape - spread
        return lr, np.abs(lr0 * (hi / hi[i0]) - lr)
    rel = spread / shape            # NaN (one seed: unknown) stays NaN, not a zero error
    se = lr * np.sqrt(rel ** 2 + rel[i0] ** 2)
    se[i0] = 0.0
    return lr, se


@outside_autocast
def transfer_lr(model, loss_fn, data, batch_sizes, *, reference, optimizer="sgd",
                momentum=None, nesterov=None, form=None, kind="hessian", num_probes=10,
                n_batches_mc=2000, micro_batch="auto", rank=_LINEARIZED_RANK, factor=10.0,
                steps=None, n_seeds=8, rank_check=False, params=None, policy=None,
                chunk_size=None, device=None, dtype=None, seed=0,
                progress=None):
    """Learning rate for each B from one known at B₀ (module docstring for the equations).

    reference : (B₀, α₀), a learning rate that works — or the measured threshold — at B₀.
    optimizer : "sgd", a torch SGD class or instance (its momentum and Nesterov flag are
        read); momentum : ρ, nesterov : torch's Nesterov (both override/must agree with the
        optimizer's). With Nesterov, λ'_ρ(B) = F_N/α*_N(B) of its mean-square limit
        (`rmt.lr.momentum_effective_curvature`, F_N = 2(1+ρ)/(1+2ρ)) and the linearised
        network runs Nesterov. "adam"/"adamw" or a
        torch Adam/AdamW class or instance (β₁, β₂, ε read) hands over to
        `nets.learning_rates.adam.adam_transfer_lr` and returns its `AdamTransfer`:
        form None or "linearized" (the default for Adam: Adam on the linearised network
        from each warmed state, corrected along ũ; factor, steps (default 100 for Adam),
        n_seeds and seed set its protocol, with the warm-up of
        `linearized_adam_threshold`; minutes), "curved" (the same protocol on the curved
        model, the outputs' second derivative along D^{1/2}ũ kept and no correction),
        "mean_square" (the preconditioned mean-square limit, its second moment the noise
        model of the per-sample gradients at the current weights, not a warmed state;
        seconds; with β₁ > 0 it warns for any B ≠ B₀) or "deterministic". Which Adam form transfers on which network is
        measured in docs/real_training.md (none meets 20 % on every network at β₁ = 0.9).
    form : None or "linearized" (the SGD default), "curved" (the linearised network plus its
        outputs' second derivative along the top eigenvector, `linearized_threshold(curved=
        True)`, in place of the secant correction; the same options as "linearized"),
        or a λ'(B) form of `predict_batch_top_eigenvalue`
        ("directional", "resolved", "subspace", "isotropic"). The curvature/noise pass
        runs for every form at the model's current parameters (kind, num_probes,
        n_batches_mc, micro_batch, params, policy, chunk_size, device, dtype, seed,
        progress as there; micro_batch="auto" groups the noise pass into about 256
        micro-batches once N·P > 2²⁷, `nets.noise.directional`).
    "linearized"/"curved" only: rank (directions of the linearised network, None: all; Jacobian
        memory N·K·rank numbers), factor and steps (the divergence criterion "loss ever >
        factor × start within steps steps", default 200 — give the anchor's), n_seeds (batch
        sequences per threshold, seeds seed … seed + n_seeds − 1, the batches
        `training_threshold` draws for those seeds; default 8: on a well-trained network
        the small-B threshold is set by rare batches whose large gradient kicks the
        weights into a sharper region, so a few sequences can miss them all — on the
        BatchNorm CNN of docs/real_training.md seeds 0–2 put B = 32 at 0.106 and seeds
        0–7 at 0.085, in
        the top-200 subspace and in the full model alike), rank_check (also run 2·rank
        and report the anchored ratio as rank_change).
    Returns an `LRTransfer` (SGD) with .lr (numpy, aligned with `batch_sizes`), the shape
    and the λ'(B), B* and standard errors it came from, or an `AdamTransfer` (Adam).
    """
    from nets.noise.batch_spectra import predict_batch_top_eigenvalue

    B0, lr0 = _reference(reference)
    opt = optimizer_settings(optimizer, momentum=momentum, nesterov=nesterov)
    warn_partial_optimizer(model, optimizer, params)
    if opt.name == "adam":
        from nets.learning_rates.adam import ADAM_FORMS

        given = {"kind": kind, "num_probes": num_probes, "n_batches_mc": n_batches_mc,
                 "micro_batch": micro_batch, "rank": rank, "rank_check": rank_check}
        if form in ADAM_FORMS:               # no model run: no protocol either
            given.update(factor=factor, steps=steps, n_seeds=n_seeds)
        else:                                # linearized_adam_threshold: all directions, its dtype
            given.update(dtype=dtype)
        unused = [k for k, v in given.items() if v != _TRANSFER_DEFAULTS[k]]
        if unused:
            warnings.warn(f"transfer_lr: with an Adam optimizer and form={form!r} "
                          f"{', '.join(unused)} are not used (they are options of the SGD forms"
                          + (" and of Adam's model forms" if form in ADAM_FORMS else "")
                          + ")", UserWarning, stacklevel=caller_stacklevel())
        return _adam_transfer(model, loss_fn, data, batch_sizes, (B0, lr0), opt, form=form,
                              factor=factor, steps=steps, n_seeds=n_seeds, params=params,
                              policy=policy, chunk_size=chunk_size, device=device,
                              dtype=dtype, seed=seed, progress=progress)
    rho = _momentum_of(opt)
    form = "linearized" if form is None else form
    if form not in TRANSFER_FORMS:
        raise ValueError(f"form must be one of {TRANSFER_FORMS}, got {form!r}")
    rank_check = as_bool("rank_check", rank_check)
    if form not in MODEL_FORMS:
        # an outside audit: rank=0, n_seeds=0, factor=-1 passed without a word here;
        # steps=200 is what steps=None means for these forms
        given = {"rank": rank, "factor": factor, "steps": None if steps == 200 else steps,
                 "n_seeds": n_seeds, "rank_check": rank_check}
        unused = [k for k, v in given.items() if v != _TRANSFER_DEFAULTS[k]]
        if unused:
            warnings.warn(f"transfer_lr: form={form!r} does not use {', '.join(unused)} (options "
                          f"of the linearised forms {MODEL_FORMS})", UserWarning,
                          stacklevel=caller_stacklevel())
    steps = 200 if steps is None else steps
    seed = resolved_seed("seed", seed)
    N = as_data_source(data).N
    Bs = as_batch_sizes(batch_sizes, N)
    if B0 > N:
        raise ValueError(f"reference[0] (B0) must be <= N={N} (batches are drawn without "
                         f"replacement), got {B0}")
    linear = form in MODEL_FORMS
    if linear:
        refuse_params_for_linearized(params)
        rank = None if rank is None else as_int("rank", rank, minimum=1)
        factor = as_growth_factor(factor)
        steps = as_int("steps", steps, minimum=1)
        n_seeds = as_int("n_seeds", n_seeds, minimum=1)
        as_seeds(range(seed, seed + n_seeds))       # the batch sequences, checked up front
    allB = np.unique(np.append(Bs, B0))
    curv = "directional" if linear else form
    pred = predict_batch_top_eigenvalue(model, loss_fn, data, allB, form=curv, kind=kind,
                                        num_probes=num_probes, n_batches_mc=n_batches_mc,
                                        micro_batch=micro_batch, params=params,
                                        policy=policy, chunk_size=chunk_size, device=device,
                                        dtype=dtype, seed=seed, progress=progress)
    lam = float(pred["lam"])
    curve = np.asarray(pred[curv], dtype=float)
    se = pred.get(f"{curv}_stderr")
    se = np.zeros_like(curve) if se is None else np.nan_to_num(np.asarray(se, dtype=float))
    nest = bool(opt.nesterov)
    gain = momentum_noise_gain(rho, nesterov=nest)      # Nesterov: the small-noise gain
    eff = momentum_effective_curvature(lam, curve, rho, nesterov=nest)      # λ'_ρ(B)
    F = momentum_factor(rho, "nesterov" if nest else "heavy_ball")
    limit = F / eff
    pos = {int(b): i for i, b in enumerate(allB)}
    i0 = pos[B0]
    idx = np.array([pos[int(b)] for b in Bs])
    extra = {}
    if linear:
        shape, spread, extra = _linearized_shape(model, loss_fn, data, allB, lam, eff,
                                                 momentum=rho, nesterov=nest, rank=rank, factor=factor,
                                                 steps=steps, n_seeds=n_seeds,
                                                 rank_check=rank_check, device=device,
                                                 seed=seed, progress=progress, i0=i0,
                                                 curved=form == "curved")
        extra = {k: (v[idx] if isinstance(v, np.ndarray) else v) for k, v in extra.items()}
        warn_momentum_upward(rho, Bs, B0, nesterov=nest)
        if form == "curved":
            shape_text = ("α_curved(B) the threshold of the linearised network plus its "
                          "outputs' second derivative along u")
        else:
            if extra["correction_applied"]:
                bracket = "[1 − (1 − s_lin/s_real)·λ/λ'_ρ(B)]"
            elif np.isfinite(extra["secant_ratio"]) and not correction_applies(extra["secant_ratio"]):
                bracket = "1 (s_lin/s_real > 1: correction not applied)"
            elif np.isfinite(extra["secant_ratio"]):
                bracket = ("1 (the correction would make a(B) fall with B: correction not "
                           "applied)")
            else:       # the loss along u never reaches the criterion: no secant ratio
                bracket = ("1 (no secant ratio: the loss along u stays below the criterion; "
                           "correction not applied)")
            shape_text = f"α_lin(B)·{bracket}, α_lin the linearised network's threshold"
        rule = (f"lr(B) = lr0·a(B)/a(B0), a(B) = {shape_text} (loss ever > {factor:g}× start "
                f"within {steps} steps), rank {extra['rank']}")
    else:
        # one noise estimate sets every shift λ'(B) − λ, so their errors move together:
        # the shape at the shift raised by its largest relative error r
        shift = curve - lam
        r = float(np.nanmax(np.where(shift > 0, se / np.where(shift > 0, shift, 1.0), 0.0)))
        shape = limit
        spread = shape - F / momentum_effective_curvature(lam, lam + shift * (1.0 + r), rho,
                                                          nesterov=nest)
        warn_momentum_one_pass(rho, Bs, B0, form, nesterov=nest)
        rule = ("lr(B) = lr0·λ'_ρ(B0)/λ'_ρ(B), " + (
            "λ'_ρ = F_N/α*_N the Nesterov mean-square limit's" if nest else
            "λ'_ρ = λ + (1+ρ)/(1−ρ)·(λ'(B) − λ)") + f", λ'(B) {form} form")
    lr_all, se_all = _anchor(shape, spread, i0, lr0, coherent=not linear)
    s2 = pred.get("s2_directional")
    bstar = pred.get("critical_batch_size")
    return LRTransfer(
        batch_sizes=Bs, lr=lr_all[idx], lr_stderr=se_all[idx], form=form, rule=rule,
        shape=shape[idx], shape_stderr=spread[idx], reference_batch_size=B0,
        reference_lr=lr0, reference_shape=float(shape[i0]), momentum=rho, noise_gain=gain,
        lam=lam, s2=None if s2 is None else float(s2), batch_curvature=curve[idx],
        effective_curvature=eff[idx], reference_curvature=float(eff[i0]),
        critical_batch_size=None if bstar is None else float(bstar),
        critical_batch_size_momentum=None if bstar is None else float(gain * bstar),
        stability_limit=limit[idx], N=int(pred["N"]), seed=int(seed), nesterov=nest, **extra)


#: transfer_lr's keyword defaults (what an Adam transfer's unused options are compared with)
_TRANSFER_DEFAULTS = {k: v.default for k, v in inspect.signature(transfer_lr).parameters.items()}


def _adam_transfer(model, loss_fn, data, batch_sizes, reference, opt, *, form, factor, steps,
                   n_seeds, params, policy, chunk_size, device, dtype, seed, progress):
    """`transfer_lr` for Adam: `adam_transfer_lr` with the optimizer's β₁, β₂, ε."""
    from nets.learning_rates.adam import adam_transfer_lr

    linearized = None                    # form None: adam_transfer_lr's default, "linearized"
    if form in (None, *MODEL_FORMS):
        seed = resolved_seed("seed", seed)
        linearized = {"factor": factor, "steps": 100 if steps is None else steps,
                      "seeds": as_seeds(range(seed, seed + as_int("n_seeds", n_seeds, minimum=1)))}
    extra = {} if chunk_size is None else {"chunk_size": chunk_size}
    return adam_transfer_lr(model, loss_fn, data, batch_sizes, reference=reference,
                            betas=(opt.beta1, opt.beta2), eps=opt.eps, form=form,
                            params=params, policy=policy, device=device, dtype=dtype,
                            seed=seed, linearized=linearized, progress=progress, **extra)


def falls_with_batch_size(shape, *, tolerance=0.05, stderr=None) -> bool:
    """Whether a threshold shape over increasing batch sizes drops more than `tolerance`
    (relative) below its running maximum — the seed-averaged grid resolution of the
    linearised thresholds is a few per cent — and, with `stderr` (its seed standard
    errors), by more than two standard errors of the difference: with three sequences a
    6 % dip of 1.2 standard errors warned, and eight sequences showed the shape rising (an
    outside trial). Real SGD thresholds rose with B on every network measured for
    docs/real_training.md over B = 8…512 (one flat pair: a 0.4 % dip on an autoencoder's
    linearised shape; a held-out token transformer dipped from B = 16 to 32 by 2.5 standard
    errors of three sequences)."""
    a = np.asarray(shape, dtype=float)      # (fmax: a NaN entry, unbracketed, is skipped)
    top = np.fmax.accumulate(a)
    drop = a < (1.0 - tolerance) * top
    if stderr is None or not np.any(drop):
        return bool(np.any(drop))
    se = np.nan_to_num(np.asarray(stderr, dtype=float), nan=0.0)
    at = np.maximum.accumulate(np.where(a == top, np.arange(len(a)), 0))   # where top was set
    gap = np.sqrt(se ** 2 + se[at] ** 2)
    return bool(np.any(drop & (top - a > 2.0 * gap)))


def _linearized_shape(model, loss_fn, data, batch_sizes, lam, eff, *, momentum, nesterov, rank,
                      factor, steps, n_seeds, rank_check, device, seed, progress, i0,
                      curved=False):
    """a(B) = α_lin(B)·`secant_correction`(λ, λ'_ρ(B), s_lin/s_real) (module docstring), or
    with `curved` the curved model's threshold α_curved(B) itself (no correction: the
    change along u it stands for is in the model); returns (a, its seed standard error,
    the LRTransfer fields of the form)."""
    from nets.learning_rates.along_top import loss_along_top
    from nets.learning_rates.linearized import linearized_threshold

    shown = [int(b) for b in batch_sizes]              # the batch sizes, as warnings say them

    def threshold(r):
        return linearized_threshold(model, loss_fn, data, batch_sizes, momentum=momentum,
                                    nesterov=nesterov, factor=factor, steps=steps,
                                    seeds=tuple(range(seed, seed + n_seeds)), device=device,
                                    seed=seed, rank=r, curved=curved, progress=progress)

    if curved:
        lin = threshold(rank)
        alpha = np.asarray(lin.lr, dtype=float)
        ratio, applied = float("nan"), False
        corr = np.ones_like(alpha)
    else:
        prof = loss_along_top(model, loss_fn, data, factor=factor, seed=seed,
                              progress=progress)     # before the linearised runs: a minute or
        #                                              more at N = 5,000, P = 134k
        ratio = prof.secant_ratio
        lin = threshold(rank)
        corr = secant_correction(lam, eff, ratio)
        applied = premise = bool(correction_applies(ratio))     # False for a NaN ratio
        alpha = np.asarray(lin.lr, dtype=float)
        if applied and falls_with_batch_size(alpha * corr) \
                and not falls_with_batch_size(alpha):
            warnings.warn(f"transfer_lr: with s_lin/s_real = {ratio:.4g} the secant correction "
                          "would make the threshold fall as the batch size grows (a(B) = "
                          f"{np.array2string(alpha * corr, precision=3)} at B = {shown}),"
                          " which the linearised network's own thresholds do not and no SGD "
                          "threshold measured here does: the correction is outside the range "
                          "of a first-order change along u, and the uncorrected linearised "
                          "threshold is used (correction_applied=False). Measured on such a "
                          "case (an untrained multi-label net, s_lin/s_real = 0.15) the "
                          "uncorrected transfer was still 1.7x too high at B = 8: measure the "
                          "threshold at the batch sizes you will use "
                          "(nets.lr_search.training_threshold)", stacklevel=caller_stacklevel())
            applied, corr = False, np.ones_like(alpha)
        if not np.isfinite(ratio):
            warnings.warn(f"transfer_lr: the {'real' if np.isnan(prof.amplitude_real) else 'linearised'}"
                          f" loss along the top eigenvector never reaches {factor:g}× its start "
                          f"({prof.L0:.4g}; a loss bounded along u, followed to 2⁴⁰× the profile's "
                          "grid), so the secant correction is undefined; the uncorrected "
                          "linearised threshold is used (correction_applied=False). Compare "
                          "form='directional', or a smaller factor", stacklevel=caller_stacklevel())
        elif not premise:
            warnings.warn(f"transfer_lr: the real loss along the top eigenvector is flatter than "
                          f"the linearised network's (s_lin/s_real = {ratio:.4g} > 1), where the "
                          "secant correction does not apply; the uncorrected linearised threshold "
                          "is used (correction_applied=False). Measured there: within 15 % at "
                          "s_lin/s_real = 1.01 and 1.06, but 0.46-1.42x on a GRU (1.78) and "
                          "0.64-1.15x on an autoencoder (1.54), where the real network tolerated "
                          "2-5x its linearisation at B = 8 (the other forms missed more). Measure "
                          "the threshold at the batch sizes you will use "
                          "(nets.lr_search.training_threshold)", stacklevel=caller_stacklevel())
    if falls_with_batch_size(alpha * corr, stderr=np.asarray(lin.stderr, dtype=float) * corr):
        warnings.warn("transfer_lr: the model's threshold falls as the batch size grows "
                      f"(a(B) = {np.array2string(alpha * corr, precision=3)} at B = "
                      f"{shown}), which no SGD threshold measured here does; a "
                      "transfer to a smaller B would then raise the lr. Measure the threshold "
                      "at the batch sizes you will use (nets.lr_search.training_threshold)",
                      stacklevel=caller_stacklevel())
    stderr = np.asarray(lin.stderr, dtype=float)    # NaN with one sequence: unknown
    fields = {"linearized_lr": alpha, "correction": corr, "secant_ratio": float(ratio),
              "correction_applied": applied,
              "rank": int(lin.rank), "factor": float(factor), "steps": int(steps)}
    if rank_check:
        if rank is None or lin.rank < rank:
            fields["rank_change"] = np.ones_like(alpha)       # already every direction
        else:
            big = np.asarray(threshold(2 * rank).lr, dtype=float)
            fields["rank_change"] = (big / big[i0]) / (alpha / alpha[i0])
    return alpha * corr, stderr * np.abs(corr), fields
