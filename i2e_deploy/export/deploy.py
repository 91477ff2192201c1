"""Deploy transformation: a reference :class:`MSResNet` -> a lean inference module.

The deploy module is *derived* from the reference model, never written a second time: it
walks the reference's modules and

- folds every BatchNorm into the conv before it (weights read from the model, in float64);
- keeps time folded into the batch (``[T*N, C, H, W]``, T-major) for conv / pool / linear;
- unrolls each LIF over T into plain elementwise ops on the ``[N, ...]`` steps one
  equal-part ``Split`` cuts from ``[T*N, ...]`` (no Loop/Scan, no per-step shape arithmetic):
  ``h = decay*v + x; s = float(h >= threshold); v = h - h*s``, six ops per step, spikes
  concatenated back. On ONNX Runtime this is ~50x cheaper than ``Where`` resets with one cast
  of the concatenated booleans (that cast is pathologically slow). A scaled, negated-membrane
  form (``ThresholdedRelu`` reset) measured 15-20 % cheaper still; the calibration package's
  ``rewrite_lif`` produces it from this plain form, which the tools recognise;
- computes the shortcut LIF of a downsampling block once: it sees the same input with the
  same parameters as the block's first LIF, so both convs read the same spikes;
- puts the I2E converter in the graph: colour max, replicate pad, per-image range, eight
  shifted subtractions (bit-identical to the released +-1 kernel conv) and comparisons, with
  the flat-image rule of :func:`i2e_deploy.model.converter.convert` (no events when
  max == min);
- averages the head over T at the end.

Inputs: ``'uint8'`` images ``[N, H, W, 3]`` RGB (x / 255 looked up in the graph), ``'float'`` images
``[N, 3, H, W]`` in [0, 1], or ``'events'`` ``[N, T, 2, H, W]`` float. :class:`DeployConverter`
maps images to uint8 0/1 events ``[N, T, 2, H, W]``.

Layer-wise comparison: :func:`spike_maps` runs a reference model *or* a deploy module and
returns the output of every LIF layer as ``{name: [T, N, ...] float 0/1}`` under the
reference's module names (``layer1.0.sn1``, ..., ``layer2.0.downsample.0``, ``sn``); for a
deploy module the shared shortcut LIF is reported under its reference name too, so the two
dictionaries have the same keys and ``(a[k] == b[k]).float().mean()`` is the spike agreement
of layer ``k``. :func:`run_with_spikes` returns the model output with them (one pass).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..model.converter import EVAL_PAIRS, LEVELS, TIME_ORDER, check_ratio
from ..model.msresnet import BasicBlock, MSResNet
from ..model.neuron import LIF

INPUT_FORMATS = ("uint8", "float", "events")


class _SplitTime(torch.autograd.Function):
    """``x.chunk(T)`` along dim 0, exported as one attribute-only ONNX ``Split`` (equal
    parts), so a dynamic batch needs no shape arithmetic."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, T: int):
        return x.chunk(T)

    @staticmethod
    def symbolic(g, x, T: int):
        return g.op("Split", x, axis_i=0, outputs=T)


def split_time(x: torch.Tensor, T: int) -> tuple[torch.Tensor, ...]:
    """``[T*N, ...]`` (T-major) -> T tensors ``[N, ...]``."""
    return _SplitTime.apply(x, T)


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv with bias computing ``bn(conv(x))`` with BN's running statistics; the folded
    weights are computed in float64 and rounded once."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("a BatchNorm without running statistics cannot be folded")
    fused = copy.deepcopy(conv).requires_grad_(False)
    weight, bias = fuse_conv_bn_weights(
        conv.weight.double(),
        None if conv.bias is None else conv.bias.double(),
        bn.running_mean.double(),
        bn.running_var.double(),
        bn.eps,
        bn.weight.double(),
        bn.bias.double(),
    )
    fused.weight = nn.Parameter(weight.detach().to(conv.weight.dtype), requires_grad=False)
    fused.bias = nn.Parameter(bias.detach().to(conv.weight.dtype), requires_grad=False)
    return fused


class UnrolledLIF(nn.Module):
    """The reference :class:`LIF` (hard reset to 0, membrane 0 at start) unrolled over T.

    Input and output are time-folded ``[T*N, ...]``; the spikes come out as float 0/1.
    """

    def __init__(self, lif: LIF, T: int):
        super().__init__()
        self.T = lif.T or T
        self.decay = 1.0 - 1.0 / lif.tau
        self.v_threshold = float(lif.v_threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spikes = []
        v = None
        for t, x_t in enumerate(split_time(x, self.T)):
            h = x_t if v is None else v * self.decay + x_t
            s = (h >= self.v_threshold).to(x.dtype)
            spikes.append(s)
            if t + 1 < self.T:
                v = h - h * s  # hard reset, exact for s in {0, 1}
        return torch.cat(spikes)

    def extra_repr(self) -> str:
        return f"T={self.T}, decay={self.decay}, v_threshold={self.v_threshold}"


class DeployBlock(nn.Module):
    """:class:`BasicBlock` with folded BN; the shortcut conv reads ``sn1``'s spikes."""

    def __init__(self, block: BasicBlock, T: int):
        super().__init__()
        self.sn1 = UnrolledLIF(block.sn1, T)
        self.conv1 = fold_bn(block.conv1, block.bn1)
        self.sn2 = UnrolledLIF(block.sn2, T)
        self.conv2 = fold_bn(block.conv2, block.bn2)
        self.downsample = None
        if block.downsample is not None:
            lif, conv, bn = block.downsample
            if not (
                isinstance(lif, LIF)
                and isinstance(conv, nn.Conv2d)
                and isinstance(bn, nn.BatchNorm2d)
            ):
                raise ValueError("shortcut is not LIF -> Conv2d -> BatchNorm2d")
            if (lif.tau, lif.v_threshold) != (block.sn1.tau, block.sn1.v_threshold):
                raise ValueError("shortcut LIF differs from the block's first LIF; cannot share")
            self.downsample = fold_bn(conv, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spikes = self.sn1(x)
        out = self.conv2(self.sn2(self.conv1(spikes)))
        return out + (x if self.downsample is None else self.downsample(spikes))


def _replicate_pad(v: torch.Tensor) -> torch.Tensor:
    """1-pixel edge padding from slices and concats: constant bounds for any size, and no
    Pad op (whose form changes at opset 18)."""
    v = torch.cat((v[:, :, :1], v, v[:, :, -1:]), dim=2)
    return torch.cat((v[:, :, :, :1], v, v[:, :, :, -1:]), dim=3)


def _cell(padded: torch.Tensor, cell: tuple[int, int]) -> torch.Tensor:
    """The unpadded-size window of ``padded`` shifted to ``(row, col)`` of the 3x3
    neighbourhood; negative ends keep the slice bounds constant for any image size."""
    row, col = cell
    return padded[:, :, row : row - 2 or None, col : col - 2 or None]


class DeployI2E(nn.Module):
    """Images -> time-folded float events ``[T*N, 2, H, W]``, the reference converter's
    eval semantics bit for bit: shifted subtractions replace the +-1 kernel conv."""

    def __init__(self, ratio: float):
        super().__init__()
        check_ratio(ratio)  # at ratio <= 0 the comparisons below would not be the reference's
        self.ratio = float(ratio)
        # A Gather of the CPU's x / 255 per level, not a Div a GPU provider may turn into a
        # reciprocal multiply (see model.converter): the same events on every device.
        self.levels: torch.Tensor
        self.register_buffer("levels", LEVELS.clone(), persistent=False)
        # (b, a) cell offsets per output timestep: diff = cell(b) - cell(a).
        self.cells = [
            tuple(divmod(c - 1, 3) for c in (EVAL_PAIRS[k][1], EVAL_PAIRS[k][0]))
            for k in TIME_ORDER
        ]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:  # NHWC; the level's intensity from the table
            levels = images.float().amax(dim=-1).unsqueeze(1).long()
            v = self.levels[levels]
        else:
            v = images.amax(dim=1, keepdim=True)
        value_range = v.amax(dim=(1, 2, 3), keepdim=True) - v.amin(dim=(1, 2, 3), keepdim=True)
        # A flat image (range 0) has all differences 0: threshold 1 keeps it silent.
        threshold = value_range * self.ratio + (value_range <= 0).to(v.dtype)
        padded = _replicate_pad(v)
        diffs = torch.cat(
            [_cell(padded, b) - _cell(padded, a) for b, a in self.cells]
        )  # [T*N, 1, H, W]
        threshold = torch.cat([threshold] * len(self.cells))
        return torch.cat(
            ((diffs >= threshold).to(v.dtype), (diffs <= -threshold).to(v.dtype)), dim=1
        )

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, T={len(self.cells)}"


class DeployMSResNet(nn.Module):
    """Inference form of an :class:`MSResNet`; see the module docstring."""

    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, model: MSResNet, input_format: str = "uint8"):
        super().__init__()
        expected = ("events",) if model.input == "events" else ("uint8", "float")
        if input_format not in expected:
            raise ValueError(
                f"input format {input_format!r} does not fit a model with "
                f"{model.input} input; use {' or '.join(expected)}"
            )
        self.input_format = input_format
        self.T = model.T
        self.i2e = DeployI2E(model.i2e.ratio) if model.input == "images" else None
        self.conv1 = fold_bn(model.conv1, model.bn1)
        self.maxpool = model.maxpool
        for stage in range(1, 5):
            blocks = getattr(model, f"layer{stage}")
            setattr(self, f"layer{stage}", nn.Sequential(*(DeployBlock(b, self.T) for b in blocks)))
        self.avgpool = model.avgpool
        self.sn = UnrolledLIF(model.sn, self.T)
        self.fc = model.fc
        self.eval().requires_grad_(False)

    def events(self, x: torch.Tensor) -> torch.Tensor:
        """Graph input -> time-folded float events ``[T*N, 2, H, W]``."""
        if self.i2e is None:
            return torch.cat(x.unbind(1)).float()
        return self.i2e(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(self.conv1(self.events(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.fc(self.sn(self.avgpool(out)).flatten(1))
        return out.reshape(self.T, -1, self.fc.out_features).mean(0)


class DeployConverter(nn.Module):
    """Images -> uint8 0/1 events ``[N, T, 2, H, W]`` (the converter-only graph)."""

    def __init__(self, ratio: float, input_format: str = "uint8"):
        super().__init__()
        if input_format not in ("uint8", "float"):
            raise ValueError(f"converter input format must be uint8 or float, got {input_format!r}")
        self.input_format = input_format
        self.i2e = DeployI2E(ratio)
        self.T = len(self.i2e.cells)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        steps = split_time(self.i2e(images), self.T)  # T x [N, 2, H, W]
        return torch.stack(steps, dim=1).to(torch.uint8)


def deploy(model: MSResNet, input_format: str | None = None) -> DeployMSResNet:
    """The deploy module of ``model`` (uint8 images by default, events for event models)."""
    if input_format is None:
        input_format = "events" if model.input == "events" else "uint8"
    return DeployMSResNet(model, input_format)


def converter(model: MSResNet, input_format: str = "uint8") -> DeployConverter:
    """The converter-only module of ``model``."""
    return DeployConverter(model.i2e.ratio, input_format).eval()


@torch.no_grad()
def run_with_spikes(
    module: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(module(x), spike_maps)`` from one forward pass; see :func:`spike_maps`."""
    T = module.T
    maps: dict[str, torch.Tensor] = {}
    order: list[str] = []
    handles = []
    for name, sub in module.named_modules():
        if isinstance(sub, (LIF, UnrolledLIF)):
            order.append(name)
            handles.append(
                sub.register_forward_hook(
                    lambda _m, _i, out, name=name: maps.__setitem__(
                        name, out.reshape(T, -1, *out.shape[1:]).bool()
                    )
                )
            )
        elif isinstance(sub, nn.Conv2d) and name.endswith(".downsample"):
            order.append(f"{name}.0")  # the shared shortcut LIF, reference position
    try:
        output = module(x)
    finally:
        for handle in handles:
            handle.remove()
    return output, {
        name: maps[name] if name in maps else maps[name.rsplit(".", 2)[0] + ".sn1"]
        for name in order
    }


def spike_maps(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Spikes of every LIF layer, ``{reference name: [T, N, ...] bool}``, for a reference
    :class:`MSResNet` or a :class:`DeployMSResNet` run on input ``x``."""
    return run_with_spikes(module, x)[1]
