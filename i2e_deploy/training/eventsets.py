"""I2E event datasets in the paper's two published layouts, one file per sample in class folders.

- ``npz``: ``numpy.savez_compressed`` of a bool ``[T, 2, H, W]`` array (key ``arr_0``), as the
  paper's conversion notebooks write them.
- ``packed``: a ``.npy`` file holding uint8 bytes: an 8-byte header of four little-endian
  uint16 ``T, C, H, W``, then ``numpy.packbits`` of the flattened bits (the layout of the
  paper's Hugging Face release, ``UESTC-BICS/I2E``).

Datasets written by ``i2e-deploy convert`` also carry ``i2e_dataset.json`` (ratio, size, class
names); the paper's downloads lack it, and readers do not need it.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import I2EError
from ..fileio import atomic_output

FORMATS = {"npz": ".npz", "packed": ".npy"}
SUFFIX_FORMATS = {suffix: name for name, suffix in FORMATS.items()}
META_FILE = "i2e_dataset.json"
_HEADER = np.dtype("<u2")


def pack(events: np.ndarray) -> np.ndarray:
    """bool ``[T, C, H, W]`` -> uint8 header + packed bits (the ``packed`` layout)."""
    if events.ndim != 4:
        raise ValueError(f"events must be [T, C, H, W], got shape {events.shape}")
    header = np.array(events.shape, _HEADER).view(np.uint8)
    return np.concatenate([header, np.packbits(events.reshape(-1))])


def unpack(raw: np.ndarray) -> np.ndarray:
    """The inverse of ``pack``: uint8 bytes -> bool ``[T, C, H, W]``."""
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size < 8:
        raise ValueError("not a packed I2E sample (expected uint8 bytes with an 8-byte header)")
    shape = tuple(int(n) for n in raw[:8].view(_HEADER))
    count = int(np.prod(shape))
    if raw.size - 8 < (count + 7) // 8:
        raise ValueError(f"packed sample of shape {shape} is truncated")
    return np.unpackbits(raw[8:], count=count).reshape(shape).view(np.bool_)


def read_sample(path: str | os.PathLike) -> np.ndarray:
    """One event sample (either layout, by suffix) as bool ``[T, 2, H, W]``."""
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path) as archive:
                events = archive[archive.files[0]]
        else:
            events = np.load(path, allow_pickle=False)
            if events.dtype == np.uint8 and events.ndim == 1:
                events = unpack(events)
    except (OSError, ValueError, IndexError, zipfile.BadZipFile) as exc:
        raise I2EError(f"{path}: not a readable I2E event sample ({exc})") from None
    if events.ndim != 4 or events.shape[1] != 2:
        raise I2EError(f"{path}: expected events [T, 2, H, W], got shape {list(events.shape)}")
    return events.astype(np.bool_, copy=False)


def write_sample(path: str | os.PathLike, events: np.ndarray, fmt: str) -> None:
    """Write one sample atomically (temp file + rename), so an interrupted run leaves no
    half-written file for a resumed run to skip."""
    with atomic_output(path) as fh:
        if fmt == "npz":
            np.savez_compressed(fh, events)
        else:
            np.save(fh, pack(events))


def write_meta(root: str | os.PathLike, meta: dict[str, Any]) -> None:
    with atomic_output(Path(root) / META_FILE, "w") as fh:
        json.dump(meta, fh, indent=2)


def read_meta(root: str | os.PathLike) -> dict[str, Any]:
    path = Path(root) / META_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise I2EError(f"{path}: not valid JSON ({exc})") from None


def class_folders(root: Path) -> list[str]:
    """Class sub-folder names in label order: numeric order when all are integers (the
    paper's datasets name folders by label, and '10' must not sort before '2')."""
    names = [d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if names and all(n.isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def is_event_folder(root: str | os.PathLike) -> bool:
    """True when the first class folder holds event samples (.npz / .npy)."""
    root = Path(root)
    if (root / META_FILE).is_file():
        return True
    for name in class_folders(root) if root.is_dir() else []:
        for entry in sorted((root / name).iterdir()):
            if entry.is_file() and not entry.name.startswith("."):
                return entry.suffix in SUFFIX_FORMATS
    return False


class EventFolder(torch.utils.data.Dataset):
    """``ROOT/<class>/<sample>.npz|.npy`` -> ``(bool events [T, 2, H, W], label)``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise I2EError(f"event dataset folder not found: {self.root}")
        self.meta = read_meta(self.root)
        self.classes = class_folders(self.root)
        if not self.classes:
            raise I2EError(
                f"{self.root}: no class folders; expected ROOT/<class>/<sample>.npz or .npy"
            )
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(
                p
                for p in (self.root / name).rglob("*")
                if p.suffix in SUFFIX_FORMATS and not p.name.startswith(".")
            )
            self.samples.extend((str(p), label) for p in files)
        if not self.samples:
            raise I2EError(f"{self.root}: the class folders hold no .npz or .npy samples")
        self.targets = [label for _, label in self.samples]
        self.class_names = self.meta.get("classes") or self.classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(read_sample(self.samples[0][0]).shape)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        return read_labelled(path, target)


def read_labelled(path: str, target: int):
    """``(events tensor, target)``, or :class:`Unreadable` for a corrupt sample."""
    from ..images import Unreadable

    try:
        return torch.from_numpy(read_sample(path)), target
    except I2EError as exc:
        return Unreadable(path, str(exc).split(": ", 1)[-1])
