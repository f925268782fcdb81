"""The linearised network's divergence threshold (nets.learning_rates.linearized).

Oracles: a network linear in its parameters (softmax regression) *is* its linearisation,
so the linearised run must reproduce real training (`training_trial`, autograd on the
module) step for step, and `linearized_threshold` must agree with the real bisection
(`training_threshold`); for a quadratic loss on a linear model with the full batch, the
loss never exceeds its start below 2/λ_max and blows up above it (exact), λ_max from a
dense float64 torch.func.hessian; Jacobians against torch.autograd.functional.jacobian.
"""

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dense_oracles import flat_state
from torch import nn

from nets.learning_rates.linearized import (
    LinearizedThresholds,
    first_crossing,
    ggn_top_basis,
    linearized_max_loss,
    linearized_threshold,
    output_jacobians,
    refined_runs,
)
from nets.learning_rates.lr_search import training_threshold, training_trial


def softmax_regression(seed=0, N=48, d=6, K=3):
    """A float64 linear classifier and separable-ish data, trained a little (the
    checkpoint has a moderate loss and a non-zero gradient)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d, dtype=torch.float64, generator=g)
    W = torch.randn(d, K, dtype=torch.float64, generator=g)
    y = (X @ W + 0.5 * torch.randn(N, K, dtype=torch.float64, generator=g)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Linear(d, K).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    return model, X, y


def test_jacobians_match_autograd(tiny_mlp):
    model, X, _ = tiny_mlp(seed=3, N=7)
    J, z = output_jacobians(model, X, chunk_size=3, dtype=torch.float64)
    flat, state = flat_state(model)
    ref = torch.autograd.functional.jacobian(
        lambda w: torch.func.functional_call(model, state(w), (X,)), flat)      # (N, K, P)
    assert J.shape == ref.shape
    assert torch.allclose(J, ref, atol=1e-12)
    assert torch.allclose(z, model(X).detach(), atol=1e-12)


@pytest.mark.parametrize("m", [0.0, 0.9])
def test_linear_network_runs_like_real_training(m):
    model, X, y = softmax_regression()
    J, z0 = output_jacobians(model, X, dtype=torch.float64)
    lrs = [0.3, 3.0, 30.0]
    worst = linearized_max_loss(J, z0, y, F.cross_entropy, 8, m, lrs, 40, 5)
    for lr, w in zip(lrs, worst):
        real = training_trial(model, F.cross_entropy, X, y, lr, 8, steps=40, momentum=m, seed=5,
                              criterion="divergence", factor=1e12)
        assert w == pytest.approx(real.max_loss / real.initial_loss, rel=1e-7)
    assert worst[-1] > 1.5          # the grid reaches the unstable side


def test_linear_network_threshold_matches_real_bisection():
    model, X, y = softmax_regression(seed=1)
    kw = dict(momentum=0.5, factor=3.0, steps=40, seeds=(0, 1))
    lin = linearized_threshold(model, F.cross_entropy, (X, y), [4, 16], n_grid=40,
                               dtype=torch.float64, **kw)
    real = training_threshold(model, F.cross_entropy, (X, y), [4, 16], rel_tol=0.01,
                              lr0=lin.lr[0], **kw)
    spacing = np.exp(np.diff(np.log(lin.grid), axis=1)).max()        # grid resolution
    ratio = lin.per_seed / real.per_seed
    assert np.all(np.isfinite(ratio))
    assert np.all(np.abs(np.log(ratio)) <= np.log(spacing) + np.log(1.01))


def test_quadratic_loss_full_batch_edge_is_two_over_lambda(dense_hessian):
    """Half-MSE on a linear model, B = N, m = 0: each eigen-component of the loss change
    is (g_j²/2λ_j)(r_j^{2t} − 1) with r_j = 1 − αλ_j, ≤ 0 while α ≤ 2/λ_max, and grows
    like (αλ_max − 1)^{2t} above it: the threshold is 2/λ_max to the grid's resolution."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(40, 5, dtype=torch.float64, generator=g)
    Y = torch.randn(40, 2, dtype=torch.float64, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(5, 2).double()

    def loss(out, t):
        return 0.5 * ((out - t) ** 2).sum(1).mean()

    lam = float(torch.linalg.eigvalsh(dense_hessian(model, loss, X, Y))[-1])
    edge = 2.0 / lam
    res = linearized_threshold(model, loss, (X, Y), [40], factor=10.0, steps=300, seeds=(0,),
                               lr_range=(0.5 * edge, 2.0 * edge), n_grid=64, dtype=torch.float64)
    assert res.lr[0] / edge == pytest.approx(1.0, abs=0.025)
    assert np.isnan(res.lam)


def test_at_and_result_contract():
    model, X, y = softmax_regression(seed=2)
    res = linearized_threshold(model, F.cross_entropy, (X, y), [8], factor=10.0,
                               extra_factors=(3.0,), steps=40, seeds=(0, 1), n_grid=24)
    assert isinstance(res, LinearizedThresholds)
    np.testing.assert_allclose(res.at(10.0), res.per_seed)
    three = res.at(3.0)
    assert np.all(np.isfinite(three)) and np.all(three <= res.per_seed)
    assert res.max_loss.shape == (1, 2, 24) and res.grid.shape == (1, 24)
    assert res.lam > 0
    json.dumps(res.to_dict())
    import matplotlib

    matplotlib.use("Agg")
    ax = res.plot()
    assert ax.get_xscale() == "log"


def test_first_crossing_rule():
    grid = np.array([1.0, 2.0, 4.0])
    assert first_crossing(grid, [1.0, 5.0, 9.0], 3.0) == pytest.approx(np.sqrt(2.0))
    assert np.isnan(first_crossing(grid, [1.0, 1.1, 1.2], 3.0))
    assert np.isnan(first_crossing(grid, [4.0, 5.0, 9.0], 3.0))


def test_bad_inputs():
    model, X, y = softmax_regression()
    data = (X, y)
    with pytest.raises(TypeError):
        linearized_threshold("net", F.cross_entropy, data, [8])
    with pytest.raises(TypeError):
        linearized_threshold(model, "ce", data, [8])
    with pytest.raises(ValueError, match="batch_sizes"):
        linearized_threshold(model, F.cross_entropy, data, [len(X) + 1], lr_range=(0.1, 1.0))
    with pytest.raises(ValueError):
        linearized_threshold(model, F.cross_entropy, data, [8], factor=0.0)
    with pytest.raises(ValueError):
        linearized_threshold(model, F.cross_entropy, data, [8], momentum=1.0)
    with pytest.raises(ValueError, match="lr_range"):
        linearized_threshold(model, F.cross_entropy, data, [8], lr_range=(1.0, 0.5))
    with pytest.raises(ValueError, match="seeds"):
        linearized_threshold(model, F.cross_entropy, data, [8], seeds=(), lr_range=(0.1, 1.0))
    with pytest.raises(ValueError, match="GiB"):
        linearized_threshold(model, F.cross_entropy, data, [8], jacobians="stored",
                             max_bytes=1000)
    with pytest.raises(ValueError, match="jacobians"):
        linearized_threshold(model, F.cross_entropy, data, [8], jacobians="dense")
    with pytest.raises(ValueError, match="rank"):
        linearized_threshold(model, F.cross_entropy, data, [8], rank=0, lr_range=(0.1, 1.0))
    # as for the real thresholds: factor and every extra factor > 1 (1.0 gave a number
    # training_threshold refuses, 0.5 all NaN); seeds=None a TypeError naming seeds
    for kw in (dict(factor=1.0), dict(factor=0.5), dict(extra_factors=(0.5,))):
        with pytest.raises(ValueError, match="factor"):
            linearized_threshold(model, F.cross_entropy, data, [8], lr_range=(0.1, 1.0), **kw)
    with pytest.raises(TypeError, match="seeds"):
        linearized_threshold(model, F.cross_entropy, data, [8], seeds=None, lr_range=(0.1, 1.0))
    # the Jacobians' dtype: an integer one raised a log_softmax kernel error mid-run
    with pytest.raises(TypeError, match="dtype must be a floating"):
        linearized_threshold(model, F.cross_entropy, data, [8], dtype=torch.int32,
                             lr_range=(0.1, 1.0))


@pytest.mark.parametrize("warm", [0, 20])
def test_linear_network_adam_runs_like_adam_trial(warm):
    from nets.learning_rates.adam import adam_trial, restored_adam, warm_adam_state
    from nets.learning_rates.linearized import flat_adam_state, linearized_adam_max_loss

    model, X, y = softmax_regression(seed=3)
    ws = warm_adam_state(model, F.cross_entropy, X, y, 8, warmup_steps=warm, warmup_lr=1e-2, seed=4)
    state = flat_adam_state(restored_adam(ws.model, ws, 1e-2))
    assert state[2] == warm
    J, z0 = output_jacobians(ws.model, X, dtype=torch.float64)
    lrs = [0.01, 0.3, 3.0]
    worst = linearized_adam_max_loss(J, z0, y, F.cross_entropy, 8, lrs, 30, 4 + 7919, state=state)
    for lr, w in zip(lrs, worst):
        real = adam_trial(ws, F.cross_entropy, X, y, lr, steps=30, criterion="divergence",
                          factor=1e12, seed=4)
        assert w == pytest.approx(real.max_loss / real.initial_loss, rel=1e-7)
    assert worst[-1] > 1.5


# ------------------------------------------------------------------ subspace form (rank=r)
def _orthonormal(P, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(P, r, dtype=torch.float64, generator=g))[0]


def test_subspace_jacobians_are_the_jacobian_times_the_basis(tiny_mlp, monkeypatch):
    import nets.learning_rates.linearized as lin

    monkeypatch.setattr(lin, "_TANGENT_BLOCK", 16)          # 40 columns: three blocks
    model, X, _ = tiny_mlp(seed=4, N=9)
    flat, state = flat_state(model)
    ref = torch.autograd.functional.jacobian(
        lambda w: torch.func.functional_call(model, state(w), (X,)), flat)      # (N, K, P)
    V = _orthonormal(ref.shape[2], 40, 0)
    JV, z = output_jacobians(model, X, chunk_size=4, dtype=torch.float64, basis=V)
    assert JV.shape == (9, ref.shape[1], 40)
    assert torch.allclose(JV, torch.einsum("nkp,pr->nkr", ref, V), atol=1e-12)
    assert torch.allclose(z, model(X).detach(), atol=1e-12)
    with pytest.raises(ValueError, match="basis"):
        output_jacobians(model, X, basis=V[:-1])


def test_full_rank_dynamics_do_not_depend_on_the_basis():
    """e = Q·a with Q orthogonal (P × P): the same logits, losses and running maxima."""
    model, X, y = softmax_regression(seed=4)
    J, z0 = output_jacobians(model, X, dtype=torch.float64)
    Q = _orthonormal(J.shape[2], J.shape[2], 1)
    lrs = [0.3, 3.0, 30.0]
    for m in (0.0, 0.9):
        a = linearized_max_loss(J, z0, y, F.cross_entropy, 8, m, lrs, 30, 2)
        b = linearized_max_loss(torch.einsum("nkp,pq->nkq", J, Q), z0, y, F.cross_entropy, 8,
                                m, lrs, 30, 2)
        np.testing.assert_allclose(a, b, rtol=1e-9)


def test_ggn_top_basis_against_the_dense_gauss_newton_matrix(tiny_mlp):
    model, X, y = tiny_mlp(seed=5, N=20)
    flat, state = flat_state(model)
    J = torch.autograd.functional.jacobian(
        lambda w: torch.func.functional_call(model, state(w), (X,)), flat)
    p = torch.softmax(model(X).detach(), 1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    G = torch.einsum("nkp,nkl,nlq->pq", J, Lam, J) / len(X)
    ev, EV = torch.linalg.eigh(G)
    V, values = ggn_top_basis(model, F.cross_entropy, (X, y), 3, tol=1e-10)
    np.testing.assert_allclose(values, ev.flip(0)[:3].numpy(), rtol=1e-8)
    overlap = torch.linalg.svdvals(V.T @ EV[:, -3:])          # cosines of principal angles
    assert torch.allclose(overlap, torch.ones(3, dtype=torch.float64), atol=1e-6)


def test_subspace_spanning_every_gradient_is_the_full_model():
    """Softmax regression, K classes, d inputs: every per-sample gradient J_iᵀ(p_i − e_{y_i})
    lies in the (K−1)(d+1)-dimensional range of the Gauss–Newton matrix (the logit
    gradients sum to zero), and e starts at 0, so rank = (K−1)(d+1) < P runs the full
    model exactly; a smaller rank does not."""
    model, X, y = softmax_regression(seed=5)
    d, K = X.shape[1], int(y.max()) + 1
    kw = dict(factor=10.0, steps=40, seeds=(0, 1), lr_range=(0.5, 500.0), n_grid=24,
              dtype=torch.float64)
    full = linearized_threshold(model, F.cross_entropy, (X, y), [8], **kw)
    sub = linearized_threshold(model, F.cross_entropy, (X, y), [8], rank=(K - 1) * (d + 1), **kw)
    low = linearized_threshold(model, F.cross_entropy, (X, y), [8], rank=2, **kw)
    assert full.rank == K * (d + 1) and sub.rank == (K - 1) * (d + 1) and low.rank == 2
    np.testing.assert_allclose(sub.max_loss, full.max_loss, rtol=1e-6)
    assert not np.allclose(low.max_loss, full.max_loss, rtol=1e-3)
    json.dumps(sub.to_dict())


def test_linear_network_runs_like_real_training_with_nesterov():
    model, X, y = softmax_regression()
    J, z0 = output_jacobians(model, X, dtype=torch.float64)
    lrs = [0.3, 3.0, 30.0]
    worst = linearized_max_loss(J, z0, y, F.cross_entropy, 8, 0.9, lrs, 40, 5, nesterov=True)
    for lr, w in zip(lrs, worst):
        real = training_trial(model, F.cross_entropy, X, y, lr, 8, steps=40, momentum=0.9, seed=5,
                              criterion="divergence", factor=1e12, nesterov=True)
        assert w == pytest.approx(real.max_loss / real.initial_loss, rel=1e-7)
    heavy = linearized_max_loss(J, z0, y, F.cross_entropy, 8, 0.9, lrs, 40, 5)
    assert not np.allclose(heavy, worst)
    thr = linearized_threshold(model, F.cross_entropy, (X, y), [8], momentum=0.9, nesterov=True,
                               steps=40, seeds=(0,), n_grid=8, dtype=torch.float64)
    assert thr.nesterov and thr.momentum == 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_column_cross_entropy_fast_path_equals_torchs(dtype):
    from nets.learning_rates.linearized import _columns_cross_entropy, _columns_cross_entropy_grad

    g = torch.Generator().manual_seed(4)
    Z = (30.0 * torch.randn(50, 7, 5, generator=g)).to(dtype)        # saturated softmaxes too
    y = torch.randint(0, 7, (50,), generator=g)
    ref = torch.stack([F.cross_entropy(Z[:, :, c], y) for c in range(5)])
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert torch.allclose(_columns_cross_entropy(Z, y), ref, rtol=tol, atol=0)
    Zg = Z.clone().requires_grad_(True)
    torch.stack([F.cross_entropy(Zg[:, :, c], y) for c in range(5)]).sum().backward()
    assert torch.allclose(_columns_cross_entropy_grad(Z, y), Zg.grad, rtol=0, atol=10 * tol / 50)


def test_column_cross_entropy_fast_path_only_for_plain_cross_entropy():
    from nets.learning_rates.linearized import _is_plain_cross_entropy

    y = torch.tensor([0, 2, 1])
    assert _is_plain_cross_entropy(F.cross_entropy, y, (3,))
    assert _is_plain_cross_entropy(nn.CrossEntropyLoss(), y, (3,))
    for other in (lambda z, t: F.cross_entropy(z, t), nn.CrossEntropyLoss(weight=torch.ones(3)),
                  nn.CrossEntropyLoss(label_smoothing=0.1), nn.CrossEntropyLoss(reduction="sum")):
        assert not _is_plain_cross_entropy(other, y, (3,))
    assert not _is_plain_cross_entropy(F.cross_entropy, torch.tensor([0, -100, 1]), (3,))
    assert not _is_plain_cross_entropy(F.cross_entropy, torch.rand(3, 3), (3,))       # soft targets
    assert not _is_plain_cross_entropy(F.cross_entropy, y, (3, 4))                    # sequences
    # an ignored class among the targets: the fast path judged plain cross-entropy runs
    # against the loss without that class (a threshold 15 % low); absent, it is plain
    assert not _is_plain_cross_entropy(nn.CrossEntropyLoss(ignore_index=0), y, (3,))
    assert _is_plain_cross_entropy(nn.CrossEntropyLoss(ignore_index=0), y + 3 * (y == 0), (4,))


def test_curved_threshold_is_the_linear_one_for_a_linear_network_and_differs_otherwise(tiny_mlp):
    """Softmax regression is linear in its parameters (q = 0): curved=True runs the same
    model, in every direction and in a subspace. On a tanh MLP the second-order term
    changes the runs, and the result says it was kept."""
    model, X, y = softmax_regression(seed=2)
    kw = dict(factor=10.0, steps=30, seeds=(0, 1), lr_range=(0.5, 500.0), n_grid=16,
              dtype=torch.float64)
    for rank in (None, 6):
        flat = linearized_threshold(model, F.cross_entropy, (X, y), [8], rank=rank, **kw)
        bent = linearized_threshold(model, F.cross_entropy, (X, y), [8], rank=rank, curved=True,
                                    **kw)
        assert bent.curved and not flat.curved
        np.testing.assert_allclose(bent.max_loss, flat.max_loss, rtol=1e-9)
    net, Xm, ym = tiny_mlp(seed=7, N=40)
    kw["lr_range"] = (0.5, 200.0)
    flat = linearized_threshold(net, F.cross_entropy, (Xm, ym), [8], rank=12, **kw)
    bent = linearized_threshold(net, F.cross_entropy, (Xm, ym), [8], rank=12, curved=True, **kw)
    assert not np.allclose(bent.max_loss, flat.max_loss, rtol=1e-3)
    assert json.loads(json.dumps(bent.to_dict()))["curved"] is True


def test_refined_runs_lower_the_fine_grid_where_a_run_starts_above_the_tolerance():
    """A run below the tolerance at an lr on the coarse pass but above it there on the fine
    pass (a soft, non-monotone threshold) would leave its threshold unbracketed (NaN): the
    fine grid is started one coarse step lower until it is bracketed. Runs that are
    bracketed at once keep the plain fine grid."""
    coarse = np.geomspace(0.01, 100.0, 31)

    def steady(grid):
        return np.where(np.asarray(grid) > 1.0, 20.0, 1.0)

    def soft(grid):                                    # only the fine pass sees 0.9
        grid = np.asarray(grid)
        edge = 1.0 if len(grid) == len(coarse) else 0.9
        return np.where(grid >= edge, 20.0, 1.0)

    plain, _ = refined_runs([steady], coarse, (10.0,), 16)
    assert plain[0] == pytest.approx(1.0)
    grid, worst = refined_runs([steady, soft], coarse, (10.0,), 16)
    assert grid[0] == pytest.approx(1.0 / (coarse[1] / coarse[0]))
    crossings = [first_crossing(grid, w, 10.0) for w in worst]
    assert all(np.isfinite(crossings))
    assert 0.8 < crossings[1] < 0.95 and 0.95 < crossings[0] < 1.1


def test_unbracketed_linearized_threshold_warns():
    model, X, y = softmax_regression(seed=1)
    with pytest.warns(UserWarning, match="did not bracket"):
        res = linearized_threshold(model, F.cross_entropy, (X, y), [8], steps=10, seeds=(0,),
                                   lr_range=(1e-4, 1e-3), n_grid=4, dtype=torch.float64)
    assert np.isnan(res.lr[0])


def test_curved_subspace_warns_when_the_top_eigenvector_is_mostly_outside_it():
    """Large-residual MSE on a ReLU MLP: the top Hessian eigenvector is far from the top
    Gauss–Newton direction, so a rank-1 span holds little of it (|Vᵀu| ≈ 0.015)."""
    torch.manual_seed(2)
    X, y = torch.randn(200, 8), 5 * torch.randn(200, 2)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    kw = dict(steps=5, seeds=(0,), lr_range=(1e-3, 1e-1), n_grid=4)
    with warnings.catch_warnings(record=True) as low:
        warnings.simplefilter("always")
        thin = linearized_threshold(model, F.mse_loss, (X, y), [8], rank=1, curved=True, **kw)
    with warnings.catch_warnings(record=True) as high:
        warnings.simplefilter("always")
        wide = linearized_threshold(model, F.mse_loss, (X, y), [8], rank=40, curved=True, **kw)
    said = [str(w.message) for w in low if "mostly outside" in str(w.message)]
    assert len(said) == 1 and "rank-1" in said[0]
    overlap = float(said[0].split("|Vᵀu| = ")[1].split(")")[0])
    assert 1e-3 < overlap < 0.5
    assert not any("mostly outside" in str(w.message) for w in high)
    assert thin.curved and thin.rank == 1 and wide.curved and wide.rank == 40


def test_a_loss_vmap_cannot_run_is_run_one_column_at_a_time():
    """A loss with a data-dependent check (`if not torch.isfinite(z).all(): raise`) made
    every linearised form raise functorch's "vmap: ... .item()" while the real trials ran
    it (an outside sweep). The oracle: on softmax regression the linearised network is the
    network, so its running maxima are the real trials' (label smoothing: not the fast
    cross-entropy path)."""
    model, X, y = softmax_regression()

    def checked(z, t):
        if not torch.isfinite(z).all():
            raise FloatingPointError("non-finite outputs")
        return F.cross_entropy(z, t, label_smoothing=0.1)

    J, z0 = output_jacobians(model, X, dtype=torch.float64)
    lrs = [0.3, 3.0, 30.0]
    worst = linearized_max_loss(J, z0, y, checked, 8, 0.9, lrs, 40, 5)
    for lr, w in zip(lrs, worst):
        real = training_trial(model, checked, X, y, lr, 8, steps=40, momentum=0.9, seed=5,
                              criterion="divergence", factor=1e12)
        assert w == pytest.approx(real.max_loss / real.initial_loss, rel=1e-7)


def test_linearized_thresholds_warn_as_the_real_ones_do():
    """A head-only optimizer was modelled as training every parameter (10× off on a test
    net) and a train-mode dropout net was run in eval mode, both without the warnings
    training_threshold and adam_threshold give (an outside sweep). The oracle for what
    the warnings say is done: the same numbers as for every parameter trained (plain
    "sgd") and as for the net in eval mode."""
    from nets import linearized_adam_threshold

    model, X, y = softmax_regression()
    net = nn.Sequential(model, nn.Dropout(0.1)).train()
    opts = dict(steps=10, seeds=(0,), lr_range=(0.3, 30.0), n_grid=4)
    adam = dict(steps=10, warmup_steps=2, seeds=(0,), correct=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        everything = linearized_threshold(model, F.cross_entropy, (X, y), [8], **opts)
        with pytest.warns(UserWarning, match="updates only 3 of the model's 21"):
            head = linearized_threshold(model, F.cross_entropy, (X, y), [8],
                                        optimizer=torch.optim.SGD([model.bias], lr=0.1), **opts)
        with pytest.warns(UserWarning, match="linearized_threshold: the model has layers in train"):
            trained = linearized_threshold(net, F.cross_entropy, (X, y), [8], **opts)
        with pytest.warns(UserWarning, match="linearized_adam_threshold: the model has layers"):
            adam_trained = linearized_adam_threshold(net, F.cross_entropy, (X, y), [8], **adam)
        net.eval()
        evaluated = linearized_threshold(net, F.cross_entropy, (X, y), [8], **opts)
        adam_evaluated = linearized_adam_threshold(net, F.cross_entropy, (X, y), [8], **adam)
    np.testing.assert_array_equal(head.per_seed, everything.per_seed)
    np.testing.assert_array_equal(trained.per_seed, evaluated.per_seed)
    np.testing.assert_array_equal(adam_trained.per_seed, adam_evaluated.per_seed)
    assert np.isfinite(np.asarray(everything.per_seed)).all()


# ------------------------------------------------ quadratic losses: the exact quadratic form
def _stored_linear_model(seed=0, N=60, K=4, D=12):
    from nets.learning_rates.linear_outputs import StoredOutputs
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(N, K, D, generator=g, dtype=torch.float64)
    z = torch.randn(N, K, generator=g, dtype=torch.float64)
    y = torch.randn(N, K, generator=g, dtype=torch.float64)
    return StoredOutputs(J, z), y


def _columns(loss):
    from torch.func import vmap
    return vmap(loss, in_dims=(2, None))


def test_quadratic_form_of_mse_is_the_closed_form():
    """For the mean squared error over N·K entries, L(E) = L₀ + bᵀE + ½EᵀAE with
    A = 2/(NK)·Σ_i J_iᵀJ_i and b = 2/(NK)·Σ_i J_iᵀ(z_i − y_i): the form built from the
    loss's own derivatives equals these, and reproduces the loss of the outputs."""
    from nets.learning_rates.linearized import _quadratic_loss
    lin, y = _stored_linear_model()
    N, K, D = lin.J.shape
    form = _quadratic_loss(lin, y, F.mse_loss, _columns(F.mse_loss), seed=0)
    assert form is not None
    A = 2.0 / (N * K) * torch.einsum("nkp,nkq->pq", lin.J, lin.J)
    b = 2.0 / (N * K) * torch.einsum("nkp,nk->p", lin.J, lin.z - y)
    L0 = float(F.mse_loss(lin.z, y))
    E = torch.randn(D, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    want = L0 + b @ E + 0.5 * (E * (A @ E)).sum(0)
    direct = torch.stack([F.mse_loss(lin.z + lin.J @ E[:, g], y) for g in range(5)])
    np.testing.assert_allclose(form(E).numpy(), want.numpy(), rtol=1e-10)
    np.testing.assert_allclose(form(E).numpy(), direct.numpy(), rtol=1e-10)


def test_quadratic_form_refused_where_the_loss_is_not_quadratic():
    """Huber (quadratic near zero, linear far out), cross-entropy and the curved outputs
    (not linear in E) keep the direct full-data evaluation."""
    from nets.learning_rates.linear_outputs import CurvedOutputs
    from nets.learning_rates.linearized import _quadratic_loss
    lin, y = _stored_linear_model()
    assert _quadratic_loss(lin, y, F.huber_loss, _columns(F.huber_loss), seed=0) is None
    labels = y.argmax(1)
    assert _quadratic_loss(lin, labels, F.cross_entropy, _columns(F.cross_entropy),
                           seed=0) is None
    u = torch.zeros(lin.D, dtype=torch.float64)
    u[0] = 1.0
    curved = CurvedOutputs(lin, u, torch.ones(lin.N, lin.K, dtype=torch.float64))
    assert _quadratic_loss(curved, y, F.mse_loss, _columns(F.mse_loss), seed=0) is None


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_quadratic_form_gives_the_direct_runs(monkeypatch, momentum):
    """The heavy-ball runs' running maxima with the quadratic form equal those that
    evaluate the full-data outputs at every step (a weighted MSE, float32 as the default
    runs are), including which learning rates blew up."""
    import nets.learning_rates.linearized as lz
    lin64, y = _stored_linear_model(seed=1, N=80, K=3, D=10)
    J, z, y = lin64.J.float(), lin64.z.float(), y.float()
    w = torch.linspace(0.5, 2.0, 3)

    def weighted(out, t):
        return ((out - t) ** 2 * w).mean()

    lrs = np.geomspace(1e-3, 3.0, 14)
    fast = linearized_max_loss(J, z, y, weighted, 16, momentum, lrs, 60, 0)
    monkeypatch.setattr(lz, "_quadratic_loss", lambda *a, **k: None)
    slow = linearized_max_loss(J, z, y, weighted, 16, momentum, lrs, 60, 0)
    assert np.isinf(slow).any() and np.isfinite(slow).any()
    np.testing.assert_array_equal(np.isinf(fast), np.isinf(slow))
    ok = np.isfinite(slow)
    np.testing.assert_allclose(fast[ok], slow[ok], rtol=1e-5)


def test_quadratic_form_follows_the_targets_of_a_reused_linear_model():
    """A linear model reused with other targets — a new tensor (whose id may be a freed
    one's) or the same tensor changed in place — gets the runs a fresh one gives (the
    form was cached by ids and reused for the old targets: 1.0 against 1.05–1.22)."""
    from nets.learning_rates.linear_outputs import StoredOutputs
    g = torch.Generator().manual_seed(0)
    J, z = torch.randn(200, 2, 10, generator=g), torch.randn(200, 2, generator=g)
    base = torch.randn(200, 2, generator=g)
    lin = StoredOutputs(J, z)
    lrs = np.geomspace(1e-3, 3.0, 12)
    for shift in (0.0, 5.0):
        y = base + shift
        reused = linearized_max_loss(lin, None, y, F.mse_loss, 16, 0.0, lrs, 30, 0)
        fresh = linearized_max_loss(StoredOutputs(J, z), None, y, F.mse_loss, 16, 0.0, lrs, 30, 0)
        np.testing.assert_array_equal(reused, fresh)
        del y
    y = base.clone()
    linearized_max_loss(lin, None, y, F.mse_loss, 16, 0.0, lrs, 30, 0)
    y += 5.0
    np.testing.assert_array_equal(
        linearized_max_loss(lin, None, y, F.mse_loss, 16, 0.0, lrs, 30, 0),
        linearized_max_loss(StoredOutputs(J, z), None, y, F.mse_loss, 16, 0.0, lrs, 30, 0))


def test_quadratic_form_only_with_stored_jacobians():
    """The matrix-free outputs keep the direct evaluation: A would need products through
    the network over all samples at once (4.95 GB against 0.42 GB on an N = 8,000 MLP)."""
    from nets.learning_rates.linear_outputs import StoredOutputs, TangentOutputs
    from nets.learning_rates.linearized import _quadratic_loss
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(300, 3, dtype=torch.float64), torch.randn(300, 2, dtype=torch.float64)
    tangent = TangentOutputs(net, X)
    assert tangent.D <= tangent.N * tangent.K // 4
    assert _quadratic_loss(tangent, y, F.mse_loss, _columns(F.mse_loss), seed=0) is None
    stored = StoredOutputs(*output_jacobians(net, X, dtype=torch.float64))
    assert _quadratic_loss(stored, y, F.mse_loss, _columns(F.mse_loss), seed=0) is not None
