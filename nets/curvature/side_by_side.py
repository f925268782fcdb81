"""Hessians of k disjoint batches applied side by side, in one backward pass.

Why. The learner (`nets.learning_rates.learner`, step 4) measures the top eigenvalue
of the Hessian of each of k chunks of the curvature batch, H_j = ∇² L_j(θ) with
L_j(θ) = loss_fn(model(x_j), y_j), every few hundred steps. On small networks each
product is dominated by fixed per-call costs (autograd dispatch, parameter
reshaping), so running the k Lanczos recurrences one chunk after the other cost about
k times one chunk's run.

How. Stack the parameters k times, Θ = (θ_1, …, θ_k) with every θ_j = θ, and define

    L̃(Θ) = Σ_j L_j(θ_j)         (`torch.func.vmap` over chunks of `functional_call`).

L̃ couples no two copies, so its Hessian is block diagonal, ∇²L̃ = diag(H_1, …, H_k),
and one Hessian-vector product of L̃ with (v_1, …, v_k) is (H_1 v_1, …, H_k v_k). The
gradient graph of L̃ is built once at construction; every product is one pullback
through it (`torch.autograd.grad` with `retain_graph`), exactly as for a cached-graph
`ModelCurvatureOperator`. Column j of the (P, k) argument of `matmat` is multiplied by
H_j, so `nets.algorithms.lanczos_batch(op, m, num_vectors=k, v0=V0)` runs the
k recurrences (one per chunk) as one.

Measured on the digits MLP 64-32-10 (k = 2 chunks of 32 samples, 20 updates of
5 products each, 1 thread): 0.12 s side by side against 1.5 s for one operator per
chunk. Memory: k copies of the parameters and the graph of the k·B samples.

Hessian only (a GGN product needs a forward-mode pass per chunk); layers in train mode
follow `policy` as in `nets.curvature.operators`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import vmap

from nets.curvature.operators import (
    CurvatureOperator,
    _scalar_loss,
    check_policy,
    policy_mode,
    resolve_device_dtype,
)
from nets.curvature.params import ParamLayout, call_model, check_model, make_functional

__all__ = ["SideBySideHessians", "ColumnCountError"]


class ColumnCountError(ValueError):
    """A product asked for a number of columns other than the number of chunks (e.g.
    `lanczos_batch` dropped a recurrence that reached an invariant subspace)."""


class SideBySideHessians(CurvatureOperator):
    """k chunk Hessians H_1 … H_k applied to the k columns of a (P, k) argument.

    model, loss_fn : the network and its mean-reduced loss; X, Y : the chunks, shapes
    (k, B, …) and (k, B, …) (equal chunk sizes); policy, dtype, device : as for
    `nets.curvature.operators.hessian_operator`.

    `matmat(V)` needs exactly k columns (column j ↦ H_j v_j) and `matvec` needs k = 1:
    this is k operators side by side, not one P×P operator."""

    def __init__(self, model: nn.Module, loss_fn, X: torch.Tensor, Y: torch.Tensor, *,
                 policy=None, dtype=None, device=None):
        check_model(model)          # its values: resolve_device_dtype reads devices and dtypes
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(outputs, targets) -> scalar mean loss")
        if not (isinstance(X, torch.Tensor) and isinstance(Y, torch.Tensor)):
            raise TypeError("X and Y must be tensors of shape (k, B, ...)")
        if X.ndim < 2 or Y.ndim < 2 or X.shape[:2] != Y.shape[:2]:
            raise ValueError(f"X and Y must have shapes (k, B, ...) with the same k and B, got "
                             f"{tuple(X.shape)} and {tuple(Y.shape)}")
        check_policy(model, policy)
        layout = ParamLayout.from_module(model)
        device, dtype = resolve_device_dtype(model, layout.names, device, dtype)
        super().__init__(layout.P, dtype, device, layout.names)
        self.k = int(X.shape[0])
        self.layout = layout
        primals, frozen = make_functional(model, layout.names, device=device, dtype=dtype)
        X = X.to(device=self.device, dtype=dtype) if X.is_floating_point() else X.to(self.device)
        Y = Y.to(device=self.device, dtype=dtype) if Y.is_floating_point() else Y.to(self.device)
        names = layout.names

        def chunk_loss(prim, x, y):
            state = dict(frozen)
            state.update(zip(names, prim))
            out = call_model(model, state, x)
            if isinstance(out, torch.Tensor) and out.ndim > 0 and out.shape[0] != x.shape[0]:
                raise ValueError(f"the model maps a chunk of {x.shape[0]} samples to an output of "
                                 f"shape {tuple(out.shape)}: its first dimension must be the "
                                 "batch dimension")
            return _scalar_loss(loss_fn(out, y))

        self._stacked = tuple(p.unsqueeze(0).expand(self.k, *p.shape).clone().requires_grad_()
                              for p in primals)
        with torch.enable_grad(), policy_mode(model, policy):
            total = vmap(chunk_loss)(self._stacked, X, Y).sum()
            grads = torch.autograd.grad(total, self._stacked, create_graph=True,
                                        allow_unused=True)
        # a parameter the loss does not use has no gradient graph: its products are 0
        self._used = [g is not None and g.requires_grad for g in grads]
        self._grads = tuple(g for g, u in zip(grads, self._used) if u)
        self._inputs = tuple(s for s, u in zip(self._stacked, self._used) if u)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if V.shape[1] != self.k:
            raise ColumnCountError(f"V must have one column per chunk (k={self.k}), got {V.shape[1]}")
        rows = V.T                                                   # (k, P)
        parts = torch.split(rows, self.layout.numels, dim=1)
        vt = [c.reshape(self.k, *s) for c, s in zip(parts, self.layout.shapes)]
        with torch.enable_grad():
            hv = torch.autograd.grad(self._grads, self._inputs,
                                     [v for v, u in zip(vt, self._used) if u],
                                     retain_graph=True, allow_unused=True)
        it = iter(hv)
        out = []
        for v, u in zip(vt, self._used):
            h = next(it) if u else None
            out.append(torch.zeros_like(v) if h is None else h)
        return torch.cat([o.reshape(self.k, -1) for o in out], dim=1).T
