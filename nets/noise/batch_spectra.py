"""The batch Hessian's top eigenvalue λ'_1(B): measured, and predicted from one pass.

Measured (`measure_batch_top_eigenvalue`): for each B, `n_batches` index sets S of size
B drawn without replacement (by default) from `numpy.random.default_rng(seed)`; the top
eigenvalue of H_B = (1/B) Σ_{i∈S} ∇²ℓ_i (or G_B) by restarted Lanczos.

Predicted (`predict_batch_top_eigenvalue`), THEORY.md §2–§3, with c = c(B, N) =
`rmt.batch_noise_factor(B, N)` and (λ, u) the top eigenpair of the full-data H:

    directional:  λ'(B) = λ + c·s_u²/λ,        s_u² = (1/(N−1)) Σ_i ‖(H_i − H)u‖²
    isotropic:    λ'(B) = λ + c·Pσ²_avg/λ      (unclipped spiked-Wigner form, s² = Pσ²)

`isotropic` is the unclipped form λ + v/λ, v = c·Pσ²_avg, for every B; the paper's
clipped form (2√v below the threshold λ ≤ √v) is `rmt.spiked_wigner_outlier(λ, v)`,
returned as "isotropic_clipped" when that function is available. Both forms are
second-order perturbation / large-P statements: they need λ to be a separated outlier.

Optionally (`subspace_k`), the quasi-degenerate subspace form of `nets.noise.subspace_noise`:
Löwdin partitioning onto the top-k eigenspace, λ'(B) ≈ E_S λ_max(Λ_k + a_S + c·D/λ_1)
with the in-subspace fluctuation a_S resampled exactly from per-sample k×k projections.

Optionally (`resolve_samples`), the sample-resolved form of `nets.noise.resolved_noise`: the
same subspace model, plus each sample in the batch whose own curvature spike γ_i/B
exceeds λ_1 kept exactly as a rank-one term. Per-sample curvatures of trained networks
are heavy-tailed, and at small B such samples, not the average noise, set λ'_1(B).
"""

from __future__ import annotations

import numpy as np

from rmt.validation import as_batch_sizes, as_int, as_seed
from rmt.sampling import batch_noise_factor

from nets.utils.jsonl_store import JsonlStore
from nets.algorithms.lanczos import eigsh
from nets.noise.directional import directional_noise_from_operator, isotropic_noise_from_operator
from nets.curvature.operators import curvature_operator

__all__ = ["measure_batch_top_eigenvalue", "predict_batch_top_eigenvalue"]


def measure_batch_top_eigenvalue(model, loss_fn, dataset, batch_sizes, n_batches=10,
                                 kind="hessian", seed=0, device=None, dtype=None, params=None,
                                 policy=None, replacement=False, tol=1e-8, store=None,
                                 tag="") -> dict:
    """Top eigenvalue of H_B (or G_B) over `n_batches` random batches per batch size.

    The batches of size B are drawn from `numpy.random.default_rng([seed, B])`, so each
    batch size's draws do not depend on which other sizes are measured. store: a
    `nets.utils.jsonl_store.JsonlStore` or a path (None: in memory only); each finished batch
    size is written atomically under "{tag}|{kind}|B=..|n=..|seed=..|repl=..", and a
    re-run after an interrupt reads it back instead of recomputing (bit-identical). A
    store belongs to one model and data set: use `tag` to tell runs apart.

    Returns {"mean", "std" (ddof=1; 0 for one batch), "stderr", "values" (list of
    arrays, one per B), "converged" (list of bool arrays), "indices" (list of
    (n_batches, B) sample-index arrays), "batch_sizes"} — numpy.
    The top eigenvalue is found to relative residual `tol` (eigenvalue error ≈ tol²
    relative); small batches cache their gradient graph across Lanczos products
    (`cache_graph="auto"` in `nets.curvature.operators`).
    """
    n_batches = as_int("n_batches", n_batches, minimum=1)
    if not isinstance(replacement, bool):
        raise TypeError("replacement must be a bool")
    full = curvature_operator(model, loss_fn, dataset, kind=kind, params=params, device=device,
                              dtype=dtype, policy=policy)
    Bs = as_batch_sizes(batch_sizes, full.N, replacement)
    seed = as_seed("seed", seed)
    if store is not None and not isinstance(store, JsonlStore):
        store = JsonlStore(store)
    values, conv, indices = [], [], []
    for B in Bs:
        key = f"{tag}|{kind}|B={int(B)}|n={n_batches}|seed={seed}|repl={replacement}"
        if store is not None and key in store:
            rec = store[key]
            vals = np.asarray(rec["values"], dtype=float)
            oks = np.asarray(rec["converged"], dtype=bool)
            idx_B = np.asarray(rec["indices"], dtype=np.int64).reshape(n_batches, int(B))
        else:
            rng = np.random.default_rng([seed, int(B)])
            vals, oks = np.empty(n_batches), np.empty(n_batches, dtype=bool)
            idx_B = np.empty((n_batches, int(B)), dtype=np.int64)
            for r in range(n_batches):
                idx = idx_B[r] = rng.choice(full.N, size=int(B), replace=replacement)
                op = full.subset(idx, cache_graph="auto")
                res = eigsh(op, k=1, which="LA", tol=tol, seed=int(rng.integers(2**31)),
                            return_vectors=False)
                vals[r], oks[r] = res.values[0], res.converged[0]
            if store is not None:
                store.put(key, {"values": [float(v) for v in vals],
                                "converged": [bool(o) for o in oks], "indices": idx_B})
        values.append(vals)
        conv.append(oks)
        indices.append(idx_B)
    mean = np.array([v.mean() for v in values])
    std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in values])
    return {"mean": mean, "std": std, "stderr": std / np.sqrt(n_batches), "values": values,
            "converged": conv, "indices": indices, "batch_sizes": Bs}


def predict_batch_top_eigenvalue(model, loss_fn, dataset, batch_sizes, kind="hessian", seed=0,
                                 device=None, dtype=None, params=None, policy=None,
                                 micro_batch=1, num_probes=10, replacement=False,
                                 subspace_k=None, subspace_batches=2000,
                                 subspace_self_consistent=False, resolve_samples=False,
                                 resolved_batches=2000, resolved_steps=None) -> dict:
    """Predicted λ'_1(B) from the full-data top eigenpair and one noise pass.

    Returns numpy arrays over batch_sizes: "isotropic" (unclipped λ + c·Pσ²_avg/λ),
    "directional" (λ + c·s_u²/λ), "directional_stderr" (c·stderr(s_u²)/λ),
    "isotropic_stderr", and, when `rmt.spiked_wigner_outlier` is implemented,
    "isotropic_clipped"; scalars "lam" (λ), "s2_directional", "s2_directional_stderr",
    "s2_isotropic" (Pσ²_avg), "s2_isotropic_stderr", "critical_batch_size" (s_u²/λ²),
    "N", "P"; and "c" (c(B,N) per batch size), "batch_sizes".
    micro_batch, num_probes : as in `nets.noise.directional` (probes for the isotropic average).

    subspace_k : None (default: skipped), "auto" (k = number of model outputs,
    `nets.noise.subspace_noise.default_subspace_dim`) or an int: adds "subspace" (the
    quasi-degenerate form E_S λ_max of the k×k batch model, `nets.noise.subspace_noise`, with
    `subspace_batches` resampled batches drawn with `seed`, complement term c·D/λ_1 or,
    with `subspace_self_consistent`, c·D/z solved per batch), "subspace_stderr"
    (Monte-Carlo), "subspace_k", "subspace_lams" (Λ_k). Needs micro_batch=1 (k
    per-sample products per sample; the top-k eigenpairs replace the k=1 solve, so λ and
    u are the first of them).

    resolve_samples : also return the sample-resolved form of `nets.noise.resolved_noise`
    ("resolved", "resolved_stderr" (Monte-Carlo, `resolved_batches` batches per B drawn
    with `seed`), "resolved_n" (mean number of resolved samples per batch), "resolved_m"
    (samples whose spike can be resolved at the smallest B), "resolved_k"): per-sample
    spikes with γ_i/B > λ_1 kept exactly, the rest as in the subspace form. Uses the
    subspace of `subspace_k` ("auto" when None). resolved_steps : per-sample Lanczos steps.
    """
    if not isinstance(replacement, bool):
        raise TypeError("replacement must be a bool")
    op = curvature_operator(model, loss_fn, dataset, kind=kind, params=params, device=device,
                            dtype=dtype, policy=policy)
    Bs = as_batch_sizes(batch_sizes, op.N, replacement)
    if not isinstance(resolve_samples, bool):
        raise TypeError("resolve_samples must be a bool")
    if resolve_samples and subspace_k is None:
        subspace_k = "auto"
    k_sub = None
    if subspace_k is not None:
        from nets.noise.subspace_noise import default_subspace_dim
        if micro_batch != 1:
            raise ValueError("subspace_k and resolve_samples need micro_batch=1 "
                             "(per-sample projections)")
        k_sub = (default_subspace_dim(model, dataset, op.P) if subspace_k == "auto"
                 else as_int("subspace_k", subspace_k, minimum=1))
        if k_sub > op.P:
            raise ValueError(f"subspace_k must be <= P={op.P}, got {k_sub}")
    top = eigsh(op, k=1 if k_sub is None else k_sub, which="LA", tol=1e-8, seed=seed)
    lam = float(top.values[0])
    if not lam > 0:
        raise ValueError(f"the top eigenvalue is {lam:.3g} <= 0: the outlier formulas need a "
                         "positive top eigenvalue")
    u = top.vectors[:, 0]
    dn = directional_noise_from_operator(op, u, micro_batch=micro_batch, seed=seed)
    iso = isotropic_noise_from_operator(op, num_probes=num_probes, micro_batch=micro_batch,
                                        seed=seed)
    c = np.array([batch_noise_factor(int(B), op.N, replacement=replacement) for B in Bs])
    out = {
        "directional": lam + c * dn.s2 / lam,
        "isotropic": lam + c * iso.s2 / lam,
        "directional_stderr": c * dn.stderr / lam,
        "isotropic_stderr": c * iso.stderr / lam,
        "lam": lam,
        "s2_directional": dn.s2,
        "s2_directional_stderr": dn.stderr,
        "s2_isotropic": iso.s2,
        "s2_isotropic_stderr": iso.stderr,
        "critical_batch_size": dn.s2 / lam ** 2,
        "c": c,
        "batch_sizes": Bs,
        "N": op.N,
        "P": op.P,
    }
    if k_sub is not None:
        from nets.noise.subspace_noise import subspace_batch_top_eigenvalue, subspace_noise_from_operator
        if resolve_samples:
            from nets.noise.resolved_noise import resolved_batch_top_eigenvalue, resolved_noise_from_operator
            rn = resolved_noise_from_operator(op, top.vectors, min_batch=int(Bs.min()),
                                              steps=resolved_steps, seed=seed)
            res = resolved_batch_top_eigenvalue(rn, Bs, n_batches=resolved_batches,
                                                replacement=replacement, seed=seed)
            sn = rn.subspace
            out.update({"resolved": res["mean"], "resolved_stderr": res["stderr"],
                        "resolved_n": res["n_resolved"], "resolved_m": int(rn.index.size),
                        "resolved_k": k_sub})
        else:
            sn = subspace_noise_from_operator(op, top.vectors)
        sub = subspace_batch_top_eigenvalue(sn, Bs, n_batches=subspace_batches,
                                            self_consistent=subspace_self_consistent,
                                            replacement=replacement, seed=seed)
        out.update({"subspace": sub["mean"], "subspace_stderr": sub["stderr"],
                    "subspace_k": k_sub, "subspace_lams": sn.lam})
    try:
        from rmt import spiked_wigner_outlier
        out["isotropic_clipped"] = np.array([spiked_wigner_outlier(lam, ci * iso.s2, clip=True)
                                             for ci in c])
    except NotImplementedError:
        pass
    return out
