"""The drift formulas of `benchmarks/bench_momentum_sharpening.py` against heavy ball run
by hand (torch's convention v ← m·v + g, w ← w − α·v) on a loss without curvature:
Monte-Carlo mean square of the noise part (z-score) and the exact constant-gradient path."""

import numpy as np
import pytest
import torch
from conftest import import_benchmark

bench = import_benchmark("bench_momentum_sharpening")


def _heavy_ball(grads, lr, m):
    """Displacement after len(grads) steps of torch.optim.SGD on Σ w·g_t (zero curvature);
    grads (steps, …): every trailing entry is an independent coordinate (SGD is
    elementwise), so a batch of runs goes in one tensor."""
    w = torch.zeros(grads.shape[1:], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr, momentum=m)
    for g in grads:
        opt.zero_grad()
        (w * g).sum().backward()
        opt.step()
    return w.detach().numpy()


@pytest.mark.parametrize("m", [0.0, 0.9])
def test_noise_drift_matches_monte_carlo_heavy_ball(m):
    rng = np.random.default_rng(3)
    steps, P, lr, c, sigma2 = 10, 5, 0.7, 0.02, 1.5         # tr Σ = P·σ²
    runs = 4000
    xi = rng.normal(scale=np.sqrt(c * sigma2), size=(steps, runs, P))
    sq = np.sum(_heavy_ball(torch.from_numpy(xi), lr, m) ** 2, axis=1)
    pred = bench.noise_drift_rms(lr, m, steps, c, P * sigma2) ** 2
    z = (sq.mean() - pred) / (sq.std(ddof=1) / np.sqrt(runs))
    assert abs(z) < 4, (sq.mean(), pred, z)


@pytest.mark.parametrize("m", [0.0, 0.5, 0.9])
def test_gradient_drift_is_the_exact_constant_gradient_path(m):
    g = torch.tensor([0.3, -0.4], dtype=torch.float64)             # ‖g‖ = 0.5
    w = _heavy_ball(g.expand(12, 2), 0.8, m)
    assert np.linalg.norm(w) == pytest.approx(bench.gradient_drift(0.8, m, 12, 0.5), rel=1e-12)


def test_real_and_linearized_top_eigenvalues_against_dense_oracles(dense_hessian):
    """At δ = 0 the real value is λ₁ of the dense Hessian and the linearised one λ₁ of the
    dense Gauss–Newton matrix; for softmax regression (linear in its parameters) the two
    coincide at any δ (the network is its linearisation)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    P = sum(p.numel() for p in net.parameters())
    real, lin = bench.top_real_and_linearized(net, F.cross_entropy, X, y, torch.zeros(P))
    H = dense_hessian(net.double(), F.cross_entropy, X.double(), y)
    assert real == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)
    J = torch.autograd.functional.jacobian(
        lambda *ps: torch.func.functional_call(
            net, dict(zip([k for k, _ in net.named_parameters()], ps)), (X.double(),)),
        tuple(p.detach() for p in net.parameters()))
    J = torch.cat([j.reshape(30, 3, -1) for j in J], dim=2)               # (N, K, P)
    p = torch.softmax(net(X.double()), 1).detach()
    Hz = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    GN = torch.einsum("nkp,nkl,nlq->pq", J, Hz, J) / 30
    assert lin == pytest.approx(float(torch.linalg.eigvalsh(GN)[-1]), rel=1e-6)
    lin_model = torch.nn.Linear(4, 3)
    d = torch.randn(15, generator=g, dtype=torch.float64)
    r2, l2 = bench.top_real_and_linearized(lin_model, F.cross_entropy, X, y, d)
    assert r2 == pytest.approx(l2, rel=1e-6)


def test_side_by_side_paths_coincide_where_the_network_is_its_linearisation():
    """Softmax regression is linear in its parameters, so real and linearised heavy ball on
    the same batches are one path (loss, distance, λ₁); on a tanh net the first step is
    shared (the linearised gradient at e = 0 is the real one) and the paths part later."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(7)
    X, y = torch.randn(60, 5, generator=g), torch.randint(0, 3, (60,), generator=g)
    torch.manual_seed(1)
    lin_model = torch.nn.Linear(5, 3)
    r = bench.side_by_side(lin_model, F.cross_entropy, X, y, lr=0.5, momentum=0.9,
                           batch_size=16, seed=3, steps=12, every=(0, 6, 12))
    assert len(r["loss_real"]) == 13
    np.testing.assert_allclose(r["loss_real"], r["loss_linearized"], rtol=1e-4)
    assert max(r["separation"]) < 1e-4 * max(r["distance_linearized"])
    assert r["distance_linearized"][-1] > 0.1
    np.testing.assert_allclose(r["lam"]["real"], r["lam"]["linearized"], rtol=1e-5)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    r = bench.side_by_side(net, F.cross_entropy, X, y, lr=2.0, momentum=0.9, batch_size=16,
                           seed=3, steps=30, every=(0,))
    assert r["separation"][1] < 1e-5 * r["distance_linearized"][1]
    assert r["separation"][-1] > 1e-2 * r["distance_linearized"][-1]
    assert r["lam"]["real"][0] == pytest.approx(
        bench.top_real_and_linearized(net, F.cross_entropy, X, y, torch.zeros(75))[0], rel=1e-6)


def test_linearized_curvature_can_be_read_at_its_own_displacement():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(20, 3, generator=g), torch.randint(0, 2, (20,), generator=g)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    d = torch.randn(26, generator=g, dtype=torch.float64)
    r0, l0 = bench.top_real_and_linearized(net, F.cross_entropy, X, y, torch.zeros(26))
    r1, l1 = bench.top_real_and_linearized(net, F.cross_entropy, X, y, d,
                                           delta_linearized=torch.zeros(26))
    assert l1 == pytest.approx(l0, rel=1e-8)
    assert r1 != pytest.approx(r0, rel=1e-3)
