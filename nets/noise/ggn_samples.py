"""Per-sample curvature statistics from the Gauss–Newton factors, without per-sample
curvature products (the `per_sample="ggn"` form of `nets.noise.resolved_noise`).

Each per-sample Gauss–Newton term is G_i = J_iᵀ Λ_i J_i, with J_i (C×P) the Jacobian of
sample i's C outputs and Λ_i = ∇²_o ℓ_i (C×C) the loss's Hessian in the outputs; the
full-data G = (1/N) Σ_i G_i. Everything the subspace and sample-resolved models need
from the per-sample curvatures reduces to C- and k-dimensional quantities:

    K_i = J_iJ_iᵀ (C×C),   J_iU (C×k),   J_i(ḠU) (C×k),   ḠU = (1/N) Σ_i J_iᵀ Λ_i (J_iU),

from which, with M_i = Λ_i J_iU and X_i = (G_i − Ḡ)U,

    a_i = UᵀX_i = (J_iU)ᵀM_i − UᵀḠU,
    X_iᵀX_i = M_iᵀK_iM_i − M_iᵀJ_i(ḠU) − (J_i(ḠU))ᵀM_i + (ḠU)ᵀ(ḠU),
    R_iᵀR_i = X_iᵀX_i − a_iᵀa_i  (R_i = QX_i, Q = I − UUᵀ),
    D = Σ_i R_iᵀR_i / (N − 1),   S = Σ_i a_i a_i / (N − 1),

and the top eigenpair of G_i from the C×C matrix Λ_i^{1/2}K_iΛ_i^{1/2} = W diag(μ) Wᵀ
(Λ_i's negative eigenvalues clipped): γ_i = μ_max, v_i = J_iᵀc_i with
c_i = Λ_i^{1/2}w_max/√γ_i (‖v_i‖ = 1). For a kept spike, Uᵀv_i = (J_iU)ᵀc_i and
J_iv_i = K_ic_i are free; only v_i itself (a P-vector) needs a per-sample backward pass.

Cost (`nets.curvature.sample_jacobians`): one pass over the data with C backward passes
(K_i, weight gradients not formed per sample for dense layers), k forward-mode passes
(J_iU) and k backward passes (ḠU); a second pass of k forward-mode passes (J_iḠU); and
one per-sample backward pass per kept spike vector. Memory O(N·C·(C + k) + P·k).

The approximation: per-sample fluctuations are those of the Gauss–Newton terms,
H_i − H ≈ G_i − Ḡ (the residual term ∇_θ²f · ∇_oℓ of each sample is left out of the
fluctuation; the mean H stays the operator's). Near a minimum of a cross-entropy network
the residual terms are small (wide digits MLP: GGN spike / Hessian spike 0.993–1.001);
away from one (a network at initialisation) they are not, and this form should not be
used there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.func import hessian

from nets.curvature.operators import ModelCurvatureOperator
from nets.curvature.sample_jacobians import SampleJacobians
from nets.utils.autocast import outside_autocast
from nets.utils.memory import chunk_count, memory_budget
from nets.utils.progress import progress_bar
from nets.utils.vmapping import vmap_or_loop

__all__ = ["ggn_sample_pass", "ggn_spike_pass", "ggn_spikes", "priority_keep", "GGNSamplePass"]


@dataclass
class GGNSamplePass:
    """Output of `ggn_sample_pass` (module docstring). gamma (N,), coef (N, C) c_i;
    JU (N, C, k), Lam, K (N, C, C); GU (P, k) ḠU; a (N, k, k); D, S (k, k); all float64.
    jac: the `SampleJacobians` (for the kept spikes' vectors)."""

    gamma: np.ndarray
    coef: torch.Tensor
    Lam: torch.Tensor
    K: torch.Tensor
    jac: SampleJacobians
    JU: torch.Tensor | None = None
    GU: torch.Tensor | None = None
    a: np.ndarray | None = None
    D: np.ndarray | None = None
    S: np.ndarray | None = None

    def vectors(self, index, *, chunk: int = 64) -> torch.Tensor:
        """(P, m) the spike vectors v_i = J_iᵀc_i of the samples `index`, float64."""
        op = self.jac.op
        index = np.asarray(index, dtype=np.int64)
        # filled in place and normalised in place: the list of chunks, their concatenation
        # and the normalised copy held three P × m float64 arrays at once (6.9 GB peak RSS
        # on a 1M-parameter MLP at m = 256, where P × m is 2.1 GB)
        V = torch.empty(op.P, index.size, dtype=torch.float64, device=op.device)
        for s in range(0, index.size, chunk):
            X, _ = op.source.take(index[s:s + chunk], device=op.device, dtype=op.dtype)
            V[:, s:s + chunk] = self.jac.vjp_each(X, self.coef[index[s:s + chunk]]
                                                  .to(op.device)).T
        return V.div_(torch.linalg.vector_norm(V, dim=0, keepdim=True).clamp_min(1e-300))


def _loss_hessians(op: ModelCurvatureOperator, shape):
    """(outputs (g, C), targets) ↦ (g, C, C) per-sample Hessians of the loss in the outputs."""
    def one(o, y):
        return hessian(lambda z: op.loss_fn(z.reshape(1, *shape), y[None]))(o)
    return vmap_or_loop(one)


def ggn_spikes(Lam: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ (g,), c (g, C)): top eigenpair of each G_i = J_iᵀΛ_iJ_i from Λ_i and K_i = J_iJ_iᵀ
    (module docstring; v_i = J_iᵀc_i), float64."""
    Lam = 0.5 * (Lam + Lam.transpose(1, 2))
    ev, E = torch.linalg.eigh(Lam)
    Lh = E @ torch.diag_embed(ev.clamp_min(0).sqrt()) @ E.transpose(1, 2)
    A = Lh @ K @ Lh
    mu, W = torch.linalg.eigh(0.5 * (A + A.transpose(1, 2)))
    top = mu[:, -1]
    c = (Lh @ W[:, :, -1:])[:, :, 0] / top.clamp_min(1e-300).sqrt()[:, None]
    return top, c


def priority_keep(gamma: np.ndarray, keep_above, max_keep, seed) -> tuple[np.ndarray, np.ndarray, float]:
    """(index, weight, τ): the samples with γ_i > keep_above, cut to the `max_keep` largest
    priorities γ_i/u_i (u_i ∈ (0, 1] from `numpy.random.default_rng` with spawn key 11 of
    `seed`, one per sample in order), weights 1/π_i = max(1, τ/γ_i) — the rule of
    `nets.noise.resolved_noise.per_sample_top_eigenpairs`, for spikes known in full."""
    gamma = np.asarray(gamma, dtype=float)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(11,)))
    prio = gamma / (1.0 - rng.random(gamma.size))
    index = (np.arange(gamma.size) if keep_above is None
             else np.flatnonzero(gamma > keep_above))
    weight, tau = np.ones(index.size), 0.0
    if max_keep is not None and index.size > max_keep:
        order = np.argsort(-prio[index], kind="stable")
        tau = float(prio[index][order[max_keep]])
        index = np.sort(index[order[:max_keep]])
        weight = np.maximum(1.0, tau / gamma[index])
    return index, weight, tau


def _chunk(op, jac: SampleJacobians, chunk_size, memory) -> int:
    """Samples per batched pass: `chunk_size`, or as many as fit the memory budget with
    `SampleJacobians.bytes_per_sample` each (at most 4096)."""
    if chunk_size is not None:
        return int(chunk_size)
    return chunk_count(op.N, max(1, jac.bytes_per_sample), memory_budget(memory, op.device),
                       cap=4096)


def _chunks(op, step):
    """(X, Y) chunks of `step` samples of op's data, in order, on its device and dtype."""
    for s in range(0, op.N, step):
        yield op.source.take(np.arange(s, min(s + step, op.N)), device=op.device, dtype=op.dtype)


def _grams_and_loss_hessians(jac, lam_of, X, Y):
    """(K (g, C, C), Λ (g, C, C), both float64, Λ symmetrised) for the chunk (X, Y)."""
    out, K = jac.grams(X)
    Lam = lam_of(out, Y).to(torch.float64).reshape(X.shape[0], jac.C, jac.C)
    return K, 0.5 * (Lam + Lam.transpose(1, 2))


@outside_autocast
def ggn_spike_pass(op: ModelCurvatureOperator, jac: SampleJacobians | None = None, *,
                   chunk_size=None, memory=None) -> GGNSamplePass:
    """K_i, Λ_i and the top eigenpair (γ_i, c_i) of every per-sample Gauss–Newton term
    (no subspace statistics: JU, GU, a, D, S are None)."""
    jac = SampleJacobians(op) if jac is None else jac
    lam_of = _loss_hessians(op, jac.shape)
    Ks, Lams = zip(*(_grams_and_loss_hessians(jac, lam_of, X, Y)
                     for X, Y in _chunks(op, _chunk(op, jac, chunk_size, memory))))
    K, Lam = torch.cat(Ks), torch.cat(Lams)
    gamma, coef = ggn_spikes(Lam, K)
    return GGNSamplePass(gamma=gamma.cpu().numpy(), coef=coef, Lam=Lam, K=K, jac=jac)


@outside_autocast
def ggn_sample_pass(op: ModelCurvatureOperator, U: torch.Tensor, *, chunk_size=None,
                    memory=None, jac: SampleJacobians | None = None,
                    progress=None) -> GGNSamplePass:
    """The per-sample Gauss–Newton statistics on span(U) for every sample (module
    docstring). U : (P, k) orthonormal, float64. chunk_size : samples per batched pass
    (None: from the memory budget `memory`). jac : the `SampleJacobians` of op if already
    built. progress : a bar over the chunks of the first pass."""
    jac = SampleJacobians(op) if jac is None else jac
    N, k = op.N, U.shape[1]
    f64 = torch.float64
    step = _chunk(op, jac, chunk_size, memory)
    lam_of = _loss_hessians(op, jac.shape)
    Ks, Lams, JUs = [], [], []
    GU = torch.zeros(op.P, k, dtype=f64, device=op.device)
    for X, Y in progress_bar(_chunks(op, step), progress=progress,
                             total=-(-op.N // step), desc="per-sample Gauss-Newton pass"):
        K, Lam = _grams_and_loss_hessians(jac, lam_of, X, Y)
        JU = jac.jvp(X, U).to(f64)                                         # (g, C, k)
        GU += jac.vjp_sum(X, Lam @ JU).to(f64)
        Ks.append(K), Lams.append(Lam), JUs.append(JU)
    GU /= N
    JGU = [jac.jvp(X, GU).to(f64) for X, _ in _chunks(op, step)]
    K, Lam, JU, JGU = (torch.cat(t) for t in (Ks, Lams, JUs, JGU))
    M = Lam @ JU                                                           # (N, C, k)
    UGU = U.T @ GU
    a = JU.transpose(1, 2) @ M - UGU
    a = 0.5 * (a + a.transpose(1, 2))
    cross = M.transpose(1, 2) @ JGU
    XtX = M.transpose(1, 2) @ K @ M - cross - cross.transpose(1, 2) + GU.T @ GU
    R = XtX - a @ a
    D = (R.sum(0) / (N - 1)).cpu().numpy()
    S = ((a @ a).sum(0) / (N - 1)).cpu().numpy()
    gamma, coef = ggn_spikes(Lam, K)
    return GGNSamplePass(gamma=gamma.cpu().numpy(), coef=coef, Lam=Lam, K=K, jac=jac, JU=JU,
                         GU=GU, a=a.cpu().numpy(), D=0.5 * (D + D.T), S=0.5 * (S + S.T))
