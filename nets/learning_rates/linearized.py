"""The divergence threshold of the linearised network (docs/theory.md §5.6).

A real-training threshold "the full-data loss never exceeds k× its start within K steps"
(`nets.learning_rates.lr_search.training_threshold`, criterion "divergence") is, on a
cross-entropy network at small batch size, a loss *tolerance*: it moves several-fold
between k = 3 and k = 100, where the network's quadratic model has a sharp edge at its
local stability limit. The linearised network explains most of it. Around the
checkpoint w₀ every sample's outputs are replaced by their first-order model,

    z_i(w₀ + e) = z_i(w₀) + J_i e,     J_i = ∂z_i/∂w at w₀  (K outputs × P parameters),

and the loss is the *exact* loss of those outputs, ℓ_i(e) = loss_fn(z_i(e), y_i). Its
Hessian at e = 0 is the Gauss–Newton matrix, so below the local limit it behaves like the
quadratic model; above it the loss's own nonlinearity is kept — the cross-entropy's
gradient is bounded (‖softmax(z) − e_y‖ ≤ √2) and its curvature diag p − ppᵀ vanishes as
the softmax saturates, so a growing oscillation is capped and the loss grows linearly in
the outputs instead of exponentially in time. For a quadratic loss (MSE) the linearised
network *is* the quadratic model. For a network linear in its parameters (softmax
regression) it is the real network, exactly.

Protocol (the same as `training_trial`, criterion "divergence", with `factor` = k): from
e = 0 and a zero buffer, heavy ball in torch's convention v ← m·v + g_B, e ← e − α·v, with
g_B = Σ_{i∈S} J_iᵀ ∂L_S/∂z_i the gradient of the batch-mean loss on a fresh batch S of B
distinct samples drawn as `torch.randperm(N, generator)[:B]` with the generator seeded
by the seed (the real trials' batch sequence); after every step the full-data loss
L(e) = (1/N)·Σ loss, judged against k× its start (a non-finite loss is unstable). All
learning rates of a grid run side by side (one column each); the threshold of a
(B, seed) is the geometric midpoint of the first grid step whose running maximum exceeds
k — the grid's spacing is the resolution. Grid: a coarse geometric grid 10⁻³…10² / λ₁
(λ₁ the checkpoint's top Hessian eigenvalue, 31 points), then `n_grid` points between
the coarse brackets of all seeds (and of `extra_factors`); or `lr_range=(lo, hi)`.

Cost: with every direction, either the per-sample Jacobians once (N·K·P numbers in
memory) and per step and learning rate one product with them (N·K·P multiply-adds), or
(`linear_outputs.TangentOutputs`, nothing but w₀ stored) a Jacobian-vector product
through the network on the batch and on the full data and a vector-Jacobian product on
the batch — the same numbers; `jacobians="auto"` takes the second where J does not fit
in `max_bytes` and otherwise the faster of the two (`linear_model_outputs`: the second on
the digits MLP, the first on a convolutional net). Where the loss is quadratic in the
outputs (a mean squared error, weighted or not — read from the loss itself along random
output directions out to 10⁴ times their spread, not assumed from its name), the
full-data loss after a step is the exact quadratic form L₀ + bᵀe + ½·eᵀAe in the D
coordinates of e (b and A = Σ_i J_iᵀ(∂²L/∂z_i²)J_i formed once: D Hessian-vector products
in the outputs), D² numbers per step and learning rate instead of the N·K·D of the
full-data outputs (`_quadratic_loss`; used with stored Jacobians where D ≤ N·K/4 and
D ≤ 4,096). On the digits
autoencoder of benchmarks/bench_heldout_gru_ae.py (64 outputs, rank 200) the thresholds at
B = 8…512 came out identical, in 0.28–0.30× the time, and `transfer_lr`'s default in
0.21–0.28× (two runs of each, alternating, one thread).

Subspace form (`rank=r`): the displacement is kept in the span of the top-r eigenvectors
V (P × r, orthonormal) of the full-data Gauss–Newton matrix, e = V·a, so only J_i·V is
needed (N·K·r numbers, formed by r Jacobian-vector products per sample chunk; the full J
is never built) and the batch gradient is its projection Vᵀg_B. The dynamics in that
span do not depend on the basis chosen inside it, and r = P is the full model. Every
direction outside the span is frozen at e = 0, so the form is an approximation whose
error is read off by doubling r: on the digits MLP, CNN and a ReLU MLP (P = 2,410 …
6,570) the SGD thresholds at r = 200 are within a few per cent of r = 400 and of the
full model at m = 0, less closely with momentum, and r ≤ 60 is not close (docs/real_training.md).
V comes from thick-restart Lanczos on the Gauss–Newton operator
(`nets.algorithms.lanczos.eigsh`, eval mode).

Curved form (`curved=True`): the outputs' second derivative along the top Hessian
eigenvector u is kept, z_i(w₀ + e) = z_i + J_i e + ½(uᵀe)²·q_i with q_i = d²z_i(w₀ + t·u)/dt²
(`linear_outputs.CurvedOutputs`, `second_derivative_along`), so that the Jacobian along u
grows with the displacement along u as the network's does to first order — the change
that makes a tanh MLP sharper than its linearisation under a growing oscillation (docs/real_training.md,
benchmarks/bench_curved_transfer.py). In the subspace form u is replaced by its unit
projection on the span. Every other direction stays linear.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from nets.curvature.params import twice_differentiable
from nets.learning_rates.linear_outputs import (
    CurvedOutputs,
    StoredOutputs,
    TangentOutputs,
    as_linear_outputs,
    second_derivative_along,
)
from nets.utils.autocast import outside_autocast
from nets.utils.callers import caller_stacklevel
from nets.utils.modes import model_copy
from nets.utils.results import Result, result
from rmt.validation import as_batch_sizes, as_bool, as_float, as_int, as_range, as_seed

__all__ = ["LinearizedThresholds", "linearized_threshold", "output_jacobians", "ggn_top_basis",
           "linear_model_outputs",
           "linearized_max_loss", "linearized_adam_max_loss", "flat_adam_state",
           "refined_runs", "first_crossing"]

_COARSE = (1e-3, 1e2, 31)
_TANGENT_BLOCK = 64          # Jacobian-vector products vmapped at once (memory ∝ block)


@result
class LinearizedThresholds(Result):
    """Thresholds of the linearised network per batch size (module docstring).

    batch_sizes (n_B,); lr : mean over seeds of the per-seed threshold at `factor` (n_B,);
    stderr (std ddof=1 / √n_seeds; NaN for one seed); per_seed (n_B, n_seeds), NaN where
    the grid does not bracket it; seeds; momentum; steps; factor; lam (λ₁ of the
    checkpoint, NaN if `lr_range` was given); grid (n_B, n_grid) learning rates;
    max_loss (n_B, n_seeds, n_grid) running maximum of L/L₀ of each grid column, from
    which `at(k)` reads the threshold of any other tolerance the grid brackets (a column
    is no longer run once its maximum exceeds `tracked_up_to` = the largest of factor and
    extra_factors, so values above it are lower bounds); rank the dimension the
    displacement lives in (P for the full model, r for `rank=r`); nesterov; curved (the
    second-order term along the top eigenvector was kept)."""

    batch_sizes: np.ndarray
    lr: np.ndarray
    stderr: np.ndarray
    per_seed: np.ndarray
    seeds: tuple
    momentum: float
    steps: int
    factor: float
    lam: float
    grid: np.ndarray
    max_loss: np.ndarray
    rank: int
    tracked_up_to: float = math.inf
    nesterov: bool = False
    curved: bool = False

    def at(self, factor) -> np.ndarray:
        """Per-seed thresholds (n_B, n_seeds) for the tolerance `factor` (loss ever >
        factor × start), read off the stored running maxima; NaN where not bracketed."""
        k = as_float("factor", factor, positive=True)
        if k > self.tracked_up_to:
            raise ValueError(f"factor {k:g} is above the largest tolerance tracked "
                             f"({self.tracked_up_to:g}); pass it in extra_factors")
        return np.array([[first_crossing(self.grid[i], self.max_loss[i, j], k)
                          for j in range(self.max_loss.shape[1])]
                         for i in range(len(self.batch_sizes))])

    def plot(self, ax=None, *, label=None, color="C2"):
        """Thresholds ± stderr against B (log-log); returns the axes."""
        from nets.learning_rates.lr_search import plot_thresholds

        return plot_thresholds(ax, self.batch_sizes, self.lr, self.stderr, fmt="s-", color=color,
                               label=label or f"linearised network (k={self.factor:g}, "
                                              f"m={self.momentum:g})")


def first_crossing(grid, max_loss, factor) -> float:
    """Geometric midpoint of the first grid step whose running maximum exceeds `factor`;
    NaN if none does or the first one already does (not bracketed)."""
    hit = np.asarray(max_loss) > factor
    if not hit.any() or hit[0]:
        return float("nan")
    j = int(np.argmax(hit))
    return float(np.sqrt(grid[j] * grid[j - 1]))


@outside_autocast
def output_jacobians(model, X, *, chunk_size=256, dtype=torch.float32, basis=None,
                     progress=None):
    """Per-sample output Jacobians J (N, K, P) and outputs z (N, K) of `model` (eval mode,
    its trainable parameters in `named_parameters()` order; K = outputs per sample).

    basis : optional (P, r) tensor V; then J·V (N, K, r) is returned instead of J, formed
    by r Jacobian-vector products per chunk (the full J is never built).
    progress : a bar over the chunks (`nets.utils.progress`): J·V for rank 200 on 8,000
    images ran about two minutes without one inside `transfer_lr` (an outside sweep)."""
    from torch.func import jacrev, jvp, vmap

    from nets.curvature.params import call_model
    from nets.utils.progress import progress_bar

    net = model_copy(model).eval()
    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}
    if basis is not None:
        basis = torch.as_tensor(basis)
        P = sum(v.numel() for v in params.values())
        if basis.ndim != 2 or basis.shape[0] != P:
            raise ValueError(f"basis must have shape (P={P}, r), got {tuple(basis.shape)}")
        cols, i = {}, 0
        for k, v in params.items():              # basis columns as parameter-shaped tangents
            cols[k] = basis[i:i + v.numel()].T.reshape(basis.shape[1], *v.shape).to(v)
            i += v.numel()

    def out(p, x):
        return call_model(net, p, x[None])[0].reshape(-1)

    def outs(p, xb):
        return call_model(net, p, xb).reshape(len(xb), -1)

    Js, zs = [], []
    with torch.no_grad():
        for s in progress_bar(range(0, len(X), chunk_size), progress=progress,
                              desc="output Jacobians" if basis is None else
                              f"output Jacobians along {basis.shape[1]} directions"):
            xb = X[s:s + chunk_size]
            if basis is None:
                jac = vmap(jacrev(out), in_dims=(None, 0))(params, xb)
                Js.append(torch.cat([jac[k].reshape(len(xb), jac[k].shape[1], -1)
                                     for k in params], dim=2).to(dtype))
            else:                    # blocks of ≤ 64 tangents: (c, n, K) → (n, K, r)
                jv = [vmap(lambda t, xb=xb: jvp(lambda p: outs(p, xb), (params,), (t,))[1])(
                    {k: c[b:b + _TANGENT_BLOCK] for k, c in cols.items()})
                    for b in range(0, basis.shape[1], _TANGENT_BLOCK)]
                Js.append(torch.cat(jv).permute(1, 2, 0).to(dtype))
            zs.append(outs(params, xb).to(dtype))
    return torch.cat(Js).contiguous(), torch.cat(zs)


JACOBIANS = ("auto", "tangent", "stored")


@outside_autocast
def linear_model_outputs(model, X, *, jacobians="auto", chunk_size=256, max_bytes=4 << 30,
                         dtype=torch.float32):
    """(outputs, choice): the linearised network's products at `model`'s weights
    (`linear_outputs`) — "stored" (J in memory, `dtype`; ValueError above `max_bytes`),
    "tangent" (through the network, nothing stored) or "auto": "tangent" where J would
    not fit in `max_bytes`, otherwise whichever of the two computes J·E for 8 columns over
    the data faster here (best of two timings each; they give the same numbers to
    rounding). Measured: on the digits MLP the tangent products are 3.3× faster per run,
    on the BatchNorm CNN of docs/real_training.md ~30× slower (a convolution's forward pass costs far
    more than its P parameters, and vmapped weight tangents of a convolution are slow
    on CPU)."""
    import time

    if jacobians not in JACOBIANS:
        raise ValueError(f"jacobians must be one of {JACOBIANS}, got {jacobians!r}")
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fits = True
    if jacobians != "tangent":
        try:
            checked_output_shape(model, X, P, dtype=dtype, max_bytes=max_bytes)
        except ValueError:
            if jacobians == "stored":
                raise
            fits = False
    if jacobians == "tangent" or not fits:
        return TangentOutputs(model, X, chunk_size=chunk_size), "tangent"
    stored = StoredOutputs(*output_jacobians(model, X, chunk_size=chunk_size, dtype=dtype))
    if jacobians == "stored":
        return stored, "stored"
    tangent = TangentOutputs(model, X, chunk_size=chunk_size)
    E = 1e-3 * torch.randn(P, 8, generator=torch.Generator().manual_seed(0)).to(stored.dtype)

    def best(lin):
        times = []
        for _ in range(2):
            t = time.perf_counter()
            lin.full(E.to(lin.dtype))
            times.append(time.perf_counter() - t)
        return min(times)

    return (tangent, "tangent") if best(tangent) < best(stored) else (stored, "stored")


@outside_autocast
def ggn_top_basis(model, loss_fn, data, rank, *, seed=0, tol=1e-4, progress=False):
    """(V, values): the top-`rank` eigenvectors V (P, rank, float64, orthonormal) and
    eigenvalues of the full-data Gauss–Newton matrix of `model` (eval mode) by
    thick-restart Lanczos to relative residual `tol`."""
    from nets.algorithms.lanczos import eigsh
    from nets.curvature.operators import curvature_operator

    op = curvature_operator(model, loss_fn, data, kind="ggn", policy="eval")
    top = eigsh(op, k=as_int("rank", rank, minimum=1), which="LA", tol=tol, seed=seed,
                progress=progress)
    V, _ = torch.linalg.qr(torch.as_tensor(np.asarray(top.vectors), dtype=torch.float64))
    return V, np.asarray(top.values)


@twice_differentiable()            # the models' per-step calls through the network: set once
def _run_columns(lin, y, loss_fn, batch_size, n_cols, steps, seed, step, out_shape,
                 stop_above=None):
    """The linearised network's loop shared by the optimizers: `lin` the linear outputs
    (`nets.learning_rates.linear_outputs`); each step draws a batch
    (`torch.randperm(N, generator)[:B]`, generator seeded by `seed`), forms the batch
    gradient of every column, G (D, n_cols), calls `step(G, t)` (t = 1, 2, …) for the new
    displacements E (D, n_cols), and tracks the running maximum of L(E)/L(0) (inf for a
    column whose loss became non-finite; its state is left to `step`). stop_above : a
    column whose running maximum exceeds it is decided for every tolerance up to it and
    is no longer evaluated (its gradient is zero from then on, its maximum stays the last
    value, a lower bound); columns are independent, so the others are unchanged. Where the
    loss is quadratic in the outputs (`_quadratic_loss`) the full-data loss is read from
    its exact quadratic form in E instead of the full-data outputs."""
    from torch.func import grad, vmap

    N, K, P = lin.N, lin.K, lin.D
    shape = tuple(out_shape) if out_shape is not None else (K,)

    def col_loss(z, t):                                 # z (n, K) one column → scalar
        return loss_fn(z.reshape(len(z), *shape), t)

    if _is_plain_cross_entropy(loss_fn, y, shape):
        batch_grad, full_loss = _columns_cross_entropy_grad, _columns_cross_entropy
    else:
        batch_grad = vmap(grad(col_loss), in_dims=(2, None), out_dims=2)
        full_loss = vmap(col_loss, in_dims=(2, None))
        try:                           # a loss vmap cannot run: one column at a time
            probe = lin.z[:2, :, None]
            with torch.no_grad():
                full_loss(probe, y[:2])
            batch_grad(probe, y[:2])
        except RuntimeError:
            batch_grad, full_loss = _looped_columns(col_loss)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        L0 = float(col_loss(lin.z, y))
    if not (math.isfinite(L0) and L0 > 0):
        raise ValueError(f"the loss at the checkpoint must be finite and positive, got {L0}")
    # once per linear model, loss and targets (with the targets' in-place version); each
    # entry holds the loss and the targets, so their ids cannot be reused while it lives
    forms = lin.__dict__.setdefault("_quadratic_forms", {})
    key = (id(loss_fn), id(y), getattr(y, "_version", None), shape)
    if key not in forms:
        forms[key] = (loss_fn, y, _quadratic_loss(lin, y, col_loss, full_loss, seed))
    form = forms[key][2]
    if form is None:
        def full_value(E_on):
            return full_loss(lin.full(E_on), y).double().cpu()
    else:
        def full_value(E_on):            # through the outputs' dtype: overflow is inf there too
            return form(E_on).to(lin.dtype).double().cpu()
    cap = math.inf if stop_above is None else float(stop_above)
    E = torch.zeros(P, n_cols, dtype=lin.dtype, device=lin.device)
    worst = torch.ones(n_cols, dtype=torch.float64)
    dead = torch.zeros(n_cols, dtype=torch.bool)
    live = torch.ones(n_cols, dtype=torch.bool)
    for t in range(1, steps + 1):
        if not live.any():
            break                      # every column decided
        idx = torch.randperm(N, generator=gen)[:batch_size].to(lin.device)
        on = live.nonzero().flatten().to(lin.device)
        E_on = E[:, on]
        with torch.no_grad():
            ZB = lin.batch(idx, E_on)
        G = batch_grad(ZB, y[idx])
        with torch.no_grad():
            g = torch.zeros(P, n_cols, dtype=lin.dtype, device=lin.device)
            g[:, on] = lin.pullback(idx, G, E_on)
            E = step(g, t)
            L = full_value(E[:, on])
        bad = torch.zeros(n_cols, dtype=torch.bool)
        bad[live] = ~torch.isfinite(L)
        dead |= bad
        worst[live] = torch.maximum(worst[live], torch.where(bad[live], 0.0, L / L0))
        if bad.any():                  # a non-finite column stays dead; keep it finite
            E[:, bad.to(E.device)] = 0.0
        live &= ~dead & (worst <= cap)
    worst[dead] = math.inf
    return worst.numpy()


def _quadratic_loss(lin, y, col_loss, full_loss, seed, *, rtol=1e-4):
    """The full-data loss as an exact quadratic form in the displacement, where the loss
    is quadratic in the outputs (a mean squared error, weighted or not):

        L(E) = L₀ + bᵀE + ½·EᵀAE,   b = Σ_i J_iᵀ ∂L/∂z_i,   A = Σ_i J_iᵀ (∂²L/∂z_i²) J_i,

    both at z = z₀, so that a step's full-data loss costs D² numbers per column instead of
    the full-data outputs (N·K·D). Returns a function E (D, G) → (G,) float64, or None
    where it does not apply: outputs other than stored Jacobians (`TangentOutputs` would
    form A by products through the network over all N samples at once: 4.95 GB against
    0.42 GB for the direct runs on an N = 8,000 MLP; curved outputs are not linear in E),
    D > N·K/4 or D > 4096 (no saving, or A too large), a loss whose Hessian in the outputs
    torch.func cannot take,
    or a loss that is not quadratic — read, not assumed: the form must reproduce the loss
    of the outputs themselves (relative `rtol`) along random directions whose outputs move
    from 0.1 to 10⁴ times their spread, which a Huber or cross-entropy loss fails (it
    turns linear far out)."""
    from torch.func import grad, vmap

    N, K, D = lin.N, lin.K, lin.D
    if not isinstance(lin, StoredOutputs) or D > min(N * K // 4, 4096):
        return None
    z0 = lin.z
    everyone = torch.arange(N, device=lin.device)

    def hvp(d):                                         # (∂²L/∂z²)·d at z₀, d (N, K)
        return grad(lambda z: (grad(col_loss)(z, y) * d).sum())(z0)

    L0 = float(col_loss(z0, y))
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    spread = float(z0.std()) + float(z0.abs().mean()) + 1e-12
    scales = torch.tensor([0.1, 1.0, 1e2, 1e4], dtype=torch.float64)
    try:
        with torch.no_grad():
            g0 = grad(col_loss)(z0, y)
            # quadratic along random output directions first (a few products; most
            # losses stop here), then the form itself along random displacements below
            d = torch.randn(z0.shape, generator=gen, dtype=torch.float64).to(z0)
            d = d * (spread / float(d.double().pow(2).mean().sqrt()))
            slope = float((g0 * d).double().sum())
            bend = float((hvp(d) * d).double().sum())
            for t in scales.tolist():
                want = float(col_loss(z0 + t * d, y))
                if not math.isfinite(want) or \
                        abs(L0 + t * slope + 0.5 * t * t * bend - want) > rtol * max(abs(want), L0):
                    return None
            b = lin.pullback(everyone, g0[:, :, None])[:, 0].double()
            A = torch.empty(D, D, dtype=torch.float64, device=lin.device)
            eye = torch.eye(D, dtype=lin.dtype, device=lin.device)
            block = max(1, min(D, (1 << 24) // max(1, N * K)))
            for s in range(0, D, block):
                JE = lin.full(eye[:, s:s + block]) - z0[:, :, None]            # (N, K, g)
                HJE = vmap(hvp, in_dims=2, out_dims=2)(JE)
                A[:, s:s + block] = lin.pullback(everyone, HJE).double()
    except RuntimeError:                                # a loss torch.func cannot differentiate
        return None
    A = 0.5 * (A + A.T)

    def form(E):
        E = E.double()
        return L0 + b @ E + 0.5 * (E * (A @ E)).sum(0)

    E = torch.randn(D, len(scales), generator=gen, dtype=torch.float64).to(lin.device)
    with torch.no_grad():
        moved = (lin.full(E.to(lin.dtype)) - z0[:, :, None]).double().pow(2).mean((0, 1)).sqrt()
        if not bool((moved > 0).all()):
            return None
        E = (E * (scales.to(lin.device) * spread / moved)).to(lin.dtype)
        direct = full_loss(lin.full(E), y).double()
    quad = form(E)
    if not bool(torch.isfinite(direct).all()) or \
            bool(((quad - direct).abs() > rtol * direct.abs().clamp_min(L0)).any()):
        return None
    return form


def _looped_columns(col_loss):
    """(batch gradient, full loss) of `_run_columns` one column at a time with
    torch.autograd: for a loss that vmap cannot run — a data-dependent check such as `if
    not torch.isfinite(z).all(): raise`, `.item()`, an old-style autograd.Function — which
    raised functorch's "vmap: It looks like you're calling .item()" from every linearised
    form while the real trials ran it (an outside sweep). The same numbers, slower by
    the number of columns."""

    def batch_grad(Z, t):
        cols = []
        for g in range(Z.shape[2]):
            z = Z[:, :, g].detach().requires_grad_(True)
            with torch.enable_grad():
                cols.append(torch.autograd.grad(col_loss(z, t), z)[0])
        return torch.stack(cols, 2)

    def full_loss(Z, t):
        return torch.stack([col_loss(Z[:, :, g], t).detach() for g in range(Z.shape[2])])

    return batch_grad, full_loss


def _is_plain_cross_entropy(loss_fn, y, shape) -> bool:
    """Whether loss_fn(z, y) is torch's mean cross-entropy over class indices with no
    weights, ignored targets or smoothing (`F.cross_entropy` itself or a default
    `nn.CrossEntropyLoss`), on (n, K) outputs."""
    if loss_fn is not torch.nn.functional.cross_entropy:
        if type(loss_fn) is not torch.nn.CrossEntropyLoss or loss_fn.weight is not None or \
                loss_fn.reduction != "mean" or loss_fn.label_smoothing != 0.0:
            return False
        if bool((y == loss_fn.ignore_index).any()):      # a class index it ignores (was
            return False                                 # read as plain: 15 % low)
    return (len(shape) == 1 and y.ndim == 1 and not y.is_floating_point()
            and not y.is_complex() and bool(((y >= 0) & (y < shape[0])).all()))


def _columns_cross_entropy(Z, y):
    """Mean cross-entropy of every column of Z (N, K, G) against class indices y (N,):
    (G,), logsumexp_k Z_nkg − Z_n,y_n,g averaged over n. The same numbers as torch's
    cross-entropy vmapped over the columns, ~7× faster on CPU (torch's log-softmax over
    a short last dimension is slow there, and this reduces along K in place)."""
    m = Z.amax(1, keepdim=True)
    lse = (Z - m).exp_().sum(1).log_() + m[:, 0]
    picked = Z.gather(1, y.to(Z.device).view(-1, 1, 1).expand(-1, 1, Z.shape[2]))[:, 0]
    return (lse - picked).mean(0)


def _columns_cross_entropy_grad(Z, y):
    """∂/∂Z of `_columns_cross_entropy`: (softmax_k(Z) − onehot(y))/N, (N, K, G)."""
    G = torch.softmax(Z, 1)
    G.scatter_add_(1, y.to(Z.device).view(-1, 1, 1).expand(-1, 1, Z.shape[2]),
                   torch.full((Z.shape[0], 1, Z.shape[2]), -1.0, dtype=Z.dtype, device=Z.device))
    return G / Z.shape[0]


def linearized_max_loss(J, z0, y, loss_fn, batch_size, momentum, lrs, steps, seed, *,
                        out_shape=None, stop_above=None, nesterov=False):
    """Running maximum of L(e_t)/L(0) over `steps` heavy-ball (or `nesterov`, torch's
    e ← e − α(g + ρv)) steps on the linearised
    network (module docstring), one entry per learning rate of `lrs` (inf where the loss
    became non-finite). J (N, K, P), z0 (N, K): `output_jacobians` — or J a
    `linear_outputs.StoredOutputs`/`TangentOutputs` and z0 None; y : targets;
    loss_fn(outputs, targets) the batch-mean loss; out_shape : per-sample output shape
    passed to loss_fn (default (K,)); stop_above : stop evaluating a learning rate once
    its running maximum exceeds this (its value is then a lower bound; default never)."""
    lin = as_linear_outputs(J, z0)
    a = torch.as_tensor(np.asarray(lrs, float), dtype=lin.dtype, device=lin.device)
    st = {"E": torch.zeros(lin.D, len(a), dtype=lin.dtype, device=lin.device)}
    st["V"] = torch.zeros_like(st["E"])

    def step(g, t):
        st["V"] = torch.nan_to_num(momentum * st["V"] + g)
        d = g + momentum * st["V"] if nesterov else st["V"]
        st["E"] = torch.nan_to_num(st["E"] - a * d)
        return st["E"]

    return _run_columns(lin, y, loss_fn, batch_size, len(a), steps, seed, step, out_shape,
                        stop_above)


def flat_adam_state(optimizer):
    """(exp_avg, exp_avg_sq, step) of a torch Adam with one parameter group, flattened in
    parameter order (P,) each; step the number of steps taken (0 for a fresh state).

    A parameter without state (it never got a gradient, e.g. an unused head) keeps
    exp_avg = exp_avg_sq = 0 beside the others' own state: exact while it gets no gradient
    (its update stays 0). The linearised run has one step count, so states with different
    counts (a parameter frozen for part of the warm-up) are refused."""
    if len(optimizer.param_groups) != 1:
        raise ValueError(f"optimizer: flat_adam_state needs one parameter group, got "
                         f"{len(optimizer.param_groups)}")
    params = optimizer.param_groups[0]["params"]
    st = [optimizer.state.get(p, {}) for p in params]
    steps = sorted({int(float(s["step"])) for s in st if "exp_avg" in s})
    if len(steps) > 1:
        raise ValueError(f"optimizer: its parameters' states have different step counts {steps} "
                         "(some were frozen or got no gradient for part of the steps); the "
                         "linearised Adam run bias-corrects all coordinates with one count")
    def flat(key):
        return torch.cat([(s[key] if "exp_avg" in s else torch.zeros_like(p)).detach().reshape(-1)
                          for p, s in zip(params, st)]).clone()

    return flat("exp_avg"), flat("exp_avg_sq"), steps[0] if steps else 0


def linearized_adam_max_loss(J, z0, y, loss_fn, batch_size, lrs, steps, batch_seed, *,
                             state=None, betas=(0.9, 0.999), eps=1e-8, out_shape=None,
                             stop_above=None):
    """`linearized_max_loss` for Adam (torch's update, bias-corrected, no weight decay):
    m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², e ← e − α·(m/(1−β₁ᵗ))/(√(v/(1−β₂ᵗ)) + ε),
    started from `state` = (exp_avg, exp_avg_sq, step) (`flat_adam_state` of a warmed
    optimizer; None: fresh) at e = 0; batches as in `nets.learning_rates.adam.adam_trial`:
    `torch.randperm(N, generator)[:B]` with the generator seeded by `batch_seed` (that
    function uses seed + 7919). Returns the running maximum of L/L(0) per learning rate
    (stop_above as in `linearized_max_loss`)."""
    lin = as_linear_outputs(J, z0)
    P, dt, dev = lin.D, lin.dtype, lin.device
    b1, b2 = (float(b) for b in betas)
    a = torch.as_tensor(np.asarray(lrs, float), dtype=dt, device=dev)
    m0, v0, t0 = state if state is not None else (torch.zeros(P), torch.zeros(P), 0)
    st = {"E": torch.zeros(P, len(a), dtype=dt, device=dev),
          "M": m0.to(dt).to(dev).reshape(P, 1).repeat(1, len(a)),
          "V": v0.to(dt).to(dev).reshape(P, 1).repeat(1, len(a))}

    def step(g, t):
        t = t0 + t
        st["M"] = b1 * st["M"] + (1 - b1) * g
        st["V"] = b2 * st["V"] + (1 - b2) * g * g
        denom = st["V"].sqrt() / math.sqrt(1 - b2 ** t) + eps
        st["E"] = torch.nan_to_num(st["E"] - (a / (1 - b1 ** t)) * st["M"] / denom)
        return st["E"]

    return _run_columns(lin, y, loss_fn, batch_size, len(a), steps, batch_seed, step, out_shape,
                        stop_above)


@outside_autocast
def linearized_threshold(model, loss_fn, data, batch_sizes, *, optimizer="sgd", momentum=None,
                         nesterov=None, factor=10.0, steps=200, seeds=tuple(range(8)), extra_factors=(),
                         lr_range=None, n_grid=48, chunk_size=256, max_bytes=4 << 30,
                         device=None, dtype=torch.float32, seed=0, rank=None,
                         jacobians="auto", curved=False, progress=None) -> LinearizedThresholds:
    """The "divergence" threshold (loss ever > factor × start within `steps` steps) of
    heavy-ball SGD on the linearised network at the model's weights, per batch size
    (module docstring). Same signature conventions as `training_threshold`: data any form
    of `nets.utils.data_source`; loss_fn(outputs, targets) the batch mean; optimizer
    "sgd" or a `torch.optim.SGD` whose momentum and nesterov flag are read (nesterov: None,
    the optimizer's, or a bool); seeds the batch sequences (default 0–7, as
    `training_threshold`).
    extra_factors : other tolerances the fine grid must also bracket (read them with
    `.at(k)`); lr_range : (lo, hi) of the grid instead of the coarse pass; n_grid :
    points of the fine grid. max_bytes : the Jacobians' memory above which the call is
    refused (N·K·P·itemsize; pass a subset of the data or a larger limit).
    seed : seeds the Lanczos start of λ₁ (used for the coarse grid) and of the basis.
    rank : None (every direction, J of N·K·P numbers) or r: the subspace form of the
    module docstring (J·V of N·K·r numbers; r ≥ P means every direction); check it by
    doubling r. jacobians : with every direction, "auto" (default), "tangent" (J·e and Jᵀ·c
    by Jacobian-vector products through the network, nothing stored, the model's own
    dtype) or "stored" (J in memory, `dtype`, refused above max_bytes): the same numbers
    to rounding, `linear_model_outputs`. The subspace form always stores J·V.
    curved : also keep the outputs' second derivative along the top Hessian eigenvector u
    (`linear_outputs.CurvedOutputs`; in the subspace form along u's projection on the
    span, renormalised): the linearised network plus the change of its Jacobian along u,
    one forward-over-forward pass over the data more (module docstring)."""
    from nets.curvature.loss_check import mean_reduction_check
    from nets.learning_rates.lr_prediction import warn_partial_optimizer
    from nets.learning_rates.lr_search import (
        _read_momentum,
        _top_direction,
        as_growth_factor,
        as_seeds,
        seed_mean_stderr,
        warn_train_mode_layers,
    )
    from nets.utils.data_source import tensors_for
    from nets.utils.progress import progress_bar

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        # the Jacobians' storage dtype: an integer one raised a kernel error deep in the run
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    m, nest = _read_momentum(optimizer, momentum, nesterov)
    # as training_threshold does: the run trains every trainable parameter in eval mode
    # (a head-only optimizer was modelled as training all 460 parameters, 10× off, silently)
    warn_partial_optimizer(model, optimizer)
    warn_train_mode_layers(model, "linearized_threshold")
    # > 1, as for the real thresholds it models (factor=1 gave a number training_threshold
    # refuses; 0.5 an all-NaN result; an extra factor ≤ 1 widened the grid; an outside sweep)
    k = as_growth_factor(factor)
    extras = tuple(as_growth_factor(f, "extra_factors") for f in np.atleast_1d(extra_factors))
    K = as_int("steps", steps, minimum=1)
    n_grid = as_int("n_grid", n_grid, minimum=4)
    seeds = as_seeds(seeds)
    # checked whichever path reads them (seed='abc' passed when lr_range was given,
    # curved='yes' ran the curved model, max_bytes=nan and 0 were never looked at)
    curved = as_bool("curved", curved)
    seed = as_seed("seed", seed)
    max_bytes = as_float("max_bytes", max_bytes, positive=True, allow_inf=True)  # inf: no cap
    chunk_size = as_int("chunk_size", chunk_size, minimum=1)
    X, y = tensors_for(model, data, device=device)
    if device is not None:
        model = model_copy(model).to(device)
    mean_reduction_check(model, loss_fn, (X, y))
    N = len(X)
    bs = as_batch_sizes(batch_sizes, N).tolist()
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    r = P if rank is None else min(P, as_int("rank", rank, minimum=1))
    if jacobians not in JACOBIANS:
        raise ValueError(f"jacobians must be one of {JACOBIANS}, got {jacobians!r}")
    full = r == P
    out_shape = checked_output_shape(model, X, 0 if full and jacobians != "stored" else r,
                                     dtype=dtype, max_bytes=max_bytes, smaller=", a smaller rank")
    lam, u = math.nan, None
    if lr_range is None or curved:
        u, lam = _top_direction(model, loss_fn, (X, y), seed, progress=progress)
    if lr_range is None:
        if not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"the top Hessian eigenvalue is {lam}; give lr_range=(lo, hi)")
        coarse = np.geomspace(_COARSE[0] / lam, _COARSE[1] / lam, _COARSE[2])
    else:
        lo, hi = as_range("lr_range", lr_range)
    basis = None
    if r < P:
        basis, _ = ggn_top_basis(model, loss_fn, (X, y), r, seed=seed,
                                 progress=progress)
    if full:
        lin, _ = linear_model_outputs(model, X, jacobians=jacobians, chunk_size=chunk_size,
                                      max_bytes=max_bytes, dtype=dtype)
    else:
        lin = StoredOutputs(*output_jacobians(model, X, chunk_size=chunk_size, dtype=dtype,
                                              basis=basis, progress=progress))
    if curved:
        lin = _curved(lin, model, X, u, basis, chunk_size)
    grids = np.zeros((len(bs), n_grid))
    worst = np.zeros((len(bs), len(seeds), n_grid))
    top = max((k, *extras))
    jobs = list(range(len(bs)))
    for i in progress_bar(jobs, progress=progress, total=len(jobs),
                          desc=f"linearised threshold (m={m:g})"):
        runs = [lambda g, B=bs[i], s=s: linearized_max_loss(lin, None, y, loss_fn, B, m, g, K, s,
                                                            out_shape=out_shape,
                                                            stop_above=top, nesterov=nest)
                for s in seeds]
        if lr_range is None:
            grids[i], worst[i] = refined_runs(runs, coarse, (k, *extras), n_grid)
        else:
            grids[i] = np.geomspace(lo, hi, n_grid)
            worst[i] = [run(grids[i]) for run in runs]
    per = np.array([[first_crossing(grids[i], worst[i, j], k) for j in range(len(seeds))]
                    for i in range(len(bs))])
    warn_unbracketed("linearized_threshold", per, bs,
                     "give lr_range=(lo, hi) wider than the grid used (.grid). Through "
                     "transfer_lr, which places the grid itself, use form='directional' or "
                     "measure the threshold there: a sequence still stable at the top "
                     f"(100/λ₁ = {_COARSE[1] / lam:.3g}) usually means the linearised "
                     "cross-entropy has saturated (a loss near zero), and its threshold then "
                     "lies far above the real network's (a wine MLP at loss 7e-4: up to 4748 "
                     "against a measured 19–68)" if lr_range is None else
                     "give lr_range=(lo, hi) wider than the grid used (.grid)")
    mean, se = seed_mean_stderr(per)
    return LinearizedThresholds(np.array(bs), mean, se, per, seeds, float(m), K, k, float(lam),
                                grids, worst, int(r), float(top), nest, bool(curved))


def _curved(lin, model, X, u, basis, chunk_size):
    """`CurvedOutputs` of the linear outputs `lin` along the top eigenvector u (P,): in the
    subspace of `basis` V along its projection ũ = Vᵀu/‖Vᵀu‖ (the second derivative then
    taken along Vũ), with every direction along u itself."""
    u = u.to(torch.float64)
    if basis is not None:
        t = basis.T @ u
        overlap = float(t.norm())
        if overlap < 1e-3:
            raise ValueError("the top Hessian eigenvector is orthogonal to the Gauss–Newton "
                             "basis; curved=True needs it in the span (raise rank)")
        if overlap < 0.5:
            warnings.warn(f"linearized_threshold: the top Hessian eigenvector lies mostly outside "
                          f"the rank-{basis.shape[1]} Gauss–Newton span (|Vᵀu| = {overlap:.3g}); "
                          "the curved term is taken along its projection (raise rank)",
                          UserWarning, stacklevel=caller_stacklevel())
        t = t / t.norm()
        u = basis @ t
    else:
        t = u
    q = second_derivative_along(model, X, u.to(next(model.parameters()).dtype),
                                chunk_size=chunk_size)
    return CurvedOutputs(lin, t, q)


def warn_unbracketed(who, per, batch_sizes, advice):
    """UserWarning naming the batch sizes whose per-sequence thresholds `per` (n_B, n_seeds)
    contain NaN (the grid did not bracket them; their means are NaN too)."""
    miss = np.isnan(per).any(axis=1)
    if miss.any():
        warnings.warn(f"{who}: the grid did not bracket the threshold at B = "
                      f"{np.asarray(batch_sizes)[miss].tolist()} for {int(np.isnan(per).sum())} "
                      f"of {per.size} sequences (stable at its top, or already above the "
                      f"tolerance at its bottom); those thresholds and their means are NaN: "
                      f"{advice}", UserWarning, stacklevel=caller_stacklevel())


def refuse_container_output(out) -> None:
    """TypeError for a model output that is not one tensor (a tuple, namedtuple, dict or
    list): the linearised and curved forms push the outputs forward as one tensor z0 + J·δ
    and train that model, which a container of outputs does not fit."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            "model: the linearised and curved forms (linearized_threshold, "
            "linearized_adam_threshold, transfer_lr's form='linearized' and 'curved', its "
            f"default) need a model that returns one tensor, got a {type(out).__name__} "
            "output. Use transfer_lr(..., form='directional') (for Adam, form='mean_square'), "
            "or wrap the model so that forward returns the tensor the loss reads")


def checked_output_shape(model, X, directions, *, dtype, max_bytes, smaller=""):
    """The per-sample output shape of `model` (a copy in eval mode, on X[:1]), after
    checking that it returns one tensor (TypeError otherwise) and that the Jacobians of N
    samples along `directions` directions fit in `max_bytes` (ValueError otherwise;
    `smaller` names a further way out in the message)."""
    with torch.no_grad():
        out = model_copy(model).eval()(X[:1])
    refuse_container_output(out)
    out_shape = tuple(out.shape[1:])
    need = (len(X) * max(1, int(np.prod(out_shape))) * directions
            * torch.tensor([], dtype=dtype).element_size())
    if need > max_bytes:
        raise ValueError(f"the Jacobians need {need / 2**30:.2f} GiB (N={len(X)} × outputs × "
                         f"{directions} directions), above max_bytes={max_bytes / 2**30:.2f} "
                         f"GiB; pass a subset of the data{smaller} or a larger max_bytes")
    return out_shape


def refined_runs(runs, coarse, factors, n_grid, *, max_extensions=3):
    """Coarse-to-fine grid (module docstring): each of `runs` (callables grid → running
    maximum of L/L₀ per grid point, one per seed) is run on `coarse`, then all of them on
    `n_grid` points between the coarse brackets of the smallest and largest of
    `factors`. Where a run is already above the smallest factor at the fine grid's first
    point although it was below it there on the coarse pass (near a soft threshold the
    running maximum is not monotone in the lr, and the fine pass's other columns change
    its float rounding), the fine grid is started one coarse step lower and all runs are
    repeated, at most `max_extensions` times, so that the threshold stays bracketed.
    Returns (fine grid, [running maxima on it])."""
    lo, hi = _bracket(coarse, [run(coarse) for run in runs], factors)
    step = float(coarse[1] / coarse[0]) if len(coarse) > 1 else 2.0
    grid = np.geomspace(lo, hi, n_grid)
    worst = [run(grid) for run in runs]
    for _ in range(max_extensions):
        lower = max(lo / step, float(coarse[0]))
        if lower == lo or not any(np.asarray(w)[0] > min(factors) for w in worst):
            break
        lo = lower
        grid = np.geomspace(lo, hi, n_grid)
        worst = [run(grid) for run in runs]
    return grid, worst


def _bracket(grid, runs, factors):
    """(lo, hi) of the fine grid: from the last coarse point below every run's first
    crossing of the smallest factor to the first point above every run's first crossing
    of the largest (the coarse ends where a run never or always crosses)."""
    firsts = []
    for f in (min(factors), max(factors)):
        for w in runs:
            hit = np.asarray(w) > f
            firsts.append(int(np.argmax(hit)) if hit.any() else len(grid) - 1)
    j_lo = max(0, min(firsts[:len(runs)]) - 1)
    j_hi = min(len(grid) - 1, max(firsts[len(runs):]) + 1)
    if j_hi <= j_lo:
        j_hi = min(len(grid) - 1, j_lo + 2)
    return float(grid[j_lo]), float(grid[j_hi])
