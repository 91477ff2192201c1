"""Tiny real image folders for the training, dataset, convert and val tests: a few dozen
CIFAR-10 JPEGs from ../shared (tests skip without it)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_TAR = SHARED / "data" / "cifar10-train.tar.gz"


@functools.cache
def _extract(classes: int, per_class: int) -> Path:
    root = Path(tempfile.mkdtemp(prefix="i2e-train-tests-")) / "cifar"
    atexit.register(shutil.rmtree, root.parent, True)
    counts: dict[str, int] = {}
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or not member.name.endswith(".jpg"):
                continue
            label = parts[1]
            if label not in counts and len(counts) == classes:
                if all(n == per_class for n in counts.values()):
                    break
                continue
            if counts.get(label, 0) == per_class:
                continue
            counts[label] = counts.get(label, 0) + 1
            target = root / label / parts[2]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return root


def cifar_folder(tmp_path: Path, classes: int = 3, per_class: int = 8) -> Path:
    """A copy (so tests may add files) of ``classes`` x ``per_class`` CIFAR-10 training
    images in the ImageFolder layout."""
    if not CIFAR_TAR.is_file():
        pytest.skip("../shared/data/cifar10-train.tar.gz not present")
    target = tmp_path / "images"
    shutil.copytree(_extract(classes, per_class), target)
    return target


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the box has 2 cores; tests share them
    yield
    torch.set_num_threads(threads)
