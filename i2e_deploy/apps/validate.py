"""Accuracy of any runnable model (checkpoint, ONNX, TensorRT engine) on a labelled folder:
top-1/top-5, per-class accuracy and the confusion matrix."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..card import ModelCard
from ..errors import I2EError
from ..fileio import atomic_output
from ..images import Readable, skip_unreadable
from ..training import data as D
from ..training.eventsets import EventFolder, is_event_folder, read_labelled


@dataclass
class Report:
    classes: list[str]
    confusion: np.ndarray  # [true, predicted] counts
    top5_correct: int
    model: str = ""
    data: str = ""
    heldout: dict[str, Any] = field(default_factory=dict)  # val_split / seed when a split was used
    skipped: list[str] = field(default_factory=list)  # unreadable files left out

    @property
    def images(self) -> int:
        return int(self.confusion.sum())

    @property
    def top1(self) -> float:
        return 100.0 * float(np.trace(self.confusion)) / max(self.images, 1)

    @property
    def top5(self) -> float:
        return 100.0 * self.top5_correct / max(self.images, 1)

    def per_class(self) -> dict[str, float | None]:
        """Accuracy in percent per class (None for a class without images)."""
        support = self.confusion.sum(axis=1).tolist()
        return {
            name: 100.0 * int(self.confusion[i, i]) / support[i] if support[i] else None
            for i, name in enumerate(self.classes)
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "images": self.images,
            "per_class": self.per_class(),
            "support": dict(zip(self.classes, self.confusion.sum(axis=1).tolist())),
            "classes": self.classes,
            "confusion": self.confusion.tolist(),
            "model": self.model,
            "data": self.data,
            "skipped": len(self.skipped),
            **self.heldout,
        }


def _label_map(folder_classes: list[str], card: ModelCard) -> tuple[list[int], list[str]]:
    """Model class index of each class folder, and the model's class names. Folders are
    matched by name when the card names its classes, or by label number (the paper's
    datasets name folders 0, 1, ...)."""
    names = list(card.class_names) if card.class_names else None
    if names and all(c in names for c in folder_classes):
        return [names.index(c) for c in folder_classes], names
    if all(c.isdigit() and int(c) < card.num_classes for c in folder_classes):
        return [int(c) for c in folder_classes], names or [str(i) for i in range(card.num_classes)]
    if not names and len(folder_classes) <= card.num_classes:
        # An unnamed model: folders in sorted order are its labels, as at training time.
        return list(range(len(folder_classes))), (
            folder_classes + [str(i) for i in range(len(folder_classes), card.num_classes)]
        )
    unknown = [c for c in folder_classes if not names or c not in names]
    raise I2EError(
        f"class folder(s) {', '.join(unknown[:3])} are not classes of the model "
        f"({', '.join((names or [])[:5])}{', ...' if names and len(names) > 5 else ''})"
    )


def heldout_defaults(card: ModelCard, data: Path, count: int) -> tuple[float, int] | None:
    """(val_split, seed) the model was trained with, when ``data`` looks like the folder it
    was trained on (same name and image count as the card's provenance records)."""
    prov = card.provenance
    split = prov.get("val_split")
    if not split or prov.get("data") != data.name:
        return None
    if prov.get("train_images", -1) + prov.get("heldout_images", -1) != count:
        return None
    return float(split), int(prov.get("seed", 0))


def validate(
    model: str,
    data: str | os.PathLike,
    *,
    device: str = "cpu",
    batch: int = 64,
    workers: int = 2,
    val_split: float | None = None,
    seed: int | None = None,
    backend: str = "auto",
    precision: str = "auto",
    verify: bool = True,
    progress=None,
    log=print,
) -> Report:
    """Run ``model`` over the labelled folder ``data`` (an image folder, or an I2E event
    dataset for event-input models). With ``val_split`` only the part ``train --val-split N
    --seed S`` held out is used; by default the card's own split when ``data`` is the folder
    it was trained on. ``progress(done, total)`` is called after each batch."""
    from ..targets import resolve_runner

    data = Path(data)
    with resolve_runner(
        model, backend=backend, precision=precision, device=device, verify=verify, log=log
    ) as runner:
        card = runner.card
        if runner.output != "logits":
            raise I2EError(
                f"{model} outputs {runner.output}, not class scores; validate a classifier"
            )
        events = is_event_folder(data)
        if events != (card.input == "events"):
            raise I2EError(
                f"{model} takes {card.input} but {data} holds "
                f"{'event samples' if events else 'images'}; use an "
                f"{'image folder' if events else 'I2E event dataset'}"
            )
        if events:
            folder = EventFolder(data)
            classes, samples = folder.classes, folder.samples
        else:
            folder = D.image_folder(data)
            classes, samples = folder.classes, folder.samples
        label_of, names = _label_map(classes, card)
        heldout: dict[str, Any] = {}
        if val_split is None:
            found = heldout_defaults(card, data, len(samples))
            if found:
                val_split, default_seed = found
                seed = default_seed if seed is None else seed
                log(
                    f"evaluating the images held out in training (val_split {val_split:g}, "
                    f"seed {seed}, from the model card); pass --val-split 0 for the whole "
                    "folder"
                )
        if val_split:
            seed = 0 if seed is None else seed
            _, indices = D.split_indices([t for _, t in samples], val_split, seed)
            samples = [samples[i] for i in indices]
            heldout = {"val_split": val_split, "seed": seed}
        samples = [(path, label_of[target]) for path, target in samples]
        dataset = _EventSamples(samples) if events else D.HeldOut(samples, card)
        loader = Readable(
            torch.utils.data.DataLoader(
                dataset, batch_size=batch, num_workers=workers, collate_fn=skip_unreadable
            ),
            data,
        )
        confusion = np.zeros((card.num_classes, card.num_classes), np.int64)
        top5 = done = 0
        for inputs, targets in loader:
            logits = runner.infer(inputs.numpy())
            targets = targets.numpy()
            order = np.argsort(-logits, axis=1)[:, :5]
            np.add.at(confusion, (targets, order[:, 0]), 1)
            top5 += int((order == targets[:, None]).any(axis=1).sum())
            done += len(targets)
            if progress:
                progress(done + len(loader.skipped), len(dataset))
        loader.report()
    return Report(
        names,
        confusion,
        top5,
        model=str(model),
        data=str(data),
        heldout=heldout,
        skipped=[u.path for u in loader.skipped],
    )


class _EventSamples(torch.utils.data.Dataset):
    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        return read_labelled(path, target)


def report_tables(report: Report, max_matrix: int = 20) -> list:
    """rich tables: per-class accuracy, and the confusion matrix for up to ``max_matrix``
    classes."""
    from rich.table import Table
    from rich.text import Text

    per_class = Table(title="per-class accuracy")
    per_class.add_column("class")
    per_class.add_column("top-1 %", justify="right")
    per_class.add_column("images", justify="right")
    support = report.confusion.sum(axis=1).tolist()
    for (name, acc), count in zip(report.per_class().items(), support):
        per_class.add_row(Text(name), "-" if acc is None else f"{acc:.2f}", str(count))
    if len(report.classes) > max_matrix:
        return [per_class]
    matrix = Table(title="confusion (rows: true, columns: predicted)")
    matrix.add_column("")
    for name in report.classes:
        matrix.add_column(Text(name[:6]), justify="right")
    for name, row in zip(report.classes, report.confusion.tolist()):
        matrix.add_row(Text(name), *(str(v) if v else "." for v in row))
    return [per_class, matrix]


def write_json(report: Report, path: str | os.PathLike) -> None:
    _atomic_write(Path(path), lambda fh: fh.write(json.dumps(report.to_dict(), indent=2).encode()))


def plot_confusion(report: Report, path: str | os.PathLike) -> None:
    """Row-normalised confusion matrix as a PNG (matplotlib, imported only here)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise I2EError("--plot needs matplotlib: pip install matplotlib") from None
    count = len(report.classes)
    support = report.confusion.sum(axis=1, keepdims=True)
    rates = report.confusion / np.maximum(support, 1)
    size = max(5.0, 0.45 * count + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    if count <= 30:
        ax.set_xticks(range(count), report.classes, rotation=90)
        ax.set_yticks(range(count), report.classes)
        for i in range(count):
            for j in range(count):
                if report.confusion[i, j]:
                    ax.text(
                        j,
                        i,
                        str(report.confusion[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"top-1 {report.top1:.2f}%  top-5 {report.top5:.2f}%  ({report.images} images)")
    fig.tight_layout()
    _atomic_write(Path(path), lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)


def _atomic_write(path: Path, write) -> None:
    with atomic_output(path) as fh:
        write(fh)
