"""Small ONNX graph helpers shared by the precision passes."""
from __future__ import annotations

import onnx


def producers(graph) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node writing it."""
    return {out: node for node in graph.node for out in node.output}


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX element type, from shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + \
        list(inferred.graph.output)
    return {v.name: v.type.tensor_type.elem_type for v in values}


def remove_dead(graph) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    used = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)


def set_props(model: onnx.ModelProto, **props: str) -> None:
    """Set (add or replace) ``metadata_props`` entries."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        entry = existing.get(key) or model.metadata_props.add()
        entry.key, entry.value = key, value
