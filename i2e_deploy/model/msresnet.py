"""MS-ResNet-18/34 with membrane shortcuts (SPEC §3): the one model definition.

Tensors flow with time folded into the batch, ``[T*B, C, H, W]`` (T-major); only the LIF
neurons unfold it. Module names equal the released checkpoints' keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..card import ARCHS, ModelCard
from .converter import I2E
from .converter import T as DEFAULT_T
from .neuron import LIF


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that, in training, leaves out the kernel taps which read only zero
    padding for every output position: a padded 3x3 conv on a 1x1 map (layer4 at 32 px
    input) is its centre tap alone. The same sum without the zero terms, up to 9x less work.
    Inference and export keep the whole kernel: INT8 grids are per whole kernel.
    """

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        cropped = _live_taps(input.shape[-2:], self) if self.training else None
        if cropped is None:
            return super()._conv_forward(input, weight, bias)
        (r0, r1, rpad), (c0, c1, cpad) = cropped
        return F.conv2d(
            input,
            weight[:, :, r0:r1, c0:c1],
            bias,
            self.stride,
            (rpad, cpad),
            self.dilation,
            self.groups,
        )


def _live_taps(size, conv: nn.Conv2d):
    """Per spatial axis ``(first tap, end tap, new padding)`` when some taps only ever read
    padding (and cropping keeps the output size), else None."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.dilation != (1, 1):
        return None
    axes = []
    for n, k, s, p in zip(size, conv.kernel_size, conv.stride, conv.padding):
        out = (n + 2 * p - k) // s + 1
        live = [j for j in range(k) if any(0 <= i * s - p + j < n for i in range(out))]
        first, last = live[0], live[-1]
        padding, kernel = p - first, last - first + 1
        if padding < 0 or (n + 2 * padding - kernel) // s + 1 != out:
            return None
        axes.append((first, last + 1, padding))
    if all(a == (0, k, p) for a, k, p in zip(axes, conv.kernel_size, conv.padding)):
        return None
    return axes


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """LIF -> conv3x3 -> BN -> LIF -> conv3x3 -> BN, plus the (membrane) shortcut; no neuron
    after the sum: the next block's first LIF fires on it."""

    def __init__(self, in_planes: int, planes: int, stride: int, T: int):
        super().__init__()
        self.sn1 = LIF(T)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.sn2 = LIF(T)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                LIF(T),
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(self.sn1(x)))
        out = self.bn2(self.conv2(self.sn2(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class MSResNet(nn.Module):
    """Image input ``[B, 3, H, W]`` (float in [0,1] or uint8 NHWC; the I2E converter is the
    first layer) or event input ``[B, T, 2, H, W]``. Returns logits ``[B, classes]``, the
    mean over T of the head."""

    layer1: nn.Sequential  # set by name in __init__: the released checkpoint's keys
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(
        self,
        blocks=(2, 2, 2, 2),
        num_classes: int = 10,
        ratio: float = 0.07,
        input: str = "images",
        T: int = DEFAULT_T,
    ):
        super().__init__()
        self.input = input
        self.T = T
        self.i2e = I2E(ratio)
        self.conv1 = nn.Conv2d(2, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = (64, 128, 256, 512)
        in_planes = 64
        for stage, (planes, count) in enumerate(zip(widths, blocks), start=1):
            stride = 1 if stage == 1 else 2
            layers = [
                BasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1, T)
                for i in range(count)
            ]
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.sn = LIF(T)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def to_events(self, x: torch.Tensor) -> torch.Tensor:
        """Model input -> time-major events ``[T, B, 2, H, W]``."""
        if self.input == "images":
            return self.i2e(x)
        if x.dim() != 5 or x.shape[1] != self.T or x.shape[2] != 2:
            raise ValueError(f"event input must be [B, {self.T}, 2, H, W], got {tuple(x.shape)}")
        return x.transpose(0, 1).float()

    def forward_events(self, events: torch.Tensor) -> torch.Tensor:
        """Time-major events ``[T, B, 2, H, W]`` -> logits ``[B, classes]``."""
        batch = events.shape[1]
        out = self.maxpool(self.bn1(self.conv1(events.flatten(0, 1))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.sn(self.avgpool(out)).flatten(1)
        return self.fc(out).view(self.T, batch, -1).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_events(self.to_events(x))


def build_model(card: ModelCard) -> MSResNet:
    return MSResNet(ARCHS[card.arch], card.num_classes, card.ratio, card.input, card.T)


def msresnet18(num_classes: int = 10, ratio: float = 0.07, input: str = "images") -> MSResNet:
    return MSResNet(ARCHS["msresnet18"], num_classes, ratio, input)


def msresnet34(num_classes: int = 10, ratio: float = 0.07, input: str = "images") -> MSResNet:
    return MSResNet(ARCHS["msresnet34"], num_classes, ratio, input)
