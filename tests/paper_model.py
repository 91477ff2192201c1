"""The paper's eager model, built independently of i2e_deploy: the reference for tests and
benchmarks.

A SpikingJelly (activation_based, multi-step) build of the released MS-ResNet with a literal
conv-based I2E converter (SPEC §1), including the released flat-image quirk (range 0 fires
everywhere). Nothing here imports i2e_deploy. Module names give the released state_dict keys,
so weights move between this model and ``i2e_deploy.MSResNet`` with ``load_state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from torch import nn

T = 8
# Kernel k: -1 at cell a, +1 at cell b (cells 1..9 row-major); SPEC §1 eval pairs.
PAPER_PAIRS = ((5, 6), (5, 2), (5, 3), (5, 1), (9, 4), (4, 3), (3, 8), (8, 1))
PAPER_ORDER = [4, 5, 6, 7, 0, 1, 2, 3]


def paper_kernels() -> torch.Tensor:
    weight = torch.zeros(8, 1, 3, 3)
    for k, (a, b) in enumerate(PAPER_PAIRS):
        weight[k, 0].view(-1)[a - 1] = -1.0
        weight[k, 0].view(-1)[b - 1] = 1.0
    return weight


def paper_convert(
    images: torch.Tensor, ratio: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """float NCHW [0,1] images -> events [T, B, 2, H, W], the released semantics verbatim."""
    weight = paper_kernels() if weight is None else weight
    v = images.max(dim=1, keepdim=True).values
    v = F.pad(v, (1, 1, 1, 1), mode="replicate")
    b = v.shape[0]
    value_range = v.view(b, -1).max(dim=1).values - v.view(b, -1).min(dim=1).values
    threshold = (ratio * value_range).view(b, 1, 1, 1)
    d = F.conv2d(v, weight.to(v.dtype), stride=1, padding=0)
    d = d[:, PAPER_ORDER]
    on = (F.relu(d) >= threshold).float()
    off = (F.relu(-d) >= threshold).float()
    return torch.stack([on, off], dim=2).transpose(0, 1).contiguous()  # [T, B, 2, H, W]


def lif() -> neuron.LIFNode:
    return neuron.LIFNode(
        tau=2.0,
        decay_input=False,
        v_threshold=1.0,
        v_reset=0.0,
        surrogate_function=surrogate.ATan(alpha=2.0),
        detach_reset=True,
        step_mode="m",
    )


class PaperBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.sn1 = lif()
        self.conv1 = layer.Conv2d(in_planes, planes, 3, stride, 1, bias=False, step_mode="m")
        self.bn1 = layer.BatchNorm2d(planes, step_mode="m")
        self.sn2 = lif()
        self.conv2 = layer.Conv2d(planes, planes, 3, 1, 1, bias=False, step_mode="m")
        self.bn2 = layer.BatchNorm2d(planes, step_mode="m")
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                lif(),
                layer.Conv2d(in_planes, planes, 1, stride, bias=False, step_mode="m"),
                layer.BatchNorm2d(planes, step_mode="m"),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, B, C, H, W] membrane input
        out = self.bn1(self.conv1(self.sn1(x)))
        out = self.bn2(self.conv2(self.sn2(out)))
        return out + (x if self.downsample is None else self.downsample(x))


class PaperI2E(nn.Module):
    """Released converter layer: a conv whose weight is rewritten with the kernels each forward."""

    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = ratio
        self.weight = nn.Parameter(paper_kernels(), requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.weight.copy_(paper_kernels())
        return paper_convert(images, self.ratio, self.weight)


class PaperMSResNet(nn.Module):
    def __init__(self, blocks, num_classes: int, ratio: float, events: bool = False):
        super().__init__()
        self.events = events
        self.i2e = PaperI2E(ratio)
        self.conv1 = layer.Conv2d(2, 64, 7, 2, 3, bias=False, step_mode="m")
        self.bn1 = layer.BatchNorm2d(64, step_mode="m")
        self.maxpool = layer.SeqToANNContainer(nn.MaxPool2d(3, 2, 1))
        in_planes = 64
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
            stride = 1 if stage == 1 else 2
            mods = []
            for i in range(count):
                mods.append(PaperBasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*mods))
        self.avgpool = layer.SeqToANNContainer(nn.AdaptiveAvgPool2d(1))
        self.sn = lif()
        self.flatten = layer.Flatten(start_dim=1, step_mode="m")
        self.fc = layer.Linear(512, num_classes, step_mode="m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self)
        events = x.transpose(0, 1).float() if self.events else self.i2e(x)
        out = self.maxpool(self.bn1(self.conv1(events)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.fc(self.flatten(self.sn(self.avgpool(out))))
        return out.mean(0)


def paper_msresnet18(num_classes: int = 10, ratio: float = 0.07, events: bool = False):
    return PaperMSResNet((2, 2, 2, 2), num_classes, ratio, events)


def paper_msresnet34(num_classes: int = 10, ratio: float = 0.07, events: bool = False):
    return PaperMSResNet((3, 4, 6, 3), num_classes, ratio, events)
