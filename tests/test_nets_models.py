"""Tests for nets.training.models: output shapes, parameter counts against independent
formulas and published figures, seed-determined initialisation without global state."""

import pytest
import torch
from torch import nn

from nets.training.models import (
    MLP,
    VGG16,
    LogisticRegression,
    PreResNet,
    SmallCNN,
    WideResNet,
    count_parameters,
    make_model,
)


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------- shapes
def test_small_model_shapes_and_counts():
    x = torch.randn(5, 64)
    m = MLP(64, (32, 16), 10, activation="relu")
    assert m(x).shape == (5, 10)
    assert m(x.reshape(5, 1, 8, 8)).shape == (5, 10)  # images are flattened
    assert count_parameters(m) == (64 + 1) * 32 + (32 + 1) * 16 + (16 + 1) * 10
    assert count_parameters(MLP(64, (32,), 10, bias=False)) == 64 * 32 + 32 * 10
    lr = LogisticRegression(64, 10)
    assert lr(x).shape == (5, 10) and count_parameters(lr) == 65 * 10
    for size, c in ((8, 1), (32, 3)):
        cnn = SmallCNN(c, 10, image_size=size, width=4)
        assert cnn(torch.randn(2, c, size, size)).shape == (2, 10)
        expect = (c * 9 + 1) * 4 + (4 * 9 + 1) * 8 + (8 * (size // 4) ** 2 + 1) * 10
        assert count_parameters(cnn) == expect


def test_mlp_forward_matches_manual_computation():
    m = MLP(6, (5,), 3, activation="tanh", seed=1)
    x = torch.randn(4, 6, dtype=torch.float32)
    W1, b1 = m.net[0].weight, m.net[0].bias
    W2, b2 = m.net[2].weight, m.net[2].bias
    expect = torch.tanh(x @ W1.T + b1) @ W2.T + b2
    torch.testing.assert_close(m(x), expect)
    g = MLP(6, (5,), 3, activation="gelu", seed=1)
    torch.testing.assert_close(g(x), nn.functional.gelu(x @ W1.T + b1) @ W2.T + b2)


def test_cifar_models_forward_shapes():
    x = torch.randn(2, 3, 32, 32)
    for m in (VGG16(n_classes=100), WideResNet(depth=10, widen=1, n_classes=100),
              PreResNet(depth=20, n_classes=100), PreResNet(depth=47, n_classes=10)):
        m.eval()
        with torch.no_grad():
            assert m(x).shape[0] == 2
            assert m(x).shape[1] in (10, 100)


# ------------------------------------------------------------------ parameter counts
def _wrn_count(depth, k, n_classes):
    """Independent formula: conv1, per block BN(2c)+conv3x3+BN(2w)+conv3x3 (+1×1 shortcut
    when the width changes), final BN, linear head."""
    n = (depth - 4) // 6
    total = 3 * 16 * 9
    c = 16
    for w in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += 2 * c + c * w * 9 + 2 * w + w * w * 9 + (c * w if c != w else 0)
            c = w
    return total + 2 * c + c * n_classes + n_classes


def test_wrn_28_10_parameter_count():
    m = WideResNet(28, 10, n_classes=100)
    assert count_parameters(m) == _wrn_count(28, 10, 100) == 36_536_884  # ≈36.5M
    # published figure of the reference implementation for CIFAR-10: 36,479,194
    assert _wrn_count(28, 10, 10) == 36_479_194
    assert count_parameters(WideResNet(16, 2, n_classes=10)) == _wrn_count(16, 2, 10)


def _vgg_count(n_classes, bn=True):
    cfg = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    total, c = 0, 3
    for v in cfg:
        total += c * v * 9 + v + (2 * v if bn else 0)
        c = v
    return total + (512 * 512 + 512) * 2 + 512 * n_classes + n_classes


def test_vgg16_bn_parameter_count():
    m = VGG16(n_classes=100, batch_norm=True)
    assert count_parameters(m) == _vgg_count(100) == 15_299_748  # ≈15.3M
    # the convolutional trunk + a single Linear(512, 10) is the familiar 14.73M figure
    assert _vgg_count(10) - (512 * 512 + 512) * 2 == 14_728_266
    assert count_parameters(VGG16(n_classes=10, batch_norm=False)) == _vgg_count(10, bn=False)
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 13
    assert sum(isinstance(x, nn.Conv2d) for x in m.modules()) == 13


def test_preresnet_parameter_counts_and_blocks():
    # PreResNet-164 (bottleneck) for CIFAR-10: 1,703,258 (published ≈1.7M)
    assert count_parameters(PreResNet(164, n_classes=10)) == 1_703_258
    m110 = PreResNet(110, n_classes=100)
    assert m110.block == "bottleneck"
    # depth = weighted layers on the main path: convs (not the 1×1 shortcuts) + fc
    for m in (m110, PreResNet(110, n_classes=100, block="basic")):
        main = [n for n, x in m.named_modules()
                if isinstance(x, nn.Conv2d) and "downsample" not in n]
        assert len(main) + 1 == 110
    basic = PreResNet(110, n_classes=100, block="basic")
    assert sum(type(x).__name__ == "_PreBasic" for x in basic.modules()) == 54
    assert sum(type(x).__name__ == "_PreBottleneck" for x in m110.modules()) == 36
    assert count_parameters(basic) == 1_736_372  # the ≈1.7M of He et al.


# ---------------------------------------------------------------------------- seeds
def test_init_is_a_function_of_seed_only():
    state = torch.random.get_rng_state()
    a = MLP(64, (16,), 10, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())  # no global RNG use
    torch.manual_seed(123)  # global state must not matter
    b = MLP(64, (16,), 10, seed=7)
    c = MLP(64, (16,), 10, seed=8)
    assert _same(a, b) and not _same(a, c)
    g = torch.Generator().manual_seed(7)
    d = MLP(64, (16,), 10, seed=g)
    assert _same(a, d)
    for cls, kw in ((SmallCNN, {}), (WideResNet, dict(depth=10, widen=1)),
                    (PreResNet, dict(depth=20)), (LogisticRegression, dict(in_dim=5))):
        s0 = torch.random.get_rng_state()
        m1, m2 = cls(seed=3, **kw), cls(seed=3, **kw)
        assert torch.equal(s0, torch.random.get_rng_state())
        assert _same(m1, m2) and not _same(m1, cls(seed=4, **kw))


def test_init_distribution_scales():
    """Linear: U(±1/√fan_in) has variance 1/(3 fan_in); conv: N(0, 2/fan_out)."""
    m = MLP(400, (300,), 10, seed=0)
    w = m.net[0].weight.detach().double()
    bound = 1 / 400 ** 0.5
    assert float(w.abs().max()) <= bound
    n = w.numel()
    # variance of U(−a, a) is a²/3; var of the sample variance of a uniform ≈ (a⁴/5 − a⁴/9)/n
    z = (float(w.var()) - bound ** 2 / 3) / (bound ** 2 * ((1 / 5 - 1 / 9) / n) ** 0.5)
    assert abs(z) < 5
    cnn = VGG16(n_classes=10)
    conv = cnn.features[-4].weight.detach().double()  # 512→512 3×3
    var = 2 / (512 * 9)
    z = (float(conv.var()) - var) / (var * (2 / conv.numel()) ** 0.5)
    assert abs(z) < 5


# ------------------------------------------------------------------- factory / errors
def test_make_model_and_bad_input():
    m = make_model("MLP", in_dim=8, hidden=(4,), out_dim=3, seed=1)
    assert isinstance(m, MLP) and _same(m, MLP(8, (4,), 3, seed=1))
    assert isinstance(make_model("vgg16-bn", n_classes=10), VGG16)
    assert isinstance(make_model("wrn", depth=10, widen=1), WideResNet)
    assert isinstance(make_model("preresnet110", depth=20), PreResNet)
    assert isinstance(make_model("logreg", in_dim=4, n_classes=2), LogisticRegression)
    with pytest.raises(ValueError, match="name"):
        make_model("resnet50")
    with pytest.raises(ValueError, match="activation"):
        MLP(4, (3,), 2, activation="sigmoidish")
    with pytest.raises(ValueError, match="depth"):
        WideResNet(depth=27)
    with pytest.raises(ValueError, match="depth"):
        PreResNet(depth=111)
    with pytest.raises(ValueError, match="hidden"):
        MLP(4, (0,), 2)
    with pytest.raises(TypeError, match="in_dim"):
        MLP(4.5, (3,), 2)
    with pytest.raises(ValueError, match="image_size"):
        SmallCNN(image_size=10)
    with pytest.raises(ValueError, match="dropout"):
        VGG16(dropout=1.0)
