"""The batch curvature's top eigenvalue λ'_1(B): measured, and predicted from one pass.

Measured (`measure_batch_top_eigenvalue`): for each B, `n_batches` index sets S of size
B drawn without replacement (by default) from `numpy.random.default_rng([seed, B])`; the
top eigenvalue of H_B = (1/B) Σ_{i∈S} ∇²ℓ_i (or G_B) by restarted Lanczos.

Predicted (`predict_batch_top_eigenvalue`), docs/theory.md §2–§3, with c = c(B, N) =
`rmt.batch_noise_factor(B, N)` (1/B − 1/N without replacement) and (λ, u) the top
eigenpair of the full-data H. One small function per form:

    isotropic_form:    λ'(B) = λ + c·Pσ²_avg/λ          (clip=True: the spiked-Wigner
                       outlier λ + v/λ above the threshold λ > √v, else the edge 2√v,
                       v = c·Pσ²_avg)
    directional_form:  λ'(B) = λ + c·s_u²/λ,    s_u² = (1/(N−1)) Σ_i ‖(H_i − H)u‖²
    subspace_form:     λ'(B) = E_S λ_max(Λ_k + a_S + c·D/λ_1)   (`nets.noise.subspace_noise`)
    resolved_form:     the subspace model plus every sample of the batch whose own
                       spike γ_i/B exceeds λ_1 kept exactly (`nets.noise.resolved_noise`)

The isotropic and directional forms are second-order perturbation / large-P statements
and need λ to be a separated outlier. Per-sample curvatures of trained networks are
heavy-tailed, and at small B single samples, not the average noise, set λ'_1(B): the
resolved form accounts for them.
"""

from __future__ import annotations

import math

import numpy as np

from nets.algorithms.lanczos import eigsh
from nets.curvature.loss_check import mean_reduction_check
from nets.curvature.operators import curvature_operator
from nets.noise.directional import directional_noise_from_operator, isotropic_noise_from_operator
from nets.utils.autocast import outside_autocast
from nets.utils.fingerprints import code_fingerprint, data_fingerprint, digest, tensor_bytes
from nets.utils.jsonl_store import JsonlStore
from nets.utils.plotting import batch_size_axis, in_b_order
from nets.utils.progress import progress_bar
from nets.utils.results import Result, result
from nets.utils.seeding import resolved_seed
from rmt.sampling import batch_noise_factor
from rmt.spiked_wigner import spiked_wigner_outlier
from rmt.validation import as_batch_sizes, as_bool, as_float, as_int

__all__ = ["measure_batch_top_eigenvalue", "predict_batch_top_eigenvalue", "BatchTopEigenvalues",
           "BatchTopEigenvaluePrediction", "FormCurve", "isotropic_form", "directional_form",
           "subspace_form", "resolved_form", "FORMS"]

#: the forms of λ'(B) that `predict_batch_top_eigenvalue` computes, in display order
FORMS = ("isotropic", "directional", "subspace", "resolved")


# ------------------------------------------------------------------------ results

@result
class BatchTopEigenvalues(Result):
    """Measured top eigenvalue of H_B (or G_B) per batch size.

    batch_sizes : (n_B,); mean, std (ddof=1; NaN for one batch, as for one probe of a
    trace: 0 was a zero-width error bar on one random draw), stderr = std/√n_batches :
    (n_B,); values, converged : one (n_batches,) array per B; indices : one
    (n_batches, B) sample-index array per B; n_batches; kind; seed (the int seed used)."""

    batch_sizes: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    stderr: np.ndarray
    values: list
    converged: list
    indices: list
    n_batches: int
    kind: str
    seed: int | None

    def plot(self, ax=None, *, label="measured", color="k"):
        """Mean ± stderr against B on log-log axes; returns the axes."""
        ax = _axes(ax)
        ax.errorbar(self.batch_sizes, self.mean, yerr=self.stderr, fmt="o", color=color,
                    capsize=3, label=label)
        batch_size_axis(ax)
        ax.set_yscale("log")
        ax.set_ylabel("top eigenvalue λ'₁(B)")
        return ax


@result
class FormCurve(Result):
    """One form of λ'(B): values and their standard error per batch size (stderr from
    the noise estimate for the closed forms, Monte-Carlo for the sampled ones); c :
    c(B, N); n_resolved : mean number of resolved samples per batch (resolved form only)."""

    values: np.ndarray
    stderr: np.ndarray
    batch_sizes: np.ndarray
    c: np.ndarray
    n_resolved: np.ndarray | None = None


@result
class BatchTopEigenvaluePrediction(Result):
    """Predicted λ'_1(B), one entry per form computed (`forms`); the fields of forms not
    computed are None.

    isotropic (+ _stderr, and isotropic_clipped: the clipped spiked-Wigner variant),
    directional, subspace, resolved (+ _stderr): (n_B,) arrays; lam : λ; s2_directional
    (s_u²), s2_isotropic (Pσ²_avg) and their _stderr; critical_batch_size = s_u²/λ²;
    subspace_k, subspace_lams (Λ_k); resolved_n (mean resolved samples per batch),
    resolved_m (samples resolvable at the smallest B); c : c(B, N); N, P; kind; seed;
    micro_batch : the group size m of the directional/isotropic noise pass (None when
    neither was computed); resolved_rows : the resolved form's sampled population size
    (None: every sample, or form not computed); resolved_per_sample : "products" or
    "ggn", how the resolved form got its per-sample quantities (what "auto" chose)."""

    forms: tuple
    batch_sizes: np.ndarray
    lam: float
    N: int
    P: int
    c: np.ndarray
    kind: str
    seed: int | None
    directional: np.ndarray | None = None
    directional_stderr: np.ndarray | None = None
    isotropic: np.ndarray | None = None
    isotropic_stderr: np.ndarray | None = None
    isotropic_clipped: np.ndarray | None = None
    subspace: np.ndarray | None = None
    subspace_stderr: np.ndarray | None = None
    resolved: np.ndarray | None = None
    resolved_stderr: np.ndarray | None = None
    s2_directional: float | None = None
    s2_directional_stderr: float | None = None
    s2_isotropic: float | None = None
    s2_isotropic_stderr: float | None = None
    critical_batch_size: float | None = None
    subspace_k: int | None = None
    subspace_lams: np.ndarray | None = None
    resolved_n: np.ndarray | None = None
    resolved_m: int | None = None
    micro_batch: int | None = None
    resolved_rows: int | None = None
    resolved_per_sample: str | None = None

    def plot(self, ax=None, measured=None):
        """Each computed form against B (log-log) and, when `measured` (a
        `BatchTopEigenvalues`) is given, its means with stderr bars; returns the axes."""
        ax = _axes(ax)
        styles = {"resolved": ("C2", "-"), "directional": ("C0", "--"),
                  "subspace": ("C1", ":"), "isotropic": ("C3", "-.")}
        for form in self.forms:
            color, ls = styles[form]
            ax.plot(*in_b_order(self.batch_sizes, self[form]), ls, color=color, label=form)
        if self.isotropic_clipped is not None:
            ax.plot(*in_b_order(self.batch_sizes, self.isotropic_clipped), ":", color="C3",
                    label="isotropic (clipped)")
        if measured is not None:
            if not isinstance(measured, BatchTopEigenvalues):
                raise TypeError("measured must be a BatchTopEigenvalues "
                                "(from measure_batch_top_eigenvalue)")
            measured.plot(ax)
        batch_size_axis(ax)
        ax.set_yscale("log")
        ax.set_ylabel("top eigenvalue λ'₁(B)")
        ax.legend()
        return ax


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt
        ax = plt.gca()
    return ax


# ------------------------------------------------------------------------ measured

def _model_fingerprint(model) -> str:
    """Short hash of every parameter and buffer (names, dtypes, shapes and exact bytes)."""
    chunks = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        chunks += [name.encode(), tensor_bytes(t)]
    return digest(*chunks)


def _store_key(tag, op, B, *, n_batches, seed, replacement, tol, params_used, policy,
               chunk_size, model_fp, data_fp) -> str:
    return (f"{tag}|{op.kind}|B={int(B)}|n={n_batches}|seed={seed}|repl={replacement}"
            f"|tol={tol!r}|dtype={op.dtype}|device={op.device.type}|params={params_used}"
            f"|policy={policy}|chunk={chunk_size}|model={model_fp}|data={data_fp}")


@outside_autocast
def measure_batch_top_eigenvalue(model, loss_fn, data, batch_sizes, *, n_batches=10,
                                 kind="hessian", replacement=False, tol=1e-8, store=None,
                                 tag="", params=None, policy=None, chunk_size=None, device=None,
                                 dtype=None, seed=0, progress=None) -> BatchTopEigenvalues:
    """Top eigenvalue of H_B (or G_B, kind="ggn") over `n_batches` random batches per B.

    data : an (X, y) pair, a torch Dataset or a non-shuffling re-iterable of (x, y)
    batches (`nets.utils.data_source`). The batches of size B are drawn from
    `numpy.random.default_rng([seed, B])` (without replacement unless `replacement`),
    so each batch size's draws do not depend on which other sizes are measured; each
    batch's top eigenvalue is found by Lanczos (`eigsh`) to relative residual `tol`
    (eigenvalue error ≈ tol² relative), started from a seed drawn from the same stream.

    store : a `nets.utils.jsonl_store.JsonlStore` or a path (None: in memory only); each
    finished batch size is written atomically, and a re-run reads it back instead of
    recomputing (bit-identical). The key holds every setting that changes a number
    (kind, B, n_batches, seed, replacement, tol, dtype, device type, the parameters
    differentiated, policy, chunk_size) and short hashes of the model's parameters and
    buffers, of its structure and the loss function (`nets.utils.fingerprints`) and of the
    data, so other settings, another model or another loss never read stale values;
    `tag` adds a free label. progress : a bar over batches (`nets.utils.progress`).
    """
    n_batches = as_int("n_batches", n_batches, minimum=1)
    replacement = as_bool("replacement", replacement)
    tol = as_float("tol", tol, positive=True)
    full = curvature_operator(model, loss_fn, data, kind=kind, params=params, policy=policy,
                              chunk_size=chunk_size, device=device, dtype=dtype)
    mean_reduction_check(model, loss_fn, full.source)
    Bs = as_batch_sizes(batch_sizes, full.N, replacement)
    seed = resolved_seed("seed", seed)
    if store is not None and not isinstance(store, JsonlStore):
        store = JsonlStore(store)
    keys = {}
    if store is not None:
        fps = dict(model_fp=_model_fingerprint(model) + code_fingerprint(model, loss_fn),
                   data_fp=data_fingerprint(full.source), params_used=digest(*full.layout.names))
        keys = {int(B): _store_key(tag, full, B, n_batches=n_batches, seed=seed,
                                   replacement=replacement, tol=tol, policy=policy,
                                   chunk_size=chunk_size, **fps) for B in Bs}
    done = {int(B): _read_record(store[keys[int(B)]], n_batches, int(B))
            for B in Bs if store is not None and keys[int(B)] in store}
    todo = [(int(B), r) for B in Bs if int(B) not in done for r in range(n_batches)]
    for B, r in progress_bar(todo, progress=progress, total=len(todo), desc="batch top eigenvalues"):
        if r == 0:
            rng = np.random.default_rng([seed, B])
            vals, oks = np.empty(n_batches), np.empty(n_batches, dtype=bool)
            idx_B = np.empty((n_batches, B), dtype=np.int64)
        idx = idx_B[r] = rng.choice(full.N, size=B, replace=replacement)
        op = full.subset(idx, cache_graph="auto")
        res = eigsh(op, k=1, which="LA", tol=tol, seed=int(rng.integers(2**31)),
                    return_vectors=False, progress=False)        # under the batches' bar
        vals[r], oks[r] = res.values[0], res.converged[0]
        if r == n_batches - 1:
            done[B] = (vals, oks, idx_B)
            if store is not None and keys[B] not in store:
                store.put(keys[B], {"values": [float(v) for v in vals],
                                    "converged": [bool(o) for o in oks], "indices": idx_B})
    values, conv, indices = zip(*(done[int(B)] for B in Bs))
    mean = np.array([v.mean() for v in values])
    std = np.array([v.std(ddof=1) if len(v) > 1 else np.nan for v in values])   # one batch: unknown
    return BatchTopEigenvalues(batch_sizes=Bs, mean=mean, std=std, stderr=std / np.sqrt(n_batches),
                               values=list(values), converged=list(conv), indices=list(indices),
                               n_batches=n_batches, kind=full.kind, seed=seed)


def _read_record(rec, n_batches, B):
    return (np.asarray(rec["values"], dtype=float), np.asarray(rec["converged"], dtype=bool),
            np.asarray(rec["indices"], dtype=np.int64).reshape(n_batches, B))


# ------------------------------------------------------------------------ the forms

def _noise_factors(batch_sizes, N, replacement) -> tuple[np.ndarray, np.ndarray]:
    N = as_int("N", N, minimum=1)
    Bs = as_batch_sizes(batch_sizes, N, replacement)
    return Bs, np.array([batch_noise_factor(int(B), N, replacement=replacement) for B in Bs])


def _check_scalars(lam, s2, s2_stderr):
    """λ > 0 and s2 finite (an estimate of zero noise may round to a tiny negative);
    s2_stderr may be NaN (one isotropic probe)."""
    lam = as_float("lam", lam)
    if not lam > 0:
        raise ValueError(f"the top eigenvalue lam is {lam:.3g} <= 0: the outlier formulas need a "
                         "positive top eigenvalue")
    s2 = as_float("s2", s2)
    s2_stderr = float(s2_stderr)
    if s2_stderr < 0 or math.isinf(s2_stderr):
        raise ValueError(f"s2_stderr must be >= 0 and finite (or NaN), got {s2_stderr}")
    return lam, s2, s2_stderr


def isotropic_form(lam, s2, batch_sizes, N, *, s2_stderr=0.0, replacement=False,
                   clip=False) -> FormCurve:
    """Isotropic (spiked-Wigner) form, docs/theory.md §2: with v = c(B,N)·Pσ²_avg,

        clip=False:  λ'(B) = λ + v/λ                         (for every B)
        clip=True:   λ'(B) = λ + v/λ if λ > √v, else 2√v     (`rmt.spiked_wigner_outlier`)

    lam : λ > 0; s2 : Pσ²_avg (`nets.noise.directional.isotropic_noise`); s2_stderr : its
    standard error, propagated linearly (NaN stays NaN)."""
    lam, s2, se = _check_scalars(lam, s2, s2_stderr)
    Bs, c = _noise_factors(batch_sizes, N, replacement)
    v = c * s2
    if not clip:
        return FormCurve(values=lam + v / lam, stderr=c * se / lam, batch_sizes=Bs, c=c)
    v = np.maximum(v, 0.0)
    vals = np.array([spiked_wigner_outlier(lam, vi, clip=True) for vi in v])
    above = lam * lam > v
    slope = np.where(above, 1.0 / lam, 1.0 / np.sqrt(np.where(above, 1.0, v)))   # dλ'/dv
    return FormCurve(values=vals, stderr=slope * c * se, batch_sizes=Bs, c=c)


def directional_form(lam, s2, batch_sizes, N, *, s2_stderr=0.0, replacement=False) -> FormCurve:
    """Directional form, docs/theory.md §3.3:  λ'(B) = λ + c(B,N)·s_u²/λ,

    s_u² = (1/(N−1)) Σ_i ‖(H_i − H)u‖² along the top eigenvector u
    (`nets.noise.directional.directional_noise`); stderr = c·s2_stderr/λ."""
    lam, s2, se = _check_scalars(lam, s2, s2_stderr)
    Bs, c = _noise_factors(batch_sizes, N, replacement)
    return FormCurve(values=lam + c * s2 / lam, stderr=c * se / lam, batch_sizes=Bs, c=c)


def subspace_form(noise, batch_sizes, *, n_batches=2000, replacement=False, seed=0) -> FormCurve:
    """Quasi-degenerate subspace form, docs/theory.md §3.6: on the top-k eigenspace U,

        λ'(B) = E_S λ_max(Λ_k + a_S + c(B,N)·D/λ_1),   a_S = mean_{i∈S} Uᵀ(H_i − H)U,

    D the complement noise (`nets.noise.subspace_noise.SubspaceNoise`, `noise`), averaged
    over `n_batches` batches resampled from `numpy.random.default_rng(seed)`; stderr is
    the Monte-Carlo standard error."""
    from nets.noise.subspace_noise import subspace_batch_top_eigenvalue
    out = subspace_batch_top_eigenvalue(noise, batch_sizes, n_batches=n_batches,
                                        replacement=replacement, seed=seed)
    return FormCurve(values=out["mean"], stderr=out["stderr"], batch_sizes=out["batch_sizes"],
                     c=out["c"])


def resolved_form(noise, batch_sizes, *, n_batches=2000, replacement=False, seed=0) -> FormCurve:
    """Sample-resolved form, docs/theory.md §3.7: the subspace model plus, exactly, the
    top curvature spike γ_i v_i v_iᵀ/B of every sample of the batch with γ_i/B > λ_1,

        λ'(B) = E_S λ_max(A_S, W_Sᵀ W_S)     (the pencil of `nets.noise.resolved_noise`),

    `noise` a `nets.noise.resolved_noise.ResolvedNoise`; `n_batches` batches from
    `numpy.random.default_rng(seed)`; stderr Monte-Carlo; n_resolved per B."""
    from nets.noise.resolved_noise import resolved_batch_top_eigenvalue
    out = resolved_batch_top_eigenvalue(noise, batch_sizes, n_batches=n_batches,
                                        replacement=replacement, seed=seed)
    return FormCurve(values=out["mean"], stderr=out["stderr"], batch_sizes=out["batch_sizes"],
                     c=out["c"], n_resolved=out["n_resolved"])


# ------------------------------------------------------------------------ predicted

def _as_forms(form) -> tuple[str, ...]:
    names = [form] if isinstance(form, str) else form
    if isinstance(names, (list, tuple)) and names and all(isinstance(f, str) for f in names):
        if list(names) == ["all"]:
            return FORMS
        bad = [f for f in names if f not in FORMS]
        if not bad:
            return tuple(f for f in FORMS if f in names)
    raise ValueError(f"form must be one of {FORMS + ('all',)} or a list of them, got {form!r}")


def _mc_batches(n_batches_mc, form) -> int:
    n = n_batches_mc.get(form, 2000) if isinstance(n_batches_mc, dict) else n_batches_mc
    return as_int("n_batches_mc", n, minimum=1)


def _subspace_dim(model, op, subspace_dim) -> int:
    if subspace_dim is None:
        from nets.noise.subspace_noise import default_subspace_dim
        return default_subspace_dim(model, op.source.take([0], device=op.device, dtype=op.dtype),
                                    op.P, op.loss_fn)
    k = as_int("subspace_dim", subspace_dim, minimum=1)
    if k > op.P:
        raise ValueError(f"subspace_dim must be <= P={op.P}, got {k}")
    return k


@outside_autocast
def predict_batch_top_eigenvalue(model, loss_fn, data, batch_sizes, *, form="directional",
                                 kind="hessian", num_probes=10, subspace_dim=None,
                                 n_batches_mc=2000, micro_batch="auto", replacement=False,
                                 params=None, policy=None, chunk_size=None, device=None,
                                 dtype=None, seed=0, per_sample="auto",
                                 progress=None) -> BatchTopEigenvaluePrediction:
    """Predicted λ'_1(B) from the full-data top eigenpair and one noise pass per form.

    form : "isotropic", "directional" (default), "subspace", "resolved", "all", or a list
        of them; only what the requested forms need is computed (the module docstring
        and `isotropic_form` … `resolved_form` give the equations):
        isotropic   — λ (k=1 Lanczos) and `num_probes` Rademacher noise probes; also
                      returns the clipped spiked-Wigner variant as isotropic_clipped;
        directional — λ, u (k=1 Lanczos) and one per-sample pass along u (beyond a few
                      hundred samples over seeded sample groups until s_u²'s standard
                      error is 5 % of it, `nets.noise.directional`: a seed or a row
                      permutation moves it by a few per cent; `directional_noise(...,
                      exact=True)` sums every sample);
        subspace    — the top-k eigenpairs (k = `subspace_dim`; None: the number of model
                      outputs, `nets.noise.subspace_noise.default_subspace_dim`) and one
                      per-sample pass of k products; λ and u are then the first pair;
        resolved    — as subspace, plus per-sample Lanczos spikes (`nets.noise.resolved_noise`,
                      its defaults: every sample, at most 256 candidate spike vectors).
    per_sample : how the resolved form gets its per-sample quantities: "products"
        (k per-sample curvature products and a per-sample Lanczos run for every sample),
        "ggn" (from the per-sample Gauss–Newton factors, C×C and C×k matrices per
        sample, `nets.noise.ggn_samples`: about 20× cheaper at ~300k parameters, and a
        good approximation of the Hessian's fluctuations near a minimum of a
        cross-entropy network, not at initialisation), or "auto" (default: "ggn" once
        N·P > 2²⁷ and if it passes its check of the directional noise,
        `nets.noise.resolved_noise.resolved_noise_from_operator`).
    micro_batch : m ≥ 1 or "auto" (default: per-sample while N·P ≤ 2²⁷, else about 256
        groups of m = ⌊N/256⌋), as in
        `nets.noise.directional` (directional/isotropic only; subspace and resolved need
        per-sample projections and always use m = 1, so only an explicit m > 1 is refused).
    n_batches_mc : Monte-Carlo batches per B of the subspace and resolved forms (an int, or
        a dict {"subspace": n, "resolved": n}).
    chunk_size : samples per forward/backward pass of the full-data products (memory).
    seed : int, numpy Generator (one int is drawn) or None (one int drawn from fresh
        entropy, recorded as `seed`); it seeds the Lanczos start, the
        micro-batch partition, the probes and the Monte-Carlo batches.
    Returns a `BatchTopEigenvaluePrediction` (fields of forms not computed are None).
    """
    forms = _as_forms(form)
    if per_sample not in ("products", "ggn", "auto"):
        raise ValueError(f"per_sample must be 'products', 'ggn' or 'auto', got {per_sample!r}")
    replacement = as_bool("replacement", replacement)
    seed = resolved_seed("seed", seed)
    if not (isinstance(micro_batch, str) and micro_batch == "auto"):
        micro_batch = as_int("micro_batch", micro_batch, minimum=1)
    # every option is checked whichever forms use it (a num_probes=-1 passed silently
    # with the default form, and transfer_lr ran its whole computation on it)
    as_int("num_probes", num_probes, minimum=1)
    for f in ("subspace", "resolved"):
        _mc_batches(n_batches_mc, f)
    if subspace_dim is not None:
        as_int("subspace_dim", subspace_dim, minimum=1)
    op = curvature_operator(model, loss_fn, data, kind=kind, params=params, policy=policy,
                            chunk_size=chunk_size, device=device, dtype=dtype)
    mean_reduction_check(model, loss_fn, op.source)
    Bs = as_batch_sizes(batch_sizes, op.N, replacement)
    sampled = [f for f in forms if f in ("subspace", "resolved")]
    k_sub = None
    if sampled:
        if micro_batch not in (1, "auto"):
            raise ValueError(f"form {sampled[0]!r} needs micro_batch=1 (per-sample projections), "
                             f"got micro_batch={micro_batch}")
        k_sub = _subspace_dim(model, op, subspace_dim)
    top = eigsh(op, k=1 if k_sub is None else k_sub, which="LA", tol=1e-8, seed=seed,
                progress=progress)
    lam = float(top.values[0])
    if not lam > 0 or top.is_zero(0):
        raise ValueError(f"the top eigenvalue is {lam:.3g}, not positive (zero to precision "
                         f"below {top.zero_tol:.2g} at ‖H‖ ≈ {top.norm_estimate:.3g}): the "
                         "outlier formulas need a positive top eigenvalue")
    c = np.array([batch_noise_factor(int(B), op.N, replacement=replacement) for B in Bs])
    out = dict(forms=forms, batch_sizes=Bs, lam=lam, N=op.N, P=op.P, c=c, kind=op.kind, seed=seed)
    common = dict(batch_sizes=Bs, N=op.N, replacement=replacement)
    if "directional" in forms:
        dn = directional_noise_from_operator(op, top.vectors[:, 0], micro_batch=micro_batch,
                                             seed=seed, progress=progress)
        curve = directional_form(lam, dn.s2, s2_stderr=dn.stderr, **common)
        out.update(directional=curve.values, directional_stderr=curve.stderr,
                   s2_directional=dn.s2, s2_directional_stderr=dn.stderr,
                   critical_batch_size=dn.s2 / lam ** 2, micro_batch=dn.micro_batch)
    if "isotropic" in forms:
        iso = isotropic_noise_from_operator(op, num_probes=num_probes, micro_batch=micro_batch,
                                            seed=seed, progress=progress)
        curve = isotropic_form(lam, iso.s2, s2_stderr=iso.stderr, **common)
        clipped = isotropic_form(lam, iso.s2, s2_stderr=iso.stderr, clip=True, **common)
        out.update(isotropic=curve.values, isotropic_stderr=curve.stderr,
                   isotropic_clipped=clipped.values, s2_isotropic=iso.s2,
                   s2_isotropic_stderr=iso.stderr, micro_batch=iso.micro_batch)
    if sampled:
        out.update(_sampled_forms(op, top.vectors, Bs, sampled, n_batches_mc=n_batches_mc,
                                  replacement=replacement, seed=seed, per_sample=per_sample,
                                  progress=progress))
    return BatchTopEigenvaluePrediction(**out)


def _sampled_forms(op, U, Bs, forms, *, n_batches_mc, replacement, seed,
                   per_sample="products", progress=None) -> dict:
    """The subspace and/or resolved forms on the span of U (one per-sample pass)."""
    out = {}
    if "resolved" in forms:
        from nets.noise.resolved_noise import resolved_noise_from_operator
        rn = resolved_noise_from_operator(op, U, min_batch=int(Bs.min()), seed=seed,
                                          per_sample=per_sample, progress=progress)
        curve = resolved_form(rn, Bs, n_batches=_mc_batches(n_batches_mc, "resolved"),
                              replacement=replacement, seed=seed)
        sn = rn.subspace
        out.update(resolved=curve.values, resolved_stderr=curve.stderr,
                   resolved_n=curve.n_resolved, resolved_m=int(rn.index.size),
                   resolved_rows=None if sn.samples is None else sn.n_rows,
                   resolved_per_sample=rn.per_sample)
    if "resolved" not in forms or ("subspace" in forms and sn.samples is not None):
        # the subspace form always takes every sample: without the resolved spikes its
        # complement noise is dominated by a few heavy samples, and a sampled population
        # of 512 of the digits MLP's 1797 moved its B = 8 value by +15 % to +38 %
        from nets.noise.subspace_noise import subspace_noise_from_operator
        sn = subspace_noise_from_operator(op, U, progress=progress)
    out.update(subspace_k=int(sn.k), subspace_lams=sn.lam)
    if "subspace" in forms:
        curve = subspace_form(sn, Bs, n_batches=_mc_batches(n_batches_mc, "subspace"),
                              replacement=replacement, seed=seed)
        out.update(subspace=curve.values, subspace_stderr=curve.stderr)
    return out
