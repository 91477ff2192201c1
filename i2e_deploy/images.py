"""Images: reading (unreadable files skipped and counted), preprocessing per the model card,
and the input samples that parity, benchmark, verification, calibration and stream share.

The card's contract: resize the shorter side to ``card.resize`` (``card.interpolation``,
``card.antialias``), centre-crop ``card.imgsz``, RGB uint8 HWC. The graphs scale to [0, 1]
themselves, so the uint8 result is what every runner takes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
from PIL import Image, ImageOps

from .card import ModelCard
from .errors import I2EError, warn

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def preprocess(image: np.ndarray, card: ModelCard) -> np.ndarray:
    """RGB uint8 HWC image of any size -> RGB uint8 ``[imgsz, imgsz, 3]`` per the card."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise I2EError(f"expected an RGB uint8 HxWx3 image, got {image.dtype} {list(image.shape)}")
    height, width = image.shape[:2]
    if min(height, width) == card.resize and height == width == card.imgsz:
        return np.ascontiguousarray(image)
    torchvision = _torchvision()
    if torchvision is None:
        return _preprocess_without_torch(image, card)
    torch, InterpolationMode, F = torchvision
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    tensor = F.resize(
        tensor,
        [card.resize],
        interpolation=InterpolationMode(card.interpolation),
        antialias=card.antialias,
    )
    tensor = F.center_crop(tensor, [card.imgsz, card.imgsz])
    return tensor.permute(1, 2, 0).contiguous().numpy()


@functools.cache
def _torchvision():
    """(torch, InterpolationMode, transforms.v2.functional), or None on an install without
    PyTorch (running exported models needs none)."""
    try:
        import torch
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional
    except ImportError:
        return None
    return torch, InterpolationMode, functional


_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


def _preprocess_without_torch(image: np.ndarray, card: ModelCard) -> np.ndarray:
    """The card's preprocessing through Pillow, whose antialiased resampling torchvision's
    follows: the same sizes and crop; pixels of downscaled images may differ by one grey
    level (fixed-point rounding), upscaled ones are identical (tests/test_runners.py)."""
    height, width = image.shape[:2]
    short, long = sorted((height, width))
    size = (card.resize, int(card.resize * long / short))  # torchvision's rounding
    new_h, new_w = size if height <= width else size[::-1]
    if card.antialias or card.interpolation not in ("bilinear", "bicubic"):
        resized = np.asarray(
            Image.fromarray(image).resize((new_w, new_h), _PIL_FILTERS[card.interpolation])
        )
    else:  # no antialiasing: plain bilinear / bicubic sampling
        flag = cv2.INTER_LINEAR if card.interpolation == "bilinear" else cv2.INTER_CUBIC
        resized = cv2.resize(image, (new_w, new_h), interpolation=flag)
    top = int(round((new_h - card.imgsz) / 2.0))
    left = int(round((new_w - card.imgsz) / 2.0))
    return np.ascontiguousarray(resized[top : top + card.imgsz, left : left + card.imgsz])


class Unreadable(NamedTuple):
    """An input file that could not be decoded, in place of its sample (datasets return it
    so that a data loader's worker does not raise; :func:`skip_unreadable` drops it)."""

    path: str
    reason: str


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 HWC; I2EError if the file is not a complete, readable image. Decoded with
    Pillow, which refuses truncated files (OpenCV would return half an image and print a
    libjpeg warning), with the EXIF orientation applied as OpenCV applies it."""
    try:
        with Image.open(path) as image:
            return np.array(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise I2EError(f"{path}: not a readable image ({reason})") from None


def try_read(path: str | os.PathLike, card: ModelCard) -> np.ndarray | Unreadable:
    """The preprocessed image, or :class:`Unreadable` saying why not."""
    try:
        return preprocess(read_image(path), card)
    except I2EError as exc:
        return Unreadable(str(path), str(exc).split(": ", 1)[-1])


def skip_unreadable(batch: list) -> tuple[Any, list[Unreadable]]:
    """DataLoader ``collate_fn``: the batch without the samples a dataset returned as
    :class:`Unreadable` (None when none is left), and those. It runs in the worker, which
    therefore never raises for a bad file."""
    from torch.utils.data import default_collate

    kept = [sample for sample in batch if not isinstance(sample, Unreadable)]
    return (
        default_collate(kept) if kept else None,
        [sample for sample in batch if isinstance(sample, Unreadable)],
    )


class Readable:
    """Iterate a DataLoader built with :func:`skip_unreadable` as a plain one
    (``for inputs, targets in Readable(loader)``), collecting the skipped files; ``report``
    warns once about them (one line) and raises if nothing was readable."""

    def __init__(self, loader, where: str | os.PathLike):
        self.loader, self.where = loader, where
        self.skipped: list[Unreadable] = []
        self.seen = 0
        self._reported = False

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch, skipped in self.loader:
            self.skipped.extend(skipped)
            self.seen += len(skipped)
            if batch is not None:
                self.seen += len(batch[-1])
                yield batch

    def report(self) -> None:
        if not self._reported:
            self._reported = True
            warn_skipped(self.skipped, self.where, self.seen)


def warn_skipped(skipped: list[Unreadable], where: str | os.PathLike, total: int) -> None:
    """One warning line for the unreadable files of a set; one clear error when none of
    the set is readable."""
    if not skipped:
        return
    first = skipped[0]
    detail = f"first: {first.path}: {first.reason}"
    if len(skipped) == total:
        raise I2EError(f"none of the {total} file(s) under {where} is readable ({detail})")
    warn(f"skipped {len(skipped)} unreadable file(s) of {total} under {where} ({detail})")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under a folder, recursively, in sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise I2EError(f"image folder not found: {folder}")
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


@dataclass
class Loaded:
    """Images read and preprocessed: the uint8 NHWC batch, the files it came from (in
    order), and the files that were skipped as unreadable."""

    images: np.ndarray
    paths: list[Path]
    skipped: list[Unreadable] = field(default_factory=list)


def load_images(
    paths: list[Path],
    card: ModelCard,
    limit: int | None = None,
    where: str | os.PathLike | None = None,
) -> Loaded:
    """Read and preprocess image files (up to ``limit`` readable ones, in order) into one
    uint8 NHWC batch; unreadable files are skipped with one warning line."""
    size = card.imgsz
    wanted = len(paths) if limit is None else min(limit, len(paths))
    batch = np.empty((wanted, size, size, 3), np.uint8)
    kept: list[Path] = []
    skipped: list[Unreadable] = []
    for path in paths:
        if len(kept) == wanted:
            break
        image = try_read(path, card)
        if isinstance(image, Unreadable):
            skipped.append(image)
        else:
            batch[len(kept)] = image
            kept.append(Path(path))
    warn_skipped(
        skipped, where or (Path(paths[0]).parent if paths else "."), len(kept) + len(skipped)
    )
    return Loaded(batch[: len(kept)], kept, skipped)


def load_image_folder(
    folder: str | os.PathLike, card: ModelCard, limit: int | None = None
) -> Loaded:
    """Up to ``limit`` readable images of a folder (recursive, sorted)."""
    paths = list_images(folder)
    if not paths:
        raise I2EError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return load_images(paths, card, limit, folder)


def spread_images(data: str | os.PathLike, card: ModelCard, count: int) -> Loaded:
    """``count`` images of a folder (recursive), spread evenly over its sorted file list so
    that every class folder of an ImageFolder layout contributes."""
    paths = list_images(data)
    if not paths:
        raise I2EError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {data}")
    if len(paths) > count:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, count).round().astype(int)]
    return load_images(paths, card, where=data)


def model_inputs(
    card: ModelCard, data: str | os.PathLike | None, count: int
) -> tuple[np.ndarray, str]:
    """What a model takes, and where it came from: uint8 NHWC images of ``data`` (see
    :func:`spread_images`) or structured random ones; for event models, those images
    through the reference converter."""
    if data is not None:
        loaded = spread_images(data, card, count)
        images, source = loaded.images, f"{len(loaded.images)} images from {data}"
    else:
        images, source = synthetic_images(count, card), f"{count} structured random images"
    if card.input == "events":
        import torch

        from .model.converter import convert

        events = convert(torch.from_numpy(images), card.ratio).transpose(0, 1)
        return events.contiguous().numpy(), source + " as events"
    return images, source


def load_labelled_folder(
    folder: str | os.PathLike, card: ModelCard, limit: int | None = None
) -> tuple[Loaded, np.ndarray, list[str]]:
    """An ImageFolder layout (``DIR/<class>/*.jpg``) as (images, labels, class names).

    Labels index the card's class names when the card has them (folders must match them),
    else the sorted folder names. ``limit`` takes images round-robin over classes so a
    subset stays balanced.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise I2EError(f"image folder not found: {folder}")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise I2EError(
            f"{folder}: no class folders; expected the ImageFolder layout DIR/<class>/<image>"
        )
    names = list(card.class_names) if card.class_names else classes
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise I2EError(
            f"{folder}: class folder(s) {', '.join(unknown[:3])} are not classes of "
            f"the model ({', '.join(names[:5])}, ...)"
        )
    per_class = [[(p, names.index(c)) for p in list_images(folder / c)] for c in classes]
    picked: list[tuple[Path, int]] = []
    for rank in range(max(len(items) for items in per_class)):
        picked.extend(items[rank] for items in per_class if rank < len(items))
    if not picked:
        raise I2EError(f"{folder}: the class folders hold no images")
    label_of = dict(picked)
    loaded = load_images([p for p, _ in picked], card, limit, folder)
    return loaded, np.array([label_of[p] for p in loaded.paths], np.int64), names


def synthetic_images(count: int, card: ModelCard, seed: int = 0) -> np.ndarray:
    """Structured random images (uint8 NHWC at the card size): smooth colour fields, a few
    shapes and mild noise, so the converter sees edges as in photos rather than pure noise."""
    rng = np.random.default_rng(seed)
    size = card.imgsz
    batch = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        coarse = rng.uniform(0, 255, (rng.integers(2, 6), rng.integers(2, 6), 3)).astype(np.float32)
        image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        for _ in range(rng.integers(1, 5)):
            colour = rng.uniform(0, 255, 3).tolist()
            centre = tuple(int(c) for c in rng.integers(0, size, 2))
            if rng.random() < 0.5:
                cv2.circle(image, centre, int(rng.integers(size // 10, size // 3)), colour, -1)
            else:
                corner = tuple(int(c) for c in rng.integers(0, size, 2))
                cv2.rectangle(image, centre, corner, colour, -1)
        image += rng.normal(0, 4, (size, size, 3)).astype(np.float32)
        batch[i] = np.clip(image, 0, 255).astype(np.uint8)
    return batch
