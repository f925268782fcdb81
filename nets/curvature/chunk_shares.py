"""How much each chunk of the data weighs in the full-data loss.

Data too large for one pass is evaluated in chunks b of n_b samples, and the full-data
loss is put back together as L = Σ_b ω_b L_b. For a plain mean loss, L_b = (1/n_b) Σ ℓ_i,
the shares are ω_b = n_b/N. A *weighted* mean — class weights, `ignore_index`, padded
tokens — is L_b = Σ_{i∈b} w_i ℓ_i / W_b with W_b = Σ_{i∈b} w_i and weights w_i set by
the targets, and then ω_b = W_b / W: n_b/N is off wherever the chunks differ in their
weight per sample (sequences sorted by length: 7 % on the top eigenvalue of a padded
tagger), and a chunk whose every target is ignored (W_b = 0, L_b = 0/0) must drop out.

W_b is read from the loss itself, whatever the weighting, with one reference sample r
(outputs z_r, target y_r, weight w_r > 0) appended to the chunk: the gradient of
L(b ∪ r) in z_r is t_b = w_r/(W_b + w_r) times the gradient of r's own loss ℓ_r, so
W_b/w_r = 1/t_b − 1. Two checks that the loss is of this form: that gradient is parallel
to ℓ_r's, and the value L(b ∪ r) = (1 − t_b)·L_b + t_b·ℓ_r (a loss whose weights depend on
the outputs — a focal loss normalised by its own factors — or that is not a mean at all —
a root mean square — fails the second by 1–4 %, where the first can hold). Only the loss
runs, on the outputs of one forward pass, in float64 where the loss accepts it.

The plain shares n_b/N are returned exactly where they are right: a plain mean (shares
within 1e-8 of them), or outputs that are not one tensor (a tuple or dict: not split
here). Where they may be wrong — a loss that fails either check, chunks that cannot be
joined with the reference (sequences padded per batch to their own length), no sample
with a loss of its own — they are returned with a warning that the chunked numbers of
this loss are not exact and one chunk (chunk_size ≥ N) is.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch

from nets.curvature.loss_check import _kept_loss_state
from nets.utils.autocast import outside_autocast
from nets.utils.callers import caller_stacklevel
from nets.utils.modes import kept_modes

__all__ = ["data_shares", "full_data_loss", "given_or_read_shares", "loss_shares",
           "shard_reference", "shard_weight", "shares_from_weights"]

_REF_WANTED = 8             # references compared (the largest gradient is kept) ...
_REF_SCAN = 256             # ... among at most this many samples of a chunk
_PLAIN_RTOL = 1e-8          # shares this close to n_b/N are the plain mean's


class _NotWeighted(Exception):
    """The loss failed a check of the target-weighted form (its reason)."""


def _cast(t, wide):
    """A detached copy (a normal tensor even when made under inference mode); floating
    tensors in float64 when `wide`."""
    t = t.detach().clone()
    return t.to(torch.float64) if wide and t.is_floating_point() else t


def _slack(wide) -> float:
    """Relative slack of the two checks: round-off of a loss over a few thousand samples
    (a genuine weighted mean passes at 6e-8 in float32), far below the 1–4 % by which
    output-dependent weights or a non-mean fail."""
    return 1e-6 if wide else 1e-4


def _reference(loss_fn, out, y, wide):
    """(z_r, y_r, g_r, ℓ_r): among the chunk's first samples with a finite loss of their
    own, the one whose gradient in its outputs is largest (a zero gradient carries no
    information; an ignored target has no loss of its own)."""
    best, best_norm, found = None, 0.0, 0
    for i in range(min(len(out), _REF_SCAN)):
        z = _cast(out[i:i + 1], wide).requires_grad_(True)
        yi = _cast(y[i:i + 1], wide)
        loss = loss_fn(z, yi)
        if not (torch.is_tensor(loss) and loss.numel() == 1 and torch.isfinite(loss).all()):
            continue
        g = torch.autograd.grad(loss.reshape(()), z)[0]
        norm = float(torch.linalg.vector_norm(g))
        if not (math.isfinite(norm) and norm > 0):
            continue
        found += 1
        if norm > best_norm:
            best, best_norm = (z.detach(), yi, g, float(loss.detach())), norm
        if found == _REF_WANTED:
            break
    return best


def _reference_in(loss_fn, wide_fn, out, y, wide):
    """(`_reference`, wide): in float64 (`wide_fn`) while `wide`, falling back to the
    outputs' precision where the loss refuses float64 (float32 class weights held by a
    function)."""
    if wide:
        try:
            return _reference(wide_fn, out, y, True), True
        except RuntimeError:
            pass
    return _reference(loss_fn, out, y, False), False


def _reason(err) -> str:
    """Why the shares could not be read, from the error a chunk's check raised."""
    if isinstance(err, _NotWeighted):
        return f"it is not a target-weighted mean: {err}"
    return f"a chunk joined with the reference sample failed in the loss: {type(err).__name__}"


def _chunk_weight(loss_fn, out, y, ref, wide) -> float:
    """W_b/w_r for one chunk; _NotWeighted where the loss fails a check of the form."""
    z_r, y_r, g_r, l_r = ref
    tol = _slack(wide)
    zr = z_r.clone().requires_grad_(True)
    zb, yb = _cast(out, wide), _cast(y, wide)
    loss = loss_fn(torch.cat([zb, zr]), torch.cat([yb, y_r]))
    g = torch.autograd.grad(loss.reshape(()), zr)[0]
    t = float((g * g_r).sum() / (g_r * g_r).sum())
    if not (math.isfinite(t) and 0.0 < t <= 1.0 + tol):
        raise _NotWeighted(f"the reference's share of a chunk read {t:.4g}, not in (0, 1]")
    if float(torch.linalg.vector_norm(g - t * g_r)) > tol * float(torch.linalg.vector_norm(g)):
        raise _NotWeighted("its gradient in a sample's outputs is not a multiple of that "
                           "sample's own loss gradient")
    joined = float(loss.detach())
    if t >= 1.0 - tol:                              # W_b = 0: every target ignored
        expected, scale = l_r, abs(l_r)
    else:
        with torch.no_grad():
            l_b = float(loss_fn(zb, yb))
        expected, scale = (1.0 - t) * l_b + t * l_r, max(abs(l_b), abs(l_r))
    if not abs(joined - expected) <= tol * max(scale, abs(joined), 1e-300):
        raise _NotWeighted(f"its value on a chunk joined with one sample is {joined:.6g}, "
                           f"not the weighted mean of the two, {expected:.6g}: its weights "
                           "depend on the outputs, or it is not a mean")
    return max(1.0 / t - 1.0, 0.0)


def shard_reference(loss_fn, chunks):
    """The reference sample of this process's chunks (n_b, outputs, targets), for
    `shard_weight` on every rank of a sharded operator: (z_r, y_r, g_r, ℓ_r, wide), with
    `wide` whether the loss runs in float64; None when no chunk has a sample with a loss
    of its own; "counts" when the outputs are not one tensor (weighted by counts, as
    `loss_shares` does)."""
    wide_fn = _wide_loss(loss_fn)
    for n, out, y in chunks:
        out = out() if callable(out) else out
        if not (torch.is_tensor(out) and torch.is_tensor(y) and len(y) == len(out) == n):
            return "counts"
        with torch.inference_mode(False), torch.enable_grad(), _kept_loss_state(loss_fn):
            ref, wide = _reference_in(loss_fn, wide_fn, out, y, True)
        if ref is not None:
            return (*ref, wide)
    return None


def shard_weight(loss_fn, chunks, reference) -> float:
    """W/w_r for this process's chunks: the total weight of its samples in units of the
    `reference` sample's (`shard_reference`, read on one rank and sent to all, so that
    the ranks' totals share a unit and W_r/W is each rank's share of the full-data
    loss). Raises ValueError with the reason where the loss fails a check of the
    target-weighted form or a chunk cannot be joined with the reference."""
    *ref, wide = reference
    fn = _wide_loss(loss_fn) if wide else loss_fn
    total = 0.0
    try:
        with torch.inference_mode(False), torch.enable_grad(), _kept_loss_state(loss_fn):
            for _, out, y in chunks:
                out = out() if callable(out) else out
                total += _chunk_weight(fn, out, y, tuple(ref), wide)
    except (_NotWeighted, RuntimeError, ValueError, TypeError, IndexError) as err:
        raise ValueError(_reason(err)) from None
    return total


def shares_from_weights(weights, sizes, N: int, wide: bool):
    """The shares W_b/W of weights W_b, or the plain n_b/N of the sizes — exactly — where
    every share is within round-off of it (1e-8 relative; 1e-4 for a loss run in its
    outputs' float32); None where the weights sum to zero. Chunks in one process and the
    ranks of a sharded operator alike."""
    total = sum(weights)
    if not total > 0:
        return None
    plain = [n / N for n in sizes]
    shares = [w / total for w in weights]
    tol = _PLAIN_RTOL if wide else 1e-4
    return plain if all(abs(s - p) <= tol * p for s, p in zip(shares, plain)) else shares


def _warn(loss_fn, why):
    from nets.curvature.loss_check import loss_name

    warnings.warn(
        f"loss_fn {loss_name(loss_fn)!r} on data in chunks: each chunk's share of the loss "
        f"could not be read ({why}), so chunks are weighted by their sample counts — exact "
        "for a plain mean, not for a weighted one (class weights, ignore_index, padded "
        "tokens) or a loss that is not a mean. Pass all data as one chunk (chunk_size ≥ N, "
        "or one batch) for exact curvatures of this loss.",
        UserWarning, stacklevel=caller_stacklevel())


def _wide_loss(loss_fn):
    """A loss module in float64 (a copy: its float32 class weights would refuse float64
    outputs), any other loss as it is."""
    if isinstance(loss_fn, torch.nn.Module):
        return copy.deepcopy(loss_fn).double()
    return loss_fn


def loss_shares(loss_fn, chunks, N: int) -> list[float]:
    """ω_b for the chunks (n_b, outputs, targets) in order, so that the full-data loss is
    Σ_b ω_b L_b (module docstring); n_b/N where the loss is a plain mean, exactly, and
    with a warning where the shares could not be read. An all-ignored chunk gets 0.
    `outputs` may be a zero-argument callable returning them (not called once the counts
    are settled on). The loss runs in float64 (a loss module on a float64 copy); a loss
    that refuses float64 outputs (a function holding float32 class weights) runs in the
    outputs' precision, with slack 1e-4 in the checks and shares within 1e-4 of n_b/N
    taken as plain."""
    sizes, weights, ref, why, wide, pending, tensors = [], [], None, None, True, [], True
    wide_fn = _wide_loss(loss_fn)
    for n, out, y in chunks:
        sizes.append(int(n))
        if why is not None or not tensors:
            continue
        out = out() if callable(out) else out
        if not (torch.is_tensor(out) and torch.is_tensor(y) and len(y) == len(out) == n):
            tensors = False                 # a tuple or dict of outputs: not split here
            continue
        try:
            with torch.inference_mode(False), torch.enable_grad(), _kept_loss_state(loss_fn):
                if ref is None:
                    ref, wide = _reference_in(loss_fn, wide_fn, out, y, wide)
                    pending.append((out, y))
                    if ref is None:     # no sample here with a loss of its own (all ignored)
                        continue
                    fn = wide_fn if wide else loss_fn
                    weights += [_chunk_weight(fn, o, t, ref, wide) for o, t in pending]
                    pending = []
                else:
                    weights.append(_chunk_weight(wide_fn if wide else loss_fn, out, y, ref, wide))
        except (_NotWeighted, RuntimeError, ValueError, TypeError, IndexError) as err:
            why = _reason(err)
    plain = [n / N for n in sizes]
    if len(sizes) < 2 or not tensors:
        return plain
    if why is None and ref is None:
        why = "no sample has a finite loss with a nonzero gradient of its own"
    if why is None:
        shares = shares_from_weights(weights, sizes, N, wide)
        if shares is not None:
            return shares
        why = "the chunks' weights sum to zero"
    _warn(loss_fn, why)
    return plain


@outside_autocast
def data_shares(model, loss_fn, X, y, chunk: int):
    """The shares of the row chunks X[i:i + chunk] (`loss_shares`, one forward pass in
    eval mode, the model's flags restored: no running statistics move), or None where they
    are the plain n_b/N (one chunk, or a plain mean)."""
    N = len(X)
    if N <= chunk:
        return None
    with torch.no_grad(), kept_modes(model):
        model.train(False)
        shares = loss_shares(loss_fn, ((len(X[i:i + chunk]),
                                        lambda i=i: model(X[i:i + chunk]), y[i:i + chunk])
                                       for i in range(0, N, chunk)), N)
    return None if shares == [len(X[i:i + chunk]) / N for i in range(0, N, chunk)] else shares


@outside_autocast
def given_or_read_shares(chunk_shares, model, loss_fn, X, y, chunk: int):
    """A trial's `chunk_shares` option: the shares as given (None: the plain n_b/N), or,
    for "auto", read here (`data_shares`, one forward pass) — a caller running many trials
    reads them once and passes them on."""
    if isinstance(chunk_shares, str):
        if chunk_shares != "auto":
            raise ValueError(f"chunk_shares must be 'auto', None or a list of shares, got "
                             f"{chunk_shares!r}")
        return data_shares(model, loss_fn, X, y, chunk)
    return chunk_shares


@outside_autocast
def full_data_loss(model, loss_fn, X, y, chunk: int = 4096, shares=None) -> float:
    """Full-data loss over row chunks of `chunk`: Σ_b (n_b/N)·L_b, or Σ_b ω_b L_b with
    the chunks' `shares` from `data_shares` (chunks with ω_b = 0 left out)."""
    N = len(X)
    with torch.no_grad():
        if shares is None:
            tot = 0.0
            for i in range(0, N, chunk):
                tot += float(loss_fn(model(X[i:i + chunk]), y[i:i + chunk])) * len(X[i:i + chunk])
            return tot / N
        return sum(w * float(loss_fn(model(X[i:i + chunk]), y[i:i + chunk]))
                   for i, w in zip(range(0, N, chunk), shares, strict=True) if w > 0)
