"""The loss along the top Hessian eigenvector: real network against its linearisation (docs/theory.md §5.6).

With u the unit top eigenvector of the full-data Hessian at the checkpoint w₀ (λ₁ its
eigenvalue), the two one-dimensional profiles are

    f(x)     = L(w₀ + x·u)                                      (the real network),
    f_lin(x) = (1/N)·Σ_i loss_fn(z_i(w₀) + x·J_i u, y_i)        (the linearised network),

and their even secant curvature s(x) = (f(x) + f(−x) − 2 f(0))/x². As x → 0,
s(x) → uᵀHu = λ₁ for the real network and uᵀGu (the Gauss–Newton part) for the
linearised one; further out s(x) is the curvature an oscillation of amplitude x along u
actually meets. Read at the amplitude A_k where each profile first exceeds k·f(0)
(the "divergence" tolerance k of `nets.learning_rates.lr_search`), the ratio
s_lin(A_k)/s(A_k) says how much the network's own nonlinearity steepens (< 1) or softens
(> 1) the growth of such an oscillation relative to the linearised model: on confident
cross-entropy checkpoints the real profile sharpens (s/λ₁ = 1.6–2.5 at k = 10 on the
digits CNN and ReLU MLP), which the linearised network does not see.

Grid: `n` amplitudes geometric in 0.02…20 / √λ₁ (`span`), both ends stretched by
max(1, 4·√(2(k−1)·f(0))/20) so that it reaches 4× the amplitude at which a quadratic of
curvature λ₁ gets to k·f(0) (a loss of order 100, as with unscaled regression targets,
otherwise never gets there on the plain span), float64, both signs; u from
Lanczos (k = 1, tol 1e-8) in eval mode. Cost: 2n + 1 full-data forward passes per
profile plus one Jacobian-vector product, and per model the crossing's solve (~20–30
passes) and, where the grid falls short, up to 2 × 40 passes past its end.

Resolution: the grid only brackets A_k (where a profile has not reached k·f(0) by the
grid's end — a loss that grows only linearly, as a cross-entropy far from a confident
checkpoint — the amplitude is doubled past it, up to 2⁴⁰ times, until it has; A_k is NaN
only for a loss bounded below k·f(0) along u). A non-finite loss counts as above k·f(0)
(as a non-finite loss counts as divergence in `lr_search`). Between the last point at or
below k·f(0) and the first above it, A_k is solved to relative precision 1e-9 (Brent's
method on max f(±x)/f(0) − k, two full-data forward passes per evaluation; bisection in
log x first while the upper end's loss is not finite) and s(A_k) is evaluated there (NaN
if f(±A_k) is not finite), so A_k·√λ₁ and the secant ratio do not depend on the grid:
they are unchanged when the loss is multiplied by a constant (which rescales λ₁ and so
moves the grid). Read at the first grid point above k·f(0) instead, as before session 47,
the ratio carried a discretisation error of up to 7 % on the stored SGD rows (n = 60,
points 12 % apart) and up to 13.5 % along Adam's preconditioned direction (0.863 read,
0.980 solved, a ReLU MLP at B = 32), which also flipped whether the correction applies
(r read 1.11, solved 0.99 on a BatchNorm CNN at B = 512); `transfer_lr`'s default lr moved
by 1–9 % under loss × 3 (an outside sweep). `LossAlongTop.at(k)` for another tolerance
has only the grid: it interpolates the crossing linearly in log x and log f between the
two grid points that bracket it, and the secant linearly in log x (errors second order
in the spacing).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nets.utils.autocast import outside_autocast
from nets.utils.modes import model_copy
from nets.utils.results import Result, result
from rmt.validation import as_float, as_int, as_range, as_seed

__all__ = ["LossAlongTop", "loss_along_top", "rescaling", "rescaling_as_derived",
           "correction_applies"]


@result
class LossAlongTop(Result):
    """Both loss profiles along u (module docstring).

    lam : λ₁; L0 : f(0); amplitudes (n,) the grid x; real_plus, real_minus,
    linearized_plus, linearized_minus (n,) f(±x)/f(0) of each model; real_secant,
    linearized_secant (n,) s(x)/λ₁; factor k; amplitude_real, amplitude_linearized A_k
    of each model, solved between the grid points that bracket it, or past the grid's end
    (NaN where the profile never exceeds k·f(0): a bounded loss); secant_real,
    secant_linearized s(A_k)/λ₁; secant_ratio s_lin(A_k)/s_real(A_k)."""

    lam: float
    L0: float
    amplitudes: np.ndarray
    real_plus: np.ndarray
    real_minus: np.ndarray
    linearized_plus: np.ndarray
    linearized_minus: np.ndarray
    real_secant: np.ndarray
    linearized_secant: np.ndarray
    factor: float
    amplitude_real: float
    amplitude_linearized: float
    secant_real: float
    secant_linearized: float
    secant_ratio: float

    def at(self, factor) -> dict:
        """{"real": (A_k, s(A_k)/λ₁), "linearized": (...)} for another tolerance k (NaN
        where the grid never reaches k·f(0); not followed past it): the profile's own
        values at k = `factor`, else interpolated on the grid (module docstring)."""
        k = as_float("factor", factor, positive=True)
        if k == self.factor:
            return {name: (getattr(self, f"amplitude_{name}"), getattr(self, f"secant_{name}"))
                    for name in ("real", "linearized")}
        return {name: _interpolated(self.amplitudes, getattr(self, f"{name}_plus"),
                                    getattr(self, f"{name}_minus"),
                                    getattr(self, f"{name}_secant"), k)
                for name in ("real", "linearized")}

    def plot(self, ax=None):
        """s(x)/λ₁ of both models against x·√λ₁ (log x), the A_k marked; returns the axes."""
        import matplotlib.pyplot as plt

        ax = plt.gca() if ax is None else ax
        x = self.amplitudes * np.sqrt(self.lam)
        for name, color in (("real", "C0"), ("linearized", "C2")):
            ax.plot(x, getattr(self, f"{name}_secant"), "-", color=color, label=name)
            A = getattr(self, f"amplitude_{name}")
            if np.isfinite(A):
                ax.axvline(A * np.sqrt(self.lam), color=color, ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("amplitude x·√λ₁ along u")
        ax.set_ylabel("secant curvature s(x)/λ₁")
        ax.legend(fontsize=7)
        return ax


def _rayleigh(net, loss_fn, data, direction):
    """(u, uᵀHu) for u = direction/‖direction‖ (float64, the full-data Hessian)."""
    from nets.curvature.operators import curvature_operator

    u = torch.as_tensor(np.asarray(direction, dtype=np.float64)).reshape(-1)
    H = curvature_operator(net, loss_fn, data, kind="hessian", policy="eval")
    if u.numel() != H.P or not bool(torch.isfinite(u).all()) or not float(u.norm()) > 0:
        raise ValueError(f"direction must be a finite non-zero vector of length P={H.P}")
    u = u / u.norm()
    return u, float(u @ H.matvec(u.to(H.dtype)).to(torch.float64).cpu())


def _bracket(plus, minus, k):
    """Index j of the first grid point with max f(±x)/f(0) > k or not finite (None if
    none)."""
    top = np.maximum(plus, minus)
    hit = (top > k) | ~np.isfinite(top)
    return int(np.argmax(hit)) if hit.any() else None


def _interpolated(xs, plus, minus, secant, k):
    """(A_k, s(A_k)/λ₁) from the grid alone: the crossing of max f(±x)/f(0) = k linear in
    (log x, log f) between the bracketing points, the secant linear in log x there."""
    j = _bracket(plus, minus, k)
    if j is None:
        return float("nan"), float("nan")
    if j == 0:
        return float(xs[0]), float(secant[0])
    g0, g1 = np.log(max(plus[j - 1], minus[j - 1])), np.log(max(plus[j], minus[j]))
    t = (math.log(k) - g0) / (g1 - g0) if g1 > g0 else 1.0
    A = math.exp((1 - t) * math.log(xs[j - 1]) + t * math.log(xs[j]))
    return A, float((1 - t) * secant[j - 1] + t * secant[j])


#: doublings of the amplitude tried past the grid's end before a profile is declared never
#: to reach k·f(0) (2⁴⁰ ≈ 10¹²: a bounded loss, e.g. along a scale-invariant direction)
BEYOND_GRID_DOUBLINGS = 40


def _crossing(xs, plus, minus, k, loss_at, L0, lam):
    """(A_k, s(A_k)/λ₁): the grid brackets the first crossing of max f(±x) = k·f(0) (from 0
    when the first grid point is already above, f(0)/f(0) = 1 < k; past the grid's end by
    doubling the amplitude up to `BEYOND_GRID_DOUBLINGS` times when the profile has not got
    there yet); a non-finite loss counts as above. Bisection in log x narrows the bracket
    while its upper end's loss is not finite, then Brent's method solves it with the exact
    loss `loss_at(x)`, and the secant is evaluated there. NaN if it is never reached."""
    from scipy.optimize import brentq

    def excess(x):
        if x <= 0:
            return 1.0 - k
        e = max(loss_at(x), loss_at(-x)) / L0 - k
        return e if math.isfinite(e) else math.inf          # NaN or inf: above

    j = _bracket(plus, minus, k)
    if j is not None:
        lo, hi = (0.0 if j == 0 else float(xs[j - 1])), float(xs[j])
        e_hi = excess(hi)
    else:
        lo = hi = float(xs[-1])
        for _ in range(BEYOND_GRID_DOUBLINGS):
            lo, hi = hi, 2.0 * hi
            e_hi = excess(hi)
            if e_hi > 0:
                break
        else:
            return float("nan"), float("nan")
    for _ in range(200):                  # the upper end's loss not finite: narrow first
        if math.isfinite(e_hi) or hi <= lo * (1 + 1e-9):
            break
        mid = math.sqrt(lo * hi) if lo > 0 else 0.5 * hi
        e_mid = excess(mid)
        if e_mid > 0:
            hi, e_hi = mid, e_mid
        else:
            lo = mid
    A = brentq(excess, lo, hi, xtol=1e-300, rtol=1e-9) if math.isfinite(e_hi) else hi
    secant = (loss_at(A) + loss_at(-A) - 2 * L0) / A ** 2 / lam
    return float(A), float(secant) if math.isfinite(secant) else float("nan")


@outside_autocast
def loss_along_top(model, loss_fn, data, *, factor=10.0, n=60, span=(0.02, 20.0),
                   seed=0, direction=None, progress=None) -> LossAlongTop:
    """The real and linearised loss profiles along the top Hessian eigenvector and their
    secant curvatures at the tolerance `factor` (module docstring). data : any form of
    `nets.utils.data_source` (materialised); loss_fn(outputs, targets) the batch mean;
    seed : the Lanczos start. direction : None (u from Lanczos) or a weight-space vector
    (P,) to profile along instead, normalised to a unit vector u; `lam` is then its
    Rayleigh quotient uᵀHu (must be > 0) — e.g. D^{1/2}ũ, the weight-space direction of
    an oscillation along Adam's top preconditioned eigenvector ũ. progress : bars for the
    Lanczos run and the 4n full-data losses (`nets.utils.progress`; 91 s silent at
    N = 5,000 on a 134k-parameter CNN, inside transfer_lr, before them)."""
    from torch.func import jvp

    from nets.curvature.params import call_model, unflatten_to_dict
    from nets.learning_rates.linearized import refuse_container_output
    from nets.learning_rates.lr_search import _top_direction, as_growth_factor
    from nets.utils.data_source import as_data_source
    from nets.utils.progress import progress_counter

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable")
    k = as_growth_factor(factor)
    n = as_int("n", n, minimum=2)
    lo, hi = as_range("span", span)
    X, y = as_data_source(data, name="data").tensors()
    net = model_copy(model).double().eval()
    Xd = X.double() if X.is_floating_point() else X
    yd = y.double() if y.is_floating_point() else y
    w0 = {name: p.detach() for name, p in net.named_parameters() if p.requires_grad}
    with torch.no_grad():                       # the linearised outputs z0 + x·Ju: one tensor
        refuse_container_output(net(Xd[:1]))
    if direction is None:
        u, lam = _top_direction(net, loss_fn, (Xd, yd), as_seed("seed", seed),
                                progress=progress)
    else:
        u, lam = _rayleigh(net, loss_fn, (Xd, yd), direction)
    if not lam > 0:
        raise ValueError(f"the top Hessian eigenvalue is {lam}; the profile needs λ₁ > 0")
    du = unflatten_to_dict(net, u.to(torch.float64))
    with torch.no_grad():
        z0, Ju = jvp(lambda p: call_model(net, p, Xd), (w0,), (du,))
        L0 = float(loss_fn(z0, yd))
    if not L0 > 0:
        raise ValueError(f"the loss at the checkpoint must be positive, got {L0}")
    # the grid reaches at least 4× the amplitude at which a quadratic of curvature λ₁ gets
    # to k·f(0), √(2(k−1)·f(0)) in units of 1/√λ₁: with a large loss (unscaled regression
    # targets) a fixed grid ends before the profile reaches k·f(0); for f(0) up to ~1.4 at
    # k = 10 (every classification checkpoint here) it is the plain span
    stretch = max(1.0, 4.0 * math.sqrt(2.0 * (k - 1.0) * L0) / hi)
    xs = np.geomspace(lo * stretch, hi * stretch, n) / np.sqrt(lam)
    models = {"real": lambda x: call_model(net, {k_: w0[k_] + x * du[k_] for k_ in w0}, Xd),
              "linearized": lambda x: z0 + x * Ju}
    fields, crossings = {}, {}
    bar = progress_counter(progress, total=4 * n, desc="loss along the top eigenvector")
    for name, outputs in models.items():
        def loss_at(x, outputs=outputs):
            if bar is not None:
                bar.update()
            with torch.no_grad():
                return float(loss_fn(outputs(float(x)), yd))

        fp = np.array([loss_at(x) for x in xs])
        fm = np.array([loss_at(-x) for x in xs])
        fields[f"{name}_plus"], fields[f"{name}_minus"] = fp / L0, fm / L0
        fields[f"{name}_secant"] = (fp + fm - 2 * L0) / xs ** 2 / lam
        crossings[name] = _crossing(xs, fields[f"{name}_plus"], fields[f"{name}_minus"], k,
                                    loss_at, L0, lam)
    if bar is not None:
        bar.close()
    (A_r, s_r), (A_l, s_l) = crossings["real"], crossings["linearized"]
    return LossAlongTop(lam=float(lam), L0=L0, amplitudes=xs, **fields, factor=k,
                        amplitude_real=A_r, amplitude_linearized=A_l, secant_real=s_r,
                        secant_linearized=s_l, secant_ratio=float(s_l / s_r))


def rescaling_as_derived(secant_ratio, share):
    """1 − (1 − r)·share, elementwise: a linearised threshold's correction for the
    network's own nonlinearity along a direction, r = s_lin/s_real of its profile and
    `share` the part of the instability that is curvature along it (λ₁/λ'_ρ(B) for SGD,
    q for Adam) — the formula for any r."""
    return 1.0 - (1.0 - np.asarray(secant_ratio, float)) * np.asarray(share, float)


def correction_applies(secant_ratio):
    """r ≤ 1 (up to 10⁻³, the profile's resolution: 1 for a linear model, and within it the
    bracket differs from 1 by under 0.1 %), elementwise: the premise of the correction, a
    real loss along the direction at least as sharp as the linearised one.
    Where it is flatter (label smoothing: r = 1.6–42 on the tabular MLPs of
    benchmarks/bench_heldout_tabular.py) the formula raised the large-B threshold against
    measurements below the linearised one."""
    return np.asarray(secant_ratio, float) <= 1.0 + 1e-3


def rescaling(secant_ratio, share):
    """`rescaling_as_derived` where `correction_applies`, 1 elsewhere (elementwise)."""
    return np.where(correction_applies(secant_ratio),
                    rescaling_as_derived(secant_ratio, share), 1.0)
