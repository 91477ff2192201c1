"""TensorRT engines through Polygraphy: everything up to TensorRT itself runs here (profiles,
refusals, the build plan per TensorRT version, which graph feeds which precision, the lazy
loader chain, the sidecar, the CLI's one-line messages); the build and run where TensorRT and
a GPU are present."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from polygraphy.backend.trt import (
    CreateConfig,
    EngineBytesFromNetwork,
    NetworkFromOnnxPath,
    PostprocessConfig,
    PostprocessNetwork,
)
from runtime_models import shared_model
from typer.testing import CliRunner

from i2e_deploy.artifacts import engine_sidecar_path, read_engine_sidecar
from i2e_deploy.calibration.half import to_fp16
from i2e_deploy.calibration.quantize import to_int8
from i2e_deploy.card import ModelCard
from i2e_deploy.cli import app
from i2e_deploy.errors import I2EError
from i2e_deploy.export.tensorrt import (
    BuildPlan,
    BuildRequest,
    apply_precision_constraints,
    engine_loaders,
    layer_precisions,
    parsed_graph,
    plan_build,
    profile_shapes,
    sidecar_record,
    tensorrt_unavailable,
    write_engine,
)
from i2e_deploy.runtime.runners import check_engine_compatible

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
# The one TensorRT name the loader chain reads before a build: the workspace pool's enum.
TRT_NAMES = SimpleNamespace(MemoryPoolType=SimpleNamespace(WORKSPACE="workspace pool"))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The shared tiny FP32 graph and the reduced graphs derived from it."""
    root = tmp_path_factory.mktemp("graphs")
    fp32 = shared_model("onnx")
    return {
        "fp32": fp32,
        "fp16": to_fp16(fp32, root / "m.fp16.onnx"),
        "int8": to_int8(fp32, root / "m.int8.onnx", flavour="tensorrt"),
        "ort-int8": to_int8(fp32, root / "cpu.int8.onnx"),
        "static": shared_model("static.onnx"),
    }


def test_profile_shapes_dynamic_static_and_fixed():
    assert profile_shapes([-1, 32, 32, 3]) == {
        "min": [1, 32, 32, 3],
        "opt": [1, 32, 32, 3],
        "max": [8, 32, 32, 3],
    }
    assert profile_shapes([-1, 8, 2, 64, 64], min_batch=2, opt_batch=4, max_batch=16) == {
        "min": [2, 8, 2, 64, 64],
        "opt": [4, 8, 2, 64, 64],
        "max": [16, 8, 2, 64, 64],
    }
    assert profile_shapes([-1, 32, 32, 3], opt_batch=32)["max"][0] == 32
    # A static graph's profile is its own batch; no other batch is accepted.
    static = profile_shapes([4, 32, 32, 3])
    assert static["min"] == static["opt"] == static["max"] == [4, 32, 32, 3]
    assert profile_shapes([4, 32, 32, 3], max_batch=4) == static
    with pytest.raises(I2EError, match="static batch of 4"):
        profile_shapes([4, 32, 32, 3], max_batch=8)
    # DLA: no dynamic dimensions, one batch (min = opt = max).
    fixed = profile_shapes([-1, 32, 32, 3], fixed=True)
    assert fixed["min"] == fixed["opt"] == fixed["max"] == [1, 32, 32, 3]
    assert profile_shapes([-1, 32, 32, 3], max_batch=4, fixed=True)["min"][0] == 4
    assert profile_shapes([-1, 32, 32, 3], opt_batch=2, max_batch=2, fixed=True)["max"][0] == 2
    with pytest.raises(I2EError, match="DLA runs one fixed batch"):
        profile_shapes([-1, 32, 32, 3], min_batch=1, max_batch=8, fixed=True)
    with pytest.raises(I2EError, match="min .* <= opt"):
        profile_shapes([-1, 32, 32, 3], min_batch=4, opt_batch=2)
    with pytest.raises(I2EError, match="only the batch dimension"):
        profile_shapes([-1, -1, 32, 3])


def sidecar(**changes):
    card = ModelCard(imgsz=32, resize=32)
    data = sidecar_record(
        card,
        tensorrt_version="10.3.0",
        gpu_name="NVIDIA Jetson Orin",
        compute_capability="8.7",
        precision="int8",
        io={
            "inputs": [{"name": "images", "dtype": "uint8", "shape": [-1, 32, 32, 3]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 10]}],
        },
        profile=profile_shapes([-1, 32, 32, 3]),
        int8_mode="qdq",
        plan=BuildPlan("int8", strongly_typed=True),
        layers={"count": 2, "by_type": {"CaskConvolution": {"int8": 2}}},
    )
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
    assert data["build"] == {
        "graph": "int8",
        "strongly_typed": True,
        "flags": [],
        "fp32_pins": False,
    }
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    # The runner's check accepts the machine the engine was built for ...
    check_engine_compatible(
        data, tensorrt_version="10.3.0", gpu_name="NVIDIA Jetson Orin", compute_capability="8.7"
    )
    # ... and refuses another TensorRT or another GPU with a one-line fix.
    with pytest.raises(I2EError, match="TensorRT 10.3.0, this is TensorRT 10.7.0.*rebuild"):
        check_engine_compatible(
            data, tensorrt_version="10.7.0", gpu_name="NVIDIA Jetson Orin", compute_capability="8.7"
        )
    with pytest.raises(I2EError, match="built for NVIDIA Jetson Orin .* this GPU is"):
        check_engine_compatible(
            data, tensorrt_version="10.3.0", gpu_name="NVIDIA A100", compute_capability="8.0"
        )


def test_engine_without_sidecar_is_refused(tmp_path):
    (tmp_path / "model.engine").write_bytes(b"x")
    with pytest.raises(I2EError, match="sidecar .* missing"):
        read_engine_sidecar(tmp_path / "model.engine")
    (tmp_path / "model.engine.json").write_text(json.dumps({"card": {}}))
    with pytest.raises(I2EError, match="missing tensorrt_version.*io, profile"):
        read_engine_sidecar(tmp_path / "model.engine")


def test_build_request_checks_arguments_before_tensorrt(tmp_path, graphs):
    onnx_file = graphs["fp32"]
    request = BuildRequest(onnx_file, precision="fp16", max_batch=16)
    assert request.output == onnx_file.with_suffix(".engine")
    assert request.profile["max"] == [16, 32, 32, 3] and request.workspace_bytes == 4 << 30
    assert request.graph.input_name == "images" and request.graph.precision == "fp32"
    assert request.graph.io["outputs"] == [
        {"name": "logits", "dtype": "float32", "shape": [-1, 10]}
    ]
    cases = [
        ({"onnx_path": tmp_path / "missing.onnx"}, "not found"),
        ({"onnx_path": tmp_path / "model.pt"}, "takes an exported .onnx"),
        ({"precision": "int4"}, "unknown precision"),
        ({"int8_mode": "percentile"}, "unknown INT8 mode"),
        ({"dla_core": 0}, "DLA runs FP16 or INT8"),
        (
            {"precision": "fp16", "dla_core": 0, "max_batch": 8, "min_batch": 1},
            "DLA runs one fixed batch",
        ),
        ({"output": tmp_path / "model.trt"}, ".engine or .plan"),
        ({"output": tmp_path / "no" / "model.engine"}, "does not exist"),
        ({"min_batch": 0}, "at least 1"),
        ({"workspace_gib": 0}, "must be positive"),
        ({"device": "gpu"}, "unknown device"),
        (
            {"onnx_path": graphs["ort-int8"], "precision": "int8"},
            "INT8 graph for ONNX Runtime on CPUs",
        ),
        # The graph's numeric form decides: a Q/DQ graph is INT8 only, an FP16 graph FP16.
        (
            {"onnx_path": graphs["int8"], "precision": "fp16"},
            "INT8 Q/DQ graph: build it with --int8",
        ),
        ({"onnx_path": graphs["int8"]}, "INT8 Q/DQ graph"),
        (
            {"onnx_path": graphs["int8"], "precision": "int8", "int8_mode": "entropy"},
            "INT8 Q/DQ graph",
        ),
        ({"onnx_path": graphs["fp16"], "precision": "int8"}, "FP16 graph: build it with --half"),
        ({"onnx_path": graphs["static"], "max_batch": 8}, "static batch of 2"),
    ]
    for change, message in cases:
        args = {"onnx_path": onnx_file, **change}
        with pytest.raises(I2EError, match=message):
            BuildRequest(args.pop("onnx_path"), **args)
    assert BuildRequest(graphs["int8"], precision="int8").graph.precision == "int8"
    assert BuildRequest(graphs["fp16"], precision="fp16").graph.precision == "fp16"
    dla = BuildRequest(onnx_file, precision="int8", dla_core=1, opt_batch=4)
    assert dla.profile["min"] == dla.profile["opt"] == dla.profile["max"] == [4, 32, 32, 3]


def test_build_plan_per_tensorrt_version(graphs):
    def plan(version, graph="fp32", **options):
        return plan_build(BuildRequest(graphs[graph], **options), version)

    for version in ("10.3.0", "10.13.0.35", "11.4.0"):  # strongly typed: no precision flags
        for precision in ("fp32", "fp16", "int8"):
            assert plan(version, precision=precision) == BuildPlan(precision, strongly_typed=True)
    assert plan("10.3.0", "int8", precision="int8") == BuildPlan("int8", strongly_typed=True)
    assert plan("10.3.0", "fp16", precision="fp16") == BuildPlan("fp16", strongly_typed=True)
    # DLA on TensorRT 10 builds with flags, without FP32 pins (they would move layers to the GPU).
    assert plan("10.3.0", precision="fp16", dla_core=0) == BuildPlan(
        "fp32", strongly_typed=False, fp16=True
    )
    assert plan("10.3.0", precision="int8", dla_core=0) == BuildPlan(
        "int8", strongly_typed=False, fp16=True, int8=True
    )
    assert plan("11.4.0", precision="int8", dla_core=0) == BuildPlan("int8", strongly_typed=True)
    # TensorRT without strong typing: flags, neurons pinned to FP32.
    assert plan("8.6.1", precision="fp16") == BuildPlan(
        "fp32", strongly_typed=False, fp16=True, pin_fp32=True
    )
    assert plan("8.6.1", precision="int8") == BuildPlan(
        "int8", strongly_typed=False, int8=True, pin_fp32=True
    )
    assert plan("8.6.1", "fp16", precision="fp16").graph == "fp16"
    assert plan("8.6.1").flags() == [] and plan("8.6.1").strongly_typed is False
    # Implicit calibration: weakly typed by nature, gone in TensorRT 11.
    assert plan("10.3.0", precision="int8", int8_mode="minmax") == BuildPlan(
        "fp32", strongly_typed=False, int8=True, pin_fp32=True, calibrator="minmax"
    )
    with pytest.raises(I2EError, match="no implicit INT8 calibration.*--calibrator qdq"):
        plan("11.4.0", precision="int8", int8_mode="entropy")
    with pytest.raises(I2EError, match="cannot read the TensorRT version"):
        plan("unknown")


def test_each_precision_parses_its_own_graph(tmp_path, graphs):
    """fp32 -> the FP32 graph; fp16 -> the FP16 graph (FP16 convs, FP32 everything else);
    int8 -> the S8S8 Q/DQ graph (int8 zero points 0); reduced graphs are parsed as given."""

    def graph_for(graph="fp32", version="10.3.0", **options):
        request = BuildRequest(graphs[graph], **options)
        return onnx.load(str(parsed_graph(request, plan_build(request, version), tmp_path)))

    def elem_types(model):
        inferred = onnx.shape_inference.infer_shapes(model).graph
        types = {
            v.name: v.type.tensor_type.elem_type
            for v in (*inferred.input, *inferred.output, *inferred.value_info)
        }
        types.update({i.name: i.data_type for i in inferred.initializer})
        return types

    assert graph_for() == onnx.load(str(graphs["fp32"]))
    half = graph_for(precision="fp16")
    types = elem_types(half)
    convs = [n for n in half.graph.node if n.op_type in ("Conv", "Gemm")]
    assert convs and all(
        types[n.input[0]] == types[n.output[0]] == TensorProto.FLOAT16 for n in convs
    )
    compares = [n for n in half.graph.node if n.op_type in ("GreaterOrEqual", "Greater", "Less")]
    assert compares and all(types[n.input[0]] == TensorProto.FLOAT for n in compares)  # neurons
    qdq = graph_for(precision="int8")
    initializers = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    activations = [
        n
        for n in qdq.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in initializers
    ]
    assert activations
    for node in activations:
        zero = initializers[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any()
    assert graph_for("int8", precision="int8") == onnx.load(str(graphs["int8"]))
    assert graph_for("fp16", precision="fp16") == onnx.load(str(graphs["fp16"]))
    # Weakly typed DLA on TensorRT 10: FP16 from the flag, so the FP32 graph is parsed.
    assert graph_for(precision="fp16", dla_core=0) == onnx.load(str(graphs["fp32"]))


def chain(graphs, tmp_path, version="10.3.0", graph="fp32", **options):
    request = BuildRequest(graphs[graph], **options)
    plan = plan_build(request, version)
    parsed = parsed_graph(request, plan, tmp_path)
    return request, plan, parsed, engine_loaders(request, plan, parsed, TRT_NAMES)


def test_loader_chain_strongly_typed_with_profile_and_timing_cache(tmp_path, graphs):
    cache = tmp_path / "timing.cache"
    request, plan, parsed, loaders = chain(
        graphs,
        tmp_path,
        precision="int8",
        min_batch=2,
        opt_batch=4,
        max_batch=16,
        timing_cache=cache,
        workspace_gib=0.5,
    )
    network = loaders.network
    assert isinstance(network, NetworkFromOnnxPath) and network.strongly_typed
    assert network.path == str(parsed) and parsed.parent == tmp_path  # the Q/DQ graph
    config = loaders.create_config
    assert isinstance(config, CreateConfig)
    assert (config.fp16, config.int8, config.tf32) == (False, False, False)  # no flags
    assert config.precision_constraints is None and config.calibrator is None
    (profile,) = config.profiles
    shapes = profile["images"]
    assert (list(shapes.min), list(shapes.opt), list(shapes.max)) == (
        [2, 32, 32, 3],
        [4, 32, 32, 3],
        [16, 32, 32, 3],
    )
    assert config.memory_pool_limits == {"workspace pool": 1 << 29}
    assert config.timing_cache_path == str(cache)
    assert not config.use_dla and not config.allow_gpu_fallback
    engine = loaders.engine
    assert isinstance(engine, EngineBytesFromNetwork) and engine.timing_cache_path == str(cache)
    assert loaders.config is config  # no DLA: the CreateConfig itself
    # Without a cache file neither loads nor saves one.
    _, _, _, plain = chain(graphs, tmp_path, precision="fp32")
    assert plain.create_config.timing_cache_path is None
    assert plain.engine.timing_cache_path is None
    assert plain.network.path == str(graphs["fp32"])


def test_loader_chain_weakly_typed_pins_neurons(tmp_path, graphs):
    _, plan, parsed, loaders = chain(graphs, tmp_path, version="8.6.1", precision="fp16")
    assert isinstance(loaders.network, PostprocessNetwork)
    config = loaders.create_config
    assert config.fp16 and not config.int8 and config.precision_constraints == "obey"
    assert parsed == graphs["fp32"]


def test_loader_chain_for_dla(tmp_path, graphs):
    request, plan, _, loaders = chain(graphs, tmp_path, precision="int8", dla_core=1, max_batch=2)
    config = loaders.create_config
    assert config.use_dla and config.allow_gpu_fallback
    shapes = config.profiles[0]["images"]
    assert list(shapes.min) == list(shapes.opt) == list(shapes.max) == [2, 32, 32, 3]
    # Flags, and the GPU-fallback layers' FP32 pins preferred (see the DLA core test).
    assert config.fp16 and config.int8 and config.precision_constraints == "prefer"
    assert not loaders.network.strongly_typed  # TensorRT 10: flags, as NVIDIA's DLA guide
    # Polygraphy always picks DLA core 0; the chain's last config step picks ours and
    # records which layers TensorRT can place on the DLA.
    assert isinstance(loaders.config, PostprocessConfig)
    assert loaders.create_config is not loaders.config
    _, _, _, strong = chain(graphs, tmp_path, version="11.4.0", precision="fp16", dla_core=0)
    assert strong.network.strongly_typed and not strong.create_config.fp16
    assert strong.create_config.precision_constraints is None


class _Layer(SimpleNamespace):
    """The few ILayer members the precision pass uses (a stand-in for TensorRT's)."""

    def __init__(self, kind, inputs, outputs):
        super().__init__(
            type=SimpleNamespace(name=kind),
            precision=None,
            output_types={},
            num_inputs=len(inputs),
            num_outputs=len(outputs),
            _inputs=[SimpleNamespace(dtype=t) for t in inputs],
            _outputs=[SimpleNamespace(dtype=t) for t in outputs],
        )

    def get_input(self, k):
        return self._inputs[k]

    def get_output(self, j):
        return self._outputs[j]

    def set_output_type(self, j, dtype):
        self.output_types[j] = dtype


def _network(layers):
    for name, layer in layers.items():
        layer.name = name
    return SimpleNamespace(num_layers=len(layers), get_layer=list(layers.values()).__getitem__)


@pytest.mark.parametrize("model", ["onnx", "float.onnx"])
def test_implicit_calibration_feeds_every_batch_as_float32(tmp_path, monkeypatch, model):
    """Polygraphy's Calibrator on the CPU, up to the copy to the GPU (``get_batch`` with no
    input names): each batch passes the input check TensorRT's calibration needs (float32 for
    non-index inputs, 0-255 pixels for the uint8 NHWC graph) and every batch arrives. The
    calibrator used to be fed ``iter(next_batch, None)`` (a ValueError on the first batch),
    then uint8 batches, which ``get_batch`` rejected silently: zero batches calibrated."""
    from polygraphy.backend.trt import Calibrator
    from polygraphy.common import TensorMetadata
    from polygraphy.datatype import DataType

    import i2e_deploy.calibration.data  # noqa: F401  (before the stand-in below)
    from i2e_deploy.export.tensorrt import _calibrator

    request = BuildRequest(
        shared_model(model),
        tmp_path / "m.engine",
        precision="int8",
        int8_mode="entropy",
        opt_batch=4,
        calib_size=10,
    )
    if HAS_TENSORRT:
        pytest.skip("TensorRT is installed here: its calibrator base classes need a GPU")
    # A stand-in for TensorRT's calibrator base classes (the Calibrator compares ours with
    # each of them).
    trt = SimpleNamespace(
        __version__="10.3.0",
        **{
            name: type(name, (), {})
            for name in (
                "IInt8EntropyCalibrator2",
                "IInt8MinMaxCalibrator",
                "IInt8LegacyCalibrator",
                "IInt8Calibrator",
            )
        },
    )
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    calibrator = _calibrator(request, trt, "entropy")
    assert calibrator.make_func is Calibrator
    graph_input = request.graph.io["inputs"][0]
    # What Polygraphy's CreateConfig hands the calibrator: the network input at the opt shape.
    calibrator.set_input_metadata(
        TensorMetadata().add(
            graph_input["name"],
            DataType.from_dtype(np.dtype(graph_input["dtype"])),
            request.profile["opt"],
        )
    )
    batches = []
    while calibrator.get_batch([]) is not None:
        batches.append(calibrator.data_loader[len(batches)][graph_input["name"]])
    assert len(batches) == 2  # 10 images in batches of 4: the partial batch is dropped
    assert all(b.dtype == np.float32 and list(b.shape) == request.profile["opt"] for b in batches)
    if graph_input["dtype"] == "uint8":  # the pixels as they are, not scaled to [0, 1]
        assert max(b.max() for b in batches) > 1 and all(b.max() <= 255 for b in batches)


def test_dla_core_selection_and_layer_report():
    from i2e_deploy.export.tensorrt import _use_dla_core

    layers = {
        "conv": _Layer("CONVOLUTION", ["f16"], ["f16"]),
        "threshold": _Layer("ELEMENTWISE", ["f16", "f16"], ["bool"]),
    }
    config = SimpleNamespace(DLA_core=0, can_run_on_DLA=lambda layer: layer.name == "conv")
    report: dict = {}
    _use_dla_core(SimpleNamespace(num_DLA_cores=2), _network(layers), config, core=1, report=report)
    assert config.DLA_core == 1 and report == {"dla": ["conv"], "gpu": ["threshold"]}
    assert layers["threshold"].precision is None  # strongly typed: no pins
    # Weakly typed (TensorRT 10, FP16 flag): the layers that fall back to the GPU are pinned
    # to FP32 (a neuron in FP16 can flip a spike); the DLA's own layers are left alone.
    trt = SimpleNamespace(float32="f32", float16="f16", bool="bool")
    _use_dla_core(
        SimpleNamespace(num_DLA_cores=2),
        _network(layers),
        config,
        core=0,
        report=report,
        pin=functools.partial(apply_precision_constraints, trt=trt, precision="fp16"),
    )
    assert report["gpu_fp32"] == ["threshold"] and layers["threshold"].precision == "f32"
    assert layers["conv"].precision is None and layers["conv"].output_types == {}
    with pytest.raises(I2EError, match="--dla-core 2 does not exist: this device has 2"):
        _use_dla_core(
            SimpleNamespace(num_DLA_cores=2), _network(layers), config, core=2, report=report
        )
    with pytest.raises(I2EError, match="has 0 DLA core.*drop --dla-core"):
        _use_dla_core(
            SimpleNamespace(num_DLA_cores=0), _network(layers), config, core=0, report=report
        )


def test_dla_engine_runs_on_its_core():
    """IRuntime.DLA_core defaults to -1: the runner sets the sidecar's core on the runtime
    that deserializes the engine, and refuses a core the device does not have."""
    from i2e_deploy.export.tensorrt import set_dla_core

    runtime = SimpleNamespace(num_DLA_cores=2, DLA_core=-1)
    set_dla_core(runtime, 1)
    assert runtime.DLA_core == 1
    with pytest.raises(I2EError, match="DLA core 2, this device has 2 DLA core.*--dla-core"):
        set_dla_core(runtime, 2)


def test_missing_cuda_runtime_is_one_clear_line():
    """Polygraphy looks for libcudart in LD_LIBRARY_PATH, /usr/local/cuda/lib64, /usr/lib,
    /lib and nvidia/cuda_runtime/lib, not in the CUDA 13 wheels' nvidia/cu13/lib; then ctypes
    raises OSError, which becomes one line saying what to set."""
    from i2e_deploy.export.tensorrt import polygraphy_errors

    with pytest.raises(
        I2EError,
        match=r"^m.engine: cannot run: .*CUDA runtime.*LD_LIBRARY_PATH"
        r".*nvidia/cu13/lib",
    ):
        with polygraphy_errors("m.engine: cannot run"):
            raise OSError("libcudart.so: cannot open shared object file: No such file or directory")
    with pytest.raises(OSError, match="disk full"):  # other OS errors are not disguised
        with polygraphy_errors("m.engine: cannot run"):
            raise OSError("disk full")


def test_precision_constraints_pin_every_float_layer_but_the_math():
    trt = SimpleNamespace(float32="f32", float16="f16", bool="bool", int64="i64", int8="i8")

    def network():
        layers = {
            "membrane add": _Layer("ELEMENTWISE", ["f32", "f32"], ["f32"]),
            "threshold": _Layer("ELEMENTWISE", ["f32", "f32"], ["bool"]),
            "reset": _Layer("SELECT", ["bool", "f32", "f32"], ["f32"]),
            "time slice": _Layer("SLICE", ["f32"], ["f32"]),
            "time concat": _Layer("CONCATENATION", ["f32", "f32"], ["f32"]),
            "flatten": _Layer("SHUFFLE", ["f32"], ["f32"]),
            "bias": _Layer("CONSTANT", [], ["f32"]),
            "spike cast": _Layer("CAST", ["bool"], ["f32"]),
            "batch arithmetic": _Layer("ELEMENTWISE", ["i64", "i64"], ["i64"]),
            "quantize": _Layer("QUANTIZE", ["f32", "f32"], ["i8"]),
            "conv": _Layer("CONVOLUTION", ["f32", "f32"], ["f32"]),
        }
        return _network(layers), layers

    net, layers = network()
    assert len(apply_precision_constraints(net, trt, "fp16")) == 8
    for name in (
        "membrane add",
        "threshold",
        "reset",
        "time slice",
        "time concat",
        "flatten",
        "bias",
        "spike cast",
    ):
        assert layers[name].precision == "f32", name
    assert layers["membrane add"].output_types == {0: "f32"}
    assert layers["threshold"].output_types == {}  # a bool output keeps its type
    for name in ("batch arithmetic", "quantize"):  # integer tensors keep their types
        assert layers[name].precision is None and layers[name].output_types == {}, name
    assert layers["conv"].precision == "f16" and layers["conv"].output_types == {0: "f32"}
    net, layers = network()
    apply_precision_constraints(net, trt, "int8")
    assert layers["conv"].precision is None and layers["conv"].output_types == {0: "f32"}


def test_layer_precisions_from_the_engine_inspector():
    """The inspector's JSON as TensorRT 10 ("Format/Datatype") and 11 ("Datatype") write it."""
    information = {
        "Layers": [
            {
                "Name": "conv1",
                "LayerType": "CaskConvolution",
                "Outputs": [
                    {
                        "Name": "a",
                        "Format/Datatype": "Channel major FP16 format where channel % 8 == 0",
                    }
                ],
            },
            {
                "Name": "conv2",
                "LayerType": "CaskConvolution",
                "Outputs": [{"Name": "b", "Format/Datatype": "Row major linear INT8"}],
            },
            {
                "Name": "lif",
                "LayerType": "PointWiseV2",
                "Outputs": [{"Name": "c", "Datatype": "FP32", "Format": "Row major linear"}],
            },
            {
                "Name": "lif2",
                "LayerType": "PointWiseV2",
                "Outputs": [{"Name": "d", "Format/Datatype": "Row major linear Float"}],
            },
            {
                "Name": "spikes",
                "LayerType": "PointWiseV2",
                "Outputs": [{"Name": "e", "Datatype": "Bool"}],
            },
            {"Name": "noop", "LayerType": "NoOp", "Outputs": []},
        ]
    }
    assert layer_precisions(information) == {
        "count": 6,
        "by_type": {
            "CaskConvolution": {"fp16": 1, "int8": 1},
            "PointWiseV2": {"fp32": 2, "bool": 1},
            "NoOp": {"unknown": 1},
        },
    }
    assert layer_precisions({"Layers": ["conv1", "lif"]}) == {"count": 2, "by_type": {}}


def test_build_cli_without_tensorrt_is_one_line():
    if HAS_TENSORRT:
        pytest.skip("TensorRT is installed here")
    result = CliRunner().invoke(app, ["build", str(shared_model("onnx")), "--half"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0]
    result = CliRunner().invoke(app, ["build", str(shared_model("onnx")), "--data", "x"])
    assert result.exit_code == 2 and "--calibrator entropy" in result.output
    assert tensorrt_unavailable() == "TensorRT is not installed"


def test_install_hints_name_the_extras_requirements(monkeypatch):
    """Every pip command an error recommends installs what pyproject's extras pin (one CUDA
    major version throughout); on a Jetson, TensorRT comes from JetPack, never pip."""
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    from i2e_deploy.export import tensorrt as trt_module

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    monkeypatch.setattr(trt_module, "on_jetson", lambda: False)
    hint = trt_module.install_hint("tensorrt")
    commands = re.findall(r"`pip install ([^`]*)`", hint)
    assert len(commands) == 2
    for command, extra in zip(commands, ("tensorrt-cu12", "tensorrt-cu13")):
        tokens = [token.strip("'") for token in command.split()]
        assert tokens[0] == extra and tokens[1:] == extras[extra][1:], (command, extra)
        assert extras[extra][0].startswith(extra + ">=")
    monkeypatch.setattr(trt_module, "on_jetson", lambda: True)
    hint = trt_module.install_hint("tensorrt")
    assert "JetPack" in hint and "pip" not in hint
    jetson = [extras["jetson-cu12"][1], extras["jetson-cu13"][1]]  # cuda-python per JetPack
    assert [
        command.strip("'")
        for command in re.findall(r"`pip install ([^`]*)`", trt_module.install_hint("cuda-python"))
    ] == jetson


@pytest.fixture
def tensorrt_present(monkeypatch):
    """A stand-in ``tensorrt`` module where none is installed: the build then runs to the
    machine check that follows the import (GPU, through cuda-python)."""
    if HAS_TENSORRT:
        pytest.skip("TensorRT is installed here")
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.3.0"))


NO_GPU = "cuda-python .*is not installed|no CUDA GPU is visible"


def test_export_static_engine_gets_past_the_profile(tmp_path, tensorrt_present):
    """`export --format engine --static` passed the default --max-batch 8 to a batch-1
    graph and failed on the profile; and the build asked PyTorch for the GPU."""
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(shared_model("ckpt")),
            "--format",
            "engine",
            "--static",
            "--no-verify",
            "-o",
            str(tmp_path / "m.engine"),
        ],
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and re.search(NO_GPU, lines[0]), lines
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_tensorrt_runner_needs_no_pytorch(tmp_path, tensorrt_present):
    from i2e_deploy.runtime.runners import load_runner

    engine = write_engine(tmp_path / "m.engine", b"plan", sidecar())
    with pytest.raises(I2EError, match=NO_GPU):
        load_runner(engine)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize(
    "precision, mode", [("fp32", "qdq"), ("fp16", "qdq"), ("int8", "qdq"), ("int8", "entropy")]
)
def test_build_engine_and_run_it(tmp_path, precision, mode):
    reason = tensorrt_unavailable()
    if reason:
        pytest.skip(reason)
    from i2e_deploy.export.tensorrt import build_engine, tensorrt_major, tensorrt_module
    from i2e_deploy.runtime.runners import load_runner

    if mode == "entropy" and tensorrt_major(tensorrt_module().__version__) >= 11:
        pytest.skip("TensorRT 11 has no implicit INT8 calibration")
    engine = build_engine(
        shared_model("onnx"),
        tmp_path / f"{precision}.engine",
        precision=precision,
        int8_mode=mode,
        min_batch=2,
        max_batch=4,
        calib_size=16,
        timing_cache=tmp_path / "timing.cache",
    )
    assert (tmp_path / "timing.cache").stat().st_size > 0
    record = read_engine_sidecar(engine)
    assert record["precision"] == precision and record["layers"]["count"] > 0
    with load_runner(engine) as trt_runner, load_runner(shared_model("onnx")) as ort_runner:
        assert (trt_runner.min_batch, trt_runner.batch_limit) == (2, 4)
        batch = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
        got, want = trt_runner.infer(batch), ort_runner.infer(batch)  # chunks 4 + 1 (padded)
        assert got.shape == want.shape
        if precision == "fp32":
            assert np.median(np.abs(got - want)) < 1e-3
