"""What a model file is: its kind by suffix, and the model card it carries (a checkpoint's
card, an ONNX graph's ``metadata_props``, a TensorRT engine's JSON sidecar), so that export,
runtime and Triton read model files the same way without importing each other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .card import ModelCard
from .errors import I2EError

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt")
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan")
KINDS = {"checkpoint": CHECKPOINT_SUFFIXES, "onnx": ONNX_SUFFIXES, "engine": ENGINE_SUFFIXES}

PRECISIONS = ("fp32", "fp16", "int8")
# SNN-aware INT8 comes in two graphs (exact 0/1 activations, per-channel INT8 weights):
INT8_FLAVOURS = {
    "onnxruntime": "U8S8: uint8 spikes x int8 weights, lowered for ONNX Runtime on x86 CPUs",
    "tensorrt": "S8S8 Q/DQ with zero point 0: TensorRT and ONNX Runtime's GPU providers",
}

# ONNX metadata_props written by the exporter (and kept by the precision passes).
META_PREFIX = "i2e_deploy."
CARD_KEY = META_PREFIX + "card"
PRECISION_KEY = META_PREFIX + "precision"
FLAVOUR_KEY = META_PREFIX + "int8_flavour"
VERIFICATION_KEY = META_PREFIX + "verification"  # the export's verdict, JSON
LAYERS_KEY = META_PREFIX + "layers"  # the model's layer table (model.layers), JSON
SIDECAR_SUFFIX = ".json"


def kind_of(path: str | os.PathLike) -> str:
    """'checkpoint', 'onnx' or 'engine', by the file's suffix."""
    suffix = Path(path).suffix.lower()
    for kind, suffixes in KINDS.items():
        if suffix in suffixes:
            return kind
    known = ", ".join(s for suffixes in KINDS.values() for s in suffixes)
    raise I2EError(f"{path}: unknown model format {suffix or '(no suffix)'}; expected {known}")


def stem(path: str | os.PathLike) -> str:
    """The file name without its model suffixes: ``cifar10_baseline.pth.tar`` ->
    ``cifar10_baseline``."""
    name = Path(path).name
    while Path(name).suffix.lower() in (*CHECKPOINT_SUFFIXES, *ONNX_SUFFIXES, *ENGINE_SUFFIXES):
        name = Path(name).stem
    return name


def read_card(path: str | os.PathLike, **overrides: Any) -> ModelCard:
    """The model card of any model file; ``overrides`` (``load_checkpoint``'s) apply to
    checkpoints, which are the only files whose card is inferred."""
    kind = kind_of(path)
    if kind == "checkpoint":
        from .model.checkpoint import load_checkpoint

        return load_checkpoint(path, **overrides)[1]
    if overrides:
        raise I2EError(
            f"options {sorted(overrides)} apply only to PyTorch checkpoints; an "
            f"{kind} file carries its own card"
        )
    if kind == "onnx":
        return onnx_card(read_metadata(path), path)
    return ModelCard.from_dict(read_engine_sidecar(path)["card"])


def read_precision(path: str | os.PathLike) -> str:
    """fp32, fp16 or int8: what the file computes in (checkpoints are the FP32 reference)."""
    kind = kind_of(path)
    if kind == "onnx":
        return read_metadata(path).get(PRECISION_KEY, "fp32")
    if kind == "engine":
        return read_engine_sidecar(path)["precision"]
    return "fp32"


# --- ONNX graphs ----------------------------------------------------------------------------


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (weights are not read)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise I2EError(f"ONNX file not found: {path}") from None
    except Exception as exc:  # protobuf decode errors have many types
        raise I2EError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from None
    return metadata_of(proto)


def add_metadata(path: str | os.PathLike, entries: dict[str, str]) -> None:
    """Set ``metadata_props`` entries of an ONNX file in place (others are kept)."""
    import onnx

    proto = onnx.load(str(path))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    for key, value in kept + sorted(entries.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def metadata_of(proto) -> dict[str, str]:
    """The ``metadata_props`` of a loaded ``onnx.ModelProto``."""
    return {p.key: p.value for p in proto.metadata_props}


def onnx_card(metadata: dict[str, str], where: str | os.PathLike = "ONNX file") -> ModelCard:
    """The model card in a graph's metadata, so runtimes need no flags."""
    if CARD_KEY not in metadata:
        raise I2EError(
            f"{where} has no i2e-deploy model card in its metadata; export it with "
            "`i2e-deploy export`"
        )
    return ModelCard.from_json(metadata[CARD_KEY])


def default_output(checkpoint: str | os.PathLike, converter_only: bool = False) -> Path:
    """``DIR/name.onnx`` next to the checkpoint (``name_converter.onnx`` for the converter)."""
    path = Path(checkpoint)
    return path.with_name(f"{stem(path)}{'_converter' if converter_only else ''}.onnx")


# --- TensorRT engines -----------------------------------------------------------------------


def engine_sidecar_path(engine: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    engine = Path(engine)
    return engine.with_name(engine.name + SIDECAR_SUFFIX)


def read_engine_sidecar(engine: str | os.PathLike) -> dict:
    """The sidecar JSON of an engine (``export.tensorrt.sidecar_record``): card,
    tensorrt_version, gpu_name, compute_capability ("8.6"), precision, io, profile, and what
    was built (optionally hardware_compatibility / version_compatible)."""
    sidecar = engine_sidecar_path(engine)
    if not sidecar.is_file():
        raise I2EError(
            f"{engine}: engine sidecar {sidecar.name} is missing; rebuild the engine "
            "with `i2e-deploy build`"
        )
    try:
        data = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise I2EError(f"{sidecar}: not valid JSON ({exc})") from None
    required = (
        "card",
        "tensorrt_version",
        "gpu_name",
        "compute_capability",
        "precision",
        "io",
        "profile",
    )
    missing = [k for k in required if k not in data]
    if missing:
        raise I2EError(f"{sidecar}: missing {', '.join(missing)}; rebuild the engine")
    return data


def write_engine_verification(engine: str | os.PathLike, record: dict[str, Any]) -> None:
    """Add the on-target verification verdict to an engine's sidecar (atomically)."""
    from .fileio import atomic_output

    data = read_engine_sidecar(engine)
    data["verification"] = record
    with atomic_output(engine_sidecar_path(engine), "w") as fh:
        fh.write(json.dumps(data, indent=2) + "\n")
