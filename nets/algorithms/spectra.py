"""Extremal eigenvalues of a network's full-data Hessian or GGN (docs/theory.md §1).

`top_eigenvalues` / `bottom_eigenvalues` build the curvature operator of
`loss_fn(model(X), y)` over the dataset pair (X, y) (see `nets.curvature.operators`) and run the
thick-restart Lanczos eigensolver `nets.algorithms.lanczos.eigsh` on it.
"""

from __future__ import annotations

import warnings

import numpy as np

from nets.algorithms.lanczos import EigenResult, eigsh
from nets.curvature.loss_check import mean_reduction_check
from nets.curvature.operators import curvature_operator
from nets.utils.autocast import outside_autocast
from nets.utils.callers import caller_stacklevel
from rmt.validation import as_int

__all__ = ["top_eigenvalues", "bottom_eigenvalues", "extremal_eigenpairs"]


@outside_autocast
def extremal_eigenpairs(model, loss_fn, data, k=1, *, which="LA", kind="hessian", tol=1e-10,
                        max_steps=None, params=None, policy=None, chunk_size=None, device=None,
                        dtype=None, seed=0, check_multiplicity=True,
                        progress=None) -> EigenResult:
    """The full `EigenResult` (values, eigenvectors, residuals, convergence flags) of
    the k eigenpairs of H (kind="hessian") or G (kind="ggn") selected by `which`
    ("LA" largest, "SA" smallest, "LM" largest magnitude). check_multiplicity (k ≥ 2):
    also find every copy of a repeated eigenvalue (`nets.algorithms.lanczos.eigsh`; a
    run of its own, +11 to +15 products on a digits MLP)."""
    k = as_int("k", k, minimum=1)
    op = curvature_operator(model, loss_fn, data, kind=kind, params=params, device=device,
                            dtype=dtype, policy=policy, chunk_size=chunk_size)
    mean_reduction_check(model, loss_fn, op.source)
    return eigsh(op, k=k, which=which, tol=tol, max_steps=max_steps, seed=seed,
                 check_multiplicity=check_multiplicity, progress=progress)


@outside_autocast
def top_eigenvalues(model, loss_fn, data, k=1, *, kind="hessian", tol=1e-10, params=None,
                    policy=None, chunk_size=None, device=None, dtype=None, seed=0,
                    check_multiplicity=True, progress=None) -> np.ndarray:
    """The k largest eigenvalues of the full-data H or G, descending (numpy float64).

    data : an (X, y) pair, a torch Dataset of (x, y) samples or a re-iterable of (x, y)
    batches such as a non-shuffling DataLoader (`nets.utils.data_source`); the same
    numbers for each form. chunk_size: at most this many samples per pass (memory; the
    average is exact whatever the chunking); device/dtype: where and in what precision
    the products run (float64 gives eigenvalues to ~1e-10 relative, float32 to ~1e-5;
    default: the model's); floating data are cast to that dtype and moved to that
    device, integer data (labels, token ids) only moved; seed: Lanczos start vector (an
    int >= 0 or a numpy Generator); params/policy: as in
    `nets.curvature.operators.hessian_operator`; progress: a tqdm bar over Lanczos
    restarts (None: only on a terminal for long runs); check_multiplicity: every copy
    of a repeated eigenvalue (k ≥ 2; `extremal_eigenpairs`).

    Warns (UserWarning) when an eigenvalue misses `tol` within Lanczos' product budget.
    Raises ValueError for NaN/inf in data, parameters or buffers, empty data, a shuffling
    DataLoader, a train-mode BatchNorm/Dropout/RReLU without `policy`, a non-scalar loss,
    or NaN/inf curvature products; TypeError for arguments of the wrong kind.
    """
    return _values(extremal_eigenpairs(model, loss_fn, data, k, which="LA", kind=kind, tol=tol,
                                       params=params, policy=policy, chunk_size=chunk_size,
                                       device=device, dtype=dtype, seed=seed,
                                       check_multiplicity=check_multiplicity,
                                       progress=progress), tol)


@outside_autocast
def bottom_eigenvalues(model, loss_fn, data, k=1, *, kind="hessian", tol=1e-10, params=None,
                       policy=None, chunk_size=None, device=None, dtype=None, seed=0,
                       check_multiplicity=True, progress=None) -> np.ndarray:
    """The k smallest (most negative) eigenvalues, ascending; as `top_eigenvalues`."""
    return _values(extremal_eigenpairs(model, loss_fn, data, k, which="SA", kind=kind, tol=tol,
                                       params=params, policy=policy, chunk_size=chunk_size,
                                       device=device, dtype=dtype, seed=seed,
                                       check_multiplicity=check_multiplicity,
                                       progress=progress), tol)


def _values(res: EigenResult, tol) -> np.ndarray:
    """The eigenvalues, with a warning when some missed the tolerance (the plain array
    has no convergence flags; `extremal_eigenpairs` returns them)."""
    bad = ~np.asarray(res.converged, dtype=bool)
    if bad.any():
        warnings.warn(
            f"Lanczos stopped after {res.num_matvecs} products with {int(bad.sum())} of "
            f"{bad.size} eigenvalues short of the tolerance tol={tol:g} (largest residual "
            f"{float(np.max(np.asarray(res.residuals)[bad])):.3g}; an eigenvalue at 0, where a "
            "relative tolerance cannot be met, does this): they are approximate; "
            "nets.algorithms.extremal_eigenpairs gives the residuals and flags", UserWarning,
            stacklevel=caller_stacklevel())
    return res.values
