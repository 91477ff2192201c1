"""Image datasets for training: ImageFolder trees, deterministic held-out splits, the
paper's augmentations (SPEC §4 preprocessing for evaluation)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from ..card import ModelCard
from ..errors import I2EError
from ..images import Unreadable, preprocess, try_read


class CardPreprocess:
    """The deployment preprocessing (``images.preprocess``: resize the shorter
    side, centre-crop) as a transform: PIL or RGB uint8 HWC -> uint8 HWC tensor. Held-out
    accuracy during training is thereby measured on the pixels ``val`` and runners see."""

    def __init__(self, card: ModelCard):
        self.card = card

    def __call__(self, image) -> torch.Tensor:
        return torch.from_numpy(preprocess(np.array(image), self.card))


def eval_transform(card: ModelCard) -> transforms.Compose:
    """The deployment preprocessing, as float CHW in [0, 1] (no mean/std normalisation)."""
    return transforms.Compose([CardPreprocess(card), _uint8_hwc_to_float])


def _uint8_hwc_to_float(image: torch.Tensor) -> torch.Tensor:
    return image.permute(2, 0, 1).float().div_(255.0)


def train_transform(card: ModelCard, style: str, source_size: int) -> transforms.Compose:
    """Baseline-II augmentation. 'cifar': edge-pad 4, random crop to the source size, resize,
    flip. 'imagenet': random resized crop + flip. 'none': the eval transform."""
    if style == "none":
        return eval_transform(card)
    if style == "cifar":
        return transforms.Compose(
            [
                transforms.Pad(4, padding_mode="edge"),
                transforms.RandomCrop(source_size),
                transforms.Resize(
                    card.imgsz, interpolation=InterpolationMode.BILINEAR, antialias=True
                ),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
            ]
        )
    if style == "imagenet":
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(card.imgsz, antialias=True),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
            ]
        )
    raise I2EError(f"unknown augmentation {style!r}; choose cifar, imagenet or none")


def image_folder(root: str | os.PathLike) -> datasets.ImageFolder:
    root = Path(root)
    if not root.is_dir():
        raise I2EError(f"data folder not found: {root}")
    try:
        return datasets.ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as exc:
        raise I2EError(
            f"{root} is not an image folder with one sub-folder per class: "
            f"{str(exc).splitlines()[0]}"
        ) from None


def source_size(folder: datasets.ImageFolder) -> int:
    """The shorter side of the folder's first readable image."""
    for path, _ in folder.samples:
        try:
            with Image.open(path) as img:
                return min(img.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
    raise I2EError(f"none of the {len(folder.samples)} images under {folder.root} is readable")


def split_indices(
    targets: list[int], holdout: int | float, seed: int
) -> tuple[list[int], list[int]]:
    """Stratified, deterministic (train, held-out) split. ``holdout`` is a count or a fraction.

    The same targets, holdout and seed always give the same split, so a model's card can
    name its held-out set by (holdout, seed).
    """
    total = len(targets)
    count = (
        int(round(holdout * total)) if isinstance(holdout, float) and holdout < 1 else int(holdout)
    )
    if not 0 <= count < total:
        raise I2EError(f"--val-split {holdout} leaves no training data ({total} images)")
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    generator = torch.Generator().manual_seed(seed)
    held: list[int] = []
    for target in sorted(by_class):
        members = by_class[target]
        share = round(count * len(members) / total)
        order = torch.randperm(len(members), generator=generator).tolist()
        held.extend(members[i] for i in order[:share])
    held_set = set(held)
    return [i for i in range(total) if i not in held_set], sorted(held)


class Subset(torch.utils.data.Dataset):
    """A view of an ImageFolder with its own transform (train and held-out differ)."""

    def __init__(self, folder: datasets.ImageFolder, indices: list[int], transform):
        self.folder, self.indices, self.transform = folder, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        path, target = self.folder.samples[self.indices[i]]
        try:
            with Image.open(path) as img:
                return self.transform(img.convert("RGB")), target
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return Unreadable(path, str(exc) or type(exc).__name__)


class HeldOut(torch.utils.data.Dataset):
    """Evaluation images decoded and preprocessed exactly as deployment does
    (``read_image`` + ``preprocess``) -> ``(uint8 HWC tensor, label)``, or
    :class:`Unreadable` for a file that cannot be decoded."""

    def __init__(self, samples: list[tuple[str, int]], card: ModelCard):
        self.samples, self.card = samples, card

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        image = try_read(path, self.card)
        if isinstance(image, Unreadable):
            return image
        return torch.from_numpy(image), target
