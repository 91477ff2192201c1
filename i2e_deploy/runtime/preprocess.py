"""Image preprocessing per the model card, shared by parity, benchmark, calibration and stream.

The card's contract: resize the shorter side to ``card.resize`` (``card.interpolation``,
``card.antialias``), centre-crop ``card.imgsz``, RGB uint8 HWC. The graphs scale to [0, 1]
themselves, so the uint8 result is what every runner takes.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ..card import ModelCard
from ..errors import I2EError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def preprocess(image: np.ndarray, card: ModelCard) -> np.ndarray:
    """RGB uint8 HWC image of any size -> RGB uint8 ``[imgsz, imgsz, 3]`` per the card."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise I2EError(f"expected an RGB uint8 HxWx3 image, got {image.dtype} {list(image.shape)}")
    height, width = image.shape[:2]
    if min(height, width) == card.resize and height == width == card.imgsz:
        return np.ascontiguousarray(image)
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    tensor = F.resize(tensor, [card.resize], interpolation=InterpolationMode(card.interpolation),
                      antialias=card.antialias)
    tensor = F.center_crop(tensor, [card.imgsz, card.imgsz])
    return tensor.permute(1, 2, 0).contiguous().numpy()


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 HWC; I2EError if the file is not a readable image."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise I2EError(f"{path}: not a readable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under a folder, recursively, in sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise I2EError(f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and p.is_file())


def load_images(paths: list[Path], card: ModelCard) -> np.ndarray:
    """Read and preprocess image files into one uint8 NHWC batch."""
    size = card.imgsz
    batch = np.empty((len(paths), size, size, 3), np.uint8)
    for i, path in enumerate(paths):
        batch[i] = preprocess(read_image(path), card)
    return batch


def load_image_folder(folder: str | os.PathLike, card: ModelCard,
                      limit: int | None = None) -> tuple[np.ndarray, list[Path]]:
    """Up to ``limit`` images of a folder (recursive, sorted) as a uint8 NHWC batch + paths."""
    paths = list_images(folder)
    if not paths:
        raise I2EError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    paths = paths[:limit] if limit else paths
    return load_images(paths, card), paths


def load_labelled_folder(folder: str | os.PathLike, card: ModelCard, limit: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray, list[str]]:
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
        raise I2EError(f"{folder}: no class folders; expected the ImageFolder layout "
                       "DIR/<class>/<image>")
    names = list(card.class_names) if card.class_names else classes
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise I2EError(f"{folder}: class folder(s) {', '.join(unknown[:3])} are not classes of "
                       f"the model ({', '.join(names[:5])}, ...)")
    per_class = [[(p, names.index(c)) for p in list_images(folder / c)] for c in classes]
    picked: list[tuple[Path, int]] = []
    for rank in range(max(len(items) for items in per_class)):
        picked.extend(items[rank] for items in per_class if rank < len(items))
    if not picked:
        raise I2EError(f"{folder}: the class folders hold no images")
    picked = picked[:limit] if limit else picked
    images = load_images([p for p, _ in picked], card)
    return images, np.array([label for _, label in picked], np.int64), names


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
