"""A cheaper, bit-exact form of the unrolled LIF chains for ONNX Runtime CPU graphs.

The exported chain runs, per step, ``h = decay*v + x; s = h >= theta; v = where(s, 0, h)``:
four ops, one of them ``Where``, which ONNX Runtime executes slowly. With a power-of-two decay
(tau = 2) the chain can track the scaled, negated membrane ``G_t = -h_t / decay^t``:

    G_t = Y_t + ThresholdedRelu(G_{t-1}, alpha = -theta / decay^(t-1)),   Y_t = -x_t / decay^t
    s_t = G_t <= -theta / decay^t

``ThresholdedRelu`` keeps values above alpha (no spike: the membrane carries over) and zeroes
the rest (spike: hard reset), so a step is two ops, and one ``Mul`` scales all steps' inputs
and one ``LessOrEqual`` fires all steps at once. Scaling by a power of two and negating are
exact in floating point, so every spike equals the exported chain's. Rank and layout are kept
(the per-step constants are ``[T*N, 1, 1, 1]`` tensors built once from the batch size), so
ONNX Runtime's transpose optimizer can still move layout changes through the chain.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import remove_dead


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.producers = {o: n for n in self.graph.node for o in n.output}
        self.constants = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def scalar(self, name: str) -> float | None:
        value = self.constants.get(name)
        return float(value) if value is not None and value.size == 1 else None

    def node(self, name: str, op_type: str):
        node = self.producers.get(name)
        return node if node is not None and node.op_type == op_type else None


def _match_chain(g: _Graph, concat) -> dict | None:
    """The LIF behind a Concat of spikes, or None when it is not the exported chain."""
    steps = len(concat.input)
    axis = next((a.i for a in concat.attribute if a.name == "axis"), None)
    if axis != 0 or steps < 2:
        return None
    split = theta = decay = None
    previous = None
    for t, spike in enumerate(concat.input):
        compare = g.node(spike, "GreaterOrEqual")
        if compare is None:
            return None
        membrane, threshold = compare.input
        theta = g.scalar(threshold) if theta is None else theta
        if theta is None or g.scalar(threshold) != theta:
            return None
        if t == 0:
            source = g.producers.get(membrane)
            if source is None or source.op_type != "Split" or list(source.output).index(membrane) != 0:
                return None
            split = source
        else:
            add = g.node(membrane, "Add")
            if add is None:
                return None
            mul_name, x_name = add.input if g.node(add.input[0], "Mul") else add.input[::-1]
            mul = g.node(mul_name, "Mul")
            if mul is None or x_name != split.output[t]:
                return None
            v_name, d_name = mul.input if g.scalar(mul.input[1]) is not None else mul.input[::-1]
            decay = g.scalar(d_name) if decay is None else decay
            where = g.node(v_name, "Where")
            if decay is None or g.scalar(d_name) != decay or where is None or \
                    where.input[0] != previous[0] or g.scalar(where.input[1]) != 0.0 or \
                    where.input[2] != previous[1]:
                return None
        previous = (spike, membrane)
    split_axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
    if split_axis != 0 or len(split.output) != steps or len(split.input) > 1:
        return None
    if not decay or not 0 < decay < 1 or not math.log2(decay).is_integer():
        return None  # the rescaling is exact only for power-of-two decays
    return {"input": split.input[0], "steps": steps, "theta": theta, "decay": decay,
            "output": concat.output[0]}


def rewrite_lif(model: onnx.ModelProto) -> int:
    """Replace every exported LIF chain of ``model`` (in place) by the form above; returns how
    many were rewritten. Chains that do not match exactly are left as they are."""
    g = _Graph(model)
    chains = [c for c in (_match_chain(g, n) for n in g.graph.node if n.op_type == "Concat") if c]
    if not chains:
        return 0
    first = chains[0]
    if any((c["steps"], c["theta"], c["decay"]) != (first["steps"], first["theta"], first["decay"])
           for c in chains):
        return 0
    steps, theta, decay = first["steps"], first["theta"], first["decay"]
    prefix = "lif_fast"
    # Per-row constants of the time-folded [T*N, ...] layout, built once from the batch size:
    # row t*N + n holds step t's input scale (-1/decay^t) and firing level (-theta/decay^t).
    growth = np.array([decay ** -t for t in range(steps)], np.float32).reshape(steps, 1)
    consts = {f"{prefix}_scale_t": -growth, f"{prefix}_fire_t": -theta * growth,
              f"{prefix}_one": np.array([1], np.int64), f"{prefix}_first": np.array([0], np.int64),
              f"{prefix}_steps": np.array([steps], np.int64),
              f"{prefix}_rows": np.array([-1, 1, 1, 1], np.int64)}
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    sample = chains[0]["input"]
    nodes_before = [
        helper.make_node("Shape", [sample], [f"{prefix}_shape"]),
        helper.make_node("Gather", [f"{prefix}_shape", f"{prefix}_first"], [f"{prefix}_folded"]),
        helper.make_node("Div", [f"{prefix}_folded", f"{prefix}_steps"], [f"{prefix}_batch"]),
        helper.make_node("Concat", [f"{prefix}_one", f"{prefix}_batch"], [f"{prefix}_grid"], axis=0),
    ]
    for name in ("scale", "fire"):
        nodes_before += [
            helper.make_node("Expand", [f"{prefix}_{name}_t", f"{prefix}_grid"], [f"{prefix}_{name}_tn"]),
            helper.make_node("Reshape", [f"{prefix}_{name}_tn", f"{prefix}_rows"], [f"{prefix}_{name}"])]
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

    replaced = {c["output"]: c for c in chains}
    new_nodes: list = []
    inserted = False
    for node in g.graph.node:
        if not inserted and sample in node.input:
            new_nodes += nodes_before
            inserted = True
        if node.op_type == "Concat" and node.output[0] in replaced:
            new_nodes += _fast_chain(replaced[node.output[0]], prefix, opset)
        else:
            new_nodes.append(node)
    del g.graph.node[:]
    g.graph.node.extend(new_nodes)
    remove_dead(g.graph)
    return len(chains)


def _fast_chain(chain: dict, prefix: str, opset: int) -> list:
    steps, theta, decay, out = chain["steps"], chain["theta"], chain["decay"], chain["output"]
    base = out + "__lif"
    scaled, parts = f"{base}_y", [f"{base}_y{t}" for t in range(steps)]
    equal_parts = {"num_outputs": steps} if opset >= 18 else {}
    nodes = [helper.make_node("Mul", [chain["input"], f"{prefix}_scale"], [scaled]),
             helper.make_node("Split", [scaled], parts, axis=0, **equal_parts)]
    membranes = [parts[0]]
    for t in range(1, steps):
        kept, membrane = f"{base}_keep{t}", f"{base}_g{t}"
        nodes += [helper.make_node("ThresholdedRelu", [membranes[-1]], [kept],
                                   alpha=-theta * decay ** -(t - 1)),
                  helper.make_node("Add", [parts[t], kept], [membrane])]
        membranes.append(membrane)
    nodes += [helper.make_node("Concat", membranes, [f"{base}_all"], axis=0),
              helper.make_node("LessOrEqual", [f"{base}_all", f"{prefix}_fire"], [out])]
    return nodes
