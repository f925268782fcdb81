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
