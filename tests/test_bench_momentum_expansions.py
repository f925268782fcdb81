"""The two network models of `benchmarks/bench_momentum_expansions.py` against oracles that
share no code with them: the real network's autograd (frozen gates at and near w₀) and the
dense float64 second-order Taylor expansion of the outputs from `torch.func.hessian`."""

import pytest
import torch
from conftest import import_benchmark
from torch import nn

bench = import_benchmark("bench_momentum_expansions")


def _mlp(act, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), act, nn.Linear(7, 6), nn.SiLU(), nn.Linear(6, 3)).double()


def _pair(act, seed=0):
    net = _mlp(act, seed)
    X = torch.randn(11, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    frozen = bench.FrozenGates(bench.sequential_of(net), 5)
    return net, frozen, X, bench.gated_inputs(bench.sequential_of(net), X)


def _perturb(net, frozen, scale, seed=2):
    gen = torch.Generator().manual_seed(seed)
    real = [p for p in net.parameters()]
    gated = [p for p in frozen.parameters()]
    with torch.no_grad():
        for a, b in zip(real, gated, strict=True):
            d = scale * torch.randn(a.shape, dtype=a.dtype, generator=gen)
            a += d
            b += d


@pytest.mark.parametrize("act", [nn.Tanh(), nn.GELU(), nn.ReLU()])
def test_frozen_gates_equal_the_network_and_its_gradient_at_the_checkpoint(act):
    net, frozen, X, Xa = _pair(act)
    y = torch.randn(11, 3, dtype=torch.float64)
    torch.testing.assert_close(frozen(Xa), net(X), rtol=0, atol=1e-12)
    g_real = torch.autograd.grad(((net(X) - y) ** 2).sum(), list(net.parameters()))
    g_frozen = torch.autograd.grad(((frozen(Xa) - y) ** 2).sum(), list(frozen.parameters()))
    for a, b in zip(g_real, g_frozen, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_frozen_gates_are_a_relu_network_while_no_unit_switches():
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    X = torch.randn(11, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    seq = bench.sequential_of(net)
    frozen = bench.FrozenGates(seq, 5)
    Xa = bench.gated_inputs(seq, X)
    signs = torch.sign(net[0](X))
    _perturb(net, frozen, 1e-4)
    assert torch.equal(torch.sign(net[0](X)), signs)       # no unit switched
    torch.testing.assert_close(frozen(Xa), net(X), rtol=0, atol=1e-12)


def test_frozen_gates_differ_from_a_smooth_network_at_second_order():
    """Tangent of σ at a₀: the gap to the real network is O(δ²) in the weight step δ."""
    gaps = []
    for scale in (1e-2, 5e-3):
        net, frozen, X, Xa = _pair(nn.Tanh(), seed=3)
        _perturb(net, frozen, scale)
        gaps.append((frozen(Xa) - net(X)).abs().max().item())
    assert gaps[0] / gaps[1] == pytest.approx(4.0, rel=0.1), gaps


def test_sequential_of_refuses_other_layers():
    with pytest.raises(ValueError, match="Conv2d"):
        bench.sequential_of(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))


def test_second_order_outputs_match_the_dense_taylor_expansion():
    torch.manual_seed(5)          # (SiLU has no forward-over-reverse rule in torch)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.GELU(),
                        nn.Linear(6, 3)).double()
    X = torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    lin = bench.SecondOrderOutputs(net, X, chunk_size=4)
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def outputs(w):
        params, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            params[k] = w[i:i + s.numel()].reshape(s)
            i += s.numel()
        return torch.func.functional_call(net, params, (X,))

    J = torch.func.jacrev(outputs)(w0)                       # (N, K, P)
    H = torch.func.hessian(outputs)(w0)                      # (N, K, P, P)
    E = 0.3 * torch.randn(w0.numel(), 2, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(7))
    full = lin.full(E)
    idx = torch.tensor([0, 3, 5])
    lin.batch(idx, E)
    C = torch.randn(3, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    G = lin.pullback(idx, C)
    for g in range(2):
        e = E[:, g]
        taylor = outputs(w0) + J @ e + 0.5 * torch.einsum("nkpq,p,q->nk", H, e, e)
        torch.testing.assert_close(full[:, :, g], taylor, rtol=0, atol=1e-12)
        grad = (torch.einsum("bk,bkp->p", C[:, :, g], J[idx])
                + torch.einsum("bk,bkpq,q->p", C[:, :, g], H[idx], e))
        torch.testing.assert_close(G[:, g], grad, rtol=0, atol=1e-12)
