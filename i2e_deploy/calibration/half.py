"""FP16 graphs: convolutions and the classifier in FP16, everything else FP32.

The conv / linear inputs are 0/1 (exact in FP16) and are cast straight from the boolean
spikes; weights and biases are stored in FP16; each output is cast back to FP32 before the
BN-folded sum reaches a membrane, so neuron state, thresholds, residual sums, the converter
and the mean over T never see FP16 rounding beyond the conv output itself.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..artifacts import PRECISION_KEY, metadata_of, onnx_card
from ..errors import I2EError
from ..fileio import copy_into_place
from .graph import elem_types, producers, remove_dead, set_props
from .quantize import QUANTIZED_OPS, binary_activations


def half_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The FP16 form of an exported FP32 graph (see the module docstring)."""
    binary_activations(model, onnx_card(metadata_of(model)))  # refuses graphs not ours
    graph = model.graph
    writers = producers(graph)
    types = elem_types(model)
    initializers = {init.name: init for init in graph.initializer}
    half_inputs: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        if node.op_type not in QUANTIZED_OPS:
            nodes.append(node)
            continue
        source = node.input[0]
        cast = writers.get(source)
        if (
            cast is not None
            and cast.op_type == "Cast"
            and types.get(cast.input[0]) == TensorProto.BOOL
        ):
            source = cast.input[0]
        if source not in half_inputs:
            half_inputs[source] = f"{source}__fp16"
            nodes.append(
                helper.make_node("Cast", [source], [half_inputs[source]], to=TensorProto.FLOAT16)
            )
        params = []
        for name in node.input[1:]:
            if name not in initializers:
                raise I2EError(f"{node.name}: expected constant weights")
            value = numpy_helper.to_array(initializers[name]).astype(np.float16)
            graph.initializer.append(numpy_helper.from_array(value, f"{name}__fp16"))
            params.append(f"{name}__fp16")
        out16 = f"{node.output[0]}__fp16"
        half = helper.make_node(
            node.op_type, [half_inputs[source], *params], [out16], name=node.name
        )
        half.attribute.extend(node.attribute)
        nodes += [half, helper.make_node("Cast", [out16], [node.output[0]], to=TensorProto.FLOAT)]
    del graph.node[:]
    graph.node.extend(nodes)
    remove_dead(graph)
    set_props(model, **{PRECISION_KEY: "fp16"})
    return model


def to_fp16(fp32: str | os.PathLike, output: str | os.PathLike) -> Path:
    """An exported FP32 graph -> its FP16 graph. Writes ``output`` atomically."""
    with tempfile.TemporaryDirectory() as scratch:
        half = Path(scratch) / "fp16.onnx"
        onnx.save(half_graph(onnx.load(str(fp32))), str(half))
        return copy_into_place(half, Path(output))
