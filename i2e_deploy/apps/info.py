"""``i2e-deploy info FILE``: what any model file is. A checkpoint (card, what was inferred,
parameters, GMACs), an ONNX graph (the card in its metadata, precision, INT8 flavour), a
TensorRT engine (its sidecar: card, precision, TensorRT version, GPU, profile) or a Triton
model folder (config.pbtxt and the model inside); with every verification verdict recorded
for it (an engine's sidecar, this machine's export cache)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..artifacts import (
    ENGINE_SUFFIXES,
    FLAVOUR_KEY,
    INT8_FLAVOURS,
    ONNX_SUFFIXES,
    PRECISION_KEY,
    VERIFICATION_KEY,
    onnx_card,
    read_engine_sidecar,
    read_metadata,
)
from ..card import ModelCard, sha256_file
from ..errors import I2EError


def describe_file(path: str | os.PathLike, **overrides: Any) -> dict[str, Any]:
    """``{"kind", "path", "card", "precision", ...}`` for any model file or Triton folder;
    ``overrides`` (``load_checkpoint``'s) apply to checkpoints only."""
    from ..assets import resolve_model

    path = resolve_model(str(path))
    if path.is_dir():
        return _triton(path)
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES + ENGINE_SUFFIXES and overrides:
        raise I2EError(
            f"options {sorted(overrides)} apply only to PyTorch checkpoints; "
            f"{path.name} carries its own card"
        )
    if suffix in ONNX_SUFFIXES:
        return _onnx(path)
    if suffix in ENGINE_SUFFIXES:
        return _engine(path)
    return _checkpoint(path, **overrides)


def _checkpoint(path: Path, **overrides: Any) -> dict[str, Any]:
    from ..model.profile import describe

    card, stats = describe(path, **overrides)
    exact = bool(card.provenance.get("int8_exact"))
    return {
        "kind": "checkpoint",
        "path": str(path),
        "card": card.to_dict(),
        **stats,
        "precision": "fp32",
        "int8_exact": exact,
        "verification": _verdicts(path),
    }


def _onnx(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise I2EError(f"ONNX file not found: {path}")
    metadata = read_metadata(path)
    card = onnx_card(metadata, path)
    flavour = metadata.get(FLAVOUR_KEY)
    stamp = json.loads(metadata.get(VERIFICATION_KEY, "{}"))
    exported = (
        [{**stamp["export"], "on": "export: ONNX Runtime (CPU)"}] if "export" in stamp else []
    )
    return {
        "kind": "onnx",
        "path": str(path),
        "card": card.to_dict(),
        "precision": metadata.get(PRECISION_KEY, "fp32"),
        "int8_flavour": flavour,
        "int8_flavour_note": INT8_FLAVOURS.get(flavour or ""),
        "reduced_check": stamp.get("reduced"),
        "verification": exported + _verdicts(path),
    }


def _engine(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise I2EError(f"engine file not found: {path}")
    sidecar = read_engine_sidecar(path)
    built = {
        key: sidecar.get(key)
        for key in (
            "tensorrt_version",
            "gpu_name",
            "compute_capability",
            "profile",
            "int8_mode",
            "dla_core",
            "source",
        )
    }
    record = sidecar.get("verification")
    return {
        "kind": "engine",
        "path": str(path),
        "card": sidecar["card"],
        "precision": sidecar["precision"],
        **built,
        "verification": [record] if record else [],
    }


def _triton(folder: Path) -> dict[str, Any]:
    config = folder / "config.pbtxt"
    if not config.is_file():
        raise I2EError(
            f"{folder}: a folder is read as a Triton model (config.pbtxt and a "
            "version folder); there is no config.pbtxt"
        )
    text = config.read_text()
    fields = {key: _field(text, key) for key in ("name", "platform", "max_batch_size")}
    inside = sorted(folder.glob("[0-9]*/model.onnx")) + sorted(folder.glob("[0-9]*/model.plan"))
    if not inside:
        raise I2EError(f"{folder}: no version folder with model.onnx or model.plan")
    model = inside[-1]
    described = _onnx(model) if model.suffix == ".onnx" else _engine(model)
    return {
        **described,
        "kind": "triton",
        "path": str(folder),
        "triton": fields,
        "model": str(model),
    }


def _field(text: str, key: str) -> str | None:
    found = re.search(rf'^\s*{key}\s*:\s*"?([^"\n]*)"?', text, re.MULTILINE)
    return found.group(1).strip() if found else None


def _verdicts(path: Path) -> list[dict[str, Any]]:
    """The verdicts this machine's cache holds for the file (GPU sessions, CUDA graphs)."""
    from ..cache import verdicts_for

    return [
        {k: v for k, v in record.items() if k != "key"} | {"on": _where(record["key"])}
        for record in verdicts_for(sha256_file(path))
    ]


def _where(key: dict[str, Any]) -> str:
    extra = ", ".join(key.get("providers", [])[:1])
    return f"{key.get('runner')} on {key.get('gpu')}" + (f" ({extra})" if extra else "")


def rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The table ``info`` prints (the card's fields first, then what the file is)."""
    card = ModelCard.from_dict(info["card"])
    out = [("file", f"{info['kind']}: {info['path']}")]
    out += [
        (key, str(value))
        for key, value in card.to_dict().items()
        if key not in ("inferred", "provenance")
    ]
    out += [(f"provenance.{key}", str(value)) for key, value in card.provenance.items()]
    out.append(("precision", info["precision"]))
    if info.get("int8_flavour"):
        out.append(("INT8 flavour", f"{info['int8_flavour']} ({info['int8_flavour_note']})"))
    if info["kind"] == "checkpoint":
        out.append(("INT8-exact", "yes" if info["int8_exact"] else "no"))
        out.append(("parameters", f"{info['params']:,}"))
        out.append(
            (
                "GMACs / image",
                f"{info['gmacs_per_image']:.3f} (T={card.T}, {card.imgsz}x{card.imgsz})",
            )
        )
    if info.get("tensorrt_version"):
        out.append(
            (
                "built",
                f"TensorRT {info['tensorrt_version']} on {info['gpu_name']} "
                f"(sm {info['compute_capability']})",
            )
        )
    if info["kind"] == "triton":
        triton = info["triton"]
        out.append(
            (
                "triton",
                f"{triton['name']} ({triton['platform']}, max batch "
                f"{triton['max_batch_size']}): {info['model']}",
            )
        )
    reduced = info.get("reduced_check")
    if reduced:
        verdict = "pass" if reduced["passed"] else "outside its limits (a warning)"
        out.append(
            (
                f"{info['precision']} vs FP32",
                f"{verdict} on {reduced['images']} "
                f"(decisive changes {reduced['decisive_mismatches']})",
            )
        )
    for record in info["verification"]:
        where = record.get("on") or record.get("what")
        out.append(
            (
                "verified",
                f"{'pass' if record['passed'] else 'FAIL'} {where}, "
                f"{record['when']}: {record['summary']}",
            )
        )
    if not info["verification"]:
        out.append(
            (
                "verified",
                "no verdict recorded here (a GPU runner records one when it is first verified)",
            )
        )
    return out
