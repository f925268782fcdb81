"""Exact mean-square stability threshold of mini-batch SGD on a quadratic.

Model (docs/theory.md §5, [ext] mean-square stability). Per-sample Hessians H_i (i = 1..N),
H = (1/N) Σ H_i, H_B = (1/B) Σ_{i∈S} H_i with S a uniformly random subset of size B
drawn afresh at each step (without replacement inside the batch by default). The SGD
error e_{t+1} = (I − αH_B) e_t has second moment Σ_{t+1} = T_α(Σ_t) with

    T_α(Σ) = E[(I − αH_B) Σ (I − αH_B)] = Σ − α L(Σ) + α² Q(Σ),
    L(Σ)   = HΣ + ΣH,
    Q(Σ)   = E[H_B Σ H_B] = HΣH + κ(B,N) · (1/N) Σ_i (H_i − H) Σ (H_i − H),

κ(B,N) = (N−B)/(B(N−1)) = c(B,N)·N/(N−1) without replacement (so that
κ·(1/N)Σ = c(B,N)·(1/(N−1))Σ, the form in the task) and κ = 1/B with replacement.
Label noise adds a zero-mean forcing that does not change the threshold.

T_α is a positive map on PSD matrices and is self-adjoint for the Frobenius inner
product (an average of congruences Σ ↦ MΣM with symmetric M), so its spectral radius is
its largest eigenvalue (Perron–Frobenius / Krein–Rutman) and

    ρ(T_α) < 1  ⇔  αQ − L ≺ 0  ⇔  α < α* = 1/μ,   μ = λ_max(L^{-1/2} Q L^{-1/2}),

a symmetric generalised eigenproblem on d×d symmetric matrices. In the eigenbasis of
H = V diag(λ) Vᵀ the Lyapunov operator L is diagonal, (L Σ)_jk = (λ_j + λ_k) Σ_jk, so
every product costs O(N d² k) for rank-k factors and no d²×d² matrix is built
(`method="pencil"`, the default). `method="brentq"` instead finds ρ(T_α) = 1 by Brent's
method with a Lanczos (`eigsh`) estimate of λ_max(T_α) at each α — slower, kept as an
independent check and used for heavy-ball momentum, whose state (e_t, e_{t−1}) gives a
non-self-adjoint positive map on 2d×2d matrices (spectral radius by Arnoldi `eigs`), and
the only method for Nesterov momentum (state (e_t, v_t), `nesterov=True`).

Per-sample Hessians are given as factors: H_i = A_i diag(s_i) A_iᵀ with A_i (d×k) and
optional signs/weights s_i (k); least squares is k = 1, s = 1 (A_i = x_i). Negative
weights are allowed for the operator, but the threshold requires H positive definite
on the span of the data (directions outside it are frozen and dropped).

Which "learning rate": this is the **stability limit** (largest constant step for which
the mean-square error stays bounded), not McCandlish's greedy-optimal step and not the
SDE-matching rule of Malladi et al. Almost-sure divergence of single runs happens at a
somewhat larger α (`nets.learning_rates.lr_search` measures it).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import brentq
from scipy.sparse.linalg import LinearOperator, eigs, eigsh

from nets.utils.callers import caller_stacklevel
from nets.utils.results import Result, result
from rmt.lr import momentum_factor
from rmt.sampling import batch_noise_factor
from rmt.validation import as_array, as_float, as_int

__all__ = [
    "PerSampleHessians",
    "batch_variance_weight",
    "second_moment_operator",
    "ms_spectral_radius",
    "StabilityThreshold",
    "ms_stability_threshold",
    "ms_threshold_curve",
]


def batch_variance_weight(B, N, replacement=False) -> float:
    """κ(B,N) with E[εΣε] = κ·(1/N)Σ_i (H_i − H)Σ(H_i − H), ε = H_B − H.

    κ = c(B,N)·N/(N−1): without replacement (N − B)/(B(N − 1)), with replacement 1/B.
    """
    N = as_int("N", N, minimum=2)
    return batch_noise_factor(B, N, replacement=replacement) * N / (N - 1)


class PerSampleHessians:
    """Per-sample Hessians in factored form H_i = A_i diag(s_i) A_iᵀ.

    factors: array (N, d) (rank one, H_i = a_i a_iᵀ) or (N, d, k); weights: None (all 1)
    or array (N, k). `from_dense(H)` factors explicit matrices (N, d, d) by eigh.
    """

    def __init__(self, factors, weights=None):
        A = as_array("factors", factors)
        if A.ndim == 2:
            A = A[:, :, None]
        if A.ndim != 3:
            raise ValueError(f"factors must have shape (N, d) or (N, d, k), got {A.shape}")
        if A.shape[0] < 2:
            raise ValueError("factors must hold at least N = 2 samples")
        if weights is not None:
            weights = as_array("weights", weights)
            if weights.shape != (A.shape[0], A.shape[2]):
                raise ValueError(f"weights must have shape {(A.shape[0], A.shape[2])}, got {weights.shape}")
        self.A = A
        self.w = weights

    @classmethod
    def from_dense(cls, H) -> "PerSampleHessians":
        H = as_array("H", H, ndim=3)
        if H.shape[1] != H.shape[2]:
            raise ValueError(f"H must have shape (N, d, d), got {H.shape}")
        if not np.allclose(H, np.swapaxes(H, 1, 2), atol=1e-12 * max(1.0, np.abs(H).max())):
            raise ValueError("H must hold symmetric matrices")
        vals, vecs = np.linalg.eigh(H)
        # round-off eigenvalues of (numerically) singular H_i are set to exactly zero
        tiny = 64 * np.finfo(float).eps * np.abs(vals).max(axis=1, keepdims=True)
        vals = np.where(np.abs(vals) <= tiny, 0.0, vals)
        return cls(vecs, vals)

    @property
    def N(self) -> int:
        return self.A.shape[0]

    @property
    def d(self) -> int:
        return self.A.shape[1]

    def dense(self) -> np.ndarray:
        """The explicit (N, d, d) stack (for small problems and tests)."""
        Aw = self.A if self.w is None else self.A * self.w[:, None, :]
        return np.einsum("ndk,nek->nde", Aw, self.A)

    def mean(self) -> np.ndarray:
        """H = (1/N) Σ H_i."""
        Aw = self.A if self.w is None else self.A * self.w[:, None, :]
        return np.tensordot(Aw, self.A, axes=([0, 2], [0, 2])) / self.N

    def rotated(self, V) -> "PerSampleHessians":
        """Factors in the basis V (columns): H_i ↦ Vᵀ H_i V."""
        return PerSampleHessians(np.einsum("dj,ndk->njk", V, self.A), self.w)

    def sandwich_mean(self, S) -> np.ndarray:
        """(1/N) Σ_i H_i S H_i for a symmetric d×d S, in O(N d² k)."""
        SA = np.einsum("de,nek->ndk", S, self.A)            # S A_i
        M = np.einsum("ndk,ndl->nkl", self.A, SA)           # A_iᵀ S A_i  (k×k)
        if self.w is not None:
            M = self.w[:, :, None] * M * self.w[:, None, :]
        AwM = np.einsum("ndk,nkl->ndl", self.A, M)          # A_i W M W
        return np.tensordot(AwM, self.A, axes=([0, 2], [0, 2])) / self.N


def _as_hessians(hessians) -> PerSampleHessians:
    if isinstance(hessians, PerSampleHessians):
        return hessians
    if hasattr(hessians, "per_sample_factors"):  # LeastSquaresProblem
        return PerSampleHessians(hessians.per_sample_factors())
    hs = PerSampleHessians(hessians)
    A = hs.A
    if A.ndim == 3 and A.shape[1] == A.shape[2] and A.shape[1] > 1 and \
            np.allclose(A, np.swapaxes(A, 1, 2), rtol=1e-10, atol=1e-12 * np.abs(A).max()):
        # a stack of symmetric (d, d) arrays is read as factors F_i (H_i = F_i F_iᵀ); the
        # per-sample Hessians themselves, passed as factors, gave a threshold 6× too low
        warnings.warn("ms_stability_threshold: the (N, d, d) array holds symmetric matrices and "
                      "is read as factors F_i with H_i = F_i F_iᵀ; if they are the per-sample "
                      "Hessians themselves, pass PerSampleHessians.from_dense(H)", UserWarning,
                      stacklevel=caller_stacklevel())
    return hs


def _check_B(B, N, replacement):
    B = as_int("B", B, minimum=1)
    if not replacement and B > N:
        raise ValueError(f"B must be <= N={N} when sampling without replacement, got {B}")
    return B


def _Q(hs: PerSampleHessians, H, S, kappa):
    """Q(S) = HSH + κ((1/N)Σ H_i S H_i − HSH)."""
    HSH = H @ S @ H
    if kappa == 0.0:
        return HSH
    return (1.0 - kappa) * HSH + kappa * hs.sandwich_mean(S)


def second_moment_operator(hessians, B, alpha, replacement=False, momentum=0.0, *,
                           nesterov=False) -> LinearOperator:
    """T_α as a scipy LinearOperator on vec(Σ) (row-major flattening of d×d, or 2d×2d
    with heavy-ball momentum ρ: state z = (e_t, e_{t−1}), A_B = [[(1+ρ)I − αH_B, −ρI],
    [I, 0]], T(Z) = E[A_B Z A_Bᵀ]; with `nesterov` (torch's v ← ρv + g,
    e ← e − α(g + ρv)): state z = (e_t, v_t), A_B = [[I − α(1+ρ)H_B, −αρ²I], [H_B, ρI]]).
    Inputs are symmetrised first."""
    hs = _as_hessians(hessians)
    B = _check_B(B, hs.N, replacement)
    alpha = as_float("alpha", alpha, nonnegative=True)
    rho = as_float("momentum", momentum, nonnegative=True)
    if rho >= 1:
        raise ValueError(f"momentum must be < 1, got {rho}")
    kappa = batch_variance_weight(B, hs.N, replacement)
    H = hs.mean()
    d = hs.d
    if rho == 0.0:         # plain SGD (Nesterov included)
        def mv(v):
            S = np.asarray(v, dtype=float).reshape(d, d)
            S = 0.5 * (S + S.T)
            T = S - alpha * (H @ S + S @ H) + alpha ** 2 * _Q(hs, H, S, kappa)
            return T.ravel()
        return LinearOperator((d * d, d * d), matvec=mv, dtype=float)

    I = np.eye(d)
    if nesterov:
        a = alpha * (1 + rho)
        Abar = np.block([[I - a * H, -alpha * rho ** 2 * I], [H, rho * I]])
        # A_B − Ā = [[−a ε, 0], [ε, 0]]: E[(A_B − Ā)Z(A_B − Ā)ᵀ] = [[a², −a], [−a, 1]] ⊗ E[εZ₁₁ε]
        weights = np.array([[a * a, -a], [-a, 1.0]])
    else:
        Abar = np.block([[(1 + rho) * I - alpha * H, -rho * I], [I, np.zeros((d, d))]])
        weights = np.array([[alpha ** 2, 0.0], [0.0, 0.0]])

    def mv_m(v):
        Z = np.asarray(v, dtype=float).reshape(2 * d, 2 * d)
        Z = 0.5 * (Z + Z.T)
        out = Abar @ Z @ Abar.T
        if kappa != 0.0:
            Z11 = Z[:d, :d]
            noise = kappa * (hs.sandwich_mean(Z11) - H @ Z11 @ H)
            out += np.kron(weights, noise)
        return out.ravel()
    return LinearOperator((4 * d * d, 4 * d * d), matvec=mv_m, dtype=float)


def ms_spectral_radius(hessians, B, alpha, replacement=False, momentum=0.0, tol=1e-10, *,
                       nesterov=False) -> float:
    """ρ(T_α), the per-step growth factor of E‖e_t‖² (Lanczos without momentum, where
    ρ = λ_max(T_α); Arnoldi with momentum, heavy ball or `nesterov`, where ρ = max |eig|)."""
    op = second_moment_operator(hessians, B, alpha, replacement, momentum, nesterov=nesterov)
    n = op.shape[0]
    if n <= 16 or (momentum != 0.0 and n <= 1024):   # ARPACK's Arnoldi stalls at ρ → 1
        M = op @ np.eye(n)
        return float(np.max(np.abs(np.linalg.eigvals(M))))
    v0 = np.eye(int(round(np.sqrt(n)))).ravel()
    if momentum == 0.0:
        return float(eigsh(op, k=1, which="LA", tol=tol, v0=v0)[0][0])
    vals = eigs(op, k=min(4, n - 2), which="LM", tol=tol, v0=v0, return_eigenvectors=False)
    return float(np.max(np.abs(vals)))


@result
class StabilityThreshold(Result):
    """Result of `ms_stability_threshold`: alpha (α*), B, N, replacement, momentum,
    method, mu (= 1/α* for the pencil), the top generalised eigenvector `mode` (the
    worst-case second moment Σ in the original basis, unit Frobenius norm, or None),
    rho_check = ρ(T_α*) (≈ 1; None if not computed), and nesterov."""

    alpha: float
    B: int
    N: int
    replacement: bool
    momentum: float
    method: str
    mu: float | None
    mode: np.ndarray | None
    rho_check: float | None
    nesterov: bool = False


def _range_basis(hs: PerSampleHessians, H, rel_tol):
    lam, V = np.linalg.eigh(H)
    top = lam[-1]
    if not top > 0:
        raise ValueError("H has no positive eigenvalue: no mean-square threshold")
    keep = lam > rel_tol * top
    if np.any(~keep):
        # directions outside the kept span must carry no more per-sample curvature than
        # positive semi-definite terms of a mean below the cut can: |A_iᵀv|² ≤ N·cut (more
        # means terms of both signs cancelling in the mean: no threshold). An entrywise test
        # against 1e-6·max|A| refused a positive definite H whose smallest eigenvalue,
        # 2.4e-13 of its largest, came from one sample's tiny feature.
        Vd = V[:, ~keep]
        Aw = hs.A if hs.w is None else hs.A * np.sqrt(np.abs(hs.w))[:, None, :]
        leak2 = float(np.max(np.sum(np.einsum("dj,ndk->njk", Vd, Aw) ** 2, axis=2)))
        if leak2 > 10.0 * hs.N * rel_tol * top + 1e-12 * float(np.abs(Aw).max()) ** 2:
            raise ValueError("H is not positive definite on the span of the per-sample "
                             "Hessians: no mean-square threshold exists")
    return lam[keep], V[:, keep]


def ms_stability_threshold(hessians, B, replacement=False, momentum=0.0, method="auto",
                           tol=1e-10, check=False, *, nesterov=False) -> StabilityThreshold:
    """Exact mean-square stability threshold α* of mini-batch SGD: ρ(T_α*) = 1.

    hessians: `PerSampleHessians`, factors (N, d[, k]) or a `LeastSquaresProblem`.
    method: "pencil" (α* = 1/λ_max(L^{-1/2}QL^{-1/2})), "brentq" (root of ρ(T_α) − 1 in
    (0, 2(1+ρ)/λ_max(H)] with Arnoldi/Lanczos estimates of ρ(T_α) on the full 2d×2d state;
    slow, kept as an independent check), or "auto" (= "pencil"; "brentq" with Nesterov).
    nesterov: torch's Nesterov momentum ρ (state (e_t, v_t), `second_moment_operator`);
    only by "brentq", from the deterministic limit 2(1+ρ)/((1+2ρ)λ_max(H)) downwards.

    Heavy-ball momentum ρ (pencil): the fixed point of the second-moment map of
    e_{t+1} = ((1+ρ)I − αH_B)e_t − ρe_{t−1}, with the cross moment C = E e_t e_{t−1}ᵀ
    eliminated (C + ρCᵀ = ĀP), reads in the eigenbasis of H
    α·L_jk P_jk = α²(K_jk P_jk + κ·[(1/N)Σ_i (H_i − H)P(H_i − H)]_jk) with
    L_jk = (1 − ρ)(λ_j + λ_k) and K_jk = (λ_jλ_k(1 + ρ²) − ρ(λ_j² + λ_k²))/(1 − ρ²)
    (derived in `rmt.symbolic.derive_momentum_mean_square`); α* = 1/μ_max of that
    symmetric pencil, O(N d² k) per product, no 2d×2d operator. At ρ = 0 it is the SGD
    pencil (K_jk = λ_jλ_k).
    check: also return ρ(T_α*) computed directly (should be 1 to ~1e-8).

    At B = N (without replacement) ε ≡ 0 and α* = 2(1+ρ)/λ_max(H) exactly; for d = 1,
    α* = 2h/(h² + κ(1/N)Σ(h_i − h)²) = 2h/(h² + c(B,N)s²), the directional formula.
    """
    hs = _as_hessians(hessians)
    B = _check_B(B, hs.N, replacement)
    rho = as_float("momentum", momentum, nonnegative=True)
    if rho >= 1:
        raise ValueError(f"momentum must be < 1, got {rho}")
    nesterov = bool(nesterov)
    if method == "auto":
        method = "brentq" if nesterov else "pencil"
    if method not in ("pencil", "brentq"):
        raise ValueError(f"method must be 'auto', 'pencil' or 'brentq', got {method!r}")
    if nesterov and method == "pencil":
        raise ValueError("nesterov=True: the pencil form is derived for heavy ball only; use "
                         "method='brentq' (or 'auto')")
    kappa = batch_variance_weight(B, hs.N, replacement)
    H = hs.mean()
    lam, V = _range_basis(hs, H, 1e-12)
    # every method works in the range of H: the directions outside it are frozen, and on
    # the full space they hold ρ(T_α) at 1 for every α (brentq then followed round-off:
    # 30× to 10⁶× too small on a rank-deficient problem; check read 1 whatever α)
    hr = hs.rotated(V)
    mu = mode = None
    if method == "pencil":
        Hr = np.diag(lam)
        W = 1.0 / np.sqrt((1.0 - rho) * (lam[:, None] + lam[None, :]))
        m = lam.size
        lj, lk = lam[:, None], lam[None, :]
        # K − λλᵀ: the momentum correction of the deterministic part (0 at ρ = 0)
        Kc = (lj * lk * (1 + rho ** 2) - rho * (lj ** 2 + lk ** 2)) / (1 - rho ** 2) - lj * lk

        def mv(v):
            S = np.asarray(v, dtype=float).reshape(m, m)
            S = 0.5 * (S + S.T) * W
            Q = _Q(hr, Hr, S, kappa)
            if rho:
                Q = Q + Kc * S
            return (W * Q).ravel()

        if m * m <= 64:
            K = np.column_stack([mv(e) for e in np.eye(m * m)])
            K = 0.5 * (K + K.T)
            vals, vecs = np.linalg.eigh(K)
            mu, vec = float(vals[-1]), vecs[:, -1]
        else:
            op = LinearOperator((m * m, m * m), matvec=mv, dtype=float)
            v0 = (W * np.eye(m)).ravel()
            vals, vecs = eigsh(op, k=1, which="LA", tol=tol, v0=v0)
            mu, vec = float(vals[0]), vecs[:, 0]
        alpha = 1.0 / mu
        S = W * vec.reshape(m, m)                       # L^{-1/2} applied: the Σ mode
        S = V @ (0.5 * (S + S.T)) @ V.T
        mode = S / np.linalg.norm(S)
        if np.trace(mode) < 0:
            mode = -mode
    else:
        hi = momentum_factor(rho, "nesterov" if nesterov else "heavy_ball") / lam[-1]
        f = lambda a: ms_spectral_radius(hr, B, a, replacement, rho, tol,
                                         nesterov=nesterov) - 1.0
        if f(hi) < 0:  # only possible through round-off at B = N
            alpha = hi
        else:
            lo = hi
            for _ in range(60):
                lo *= 0.5
                if f(lo) < 0:
                    break
            else:
                raise RuntimeError("could not bracket the mean-square threshold")
            alpha = brentq(f, lo, hi, xtol=1e-12 * hi, rtol=1e-10)
    rho_check = (ms_spectral_radius(hr, B, alpha, replacement, rho, tol, nesterov=nesterov)
                 if check else None)
    return StabilityThreshold(float(alpha), B, hs.N, replacement, rho, method, mu, mode, rho_check,
                              nesterov)


def ms_threshold_curve(hessians, batch_sizes, replacement=False, momentum=0.0,
                       method="auto", *, nesterov=False) -> np.ndarray:
    """α*(B) for each B in `batch_sizes` (numpy array, same order)."""
    hs = _as_hessians(hessians)
    bs = as_array("batch_sizes", batch_sizes, ndim=1)
    # each B as given (int(b) read 2.7 as 2; the scalar path refuses a non-integer)
    return np.array([ms_stability_threshold(hs, b.item(), replacement, momentum, method,
                                            nesterov=nesterov).alpha for b in bs])
