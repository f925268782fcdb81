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
    frozen = bench.FrozenGates(net, X)
    return net, frozen, X, frozen.inputs(X)


def _cnn(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():                                   # non-trivial running statistics
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


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
    frozen = bench.FrozenGates(net, X)
    Xa = frozen.inputs(X)
    signs = torch.sign(net[0](X))
    _perturb(net, frozen, 1e-4)
    assert torch.equal(torch.sign(net[0](X)), signs)       # no unit switched
    torch.testing.assert_close(frozen(Xa), net(X), rtol=0, atol=1e-12)
    # a batch in any order finds its own samples' gates
    torch.testing.assert_close(frozen(Xa[[7, 2, 9]]), net(X[[7, 2, 9]]), rtol=0, atol=1e-12)


def test_frozen_gates_of_a_convolutional_net():
    """At w₀ the network and its gradient; after a small step that switches no ReLU and no
    max-pool choice, the tanh layer's tangent is the only difference: O(δ²)."""
    net = _cnn()
    X = torch.randn(6, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    frozen = bench.FrozenGates(net, X)
    Xa = frozen.inputs(X)
    torch.testing.assert_close(frozen(Xa), net(X), rtol=0, atol=1e-12)
    g_real = torch.autograd.grad(net(X).square().sum(), list(net.parameters()))
    g_frozen = torch.autograd.grad(frozen(Xa).square().sum(), list(frozen.parameters()))
    for a, b in zip(g_real, g_frozen, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    def choices(model):
        a = model[:2](X)
        return torch.sign(a), torch.nn.functional.max_pool2d(a.relu(), 2, return_indices=True)[1]

    before, gaps = choices(net), []
    for scale in (1e-3, 5e-4):
        net2, frozen2 = _cnn(), bench.FrozenGates(_cnn(), X)
        _perturb(net2, frozen2, scale)
        for a, b in zip(choices(net2), before, strict=True):
            assert torch.equal(a, b)                        # nothing switched
        gaps.append((frozen2(Xa) - net2(X)).abs().max().item())
    assert gaps[0] / gaps[1] == pytest.approx(4.0, rel=0.1), gaps


def test_frozen_gates_differ_from_a_smooth_network_at_second_order():
    """Tangent of σ at a₀: the gap to the real network is O(δ²) in the weight step δ."""
    gaps = []
    for scale in (1e-2, 5e-3):
        net, frozen, X, Xa = _pair(nn.Tanh(), seed=3)
        _perturb(net, frozen, scale)
        gaps.append((frozen(Xa) - net(X)).abs().max().item())
    assert gaps[0] / gaps[1] == pytest.approx(4.0, rel=0.1), gaps


def test_frozen_gates_refuse_a_layer_they_cannot_freeze():
    with pytest.raises(ValueError, match="LayerNorm"):
        bench.FrozenGates(nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.ReLU()),
                          torch.randn(3, 5))


def test_frozen_gates_refuse_an_activation_used_twice():
    act = nn.Tanh()
    with pytest.raises(ValueError, match="exactly once"):
        bench.FrozenGates(nn.Sequential(nn.Linear(5, 4), act, nn.Linear(4, 4), act),
                          torch.randn(3, 5))


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
    C = torch.randn(3, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    G = lin.pullback(idx, C, E)
    for g in range(2):
        e = E[:, g]
        taylor = outputs(w0) + J @ e + 0.5 * torch.einsum("nkpq,p,q->nk", H, e, e)
        torch.testing.assert_close(full[:, :, g], taylor, rtol=0, atol=1e-12)
        grad = (torch.einsum("bk,bkp->p", C[:, :, g], J[idx])
                + torch.einsum("bk,bkpq,q->p", C[:, :, g], H[idx], e))
        torch.testing.assert_close(G[:, g], grad, rtol=0, atol=1e-12)


def test_frozen_gates_can_be_copied_after_a_functional_call():
    """The trials copy the model; a batch index left over from a torch.func call would not copy."""
    import copy

    net, frozen, X, Xa = _pair(nn.GELU())
    params = {k: v.detach() for k, v in frozen.named_parameters()}
    torch.func.vmap(lambda x: torch.func.functional_call(frozen, params, (x[None],)))(Xa)
    twin = copy.deepcopy(frozen)
    torch.testing.assert_close(twin(Xa), net(X), rtol=0, atol=1e-12)
