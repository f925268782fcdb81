"""Short hashes of what a resumable store's key must tell apart besides the numbers it was
given: the model's structure and the loss function (`code_fingerprint`), and the data
(`data_fingerprint`).

Parameters and data are hashed by the stores themselves; two models with the same weights
but another activation, or one loss with another label smoothing, must not share stored
results. Hashed here: every submodule's class, `extra_repr`, plain attributes and the code
of the functions its (user-defined) classes define, the model's `repr`, and
for the loss — a function's qualified name, bytecode, constants, names, closure values
and the module-level data it reads (settings, its module's functions, and in the user's
code every other callable: a global partial or torch function, and a global module by
its structure and settings, not its weights, which training changes), a
`functools.partial`'s function, arguments and keywords (recursively), a loss module's
class and its plain attributes and buffers (reduction, label smoothing, weights, ...) —
with, where it has any, the code of the user's classes, its submodules and its
parameters — or a callable object's class code and attributes.
A callable it cannot read falls back to its `repr` (which may include an address, so such
a store is not reused across processes: never stale, at worst recomputed). The
fingerprints of torch's own losses and of models without such globals are as before.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import types

import numpy as np
import torch

__all__ = ["code_fingerprint", "data_fingerprint", "digest", "tensor_bytes"]


def _describe(obj, depth=0) -> str:
    if depth > 4:
        return type(obj).__qualname__
    if isinstance(obj, functools.partial):
        return (f"partial({_describe(obj.func, depth + 1)}, "
                f"{[_describe(a, depth + 1) for a in obj.args]}, "
                f"{sorted((k, _describe(v, depth + 1)) for k, v in obj.keywords.items())})")
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return f"tensor{tuple(t.shape)}{t.dtype}:{hashlib.sha1(raw_bytes(t)).hexdigest()[:12]}"
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        return f"ndarray{a.shape}{a.dtype}:{hashlib.sha1(a.tobytes()).hexdigest()[:12]}"
    if isinstance(obj, torch.nn.Module):
        plain = _plain_attributes(obj, lambda v: _describe(v, depth + 1))
        buffers = sorted((k, _describe(v, depth + 1)) for k, v in obj.named_buffers())
        return (f"{type(obj).__module__}.{type(obj).__qualname__}{plain}{buffers}"
                f"{_module_extras(obj, depth)}")
    code = getattr(obj, "__code__", None)
    if code is not None:
        cells = [_describe(c.cell_contents, depth + 1) for c in (obj.__closure__ or ())
                 if _has_contents(c)]
        defaults = [_describe(d, depth + 1) for d in (obj.__defaults__ or ())]
        return (f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}:"
                f"{code.co_code.hex()}:{[_describe(c, depth + 1) for c in code.co_consts]}:"
                f"{code.co_names}:{cells}:{defaults}:{_globals_read(obj, code, depth)}")
    if isinstance(obj, (int, float, str, bool, type(None), bytes)):
        return repr(obj)
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__}{[_describe(v, depth + 1) for v in obj]}"
    if isinstance(obj, (set, frozenset)):       # iteration order varies between processes
        return f"{type(obj).__name__}{sorted(_describe(v, depth + 1) for v in obj)}"
    if callable(obj) and hasattr(obj, "__qualname__"):      # builtins, torch functions
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    if callable(obj) and hasattr(obj, "__dict__") and not isinstance(obj, type):
        # a callable object (a loss class with __call__): its class's code and its
        # attributes, which its repr leaves out (an attribute changed in place kept it)
        cls = type(obj)
        return (f"{cls.__module__}.{cls.__qualname__}:{_class_code(cls, depth + 1)}:"
                f"{_plain_attributes(obj, lambda v: _stable(v, depth + 1))}")
    return repr(obj)


def _module_rows(named_modules, describe, depth) -> list:
    """[(name, class(extra_repr), plain attributes by `describe`, class code)] of modules."""
    return [(n, f"{type(m).__module__}.{type(m).__qualname__}({m.extra_repr()})",
             _plain_attributes(m, describe), _class_code(type(m), depth + 1))
            for n, m in named_modules]


def _module_structure(module: torch.nn.Module, depth) -> str:
    """A module read as a global (the model itself in an L2 term, a criterion): its
    classes, their code, settings and the names, shapes and dtypes of its tensors — not
    their values, which training changes at every step (hashing them refused a monitor's
    own file on resume); a store that depends on the weights hashes them itself."""
    parts = _module_rows(module.named_modules(), lambda v: _stable(v, depth + 1), depth)
    tensors = [(n, tuple(t.shape), str(t.dtype))
               for n, t in (*module.named_parameters(), *module.named_buffers())]
    return f"module{parts}{tensors}"


def _module_extras(module: torch.nn.Module, depth) -> str:
    """What a loss module's class name, plain attributes and buffers leave out — the code
    of the user's classes, its submodules' classes and attributes, its parameters (a
    learned temperature) — as a suffix that is empty for a torch loss with neither (so
    their fingerprints are as before)."""
    extras = []
    code = _class_code(type(module), depth + 1)
    if code:
        extras.append(f"code{code}")
    subs = _module_rows(((n, m) for n, m in module.named_modules() if n),
                        lambda v: _describe(v, depth + 1), depth)
    if subs:
        extras.append(f"modules{subs}")
    params = sorted((k, _describe(v, depth + 1)) for k, v in module.named_parameters())
    if params:
        extras.append(f"parameters{params}")
    return "|".join(extras)


_PLAIN = (int, float, str, bool, type(None), bytes, tuple, list, torch.Tensor, np.ndarray,
          np.generic)
#: containers of settings a loss or forward reads by name (CFG["smoothing"], args.scale):
#: described by their repr (an address in it makes a store unreusable, never stale)
_SETTINGS = (dict, types.SimpleNamespace, argparse.Namespace)


def _globals_read(fn, code, depth) -> list:
    """The module-level values a function reads by name — plain data (numbers, strings,
    tensors, arrays, tuples), the functions of its own module, and, for the user's code
    (not torch's own functions), every other callable it reads: a loss module, a partial,
    a torch function (LOSS = F.cross_entropy edited to F.multi_margin_loss, ACT = torch.tanh
    to torch.relu kept the fingerprint), a function of another module by its name — not
    modules or classes — so that a loss reading a global setting (e.g. LABEL_SMOOTHING =
    0.1) is told apart when the setting changes."""
    g = getattr(fn, "__globals__", {})
    user = not (getattr(fn, "__module__", None) or "").startswith("torch")
    out = []
    for name in code.co_names:
        if name not in g:
            continue
        v = g[name]
        if isinstance(v, _PLAIN + _SETTINGS) or (getattr(v, "__code__", None) is not None
                                                 and getattr(v, "__module__", None) == fn.__module__):
            out.append((name, _describe(v, depth + 1)))
        elif user and callable(v) and not isinstance(v, (type, types.ModuleType)):
            if getattr(v, "__code__", None) is not None:     # another module's function
                out.append((name, f"{getattr(v, '__module__', '')}.{v.__qualname__}"))
            elif isinstance(v, torch.nn.Module):
                out.append((name, _module_structure(v, depth + 1)))
            else:
                out.append((name, _stable(v, depth + 1)))
    return out


def _has_contents(cell) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:           # an empty cell (a variable not yet assigned)
        return False
    return True


def _plain_attributes(module: torch.nn.Module, describe) -> list:
    """[(name, describe(value))] of a module's public plain attributes (reduction, label
    smoothing, an activation or scale kept as self.act / self.scale), sorted."""
    return sorted((k, describe(v)) for k, v in vars(module).items()
                  if not k.startswith("_") and k != "training")


def _stable(obj, depth=0) -> str:
    """`_describe(obj)`, or the type's name where that is a repr holding a memory address
    (such an attribute is not told apart, as before it was read at all, rather than make
    every key differ between processes)."""
    d = _describe(obj, depth)
    return type(obj).__qualname__ if " at 0x" in d else d


def _class_code(cls, depth=0) -> list:
    """The code of every function the user's classes in cls's MRO define — forward and the
    helpers it calls (self.act(), edited from tanh to relu, kept the fingerprint when only
    forward was read); torch's own classes are told apart by their extra_repr."""
    out = []
    for c in cls.__mro__:
        if c is object or (c.__module__ or "").split(".")[0] == "torch":
            continue
        out += [(c.__qualname__, k, _stable(v, depth)) for k, v in sorted(vars(c).items())
                if getattr(v, "__code__", None) is not None]
    return out


def code_fingerprint(model: torch.nn.Module, loss_fn) -> str:
    """16 hex digits of the model's structure — each submodule's class, extra_repr, plain
    attributes (an activation or a scale kept as `self.act = torch.relu`, `self.scale =
    3.0`) and the code of its class's own functions (`_class_code`: bytecode, constants,
    the module-level settings they read — an edited forward under the same class name),
    and the model's repr — and of the loss function (module docstring)."""
    h = hashlib.sha1()
    code = {}                                   # each class's functions described once
    for name, m in model.named_modules():
        cls = type(m)
        if cls not in code:
            code[cls] = _class_code(cls)
        h.update(f"{name}:{cls.__module__}.{cls.__qualname__}({m.extra_repr()})".encode())
        h.update(f"{_plain_attributes(m, _stable)}|{code[cls]}".encode())
    h.update(repr(model).encode())
    h.update(_describe(loss_fn).encode())
    return h.hexdigest()[:16]


def raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's exact bytes (any dtype, bfloat16 included)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_bytes(t: torch.Tensor) -> bytes:
    """dtype, shape and exact bytes of a tensor, for hashing."""
    return repr((str(t.dtype), tuple(t.shape))).encode() + raw_bytes(t)


def digest(*chunks) -> str:
    """16 hex digits of SHA-256 over `chunks` (bytes as they are, anything else by repr)."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c if isinstance(c, bytes) else repr(c).encode())
    return h.hexdigest()[:16]


def data_fingerprint(source) -> str:
    """16 hex digits of a `nets.utils.data_source.DataSource`: N and the exact bytes of
    every sample's inputs and targets, in order (one pass over the data). It hashed 8
    samples and the sums before: two samples swapped, or two labels, reused a store."""
    hx, hy, kinds = hashlib.sha256(), hashlib.sha256(), set()
    for x, y in source.batches():       # the same bytes whatever the batching (data form)
        hx.update(raw_bytes(x))
        hy.update(raw_bytes(y))
        kinds.add((str(x.dtype), tuple(x.shape[1:]), str(y.dtype), tuple(y.shape[1:])))
    return digest(int(source.N), sorted(kinds), hx.hexdigest(), hy.hexdigest())
