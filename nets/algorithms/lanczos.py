"""Lanczos on curvature operators: the tridiagonalisation and a restarted eigensolver.

`lanczos(op, m)` runs m steps of the symmetric Lanczos recurrence from a unit vector
q_1 = v0/‖v0‖,

    β_j q_{j+1} = A q_j − α_j q_j − β_{j−1} q_{j−1},     α_j = q_jᵀ A q_j,

in float64 (the operator's output is cast, so float32 Hessian-vector products are
fine), with full reorthogonalisation: after each step w is projected off all previous
q's by classical Gram–Schmidt — a second pass only where the first removed much of w
(the DGKS criterion, `_orthogonalise`) — so that Ritz values do not acquire ghost
copies (a peer defect). T_m = tridiag(β, α, β) is diagonalised with the symmetric
tridiagonal solver `scipy.linalg.eigh_tridiagonal`: T_m = S diag(θ) Sᵀ. Returned per
Ritz value θ_i: the weight w_i = S_{1i}² (the Gauss-quadrature weight of q_1's spectral
measure, used by SLQ) and the residual norm ‖A y_i − θ_i y_i‖ = |β_m S_{mi}|.
If β_j falls to round-off the Krylov space is invariant: the recurrence stops
(`breakdown=True`) and the Ritz values are exact eigenvalues of A (restricted to the
space spanned by q_1's spectral components, each distinct eigenvalue once).

`eigsh(op, k, which)` finds extremal eigenpairs with a thick-restart (Krylov–Schur)
Lanczos method with full reorthogonalisation: the Krylov basis grows to `krylov_dim`,
then is compressed to the best Ritz vectors plus the residual vector and grown again,
until the k wanted pairs satisfy ‖A y − θ y‖ ≤ max(tol·|θ|, min(100·eps, 0.02)·‖A‖) (eps of the
operator's dtype: the attainable floor). On an invariant subspace it continues with a
fresh random vector orthogonal to the basis. With `check_multiplicity` (k ≥ 2; on in
the public `top_eigenvalues`/`bottom_eigenvalues`) a run in the orthogonal complement
of the pairs found then checks for copies of repeated eigenvalues, which one Krylov
space cannot hold.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from nets.curvature.operators import CurvatureOperator
from nets.utils.autocast import outside_autocast
from nets.utils.progress import progress_counter, redraw
from nets.utils.results import Result, result
from nets.utils.seeding import resolved_seed
from rmt.validation import as_bool, as_float, as_int

__all__ = ["LanczosResult", "EigenResult", "lanczos", "lanczos_batch", "eigsh"]


@result
class LanczosResult(Result):
    """Output of m Lanczos steps from one start vector.

    alpha : (m,) diagonal of T; beta : (m−1,) off-diagonal of T; beta_last : β_m, the
    coupling to the next (unused) Lanczos vector (0 on breakdown).
    ritz_values : (m,) ascending eigenvalues θ of T; ritz_weights : (m,) squared first
    components S_{1i}² (sum to 1); residual_norms : |β_m S_{mi}|; converged :
    residual_norms ≤ tol·max|θ|. num_steps : m actually taken (< requested on
    breakdown); v0_norm : ‖v0‖ (so v0ᵀ f(A) v0 ≈ v0_norm² Σ_i w_i f(θ_i)); seed.
    """

    alpha: np.ndarray
    beta: np.ndarray
    beta_last: float
    ritz_values: np.ndarray
    ritz_weights: np.ndarray
    residual_norms: np.ndarray
    converged: np.ndarray
    num_steps: int
    seed: int | None
    breakdown: bool
    v0_norm: float
    tol: float

    def tridiagonal(self) -> np.ndarray:
        """Dense T_m (m×m), for inspection."""
        return np.diag(self.alpha) + np.diag(self.beta, 1) + np.diag(self.beta, -1)

    def quadrature(self, f) -> float:
        """Gauss quadrature q_1ᵀ f(A) q_1 ≈ Σ_i w_i f(θ_i) (unit start vector)."""
        return float(np.sum(self.ritz_weights * f(self.ritz_values)))


@result
class EigenResult(Result):
    """Extremal eigenpairs from `eigsh`.

    values : (k,) ordered by `which` ("LA": descending, "SA": ascending, "LM":
    descending |λ|); vectors : torch (P, k) float64 unit eigenvectors or None, each
    signed so that its entry of largest magnitude is positive (an eigenvector's sign is
    arbitrary: without a convention a float32 copy of a model gave the opposite sign to
    float64, and signed products of it — subspace_noise's off-diagonals — flipped);
    residuals : ‖A y − θ y‖; converged : bool per pair; num_matvecs : operator
    products used; num_restarts; seed; which; tol; norm_estimate : the run's estimate of
    ‖A‖ (a lower bound: the largest |Ritz value| and |α_j| + β_j seen); zero_tol :
    100·eps·norm_estimate, below which |θ| is numerically zero (`is_zero`).
    """

    values: np.ndarray
    vectors: torch.Tensor | None
    residuals: np.ndarray
    converged: np.ndarray
    num_matvecs: int
    num_restarts: int
    seed: int | None
    which: str
    tol: float
    norm_estimate: float = float("nan")
    zero_tol: float = 0.0

    def is_zero(self, i: int = 0) -> bool:
        """Whether values[i] is zero to the products' precision, |θ| ≤ zero_tol =
        100·eps·‖A‖ (eps of the operator's dtype): e.g. the top eigenvalue of a concave
        loss, which comes out as a rounding error of either sign."""
        return bool(abs(self.values[i]) <= self.zero_tol)


# ----------------------------------------------------------------------------------

def check_operator(op):
    if not isinstance(op, CurvatureOperator):
        if not all(hasattr(op, a) for a in ("matvec", "matmat", "P")):
            raise TypeError(f"op must be a CurvatureOperator (or have P, matvec, matmat), "
                            f"got {type(op).__name__}")
    return op


def _check_finite_step(a, b) -> None:
    """Refuse NaN/inf from the operator (e.g. a loss whose curvature is not finite at
    these parameters) instead of returning NaN eigenvalues."""
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("the operator returned NaN or inf in a product: the loss is not "
                         "twice differentiable to a finite value at these parameters and data "
                         "(check loss_fn, the model outputs and the data)")


def _norm(w: torch.Tensor, dim=None) -> torch.Tensor:
    """‖w‖₂ (along `dim`), recomputed as s·‖w/s‖ with s = max|wᵢ| where the plain norm
    is below 1e-140: float64 entries below ~1e-154 square to zero, and torch's norm of a
    vector of 1e-166 entries is exactly 0, which Lanczos would read as an exact invariant
    subspace (an operator scaled by 1e-165 gave a wrong top eigenvalue flagged converged).
    Norms above the cut are the plain ones, bit for bit."""
    n = torch.linalg.vector_norm(w, dim=dim)
    if not bool((n < 1e-140).any()):
        return n
    s = w.abs().amax() if dim is None else w.abs().amax(dim=dim, keepdim=True)
    s = torch.where(s > 0, s, torch.ones_like(s))
    scaled = torch.linalg.vector_norm(w / s, dim=dim) * (s if dim is None else s.squeeze(dim))
    return torch.where(n < 1e-140, scaled, n)


def _op_device(op):
    return getattr(op, "device", torch.device("cpu"))


def _op_eps(op) -> float:
    dt = getattr(op, "dtype", torch.float64)
    return float(torch.finfo(dt).eps)


def zero_tolerance(op_or_dtype, norm: float) -> float:
    """|θ| at or below which an eigenvalue is zero to the precision of products in the
    operator's dtype (or the dtype given): 100·eps·‖A‖ for a norm estimate ‖A‖
    (`EigenResult.zero_tol`)."""
    dt = op_or_dtype if isinstance(op_or_dtype, torch.dtype) else getattr(op_or_dtype, "dtype",
                                                                          torch.float64)
    return 100.0 * float(torch.finfo(dt).eps) * float(norm)


def _breakdown_eps(op) -> float:
    """Unit round-off used in the invariant-subspace test: the operator's, but never
    coarser than float32's. With bfloat16/float16 products (eps ≈ 1e-2..1e-3) the
    product noise keeps β far above 10·eps32·√P·‖A‖, whereas the operator's own eps
    made 10·eps·√P exceed 1 and stopped every run after one step (false breakdown)."""
    return min(_op_eps(op), float(torch.finfo(torch.float32).eps))


def _convergence_floor(op) -> float:
    """Relative residual below which a Ritz pair counts as converged whatever `tol`
    asks: 100·eps of the products, capped at 2 % of ‖A‖ so that low-precision products
    (bfloat16: 100·eps ≈ 0.8) cannot declare an unconverged pair converged."""
    return min(100.0 * _op_eps(op), 0.02)


def _apply(op, Q: torch.Tensor) -> torch.Tensor:
    """A applied to the rows of Q (k, P), returned in float64 (k, P)."""
    if Q.shape[0] == 1:
        return op.matvec(Q[0]).to(torch.float64)[None, :]
    return op.matmat(Q.T).to(torch.float64).T.contiguous()


def rademacher_vectors(P: int, k: int, seed) -> np.ndarray:
    """(k, P) Rademacher (±1) rows from `numpy.random.default_rng(seed)`: the start
    vectors of `lanczos(..., seed=seed)` (k = 1) and of `lanczos_batch`."""
    return np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=(k, P))


def _start_vectors(op, k: int, v0, seed, kind: str) -> torch.Tensor:
    P = op.P
    dev = _op_device(op)
    if v0 is None:
        if kind == "rademacher":
            V = rademacher_vectors(P, k, seed)
        else:
            V = np.random.default_rng(seed).standard_normal((k, P))
        return torch.from_numpy(V).to(dev)
    if isinstance(v0, np.ndarray):
        v0 = torch.from_numpy(np.asarray(v0, dtype=np.float64))
    if not isinstance(v0, torch.Tensor):
        raise TypeError(f"v0 must be a torch.Tensor or numpy array, got {type(v0).__name__}")
    V = v0.to(device=dev, dtype=torch.float64)
    if V.ndim == 1:
        V = V[None, :]
    else:
        V = V.T   # (P, k) columns -> rows
    if V.shape != (k, P):
        raise ValueError(f"v0 must have shape (P,) or (P, k) with P={P}, got {tuple(v0.shape)}")
    if not bool(torch.isfinite(V).all()):
        raise ValueError("v0 contains NaN or inf")
    return V


@outside_autocast
def lanczos(op, num_steps, v0=None, seed=0, reorth: str = "full", tol: float = 1e-8) -> LanczosResult:
    """Run `num_steps` Lanczos steps on the symmetric operator `op` (module docstring).

    v0 : start vector (P,), default a Rademacher vector drawn from
        `numpy.random.default_rng(seed)` (the SLQ probe); normalised internally.
    reorth : "full" (two-pass classical Gram–Schmidt against all previous vectors) or
        "none" (plain three-term recurrence: cheaper, but Ritz values get ghost copies).
    tol : a Ritz pair counts as converged when |β_m S_mi| ≤ tol·max|θ|.
    num_steps is capped at P.
    """
    return lanczos_batch(op, num_steps, num_vectors=1, v0=v0, seed=seed, reorth=reorth, tol=tol)[0]


@outside_autocast
def lanczos_batch(op, num_steps, num_vectors=1, v0=None, seed=0, reorth: str = "full",
                  tol: float = 1e-8) -> list[LanczosResult]:
    """`num_vectors` independent Lanczos recurrences run side by side, each step one
    batched `op.matmat` on the active start vectors (vmap over probes). v0 may be
    (P, num_vectors). Returns one LanczosResult per start vector (the same as running
    `lanczos` on each column)."""
    op = check_operator(op)
    m = min(as_int("num_steps", num_steps, minimum=1), op.P)
    k = as_int("num_vectors", num_vectors, minimum=1)
    tol = as_float("tol", tol, positive=True)
    seed = resolved_seed("seed", seed)
    if reorth not in ("full", "none"):
        raise ValueError(f"reorth must be 'full' or 'none', got {reorth!r}")
    V0 = _start_vectors(op, k, v0, seed, "rademacher")
    norms = torch.linalg.vector_norm(V0, dim=1)
    if bool((norms == 0).any()):
        raise ValueError("v0 must be non-zero")
    if k == 1:
        alpha, beta, steps, broke = _recurrence_single(op, V0[0] / norms[0], m, reorth)
    else:
        alpha, beta, steps, broke = _recurrence_batch(op, V0 / norms[:, None], m, reorth)
    results = []
    for c in range(k):
        n = int(steps[c])
        a_c, b_c = alpha[c, :n].copy(), beta[c, : n - 1].copy()
        b_last = 0.0 if broke[c] else float(beta[c, n - 1])
        if n == 1:
            theta, S = a_c.copy(), np.ones((1, 1))
        else:
            theta, S = eigh_tridiagonal(a_c, b_c)
        weights = S[0, :] ** 2
        resid = np.abs(b_last * S[-1, :])
        anorm = max(float(np.max(np.abs(theta))), np.finfo(float).tiny)
        results.append(LanczosResult(
            alpha=a_c, beta=b_c, beta_last=b_last, ritz_values=theta, ritz_weights=weights,
            residual_norms=resid, converged=resid <= tol * anorm, num_steps=n,
            seed=None if v0 is not None else int(seed) if seed is not None else None,
            breakdown=bool(broke[c]), v0_norm=float(norms[c]), tol=tol))
    return results


def _breakdown_tol(op) -> float:
    """β below this × (running estimate of ‖A‖) means an invariant subspace.

    At a true invariant subspace, β left after full reorthogonalisation is round-off:
    that of the products, ~eps_op·‖A‖ for Hessian/GGN products (measured 0.1–0.4·eps_op
    ·‖A‖, float32 and float64, P ≈ 1400), plus that of the float64 recurrence
    (orthogonalisation against the basis, ≲ eps64·√P·‖A‖). The test is 10× both:
    10·eps_op + 10·eps64·√P, with eps_op never coarser than float32's
    (`_breakdown_eps`: bfloat16/float16 product noise stays far above it, so their runs
    never stop falsely); for float64 operators this is the former 10·eps64·√P. The
    product term carries no √P: 10·eps32·√P (4.2e-5 at P = 1261) exceeded the genuine β
    of a float32 Hessian bulk 1e-5·‖A‖ below an outlier, stopped every SLQ probe at step
    32–34 of 60 and collapsed the density (CDF at the median 0.80 instead of 0.59).
    Dense float32 matmuls, whose round-off grows with the summation length P (up to
    ~8·eps32·√P·‖A‖), may now miss an invariant subspace: the run then goes on with a
    round-off direction whose coupling β ≈ 0 gives its Ritz values no weight (quadrature
    and eigenvalues unchanged, a few products spent), where a false breakdown loses the
    rest of the spectrum."""
    eps64 = float(np.finfo(np.float64).eps)
    return 10.0 * _breakdown_eps(op) + 10.0 * eps64 * np.sqrt(op.P)


def _orthogonalise(Qj: torch.Tensor, w: torch.Tensor, local: int = 2
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonalise w against the orthonormal rows of Qj; returns (w ⟂ Qj, the total
    coefficients Qj·w removed).

    First the last `local` rows (the Lanczos recurrence's own α_j q_j + β_{j−1} q_{j−1},
    which carry almost all of A·q_j), then one classical Gram–Schmidt pass over all rows,
    and a second pass only where that one removed much of what was left (‖w'‖ < 0.7‖w‖:
    the Daniel–Gragg–Kaufman–Stewart / Kahan–Parlett criterion; otherwise one pass
    already leaves w orthogonal to working precision). Each full pass reads the (j+1)×P
    basis twice, so this halves the cost of always making two passes (the eigensolver's
    dominant cost once P is large and the products are cheap)."""
    h = torch.zeros(Qj.shape[0], dtype=w.dtype, device=w.device)
    if local > 0:
        tail = Qj[-local:]
        c = tail @ w
        w = w - tail.T @ c
        h[-local:] += c
    n0 = float(_norm(w))
    for _ in range(2):
        c = Qj @ w
        w = w - Qj.T @ c
        h += c
        if float(_norm(w)) >= 0.7 * n0:
            break
    return w, h


def _recurrence_single(op, q0: torch.Tensor, m: int, reorth: str):
    """One Lanczos recurrence (lean path: ~10 tensor calls per step besides A·q)."""
    P = q0.shape[0]
    Q = torch.empty((m + 1, P), dtype=torch.float64, device=q0.device)
    Q[0] = q0
    alpha, beta = np.zeros((1, m)), np.zeros((1, m))
    bd = _breakdown_tol(op)
    scale, b_prev = 0.0, 0.0
    for j in range(m):
        q = Q[j]
        w = op.matvec(q).to(torch.float64)
        if reorth == "full":
            w, h = _orthogonalise(Q[: j + 1], w)     # h = (…, β_{j−1}, α_j)
            a = float(h[j])
        else:
            a = float(torch.dot(w, q))
            w = w - a * q
            if j > 0:
                w = w - b_prev * Q[j - 1]
        b = float(_norm(w))
        _check_finite_step(a, b)
        alpha[0, j], beta[0, j] = a, b
        scale = max(scale, abs(a) + b)
        if b <= bd * max(scale, np.finfo(float).tiny):
            beta[0, j] = 0.0
            return alpha, beta, np.array([j + 1]), np.array([True])
        if j + 1 < m:
            Q[j + 1] = w / b
        b_prev = b
    return alpha, beta, np.array([m]), np.array([False])


def _recurrence_batch(op, Q0: torch.Tensor, m: int, reorth: str):
    """k independent recurrences; each step one `op.matmat` on the active columns.

    Full reorthogonalisation runs on views of each probe's own basis Q[c, :j+1]: on
    CPU probe by probe (the (j+1)×P block stays in cache for its passes; a `bmm` over
    all probes re-read the whole k×(j+1)×P basis from memory four times and was ~6×
    slower), with a second classical Gram–Schmidt pass only where the first cancelled
    much of w; on other devices two passes as one batched matmul, indexing the basis
    only after a breakdown."""
    k, P = Q0.shape
    dev = Q0.device
    per_probe = dev.type == "cpu"
    Q = torch.empty((k, m + 1, P), dtype=torch.float64, device=dev)
    Q[:, 0] = Q0
    alpha = np.zeros((k, m))
    beta = np.zeros((k, m))
    steps = np.full(k, m)
    broke = np.zeros(k, dtype=bool)
    active = np.arange(k)
    bd_rel = _breakdown_tol(op)
    scale = np.zeros(k)
    for j in range(m):
        all_active = active.size == k
        act_t = torch.as_tensor(active, device=dev)
        qj = Q[:, j] if all_active else Q[act_t, j]          # (ka, P)
        W = _apply(op, qj)
        a = (W * qj).sum(dim=1)
        W = W - a[:, None] * qj
        if j > 0:
            W = W - torch.as_tensor(beta[active, j - 1], device=dev)[:, None] * \
                (Q[:, j - 1] if all_active else Q[act_t, j - 1])
        if reorth == "full":
            if per_probe:
                # classical Gram–Schmidt; the second pass only where the first removed
                # much of w (‖w_after‖ < 0.7‖w_before‖: Kahan–Parlett "twice is enough" /
                # DGKS criterion), otherwise one pass already leaves w orthogonal to ~eps
                n0 = _norm(W, dim=1).tolist()
                for i, c in enumerate(active.tolist()):
                    Qc, w = Q[c, : j + 1], W[i]                 # views: (j+1, P), (P,)
                    w.addmv_(Qc.T, Qc @ w, alpha=-1.0)          # w −= Qcᵀ (Qc w), in place
                    if float(_norm(w)) < 0.7 * n0[i]:
                        w.addmv_(Qc.T, Qc @ w, alpha=-1.0)
            else:
                Qa = Q[:, : j + 1] if all_active else Q[act_t, : j + 1]   # (ka, j+1, P)
                for _ in range(2):
                    h = torch.bmm(Qa, W[:, :, None])             # (ka, j+1, 1)
                    W = W - torch.bmm(Qa.transpose(1, 2), h)[:, :, 0]
        b = _norm(W, dim=1)
        a_np, b_np = a.cpu().numpy(), b.cpu().numpy()
        _check_finite_step(a_np, b_np)
        alpha[active, j] = a_np
        beta[active, j] = b_np
        scale[active] = np.maximum(scale[active], np.abs(a_np) + b_np)
        done = b_np <= bd_rel * np.maximum(scale[active], np.finfo(float).tiny)
        if j + 1 < m:
            keep = ~done
            if keep.any():
                kt = torch.as_tensor(np.flatnonzero(keep), device=dev)
                Q[act_t[kt], j + 1] = W[kt] / b[kt][:, None]
        for c in active[done]:
            broke[c] = True
            steps[c] = j + 1
            beta[c, j] = 0.0
        active = active[~done]
        if active.size == 0:
            break
    return alpha, beta, steps, broke


# ----------------------------------------------------------------------------------

def _order(theta: np.ndarray, which: str) -> np.ndarray:
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


class _Deflated:
    """A restricted to the orthogonal complement of the orthonormal columns of L (P, l):
    (I − LLᵀ) A (I − LLᵀ) + σ LLᵀ, with σ below (LA) or above (SA) every eigenvalue that
    can be wanted, or 0 (LM), so that L's own directions are never selected."""

    def __init__(self, op, L: torch.Tensor, sigma: float):
        self.op, self.L, self.sigma, self.P = op, L, float(sigma), op.P
        self.dtype = getattr(op, "dtype", torch.float64)
        self.device = _op_device(op)

    def _split(self, v):
        c = self.L.T @ v
        return v - self.L @ c, c

    def matvec(self, v):
        v = v.to(torch.float64)
        inside, c = self._split(v)
        w, _ = self._split(self.op.matvec(inside).to(torch.float64))
        return w + self.sigma * (self.L @ c)


def _beats(a: float, b: float, which: str, margin: float) -> bool:
    """Whether eigenvalue a comes before b in `which` order by more than margin."""
    if which == "LA":
        return a > b + margin
    if which == "SA":
        return a < b - margin
    return abs(a) > abs(b) + margin


@outside_autocast
def eigsh(op, k: int = 1, which: str = "LA", tol: float = 1e-10, max_steps: int | None = None,
          seed=0, return_vectors: bool = True, krylov_dim: int | None = None,
          v0=None, *, check_multiplicity: bool = False, progress=None) -> EigenResult:
    """k extremal eigenpairs of the symmetric operator `op` (thick-restart Lanczos).

    which : "LA" largest algebraic (values descending), "SA" smallest algebraic
        (ascending), "LM" largest magnitude (descending |λ|).
    tol : relative residual target ‖A y − θ y‖ ≤ tol·|θ| (floored at 100·eps·‖A‖ with eps
        of the operator's dtype, the attainable accuracy); eigenvalue errors are then
        ≈ residual²/gap.
    max_steps : budget of operator products (default 50·krylov_dim; at least k, so that
        k Ritz pairs exist), never exceeded; if exhausted the best pairs are returned
        with `converged` False where the target was missed.
    krylov_dim : basis size before a restart (default min(P, max(2k + 10, 20)), near ARPACK's
        2k+1..20); at least 2k + 1 (or P) for which="LM", where a smaller basis can converge
        to the wrong eigenvalues (both ends compete for the directions a restart keeps).
    seed : seeds the Gaussian start vector (and fresh vectors after an invariant
        subspace); v0 : optional start vector.
    check_multiplicity : (k ≥ 2) a Krylov space from one start vector holds one
        direction of each eigenspace, so in exact arithmetic (and in practice, with full
        reorthogonalisation) a repeated eigenvalue is found once and the next distinct
        ones take the places of its copies — as for a multi-output least-squares layer,
        whose Hessian is (XᵀX) ⊗ I_C. After convergence a Lanczos run from a fresh
        random vector in the orthogonal complement of the k pairs asks whether the
        complement holds an eigenvalue before the k-th: its best Ritz value lies inside
        the complement's spectrum, so once it comes first (by more than the convergence
        tolerance) one was missed — the complement's own k best pairs are then found,
        merged with the first k, and the question asked again; the run stops as "none"
        once that Ritz value, with a residual under 1e-3·‖A‖, cannot come first. It costs
        a run of its own (+11 to +15 products on a digits MLP: +38 % at k = 2, +11 % at
        k = 60, +68 % for a loose tol = 0.01 at k = 5), so the solver leaves it off (as
        ARPACK and the peers do); the public `top_eigenvalues`, `bottom_eigenvalues` and
        `extremal_eigenpairs` turn it on.
    progress : True/False/None: a bar over operator products (None: on a terminal only).
    """
    op = check_operator(op)
    P = op.P
    k = as_int("k", k, minimum=1)
    if k > P:
        raise ValueError(f"k must be <= P={P}, got {k}")
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"which must be 'LA', 'SA' or 'LM', got {which!r}")
    tol = as_float("tol", tol, positive=True)
    m = min(P, max(2 * k + 10, 20)) if krylov_dim is None else as_int("krylov_dim", krylov_dim, minimum=1)
    m = min(m, P)
    if m <= k and m < P:
        raise ValueError(f"krylov_dim must exceed k (got krylov_dim={m}, k={k})")
    if which == "LM" and m < min(2 * k + 1, P):
        # both ends compete for the directions a restart keeps: k = 5 in a basis of 6
        # returned a converged wrong set (the other end's eigenvalue in place of the k-th)
        # from 15 of 15 start vectors; none from 2k + 1 on (k = 1…8, 15 each)
        raise ValueError(f"krylov_dim must be at least 2k + 1 = {2 * k + 1} for which='LM' "
                         f"(got krylov_dim={m}, k={k}): a smaller basis can converge to the "
                         "wrong eigenvalues")
    max_mv = 50 * m if max_steps is None else as_int("max_steps", max_steps, minimum=k)
    seed = resolved_seed("seed", seed)
    rng = np.random.default_rng(seed)
    dev = _op_device(op)
    if v0 is None:
        q = torch.from_numpy(rng.standard_normal(P)).to(dev)
    else:
        q = _start_vectors(op, 1, v0, seed, "gaussian")[0]
    if float(torch.linalg.vector_norm(q)) == 0.0:
        raise ValueError("v0 must be non-zero")
    return_vectors = as_bool("return_vectors", return_vectors)
    check = as_bool("check_multiplicity", check_multiplicity) and 1 < k < P
    bar = progress_counter(progress, total=min(m, max_mv),     # one cycle; grown at
                           desc="eigsh: products")                # each restart
    try:
        values, vectors, resid, ok, matvecs, restarts, anorm = _krylov_schur(
            op, k, which, tol, max_mv, m, rng, q, bar, return_vectors or check)
        while check and bool(ok.all()):
            status, found, used = (_missed_pairs(op, values, vectors, which, tol, anorm, rng,
                                                 bar, max_mv - matvecs)
                                   if matvecs < max_mv else ("undecided", None, 0))
            matvecs += used
            if status == "absent":
                break
            if status == "undecided":       # the budget ended the check: pairs unconfirmed
                ok = np.zeros(len(values), bool)
                break
            values, vectors, resid, ok = _merge(values, vectors, resid, found, which, k)
            restarts += 1
    finally:
        if bar is not None:
            bar.total = bar.n
            redraw(bar)
            bar.close()
    return EigenResult(values=values, vectors=_signed(vectors) if return_vectors else None,
                       residuals=resid, converged=ok, num_matvecs=matvecs,
                       num_restarts=restarts, seed=None if v0 is not None else seed,
                       which=which, tol=tol, norm_estimate=anorm,
                       zero_tol=zero_tolerance(op, anorm))


# the check's Ritz pair counts as settled behind the k-th value once its residual is
# under this fraction of ‖A‖: 1e-2 … 1e-6 and full convergence all gave the exact
# values on 48 repeated-spectrum cases; on the digits MLP (k = 2 / 5 / 20 / 60) the
# check costs +38 / +34 / +26 / +11 % products at 1e-3 against +103 / +91 / +75 / +50 %
# when run to convergence
_SETTLE = 1e-3


def _signed(vectors):
    """Each column multiplied by the sign of its entry of largest magnitude."""
    if vectors is None or vectors.numel() == 0:
        return vectors
    idx = vectors.abs().argmax(0)
    sign = torch.sign(vectors[idx, torch.arange(vectors.shape[1], device=vectors.device)])
    return vectors * torch.where(sign == 0, torch.ones_like(sign), sign)


def _missed_pairs(op, values, vectors, which, tol, anorm, rng, bar, budget):
    """Whether the orthogonal complement of `vectors` holds an eigenvalue before
    values[-1] (in `which` order): a Lanczos run there from a random vector, stopped as
    soon as its best Ritz value θ comes first (found: Ritz values lie inside the
    spectrum) or θ ± its residual norm cannot (absent), or at convergence. Returns
    (status, pairs, products): ("absent", None, ·), ("undecided", None, ·) when the budget
    ended it first, or ("found", the complement's own best pairs, ·)."""
    P, k = op.P, len(values)                # eigsh calls it with k < P and budget ≥ 1
    span = float(np.max(np.abs(values))) + anorm
    sigma = {"LA": -3.0 * span, "SA": 3.0 * span, "LM": 0.0}[which]
    defl = _Deflated(op, vectors, sigma)
    last = float(values[-1])
    margin = float(_tolerance(last, tol, op, anorm))
    sign = {"LA": 1.0, "SA": -1.0, "LM": 1.0}[which]

    def settled(theta, r):
        if _beats(theta, last, which, margin):
            return True
        reach = abs(theta) + r if which == "LM" else theta + sign * r
        return r <= _SETTLE * max(abs(theta), anorm) and not _beats(reach, last, which, margin)

    mc = min(P, 20)
    q = torch.from_numpy(rng.standard_normal(P)).to(vectors.device)
    first = _krylov_schur(defl, 1, which, tol, budget, mc, rng, q, bar, True, stop=settled)
    used = first[4]
    theta, r = float(first[0][0]), float(first[2][0])
    if not _beats(theta, last, which, margin):
        # absent if the run settled or converged; the budget ran out before it could say
        return ("absent" if bool(first[3][0]) or settled(theta, r) else "undecided"), None, used
    kc = min(k, P - k)
    if budget - used <= kc:     # a missed eigenvalue seen, too few products left to find
        # the complement's pairs and measure them on A: its Ritz pair, unconfirmed
        return "found", (first[0], first[1], first[2], np.zeros(1, bool)), used
    mc = min(P, max(2 * kc + 10, 20))
    q = torch.from_numpy(rng.standard_normal(P)).to(vectors.device)
    out = _krylov_schur(defl, kc, which, tol, budget - used - kc, mc, rng, q, bar, True)
    return "found", _true_pairs(op, out[1], tol, anorm, bar), used + out[4] + kc


def _true_pairs(op, Y, tol, anorm, bar):
    """(θ, Y, ‖A y − θ y‖, converged) for vectors found on the deflated operator, measured
    on `op` itself (one product per vector): the deflated run's residuals are those of the
    shifted projection, not of A (a pair reported at 3.5e-17 had 3.1e-4, 31× its target,
    and was flagged converged; an outside sweep)."""
    AY = op.matmat(Y.to(op.dtype)).to(torch.float64)
    if bar is not None:
        bar.update(Y.shape[1])
    theta = (Y * AY).sum(0)
    r = _norm(AY - Y * theta, dim=0).cpu().numpy()
    theta = theta.cpu().numpy()
    return theta, Y, r, r <= _tolerance(theta, tol, op, anorm)


def _merge(values, vectors, resid, found, which, k):
    """The k best of two sets of orthogonal pairs."""
    v2, V2, r2, ok2 = found
    allv = np.concatenate([values, v2])
    order = _order(allv, which)[:k]
    ok1 = np.ones(len(values), bool)
    return (allv[order], torch.cat([vectors, V2], 1)[:, order].contiguous(),
            np.concatenate([resid, r2])[order], np.concatenate([ok1, ok2])[order])


# products before the per-product stop may end a run: a start vector (a warm start) that
# is nearly an eigenvector has a small residual at once, whichever eigenvalue it belongs
# to, and the Krylov space needs some steps to lift a larger one out of it
_MIN_EARLY = 10


def _tolerance(theta, tol, op, anorm):
    """The residual a Ritz pair θ must reach to count as converged: tol·|θ|, floored at
    the products' attainable accuracy (`_convergence_floor`·‖A‖)."""
    return np.maximum(tol * np.abs(theta), _convergence_floor(op) * anorm)


def _stop_now(stop, Tj, beta, which) -> bool:
    theta, S = np.linalg.eigh((Tj + Tj.T) / 2)
    i = _order(theta, which)[0]
    return bool(stop(float(theta[i]), abs(beta * S[-1, i])))


def _live_block_settled(theta, S, resid, blk, size, which, tol, op, anorm) -> bool:
    """After an invariant subspace: whether the best Ritz pair of the live block (the one
    still growing, holding basis vector `size`) has converged, so that the rest of the
    space holds nothing beyond it. Each Ritz vector lies in one block (T is block
    diagonal across a breakdown); the live block may have no pair yet."""
    ids = [int(blk[int(np.abs(S[:, i]).argmax())]) for i in range(size)]
    live = [i for i in range(size) if ids[i] == blk[size]]
    if not live:
        # the fresh direction was drawn at the cycle's end (an operator of low rank breaks
        # down again at once: a one-sample Hessian ran out its budget, 'not converged' with
        # residual 0): the latest block with pairs answers the same question when it too
        # began from a fresh random direction (id ≥ 1) — not the start vector's block, which
        # may be a warm start inside an invariant subspace
        latest = max(ids, default=0)
        if latest < 1:
            return False
        live = [i for i in range(size) if ids[i] == latest]
    best = live[int(_order(theta[live], which)[0])]
    return bool(resid[best] <= _tolerance(theta[best], tol, op, anorm))


def _krylov_schur(op, k, which, tol, max_mv, m, rng, q, bar, want_vectors, stop=None):
    """The thick-restart iteration of `eigsh` from the start vector q: (values, vectors
    or None, residuals, converged, products, restarts, ‖A‖ estimate). `stop(θ, r)` (k = 1;
    by default the convergence test) is asked after every product from the _MIN_EARLY-th
    on with the best Ritz value and its residual norm and ends the iteration when it says
    so — never after an invariant subspace was met (its Ritz values are exact but may
    miss the wanted end of the spectrum, e.g. from a warm start on another eigenvector)."""
    P = op.P
    dev = _op_device(op)
    bd_tol = _breakdown_tol(op)
    V = torch.zeros((m + 1, P), dtype=torch.float64, device=dev)
    V[0] = q / torch.linalg.vector_norm(q)
    T = np.zeros((m, m))
    l, matvecs, restarts, anorm, halted, broke = 0, 0, 0, 0.0, False, False
    # blk[i]: which Krylov block basis vector i belongs to; a fresh random direction after
    # an invariant subspace starts a new block (uncoupled in T), the live one is blk[size]
    blk, n_blocks = np.zeros(m + 1, dtype=np.int64), 1
    if stop is None and k == 1:
        # one wanted pair: test convergence after every product, so that a warm start
        # (v0 near the answer) or a well-separated top ends before the cycle is full
        def stop(theta, r):
            return r <= _tolerance(theta, tol, op, anorm)
    while True:
        size, beta_last = m, 0.0
        for j in range(l, m):
            w = op.matvec(V[j]).to(torch.float64)
            matvecs += 1
            if bar is not None:
                bar.update(1)
            Vj = V[: j + 1]
            # the column after a restart couples to every kept Ritz vector: no local step
            w, h = _orthogonalise(Vj, w, local=0 if j == l and l > 0 else min(2, j + 1))
            h = h.cpu().numpy()
            T[: j + 1, j] = h
            T[j, : j + 1] = h
            beta = float(_norm(w))
            _check_finite_step(h, beta)
            anorm = max(anorm, abs(h[j]) + beta)
            if j + 1 == P:                      # the basis spans the whole space
                size, beta_last = j + 1, 0.0
                break
            if beta <= bd_tol * max(anorm, np.finfo(float).tiny):
                # invariant subspace: exact Ritz values so far; continue with a fresh
                # random direction orthogonal to the basis (zero coupling in T)
                r = torch.from_numpy(rng.standard_normal(P)).to(dev)
                r, _ = _orthogonalise(Vj, r, local=0)
                V[j + 1] = r / torch.linalg.vector_norm(r)
                beta = 0.0
                broke = True    # the space held only part of the spectrum: no early stop
                blk[j + 1], n_blocks = n_blocks, n_blocks + 1
            else:
                V[j + 1] = w / beta
                blk[j + 1] = blk[j]
            beta_last = beta
            if (stop is not None and not broke and matvecs >= _MIN_EARLY
                    and _stop_now(stop, T[: j + 1, : j + 1], beta, which)):
                size, halted = j + 1, True
                break
            if matvecs >= max_mv:               # the budget is spent mid-cycle
                size = j + 1
                break
        Tm = T[:size, :size]
        theta, S = np.linalg.eigh((Tm + Tm.T) / 2)
        anorm = max(anorm, float(np.max(np.abs(theta))))
        resid = np.abs(beta_last * S[size - 1, :])
        order = _order(theta, which)
        want = order[:k]
        ok = resid[want] <= _tolerance(theta[want], tol, op, anorm)
        if broke and size < P and not _live_block_settled(theta, S, resid, blk, size, which,
                                                         tol, op, anorm):
            # the pairs of an invariant block have zero residuals whether or not they are
            # the wanted end (a warm start on another eigenvector returned 9.98 for 10,
            # 'converged'): until the live block's own best pair converges, none counts
            ok = np.zeros(len(want), bool)
        if bool(ok.all()) or halted or matvecs >= max_mv or size == P:
            break
        # thick restart: keep the best l Ritz vectors and the residual direction
        l = min(size - 1, max(k + (m - k) // 2, k + 1))
        keep = order[:l]
        Skeep = torch.from_numpy(S[:, keep]).to(dev)
        newV = Skeep.T @ V[:size]
        resid_vec = V[size].clone()
        V.zero_()
        V[:l] = newV
        V[l] = resid_vec
        live = blk[size]
        blk = np.concatenate([blk[np.abs(S[:, keep]).argmax(0)], [live],
                              np.full(m - l, live)])
        T = np.zeros((m, m))
        T[np.arange(l), np.arange(l)] = theta[keep]
        restarts += 1
        if bar is not None:
            bar.total = min(bar.n + m - l, bar.n + max_mv - matvecs)
            redraw(bar)
    vectors = None
    if want_vectors:
        vectors = (V[:size].T @ torch.from_numpy(S[:, want]).to(dev)).contiguous()
    return theta[want].copy(), vectors, resid[want].copy(), ok, matvecs, restarts, anorm
