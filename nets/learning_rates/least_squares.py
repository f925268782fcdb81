"""Least-squares problems whose per-sample Hessians are exact: H_i = x_i x_iᵀ.

Per-sample loss ℓ_i(w) = ½ (x_iᵀw − y_i)², so H_i = x_i x_iᵀ (rank one, PSD) and the
batch Hessian H_B = (1/B) Σ_{i∈S} x_i x_iᵀ is a (finite-population) Wishart matrix.
This is the one setting where the mean-square stability threshold of mini-batch SGD
(`nets.learning_rates.stability`) is exact: with realizable targets the SGD error e_t = w_t − w*
obeys e_{t+1} = (I − αH_B) e_t; with label noise an additive zero-mean forcing is added,
which leaves the threshold unchanged (docs/theory.md §5, [ext] mean-square stability).

Quantities of docs/theory.md §3 in closed form here:

    H = XᵀX/N,  (H_i − H)u = x_i (x_iᵀu) − Hu,
    s_u² = (1/(N−1)) Σ_i ‖(H_i − H)u‖²                     (directional noise)
    Pσ²  = (1/(P(N−1))) Σ_i ‖H_i − H‖_F²                   (isotropic noise, P = d)
    B*   = s_u²/λ_1²                                        (critical batch size)

For Gaussian inputs x ~ N(0, Σ) and u an eigenvector of Σ with eigenvalue λ,
E‖x xᵀu‖² = λ tr Σ + 2λ², so s_u² ≈ λ tr Σ + λ² and B* ≈ tr Σ/λ + 1. The generator
`spiked_regression` uses Σ = σ_b² I + (ℓ − σ_b²) u uᵀ, so B* ≈ 2 + (d − 1)σ_b²/ℓ;
`spike_for_critical_batch` inverts this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rmt.validation import as_array, as_batch_sizes, as_float, as_int, as_rng

__all__ = [
    "LeastSquaresProblem",
    "spiked_regression",
    "spike_for_critical_batch",
    "digits_feature_regression",
    "half_mse",
    "naive_batch_lr",
]


def half_mse(outputs, targets):
    """Mean-reduced ½(output − target)² (torch): the loss whose per-sample Hessian in
    the weights of a bias-free linear model is exactly x_i x_iᵀ."""
    return 0.5 * ((outputs - targets.reshape(outputs.shape)) ** 2).mean()


@dataclass(frozen=True)
class LeastSquaresProblem:
    """Data (X, y) of a least-squares problem, ℓ_i(w) = ½(x_iᵀw − y_i)².

    Attributes: X (N, d), y (N,), `w_star` the planted weights (None if unknown),
    `noise_std` the label-noise standard deviation used to generate y, `name`, and
    `info`, a dict of generator parameters (spike, bulk variance, direction …).
    """

    X: np.ndarray
    y: np.ndarray
    w_star: np.ndarray | None = None
    noise_std: float = 0.0
    name: str = "least_squares"
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        X = as_array("X", self.X, ndim=2)
        y = as_array("y", self.y, ndim=1)
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"X and y must have the same number of rows, got {X.shape[0]} and {y.shape[0]}")
        if X.shape[0] < 2:
            raise ValueError("X must have at least 2 rows")
        object.__setattr__(self, "X", X)
        object.__setattr__(self, "y", y)

    # --- sizes -----------------------------------------------------------------
    @property
    def N(self) -> int:
        return self.X.shape[0]

    @property
    def d(self) -> int:
        return self.X.shape[1]

    # --- curvature ---------------------------------------------------------------
    def hessian(self) -> np.ndarray:
        """Full-data Hessian H = XᵀX/N (d×d, float64)."""
        return self.X.T @ self.X / self.N

    def per_sample_factors(self) -> np.ndarray:
        """Factors A_i (N, d, 1) with H_i = A_i A_iᵀ, for `nets.learning_rates.stability`."""
        return self.X[:, :, None]

    def top_eigenpair(self) -> tuple[float, np.ndarray]:
        """(λ_1, u): top eigenvalue and unit eigenvector of H (sign: u has a non-negative
        largest-magnitude entry)."""
        vals, vecs = np.linalg.eigh(self.hessian())
        u = vecs[:, -1]
        if u[np.argmax(np.abs(u))] < 0:
            u = -u
        return float(vals[-1]), u

    def directional_noise(self, u=None) -> float:
        """s_u² = (1/(N−1)) Σ_i ‖(H_i − H)u‖² along the unit vector u (default: top
        eigenvector of H)."""
        if u is None:
            u = self.top_eigenpair()[1]
        u = as_array("u", u, ndim=1)
        u = u / np.linalg.norm(u)
        Hu = self.hessian() @ u
        D = self.X * (self.X @ u)[:, None] - Hu[None, :]
        return float(np.sum(D * D) / (self.N - 1))

    def isotropic_noise(self) -> float:
        """Pσ² = (1/(P(N−1))) Σ_i ‖H_i − H‖_F² with P = d (average entry variance × P).

        ‖x xᵀ − H‖_F² = ‖x‖⁴ − 2 xᵀHx + ‖H‖_F², evaluated without forming any H_i."""
        H = self.hessian()
        n2 = np.sum(self.X ** 2, axis=1)
        quad = np.einsum("ij,jk,ik->i", self.X, H, self.X)
        tot = np.sum(n2 ** 2 - 2.0 * quad) + self.N * np.sum(H * H)
        return float(tot / (self.d * (self.N - 1)))

    def critical_batch_size(self) -> float:
        """Directional B* = s_u²/λ_1² at the top eigenpair of H."""
        lam, u = self.top_eigenpair()
        return self.directional_noise(u) / lam ** 2

    # --- solution and loss -------------------------------------------------------
    def minimizer(self) -> np.ndarray:
        """Least-squares minimizer ŵ (minimum-norm if X is rank deficient)."""
        return np.linalg.lstsq(self.X, self.y, rcond=None)[0]

    def loss(self, w) -> float:
        """Full-data loss (1/N) Σ ½(x_iᵀw − y_i)²."""
        w = as_array("w", w, ndim=1)
        r = self.X @ w - self.y
        return float(0.5 * np.mean(r * r))

    # --- torch view ----------------------------------------------------------------
    def torch_problem(self, w=None, dtype=None):
        """(model, loss_fn, (X, y)) for the `nets` tools: a bias-free `nn.Linear(d, 1)`
        whose weight is `w` (default: the minimizer ŵ), the loss `half_mse`, and the
        data as tensors X (N, d), y (N, 1)."""
        import torch

        dtype = torch.float64 if dtype is None else dtype
        w = self.minimizer() if w is None else as_array("w", w, ndim=1)
        if w.shape[0] != self.d:
            raise ValueError(f"w must have length d={self.d}, got {w.shape[0]}")
        model = torch.nn.Linear(self.d, 1, bias=False).to(dtype)
        with torch.no_grad():
            model.weight.copy_(torch.as_tensor(w, dtype=dtype)[None, :])
        X = torch.as_tensor(self.X, dtype=dtype)
        y = torch.as_tensor(self.y, dtype=dtype)[:, None]
        return model, half_mse, (X, y)


def spike_for_critical_batch(B_star, d, bulk_var=1.0) -> float:
    """Spike variance ℓ making the population critical batch size ≈ B_star for
    Σ = σ_b² I + (ℓ − σ_b²) u uᵀ:  B* = (λ tr Σ + λ²)/λ² with λ = ℓ, tr Σ = ℓ + (d−1)σ_b²,
    i.e. B* = 2 + (d−1)σ_b²/ℓ  ⇒  ℓ = (d−1)σ_b²/(B* − 2).  Requires B_star > 2 and a
    resulting ℓ > σ_b² (a genuine spike), i.e. B_star < d + 1."""
    B_star = as_float("B_star", B_star)
    d = as_int("d", d, minimum=2)
    bulk_var = as_float("bulk_var", bulk_var, positive=True)
    if not B_star > 2:
        raise ValueError(f"B_star must be > 2, got {B_star}")
    ell = (d - 1) * bulk_var / (B_star - 2)
    if not ell > bulk_var:
        raise ValueError(f"B_star={B_star} needs d > B_star - 1 for a spike above the bulk (d={d})")
    return ell


def spiked_regression(N, d, spike, bulk_var=1.0, noise_std=0.0, direction="random",
                      rng=None) -> LeastSquaresProblem:
    """Gaussian inputs x ~ N(0, Σ), Σ = σ_b² I + (ℓ − σ_b²) u uᵀ, planted w* ~ N(0, I/d),
    y = x·w* + noise_std·ξ.

    `direction`: "random" (u uniform on the sphere: no coordinate alignment, which matters
    for diagonal preconditioners such as Adam) or "axis" (u = e_1). The population
    critical batch size is ≈ 2 + (d−1)σ_b²/ℓ (see the module docstring); the realised
    value is `problem.critical_batch_size()`.
    """
    N = as_int("N", N, minimum=2)
    d = as_int("d", d, minimum=1)
    spike = as_float("spike", spike, positive=True)
    bulk_var = as_float("bulk_var", bulk_var, positive=True)
    noise_std = as_float("noise_std", noise_std, nonnegative=True)
    if direction not in ("random", "axis"):
        raise ValueError(f"direction must be 'random' or 'axis', got {direction!r}")
    rng = as_rng(rng)
    if direction == "axis":
        u = np.zeros(d)
        u[0] = 1.0
    else:
        u = rng.standard_normal(d)
        u /= np.linalg.norm(u)
    Z = rng.standard_normal((N, d))
    # x = σ_b z + (√ℓ − σ_b)(zᵀu) u  has covariance σ_b² I + (ℓ − σ_b²) u uᵀ
    sb = np.sqrt(bulk_var)
    X = sb * Z + (np.sqrt(spike) - sb) * (Z @ u)[:, None] * u[None, :]
    w_star = rng.standard_normal(d) / np.sqrt(d)
    y = X @ w_star + noise_std * rng.standard_normal(N)
    info = {"spike": spike, "bulk_var": bulk_var, "direction": u,
            "population_B_star": 2.0 + (d - 1) * bulk_var / spike if d > 1 else 2.0}
    return LeastSquaresProblem(X, y, w_star, noise_std, "spiked_regression", info)


def digits_feature_regression(noise_std=0.0, n_samples=None, rng=None) -> LeastSquaresProblem:
    """Least squares on the sklearn digits images with each pixel standardized (zero
    mean, unit variance; constant pixels dropped). Rarely-lit pixels become huge after
    standardization, so per-sample norms ‖x_i‖² are heavy-tailed — the case where
    2/E[λ_max(H_B)] is far from the mean-square threshold at small B (docs/references.md).

    Targets are planted, y = x·w* + noise_std·ξ with w* ~ N(0, I/d), so the problem is
    realizable when noise_std = 0. `n_samples` keeps a random subset (default all 1797).
    """
    from sklearn.datasets import load_digits as _sk_digits

    noise_std = as_float("noise_std", noise_std, nonnegative=True)
    rng = as_rng(rng)
    X = _sk_digits().data.astype(np.float64)
    if n_samples is not None:
        n_samples = as_int("n_samples", n_samples, minimum=2)
        if n_samples > X.shape[0]:
            raise ValueError(f"n_samples must be <= {X.shape[0]}, got {n_samples}")
        X = X[np.sort(rng.choice(X.shape[0], n_samples, replace=False))]
    sd = X.std(axis=0)
    keep = sd > 0
    X = (X[:, keep] - X[:, keep].mean(axis=0)) / sd[keep]
    d = X.shape[1]
    w_star = rng.standard_normal(d) / np.sqrt(d)
    y = X @ w_star + noise_std * rng.standard_normal(X.shape[0])
    return LeastSquaresProblem(X, y, w_star, noise_std, "digits_features",
                               {"kept_pixels": np.flatnonzero(keep)})


# --------------------------------------------------------------------------------------
# predicted vs exact vs measured learning rates on a least-squares problem
# --------------------------------------------------------------------------------------

def naive_batch_lr(problem: LeastSquaresProblem, batch_sizes, n_batches=100, replacement=False,
                   rng=None) -> np.ndarray:
    """2/E_S[λ_max(H_B)] per batch size, averaged over `n_batches` random batches (exact
    dense eigenvalues: λ_max of X_S X_Sᵀ/B or X_SᵀX_S/B, whichever is smaller). The
    "measure the batch spectrum and invert" estimate of the SGD stability limit."""
    rng = as_rng(rng)
    out = []
    for b in as_batch_sizes(batch_sizes, problem.N, replacement):
        b = int(b)
        reps = 1 if (b == problem.N and not replacement) else n_batches
        tops = []
        for _ in range(reps):
            idx = rng.choice(problem.N, b, replace=replacement)
            XS = problem.X[idx]
            M = XS @ XS.T if b < problem.d else XS.T @ XS
            tops.append(np.linalg.eigvalsh(M / b)[-1])
        out.append(2.0 / np.mean(tops))
    return np.array(out)
