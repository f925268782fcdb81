"""The linearised network's outputs, from stored Jacobians or matrix-free (docs/theory.md §5.6).

Around weights w₀ every sample's outputs are replaced by their first-order model

    z_i(w₀ + e) = z_i + J_i e,     J_i = ∂z_i/∂w at w₀   (K outputs × P parameters),

and a linearised training run needs three products with the Jacobians, each for a block
of G displacements side by side (one column per learning rate of a grid):

    batch(idx, E)       = z_idx + J_idx·E        (|idx|, K, G)   the batch outputs,
    pullback(idx, C, E) = Σ_{i∈idx} J_iᵀ C_i     (D, G)          the batch gradient,
    full(E)             = z + J·E                (N, K, G)       the full-data outputs,

with E (D, G) the displacements and C (|idx|, K, G) the loss's output gradients at them.
The pullback is the transpose of the outputs' derivative at E, which for a linear model
does not depend on E (the argument is there for models whose derivative does). Two
implementations give the same numbers:

* `StoredOutputs(J, z)` keeps J (N, K, D) in memory (`linearized.output_jacobians`;
  D = P, or r in a basis V, J·V) and multiplies with it: N·K·D numbers, one
  multiply-add each per column.
* `TangentOutputs(model, X)` keeps only w₀ and computes J·E by forward-mode
  Jacobian-vector products and Jᵀ·C by reverse-mode vector-Jacobian products through
  the network at w₀ (`torch.func.jvp`, `torch.func.vjp`, vmapped over the G columns):
  memory ∝ G·P plus one chunk's activations, and per column about the cost of a forward
  and a backward pass of the network, which is less than N·K·P multiply-adds whenever a
  sample's forward pass costs less than K·P (a dense network: about P; 3.3× faster on
  the digits MLP) but not for a convolutional network, whose forward pass costs many
  times its shared weights (~30× slower on a small BatchNorm CNN, where vmapped weight
  tangents of a convolution are also slow on CPU). `linearized.linear_model_outputs`
  chooses between the two.

The model is copied and put in eval mode (BatchNorm on its running statistics, Dropout
off), as the real trials of `lr_search` run.
"""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, jvp, vjp, vmap

from rmt.validation import as_int

__all__ = ["StoredOutputs", "TangentOutputs", "as_linear_outputs"]


class StoredOutputs:
    """The three products from stored Jacobians J (N, K, D) and outputs z (N, K)."""

    def __init__(self, J, z):
        if J.ndim != 3 or z.shape != J.shape[:2]:
            raise ValueError(f"J must be (N, K, D) and z (N, K), got {tuple(J.shape)} and "
                             f"{tuple(z.shape)}")
        self.J, self.z = J, z
        self.N, self.K, self.D = J.shape
        self.dtype, self.device = J.dtype, J.device

    def batch(self, idx, E):
        return self.z[idx][:, :, None] + torch.einsum("bkp,pg->bkg", self.J[idx], E)

    def pullback(self, idx, C, E=None):
        return torch.einsum("bkp,bkg->pg", self.J[idx], C)

    def full(self, E):
        return self.z[:, :, None] + torch.einsum("nkp,pg->nkg", self.J, E)


class TangentOutputs:
    """The three products without storing J (module docstring): model at w₀ (its
    trainable parameters, `named_parameters()` order, define the P coordinates), X (N, ...)
    the inputs; chunk_size samples per vmapped call of `full`."""

    def __init__(self, model, X, *, chunk_size=256):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.chunk = as_int("chunk_size", chunk_size, minimum=1)
        self.net = copy.deepcopy(model).eval()
        self.params = {k: v.detach() for k, v in self.net.named_parameters() if v.requires_grad}
        self.shapes = [(k, v.shape, v.numel()) for k, v in self.params.items()]
        self.X = X
        self.D = sum(n for _, _, n in self.shapes)
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        with torch.no_grad():
            self.z = torch.cat([self._outs(self.params, X[s:s + self.chunk])
                                for s in range(0, len(X), self.chunk)])
        self.N, self.K = self.z.shape

    def _outs(self, p, xb):
        return functional_call(self.net, p, (xb,)).reshape(len(xb), -1)

    def _tangents(self, E):
        """E (P, G) → {name: (G, *shape)}: the columns as parameter-shaped tangents."""
        out, i = {}, 0
        for k, shape, n in self.shapes:
            out[k] = E[i:i + n].T.reshape(E.shape[1], *shape).to(self.dtype)
            i += n
        return out

    def _jvp(self, xb, E):
        def one(t):
            return jvp(lambda p: self._outs(p, xb), (self.params,), (t,))[1]

        with torch.no_grad():
            return vmap(one)(self._tangents(E)).permute(1, 2, 0)        # (n, K, G)

    def batch(self, idx, E):
        return self.z[idx][:, :, None] + self._jvp(self.X[idx], E)

    def pullback(self, idx, C, E=None):
        _, back = vjp(lambda p: self._outs(p, self.X[idx]), self.params)
        with torch.no_grad():
            g = vmap(back)(C.permute(2, 0, 1).to(self.dtype))[0]        # {name: (G, *shape)}
            return torch.cat([g[k].reshape(C.shape[2], -1) for k, _, _ in self.shapes], 1).T

    def full(self, E):
        return self.z[:, :, None] + torch.cat([self._jvp(self.X[s:s + self.chunk], E)
                                               for s in range(0, self.N, self.chunk)])


def as_linear_outputs(J, z=None):
    """`J` itself if it already is one of the two classes (then z must be None), else
    `StoredOutputs(J, z)`."""
    if isinstance(J, StoredOutputs | TangentOutputs):
        if z is not None:
            raise ValueError("z must be None when J is a StoredOutputs/TangentOutputs")
        return J
    return StoredOutputs(J, z)
