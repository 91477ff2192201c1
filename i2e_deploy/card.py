"""ModelCard: everything a tool needs to run a model without asking the user again.

It travels with our checkpoints, in ONNX ``metadata_props`` and in engine sidecars.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import I2EError

ARCHS = {"msresnet18": (2, 2, 2, 2), "msresnet34": (3, 4, 6, 3)}
INPUT_KINDS = ("images", "events")
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def default_resolution(num_classes: int) -> tuple[int, float, int]:
    """(imgsz, ratio, resize) the paper used for a class count (SPEC §1, §4)."""
    if num_classes >= 1000:
        return 224, 0.12, 256
    return 128, 0.07, 128


@dataclass
class ModelCard:
    arch: str = "msresnet18"
    input: str = "images"
    num_classes: int = 10
    class_names: list[str] | None = None
    ratio: float = 0.07
    imgsz: int = 128
    T: int = 8
    # Preprocessing: resize the shorter side to `resize`, centre-crop `imgsz`, RGB, [0, 1].
    resize: int = 128
    interpolation: str = "bilinear"
    antialias: bool = True
    provenance: dict[str, Any] = field(default_factory=dict)
    # Human-readable notes about values that were guessed rather than read from the file.
    inferred: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise I2EError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.input not in INPUT_KINDS:
            raise I2EError(f"unknown input kind {self.input!r}; choose images or events")
        if self.num_classes < 1:
            raise I2EError(f"num_classes must be positive, got {self.num_classes}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise I2EError(
                f"{len(self.class_names)} class names given for a model with "
                f"{self.num_classes} classes"
            )
        if not self.ratio > 0:
            raise I2EError(
                f"ratio must be positive, got {self.ratio} (at 0 every pixel fires); "
                "the paper uses 0.07 at 128 px and 0.12 at 224 px"
            )
        if self.imgsz < 32:
            raise I2EError(f"image size must be at least 32 px, got {self.imgsz}")
        if self.resize < self.imgsz:
            raise I2EError(f"resize ({self.resize}) must be >= image size ({self.imgsz})")

    def label(self, index: int) -> str:
        if self.class_names:
            return self.class_names[index]
        return str(index)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise I2EError(
                f"model card has unknown fields {sorted(unknown)}; "
                "was it written by a newer i2e-deploy?"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise I2EError(f"model card is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise I2EError("model card JSON must be an object")
        return cls.from_dict(data)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
