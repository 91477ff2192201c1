"""Image folder -> I2E event dataset (``i2e-deploy convert``).

Worker processes decode and resize (the deployment preprocessing), the main process converts
whole batches with the exact uint8 converter, and a thread pool compresses and writes. Outputs
that already exist are skipped, so an interrupted run resumes; each file appears atomically.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import I2EError
from ..images import Readable, skip_unreadable
from ..model.converter import T, convert_uint8
from . import data as D
from .eventsets import FORMATS, read_meta, write_meta, write_sample
from .train import build_card


@dataclass
class ConvertStats:
    written: int
    skipped: int  # already converted (a resumed run)
    seconds: float
    unreadable: int = 0  # source images that could not be decoded, left out

    @property
    def rate(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def convert_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    fmt: str = "npz",
    *,
    ratio: float | None = None,
    imgsz: int | None = None,
    batch: int = 256,
    workers: int = 2,
    writers: int | None = None,
    progress=None,
) -> ConvertStats:
    """Convert every image of ``src`` (``SRC/<class>/<image>``) into ``DST/<class>/<name>``
    with the ``fmt`` suffix. ``ratio`` and ``imgsz`` default to the paper's settings for the
    class count. ``progress(done, total)`` is called after each batch."""
    if fmt not in FORMATS:
        raise I2EError(f"unknown format {fmt!r}; choose {' or '.join(FORMATS)}")
    src, dst = Path(src), Path(dst)
    folder = D.image_folder(src)
    card = build_card("msresnet18", folder.classes, imgsz, ratio)
    meta = {
        "format": fmt,
        "ratio": card.ratio,
        "imgsz": card.imgsz,
        "resize": card.resize,
        "T": T,
        "classes": folder.classes,
        "source": src.name,
        "converter": "i2e-deploy",
    }
    previous = read_meta(dst)
    clash = {
        k: (previous[k], meta[k])
        for k in ("format", "ratio", "imgsz", "resize")
        if k in previous and previous[k] != meta[k]
    }
    if clash:
        key, (old, new) = next(iter(clash.items()))
        raise I2EError(
            f"{dst} already holds a dataset with {key} {old} (asked for {new}); "
            "choose another destination or matching settings"
        )
    suffix = FORMATS[fmt]
    targets = [
        dst
        / folder.classes[label]
        / Path(path).relative_to(src / folder.classes[label]).with_suffix(suffix)
        for path, label in folder.samples
    ]
    todo = [i for i, target in enumerate(targets) if not target.exists()]
    dst.mkdir(parents=True, exist_ok=True)
    write_meta(dst, meta)
    for parent in {targets[i].parent for i in todo}:
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(".*.tmp"):  # left by an interrupted run
            stale.unlink(missing_ok=True)

    began = time.perf_counter()
    images = D.HeldOut([(folder.samples[i][0], i) for i in todo], card)
    loader = Readable(
        torch.utils.data.DataLoader(
            images, batch_size=batch, num_workers=workers, collate_fn=skip_unreadable
        ),
        src,
    )
    buffer = np.empty((batch, T, 2, card.imgsz, card.imgsz), np.bool_)
    done = 0
    with ThreadPoolExecutor(writers or os.cpu_count() or 1) as pool:
        for pixels, indices in loader:
            count = len(indices)
            events = convert_uint8(pixels.numpy(), card.ratio, time_major=False, out=buffer[:count])
            # Wait for the writes before the buffer is refilled.
            list(
                pool.map(
                    lambda j: write_sample(targets[int(indices[j])], events[j], fmt),  # noqa: B023
                    range(count),
                )
            )
            done += count
            if progress:
                progress(done + len(loader.skipped), len(todo))
    if todo:
        loader.report()
    return ConvertStats(
        done, len(targets) - len(todo), time.perf_counter() - began, unreadable=len(loader.skipped)
    )
