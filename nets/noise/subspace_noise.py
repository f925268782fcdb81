"""Quasi-degenerate (subspace) form of the batch top eigenvalue λ'_1(B) (docs/theory.md §3.6 [ext]).

The directional form λ' = λ + c·s_u²/λ is second-order perturbation theory with every
denominator λ_1 − λ_j replaced by λ_1 (the rest of the spectrum at 0). When other
outliers lie close to λ_1 (digits MLP: λ1 ≈ 0.27, λ2 ≈ 0.23) that replacement fails.
The standard fix is Löwdin partitioning onto the top-k eigenspace U (P×k, H U = U Λ_k,
Q = I − U Uᵀ). For the batch Hessian H_B = H + ε, z is an eigenvalue of H_B iff it is
an eigenvalue of the k×k matrix (exact, Schur complement / Brillouin–Wigner)

    M_B(z) = Λ_k + Uᵀ ε U + Uᵀ ε Q (z − Q H_B Q)⁻¹ Q ε U.

Approximations made here (and only these):
1. the complement is at 0, (z − Q H_B Q)⁻¹ → 1/z (the same approximation as the
   directional form, now only for the directions outside U);
2. the complement second moment is replaced by its batch mean,
   Uᵀ ε Q ε U → E[Uᵀ ε Q ε U] = c(B,N)·D,   D = (1/(N−1)) Σ_i R_iᵀ R_i,
   R_i = Q (H_i − H) U (exact for the mean over batches drawn without replacement,
   docs/theory.md §1, with c = `rmt.batch_noise_factor(B, N, replacement)`).
The in-subspace part a_B = Uᵀ ε U = (1/B) Σ_{i∈S} a_i, a_i = Uᵀ (H_i − H) U, is kept
exactly: batches are resampled from the N stored k×k projections ("resample", no
P-dimensional eigensolves), or drawn from the Gaussian with the same covariance,
a_B = √(c/(N−1)) Σ_i g_i a_i, g_i ~ N(0, 1) ("gaussian"). Then

    λ'_1(B) ≈ E_S[z_S],   z_S = λ_max(Λ_k + a_S + c·D/λ_1)      (self_consistent=False)
                          z_S = λ_max(Λ_k + a_S + c·D/z_S)      (self_consistent=True)

The default evaluates the complement resolvent at z = λ_1 (Rayleigh–Schrödinger), as the
directional form does. Reason: for a spike θ on a semicircular complement of variance v
the exact complement term is v·G(z) with G the semicircle resolvent, and at the BBP
outlier G(z*) = 1/θ, so "1/z at z = λ_1" is exact there (z* = θ + v/θ), whereas the
self-consistent 1/z* gives (θ + √(θ² + 4v))/2 < θ + v/θ: it drops the complement's own
noise bulk, which makes (z − Q H_B Q)⁻¹ larger than 1/z. The self-consistent
(Brillouin–Wigner) variant is kept for comparison: z ↦ λ_max(A + cD/z) is
non-increasing for z > 0 (D is PSD), so z − λ_max(A + cD/z) is increasing, the root
z > 0 is unique, and it is found by bisection.

Sampled population (`samples=`). At scale the per-sample pass runs on a uniformly random
subset of n of the N samples (`samples`, drawn without replacement), with the full-data
H (k exact full-data products HU) as the centre, so a_i = Uᵀ(H_i − H)U is the same
quantity as in the exhaustive pass. Sums over the data are Horvitz–Thompson estimates:
D = (N/n)·(1/(N−1)) Σ_{i∈samples} R_iᵀR_i, and likewise S (unbiased; exact when n = N).
With `moments=` (what the resolved form uses) D and S come instead from one more pass over
every sample in micro-batches (`micro_batch_moments`): heavy-tailed per-sample curvature
makes the row estimate fragile (on a model whose 15 of 240 samples are heavy, subsets of
n = 120 put D at 1.6–1.8× its exhaustive value), and a pass in ≈ 256 groups includes
every sample at the cost of ≈ 256 group products per direction. The same pass scores each
group, and `stratified_rows` takes the highest-scoring groups whole (weight 1) and the
rest of the rows uniformly (`row_weight`: how many samples each row stands for).
For a sampled population `subspace_batch_top_eigenvalue` draws a_S, whatever `method`,
from the Gaussian with covariance c(B,N)·C, C the data's covariance of vec(a_i) (`a_cov`,
from the micro-batch pass, or the rows' own): rows drawn again would add a heavy row
coherently, which a batch of distinct samples never does (301k-parameter MLP, N = 5000,
512 uniform rows resampled: λ'(8) = 32.5 against 9.75 for the exhaustive form).
Evaluating on given batches (`indices`) needs the exhaustive pass.

Limits (tested). k = P: Q = 0, D = 0 and Λ_k + a_S = Uᵀ H_S U, so z_S is exactly the top
eigenvalue of the batch Hessian on the same batch. k = 1, self_consistent=False: the
1×1 model is linear in a_S (mean 0), so λ'_1 = λ + c·D/λ exactly, with
D = s_u² − σ_uu², s_u² the directional noise of `nets.noise.directional` and σ_uu² =
(1/(N−1)) Σ_i (uᵀ(H_i − H)u)² (the exact split ‖(H_i−H)u‖² = (uᵀ(H_i−H)u)² +
‖Q(H_i−H)u‖²). The directional form λ + c·s_u²/λ (docs/theory.md §3.3) is this plus c·σ_uu²/λ: the
diagonal second-order term that vanishes (O(1/P)) for Wigner noise but is not part of
second-order perturbation theory (it is cancelled by the a_S/z expansion). So at k = 1
the subspace form is the directional form with s_u² replaced by its complement part
s_u² − σ_uu²; `directional_s2` reports both pieces so the two are comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from nets.algorithms.lanczos import eigsh
from nets.curvature.loss_check import _leaves_read
from nets.curvature.operators import ModelCurvatureOperator, curvature_operator, policy_mode
from nets.curvature.params import output_tensors
from nets.noise.directional import (
    check_noise_operator,
    fetch_groups,
    group_chunk,
    micro_batch_partition,
)
from nets.utils.autocast import outside_autocast
from nets.utils.data_source import as_data_source
from nets.utils.modes import kept_attributes, kept_tensors
from nets.utils.progress import progress_bar
from nets.utils.results import Result, result
from rmt.sampling import batch_noise_factor
from rmt.validation import as_batch_sizes, as_bool, as_int, as_rng

__all__ = ["SubspaceNoise", "subspace_noise_from_operator", "subspace_noise",
           "subspace_batch_top_eigenvalue", "default_subspace_dim", "micro_batch_moments",
           "Moments", "stratified_rows"]


@result
class SubspaceNoise(Result):
    """Per-sample curvature statistics on a k-dimensional subspace U.

    lam : (k,) Rayleigh quotients diag(Uᵀ H U) (the eigenvalues Λ_k when U holds
    eigenvectors), in the order of U's columns; H_U : (k, k) Uᵀ H U (symmetrised);
    a : (N, k, k) a_i = Uᵀ (H_i − H) U (symmetrised, Σ_i a_i = 0 up to round-off);
    D : (k, k) complement noise (1/(N−1)) Σ_i R_iᵀ R_i, R_i = Q (H_i − H) U;
    S : (k, k) in-subspace noise (1/(N−1)) Σ_i a_i a_i. The directional noise along
    column j is s²_j = S_jj + D_jj (`directional_s2`). N, P, k; vectors : (P, k) U.
    samples : None (a holds every sample) or the (n,) indices of the sampled population
    whose rows a holds (module docstring; D and S are then Horvitz–Thompson estimates);
    a_cov : None, or the (k², k²) per-sample covariance of vec(a_i) over every sample
    from the micro-batch pass (`micro_batch_moments`; with a sampled population);
    row_weight : None (every row stands for N/n samples) or (n,) how many samples of the
    data each row stands for (inverse inclusion probabilities of a stratified draw)."""

    lam: np.ndarray
    H_U: np.ndarray
    a: np.ndarray
    D: np.ndarray
    S: np.ndarray
    N: int
    P: int
    k: int
    vectors: torch.Tensor
    samples: np.ndarray | None = None
    a_cov: np.ndarray | None = None
    row_weight: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        """Number of stored per-sample rows (N, or n for a sampled population)."""
        return int(self.a.shape[0])

    @property
    def ht_scale(self) -> float:
        """N/n: the Horvitz–Thompson factor of sums over the stored rows (1 when exhaustive)."""
        return self.N / self.n_rows

    def a_covariance(self) -> np.ndarray:
        """(k², k²) covariance of vec(a_i): `a_cov` (every sample, micro-batches) when
        computed, else the stored rows' own (ddof 1)."""
        if self.a_cov is not None:
            return self.a_cov
        flat = self.a.reshape(self.n_rows, self.k * self.k)
        dev = flat - flat.mean(axis=0)
        return dev.T @ dev / max(self.n_rows - 1, 1)

    @property
    def weights(self) -> np.ndarray:
        """(rows,) how many samples of the data each stored row stands for (all 1 when
        exhaustive; N/n for a uniform subset; `row_weight` for a stratified one)."""
        if self.row_weight is not None:
            return np.asarray(self.row_weight, dtype=float)
        return np.full(self.n_rows, self.ht_scale)

    def restrict(self, k: int) -> "SubspaceNoise":
        """The statistics for the span of the first k columns of U (exact: the
        complement of the smaller span gains the dropped in-subspace rows,
        D_k = (S + D)[:k, :k] − (1/(N−1)) Σ_i a_i[:k, :k]²)."""
        k = as_int("k", k, minimum=1)
        if k > self.k:
            raise ValueError(f"k must be <= {self.k}, got {k}")
        a = self.a[:, :k, :k]
        a_cov = None
        if self.a_cov is not None:       # S from the same source as self.S: the moments
            K = self.k
            C4 = self.a_cov.reshape(K, K, K, K)[:k, :k, :k, :k]
            a_cov = C4.reshape(k * k, k * k).copy()
            S = np.einsum("jmlm->jl", C4)
        else:
            S = np.einsum("n,nij,njl->il", self.weights, a, a) / (self.N - 1)
        D = (self.S + self.D)[:k, :k] - S
        return SubspaceNoise(lam=self.lam[:k].copy(), H_U=self.H_U[:k, :k].copy(), a=a.copy(),
                             D=0.5 * (D + D.T), S=0.5 * (S + S.T), N=self.N, P=self.P, k=k,
                             vectors=self.vectors[:, :k], samples=self.samples, a_cov=a_cov,
                             row_weight=self.row_weight)

    @property
    def directional_s2(self) -> np.ndarray:
        """s_u² = (1/(N−1)) Σ_i ‖(H_i − H)u_j‖² for each column u_j of U."""
        return np.diag(self.S) + np.diag(self.D)


def _class_dim_size(out: torch.Tensor, y: torch.Tensor) -> int:
    """The number of classes (or outputs) per position of one output tensor: the size of
    the dimension the integer targets lack — class maps (1, H, W) against logits
    (1, C, H, W) give C, token labels (1, T) against (1, T, C) give C — checking the last
    dimension first; otherwise (regression targets, other layouts) the last dimension."""
    if out.ndim < 2:
        return 1
    if not y.is_floating_point() and y.ndim == out.ndim - 1:
        for d in [out.ndim - 1, *range(1, out.ndim - 1)]:
            if tuple(out.shape[:d]) + tuple(out.shape[d + 1:]) == tuple(y.shape):
                return int(out.shape[d])
    return int(out.shape[-1])


def default_subspace_dim(model, data, P: int, loss_fn=None) -> int:
    """The fixed rule for k: the number of classes C per output position (the class
    outliers of cross-entropy Hessians, Papyan 2019/2020), capped at P. One forward pass on
    one sample of `data` (any form of `nets.utils.data_source`). C is the size of the output
    dimension that integer class targets lack — per-token outputs (1, T, C) against (1, T)
    and dense logits (1, C, H, W) against class maps (1, H, W) both give the number of
    classes, not T·C or the width — and otherwise the size of the last dimension (a
    regression's outputs). For a dict / tuple output only the tensors `loss_fn` reads
    count (all of them without `loss_fn`): one such tensor by the rule above, several
    summed over their last dimensions (a model returning (logits, features) with a loss on
    the logits has the logits' k, not k + the width of the features). A flattened output
    (1, T·C) cannot be told apart: pass `subspace_dim`."""
    X, Y = as_data_source(data).take([0])
    dev = next((p.device for p in model.parameters()), X.device)
    dt = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    X = X.to(device=dev, dtype=dt) if X.is_floating_point() and dt is not None else X.to(dev)
    Y = Y.to(device=dev, dtype=dt) if Y.is_floating_point() and dt is not None else Y.to(dev)
    with (torch.no_grad(), policy_mode(model, "eval"), kept_tensors(model),   # the caller's
          kept_attributes(model)):                                           # module
        out = model(X)
    if isinstance(out, torch.Tensor):
        C = _class_dim_size(out, Y)
    else:
        tensors = output_tensors(out) if loss_fn is None else _leaves_read(out, loss_fn, Y)
        if len(tensors) == 1:
            C = _class_dim_size(tensors[0], Y)
        else:
            C = sum(int(t.shape[-1]) if t.ndim >= 2 else 1 for t in tensors)
    return max(1, min(C, P))


def _orthonormal(U, P: int, device) -> torch.Tensor:
    if isinstance(U, np.ndarray):
        U = torch.from_numpy(np.asarray(U, dtype=np.float64))
    if not isinstance(U, torch.Tensor) or not U.is_floating_point():
        raise TypeError("U must be a floating torch.Tensor or numpy array")
    U = U.detach().to(device=device, dtype=torch.float64)
    if U.ndim == 1:
        U = U[:, None]
    if U.ndim != 2 or U.shape[0] != P or U.shape[1] < 1 or U.shape[1] > P:
        raise ValueError(f"U must have shape (P={P}, k) with 1 <= k <= P, got {tuple(U.shape)}")
    if not bool(torch.isfinite(U).all()):
        raise ValueError("U contains NaN or inf")
    err = torch.linalg.matrix_norm(U.T @ U - torch.eye(U.shape[1], dtype=U.dtype, device=device))
    if float(err) > 1e-6:
        raise ValueError(f"U must have orthonormal columns (‖UᵀU − I‖ = {float(err):.2e})")
    return U


@outside_autocast
def subspace_noise_from_operator(op: ModelCurvatureOperator, U, *, chunk_size=None,
                                 progress=None, memory=None, samples=None) -> SubspaceNoise:
    """Per-sample projections a_i = Uᵀ(H_i − H)U and complement noise D (module docstring)
    for the data and curvature kind held by `op`. One per-sample pass of k curvature
    products each (vmapped over samples in chunks; memory chunk × P × k, the chunk
    from the budget `memory` unless `chunk_size` is given, `nets.utils.memory`).
    samples : None (every sample) or distinct sample indices, a uniformly random subset
    (the sampled population of the module docstring; H is still the full-data one)."""
    return subspace_pass(op, U, chunk_size=chunk_size, progress=progress, memory=memory,
                         samples=samples)[0]


def subspace_pass(op: ModelCurvatureOperator, U, *, chunk_size=None, progress=None,
                  memory=None, samples=None, moments=None, seed=0, HU=None,
                  row_weight=None) -> tuple[SubspaceNoise, torch.Tensor]:
    """`subspace_noise_from_operator` and the full-data products HU (P, k) float64 it
    computed on the way (for callers that need them too).

    moments : with a sampled population, where D and S come from: None (Horvitz–Thompson
    over the rows) or a micro-batch size m (an int or "auto", `nets.noise.directional`):
    one more pass over *every* sample in groups of m (`micro_batch_moments`), so a few
    heavy samples outside the rows still count, or a `Moments` already computed.
    seed : the micro-batch partition. HU : the full-data products (P, k) if already
    computed. row_weight : (n,) samples each row stands for (stratified rows; with a
    sampled population only)."""
    check_noise_operator(op)
    U = _orthonormal(U, op.P, op.device)
    P, k = U.shape
    N = op.N
    if N < 2:
        raise ValueError("need at least 2 samples")
    rows = _as_samples(samples, N)
    n = N if rows is None else rows.size
    Uo = U.to(op.dtype)
    if rows is None:
        moments = row_weight = None                     # exhaustive: the rows are the data
    elif row_weight is not None:
        if moments is None:
            raise ValueError("row_weight needs moments= (D and S from every sample)")
        row_weight = np.asarray(row_weight, dtype=float)
        if row_weight.shape != (rows.size,) or not np.all(row_weight >= 1.0 - 1e-9):
            raise ValueError("row_weight must hold one weight >= 1 per sample")
    chunk = group_chunk(op, n, k, chunk_size=chunk_size, memory=memory)
    HU = (op.matmat(Uo) if HU is None else HU).to(torch.float64)           # (P, k)
    HU_lo = HU.to(op.dtype)
    D = torch.zeros(k, k, dtype=torch.float64, device=U.device)
    a_list = []
    order = np.arange(N) if rows is None else rows
    for s in progress_bar(range(0, n, chunk), progress=progress, desc="per-sample projections"):
        X, Y = op.source.take(order[s:s + chunk], device=op.device, dtype=op.dtype)
        Dl = op.group_products(X[:, None], Y[:, None], Uo)                # groups of 1
        Dl -= HU_lo                                                        # (H_i − H) U, (g, P, k)
        a = _projection(Dl, Uo)
        if moments is None:          # D from the rows; the moments pass supplies it otherwise
            D += (_gram(Dl) - a.transpose(1, 2) @ a).sum(0)
        a_list.append(0.5 * (a + a.transpose(1, 2)))
        del Dl
    a = torch.cat(a_list).cpu().numpy()
    if moments is None:
        ht = N / n                                      # Horvitz–Thompson (1 when exhaustive)
        D = ht * D.cpu().numpy() / (N - 1)
        S = ht * np.einsum("nij,njl->il", a, a) / (N - 1)
        a_cov = None
    else:
        if not isinstance(moments, Moments):
            moments = micro_batch_moments(op, U, HU, micro_batch=moments, seed=seed,
                                          chunk_size=chunk_size, memory=memory)
        D, S, a_cov = moments.D, moments.S, moments.C
    H_U = (U.T @ HU).cpu().numpy()
    H_U = 0.5 * (H_U + H_U.T)
    return SubspaceNoise(lam=np.diag(H_U).copy(), H_U=H_U, a=a, D=0.5 * (D + D.T),
                         S=0.5 * (S + S.T), N=int(N), P=int(P), k=int(k), vectors=U,
                         samples=rows, a_cov=a_cov, row_weight=row_weight), HU


def _gram(Dl: torch.Tensor) -> torch.Tensor:
    """(g, k, k) float64 X_gᵀX_g of the (g, P, k) shifts, reduced in their own dtype (no
    (g, P, k) float64 copy, which costs more than the products on CPU)."""
    return torch.bmm(Dl.transpose(1, 2), Dl).to(torch.float64)


def _projection(Dl: torch.Tensor, Uo: torch.Tensor) -> torch.Tensor:
    """(g, k, k) float64 a_g = UᵀX_g of the (g, P, k) shifts X_g. With R_g = QX_g,
    R_gᵀR_g = X_gᵀX_g − a_gᵀa_g since UᵀU = I."""
    return torch.bmm(Dl.transpose(1, 2), Uo.expand(Dl.shape[0], -1, -1)).to(
        torch.float64).transpose(1, 2)


def _psd_factor(C: np.ndarray) -> np.ndarray:
    """L with L Lᵀ the positive semi-definite part of the symmetric C (negative
    eigenvalues, from estimation noise, clipped at 0): Gaussians N(0, C) as g @ Lᵀ."""
    w, E = np.linalg.eigh(0.5 * (C + C.T))
    return E * np.sqrt(np.clip(w, 0.0, None))


@dataclass(frozen=True)
class Moments:
    """Output of `micro_batch_moments`: D, S (k, k), C (k², k²); groups (G, m) the
    partition; score (G,) ‖(H̄_g − H)U‖_F² of each group (large for groups holding a
    heavy sample)."""

    D: np.ndarray
    S: np.ndarray
    C: np.ndarray
    groups: np.ndarray
    score: np.ndarray


@outside_autocast
def micro_batch_moments(op: ModelCurvatureOperator, U: torch.Tensor, HU: torch.Tensor, *,
                        micro_batch="auto", seed=0, chunk_size=None,
                        memory=None) -> Moments:
    """D, S (module docstring) and the (k², k²) covariance C of vec(a_i) from one pass
    over every sample in micro-batches (returned as a `Moments`, with each group's score).

    With the seeded partition of `nets.noise.directional` (G groups of m samples),
    x̄_g = (H̄_g − H)U the group's mean shift, μ = mean_g x̄_g, a_g = Uᵀx̄_g:

        D = m/(G−1)·Σ_g (x̄_g − μ)ᵀ Q (x̄_g − μ),   S = m/(G−1)·Σ_g (a_g − Uᵀμ)ᵀ(a_g − Uᵀμ),
        C = m/(G−1)·Σ_g vec(ã_g − ã)vec(ã_g − ã)ᵀ   (ã: a symmetrised),

    unbiased over partitions for the per-sample D and S of the used samples (the same
    argument as for s_u²: a size-m mean without replacement from G·m samples has
    covariance c(m, G·m)·S = (G−1)/(G·m)·S). Cost: G·k group products (G ≈ 256 with
    m = "auto"; on CPU one costs about as much as a per-sample product); memory one
    chunk × P × k."""
    m, idx = micro_batch_partition(op.N, micro_batch, seed)
    G = idx.shape[0]
    P, k = U.shape
    Uo = U.to(op.dtype)
    HU_lo = HU.to(op.dtype)
    chunk = group_chunk(op, G, k, m, chunk_size=chunk_size, memory=memory,
                        cap=max(1, 4096 // m))
    f64 = torch.float64
    gram = torch.zeros(k, k, dtype=f64, device=U.device)      # Σ x̄ᵀx̄
    aa = torch.zeros(k, k, dtype=f64, device=U.device)        # Σ aᵀa
    total = torch.zeros(P, k, dtype=f64, device=U.device)     # Σ x̄
    vecs, score = [], []                                      # vec(ã_g), (G, k²); ‖x̄_g‖²
    for s in range(0, G, chunk):
        Dl = op.group_products(*fetch_groups(op, idx[s:s + chunk]), Uo)
        Dl -= HU_lo                                                        # (g, P, k)
        DtD = _gram(Dl)
        gram += DtD.sum(0)
        score.append(torch.diagonal(DtD, dim1=1, dim2=2).sum(1).cpu().numpy())
        a = _projection(Dl, Uo)                                            # Uᵀx̄_g
        aa += (a.transpose(1, 2) @ a).sum(0)                               # (Uᵀx̄)ᵀ(Uᵀx̄)
        vecs.append((0.5 * (a + a.transpose(1, 2))).reshape(a.shape[0], k * k).cpu().numpy())
        total += Dl.sum(0, dtype=f64)
        del Dl
    mu = total / G
    mu_a = U.T @ mu
    C_all = gram - G * (mu.T @ mu)
    C_a = aa - G * (mu_a.T @ mu_a)
    scale = m / (G - 1)
    D = (scale * (C_all - C_a)).cpu().numpy()
    S = (scale * C_a).cpu().numpy()
    V = np.concatenate(vecs)
    V = V - V.mean(axis=0)
    C = scale * (V.T @ V)
    return Moments(D=0.5 * (D + D.T), S=0.5 * (S + S.T), C=0.5 * (C + C.T), groups=idx,
                   score=np.concatenate(score))


def stratified_rows(moments: Moments, N: int, n: int, seed=0, *,
                    certain=0.25) -> tuple[np.ndarray, np.ndarray]:
    """(rows, weight): n sample indices for a sampled population, stratified on the
    micro-batch scores. Stratum 1: every sample of the highest-scoring groups, up to
    `certain`·n samples (taken with probability 1, weight 1: the groups that hold the
    heaviest samples); stratum 2: the rest of the n drawn uniformly without replacement
    from all other samples (weight (N − n₁)/(n − n₁)). Σ weights = N; every Horvitz–
    Thompson sum over the rows is unbiased."""
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(17,)))
    groups = moments.groups
    per = groups.shape[1]
    n_groups = int(min(groups.shape[0], max(0, (certain * n) // per)))
    top = np.argsort(-moments.score, kind="stable")[:n_groups]
    first = np.sort(groups[top].reshape(-1))
    rest = np.setdiff1d(np.arange(N), first, assume_unique=False)
    n2 = n - first.size
    second = np.sort(rng.choice(rest, size=n2, replace=False)) if n2 > 0 else first[:0]
    rows = np.concatenate([first, second])
    weight = np.concatenate([np.ones(first.size), np.full(second.size, rest.size / max(n2, 1))])
    order = np.argsort(rows, kind="stable")
    return rows[order], weight[order]


def _as_samples(samples, N: int) -> np.ndarray | None:
    """None, or the sampled population's indices as a sorted int64 array (distinct, in
    [0, N), at least 2); every index given means the exhaustive pass (None)."""
    if samples is None:
        return None
    rows = np.asarray(samples)
    if rows.ndim != 1 or rows.size < 2 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError("samples must be a 1-d array of at least 2 sample indices")
    rows = np.sort(rows.astype(np.int64))
    if rows[0] < 0 or rows[-1] >= N or np.any(np.diff(rows) == 0):
        raise ValueError(f"samples must be distinct indices in [0, {N})")
    return None if rows.size == N else rows


@outside_autocast
def subspace_noise(model, loss_fn, data, *, k=None, kind="hessian", tol=1e-8, params=None,
                   policy=None, chunk_size=None, device=None, dtype=None, seed=0,
                   progress=None) -> SubspaceNoise:
    """Top-k eigenpairs of the full-data curvature (thick-restart Lanczos, `seed`, `tol`)
    and the per-sample statistics on their span. k=None: `default_subspace_dim`.
    data: any form of `nets.utils.data_source`; samples are read chunk by chunk."""
    op = curvature_operator(model, loss_fn, data, kind=kind, params=params, device=device,
                            dtype=dtype, policy=policy)
    k = (default_subspace_dim(model, data, op.P, loss_fn) if k is None
         else as_int("k", k, minimum=1))
    if k > op.P:
        raise ValueError(f"k must be <= P={op.P}, got {k}")
    top = eigsh(op, k=k, which="LA", tol=tol, seed=seed, progress=progress)
    return subspace_noise_from_operator(op, top.vectors, chunk_size=chunk_size, progress=progress)


def _top_self_consistent(A: np.ndarray, cD: np.ndarray, z0: float, iters: int = 80) -> np.ndarray:
    """Root z > 0 of z = λ_max(A_b + cD/z) for each b (A: (n, k, k)); bisection on the
    increasing function z − λ_max(A_b + cD/z)."""
    lo_A = np.linalg.eigvalsh(A)[:, -1]
    dmax = max(float(np.linalg.eigvalsh(cD)[-1]), 0.0)
    if dmax == 0.0:
        return lo_A
    # the root exceeds max(lo_A, 0) and, writing m = max(lo_A, z0, tiny), is at most
    # m + dmax/m (since λ_max(A + cD/z) ≤ lo_A + dmax/z)
    lo = np.where(lo_A > 0, lo_A, np.sqrt(dmax) * 1e-8)
    m = np.maximum(np.maximum(lo_A, z0), np.sqrt(dmax))
    hi = m + dmax / m
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        f = np.linalg.eigvalsh(A + cD[None] / mid[:, None, None])[:, -1]
        up = mid - f < 0
        lo = np.where(up, mid, lo)
        hi = np.where(up, hi, mid)
    return 0.5 * (lo + hi)


def subspace_batch_top_eigenvalue(noise: SubspaceNoise, batch_sizes, *, n_batches=2000,
                                  method="resample", self_consistent=False, replacement=False,
                                  seed=0, indices=None) -> dict:
    """E_S λ_max of the k×k batch model (module docstring) for each batch size.

    method : "resample" (a_S = mean of the stored a_i over a uniformly random batch S,
        without replacement unless `replacement`) or "gaussian" (a_S Gaussian with the
        same covariance c·(1/(N−1))Σ a_i⊗a_i). Randomness from
        `numpy.random.default_rng(seed)` (or a Generator).
    self_consistent : complement term c·D/z solved per batch (True) or c·D/λ_1 (False,
        default; module docstring).
    indices : optional list (one per batch size) of (n, B) sample-index arrays (e.g.
        `measure_batch_top_eigenvalue(...)["indices"]`): evaluate on exactly those batches
        (method "resample" only).
    Returns {"mean", "stderr" (Monte-Carlo, over batches), "values" (per B), "c",
    "batch_sizes", "k", "self_consistent", "method"}.
    """
    if not isinstance(noise, SubspaceNoise):
        raise TypeError("noise must be a SubspaceNoise")
    if method not in ("resample", "gaussian"):
        raise ValueError(f"method must be 'resample' or 'gaussian', got {method!r}")
    self_consistent = as_bool("self_consistent", self_consistent)
    replacement = as_bool("replacement", replacement)
    n_batches = as_int("n_batches", n_batches, minimum=1)
    rng = as_rng(seed)
    Bs = as_batch_sizes(batch_sizes, noise.N, replacement)
    N, k = noise.N, noise.k
    sampled = noise.samples is not None
    if indices is not None:
        if method != "resample":
            raise ValueError("indices need method='resample'")
        if sampled:
            raise ValueError("indices need the exhaustive pass (this SubspaceNoise holds a "
                             "sampled population)")
        if len(indices) != len(Bs):
            raise ValueError("indices must hold one (n, B) array per batch size")
    a_flat = noise.a.reshape(noise.n_rows, k * k)
    if sampled:
        L = _psd_factor(noise.a_covariance())                  # N(0, C) as g @ Lᵀ
    lam1 = float(np.linalg.eigvalsh(noise.H_U)[-1])
    if self_consistent is False and not lam1 > 0:
        raise ValueError(f"the top eigenvalue {lam1:.3g} must be positive")
    means, ses, values, cs = [], [], [], []
    for j, B in enumerate(Bs):
        B = int(B)
        c = batch_noise_factor(B, N, replacement=replacement)
        if indices is not None:
            idx = np.asarray(indices[j])
            if idx.ndim != 2 or idx.shape[1] != B:
                raise ValueError(f"indices[{j}] must have shape (n, {B})")
            aS = a_flat[idx].mean(axis=1)
        elif sampled:
            aS = math.sqrt(c) * (rng.standard_normal((n_batches, k * k)) @ L.T)
        elif method == "resample":
            step = max(1, (1 << 22) // max(B * k * k, 1))
            parts = []
            for s in range(0, n_batches, step):
                nb = min(step, n_batches - s)
                if replacement:
                    idx = rng.integers(0, N, size=(nb, B))
                else:
                    idx = np.argsort(rng.random((nb, N)), axis=1)[:, :B] if B > N // 4 else \
                        np.stack([rng.choice(N, size=B, replace=False) for _ in range(nb)])
                parts.append(a_flat[idx].mean(axis=1))
            aS = np.concatenate(parts)
        else:
            g = rng.standard_normal((n_batches, N))
            aS = math.sqrt(c / (N - 1)) * (g @ a_flat)
        A = noise.H_U[None] + aS.reshape(-1, k, k)
        A = 0.5 * (A + A.transpose(0, 2, 1))
        cD = c * noise.D
        if self_consistent:
            z = _top_self_consistent(A, cD, lam1)
        else:
            z = np.linalg.eigvalsh(A + cD[None] / lam1)[:, -1]
        values.append(z)
        means.append(z.mean())
        ses.append(z.std(ddof=1) / math.sqrt(len(z)) if len(z) > 1 else 0.0)
        cs.append(c)
    return {"mean": np.array(means), "stderr": np.array(ses), "values": values,
            "c": np.array(cs), "batch_sizes": Bs, "k": k, "self_consistent": self_consistent,
            "method": method}
