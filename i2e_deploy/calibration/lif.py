"""A cheaper, bit-exact form of the unrolled LIF chains for ONNX Runtime CPU graphs.

The exported chain runs, per step, ``h = decay*v + x; s = h >= theta; v = where(s, 0, h)``:
four ops, one of them ``Where``, which ONNX Runtime executes slowly. With a power-of-two decay
(tau = 2) the chain can track the scaled, negated membrane ``G_t = -h_t / decay^t``:

    G_t = Y_t + ThresholdedRelu(G_{t-1}, alpha = -theta / decay^(t-1)),   Y_t = -x_t / decay^t
    s_t = G_t <= -theta / decay^t

``ThresholdedRelu`` keeps values above alpha (no spike: the membrane carries over) and zeroes
the rest (spike: hard reset), so a step is two ops, and one ``Mul`` scales all steps' inputs
and one ``LessOrEqual`` fires all steps at once. Scaling by a power of two and negating are
exact in floating point, so every spike equals the exported chain's. The chain works on a
``[T, rest]`` view of its input, so it does not care about the layout (NCHW, or the ``[rows,
channels]`` of the INT8 lowering) as long as the rows are T-major; the spikes come back in the
input's shape.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import attribute, merge_spike_casts, remove_dead


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.producers = {o: n for n in self.graph.node for o in n.output}
        self.initializers = {i.name: i for i in self.graph.initializer}
        self.constants = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def scalar(self, name: str) -> float | None:
        value = self.constants.get(name)
        return float(value.reshape(())) if value is not None and value.size == 1 else None


def _region(g: _Graph, concat, limit: int = 16):
    """The nodes computing ``concat`` from the outputs of one equal-part, axis-0 Split with as
    many outputs as the Concat has inputs (scalar constants aside), or None."""
    steps = len(concat.input)
    if steps < 2 or attribute(concat, "axis") != 0:
        return None
    split = None
    region: list[onnx.NodeProto] = []
    stack, seen = list(concat.input), set()
    while stack:
        name = stack.pop()
        if name in seen or g.scalar(name) is not None:
            continue
        seen.add(name)
        node = g.producers.get(name)
        if node is None:
            return None
        if node.op_type == "Split":
            if split is not None and node is not split:
                return None
            split = node
            continue
        if node.op_type == "Constant" or len(region) > limit * steps:
            return None
        region.append(node)
        stack.extend(i for i in node.input if i)
    if (
        split is None
        or len(split.output) != steps
        or len(split.input) > 1
        or attribute(split, "axis", 0) != 0
        or attribute(split, "num_outputs", steps) != steps
    ):
        return None
    order = {id(n): i for i, n in enumerate(g.graph.node)}
    return split, sorted(region, key=lambda n: order[id(n)])


def _probe(steps: int, theta: float, decay: float, count: int = 4096) -> np.ndarray:
    """Inputs ``[T, count]`` that exercise a LIF hard: dyadic values (exact arithmetic, so
    membranes land exactly on the threshold), thresholds themselves, and random floats."""
    rng = np.random.default_rng(0)
    dyadic = rng.integers(-4 * 64, 4 * 64, (steps, count // 2)) / 64.0 * theta
    # h = theta/2, then exactly theta (must fire), or one ulp below it (must not).
    exact = np.full((steps, 2), theta / 2, np.float32)
    exact[1::2] = np.float32(theta - decay * theta / 2)
    exact[1::2, 1] = np.nextafter(exact[1::2, 1], np.float32(-np.inf))
    noise = rng.normal(theta / 2, theta, (steps, count - count // 2))
    return np.concatenate([dyadic, exact, noise], axis=1).astype(np.float32)


def reference_lif(x: np.ndarray, theta: float, decay: float) -> np.ndarray:
    """SPEC §2 in numpy: spikes ``[T, ...]`` bool for inputs ``[T, ...]``."""
    v = np.zeros_like(x[0])
    spikes = []
    for x_t in x:
        h = (v * np.float32(decay) + x_t).astype(np.float32)
        s = h >= np.float32(theta)
        spikes.append(s)
        v = np.where(s, np.float32(0), h)
    return np.stack(spikes)


def _identify(g: _Graph, split, region, concat) -> tuple[float, float, np.dtype] | None:
    """(theta, decay, spike dtype) when the region computes exactly the reference LIF's
    spikes, by running it on probe inputs for each candidate pair of its scalar constants;
    else None."""
    import onnxruntime as ort

    steps = len(split.output)
    used = {i for n in region for i in n.input}
    scalars = sorted({value for value in map(g.scalar, used) if value is not None})
    inputs = [
        helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, [None]) for o in split.output
    ]
    output = helper.make_empty_tensor_value_info(concat.output[0])
    inits = [g.initializers[i] for i in used if i in g.initializers]
    consts = [g.producers[i] for i in used if i not in g.initializers and i in g.constants]
    probe_graph = helper.make_graph(consts + region + [concat], "lif", inputs, [output], inits)
    model = helper.make_model(probe_graph, opset_imports=[helper.make_opsetid("", 17)])
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
    except Exception:  # not a self-contained elementwise region
        return None
    for theta in scalars:
        for decay in scalars:
            if not 0 < decay < 1 or theta <= 0:
                continue
            x = _probe(steps, theta, decay)
            try:
                got = session.run(None, dict(zip(split.output, x)))[0]
            except Exception:
                return None
            want = reference_lif(x, theta, decay)
            if (
                got.shape == (steps * x.shape[1],)
                and np.isin(got, (0, 1)).all()
                and np.array_equal(got.reshape(steps, -1) != 0, want)
            ):
                return theta, decay, got.dtype
    return None


def _match_chain(g: _Graph, concat) -> dict | None:
    """The LIF behind a Concat of spikes, or None when it is not one (checked by running it)."""
    found = _region(g, concat)
    if found is None:
        return None
    split, region = found
    identified = _identify(g, split, region, concat)
    if identified is None:
        return None
    theta, decay, dtype = identified
    if not math.log2(decay).is_integer():
        return None  # the rescaling is exact only for power-of-two decays
    return {
        "input": split.input[0],
        "steps": len(split.output),
        "theta": theta,
        "decay": decay,
        "output": concat.output[0],
        "dtype": dtype,
    }


def rewrite_lif(model: onnx.ModelProto) -> int:
    """Replace every exported LIF chain of ``model`` (in place) by the form above; returns how
    many were rewritten. Chains that do not match exactly are left as they are. Per-step
    spike casts are merged first (:func:`.graph.merge_spike_casts`)."""
    merge_spike_casts(model)
    g = _Graph(model)
    chains = [c for c in (_match_chain(g, n) for n in g.graph.node if n.op_type == "Concat") if c]
    if not chains:
        return 0
    first = chains[0]
    if any(
        (c["steps"], c["theta"], c["decay"]) != (first["steps"], first["theta"], first["decay"])
        for c in chains
    ):
        return 0
    steps, theta, decay = first["steps"], first["theta"], first["decay"]
    prefix = "lif_fast"
    # Step t's input scale (-1/decay^t) and firing level (-theta/decay^t), one row per step of
    # the [T, rest] view every chain takes of its input (any layout: rows stay T-major).
    growth = np.array([decay**-t for t in range(steps)], np.float32).reshape(steps, 1)
    consts = {
        f"{prefix}_scale": -growth,
        f"{prefix}_fire": -theta * growth,
        f"{prefix}_steps": np.array([steps, -1], np.int64),
    }
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

    replaced = {c["output"]: c for c in chains}
    new_nodes: list = []
    for node in g.graph.node:
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
    steps_view, scaled = f"{base}_x", f"{base}_y"
    parts = [f"{base}_y{t}" for t in range(steps)]
    equal_parts = {"num_outputs": steps} if opset >= 18 else {}
    nodes = [
        helper.make_node("Reshape", [chain["input"], f"{prefix}_steps"], [steps_view]),
        helper.make_node("Mul", [steps_view, f"{prefix}_scale"], [scaled]),
        helper.make_node("Split", [scaled], parts, axis=0, **equal_parts),
    ]
    membranes = [parts[0]]
    for t in range(1, steps):
        kept, membrane = f"{base}_keep{t}", f"{base}_g{t}"
        nodes += [
            helper.make_node(
                "ThresholdedRelu", [membranes[-1]], [kept], alpha=-theta * decay ** -(t - 1)
            ),
            helper.make_node("Add", [parts[t], kept], [membrane]),
        ]
        membranes.append(membrane)
    fired = f"{base}_fired"
    nodes += [
        helper.make_node("Concat", membranes, [f"{base}_all"], axis=0),
        helper.make_node("LessOrEqual", [f"{base}_all", f"{prefix}_fire"], [fired]),
        helper.make_node("Shape", [chain["input"]], [f"{base}_shape"]),
    ]
    if chain["dtype"] == np.bool_:
        nodes.append(helper.make_node("Reshape", [fired, f"{base}_shape"], [out]))
    else:
        nodes += [
            helper.make_node("Reshape", [fired, f"{base}_shape"], [f"{base}_bool"]),
            helper.make_node(
                "Cast",
                [f"{base}_bool"],
                [out],
                to=helper.np_dtype_to_tensor_dtype(np.dtype(chain["dtype"])),
            ),
        ]
    return nodes
