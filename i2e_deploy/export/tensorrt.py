"""TensorRT engines from our ONNX graphs (TensorRT 10 Python API), with a JSON sidecar.

Precisions: ``fp32``; ``fp16`` (convs and the classifier in FP16 with FP32 outputs, every
neuron / converter / pooling layer pinned to FP32 so no membrane is rounded near the
threshold); ``int8`` from the explicit S8S8 Q/DQ graph of ``calibration.quantize`` (no data
needed: spikes are exactly 0/1), or implicitly with an entropy / min-max calibrator and a
calibration cache as a fallback. Dynamic-batch graphs get one optimization profile
(min/opt/max batch). Optional: timing cache, workspace limit, DLA core with GPU fallback.

The sidecar ``<engine>.json`` records the card, TensorRT version, GPU name and compute
capability, precision, I/O and profile; ``runtime.runners`` refuses an engine whose sidecar
names another TensorRT version or GPU. Everything except the build itself is plain Python
and is tested without TensorRT.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..card import ModelCard, sha256_file
from ..errors import I2EError
from ..fileio import atomic_output
from ..runtime.runners import engine_sidecar_path, parse_device

PRECISIONS = ("fp32", "fp16", "int8")
INT8_MODES = ("qdq", "entropy", "minmax")
SIDECAR_VERSION = 1


def profile_shapes(input_shape: list[int], *, min_batch: int | None = None,
                   opt_batch: int | None = None, max_batch: int | None = None
                   ) -> dict[str, list[int]] | None:
    """Optimization-profile shapes for a graph input whose dimension 0 may be dynamic (-1).

    Defaults: min 1, opt = min, max = max(8, opt). A static graph needs no profile (None)
    and accepts only its own batch.
    """
    if any(d < 0 for d in input_shape[1:]):
        raise I2EError(f"only the batch dimension may be dynamic, the graph input is "
                       f"{input_shape}; re-export with a fixed --imgsz")
    given = [b for b in (min_batch, opt_batch, max_batch) if b is not None]
    if input_shape[0] >= 0:
        if any(b != input_shape[0] for b in given):
            raise I2EError(f"the graph has a static batch of {input_shape[0]}; re-export it "
                           "without --static for another batch range")
        return None
    low = min_batch or 1
    opt = opt_batch or low
    high = max_batch or max(8, opt)
    if not 1 <= low <= opt <= high:
        raise I2EError(f"batch sizes must satisfy 1 <= min ({low}) <= opt ({opt}) "
                       f"<= max ({high})")
    rest = list(input_shape[1:])
    return {"min": [low, *rest], "opt": [opt, *rest], "max": [high, *rest]}


def sidecar_record(card: ModelCard, *, tensorrt_version: str, gpu_name: str,
                   compute_capability: str, precision: str, io: dict, profile: dict | None,
                   int8_mode: str | None = None, dla_core: int | None = None,
                   source: dict | None = None) -> dict:
    """The sidecar's content (see the module docstring)."""
    return {"sidecar_version": SIDECAR_VERSION, "i2e_deploy_version": __version__,
            "card": card.to_dict(), "tensorrt_version": tensorrt_version,
            "gpu_name": gpu_name, "compute_capability": compute_capability,
            "precision": precision, "int8_mode": int8_mode, "io": io, "profile": profile,
            "dla_core": dla_core, "source": source or {},
            "version_compatible": False, "hardware_compatibility": False}


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_output(path) as fh:
        fh.write(data)


def write_engine(engine_path: str | os.PathLike, engine: bytes, sidecar: dict) -> Path:
    """Write the engine and its sidecar, each atomically (temp file + rename)."""
    engine_path = Path(engine_path)
    try:
        _atomic_write(engine_path, bytes(engine))
        _atomic_write(engine_sidecar_path(engine_path),
                      (json.dumps(sidecar, indent=2) + "\n").encode())
    except OSError as exc:
        raise I2EError(f"cannot write {engine_path}: {exc.strerror}") from None
    return engine_path


class BuildRequest:
    """Validated build arguments; raises I2EError before TensorRT is ever imported."""

    def __init__(self, onnx_path: str | os.PathLike, output: str | os.PathLike | None = None, *,
                 precision: str = "fp32", int8_mode: str = "qdq", min_batch: int | None = None,
                 opt_batch: int | None = None, max_batch: int | None = None,
                 workspace_gib: float = 4.0,
                 dla_core: int | None = None, timing_cache: str | os.PathLike | None = None,
                 calib_data: str | os.PathLike | None = None, calib_size: int = 512,
                 calib_cache: str | os.PathLike | None = None, device: str = "cuda"):
        self.onnx_path = Path(onnx_path)
        if self.onnx_path.suffix.lower() != ".onnx":
            raise I2EError(f"{onnx_path}: `build` takes an exported .onnx graph; export a "
                           "checkpoint first (`i2e-deploy export CKPT`)")
        if not self.onnx_path.is_file():
            raise I2EError(f"ONNX file not found: {onnx_path}")
        if precision not in PRECISIONS:
            raise I2EError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
        if int8_mode not in INT8_MODES:
            raise I2EError(f"unknown INT8 mode {int8_mode!r}; choose {', '.join(INT8_MODES)}")
        if workspace_gib <= 0:
            raise I2EError(f"--workspace must be positive (GiB), got {workspace_gib}")
        if dla_core is not None and (dla_core < 0 or precision == "fp32"):
            raise I2EError("DLA runs FP16 or INT8 only, on a core index >= 0; add --half or "
                           "--int8 and a valid --dla-core")
        if any(b is not None and b < 1 for b in (min_batch, opt_batch, max_batch)):
            raise I2EError("batch sizes must be at least 1")
        if calib_size < 1:
            raise I2EError(f"--calib-size must be at least 1, got {calib_size}")
        self.device_index = parse_device(device if device != "cpu" else "cuda")[1]
        from .onnx import read_metadata
        if read_metadata(self.onnx_path).get("i2e_deploy.int8_flavour") == "onnxruntime":
            raise I2EError(f"{onnx_path} is the INT8 graph for ONNX Runtime on CPUs; build from "
                           "the FP32 graph with --int8, or export with --int8 --device cuda")
        self.output = Path(output) if output else self.onnx_path.with_suffix(".engine")
        if self.output.suffix.lower() not in (".engine", ".plan"):
            raise I2EError(f"{self.output}: engine files end in .engine or .plan")
        if not self.output.parent.is_dir():
            raise I2EError(f"output folder does not exist: {self.output.parent}")
        self.precision, self.int8_mode = precision, int8_mode
        self.batches = (min_batch, opt_batch, max_batch)
        self.workspace_bytes = int(workspace_gib * (1 << 30))
        self.dla_core = dla_core
        self.timing_cache = Path(timing_cache) if timing_cache else None
        self.calib_data, self.calib_size = calib_data, calib_size
        self.calib_cache = Path(calib_cache) if calib_cache else \
            self.output.with_name(self.output.stem + ".calib.cache")


# Layer types that compute on float values: neurons (add, mul, compare, select), the
# converter, pooling, reductions. Pinned to FP32 in reduced-precision builds.
_FP32_LAYER_TYPES = ("ELEMENTWISE", "SELECT", "UNARY", "REDUCE", "POOLING", "SCALE",
                     "ACTIVATION", "SOFTMAX")
_MATH_LAYER_TYPES = ("CONVOLUTION", "MATRIX_MULTIPLY")


def apply_precision_constraints(network, trt, precision: str) -> int:
    """Pin neuron / converter layers to FP32 and make convs and the classifier output FP32
    (FP16 builds also run them in FP16; INT8 builds leave their input precision to the Q/DQ
    nodes or the calibrator). Layers on integer tensors (shape arithmetic of dynamic-batch
    graphs) keep their types. Returns the number of pinned layers."""
    float_types = {trt.float32, trt.float16}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = layer.type.name
        inputs = {t.dtype for t in (layer.get_input(k) for k in range(layer.num_inputs))
                  if t is not None}
        if kind in _FP32_LAYER_TYPES:
            if not inputs & float_types or inputs - float_types - {trt.bool}:
                continue
            layer.precision = trt.float32
            pinned += 1
        elif kind in _MATH_LAYER_TYPES:
            if precision == "fp16":
                layer.precision = trt.float16
        else:
            continue
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in float_types:
                layer.set_output_type(j, trt.float32)
    return pinned


def make_calibrator(trt, torch, batches, cache: Path, mode: str, device):
    """A TensorRT INT8 calibrator (entropy or min-max) over :class:`CalibrationBatches`."""
    base: Any = {"entropy": trt.IInt8EntropyCalibrator2,
                 "minmax": trt.IInt8MinMaxCalibrator}[mode]

    class Calibrator(base):
        def __init__(self):
            base.__init__(self)
            self._device_batch = None  # kept alive while TensorRT reads it

        def get_batch_size(self):
            return batches.batch_size

        def get_batch(self, names):
            batch = batches.next_batch()
            if batch is None:
                return None
            self._device_batch = torch.from_numpy(batch).to(device)
            return [int(self._device_batch.data_ptr())]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data):
            _atomic_write(cache, bytes(data))

    return Calibrator()


def _io_record(network, trt) -> dict:
    def tensors(count, get):
        return [{"name": t.name, "dtype": np.dtype(trt.nptype(t.dtype)).name,
                 "shape": list(t.shape)} for t in (get(i) for i in range(count))]
    return {"inputs": tensors(network.num_inputs, network.get_input),
            "outputs": tensors(network.num_outputs, network.get_output)}


def _read_onnx(onnx_path: Path) -> tuple[ModelCard, bool]:
    """The graph's card, and whether it already is a Q/DQ (explicitly quantized) graph."""
    import onnx

    from ..runtime.runners import read_onnx_card

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors have many types
        raise I2EError(f"{onnx_path}: not a readable ONNX file ({type(exc).__name__})") from None
    return read_onnx_card(model), any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def tensorrt_module():
    """``import tensorrt``, or the one-line error saying where to build instead."""
    try:
        import tensorrt
    except ImportError:
        raise I2EError("TensorRT is not installed; install it on the target (`pip install "
                       "tensorrt`, or JetPack on Jetson) and run `i2e-deploy build` there") from None
    return tensorrt


def build_engine(onnx_path: str | os.PathLike, output: str | os.PathLike | None = None,
                 **options) -> Path:
    """Build ``onnx_path`` into an engine (+ sidecar) and return its path; ``options`` are
    :class:`BuildRequest`'s (precision, batches, workspace, DLA, caches, calibration)."""
    request = BuildRequest(onnx_path, output, **options)
    trt = tensorrt_module()
    import torch

    if not torch.cuda.is_available():
        raise I2EError("building a TensorRT engine needs an NVIDIA GPU, and PyTorch sees none")
    card, _ = _read_onnx(request.onnx_path)
    with tempfile.TemporaryDirectory() as scratch:
        return _build(trt, torch, request, card, parsed_graph(request, Path(scratch)))


def parsed_graph(request: BuildRequest, scratch: Path) -> Path:
    """The ONNX file TensorRT parses: the S8S8 Q/DQ graph (written to ``scratch``) for an
    INT8 build in qdq mode from an FP32 graph, else the request's graph itself."""
    _, is_qdq = _read_onnx(request.onnx_path)
    if request.precision == "int8" and request.int8_mode == "qdq" and not is_qdq:
        from ..calibration.quantize import quantize_qdq
        return quantize_qdq(request.onnx_path, scratch / "model.qdq.onnx")
    return request.onnx_path


def _build(trt, torch, request: BuildRequest, card: ModelCard, onnx_path: Path) -> Path:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise I2EError(f"{request.onnx_path}: TensorRT cannot parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, request.workspace_bytes)

    graph_input = network.get_input(0)
    min_b, opt_b, max_b = request.batches
    shapes = profile_shapes(list(graph_input.shape), min_batch=min_b, opt_batch=opt_b,
                            max_batch=max_b)
    if shapes:
        profile = builder.create_optimization_profile()
        profile.set_shape(graph_input.name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)

    if request.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if request.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    if request.precision != "fp32":
        apply_precision_constraints(network, trt, request.precision)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)

    device = torch.device("cuda", request.device_index)
    if request.precision == "int8" and request.int8_mode != "qdq":
        from ..calibration.data import (CalibrationBatches, load_calibration_images,
                                        to_graph_input)
        fmt = "uint8" if graph_input.dtype == trt.uint8 else "float"
        images = load_calibration_images(request.calib_data, card, request.calib_size)
        calib_batch = min(8, len(images), shapes["max"][0]) if shapes else graph_input.shape[0]
        batches = CalibrationBatches(to_graph_input(images, fmt), calib_batch)
        config.int8_calibrator = make_calibrator(trt, torch, batches, request.calib_cache,
                                                 request.int8_mode, device)
        if shapes:
            calib_profile = builder.create_optimization_profile()
            calib_shape = list(batches.shape)
            calib_profile.set_shape(graph_input.name, calib_shape, calib_shape, calib_shape)
            config.set_calibration_profile(calib_profile)

    if request.dla_core is not None:
        if builder.num_DLA_cores == 0:
            raise I2EError("this device has no DLA cores; drop --dla-core")
        if request.dla_core >= builder.num_DLA_cores:
            raise I2EError(f"--dla-core {request.dla_core} does not exist; this device has "
                           f"{builder.num_DLA_cores} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = request.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)

    if request.timing_cache is not None:
        previous = request.timing_cache.read_bytes() if request.timing_cache.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(previous), ignore_mismatch=False)

    with torch.cuda.device(device):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise I2EError(f"TensorRT failed to build an engine from {request.onnx_path} (see the "
                       "TensorRT log above)")
    if request.timing_cache is not None:
        _atomic_write(request.timing_cache, bytes(config.get_timing_cache().serialize()))

    props = torch.cuda.get_device_properties(device)
    sidecar = sidecar_record(
        card, tensorrt_version=trt.__version__, gpu_name=props.name,
        compute_capability=f"{props.major}.{props.minor}", precision=request.precision,
        io=_io_record(network, trt), profile=shapes,
        int8_mode=request.int8_mode if request.precision == "int8" else None,
        dla_core=request.dla_core,
        source={"onnx": request.onnx_path.name, "sha256": sha256_file(request.onnx_path)})
    return write_engine(request.output, serialized, sidecar)
