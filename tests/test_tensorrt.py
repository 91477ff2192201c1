"""TensorRT engine building: everything that runs without TensorRT (profiles, sidecar,
refusal, argument checks, the CLI's message), and the build itself where TensorRT and a GPU
are present."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from i2e_deploy.calibration.quantize import to_int8
from i2e_deploy.card import ModelCard
from i2e_deploy.cli import app
from i2e_deploy.errors import I2EError
from i2e_deploy.export.tensorrt import (BuildRequest, apply_precision_constraints,
                                        profile_shapes, sidecar_record, write_engine)
from i2e_deploy.runtime.runners import (check_engine_compatible, engine_sidecar_path,
                                        read_engine_sidecar)
from runtime_models import shared_model

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_profile_shapes_for_dynamic_and_static_graphs():
    assert profile_shapes([-1, 32, 32, 3]) == {
        "min": [1, 32, 32, 3], "opt": [1, 32, 32, 3], "max": [8, 32, 32, 3]}
    assert profile_shapes([-1, 8, 2, 64, 64], min_batch=2, opt_batch=4, max_batch=16) == {
        "min": [2, 8, 2, 64, 64], "opt": [4, 8, 2, 64, 64], "max": [16, 8, 2, 64, 64]}
    assert profile_shapes([-1, 32, 32, 3], opt_batch=32)["max"][0] == 32
    assert profile_shapes([4, 32, 32, 3]) is None
    assert profile_shapes([4, 32, 32, 3], max_batch=4) is None
    with pytest.raises(I2EError, match="static batch of 4"):
        profile_shapes([4, 32, 32, 3], max_batch=8)
    with pytest.raises(I2EError, match="min .* <= opt"):
        profile_shapes([-1, 32, 32, 3], min_batch=4, opt_batch=2)
    with pytest.raises(I2EError, match="only the batch dimension"):
        profile_shapes([-1, -1, 32, 3])


def sidecar(**changes):
    card = ModelCard(imgsz=32, resize=32)
    data = sidecar_record(card, tensorrt_version="10.3.0", gpu_name="NVIDIA Jetson Orin",
                          compute_capability="8.7", precision="int8",
                          io={"inputs": [{"name": "images", "dtype": "uint8",
                                          "shape": [-1, 32, 32, 3]}],
                              "outputs": [{"name": "logits", "dtype": "float32",
                                           "shape": [-1, 10]}]},
                          profile=profile_shapes([-1, 32, 32, 3]), int8_mode="qdq")
    data.update(changes)
    return data


def test_sidecar_round_trip_and_refusal(tmp_path):
    engine = write_engine(tmp_path / "model.engine", b"\x00engine-bytes", sidecar())
    assert engine.read_bytes() == b"\x00engine-bytes"
    assert engine_sidecar_path(engine) == tmp_path / "model.engine.json"
    data = read_engine_sidecar(engine)
    assert ModelCard.from_dict(data["card"]) == ModelCard(imgsz=32, resize=32)
    assert data["precision"] == "int8" and data["profile"]["max"] == [8, 32, 32, 3]
    assert data["io"]["inputs"][0]["name"] == "images"
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    # The runner's check accepts the machine the engine was built for ...
    check_engine_compatible(data, tensorrt_version="10.3.0", gpu_name="NVIDIA Jetson Orin",
                            compute_capability="8.7")
    # ... and refuses another TensorRT or another GPU with a one-line fix.
    with pytest.raises(I2EError, match="TensorRT 10.3.0, this is TensorRT 10.7.0.*rebuild"):
        check_engine_compatible(data, tensorrt_version="10.7.0", gpu_name="NVIDIA Jetson Orin",
                                compute_capability="8.7")
    with pytest.raises(I2EError, match="built for NVIDIA Jetson Orin .* this GPU is"):
        check_engine_compatible(data, tensorrt_version="10.3.0", gpu_name="NVIDIA A100",
                                compute_capability="8.0")


def test_engine_without_sidecar_is_refused(tmp_path):
    (tmp_path / "model.engine").write_bytes(b"x")
    with pytest.raises(I2EError, match="sidecar .* missing"):
        read_engine_sidecar(tmp_path / "model.engine")
    (tmp_path / "model.engine.json").write_text(json.dumps({"card": {}}))
    with pytest.raises(I2EError, match="missing tensorrt_version"):
        read_engine_sidecar(tmp_path / "model.engine")


def test_build_request_checks_arguments_before_tensorrt(tmp_path):
    onnx_file = shared_model("onnx")
    request = BuildRequest(onnx_file, precision="fp16", max_batch=16, dla_core=0)
    assert request.output == onnx_file.with_suffix(".engine")
    assert request.batches == (None, None, 16) and request.workspace_bytes == 4 << 30
    cases = [({"onnx_path": tmp_path / "missing.onnx"}, "not found"),
             ({"onnx_path": tmp_path / "model.pt"}, "takes an exported .onnx"),
             ({"precision": "int4"}, "unknown precision"),
             ({"int8_mode": "percentile"}, "unknown INT8 mode"),
             ({"dla_core": 0}, "DLA runs FP16 or INT8"),
             ({"output": tmp_path / "model.trt"}, ".engine or .plan"),
             ({"output": tmp_path / "no" / "model.engine"}, "does not exist"),
             ({"min_batch": 0}, "at least 1"),
             ({"workspace_gib": 0}, "must be positive"),
             ({"device": "gpu"}, "unknown device")]
    ort_int8 = tmp_path / "cpu.int8.onnx"
    to_int8(onnx_file, ort_int8, verify=False)
    cases.append(({"onnx_path": ort_int8}, "INT8 graph for ONNX Runtime on CPUs"))
    for change, message in cases:
        args = {"onnx_path": onnx_file, **change}
        with pytest.raises(I2EError, match=message):
            BuildRequest(args.pop("onnx_path"), **args)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
class _Tensor:
    def __init__(self, dtype):
        self.dtype = dtype


class _Layer:
    """The few ILayer members the precision pass uses (a stand-in for TensorRT's)."""

    def __init__(self, kind, inputs, outputs):
        self.type = type("LayerType", (), {"name": kind})()
        self._inputs, self._outputs = [_Tensor(t) for t in inputs], [_Tensor(t) for t in outputs]
        self.precision, self.output_types = None, {}
        self.num_inputs, self.num_outputs = len(inputs), len(outputs)

    def get_input(self, k):
        return self._inputs[k]

    def get_output(self, j):
        return self._outputs[j]

    def set_output_type(self, j, dtype):
        self.output_types[j] = dtype


def test_precision_constraints_pin_neurons_and_leave_integer_math():
    from types import SimpleNamespace

    trt = SimpleNamespace(float32="f32", float16="f16", bool="bool", int64="i64", int8="i8")

    def network():
        layers = {"membrane add": _Layer("ELEMENTWISE", ["f32", "f32"], ["f32"]),
                  "threshold": _Layer("ELEMENTWISE", ["f32", "f32"], ["bool"]),
                  "reset": _Layer("SELECT", ["bool", "f32", "f32"], ["f32"]),
                  "batch arithmetic": _Layer("ELEMENTWISE", ["i64", "i64"], ["i64"]),
                  "conv": _Layer("CONVOLUTION", ["f32", "f32"], ["f32"]),
                  "spike cast": _Layer("CAST", ["bool"], ["f32"])}
        net = SimpleNamespace(num_layers=len(layers), get_layer=list(layers.values()).__getitem__)
        return net, layers

    net, layers = network()
    assert apply_precision_constraints(net, trt, "fp16") == 3
    for name in ("membrane add", "threshold", "reset"):
        assert layers[name].precision == "f32", name
    assert layers["membrane add"].output_types == {0: "f32"}
    assert layers["threshold"].output_types == {}  # a bool output keeps its type
    assert layers["batch arithmetic"].precision is None
    assert layers["batch arithmetic"].output_types == {}
    assert layers["conv"].precision == "f16" and layers["conv"].output_types == {0: "f32"}
    assert layers["spike cast"].precision is None
    net, layers = network()
    apply_precision_constraints(net, trt, "int8")
    assert layers["conv"].precision is None and layers["conv"].output_types == {0: "f32"}


def test_build_cli_without_tensorrt_is_one_line():
    result = CliRunner().invoke(app, ["build", str(shared_model("onnx")), "--half"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0]
    result = CliRunner().invoke(app, ["build", str(shared_model("onnx")), "--data", "x"])
    assert result.exit_code == 2 and "--calibrator entropy" in result.output


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision, mode", [("fp32", "qdq"), ("fp16", "qdq"), ("int8", "qdq"),
                                             ("int8", "entropy")])
def test_build_engine_and_run_it(tmp_path, precision, mode):
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from i2e_deploy.export.tensorrt import build_engine
    from i2e_deploy.runtime.runners import load_runner

    engine = build_engine(shared_model("onnx"), tmp_path / f"{precision}.engine",
                          precision=precision, int8_mode=mode, max_batch=4,
                          calib_size=16, timing_cache=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0
    assert read_engine_sidecar(engine)["precision"] == precision
    with load_runner(engine) as trt_runner, load_runner(shared_model("onnx")) as ort_runner:
        batch = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
        got, want = trt_runner.infer(batch), ort_runner.infer(batch)
        assert got.shape == want.shape
        if precision == "fp32":
            assert np.median(np.abs(got - want)) < 1e-3


def test_int8_build_feeds_tensorrt_the_s8s8_qdq_graph(tmp_path):
    """`build --int8` (default calibrator qdq) quantizes the FP32 graph before TensorRT parses
    it: S8S8 (int8 activations, zero point 0), the card kept."""
    import onnx
    from onnx import numpy_helper

    from i2e_deploy.export.tensorrt import parsed_graph

    request = BuildRequest(shared_model("onnx"), tmp_path / "m.engine", precision="int8")
    graph = parsed_graph(request, tmp_path)
    assert graph.parent == tmp_path
    model = onnx.load(str(graph))
    zero_points = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    activation_quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
                             and n.input[0] not in zero_points]
    assert activation_quantizers
    for node in activation_quantizers:
        zero = zero_points[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any()
    fp32 = BuildRequest(shared_model("onnx"), tmp_path / "f.engine", precision="fp16")
    assert parsed_graph(fp32, tmp_path) == shared_model("onnx")
