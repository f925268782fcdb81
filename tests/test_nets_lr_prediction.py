"""Learning rates from spectra: predicted vs exact vs measured (nets.learning_rates.lr_prediction,
nets.noise.gradient_noise, nets.learning_rates.least_squares), including the issue's acceptance numbers."""

import importlib

import numpy as np
import pytest
import torch

import rmt
from nets import predict_max_lr
from nets.curvature.loss_check import check_mean_reduced
from nets.learning_rates.least_squares import digits_feature_regression, naive_batch_lr, spiked_regression
from nets.learning_rates.lr_prediction import LRTable, fit_scaling_exponent, lr_table, optimizer_settings
from nets.learning_rates.stability import ms_stability_threshold
from nets.noise.gradient_noise import gradient_noise, per_sample_gradients
from paper_checks.experiments.least_squares_study import lr_study

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


def _dense_gradients(model, loss_fn, data):
    """Per-sample gradients (N, P) by one backward pass per sample."""
    X, y = data
    G = []
    for i in range(len(X)):
        model.zero_grad()
        loss_fn(model(X[i:i + 1]), y[i:i + 1]).backward()
        G.append(torch.cat([p.grad.reshape(-1) for _, p in model.named_parameters()]).clone())
    return torch.stack(G).numpy()


def test_gradient_noise_matches_dense_loops(dense_hessian):
    model, loss_fn, data = _tiny_mlp()
    G = _dense_gradients(model, loss_fn, data)
    H = dense_hessian(model, loss_fn, *data).numpy()
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
    assert gn.tr_HSigma_stderr == 0.0
    # the sampled tr(HΣ) is the stated importance-sampling estimator on the seeded draws
    q = np.einsum("ip,pq,iq->i", G - gbar, H, G - gbar)
    sq = (G * G).sum(1)
    p = 0.9 * sq / sq.sum() + 0.1 / N
    sub = gradient_noise(model, loss_fn, data, hessian_samples=10, seed=3)
    idx = np.sort(np.random.default_rng(3).choice(N, 10, replace=True, p=p / p.sum()))
    terms = q[idx] / (N * p[idx]) * N / (N - 1)
    assert sub.tr_HSigma == pytest.approx(terms.mean(), rel=1e-9)
    assert sub.tr_HSigma_stderr == pytest.approx(terms.std(ddof=1) / np.sqrt(10), rel=1e-9)
    assert sub.B_noise_stderr == pytest.approx(sub.tr_HSigma_stderr / sub.gHg, rel=1e-12)
    # unbiased, and its standard error honest: over 40 seeds (z-score of the mean)
    draws = [gradient_noise(model, loss_fn, data, hessian_samples=6, seed=s) for s in range(40)]
    est = np.array([d.tr_HSigma for d in draws])
    z = (est.mean() - np.trace(H @ C)) / (est.std(ddof=1) / np.sqrt(len(est)))
    assert abs(z) < 4
    # the exact variance of one draw: T = q_J/(N p_J)·N/(N−1) with J ~ p (with replacement),
    # Var T = Σ p_j T_j² − (Σ p_j T_j)²; stderr² (ddof 1 over n = 6 draws) is unbiased for
    # Var T / n. z-scores of mean(stderr²) over the 40 seeds (stderr ×1.5 gives ratio 2.25)
    # and of the seeds' own spread against it
    Tj = q / (N * p) * N / (N - 1)
    var1 = float(p @ Tj ** 2 - (p @ Tj) ** 2) / 6
    assert p @ Tj == pytest.approx(np.trace(H @ C), rel=1e-9)           # unbiased exactly
    se2 = np.array([d.tr_HSigma_stderr for d in draws]) ** 2
    zse = (se2.mean() - var1) / (se2.std(ddof=1) / np.sqrt(len(se2)))
    assert abs(zse) < 3.5 and abs(se2.mean() / var1 - 1) < 0.4, (se2.mean() / var1, zse)
    dev2 = (est - np.trace(H @ C)) ** 2
    zv = (dev2.mean() - var1) / (dev2.std(ddof=1) / np.sqrt(len(dev2)))
    assert abs(zv) < 3.5, (dev2.mean() / var1, zv)


# ----------------------------------------------------------------- lr_table on least squares

@pytest.fixture(scope="module")
def small_ls():
    p = spiked_regression(120, 12, 5.0, noise_std=0.3, rng=4)
    model, loss_fn, data = p.torch_problem(w=0.5 * p.minimizer())
    bs = [1, 3, 10, 40, 120]
    # SGD with heavy-ball ρ = 0.5; the Adam columns take torch's Adam defaults (β₁ = 0.9)
    table = lr_table(model, loss_fn, data, bs, optimizer="sgd", momentum=0.5, n_batches=3,
                     num_probes=None, hessian_samples=None, seed=7)
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
        assert t.sgd_momentum[i] == pytest.approx(
            rmt.lr.sgd_momentum_ms_max_lr(B, t.lam, t.s2_dir, N, momentum=0.5), rel=1e-12)
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
    pa = predict_max_lr(model, loss_fn, data, bs, optimizer="adam")     # β₁ = 0.9 by default
    from nets.learning_rates.adam import predict_adam_max_lr
    ref = predict_adam_max_lr(model, loss_fn, data, bs, betas=(0.9, 0.999), eps=1e-8)
    np.testing.assert_allclose(pa, ref.lr_mean_square, rtol=1e-8)


def test_lr_table_batch_measurements_against_dense_batches(small_ls):
    """λ_max(H_B) and λ_max(D^{1/2}H_B D^{1/2}) on the batches the table reports, densely."""
    p, model, loss_fn, data, bs, t = small_ls
    N = p.N
    w0 = 0.5 * p.minimizer()
    G = p.X * (p.X @ w0 - p.y)[:, None]
    g2, var = G.mean(0) ** 2, G.var(0, ddof=1)
    assert len(t.batch_indices) == len(bs)
    for i, B in enumerate(bs):
        c = rmt.batch_noise_factor(B, N)
        sd = np.sqrt(1.0 / (np.sqrt(g2 + c * var) + 1e-8))
        tops, atops = [], []
        assert t.batch_indices[i].shape == (3, B)
        for idx in t.batch_indices[i]:
            assert len(set(idx.tolist())) == B            # without replacement
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


def test_lr_table_reuses_measure_batch_top_eigenvalue(small_ls):
    """Same seed ⇒ the table's λ'(B) values are measure_batch_top_eigenvalue's, exactly."""
    from nets import measure_batch_top_eigenvalue
    p, model, loss_fn, data, bs, t = small_ls
    r = measure_batch_top_eigenvalue(model, loss_fn, data, bs, n_batches=3, seed=7)
    np.testing.assert_array_equal(t.lam_batch_mean, np.asarray(r["mean"]))
    np.testing.assert_array_equal(t.lam_batch_std, np.asarray(r["std"]))
    for a, b in zip(t.batch_indices, r["indices"]):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------- API: options, optimizers, data

def test_options_are_keyword_only(small_ls):
    p, model, loss_fn, data, bs, t = small_ls
    with pytest.raises(TypeError):
        lr_table(model, loss_fn, data, bs, "sgd")
    with pytest.raises(TypeError):
        predict_max_lr(model, loss_fn, data, bs, "adam")
    with pytest.raises(TypeError):
        optimizer_settings("sgd", 0.9)


def test_optimizer_settings_from_names_classes_and_instances():
    w = [torch.nn.Parameter(torch.zeros(3))]
    sgd = optimizer_settings(torch.optim.SGD(w, lr=0.1, momentum=0.9))
    assert sgd == optimizer_settings("sgd", momentum=0.9) == optimizer_settings(torch.optim.SGD, momentum=0.9)
    assert (sgd.name, sgd.momentum, sgd.nesterov) == ("sgd", 0.9, False)
    assert sgd.sgd_factor == pytest.approx(2 * 1.9)
    assert optimizer_settings("sgd").momentum == 0.0
    # Adam: β₁, β₂, ε read from the class defaults or the instance's first param group
    cls = optimizer_settings(torch.optim.Adam)
    assert (cls.name, cls.beta1, cls.beta2, cls.eps, cls.momentum) == ("adam", 0.9, 0.999, 1e-8, 0.0)
    inst = optimizer_settings(torch.optim.Adam(w, lr=1e-3, betas=(0.8, 0.99), eps=1e-6))
    assert (inst.beta1, inst.beta2, inst.eps) == (0.8, 0.99, 1e-6)
    assert inst.adam_factor == pytest.approx(2 * 1.8 / 0.2)
    assert optimizer_settings("adam", betas=(0.5, 0.9)).beta1 == 0.5
    assert optimizer_settings(torch.optim.AdamW(w)).name == "adam"
    for s in (sgd, inst, optimizer_settings("sgd", momentum=0.9), optimizer_settings(
            torch.optim.SGD(w, lr=0.1, momentum=0.8, nesterov=True))):
        assert optimizer_settings(s) == s                  # settings pass through unchanged
    rms = optimizer_settings("rmsprop")
    assert (rms.name, rms.beta1, rms.beta2) == ("rmsprop", 0.0, 0.99)
    # one argument, one meaning: momentum is SGD's ρ only
    with pytest.raises(ValueError, match="momentum"):
        optimizer_settings("adam", momentum=0.9)
    with pytest.raises(ValueError, match="momentum"):
        optimizer_settings(torch.optim.Adam(w), momentum=0.9)
    with pytest.raises(ValueError, match="betas"):
        optimizer_settings("sgd", betas=(0.9, 0.999))
    with pytest.raises(ValueError, match="eps"):
        optimizer_settings("sgd", eps=1e-8)
    with pytest.raises(ValueError, match="momentum"):      # an instance fixes its own ρ
        optimizer_settings(torch.optim.SGD(w, lr=0.1, momentum=0.9), momentum=0.5)
    with pytest.raises(ValueError, match="momentum"):
        optimizer_settings("sgd", momentum=1.0)
    with pytest.raises(ValueError, match="momentum"):
        optimizer_settings(torch.optim.RMSprop(w, momentum=0.5))
    with pytest.raises(ValueError, match="optimizer"):
        optimizer_settings("lion")
    with pytest.raises(ValueError, match="optimizer"):
        optimizer_settings(torch.optim.Adagrad)
    with pytest.raises(TypeError, match="optimizer"):
        optimizer_settings(0.1)


@pytest.mark.parametrize("kw", [dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                dict(momentum=0.5, dampening=0.5), dict()])
def test_sgd_factor_is_the_torch_sgd_stability_threshold(kw):
    """Oracle: torch.optim.SGD itself on f(x) = λx²/2 converges just below α = F/λ and
    diverges just above it (heavy ball, dampening, Nesterov)."""
    lam = 3.0
    w = [torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))]
    F = optimizer_settings(torch.optim.SGD(w, lr=1.0, **kw)).sgd_factor

    def final(alpha):
        x = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        opt = torch.optim.SGD([x], lr=alpha, **kw)
        for _ in range(4000):
            opt.zero_grad()
            (0.5 * lam * x ** 2).sum().backward()
            opt.step()
            if abs(float(x.detach())) > 1e6:
                return float("inf")
        return abs(float(x.detach()))

    assert final(0.98 * F / lam) < 1e-3
    assert final(1.02 * F / lam) > 1e3


def test_predict_max_lr_reads_the_optimizer(small_ls):
    p, model, loss_fn, data, bs, t = small_ls
    w = [torch.nn.Parameter(torch.zeros(2))]
    by_name = predict_max_lr(model, loss_fn, data, bs, optimizer="sgd", momentum=0.9)
    by_inst = predict_max_lr(model, loss_fn, data, bs, optimizer=torch.optim.SGD(w, lr=0.1, momentum=0.9))
    np.testing.assert_allclose(by_inst, by_name, rtol=1e-12)
    # heavy ball 0.9: 3.8/(λ + 19·c·s²/λ) — below the deterministic 1.9× plain SGD
    c = np.array([1 / b - 1 / p.N for b in bs])
    np.testing.assert_allclose(by_name, 3.8 / (t.lam + 19 * c * t.s2_dir / t.lam), rtol=1e-8)
    assert np.all(by_name <= t.sgd_directional * 1.9 * (1 + 1e-12))
    damp = predict_max_lr(model, loss_fn, data, bs,
                          optimizer=torch.optim.SGD(w, lr=0.1, momentum=0.9, dampening=0.5))
    np.testing.assert_allclose(damp, 2 * by_name, rtol=1e-10)      # step α(1−τ)
    nest = predict_max_lr(model, loss_fn, data, bs,
                          optimizer=torch.optim.SGD(w, lr=0.1, momentum=0.9, nesterov=True))
    # Nesterov: its mean-square limit, below the deterministic 2(1+ρ)/((1+2ρ)λ) and, once the
    # noise dominates, the same 2(1−ρ)λ/(c·s²) as heavy ball
    np.testing.assert_allclose(nest, rmt.lr.sgd_nesterov_ms_max_lr(bs, t.lam, t.s2_dir, p.N, 0.9),
                               rtol=1e-8)
    assert np.all(nest <= 1.9 / 2.8 * 2 / t.lam * (1 + 1e-12))
    by_name_a = predict_max_lr(model, loss_fn, data, bs, optimizer="adam")
    adam = predict_max_lr(model, loss_fn, data, bs, optimizer=torch.optim.Adam(w, betas=(0.9, 0.999)))
    np.testing.assert_allclose(adam, by_name_a, rtol=1e-12)        # β₁ = 0.9, ε = 1e-8
    rms = predict_max_lr(model, loss_fn, data, bs, optimizer=torch.optim.RMSprop(w))
    assert np.all(np.isfinite(rms)) and np.all(rms > 0)
    with pytest.raises(ValueError, match="momentum"):
        predict_max_lr(model, loss_fn, data, bs, optimizer="adam", momentum=0.9)


def _close_tables(a, b, rtol):
    for k in a.keys():
        va, vb = a[k], b[k]
        if k == "batch_indices":
            for x, y in zip(va, vb):
                np.testing.assert_array_equal(x, y)
        elif isinstance(va, np.ndarray) or isinstance(va, float):
            np.testing.assert_allclose(va, vb, rtol=rtol, err_msg=k)
        else:
            assert va == vb, k


def test_data_forms_give_the_same_table():
    from torch.utils.data import DataLoader, TensorDataset
    p = spiked_regression(40, 6, 5.0, noise_std=0.3, rng=2)
    model, loss_fn, (X, y) = p.torch_problem(w=0.5 * p.minimizer())
    kw = dict(n_batches=2, num_probes=2, hessian_samples=None, seed=3)
    ref = lr_table(model, loss_fn, (X, y), [2, 10, 40], **kw)
    assert np.all(np.isfinite(ref.sgd_measured)) and np.all(np.isfinite(ref.greedy_optimal))
    ds = TensorDataset(X, y)
    _close_tables(lr_table(model, loss_fn, ds, [2, 10, 40], **kw), ref, 1e-6)
    _close_tables(lr_table(model, loss_fn, DataLoader(ds, batch_size=7, shuffle=False),
                           [2, 10, 40], **kw), ref, 1e-6)
    with pytest.raises(ValueError, match="shuffl"):
        lr_table(model, loss_fn, DataLoader(ds, batch_size=7, shuffle=True), [2], **kw)


def test_lr_table_result_json_repr_and_plot(small_ls):
    import json

    import matplotlib
    matplotlib.use("Agg")
    p, model, loss_fn, data, bs, t = small_ls
    assert t["lam"] == t.lam and "sgd_measured" in t
    text = json.dumps(t.to_dict(), allow_nan=False)
    back = LRTable.from_dict(json.loads(text))
    _close_tables(back, t, 0)
    older = json.loads(text)                       # saved before B_noise_stderr existed
    del older["B_noise_stderr"]
    assert np.isnan(LRTable.from_dict(older).B_noise_stderr)
    # NaN columns (measure=False) survive the round trip as "nan"
    u = lr_table(model, loss_fn, data, bs, measure=False, mccandlish=False, num_probes=1)
    d = json.loads(json.dumps(u.to_dict(), allow_nan=False))
    assert d["sgd_measured"][0] == "nan" and d["batch_indices"] == []
    v = LRTable.from_dict(d)
    assert np.all(np.isnan(v.sgd_measured)) and np.isnan(v.B_noise)
    np.testing.assert_array_equal(v.sgd_directional, u.sgd_directional)
    assert len(repr(t).splitlines()) <= 9
    import matplotlib.pyplot as plt

    fig = plt.figure()                  # plot() draws on the current axes
    try:
        ax = t.plot()
        assert ax is fig.gca()
        assert ax.get_xscale() == ax.get_yscale() == "log"
        assert len(ax.get_lines()) == 7
        np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), t.sgd_directional)
        # batch sizes labelled as plain integers at powers of two, minor ticks unlabelled
        # (the base-10 axis printed 2×10¹, 3×10¹, ... over each other; an outside trial)
        fig.canvas.draw()
        lo, hi = ax.get_xlim()
        major = [x.get_text() for x, at in zip(ax.get_xticklabels(), ax.get_xticks())
                 if lo <= at <= hi]
        assert major and all(lab.isdigit() and int(lab) & (int(lab) - 1) == 0 for lab in major)
        assert not any(x.get_text() for x in ax.get_xticklabels(minor=True))
    finally:
        plt.close(fig)


def test_predict_max_lr_measures_only_what_its_limit_reads(small_ls, monkeypatch):
    """predict_max_lr ran the whole table pass — isotropic probes and a per-sample
    gradient pass in chunks of 256 × P (4.4 GiB and 20× the time on a 670k-parameter MLP)
    — of which its limit reads λ₁ and s_u² only. The oracle: lr_table's sgd_momentum
    column with the same seed, to the last bit; num_probes, unused, is warned about."""
    import nets.learning_rates.lr_prediction as lp
    p, model, loss_fn, data, bs, t = small_ls

    def forbidden(*a, **kw):
        raise AssertionError("not needed by the SGD limit")

    monkeypatch.setattr(lp, "gradient_noise", forbidden)
    monkeypatch.setattr(lp, "_isotropic_s2", forbidden)
    pred = predict_max_lr(model, loss_fn, data, bs, momentum=0.5, seed=7)
    np.testing.assert_array_equal(pred, t.sgd_momentum)
    with pytest.warns(UserWarning, match="num_probes is not used"):
        again = predict_max_lr(model, loss_fn, data, bs, momentum=0.5, seed=7, num_probes=3)
    np.testing.assert_array_equal(again, pred)


def _spy_gradient_chunks(monkeypatch) -> list:
    """The chunk sizes gradient_noise's per-sample pass takes, appended as it runs."""
    gnm = importlib.import_module("nets.noise.gradient_noise")   # the package attribute is the function
    seen, real = [], gnm._chunk

    def spy(*a, **kw):
        seen.append(real(*a, **kw))
        return seen[-1]

    monkeypatch.setattr(gnm, "_chunk", spy)
    return seen


def test_lr_table_sizes_its_gradient_pass_to_the_memory_budget(small_ls, monkeypatch):
    """The gradient-statistics pass ran in chunks of 256 samples whatever P (a 1.9M-
    parameter MLP passed 6 GiB): now at most 256, fewer when the budget says so; a given
    chunk_size is passed on."""
    p, model, loss_fn, data, bs, t = small_ls
    seen = _spy_gradient_chunks(monkeypatch)
    kw = dict(measure=False, num_probes=None, hessian_samples=None, seed=7)
    lr_table(model, loss_fn, data, bs, **kw)
    lr_table(model, loss_fn, data, bs, chunk_size=7, **kw)
    from nets.utils.memory import product_bytes
    per_sample = product_bytes(t.P, 1, 1, 12, 8)           # float64, 12 features
    import nets.utils.memory as memory
    monkeypatch.setattr(memory, "memory_budget", lambda memory, device: 3 * per_sample + 1)
    small = lr_table(model, loss_fn, data, bs, **kw)
    assert seen == [120, 7, 3]                 # N = 120 ≤ 256; given; a 3-sample budget
    assert small.B_simple == pytest.approx(t.B_simple, rel=1e-9)


def test_gradient_noise_default_chunk_is_not_the_cache_sized_product_chunk(small_ls,
                                                                           monkeypatch):
    """Called directly, gradient_noise sized its per-sample pass (and the Hessian products
    on the gradients) by the operators' CPU cache cap, a few samples per call at P ~ 10⁵–
    10⁶ (3.3× slower at 543k parameters than lr_table's chunks): with the default budget
    it now takes lr_table's `capped_sample_chunk`; an explicit `memory` still sizes it."""
    import nets.utils.memory as memory
    from nets.utils.memory import product_bytes
    p, model, loss_fn, data, bs, t = small_ls
    per_sample = product_bytes(t.P, 1, 1, 12, 8)
    monkeypatch.setattr(memory, "CPU_PRODUCT_BYTES", 3 * per_sample + 1)
    seen = _spy_gradient_chunks(monkeypatch)
    a = gradient_noise(model, loss_fn, data, hessian_samples=None, progress=False)
    b = gradient_noise(model, loss_fn, data, hessian_samples=None, progress=False,
                       memory=3 * per_sample + 1)
    assert seen == [120, 3]
    assert a.B_noise == pytest.approx(b.B_noise, rel=1e-9)
    assert a.B_simple == pytest.approx(t.B_simple, rel=1e-9)


def test_progress_is_forwarded_to_every_inner_call(small_ls, monkeypatch):
    import nets.learning_rates.lr_prediction as lp
    p, model, loss_fn, data, bs, t = small_ls
    seen = {}

    def spy(name, fn):
        def wrapped(*a, **kw):
            seen.setdefault(name, []).append(kw.get("progress", "missing"))
            return fn(*a, **kw)
        monkeypatch.setattr(lp, name, wrapped)

    for name in ("eigsh", "directional_noise_from_operator", "isotropic_noise_from_operator",
                 "gradient_noise", "measure_batch_top_eigenvalue", "progress_bar"):
        spy(name, getattr(lp, name))
    lp.lr_table(model, loss_fn, data, [3, 10], n_batches=2, progress=False)
    for name in ("directional_noise_from_operator", "isotropic_noise_from_operator",
                 "gradient_noise", "measure_batch_top_eigenvalue", "progress_bar"):
        assert seen[name] == [False] * len(seen[name]), name
    assert seen["eigsh"][0] is False          # the full-data solve (batch solves sit under a bar)


# ----------------------------------------------------------------- summed-loss check

def test_check_mean_reduced_warns_on_summed_losses():
    import warnings
    from functools import partial

    import torch.nn.functional as F
    model, _, data = _tiny_mlp()
    with pytest.warns(UserWarning, match="reduction"):
        r = check_mean_reduced(model, partial(F.cross_entropy, reduction="sum"), data)
    assert r == pytest.approx(30)          # all N = 30 samples (default sample=64)
    assert check_mean_reduced(model, partial(F.cross_entropy, reduction="sum"), data,
                              sample=8) == pytest.approx(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_mean_reduced(model, F.cross_entropy, data) == pytest.approx(1)
        smooth = partial(F.cross_entropy, label_smoothing=0.1)
        assert check_mean_reduced(model, smooth, data) == pytest.approx(1)
    # lr_table / predict_max_lr call it
    p = spiked_regression(30, 4, 5.0, noise_std=0.3, rng=0)
    m, _, d = p.torch_problem()
    summed = lambda out, y: 0.5 * ((out - y) ** 2).sum()
    with pytest.warns(UserWarning, match="summed"):
        predict_max_lr(m, summed, d, [4])


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
    (docs/references.md); we measure ≈ 29×. The directional formula is also ≫ the oracle
    there (≈ 18×); both agree with it at B = N."""
    p = digits_feature_regression(rng=0)
    exact = ms_stability_threshold(p, 1, replacement=True).alpha
    naive = naive_batch_lr(p, [1], n_batches=400, replacement=True, rng=0)[0]
    # at B = 1, λ_max(H_B) = ‖x_i‖², so E[λ_max] = tr H exactly in expectation
    assert 2 / naive == pytest.approx(np.trace(p.hessian()), rel=0.15)
    assert naive / exact > 10
    lam, u = p.top_eigenpair()
    c = rmt.batch_noise_factor(1, p.N, replacement=True)     # (1 − 1/N)/B: units of S²
    directional = 2 * lam / (lam ** 2 + c * p.directional_noise(u))
    assert directional / exact > 5
    full = ms_stability_threshold(p, p.N).alpha
    assert full == pytest.approx(2 / lam, rel=1e-9)



def test_naive_batch_lr_is_the_written_out_formula_below_and_above_the_dimension():
    """2/mean_S λ_max(X_SᵀX_S/B) over the seeded batches, written out with numpy's SVD
    (λ_max = σ_max(X_S)²/B, whichever of X_SX_Sᵀ or X_SᵀX_S the code forms), for B < d,
    B = d, d < B < N and B = N (one batch: exactly 2/λ_max(XᵀX/N))."""
    p = spiked_regression(40, 6, 5.0, rng=1)
    Bs = [3, 6, 10, 40]
    got = naive_batch_lr(p, Bs, n_batches=7, rng=2)
    rng = np.random.default_rng(2)
    want = []
    for b in Bs:
        tops = []
        for _ in range(1 if b == p.N else 7):
            idx = rng.choice(p.N, b, replace=False)
            tops.append(np.linalg.svd(p.X[idx], compute_uv=False)[0] ** 2 / b)
        want.append(2 / np.mean(tops))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert got[-1] == pytest.approx(2 / np.linalg.eigvalsh(p.X.T @ p.X / p.N)[-1], rel=1e-10)


@pytest.mark.parametrize("n_samples", [None, 300])
def test_digits_features_are_standardised_pixels(n_samples):
    """Each kept pixel is centred and scaled to unit variance over the samples used
    (population std), constant pixels dropped; targets y = X w* (noise_std 0)."""
    from sklearn.datasets import load_digits
    p = digits_feature_regression(n_samples=n_samples, rng=0)
    raw = load_digits().data.astype(np.float64)
    if n_samples is not None:
        raw = raw[np.sort(np.random.default_rng(0).choice(raw.shape[0], n_samples, replace=False))]
    keep = raw.std(axis=0) > 0
    want = (raw[:, keep] - raw[:, keep].mean(axis=0)) / raw[:, keep].std(axis=0)
    np.testing.assert_array_equal(p.info["kept_pixels"], np.flatnonzero(keep))
    np.testing.assert_allclose(p.X, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(p.X.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(p.X.std(axis=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(p.y, p.X @ p.w_star, rtol=1e-12, atol=1e-12)

@pytest.mark.slow
def test_acceptance_adam_exponent_on_noisy_regression():
    """Adam (β = (0.9, 0.999)), loss criterion of nets.learning_rates.lr_search, label noise 0.5: the
    measured threshold grows like B^k with k ≈ 1/2 (we measure ≈ 0.53)."""
    p = spiked_regression(1600, 100, 1.5, noise_std=0.5, rng=1)
    r = lr_study(p, [1, 2, 4, 8, 16, 32], seeds=(0,), steps=500, measure_batches=[],
                 adam_batches=[1, 4, 16, 64], n_naive=2, rel_tol=0.05)
    f = r["adam_exponent"]
    assert 0.35 <= f.exponent <= 0.7, f


def test_lr_table_plot_labels_the_fixed_batch_column_apart_from_the_momentum_limit(small_ls):
    # sgd_measured is F/E λ_max(H_B) with F = 2(1+ρ)/(1−τ): no (1+ρ)/(1−ρ) gain on the batch
    # noise, unlike sgd_momentum; it was drawn as "SGD, from measured batch curvature" next to
    # "SGD with momentum"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    p, model, loss_fn, data, bs, t = small_ls
    np.testing.assert_allclose(t.sgd_measured, 2 * 1.5 / t.lam_batch_mean, rtol=1e-12)  # ρ = .5
    fig = plt.figure()
    try:
        labels = {ln.get_label(): ln for ln in t.plot().get_lines()}
    finally:
        plt.close(fig)
    fixed = [k for k in labels if "fixed-batch" in k]
    assert len(fixed) == 1 and "no momentum noise gain" in fixed[0]
    assert not fixed[0].startswith("SGD")
    np.testing.assert_array_equal(labels[fixed[0]].get_ydata(), t.sgd_measured)
    momentum = [k for k in labels if "momentum" in k and k not in fixed]
    assert momentum == ["SGD with momentum (mean-square limit)"]
    np.testing.assert_array_equal(labels[momentum[0]].get_ydata(), t.sgd_momentum)
    assert "fixed-batch limit" in LRTable.__doc__


def test_fit_scaling_exponent_refuses_bad_batch_sizes_and_levels():
    # B = 0 printed LAPACK messages and raised LinAlgError; level = 2 gave a NaN interval
    lrs = [0.1, 0.2, 0.3]
    for bs in ([0, 2, 4], [-1, 2, 4]):
        with pytest.raises(ValueError, match="batch_sizes must be > 0"):
            fit_scaling_exponent(bs, lrs)
    for level in (2.0, 1.0, 0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="level"):
            fit_scaling_exponent([1, 2, 4], lrs, level=level)
    f = fit_scaling_exponent([1, 2, 4, 8], [0.1, 0.2, 0.4, 0.7], level=0.5)
    assert f.ci_low < f.exponent < f.ci_high and f.level == 0.5


def test_progress_reaches_the_per_sample_passes(monkeypatch, tiny_mlp):
    """Found at scale by an outside sweep: Adam's prediction ran its gradient pass and
    its preconditioned per-sample products without a bar (minutes at P = 1M, silent with
    progress=True), and the resolved and subspace forms drew one only for their Lanczos
    run. Every inner pass receives the caller's progress now."""
    import importlib

    import torch.nn.functional as F

    import nets
    import nets.learning_rates.adam as adam
    gnm = importlib.import_module("nets.noise.gradient_noise")   # (nets.noise's function
                                                                 # shadows the module name)
    import nets.noise.resolved_noise as rn
    import nets.noise.subspace_noise as sn

    seen = {}

    def spy(module, name):
        fn = getattr(module, name)

        def wrapped(*a, **kw):
            seen.setdefault(name, []).append(kw.get("progress", "missing"))
            return fn(*a, **kw)
        monkeypatch.setattr(module, name, wrapped)

    for module, name in ((gnm, "gradient_noise"), (adam, "preconditioned_noise"),
                         (rn, "subspace_pass"), (rn, "per_sample_top_eigenpairs"),
                         (sn, "subspace_noise_from_operator")):
        spy(module, name)
    model, X, y = tiny_mlp(seed=0, N=40)
    nets.predict_max_lr(model, F.cross_entropy, (X, y), [4, 16], optimizer="adam",
                        progress=False)
    for form in ("resolved", "subspace"):
        nets.predict_batch_top_eigenvalue(model, F.cross_entropy, (X, y), [4, 16], form=form,
                                          progress=False)
    assert set(seen) == {"gradient_noise", "preconditioned_noise", "subspace_pass",
                         "per_sample_top_eigenpairs", "subspace_noise_from_operator"}
    for name, got in seen.items():
        assert got == [False] * len(got), (name, got)
