"""Export a model to ONNX: deploy transform, checks, metadata, verification, atomic write.

``export_onnx(model, card, output)`` (or ``export_onnx(checkpoint, output)``) writes one of
three graphs, chosen by the flags:

=================  ===========================================  =======================
graph              input                                        output
=================  ===========================================  =======================
images (default)   ``images`` uint8 ``[N, H, W, 3]`` RGB, or    ``logits`` float32
                   float32 ``[N, 3, H, W]`` in [0, 1]           ``[N, classes]``
events             ``events`` float32 ``[N, T, 2, H, W]``       ``logits``
converter-only     ``images`` as above                          ``events`` uint8 0/1
                                                                ``[N, T, 2, H, W]``
=================  ===========================================  =======================

The graph is traced from :mod:`.deploy` with PyTorch's TorchScript exporter: measured here
it exports an MS-ResNet-18 in about 2 s against about 30 s for the torch.export-based one,
emits opset 17 natively (that exporter starts at 18, which TensorRT 8.5 / JetPack 5 cannot
read) and, with the deploy module's single-``Split`` time slicing, gives a graph with no
shape arithmetic. ``simplify=True`` runs onnxslim, which folds the exporter's ``Constant``
nodes into initializers (1178 -> 851 nodes for MS-ResNet-18) but measured no ONNX Runtime
speed difference here and adds ~15 s, so it is off by default. The model card and the I/O
contract travel in ``metadata_props`` (:func:`read_card`, :func:`read_metadata`);
:func:`tensorrt_violations` checks a graph against TensorRT's documented ONNX support.

Verification (on by default) runs ONNX Runtime and the reference model on a few dozen
inputs through :func:`i2e_deploy.compare.compare` with its FP32 limits (a decisive top-1
change, spike maps that disagree, a median |Δlogit| too large for the logit spread, or any
event that differs from the reference converter) and fails the export, leaving no file.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..card import ModelCard
from ..errors import I2EError
from ..fileio import atomic_path
from ..model.msresnet import MSResNet
from .deploy import DeployConverter, DeployMSResNet

CARD_KEY = "i2e_deploy.card"
META_PREFIX = "i2e_deploy."
PRODUCER = "i2e-deploy"
DEFAULT_OPSET = 17
OPSETS = range(13, 21)  # equal-part Split needs 13; the TorchScript exporter stops at 20
IMAGE_FORMATS = ("uint8", "float")
GRAPHS = ("images", "events", "converter")
VERIFY_COUNT = 32
_CHECKPOINT_SUFFIXES = (".tar", ".pth", ".pt", ".ckpt")


@dataclass
class ExportResult:
    path: Path
    graph: str
    input_format: str
    nodes: int
    verification: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def default_output(checkpoint: str | os.PathLike, converter_only: bool = False) -> Path:
    """``DIR/name.onnx`` next to the checkpoint (``name_converter.onnx`` for the converter)."""
    path = Path(checkpoint)
    stem = path.name
    while Path(stem).suffix.lower() in _CHECKPOINT_SUFFIXES:
        stem = Path(stem).stem
    return path.with_name(f"{stem}{'_converter' if converter_only else ''}.onnx")


def export_onnx(model: MSResNet | str | os.PathLike, card: ModelCard | str | os.PathLike | None = None,
                output: str | os.PathLike | None = None, *, input_format: str | None = None,
                converter_only: bool = False, batch: int = 1, dynamic: bool = True,
                opset: int = DEFAULT_OPSET, verify: bool = True,
                data: str | os.PathLike | None = None, simplify: bool = False,
                verify_count: int = VERIFY_COUNT, precision: str = "fp32",
                tolerances: dict[str, float] | None = None,
                log: Callable[[str], None] | None = None, **overrides) -> ExportResult:
    """Export ``model`` (with its ``card``) to ``output``; or, given a checkpoint path,
    ``export_onnx(checkpoint, output=None, **overrides)`` loads it first (overrides as in
    :func:`~i2e_deploy.model.checkpoint.load_checkpoint`) and writes next to it by default.

    ``batch`` is the traced batch, fixed in the graph when ``dynamic`` is False.
    ``precision`` names the numeric form written (only 'fp32' here; reduced precisions
    build on this graph).
    """
    if not isinstance(model, nn.Module):
        from ..model.checkpoint import load_checkpoint

        checkpoint = Path(model)
        if output is None and not isinstance(card, ModelCard):
            output = card
        model, card = load_checkpoint(checkpoint, **overrides)
        output = default_output(checkpoint, converter_only) if output is None else output
    elif overrides:
        raise TypeError(f"unexpected arguments {sorted(overrides)} for an in-memory model")
    if not isinstance(card, ModelCard) or output is None:
        raise TypeError("export_onnx(model, card, output) or export_onnx(checkpoint, output)")
    log = log or (lambda _msg: None)
    output = Path(output)
    graph, input_format = _check_options(card, input_format, converter_only, batch, opset,
                                         precision)
    if verify and data is not None and not Path(data).is_dir():
        raise I2EError(f"--data {data} is not a folder; give an image folder (searched "
                       "recursively) or leave it out to verify on structured random images")
    _check_writable(output)

    module = (DeployConverter(card.ratio, input_format) if graph == "converter"
              else DeployMSResNet(model.eval(), input_format))
    proto = trace(module, card, graph, input_format, batch, dynamic, opset)
    if simplify:
        proto = _simplify(proto)
    proto = onnx_shape_inference(proto)
    for problem in tensorrt_violations(proto):
        log(f"warning: TensorRT may not parse this graph: {problem}")
    metadata = _metadata(card, graph, input_format, batch, dynamic, opset, precision)
    set_metadata(proto, metadata)
    _check(proto)

    report = None
    with atomic_path(output) as tmp:
        _save(proto, tmp)
        if verify:
            report = verify_onnx(tmp, model, card, data=data, count=verify_count,
                                 tolerances=tolerances, log=log)
    log(f"wrote {output} ({len(proto.graph.node)} nodes, opset {opset}, "
        f"{'dynamic' if dynamic else f'static {batch}'} batch)")
    return ExportResult(output, graph, input_format, len(proto.graph.node), report, metadata)


def _check_options(card: ModelCard, input_format: str | None, converter_only: bool, batch: int,
                   opset: int, precision: str) -> tuple[str, str]:
    if precision != "fp32":
        raise I2EError(f"precision {precision!r} is not available in this export; use fp32")
    if batch < 1:
        raise I2EError(f"--batch must be at least 1, got {batch}")
    if opset not in OPSETS:
        raise I2EError(f"--opset {opset} is not supported; choose {OPSETS.start}.."
                       f"{OPSETS.stop - 1} (TensorRT 8.5 / JetPack 5 reads up to 17)")
    if card.input == "events":
        if converter_only:
            raise I2EError("--converter-only needs an image-input model (an event-input model "
                           "has no converter); drop --events or --converter-only")
        if input_format not in (None, "float"):
            raise I2EError(f"event-input graphs take float32 events; --input-format "
                           f"{input_format} applies to image models only")
        return "events", "events"
    input_format = input_format or "uint8"
    if input_format not in IMAGE_FORMATS:
        raise I2EError(f"unknown input format {input_format!r}; choose uint8 (NHWC, what a "
                       "camera gives) or float (NCHW in [0, 1])")
    return ("converter" if converter_only else "images"), input_format


def _check_writable(output: Path) -> None:
    if output.is_dir():
        raise I2EError(f"output {output} is a directory; give a file name such as "
                       f"{output / 'model.onnx'}")
    parent = output.parent
    if not parent.is_dir():
        raise I2EError(f"output folder {parent} does not exist; create it or choose another "
                       "--output")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise I2EError(f"cannot write to {parent} ({exc.strerror}); choose another "
                       "--output") from None


def example_input(card: ModelCard, input_format: str, batch: int) -> torch.Tensor:
    size = card.imgsz
    if input_format == "events":
        return torch.zeros(batch, card.T, 2, size, size)
    if input_format == "uint8":
        return torch.zeros(batch, size, size, 3, dtype=torch.uint8)
    return torch.zeros(batch, 3, size, size)


def trace(module: nn.Module, card: ModelCard, graph: str, input_format: str, batch: int,
          dynamic: bool, opset: int):
    """The deploy module as an ``onnx.ModelProto`` (TorchScript exporter)."""
    import onnx

    input_name = "events" if graph == "events" else "images"
    output_name = "events" if graph == "converter" else "logits"
    axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic else None
    # torch.onnx.export documents a path as its target (a file object is not in its API).
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and folding notes
        traced = Path(scratch) / "traced.onnx"
        torch.onnx.export(module.eval(), (example_input(card, input_format, batch),), traced,
                          dynamo=False, opset_version=opset, input_names=[input_name],
                          output_names=[output_name], dynamic_axes=axes,
                          do_constant_folding=True)
        return onnx.load(str(traced))


def _simplify(proto):
    import onnxslim

    return onnxslim.slim(proto)


def onnx_shape_inference(proto):
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True,
                                                 data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise RuntimeError(f"exported graph fails ONNX shape inference: {exc}") from None


def _check(proto) -> None:
    import onnx

    onnx.checker.check_model(proto, full_check=True)


def _save(proto, path: Path) -> None:
    with open(path, "wb") as fh:
        fh.write(proto.SerializeToString())


def _metadata(card: ModelCard, graph: str, input_format: str, batch: int, dynamic: bool,
              opset: int, precision: str) -> dict[str, str]:
    n = "N" if dynamic else batch
    size = card.imgsz
    if input_format == "events":
        inp = {"name": "events", "dtype": "float32", "shape": [n, card.T, 2, size, size],
               "layout": "N,T,polarity(ON,OFF),H,W"}
    elif input_format == "uint8":
        inp = {"name": "images", "dtype": "uint8", "shape": [n, size, size, 3],
               "layout": "NHWC", "color": "RGB", "range": [0, 255]}
    else:
        inp = {"name": "images", "dtype": "float32", "shape": [n, 3, size, size],
               "layout": "NCHW", "color": "RGB", "range": [0, 1]}
    if graph == "converter":
        out = {"name": "events", "dtype": "uint8", "shape": [n, card.T, 2, size, size],
               "layout": "N,T,polarity(ON,OFF),H,W", "values": [0, 1]}
    else:
        out = {"name": "logits", "dtype": "float32", "shape": [n, card.num_classes],
               "meaning": "mean over T of the linear head (no softmax)"}
    return {
        CARD_KEY: card.to_json(),
        f"{META_PREFIX}version": __version__,
        f"{META_PREFIX}graph": graph,
        f"{META_PREFIX}precision": precision,
        f"{META_PREFIX}checkpoint_sha256": str(card.provenance.get("sha256", "")),
        f"{META_PREFIX}input": json.dumps(inp),
        f"{META_PREFIX}output": json.dumps(out),
        f"{META_PREFIX}exporter": f"torch {torch.__version__} TorchScript exporter, opset {opset}",
    }


def set_metadata(proto, metadata: dict[str, str]) -> None:
    """Replace the graph's producer fields and i2e-deploy ``metadata_props``."""
    proto.producer_name = PRODUCER
    proto.producer_version = __version__
    proto.doc_string = "I2E spiking network exported by i2e-deploy"
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    for key, value in kept + sorted(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (weights are not read)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise I2EError(f"ONNX file not found: {path}") from None
    except Exception as exc:  # protobuf decode errors have many types
        raise I2EError(f"{path}: not a readable ONNX file ({type(exc).__name__})") from None
    return {p.key: p.value for p in proto.metadata_props}


def read_card(path: str | os.PathLike) -> ModelCard:
    """The model card an exported graph carries, so runtimes need no flags."""
    metadata = read_metadata(path)
    if CARD_KEY not in metadata:
        raise I2EError(f"{path} has no i2e-deploy model card in its metadata; export it with "
                       "`i2e-deploy export`")
    return ModelCard.from_json(metadata[CARD_KEY])


# --- TensorRT operator table -----------------------------------------------------------------

def tensorrt_table() -> dict[str, Any]:
    """onnx-tensorrt's operator support matrix as recorded in ``data/tensorrt_onnx_ops.json``."""
    from importlib import resources

    return json.loads(resources.files("i2e_deploy").joinpath("data/tensorrt_onnx_ops.json")
                      .read_text())


def tensorrt_violations(proto) -> list[str]:
    """What in an ONNX model falls outside TensorRT's documented ONNX support: operators,
    the data type of each node's first input, and the restrictions the table marks as checked
    (constant axes, UINT8 only at the graph's I/O, 2-D/3-D pooling without dilation or
    indices, Q/DQ zero points of 0, the opset range)."""
    import onnx
    from onnx import TensorProto

    type_names = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16",
                  TensorProto.BFLOAT16: "BF16", TensorProto.INT32: "INT32",
                  TensorProto.INT64: "INT64", TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8",
                  TensorProto.BOOL: "BOOL", TensorProto.DOUBLE: "DOUBLE",
                  TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT4: "INT4"}
    table = tensorrt_table()
    rules = table["checked_restrictions"]
    graph = onnx.shape_inference.infer_shapes(proto).graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*graph.input, *graph.output, *graph.value_info)}
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    types.update({init.name: init.data_type for init in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
            types[node.output[0]] = node.attribute[0].t.data_type
    problems = []
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not table["opset"]["min"] <= opset <= table["opset"]["max"]:
        problems.append(f"opset {opset} outside TensorRT's {table['opset']['min']}.."
                        f"{table['opset']['max']}")
    for node in graph.node:
        where = f"{node.op_type} {node.name or node.output[0]!r}"
        spec = table["operators"].get(node.op_type)
        if node.domain not in ("", "ai.onnx") or spec is None or not spec["supported"]:
            problems.append(f"{where}: operator not supported")
            continue
        if node.input and node.input[0] in types \
                and node.op_type not in rules["types_of_first_input_except"]:
            name = type_names.get(types[node.input[0]], str(types[node.input[0]]))
            if name not in spec["types"]:
                problems.append(f"{where}: input type {name} not in {spec['types']}")
        index = rules["axes_constant"].get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index] \
                and node.input[index] not in constants:
            problems.append(f"{where}: axes input is not a constant")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in rules["pooling_2d_or_3d"] and len(attrs.get("kernel_shape", ())) not in (2, 3):
            problems.append(f"{where}: only 2-D or 3-D pooling")
        if node.op_type in rules["dilations_all_ones"] and any(d != 1 for d in attrs.get("dilations", ())):
            problems.append(f"{where}: dilations must be all ones")
        if node.op_type in rules["single_output"] and len([o for o in node.output if o]) > 1:
            problems.append(f"{where}: Indices output unsupported")
        index = rules["zero_point_zero"].get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index]:
            zero = constants.get(node.input[index])
            if zero is None or np.any(zero != 0):
                problems.append(f"{where}: zero point must be a constant 0")
    io = {v.name for v in (*graph.input, *graph.output)}
    problems += [f"UINT8 tensor {name!r} inside the graph (TensorRT: UINT8 only at the I/O)"
                 for name, kind in types.items() if kind == TensorProto.UINT8 and name not in io]
    return problems


# --- verification ---------------------------------------------------------------------------

def verification_inputs(card: ModelCard, data: str | os.PathLike | None, count: int
                        ) -> tuple[np.ndarray, str]:
    """uint8 NHWC images from ``data`` (recursive, spread over the folder) or structured
    random ones; for event models, those images through the reference converter."""
    from ..runtime.preprocess import list_images, load_images, synthetic_images

    if data is not None:
        paths = list_images(data)
        if not paths:
            raise I2EError(f"no images under {data} to verify the export with")
        picks = np.linspace(0, len(paths) - 1, min(count, len(paths))).round().astype(int)
        loaded = load_images([paths[i] for i in picks], card, where=data)
        images, source = loaded.images, f"{len(loaded.images)} images from {data}"
    else:
        images, source = synthetic_images(count, card), f"{count} structured random images"
    if card.input == "events":
        from ..model.converter import convert

        events = convert(torch.from_numpy(images), card.ratio).transpose(0, 1)
        return events.contiguous().numpy(), source + " as events"
    return images, source


def verify_onnx(path: str | os.PathLike, model: MSResNet, card: ModelCard, *,
                data: str | os.PathLike | None = None, count: int = VERIFY_COUNT,
                tolerances: dict[str, float] | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Compare the graph at ``path`` on ONNX Runtime with the reference ``model``
    (:func:`i2e_deploy.compare.compare`, FP32 limits with ``tolerances`` applied); raise
    I2EError naming the failing check and the ways out when it is not faithful."""
    from ..compare import compare, limits_for
    from ..runtime.runners import OrtRunner, TorchRunner

    log = log or (lambda _msg: None)
    limits = limits_for("fp32", tolerances)
    inputs, source = verification_inputs(card, data, count)
    with TorchRunner(Path(path), loaded=(model, card)) as reference, \
            OrtRunner(Path(path)) as candidate:
        found = compare(reference, candidate, inputs, limits)
    log(f"verify: {source}: {found.summary()}")
    if not found.passed:
        ways = "loosen that limit with --tolerance NAME=VALUE or skip the check with --no-verify"
        if data is None:
            ways = ("structured random images put many inputs near a spike threshold: verify "
                    "on real images with --data DIR, " + ways)
        raise I2EError(f"export verification failed (ONNX Runtime vs the reference model, "
                       f"{source}): {found.failure()}; no file written. If the graph is right, "
                       f"{ways}")
    return {**found.to_dict(), "source": source}
