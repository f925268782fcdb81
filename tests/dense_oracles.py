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


def dense_subspace_moments(Hs, H, U):
    """(a, D, S, C) on the span of the orthonormal columns of U (P, k), from dense per-sample
    Hessians Hs (N, P, P) with mean H, all numpy float64: a_i = sym(Uᵀ(H_i − H)U) (N, k, k),
    D = Σ_i R_iᵀR_i/(N−1) with R_i = (I − UUᵀ)(H_i − H)U, S = Σ_i a_i a_i/(N−1) and
    C = Σ_i vec(a_i)vec(a_i)ᵀ/(N−1) (k², k²)."""
    import numpy as np
    N = len(Hs)
    X = np.einsum("npq,qj->npj", Hs - H, U)                      # (H_i − H)U
    a = np.einsum("pi,npj->nij", U, X)
    R = X - np.einsum("pi,nij->npj", U, a)
    a = 0.5 * (a + a.transpose(0, 2, 1))
    D = np.einsum("npi,npj->ij", R, R) / (N - 1)
    S = np.einsum("nij,njl->il", a, a) / (N - 1)
    flat = a.reshape(N, -1)
    return a, D, S, flat.T @ flat / (N - 1)


def gaussian_top_eigenvalue(base, cov, n, rng):
    """Monte-Carlo λ_max(base + G) over n draws, vec(G) ~ N(0, cov) (cov (k², k²) PSD, base
    (k, k)): the (n,) values, by numpy eigendecompositions only."""
    import numpy as np
    k = base.shape[0]
    w, E = np.linalg.eigh(0.5 * (cov + cov.T))
    G = (rng.standard_normal((n, k * k)) @ (E * np.sqrt(np.clip(w, 0.0, None))).T)
    G = G.reshape(n, k, k)
    return np.linalg.eigvalsh(base[None] + 0.5 * (G + G.transpose(0, 2, 1)))[:, -1]


def vmapped_per_sample_hessians(model, loss_fn, X, y, names=None):
    """(Hs, H, ev, V) as conftest's `per_sample_hessians`, in one `vmap` of
    `torch.func.hessian` over the samples (each sample a batch of one): Hs (N, P, P) numpy
    float64, H their mean, its eigenvalues descending and eigenvectors as columns."""
    import numpy as np
    flat, state = flat_state(model, names)

    def one(x, t):
        return torch.func.hessian(lambda w: loss_fn(
            torch.func.functional_call(model, state(w), (x[None],)), t[None]))(flat)

    Hs = torch.func.vmap(one)(X, y).detach().numpy()
    H = Hs.mean(axis=0)
    ev, V = np.linalg.eigh(H)
    return Hs, H, ev[::-1].copy(), V[:, ::-1].copy()
