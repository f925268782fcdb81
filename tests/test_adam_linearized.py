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
                                 prediction=lin)          # form=None: the prediction's own
    assert again.form == "linearized"
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


class _WithUnusedHead(torch.nn.Module):
    """A tanh MLP with a head forward never uses (no gradient, no Adam state)."""

    def __init__(self):
        super().__init__()
        self.f1, self.f2 = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)
        self.aux = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.f2(torch.tanh(self.f1(x)))


def _plain_and_unused(seed=0):
    torch.manual_seed(seed)
    b = _WithUnusedHead().double()
    a = torch.nn.Sequential()
    a.f1, a.f2 = torch.nn.Linear(6, 8).double(), torch.nn.Linear(8, 3).double()
    a.load_state_dict({k: v for k, v in b.state_dict().items() if not k.startswith("aux")})
    a.forward = b.forward.__func__.__get__(a)
    return a, b


def test_flat_adam_state_keeps_each_parameters_state():
    """A parameter without state (never a gradient) gets zero m and v beside the others'
    own state (the whole state was zeroed before); different step counts are refused."""
    from nets.learning_rates.linearized import flat_adam_state

    _, net = _plain_and_unused()
    _, X, y = softmax_regression(seed=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for i in range(5):
        opt.zero_grad()
        F.cross_entropy(net(X[8 * i:8 * i + 8]), y[8 * i:8 * i + 8]).backward()
        opt.step()
    m, v, t = flat_adam_state(opt)
    ref_m, ref_v = [], []
    for p in net.parameters():
        st = opt.state.get(p, {})
        ref_m.append(st["exp_avg"].reshape(-1) if st else torch.zeros(p.numel(), dtype=p.dtype))
        ref_v.append(st["exp_avg_sq"].reshape(-1) if st else torch.zeros(p.numel(), dtype=p.dtype))
    assert t == 5 and sum(1 for p in net.parameters() if p in opt.state) == 4
    torch.testing.assert_close(m, torch.cat(ref_m), rtol=0, atol=0)
    torch.testing.assert_close(v, torch.cat(ref_v), rtol=0, atol=0)
    assert float(v.abs().sum()) > 0
    net.f1.weight.requires_grad_(False)                 # f1.weight falls behind by one step
    opt.zero_grad()
    F.cross_entropy(net(X), y).backward()
    opt.step()
    with pytest.raises(ValueError, match=r"different step counts \[5, 6\]"):
        flat_adam_state(opt)


def test_an_unused_parameter_changes_no_adam_threshold():
    """Its function, curvature and real Adam run are the plain model's, so are its
    linearised and frozen-second-moment thresholds (NaN / a refusal before)."""
    plain, aux = _plain_and_unused(seed=2)
    _, X, y = softmax_regression(seed=2)
    assert torch.equal(plain(X), aux(X))
    kw = dict(betas=(0.9, 0.999), warmup_steps=30, warmup_lr=1e-3, steps=12, seeds=(0,))
    a, b = (linearized_adam_threshold(m, F.cross_entropy, (X, y), [8, 32], n_grid=12,
                                      lr_range=(1e-3, 1e3), correct=False, **kw)
            for m in (plain, aux))
    assert np.all(np.isfinite(a.per_seed))
    np.testing.assert_allclose(b.per_seed, a.per_seed, rtol=1e-9)
    a, b = (adam_threshold(m, F.cross_entropy, (X, y), [8], second_moment="frozen", **kw)
            for m in (plain, aux))
    np.testing.assert_allclose(b.per_seed, a.per_seed, rtol=1e-9)


def test_an_uncorrected_batch_size_is_said(monkeypatch):
    """A secant ratio that is NaN (the linearised profile never reaches factor x its start)
    leaves the correction out at that B with a warning naming it; where it is finite and
    at most 1 the correction is 1 − (1 − r)·q, q = min(1, α_lin·λ̃/F), as before. On this
    untrained net the linearised loss grows ~linearly along the direction and the profile's
    grid ends short of 10× at B = 8 and 32 (6.7× and 8.4×): followed past the grid's end
    (the default) every B gets its ratio and no warning."""
    import nets.learning_rates.along_top as along_top

    g = torch.Generator().manual_seed(0)
    X = torch.randn(48, 6, generator=g, dtype=torch.float64)
    W = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = (X @ W + 0.5 * torch.randn(48, 3, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 3)).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        idx = torch.randperm(48, generator=gen)[:8]
        opt.zero_grad()
        F.cross_entropy(net(X[idx]), y[idx]).backward()
        opt.step()
    kw = dict(warmup_steps=20, steps=10, seeds=(0,), n_grid=8)
    with monkeypatch.context() as mp:
        mp.setattr(along_top, "BEYOND_GRID_DOUBLINGS", 0)      # the grid alone
        with pytest.warns(UserWarning, match=r"secant ratio r is NaN at B = \[8, 32\] \(") as rec:
            res = linearized_adam_threshold(net, F.cross_entropy, (X, y), [8, 16, 32], **kw)
    assert len([w for w in rec if "secant ratio" in str(w.message)]) == 1
    r = res.secant_ratio
    assert np.isnan(r[[0, 2]]).all() and 0 < r[1] < 1
    np.testing.assert_array_equal(res.correction[[0, 2]], 1.0)
    q = min(1.0, res.lr[1] * res.lam_precond[1] / 38.0)
    assert res.corrected[1] == pytest.approx(res.lr[1] * (1 - (1 - r[1]) * q), rel=1e-12)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*secant ratio")
        full = linearized_adam_threshold(net, F.cross_entropy, (X, y), [8, 16, 32], **kw)
    assert np.all((full.secant_ratio > 0) & (full.secant_ratio < 1))
    assert full.secant_ratio[1] == r[1]
    np.testing.assert_array_equal(full.lr, res.lr)


def test_adam_transfer_takes_beta1_from_the_prediction():
    """A linearised prediction made at β₁ = 0: the transfer records β₁ = 0 and gives no
    momentum caveat (β₁ = 0.9, the betas default, and the caveat before); a conflicting
    betas is refused."""
    from nets.learning_rates.adam import adam_transfer_lr

    model, X, y = softmax_regression(seed=4)
    bs = np.array([4, 8, 16])
    lin = np.array([1.0, 1.5, 2.0])
    pred = LinearizedAdamThresholds(bs, lin, 0 * lin, lin[:, None], lin, lin, lin, lin,
                                    np.ones(3), lin, (0.0, 0.999), 1e-8, 10, 1e-2, 20, 3.0, (0,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr = adam_transfer_lr(model, F.cross_entropy, (X, y), [4, 16], reference=(8, 0.3),
                              prediction=pred)
    assert tr.beta1 == 0.0
    np.testing.assert_allclose(tr.lr, 0.3 * lin[[0, 2]] / 1.5)
    with pytest.raises(ValueError, match="disagrees with the prediction's beta1=0.0"):
        adam_transfer_lr(model, F.cross_entropy, (X, y), [4], reference=(8, 0.3),
                         prediction=pred, betas=(0.9, 0.999))
    b9 = dataclasses.replace(pred, betas=(0.9, 0.999))
    with pytest.warns(UserWarning, match="with momentum"):
        assert adam_transfer_lr(model, F.cross_entropy, (X, y), [16], reference=(8, 0.3),
                                prediction=b9).beta1 == 0.9


def test_adam_transfer_linearized_dict_refuses_its_own_arguments(tiny_mlp):
    """betas / eps / seed in the `linearized` options dict raised raw
    "got multiple values for keyword argument" TypeErrors; they are adam_transfer_lr's own
    arguments and are refused by name (so is 'curved', a form)."""
    import torch.nn.functional as F

    from nets.learning_rates.adam import adam_transfer_lr

    model, X, y = tiny_mlp(seed=1, N=24)
    for key, value in (("betas", (0.9, 0.999)), ("eps", 1e-8), ("seed", 0), ("curved", True)):
        with pytest.raises(ValueError, match=key):
            adam_transfer_lr(model, F.cross_entropy, (X, y), [8, 24], reference=(8, 1e-3),
                             form="linearized", linearized={key: value})
