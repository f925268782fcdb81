"""Per-sample output Jacobians used without forming them.

For sample i with C network outputs f_i (flattened) the Jacobian J_i = ∂f_i/∂θ is a
C×P matrix. Per-sample Gauss–Newton quantities need only

    K_i = J_i J_iᵀ (C×C),   J_i V (C×k),   Σ_i J_iᵀ c_i (P-vector),   J_iᵀ c_i (per sample),

and forming the (g, C, P) Jacobian block of a chunk of g samples to get K_i (what
`torch.func.jacrev` under `vmap` does) writes C·P numbers per sample: on a trained
301,066-parameter MLP (C = 10) that was 0.65 full-data HVPs per sample.

`SampleJacobians.grams` gets K_i from one batched forward and C backward passes, as the
sum over parameter-owning layers of their share of J_iJ_iᵀ (the layer's weight
gradients are never formed per sample when that is cheaper, "ghost" inner products):
for a linear map z_t = W a_t + b applied at T positions t of a sample (T = 1 for an
`nn.Linear` on vectors; the sequence for a transformer; the output pixels of a
convolution, a_t then the unfolded input patch), with δ_{c,t} = ∂f_{i,c}/∂z_t,

    ∂f_c/∂W = Σ_t δ_{c,t} a_tᵀ,   ⟨∂f_c/∂W, ∂f_d/∂W⟩ = Σ_{t,s} (δ_{c,t}·δ_{d,s})(a_t·a_s),
    ⟨∂f_c/∂b, ∂f_d/∂b⟩ = (Σ_t δ_{c,t})·(Σ_s δ_{d,s}).

The double sum costs ~T²(d_in + C²·d_out) per sample, forming the C weight gradients
Σ_t δ_{c,t}a_tᵀ ~C·T·d_out·d_in; each layer takes the cheaper (convolutions usually
form them, dense layers on vectors never do). Supported layers: `nn.Linear`, and
`nn.Conv1d`/`nn.Conv2d` with groups = 1, zero padding given as numbers (or "valid", or
a symmetric "same"), each called once per forward. Every other selected parameter
(normalisation affines, embeddings, a layer used twice, custom parameters) gets its
per-sample Jacobian formed by `vmap(jacrev)` restricted to those parameters, and its
K_i share added. Layers that mix samples (BatchNorm using batch statistics) would make
the batched backward wrong: then every parameter takes the formed path, one sample at a
time, which is exact but costs as before.

Conventions: outputs are `op`'s forward on a chunk of samples, flattened to C numbers
per sample (the model's output must be one tensor); products in the operator's dtype,
K_i returned in float64; the policy (train/eval modes) is the operator's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import jacrev, vjp

from nets.curvature.operators import ModelCurvatureOperator, policy_mode
from nets.utils.vmapping import vmap_or_loop

__all__ = ["SampleJacobians"]


class SampleJacobians:
    """K_i = J_iJ_iᵀ, J_iV and Jacobian-transpose products of the per-sample outputs of a
    `ModelCurvatureOperator` (module docstring), chunk by chunk of samples.

    op : the operator (its model, parameter selection, dtype, device and policy).
    C is read from one forward on the first sample; `max_outputs` refuses models with
    more outputs per sample (C×C matrices per sample would not be small).
    Attributes: C, shape (per-sample output shape), ghost (names of the modules whose
    share of K_i is computed without forming weight gradients), formed (parameter
    names whose per-sample Jacobians are formed), batched (False when a layer mixes
    samples and everything runs one sample at a time)."""

    def __init__(self, op: ModelCurvatureOperator, *, max_outputs: int = 1024):
        if not isinstance(op, ModelCurvatureOperator):
            raise TypeError(f"op must be a ModelCurvatureOperator, got {type(op).__name__}")
        if op.policy == "train_batch_stats":
            # a sample's Jacobian under batch statistics depends on its batch: the per-sample
            # Grams (one sample alone) and the products (the chunk's statistics) disagreed
            # by 33 % on a BatchNorm CNN (an outside sweep)
            raise ValueError("per-sample Jacobians are undefined with policy="
                             "'train_batch_stats' (batch statistics couple the samples); use "
                             "policy='eval'")
        self.op = op
        x0, _ = op.source.take([0, min(1, op.N - 1)], device=op.device, dtype=op.dtype)
        calls: dict[str, int] = {}
        sizes: dict[str, int] = {}             # module: output numbers per sample
        seen: dict[str, tuple] = {}            # module: (input, its version, output, version)

        def count(m, i, o, n):
            calls[n] = calls.get(n, 0) + 1
            if isinstance(o, torch.Tensor):
                sizes[n] = o.numel() // x0.shape[0]
            a = i[0] if i and isinstance(i[0], torch.Tensor) else None
            seen[n] = (a, None if a is None else a._version, o,
                       o._version if isinstance(o, torch.Tensor) else None)

        hooks = [m.register_forward_hook(lambda m, i, o, n=n: count(m, i, o, n))
                 for n, m in op.model.named_modules()]
        try:
            # outside a caller's inference mode: its tensors keep no version counter
            with torch.inference_mode(False), torch.no_grad(), policy_mode(op.model, op.policy):
                xv = x0.clone() if x0.is_inference() else x0
                prim = tuple(p.clone() if p.is_inference() else p for p in op.primals)
                out = op._forward(prim, xv)
                self.batched = not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                       and m.training for m in op.model.modules())
        finally:
            for h in hooks:
                h.remove()
        # a layer's share reads its input and output as the forward left them: one written
        # in place afterwards (h.mul_(mask), Hardtanh(inplace=True)) or not a (samples, …)
        # tensor — a keyword-only call, a sequence-first or flattened (N·T, d) input — cannot
        # take the per-layer path (a clip after a Linear gave K_i 3.4× too large on the
        # samples it clipped, which the two-sample check did not see; an outside sweep)
        n0 = x0.shape[0]
        plain = {n for n, (a, va, o, vo) in seen.items()
                 if a is not None and isinstance(o, torch.Tensor) and a._version == va
                 and o._version == vo and a.ndim >= 1 and o.ndim >= 1
                 and a.shape[0] == n0 and o.shape[0] == n0}
        seen.clear()
        if not isinstance(out, torch.Tensor):
            raise TypeError("per-sample Jacobians need a model whose output is one tensor per "
                            f"sample, got {type(out).__name__}")
        self.shape = tuple(out.shape[1:])
        self.C = int(out[0].numel())
        if self.C > max_outputs:
            raise ValueError(f"the model has {self.C} outputs per sample (more than "
                             f"max_outputs = {max_outputs}): C×C matrices per sample are not small")
        names = list(op.layout.names)
        index = {n: j for j, n in enumerate(names)}
        self._ghost = []                  # (module name, module, weight pos, bias pos or None)
        if self.batched:
            for mname, mod in op.model.named_modules():
                pre = f"{mname}." if mname else ""
                wname = pre + "weight"
                if (calls.get(mname, 0) != 1 or wname not in index or not _supported(mod)
                        or mname not in plain):
                    continue
                bname = pre + "bias"
                bpos = index.get(bname) if getattr(mod, "bias", None) is not None else None
                self._ghost.append((mname, mod, index[wname], bpos))
        self._names = names
        self._sizes = sizes
        modules = dict(op.model.named_modules())
        self._activations = sum(o for n, o in sizes.items()                # leaf modules
                                if next(modules[n].children(), None) is None)
        self._set_formed()
        if self._ghost:
            self._verify(x0)

    def _set_formed(self) -> None:
        taken = {p for _, _, w, b in self._ghost for p in (w, b) if p is not None}
        self.ghost = tuple(g[0] for g in self._ghost)
        self._formed = [j for j in range(len(self._names)) if j not in taken]
        self.formed = tuple(self._names[j] for j in self._formed)

    def _verify(self, x0) -> None:
        """Check each layer's share of K_i on two samples against ‖(J_iᵀr)_layer‖² for a
        random r (one per-sample backward pass): a weight also used outside its module
        (tied to another layer, read functionally) would make the share incomplete.
        Layers that disagree take the formed path."""
        op = self.op
        g = torch.Generator().manual_seed(0)
        r = torch.randn(x0.shape[0], self.C, generator=g, dtype=torch.float64).to(op.device)
        with policy_mode(op.model, op.policy):
            shares = self._ghost_shares(x0)[1]
        JTr = self.vjp_each(x0, r).to(torch.float64)                        # (2, P)
        offsets = op.layout.offsets
        numels = op.layout.numels
        # float32: 1e-5 (at 1e-3 a weight also read outside its layer with a factor 1e-4
        # passed with K_i off by 3e-5, where float32 rounding is ~5e-8)
        tol = {torch.float64: 1e-8, torch.float32: 1e-5}.get(op.dtype, 1e-3)
        keep = []
        for (entry, Kl) in zip(self._ghost, shares):
            cols = [j for j in entry[2:] if j is not None]
            want = sum((JTr[:, offsets[j]:offsets[j] + numels[j]] ** 2).sum(1) for j in cols)
            got = torch.einsum("gc,gcd,gd->g", r, Kl, r)
            if bool(((got - want).abs() <= tol * (want.abs() + got.abs() + 1e-30)).all()):
                keep.append(entry)
        if len(keep) != len(self._ghost):
            self._ghost = keep
            self._set_formed()

    @property
    def bytes_per_sample(self) -> int:
        """Estimated working memory of `grams` per sample: the graph's activations and C
        output-gradients of every layer, each ghost layer's largest intermediate
        (`_layer_gram`'s branch), and the formed Jacobians (twice, with their Gram)."""
        op = self.op
        item = torch.finfo(op.dtype).bits // 8
        C = self.C
        total = (C + 2) * self._activations * item
        numel = dict(zip(op.layout.names, op.layout.numels))
        total += 2 * C * sum(numel[n] for n in self.formed) * item
        for name, mod, _, _ in self._ghost:
            if isinstance(mod, nn.Linear):
                din, dout = mod.in_features, mod.out_features
            else:
                din = mod.in_channels * math.prod(mod.kernel_size)
                dout = mod.out_channels
            T = max(1, self._sizes.get(name, 0) // max(dout, 1))
            if T == 1:
                extra = C * dout + din
            elif _double_sum_cheaper(T, din, dout, C):
                extra = T * T * (C * C + 1) + T * din
            else:
                extra = C * dout * din + T * din
            total += (extra + C * T * dout) * item
        return int(total)

    # -- forward pieces ---------------------------------------------------------------
    def _f(self, prim, x):
        return self.op._forward(prim, x).reshape(x.shape[0], self.C)

    def outputs(self, X) -> torch.Tensor:
        """(g, C) outputs of the chunk X, no graph."""
        with torch.no_grad(), policy_mode(self.op.model, self.op.policy):
            return self._f(self.op.primals, X)

    # -- K_i --------------------------------------------------------------------------
    def grams(self, X) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs (g, C), K (g, C, C) float64) for the chunk X of samples."""
        op = self.op
        g = X.shape[0]
        K = torch.zeros(g, self.C, self.C, dtype=torch.float64, device=op.device)
        with policy_mode(op.model, op.policy):
            if self._ghost:
                out, shares = self._ghost_shares(X)
                K += sum(shares)
            else:
                out = self.outputs(X)
            if self._formed:
                K += self._formed_grams(X)
        return out, K

    def _ghost_shares(self, X) -> tuple[torch.Tensor, list]:
        """(outputs (g, C), each ghost layer's (g, C, C) float64 share of K_i)."""
        op = self.op
        seen: dict[str, tuple] = {}
        mods = {id(m): n for n, m, _, _ in self._ghost}
        hooks = [m.register_forward_hook(
            lambda m, i, o: seen.__setitem__(mods[id(m)], (i[0].detach(), o)))
            for _, m, _, _ in self._ghost]
        order = [n for n, _, _, _ in self._ghost]
        deltas = [[] for _ in order]                       # per layer: C tensors like z
        # autograd also inside a caller's no_grad or inference_mode (clones: tensors made
        # in inference mode cannot be saved for backward)
        with torch.inference_mode(False), torch.enable_grad():
            prim = tuple(p.detach().clone().requires_grad_(True) for p in op.primals)
            X = X.clone() if X.is_inference() else X
            try:
                out = self._f(prim, X)
            finally:
                for h in hooks:
                    h.remove()
            zs = [seen[n][1] for n in order]
            for c in range(self.C):
                gr = torch.autograd.grad(out[:, c].sum(), zs, retain_graph=c < self.C - 1,
                                         allow_unused=True)
                for j, d in enumerate(gr):
                    deltas[j].append(torch.zeros_like(zs[j]) if d is None else d)
        shares = []
        for j, (name, mod, _, bpos) in enumerate(self._ghost):
            A, D = _patches(mod, seen[name][0], torch.stack(deltas[j], 1))  # (g,T,din), (g,C,T,dout)
            shares.append(_layer_gram(A, D, bpos is not None).to(torch.float64))
        return out.detach(), shares

    def _formed_grams(self, X) -> torch.Tensor:
        op = self.op
        pos = self._formed
        prim = list(op.primals)

        def f_one(sub, x):
            full = list(prim)
            for j, t in zip(pos, sub):
                full[j] = t
            return self._f(tuple(full), x[None])[0]

        def jac_one(x):
            J = jacrev(f_one)(tuple(prim[j] for j in pos), x)
            return torch.cat([t.reshape(self.C, -1) for t in J], dim=1)

        J = vmap_or_loop(jac_one)(X)                          # (g, C, P_formed)
        return (J @ J.transpose(1, 2)).to(torch.float64)

    # -- products ---------------------------------------------------------------------
    def jvp(self, X, V) -> torch.Tensor:
        """(g, C, k) J_i V for the chunk X and flat columns V (P, k), one forward-mode
        pass per column (the operator's double-vjp fallback where forward-mode AD is
        missing)."""
        op = self.op
        f = lambda *p: self._f(p, X)
        with policy_mode(op.model, op.policy):
            return torch.stack([op._jv(f, op.layout.unflatten(V[:, j].to(op.dtype)))
                                for j in range(V.shape[1])], dim=2)

    def vjp_sum(self, X, cot) -> torch.Tensor:
        """(P, k) Σ_i J_iᵀ cot_i[:, j] over the chunk for cot (g, C, k): one batched
        backward pass per column."""
        op = self.op
        with policy_mode(op.model, op.policy):
            _, pull = vjp(lambda *p: self._f(p, X), *op.primals)
            return torch.stack([op.layout.flatten(pull(cot[:, :, j].to(op.dtype)))
                                for j in range(cot.shape[2])], dim=1)

    def vjp_each(self, X, cot) -> torch.Tensor:
        """(g, P) J_iᵀ c_i for each sample of the chunk, cot (g, C): one per-sample
        backward pass each (vmapped over the samples)."""
        op = self.op

        def one(x, c):
            _, pull = vjp(lambda *p: self._f(p, x[None])[0], *op.primals)
            return op.layout.flatten(pull(c))

        with policy_mode(op.model, op.policy):
            return vmap_or_loop(one)(X, cot.to(op.dtype))


def _supported(mod) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return mod.groups == 1 and mod.padding_mode == "zeros" and _conv_padding(mod) is not None
    return False


def _conv_padding(mod):
    """Symmetric zero padding per spatial dim as ints, or None (asymmetric "same")."""
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            return (0,) * len(mod.kernel_size)
        pads = []
        for k, d in zip(mod.kernel_size, mod.dilation):
            total = d * (k - 1)
            if total % 2:
                return None
            pads.append(total // 2)
        return tuple(pads)
    return tuple(mod.padding)


def _patches(mod, a, delta):
    """(A (g, T, d_in), D (g, C, T, d_out)) for layer `mod` with input a and output
    gradients delta (g, C, *z.shape[1:])."""
    g, C = delta.shape[:2]
    if isinstance(mod, nn.Linear):
        return a.reshape(g, -1, a.shape[-1]), delta.reshape(g, C, -1, delta.shape[-1])
    pad = _conv_padding(mod)
    if isinstance(mod, nn.Conv1d):
        a = a.unsqueeze(2)
        ks, dil, pad, st = (1, *mod.kernel_size), (1, *mod.dilation), (0, *pad), (1, *mod.stride)
    else:
        ks, dil, st = mod.kernel_size, mod.dilation, mod.stride
    A = F.unfold(a, ks, dilation=dil, padding=pad, stride=st).transpose(1, 2)   # (g, T, din·k)
    D = delta.reshape(g, C, delta.shape[2], -1).transpose(2, 3)                 # (g, C, T, dout)
    return A, D


def _double_sum_cheaper(T: int, din: int, dout: int, C: int) -> bool:
    """Whether the double sum over positions, ~T²(d_in + C²·d_out) per sample, costs no
    more than forming the C weight gradients, ~C·d_out·d_in·(T + C)."""
    return T * T * (din + C * C * dout) <= C * dout * din * (T + C)


def _layer_gram(A, D, bias: bool) -> torch.Tensor:
    """(g, C, C) Σ of ⟨∂f_c/∂θ, ∂f_d/∂θ⟩ over the layer's weight (and bias)."""
    g, C, T, dout = D.shape
    din = A.shape[2]
    if T == 1:
        Dm = D[:, :, 0]                                               # (g, C, dout)
        K = (Dm @ Dm.transpose(1, 2)) * (A[:, 0] * A[:, 0]).sum(1)[:, None, None]
    elif _double_sum_cheaper(T, din, dout, C):
        AA = A @ A.transpose(1, 2)                                    # (g, T, T)
        Df = D.reshape(g, C * T, dout)
        DD = (Df @ Df.transpose(1, 2)).reshape(g, C, T, C, T)
        K = torch.einsum("gctds,gts->gcd", DD, AA)
    else:
        W = D.transpose(2, 3) @ A[:, None]                            # (g, C, dout, din)
        Wf = W.reshape(g, C, -1)
        K = Wf @ Wf.transpose(1, 2)
    if bias:
        s = D.sum(2)                                                  # (g, C, dout)
        K = K + s @ s.transpose(1, 2)
    return K
