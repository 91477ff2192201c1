"""Spike-flip rates: per LIF layer, how often a reduced-precision graph fires differently.

Both graphs come from the same FP32 export, so their boolean spike tensors (each LIF's
concatenated comparisons, per-step casts merged first) keep the same names; they are exposed
as extra outputs and compared bit for bit on the same inputs (in the reference's layout).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper

from .graph import elem_types, merge_spike_casts


def spike_tensors(model: onnx.ModelProto) -> list[str]:
    """The boolean spike (and event) tensors of a graph, in network order: outputs of
    Concat nodes joining boolean comparisons, and the row-layout reshapes that keep those
    names in the ONNX Runtime INT8 graph (its rewritten neurons fire all steps at once)."""
    types = elem_types(model)
    return [
        node.output[0]
        for node in model.graph.node
        if types.get(node.output[0]) == TensorProto.BOOL
        and (
            node.op_type == "Concat"
            or (
                node.op_type == "Reshape" and node.output[0].rsplit("/", 1)[-1].startswith("Concat")
            )
        )
    ]


def layer_name(tensor: str) -> str:
    """Module name from the exporter's scope: '/layer1/layer1.0/sn1/Concat_output_0__bool' ->
    'layer1.0.sn1', '/i2e/Concat_2_output_0' -> 'i2e' (the events)."""
    parts = [p for p in tensor.split("/") if p][:-1]
    if not parts:
        return tensor
    if len(parts) >= 2 and "." in parts[-2]:
        return f"{parts[-2]}.{parts[-1]}"
    return parts[-1]


def as_layout_of(spikes: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``spikes`` in ``reference``'s NCHW layout: the ONNX Runtime INT8 lowering keeps
    activations as GEMM rows ``[T*N*H*W, C]``, the same values in another order."""
    if spikes.shape == reference.shape or reference.ndim != 4 or spikes.size != reference.size:
        return spikes
    rows, channels, height, width = reference.shape
    return spikes.reshape(rows, height, width, channels).transpose(0, 3, 1, 2)


def _session(model: onnx.ModelProto, outputs: list[str]):
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        helper.make_tensor_value_info(t, TensorProto.BOOL, None) for t in outputs if t not in known
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def spike_agreement(
    reference: str | os.PathLike, other: str | os.PathLike, inputs: np.ndarray, batch: int = 8
) -> list[dict]:
    """Per spike tensor: agreement (fraction of equal bits), flips and spike rate of
    ``other`` against ``reference`` on ``inputs`` (fed to both graphs as they are)."""
    ref_model, other_model = onnx.load(str(reference)), onnx.load(str(other))
    for model in (ref_model, other_model):
        merge_spike_casts(model)
    produced = {o for node in other_model.graph.node for o in node.output}
    tensors = [t for t in spike_tensors(ref_model) if t in produced]
    sessions = [_session(m, tensors) for m in (ref_model, other_model)]
    flips = dict.fromkeys(tensors, 0)
    spikes = dict.fromkeys(tensors, 0)
    sizes = dict.fromkeys(tensors, 0)
    for start in range(0, len(inputs), batch):
        chunk = inputs[start : start + batch]
        results = [
            dict(
                zip([o.name for o in s.get_outputs()], s.run(None, {s.get_inputs()[0].name: chunk}))
            )
            for s in sessions
        ]
        for t in tensors:
            a, b = results[0][t], as_layout_of(results[1][t], results[0][t])
            flips[t] += int((a != b).sum())
            spikes[t] += int(a.sum())
            sizes[t] += a.size
    return [
        {
            "layer": layer_name(t),
            "tensor": t,
            "agreement": 1 - flips[t] / sizes[t],
            "flips": flips[t],
            "rate": spikes[t] / sizes[t],
        }
        for t in tensors
    ]
