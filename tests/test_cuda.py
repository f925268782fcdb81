"""CUDA checks: every device path of `nets` against CPU float64 on the same small net.

Marked `cuda` and skipped when `torch.cuda.is_available()` is False (CI has no GPU);
`benchmarks/gpu_check.py` runs them on a device (`pytest -m cuda tests/test_cuda.py`).
The oracle is the package's CPU float64 path (itself tested against dense
`torch.func.hessian` in test_nets_operators.py / test_nets_lanczos.py): the same
seeds give the same probes and batches on every device (all random draws happen on
the CPU), so the numbers must agree up to the arithmetic of the device.

Tolerances (relative, on norms or values):
  * device float64 vs CPU float64: 1e-9 (different summation order / kernels only);
  * device float32 vs CPU float64: 2e-4 for products and eigenvalues, 2e-3 for
    quantities built from per-sample differences (noise s_u², λ'(B)), where float32
    cancellation costs about two more digits.
Convolutions are compared in float64 only, where TF32 does not apply.

`NETS_TEST_DEVICE=cpu pytest -m cuda tests/test_cuda.py` runs the same comparisons
with the CPU as "device" (to check the tests themselves without a GPU).
"""

from __future__ import annotations

import copy
import inspect
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

DEVICE = os.environ.get("NETS_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                       reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

RTOL64 = 1e-9
RTOL32 = 2e-4
RTOL32_NOISE = 2e-3
DTYPES = [pytest.param(torch.float64, RTOL64, id="float64"),
          pytest.param(torch.float32, RTOL32, id="float32")]


def _call(fn, *args, **kw):
    """Call `fn` with the keyword options it accepts (the public signatures are being
    moved to keyword-only options; an option a version does not know is left out)."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kw = {k: v for k, v in kw.items() if k in params}
    return fn(*args, **kw)


def _rel(a, b) -> float:
    a = np.asarray(a.detach().cpu().double() if isinstance(a, torch.Tensor) else a, dtype=float)
    b = np.asarray(b.detach().cpu().double() if isinstance(b, torch.Tensor) else b, dtype=float)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(float).tiny))


def _mlp_problem():
    from nets.training.data import gaussian_mixture
    from nets.training.models import MLP
    X, y = gaussian_mixture(48, 6, n_classes=3, separation=2.0, seed=1, dtype=torch.float64)
    return MLP(6, (10,), 3, seed=2).double(), F.cross_entropy, (X, y)


def _cnn_problem():
    from nets.training.models import SmallCNN
    g = torch.Generator().manual_seed(3)
    X = torch.randn(24, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (24,), generator=g)
    return SmallCNN(1, 4, image_size=8, width=3, seed=4).double(), F.cross_entropy, (X, y)


def _on(data, device):
    return tuple(t.to(device) for t in data)


def _probes(P, k=3, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((P, k)))


# ------------------------------------------------------------------------ operators
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("problem", [_mlp_problem, _cnn_problem], ids=["mlp", "cnn"])
def test_operator_products_float64(kind, problem):
    from nets.curvature.operators import curvature_operator
    model, loss_fn, data = problem()
    cpu = _call(curvature_operator, model, loss_fn, data, kind=kind, device="cpu",
                dtype=torch.float64)
    dev = _call(curvature_operator, model, loss_fn, data, kind=kind, device=DEVICE,
                dtype=torch.float64)
    V = _probes(cpu.P)
    assert dev.device.type == torch.device(DEVICE).type
    out = dev.matmat(V.to(dev.device))
    assert out.device.type == torch.device(DEVICE).type
    assert _rel(out, cpu.matmat(V)) < RTOL64
    assert _rel(dev.matvec(V[:, 0].to(dev.device)), cpu.matvec(V[:, 0])) < RTOL64
    assert _rel(dev.gradient(), cpu.gradient()) < RTOL64


@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_hvp_and_batch_operator(dtype, rtol):
    from nets.curvature.operators import batch_hessian_operator, hessian_operator
    model, loss_fn, data = _mlp_problem()
    cpu = _call(hessian_operator, model, loss_fn, data, device="cpu", dtype=torch.float64)
    dev = _call(hessian_operator, model, loss_fn, data, device=DEVICE, dtype=dtype)
    V = _probes(cpu.P)
    assert _rel(dev.matmat(V.to(dev.device)), cpu.matmat(V)) < rtol
    idx = np.arange(5, 21)
    cpu_b = _call(batch_hessian_operator, model, loss_fn, data, idx, device="cpu",
                  dtype=torch.float64)
    dev_b = _call(batch_hessian_operator, model, loss_fn, data, idx, device=DEVICE, dtype=dtype)
    assert _rel(dev_b.matmat(V.to(dev_b.device)), cpu_b.matmat(V)) < rtol
    # the check can fail: another batch gives a different product
    assert _rel(cpu_b.matmat(V), cpu.matmat(V)) > 100 * rtol


# ------------------------------------------------------------------ Lanczos / eigsh / SLQ
@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_top_eigenvalues(dtype, rtol):
    import nets
    model, loss_fn, data = _mlp_problem()
    ref = _call(nets.top_eigenvalues, model, loss_fn, data, k=3, device="cpu",
                dtype=torch.float64, seed=0)
    got = _call(nets.top_eigenvalues, model, loss_fn, data, k=3, device=DEVICE, dtype=dtype,
                seed=0)
    assert got.shape == (3,) and np.all(np.diff(got) <= 0)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_lanczos_and_eigsh_on_device_operator(dtype, rtol):
    from nets.algorithms.lanczos import eigsh, lanczos
    from nets.curvature.operators import hessian_operator
    model, loss_fn, data = _mlp_problem()
    cpu = _call(hessian_operator, model, loss_fn, data, device="cpu", dtype=torch.float64)
    dev = _call(hessian_operator, model, loss_fn, data, device=DEVICE, dtype=dtype)
    r_cpu = _call(lanczos, cpu, num_steps=12, seed=0)
    r_dev = _call(lanczos, dev, num_steps=12, seed=0)
    assert r_dev.num_steps == r_cpu.num_steps == 12
    # extreme Ritz values converge fastest and are insensitive to rounding
    np.testing.assert_allclose(r_dev.ritz_values[[0, -1]], r_cpu.ritz_values[[0, -1]],
                               rtol=rtol, atol=rtol * abs(r_cpu.ritz_values[-1]))
    e_cpu = _call(eigsh, cpu, k=2, which="SA", tol=1e-8, seed=1)
    e_dev = _call(eigsh, dev, k=2, which="SA", tol=1e-8, seed=1)
    np.testing.assert_allclose(e_dev.values, e_cpu.values, rtol=rtol,
                               atol=rtol * abs(r_cpu.ritz_values[-1]))
    assert e_dev.vectors.device.type == torch.device(DEVICE).type


@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_slq_density(dtype, rtol):
    from nets.algorithms.slq import slq_density
    from nets.curvature.operators import hessian_operator
    model, loss_fn, data = _mlp_problem()
    cpu = _call(hessian_operator, model, loss_fn, data, device="cpu", dtype=torch.float64)
    dev = _call(hessian_operator, model, loss_fn, data, device=DEVICE, dtype=dtype)
    d_cpu = _call(slq_density, cpu, num_probes=4, num_steps=10, seed=0)
    d_dev = _call(slq_density, dev, num_probes=4, num_steps=10, seed=0)
    for j in (1, 2, 3):     # per-probe quadratures are polynomial moments: exact per probe
        np.testing.assert_allclose(d_dev.probe_moments(j), d_cpu.probe_moments(j),
                                   rtol=10 * rtol, atol=0)
    np.testing.assert_allclose(d_dev.support()[1], d_cpu.support()[1], rtol=rtol)
    grid = np.linspace(*d_cpu.support(), 50)
    sigma = 0.05 * (grid[-1] - grid[0])
    assert _rel(d_dev.density(grid, sigma), d_cpu.density(grid, sigma)) < 10 * rtol


# ------------------------------------------------------------------------ noise
@pytest.mark.parametrize("dtype,rtol", [pytest.param(torch.float64, RTOL64, id="float64"),
                                        pytest.param(torch.float32, RTOL32_NOISE, id="float32")])
def test_directional_noise(dtype, rtol):
    import nets
    model, loss_fn, data = _mlp_problem()
    P = sum(p.numel() for p in model.parameters())
    u = _probes(P, 1, seed=7)[:, 0]
    ref = _call(nets.directional_noise, model, loss_fn, data, u=u, device="cpu",
                dtype=torch.float64)
    got = _call(nets.directional_noise, model, loss_fn, data, u=u.to(DEVICE), device=DEVICE,
                dtype=dtype)
    assert ref.s2 > 0
    np.testing.assert_allclose(got.s2, ref.s2, rtol=rtol)
    np.testing.assert_allclose(got.lam, ref.lam, rtol=rtol, atol=rtol * abs(ref.s2) ** 0.5)
    # micro-batched: the same seeded partition on every device
    ref4 = _call(nets.directional_noise, model, loss_fn, data, u=u, micro_batch=4, seed=3,
                 device="cpu", dtype=torch.float64)
    got4 = _call(nets.directional_noise, model, loss_fn, data, u=u.to(DEVICE), micro_batch=4,
                 seed=3, device=DEVICE, dtype=dtype)
    np.testing.assert_allclose(got4.s2, ref4.s2, rtol=rtol)


# ------------------------------------------------------------ λ'(B), α_max(B), learner
BATCH_SIZES = [4, 8, 16, 32]


@pytest.mark.parametrize("dtype,rtol", [pytest.param(torch.float64, RTOL64, id="float64"),
                                        pytest.param(torch.float32, RTOL32_NOISE, id="float32")])
def test_predict_batch_top_eigenvalue_directional(dtype, rtol):
    import nets
    model, loss_fn, data = _mlp_problem()
    ref = _call(nets.predict_batch_top_eigenvalue, model, loss_fn, data, BATCH_SIZES,
                form="directional", seed=0, device="cpu", dtype=torch.float64)
    got = _call(nets.predict_batch_top_eigenvalue, model, loss_fn, data, BATCH_SIZES,
                form="directional", seed=0, device=DEVICE, dtype=dtype)
    r, g = np.asarray(ref["directional"]), np.asarray(got["directional"])
    assert r.shape == g.shape == (len(BATCH_SIZES),)
    assert np.all(np.diff(r) < 0)          # λ'(B) decreases with B: the numbers are not trivial
    np.testing.assert_allclose(g, r, rtol=rtol)
    np.testing.assert_allclose(float(got["lam"]), float(ref["lam"]), rtol=rtol)


@pytest.mark.parametrize("optimizer,momentum", [("sgd", 0.9), ("adam", None)])  # Adam: β₁ = 0.9
def test_predict_max_lr(optimizer, momentum):
    import nets
    model, loss_fn, data = _mlp_problem()
    ref = _call(nets.predict_max_lr, model, loss_fn, data, BATCH_SIZES, optimizer=optimizer,
                momentum=momentum, seed=0)
    dmodel = copy.deepcopy(model).to(DEVICE)
    got = _call(nets.predict_max_lr, dmodel, loss_fn, _on(data, DEVICE), BATCH_SIZES,
                optimizer=optimizer, momentum=momentum, seed=0, device=DEVICE)
    assert np.all(np.isfinite(ref)) and np.all(ref > 0)
    if optimizer == "sgd":
        assert np.all(np.diff(ref) > 0)    # larger batches allow larger steps
    np.testing.assert_allclose(got, ref, rtol=1e-8)


def _learner_run(model, data, dtype, device, steps=6):
    """`steps` heavy-ball steps of CurvatureAdaptiveSGD on fixed minibatches; returns
    (lr history, momentum history, final flat parameters)."""
    import nets
    model = copy.deepcopy(model).to(device=device, dtype=dtype)
    X, y = data[0].to(device=device, dtype=dtype), data[1].to(device)
    opt = _call(nets.CurvatureAdaptiveSGD, model, F.cross_entropy, (X, y), batch_size=8,
                curvature_batch_size=16, update_every=2, lanczos_steps=8,
                batch_correction=True, noise_micro_batch_size=4, seed=0)
    order = np.random.default_rng(5).permutation(X.shape[0])
    for s in range(steps):
        idx = torch.as_tensor(order[8 * s: 8 * s + 8], device=X.device)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    lrs = np.array([h.lr for h in opt.history])
    moms = np.array([h.momentum for h in opt.history])
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return lrs, moms, flat


@pytest.mark.parametrize("dtype,rtol", [pytest.param(torch.float64, 1e-8, id="float64"),
                                        pytest.param(torch.float32, RTOL32_NOISE, id="float32")])
def test_curvature_adaptive_sgd(dtype, rtol):
    model, _, data = _mlp_problem()
    lr_c, mom_c, w_c = _learner_run(model, data, torch.float64, "cpu")
    lr_d, mom_d, w_d = _learner_run(model, data, dtype, DEVICE)
    assert len(lr_c) == len(lr_d) >= 2 and np.all(lr_c > 0)
    assert w_d.device.type == torch.device(DEVICE).type
    np.testing.assert_allclose(lr_d, lr_c, rtol=rtol)
    np.testing.assert_allclose(mom_d, mom_c, rtol=rtol, atol=rtol)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert _rel(w_c, start) > 1e-3        # the steps moved the weights
    assert _rel(w_d, w_c) < rtol
