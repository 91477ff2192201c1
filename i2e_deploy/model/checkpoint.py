"""Load and save checkpoints safely (never unpickling code).

Formats read: the paper's released dict ``{"epoch", "state_dict", "best_acc1"}`` with the
``module.`` prefix, a bare state_dict, and ours ``{"format": "i2e-deploy", "card", "state_dict"}``.
Ours may store conv / linear weights as INT8 with per-output-channel scales (``"int8_weights"``
and ``"weight_scales"``, outside ``"state_dict"`` so that code unaware of them fails on the
missing keys instead of loading integers as weights), a lossless format for INT8-exact models.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..card import ARCHS, ModelCard, default_resolution, sha256_file
from ..errors import I2EError
from ..fileio import atomic_path
from .msresnet import MSResNet, build_model

FORMAT = "i2e-deploy"
FORMAT_VERSION = 1
_PREFIXES = ("module.", "_orig_mod.")


def _read(path: Path) -> Any:
    if not path.is_file():
        raise I2EError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise I2EError(f"{path}: the file is empty, not a checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler names the blocked GLOBAL when a file references code.
        if "GLOBAL" in str(exc):
            raise I2EError(
                f"{path}: refused to load: the file holds Python objects other than "
                "tensors (unpickling them could run code); re-save it as a plain "
                "state_dict"
            ) from None
        raise I2EError(f"{path}: not a PyTorch checkpoint (unreadable pickle data)") from None
    except Exception as exc:  # torch.load raises many types on garbage input
        detail = str(exc).strip().split(". ")[0] if isinstance(exc, RuntimeError) else ""
        raise I2EError(
            f"{path}: not a readable PyTorch checkpoint (truncated, corrupt or "
            f"another file type){': ' + detail if detail else ''}"
        ) from None


def _strip(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise I2EError(f"state_dict entry {key!r} is not a named tensor")
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _split(obj: Any) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """(format, state_dict, extras)."""
    if not isinstance(obj, dict) or not obj:
        raise I2EError(
            "file is not a checkpoint: expected a dict of tensors or a dict with "
            "a 'state_dict' entry"
        )
    if obj.get("format") == FORMAT:
        return (
            "i2e-deploy",
            {
                **_strip(obj["state_dict"]),
                **_dequantize(obj.get("int8_weights") or {}, obj.get("weight_scales") or {}),
            },
            obj,
        )
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict):
            return "released", _strip(obj[key]), obj
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "state_dict", _strip(obj), {}
    raise I2EError("file is not a checkpoint: no 'state_dict' entry and not a dict of tensors")


def infer_arch(state_dict: dict[str, torch.Tensor]) -> str:
    counts = []
    for stage in range(1, 5):
        blocks = {
            int(m.group(1)) for k in state_dict if (m := re.match(rf"layer{stage}\.(\d+)\.", k))
        }
        counts.append(max(blocks) + 1 if blocks else 0)
    for arch, layout in ARCHS.items():
        if tuple(counts) == layout:
            return arch
    if not any(counts):
        raise I2EError(
            "checkpoint has no MS-ResNet blocks (no 'layer1.0.*' keys); "
            "is this an I2E MS-ResNet checkpoint?"
        )
    raise I2EError(
        f"block layout {counts} matches no supported arch "
        f"({', '.join(f'{a}={list(blocks)}' for a, blocks in ARCHS.items())})"
    )


def _check_keys(model: MSResNet, state_dict: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and k != "i2e.weight"]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        raise I2EError(f"checkpoint lacks {len(missing)} keys the model needs, e.g. {missing[0]!r}")
    if unexpected:
        raise I2EError(
            f"checkpoint has {len(unexpected)} keys this model does not know, e.g. "
            f"{unexpected[0]!r}"
        )
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise I2EError(
                f"checkpoint key {key!r} has shape {list(value.shape)}, the model "
                f"expects {list(expected[key].shape)}"
            )


def load_checkpoint(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    ratio: float | None = None,
    imgsz: int | None = None,
    events: bool | None = None,
    class_names: list[str] | None = None,
) -> tuple[MSResNet, ModelCard]:
    """Load any supported checkpoint as ``(model in eval mode, card)``.

    Values the file does not record are inferred and listed in ``card.inferred``; the keyword
    arguments override them (and must agree with the weights).
    """
    path = Path(path)
    fmt, state_dict, extras = _split(_read(path))
    if fmt == "i2e-deploy":
        card = ModelCard.from_dict(dict(extras["card"]))
        card.inferred = []
    else:
        card = _card_from_weights(path, state_dict, events)
    _apply_overrides(card, state_dict, arch, num_classes, ratio, imgsz, events, class_names)
    card.provenance.update({"source": path.name, "sha256": sha256_file(path), "format": fmt})
    for key in ("epoch", "best_acc1"):
        if key in extras and fmt != "i2e-deploy":
            value = extras[key]
            card.provenance[key] = value.item() if isinstance(value, torch.Tensor) else value
    model = build_model(card)
    _check_keys(model, state_dict)
    state_dict.setdefault("i2e.weight", model.i2e.weight)
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), card


def _card_from_weights(path: Path, state_dict, events: bool | None) -> ModelCard:
    arch = infer_arch(state_dict)
    if "fc.weight" not in state_dict:
        raise I2EError("checkpoint has no 'fc.weight'; cannot tell the number of classes")
    num_classes = int(state_dict["fc.weight"].shape[0])
    imgsz, ratio, resize = default_resolution(num_classes)
    notes = [
        f"arch {arch} from the block layout",
        f"{num_classes} classes from fc.weight",
        f"image size {imgsz}, ratio {ratio} are the paper's defaults for {num_classes} "
        "classes (the file does not record them; override with --imgsz/--ratio)",
    ]
    input_kind = "images"
    if events is None and "dvs" in path.name.lower():
        input_kind = "events"
        notes.append("event input guessed from 'dvs' in the file name (override with --images)")
    return ModelCard(
        arch=arch,
        input=input_kind,
        num_classes=num_classes,
        ratio=ratio,
        imgsz=imgsz,
        resize=resize,
        inferred=notes,
    )


def _apply_overrides(
    card: ModelCard, state_dict, arch, num_classes, ratio, imgsz, events, class_names
) -> None:
    if arch is not None:
        if arch not in ARCHS:
            raise I2EError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        found = infer_arch(state_dict)
        if arch != found:
            raise I2EError(f"--arch {arch} does not match the checkpoint, whose blocks are {found}")
        card.arch = arch
    if num_classes is not None:
        classes = int(state_dict["fc.weight"].shape[0]) if "fc.weight" in state_dict else None
        if classes is not None and num_classes != classes:
            raise I2EError(
                f"--classes {num_classes} does not match the checkpoint's fc layer "
                f"({classes} classes)"
            )
    if ratio is not None:
        if not ratio > 0:
            raise I2EError(f"--ratio must be positive, got {ratio}")
        card.ratio = float(ratio)
        card.inferred = [n for n in card.inferred if "ratio" not in n]
    if imgsz is not None:
        if imgsz < 32:
            raise I2EError(f"--imgsz must be at least 32, got {imgsz}")
        card.resize = max(imgsz, round(card.resize * imgsz / card.imgsz))
        card.imgsz = int(imgsz)
        card.inferred = [n for n in card.inferred if "image size" not in n]
    if events is not None:
        card.input = "events" if events else "images"
        card.inferred = [n for n in card.inferred if "event input" not in n]
    if class_names is not None:
        if len(class_names) != card.num_classes:
            raise I2EError(f"{len(class_names)} class names given for {card.num_classes} classes")
        card.class_names = list(class_names)
    ModelCard.from_dict(card.to_dict())  # re-validate


WEIGHT_DTYPES = ("float32", "float16", "int8")
QMAX = 127  # symmetric per-channel INT8, the grid the INT8 deploy graphs use
GRID_TOLERANCE = 1e-3  # in grid steps: float32 rounding of an on-grid weight is ~1e-5


def _is_int8_storable(key: str, value: torch.Tensor) -> bool:
    # conv / linear weights; the converter's fixed kernel is rebuilt from the card
    return key.endswith(".weight") and value.dim() >= 2 and key != "i2e.weight"


def _channel_scales(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs().flatten(1).amax(1).clamp_min(1e-30) / QMAX


def _broadcast(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scale.view(-1, *[1] * (like.dim() - 1))


def _quantize_weights(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """(the rest of the state, INT8 weights, their per-channel scales)."""
    rest, quantized, scales = dict(state), {}, {}
    for key, value in state.items():
        if not _is_int8_storable(key, value):
            continue
        scale = _channel_scales(value)
        steps = value.float() / _broadcast(scale, value)
        off_grid = float((steps - steps.round()).abs().max())
        if off_grid > GRID_TOLERANCE:
            raise I2EError(
                f"{key} is not on a per-channel INT8 grid (off by up to "
                f"{off_grid:.2f} steps): INT8 storage is lossless only for "
                "INT8-exact models; fine-tune with `i2e-deploy qat` first, or "
                "store float16/float32 weights"
            )
        quantized[key] = steps.round().clamp(-QMAX, QMAX).to(torch.int8)
        scales[key] = scale
        del rest[key]
    return rest, quantized, scales


def _dequantize(
    quantized: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    if (
        not isinstance(quantized, dict)
        or not isinstance(scales, dict)
        or set(quantized) != set(scales)
    ):
        raise I2EError(
            "checkpoint's 'int8_weights' and 'weight_scales' do not match (one "
            "scale vector per INT8 weight); the file is corrupt"
        )
    out = {}
    for key, scale in scales.items():
        value = quantized[key]
        if (
            not isinstance(value, torch.Tensor)
            or value.dtype != torch.int8
            or not isinstance(scale, torch.Tensor)
            or scale.dim() != 1
            or scale.numel() != value.shape[0]
        ):
            raise I2EError(
                f"checkpoint's INT8 weight {key!r} does not match its scales "
                "(one scale per output channel); the file is corrupt"
            )
        out[key] = value.float() * _broadcast(scale.float(), value)
    return out


def save_checkpoint(
    path: str | os.PathLike,
    model: MSResNet,
    card: ModelCard,
    *,
    weights: str = "float32",
    extra: dict[str, Any] | None = None,
) -> None:
    """Write our format atomically; loadable with ``weights_only=True``.

    ``weights``: ``float32``; ``float16`` (conv/linear/BN weights and biases, half the size);
    or ``int8`` (conv/linear weights per-channel INT8, a quarter of the size, lossless and
    accepted only for INT8-exact models).
    """
    if weights not in WEIGHT_DTYPES:
        raise I2EError(f"unknown weight storage {weights!r}; choose {', '.join(WEIGHT_DTYPES)}")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    quantized: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    if weights == "float16":
        state = {
            k: v.half() if v.is_floating_point() and k.endswith(("weight", "bias")) else v
            for k, v in state.items()
        }
    elif weights == "int8":
        state, quantized, scales = _quantize_weights(state)
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "card": card.to_dict(),
        "state_dict": state,
        **({"int8_weights": quantized, "weight_scales": scales} if scales else {}),
        **(extra or {}),
    }
    atomic_save(payload, path)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
