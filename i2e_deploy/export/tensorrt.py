"""TensorRT engines from our ONNX graphs, built through NVIDIA's Polygraphy, with a JSON sidecar.

The precision of an engine comes from the graph TensorRT parses, in a strongly typed network
(no precision flags):

=========  ====================================================================
build      graph TensorRT parses
=========  ====================================================================
fp32       the exported FP32 graph (TF32 off)
fp16       its FP16 graph (``calibration.half``: FP16 convs and classifier,
           every neuron, residual sum and the converter in FP32)
int8       its S8S8 Q/DQ graph (``calibration.quantize``: exact 0/1 activations
           at scale 1, per-channel weights, zero points 0)
=========  ====================================================================

A graph given already reduced is parsed as it is; a Q/DQ graph asked for anything but INT8,
or an FP16 graph asked for anything but FP16, is refused. Precision flags remain only where
strong typing does not reach (see :func:`plan_build`): TensorRT before 10.0, DLA on TensorRT
10 (whose DLA guide builds with flags; TensorRT 11 types DLA networks strongly too), and the
implicit INT8 calibrators (entropy / min-max, deprecated in TensorRT 10, removed in 11).

Everything up to TensorRT itself runs on any machine and is tested there: the request and
its refusals, the optimization profile (DLA: one fixed batch, min = opt = max), the build
plan, the graph fed to each precision and Polygraphy's lazy loader chain (network, config,
timing cache, DLA settings). The sidecar ``<engine>.json`` records what was built: the card,
TensorRT version, GPU and compute capability, I/O, profile, the build plan, the precision of
each layer group as TensorRT's engine inspector reports it and, for DLA, which layers
TensorRT can place on the DLA. ``runtime.runners`` refuses an engine whose sidecar names
another TensorRT version or GPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import (
    FLAVOUR_KEY,
    PRECISION_KEY,
    PRECISIONS,
    engine_sidecar_path,
    metadata_of,
    onnx_card,
)
from ..card import ModelCard, sha256_file
from ..device import parse_device
from ..errors import I2EError
from ..fileio import atomic_output
from ..version import __version__

INT8_MODES = ("qdq", "entropy", "minmax")
SIDECAR_VERSION = 2
DEFAULT_MAX_BATCH = 8
# ONNX metadata written by calibration.quantize / calibration.half.


def profile_shapes(
    input_shape: list[int],
    *,
    min_batch: int | None = None,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    fixed: bool = False,
) -> dict[str, list[int]]:
    """Optimization-profile shapes (min / opt / max) for a graph input whose dimension 0 may
    be dynamic (-1).

    Dynamic batch: min 1, opt = min, max = max(8, opt) unless given. ``fixed`` (DLA, which
    has no dynamic dimensions): one batch, min = opt = max, the one given (default 1). A
    static graph has its own batch only.
    """
    if any(d < 0 for d in input_shape[1:]):
        raise I2EError(
            f"only the batch dimension may be dynamic, the graph input is "
            f"{input_shape}; re-export with a fixed --imgsz"
        )
    given = [b for b in (min_batch, opt_batch, max_batch) if b is not None]
    rest = list(input_shape[1:])
    if input_shape[0] >= 0:
        if any(b != input_shape[0] for b in given):
            raise I2EError(
                f"the graph has a static batch of {input_shape[0]}; re-export it "
                "without --static for another batch range"
            )
        low = opt = high = input_shape[0]
    elif fixed:
        if len(set(given)) > 1:
            raise I2EError(
                "DLA runs one fixed batch size (profile min = opt = max): give one "
                "of --min-batch, --batch, --max-batch, or equal values"
            )
        low = opt = high = given[0] if given else 1
    else:
        low = min_batch or 1
        opt = opt_batch or low
        high = max_batch or max(DEFAULT_MAX_BATCH, opt)
        if not 1 <= low <= opt <= high:
            raise I2EError(
                f"batch sizes must satisfy 1 <= min ({low}) <= opt ({opt}) <= max ({high})"
            )
    return {"min": [low, *rest], "opt": [opt, *rest], "max": [high, *rest]}


@dataclass(frozen=True)
class GraphInfo:
    """What a build needs to know of an exported ONNX graph, read without TensorRT."""

    card: ModelCard
    io: dict[str, list[dict[str, Any]]]  # inputs / outputs: name, numpy dtype name, shape
    precision: str  # numeric form of the graph: 'fp32', 'fp16' or 'int8' (Q/DQ)
    int8_flavour: str | None  # 'tensorrt' (S8S8) or 'onnxruntime' (U8S8) for INT8 graphs

    @property
    def input_name(self) -> str:
        return self.io["inputs"][0]["name"]

    @property
    def input_shape(self) -> list[int]:
        return self.io["inputs"][0]["shape"]


def read_graph(onnx_path: Path) -> GraphInfo:
    """Card, I/O and numeric form of an exported graph (weights are not read)."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors have many types
        raise I2EError(f"{onnx_path}: not a readable ONNX file ({type(exc).__name__})") from None
    metadata = metadata_of(model)
    card = onnx_card(metadata, onnx_path)
    initializers = {init.name for init in model.graph.initializer}

    def record(value) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        return {"name": value.name, "dtype": dtype.name, "shape": dims}

    io = {
        "inputs": [record(v) for v in model.graph.input if v.name not in initializers],
        "outputs": [record(v) for v in model.graph.output],
    }
    quantized = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    precision = "int8" if quantized else metadata.get(PRECISION_KEY, "fp32")
    return GraphInfo(card, io, precision, metadata.get(FLAVOUR_KEY))


class BuildRequest:
    """Validated build arguments; raises I2EError before TensorRT is ever imported."""

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        output: str | os.PathLike | None = None,
        *,
        precision: str = "fp32",
        int8_mode: str = "qdq",
        min_batch: int | None = None,
        opt_batch: int | None = None,
        max_batch: int | None = None,
        workspace_gib: float = 4.0,
        dla_core: int | None = None,
        timing_cache: str | os.PathLike | None = None,
        calib_data: str | os.PathLike | None = None,
        calib_size: int = 512,
        calib_cache: str | os.PathLike | None = None,
        device: str = "cuda",
    ):
        self.onnx_path = Path(onnx_path)
        if self.onnx_path.suffix.lower() != ".onnx":
            raise I2EError(
                f"{onnx_path}: `build` takes an exported .onnx graph; export a "
                "checkpoint first (`i2e-deploy export CKPT`)"
            )
        if not self.onnx_path.is_file():
            raise I2EError(f"ONNX file not found: {onnx_path}")
        if precision not in PRECISIONS:
            raise I2EError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
        if int8_mode not in INT8_MODES:
            raise I2EError(f"unknown INT8 mode {int8_mode!r}; choose {', '.join(INT8_MODES)}")
        if workspace_gib <= 0:
            raise I2EError(f"--workspace must be positive (GiB), got {workspace_gib}")
        if dla_core is not None and (dla_core < 0 or precision == "fp32"):
            raise I2EError(
                "DLA runs FP16 or INT8 only, on a core index >= 0; add --half or "
                "--int8 and a valid --dla-core"
            )
        if any(b is not None and b < 1 for b in (min_batch, opt_batch, max_batch)):
            raise I2EError("batch sizes must be at least 1")
        if calib_size < 1:
            raise I2EError(f"--calib-size must be at least 1, got {calib_size}")
        if calib_data is not None and not (precision == "int8" and int8_mode != "qdq"):
            raise I2EError(
                "--data feeds implicit INT8 calibration only: add --int8 "
                "--calibrator entropy (or minmax); the qdq INT8 graph needs no data"
            )
        self.device = device if device != "cpu" else "cuda"
        parse_device(self.device)
        self.graph = read_graph(self.onnx_path)
        _check_graph_fits(self.graph, self.onnx_path, precision, int8_mode)
        self.output = Path(output) if output else self.onnx_path.with_suffix(".engine")
        if self.output.suffix.lower() not in (".engine", ".plan"):
            raise I2EError(f"{self.output}: engine files end in .engine or .plan")
        if not self.output.parent.is_dir():
            raise I2EError(f"output folder does not exist: {self.output.parent}")
        self.precision = precision
        self.int8_mode = int8_mode if precision == "int8" else None
        self.profile = profile_shapes(
            self.graph.input_shape,
            min_batch=min_batch,
            opt_batch=opt_batch,
            max_batch=max_batch,
            fixed=dla_core is not None,
        )
        self.workspace_bytes = int(workspace_gib * (1 << 30))
        self.dla_core = dla_core
        self.timing_cache = Path(timing_cache) if timing_cache else None
        self.calib_data, self.calib_size = calib_data, calib_size
        self.calib_cache = (
            Path(calib_cache)
            if calib_cache
            else self.output.with_name(self.output.stem + ".calib.cache")
        )


def _check_graph_fits(graph: GraphInfo, path: Path, precision: str, int8_mode: str) -> None:
    """Refuse a graph whose numeric form contradicts the requested precision."""
    if graph.precision == "int8" and graph.int8_flavour == "onnxruntime":
        raise I2EError(
            f"{path} is the INT8 graph for ONNX Runtime on CPUs; build from the "
            "FP32 graph with --int8, or export with --int8 --device cuda"
        )
    if graph.precision == "int8" and (precision != "int8" or int8_mode != "qdq"):
        raise I2EError(
            f"{path} is an INT8 Q/DQ graph: build it with --int8 (calibrator qdq), "
            "or build the FP32 graph for other precisions"
        )
    if graph.precision == "fp16" and precision != "fp16":
        raise I2EError(
            f"{path} is an FP16 graph: build it with --half, or build the FP32 graph "
            "for other precisions"
        )


@dataclass(frozen=True)
class BuildPlan:
    """How TensorRT is asked for the requested precision (see :func:`plan_build`)."""

    graph: str  # the form TensorRT parses: 'fp32', 'fp16' or 'int8' (S8S8 Q/DQ)
    strongly_typed: bool
    fp16: bool = False  # builder flags, weakly typed builds only
    int8: bool = False
    pin_fp32: bool = False  # weakly typed GPU builds: neurons pinned to FP32 (obeyed)
    calibrator: str | None = None  # implicit INT8 calibration: 'entropy' or 'minmax'

    def flags(self) -> list[str]:
        return [name for name, on in (("FP16", self.fp16), ("INT8", self.int8)) if on]


def tensorrt_major(version: str) -> int:
    match = re.match(r"(\d+)\.", version)
    if not match:
        raise I2EError(f"cannot read the TensorRT version {version!r}")
    return int(match.group(1))


def plan_build(request: BuildRequest, tensorrt_version: str) -> BuildPlan:
    """The graph and network typing for ``request`` on this TensorRT.

    Strongly typed (TensorRT >= 10) wherever it applies: the graph carries the precision.
    Weakly typed with flags: TensorRT < 10 (no strong typing; neurons pinned to FP32 on the
    GPU), DLA on TensorRT 10 (flags as NVIDIA's DLA guide builds; only the layers that fall
    back to the GPU are pinned, see :func:`_use_dla_core`) and implicit INT8 calibration (refused
    on TensorRT 11, which removed
    it)."""
    major = tensorrt_major(tensorrt_version)
    dla = request.dla_core is not None
    if request.int8_mode in ("entropy", "minmax"):
        if major >= 11:
            raise I2EError(
                f"TensorRT {tensorrt_version} has no implicit INT8 calibration; use "
                "--calibrator qdq (the default: exact, needs no data)"
            )
        return BuildPlan(
            "fp32",
            strongly_typed=False,
            fp16=dla,
            int8=True,
            pin_fp32=not dla,
            calibrator=request.int8_mode,
        )
    if major >= 11 or (major == 10 and not dla):
        return BuildPlan(request.precision, strongly_typed=True)
    # Weakly typed: FP16 comes from the flag, so the graph stays as given (FP32 or FP16).
    graph = "int8" if request.precision == "int8" else request.graph.precision
    return BuildPlan(
        graph,
        strongly_typed=False,
        fp16=request.precision == "fp16" or dla,  # DLA: FP16 where not INT8
        int8=request.precision == "int8",
        pin_fp32=not dla,
    )


def parsed_graph(request: BuildRequest, plan: BuildPlan, scratch: Path) -> Path:
    """The ONNX file TensorRT parses: the request's graph when it already has the plan's
    form, else the FP16 or S8S8 Q/DQ graph derived from it (written to ``scratch``)."""
    if plan.graph == request.graph.precision:
        return request.onnx_path
    import onnx

    if plan.graph == "fp16":
        from ..calibration.half import half_graph

        derived = scratch / "model.fp16.onnx"
        onnx.save(half_graph(onnx.load(str(request.onnx_path))), str(derived))
        return derived
    from ..calibration.quantize import quantize_qdq

    return quantize_qdq(request.onnx_path, scratch / "model.qdq.onnx")


@dataclass
class EngineLoaders:
    """Polygraphy's lazy loader chain for one build; ``engine()`` builds the serialized
    engine. ``dla_layers`` is filled during the build ('dla' / 'gpu': layer names)."""

    network: Any  # NetworkFromOnnxPath, or PostprocessNetwork around it (FP32 pins)
    create_config: Any  # the CreateConfig
    config: Any  # what the engine loader uses: create_config, or PostprocessConfig (DLA core)
    engine: Any  # EngineBytesFromNetwork
    dla_layers: dict[str, list[str]]


def engine_loaders(
    request: BuildRequest, plan: BuildPlan, graph: Path, trt, calibrator=None
) -> EngineLoaders:
    """The loader chain (nothing runs until ``.engine()`` is called). ``trt`` is the tensorrt
    module, for the workspace pool's enum and the layer edits."""
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxPath,
        PostprocessConfig,
        PostprocessNetwork,
        Profile,
    )

    network: Any = NetworkFromOnnxPath(str(graph), strongly_typed=plan.strongly_typed)
    if plan.pin_fp32:
        network = PostprocessNetwork(
            network,
            functools.partial(apply_precision_constraints, trt=trt, precision=request.precision),
            name="pin neurons to FP32",
        )
    shapes = request.profile
    timing_cache = str(request.timing_cache) if request.timing_cache else None
    dla = request.dla_core is not None
    create_config = CreateConfig(
        profiles=[
            Profile().add(request.graph.input_name, shapes["min"], shapes["opt"], shapes["max"])
        ],
        tf32=False,
        fp16=plan.fp16,
        int8=plan.int8,
        calibrator=calibrator,
        # DLA, weakly typed: the GPU-fallback layers' FP32 pins (see _use_dla_core) are
        # preferred, as Polygraphy asks on DLA anyway; forcing them could fail the build.
        precision_constraints="obey"
        if plan.pin_fp32
        else "prefer"
        if dla and not plan.strongly_typed
        else None,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: request.workspace_bytes},
        load_timing_cache=timing_cache,
        use_dla=dla,
        allow_gpu_fallback=dla,
    )
    dla_layers: dict[str, list[str]] = {}
    config: Any = create_config
    if request.dla_core is not None:
        config = PostprocessConfig(
            create_config,
            functools.partial(
                _use_dla_core,
                core=request.dla_core,
                report=dla_layers,
                pin=None
                if plan.strongly_typed
                else functools.partial(
                    apply_precision_constraints, trt=trt, precision=request.precision
                ),
            ),
        )
    engine = EngineBytesFromNetwork(network, config=config, save_timing_cache=timing_cache)
    return EngineLoaders(network, create_config, config, engine, dla_layers)


def _use_dla_core(
    builder, network, config, *, core: int, report: dict[str, list[str]], pin=None
) -> None:
    """Polygraphy's CreateConfig always picks DLA core 0: pick ``core``, and record which
    layers TensorRT can run on the DLA (the rest fall back to the GPU).

    Weakly typed DLA builds (TensorRT 10) set the FP16 flag, which also lets the GPU-fallback
    layers (the neurons' compare and select among them) run FP16, where a membrane potential
    near the threshold can flip a spike. ``pin`` (:func:`apply_precision_constraints`) pins
    those layers to FP32; the DLA-capable ones stay as they are (pinning them to FP32 would
    move them off the DLA, which runs FP16 and INT8 only)."""
    cores = builder.num_DLA_cores
    if core >= cores:
        raise I2EError(
            f"--dla-core {core} does not exist: this device has {cores} DLA "
            "core(s)" + ("; drop --dla-core" if cores == 0 else "")
        )
    config.DLA_core = core
    report.update(dla=[], gpu=[])
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        report["dla" if config.can_run_on_DLA(layer) else "gpu"].append(layer.name)
    if pin is not None:
        report["gpu_fp32"] = pin(network, only=set(report["gpu"]))


# Layers that compute the conv / linear math: FP16 in weakly typed FP16 builds.
_MATH_LAYER_TYPES = ("CONVOLUTION", "MATRIX_MULTIPLY")


def apply_precision_constraints(
    network, trt, precision: str, only: set[str] | None = None
) -> list[str]:
    """Weakly typed GPU builds only: pin every layer that computes on float values (neurons,
    converter, pooling, and also slices, concatenations, shuffles, casts and constants) to
    FP32; convs and the classifier run FP16 in FP16 builds, with FP32 outputs. Layers that
    touch integer tensors (shape arithmetic, the INT8 side of Q/DQ) keep their types.
    ``only``: the names of the layers to consider (DLA: those that fall back to the GPU).
    Returns the names of the layers pinned to FP32. TensorRT may still fuse pinned layers
    (Myelin): strongly typed builds do not depend on these pins."""
    float_types = {trt.float32, trt.float16}
    allowed = float_types | {trt.bool}
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if only is not None and layer.name not in only:
            continue
        tensors = [layer.get_input(k) for k in range(layer.num_inputs)] + [
            layer.get_output(j) for j in range(layer.num_outputs)
        ]
        types = {t.dtype for t in tensors if t is not None}
        if not types & float_types or types - allowed:
            continue
        if layer.type.name in _MATH_LAYER_TYPES:
            if precision == "fp16":
                layer.precision = trt.float16
        else:
            layer.precision = trt.float32
            pinned.append(layer.name)
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in float_types:
                layer.set_output_type(j, trt.float32)
    return pinned


_DTYPE_WORDS = {
    "fp32": "fp32",
    "float": "fp32",
    "fp16": "fp16",
    "half": "fp16",
    "bf16": "bf16",
    "fp8": "fp8",
    "int8": "int8",
    "uint8": "uint8",
    "int32": "int32",
    "int64": "int64",
    "bool": "bool",
}
_DTYPE_PATTERN = re.compile(r"\b(" + "|".join(_DTYPE_WORDS) + r")\b", re.IGNORECASE)


def layer_precisions(engine_information: dict[str, Any]) -> dict[str, Any]:
    """Summary of the engine inspector's JSON (``IEngineInspector.get_engine_information``,
    detailed verbosity): layer count and, per layer type TensorRT reports, how many layers
    write each data type (first output; TensorRT 10's "Format/Datatype", 11's "Datatype")."""
    layers = engine_information.get("Layers", [])
    groups: dict[str, dict[str, int]] = {}
    for layer in layers:
        if not isinstance(layer, dict):  # only names: the engine was not built detailed
            continue
        outputs = layer.get("Outputs") or [{}]
        text = " ".join(str(outputs[0].get(key, "")) for key in ("Format/Datatype", "Datatype"))
        found = _DTYPE_PATTERN.search(text)
        dtype = _DTYPE_WORDS[found.group(1).lower()] if found else "unknown"
        group = groups.setdefault(str(layer.get("LayerType", "unknown")), {})
        group[dtype] = group.get(dtype, 0) + 1
    return {"count": len(layers), "by_type": groups}


def sidecar_record(
    card: ModelCard,
    *,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
    precision: str,
    io: dict,
    profile: dict,
    int8_mode: str | None = None,
    dla_core: int | None = None,
    source: dict | None = None,
    plan: BuildPlan | None = None,
    layers: dict | None = None,
    dla_layers: dict | None = None,
) -> dict:
    """The sidecar's content (see the module docstring)."""
    build = (
        None
        if plan is None
        else {
            "graph": plan.graph,
            "strongly_typed": plan.strongly_typed,
            "flags": plan.flags(),
            "fp32_pins": plan.pin_fp32,
        }
    )
    return {
        "sidecar_version": SIDECAR_VERSION,
        "i2e_deploy_version": __version__,
        "card": card.to_dict(),
        "tensorrt_version": tensorrt_version,
        "gpu_name": gpu_name,
        "compute_capability": compute_capability,
        "precision": precision,
        "int8_mode": int8_mode,
        "io": io,
        "profile": profile,
        "dla_core": dla_core,
        "dla_layers": dla_layers,
        "build": build,
        "layers": layers,
        "source": source or {},
        "version_compatible": False,
        "hardware_compatibility": False,
    }


def write_engine(engine_path: str | os.PathLike, engine: bytes, sidecar: dict) -> Path:
    """Write the engine and its sidecar, each atomically (temp file + rename)."""
    engine_path = Path(engine_path)
    try:
        with atomic_output(engine_path) as fh:
            fh.write(bytes(engine))
        with atomic_output(engine_sidecar_path(engine_path)) as fh:
            fh.write((json.dumps(sidecar, indent=2) + "\n").encode())
    except OSError as exc:
        raise I2EError(f"cannot write {engine_path}: {exc.strerror}") from None
    return engine_path


# --- the machine: TensorRT, Polygraphy, the CUDA device -----------------------------------


def on_jetson() -> bool:
    """A Jetson (L4T writes this file): TensorRT comes with JetPack there, not from pip."""
    return Path("/etc/nv_tegra_release").is_file()


# What installs each piece on the target (every extra of pyproject.toml names the same).
_PIP_CUDA = (
    "`pip install {trt}'polygraphy>=0.53' 'cuda-python>=12.6.1,<13'` on a CUDA 12 "
    "driver, or `pip install {trt13}'polygraphy>=0.53' 'cuda-python>=13,<14'` on a "
    "CUDA 13 (R580+) driver"
)
_JETPACK = (
    "TensorRT's Python bindings come with JetPack (`sudo apt install nvidia-jetpack`; "
    "use the system Python or a venv made with --system-site-packages)"
)


def install_hint(what: str) -> str:
    """How to install ``what`` ('tensorrt', 'polygraphy' or 'cuda-python') here."""
    if what == "tensorrt":
        return (
            _JETPACK
            if on_jetson()
            else _PIP_CUDA.format(trt="tensorrt-cu12 ", trt13="tensorrt-cu13 ")
        )
    if what == "polygraphy":
        return "`pip install 'polygraphy>=0.53'`"
    if on_jetson():  # JetPack 6 runs CUDA 12, JetPack 7 CUDA 13
        return (
            "`pip install 'cuda-python>=12.6.1,<13'` on JetPack 6, "
            "`pip install 'cuda-python>=13,<14'` on JetPack 7"
        )
    return _PIP_CUDA.format(trt="", trt13="")


def tensorrt_module():
    """``import tensorrt`` (and check Polygraphy is there), or the one-line error saying
    how to install them here."""
    try:
        import tensorrt
    except ImportError:
        raise I2EError(
            f"TensorRT is not installed; on the target: {install_hint('tensorrt')}, "
            "then run `i2e-deploy build` there"
        ) from None
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        raise I2EError(f"Polygraphy is not installed; {install_hint('polygraphy')}") from None
    return tensorrt


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    compute_capability: str  # "8.7"


def cuda_gpu(device: str = "cuda") -> Gpu:
    """The CUDA device ``device`` names ('cuda' / 'cuda:N'), made the current device (TensorRT
    and Polygraphy build and run on the current device). Through cuda-python: no PyTorch."""
    kind, index = parse_device(device if device != "cpu" else "cuda")
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise I2EError(
            "cuda-python (with cuda.bindings, 12.6.1 or newer) is not installed; "
            f"{install_hint('cuda-python')}"
        ) from None
    error, count = cudart.cudaGetDeviceCount()
    if error != cudart.cudaError_t.cudaSuccess or not count:
        raise I2EError(
            f"no CUDA GPU is visible here ({error.name}); TensorRT engines need an NVIDIA GPU"
        )
    if index >= count:
        raise I2EError(f"device {device} does not exist: {count} CUDA GPU(s) here")
    (error,) = cudart.cudaSetDevice(index)
    if error != cudart.cudaError_t.cudaSuccess:
        raise I2EError(f"cannot use CUDA device {index}: {error.name}")
    error, props = cudart.cudaGetDeviceProperties(index)
    if error != cudart.cudaError_t.cudaSuccess:
        raise I2EError(f"cannot read CUDA device {index}: {error.name}")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return Gpu(index, name.split("\x00")[0].strip(), f"{props.major}.{props.minor}")


def tensorrt_unavailable(device: str = "cuda") -> str | None:
    """None when TensorRT engines can be built and run here, else why not (one line)."""
    try:
        tensorrt_module()
        cuda_gpu(device)
    except I2EError as exc:
        return str(exc).split(";")[0]
    return None


@contextlib.contextmanager
def polygraphy_errors(what: str) -> Iterator[None]:
    """Polygraphy's log at warnings and above; its failures as one-line I2EErrors."""
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        try:
            yield
        except PolygraphyException as exc:
            first = next((line for line in str(exc).splitlines() if line.strip()), "")
            raise I2EError(f"{what}: {first.strip()} (see the TensorRT log above)") from None
        except OSError as exc:  # ctypes could not load libcudart for Polygraphy's CUDA wrapper
            if "libcudart" not in str(exc):
                raise
            raise I2EError(
                f"{what}: Polygraphy cannot load the CUDA runtime ({exc}); add the "
                "folder holding libcudart.so.* to LD_LIBRARY_PATH (the CUDA 13 pip "
                "wheels put it in <site-packages>/nvidia/cu13/lib, which Polygraphy "
                "does not search)"
            ) from None


def load_cuda_runtime(what: str) -> None:
    """Load the CUDA runtime Polygraphy's buffers and streams use, now, so that a missing
    libcudart is one clear error before a build or a run (during a build TensorRT would see it
    only inside the calibrator's callback)."""
    from polygraphy import cuda

    with polygraphy_errors(what):
        cuda.wrapper()


def dla_runtime(trt, core: int):
    """A TensorRT runtime that runs a DLA engine on ``core``: ``IRuntime.DLA_core`` defaults to
    -1 (TensorRT 10's API reference), whatever core the engine was built for."""
    from polygraphy.backend.trt import util as trt_util

    runtime = trt.Runtime(trt_util.get_trt_logger())
    set_dla_core(runtime, core)
    return runtime


def set_dla_core(runtime, core: int) -> None:
    cores = runtime.num_DLA_cores
    if core >= cores:
        raise I2EError(
            f"the engine runs on DLA core {core}, this device has {cores} DLA "
            "core(s); rebuild it here (`i2e-deploy build model.onnx --dla-core N`)"
        )
    runtime.DLA_core = core


# --- the build --------------------------------------------------------------------------


def build_engine(
    onnx_path: str | os.PathLike, output: str | os.PathLike | None = None, **options
) -> Path:
    """Build ``onnx_path`` into an engine (+ sidecar) and return its path; ``options`` are
    :class:`BuildRequest`'s (precision, batches, workspace, DLA, caches, calibration)."""
    request = BuildRequest(onnx_path, output, **options)
    trt = tensorrt_module()
    gpu = cuda_gpu(request.device)
    plan = plan_build(request, trt.__version__)
    with tempfile.TemporaryDirectory() as scratch:
        graph = parsed_graph(request, plan, Path(scratch))
        calibrator = None
        if plan.calibrator:
            load_cuda_runtime(f"cannot calibrate {request.onnx_path}")
            calibrator = _calibrator(request, trt, plan.calibrator)
        with polygraphy_errors(f"TensorRT could not build {request.onnx_path}"):
            loaders = engine_loaders(request, plan, graph, trt, calibrator)
            serialized = loaders.engine()
            layers = _inspect(serialized, trt)
    sidecar = sidecar_record(
        request.graph.card,
        tensorrt_version=trt.__version__,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        precision=request.precision,
        io=request.graph.io,
        profile=request.profile,
        int8_mode=request.int8_mode,
        dla_core=request.dla_core,
        plan=plan,
        layers=layers,
        dla_layers=loaders.dla_layers or None,
        source={"onnx": request.onnx_path.name, "sha256": sha256_file(request.onnx_path)},
    )
    return write_engine(request.output, serialized, sidecar)


def _calibrator(request: BuildRequest, trt, kind: str):
    """Polygraphy's INT8 calibrator (entropy or min-max) over the calibration images, in
    batches of the profile's opt batch (TensorRT calibrates at the opt shape).

    Every batch is float32: TensorRT calibrates non-index inputs in float32, and Polygraphy's
    Calibrator (>= 0.49.10) rejects any other type inside ``get_batch``, which hides the error
    and hands TensorRT no batch at all. The uint8 graph gets its 0-255 pixels as float32."""
    from polygraphy.backend.trt import Calibrator

    from ..calibration.data import CalibrationBatches, load_calibration_images, to_graph_input

    graph_input = request.graph.io["inputs"][0]
    images = load_calibration_images(request.calib_data, request.graph.card, request.calib_size)
    samples = to_graph_input(images, "uint8" if graph_input["dtype"] == "uint8" else "float")
    batches = CalibrationBatches(samples.astype(np.float32, copy=False), request.profile["opt"][0])
    feed = [{graph_input["name"]: batches.next_batch()} for _ in range(len(batches))]
    base = {"entropy": trt.IInt8EntropyCalibrator2, "minmax": trt.IInt8MinMaxCalibrator}
    return Calibrator(feed, cache=str(request.calib_cache), BaseClass=base[kind])


def _inspect(serialized, trt) -> dict[str, Any]:
    """:func:`layer_precisions` of the built engine (Polygraphy has no API for the
    inspector's JSON; CreateConfig builds with detailed profiling verbosity)."""
    from polygraphy.backend.trt import EngineFromBytes

    engine = EngineFromBytes(serialized)()
    inspector = engine.create_engine_inspector()
    info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    return layer_precisions(json.loads(info))
