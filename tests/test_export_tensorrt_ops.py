"""Every node of the exported graphs is in TensorRT's ONNX operator table and respects the
restrictions recorded with it (i2e_deploy/data/tensorrt_onnx_ops.json, transcribed from
onnx-tensorrt's docs/operators.md); the checker itself flags what the table forbids."""

from __future__ import annotations

import onnx
import pytest
from export_models import graphs  # noqa: F401
from onnx import TensorProto, helper

from i2e_deploy.export.tensorrt_ops import tensorrt_table, tensorrt_violations


def test_table_records_its_source():
    table = tensorrt_table()
    source = table["source"]
    assert source["repo"] == "onnx/onnx-tensorrt" and source["path"] == "docs/operators.md"
    assert len(source["commit"]) == 40
    ops = table["operators"]
    assert ops["Conv"]["supported"] and ops["GreaterOrEqual"]["supported"]
    assert not ops["Unique"]["supported"]
    assert "UINT8" in ops["Cast"]["types"] and "UINT8" not in ops["Add"]["types"]


@pytest.mark.parametrize(
    "graph", ["uint8", "float", "static", "events", "converter", "converter_float"]
)
def test_exported_graph_uses_only_tensorrt_ops(graphs, graph):
    model = onnx.load(str(graphs["paths"][graph]))
    ops = tensorrt_table()["operators"]
    used = {node.op_type for node in model.graph.node}
    assert used <= {name for name, spec in ops.items() if spec["supported"]}, used
    assert not {"Loop", "Scan", "If"} & used  # the time loop is unrolled
    assert tensorrt_violations(model) == []


def _model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _value(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def test_checker_flags_what_tensorrt_cannot_parse():
    x = _value("x", TensorProto.FLOAT, [4])
    unsupported = _model(
        [helper.make_node("Unique", ["x"], ["y"])], [x], [_value("y", TensorProto.FLOAT, None)]
    )
    assert any("not supported" in p for p in tensorrt_violations(unsupported))

    inner_uint8 = _model(
        [
            helper.make_node("Cast", ["x"], ["u"], to=TensorProto.UINT8),
            helper.make_node("Cast", ["u"], ["y"], to=TensorProto.FLOAT),
        ],
        [x],
        [_value("y", TensorProto.FLOAT, [4])],
    )
    assert any("UINT8 tensor 'u'" in p for p in tensorrt_violations(inner_uint8))

    axes_from_input = _model(
        [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"])],
        [x, _value("axes", TensorProto.INT64, [1])],
        [_value("y", TensorProto.FLOAT, None)],
        [
            helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
            helper.make_tensor("ends", TensorProto.INT64, [1], [2]),
        ],
    )
    assert any("axes" in p for p in tensorrt_violations(axes_from_input))

    pool = _model(
        [helper.make_node("MaxPool", ["img"], ["y"], kernel_shape=[2, 2], dilations=[2, 2])],
        [_value("img", TensorProto.FLOAT, [1, 1, 8, 8])],
        [_value("y", TensorProto.FLOAT, None)],
    )
    assert any("dilations" in p for p in tensorrt_violations(pool))

    dq = _model(
        [helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"])],
        [_value("q", TensorProto.INT8, [4])],
        [_value("y", TensorProto.FLOAT, [4])],
        [
            helper.make_tensor("scale", TensorProto.FLOAT, [], [0.5]),
            helper.make_tensor("zero", TensorProto.INT8, [], [3]),
        ],
    )
    assert any("zero point" in p for p in tensorrt_violations(dq))

    wrong_type = _model(
        [helper.make_node("Add", ["d", "d"], ["y"])],
        [_value("d", TensorProto.DOUBLE, [4])],
        [_value("y", TensorProto.DOUBLE, [4])],
    )
    assert any("input type DOUBLE" in p for p in tensorrt_violations(wrong_type))

    assert any(
        "opset 21" in p
        for p in tensorrt_violations(
            _model(
                [helper.make_node("Relu", ["x"], ["y"])],
                [x],
                [_value("y", TensorProto.FLOAT, [4])],
                opset=21,
            )
        )
    )
