"""Extremal eigenvalues of a network's full-data Hessian or GGN (THEORY.md §1).

`top_eigenvalues` / `bottom_eigenvalues` build the curvature operator of
`loss_fn(model(X), y)` over the dataset pair (X, y) (see `nets.curvature.operators`) and run the
thick-restart Lanczos eigensolver `nets.algorithms.lanczos.eigsh` on it.
"""

from __future__ import annotations

import numpy as np

from rmt.validation import as_int

from nets.algorithms.lanczos import EigenResult, eigsh
from nets.curvature.operators import curvature_operator

__all__ = ["top_eigenvalues", "bottom_eigenvalues", "extremal_eigenpairs"]


def extremal_eigenpairs(model, loss_fn, dataset, k=1, which="LA", kind="hessian",
                        batch_size=None, device=None, dtype=None, seed=0, params=None,
                        policy=None, tol=1e-10, max_steps=None) -> EigenResult:
    """The full `EigenResult` (values, eigenvectors, residuals, convergence flags) of
    the k eigenpairs of H (kind="hessian") or G (kind="ggn") selected by `which`
    ("LA" largest, "SA" smallest, "LM" largest magnitude)."""
    k = as_int("k", k, minimum=1)
    op = curvature_operator(model, loss_fn, dataset, kind=kind, params=params, device=device,
                            dtype=dtype, policy=policy, batch_size=batch_size)
    return eigsh(op, k=k, which=which, tol=tol, max_steps=max_steps, seed=seed)


def top_eigenvalues(model, loss_fn, dataset, k=1, kind="hessian", batch_size=None,
                    device=None, dtype=None, seed=0, params=None, policy=None,
                    tol=1e-10) -> np.ndarray:
    """The k largest eigenvalues of the full-data H or G, descending (numpy float64).

    dataset : pair (X, y); batch_size splits the full-data product into chunks (exact
    n_b/N weighting); device/dtype: where and in what precision the products run
    (float64 gives eigenvalues to ~1e-10 relative, float32 to ~1e-5; default: the
    model's); floating data are cast to that dtype and moved to that device, integer
    data (labels, token ids) only moved; seed: Lanczos start vector (an int >= 0);
    params/policy: as in `nets.curvature.operators.hessian_operator`.

    Raises ValueError for NaN/inf in data, parameters or buffers, empty data, a
    train-mode BatchNorm/Dropout/RReLU without `policy`, a non-scalar loss, or NaN/inf
    curvature products; TypeError for arguments of the wrong kind.
    """
    return extremal_eigenpairs(model, loss_fn, dataset, k, "LA", kind, batch_size, device,
                               dtype, seed, params, policy, tol).values


def bottom_eigenvalues(model, loss_fn, dataset, k=1, kind="hessian", batch_size=None,
                       device=None, dtype=None, seed=0, params=None, policy=None,
                       tol=1e-10) -> np.ndarray:
    """The k smallest (most negative) eigenvalues, ascending; as `top_eigenvalues`."""
    return extremal_eigenpairs(model, loss_fn, dataset, k, "SA", kind, batch_size, device,
                               dtype, seed, params, policy, tol).values
