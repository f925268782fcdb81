"""Model definitions in plain torch (no torchvision) and the `make_model` factory.

Small models for CPU checks (`MLP`, `LogisticRegression`, `SmallCNN`) and the CIFAR
architectures of the paper (docs/theory.md §7): `VGG16` (with BatchNorm), `WideResNet`
(WRN-28-10) and the pre-activation `PreResNet` (PreResNet-110), all for 32×32 inputs.

Initialisation is a function of the `seed` argument only: every model is built with
the global torch RNG forked (so building a model never changes the caller's random
stream) and then re-initialised from an explicit `torch.Generator(seed)`. Two models
built with the same arguments are therefore identical, whatever the global state.

Init schemes: linear layers of `MLP`/`LogisticRegression`/classifier heads use
PyTorch's default (weight and bias ~ U(−1/√fan_in, 1/√fan_in)); convolutions use
He-normal N(0, 2/fan_out) (`kaiming_normal_(mode="fan_out")`, as in the reference
WRN / PreResNet / VGG code) with zero bias; BatchNorm starts at weight 1, bias 0.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from nets.utils.seeding import torch_generator
from rmt.validation import as_bool, as_float, as_int

__all__ = [
    "MLP",
    "LogisticRegression",
    "SmallCNN",
    "VGG16",
    "WideResNet",
    "PreResNet",
    "make_model",
    "count_parameters",
    "init_parameters",
]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
}


def _activation(name: str) -> Callable[[], nn.Module]:
    if not isinstance(name, str) or name.lower() not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name.lower()]


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters (only those with `requires_grad` by default)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def init_parameters(model: nn.Module, seed=0) -> nn.Module:
    """Re-initialise every Linear / Conv / BatchNorm / LayerNorm of `model` in place
    from `torch.Generator(seed)` (or the generator passed), never the global RNG.

    Linear: W, b ~ U(−1/√fan_in, 1/√fan_in) (PyTorch's default). Conv: W ~ N(0,
    2/fan_out) (He, fan-out mode), b = 0. Norm layers: weight 1, bias 0; BatchNorm
    running statistics reset. Parameters are drawn on CPU and copied, so the numbers
    do not depend on the device.
    """
    g = torch_generator(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            m.weight.copy_(torch.empty(m.weight.shape, dtype=m.weight.dtype)
                           .uniform_(-bound, bound, generator=g))
            if m.bias is not None:
                m.bias.copy_(torch.empty(m.bias.shape, dtype=m.bias.dtype)
                             .uniform_(-bound, bound, generator=g))
        elif isinstance(m, nn.modules.conv._ConvNd):
            w = m.weight
            fan_out = w.shape[0] * math.prod(w.shape[2:]) // m.groups
            std = math.sqrt(2.0 / fan_out)
            w.copy_(torch.empty(w.shape, dtype=w.dtype).normal_(0.0, std, generator=g))
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            if getattr(m, "weight", None) is not None:
                m.weight.fill_(1.0)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                m.reset_running_stats()
    return model


def _build(model: nn.Module, builder: Callable[[], None], seed) -> None:
    """Run `builder` (which creates the submodules) with the global RNG forked, then
    initialise from the explicit generator."""
    with torch.random.fork_rng(devices=[]):
        builder()
    init_parameters(model, seed)


# ------------------------------------------------------------------------ small models
class MLP(nn.Module):
    """Fully connected network in_dim → hidden[0] → … → hidden[-1] → out_dim.

    Each hidden layer is Linear followed by the activation ("tanh", "relu", "gelu");
    the output layer is linear (logits for classification). Inputs with more than two
    axes are flattened from axis 1, so N×1×8×8 images work too.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (32,), out_dim: int = 10,
                 activation: str = "tanh", bias: bool = True, seed=0):
        super().__init__()
        in_dim = as_int("in_dim", in_dim, minimum=1)
        out_dim = as_int("out_dim", out_dim, minimum=1)
        if isinstance(hidden, (int,)) and not isinstance(hidden, bool):
            hidden = (hidden,)
        try:
            hidden = tuple(as_int("hidden", h, minimum=1) for h in hidden)
        except TypeError:
            raise TypeError(f"hidden must be a sequence of positive ints, got {hidden!r}") from None
        act = _activation(activation)
        bias = as_bool("bias", bias)
        self.in_dim, self.hidden, self.out_dim = in_dim, hidden, out_dim
        self.activation = activation.lower()

        def builder():
            layers: list[nn.Module] = []
            d = in_dim
            for h in hidden:
                layers += [nn.Linear(d, h, bias=bias), act()]
                d = h
            layers.append(nn.Linear(d, out_dim, bias=bias))
            self.net = nn.Sequential(*layers)

        _build(self, builder, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1) if x.ndim > 2 else x)


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: logits = W x + b (use with cross-entropy).
    Inputs with more than two axes are flattened from axis 1."""

    def __init__(self, in_dim: int, n_classes: int = 10, bias: bool = True, seed=0):
        super().__init__()
        in_dim = as_int("in_dim", in_dim, minimum=1)
        n_classes = as_int("n_classes", n_classes, minimum=2)

        def builder():
            self.linear = nn.Linear(in_dim, n_classes, bias=bias)

        _build(self, builder, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1) if x.ndim > 2 else x)


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head, no normalisation layers:

    conv3×3(in→w) · act · maxpool2 · conv3×3(w→2w) · act · maxpool2 · flatten ·
    Linear(2w·(s/4)², n_classes), with s = `image_size` (must be divisible by 4:
    8 for digits, 32 for CIFAR).
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 10, image_size: int = 8,
                 width: int = 8, activation: str = "relu", seed=0):
        super().__init__()
        in_channels = as_int("in_channels", in_channels, minimum=1)
        n_classes = as_int("n_classes", n_classes, minimum=2)
        image_size = as_int("image_size", image_size, minimum=4)
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        width = as_int("width", width, minimum=1)
        act = _activation(activation)
        self.image_size = image_size

        def builder():
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1), act(), nn.MaxPool2d(2),
                nn.Conv2d(width, 2 * width, 3, padding=1), act(), nn.MaxPool2d(2),
            )
            self.classifier = nn.Linear(2 * width * (image_size // 4) ** 2, n_classes)

        _build(self, builder, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


# ------------------------------------------------------------------------------ VGG16
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"]


class VGG16(nn.Module):
    """VGG-16 for 32×32 inputs (the CIFAR variant of the SWA / curvature code bases).

    13 conv3×3 layers (64,64,M,128,128,M,256×3,M,512×3,M,512×3,M), each followed by
    BatchNorm (if `batch_norm`) and ReLU; the 1×1×512 output goes through
    [Dropout] · Linear(512,512) · ReLU · [Dropout] · Linear(512,512) · ReLU ·
    Linear(512, n_classes). `dropout` defaults to 0 (the reference code uses 0.5 in
    training; curvature measurements need dropout off anyway).

    Parameter count with BatchNorm and 100 classes: 15,299,748 (conv + BN 14,723,136;
    classifier 576,612). For reference, the head-less "VGG16 with one Linear(512, 10)"
    of many CIFAR repositories has 14,728,266 (the ≈14.7M figure), and the 4096-wide
    ImageNet-style head gives ≈34M; ≈15.3M is the SWA-style model.
    """

    def __init__(self, n_classes: int = 100, batch_norm: bool = True, dropout: float = 0.0,
                 in_channels: int = 3, seed=0):
        super().__init__()
        n_classes = as_int("n_classes", n_classes, minimum=2)
        dropout = as_float("dropout", dropout, nonnegative=True)
        if dropout >= 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        in_channels = as_int("in_channels", in_channels, minimum=1)

        def builder():
            layers: list[nn.Module] = []
            c = in_channels
            for v in _VGG16_CFG:
                if v == "M":
                    layers.append(nn.MaxPool2d(2))
                    continue
                layers.append(nn.Conv2d(c, v, 3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(v))
                layers.append(nn.ReLU(inplace=True))
                c = v
            self.features = nn.Sequential(*layers)
            head: list[nn.Module] = []
            if dropout:
                head.append(nn.Dropout(dropout))
            head += [nn.Linear(512, 512), nn.ReLU(inplace=True)]
            if dropout:
                head.append(nn.Dropout(dropout))
            head += [nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, n_classes)]
            self.classifier = nn.Sequential(*head)

        _build(self, builder, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


# ------------------------------------------------------------------------- WideResNet
class _WideBasic(nn.Module):
    """Pre-activation wide block: BN·ReLU·conv3×3·[dropout]·BN·ReLU·conv3×3 + shortcut
    (1×1 conv when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x):
        o = torch.relu(self.bn1(x))
        sc = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(self.dropout(torch.relu(self.bn2(o))))
        return o + sc


class _PreActResidualNet(nn.Module):
    """Shared trunk of the pre-activation residual networks: conv1 → stages → BN →
    ReLU → global average pool → fc (subclasses build `conv1`, `stages`, `bn`, `fc`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn(self.stages(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(o, 1), 1))


class WideResNet(_PreActResidualNet):
    """Wide residual network WRN-depth-widen (Zagoruyko & Komodakis 2016), 32×32 input.

    conv3×3(3→16) · 3 stages of n = (depth−4)/6 wide blocks with 16k, 32k, 64k
    channels (strides 1, 2, 2) · BN · ReLU · global average pool · Linear. Convs have
    no bias. WRN-28-10 with 100 classes has 36,536,884 parameters (the ≈36.5M of the
    paper; with 10 classes 36,479,194, the figure of the reference implementation).
    """

    def __init__(self, depth: int = 28, widen: int = 10, n_classes: int = 100,
                 dropout: float = 0.0, in_channels: int = 3, seed=0):
        super().__init__()
        depth = as_int("depth", depth, minimum=10)
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4 (e.g. 16, 22, 28, 40), got {depth}")
        widen = as_int("widen", widen, minimum=1)
        n_classes = as_int("n_classes", n_classes, minimum=2)
        dropout = as_float("dropout", dropout, nonnegative=True)
        if dropout >= 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        in_channels = as_int("in_channels", in_channels, minimum=1)
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]

        def builder():
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
            stages = []
            c = widths[0]
            for w, stride in zip(widths[1:], (1, 2, 2)):
                blocks = []
                for i in range(n):
                    blocks.append(_WideBasic(c, w, stride if i == 0 else 1, dropout))
                    c = w
                stages.append(nn.Sequential(*blocks))
            self.stages = nn.Sequential(*stages)
            self.bn = nn.BatchNorm2d(c)
            self.fc = nn.Linear(c, n_classes)

        _build(self, builder, seed)


# -------------------------------------------------------------------------- PreResNet
class _PreBasic(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.downsample = None
        if stride != 1 or c_in != planes:
            self.downsample = nn.Conv2d(c_in, planes, 1, stride=stride, bias=False)

    def forward(self, x):
        o = self.conv1(torch.relu(self.bn1(x)))
        o = self.conv2(torch.relu(self.bn2(o)))
        return o + (x if self.downsample is None else self.downsample(x))


class _PreBottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.downsample = None
        if stride != 1 or c_in != planes * 4:
            self.downsample = nn.Conv2d(c_in, planes * 4, 1, stride=stride, bias=False)

    def forward(self, x):
        o = self.conv1(torch.relu(self.bn1(x)))
        o = self.conv2(torch.relu(self.bn2(o)))
        o = self.conv3(torch.relu(self.bn3(o)))
        return o + (x if self.downsample is None else self.downsample(x))


class PreResNet(_PreActResidualNet):
    """Pre-activation ResNet for 32×32 inputs (He et al. 2016, "Identity mappings"),
    laid out as in the SWA / curvature code used for the paper's learner runs.

    conv3×3(3→16) · 3 stages (16, 32, 64 planes; strides 1, 2, 2) · BN · ReLU ·
    average pool · Linear. `block="auto"` follows the reference code: bottleneck
    blocks (expansion 4, n = (depth−2)/9 per stage) when depth ≥ 44, basic blocks
    (n = (depth−2)/6) otherwise; "basic" / "bottleneck" force one. PreResNet-110
    (auto → bottleneck, n = 12) with 100 classes has 1,169,972 parameters; the basic-
    block PreResNet-110 of He et al. (n = 18) has 1,736,372 (≈1.7M), and PreResNet-164
    (bottleneck) 1,726,388 (1,703,258 with 10 classes, the published figure).
    """

    def __init__(self, depth: int = 110, n_classes: int = 100, block: str = "auto",
                 in_channels: int = 3, seed=0):
        super().__init__()
        depth = as_int("depth", depth, minimum=8)
        n_classes = as_int("n_classes", n_classes, minimum=2)
        in_channels = as_int("in_channels", in_channels, minimum=1)
        if block not in ("auto", "basic", "bottleneck"):
            raise ValueError(f"block must be 'auto', 'basic' or 'bottleneck', got {block!r}")
        if block == "auto":
            block = "bottleneck" if depth >= 44 else "basic"
        per = 9 if block == "bottleneck" else 6
        if (depth - 2) % per:
            raise ValueError(f"depth must be {per}n+2 for {block} blocks, got {depth}")
        n = (depth - 2) // per
        cls = _PreBottleneck if block == "bottleneck" else _PreBasic
        self.block = block

        def builder():
            self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
            stages = []
            c = 16
            for planes, stride in zip((16, 32, 64), (1, 2, 2)):
                blocks = []
                for i in range(n):
                    blocks.append(cls(c, planes, stride if i == 0 else 1))
                    c = planes * cls.expansion
                stages.append(nn.Sequential(*blocks))
            self.stages = nn.Sequential(*stages)
            self.bn = nn.BatchNorm2d(c)
            self.fc = nn.Linear(c, n_classes)

        _build(self, builder, seed)


# ---------------------------------------------------------------------------- factory
_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "logistic_regression": LogisticRegression,
    "logreg": LogisticRegression,
    "small_cnn": SmallCNN,
    "cnn": SmallCNN,
    "vgg16": VGG16,
    "vgg16_bn": VGG16,
    "wide_resnet": WideResNet,
    "wrn": WideResNet,
    "wrn28_10": WideResNet,
    "preresnet": PreResNet,
    "preresnet110": PreResNet,
}


def make_model(name: str, **kw) -> nn.Module:
    """Build a model by name with keyword arguments passed to its class.

    Names (case-insensitive, '-' treated as '_'): "mlp", "logistic_regression"/"logreg",
    "small_cnn"/"cnn", "vgg16"/"vgg16_bn", "wide_resnet"/"wrn"/"wrn28_10",
    "preresnet"/"preresnet110". "vgg16" without `batch_norm` given means with BN.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"name must be one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[key](**kw)
