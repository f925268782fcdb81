"""Batch-size transfer of a learning rate known at one batch size (docs/theory.md §5).

Given a learning rate α₀ that works (or is the measured threshold) at batch size B₀, the
learning rate at batch size B is

    α(B) = α₀ · α_ms(B)/α_ms(B₀),   α_ms(B) = 2(1 + ρ)/λ'_ρ(B),
    λ'_ρ(B) = λ + (1 + ρ)/(1 − ρ) · (λ'(B) − λ),

with λ the full-data top Hessian eigenvalue, λ'(B) the predicted top eigenvalue of the
batch Hessian (`nets.noise.batch_spectra.predict_batch_top_eigenvalue`; the directional
form λ'(B) = λ + c(B,N)·s_u²/λ by default) and ρ the heavy-ball momentum. λ'_ρ is the
mean-square stability limit of heavy-ball SGD with batch noise
(`rmt.lr.sgd_momentum_ms_max_lr`, derived in `rmt.symbolic.derive_momentum_mean_square`):
momentum amplifies the batch-noise part of the curvature by (1 + ρ)/(1 − ρ). At ρ = 0
the rule is α(B) = α₀·λ'(B₀)/λ'(B).

Only the *ratio* α_ms(B)/α_ms(B₀) is used: on real networks the absolute stability limit
2(1+ρ)/λ'_ρ is conservative (the real divergence threshold sits above it because the
network reduces its own curvature when pushed past the local limit), while the batch-size
dependence is what the curvature-noise model gets right. The anchor (B₀, α₀) carries the
absolute level; no fitted correction factor is involved.

What is transferred is a stability limit. A measured threshold "the loss stays below k×
its start" is one only where it hardly depends on k; on cross-entropy networks at small
B it is a loss tolerance instead (it moves ~5× between k = 3 and k = 100 on the digits
MLP and CNN at B = 8, ~1.2× at B = 512), so there the transfer holds for one tolerance
only (docs/theory.md §5.6, benchmarks/bench_criterion.py).

Which form: "directional" (default; one per-sample pass along u) is what we measured to
transfer within tolerance on the digits MLP; "resolved" and "subspace" (Monte-Carlo over
batches on the top eigenspace) can be requested with `form=` and are reported the same way.

Also here: the classical rules `scaling_rule(batch_sizes, reference, rule)` for
"linear" (α ∝ B), "sqrt" (α ∝ √B) and "constant".
"""

from __future__ import annotations

import numpy as np

from nets.learning_rates.lr_prediction import optimizer_settings
from nets.utils.data_source import as_data_source
from nets.utils.results import Result, result
from rmt.lr import momentum_noise_gain
from rmt.validation import as_batch_sizes, as_float, as_int, as_seed

__all__ = ["transfer_lr", "LRTransfer", "scaling_rule", "TRANSFER_FORMS", "CLASSICAL_RULES"]

TRANSFER_FORMS = ("directional", "resolved", "subspace", "isotropic")
CLASSICAL_RULES = ("linear", "sqrt", "constant")


@result
class LRTransfer(Result):
    """Learning rate per batch size, transferred from a reference (B₀, α₀).

    batch_sizes (n_B,); lr (n_B,) and lr_stderr (propagated from the noise estimate);
    form (the λ'(B) form used); rule (the equation, text); reference_batch_size B₀,
    reference_lr α₀; momentum ρ; noise_gain (1+ρ)/(1−ρ); lam (λ₁); s2 (s_u², directional
    form; None otherwise); batch_curvature λ'(B) and effective_curvature λ'_ρ(B) (n_B,),
    reference_curvature λ'_ρ(B₀); critical_batch_size B* = s_u²/λ² and its momentum
    version B*_ρ = (1+ρ)/(1−ρ)·B*; stability_limit 2(1+ρ)/λ'_ρ(B) (the absolute local
    limit, for comparison); N; seed."""

    batch_sizes: np.ndarray
    lr: np.ndarray
    lr_stderr: np.ndarray
    form: str
    rule: str
    reference_batch_size: int
    reference_lr: float
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

    def plot(self, ax=None, *, rules=CLASSICAL_RULES, measured=None):
        """lr(B) ± stderr (log-log), the reference point, the classical `rules` through it,
        and `measured` (a `TrainingThresholds`) if given; returns the axes."""
        import matplotlib.pyplot as plt

        ax = plt.gca() if ax is None else ax
        B = self.batch_sizes
        ax.errorbar(B, self.lr, yerr=self.lr_stderr, fmt="-", color="C0", capsize=2,
                    label=f"transfer_lr ({self.form}, m={self.momentum:g})")
        ref = (self.reference_batch_size, self.reference_lr)
        for k, r in enumerate(rules):
            ax.plot(B, scaling_rule(B, reference=ref, rule=r), ":", color=f"C{k + 1}", label=r)
        if measured is not None:
            measured.plot(ax=ax)
        ax.plot([ref[0]], [ref[1]], "s", color="C3", mfc="none", ms=10, label="reference")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("learning rate")
        ax.legend(fontsize=7)
        return ax


def scaling_rule(batch_sizes, *, reference, rule="linear") -> np.ndarray:
    """Classical rules through (B₀, α₀): "linear" α₀·B/B₀, "sqrt" α₀·√(B/B₀), "constant" α₀."""
    B0, lr0 = _reference(reference)
    B = np.asarray(batch_sizes, dtype=float)
    if rule == "linear":
        return lr0 * B / B0
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


def _momentum_of(optimizer, momentum) -> float:
    opt = optimizer_settings(optimizer, momentum=momentum)
    if opt.name != "sgd":
        raise ValueError(f"transfer_lr supports SGD (heavy-ball momentum) only, got {opt.name!r}")
    if opt.nesterov or opt.dampening:
        raise ValueError("transfer_lr: Nesterov momentum and dampening are not supported "
                         "(the mean-square limit is derived for plain heavy ball)")
    return float(opt.momentum)


def transfer_lr(model, loss_fn, data, batch_sizes, *, reference, optimizer="sgd",
                momentum=None, form="directional", kind="hessian", num_probes=10,
                n_batches_mc=2000, micro_batch="auto", params=None, policy=None,
                chunk_size=None, device=None, dtype=None, seed=0,
                progress=None) -> LRTransfer:
    """Learning rate for each B from one known at B₀ (module docstring for the equation).

    reference : (B₀, α₀), a learning rate that works — or the measured threshold — at B₀.
    optimizer : "sgd", a torch SGD class or instance (its heavy-ball momentum is read);
        momentum : ρ (overrides/must agree with the optimizer's).
    form : which λ'(B) of `predict_batch_top_eigenvalue` ("directional" default,
        "resolved", "subspace", "isotropic"). One curvature/noise pass at the model's
        current parameters (kind, num_probes, n_batches_mc, micro_batch, params, policy,
        chunk_size, device, dtype, seed, progress as there; micro_batch="auto" groups the
        noise pass into about 256 micro-batches once N·P > 2²⁷, `nets.noise.directional`).
    Returns an `LRTransfer` with .lr (numpy, aligned with `batch_sizes`) and the λ'(B),
    B* and standard errors it came from.
    """
    from nets.noise.batch_spectra import predict_batch_top_eigenvalue

    B0, lr0 = _reference(reference)
    rho = _momentum_of(optimizer, momentum)
    if form not in TRANSFER_FORMS:
        raise ValueError(f"form must be one of {TRANSFER_FORMS}, got {form!r}")
    seed = as_seed("seed", seed)
    N = as_data_source(data).N
    Bs = as_batch_sizes(batch_sizes, N)
    if B0 > N:
        raise ValueError(f"reference[0] (B0) must be <= N={N} (batches are drawn without "
                         f"replacement), got {B0}")
    allB = np.unique(np.append(Bs, B0))
    pred = predict_batch_top_eigenvalue(model, loss_fn, data, allB, form=form, kind=kind,
                                        num_probes=num_probes, n_batches_mc=n_batches_mc,
                                        micro_batch=micro_batch, params=params,
                                        policy=policy, chunk_size=chunk_size, device=device,
                                        dtype=dtype, seed=seed, progress=progress)
    lam = float(pred["lam"])
    curve = np.asarray(pred[form], dtype=float)
    se = pred.get(f"{form}_stderr")
    se = np.zeros_like(curve) if se is None else np.nan_to_num(np.asarray(se, dtype=float))
    gain = momentum_noise_gain(rho)
    eff = lam + gain * (curve - lam)                       # λ'_ρ(B)
    pos = {int(b): i for i, b in enumerate(allB)}
    i0 = pos[B0]
    idx = np.array([pos[int(b)] for b in Bs])
    lr = lr0 * eff[i0] / eff[idx]
    # one noise estimate sets every shift λ'(B) − λ, so their errors move together:
    # propagate the relative error r of the shift coherently, |lr(shift·(1+r)) − lr|
    shift = curve - lam
    r = float(np.nanmax(np.where(shift > 0, se / np.where(shift > 0, shift, 1.0), 0.0)))
    eff_hi = lam + gain * shift * (1.0 + r)
    lr_se = np.abs(lr0 * eff_hi[i0] / eff_hi[idx] - lr)
    s2 = pred.get("s2_directional")
    bstar = pred.get("critical_batch_size")
    rule = ("lr(B) = lr0·λ'_ρ(B0)/λ'_ρ(B), λ'_ρ = λ + (1+ρ)/(1−ρ)·(λ'(B) − λ), "
            f"λ'(B) {form} form")
    return LRTransfer(
        batch_sizes=Bs, lr=lr, lr_stderr=lr_se, form=form, rule=rule,
        reference_batch_size=B0, reference_lr=lr0, momentum=rho, noise_gain=gain, lam=lam,
        s2=None if s2 is None else float(s2), batch_curvature=curve[idx],
        effective_curvature=eff[idx], reference_curvature=float(eff[i0]),
        critical_batch_size=None if bstar is None else float(bstar),
        critical_batch_size_momentum=None if bstar is None else float(gain * bstar),
        stability_limit=2.0 * (1.0 + rho) / eff[idx], N=int(pred["N"]), seed=int(seed))
