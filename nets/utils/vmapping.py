"""`torch.func.vmap` over samples or groups, with a loop when a layer cannot be vmapped.

Per-sample and per-group passes (`nets.noise`, `nets.curvature.operators.group_products`)
map a pure function over the leading dimension of their inputs with `vmap`. Some torch
kernels have no batching rule and fail under it: the fused recurrent layers (nn.GRU and
nn.RNN create their zero initial state with the un-vmapped batch size, "output with
shape [1, 8] doesn't match the broadcast shape [64, 1, 8]"), a few activations
(nn.RReLU). `vmap_or_loop(fn)` tries `vmap(fn)` once; if that raises, it evaluates
`fn` on each slice in a Python loop and stacks the results (the same numbers, at the
cost of one call per slice), and keeps looping for later calls. An error that is not
about vmap is raised again by the loop itself, so nothing is hidden. A kernel that torch
itself loops over under vmap (nn.LSTM on CPU: "There is a performance drop …", one
warning per call) switches to the same loop, without the warnings.
"""

from __future__ import annotations

import warnings

import torch
from torch.func import vmap

__all__ = ["vmap_or_loop"]

#: torch's warning when vmap falls back to a per-slice loop for a kernel without a
#: batching rule (the CPU LSTM's mkldnn_rnn_layer): the same numbers, said once per call
_FALLBACK_TEXT = "There is a performance drop because we have not yet implemented the batching rule"


class vmap_or_loop:  # noqa: N801 - used like torch.func.vmap
    """`vmap(fn, in_dims)` with a per-slice loop as the fallback (module docstring).

    in_dims : one int or None per argument (None: passed whole to every slice); the
    output (a tensor) is stacked along dim 0, as `vmap` with out_dims=0 returns it.
    `looped` tells whether the fallback is in use."""

    def __init__(self, fn, in_dims=0):
        self.fn = fn
        self.in_dims = in_dims
        self._vmapped = vmap(fn, in_dims=in_dims)
        self.looped = False

    def __call__(self, *args):
        if not self.looped:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = self._vmapped(*args)
            except (RuntimeError, NotImplementedError):
                self.looped = True
            else:
                slow = [w for w in caught if _FALLBACK_TEXT in str(w.message)]
                for w in caught:
                    if w not in slow:
                        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                if slow:            # torch looped internally (nn.LSTM's kernel): say nothing
                    self.looped = True          # and loop here from now on, silently
                return out
        return self._loop(*args)

    def _loop(self, *args):
        dims = self.in_dims if isinstance(self.in_dims, tuple) else (self.in_dims,) * len(args)
        n = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        out = [self.fn(*[a if d is None else a.select(d, i) for a, d in zip(args, dims)])
               for i in range(n)]
        return torch.stack(out)
