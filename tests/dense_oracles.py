"""Dense float64 oracles on the flat parameter vector, written with torch.func alone (no
code of the package): imported by the tests as `from dense_oracles import ...` (pytest
puts the tests folder on sys.path)."""

from __future__ import annotations

import torch


def flat_state(model, names=None):
    """(flat, state): the detached flat vector of the parameters `names` (default: all,
    in `named_parameters` order) and w ↦ the `functional_call` state with those
    parameters taken from w (the other parameters and the buffers as they are)."""
    named = dict(model.named_parameters())
    names = list(named) if names is None else list(names)
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])
    fixed = {n: p.detach() for n, p in named.items() if n not in names}
    fixed.update(dict(model.named_buffers()))

    def state(w):
        st = dict(fixed)
        st.update(zip(names, (c.view(s) for c, s in zip(torch.split(w, sizes), shapes))))
        return st

    return flat, state


def output_jacobians(model, X, names=None) -> torch.Tensor:
    """(N, C, P) per-sample Jacobians of the flattened outputs in the flat parameters
    `names`, one `jacrev` per sample."""
    flat, state = flat_state(model, names)
    return torch.stack([
        torch.func.jacrev(lambda w, i=i: torch.func.functional_call(
            model, state(w), (X[i:i + 1],)).reshape(-1))(flat)
        for i in range(X.shape[0])])
