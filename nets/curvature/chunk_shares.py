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
L(b ∪ r) in z_r is w_r/(W_b + w_r) times the gradient of r's own loss ℓ_r, so with
t_b that ratio, W_b/w_r = 1/t_b − 1. Only the loss runs (on outputs already computed),
in float64. Where the loss is not of this form (the gradient in z_r not parallel to r's
own, a loss that fails on one sample, outputs that are not one tensor) or the shares
equal n_b/N to 1e-8 (a plain mean), the plain shares n_b/N are returned, exactly.
"""

from __future__ import annotations

import math

import torch

from nets.curvature.loss_check import _kept_loss_state

__all__ = ["data_shares", "full_data_loss", "loss_shares"]

_REF_CANDIDATES = 8         # samples of a chunk tried as the reference
_PLAIN_RTOL = 1e-8          # shares this close to n_b/N are the plain mean's
_PARALLEL_RTOL = 1e-6       # the gradient in z_r must be a multiple of r's own


def _cast(t, wide):
    """Detached; floating tensors in float64 when `wide`."""
    t = t.detach()
    return t.to(torch.float64) if wide and t.is_floating_point() else t


def _reference(loss_fn, out, y, wide):
    """(z_r, y_r, g_r): the sample among the first of the chunk whose own loss has the
    largest gradient in its outputs (a zero gradient carries no information)."""
    best, best_norm = None, 0.0
    for i in range(min(len(out), _REF_CANDIDATES)):
        z = _cast(out[i:i + 1], wide).requires_grad_(True)
        yi = _cast(y[i:i + 1], wide)
        loss = loss_fn(z, yi)
        if not (torch.is_tensor(loss) and loss.numel() == 1 and torch.isfinite(loss).all()):
            continue
        g = torch.autograd.grad(loss.reshape(()), z)[0]
        norm = float(torch.linalg.vector_norm(g))
        if math.isfinite(norm) and norm > best_norm:
            best, best_norm = (z.detach(), yi, g), norm
    return best


def _chunk_weight(loss_fn, out, y, ref, wide) -> float:
    """W_b/w_r for one chunk (NaN where the loss is not a target-weighted mean)."""
    z_r, y_r, g_r = ref
    zr = z_r.clone().requires_grad_(True)
    loss = loss_fn(torch.cat([_cast(out, wide), zr]), torch.cat([_cast(y, wide), y_r]))
    g = torch.autograd.grad(loss.reshape(()), zr)[0]
    t = float((g * g_r).sum() / (g_r * g_r).sum())
    off = float(torch.linalg.vector_norm(g - t * g_r))
    if not (math.isfinite(t) and 0.0 < t <= 1.0 + 1e-6
            and off <= (_PARALLEL_RTOL if wide else 1e-3) * float(torch.linalg.vector_norm(g))):
        return math.nan
    return max(1.0 / t - 1.0, 0.0)


def loss_shares(loss_fn, chunks, N: int) -> list[float]:
    """ω_b for the chunks (outputs, targets) in order, so that the full-data loss is
    Σ_b ω_b L_b (module docstring); n_b/N where the loss is a plain mean or not a
    target-weighted one. An all-ignored chunk gets ω_b = 0. The loss runs in float64
    where it accepts float64 outputs (a loss module with float32 class weights does not:
    then in the outputs' own precision, and shares within 1e-4 of n_b/N count as plain)."""
    sizes, weights, ref, plain_only, wide, pending = [], [], None, False, True, []
    for out, y in chunks:
        sizes.append(len(out))
        if plain_only:
            continue
        if not (torch.is_tensor(out) and torch.is_tensor(y) and len(y) == len(out)):
            plain_only = True
            continue
        try:
            with torch.enable_grad(), _kept_loss_state(loss_fn):
                if ref is None:
                    try:
                        ref = _reference(loss_fn, out, y, wide)
                    except RuntimeError:            # e.g. float32 class weights
                        wide = False
                        ref = _reference(loss_fn, out, y, wide)
                    pending.append((out, y))
                    if ref is None:     # no sample here with a loss of its own (all ignored)
                        continue
                    weights += [_chunk_weight(loss_fn, o, t, ref, wide) for o, t in pending]
                    pending = []
                else:
                    weights.append(_chunk_weight(loss_fn, out, y, ref, wide))
        except (RuntimeError, ValueError, TypeError, IndexError):
            plain_only = True           # a loss that cannot take one sample or a concatenation
    if ref is None:
        plain_only = True
    plain = [n / N for n in sizes]
    if plain_only or len(sizes) < 2 or not all(math.isfinite(w) for w in weights):
        return plain
    total = sum(weights)
    if not total > 0:
        return plain
    shares = [w / total for w in weights]
    tol = _PLAIN_RTOL if wide else 1e-4
    if all(abs(s - p) <= tol * p for s, p in zip(shares, plain)):
        return plain
    return shares


def data_shares(model, loss_fn, X, y, chunk: int):
    """The shares of the row chunks X[i:i + chunk] (`loss_shares`, one forward pass), or
    None where they are the plain n_b/N (one chunk, or a plain mean)."""
    N = len(X)
    if N <= chunk:
        return None
    with torch.no_grad():
        shares = loss_shares(loss_fn, ((model(X[i:i + chunk]), y[i:i + chunk])
                                       for i in range(0, N, chunk)), N)
    return None if shares == [len(X[i:i + chunk]) / N for i in range(0, N, chunk)] else shares


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
