"""Per-sample gradient statistics and McCandlish et al.'s noise scales (docs/theory.md §5).

For per-sample gradients g_i = ∇ℓ_i(w), i = 1..N (computed with
`torch.func.vmap(torch.func.grad(...))` in chunks, never stored all at once):

    ḡ      = (1/N) Σ g_i                                  mean gradient
    Σ      = (1/(N−1)) Σ (g_i − ḡ)(g_i − ḡ)ᵀ               per-sample covariance (unbiased;
                                                           only its diagonal is stored)
    tr Σ,  |ḡ|²,  B_simple = tr Σ / |ḡ|²
    tr(HΣ) = (1/(N−1)) Σ_i (g_i − ḡ)ᵀ H (g_i − ḡ),   ḡᵀHḡ,   B_noise = tr(HΣ)/(ḡᵀHḡ)
    ε_max  = |ḡ|² / (ḡᵀHḡ)

(a ratio 0/0 — every per-sample gradient zero, at an exact interpolating minimum — is NaN;
x/0 with x ≠ 0 is inf.)

(McCandlish, Kaplan, Amodei et al. 2018, "An empirical model of large-batch training";
their Σ is the per-example covariance; we use the unbiased 1/(N−1) form, so that a
batch mean has covariance c(B, N)·Σ with c = 1/B − 1/N.) tr(HΣ) needs one full-data
Hessian-vector product per sample; with `hessian_samples = m < N` it is estimated by
importance sampling: m draws i_1..i_m (with replacement, seeded) from

    p_i = 0.9·|g_i|²/Σ_j |g_j|² + 0.1/N,
    tr(HΣ) ≈ (N/(N−1))·(1/m) Σ_k q_{i_k}/(N·p_{i_k}),   q_i = (g_i − ḡ)ᵀH(g_i − ḡ),

unbiased for any p > 0, with the standard error from the spread of the m terms; exact at
m = N. q_i = |g_i − ḡ|²·(a Rayleigh quotient of H) is as heavy-tailed as the per-sample
gradient norms (on a trained digits MLP its coefficient of variation is 6, so a uniform
subset of 128 samples was 53 % uncertain), while q_i/p_i varies only with the Rayleigh
quotient (0.50 there: 9 % from 32 draws). The uniform 0.1/N share bounds the weights.

Which "learning rate": McCandlish's ε_opt(B) = ε_max/(1 + B_noise/B) (at finite N
ε_max/(1 + c(B, N)·B_noise), `GradientNoise.greedy_optimal_lr`) is the **greedy
optimal** step (largest one-step loss decrease), not a stability limit; B_simple and
B_noise are reported beside our critical batch size B* = s_u²/λ_1² (a stability
quantity, `nets.learning_rates.lr_prediction`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import grad

from nets.curvature.loss_check import loss_name, mean_reduction_check
from nets.curvature.operators import (
    GRAPH_PRODUCT_FACTOR,
    _explained_missing_derivatives,
    _scalar_loss,
    check_batch_dimension,
    check_policy,
    curvature_operator,
    policy_mode,
    resolve_device_dtype,
    warn_output_precision,
)
from nets.curvature.params import (
    ParamLayout,
    call_model,
    check_model,
    functional_loss,
    make_functional,
)
from nets.utils.autocast import outside_autocast
from nets.utils.data_source import as_data_source, check_indices
from nets.utils.memory import SAMPLE_CHUNK_CAP, capped_sample_chunk, memory_budget, product_chunk
from nets.utils.progress import progress_bar, progress_counter
from nets.utils.results import Result, result
from nets.utils.seeding import resolved_seed
from nets.utils.vmapping import vmap_or_loop
from rmt.validation import as_bool, as_int

__all__ = ["GradientNoise", "per_sample_gradients", "gradient_noise"]


def _source(data):
    src = as_data_source(data)
    if src.N < 2:
        raise ValueError("data must hold at least 2 samples")
    return src


class _PerSample:
    """vmap(grad) of the per-sample loss ℓ_i(w) = loss_fn(model(x_i[None]), y_i[None])."""

    def __init__(self, model, loss_fn, params, device, dtype, policy):
        check_model(model)                 # (lazy parameters before the layout reads shapes)
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable")
        check_policy(model, policy)
        if policy == "train_batch_stats":
            raise ValueError("per-sample gradients are undefined with policy='train_batch_stats' "
                             "(batch statistics couple the samples; a one-sample batch has "
                             "none); use policy='eval'")
        self.model, self.loss_fn, self.policy = model, loss_fn, policy
        self.layout = ParamLayout.from_module(model, params)
        self.device, self.dtype = resolve_device_dtype(model, self.layout.names, device, dtype)
        self.primals, self.frozen = make_functional(model, self.layout.names,
                                                    device=self.device, dtype=self.dtype)
        names = self.layout.names

        def one(prim, x, y):
            return _scalar_loss(functional_loss(model, loss_fn, names, self.frozen, prim,
                                                x[None], y[None]))

        g = grad(one)
        self._vg = vmap_or_loop(lambda x, y: self.layout.flatten(g(self.primals, x, y)))

    def _cast(self, t):
        t = t.to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def __call__(self, X, y):
        with policy_mode(self.model, self.policy), _explained_missing_derivatives():
            return self._vg(self._cast(X), self._cast(y))

    def check_outputs(self, src) -> None:
        """The model's outputs on the first samples, checked before the per-sample pass:
        the batch must be their first dimension for one sample as for two
        (`check_batch_dimension`: a squeeze() at the end of forward gave torch's raw
        "Target size ... must be the same as input size" here, where the operators explain
        it), and the loss's gradient in them must not be lost to this dtype's round-off on
        the first 64 samples (`warn_output_precision`; a fitted cross-entropy net in
        float32 whose softmax saturates, where torch's gradient drops the true class's term
        as p_y rounds to 1: tr Σ and B_simple came out 15–78 % off with nothing said — the
        operator's own check, on the curvature, runs only with hessian=True)."""
        n = min(64, src.N)
        state = dict(self.frozen)
        state.update(zip(self.layout.names, self.primals))

        def outputs(x):
            with torch.no_grad(), policy_mode(self.model, self.policy):
                return call_model(self.model, state, self._cast(x))

        errors = (RuntimeError, ValueError, TypeError, NotImplementedError)
        try:
            x, t = src.take(np.arange(n))
            out = outputs(x)
        except errors:
            return
        if n > 1:
            try:
                one = outputs(x[:1])
            except errors:
                one = None
            check_batch_dimension(out, one, n)
        if self.dtype != torch.float64:
            warn_output_precision(out, self._cast(t), self.loss_fn, order=1, n=n,
                                  consequence="Per-sample gradients, tr Σ and the noise "
                                              "scales are then off")


def _chunk(chunk_size, memory, ps, src) -> int:
    """Samples per vmapped chunk: `chunk_size`; with the default budget (memory=None)
    `capped_sample_chunk` (at most SAMPLE_CHUNK_CAP, within the budget), as lr_table
    sizes this pass; with an explicit `memory` what fits it. The operator's CPU-sized
    `product_chunk` (a few samples at P ~ 10⁵–10⁶) made the pass and its Hessian products
    3.3× slower on a 543k-parameter MLP (600 samples, one thread: 58 s against 18 s)."""
    if chunk_size is not None:
        return as_int("chunk_size", chunk_size, minimum=1)
    itemsize = torch.finfo(ps.dtype).bits // 8
    if memory is None:
        return capped_sample_chunk(src.N, ps.layout.P, src.first_sample_numel(), itemsize,
                                   device=ps.device)
    # capped as the default is: a budget below the default's gave a larger chunk (500 MB:
    # 1,265 samples against 256 on a 14k-parameter CNN, then 8 GB and out of memory)
    return min(SAMPLE_CHUNK_CAP, product_chunk(src.N, ps.layout.P, 1, 1, src.first_sample_numel(),
                                               itemsize, memory=memory, device=ps.device))


def _columns(H, chunk, memory, device, most=32) -> int:
    """Gradients multiplied by H at once in `_quadratic_forms`: the products of one call run
    together (vmap), each holding about GRAPH_PRODUCT_FACTOR × the forward graph of a chunk
    of `chunk` samples (measured on the operator's model), so as many as fit the memory
    budget, at least 1 and at most `most`. A fixed 32 held 32 products at once whatever the
    budget: 3.8 GB with the default on a 14k-parameter CNN, and the 500 MB asked for
    ran out of memory (an outside sweep)."""
    measure = getattr(H, "_graph_bytes_per_sample", None)
    if measure is None:
        return most
    per_column = GRAPH_PRODUCT_FACTOR * float(measure()) * chunk
    return max(1, min(most, int(memory_budget(memory, device) // max(per_column, 1.0))))


@outside_autocast
def per_sample_gradients(model, loss_fn, data, *, indices=None, params=None, policy=None,
                         chunk_size=None, device=None, dtype=None,
                         memory=None) -> torch.Tensor:
    """Matrix (n, P) of per-sample gradients ∇ℓ_i(w) for the samples `indices` (default
    all) of `data` (any form of `nets.utils.data_source`). Use only when n·P fits in
    memory; `gradient_noise` streams instead. chunk_size : samples per vmapped chunk
    (None: from the memory budget `memory`, `nets.utils.memory`)."""
    src = _source(data)
    ps = _PerSample(model, loss_fn, params, device, dtype, policy)
    idx = np.arange(src.N) if indices is None else check_indices(indices, src.N)
    chunk_size = _chunk(chunk_size, memory, ps, src)
    parts = []
    for s in range(0, len(idx), chunk_size):
        parts.append(ps(*src.take(idx[s:s + chunk_size])).detach())
    return torch.cat(parts)


@result
class GradientNoise(Result):
    """Gradient statistics at one point w (module docstring for the formulas).

    N, P; mean (ḡ, array P); var (per-coordinate Σ_jj, unbiased, array P);
    trace_cov (tr Σ); mean_sq_norm (|ḡ|²); B_simple; tr_HSigma; gHg (ḡᵀHḡ); B_noise;
    eps_max (|ḡ|²/ḡᵀHḡ, McCandlish's greedy-optimal full-batch step);
    hessian_samples (m used for tr(HΣ)); seed; tr_HSigma_stderr, B_noise_stderr (standard
    errors of the importance-sampled estimate; 0 when exact, NaN when not computed).
    """

    N: int
    P: int
    mean: np.ndarray
    var: np.ndarray
    trace_cov: float
    mean_sq_norm: float
    B_simple: float
    tr_HSigma: float
    gHg: float
    B_noise: float
    eps_max: float
    hessian_samples: int
    seed: int
    tr_HSigma_stderr: float = float("nan")
    B_noise_stderr: float = float("nan")

    def greedy_optimal_lr(self, B, *, replacement: bool = False):
        """McCandlish's greedy optimum (not a limit) at finite N, as `lr_table` gives it:
        ε_opt(B) = ε_max/(1 + c(B, N)·B_noise), c = 1/B − 1/N for batches drawn without
        replacement ((1 − 1/N)/B with `replacement`; `rmt.lr.noise_factor`), so that
        ε_opt(N) = ε_max. B a number (float back) or a sequence (array). It used McCandlish's infinite-N
        ε_max/(1 + B_noise/B), up to 2.4× below the table's column at B = N (an outside
        sweep)."""
        from rmt.lr import noise_factor

        c = noise_factor(B, self.N, replacement)
        out = self.eps_max / (1.0 + self.B_noise * np.asarray(c, dtype=float))
        return float(out) if np.ndim(out) == 0 else out


@outside_autocast
def gradient_noise(model, loss_fn, data, *, hessian_samples=32, hessian=True, params=None,
                   policy=None, chunk_size=None, device=None, dtype=None, seed=0,
                   progress=None, memory=None) -> GradientNoise:
    """Mean, per-coordinate variance and noise scales of the per-sample gradients of
    `data` (any form of `nets.utils.data_source`; read chunk by chunk).

    hessian_samples: m importance-sampled draws for the tr(HΣ) estimate (module docstring;
    None or ≥ N: all samples, exact).
    hessian=False skips tr(HΣ), ḡᵀHḡ (B_noise, eps_max are then NaN).
    chunk_size: samples per vmapped per-sample-gradient chunk (memory chunk × P; None:
    at most 256 within the memory budget `memory` — bytes, "2GB", or None for a share of
    the free memory, `nets.utils.memory`, `_chunk`); the Hessian products on the
    gradients run in chunks of the same size.
    """
    src = _source(data)
    N = src.N
    seed = resolved_seed("seed", seed)
    hessian = as_bool("hessian", hessian)
    ps = _PerSample(model, loss_fn, params, device, dtype, policy)
    mean_reduction_check(model, loss_fn, src)      # a summed loss: every number chunk-dependent
    ps.check_outputs(src)
    chunk_size = _chunk(chunk_size, memory, ps, src)
    P = ps.layout.P
    acc = torch.float64
    n = 0
    mean = torch.zeros(P, dtype=acc, device=ps.device)
    M2 = torch.zeros(P, dtype=acc, device=ps.device)
    sq = np.empty(N)                                   # |g_i|²: the importance weights
    for s in progress_bar(range(0, N, chunk_size), progress=progress, desc="per-sample gradients"):
        G = ps(*src.take(np.arange(s, min(s + chunk_size, N)))).detach().to(acc)
        nb = G.shape[0]
        # in place: three chunk × P float64 temporaries made this update 2-3× the cost of
        # the per-sample gradients themselves at P = 1M
        sq[s:s + nb] = torch.linalg.vecdot(G, G, dim=1).cpu().numpy()
        mb = G.mean(0)
        M2b = G.sub_(mb).square_().sum(0)
        delta = mb - mean
        tot = n + nb
        mean = mean + delta * (nb / tot)
        M2 = M2 + M2b + delta ** 2 * (n * nb / tot)
        n = tot
    if not bool(torch.isfinite(mean).all() & torch.isfinite(M2).all()):
        # the loss check above sees 64 samples; a sample elsewhere can still be non-finite
        raise ValueError(f"a per-sample gradient of loss_fn {loss_name(loss_fn)!r} is NaN or "
                         "inf at the model's parameters (some sample's loss is not finite or "
                         "not differentiable there)")
    var = M2 / (N - 1)
    trace_cov = float(var.sum())
    gsq = float(mean @ mean)
    B_simple = _ratio(trace_cov, gsq)

    tr_hs = gHg = B_noise = eps_max = tr_se = B_se = float("nan")
    m = 0
    if hessian:
        m = N if hessian_samples is None else min(as_int("hessian_samples", hessian_samples, minimum=1), N)
        H = curvature_operator(model, loss_fn, src, params=params, device=ps.device,
                               dtype=ps.dtype, policy=policy, chunk_size=chunk_size)
        gbar = mean.to(ps.dtype)
        gHg = float(gbar.to(acc) @ H.matvec(gbar).to(acc))
        if m == N:
            idx, weight = np.arange(N), np.ones(N)
        else:
            p = 0.9 * sq / sq.sum() + 0.1 / N if sq.sum() > 0 else np.full(N, 1.0 / N)
            idx = np.sort(np.random.default_rng(seed).choice(N, m, replace=True, p=p / p.sum()))
            weight = 1.0 / (N * p[idx])
        terms = weight * _quadratic_forms(ps, src, H, gbar, idx, acc,
                                          _columns(H, H.chunk_size or N, memory, ps.device),
                                          progress)
        tr_hs = float(terms.mean()) * N / (N - 1)
        if m == N:
            tr_se = 0.0                                         # every sample: exact
        elif m > 1:
            tr_se = float(terms.std(ddof=1) / np.sqrt(m)) * N / (N - 1)
        B_noise = _ratio(tr_hs, gHg)
        B_se = tr_se / abs(gHg) if gHg != 0 else float("nan")
        eps_max = _ratio(gsq, gHg)
    return GradientNoise(N, P, mean.cpu().numpy(), var.cpu().numpy(), trace_cov, gsq, B_simple,
                         float(tr_hs), float(gHg), float(B_noise), float(eps_max), m, int(seed),
                         tr_HSigma_stderr=tr_se, B_noise_stderr=B_se)


def _ratio(num: float, den: float) -> float:
    """num/den for the noise scales: inf for x/0 with x ≠ 0, NaN for 0/0 — at an exact
    interpolating minimum every per-sample gradient is 0, and B_simple, B_noise and ε_max
    read inf ("noise-dominated at every B") where there is no gradient noise at all (an
    outside sweep; `rmt.lr.mccandlish_b_simple` refuses 0/0)."""
    if den != 0:
        return num / den
    return float("nan") if num == 0 else float("inf")


def _quadratic_forms(ps, src, H, gbar, idx, acc, cols=32, progress=None) -> np.ndarray:
    """q_i = (g_i − ḡ)ᵀH(g_i − ḡ) for the samples idx (repeats computed once): their
    per-sample gradients `cols` at a time, the full-data Hessian products on them at most
    a quarter of the samples per call (a progress bar over the samples: they took 95 s of
    a 101 s call without one on a 14k-parameter CNN, N = 2,000)."""
    uniq, inverse = np.unique(idx, return_inverse=True)
    q = np.empty(len(uniq))
    # the products in at least four calls, for the bar: the default 32 samples in one
    # call of 32 gave a bar of total 1, drawn only when done (44 s silent at N = 10,000;
    # an outside sweep). The per-sample gradients keep their chunks of `cols` (smaller
    # vmapped chunks change their round-off: tr(HΣ) 1e-32 for 0 at an exact minimum)
    step = max(1, min(cols, -(-len(uniq) // 4)))
    bar = progress_counter(progress, total=len(uniq), desc="Hessian products")
    for s in range(0, len(uniq), cols):
        Gc = ps(*src.take(uniq[s:s + cols])).detach() - gbar          # (k, P)
        for t in range(0, len(Gc), step):
            G = Gc[t:t + step]
            HG = H.matmat(G.T.contiguous())                            # (P, ≤ step)
            q[s + t:s + t + len(G)] = (G.to(acc) * HG.T.to(acc)).sum(1).cpu().numpy()
            if bar is not None:
                bar.update(len(G))
    if bar is not None:
        bar.close()
    return q[inverse]
