"""Triton Inference Server model repository from an exported graph or a TensorRT engine.

Layout (Triton's model repository convention)::

    REPO/<name>/config.pbtxt
    REPO/<name>/labels.txt          class names from the card, one per line
    REPO/<name>/1/model.onnx        (platform onnxruntime_onnx)  or  1/model.plan (tensorrt_plan)

Inputs and outputs are read from the graph itself (ONNX) or the engine's sidecar, so the
config always matches the file it serves. A dynamic batch dimension becomes ``max_batch_size``
with dynamic batching (for an engine: within its optimization profile, on GPU instances, its
sidecar beside the plan); a static graph is served with ``max_batch_size: 0`` (full shapes).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import engine_sidecar_path, metadata_of, onnx_card, read_engine_sidecar
from ..card import ModelCard
from ..errors import I2EError

# ONNX TensorProto elem_type -> Triton DataType name.
ONNX_TO_TRITON = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
}
NUMPY_TO_TRITON = {
    "float32": "TYPE_FP32",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "bool": "TYPE_BOOL",
    "float16": "TYPE_FP16",
}
LABELS_FILE = "labels.txt"
DEFAULT_MAX_BATCH = 8


@dataclass
class TensorSpec:
    name: str
    data_type: str  # Triton DataType name, e.g. TYPE_UINT8
    shape: list[int]  # full shape; -1 for dynamic dimensions


def onnx_io(path: str | os.PathLike) -> tuple[list[TensorSpec], list[TensorSpec], ModelCard]:
    """Graph inputs/outputs and the model card of an exported ONNX file."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors have many types
        raise I2EError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from None
    initializers = {init.name for init in model.graph.initializer}

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        if tensor.elem_type not in ONNX_TO_TRITON:
            raise I2EError(
                f"{path}: tensor {value.name} has an element type Triton's ONNX "
                f"backend does not take ({tensor.elem_type})"
            )
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        return TensorSpec(value.name, ONNX_TO_TRITON[tensor.elem_type], dims)

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in model.graph.output], onnx_card(metadata_of(model), path)


def engine_io(
    path: str | os.PathLike,
) -> tuple[list[TensorSpec], list[TensorSpec], ModelCard, dict]:
    """Inputs/outputs, card and sidecar of a TensorRT engine (no TensorRT needed)."""
    sidecar = read_engine_sidecar(path)
    try:
        specs = {
            kind: [
                TensorSpec(t["name"], NUMPY_TO_TRITON[t["dtype"]], list(t["shape"]))
                for t in sidecar["io"][kind]
            ]
            for kind in ("inputs", "outputs")
        }
    except (KeyError, TypeError):
        raise I2EError(
            f"{path}: engine sidecar lacks the I/O description; rebuild the engine "
            "with `i2e-deploy build`"
        ) from None
    return specs["inputs"], specs["outputs"], ModelCard.from_dict(sidecar["card"]), sidecar


def plan_batching(sidecar: dict, max_batch_size: int | None) -> tuple[int, list[int]]:
    """Triton's max_batch_size and preferred batch sizes for an engine: within its
    optimization profile (Triton's TensorRT backend refuses a max_batch_size above the
    profile's max, and its dynamic batcher forms batches from 1 up)."""
    low, opt, high = (sidecar["profile"][key][0] for key in ("min", "opt", "max"))
    if low > 1:
        raise I2EError(
            f"the engine's profile starts at batch {low}, but Triton sends batches "
            "from 1 up; rebuild it with --min-batch 1"
        )
    if max_batch_size is not None and max_batch_size > high:
        raise I2EError(
            f"--max-batch {max_batch_size} exceeds the engine's profile max "
            f"({high}); rebuild the engine with --max-batch {max_batch_size}, or "
            f"serve at most {high}"
        )
    size = high if max_batch_size is None else max_batch_size
    preferred = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, opt) if b <= size})
    return size, preferred


def _dims(values: list[int]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def render_config(
    name: str,
    platform: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch_size: int,
    *,
    preferred_batch_sizes: list[int] | None = None,
    max_queue_delay_us: int = 100,
    instance_kind: str = "KIND_AUTO",
    instance_count: int = 1,
    label_output: str | None = None,
    header: str | None = None,
) -> str:
    """config.pbtxt text (protobuf text format of Triton's ``ModelConfig``); ``header`` is a
    comment line on top."""
    batched = max_batch_size > 0
    lines = [f"# {header}"] if header else []
    lines += [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch_size}"]
    for section, tensors in (("input", inputs), ("output", outputs)):
        lines.append(f"{section} [")
        for i, t in enumerate(tensors):
            dims = t.shape[1:] if batched else t.shape
            lines += [
                "  {",
                f'    name: "{t.name}"',
                f"    data_type: {t.data_type}",
                f"    dims: {_dims(dims)}",
            ]
            if section == "output" and t.name == label_output:
                lines.append(f'    label_filename: "{LABELS_FILE}"')
            lines.append("  }" + ("," if i + 1 < len(tensors) else ""))
        lines.append("]")
    if batched:
        preferred = preferred_batch_sizes or [
            b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch_size
        ]
        lines += [
            "dynamic_batching {",
            f"  preferred_batch_size: {_dims(preferred)}",
            f"  max_queue_delay_microseconds: {max_queue_delay_us}",
            "}",
        ]
    lines += [
        "instance_group [",
        "  {",
        f"    count: {instance_count}",
        f"    kind: {instance_kind}",
        "  }",
        "]",
    ]
    return "\n".join(lines) + "\n"


def _model_name(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem) or "model"


def write_repository(
    model_path: str | os.PathLike,
    repo: str | os.PathLike,
    *,
    name: str | None = None,
    max_batch_size: int | None = None,
    version: int = 1,
    max_queue_delay_us: int = 100,
    instance_kind: str = "KIND_AUTO",
    instance_count: int = 1,
) -> Path:
    """Write ``REPO/<name>/`` for an ``.onnx`` graph or a ``.plan``/``.engine`` TensorRT engine
    and return that folder. An existing model folder of the same name is replaced whole.

    ``max_batch_size``: default 8 for a graph; an engine's profile max by default, and never
    above it. Plans run on GPU instances. An engine's sidecar goes next to its plan
    (``1/model.plan.json``) and its TensorRT version and GPU head config.pbtxt: Triton's
    TensorRT backend loads only plans of its own TensorRT version."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise I2EError(f"model file not found: {model_path}")
    if max_batch_size is not None and max_batch_size < 0:
        raise I2EError(f"--max-batch must be >= 0, got {max_batch_size}")
    if instance_kind not in ("KIND_AUTO", "KIND_CPU", "KIND_GPU"):
        raise I2EError(
            f"unknown instance kind {instance_kind!r}; use KIND_AUTO, KIND_CPU or KIND_GPU"
        )
    suffix = model_path.suffix.lower()
    sidecar = None
    if suffix == ".onnx":
        platform, filename = "onnxruntime_onnx", "model.onnx"
        inputs, outputs, card = onnx_io(model_path)
    elif suffix in (".plan", ".engine"):
        platform, filename = "tensorrt_plan", "model.plan"
        inputs, outputs, card, sidecar = engine_io(model_path)
        if instance_kind == "KIND_CPU":
            raise I2EError(
                "TensorRT plans run on GPUs: Triton's TensorRT backend refuses "
                "KIND_CPU instances; use KIND_GPU"
            )
        instance_kind = "KIND_GPU"
    else:
        raise I2EError(
            f"{model_path}: Triton serves .onnx graphs or TensorRT .plan/.engine "
            "files; export one first"
        )
    preferred = None
    batch_dims = {t.shape[0] if t.shape else None for t in inputs + outputs}
    if batch_dims != {-1}:
        max_batch_size = 0  # static graph: Triton must not add a batch dimension
    elif sidecar is not None:
        max_batch_size, preferred = plan_batching(sidecar, max_batch_size)
    elif max_batch_size is None:
        max_batch_size = DEFAULT_MAX_BATCH
    header = (
        None
        if sidecar is None
        else (
            f"TensorRT {sidecar['tensorrt_version']} plan for {sidecar['gpu_name']} (sm "
            f"{sidecar['compute_capability']}): serve it with a Triton whose TensorRT is "
            f"{sidecar['tensorrt_version']}; its sidecar is {version}/{filename}.json"
        )
    )
    name = name or _model_name(model_path)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise I2EError(f"model name {name!r} may only hold letters, digits, '_', '.', '-'")
    label_output = None
    if card.input in ("images", "events") and outputs and len(outputs[0].shape) == 2:
        label_output = outputs[0].name  # logits [N, classes]: Triton can return class labels
    config = render_config(
        name,
        platform,
        inputs,
        outputs,
        max_batch_size,
        preferred_batch_sizes=preferred,
        max_queue_delay_us=max_queue_delay_us,
        instance_kind=instance_kind,
        instance_count=instance_count,
        label_output=label_output,
        header=header,
    )

    repo = Path(repo)
    try:
        repo.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
        staging.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
    except OSError as exc:
        raise I2EError(f"cannot write the Triton repository {repo}: {exc.strerror}") from None
    try:
        (staging / str(version)).mkdir()
        shutil.copyfile(model_path, staging / str(version) / filename)
        if sidecar is not None:
            shutil.copyfile(
                engine_sidecar_path(model_path),
                engine_sidecar_path(staging / str(version) / filename),
            )
        if label_output:
            labels = [card.label(i) for i in range(card.num_classes)]
            (staging / LABELS_FILE).write_text("\n".join(labels) + "\n")
        (staging / "config.pbtxt").write_text(config)
        target = repo / name
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=repo))
            os.replace(target, old / name)
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise I2EError(f"cannot write the Triton repository {repo}: {exc.strerror}") from None
    return target
