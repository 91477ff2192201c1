"""SNN-aware INT8 and FP16 graphs: Q/DQ placement, the ONNX Runtime lowering, the exact LIF
rewrite, parity with FP32, and the calibration data path."""

from __future__ import annotations

import functools

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from runtime_models import _session_dir, shared_model
from typer.testing import CliRunner

from i2e_deploy.artifacts import metadata_of, onnx_card
from i2e_deploy.calibration.data import (
    CalibrationBatches,
    OrtCalibrationReader,
    load_calibration_images,
    to_graph_input,
)
from i2e_deploy.calibration.flips import spike_agreement
from i2e_deploy.calibration.graph import elem_types, producers
from i2e_deploy.calibration.half import half_graph
from i2e_deploy.calibration.lif import rewrite_lif
from i2e_deploy.calibration.qat import fake_quantize, finetune_int8, grid_error, snap_to_int8_grid
from i2e_deploy.calibration.quantize import binary_activations, lower_for_onnxruntime, quantize_qdq
from i2e_deploy.card import ModelCard
from i2e_deploy.cli import app
from i2e_deploy.compare import judge, limits_for, logit_metrics
from i2e_deploy.errors import I2EError
from i2e_deploy.images import synthetic_images

NEURON_OPS = (
    "GreaterOrEqual",
    "Where",
    "Add",
    "Mul",
    "Split",
    "Concat",
    "ThresholdedRelu",
    "LessOrEqual",
    "MaxPool",
    "GlobalAveragePool",
    "ReduceMean",
)


@functools.cache
def graph(kind: str):
    """Session-wide graphs of the shared 32 px model: 'fp32', 's8s8' (TensorRT Q/DQ),
    'u8s8' (Q/DQ with uint8 activations), 'ort' (lowered), 'fp16'."""
    root = _session_dir()
    fp32 = shared_model("onnx")
    if kind == "fp32":
        return fp32
    path = root / f"tiny.{kind}.onnx"
    if kind in ("s8s8", "u8s8"):
        quantize_qdq(fp32, path, unsigned=kind == "u8s8")
    elif kind == "ort":
        onnx.save(lower_for_onnxruntime(onnx.load(str(graph("u8s8")))), str(path))
    elif kind == "fp16":
        onnx.save(half_graph(onnx.load(str(fp32))), str(path))
    return path


@functools.cache
def images(count: int = 32) -> np.ndarray:
    return synthetic_images(count, ModelCard(imgsz=32, resize=32), seed=3)


def run(path, batch: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: batch[i : i + 8]})[0] for i in range(0, len(batch), 8)]
    )


def constant(model, name) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


@pytest.mark.parametrize("kind, zero_type", [("s8s8", np.int8), ("u8s8", np.uint8)])
def test_qdq_activations_exact_weights_per_channel_neurons_float(kind, zero_type):
    model = onnx.load(str(graph(kind)))
    writers = producers(model.graph)
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 21  # 20 convs + the classifier of an MS-ResNet-18
    for node in layers:
        dq = writers[node.input[0]]
        q = writers[dq.input[0]]
        assert (dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear"), node.name
        for n in (q, dq):  # 0 and 1 are encoded exactly: scale 1, zero point 0
            assert constant(model, n.input[1]) == np.float32(1.0)
            zp = constant(model, n.input[2])
            assert zp.dtype == zero_type and zp == 0
        wdq = writers[node.input[1]]
        weights, scales = constant(model, wdq.input[0]), constant(model, wdq.input[1])
        assert wdq.op_type == "DequantizeLinear" and weights.dtype == np.int8
        assert scales.shape == (weights.shape[0],)  # per output channel
        assert not constant(model, wdq.input[2]).any()  # symmetric
        assert np.abs(weights).max() == 127  # the largest weight of some channel maps to 127
        assert next(a.i for a in wdq.attribute if a.name == "axis") == 0
    # Quantization only feeds convs / the classifier; neurons, sums and outputs stay FP32.
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            assert {c.op_type for c in consumers[n.output[0]]} <= {"Conv", "Gemm"}
        if n.op_type in NEURON_OPS:
            assert all(
                writers[i].op_type not in ("DequantizeLinear", "QuantizeLinear")
                for i in n.input
                if i in writers
            ), n.name
        if n.op_type in ("Conv", "Gemm"):
            assert all(c.op_type != "QuantizeLinear" for c in consumers.get(n.output[0], []))


def test_binary_inputs_are_proven_not_assumed():
    card = ModelCard(imgsz=32, resize=32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    weight = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    model = helper.make_model(helper.make_graph([conv], "g", [x], [y], [weight]))
    with pytest.raises(I2EError, match="not provably 0/1"):
        binary_activations(model, card)
    # Event-input graphs: the input is 0/1 by the card's contract.
    events = ModelCard(imgsz=32, resize=32, input="events")
    assert binary_activations(model, events) == {"conv": "x"}
    # A comparison cast to float is 0/1 through any reshaping.
    nodes = [
        helper.make_node("GreaterOrEqual", ["x", "one"], ["s"]),
        helper.make_node("Cast", ["s"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["f", "shape"], ["r"]),
        helper.make_node("Conv", ["r", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    inits = [
        weight,
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array([1, 2, 8, 8], np.int64), "shape"),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits))
    assert binary_activations(model, card) == {"conv": "r"}


def test_lowered_graph_reads_spikes_as_uint8_and_matches_the_qdq_graph():
    model = onnx.load(str(graph("ort")))
    ops = [n.op_type for n in model.graph.node]
    # Every conv with a wide enough input and the classifier run as uint8 x int8 GEMMs; the
    # 2-channel stem runs as a float conv on the exact 0/1 events.
    assert ops.count("MatMulIntegerToFloat") == 20 and ops.count("Conv") == 1
    assert "DequantizeLinear" not in ops and ops.count("QuantizeLinear") <= 1  # classifier input
    for node in model.graph.node:
        if node.op_type == "MatMulIntegerToFloat":
            assert constant(model, node.input[1]).dtype == np.int8
    # Same quantized weights and scales as the TensorRT Q/DQ graph: same function.
    x = images()
    s8, low = run(graph("s8s8"), x), run(graph("ort"), x)
    assert np.abs(s8 - low).max() < 1e-3
    assert all(r["agreement"] == 1.0 for r in spike_agreement(graph("s8s8"), graph("ort"), x))


def test_int8_is_lossless_when_weights_are_on_the_grid(tmp_path):
    """Spikes and events are exact in INT8 and neurons stay FP32: with on-grid weights the
    INT8 graph predicts what the FP32 graph predicts."""
    from runtime_models import active_model, export

    from i2e_deploy.model.checkpoint import load_checkpoint, save_checkpoint

    card = ModelCard(imgsz=32, resize=32)
    model = active_model(card, seed=1)
    assert grid_error(model) > 0.4  # random weights sit anywhere between grid points
    # Stored as INT8 + per-channel scales (what the bundled model uses): still on the grid.
    save_checkpoint(tmp_path / "grid.pt", snap_to_int8_grid(model), card, weights="int8")
    assert grid_error(load_checkpoint(tmp_path / "grid.pt")[0]) < 1e-3
    fp32 = export(tmp_path / "grid.pt", tmp_path / "grid.onnx")
    quantize_qdq(fp32, tmp_path / "grid.u8.onnx", unsigned=True)
    onnx.save(
        lower_for_onnxruntime(onnx.load(str(tmp_path / "grid.u8.onnx"))),
        str(tmp_path / "grid.int8.onnx"),
    )
    x = images()
    metrics = logit_metrics(run(fp32, x), run(tmp_path / "grid.int8.onnx", x), tie_margin=0.05)
    assert metrics["decisive_mismatches"] == 0, metrics
    assert metrics["median_abs"] < 1e-4, metrics


def test_lif_rewrite_is_bit_exact():
    model = onnx.load(str(graph("fp32")))
    assert rewrite_lif(model) == 17  # 16 block LIFs (shortcut LIFs are shared) + the head
    path = _session_dir() / "tiny.lif.onnx"
    onnx.save(model, str(path))
    x = images()
    assert np.array_equal(run(graph("fp32"), x), run(path, x))
    assert all(r["agreement"] == 1.0 for r in spike_agreement(graph("fp32"), path, x))
    assert [n.op_type for n in model.graph.node].count("ThresholdedRelu") == 17 * 7


def test_lif_rewrite_refuses_a_chain_that_is_not_the_reference_lif():
    model = onnx.load(str(graph("fp32")))
    compare = next(
        n
        for n in model.graph.node
        if n.op_type == "GreaterOrEqual" and "layer2.1/sn2" in n.output[0]
    )
    compare.op_type = "Greater"  # fires only above the threshold: one layer is not SPEC's LIF
    assert rewrite_lif(model) == 16


def test_lif_rewrite_needs_a_power_of_two_decay():
    model = onnx.load(str(graph("fp32")))
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.6, np.float32), "decay"))
    for node in model.graph.node:  # every neuron now decays by 0.6 (tau = 2.5)
        if node.op_type == "Mul" and "/sn" in node.output[0]:
            node.input[:] = ["decay" if _is_half(model, i) else i for i in node.input]
    assert rewrite_lif(model) == 0


def _is_half(model, name) -> bool:
    from i2e_deploy.calibration.lif import _Graph

    return _Graph(model).scalar(name) == 0.5


def test_fp16_runs_convs_in_fp16_and_neurons_in_fp32():
    model = onnx.load(str(graph("fp16")))
    types = elem_types(model)
    writers = producers(model.graph)
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert all(types[i] == TensorProto.FLOAT16 for i in node.input)
            assert types[node.output[0]] == TensorProto.FLOAT16
        elif node.op_type != "Cast":
            assert all(
                types.get(t) != TensorProto.FLOAT16 for t in [*node.input, *node.output] if t
            ), node.name
    # Conv inputs are the 0/1 spikes cast to FP16 (exact).
    assert all(
        writers[n.input[0]].op_type == "Cast"
        for n in model.graph.node
        if n.op_type in ("Conv", "Gemm")
    )
    x = images()
    rows = spike_agreement(graph("fp32"), graph("fp16"), x)
    assert rows[0]["layer"] == "i2e" and rows[0]["agreement"] == 1.0  # converter stays FP32
    assert rows[1]["agreement"] > 0.99  # first LIF: only FP16 conv rounding can flip a spike


def test_calibration_batches_are_fixed_size():
    data = np.arange(10 * 2).reshape(10, 2)
    batches = CalibrationBatches(data, 4)
    assert len(batches) == 2 and batches.shape == (4, 2)
    got = [batches.next_batch(), batches.next_batch(), batches.next_batch()]
    assert np.array_equal(got[0], data[:4]) and np.array_equal(got[1], data[4:8])
    assert got[2] is None  # the partial batch of 2 is dropped
    batches.reset()
    assert np.array_equal(batches.next_batch(), data[:4])
    reader = OrtCalibrationReader(CalibrationBatches(data, 5), "images")
    assert [b["images"].shape for b in iter(reader.get_next, None)] == [(5, 2), (5, 2)]
    reader.rewind()
    assert reader.get_next()["images"].shape == (5, 2)
    with pytest.raises(I2EError, match="fewer than one batch"):
        CalibrationBatches(data, 11)


def test_calibration_images_follow_the_card(tmp_path):
    card = ModelCard(imgsz=32, resize=40)
    for i in range(6):
        image = np.full((48 + i, 64, 3), i * 40, np.uint8)
        cv2.imwrite(str(tmp_path / f"{i}.png"), image)
    (tmp_path / "notes.txt").write_text("not an image")
    images_ = load_calibration_images(tmp_path, card, size=3)
    assert images_.shape == (3, 32, 32, 3) and images_.dtype == np.uint8
    assert [int(im[0, 0, 0]) for im in images_] == [0, 80, 200]  # spread over the folder
    as_float = to_graph_input(images_, "float")
    assert as_float.shape == (3, 3, 32, 32) and as_float.max() <= 1.0
    assert load_calibration_images(None, card, size=4).shape == (4, 32, 32, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(I2EError, match="no images"):
        load_calibration_images(tmp_path / "empty", card)
    with pytest.raises(I2EError, match="event-input"):
        load_calibration_images(tmp_path, ModelCard(imgsz=32, resize=32, input="events"))


def test_int8_graph_keeps_the_card():
    model = onnx.load(str(graph("ort")))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["i2e_deploy.precision"] == "int8"
    assert props["i2e_deploy.int8_flavour"] == "onnxruntime"
    fp32 = onnx.load(str(graph("fp32")))
    assert onnx_card(metadata_of(model)) == onnx_card(metadata_of(fp32))


def test_fake_quantize_rounds_forward_and_passes_gradients():
    import torch

    weight = torch.tensor([[0.5, -0.25, 0.1], [1.0, 0.003, -0.7]], requires_grad=True)
    rounded = fake_quantize(weight)
    steps = weight.detach().abs().amax(1, keepdim=True) / 127
    assert torch.allclose(rounded / steps, (weight / steps).round())
    rounded.sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))  # straight through


def test_finetune_int8_writes_an_int8_exact_checkpoint(tmp_path):
    from runtime_models import save_active

    from i2e_deploy.model.checkpoint import load_checkpoint, save_checkpoint

    for label in ("cat", "dog"):  # two of the model's CIFAR-10 classes
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(
                str(tmp_path / "data" / label / f"{i}.png"), images(4)[i + 2 * (label == "dog")]
            )
    source = save_active(tmp_path / "model.pt")
    result = CliRunner().invoke(
        app,
        [
            "qat",
            str(source),
            str(tmp_path / "data"),
            "-o",
            str(tmp_path / "exact.pt"),
            "--steps",
            "2",
            "--batch",
            "2",
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    model, card = load_checkpoint(tmp_path / "exact.pt")
    assert grid_error(model) < 1e-3
    assert card.provenance["int8_exact"] and card.provenance["qat"]["steps"] == 2
    stored = torch.load(tmp_path / "exact.pt", weights_only=True)["int8_weights"]
    assert stored["layer4.1.conv2.weight"].dtype == torch.int8  # a quarter of FP32's size
    refused = CliRunner().invoke(
        app,
        ["qat", str(source), str(tmp_path / "data"), "-o", str(tmp_path / "y.pt"), "--steps", "0"],
    )
    assert refused.exit_code == 2 and "at least 1" in refused.output
    assert not (tmp_path / "y.pt").exists()
    model, card = load_checkpoint(source)
    card.provenance.update(val_split=4, seed=0)  # all 4 images would be held out
    save_checkpoint(tmp_path / "split.pt", model, card)
    refused = CliRunner().invoke(
        app,
        [
            "qat",
            str(tmp_path / "split.pt"),
            str(tmp_path / "data"),
            "-o",
            str(tmp_path / "y.pt"),
            "--workers",
            "0",
        ],
    )
    assert refused.exit_code == 2 and "the folder it was trained on" in refused.output
    assert not (tmp_path / "y.pt").exists()
    (tmp_path / "data" / "zebra").mkdir()
    cv2.imwrite(str(tmp_path / "data" / "zebra" / "0.png"), images(4)[0])
    with pytest.raises(I2EError, match="zebra.* not classes of the model"):
        finetune_int8(source, tmp_path / "data", tmp_path / "x.pt", steps=1, workers=0)


def test_compare_sees_the_spikes_of_rewritten_neurons():
    """The ONNX Runtime INT8 graph rewrites the LIF chains and keeps GEMM rows (here down to
    the 1x1 maps of a 32 px model); compare() still checks every LIF layer's spikes."""
    from i2e_deploy.compare import compare, limits_for
    from i2e_deploy.runtime.runners import OrtRunner

    with OrtRunner(graph("fp32")) as fp32, OrtRunner(graph("ort")) as int8:
        found = compare(fp32, int8, images(8), limits_for("int8"))
        _, want = fp32.infer_spikes(images(2))
        _, got = int8.infer_spikes(images(2))
    assert [row["layer"] for row in found.layers] == list(want) and len(want) == 18
    assert all(got[k].shape == want[k].shape for k in want)
    assert not any("not compared" in note for note in found.notes)
    assert found.checks[-1].name == "event agreement" and found.checks[-1].value == 1.0


def _with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    model.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors)
    return model


def test_lowered_convs_compute_the_qdq_convs_in_gemm_rows():
    """Every lowered conv (im2col GEMM, dense GEMM on the 2x2 maps, 1x1 maps) gives the Q/DQ
    graph's conv output, kept as rows [T*N*H*W, C] up to the pooling; no transposes between
    GEMMs and neurons."""
    from i2e_deploy.calibration.flips import as_layout_of

    qdq, low = onnx.load(str(graph("u8s8"))), onnx.load(str(graph("ort")))
    ops = [n.op_type for n in low.graph.node]
    assert ops.count("Transpose") <= 2  # into rows after the max pool, back before avgpool
    widths = {
        constant(low, n.input[1]).shape[0]
        for n in low.graph.node
        if n.op_type == "MatMulIntegerToFloat"
    }
    assert 2 * 2 * 64 in widths  # layer3 of the 32 px model: whole 2x2 images, 64 channels
    convs = [n.output[0] for n in qdq.graph.node if n.op_type == "Conv"][1:]  # not the stem
    x = images(8)
    want = dict(
        zip(
            convs,
            ort.InferenceSession(_with_outputs(qdq, convs).SerializeToString()).run(
                convs, {"images": x}
            ),
        )
    )
    got = dict(
        zip(
            convs,
            ort.InferenceSession(_with_outputs(low, convs).SerializeToString()).run(
                convs, {"images": x}
            ),
        )
    )
    for name in convs:
        assert got[name].ndim == 2 and got[name].shape[1] == want[name].shape[1], name
        nchw = as_layout_of(got[name], want[name])
        assert np.abs(nchw - want[name]).max() <= 1e-5 * np.abs(want[name]).max() + 1e-6, name


def test_lif_rewrite_on_gemm_rows_is_exact_near_the_threshold(tmp_path):
    """The rewritten chain on a [T*rows, C] input (the INT8 lowering's layout) fires exactly
    as SPEC's LIF, step by step, on inputs that put membranes on the threshold, one ulp
    below and above it."""
    from step_lif import lif_step

    from i2e_deploy.export.deploy import UnrolledLIF
    from i2e_deploy.model.neuron import LIF

    T, rows, channels = 8, 64, 16
    torch.onnx.export(
        UnrolledLIF(LIF(T), T),
        (torch.zeros(T * rows, channels),),
        str(tmp_path / "lif.onnx"),
        input_names=["x"],
        output_names=["spikes"],
        opset_version=17,
        dynamic_axes={"x": {0: "rows"}},
        dynamo=False,
    )
    model = onnx.load(str(tmp_path / "lif.onnx"))
    assert rewrite_lif(model) == 1
    assert [n.op_type for n in model.graph.node].count("ThresholdedRelu") == T - 1
    rng = np.random.default_rng(0)
    x = (rng.integers(-6, 10, (T, rows, channels)) / 8).astype(np.float32)  # exact sums
    x[0, 0, :3] = [1.0, np.nextafter(np.float32(1), 0), np.nextafter(np.float32(1), 2)]
    x[:, 1] = rng.normal(0.5, 0.6, (T, channels))  # ordinary rounding too
    got = (
        ort.InferenceSession(model.SerializeToString())
        .run(None, {"x": x.reshape(T * rows, channels)})[0]
        .reshape(T, rows, channels)
    )
    v, want, on_threshold = torch.zeros(rows, channels), [], 0
    for t in range(T):
        on_threshold += int((v * 0.5 + torch.from_numpy(x[t]) == 1.0).sum())
        s, v = lif_step(v, torch.from_numpy(x[t]))
        want.append(s.numpy())
    assert on_threshold > 100  # the inputs do test the >= at the threshold
    assert np.array_equal(got != 0, np.stack(want) != 0)


def test_bundled_int8_graph_predicts_what_its_fp32_graph_predicts(tmp_path):
    """The bundled model is INT8-exact: on held-out CIFAR-10 images its ONNX Runtime INT8
    graph (GEMM rows, dense small maps, rewritten neurons) predicts what its FP32 graph
    predicts. Integer GEMMs and float convs round their sums differently, so a membrane within
    rounding of the threshold may flip, rarely."""
    from runtime_models import heldout_cifar

    from i2e_deploy.assets import DEFAULT_MODEL
    from i2e_deploy.calibration.quantize import to_int8
    from i2e_deploy.export.onnx import export_onnx
    from i2e_deploy.images import load_images
    from i2e_deploy.model.checkpoint import load_checkpoint

    folder = heldout_cifar(200)
    card = load_checkpoint(DEFAULT_MODEL)[1]
    x = load_images(sorted(folder.rglob("*.jpg"))[::4], card).images
    fp32 = export_onnx(DEFAULT_MODEL, tmp_path / "bundled.onnx").path
    int8 = to_int8(fp32, tmp_path / "bundled.int8.onnx")
    assert "MatMulIntegerToFloat" in {n.op_type for n in onnx.load(str(int8)).graph.node}
    a, b = run(fp32, x), run(int8, x)
    found = judge(a, b, limits_for("int8"))
    assert found.passed and found.metrics["decisive_mismatches"] == 0, found.metrics
    assert found.metrics["top1_agreement"] >= 0.98 and np.median(np.abs(a - b)) < 1e-5
    layers = spike_agreement(fp32, int8, x)
    assert len(layers) == 18 and layers[0]["agreement"] == 1.0  # the converter's events
    assert all(r["agreement"] > 0.99 for r in layers), layers  # >= 99.7 % before this lowering
