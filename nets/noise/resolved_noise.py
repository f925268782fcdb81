"""Sample-resolved form of the batch top eigenvalue λ'_1(B) (docs/theory.md §3.7 [ext]).

Why. The directional and subspace forms (`nets.noise.directional`, `nets.noise.subspace_noise`) treat the
batch fluctuation ε = H_B − H as many small independent pieces: second order in ε, its
effect is c(B,N)·s_u²/λ. That needs every single sample to be a small perturbation.
Per-sample curvatures of trained networks are heavy-tailed: on the digits MLP the top
eigenvalue γ_i of H_i has median 0.64 but mean 4.5 and maximum 71, while λ_1(H) = 0.27.
A sample whose own spike γ_i/B exceeds λ_1 is not a perturbation of the batch: at small
B the batch's top eigenvalue is, to within a few per cent, max_{i∈S} γ_i/B.

Model. Each per-sample curvature is split into its top eigenpair and the rest,
H_i = γ_i v_i v_iᵀ + (H_i − γ_i v_i v_iᵀ). At batch size B, sample i is *resolved* iff

    γ_i / B > λ_1            (its spike alone exceeds the full-data top eigenvalue).

This threshold is the only rule; it is fixed, not fitted. For a batch S with resolved
samples h = S ∩ {resolved at B}, f = 1 − |h|/B, the batch Hessian is modelled as one
operator, Σ_{i∈h} (γ_i/B) v_i v_iᵀ + R_S, on the span of W = [U, Q_h] (U: top-k
eigenvectors of H, as in `nets.noise.subspace_noise`; Q_h = (I − UUᵀ)v_h, the resolved
spikes' parts outside span(U)), by the Rayleigh–Ritz pencil (A, WᵀW) with

    A = Wᵀ [ Σ_{i∈h} (γ_i/B) v_i v_iᵀ ] W + blocks of the unresolved remainder R_S:
    UᵀR_S U   = Λ_U + mean_{i∈S} a_i − Σ_{i∈h} (γ_i/B) t_i t_iᵀ + c·D_h(B)/λ_1   (exact + 2nd order)
    UᵀR_S Q_h = f·UᵀH Q_h,    Q_hᵀR_S Q_h = f·Q_hᵀH Q_h                         (mean field)
    WᵀW = diag(I_k, Q_hᵀQ_h),  Wᵀv_i = [t_i; Q_hᵀv_i],  Q_hᵀv_i = (v_jᵀv_i − t_jᵀt_i)_{j∈h}

t_i = Uᵀv_i, a_i = Uᵀ(H_i − H)U, c = c(B,N). Inside span(U) the remainder is the subspace
model, fluctuation included; outside it, its mean field f·H (the blocks with Q_h follow
from UᵀHV, VᵀHV and H_U = UᵀHU). D_h(B) is the complement noise of
`nets.noise.subspace_noise` computed with the resolved spikes removed from the per-sample
curvatures (they are in the subspace now, and must not be counted twice):
x_i = Q(H_i − 1[i resolved]·γ_i v_i v_iᵀ)U, D_h(B) = (1/(N−1)) Σ_i (x_i − x̄)ᵀ(x_i − x̄),
evaluated exactly from k-dimensional per-sample quantities (`_complement_noise`). Then

    λ'_1(B) ≈ E_S λ_max(A, WᵀW),

sampled over batches S (Monte-Carlo, no curvature products). Limits: with no resolved
samples (B ≥ max γ_i/λ_1) it is exactly the subspace form; with U the whole space
(k = P: no complement, no Q_h) it is exactly the batch Hessian's top eigenvalue; a spike
inside span(U) is the rank-one term of the U-block alone (Q_h → 0 continuously). "Inside"
is to the inputs' precision: parts with ‖(I − UUᵀ)v‖² below `ResolvedNoise.gram_floor`
(10⁻¹⁰ in float64; ~10⁻⁵ with float32 products or a float32 U) are treated as inside.

Why this basis. The form until session 53 used W = [U, v_h] with the mean field on all
of v_h: on v_h's part inside span(U) the remainder was then the fluctuating subspace model
in one block and f·H in another, two different operators, and the pencil divided their
order-one disagreement by ‖(I − UUᵀ)v_h‖². Against dense Monte Carlo (per-sample Hessians
from torch.func, the same batches) it read 1.24–1.32× on a 51-parameter MLP with spikes
0.13 outside U, 1.8–40× on a 9-parameter softmax regression (0.12–0.045 outside) and up
to 10⁵× at 0.004; the form above reads 0.98–1.03× in those cases (1.22× at B = 2 where a
spike is 0.35 outside a one-dimensional U, against 3.0×), and on the digits MLP it moved
the prediction by at most 2.5 % (to 1.01/1.02/1.03/0.98 × measured from
1.01/1.04/1.05/0.98, the same 600/300/120/60 batches). What it gives up: a resolved
sample's own remainder R_i annihilates v_i, which the form does not impose on v_i's part
inside U, so for very small batches of a tiny data set it reads high (B = 2 and 4 of
N = 30: +4 to +14 % where the earlier basis read −2 to +5 %; tests). A variant that keeps
each resolved sample's own curvature exactly on span(U, v_i) read 0–4 % closer there and
0.2 % closer on the digits MLP; not adopted (one more per-sample form to carry).
An outside sweep against dense Monte Carlo (nine float64 models with P = 28–136: tanh,
GELU and softplus cross-entropy MLPs, one at initialisation and one with heavy samples,
an MSE MLP, softmax regression, a Conv1d net; B = 2–32, k = 1 … P, the same batches):
k ≥ P/2 within 0.6 %; 2 ≤ k < P/2 0.90–1.05 on the trained models; k = 1 0.78–1.09.
Where it misses by more than 10 % the miss sits in the batches without a resolved sample
(the subspace form's own limit at small k, which that form shares), or, at
initialisation with B = 2 (1.12), in the c·D/λ_1 term: there the batch's top is far
above λ_1.

Approximations (and only these): one spike per resolved sample (its top eigenpair); the
remainder acts on the resolved spikes' parts outside span(U) through its mean f·H (no
noise there); the complement of span(U) at second order with denominator λ_1, as in the
subspace form.

Sensitivity (digits MLP, tanh 64-32-10, top-10 subspace). Against 2000/1000/400/200
measured batches at B = 8/32/128/512 the rule above gives 0.99/1.01/1.01/0.99 × the
measured mean (`benchmarks/bench_batch_prediction.py --large`). On 600/300/120/60
measured batches (the model evaluated on the same batches): the rule 1.01/1.02/1.03/0.98;
resolving at γ_i/B > λ_1/2 or > 2λ_1 instead 0.99–1.03 and 0.88–1.02 (0.88 at B = 128);
dropping the mean field outside span(U) (f = 0 in the blocks with Q_h) 0.98–1.01. The
second-order subspace form alone gives 0.87/0.72/0.86/1.00.

Cost. One batched per-sample Lanczos run (`per_sample_top_eigenpairs`: `steps`
per-sample products for every sample, vmapped, ≈ `steps` full-data products), one pass
of products with the kept vectors on their own samples, and k full-data products for HU.
With `spikes="ggn"` the spikes are those of the per-sample Gauss–Newton terms, exact from
a C×C matrix per sample (`per_sample_ggn_top_eigenpairs`: C vector-Jacobian products per
sample, no Krylov basis). On the trained 301k-parameter digits MLP (600 samples, side by
side in one process) that pass took 15.7 s against 57.2 s for the Lanczos run (3.6×),
and its spikes were 0.992–1.001 × the Hessian's (5–95 % of samples); on a network at
initialisation the two differ (per-sample Hessians there are indefinite).

At scale (defaults). Candidates (γ_i > min_batch·λ_1; ≈ N/3 on the digits MLP at
min_batch 8) are subsampled to at most `max_candidates` by priority sampling on γ_i
(`per_sample_top_eigenpairs(max_keep=...)`): the largest spikes are always kept, the
rest with probability γ_i/τ. γ_i of *every* sample is known (scalars), so the resolved
rule is exact; a dropped candidate is represented in a batch by the kept candidate of
nearest log γ that no other sample of that batch already uses (its direction, its own
γ_i: two samples sharing one direction would add coherently, `_StandIns`; digits MLP,
64 of 561 candidates kept: 0.94–1.04 × the exhaustive form with distinct stand-ins,
1.02–1.07 × when they may be shared), and the sums over resolved samples of the
complement-noise correction are Horvitz–Thompson weighted (exact in expectation). The
cross terms v_iᵀHv_j use the Nyström approximation on span(U),
(UᵀHv_i)ᵀ(UᵀHU)⁺(UᵀHv_j), UᵀHv_i = (HU)ᵀv_i being exact: no product per candidate.
Memory O(P·(k + max_candidates)). `exact=True` keeps every sample and candidate and
computes the cross terms with one full-data product per candidate (the exhaustive form).

Gauss–Newton per-sample form (`per_sample="ggn"`; the default "auto" takes it once
N·P > 2²⁷). Every per-sample input of the model above — a_i, D, S, γ_i, v_i, Uᵀv_i and
w_i — comes from the per-sample Gauss–Newton factors instead of per-sample curvature
products, with H_i − H ≈ G_i − Ḡ (`nets.noise.ggn_samples`: C×C and C×k matrices per
sample from a few batched passes over the data; the centre H, HU and λ_1 stay op's).
Cost on the 301k-parameter MLP, N = 5000: the whole prediction 74–116 full-data products
instead of ≈1,800 for the per-sample passes alone, with the same accuracy; not for
networks far from a minimum, where per-sample Hessians are indefinite.

Sampled population (opt-in: `max_samples=n`, or "auto" for n = 512 once N·P > 2²⁷ as
for `micro_batch="auto"` in `nets.noise.directional`; the default keeps every sample).
Even subsampled candidates need γ_i of every sample, i.e. a per-sample Lanczos run (`steps` per-sample products)
for all N: on a 301k-parameter MLP one per-sample product costs 0.03–0.1 of a full-data
product (it reads and writes P numbers for a single sample), so that alone was ~2,000
full-data products at N = 1797. Instead:
1. one pass over *every* sample in ≈ 256 micro-batches of ⌊N/256⌋ gives the second
   moments D, S and the covariance of vec(a_i) (`nets.noise.subspace_noise.
   micro_batch_moments`, unbiased) and a score ‖(H̄_g − H)U‖² per group;
2. n = max_samples rows are drawn in two strata (`stratified_rows`): every sample of the
   highest-scoring groups (up to n/4 samples, weight 1 — the groups that hold the
   heaviest samples), and the rest uniformly from the other samples (each standing for
   (N − n₁)/(n − n₁) samples);
3. both per-sample passes (the projections a_i, R_i and the spikes) run on the rows only,
   with the full-data H (k exact products HU) as the centre.
Sums over resolved samples (the complement-noise correction, the resolved samples' mean
and covariance) are Horvitz–Thompson estimates with the rows' weights (times 1/π_i for
subsampled candidates). A batch of B samples is emulated from the rows: its number h of
resolved samples is hypergeometric with the data's count Σ_res w_j, those h are distinct
resolved rows drawn ∝ w_j, and the in-subspace fluctuation of the other B − h samples is
a Gaussian with the unresolved samples' mean and covariance (from the moments of step 1
minus the resolved rows' share) times the finite-population factor c(B,N)·B. (Rows drawn
again would add a repeated heavy row coherently, which a batch of distinct samples never
does; uniform rows without the moments of step 1 put λ'(512) of a 301k-parameter MLP
with N = 5000 at 1.38 against 1.06 for the exhaustive subspace form.) The resolved rule
γ_i > B·λ_1 is applied to the rows' own γ_i. What is lost: the Monte-Carlo mean carries
the subset's sampling error, which the reported standard error (over batches) does not
include — digits MLP, n = 512 of 1797: 0.96–1.10 × measured in the stored run
(`benchmarks/bench_scale.py --rows resolved_sampled`; 0.99–1.07 over three subsets in an
earlier, unstored one; the exhaustive form 0.99–1.01); a model whose 15 of 240 samples are heavy (×6 inputs),
n = 120: 0.89–1.31 × the exhaustive form (0.67–1.88 with uniform rows; tests). Where
that matters use `max_samples=None`. Measured on
the digits MLP (561 candidates at min_batch 8; 1000 batches per B = 8/32/128/512): the
defaults give 0.995/0.987/0.973/1.000 × the exhaustive form, at 51 instead of 612
full-data products.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from nets.curvature.operators import ModelCurvatureOperator
from nets.curvature.sample_jacobians import SampleJacobians
from nets.noise.directional import check_noise_operator, group_chunk, large_per_sample_pass
from nets.noise.ggn_samples import ggn_sample_pass, ggn_spike_pass, priority_keep
from nets.noise.subspace_noise import (
    SubspaceNoise,
    _orthonormal,
    _psd_factor,
    micro_batch_moments,
    stratified_rows,
    subspace_pass,
)
from nets.utils.autocast import outside_autocast
from nets.utils.callers import caller_stacklevel
from nets.utils.memory import chunk_count, lanczos_chunk_budget, product_bytes
from nets.utils.progress import progress_bar
from nets.utils.results import Result, result
from nets.utils.seeding import torch_generator
from nets.utils.vmapping import vmap_or_loop
from rmt.sampling import batch_noise_factor
from rmt.validation import as_batch_sizes, as_bool, as_float, as_int, as_rng

__all__ = ["SampleSpikes", "ResolvedNoise", "per_sample_top_eigenpairs",
           "per_sample_ggn_top_eigenpairs",
           "resolved_noise_from_operator", "resolved_batch_top_eigenvalue"]


@result
class SampleSpikes(Result):
    """Top eigenpair of every per-sample curvature C_i (largest algebraic eigenvalue).

    gamma : (N,) Ritz value γ_i; residual : (N,) ‖C_i v_i − γ_i v_i‖ (computed from the
    Lanczos recurrence); index : (m,) the samples whose vectors are kept (ascending);
    vectors : (P, m) their unit Ritz vectors v_i (float64); steps : the Lanczos step
    limit (a chunk stops earlier once every top pair has converged); seed;
    weight : (m,) inverse inclusion probabilities 1/π_i of the kept samples (all 1 unless
    `max_keep` subsampled the candidates by priority sampling); threshold : the priority
    threshold τ (0 when nothing was dropped); products : per-sample products per sample
    (None: `steps`; the C vector-Jacobian products of the GGN form)."""

    gamma: np.ndarray
    residual: np.ndarray
    index: np.ndarray
    vectors: torch.Tensor
    steps: int
    seed: int
    weight: np.ndarray | None = None
    threshold: float = 0.0
    products: float | None = None


def _per_sample_product(op: ModelCurvatureOperator):
    """(x_i, y_i, v_i) ↦ C_i v_i for one sample, to be vmapped over samples."""
    def one(x, y, v):
        return op.batch_product(x[None], y[None], v)
    return vmap_or_loop(one)


def _tridiagonal(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Batched Lanczos matrices T (g, j, j) from α (g, j) and β (g, j) (β[:, -1] unused)."""
    off = beta[:, :-1]
    return torch.diag_embed(alpha) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)


@outside_autocast
def per_sample_top_eigenpairs(op: ModelCurvatureOperator, *, steps=None, seed=0, keep_above=None,
                              chunk_size=None, tol=None, max_keep=None,
                              memory=None, progress=None) -> SampleSpikes:
    """Top eigenpair of each per-sample curvature C_i = ∇²ℓ_i (or its GGN term).

    Lanczos with full reorthogonalisation (two classical Gram–Schmidt passes), run for all
    samples at once: every step is one per-sample product for each sample, vmapped over
    samples in chunks (memory: chunk × steps × P). Recurrence in float64. A sample whose
    Krylov space closes early (per-sample curvatures are low-rank) stops there exactly
    (β below 1e-12 of the largest Ritz value is treated as a breakdown). A chunk stops
    when the top Ritz pair of every sample in it has residual |β_j s_j| ≤ tol·max|θ|
    (default tol: 1e-10 for float64 products, 1e-5 otherwise — rounding in float32
    products keeps residuals near 1e-7; the eigenvalue error is ≈ residual²/gap) or, with
    float32 products, once its top Ritz value has changed by at most 1e-9·max|θ| on two
    consecutive steps (on a 301k-parameter MLP every top eigenvalue was then exact to
    1e-15 relative after 10 steps, while the residual test ran all 40).

    steps : at most this many Lanczos steps (default min(P, 40)); seed : start vectors
    N(0, I) from `nets.utils.seeding.torch_generator(seed)`; keep_above : keep the vectors of
    samples with γ_i > keep_above (None: keep all; memory P × m).
    max_keep : keep at most this many vectors (memory P × max_keep), chosen among the
    samples above keep_above by priority sampling (Duffield, Lund & Thorup 2007):
    priority q_i = γ_i/u_i with u_i ~ U(0, 1] from `numpy.random.default_rng(seed)`;
    the max_keep largest priorities are kept and τ is the next one; sample i is then
    kept with probability π_i = min(1, γ_i/τ), and Σ_kept f_i/π_i is an unbiased
    estimate of Σ_candidates f_i for any per-sample f (the weights 1/π_i are returned).
    The samples with the largest spikes are always kept. Streaming: the pool never holds
    more than 2·(max_keep + 1) + one chunk of vectors.
    chunk_size : samples per vmapped chunk (None: from the memory budget `memory`,
    `nets.utils.memory.lanczos_chunk_budget` — on CPU at most CPU_LANCZOS_BYTES by
    default — with the float64 Lanczos bases (steps + 2)·P·8 bytes per sample).
    progress : a bar over the chunks.
    """
    check_noise_operator(op)
    P = op.P
    steps = min(P, 40) if steps is None else min(P, as_int("steps", steps, minimum=1))
    tol = ((1e-10 if op.dtype == torch.float64 else 1e-5) if tol is None
           else as_float("tol", tol, positive=True))
    # float32 products: rounding keeps the residual of a converged pair above tol, so a
    # sample also stops once its top Ritz value has moved by ≤ 1e-9 relative twice running
    stall = None if op.dtype == torch.float64 else 1e-9
    if keep_above is not None:
        keep_above = as_float("keep_above", keep_above)
    N = op.N
    if max_keep is not None:
        max_keep = as_int("max_keep", max_keep, minimum=1)
    if chunk_size is None:
        per = (steps + 2) * P * 8 + product_bytes(P, 1, 1, op.source.first_sample_numel(),
                                                  torch.finfo(op.dtype).bits // 8)
        chunk = chunk_count(N, per, lanczos_chunk_budget(memory, op.device), cap=4096)
    else:
        chunk = as_int("chunk_size", chunk_size, minimum=1)
    gen = torch_generator(seed)
    pool = _SpikePool(seed, keep_above, max_keep, P, op.device)
    prod = _per_sample_product(op)
    f64 = torch.float64
    resids = []
    for s in progress_bar(range(0, N, chunk), progress=progress,
                          desc="per-sample top eigenpairs"):
        Xc, Yc = op.source.take(np.arange(s, min(s + chunk, N)), device=op.device, dtype=op.dtype)
        g = Xc.shape[0]
        q = torch.randn(g, P, generator=gen, dtype=f64).to(op.device)
        q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True)
        # uninitialised: rows are written before they are read, and a run that stops
        # early never touches (or pays for zeroing) the rest (steps·P·8 bytes a sample)
        Qb = torch.empty(g, steps, P, dtype=f64, device=op.device)
        alpha = torch.zeros(g, steps, dtype=f64, device=op.device)
        beta = torch.zeros(g, steps, dtype=f64, device=op.device)
        alive = torch.ones(g, dtype=torch.bool, device=op.device)
        used = steps
        prev_top, still = None, torch.zeros(g, dtype=torch.long, device=op.device)
        for j in range(steps):
            Qb[:, j] = q
            w = prod(Xc, Yc, q.to(op.dtype)).to(f64)
            alpha[:, j] = (q * w).sum(1)
            for _ in range(2):
                w = w - torch.einsum("gjp,gj->gp", Qb[:, :j + 1],
                                     torch.einsum("gjp,gp->gj", Qb[:, :j + 1], w))
            b = torch.linalg.vector_norm(w, dim=1)
            scale = alpha[:, :j + 1].abs().amax(1).clamp_min(1e-300)
            alive = alive & (b > 1e-12 * scale)
            beta[:, j] = torch.where(alive, b, torch.zeros_like(b))
            q = torch.where(alive[:, None], w / b.clamp_min(1e-300)[:, None], torch.zeros_like(w))
            theta, S = torch.linalg.eigh(_tridiagonal(alpha[:, :j + 1], beta[:, :j + 1]))
            res = (beta[:, j] * S[:, -1, -1]).abs()
            size = theta.abs().amax(1).clamp_min(1e-300)
            done = res <= tol * size
            if stall is not None and prev_top is not None:
                flat = (theta[:, -1] - prev_top).abs() <= stall * size
                still = torch.where(flat, still + 1, torch.zeros_like(still))
                done = done | (still >= 2)
            prev_top = theta[:, -1]
            if bool(done.all()):
                used = j + 1
                break
        top = theta[:, -1]
        vec = torch.einsum("gjp,gj->gp", Qb[:, :used], S[:, :, -1])
        vec = vec / torch.linalg.vector_norm(vec, dim=1, keepdim=True).clamp_min(1e-300)
        resids.append(res.cpu())
        pool.add(s, top, vec)
    return pool.result(torch.cat(resids).numpy(), steps=steps)


class _SpikePool:
    """The spikes of a streamed per-sample pass: every γ_i, and the vectors of the samples
    above `keep_above`, cut to the `max_keep` largest priorities γ_i/u_i (u_i ∈ (0, 1]
    from `numpy.random.default_rng(seed)`, spawn key 11, drawn for every sample so that
    they do not depend on the chunking; threshold τ, weights 1/π_i = max(1, τ/γ_i))."""

    def __init__(self, seed, keep_above, max_keep, P, device):
        self.rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(11,)))
        self.seed, self.keep_above, self.max_keep, self.P, self.device = (
            int(seed), keep_above, max_keep, P, device)
        self.gammas, self.prio, self.idx, self.vecs = [], [], [], []

    def add(self, start: int, top: torch.Tensor, vec: torch.Tensor) -> None:
        """The chunk of samples start, start + 1, …: top eigenvalues (g,), vectors (g, P)."""
        g = top.shape[0]
        top = top.cpu()
        self.gammas.append(top)
        keep = torch.ones(g, dtype=torch.bool) if self.keep_above is None else top > self.keep_above
        self.prio.append(top.numpy() / (1.0 - self.rng.random(g)))
        if bool(keep.any()):
            self.idx.append(np.arange(start, start + g)[keep.numpy()])
            self.vecs.append(vec[keep.to(vec.device)])
            # pruned once the pool doubles (amortised: pruning copies the whole pool, and
            # per-sample chunks of one sample made that a copy of max_keep vectors each)
            if self.max_keep is not None and sum(map(len, self.idx)) > 2 * (self.max_keep + 1):
                self.idx, self.vecs = _prune_pool(self.idx, self.vecs, np.concatenate(self.prio),
                                                  self.max_keep + 1)

    def result(self, residual, *, steps, products=None) -> SampleSpikes:
        gamma = torch.cat(self.gammas).numpy()
        index = np.concatenate(self.idx) if self.idx else np.zeros(0, dtype=np.int64)
        vectors = (torch.cat(self.vecs).T.contiguous() if self.vecs
                   else torch.zeros(self.P, 0, dtype=torch.float64, device=self.device))
        weight, tau, m = np.ones(index.size), 0.0, self.max_keep
        if m is not None and index.size > m:
            prio = np.concatenate(self.prio)[index]
            order = np.argsort(-prio, kind="stable")
            tau = float(prio[order[m]])
            sel = np.sort(order[:m])
            index, vectors = index[sel], vectors[:, torch.from_numpy(sel).to(vectors.device)]
            weight = np.maximum(1.0, tau / gamma[index])
        return SampleSpikes(gamma=gamma, residual=residual, index=index, vectors=vectors,
                            steps=int(steps), seed=self.seed, weight=weight, threshold=tau,
                            products=products)


@outside_autocast
def per_sample_ggn_top_eigenpairs(op: ModelCurvatureOperator, *, seed=0, keep_above=None,
                                  chunk_size=None, max_keep=None, memory=None) -> SampleSpikes:
    """Top eigenpair of each per-sample Gauss–Newton curvature G_i = J_iᵀ Λ_i J_i, exactly,
    from C×C matrices per sample instead of a Lanczos run.

    K_i = J_iJ_iᵀ (C×C) comes from one batched forward and C backward passes
    (`nets.curvature.sample_jacobians.SampleJacobians`; per-sample Jacobians are formed
    only for parameters outside dense and convolution layers), Λ_i = ∇²_o ℓ_i (C×C, the
    loss's Hessian in the outputs; its negative eigenvalues are clipped to 0, so G_i ⪰ 0).
    With A_i = Λ_i^{1/2} K_i Λ_i^{1/2} = W diag(μ) Wᵀ the non-zero spectrum of G_i is that
    of A_i, so

        γ_i = μ_max(A_i),   v_i = J_iᵀ Λ_i^{1/2} w_max / √γ_i   (a unit vector),

    exact to rounding (residuals are reported as 0); v_i is formed (one per-sample
    backward pass) only for the kept samples. For a cross-entropy network near a minimum
    G_i is most of the per-sample Hessian H_i (trained wide digits MLP: GGN spike /
    Hessian spike 0.993–1.001 over 256 samples); for an untrained one it need not be
    (a CIFAR-shaped CNN at chance: 0.07–0.10, its per-sample Hessians indefinite;
    benchmarks/README.md, `resolved_cnn_spikes`). The model's output must be one tensor
    (1, C…) per sample.

    keep_above, max_keep, seed : as `per_sample_top_eigenpairs` (priority sampling of the
    kept vectors, `nets.noise.ggn_samples.priority_keep`: the same rule and draws).
    chunk_size : samples per batched pass (None: from the memory budget `memory`).
    Returns a `SampleSpikes` with steps = 0 and products = C.
    """
    check_noise_operator(op)
    if keep_above is not None:
        keep_above = as_float("keep_above", keep_above)
    if max_keep is not None:
        max_keep = as_int("max_keep", max_keep, minimum=1)
    if chunk_size is not None:
        chunk_size = as_int("chunk_size", chunk_size, minimum=1)
    try:
        jac = SampleJacobians(op)
    except TypeError as exc:
        raise TypeError(f"GGN spikes: {exc}; use spikes='lanczos'") from None
    gp = ggn_spike_pass(op, jac, chunk_size=chunk_size, memory=memory)
    return _kept_spikes(gp, keep_above, max_keep, seed, products=float(jac.C))


def _kept_spikes(gp, keep_above, max_keep, seed, *, products) -> SampleSpikes:
    """`SampleSpikes` from a Gauss–Newton pass: every γ_i, and the vectors of the samples
    `priority_keep` keeps (one per-sample backward pass each); residuals 0 (exact)."""
    index, weight, tau = priority_keep(gp.gamma, keep_above, max_keep, seed)
    return SampleSpikes(gamma=gp.gamma, residual=np.zeros(gp.gamma.size), index=index,
                        vectors=gp.vectors(index), steps=0, seed=int(seed), weight=weight,
                        threshold=tau, products=products)


def _prune_pool(kept_idx, kept_vecs, prio, size):
    """Keep the `size` largest priorities of the pool (index list, vector list)."""
    idx = np.concatenate(kept_idx)
    if idx.size <= size:
        return kept_idx, kept_vecs
    vecs = torch.cat(kept_vecs)
    sel = np.sort(np.argsort(-prio[idx], kind="stable")[:size])
    return [idx[sel]], [vecs[torch.from_numpy(sel).to(vecs.device)]]


@result
class ResolvedNoise(Result):
    """Everything the sample-resolved batch model needs, as small arrays.

    subspace : the `SubspaceNoise` on U (k columns); its `samples` are the sampled
    population (None: every sample), and every per-sample array below is indexed by its
    rows (the samples themselves when exhaustive); gamma : (rows,) per-sample top
    eigenvalues; index : (m,) rows whose spikes can be resolved (γ_i > min_batch·λ_1);
    T : (k, m) Uᵀv_i; Gv : (m, m) v_iᵀv_j; VHV : (m, m) v_iᵀHv_j; UHV : (k, m) UᵀHv_j;
    w : (m, k) v_iᵀQ(H_i − H)U (exact, for the complement-noise correction);
    lam1 : λ_1 (top of UᵀHU); min_batch : smallest batch size the model can evaluate;
    residual : (m,) Lanczos residuals of the kept spikes; weight : (m,) inverse
    inclusion probabilities of the kept candidates (all 1 when every sample and candidate
    is kept; N/n × 1/π_i for a sampled population); proxy : (rows,) for every candidate
    the position (in index) of the kept sample whose spike direction stands for it (itself
    when kept; the kept candidate of nearest log γ otherwise), −1 for non-candidates;
    n_candidates; cross : "exact" or
    "nystrom" (how VHV was obtained); full_products : cost in full-data products;
    per_sample : "products" or "ggn" (where the per-sample quantities came from);
    ggn_check : with per_sample="auto" where the Gauss–Newton form was tried, its
    directional noise s2_ggn against the Hessian's s2_hessian (± s2_hessian_stderr) along
    the top eigenvector (`resolved_noise_from_operator`), else None; gram_floor : the
    smallest squared part of a spike outside span(U), ‖(I − UUᵀ)v‖², the batch pencil
    keeps as a direction of its own (`_precision_floor`: below it, that part is round-off
    and the spike counts as inside U)."""

    subspace: SubspaceNoise
    gamma: np.ndarray
    index: np.ndarray
    T: np.ndarray
    Gv: np.ndarray
    VHV: np.ndarray
    UHV: np.ndarray
    w: np.ndarray
    lam1: float
    min_batch: int
    residual: np.ndarray
    weight: np.ndarray | None = None
    proxy: np.ndarray | None = None
    n_candidates: int | None = None
    cross: str = "exact"
    full_products: float | None = None
    per_sample: str = "products"
    ggn_check: dict | None = None
    gram_floor: float = 1e-10


#: default cap on the candidate spike vectors kept (memory P × DEFAULT_MAX_CANDIDATES)
DEFAULT_MAX_CANDIDATES = 256
#: default size n of the sampled population (module docstring, "Sampled population")
DEFAULT_MAX_SAMPLES = 512
#: cross="auto" computes v_iᵀHv_j exactly (one full-data product each) up to this many
EXACT_CROSS_MAX = 32


@outside_autocast
def resolved_noise_from_operator(op: ModelCurvatureOperator, U, *, min_batch, steps=None, seed=0,
                                 chunk_size=None, max_candidates=DEFAULT_MAX_CANDIDATES,
                                 max_samples=None, cross="auto", exact=False,
                                 memory=None, spikes="lanczos",
                                 per_sample="auto", progress=None) -> ResolvedNoise:
    """Per-sample spikes and subspace statistics for `resolved_batch_top_eigenvalue`.

    U : (P, k) orthonormal (the top-k eigenvectors of the full-data curvature);
    min_batch : the smallest batch size to be evaluated (fixes the candidates:
    γ_i > min_batch·λ_1); steps, seed : `per_sample_top_eigenpairs`.

    Scale options (module docstring, "At scale"):
    max_candidates : keep at most this many candidate spike vectors (priority sampling
        on γ_i; None: all); memory P × max_candidates.
    max_samples : None (default): every sample; an int: the per-sample passes
        (projections and spikes) run on a sampled population of this many samples when N
        is larger (module docstring); "auto": DEFAULT_MAX_SAMPLES = 512 once the
        per-sample passes would write more than 2²⁷ numbers (N·P), every sample below.
        Sampling is opt-in because it trades accuracy for cost on heavy-tailed data
        (301k-parameter MLP, N = 5000: every sample 0.96–1.06 × measured at 1,786
        full-data products, 512 rows 1.04–1.41 × at 323).
    cross : "nystrom": v_iᵀHv_j ≈ (UᵀHv_i)ᵀ(UᵀHU)⁺(UᵀHv_j), no product per
        candidate; "exact": one full-data product per kept candidate; "auto" (default):
        exact when at most EXACT_CROSS_MAX candidates are kept, else nystrom.
    exact=True : every sample, every candidate and exact cross terms (the exhaustive form).
    memory : budget in bytes for every batched product (`nets.utils.memory`).
    spikes : "lanczos" (default): the top eigenpair of each per-sample curvature C_i by a
        batched Lanczos run (`per_sample_top_eigenpairs`); "ggn": the top eigenpair of
        each per-sample Gauss–Newton term, exactly from a C×C matrix
        (`per_sample_ggn_top_eigenpairs`) — the same as "lanczos" when op is a GGN
        operator, an approximation of the Hessian's spikes otherwise (good near a
        minimum of a cross-entropy network, not at initialisation); the rest of the
        model (U, the projections a_i, the cross terms) stays op's.
    per_sample : "products": the projections a_i and the complement noise from
        per-sample curvature products of op (k per sample), spikes as `spikes` says;
        "ggn": every per-sample quantity (a_i, D, S, the spikes, w_i) from the
        Gauss–Newton factors of every sample (`nets.noise.ggn_samples`: C×C and C×k
        matrices per sample, no per-sample curvature product; one per-sample backward
        pass per kept spike vector). H (the centre, HU, λ_1 and the cross terms) stays
        op's. The same approximation as spikes="ggn", now for the fluctuations too:
        H_i − H ≈ G_i − Ḡ. Not with max_samples (every sample is cheap).
        "auto" (default): "ggn" once the per-sample passes would write more than 2²⁷
        numbers (N·P, the rule of max_samples="auto") and the model has one output
        tensor of at most 1024 numbers per sample, with neither max_samples nor
        exact=True given, and then only if the Gauss–Newton terms carry at least
        GGN_NOISE_FRACTION = ½ of the Hessian's directional noise along the top
        eigenvector (lower 2-s.e. bound of a micro-batch estimate, a few full-data
        products; a warning says when not); "products" otherwise (so small networks
        keep the exact per-sample curvatures, and so do networks far from a minimum).
        On the 301k-parameter digits MLP with N = 5000 the whole prediction took
        74–116 full-data products with "ggn" (two runs) against
        ≈1,800 for the per-sample passes alone with "products", both within 6 % of the
        measured λ'(B) (benchmarks/README.md). `spikes` is not used with "ggn".
    progress : bars over the per-sample passes (the subspace pass, the per-sample
        Lanczos runs or the Gauss–Newton pass).
    """
    check_noise_operator(op)
    min_batch = as_int("min_batch", min_batch, minimum=1)
    if min_batch > op.N:                # no batch that small exists: it returned no spikes
        raise ValueError(f"min_batch must be <= N={op.N} (the smallest batch size to be "
                         f"evaluated), got {min_batch}")
    exact = as_bool("exact", exact)
    if cross not in ("auto", "nystrom", "exact"):
        raise ValueError(f"cross must be 'auto', 'nystrom' or 'exact', got {cross!r}")
    if spikes not in ("lanczos", "ggn"):
        raise ValueError(f"spikes must be 'lanczos' or 'ggn', got {spikes!r}")
    if per_sample not in ("products", "ggn", "auto"):
        raise ValueError(f"per_sample must be 'products', 'ggn' or 'auto', got {per_sample!r}")
    auto = per_sample == "auto"
    jac = None
    if auto:
        if max_samples is None and not exact and large_per_sample_pass(op.N, op.P):
            jac = _sample_jacobians_or_none(op)
        per_sample = "products" if jac is None else "ggn"
    if per_sample == "ggn" and max_samples not in (None, "auto"):
        raise ValueError("per_sample='ggn' runs on every sample; leave max_samples=None")
    if max_candidates is not None:
        max_candidates = as_int("max_candidates", max_candidates, minimum=1)
    if isinstance(max_samples, str):
        if max_samples != "auto":
            raise ValueError(f'max_samples must be an int, None or "auto", got {max_samples!r}')
        max_samples = DEFAULT_MAX_SAMPLES if large_per_sample_pass(op.N, op.P) else None
    if max_samples is not None:
        max_samples = as_int("max_samples", max_samples, minimum=2)
    if exact:
        max_candidates, max_samples, cross = None, None, "exact"
    rows = row_weight = moments = HU = gp = check = None
    if per_sample == "ggn":
        max_samples = None
        sub, HU, gp, check = _gauss_newton_subspace(op, U, jac, auto=auto, seed=seed,
                                                    chunk_size=chunk_size, memory=memory,
                                                    progress=progress)
    if gp is None and max_samples is not None and op.N > max_samples:
        Uo = _orthonormal(U, op.P, op.device)
        HU = op.matmat(Uo.to(op.dtype)).to(torch.float64)
        moments = micro_batch_moments(op, Uo, HU, micro_batch="auto", seed=seed,
                                      chunk_size=chunk_size, memory=memory)
        rows, row_weight = stratified_rows(moments, op.N, max_samples, seed)
    if gp is None:
        sub, HU = subspace_pass(op, U, chunk_size=chunk_size, memory=memory, samples=rows,
                                moments=moments, seed=seed, HU=HU, row_weight=row_weight,
                                progress=progress)
    lam1 = float(np.linalg.eigvalsh(sub.H_U)[-1])
    if not lam1 > 0:
        raise ValueError(f"the top eigenvalue {lam1:.3g} must be positive")
    op_rows = op if rows is None else op.subset(rows)            # the stored rows' samples
    if gp is not None:
        spikes = _kept_spikes(gp, min_batch * lam1, max_candidates, seed, products=0.0)
    elif spikes == "ggn":
        spikes = per_sample_ggn_top_eigenpairs(op_rows, seed=seed, keep_above=min_batch * lam1,
                                               chunk_size=chunk_size, max_keep=max_candidates,
                                               memory=memory)
    else:
        spikes = per_sample_top_eigenpairs(op_rows, steps=steps, seed=seed,
                                           keep_above=min_batch * lam1, chunk_size=chunk_size,
                                           max_keep=max_candidates, memory=memory,
                                           progress=progress)
    Uo = sub.vectors                                             # (P, k) float64
    k = Uo.shape[1]
    V = spikes.vectors                                           # (P, m) float64
    m = V.shape[1]
    if cross == "auto":
        cross = "exact" if m <= EXACT_CROSS_MAX else "nystrom"
    cand = np.flatnonzero(spikes.gamma > min_batch * lam1)
    frac = sub.n_rows / op.N
    if gp is None:
        per = spikes.steps if spikes.products is None else spikes.products
        cost = k + frac * (k + per)                              # HU, pass, per-sample spikes
    else:       # HU; data passes (C + 3k backward or forward-mode, each ≈ half a product)
        cost = k + 0.5 * (gp.jac.C + 3 * k)
    if rows is not None:
        cost += k                                    # moments: every sample once, k directions
    if m:
        UHV = (HU.T @ V).cpu().numpy()                           # (k, m) UᵀHv_j, exact
        if cross == "exact":
            HV = op.matmat(V.to(op.dtype)).to(torch.float64)     # m products, split by memory
            VHV = (V.T @ HV).cpu().numpy()
            cost += m
            del HV
        else:
            VHV = UHV.T @ np.linalg.pinv(sub.H_U, rcond=1e-10, hermitian=True) @ UHV
        VHV = 0.5 * (VHV + VHV.T)
        T = (Uo.T @ V).cpu().numpy()
        a = sub.a[spikes.index]                                  # (m, k, k)
        if gp is None:
            UHiv = _own_products(op_rows, V, spikes.index, Uo, chunk_size, memory)  # (m, k)
            w = UHiv - UHV.T - np.einsum("mij,jm->mi", a, T)
        else:           # v_iᵀ(G_i − Ḡ)U − t_iᵀa_i with J_iv_i = K_ic_i (ggn_samples)
            ix = torch.from_numpy(spikes.index).to(gp.K.device)
            Jv = (gp.K[ix] @ gp.coef[ix][:, :, None])[:, :, 0]                    # (m, C)
            UGiv = (gp.JU[ix].transpose(1, 2) @ (gp.Lam[ix] @ Jv[:, :, None]))[:, :, 0]
            UGV = (gp.GU.T @ V).T                                                  # (m, k)
            w = (UGiv - UGV).cpu().numpy() - np.einsum("mij,jm->mi", a, T)
        cost += m / op.N
        Gv = (V.T @ V).cpu().numpy()
    else:
        T, UHV, w = np.zeros((k, 0)), np.zeros((k, 0)), np.zeros((0, k))
        Gv, VHV = np.zeros((0, 0)), np.zeros((0, 0))
    proxy = np.full(sub.n_rows, -1, dtype=np.int64)
    if m:
        lg = np.log(spikes.gamma[spikes.index])
        order = np.argsort(lg, kind="stable")
        at = np.searchsorted(lg[order], np.log(spikes.gamma[cand]))
        lo, hi = order[np.clip(at - 1, 0, m - 1)], order[np.clip(at, 0, m - 1)]
        gc = np.log(spikes.gamma[cand])
        proxy[cand] = np.where(np.abs(lg[lo] - gc) <= np.abs(lg[hi] - gc), lo, hi)
        proxy[spikes.index] = np.arange(m)
    weight = spikes.weight if spikes.weight is not None else np.ones(m)
    weight = sub.weights[spikes.index] * np.asarray(weight)     # × samples per row
    return ResolvedNoise(subspace=sub, gamma=spikes.gamma, index=spikes.index, T=T, Gv=Gv,
                         VHV=VHV, UHV=UHV, w=w, lam1=lam1, min_batch=min_batch,
                         residual=spikes.residual[spikes.index], weight=np.asarray(weight),
                         proxy=proxy, n_candidates=int(cand.size), cross=cross,
                         full_products=float(cost),
                         per_sample="products" if gp is None else "ggn",
                         ggn_check=None if check is None else
                         {k: check[k] for k in ("s2_ggn", "s2_hessian", "s2_hessian_stderr")},
                         gram_floor=_precision_floor(Uo, op.dtype))


#: per_sample="auto" keeps the Gauss–Newton form only if its directional noise along the
#: top eigenvector is at least this fraction of the Hessian's (lower 2-s.e. bound)
GGN_NOISE_FRACTION = 0.5


def _gauss_newton_subspace(op, U, jac, *, auto, seed, chunk_size, memory, progress=None):
    """(sub, HU, gp, check) for per_sample="ggn": HU by k full-data products, the
    Gauss–Newton pass `gp` and its `SubspaceNoise` `sub` (the centre H_U the operator's).
    With auto=True, a pass that raises or fails `_gauss_newton_noise_check` gives a
    warning and gp = sub = None (HU is kept for the per-sample-products pass); check is
    the comparison (None without auto)."""
    Uo = _orthonormal(U, op.P, op.device)
    HU = op.matmat(Uo.to(op.dtype)).to(torch.float64)
    try:
        gp = ggn_sample_pass(op, Uo, chunk_size=chunk_size, memory=memory, jac=jac,
                             progress=progress)
    except (RuntimeError, NotImplementedError) as exc:
        if not auto:
            raise
        warnings.warn("per_sample='auto': the Gauss–Newton per-sample pass failed "
                      f"({str(exc).splitlines()[0][:200]}); using per-sample products",
                      RuntimeWarning, stacklevel=caller_stacklevel())
        return None, HU, None, None
    H_U = (Uo.T @ HU).cpu().numpy()
    H_U = 0.5 * (H_U + H_U.T)
    sub = SubspaceNoise(lam=np.diag(H_U).copy(), H_U=H_U, a=gp.a, D=gp.D, S=gp.S,
                        N=int(op.N), P=int(op.P), k=int(Uo.shape[1]), vectors=Uo)
    if not auto:
        return sub, HU, gp, None
    check = _gauss_newton_noise_check(op, sub, seed, chunk_size, memory)
    if check["s2_ggn"] < GGN_NOISE_FRACTION * check["s2_lower"]:
        warnings.warn(
            "per_sample='auto': the per-sample Gauss–Newton terms give a directional "
            f"noise s_u² = {check['s2_ggn']:.3g} along the top eigenvector against the "
            f"Hessian's {check['s2_hessian']:.3g} ± {check['s2_hessian_stderr']:.2g} (the "
            "residual term dominates the fluctuations: a network far from a minimum); "
            "using per-sample products", RuntimeWarning, stacklevel=caller_stacklevel())
        return None, HU, None, check
    return sub, HU, gp, check


def _gauss_newton_noise_check(op, sub: SubspaceNoise, seed, chunk_size, memory) -> dict:
    """The Gauss–Newton form's directional noise along the top eigenvector u of UᵀHU,
    s²_GGN = wᵀ(S + D)w (u = Uw; S, D of the Gauss–Newton `sub`), against the Hessian's
    s_u² from `nets.noise.directional` (micro-batches once N·P > 2²⁷: a few full-data
    products) — the quantity λ'(B) depends on. On trained networks the two agree
    (301k-parameter MLP 0.98, an Adam-trained CIFAR-shaped CNN 0.95); on a CNN at chance
    the Gauss–Newton terms carried 0.5 % of it, and the form predicted λ'(8) 77 % low."""
    from nets.noise.directional import directional_noise_from_operator
    w = np.linalg.eigh(sub.H_U)[1][:, -1]
    s2_ggn = float(w @ (sub.S + sub.D) @ w)
    Uo = sub.vectors
    u = Uo @ torch.as_tensor(w, dtype=Uo.dtype, device=Uo.device)
    dn = directional_noise_from_operator(op, u, micro_batch="auto", seed=seed,
                                         chunk_size=chunk_size, memory=memory)
    return dict(s2_ggn=s2_ggn, s2_hessian=float(dn.s2), s2_hessian_stderr=float(dn.stderr),
                s2_lower=float(dn.s2) - 2.0 * float(dn.stderr))


def _sample_jacobians_or_none(op):
    """op's `SampleJacobians` when `per_sample="ggn"` can run on its model (one output
    tensor per sample, at most 1024 numbers), else None."""
    try:
        return SampleJacobians(op)
    except (TypeError, ValueError):
        return None


def _own_products(op, V, index, Uo, chunk_size, memory) -> np.ndarray:
    """Uᵀ C_i v_i for each kept sample i (its own per-sample product), (m, k), in chunks
    sized to the memory budget; the P-vectors C_i v_i are reduced at once."""
    prod = _per_sample_product(op)
    m = V.shape[1]
    step = group_chunk(op, m, 1, chunk_size=chunk_size, memory=memory)
    out = []
    for s in range(0, m, step):
        Xs, Ys = op.source.take(index[s:s + step], device=op.device, dtype=op.dtype)
        HiV = prod(Xs, Ys, V[:, s:s + step].T.to(op.dtype)).to(torch.float64)   # (g, P)
        out.append((HiV @ Uo).cpu().numpy())
    return np.concatenate(out)


def _complement_noise(rn: ResolvedNoise, sel: np.ndarray) -> np.ndarray:
    """D_h(B): the complement noise with the spikes of the resolved samples removed,
    x_i = Q(H_i − H)U − γ_i (Qv_i) t_iᵀ for those samples:

        Σ(x_i − x̄)ᵀ(x_i − x̄) = Σ R_iᵀR_i − Σ_res [γ_i(t_i w_iᵀ + w_i t_iᵀ) − γ_i² q_i t_i t_iᵀ]
                               − YᵀY/N,   YᵀY = T_s Γ (Gv − TᵀT)_s Γ T_sᵀ,

    q_i = 1 − ‖t_i‖², w_i = v_iᵀQ(H_i − H)U, Σ_i Q(H_i − H)U = 0. `sel` are the positions
    (in rn.index) of the kept resolved samples; sums over all resolved samples are
    estimated by Horvitz–Thompson weights ω_i = 1/π_i (ω_iω_j for the pairs i ≠ j of
    YᵀY), exact when every candidate is kept."""
    sub = rn.subspace
    N = sub.N
    if sel.size == 0:
        return sub.D
    om = np.ones(sel.size) if rn.weight is None else rn.weight[sel]
    g = rn.gamma[rn.index[sel]]
    T = rn.T[:, sel]
    w = rn.w[sel]
    q = 1.0 - (T * T).sum(0)
    cross = np.einsum("m,km,ml->kl", om * g, T, w)
    corr = cross + cross.T - np.einsum("m,km,lm->kl", om * g * g * q, T, T)
    Om = np.outer(om, om)
    np.fill_diagonal(Om, om)
    GQ = (rn.Gv[np.ix_(sel, sel)] - T.T @ T) * Om
    TG = T * g
    YY = TG @ GQ @ TG.T
    D = sub.D - (corr + YY / N) / (N - 1)
    return 0.5 * (D + D.T)


def _population_batches(N: int, resolved: np.ndarray, B: int, n_batches: int, rng,
                        replacement: bool, weights=None) -> np.ndarray:
    """(n_batches, B) row indices emulating batches of the N samples from a sampled
    population of rows (module docstring): the number h of resolved samples in a batch is
    hypergeometric (binomial with replacement) with the population count Σ_res w_j (w_j:
    samples row j stands for; N/n each when None), the h resolved rows are distinct and
    drawn with probability ∝ w_j (a row is one sample: a repeat would add its spike twice
    along one direction), the B − h unresolved rows are drawn with replacement."""
    n = resolved.size
    w = np.full(n, N / n) if weights is None else np.asarray(weights, dtype=float)
    res = np.flatnonzero(resolved)
    unres = np.flatnonzero(~resolved)
    r = res.size
    if r == 0:
        return rng.integers(0, n, size=(n_batches, B))
    if unres.size == 0:
        return res[rng.integers(0, r, size=(n_batches, B))]
    p_res = w[res] / w[res].sum()
    n_res = min(N, max(r, int(round(w[res].sum()))))
    h = (rng.binomial(B, n_res / N, size=n_batches) if replacement
         else rng.hypergeometric(n_res, N - n_res, B, size=n_batches))
    out = unres[rng.integers(0, unres.size, size=(n_batches, B))]
    for b in np.flatnonzero(h):
        hb = int(h[b])
        pick = rng.choice(r, size=min(hb, r), replace=False, p=p_res)
        if hb > r:                                  # more than the rows hold: repeats
            pick = np.concatenate([pick, rng.integers(0, r, size=hb - r)])
        out[b, :hb] = res[pick]
    return out


def _population_fluctuation(sub, resolved, idx_all, counts, B, replacement, rng):
    """In-subspace fluctuation a_S (n_batches, k, k) of emulated batches (module docstring).

    The h resolved rows of a batch enter as they are (a_i is centred on the full-data H,
    so the data's mean of a_i is 0 exactly). The B − h unresolved samples enter as a
    Gaussian: their sum has mean (B − h)·μ_u and covariance (B − h)(1 − B/N)·Σ_u (without
    replacement), where for the N_u = N − N_res unresolved samples of the data

        Σ_i∈unres a_i = −Σ_i∈res a_i,   (N_u − 1)·Σ_u = (N − 1)·C − Σ_i∈res a_i a_iᵀ − N_u μ_u μ_uᵀ,

    C the covariance of vec(a_i) over every sample (`SubspaceNoise.a_cov`, from the
    micro-batch pass; the rows' own covariance when absent) and the sums over resolved
    samples Horvitz–Thompson estimates from the resolved rows (× the samples each row
    stands for); Σ_u is clipped to be positive semi-definite. A Gaussian rather than rows
    drawn again: a row drawn twice would add its heavy-tailed a_i coherently, which a batch of distinct samples never
    does, and the unresolved part is a sum of many moderate terms."""
    N, n, k = sub.N, sub.n_rows, sub.k
    flat = sub.a.reshape(n, k * k)
    w_res = sub.weights[resolved]                             # samples each row stands for
    res_rows = flat[resolved]
    n_res = min(N - 1, float(w_res.sum()))
    N_u = N - n_res
    mu_u = -(w_res @ res_rows) / N_u
    cov_u = ((N - 1) * sub.a_covariance() - (res_rows * w_res[:, None]).T @ res_rows
             - N_u * np.outer(mu_u, mu_u)) / max(N_u - 1, 1.0)
    L = _psd_factor(cov_u)                                    # N(0, cov_u) as g @ Lᵀ
    out = np.zeros((idx_all.shape[0], k * k))
    for b in np.flatnonzero(counts):                          # resolved rows, as they are
        row = idx_all[b]
        out[b] = flat[row[resolved[row]]].sum(axis=0)
    m_un = B - counts                                         # unresolved samples per batch
    f = math.sqrt(batch_noise_factor(B, N, replacement=replacement) * B)
    g = rng.standard_normal((idx_all.shape[0], k * k))
    out += m_un[:, None] * mu_u + (f * np.sqrt(m_un))[:, None] * (g @ L.T)
    return (out / B).reshape(-1, k, k)


class _StandIns:
    """Kept spike vectors standing for a batch's resolved samples, distinct within a batch.

    A kept candidate stands for itself. A dropped candidate (priority sampling,
    `max_candidates`) is represented by the kept candidate of nearest log γ that no other
    sample of the same batch already uses: two distinct samples sharing one stand-in
    would add their spikes along one direction (γ_a + γ_b)/B, which distinct samples —
    whose top directions are as far apart as the kept ones' are from each other — do not.
    A sample drawn twice (batches with replacement) keeps one stand-in. Only when a
    batch holds more resolved samples than there are kept vectors are stand-ins shared."""

    def __init__(self, rn: ResolvedNoise, pos: np.ndarray):
        self.pos = pos
        self.index = rn.index
        lg = np.log(rn.gamma[rn.index]) if rn.index.size else np.zeros(0)
        self.order = np.argsort(lg, kind="stable")         # kept positions by γ
        self.lg_sorted = lg[self.order]
        self.lg_all = np.log(np.maximum(rn.gamma, 1e-300))

    def __call__(self, hs: np.ndarray) -> np.ndarray:
        p = self.pos[hs].copy()
        own = self.index[p] == hs
        m = self.index.size
        if own.all() or m == 0:
            return p
        used = set(p[own].tolist())
        given: dict[int, int] = {}
        for t in np.flatnonzero(~own):
            sample = int(hs[t])
            if sample not in given and len(used) < m:
                # kept candidates by distance in log γ (ties: the smaller γ, as for `proxy`)
                dist = np.abs(self.lg_sorted - self.lg_all[sample])
                near = self.order[np.argsort(dist, kind="stable")]
                q = next(int(j) for j in near if int(j) not in used)
                used.add(q)
                given[sample] = q
            p[t] = given.get(sample, p[t])    # the same sample again, or no vector left
        return p


#: the pencil's Gram eigenvalues below this fraction of the largest are dropped (`_top_pencil`)
GRAM_CUTOFF = 1e-10


def _precision_floor(Uo: torch.Tensor, dtype: torch.dtype) -> float:
    """The Gram cutoff of the batch pencil for these inputs: GRAM_CUTOFF, or more where
    the inputs cannot resolve smaller outside parts ‖q‖² = ‖(I − UUᵀ)v‖² — 10× U's
    departure from orthonormality ‖UᵀU − I‖ (a float32 U: ~1e-7, which Gv − TᵀT carries)
    and 100× the products' machine epsilon (q's curvature qᵀHq is a difference of O(λ)
    products). An outside sweep: a 9-parameter softmax regression in float32 with spikes
    1e-4 outside a float32 U read 2.4× the dense Monte Carlo (Q-block ratios qᵀHq/‖q‖² of
    −432 to 122 against λ₁ = 2.8) with GRAM_CUTOFF alone; 1.00 with this floor."""
    k = Uo.shape[1]
    eye = torch.eye(k, dtype=Uo.dtype, device=Uo.device)
    orth = float(torch.linalg.matrix_norm(Uo.T @ Uo - eye, ord=2))
    return max(GRAM_CUTOFF, 10.0 * orth, 100.0 * torch.finfo(dtype).eps)


def _outside_blocks(rn: ResolvedNoise) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(QᵀQ, UᵀHQ, QᵀHQ) for every kept spike, Q = (I − UUᵀ)V — derived once per call of
    `resolved_batch_top_eigenvalue` from T, Gv, UHV, VHV and H_U; each batch takes its
    stand-ins' rows and columns (`_batch_pencil`):

        QᵀQ = Gv − TᵀT,   UᵀHQ = UᵀHV − H_U T,   QᵀHQ = VᵀHV − TᵀUᵀHV − (·)ᵀ + TᵀH_U T."""
    T, UHV, H_U = rn.T, rn.UHV, rn.subspace.H_U
    Gq = rn.Gv - T.T @ T
    TUHV = T.T @ UHV
    QHQ = rn.VHV - TUHV - TUHV.T + T.T @ H_U @ T
    return 0.5 * (Gq + Gq.T), UHV - H_U @ T, 0.5 * (QHQ + QHQ.T)


def _batch_pencil(rn: ResolvedNoise, blocks, p: np.ndarray, sp: np.ndarray, A_UU: np.ndarray,
                  f: float) -> tuple[np.ndarray, np.ndarray]:
    """(A, Gram) of one batch on W = [U, Q_h], Q_h = (I − UUᵀ)v_h the resolved spikes'
    parts outside span(U) (kept stand-ins p, spike weights sp = Σγ_i/B per stand-in;
    `blocks` from `_outside_blocks`):

        A = blocks of the remainder R_S + Σ_h sp_j (Wᵀv_j)(Wᵀv_j)ᵀ,   Wᵀv_j = [t_j; Q_hᵀv_j],
        UᵀR_S U = A_UU − Σ_h sp_j t_j t_jᵀ,   UᵀR_S Q_h = f·UᵀH Q_h,   Q_hᵀR_S Q_h = f·Q_hᵀH Q_h,
        Gram = WᵀW = diag(I_k, Q_hᵀQ_h),   Q_hᵀv_j = Q_hᵀq_j.

    One operator on one space: inside span(U) the remainder is the subspace model (its
    fluctuation included), outside it the mean field f·H. A spike inside span(U) (Q_h → 0)
    is then the rank-one term in the U-block alone, continuously."""
    Gq_all, UHQ_all, QHQ_all = blocks
    k = A_UU.shape[0]
    T = rn.T[:, p]
    Gq = Gq_all[np.ix_(p, p)]
    A = np.empty((k + p.size,) * 2)
    A[:k, :k] = A_UU - (T * sp) @ T.T
    A[:k, k:] = f * UHQ_all[:, p]
    A[k:, :k] = A[:k, k:].T
    A[k:, k:] = f * QHQ_all[np.ix_(p, p)]
    WV = np.vstack([T, Gq])                                    # Wᵀ v_h
    A += (WV * sp) @ WV.T
    Gram = np.zeros_like(A)
    Gram[:k, :k] = np.eye(k)
    Gram[k:, k:] = Gq
    return A, Gram


def _top_pencil(A: np.ndarray, Gram: np.ndarray, floor: float = GRAM_CUTOFF) -> float:
    """Largest eigenvalue of the pencil (A, Gram), Gram PSD: restricted to the range of
    Gram (eigenvalues above `floor` times the largest)."""
    g, E = np.linalg.eigh(Gram)
    keep = g > floor * g[-1]
    Xm = E[:, keep] / np.sqrt(g[keep])
    M = Xm.T @ A @ Xm
    return float(np.linalg.eigvalsh(0.5 * (M + M.T))[-1])


def resolved_batch_top_eigenvalue(rn: ResolvedNoise, batch_sizes, *, n_batches=2000,
                                  replacement=False, seed=0, indices=None,
                                  resolve_factor=1.0) -> dict:
    """E_S λ_max of the sample-resolved batch model (module docstring) per batch size.

    Batches are drawn uniformly (without replacement unless `replacement`) from
    `numpy.random.default_rng(seed)`, or taken from `indices` (one (n, B) array per batch
    size, e.g. `measure_batch_top_eigenvalue(...)["indices"]`). Every B must be at least
    rn.min_batch. resolve_factor : sample i is resolved at B iff γ_i > resolve_factor·B·λ_1
    (default 1, the rule of the module docstring; other values are for sensitivity
    studies and need resolve_factor·B >= rn.min_batch). Returns {"mean", "stderr"
    (Monte-Carlo), "values", "n_resolved" (mean number of resolved samples per batch), "c",
    "batch_sizes"}.
    """
    if not isinstance(rn, ResolvedNoise):
        raise TypeError("rn must be a ResolvedNoise")
    replacement = as_bool("replacement", replacement)
    n_batches = as_int("n_batches", n_batches, minimum=1)
    rng = as_rng(seed)
    Bs = as_batch_sizes(batch_sizes, rn.subspace.N, replacement)
    sub = rn.subspace
    N, k = sub.N, sub.k
    resolve_factor = as_float("resolve_factor", resolve_factor, positive=True)
    if np.any(resolve_factor * Bs < rn.min_batch):
        raise ValueError(f"resolve_factor·batch_sizes must be >= min_batch={rn.min_batch} (the "
                         f"spikes kept by resolved_noise_from_operator), got {Bs.tolist()}")
    sampled = sub.samples is not None
    if indices is not None and sampled:
        raise ValueError("indices need the exhaustive pass (this ResolvedNoise holds a sampled "
                         "population: build it with exact=True or max_samples >= N)")
    if indices is not None and len(indices) != len(Bs):
        raise ValueError("indices must hold one (n, B) array per batch size")
    n_rows = sub.n_rows
    if rn.proxy is not None:
        pos = rn.proxy
    else:
        pos = np.full(n_rows, -1, dtype=np.int64)
        pos[rn.index] = np.arange(rn.index.size)
    stand_ins = _StandIns(rn, pos)
    blocks = _outside_blocks(rn)
    lam1 = rn.lam1
    means, ses, values, nres, cs = [], [], [], [], []
    for j, B in enumerate(Bs):
        B = int(B)
        c = batch_noise_factor(B, N, replacement=replacement)
        resolved = rn.gamma > resolve_factor * B * lam1   # ⊂ kept (factor·B >= min_batch)
        sel = np.flatnonzero(resolved[rn.index])
        base = sub.H_U + c * _complement_noise(rn, sel) / lam1
        if indices is not None:
            idx_all = np.asarray(indices[j])
            if idx_all.ndim != 2 or idx_all.shape[1] != B:
                raise ValueError(f"indices[{j}] must have shape (n, {B})")
        elif sampled:
            idx_all = _population_batches(sub.N, resolved, B, n_batches, rng, replacement,
                                          sub.weights)
        elif replacement:
            idx_all = rng.integers(0, N, size=(n_batches, B))
        else:
            idx_all = np.stack([rng.choice(N, size=B, replace=False) for _ in range(n_batches)])
        counts = resolved[idx_all].sum(axis=1).astype(float)
        if sampled:
            aS = _population_fluctuation(sub, resolved, idx_all, counts, B, replacement, rng)
        else:
            step = max(1, (1 << 22) // max(B * k * k, 1))     # ≤ 32 MB of gathered a_i
            aS = np.concatenate([sub.a[idx_all[s:s + step]].mean(axis=1)
                                 for s in range(0, len(idx_all), step)])   # (n, k, k)
        z = np.empty(len(idx_all))
        plain = counts == 0                                    # no resolved sample: k×k
        if plain.any():
            A = base[None] + aS[plain]
            z[plain] = np.linalg.eigvalsh(0.5 * (A + A.transpose(0, 2, 1)))[:, -1]
        for r in np.flatnonzero(~plain):
            idx = idx_all[r]
            hs = idx[resolved[idx]]                            # resolved, with repeats
            p, inv = np.unique(stand_ins(hs), return_inverse=True)   # kept stand-ins
            sp = np.bincount(inv.reshape(-1), weights=rn.gamma[hs], minlength=p.size) / B
            z[r] = _top_pencil(*_batch_pencil(rn, blocks, p, sp, base + aS[r],
                                              1.0 - hs.size / B), rn.gram_floor)
        values.append(z)
        nres.append(counts.mean())
        means.append(z.mean())
        ses.append(z.std(ddof=1) / math.sqrt(len(z)) if len(z) > 1 else 0.0)
        cs.append(c)
    return {"mean": np.array(means), "stderr": np.array(ses), "values": values,
            "n_resolved": np.array(nres), "c": np.array(cs), "batch_sizes": Bs}
