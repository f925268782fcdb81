"""The stochastic sharpness gap of Liao, Kolomvaki & Kyrillidis (2026) (docs/references.md).

Self-stabilisation (Damian, Nichani & Lee 2023) explains why full-batch gradient descent
hovers at the edge of stability S(θ) = λ₁(∇²L(θ)) = 2/η: along the top eigenvector u the
iterate oscillates, and the cubic term of the loss pulls the sharpness back down. Its two
rates are

    α = −∇L(θ)·∇S(θ)      progressive sharpening (S grows at rate α along −∇L),
    β = ‖∇S(θ)‖²          self-stabilisation strength,
    ∇S(θ) = ∇_θ [uᵀ ∇²L(θ) u]   (u held fixed: the third derivative ∇³L[u, u]).

Liao et al. extend it to SGD: the mini-batch gradient noise along u feeds the
oscillation, which strengthens the cubic restoring force, so the full-data sharpness
settles below 2/η by

    ΔS = η·β·σ_u²/(4α),

σ_u² the variance of the mini-batch gradient noise projected on u. For batches of B of
the N samples drawn without replacement (this package's convention, docs/theory.md §1)
σ_u²(B) = c(B, N)·v_u, c = 1/B − 1/N, v_u = (1/(N−1)) Σ_i (⟨g_i − ḡ, u⟩)² the per-sample
variance of the gradient's projection (g_i = ∇ℓ_i); at B = N the gap vanishes (full-batch
GD). Reading σ_u² as the batch-gradient variance is ours (the abstract says "the
gradient noise variance projected onto the top eigenvector"); the formula needs α > 0
(the regime the theory describes) and gives no prediction otherwise (nan).

Where α is evaluated. The theory's α and β belong to the slowly moving reference point
θ† of the projected dynamics; a training iterate at the edge is θ ≈ θ† + x·u with an
oscillation x along u, and ∇L(θ) ≈ ∇L(θ†) + x·S·u, so −∇L(θ)·∇S is dominated by the
oscillation (on the digits MLP at the edge it was negative at most checkpoints).
`sharpening` therefore uses the gradient with its component along u removed,
∇L⊥ = ∇L − (∇L·u)u, as the estimate of ∇L(θ†) (`sharpening_raw` keeps −∇L·∇S); β and
∇S are taken at the iterate (their change over one oscillation is second order).

Normalisation layers. torch's own LayerNorm kernel (and InstanceNorm's, which runs
through the batch-norm kernel) has a wrong third derivative (torch 2.13, CPU, float64:
triple backward and forward-over-reverse alike): on a small MLP with an nn.LayerNorm
β came out 4-6 % low and α 6-7 % high against central finite differences of uᵀHu
(ΔS about 10 % low); the first and second derivatives are right. The third-order pass
therefore computes `F.layer_norm`, `torch.layer_norm`, `F.instance_norm` (with input
statistics) and `F.batch_norm` on batch statistics (training=True, as under
policy='train_batch_stats': its third derivative is off too, β 1.1 % on a small CNN)
through a decomposed implementation — mean, centred variance, division by
√(var + ε), then the affine weight and bias, the same function in plain tensor
operations — intercepted with a `torch.overrides.TorchFunctionMode` while that pass
runs, so the model is never modified and a custom module that calls `F.layer_norm`
is covered too. (The running-statistics update of instance and batch norm is skipped
there: the pass works on copies of the buffers.) GroupNorm, RMSNorm and BatchNorm in eval
mode were checked the same way and are right (relative error ≤ 1e-6) and are left as they
are.

Loss. `loss_fn` must be the plain mean of per-sample losses; `check_mean_reduced`
warns on a summed loss (every term then scales with the chunk size) and on a weighted
mean (class weights, ignore_index), for which L is taken as the size-weighted mean of
the chunk losses, so S, α and β depend on `chunk_size` and v_u ignores the weights.

Cost: one pass over the data with a third-order product (forward, backward,
forward-over-backward and its backward: a few gradient costs; ∇L is that pass's primal,
not a pass of its own) and one forward-mode pass
for the projections ⟨g_i, u⟩ (vmapped, per sample), in chunks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import grad, jvp
from torch.overrides import TorchFunctionMode

from nets.curvature.loss_check import mean_reduction_check
from nets.curvature.operators import check_policy, policy_mode, resolve_device_dtype
from nets.curvature.params import ParamLayout, functional_loss, make_functional
from nets.utils.autocast import outside_autocast
from nets.utils.data_source import as_data_source
from nets.utils.results import Result, result
from nets.utils.vmapping import vmap_or_loop
from rmt.lr import noise_factor
from rmt.validation import as_array, as_float, as_int

__all__ = ["SharpnessGapTerms", "sharpness_gap_terms", "stochastic_sharpness_gap"]


@result
class SharpnessGapTerms(Result):
    """The self-stabilisation rates at one point (module docstring): sharpening α =
    −∇L⊥·∇S with ∇L⊥ = ∇L − (∇L·u)u (the reference point's gradient, below),
    stabilisation β = ‖∇S‖², v_u the per-sample variance of ⟨g_i, u⟩ (unbiased,
    1/(N−1)), S = uᵀHu (the sharpness along u), grad_norm ‖∇L‖, N; sharpening_raw =
    −∇L·∇S at the iterate itself."""

    sharpening: float
    stabilisation: float
    v_u: float
    S: float
    grad_norm: float
    N: int
    sharpening_raw: float = float("nan")


def _normalised(x, dims, eps):
    """(x − mean)/√(var + ε) over `dims` (biased variance), in plain tensor operations."""
    centred = x - x.mean(dims, keepdim=True)
    return centred / torch.sqrt((centred * centred).mean(dims, keepdim=True) + eps)


def _affine(out, weight, bias, shape):
    """out·weight + bias, each reshaped to `shape` (None: left out)."""
    if weight is not None:
        out = out * weight.reshape(shape)
    return out if bias is None else out + bias.reshape(shape)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *_, **__):
    """F.layer_norm in plain tensor operations (biased variance over the last dims)."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    out = _normalised(input, tuple(range(-len(normalized_shape), 0)), eps)
    return _affine(out, weight, bias, tuple(normalized_shape))


def _channel_norm(input, weight, bias, eps, dims):
    """Normalisation over `dims` with a per-channel (dim 1) affine map: instance norm
    (dims = the spatial ones) and batch norm on batch statistics (dims = 0 and those)."""
    out = _normalised(input, dims, eps)
    return _affine(out, weight, bias, (1, -1) + (1,) * (input.ndim - 2))


_INSTANCE_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats",
                  "momentum", "eps")
_BATCH_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training",
               "momentum", "eps")


class _DecomposedNorms(TorchFunctionMode):
    """Layer norm, instance norm on input statistics and batch norm on batch statistics
    through plain tensor operations (module docstring: torch's kernels have a wrong third
    derivative; running statistics are not updated); every other call as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm or func is torch.layer_norm:
            return _layer_norm(*args, **kwargs)
        if func is F.instance_norm:
            bound = {"use_input_stats": True, "eps": 1e-5,
                     **dict(zip(_INSTANCE_ARGS, args)), **kwargs}
            if bound["use_input_stats"]:
                x = bound["input"]
                return _channel_norm(x, bound.get("weight"), bound.get("bias"), bound["eps"],
                                     tuple(range(2, x.ndim)))
        if func is F.batch_norm:
            bound = {"training": False, "eps": 1e-5, **dict(zip(_BATCH_ARGS, args)), **kwargs}
            if bound["training"]:
                x = bound["input"]
                return _channel_norm(x, bound.get("weight"), bound.get("bias"), bound["eps"],
                                     (0, *range(2, x.ndim)))
        return func(*args, **kwargs)


@outside_autocast
def sharpness_gap_terms(model, loss_fn, data, u, *, params=None, policy=None, chunk_size=256,
                        device=None, dtype=torch.float64) -> SharpnessGapTerms:
    """α, β and v_u at the model's current weights for the unit direction u (P,), e.g. the
    top eigenvector of the full-data Hessian. data : any form of `nets.utils.data_source`
    (the mean loss over it is L); loss_fn(outputs, targets) must return the batch mean
    (a summed or weighted-mean loss warns, `nets.curvature.loss_check.check_mean_reduced`;
    module docstring). chunk_size : samples per chunk (the full-data quantities are sums
    over chunks). LayerNorm, InstanceNorm and BatchNorm on batch statistics are
    differentiated through a decomposed implementation in the third-order pass (module
    docstring: torch's own third derivative of them is wrong)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable")
    check_policy(model, policy)
    src = as_data_source(data)
    N = src.N
    if N < 2:
        raise ValueError("data must hold at least 2 samples")
    chunk = as_int("chunk_size", chunk_size, minimum=1)
    mean_reduction_check(model, loss_fn, src)
    layout = ParamLayout.from_module(model, params)
    dev, dt = resolve_device_dtype(model, layout.names, device, dtype)
    prim, frozen = make_functional(model, layout.names, device=dev, dtype=dt)
    if not torch.is_tensor(u):          # None reached torch ("Could not infer dtype")
        u = as_array("u", u)
    u = torch.as_tensor(u).to(device=dev, dtype=dt).reshape(-1)
    if u.numel() != layout.P:
        raise ValueError(f"u must have {layout.P} entries (the selected parameters), got {u.numel()}")
    norm = float(torch.linalg.vector_norm(u))
    if not norm > 0 or not math.isfinite(norm):
        raise ValueError("u must be a finite, non-zero vector")
    u = u / norm
    ut = layout.unflatten(u)
    names = layout.names

    def chunk_loss(p, X, Y):
        return functional_loss(model, loss_fn, names, frozen, p, X, Y)

    def s_along_u(p, X, Y):          # (uᵀ ∇²L_chunk(p) u, ∇L_chunk(p)): the jvp's primal
        g, hu = jvp(lambda q: grad(chunk_loss)(q, X, Y), (p,), (ut,))   # is the gradient
        return sum((h * v).sum() for h, v in zip(hu, ut)), g

    def one(p, x, y):
        return chunk_loss(p, x[None], y[None])

    proj = vmap_or_loop(lambda x, y: jvp(lambda q: one(q, x, y), (prim,), (ut,))[1])

    gL = torch.zeros(layout.P, dtype=dt, device=dev)
    gS = torch.zeros(layout.P, dtype=dt, device=dev)
    S = 0.0
    dots = []
    with policy_mode(model, policy):
        for X, Y in src.batches(chunk, device=dev, dtype=dt):
            w = X.shape[0] / N
            try:
                with _DecomposedNorms():
                    gs, (s, g) = torch.func.grad_and_value(s_along_u, has_aux=True)(prim, X, Y)
            except NotImplementedError as exc:
                raise ValueError(
                    "the third-order pass (forward mode over reverse mode) needs every layer "
                    "to have a forward-mode derivative, and one does not: "
                    f"{str(exc).splitlines()[0]} (e.g. weight_norm's fused kernel, torch's "
                    "CPU LSTM); write that layer out in plain tensor operations") from None
            gL += w * layout.flatten(g).detach()
            gS += w * layout.flatten(gs).detach()
            S += w * float(s)
            dots.append(proj(X, Y).detach().reshape(-1))
    d = torch.cat(dots).to(torch.float64).cpu().numpy()
    g_perp = gL - (gL @ u) * u
    return SharpnessGapTerms(sharpening=float(-(g_perp @ gS)), stabilisation=float(gS @ gS),
                             v_u=float(np.var(d, ddof=1)), S=float(S),
                             grad_norm=float(torch.linalg.vector_norm(gL)), N=int(N),
                             sharpening_raw=float(-(gL @ gS)))


def stochastic_sharpness_gap(lr, batch_size, terms: SharpnessGapTerms) -> float:
    """ΔS = η·β·c(B, N)·v_u/(4α) (module docstring); nan when α ≤ 0 (no progressive
    sharpening: outside the theory). The predicted full-data plateau is 2/η − ΔS."""
    if not isinstance(terms, SharpnessGapTerms):
        raise TypeError("terms must be a SharpnessGapTerms (from sharpness_gap_terms)")
    eta = as_float("lr", lr, positive=True)
    c = float(noise_factor(as_int("batch_size", batch_size, minimum=1), terms.N, name="batch_size"))
    if not terms.sharpening > 0:
        return float("nan")
    return eta * terms.stabilisation * c * terms.v_u / (4.0 * terms.sharpening)
