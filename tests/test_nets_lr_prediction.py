"""Learning rates from spectra: predicted vs exact vs measured (nets.learning_rates.lr_prediction,
nets.noise.gradient_noise, nets.learning_rates.least_squares), including the issue's acceptance numbers."""

import numpy as np
import pytest
import torch

import rmt
from nets import predict_max_lr
from nets.noise.gradient_noise import gradient_noise, per_sample_gradients
from nets.learning_rates.least_squares import (digits_feature_regression, lr_study, naive_batch_lr,
                                spiked_regression)
from nets.learning_rates.lr_prediction import fit_scaling_exponent, lr_table
from nets.learning_rates.stability import ms_stability_threshold


# ----------------------------------------------------------------- gradient noise

def _tiny_mlp(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    return model, torch.nn.functional.cross_entropy, (X, y)


def _dense_reference(model, loss_fn, data):
    X, y = data
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    G = []
    for i in range(len(X)):
        model.zero_grad()
        loss_fn(model(X[i:i + 1]), y[i:i + 1]).backward()
        G.append(torch.cat([params[n].grad.reshape(-1) for n in names]).clone())
    G = torch.stack(G).numpy()
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    shapes = [params[n].shape for n in names]

    def full_loss(w):
        out, k = {}, 0
        for n, s in zip(names, shapes):
            m = int(np.prod(s))
            out[n] = w[k:k + m].reshape(s)
            k += m
        return loss_fn(torch.func.functional_call(model, out, (X,)), y)

    H = torch.func.hessian(full_loss)(flat).numpy()
    return G, H


def test_gradient_noise_matches_dense_loops():
    model, loss_fn, data = _tiny_mlp()
    G, H = _dense_reference(model, loss_fn, data)
    N = G.shape[0]
    gbar = G.mean(0)
    C = np.cov(G.T, ddof=1)
    gn = gradient_noise(model, loss_fn, data, chunk_size=7, hessian_samples=None)
    np.testing.assert_allclose(gn.mean, gbar, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(gn.var, np.diag(C), rtol=1e-9, atol=1e-14)
    assert gn.trace_cov == pytest.approx(np.trace(C), rel=1e-10)
    assert gn.mean_sq_norm == pytest.approx(gbar @ gbar, rel=1e-10)
    assert gn.B_simple == pytest.approx(np.trace(C) / (gbar @ gbar), rel=1e-10)
    assert gn.tr_HSigma == pytest.approx(np.trace(H @ C), rel=1e-9)
    assert gn.gHg == pytest.approx(gbar @ H @ gbar, rel=1e-9)
    assert gn.B_noise == pytest.approx(np.trace(H @ C) / (gbar @ H @ gbar), rel=1e-9)
    assert gn.eps_max == pytest.approx((gbar @ gbar) / (gbar @ H @ gbar), rel=1e-9)
    np.testing.assert_allclose(per_sample_gradients(model, loss_fn, data, chunk_size=4).numpy(), G,
                               rtol=1e-10, atol=1e-14)
    # the subsampled tr(HΣ) is the stated estimator on the seeded subset
    sub = gradient_noise(model, loss_fn, data, hessian_samples=10, seed=3)
    idx = np.sort(np.random.default_rng(3).choice(N, 10, replace=False))
    Gc = G[idx] - gbar
    expect = np.einsum("ip,pq,iq->", Gc, H, Gc) / 10 * N / (N - 1)
    assert sub.tr_HSigma == pytest.approx(expect, rel=1e-9)


# ----------------------------------------------------------------- lr_table on least squares

@pytest.fixture(scope="module")
def small_ls():
    p = spiked_regression(120, 12, 5.0, noise_std=0.3, rng=4)
    model, loss_fn, data = p.torch_problem(w=0.5 * p.minimizer())
    bs = [1, 3, 10, 40, 120]
    table = lr_table(model, loss_fn, data, bs, momentum=0.5, beta1=0.9, n_batches=3,
                     iso_probes=None, hessian_samples=None, seed=7)
    return p, model, loss_fn, data, bs, table


def test_lr_table_measured_quantities_are_the_exact_least_squares_values(small_ls):
    p, model, loss_fn, data, bs, t = small_ls
    lam, u = p.top_eigenpair()
    assert t.lam == pytest.approx(lam, rel=1e-9)
    assert t.s2_dir == pytest.approx(p.directional_noise(u), rel=1e-7)
    assert t.s2_iso == pytest.approx(p.isotropic_noise(), rel=1e-9)
    assert t.B_star == pytest.approx(p.critical_batch_size(), rel=1e-7)


def test_lr_table_formulas_are_rmt_lr_with_measured_quantities(small_ls):
    p, model, loss_fn, data, bs, t = small_ls
    N, P = p.N, p.d
    for i, B in enumerate(bs):
        assert t.sgd_directional[i] == pytest.approx(rmt.lr.sgd_max_lr(B, t.lam, t.s2_dir, N), rel=1e-12)
        assert t.sgd_momentum[i] == pytest.approx(rmt.lr.sgd_max_lr(B, t.lam, t.s2_dir, N, momentum=0.5), rel=1e-12)
        assert t.sgd_iso_clipped[i] == pytest.approx(
            rmt.lr.sgd_max_lr_isotropic(B, t.lam, t.s2_iso / P, P, N, clip=True), rel=1e-12)
        assert t.adam_closed[i] == pytest.approx(rmt.lr.adam_max_lr(
            B, t.lam, t.s2_dir, t.grad_mean_sq_u, t.grad_var_u, N, eps=1e-8, beta1=0.9), rel=1e-12)
    # u²-weighted gradient moments from an independent per-sample computation
    _, u = p.top_eigenpair()
    w0 = 0.5 * p.minimizer()
    G = p.X * (p.X @ w0 - p.y)[:, None]
    assert t.grad_mean_sq_u == pytest.approx(u ** 2 @ G.mean(0) ** 2, rel=1e-8)
    assert t.grad_var_u == pytest.approx(u ** 2 @ G.var(0, ddof=1), rel=1e-8)
    pred = predict_max_lr(model, loss_fn, data, bs, momentum=0.5)
    np.testing.assert_allclose(pred, t.sgd_momentum, rtol=1e-8)
    pa = predict_max_lr(model, loss_fn, data, bs, optimizer="adam", momentum=0.9)
    np.testing.assert_allclose(pa, t.adam_closed, rtol=1e-8)


def test_lr_table_batch_measurements_against_dense_batches(small_ls):
    """λ_max(H_B) and λ_max(D^{1/2}H_B D^{1/2}) on the same seeded batches, densely."""
    p, model, loss_fn, data, bs, t = small_ls
    N = p.N
    w0 = 0.5 * p.minimizer()
    G = p.X * (p.X @ w0 - p.y)[:, None]
    g2, var = G.mean(0) ** 2, G.var(0, ddof=1)
    rng = np.random.default_rng(7)
    for i, B in enumerate(bs):
        c = rmt.batch_noise_factor(B, N)
        sd = np.sqrt(1.0 / (np.sqrt(g2 + c * var) + 1e-8))
        tops, atops = [], []
        for _ in range(1 if B == N else 3):
            idx = np.arange(N) if B == N else np.sort(rng.choice(N, B, replace=False))
            HB = p.X[idx].T @ p.X[idx] / B
            tops.append(np.linalg.eigvalsh(HB)[-1])
            atops.append(np.linalg.eigvalsh(sd[:, None] * HB * sd[None, :])[-1])
        assert t.lam_batch_mean[i] == pytest.approx(np.mean(tops), rel=1e-7)
        assert t.adam_lam_mean[i] == pytest.approx(np.mean(atops), rel=1e-7)
        assert t.sgd_measured[i] == pytest.approx(2 * 1.5 / np.mean(tops), rel=1e-7)
        assert t.adam_measured[i] == pytest.approx(38 / np.mean(atops), rel=1e-7)


def test_fit_scaling_exponent():
    bs = np.array([1, 2, 4, 8, 16, 32])
    exact = fit_scaling_exponent(bs, 3.0 * bs ** 0.5)
    assert exact.exponent == pytest.approx(0.5) and exact.stderr < 1e-10
    rng = np.random.default_rng(0)
    noisy = 3.0 * bs[:, None] ** 1.0 * np.exp(0.05 * rng.standard_normal((6, 3)))
    f = fit_scaling_exponent(bs, noisy, max_batch=16)
    assert f.n == 15 and f.dof == 13
    # the 95% t-interval covers the true exponent 95% of the time (binomial z-score)
    reps = 400
    cover = 0
    for _ in range(reps):
        y = 3.0 * bs[:, None] * np.exp(0.05 * rng.standard_normal((6, 3)))
        g = fit_scaling_exponent(bs, y, max_batch=16)
        cover += g.ci_low < 1.0 < g.ci_high
    assert abs(cover / reps - 0.95) / np.sqrt(0.95 * 0.05 / reps) < 4
    from scipy.stats import linregress
    keep = np.repeat(bs, 3) <= 16
    lr = linregress(np.log(np.repeat(bs, 3)[keep]), np.log(noisy.reshape(-1)[keep]))
    assert f.exponent == pytest.approx(lr.slope) and f.stderr == pytest.approx(lr.stderr)
    with pytest.raises(ValueError, match="lrs"):
        fit_scaling_exponent(bs, np.ones(5))


def test_bad_inputs(small_ls):
    p, model, loss_fn, data, bs, t = small_ls
    with pytest.raises(ValueError, match="batch_sizes"):
        lr_table(model, loss_fn, data, [0, 4])
    with pytest.raises(ValueError, match="batch_sizes"):
        lr_table(model, loss_fn, data, [p.N + 1])
    with pytest.raises(ValueError, match="optimizer"):
        predict_max_lr(model, loss_fn, data, [4], optimizer="lion")


# ----------------------------------------------------------------- issue acceptance

@pytest.mark.slow
def test_acceptance_regression_prediction_vs_oracle_vs_measured():
    """Spiked regression with B* ≈ 59: directional prediction within 25% of the exact
    mean-square threshold at every B; small-B exponent (B ≤ B*/10) in [0.8, 1.2] from
    both the oracle and single-run divergence thresholds, which sit within [1, 1.3]× the
    oracle (almost-sure divergence needs a somewhat larger step than mean-square)."""
    p = spiked_regression(1600, 100, 1.5, noise_std=0.5, rng=1)
    bs = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1600]
    r = lr_study(p, bs, seeds=(0,), steps=1000, measure_batches=[1, 2, 4], n_naive=20)
    assert r["B_star"] >= 50
    ratio = r["directional_over_oracle"]
    assert np.all(np.abs(ratio - 1) <= 0.25), ratio
    assert 0.8 <= r["oracle_exponent"].exponent <= 1.2
    assert 0.8 <= r["measured_exponent"].exponent <= 1.2
    m = r["measured_over_oracle"]
    assert np.all((m > 0.98) & (m < 1.3)), m
    # full batch: the oracle is exactly 2/λ_1
    assert r["oracle"][-1] == pytest.approx(2 / r["lam"], rel=1e-9)


def test_acceptance_digits_features_naive_batch_spectrum_is_far_off():
    """Standardized digits (heavy-tailed ‖x_i‖²): at B = 1 with replacement
    2/E[λ_max(H_B)] overestimates the exact mean-square threshold by > 10×
    (REFERENCES.md); we measure ≈ 29×. The directional formula is also ≫ the oracle
    there (≈ 18×); both agree with it at B = N."""
    p = digits_feature_regression(rng=0)
    exact = ms_stability_threshold(p, 1, replacement=True).alpha
    naive = naive_batch_lr(p, [1], n_batches=400, replacement=True, rng=0)[0]
    # at B = 1, λ_max(H_B) = ‖x_i‖², so E[λ_max] = tr H exactly in expectation
    assert 2 / naive == pytest.approx(np.trace(p.hessian()), rel=0.15)
    assert naive / exact > 10
    lam, u = p.top_eigenpair()
    c = rmt.batch_noise_factor(1, p.N, replacement=True) * (p.N - 1) / p.N
    directional = 2 * lam / (lam ** 2 + c * p.directional_noise(u))
    assert directional / exact > 5
    full = ms_stability_threshold(p, p.N).alpha
    assert full == pytest.approx(2 / lam, rel=1e-9)


@pytest.mark.slow
def test_acceptance_adam_exponent_on_noisy_regression():
    """Adam (β = (0.9, 0.999)), loss criterion of nets.learning_rates.lr_search, label noise 0.5: the
    measured threshold grows like B^k with k ≈ 1/2 (we measure ≈ 0.53)."""
    p = spiked_regression(1600, 100, 1.5, noise_std=0.5, rng=1)
    r = lr_study(p, [1, 2, 4, 8, 16, 32], seeds=(0,), steps=500, measure_batches=[],
                 adam_batches=[1, 4, 16, 64], n_naive=2, rel_tol=0.05)
    f = r["adam_exponent"]
    assert 0.35 <= f.exponent <= 0.7, f
