"""Export a model to ONNX: deploy transform, checks, metadata, atomic write.

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
contract travel in ``metadata_props`` (read by :mod:`i2e_deploy.artifacts`); the graph is
checked against TensorRT's documented ONNX support (:mod:`.tensorrt_ops`).

This writes the graph; :func:`i2e_deploy.targets.build_artifact` is what verifies it against
the reference model and derives the other precisions and formats from it.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..artifacts import CARD_KEY, LAYERS_KEY, META_PREFIX, PRECISION_KEY, default_output
from ..card import ModelCard
from ..errors import I2EError
from ..fileio import atomic_path
from ..model.msresnet import MSResNet
from ..version import __version__
from .deploy import DeployConverter, DeployMSResNet
from .tensorrt_ops import tensorrt_violations

PRODUCER = "i2e-deploy"
DEFAULT_OPSET = 17
OPSETS = range(13, 21)  # equal-part Split needs 13; the TorchScript exporter stops at 20
IMAGE_FORMATS = ("uint8", "float")
GRAPHS = ("images", "events", "converter")


@dataclass
class ExportResult:
    path: Path
    graph: str
    input_format: str
    nodes: int
    metadata: dict[str, str] = field(default_factory=dict)


def export_onnx(
    model: MSResNet | str | os.PathLike,
    card: ModelCard | str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    input_format: str | None = None,
    converter_only: bool = False,
    batch: int = 1,
    dynamic: bool = True,
    opset: int = DEFAULT_OPSET,
    simplify: bool = False,
    log: Callable[[str], None] | None = None,
    **overrides,
) -> ExportResult:
    """Export ``model`` (with its ``card``) to ``output``; or, given a checkpoint path,
    ``export_onnx(checkpoint, output=None, **overrides)`` loads it first (overrides as in
    :func:`~i2e_deploy.model.checkpoint.load_checkpoint`) and writes next to it by default.

    ``batch`` is the traced batch, fixed in the graph when ``dynamic`` is False.
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
    graph, input_format = check_options(card, input_format, converter_only, batch, opset)
    check_writable(output)

    module = (
        DeployConverter(card.ratio, input_format)
        if graph == "converter"
        else DeployMSResNet(model.eval(), input_format)
    )
    proto = trace(module, card, graph, input_format, batch, dynamic, opset)
    if simplify:
        proto = _simplify(proto)
    proto = onnx_shape_inference(proto)
    for problem in tensorrt_violations(proto):
        log(f"warning: TensorRT may not parse this graph: {problem}")
    metadata = _metadata(card, graph, input_format, batch, dynamic, opset)
    set_metadata(proto, metadata)
    _check(proto)
    with atomic_path(output) as tmp:
        _save(proto, tmp)
    log(
        f"wrote {output} ({len(proto.graph.node)} nodes, opset {opset}, "
        f"{'dynamic' if dynamic else f'static {batch}'} batch)"
    )
    return ExportResult(output, graph, input_format, len(proto.graph.node), metadata)


def check_options(
    card: ModelCard, input_format: str | None, converter_only: bool, batch: int, opset: int
) -> tuple[str, str]:
    """(graph kind, input format) for these options, or I2EError saying what does not fit."""
    if batch < 1:
        raise I2EError(f"--batch must be at least 1, got {batch}")
    if opset not in OPSETS:
        raise I2EError(
            f"--opset {opset} is not supported; choose {OPSETS.start}.."
            f"{OPSETS.stop - 1} (TensorRT 8.5 / JetPack 5 reads up to 17)"
        )
    if card.input == "events":
        if converter_only:
            raise I2EError(
                "--converter-only needs an image-input model (an event-input model "
                "has no converter); drop --events or --converter-only"
            )
        if input_format not in (None, "float"):
            raise I2EError(
                f"event-input graphs take float32 events; --input-format "
                f"{input_format} applies to image models only"
            )
        return "events", "events"
    input_format = input_format or "uint8"
    if input_format not in IMAGE_FORMATS:
        raise I2EError(
            f"unknown input format {input_format!r}; choose uint8 (NHWC, what a "
            "camera gives) or float (NCHW in [0, 1])"
        )
    return ("converter" if converter_only else "images"), input_format


def check_writable(output: Path) -> None:
    if output.is_dir():
        raise I2EError(
            f"output {output} is a directory; give a file name such as {output / 'model.onnx'}"
        )
    parent = output.parent
    if not parent.is_dir():
        raise I2EError(
            f"output folder {parent} does not exist; create it or choose another --output"
        )
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise I2EError(
            f"cannot write to {parent} ({exc.strerror}); choose another --output"
        ) from None


def example_input(card: ModelCard, input_format: str, batch: int) -> torch.Tensor:
    size = card.imgsz
    if input_format == "events":
        return torch.zeros(batch, card.T, 2, size, size)
    if input_format == "uint8":
        return torch.zeros(batch, size, size, 3, dtype=torch.uint8)
    return torch.zeros(batch, 3, size, size)


def trace(
    module: nn.Module,
    card: ModelCard,
    graph: str,
    input_format: str,
    batch: int,
    dynamic: bool,
    opset: int,
):
    """The deploy module as an ``onnx.ModelProto`` (TorchScript exporter)."""
    import onnx

    input_name = "events" if graph == "events" else "images"
    output_name = "events" if graph == "converter" else "logits"
    axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic else None
    # torch.onnx.export documents a path as its target (a file object is not in its API).
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and folding notes
        traced = Path(scratch) / "traced.onnx"
        torch.onnx.export(
            module.eval(),
            (example_input(card, input_format, batch),),
            traced,
            dynamo=False,
            opset_version=opset,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes=axes,
            do_constant_folding=True,
        )
        return onnx.load(str(traced))


def _simplify(proto):
    import onnxslim

    return onnxslim.slim(proto)


def onnx_shape_inference(proto):
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(
            proto, check_type=True, strict_mode=True, data_prop=True
        )
    except onnx.shape_inference.InferenceError as exc:
        raise RuntimeError(f"exported graph fails ONNX shape inference: {exc}") from None


def _check(proto) -> None:
    import onnx

    onnx.checker.check_model(proto, full_check=True)


def _save(proto, path: Path) -> None:
    with open(path, "wb") as fh:
        fh.write(proto.SerializeToString())


def _metadata(
    card: ModelCard, graph: str, input_format: str, batch: int, dynamic: bool, opset: int
) -> dict[str, str]:
    n = "N" if dynamic else batch
    size = card.imgsz
    if input_format == "events":
        inp = {
            "name": "events",
            "dtype": "float32",
            "shape": [n, card.T, 2, size, size],
            "layout": "N,T,polarity(ON,OFF),H,W",
        }
    elif input_format == "uint8":
        inp = {
            "name": "images",
            "dtype": "uint8",
            "shape": [n, size, size, 3],
            "layout": "NHWC",
            "color": "RGB",
            "range": [0, 255],
        }
    else:
        inp = {
            "name": "images",
            "dtype": "float32",
            "shape": [n, 3, size, size],
            "layout": "NCHW",
            "color": "RGB",
            "range": [0, 1],
        }
    if graph == "converter":
        out = {
            "name": "events",
            "dtype": "uint8",
            "shape": [n, card.T, 2, size, size],
            "layout": "N,T,polarity(ON,OFF),H,W",
            "values": [0, 1],
        }
    else:
        out = {
            "name": "logits",
            "dtype": "float32",
            "shape": [n, card.num_classes],
            "meaning": "mean over T of the linear head (no softmax)",
        }
    from ..model.layers import layers_to_json
    from ..model.profile import layer_table

    # Streams of the graph count its spikes with this table where PyTorch is absent.
    layers = {} if graph == "converter" else {LAYERS_KEY: layers_to_json(layer_table(card))}
    return {
        **layers,
        CARD_KEY: card.to_json(),
        f"{META_PREFIX}version": __version__,
        f"{META_PREFIX}graph": graph,
        PRECISION_KEY: "fp32",
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
