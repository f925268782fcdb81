"""Adam's preconditioned curvature and threshold protocol (nets.learning_rates.adam).

Oracles: dense float64 Hessians from torch.func.hessian (never the package's products),
a hand-rolled second-moment EMA, and closed forms."""


import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from nets.learning_rates import adam as A


def _tiny(seed=0, N=24):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 3, generator=g, dtype=torch.float64)
    y = torch.randn(N, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    return model, X, y


def _mse(out, t):
    return ((out - t) ** 2).sum(-1).mean()


def _dense_hessian(model, X, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(w):
        ps = dict(zip(names, [t.reshape(s) for t, s in zip(torch.split(w, sizes), shapes)]))
        return _mse(functional_call(model, ps, (X,)), y)

    return hessian(f)(w0)


def _warm_optimizer(model, X, y, steps=7, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    """Adam on `model` for `steps` full-batch steps, and v̂ by a hand EMA of g²."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps)
    v = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for t in range(1, steps + 1):
        opt.zero_grad()
        _mse(model(X), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        v = betas[1] * v + (1 - betas[1]) * g ** 2
        opt.step()
    return opt, 1.0 / ((v / (1 - betas[1] ** steps)).sqrt() + eps)


def test_preconditioner_matches_hand_ema_and_fresh_is_one_over_eps():
    model, X, y = _tiny()
    opt, d_ref = _warm_optimizer(model, X, y)
    d = A.adam_preconditioner(model, opt)
    torch.testing.assert_close(d, d_ref, rtol=1e-10, atol=0)
    fresh = torch.optim.Adam(model.parameters(), eps=1e-6)
    assert torch.all(A.adam_preconditioner(model, fresh) == 1e6)
    with pytest.raises(TypeError):
        A.adam_preconditioner(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_preconditioned_operator_matches_dense_oracle():
    model, X, y = _tiny(1)
    opt, d = _warm_optimizer(model, X, y)
    H = _dense_hessian(model, X, y)
    ref = d.sqrt()[:, None] * H * d.sqrt()[None, :]
    op = A.preconditioned_operator(model, _mse, (X, y), opt, dtype=torch.float64)
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))
    idx = np.array([0, 3, 5, 11, 17])
    HB = _dense_hessian(model, X[idx], y[idx])
    refB = d.sqrt()[:, None] * HB * d.sqrt()[None, :]
    opB = A.preconditioned_operator(model, _mse, (X, y), d, indices=idx, dtype=torch.float64)
    torch.testing.assert_close(opB.to_dense(), refB, rtol=1e-9, atol=1e-9 * float(refB.abs().max()))


def test_preconditioned_noise_matches_per_sample_dense_oracle():
    model, X, y = _tiny(2, N=16)
    opt, d = _warm_optimizer(model, X, y)
    s = d.sqrt()
    Ai = torch.stack([s[:, None] * _dense_hessian(model, X[i:i + 1], y[i:i + 1]) * s[None, :]
                      for i in range(len(X))])
    Abar = Ai.mean(0)
    evals, evecs = torch.linalg.eigh(Abar)
    u = evecs[:, -1]
    s2_ref = float(((Ai - Abar) @ u).pow(2).sum() / (len(X) - 1))
    pn = A.preconditioned_noise(model, _mse, (X, y), opt, chunk_size=5)
    assert pn.lam == pytest.approx(float(evals[-1]), rel=1e-8)
    assert pn.s2 == pytest.approx(s2_ref, rel=1e-7)
    # direction = D^{-1/2}ũ: ⟨direction, D^{1/2}ũ⟩ = 1
    assert float(np.dot(pn.direction, (s.numpy() * pn.vector))) == pytest.approx(1.0, rel=1e-10)


def test_prediction_formula_transfer_and_noise_model():
    model, X, y = _tiny(3, N=32)
    gm, gv = np.array([1.0, 0.0]), np.array([4.0, 9.0])
    c = 1 / 4 - 1 / 32
    d = A.noise_model_preconditioner(gm, gv, 4, 32, eps=0.5)
    np.testing.assert_allclose(d.numpy(), 1 / (np.sqrt(gm ** 2 + c * gv) + 0.5))
    Bs = [2, 8, 32]
    pred = A.predict_adam_max_lr(model, _mse, (X, y), Bs, betas=(0.0, 0.999))
    cs = np.array([1 / b - 1 / 32 for b in Bs])
    np.testing.assert_allclose(pred.lr, 2.0 / (pred.lam + cs * pred.s2 / pred.lam), rtol=1e-12)
    assert pred.lr[-1] == pytest.approx(2.0 / pred.lam[-1])        # c(N, N) = 0
    tr = A.adam_transfer_lr(model, _mse, (X, y), Bs, reference=(8, 0.01), prediction=pred)
    assert tr.lr[1] == pytest.approx(0.01) and tr.form == "mean_square"   # the prediction's
    np.testing.assert_allclose(tr.lr / tr.lr[1], pred.lr / pred.lr[1], rtol=1e-12)
    np.testing.assert_allclose(tr.sqrt_rule, 0.01 * np.sqrt(np.array(Bs) / 8))
    assert A.adam_factor(0.9) == pytest.approx(38.0)


def test_mean_square_and_deterministic_forms():
    """β₁ = 0.9: the mean-square form amplifies the noise term by 19, the deterministic one
    does not; at β₁ = 0 they coincide; the transfer follows the form it is asked for."""
    model, X, y = _tiny(3, N=32)
    Bs = [2, 8, 32]
    cs = np.array([1 / b - 1 / 32 for b in Bs])
    ms = A.predict_adam_max_lr(model, _mse, (X, y), Bs, betas=(0.9, 0.999))
    assert ms.form == "mean_square" and ms.noise_gain == pytest.approx(19.0)
    np.testing.assert_allclose(ms.lr, 38.0 / (ms.lam + 19.0 * cs * ms.s2 / ms.lam), rtol=1e-12)
    np.testing.assert_allclose(ms.lr_deterministic, 38.0 / (ms.lam + cs * ms.s2 / ms.lam),
                               rtol=1e-12)
    det = A.predict_adam_max_lr(model, _mse, (X, y), Bs, betas=(0.9, 0.999), form="deterministic")
    np.testing.assert_allclose(det.lr, ms.lr_deterministic, rtol=1e-12)
    assert np.all(ms.lr[:-1] < det.lr[:-1]) and ms.lr[-1] == pytest.approx(det.lr[-1])
    b0 = A.predict_adam_max_lr(model, _mse, (X, y), Bs, betas=(0.0, 0.999))
    np.testing.assert_allclose(b0.lr_mean_square, b0.lr_deterministic, rtol=1e-12)
    for form, curve in (("mean_square", ms.lr), ("deterministic", ms.lr_deterministic)):
        with pytest.warns(UserWarning, match="beta1 = 0.9 the transfer along Adam's stability"):
            tr = A.adam_transfer_lr(model, _mse, (X, y), Bs, reference=(8, 0.01),
                                    prediction=ms, form=form)
        assert tr.form == form and tr.beta1 == 0.9
        np.testing.assert_allclose(tr.lr, 0.01 * curve / curve[1], rtol=1e-12)
    with warnings.catch_warnings():                  # β₁ = 0 (the prediction's): quiet
        warnings.simplefilter("error")
        quiet = A.adam_transfer_lr(model, _mse, (X, y), Bs, reference=(8, 0.01), prediction=b0)
        assert quiet.beta1 == 0.0
        with pytest.warns(UserWarning, match="with_reference: with beta1 = 0.9"):
            tr.with_reference((32, 0.02))
    with pytest.raises(ValueError, match="form"):
        A.predict_adam_max_lr(model, _mse, (X, y), Bs, form="exact")
    with pytest.raises(ValueError, match="form"):
        A.adam_transfer_lr(model, _mse, (X, y), Bs, reference=(8, 0.01), prediction=ms,
                           form="exact")


def _least_squares(N=256, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d, generator=g) * torch.linspace(0.3, 2.0, d)
    w = torch.randn(d, 1, generator=g)
    y = X @ w + 0.5 * torch.randn(N, 1, generator=g)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(X, y).solution.T)
    return model.eval(), X, y


def test_warmed_threshold_brackets_the_preconditioned_prediction():
    """Noisy least squares at its minimum: below the warmed state's prediction F/λ̃' the
    displacement along ũ stays bounded, well above it it grows (onset criterion)."""
    model, X, y = _least_squares()
    lf = nn.functional.mse_loss
    warm = A.warm_adam_state(model, lf, X, y, 16, warmup_steps=300, warmup_lr=1e-5,
                             betas=(0.0, 0.999), seed=1)
    opt = torch.optim.Adam(warm.model.parameters(), betas=(0.0, 0.999))
    opt.load_state_dict(warm.optimizer_state)
    pn = A.preconditioned_noise(warm.model, lf, (X, y), opt)
    alpha = 2.0 / (pn.lam + (1 / 16 - 1 / 256) * pn.s2 / pn.lam)
    lo = A.adam_trial(warm, lf, X, y, 0.4 * alpha, steps=100, direction=pn.direction, seed=2)
    hi = A.adam_trial(warm, lf, X, y, 4.0 * alpha, steps=100, direction=pn.direction, seed=2)
    assert not lo.unstable, lo.reason
    assert hi.unstable, hi.reason


def test_trials_do_not_advance_the_warm_state():
    """Every trial restarts from the same warmed state: the stored optimizer state is
    unchanged by a trial, and a trial repeated after an unstable one gives the same run."""
    model, X, y = _least_squares(seed=2)
    lf = nn.functional.mse_loss
    warm = A.warm_adam_state(model, lf, X, y, 8, warmup_steps=20, warmup_lr=1e-3, seed=0)
    before = {k: v.clone() for k, v in warm.optimizer_state["state"][0].items()}
    first = A.adam_trial(warm, lf, X, y, 1e-3, steps=20, criterion="divergence", seed=1)
    A.adam_trial(warm, lf, X, y, 50.0, steps=20, criterion="divergence", seed=1)
    for k, v in warm.optimizer_state["state"][0].items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    again = A.adam_trial(warm, lf, X, y, 1e-3, steps=20, criterion="divergence", seed=1)
    assert again.max_loss == first.max_loss and again.final_loss == first.final_loss


def test_fresh_first_step_is_a_sign_step_and_is_flagged():
    model, X, y = _least_squares(seed=3)
    lf = nn.functional.mse_loss
    warm = A.warm_adam_state(model, lf, X, y, 8, warmup_steps=0, warmup_lr=1e-3)
    net = warm.model
    w0 = net.weight.detach().clone()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    opt.zero_grad()
    lf(net(X[:8]), y[:8]).backward()
    g = net.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(net.weight.detach() - w0, -0.1 * g / (g.abs() + 1e-8))
    big = A.adam_trial(warm, lf, X, y, 50.0, steps=8, criterion="divergence")
    assert big.unstable and big.first_step_blowup
    small = A.adam_trial(warm, lf, X, y, 1e-4, steps=8, criterion="divergence")
    assert not small.unstable and not small.first_step_blowup


def test_bad_inputs():
    model, X, y = _least_squares()
    lf = nn.functional.mse_loss
    with pytest.raises(ValueError, match="criterion"):
        A.adam_threshold(model, lf, (X, y), [8], criterion="bogus")
    with pytest.raises(ValueError, match="warmed"):
        A.adam_threshold(model, lf, (X, y), [8], warmup_steps=0, criterion="onset")
    with pytest.raises(ValueError, match="batch_sizes"):
        A.adam_threshold(model, lf, (X, y), [10_000])
    with pytest.raises(ValueError, match="beta1"):
        A.adam_factor(1.0)
