"""Leaving the caller's model and random stream as they were.

`kept_modes(model)` restores every submodule's train/eval flag on exit. `model.train(flag)`
sets *all* submodules to one flag, so restoring only `model.training` would switch a
BatchNorm or Dropout that a fine-tuning loop keeps in eval mode inside a training model
back to train mode (and its next forward would move the running statistics).

`kept_rng(device)` restores torch's global random state (and that of a CUDA device) on
exit, so that a forward pass with active dropout inside a measurement does not change
the random draws of the caller's training run.

`kept_tensors(model)` restores the values of every parameter and buffer on exit: a
forward pass the package runs on the caller's own module (not on copied parameters) can
write to them — `nn.Embedding(max_norm=...)` renormalises the rows it looks up in place,
a train-mode BatchNorm moves its running statistics.

`kept_attributes(model)` puts every submodule's plain tensor attributes (not parameters or
buffers) back on exit: a forward that fills a cache on its first call (`self._w = …`) must
keep no value the package's trial calls computed.

`model_copy(model)` is `copy.deepcopy(model)` for a model whose forward left tensors with
a grad_fn on its modules, which deepcopy refuses.
"""

from __future__ import annotations

import contextlib
import copy

import torch

__all__ = ["kept_modes", "kept_rng", "kept_tensors", "kept_attributes", "tensor_attributes",
           "model_copy"]


@contextlib.contextmanager
def kept_modes(model: torch.nn.Module):
    """Every submodule's `training` flag as it was on entry, restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, flag in modes:
            m.training = flag


def kept_rng(device=None):
    """`torch.random.fork_rng` over the CPU and, for a CUDA device, that device."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


@contextlib.contextmanager
def kept_tensors(model: torch.nn.Module):
    """Every parameter's and buffer's values as they were on entry, written back on exit
    (in place, so references the caller holds stay valid; only tensors that changed)."""
    tensors = list(model.parameters()) + list(model.buffers())
    saved = [t.detach().clone() for t in tensors]
    try:
        yield model
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                if not torch.equal(t, s):
                    t.copy_(s)


def tensor_attributes(model: torch.nn.Module) -> dict:
    """{(module name, attribute): tensor} of the plain tensor attributes (not parameters
    or buffers) of every submodule."""
    return {(mname, k): v for mname, mod in model.named_modules()
            for k, v in vars(mod).items() if isinstance(v, torch.Tensor)
            and not isinstance(v, torch.nn.Parameter)}


_MISSING = object()


@contextlib.contextmanager
def kept_attributes(model: torch.nn.Module):
    """Every submodule's plain tensor attributes as on entry, restored on exit: one that
    is new is removed, one that replaced another value (a tensor, or the None a cache
    held before it was filled) gets that value back."""
    before = {m: dict(vars(mod)) for m, mod in model.named_modules()}
    try:
        yield model
    finally:
        modules = dict(model.named_modules())
        for (m, k), v in tensor_attributes(model).items():
            old = before.get(m, {}).get(k, _MISSING)
            if old is _MISSING:
                delattr(modules[m], k)
            elif old is not v:
                setattr(modules[m], k, old)


def model_copy(model: torch.nn.Module) -> torch.nn.Module:
    """`copy.deepcopy(model)`, with each plain tensor attribute or buffer that has a
    grad_fn copied detached. A user's training forward leaves such tensors behind (an
    activation kept for logging, `self.feat = h`; the `weight` that the hook-based
    `torch.nn.utils.spectral_norm` computes before each forward), and deepcopy refuses
    them ("Only Tensors created explicitly by the user (graph leaves) support the
    deepcopy protocol"): every entry point that trains a copy failed on such a model (an
    outside sweep). The values are kept; only the graph is dropped."""
    memo = {}
    for t in [*tensor_attributes(model).values(), *model.buffers()]:
        try:
            if t.grad_fn is not None:
                memo[id(t)] = t.detach().clone()
        except RuntimeError:        # a tensor that escaped a torch.func transform: unusable
            memo[id(t)] = None
    return copy.deepcopy(model, memo)
