"""Where a backend spends its time, per layer of the reference model, from the backend's own
profiler: ONNX Runtime's session profiling, PyTorch's profiler, TensorRT's per-layer
``IProfiler``.

Graph nodes are mapped to layers without relying on exact node names, which the precision
passes rewrite: a node whose name carries a layer's name (the exporter's scopes,
``/layer1/layer1.0/conv1/Conv``, or the quantizer's ``layer1_layer1.0_conv1_Conv_matmul``)
belongs to it; an unnamed node belongs to the layer its data flows into, a neuron
operation that feeds a convolution to the spiking layer the convolution reads (the LIF it
is part of), a layout operation (im2col, reorders) to that convolution; what reaches no
layer (pooling, the mean over T) is 'other'. Nodes the backend adds itself are 'other' too.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import I2EError
from ..fileio import native_stderr_muted

if TYPE_CHECKING:  # model/ imports PyTorch; ONNX Runtime streams need not
    from ..model.profile import Layer

OTHER = "other"

# Operator kinds, for the shares of ONNX Runtime kernel time by what the kernels do.
OP_GROUPS = {
    "conv / GEMM": {
        "Conv",
        "FusedConv",
        "MatMulIntegerToFloat",
        "Gemm",
        "MatMul",
        "FusedGemm",
        "ConvInteger",
        "MatMulInteger",
        "QLinearConv",
        "QLinearMatMul",
    },
    "neurons + residual sums": {
        "Add",
        "Sub",
        "Mul",
        "Neg",
        "ThresholdedRelu",
        "Where",
        "GreaterOrEqual",
        "LessOrEqual",
        "Greater",
        "Less",
        "Split",
        "Concat",
        "Expand",
        "Relu",
        "Sum",
    },
    "im2col / layout": {
        "Gather",
        "Pad",
        "Reshape",
        "Transpose",
        "Slice",
        "Cast",
        "Squeeze",
        "Unsqueeze",
        "ReorderInput",
        "ReorderOutput",
        "Flatten",
        "Shape",
        "Identity",
        "QuantizeLinear",
        "DequantizeLinear",
    },
}
LAYOUT_OPS = OP_GROUPS["im2col / layout"] - {"Cast"}

# What each layer kind's time is shown as.
SHARE_OF_KIND = {
    "events": "converter",
    "conv": "conv / linear",
    "linear": "conv / linear",
    "lif": "neurons",
    "residual": "residual sums",
}
SHARES = ("converter", "conv / linear", "neurons", "residual sums", OTHER)


def op_group(op: str) -> str:
    return next((group for group, ops in OP_GROUPS.items() if op in ops), OTHER)


@dataclass
class LayerTimes:
    """Milliseconds per inference call (per node or module the median over the profiled
    calls, summed): per layer (the table's names, plus 'other'), per
    share (:data:`SHARES`), per operator group (ONNX Runtime), and the profiled total."""

    backend: str
    batch: int
    runs: int
    per_layer: dict[str, float] = field(default_factory=dict)
    shares: dict[str, float] = field(default_factory=dict)
    op_groups: dict[str, float] = field(default_factory=dict)
    note: str | None = None

    @property
    def total_ms(self) -> float:
        return sum(self.per_layer.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "batch": self.batch,
            "runs": self.runs,
            "total_ms": self.total_ms,
            "shares_ms": self.shares,
            "op_groups_ms": self.op_groups,
            "note": self.note,
        }


def _medians(values: dict[str, list[float]]) -> dict[str, float]:
    """Per key, the median over calls: the typical call, robust to a call disturbed by other
    work on the machine."""
    return {key: float(np.median(found)) for key, found in values.items()}


def _shares(table: list[Layer], per_layer: dict[str, float]) -> dict[str, float]:
    kinds = {layer.name: layer.kind for layer in table}
    shares = dict.fromkeys(SHARES, 0.0)
    for name, ms in per_layer.items():
        shares[SHARE_OF_KIND.get(kinds.get(name, ""), OTHER)] += ms
    return shares


# --- name matching ----------------------------------------------------------------------------


class LayerNames:
    """Finds the table layer a node or engine-layer name carries (longest match wins, on
    whole dotted segments)."""

    def __init__(self, table: list[Layer]):
        self.kinds = {layer.name: layer.kind for layer in table}
        self.sources = {layer.name: layer.source for layer in table if layer.source}
        aliases = {layer.name: layer.name for layer in table}
        for layer in table:  # the deploy graph's shortcut conv is 'downsample', not '.1'
            if layer.kind == "conv" and layer.name.endswith(".downsample.1"):
                aliases[layer.name[:-2]] = layer.name
        self.aliases = aliases

    def find(self, text: str) -> str | None:
        segments = [part for part in re.split(r"[/_:.]+", text) if part]
        best = None
        for start in range(len(segments)):
            for end in range(start + 1, len(segments) + 1):
                candidate = ".".join(segments[start:end])
                if candidate in self.aliases and (best is None or len(candidate) > len(best)):
                    best = candidate
        return self.aliases[best] if best else None


def attribute_nodes(graph, table: list[Layer]) -> list[str]:
    """The layer of every node of an ONNX graph (in ``graph.node`` order); see the module
    docstring."""
    names = LayerNames(table)
    nodes = list(graph.node)
    anchors: list[str | None] = [names.find(n.name) if n.name else None for n in nodes]
    consumers: dict[str, list[int]] = {}
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(i)
        for tensor in node.output:
            producer[tensor] = i
    # Nearest named node downstream (first in graph order) and upstream, per node.
    down: list[str | None] = [None] * len(nodes)
    down_at: list[int] = [len(nodes)] * len(nodes)
    for i in range(len(nodes) - 1, -1, -1):
        for tensor in nodes[i].output:
            for j in consumers.get(tensor, ()):
                at, layer = (j, anchors[j]) if anchors[j] else (down_at[j], down[j])
                if layer and at < down_at[i]:
                    down_at[i], down[i] = at, layer
    up: list[str | None] = [None] * len(nodes)
    for i, node in enumerate(nodes):
        for tensor in node.input:
            source = producer.get(tensor)
            if source is not None:
                up[i] = anchors[source] or up[source] or up[i]
    found: list[str] = []
    for i, node in enumerate(nodes):
        anchor = anchors[i]
        if anchor:
            found.append(anchor)
            continue
        below, above = down[i], up[i]
        below_kind = names.kinds.get(below or "")
        if node.op_type in LAYOUT_OPS:
            layer = below if below_kind in ("conv", "linear") else above
        elif op_group(node.op_type) == "neurons + residual sums" or node.op_type == "Cast":
            layer = (
                names.sources.get(below) if below_kind in ("conv", "linear") and below else below
            )
        else:
            layer = None
        found.append(layer or OTHER)
    return found


# --- ONNX Runtime -----------------------------------------------------------------------------


def tagged_graph(path: str | Path, table: list[Layer]):
    """The graph at ``path`` with every node and intermediate tensor renamed
    ``LAYER#index``: ONNX Runtime names the nodes it fuses or re-lays after them, so its
    profiler events still say which layer they belong to."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    layers = attribute_nodes(graph, table)
    keep = {v.name for v in (*graph.input, *graph.output)} | {i.name for i in graph.initializer}
    renamed: dict[str, str] = {}
    for i, (node, layer) in enumerate(zip(graph.node, layers)):
        node.name = f"{layer}#{i}"
        for k, tensor in enumerate(node.output):
            if tensor and tensor not in keep:
                renamed[tensor] = f"{layer}#{i}.{k}"
                node.output[k] = renamed[tensor]
    for node in graph.node:
        for k, tensor in enumerate(node.input):
            if tensor in renamed:
                node.input[k] = renamed[tensor]
    del graph.value_info[:]
    return model


def profile_events(
    model_bytes: bytes,
    feed: dict[str, np.ndarray],
    runs: int,
    *,
    threads: int | None = None,
    open_session=None,
) -> list[dict]:
    """ONNX Runtime's profiler events of the kernels of ``runs`` calls (after one untimed
    call): ``{'node', 'op', 'ms', 'run'}`` each. ``open_session(model_bytes, configure)``:
    a runner's own session configuration (:meth:`OrtRunner.open_session`), so the times are
    those of the providers, options and optimization level that serve; default: the CPU."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as scratch:

        def configure(options) -> None:
            options.log_severity_level = 3
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(scratch) / "profile")
            if threads:
                options.intra_op_num_threads = threads

        if open_session is not None:
            session = open_session(model_bytes, configure)
        else:
            options = ort.SessionOptions()
            configure(options)
            session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    kernels = sorted(
        (e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
        key=lambda e: e["ts"],
    )
    # The first call allocates and plans: drop its share (every call runs the same kernels).
    per_run = len(kernels) // (runs + 1)
    return [
        {
            "node": e["name"][: -len("_kernel_time")],
            "op": e["args"].get("op_name", ""),
            "ms": e["dur"] / 1e3,
            "run": i // per_run - 1,
        }
        for i, e in enumerate(kernels)
        if i >= per_run
    ]


def _ort_times(runner, batch: np.ndarray, table: list[Layer], runs: int) -> LayerTimes:
    from .runners import without_cuda_graph

    model = tagged_graph(runner.path, table)
    feed = {runner.session.get_inputs()[0].name: runner._adapt(batch)}
    # The serving configuration less its CUDA graph, which a profiled run cannot replay.
    events = profile_events(
        model.SerializeToString(),
        feed,
        runs,
        open_session=lambda graph, configure: runner.open_session(
            graph, configure, without_cuda_graph(runner.chosen)
        ),
    )
    known = {layer.name for layer in table}
    per_node: dict[str, list[float]] = {}
    op_of: dict[str, str] = {}
    for event in events:
        per_node.setdefault(event["node"], [0.0] * runs)[event["run"]] += event["ms"]
        op_of[event["node"]] = event["op"]
    per_layer: dict[str, float] = {}
    groups: dict[str, float] = {}
    for node, ms in _medians(per_node).items():
        # 'LAYER#i', or with a prefix ONNX Runtime adds ('InsertedPrecisionFreeCast_LAYER#i');
        # layer names hold no '_'.
        layer = node.split("#", 1)[0].rsplit("_", 1)[-1]
        layer = layer if layer in known else OTHER
        per_layer[layer] = per_layer.get(layer, 0.0) + ms
        groups[op_group(op_of[node])] = groups.get(op_group(op_of[node]), 0.0) + ms
    return LayerTimes(
        "onnxruntime",
        len(batch),
        runs,
        per_layer,
        _shares(table, per_layer),
        groups,
        note="ONNX Runtime session profiling: kernel time per node; "
        "it adds a fixed cost per node, so small ops weigh more than in plain "
        "timings",
    )


# --- PyTorch ----------------------------------------------------------------------------------


def _torch_times(runner, batch: np.ndarray, table: list[Layer], runs: int) -> LayerTimes:
    """torch.profiler over ``record_function`` ranges opened per module: a BatchNorm's time
    goes to the conv before it, a block's own time (its membrane sum) to its residual row."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    model = runner.model
    if model is None:
        raise I2EError(f"{runner.path.name}: the runner is closed")
    kinds = {layer.name: layer.kind for layer in table}
    cuda = runner._device.type == "cuda"
    tag = "i2e-layer:"
    ranges: list = []
    handles = []
    owner: dict[str, str] = {}
    last_conv = [OTHER]
    for name, module in model.named_modules():
        if name in kinds:
            owner[name] = name
        elif isinstance(module, torch.nn.BatchNorm2d):
            owner[name] = ""  # resolved at run time: the conv that ran last
        else:
            continue

        def enter(_m, _i, name=name):
            if kinds.get(name) in ("conv", "linear"):
                last_conv[0] = name
            label = name if owner[name] else f"{last_conv[0]}@bn"
            ranges.append(record_function(tag + label))
            ranges[-1].__enter__()

        def leave(_m, _i, _o):
            ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    x = torch.from_numpy(runner._adapt(batch)).to(runner._device)
    if runner.card.input == "events":
        x = x.float()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with torch.inference_mode():
            model(x)
            with native_stderr_muted(), profile(activities=activities) as prof:
                for _ in range(runs):
                    with record_function(tag + "#total"):
                        model(x)
                if cuda:
                    torch.cuda.synchronize()
    finally:
        for handle in handles:
            handle.remove()
    times: dict[str, list[float]] = {}  # one entry per call, per module
    for event in prof.events():
        if event.name.startswith(tag):
            us = event.device_time_total if cuda else event.cpu_time_total
            times.setdefault(event.name[len(tag) :], []).append(us / 1e3)
    spent = _medians(times)
    per_layer: dict[str, float] = {}
    for label, ms in spent.items():
        if label == "#total":
            continue
        name = label.split("@", 1)[0]
        per_layer[name] = per_layer.get(name, 0.0) + ms
    for name, kind in kinds.items():  # a block's own time: its ranges minus its modules'
        if kind == "residual" and name in per_layer:
            inner = sum(
                ms
                for other, ms in per_layer.items()
                if other.startswith(name + ".") and kinds.get(other) != "residual"
            )
            per_layer[name] -= inner
    per_layer[OTHER] = max(spent.get("#total", 0.0) - sum(per_layer.values()), 0.0)
    return LayerTimes(
        "torch",
        len(batch),
        runs,
        per_layer,
        _shares(table, per_layer),
        note="PyTorch profiler: "
        + ("CUDA kernel" if cuda else "CPU")
        + " time per module; BatchNorm counted with its conv, a block's own time "
        "(its membrane sum and the Python around its modules) as its residual",
    )


# --- TensorRT ---------------------------------------------------------------------------------


def _tensorrt_times(runner, batch: np.ndarray, table: list[Layer], runs: int) -> LayerTimes:
    """TensorRT's ``IProfiler`` on the engine's execution context: one time per engine layer
    (fused layers carry the names of the nodes they fused)."""
    import tensorrt as trt

    names = LayerNames(table)
    per_layer: dict[str, list[float]] = {}
    run = [0]

    class Profiler(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)  # TensorRT's bindings need the base initialised

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            layer = names.find(layer_name) or OTHER
            per_layer.setdefault(layer, [0.0] * runs)[run[0]] += ms

    runner.infer(batch)
    context = runner._runner.context
    context.profiler = Profiler()
    try:
        for run[0] in range(runs):
            runner.infer(batch)
    finally:
        context.profiler = None
    medians = _medians(per_layer)
    return LayerTimes(
        "tensorrt",
        len(batch),
        runs,
        medians,
        _shares(table, medians),
        note="TensorRT IProfiler: time per engine layer, fused layers under "
        "the first layer name they carry",
    )


def layer_times(runner, batch: np.ndarray, table: list[Layer], runs: int = 10) -> LayerTimes:
    """Milliseconds per call of ``runner`` on ``batch`` per layer of ``table``, from the
    backend's own profiler (per layer the median of ``runs`` calls after an untimed one)."""
    if runs < 1:
        raise I2EError(f"--runs must be at least 1, got {runs}")
    timing = {"onnxruntime": _ort_times, "torch": _torch_times, "tensorrt": _tensorrt_times}.get(
        runner.name
    )
    if timing is None:
        return LayerTimes(
            runner.name,
            len(batch),
            runs,
            note=f"the {runner.name} backend has no per-layer profiler here",
        )
    return timing(runner, batch, table, runs)
