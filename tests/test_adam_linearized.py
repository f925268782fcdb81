"""Adam on the linearised network from the warmed state (nets.learning_rates.adam_linearized).

Oracles: a network linear in its parameters (softmax regression) *is* its linearisation,
so its linearised-Adam thresholds must agree with the real warmed-state bisection
(`adam_threshold`, autograd on the module) to the grid's resolution, and its loss
profile along any direction is the real one (secant ratio 1, correction 1); the
correction's closed form by hand; the Rayleigh quotient of a given direction against a
dense float64 `torch.func.hessian`.
"""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_linearized import softmax_regression

from nets.learning_rates.adam import adam_threshold
from nets.learning_rates.adam_linearized import (
    LinearizedAdamThresholds,
    linearized_adam_threshold,
    share_correction,
)
from nets.learning_rates.along_top import loss_along_top


def test_linear_network_matches_the_real_warmed_bisection():
    model, X, y = softmax_regression(seed=2)
    kw = dict(betas=(0.9, 0.999), warmup_steps=20, warmup_lr=1e-2, steps=30, factor=3.0,
              seeds=(0, 1))
    lin = linearized_adam_threshold(model, F.cross_entropy, (X, y), [4, 16], lr_range=(1e-3, 1e2),
                                    n_grid=40, **kw)
    real = adam_threshold(model, F.cross_entropy, (X, y), [4, 16], criterion="divergence",
                          rel_tol=0.01, lr0=float(lin.lr[0]), **kw)
    assert np.all(np.isfinite(lin.per_seed))
    # the fine grid spans the brackets of both B: its spacing bounds the disagreement
    ratio = lin.per_seed / real.per_seed
    assert np.all(np.abs(np.log(ratio)) <= 0.03), ratio
    # linear in the parameters: real and linearised profiles coincide along ũ
    np.testing.assert_allclose(lin.secant_ratio, 1.0, rtol=1e-6)
    np.testing.assert_allclose(lin.correction, 1.0, rtol=1e-6)
    np.testing.assert_allclose(lin.corrected, lin.lr, rtol=1e-6)
    assert np.all((lin.share > 0) & (lin.share <= 1))
    np.testing.assert_allclose(lin.deterministic, 38.0 / lin.lam_precond)
    d = lin.to_dict()
    assert set(d) >= {"lr", "corrected", "share", "secant_ratio", "per_seed"}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    assert real.plot(ax=ax) is ax and ax.get_lines()            # as TrainingThresholds
    plt.close(fig)
    # the same thresholds with the Jacobians stored instead of J·e through the network
    stored = linearized_adam_threshold(model, F.cross_entropy, (X, y), [4, 16],
                                       lr_range=(1e-3, 1e2), n_grid=40, jacobians="stored",
                                       correct=False, **kw)
    np.testing.assert_allclose(stored.per_seed, lin.per_seed, rtol=1e-12)


def test_share_correction_by_hand():
    q, c = share_correction([0.01, 0.5, 2.0], [10.0, 10.0, 10.0], 0.0, 0.8)
    np.testing.assert_allclose(q, [0.05, 1.0, 1.0])          # F = 2 at β₁ = 0; capped at 1
    np.testing.assert_allclose(c, [1 - 0.2 * 0.05, 0.8, 0.8])
    q, c = share_correction(0.38, 50.0, 0.9, 0.9)                # F = 38: q = 0.5
    assert q == pytest.approx(0.5) and c == pytest.approx(0.95)
    # r > 1 (the real loss flatter than the linearised one): not applied, as for SGD
    q, c = share_correction([0.38, 0.38], [50.0, 50.0], 0.9, [1.1, 1.0])
    np.testing.assert_allclose(q, 0.5)
    np.testing.assert_allclose(c, [1.0, 1.0])


def test_profile_along_a_given_direction(dense_hessian):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    H = dense_hessian(model.double(), F.cross_entropy, X.double(), y)
    model.float()
    v = torch.randn(H.shape[0], generator=g, dtype=torch.float64)
    prof = loss_along_top(model, F.cross_entropy, (X, y), factor=3.0, n=20, direction=3.0 * v)
    u = v / v.norm()
    assert prof.lam == pytest.approx(float(u @ H @ u), rel=1e-6)
    evals, evecs = torch.linalg.eigh(H)
    top = loss_along_top(model, F.cross_entropy, (X, y), factor=3.0, n=20, direction=evecs[:, -1])
    assert top.lam == pytest.approx(float(evals[-1]), rel=1e-6)
    with pytest.raises(ValueError, match="direction"):
        loss_along_top(model, F.cross_entropy, (X, y), direction=torch.zeros(H.shape[0]))
    with pytest.raises(ValueError, match="direction"):
        loss_along_top(model, F.cross_entropy, (X, y), direction=torch.ones(3))


def test_bad_inputs():
    model, X, y = softmax_regression(seed=0)
    data = (X, y)
    with pytest.raises(TypeError, match="model"):
        linearized_adam_threshold(object(), F.cross_entropy, data, [4])
    with pytest.raises(ValueError, match="betas"):
        linearized_adam_threshold(model, F.cross_entropy, data, [4], betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="factor"):
        linearized_adam_threshold(model, F.cross_entropy, data, [4], factor=1.0)
    with pytest.raises(ValueError, match="lr_range"):
        linearized_adam_threshold(model, F.cross_entropy, data, [4], lr_range=(1.0, 0.1))
    with pytest.raises(ValueError, match="warmup_steps"):
        linearized_adam_threshold(model, F.cross_entropy, data, [4], warmup_steps=0)
    with pytest.raises(ValueError, match="max_bytes"):
        linearized_adam_threshold(model, F.cross_entropy, data, [4], jacobians="stored",
                                  max_bytes=10)
    with pytest.raises(ValueError, match="jacobians"):
        linearized_adam_threshold(model, F.cross_entropy, data, [4], jacobians="dense")
    with pytest.raises(ValueError, match="seeds"):
        linearized_adam_threshold(model, F.cross_entropy, data, [4], seeds=())
    assert LinearizedAdamThresholds.__doc__


def test_adam_transfer_along_the_linearised_form():
    from nets.learning_rates.adam import adam_transfer_lr

    model, X, y = softmax_regression(seed=4)
    opts = dict(seeds=(0,), warmup_steps=10, warmup_lr=1e-2, steps=20, factor=3.0,
                lr_range=(1e-3, 1e2), n_grid=8)
    tr = adam_transfer_lr(model, F.cross_entropy, (X, y), [4, 8, 16], reference=(8, 0.2),
                          form="linearized", linearized=opts)
    lin = linearized_adam_threshold(model, F.cross_entropy, (X, y), [4, 8, 16], **opts)
    np.testing.assert_allclose(tr.predicted, lin.corrected)
    np.testing.assert_allclose(tr.lr, 0.2 * lin.corrected / lin.corrected[1])
    assert tr.lr[1] == pytest.approx(0.2) and tr.form == "linearized"
    with pytest.warns(UserWarning, match="with momentum"):    # β₁ = 0.9 and B = 16 > B0
        again = adam_transfer_lr(model, F.cross_entropy, (X, y), [16, 4], reference=(8, 0.2),
                                 form="linearized", prediction=lin)
    np.testing.assert_allclose(again.lr, tr.lr[[2, 0]])
    assert again.beta1 == 0.9
    with pytest.warns(UserWarning, match="with_reference: with momentum"):   # upward again
        up = again.with_reference((4, 0.1))
    np.testing.assert_allclose(up.lr, 0.1 * again.predicted / again.predicted[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.with_reference((16, 0.4))                       # downward only: quiet
    with pytest.raises(ValueError, match="no value"):
        adam_transfer_lr(model, F.cross_entropy, (X, y), [32], reference=(8, 0.2),
                         form="linearized", prediction=lin)
    with pytest.raises(ValueError, match="form"):
        adam_transfer_lr(model, F.cross_entropy, (X, y), [4], reference=(8, 0.2), form="nope")


def test_an_unbracketed_grid_is_said():
    model, X, y = softmax_regression(seed=4)
    with pytest.warns(UserWarning, match="did not bracket the threshold at B = \\[4\\]"):
        res = linearized_adam_threshold(model, F.cross_entropy, (X, y), [4], seeds=(0,),
                                        warmup_steps=10, warmup_lr=1e-2, steps=20, factor=3.0,
                                        lr_range=(1e-7, 1e-6), n_grid=8)
    assert np.isnan(res.lr[0])


def test_curved_adam_model_is_the_linear_one_for_a_linear_network(tiny_mlp):
    """curved=True: no correction (ones, NaN ratio and share), λ̃ still measured; on a model
    linear in its parameters (q = 0) the thresholds are the uncorrected linearised ones,
    on a tanh MLP the second-order term changes them."""
    model, X, y = softmax_regression(seed=3)
    kw = dict(betas=(0.9, 0.999), warmup_steps=10, warmup_lr=1e-2, steps=20, factor=3.0,
              seeds=(0, 1), lr_range=(1e-3, 1e2), n_grid=12)
    flat = linearized_adam_threshold(model, F.cross_entropy, (X, y), [4, 16], correct=False, **kw)
    bent = linearized_adam_threshold(model, F.cross_entropy, (X, y), [4, 16], curved=True, **kw)
    np.testing.assert_allclose(bent.per_seed, flat.per_seed, rtol=1e-9)
    assert bent.curved and not flat.curved
    np.testing.assert_array_equal(bent.correction, 1.0)
    assert np.all(np.isnan(bent.secant_ratio)) and np.all(np.isnan(bent.share))
    assert np.all(bent.lam_precond > 0)
    np.testing.assert_allclose(bent.corrected, bent.lr)
    net, Xm, ym = tiny_mlp(seed=8, N=40)
    a = linearized_adam_threshold(net, F.cross_entropy, (Xm, ym), [8], correct=False, **kw)
    b = linearized_adam_threshold(net, F.cross_entropy, (Xm, ym), [8], curved=True, **kw)
    assert not np.allclose(a.per_seed, b.per_seed, rtol=1e-3)


def test_curved_adam_transfer_is_the_curved_model_anchored(tiny_mlp):
    """form="curved" through `transfer_lr(optimizer=Adam)` and `adam_transfer_lr`: the
    prediction is `linearized_adam_threshold(curved=True)`'s thresholds over the same
    protocol, anchored at (B₀, α₀); a result of the other model is refused."""
    from nets import transfer_lr
    from nets.learning_rates.adam import adam_transfer_lr

    net, X, y = tiny_mlp(seed=8, N=40)
    kw = dict(betas=(0.0, 0.999), warmup_steps=500, warmup_lr=1e-4, steps=20, factor=3.0,
              seeds=(0,))
    bent = linearized_adam_threshold(net, F.cross_entropy, (X, y), [4, 8], curved=True, **kw)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.0, 0.999))
    tr = transfer_lr(net, F.cross_entropy, (X, y), [4, 8], reference=(8, 0.05), optimizer=opt,
                     form="curved", factor=3.0, steps=20, n_seeds=1, progress=False)
    assert tr.form == "curved" and tr.beta1 == 0.0
    np.testing.assert_allclose(tr.predicted, bent.corrected, rtol=1e-9)
    np.testing.assert_allclose(tr.lr, 0.05 * bent.lr / bent.lr[1], rtol=1e-9)
    flat = dataclasses.replace(bent, curved=False)          # as the linearised model's result
    with pytest.raises(ValueError, match="curved=True"):
        adam_transfer_lr(net, F.cross_entropy, (X, y), [4], reference=(8, 0.05), form="curved",
                         prediction=flat)
    with pytest.raises(ValueError, match="curved=False"):
        adam_transfer_lr(net, F.cross_entropy, (X, y), [4], reference=(8, 0.05),
                         form="linearized", prediction=bent)
    with pytest.raises(ValueError, match="form='curved'"):
        adam_transfer_lr(net, F.cross_entropy, (X, y), [4], reference=(8, 0.05),
                         linearized={"curved": True})
