"""Small ONNX graph helpers shared by the precision passes."""

from __future__ import annotations

import onnx


def attribute(node, name: str, default=None):
    """A node attribute's value, or ``default``."""
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def producers(graph) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node writing it."""
    return {out: node for node in graph.node for out in node.output}


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX element type (initializers, and the rest by shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = (
        list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    )
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update((init.name, init.data_type) for init in model.graph.initializer)
    return types


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


def merge_spike_casts(model: onnx.ModelProto) -> int:
    """``Concat(Cast(b_0), ..., Cast(b_k))`` of boolean tensors -> ``Cast(Concat(b_0..b_k))``:
    the same values, one cast instead of k+1, and the boolean spikes of a LIF in one tensor
    that later passes can read. Returns how many Concats were merged."""
    from onnx import TensorProto, helper

    writers = producers(model.graph)
    types = elem_types(model)
    nodes, merged = [], 0
    for node in model.graph.node:
        casts = [writers[i] for i in node.input if i in writers]
        if (
            node.op_type == "Concat"
            and casts
            and len(casts) == len(node.input)
            and all(
                c.op_type == "Cast" and types.get(c.input[0]) == TensorProto.BOOL for c in casts
            )
            and len({attribute(c, "to") for c in casts}) == 1
        ):
            joined = node.output[0] + "__bool"
            nodes += [
                helper.make_node(
                    "Concat",
                    [c.input[0] for c in casts],
                    [joined],
                    name=node.name,
                    axis=attribute(node, "axis"),
                ),
                helper.make_node("Cast", [joined], [node.output[0]], to=attribute(casts[0], "to")),
            ]
            merged += 1
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    remove_dead(model.graph)
    return merged
