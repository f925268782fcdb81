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

import torch
from torch.func import jvp, vjp, vmap

from nets.curvature.params import call_model, unflatten_to_dict
from nets.utils.autocast import outside_autocast
from nets.utils.modes import model_copy
from rmt.validation import as_float, as_int

__all__ = ["StoredOutputs", "TangentOutputs", "CurvedOutputs", "as_linear_outputs",
           "second_derivative_along"]


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
        self.net = model_copy(model).eval()
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
        return call_model(self.net, p, xb).reshape(len(xb), -1)

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


class CurvedOutputs:
    """A linear model (`StoredOutputs` or `TangentOutputs`, coordinates D) plus the
    outputs' second derivative along one unit direction u of those coordinates:

        z_i(e) = z_i + J_i e + ½ (uᵀe)² q_i,     q_i = d²/dt² z_i(w₀ + t·u)|_{t=0},

    the second-order Taylor term of the network along u (docs/theory.md §5.6). Its output
    Jacobian at e is J_i + (uᵀe)·q_i uᵀ, so along u the Jacobian changes with the
    displacement as the network's does to first order (J(w₀ + x·u)·u = J_i u + x·q_i),
    which is what a growing oscillation along the top eigenvector steepens; every other
    direction stays linear. The pullback therefore depends on E. u (D,) in the base's
    coordinates (for a basis V, Vᵀ of the parameter direction), q (N, K)."""

    def __init__(self, base, u, q):
        self.base = as_linear_outputs(base)
        self.N, self.K, self.D = self.base.N, self.base.K, self.base.D
        self.dtype, self.device = self.base.dtype, self.base.device
        self.z = self.base.z
        self.u = torch.as_tensor(u).to(self.dtype).to(self.device).reshape(-1)
        self.q = torch.as_tensor(q).to(self.dtype).to(self.device)
        if self.u.numel() != self.D or self.q.shape != (self.N, self.K):
            raise ValueError(f"u must have {self.D} entries and q shape ({self.N}, {self.K}), "
                             f"got {self.u.numel()} and {tuple(self.q.shape)}")

    def _bend(self, q, E):
        a = self.u @ E                                                  # (G,)
        return 0.5 * q[:, :, None] * (a * a)[None, None, :]

    def batch(self, idx, E):
        return self.base.batch(idx, E) + self._bend(self.q[idx], E)

    def pullback(self, idx, C, E=None):
        g = self.base.pullback(idx, C, E)
        if E is None:
            return g
        a = self.u @ E
        return g + self.u[:, None] * (a * torch.einsum("bk,bkg->g", self.q[idx], C))[None, :]

    def full(self, E):
        return self.base.full(E) + self._bend(self.q, E)


@outside_autocast
def second_derivative_along(model, X, direction, *, chunk_size=256, step=1e-4,
                            check_samples=16):
    """q (N, K): d²/dt² z_i(w₀ + t·u) at t = 0 for every sample — the second directional
    derivative of `model`'s outputs (eval mode, a copy; its trainable parameters in
    `named_parameters()` order) along the flat parameter direction u, by forward-over-
    forward Jacobian-vector products, chunk_size samples at a time.

    The forward-over-forward derivative is checked on the first `check_samples` samples
    against the central difference (J(w₀ + h·u)·u − J(w₀ − h·u)·u)/(2h) of the first
    derivative, in float64 with h = `step` (error O(h²)); where they disagree (median
    relative difference above 1e-4: torch 2.13's second forward derivative of
    `layer_norm` and `instance_norm` is wrong), and where torch has no forward derivative
    of a layer's derivative at all (e.g. SiLU's), every sample's q is the central
    difference instead. The median keeps a sample whose unit switches within ±h (a ReLU
    kink, where the difference is not a derivative) from deciding."""
    net = model_copy(model).eval()
    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}
    u = torch.as_tensor(direction).reshape(-1)
    P = sum(v.numel() for v in params.values())
    if u.numel() != P:
        raise ValueError(f"direction must have P={P} entries, got {u.numel()}")
    chunk = as_int("chunk_size", chunk_size, minimum=1)
    step = as_float("step", step, positive=True)
    n_check = as_int("check_samples", check_samples, minimum=1)
    dtype = next(iter(params.values())).dtype
    wide = model_copy(net).double()
    wide_params = {k: v.detach() for k, v in wide.named_parameters() if v.requires_grad}
    X64 = X.double() if X.is_floating_point() else X

    def difference(rows):
        return _second_derivative(wide, wide_params, rows, _as_tangent(wide, wide_params, u),
                                  chunk, step).to(dtype)

    try:
        q = _second_derivative(net, params, X, _as_tangent(net, params, u), chunk, None)
    except (NotImplementedError, RuntimeError) as err:
        if "forward AD" not in str(err) and "forward-mode" not in str(err):
            raise
        return difference(X64)
    ref = difference(X64[:n_check]).to(torch.float64)
    err = (q[:n_check].to(torch.float64) - ref).abs().amax(1)
    scale = ref.abs().amax(1).clamp_min(max(1e-12, 1e-6 * float(ref.abs().max())))
    if float((err / scale).median()) > 1e-4:
        return difference(X64)
    return q


def _as_tangent(net, params, u):
    """The flat direction u as a tangent shaped (and typed) like `params` of `net`."""
    return {k: t.to(params[k]) for k, t in unflatten_to_dict(net, u.contiguous()).items()}


def _second_derivative(net, params, X, tangent, chunk, step):
    """Forward over forward (step None) or the central difference of J·u with step h."""
    out = []
    with torch.no_grad():
        for s in range(0, len(X), chunk):
            xb = X[s:s + chunk]

            def f(p, xb=xb):
                return call_model(net, p, xb).reshape(len(xb), -1)

            def df(p, f=f):
                return jvp(f, (p,), (tangent,))[1]

            if step is None:
                out.append(jvp(df, (params,), (tangent,))[1])
            else:
                shift = {k: step * t for k, t in tangent.items()}
                plus = df({k: v + shift[k] for k, v in params.items()})
                minus = df({k: v - shift[k] for k, v in params.items()})
                out.append((plus - minus) / (2 * step))
    return torch.cat(out)


def as_linear_outputs(J, z=None):
    """`J` itself if it already is one of the three classes (then z must be None), else
    `StoredOutputs(J, z)`."""
    if isinstance(J, StoredOutputs | TangentOutputs | CurvedOutputs):
        if z is not None:
            raise ValueError("z must be None when J is a StoredOutputs/TangentOutputs")
        return J
    return StoredOutputs(J, z)
