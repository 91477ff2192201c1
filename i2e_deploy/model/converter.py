"""The I2E converter (SPEC §1): image -> 8 binary ON/OFF event frames.

Each kernel is a difference of two pixels of the 3x3 neighbourhood, so the convolution is
computed as shifted subtractions of the padded intensity: bit-identical to the released
conv (the seven zero products add exactly) and several times cheaper.

uint8 images on the CPU take an integer path (``convert_uint8``) that reproduces the float
comparisons exactly through per-threshold lookup tables, and is much faster again.

A uint8 level becomes its intensity by a lookup in :data:`LEVELS` (computed once on the CPU),
never by a division on the device: PyTorch's CUDA division by a scalar multiplies by its
reciprocal, which rounds 126 of the 256 levels differently, and a tie with the threshold
then gives other events than the CPU. The rest is subtraction, one multiplication and
comparisons, rounded alike on every IEEE device: the same events everywhere.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
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


# The intensity of each uint8 level, x / 255 in float32, divided on the CPU (see above).
LEVELS = torch.arange(256, dtype=torch.float32) / 255.0


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
        return LEVELS.to(images.device)[images.amax(dim=-1).long()].unsqueeze(1)
    if images.shape[1] != 3:
        raise ValueError(f"float images must be NCHW RGB, got shape {tuple(images.shape)}")
    return images.amax(dim=1, keepdim=True).float()


def convert(images: torch.Tensor, ratio: float, pairs=EVAL_PAIRS, order=TIME_ORDER) -> torch.Tensor:
    """Events [T, B, 2, H, W] as float 0/1 (channel 0 = ON, 1 = OFF).

    Deviation from the released code: a perfectly flat image (max == min) emits no events,
    where the released code fires everywhere (0 >= 0). Otherwise bit-exact.
    """
    if images.dtype == torch.uint8 and images.device.type == "cpu":
        return torch.from_numpy(convert_uint8(images.numpy(), ratio, pairs, order)).float()
    return convert_tensor(images, ratio, pairs, order)


def convert_tensor(
    images: torch.Tensor, ratio: float, pairs=EVAL_PAIRS, order=TIME_ORDER
) -> torch.Tensor:
    """``convert`` as tensor operations on the images' device (what a GPU runs)."""
    v = intensity(images)
    height, width = v.shape[-2:]
    padded = nn.functional.pad(v, (1, 1, 1, 1), mode="replicate")
    flat = padded.flatten(1)
    value_range = flat.amax(dim=1) - flat.amin(dim=1)
    threshold = _threshold(value_range, ratio).view(1, -1, 1, 1)
    live = (value_range > 0).view(1, -1, 1, 1)

    def cell(c: int) -> torch.Tensor:
        r, q = (c - 1) // 3, (c - 1) % 3
        return padded[:, 0, r : r + height, q : q + width]

    diffs = torch.stack([cell(b) - cell(a) for a, b in (pairs[k] for k in order)])  # [T,B,H,W]
    # max(D, 0) >= threshold as released: with ratio 0 every position fires both polarities.
    on = (diffs.clamp(min=0) >= threshold) & live
    off = ((-diffs).clamp(min=0) >= threshold) & live
    return torch.stack((on, off), dim=2).float()


def check_ratio(ratio: float) -> None:
    """Models refuse ``ratio <= 0``: every pixel of every image would fire (``convert``
    keeps the released semantics for any ratio, as the SPEC states them)."""
    if not ratio > 0:
        raise ValueError(f"converter ratio must be positive, got {ratio}")


def _threshold(value_range: torch.Tensor, ratio: float) -> torch.Tensor:
    """ratio * range in float32 (torch rounds ``ratio`` to float32 first), as released."""
    return value_range * ratio


# The float intensities uint8 levels map to, and all their pairwise differences
# [a, b] = f(b) - f(a), rounded exactly as the float path rounds them.
_LEVEL_DIFFS = (LEVELS[None, :] - LEVELS[:, None]).numpy()
_CHUNK = 16  # images per work item: keeps a chunk's intermediates in cache


@functools.lru_cache(maxsize=4096)
def _firing_tables(threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For a threshold > 0, tables over the level ``a`` at a kernel's -1 cell: ON fires
    iff ``level_b > on[a]`` and OFF iff ``level_b < off[a]``.

    Exact because f(b) - f(a) is monotone in b: ON needs f(b) - f(a) >= threshold, so b
    must exceed the count of levels below it, minus one; OFF needs f(b) - f(a) <= -threshold.
    """
    limit = np.float32(threshold)
    on = (_LEVEL_DIFFS < limit).sum(axis=1) - 1
    off = (_LEVEL_DIFFS <= -limit).sum(axis=1)
    return on.astype(np.uint8), off.astype(np.uint8)


_SILENT = (np.full(256, 255, np.uint8), np.zeros(256, np.uint8))  # range 0: no events


def _column_shifts(rows: np.ndarray) -> np.ndarray:
    """[B, H+2, W] -> [3, B, H+2, W]: the image seen from the left, centre and right column
    of the 3x3 neighbourhood (edge replicated), so every cell is a contiguous row block."""
    shifts = np.empty((3, *rows.shape), rows.dtype)
    shifts[1] = rows
    shifts[0, :, :, 1:] = rows[:, :, :-1]
    shifts[0, :, :, 0] = rows[:, :, 0]
    shifts[2, :, :, :-1] = rows[:, :, 1:]
    shifts[2, :, :, -1] = rows[:, :, -1]
    return shifts


def _convert_uint8_chunk(images: np.ndarray, ratio: float, pairs, order, out: np.ndarray) -> None:
    """Fill ``out`` [T, b, 2, H, W] (bool) with the events of ``images`` [b, H, W, 3]."""
    count, height, width, _ = images.shape
    rows = np.empty((count, height + 2, width), np.uint8)  # max over colours, rows padded
    v = rows[:, 1:-1]
    np.maximum(images[..., 0], images[..., 1], out=v)
    np.maximum(v, images[..., 2], out=v)
    rows[:, 0], rows[:, -1] = v[:, 0], v[:, -1]
    flat = v.reshape(count, -1)
    value_range = (
        LEVELS[torch.from_numpy(flat.max(axis=1)).long()]
        - LEVELS[torch.from_numpy(flat.min(axis=1)).long()]
    )
    thresholds = _threshold(value_range, ratio).tolist()
    on_rows, off_rows = np.empty_like(rows), np.empty_like(rows)
    fire_all = []
    for i, (live, threshold) in enumerate(zip(value_range.gt(0).tolist(), thresholds)):
        if live and threshold <= 0:  # max(D, 0) >= 0 holds everywhere
            fire_all.append(i)
        on_table, off_table = _firing_tables(threshold) if live and threshold > 0 else _SILENT
        cv2.LUT(rows[i], on_table, dst=on_rows[i])
        cv2.LUT(rows[i], off_table, dst=off_rows[i])
    levels, on_at, off_at = map(_column_shifts, (rows, on_rows, off_rows))
    for t, k in enumerate(order):
        (ra, ca), (rb, cb) = (divmod(c - 1, 3) for c in pairs[k])
        level_b = levels[cb, :, rb : rb + height]
        np.greater(level_b, on_at[ca, :, ra : ra + height], out=out[t, :, 0])
        np.less(level_b, off_at[ca, :, ra : ra + height], out=out[t, :, 1])
    out[:, fire_all] = True


def convert_uint8(
    images: np.ndarray,
    ratio: float,
    pairs=EVAL_PAIRS,
    order=TIME_ORDER,
    time_major: bool = True,
    threads: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 NHWC RGB images -> bool events, bit-identical to ``convert``.

    ``[T, B, 2, H, W]``, or ``[B, T, 2, H, W]`` with ``time_major=False`` (one event
    sample per image, as datasets store them). Chunks run on ``threads`` threads (default:
    torch's thread count); numpy and OpenCV release the GIL. Pass ``out`` to reuse a buffer
    across batches (fresh large allocations cost page faults).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 NHWC RGB images, got {images.dtype} {tuple(images.shape)}"
        )
    count, height, width, _ = images.shape
    steps = len(order)
    shape = (steps, count, 2, height, width) if time_major else (count, steps, 2, height, width)
    if out is None:
        out = np.empty(shape, np.bool_)
    elif out.dtype != np.bool_ or out.shape != shape:
        raise ValueError(f"out must be bool {shape}, got {out.dtype} {tuple(out.shape)}")
    view = out if time_major else out.transpose(1, 0, 2, 3, 4)
    starts = range(0, count, _CHUNK)
    work = [(images[s : s + _CHUNK], ratio, pairs, order, view[:, s : s + _CHUNK]) for s in starts]
    threads = min(threads or torch.get_num_threads(), len(work))
    if threads <= 1:
        for item in work:
            _convert_uint8_chunk(*item)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda item: _convert_uint8_chunk(*item), work))
    return out


class I2E(nn.Module):
    """Image-to-events converter as an ``nn.Module`` (the model's first layer).

    In train mode each kernel draws its pixel pair at random from its group, once per
    forward (the paper's augmentation); in eval mode the fixed pairs are used.
    ``weight`` holds the eval kernels so released checkpoints' ``i2e.weight`` key loads; the
    released code rewrites it in every forward, so forward never reads it.
    """

    weight: torch.Tensor

    def __init__(self, ratio: float = 0.07):
        super().__init__()
        check_ratio(ratio)
        self.ratio = float(ratio)
        self.register_buffer("weight", pairs_to_kernels(EVAL_PAIRS))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pairs: tuple[tuple[int, int], ...] = EVAL_PAIRS
        if self.training:
            picks = [int(torch.randint(len(g), ()).item()) for g in TRAIN_GROUPS]
            pairs = tuple(g[i] for g, i in zip(TRAIN_GROUPS, picks))
        return convert(images, self.ratio, pairs)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, T={T}"
