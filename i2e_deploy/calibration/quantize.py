"""SNN-aware INT8: every conv / linear layer of an MS-ResNet reads only 0/1 values.

Spikes and I2E events are exactly representable with scale 1 and zero point 0, so those
activations need no calibration; weights are quantized per output channel, symmetric INT8.
Everything else (the converter, LIF chains, BN-folded biases and sums, residual membranes,
the mean over T) stays FP32. ``onnxruntime.quantization.quantize_static`` does the
quantization, in QDQ format, with the known activation parameters given as
``TensorQuantOverrides``; the graph's own structure proves which inputs are binary (a cast of
a boolean comparison, through shape-only ops), and a conv whose input is not provably binary
is refused rather than guessed.

Two flavours:

- ``tensorrt`` (S8S8): the Q/DQ graph as TensorRT wants it, signed INT8 with zero point 0;
  TensorRT fuses ``DQ -> Conv`` into INT8 convolutions with FP32 outputs.
- ``onnxruntime`` (U8S8, x86 CPUs): ONNX Runtime fuses ``Q -> DQ -> Conv`` only with a
  quantized output (``QLinearConv``), which would round the BN-folded membrane input to
  8 bits. So each quantized conv is lowered instead to what ONNX Runtime runs fast with FP32
  output: the boolean spikes cast straight to uint8 (no QuantizeLinear), an NHWC im2col
  (``Gather`` of a precomputed index), and ``com.microsoft.MatMulIntegerToFloat`` (uint8 x
  int8 GEMM, per-channel scale and bias applied on the FP32 output), one 2-D GEMM over all
  time steps and pixels. The GEMM's ``[T*N*H*W, C]`` output rows stay as they are through
  the neurons and residual sums (elementwise, and a neuron's per-step Split works on T-major
  rows) up to the next im2col, so no layout change sits between convs; only the max pool's
  output enters that layout and the average pool's input leaves it. A map smaller than the
  kernel (2x2 under 3x3) runs as one GEMM over whole images with a weight per (input,
  output) pixel pair, which skips the products with padding (4 of 9 taps are real there).
  Convs with few input channels (the 2-channel stem, whose patch rows would be 2 bytes) run
  as float convs with the dequantized weights on the exact 0/1 input.
  Weights, scales and biases are read from the Q/DQ graph, so both flavours compute the same
  function. Once the convs are INT8 the neuron chains dominate, so they are rewritten into
  an exact, cheaper form too (:mod:`.lif`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from ..artifacts import FLAVOUR_KEY, INT8_FLAVOURS, PRECISION_KEY, metadata_of, onnx_card
from ..card import ModelCard
from ..errors import I2EError
from ..fileio import copy_into_place
from .graph import attribute, elem_types, merge_spike_casts, producers, remove_dead, set_props

QUANTIZED_OPS = ("Conv", "Gemm")
MIN_GATHER_CHANNELS = 16
# Ops that compute each element from the same element of their inputs (and scalars).
_ELEMENTWISE = (
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "ThresholdedRelu",
    "Relu",
    "GreaterOrEqual",
    "LessOrEqual",
    "Greater",
    "Less",
    "Equal",
    "Not",
    "And",
    "Or",
    "Where",
    "Cast",
    "Identity",
    "QuantizeLinear",
    "DequantizeLinear",
)
# Ops that move or select values without changing them: 0/1 in, 0/1 out.
_VALUE_PRESERVING = (
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Slice",
    "Split",
    "Concat",
    "MaxPool",
    "Expand",
    "Tile",
    "Gather",
    "Pad",
)


def is_binary(tensor: str, writers, types: dict[str, int], binary_inputs: set[str]) -> bool:
    """Whether ``tensor`` provably holds only 0 and 1: a boolean cast to a number, or a graph
    input declared binary (event input), reached through value-preserving ops only."""
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in binary_inputs:
            continue
        node = writers.get(name)
        if node is None:
            return False
        if node.op_type == "Cast":
            if types.get(node.input[0]) == TensorProto.BOOL:
                continue
            stack.append(node.input[0])
        elif node.op_type in _VALUE_PRESERVING:
            if node.op_type == "Pad" and not _pads_with_zero(node):
                return False
            data = node.input if node.op_type == "Concat" else node.input[:1]
            stack.extend(data)
        else:
            return False
    return True


def _pads_with_zero(node) -> bool:
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
    return mode != b"constant" or len(node.input) < 3 or not node.input[2]


def binary_activations(model: onnx.ModelProto, card: ModelCard) -> dict[str, str]:
    """``{conv/gemm node name: its input tensor}`` for every Conv/Gemm of the graph; raises
    if one reads a tensor that is not provably 0/1 (the graph is not an MS-ResNet export)."""
    graph = model.graph
    writers = producers(graph)
    types = elem_types(model)
    binary_inputs = {graph.input[0].name} if card.input == "events" else set()
    found = {}
    for node in graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        if not is_binary(node.input[0], writers, types, binary_inputs):
            raise I2EError(
                f"{node.name or node.op_type}: its input is not provably 0/1 spikes, "
                "so INT8 with exact activations does not apply; export the graph "
                "with `i2e-deploy export`"
            )
        found[node.name] = node.input[0]
    if not found:
        raise I2EError("the graph has no Conv/Gemm layers to quantize")
    return found


class _OneBatchReader(CalibrationDataReader):
    """quantize_static insists on a calibration pass; the overridden ranges ignore it."""

    def __init__(self, feed: dict[str, np.ndarray]):
        self._feeds = [feed]

    def get_next(self):
        return self._feeds.pop() if self._feeds else None


def quantize_qdq(
    fp32: str | os.PathLike | onnx.ModelProto, output: str | os.PathLike, *, unsigned: bool = False
) -> Path:
    """The Q/DQ graph: binary Conv/Gemm inputs at scale 1 / zero point 0 (int8, or uint8 with
    ``unsigned``), weights per-channel symmetric int8, outputs and biases FP32."""
    model = fp32 if isinstance(fp32, onnx.ModelProto) else onnx.load(str(fp32))
    card = onnx_card(metadata_of(model))
    activations = binary_activations(model, card)
    zero = np.array(0, np.uint8 if unsigned else np.int8)
    overrides = {
        tensor: [{"scale": np.array(1.0, np.float32), "zero_point": zero}]
        for tensor in set(activations.values())
    }
    reader = _OneBatchReader({model.graph.input[0].name: _zero_input(model)})
    output = Path(output)
    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "fp32.onnx"
        onnx.save(model, str(source))
        root.setLevel(logging.ERROR)  # quantize_static advises pre-processing we do not need
        try:
            quantize_static(
                str(source),
                str(output),
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                nodes_to_quantize=list(activations),
                per_channel=True,
                activation_type=QuantType.QUInt8 if unsigned else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                extra_options={
                    "WeightSymmetric": True,
                    "QuantizeBias": False,
                    "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
                    "TensorQuantOverrides": overrides,
                },
            )
        finally:
            root.setLevel(level)
    quantized = onnx.load(str(output))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(model.metadata_props)
    set_props(quantized, **{PRECISION_KEY: "int8"})
    if not unsigned:  # the unsigned graph is only a step towards the ONNX Runtime flavour
        set_props(quantized, **{FLAVOUR_KEY: "tensorrt"})
    onnx.save(quantized, str(output))
    return output


def _zero_input(model: onnx.ModelProto) -> np.ndarray:
    value = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    return np.zeros(dims, dtype)


def _probe_shapes(model: onnx.ModelProto, tensors: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of ``tensors`` for a batch-1 input, by running the graph once: shape
    inference cannot follow the converter's per-image slicing, a run always can."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        helper.make_empty_tensor_value_info(t) for t in tensors if t not in known
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    results = session.run(None, {model.graph.input[0].name: _zero_input(model)})
    return {name: value.shape for name, value in zip(names, results) if name in tensors}


class _Lowering:
    """Rewrites the Q/DQ graph's quantized Conv/Gemm nodes into the ONNX Runtime CPU form."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.producers = producers(self.graph)
        self.initializers = {i.name: i for i in self.graph.initializer}
        self.types = elem_types(model)
        self.new_initializers: list[onnx.TensorProto] = []
        self.uint8_nhwc: dict[str, str] = {}  # binary source tensor -> its uint8 NHWC copy
        # Tensors held as GEMM rows [T*N*H*W, C] (T-major, channels innermost) -> (C, H, W),
        # and the copies made when a tensor is needed in the other layout.
        self.rows: dict[str, tuple[int, int, int]] = {}
        self.uint8: dict[str, str] = {}  # boolean spikes -> their uint8 cast
        self.as_rows: dict[str, str] = {}
        self.as_nchw: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.count = 0

    def const(self, value: np.ndarray, hint: str) -> str:
        self.count += 1
        name = f"{hint}__i8c{self.count}"
        self.new_initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}__i8t{self.count}"

    def array(self, name: str) -> np.ndarray:
        if name not in self.initializers:
            raise I2EError(f"{name}: expected a constant in the Q/DQ graph")
        return numpy_helper.to_array(self.initializers[name])

    def dequantized(self, tensor: str):
        """(quantized tensor, scale, zero point, DQ node) behind a DequantizeLinear output."""
        node = self.producers.get(tensor)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        return node.input[0], self.array(node.input[1]), self.array(node.input[2]), node

    def uint8_source(self, dq_input: str, nodes: list) -> str:
        """The 0/1 activation as uint8: the boolean spikes cast straight to uint8 when the
        quantized tensor is a cast of booleans, else the QuantizeLinear output itself."""
        quantize = self.producers[dq_input]
        source = quantize.input[0]
        cast = self.producers.get(source)
        if (
            cast is not None
            and cast.op_type == "Cast"
            and self.types.get(cast.input[0]) == TensorProto.BOOL
        ):
            spikes = cast.input[0]
            if spikes not in self.uint8:
                self.uint8[spikes] = self.fresh(source + "_u8")
                nodes.append(
                    helper.make_node("Cast", [spikes], [self.uint8[spikes]], to=TensorProto.UINT8)
                )
                if spikes in self.rows:
                    self.rows[self.uint8[spikes]] = self.rows[spikes]
            return self.uint8[spikes]
        return dq_input

    def activation(self, node, nodes: list) -> str:
        found = self.dequantized(node.input[0])
        if found is None:
            raise I2EError(f"{node.name}: input is not dequantized; not a Q/DQ graph")
        q_tensor, scale, zero_point, _ = found
        if float(scale) != 1.0 or int(zero_point) != 0:
            raise I2EError(
                f"{node.name}: activation scale {scale}/zero point {zero_point} is not "
                "the exact 0/1 encoding"
            )
        return self.uint8_source(q_tensor, nodes)

    def weights(self, node, transpose_gemm: bool = False):
        found = self.dequantized(node.input[1])
        if found is None:
            raise I2EError(f"{node.name}: weights are not quantized")
        w_name, scale, zero_point, _ = found
        weight = self.array(w_name)
        if weight.dtype != np.int8 or np.any(zero_point != 0):
            raise I2EError(f"{node.name}: weights must be symmetric int8")
        bias = (
            self.array(node.input[2]).astype(np.float32)
            if len(node.input) > 2 and node.input[2]
            else np.zeros(weight.shape[0], np.float32)
        )
        scale = np.broadcast_to(scale.astype(np.float32), (weight.shape[0],)).copy()
        return weight, scale, bias

    def matmul(self, col: str, weight_kn: np.ndarray, scale, bias, out: str, nodes, hint):
        nodes.append(
            helper.make_node(
                "MatMulIntegerToFloat",
                [
                    col,
                    self.const(np.ascontiguousarray(weight_kn), hint + "_w"),
                    self.const(np.array(1.0, np.float32), hint + "_as"),
                    self.const(scale, hint + "_ws"),
                    self.const(np.array(0, np.uint8), hint + "_azp"),
                    self.const(np.array(0, np.int8), hint + "_wzp"),
                    self.const(bias, hint + "_b"),
                ],
                [out],
                domain="com.microsoft",
                name=hint + "_matmul",
            )
        )

    def conv(self, node, in_shape, nodes: list) -> None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight, scale, bias = self.weights(node)
        out_ch, in_ch, kh, kw = weight.shape
        if (
            attrs.get("group", 1) != 1
            or any(d != 1 for d in attrs.get("dilations", [1, 1]))
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        ):
            raise I2EError(f"{node.name}: only plain convolutions are lowered")
        hint = node.name.strip("/").replace("/", "_") or "conv"
        if in_ch < MIN_GATHER_CHANNELS:
            # Patch rows of a few bytes make the im2col gather slower than the whole float
            # conv (the 2-channel stem): run the dequantized weights on the exact 0/1 input.
            float_input = self.producers[self.producers[node.input[0]].input[0]].input[0]
            dequantized = weight.astype(np.float32) * scale.reshape(-1, 1, 1, 1)
            conv = helper.make_node(
                "Conv",
                [
                    float_input,
                    self.const(dequantized, hint + "_wdq"),
                    self.const(bias, hint + "_b"),
                ],
                list(node.output),
                name=node.name,
            )
            conv.attribute.extend(node.attribute)
            nodes.append(conv)
            return
        sh, sw = attrs.get("strides", [1, 1])
        top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
        _, channels, height, width = in_shape
        hp, wp = height + top + bottom, width + left + right
        ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
        # Taps that read padding for every output pixel (a 3x3 conv on a 1x1 map keeps only
        # its centre) add nothing: leave them out of the GEMM.
        rows_used = [
            k for k in range(kh) if any(top <= y * sh + k < top + height for y in range(ho))
        ]
        cols_used = [
            k for k in range(kw) if any(left <= x * sw + k < left + width for x in range(wo))
        ]
        taps = [(ky, kx) for ky in rows_used for kx in cols_used]
        source = self.activation(node, nodes)
        self.rows[node.output[0]] = (out_ch, ho, wo)  # the GEMM's rows are the output
        if height * width < len(taps):
            # A map smaller than the kernel (2x2 under a 3x3): every input pixel meets every
            # output pixel through one tap, so one GEMM over whole images with a weight per
            # (input pixel, output pixel) pair skips the products with padding. Integer
            # accumulation is exact in any order: the same sums as the im2col GEMM.
            dense = np.zeros((height, width, channels, ho, wo, out_ch), np.int8)
            for y in range(ho):
                for x in range(wo):
                    for ky in range(kh):
                        for kx in range(kw):
                            iy, ix = y * sh + ky - top, x * sw + kx - left
                            if 0 <= iy < height and 0 <= ix < width:
                                dense[iy, ix, :, y, x, :] = weight[:, :, ky, kx].T
            images, out_images = self.fresh(hint + "_img"), self.fresh(hint + "_mm")
            nodes.append(
                helper.make_node(
                    "Reshape",
                    [
                        self.nhwc_of(source, nodes),
                        self.const(
                            np.array([-1, height * width * channels], np.int64), hint + "_ri"
                        ),
                    ],
                    [images],
                )
            )
            self.matmul(
                images,
                dense.reshape(height * width * channels, -1),
                np.tile(scale, ho * wo),
                np.tile(bias, ho * wo),
                out_images,
                nodes,
                hint,
            )
            nodes.append(
                helper.make_node(
                    "Reshape",
                    [out_images, self.const(np.array([-1, out_ch], np.int64), hint + "_ro")],
                    list(node.output),
                )
            )
            return
        nhwc = self.nhwc_of(source, nodes)
        if top or left or bottom or right:
            padded = self.fresh(hint + "_pad")
            nodes.append(
                helper.make_node(
                    "Pad",
                    [
                        nhwc,
                        self.const(
                            np.array([0, top, left, 0, 0, bottom, right, 0], np.int64),
                            hint + "_pads",
                        ),
                    ],
                    [padded],
                )
            )
        else:
            padded = nhwc
        if taps == [(0, 0)] and kh == kw == 1:
            patches = padded
            if sh != 1 or sw != 1:
                patches = self.fresh(hint + "_strided")
                nodes.append(
                    helper.make_node(
                        "Slice",
                        [
                            padded,
                            self.const(np.array([0, 0], np.int64), hint + "_s0"),
                            self.const(np.array([hp, wp], np.int64), hint + "_s1"),
                            self.const(np.array([1, 2], np.int64), hint + "_ax"),
                            self.const(np.array([sh, sw], np.int64), hint + "_st"),
                        ],
                        [patches],
                    )
                )
        else:
            # im2col as one Gather: row (y, x) of the patch matrix lists the input pixels of
            # output pixel (y, x) under each kept tap (ky, kx order); channels stay innermost.
            offsets = np.array([ky * wp + kx for ky, kx in taps], np.int64)
            oy, ox = np.meshgrid(np.arange(ho), np.arange(wo), indexing="ij")
            starts = (oy * sh * wp + ox * sw).reshape(-1, 1)
            index = (starts + offsets.reshape(1, -1)).reshape(-1)
            flat, patches = self.fresh(hint + "_flat"), self.fresh(hint + "_gather")
            nodes += [
                helper.make_node(
                    "Reshape",
                    [padded, self.const(np.array([0, hp * wp, channels], np.int64), hint + "_r1")],
                    [flat],
                ),
                helper.make_node(
                    "Gather", [flat, self.const(index, hint + "_idx")], [patches], axis=1
                ),
            ]
        # One 2-D GEMM over all (time, image, pixel) rows: batch dimensions would split it
        # into many small ones. Its [rows, channels] output is what the neurons and residual
        # sums read next (see run()).
        patch_rows = self.fresh(hint + "_rows")
        nodes.append(
            helper.make_node(
                "Reshape",
                [patches, self.const(np.array([-1, len(taps) * channels], np.int64), hint + "_r2")],
                [patch_rows],
            )
        )
        weight_kn = np.concatenate([weight[:, :, ky, kx].T for ky, kx in taps])
        self.matmul(patch_rows, weight_kn, scale, bias, node.output[0], nodes, hint)

    def nhwc_of(self, source: str, nodes: list) -> str:
        """``source`` (uint8 0/1, rows or NCHW) as ``[T*N, H, W, C]``, once per tensor."""
        nhwc = self.uint8_nhwc.get(source)
        if nhwc is None:
            nhwc = self.fresh(source + "_nhwc")
            if source in self.rows:
                channels, height, width = self.rows[source]
                nodes.append(
                    helper.make_node(
                        "Reshape",
                        [
                            source,
                            self.const(np.array([-1, height, width, channels], np.int64), "nhwc"),
                        ],
                        [nhwc],
                    )
                )
            else:
                nodes.append(helper.make_node("Transpose", [source], [nhwc], perm=[0, 2, 3, 1]))
            self.uint8_nhwc[source] = nhwc
        return nhwc

    def rows_of(self, tensor: str, nodes: list) -> str:
        """``tensor`` in the ``[T*N*H*W, C]`` row layout (converted from NCHW once)."""
        if tensor in self.rows:
            return tensor
        if tensor not in self.as_rows:
            _, channels, height, width = self.shapes[tensor]
            nhwc, rows = self.fresh(tensor + "_nhwc"), self.fresh(tensor + "_rows")
            nodes += [
                helper.make_node("Transpose", [tensor], [nhwc], perm=[0, 2, 3, 1]),
                helper.make_node(
                    "Reshape",
                    [nhwc, self.const(np.array([-1, channels], np.int64), "rows")],
                    [rows],
                ),
            ]
            self.as_rows[tensor] = rows
            self.rows[rows] = (channels, height, width)
        return self.as_rows[tensor]

    def nchw_of(self, tensor: str, nodes: list) -> str:
        """A row-layout ``tensor`` back in NCHW, for the ops that need it (pooling)."""
        if tensor not in self.as_nchw:
            channels, height, width = self.rows[tensor]
            nhwc, nchw = self.fresh(tensor + "_nhwc"), self.fresh(tensor + "_nchw")
            nodes += [
                helper.make_node(
                    "Reshape",
                    [tensor, self.const(np.array([-1, height, width, channels], np.int64), "nhwc")],
                    [nhwc],
                ),
                helper.make_node("Transpose", [nhwc], [nchw], perm=[0, 3, 1, 2]),
            ]
            self.as_nchw[tensor] = nchw
        return self.as_nchw[tensor]

    def relayout(self, node, nodes: list) -> None:
        """Keep the GEMMs' row layout through what does not care about it: elementwise ops
        with scalar constants, and the neurons' per-step Split / Concat on axis 0 (rows are
        T-major, so each step is a contiguous block of rows). Anything else reads NCHW."""
        data = [i for i in node.input if i and i not in self.sizes]
        keeps = node.op_type in _ELEMENTWISE and all(
            self.sizes[i] == 1 for i in node.input if i in self.sizes
        )
        if (
            node.op_type in ("Split", "Concat")
            and attribute(node, "axis", 0) == 0
            and (node.op_type == "Concat" or len(node.input) == 1)
        ):
            keeps = True
            if node.op_type == "Split" and data[0] not in self.rows:
                # A neuron reading NCHW (after the max pool): its spikes go to a GEMM, so
                # convert its input once; not on 1x1 maps (the head), where nothing is gained.
                shape = self.shapes.get(data[0], ())
                keeps = len(shape) == 4 and shape[2] * shape[3] > 1
                if keeps:
                    node.input[0] = self.rows_of(data[0], nodes)
        if keeps and any(i in self.rows for i in node.input):
            node.input[:] = [self.rows_of(i, nodes) if i in data else i for i in node.input]
            layout = next(self.rows[i] for i in node.input if i in self.rows)
            for out in node.output:
                self.rows[out] = layout
        else:
            node.input[:] = [self.nchw_of(i, nodes) if i in self.rows else i for i in node.input]
        nodes.append(node)

    def gemm(self, node, nodes: list) -> None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            raise I2EError(f"{node.name}: only Gemm(x, W^T) + b is lowered")
        weight, scale, bias = self.weights(node)
        weight_kn = weight.T if attrs.get("transB", 0) else weight
        if not attrs.get("transB", 0):
            raise I2EError(f"{node.name}: expected a Gemm with transB=1 (PyTorch Linear)")
        hint = node.name.strip("/").replace("/", "_") or "gemm"
        self.matmul(
            self.activation(node, nodes), weight_kn, scale, bias, node.output[0], nodes, hint
        )

    def run(self) -> onnx.ModelProto:
        targets = [n for n in self.graph.node if n.op_type in QUANTIZED_OPS]
        self.shapes = _probe_shapes(
            self.model,
            [n.input[0] for n in targets if n.op_type == "Conv"]
            + [n.input[0] for n in self.graph.node if n.op_type == "Split"]
            + [
                i
                for n in self.graph.node
                if n.op_type in _ELEMENTWISE
                for i in n.input
                if i and i not in self.initializers
            ],
        )
        # Element counts of the constants (initializers and Constant nodes).
        self.sizes = {i.name: int(np.prod(i.dims)) for i in self.graph.initializer}
        self.sizes.update(
            (n.output[0], int(np.prod(n.attribute[0].t.dims)))
            for n in self.graph.node
            if n.op_type == "Constant" and n.attribute[0].name == "value"
        )
        nodes: list = []
        for node in self.graph.node:
            if node.op_type == "Conv":
                self.conv(node, self.shapes[node.input[0]], nodes)
            elif node.op_type == "Gemm":
                self.gemm(node, nodes)
            else:
                self.relayout(node, nodes)
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self.graph.initializer.extend(self.new_initializers)
        del self.graph.value_info[:]  # shapes recorded for NCHW; many tensors are rows now
        remove_dead(self.graph)
        if not any(op.domain == "com.microsoft" for op in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return self.model


def lower_for_onnxruntime(qdq: onnx.ModelProto) -> onnx.ModelProto:
    """The U8S8 ONNX Runtime CPU graph of a Q/DQ graph (see the module docstring), with the
    LIF chains in their cheaper exact form (:mod:`.lif`)."""
    from .lif import rewrite_lif

    merge_spike_casts(qdq)
    lowered = _Lowering(qdq).run()
    rewrite_lif(lowered)
    set_props(lowered, **{PRECISION_KEY: "int8", FLAVOUR_KEY: "onnxruntime"})
    return lowered


def to_int8(
    fp32: str | os.PathLike, output: str | os.PathLike, *, flavour: str = "onnxruntime"
) -> Path:
    """An exported FP32 graph -> its SNN-aware INT8 graph in ``flavour`` (see
    ``artifacts.INT8_FLAVOURS``). Writes ``output`` atomically."""
    if flavour not in INT8_FLAVOURS:
        raise I2EError(f"unknown INT8 flavour {flavour!r}; choose {' or '.join(INT8_FLAVOURS)}")
    with tempfile.TemporaryDirectory() as scratch:
        quantized = quantize_qdq(
            fp32, Path(scratch) / "int8.onnx", unsigned=flavour == "onnxruntime"
        )
        if flavour == "onnxruntime":
            onnx.save(lower_for_onnxruntime(onnx.load(str(quantized))), str(quantized))
        return copy_into_place(quantized, Path(output))
