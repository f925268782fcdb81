"""Flat parameter vectors for a `torch.nn.Module` (docs/theory.md §1: w ∈ R^P).

Curvature operators act on one flat vector `w ∈ R^P` made of a chosen subset of the
module's parameters (all trainable ones by default, or a named subset for per-layer
spectra). `ParamLayout` records names, shapes and offsets, and converts between the
flat vector and the tuple of tensors that `torch.func.functional_call` consumes.
Flattening order is the order of `model.named_parameters()`.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from nets.utils.autocast import outside_caller_contexts
from nets.utils.modes import kept_attributes, tensor_attributes

#: buffers that must be finite, not only free of NaN: normalisation layers' running statistics
RUNNING_STATISTICS = ("running_mean", "running_var")


def check_model(model) -> None:
    """Raise TypeError unless `model` is a `torch.nn.Module`; ValueError when one of its
    parameters or buffers is lazy and still uninitialised, a floating parameter holds NaN
    or inf, a floating buffer holds NaN, a normalisation layer's running statistic
    (`RUNNING_STATISTICS`) holds inf, or a buffer sits on the meta device (no values).
    Other buffers may hold ±inf: an additive attention mask (−inf on the masked
    positions) is a legitimate model; the curvature operators refused it until a review
    found it (session 53). Parameters on the meta device are left to the device checks.
    Every entry point that takes a model runs this before it computes anything."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    lazy = [n for n, t in (*model.named_parameters(), *model.named_buffers())
            if isinstance(t, (nn.parameter.UninitializedParameter,
                              nn.parameter.UninitializedBuffer))]
    if lazy:
        raise ValueError(f"model has uninitialised (lazy) parameters or buffers {lazy[:3]}: run "
                         "one forward pass on a batch of your data first, so that they get "
                         "their shapes")
    for n, t in model.named_parameters():           # meta tensors hold no values to check
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"model parameter {n!r} contains NaN or inf")
    for n, t in model.named_buffers():
        if t.is_meta:
            raise ValueError(f"model buffer {n!r} is on the meta device: it holds no values "
                             "(load or initialise it, e.g. model.to_empty(...) and a state dict)")
        if not t.is_floating_point():
            continue
        t = t.detach()
        bad = (bool(torch.isnan(t).any()) or (n.rsplit(".", 1)[-1] in RUNNING_STATISTICS
                                              and not bool(torch.isfinite(t).all())))
        if bad:
            raise ValueError(f"model buffer {n!r} contains NaN or inf")


def select_parameter_names(model: nn.Module, params=None) -> list[str]:
    """Names of the parameters that make up w, in `named_parameters()` order.

    params : None (every parameter with `requires_grad`), a sequence of parameter names,
        a single name, or a predicate `params(name, tensor) -> bool`. A tied parameter
        (one tensor registered under several names, `dec.weight = emb.weight`) counts once,
        under its first name: any of its names selects it, and a predicate selects it when
        it accepts any of them.

    Raises TypeError for another kind of `params`, ValueError for unknown names,
    duplicates (two names of one tied parameter included), or an empty selection.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = dict(model.named_parameters())
    aliases = _tied_aliases(model, named)          # canonical name -> its other names
    canonical = {a: n for n, names in aliases.items() for a in names}
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
    elif isinstance(params, str):
        names = [canonical.get(n, n) for n in _check_names([params], named, canonical)]
    elif callable(params):
        names = [n for n, p in named.items()
                 if any(params(a, p) for a in (n, *aliases.get(n, ())))]
    elif isinstance(params, Iterable):
        wanted = list(params)
        if not all(isinstance(n, str) for n in wanted):
            raise TypeError("params must be a sequence of parameter names (str)")
        _check_names(wanted, named, canonical)
        wanted_set = {canonical.get(n, n) for n in wanted}
        names = [n for n in named if n in wanted_set]     # canonical order
    else:
        raise TypeError("params must be None, a list of parameter names or a predicate "
                        f"(name, tensor) -> bool, got {type(params).__name__}")
    if not names:
        if params is None:
            raise ValueError("model has no trainable parameters (requires_grad is False on "
                             f"all {len(named)} of them); set requires_grad=True on the "
                             "ones the curvature or training is about")
        raise ValueError("params selects no parameters")
    return names


def _tied_aliases(model: nn.Module, named: dict) -> dict[str, tuple[str, ...]]:
    """For each parameter registered under more than one name, its further names."""
    first = {id(p): n for n, p in named.items()}
    out: dict[str, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if n not in named:
            out.setdefault(first[id(p)], []).append(n)
    return {k: tuple(v) for k, v in out.items()}


def _check_names(wanted: Sequence[str], named: dict, canonical: dict | None = None) -> list[str]:
    canonical = canonical or {}
    unknown = [n for n in wanted if n not in named and n not in canonical]
    if unknown:
        raise ValueError(f"params names not in the model: {unknown}; "
                         f"available: {list(named)}")
    resolved = [canonical.get(n, n) for n in wanted]
    if len(set(resolved)) != len(resolved):
        tied = [n for n in wanted if n in canonical]
        raise ValueError("params contains duplicate names"
                         + (f" ({', '.join(f'{a!r} is tied to {canonical[a]!r}' for a in tied)})"
                            if tied else ""))
    return list(wanted)


@dataclass(frozen=True)
class ParamLayout:
    """Layout of the flat vector: `names[i]` occupies `offsets[i]:offsets[i]+numels[i]`
    with shape `shapes[i]`."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]

    @classmethod
    def from_module(cls, model: nn.Module, params=None) -> "ParamLayout":
        names = select_parameter_names(model, params)
        named = dict(model.named_parameters())
        shapes = tuple(named[n].shape for n in names)
        return cls(tuple(names), shapes, tuple(int(s.numel()) for s in shapes))

    @property
    def P(self) -> int:
        return int(sum(self.numels))

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for n in self.numels:
            out.append(acc)
            acc += n
        return tuple(out)

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors (one per name, any leading batch dims allowed only when
        used under `torch.func.vmap`) into a flat vector of length P."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split a flat vector of length P into a tuple of tensors shaped like the
        parameters (views, no copy)."""
        return tuple(c.view(s) for c, s in zip(torch.split(vec, self.numels), self.shapes))


def flatten_parameters(model: nn.Module, params=None) -> torch.Tensor:
    """Detached copy of the selected parameters as one flat vector."""
    layout = ParamLayout.from_module(model, params)
    named = dict(model.named_parameters())
    return layout.flatten([named[n].detach() for n in layout.names]).clone()


def unflatten_to_dict(model: nn.Module, vec: torch.Tensor, params=None) -> dict[str, torch.Tensor]:
    """{name: tensor} views of `vec` shaped like the selected parameters."""
    layout = ParamLayout.from_module(model, params)
    if vec.ndim != 1 or vec.numel() != layout.P:
        raise ValueError(f"vec must be a flat vector of length {layout.P}, got shape {tuple(vec.shape)}")
    return dict(zip(layout.names, layout.unflatten(vec)))


def refuse_changed_params(built: Sequence[str], now: Sequence[str], who: str, remedy: str) -> None:
    """ValueError when the trainable parameter names `now` differ from those `who` was
    built with (`built`): a layer frozen or unfrozen since then; `remedy` says what to do."""
    if list(now) == list(built):
        return
    added = sorted(set(now) - set(built))
    removed = sorted(set(built) - set(now))
    raise ValueError(f"the model's trainable parameters changed since {who} was built "
                     f"(requires_grad now on: {added or 'none'}; now off: {removed or 'none'}): "
                     f"{remedy}")


def make_functional(model: nn.Module, names: Sequence[str], *, device=None, dtype=None):
    """Split a module into (selected primals, frozen rest) for `functional_call`.

    Returns (primals, frozen): `primals` is a tuple of detached copies of the selected
    parameters; `frozen` holds detached copies of every other parameter and of every
    buffer (floating ones cast to `dtype`). Copies guarantee that functional products
    never write to the user's module (e.g. BatchNorm running statistics).
    """
    named_p = dict(model.named_parameters())
    named_b = dict(model.named_buffers())

    def copy(t):
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if device is not None:
            t = t.to(device)
        return t.clone()

    primals = tuple(copy(named_p[n]) for n in names)
    chosen = set(names)
    frozen = {n: copy(p) for n, p in named_p.items() if n not in chosen}
    frozen.update({n: copy(b) for n, b in named_b.items()})
    return primals, frozen


_TWICE_DIFFERENTIABLE_DEPTH = 0        # how many twice_differentiable contexts are open


@contextlib.contextmanager
def twice_differentiable():
    """Kernels that curvature products can differentiate twice and in forward mode.

    Attention through `F.scaled_dot_product_attention` picks a fused CPU/GPU kernel
    whose backward has no derivative ("derivative for aten::_scaled_dot_product_flash_
    attention_for_cpu_backward is not implemented"), and `nn.TransformerEncoderLayer`
    in eval mode takes a fused fast path without forward-mode AD. Inside this context
    attention uses the reference (math) kernel and the fast path is off; both are
    restored afterwards. The math kernel computes the same function. Entered again
    inside itself it does nothing (the settings are already in force), so a loop of many
    `call_model` calls can be wrapped once — or decorated, `@twice_differentiable()` —
    and pay for the switch once (about 20 µs a call otherwise). Autocast and the
    parametrization cache of `torch.nn.utils.parametrize.cached()` are off inside it too
    (`nets.utils.autocast.outside_caller_contexts`)."""
    global _TWICE_DIFFERENTIABLE_DEPTH
    if _TWICE_DIFFERENTIABLE_DEPTH:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    _TWICE_DIFFERENTIABLE_DEPTH += 1
    try:
        with sdpa_kernel(SDPBackend.MATH), outside_caller_contexts():
            yield
    finally:
        _TWICE_DIFFERENTIABLE_DEPTH -= 1
        torch.backends.mha.set_fastpath_enabled(fast)


def call_model(model: nn.Module, state: dict, x) -> torch.Tensor:
    """`torch.func.functional_call(model, state, (x,))` inside `twice_differentiable`:
    the forward every curvature product differentiates.

    A model holding one submodule at two places (`nn.ModuleList([l, l])`, weight sharing by
    reuse) is restored afterwards: torch 2.13's functional_call puts the swapped-in plain
    tensors back into the second occurrence's slots instead of the user's Parameters, so
    the model lost its Parameters (an optimizer built before stopped training that layer)
    and, after a Gauss–Newton product left them without requires_grad, every later
    operator dropped the shared layer (P 42 → 12, λ₁ 1.17 for 1.89; an outside sweep).

    Plain tensor attributes a forward writes (an activation kept for logging, `self.feat =
    h`; `weight` recomputed by the hook-based `spectral_norm`) are put back as they were
    (`kept_attributes`): the package's tensors — inside vmap, tensors that escaped it —
    would otherwise be left on the caller's modules, and reading them failed later. Whether
    a model's forward writes any is learnt on its first call and kept (`_writes_attributes`):
    the scan costs ~4 ms on a 900-module network, on every product. Embedding layers built
    with sparse=True run with dense gradients inside it (`_sparse_lookups`), and are put
    back as they were."""
    slots = [(m, dict(m._parameters), dict(m._buffers)) for m in _shared_modules(model)]
    writes = _WRITES_ATTRIBUTES.get(model)          # None: not called yet
    sparse = [(m, m.sparse) for m in _sparse_lookups(model)]
    for module, _ in sparse:
        module.sparse = False
    try:
        if writes is False:
            with twice_differentiable():
                return torch.func.functional_call(model, state, (x,))
        before = tensor_attributes(model) if writes is None else None
        with twice_differentiable(), kept_attributes(model):
            out = torch.func.functional_call(model, state, (x,))
            if before is not None:
                _writes_attributes(model, before)
            return out
    finally:
        for module, params, buffers in slots:
            module._parameters.update(params)
            module._buffers.update(buffers)
        for module, flag in sparse:
            module.sparse = flag


_SHARED_MODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WRITES_ATTRIBUTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SPARSE_LOOKUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sparse_lookups(model: nn.Module) -> tuple:
    """The model's `nn.Embedding`/`nn.EmbeddingBag` layers built with sparse=True, which
    `call_model` runs with dense gradients: the same numbers (sparse=True only changes how
    the weight's gradient is stored), but a sparse gradient cannot be reshaped or
    differentiated again by torch.func, and every entry point raised torch's "reshape is
    not implemented for sparse tensors" (an outside sweep). Found once per model and kept,
    like `_shared_modules`."""
    try:
        return _SPARSE_LOOKUPS[model]
    except (KeyError, TypeError):
        pass
    found = tuple(m for m in model.modules()
                  if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse)
    try:
        _SPARSE_LOOKUPS[model] = found
    except TypeError:
        pass
    return found


def _writes_attributes(model: nn.Module, before: dict) -> None:
    """Record whether the forward just run left a plain tensor attribute that was not there
    (or not the same) before it (`call_model`): a model whose first call writes none is
    called without `kept_attributes` from then on; a forward that writes one only on later
    calls is not seen."""
    after = tensor_attributes(model)
    try:
        _WRITES_ATTRIBUTES[model] = (after.keys() != before.keys()
                                     or any(after[k] is not v for k, v in before.items()))
    except TypeError:           # a model that cannot be weakly referenced: scan every call
        pass


def _shared_modules(model: nn.Module) -> tuple:
    """Every module of `model` when some module appears at more than one place in it
    (empty otherwise: nothing to restore). Found once per model and kept (the traversal
    cost ~0.4 ms on a 900-module network, on every product): a module reused only after
    the model's first product is not seen."""
    try:
        return _SHARED_MODULES[model]
    except (KeyError, TypeError):
        pass
    mods = [m for _, m in model.named_modules(remove_duplicate=False)]
    unique = {id(m): m for m in mods}
    found = tuple(unique.values()) if len(unique) < len(mods) else ()
    try:
        _SHARED_MODULES[model] = found
    except TypeError:                   # not weak-referenceable: found again next time
        pass
    return found


def map_output_leaves(out, fn):
    """A model output with `fn` applied to each tensor leaf: a tensor, or a dict / tuple /
    namedtuple / list of them (nested), the container types kept (a dict subclass that
    cannot be rebuilt from its items becomes a dict); other leaves as they are."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, dict):
        items = [(k, map_output_leaves(v, fn)) for k, v in out.items()]
        try:
            return type(out)(items)
        except TypeError:
            return dict(items)
    if isinstance(out, tuple) and hasattr(out, "_fields"):          # namedtuple
        return type(out)(*(map_output_leaves(v, fn) for v in out))
    if isinstance(out, (tuple, list)):
        return type(out)(map_output_leaves(v, fn) for v in out)
    return out


def output_tensors(out) -> list:
    """The tensors of a model output (`map_output_leaves`' leaves, in order)."""
    leaves = []
    map_output_leaves(out, leaves.append)
    return leaves


def functional_forward(model: nn.Module, names: Sequence[str], frozen: dict,
                       primals: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`model(x)` with the selected parameters replaced by `primals`."""
    state = dict(frozen)
    state.update(zip(names, primals))
    return call_model(model, state, x)


def functional_loss(model: nn.Module, loss_fn: Callable, names: Sequence[str], frozen: dict,
                    primals: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`loss_fn(model(x), y)` as a function of the selected parameters."""
    return loss_fn(functional_forward(model, names, frozen, primals, x), y)
