"""The I2E converter (SPEC §1): image -> 8 binary ON/OFF event frames.

Each kernel is a difference of two pixels of the 3x3 neighbourhood, so the convolution is
computed as shifted subtractions of the padded intensity: bit-identical to the released
conv (the seven zero products add exactly) and several times cheaper.
"""
from __future__ import annotations

import torch
from torch import nn

T = 8
# (a, b) cell pairs, cells numbered 1..9 row-major; kernel = +1 at b, -1 at a.
EVAL_PAIRS = ((5, 6), (5, 2), (5, 3), (5, 1), (9, 4), (4, 3), (3, 8), (8, 1))
# Training-time alternatives per kernel; first entry is the eval choice.
TRAIN_GROUPS = (
    ((5, 6), (1, 2), (2, 3), (4, 5), (7, 8), (8, 9)),
    ((5, 2), (4, 1), (6, 3), (7, 4), (8, 5), (9, 6)),
    ((5, 3), (4, 2), (7, 5), (8, 6)),
    ((5, 1), (6, 2), (8, 4), (9, 5)),
    ((9, 4), (6, 1)),
    ((4, 3), (7, 6)),
    ((3, 8), (2, 7)),
    ((8, 1), (9, 2)),
)
# Output timestep t uses kernel TIME_ORDER[t]; every released model was trained with it.
TIME_ORDER = (4, 5, 6, 7, 0, 1, 2, 3)


def pairs_to_kernels(pairs) -> torch.Tensor:
    """[len(pairs), 1, 3, 3] float kernels, -1 at cell a and +1 at cell b."""
    weight = torch.zeros(len(pairs), 1, 3, 3)
    for k, (a, b) in enumerate(pairs):
        weight[k, 0, (a - 1) // 3, (a - 1) % 3] = -1.0
        weight[k, 0, (b - 1) // 3, (b - 1) % 3] = 1.0
    return weight


def intensity(images: torch.Tensor) -> torch.Tensor:
    """Max over colour channels as float in [0, 1], [B, 1, H, W].

    Accepts float NCHW in [0, 1] or uint8 NHWC (what a camera gives). The max is taken
    before scaling, which is exact because x -> x/255 is monotone.
    """
    if images.dim() != 4:
        raise ValueError(f"expected a 4-D image batch, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        if images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be NHWC RGB, got shape {tuple(images.shape)}")
        return images.amax(dim=-1).unsqueeze(1).float().div_(255.0)
    if images.shape[1] != 3:
        raise ValueError(f"float images must be NCHW RGB, got shape {tuple(images.shape)}")
    return images.amax(dim=1, keepdim=True).float()


def convert(images: torch.Tensor, ratio: float, pairs=EVAL_PAIRS,
            order=TIME_ORDER) -> torch.Tensor:
    """Events [T, B, 2, H, W] as float 0/1 (channel 0 = ON, 1 = OFF).

    Deviation from the released code: a perfectly flat image (max == min) emits no events,
    where the released code fires everywhere (0 >= 0). Otherwise bit-exact.
    """
    v = intensity(images)
    height, width = v.shape[-2:]
    padded = nn.functional.pad(v, (1, 1, 1, 1), mode="replicate")
    flat = padded.flatten(1)
    value_range = flat.amax(dim=1) - flat.amin(dim=1)
    threshold = (value_range * ratio).view(1, -1, 1, 1)
    live = (value_range > 0).view(1, -1, 1, 1)

    def cell(c: int) -> torch.Tensor:
        r, q = (c - 1) // 3, (c - 1) % 3
        return padded[:, 0, r:r + height, q:q + width]

    diffs = torch.stack([cell(b) - cell(a) for a, b in (pairs[k] for k in order)])  # [T,B,H,W]
    # max(D, 0) >= threshold as released: with ratio 0 every position fires both polarities.
    on = (diffs.clamp(min=0) >= threshold) & live
    off = ((-diffs).clamp(min=0) >= threshold) & live
    return torch.stack((on, off), dim=2).float()


class I2E(nn.Module):
    """Image-to-events converter as an ``nn.Module`` (the model's first layer).

    In train mode each kernel draws its pixel pair at random from its group, once per
    forward (the paper's augmentation); in eval mode the fixed pairs are used.
    ``weight`` holds the eval kernels so released checkpoints' ``i2e.weight`` key loads; the
    released code rewrites it in every forward, so forward never reads it.
    """

    def __init__(self, ratio: float = 0.07):
        super().__init__()
        self.ratio = float(ratio)
        self.register_buffer("weight", pairs_to_kernels(EVAL_PAIRS))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pairs = EVAL_PAIRS
        if self.training:
            picks = [torch.randint(len(g), ()).item() for g in TRAIN_GROUPS]
            pairs = tuple(g[i] for g, i in zip(TRAIN_GROUPS, picks))
        return convert(images, self.ratio, pairs)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, T={T}"
