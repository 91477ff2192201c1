"""What TensorRT's ONNX parser takes: onnx-tensorrt's operator support matrix (as recorded
in ``data/tensorrt_onnx_ops.json``) and a check of a graph against it, run on every export so
that a graph TensorRT cannot parse is named before anyone tries on a Jetson."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def tensorrt_table() -> dict[str, Any]:
    """onnx-tensorrt's operator support matrix as recorded in ``data/tensorrt_onnx_ops.json``."""
    from importlib import resources

    return json.loads(
        resources.files("i2e_deploy").joinpath("data/tensorrt_onnx_ops.json").read_text()
    )


def tensorrt_violations(proto) -> list[str]:
    """What in an ONNX model falls outside TensorRT's documented ONNX support: operators,
    the data type of each node's first input, and the restrictions the table marks as checked
    (constant axes, UINT8 only at the graph's I/O, 2-D/3-D pooling without dilation or
    indices, Q/DQ zero points of 0, the opset range)."""
    import onnx
    from onnx import TensorProto

    type_names = {
        TensorProto.FLOAT: "FP32",
        TensorProto.FLOAT16: "FP16",
        TensorProto.BFLOAT16: "BF16",
        TensorProto.INT32: "INT32",
        TensorProto.INT64: "INT64",
        TensorProto.INT8: "INT8",
        TensorProto.UINT8: "UINT8",
        TensorProto.BOOL: "BOOL",
        TensorProto.DOUBLE: "DOUBLE",
        TensorProto.FLOAT8E4M3FN: "FP8",
        TensorProto.INT4: "INT4",
    }
    table = tensorrt_table()
    rules = table["checked_restrictions"]
    graph = onnx.shape_inference.infer_shapes(proto).graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in (*graph.input, *graph.output, *graph.value_info)
    }
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    types.update({init.name: init.data_type for init in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
            types[node.output[0]] = node.attribute[0].t.data_type
    problems = []
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not table["opset"]["min"] <= opset <= table["opset"]["max"]:
        problems.append(
            f"opset {opset} outside TensorRT's {table['opset']['min']}..{table['opset']['max']}"
        )
    for node in graph.node:
        where = f"{node.op_type} {node.name or node.output[0]!r}"
        spec = table["operators"].get(node.op_type)
        if node.domain not in ("", "ai.onnx") or spec is None or not spec["supported"]:
            problems.append(f"{where}: operator not supported")
            continue
        if (
            node.input
            and node.input[0] in types
            and node.op_type not in rules["types_of_first_input_except"]
        ):
            name = type_names.get(types[node.input[0]], str(types[node.input[0]]))
            if name not in spec["types"]:
                problems.append(f"{where}: input type {name} not in {spec['types']}")
        index = rules["axes_constant"].get(node.op_type)
        if (
            index is not None
            and len(node.input) > index
            and node.input[index]
            and node.input[index] not in constants
        ):
            problems.append(f"{where}: axes input is not a constant")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in rules["pooling_2d_or_3d"] and len(attrs.get("kernel_shape", ())) not in (
            2,
            3,
        ):
            problems.append(f"{where}: only 2-D or 3-D pooling")
        if node.op_type in rules["dilations_all_ones"] and any(
            d != 1 for d in attrs.get("dilations", ())
        ):
            problems.append(f"{where}: dilations must be all ones")
        if node.op_type in rules["single_output"] and len([o for o in node.output if o]) > 1:
            problems.append(f"{where}: Indices output unsupported")
        index = rules["zero_point_zero"].get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index]:
            zero = constants.get(node.input[index])
            if zero is None or np.any(zero != 0):
                problems.append(f"{where}: zero point must be a constant 0")
    io = {v.name for v in (*graph.input, *graph.output)}
    problems += [
        f"UINT8 tensor {name!r} inside the graph (TensorRT: UINT8 only at the I/O)"
        for name, kind in types.items()
        if kind == TensorProto.UINT8 and name not in io
    ]
    return problems
