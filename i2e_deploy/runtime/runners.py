"""One interface for every backend: ``load_runner(path).infer(batch) -> numpy``.

Every runner of an image model takes the same input, a uint8 NHWC RGB batch at the card's
size (what ``images.preprocess`` yields and a camera gives); a runner whose graph wants float
NCHW converts it. Event models take ``[N, T, 2, H, W]``. Outputs are float32 logits
``[N, classes]``, or the events for converter-only graphs (``runner.output == "events"``).
"""

from __future__ import annotations

import functools
import math
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..artifacts import PRECISION_KEY, kind_of, onnx_card, read_engine_sidecar, read_metadata
from ..card import ModelCard
from ..device import GPU_INSTALL, parse_device
from ..errors import I2EError, warn

if TYPE_CHECKING:
    from ..model.msresnet import MSResNet

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


class Runner(ABC):
    """A loaded model on one backend. Use as a context manager or call ``close()``."""

    name: str
    card: ModelCard
    input_format: str  # 'uint8' (NHWC) | 'float' (NCHW, [0, 1]) | 'events' ([N, T, 2, H, W])
    output: str = "logits"  # or 'events' for converter-only graphs
    precision: str = "fp32"

    def __init__(self, path: Path, device: str):
        self.path = Path(path)
        self.device = device

    @abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """Run the backend on input already in ``self.input_format``."""

    # The batches one backend call takes: a static graph's batch is both bounds, an engine
    # profile gives its min and max. Longer batches are split, shorter chunks padded.
    batch_limit: int | None = None
    min_batch: int = 1

    # Whether ``infer_spikes`` works: the backend can show its LIF layers' spikes.
    exposes_spikes: bool = False

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self._chunked(self._adapt(np.asarray(batch)), self._run)

    def infer_spikes(self, batch: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(infer(batch), {layer: bool [T, N, ...]})``: the spikes of every LIF layer under
        the reference model's names (``layer1.0.sn1``, ..., ``sn``), and the converter's
        events as ``i2e`` ``[T, N, 2, H, W]``, for the comparison of two backends."""
        if not self.exposes_spikes:
            raise I2EError(f"the {self.name} backend does not expose spike maps")
        return self._chunked(self._adapt(np.asarray(batch)), self._run_spikes)

    def _run_spikes(self, batch: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        raise NotImplementedError

    def _chunked(self, batch: np.ndarray, run):
        """``run`` on chunks the backend takes (split to ``batch_limit``, padded to
        ``min_batch``)."""
        size = self.batch_limit or len(batch)
        if not len(batch) or self.min_batch <= len(batch) <= size:
            return run(batch)
        results = []
        for start in range(0, len(batch), size):
            chunk = batch[start : start + size]
            count = len(chunk)
            if count < self.min_batch:  # repeat the last input; its outputs are dropped
                chunk = np.concatenate(
                    [chunk, np.repeat(chunk[-1:], self.min_batch - count, axis=0)]
                )
            results.append(_first(run(chunk), count))
        if isinstance(results[0], tuple):
            return (
                np.concatenate([out for out, _ in results]),
                {
                    name: np.concatenate([maps[name] for _, maps in results], axis=1)
                    for name in results[0][1]
                },
            )
        return np.concatenate(results)

    def example_input(self, batch: int = 1) -> np.ndarray:
        """A zero batch in the common input format (uint8 NHWC images, or events)."""
        size = self.card.imgsz
        if self.card.input == "events":
            return np.zeros((batch, self.card.T, 2, size, size), np.float32)
        return np.zeros((batch, size, size, 3), np.uint8)

    def warmup(self, iterations: int = 1, batch: int = 1) -> None:
        sample = self.example_input(batch)
        for _ in range(iterations):
            self.infer(sample)

    def close(self) -> None:  # noqa: B027 (a no-op unless the backend holds resources)
        """Release backend resources; the runner is unusable afterwards."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path.name!r}, device={self.device!r}, "
            f"input={self.input_format}, precision={self.precision})"
        )

    def _adapt(self, batch: np.ndarray) -> np.ndarray:
        """Check the batch against the card and convert it to the graph's input format."""
        size = self.card.imgsz
        if self.card.input == "events":
            expected = (self.card.T, 2, size, size)
            if batch.ndim != 5 or batch.shape[1:] != expected:
                raise I2EError(
                    f"event batch must be [N, {', '.join(map(str, expected))}], "
                    f"got {list(batch.shape)}"
                )
            return batch.astype(np.float32, copy=False)
        if batch.dtype == np.uint8 and batch.ndim == 4 and batch.shape[1:] == (size, size, 3):
            if self.input_format == "float":
                return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), np.float32) / 255.0
            return np.ascontiguousarray(batch)
        if (
            self.input_format == "float"
            and batch.dtype == np.float32
            and batch.ndim == 4
            and batch.shape[1:] == (3, size, size)
        ):
            return batch
        raise I2EError(
            f"image batch must be uint8 NHWC [N, {size}, {size}, 3] (RGB), got "
            f"{batch.dtype} {list(batch.shape)}"
        )


def _first(result, count: int):
    """The first ``count`` inputs' share of an output, or of ``(output, spike maps)``."""
    if isinstance(result, tuple):
        out, maps = result
        return out[:count], {name: value[:, :count] for name, value in maps.items()}
    return result[:count]


# Batch sizes a CUDA-graph runner captures: a call runs in the smallest bucket that holds it
# (padded), longer batches are split into the largest.
GRAPH_BUCKETS = (1, 2, 4, 8)
GRAPH_WARMUP = 3  # eager calls on a side stream before a capture (cuDNN picks its kernels)


def bucket_for(count: int, buckets: tuple[int, ...] = GRAPH_BUCKETS) -> int:
    """The smallest bucket that holds ``count`` inputs (callers split at the largest)."""
    if count < 1 or count > buckets[-1]:
        raise I2EError(f"a batch of {count} does not fit the CUDA-graph buckets {buckets}")
    return next(size for size in buckets if size >= count)


def pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """``batch`` repeated at its last input up to ``size`` (the padding's outputs are
    dropped; a repeat rather than zeros keeps every input a real one)."""
    if len(batch) >= size:
        return batch
    return np.concatenate([batch, np.repeat(batch[-1:], size - len(batch), axis=0)])


class _CudaGraphs:
    """The model captured as one CUDA graph per batch bucket and replayed: a static input
    buffer on the GPU fed from a pinned host buffer, the converter and network in the graph,
    the logits copied back into a pinned host buffer (torch.cuda.graphs: warm-up on a side
    stream, capture, then ``copy_`` into the static input and ``replay``)."""

    def __init__(self, model, device, card: ModelCard, buckets: tuple[int, ...]):
        import torch

        self._torch, self._model, self._device = torch, model, device
        size = card.imgsz
        self._sample = (
            ((card.T, 2, size, size), torch.float32)
            if card.input == "events"
            else ((size, size, 3), torch.uint8)
        )
        self.buckets = buckets
        self._graphs: dict[int, tuple[Any, Any, Any, Any, Any]] = {}

    def _capture(self, bucket: int) -> tuple[Any, Any, Any, Any, Any]:
        torch = self._torch
        shape, dtype = self._sample
        static_in = torch.zeros((bucket, *shape), dtype=dtype, device=self._device)
        host_in = torch.zeros((bucket, *shape), dtype=dtype).pin_memory()
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        # torch.cuda.graph captures on a stream of the device current when first used (its
        # class-wide default): capture on this device's side stream, with it current.
        with torch.inference_mode(), torch.cuda.device(self._device):
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP):
                    self._model(static_in)
            torch.cuda.current_stream(self._device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                static_out = self._model(static_in).float()
        host_out = torch.empty(static_out.shape, dtype=torch.float32).pin_memory()
        return graph, static_in, static_out, host_in, host_out

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        count = len(batch)
        bucket = bucket_for(count, self.buckets)
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket)
        graph, static_in, static_out, host_in, host_out = self._graphs[bucket]
        host_in.numpy()[:] = pad_batch(batch, bucket)
        with self._torch.cuda.device(self._device):  # replay runs on the current device
            static_in.copy_(host_in, non_blocking=True)
            graph.replay()
            host_out.copy_(static_out, non_blocking=True)
            self._torch.cuda.current_stream(self._device).synchronize()
        return host_out.numpy()[:count].copy()

    def capture_all(self) -> None:
        for bucket in self.buckets:
            if bucket not in self._graphs:
                self._graphs[bucket] = self._capture(bucket)


class TorchRunner(Runner):
    """The PyTorch reference model (``load_checkpoint``). On CUDA it runs as CUDA graphs by
    default (``graphs``; one capture per batch bucket, replayed: :class:`_CudaGraphs`), eager
    with ``graphs=False`` and always on the CPU. TF32 stays off: the reference is float32,
    and TF32 convolutions would flip spikes."""

    name = "torch"

    def __init__(
        self,
        path: Path,
        device: str = "cpu",
        threads: int | None = None,
        graphs: bool | None = None,
        loaded: tuple[MSResNet, ModelCard] | None = None,
        buckets: tuple[int, ...] = GRAPH_BUCKETS,
        **overrides,
    ):
        """``loaded``: an already loaded ``(model, card)`` pair instead of ``path``'s."""
        import torch

        from ..model.checkpoint import load_checkpoint

        super().__init__(path, device)
        kind, index = parse_device(device)
        if kind == "cuda" and not torch.cuda.is_available():
            raise I2EError(
                f"device {device} requested but PyTorch sees no CUDA GPU; use --device cpu"
            )
        if graphs and kind != "cuda":
            raise I2EError("CUDA graphs need --device cuda")
        if threads:
            torch.set_num_threads(threads)  # process-wide: torch has no per-model setting
        self._torch = torch
        self._device = torch.device(kind, index) if kind == "cuda" else torch.device("cpu")
        if kind == "cuda":
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        model, self.card = loaded if loaded is not None else load_checkpoint(path, **overrides)
        self.model: MSResNet | None = model.to(self._device)
        self.input_format = "events" if self.card.input == "events" else "uint8"
        self._graphs: _CudaGraphs | None = None
        if kind == "cuda" and graphs is not False:
            self._graphs = _CudaGraphs(self.model, self._device, self.card, buckets)
            self.batch_limit = buckets[-1]
            self.name = "torch-cudagraph"
            # Spike maps would come from the eager model, not from the graphs being judged.
            self.exposes_spikes = False

    def _run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        if self.model is None:
            raise I2EError(f"{self.path.name}: the runner is closed")
        if self._graphs is not None:
            return self._graphs(batch)
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self._device)
            if self.card.input == "events":
                x = x.float()
            return self.model(x).float().cpu().numpy()

    def warmup(self, iterations: int = 1, batch: int = 1) -> None:
        if self._graphs is not None:  # capture every bucket now, not mid-stream
            try:
                self._graphs.capture_all()
            except RuntimeError as exc:  # a capture PyTorch refuses: eager is still right
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                warn(f"CUDA graph capture failed ({first}); running eager on {self.device}")
                self._graphs, self.batch_limit, self.name = None, None, "torch"
        super().warmup(iterations, batch)

    exposes_spikes = True

    def _run_spikes(self, batch: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        from ..export.deploy import run_with_spikes

        torch = self._torch
        model = self.model
        if model is None:
            raise I2EError(f"{self.path.name}: the runner is closed")
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self._device)
            if self.card.input == "events":
                x = x.float()
            out, maps = run_with_spikes(model, x)
            spikes = {name: value.cpu().numpy() for name, value in maps.items()}
            if self.card.input == "images":
                spikes = {"i2e": model.to_events(x).bool().cpu().numpy(), **spikes}
        return out.float().cpu().numpy(), spikes

    def events(self, batch: np.ndarray) -> np.ndarray:
        """The reference converter's events ``[N, T, 2, H, W]`` uint8, as converter-only
        graphs output them."""
        torch = self._torch
        if self.model is None:
            raise I2EError(f"{self.path.name}: the runner is closed")
        with torch.inference_mode():
            x = torch.from_numpy(self._adapt(np.asarray(batch))).to(self._device)
            return self.model.to_events(x).transpose(0, 1).to(torch.uint8).cpu().numpy()

    def close(self) -> None:
        self.model = self._graphs = None


def gpu_name(device: str) -> str:
    """The CUDA GPU's name, through cuda-python or PyTorch, whichever is here (verdicts are
    kept per GPU); the device string when neither can say."""
    kind, index = parse_device(device)
    try:
        from cuda.bindings import runtime as cudart

        error, props = cudart.cudaGetDeviceProperties(index)
        if error == cudart.cudaError_t.cudaSuccess:
            name = props.name
            text = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
            return text.split("\x00")[0].strip()
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(index)
    except ImportError:
        pass
    return f"{kind}:{index}"


# The library each GPU provider of onnxruntime-gpu lives in (onnxruntime/capi/).
_PROVIDER_LIBRARIES = {
    "TensorrtExecutionProvider": "tensorrt",
    "CUDAExecutionProvider": "cuda",
}


@functools.cache
def provider_problem(name: str) -> str | None:
    """Why ONNX Runtime's GPU provider ``name`` cannot load here, or None. onnxruntime-gpu
    lists its providers as available whether or not their libraries (CUDA, cuDNN, TensorRT)
    are present, and a session then falls back to the CPU with a warning: load the
    provider's library as ONNX Runtime would (its shared bridge first, with global
    symbols), after ONNX Runtime's own preloading of the nvidia-* wheels' libraries."""
    import contextlib
    import ctypes
    import io
    import sys

    import onnxruntime as ort

    if name not in ort.get_available_providers():
        return f"this onnxruntime has no {name}"
    capi = Path(ort.__file__).parent / "capi"
    pattern = (
        "onnxruntime_providers_{}.dll"
        if sys.platform == "win32"
        else ("libonnxruntime_providers_{}.so")
    )
    library = capi / pattern.format(_PROVIDER_LIBRARIES[name])
    if not library.is_file():  # linked in (a custom build): the session check decides
        return None
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu >= 1.21
    if preload is not None:
        # It prints each library it misses; the probe below says what matters in one line.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
            preload()
    try:
        ctypes.CDLL(str(capi / pattern.format("shared")), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(library))
    except OSError as exc:
        return str(exc).strip().splitlines()[0]
    return None


def ort_providers(
    device: str,
    providers: list[str] | None = None,
    *,
    precision: str = "fp32",
    cache: Path | None = None,
    cuda_graph: bool = False,
    log=None,
) -> list:
    """Execution providers for a device, best first (TensorRT > CUDA > CPU), with options,
    asking only for providers whose libraries load here (:func:`provider_problem`), so
    that ONNX Runtime's silent fallback never runs: the TensorRT provider's engine and
    timing caches in ``cache`` (a build takes minutes; ONNX Runtime names its cached engines
    by graph and GPU), its INT8 flag from the graph's ``precision`` (an INT8 graph for GPUs
    is the S8S8 Q/DQ one: explicit quantization, no calibration table); the CUDA provider
    with TF32 off (its default is on; TF32 convolutions flip spikes) and, with ``cuda_graph``
    and no TensorRT provider, its CUDA graph (static shapes, inputs and outputs bound to
    fixed GPU buffers: :class:`OrtRunner` runs it through IO binding). FP16 graphs skip the
    TensorRT provider: its FP16 is weakly typed (FP16 with FP32 fallback), which may run the
    FP32 neurons in FP16; the CUDA provider runs each node in its graph's type. ``log``
    hears why a provider is left out."""
    import onnxruntime as ort

    say = log or (lambda _msg: None)
    available = ort.get_available_providers()
    if providers:
        missing = [p for p in providers if p not in available]
        if missing:
            raise I2EError(
                f"ONNX Runtime here lacks provider(s) {', '.join(missing)}; "
                f"available: {', '.join(available)}"
            )
        return list(providers)
    kind, index = parse_device(device)
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    problems = {name: provider_problem(name) for name in _PROVIDER_LIBRARIES}
    if precision == "fp16" and problems["TensorrtExecutionProvider"] is None:
        problems["TensorrtExecutionProvider"] = (
            "its FP16 is weakly typed (trt_fp16_enable: FP16 with FP32 fallback), which may "
            "run the FP32 neurons in FP16"
        )
        say(f"ONNX Runtime's TensorRT provider left out: {problems['TensorrtExecutionProvider']}")
    if all(problems.values()):
        reasons = "; ".join(f"{name}: {why}" for name, why in problems.items())
        raise I2EError(
            f"--device {device}: ONNX Runtime cannot run on the GPU here ({reasons}); "
            f"{GPU_INSTALL}, or use --device cpu"
        )
    chosen: list = []
    tensorrt = problems["TensorrtExecutionProvider"] is None
    if tensorrt:
        # TensorRT builds with TF32 unless this is 0 when it builds (the provider has no
        # TF32 option); process-wide, as TF32 is off everywhere else here.
        os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
        # Flags as 0/1: what ONNX Runtime parses and reports back (check_session).
        trt: dict[str, Any] = {
            "device_id": index,
            "trt_fp16_enable": 0,
            "trt_int8_enable": int(precision == "int8"),
        }
        if cache is not None:
            folder = cache / "ort-tensorrt"
            # The provider creates only the last folder of the path; a missing parent
            # would leave it without a cache.
            folder.mkdir(parents=True, exist_ok=True)
            trt.update(
                trt_engine_cache_enable=1,
                trt_engine_cache_path=str(folder),
                trt_timing_cache_enable=1,
                trt_timing_cache_path=str(folder),
            )
        chosen.append(("TensorrtExecutionProvider", trt))
    if problems["CUDAExecutionProvider"] is None:
        options: dict[str, Any] = {"device_id": index, "use_tf32": 0}
        if cuda_graph and not tensorrt:
            options["enable_cuda_graph"] = 1
        chosen.append(("CUDAExecutionProvider", options))
    return chosen + ["CPUExecutionProvider"]


def check_session(session, device: str, chosen: list) -> None:
    """Refuse, in one line, a session that is not what was asked for: every GPU provider
    asked for registered, with the device id, TF32 and precision flags given (ONNX Runtime
    registers the CPU provider instead of one that fails to load, with a warning)."""
    registered = session.get_providers()
    options = session.get_provider_options()
    for entry in chosen:
        name, wanted = entry if isinstance(entry, tuple) else (entry, {})
        if name not in registered:
            raise I2EError(
                f"--device {device}: ONNX Runtime did not register {name} (it runs on "
                f"{', '.join(registered)}); {GPU_INSTALL}, or use --device cpu"
            )
        got = options.get(name, {})
        for key, value in wanted.items():
            text = str(value)
            if key in got and got[key] != text:
                raise I2EError(
                    f"--device {device}: ONNX Runtime's {name} took {key}={got[key]}, "
                    f"not {text}; use --device cpu"
                )


class OrtRunner(Runner):
    """An exported graph on ONNX Runtime."""

    name = "onnxruntime"

    def __init__(
        self,
        path: Path,
        device: str = "cpu",
        threads: int | None = None,
        providers: list[str] | None = None,
        optimization: str = "all",
        cache: Path | None = None,
        spinning: bool = True,
    ):
        """``cache``: the folder for the TensorRT provider's engine and timing caches.
        ``spinning``: whether idle intra-op threads spin (ONNX Runtime's default)."""
        import onnxruntime as ort

        super().__init__(path, device)
        self._binding: Any = None
        self._threads = threads
        self._spike_session: Any = None
        self._spike_layers: dict[str, str] = {}
        props = read_metadata(path)
        self.card = onnx_card(props, path)
        self.precision = props.get(PRECISION_KEY, "fp32")
        if optimization not in OPTIMIZATION_LEVELS:
            raise I2EError(
                f"unknown optimization level {optimization!r}; choose one of "
                f"{', '.join(OPTIMIZATION_LEVELS)}"
            )
        self._optimization, self._spinning = optimization, spinning
        on_gpu = parse_device(device)[0] == "cuda" and not providers
        static = on_gpu and _static_input(path)
        self.chosen = ort_providers(
            device, providers, precision=self.precision, cache=cache, cuda_graph=static, log=warn
        )
        try:
            try:
                self.session = self.open_session(str(path))
            except Exception:
                if not static:
                    raise
                # ONNX Runtime refuses a CUDA graph unless every node runs on the CUDA
                # provider: the same providers without it.
                self.chosen = without_cuda_graph(self.chosen)
                self.session = self.open_session(str(path))
        except I2EError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise I2EError(f"{path}: ONNX Runtime cannot load it: {first}") from None
        graph_input = self.session.get_inputs()[0]
        self._input_name = graph_input.name
        self.input_format = _graph_input_format(graph_input.type, len(graph_input.shape))
        if isinstance(graph_input.shape[0], int):  # exported with --static
            self.batch_limit = self.min_batch = graph_input.shape[0]
        self.output = "events" if len(self.session.get_outputs()[0].shape) == 5 else "logits"
        # A graph with every spike as an output is another TensorRT engine (fused
        # otherwise): its spikes would judge an engine that never serves.
        self.exposes_spikes = "TensorrtExecutionProvider" not in self.providers
        if any(isinstance(p, tuple) and p[1].get("enable_cuda_graph") for p in self.chosen):
            self._bind_cuda_graph(ort, parse_device(device)[1])

    def open_session(self, model: str | bytes, configure=None, chosen: list | None = None):
        """An ONNX Runtime session of ``model`` (a path or serialized graph) configured as
        this runner's own (providers and their options, optimization level, threads,
        spinning; ``configure(options)`` adds to it), checked to be on the device asked
        for. ONNX Runtime's fallback to other providers without their options is off."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel,
            "ORT_DISABLE_ALL"
            if self._optimization == "disable"
            else f"ORT_ENABLE_{self._optimization.upper()}",
        )
        if self._threads:
            options.intra_op_num_threads = self._threads
        if not self._spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if configure is not None:
            configure(options)
        chosen = self.chosen if chosen is None else chosen
        session = ort.InferenceSession(model, options, providers=chosen, enable_fallback=0)
        check_session(session, self.device, chosen)
        return session

    def _bind_cuda_graph(self, ort, index: int) -> None:
        """The CUDA provider replays a CUDA graph only when inputs and outputs stay at the
        same GPU addresses: bind them once to fixed buffers and copy into them."""
        graph_input, graph_output = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self._gpu_in = ort.OrtValue.ortvalue_from_numpy(
            np.zeros(graph_input.shape, ONNX_DTYPES[graph_input.type]), "cuda", index
        )
        self._gpu_out = ort.OrtValue.ortvalue_from_shape_and_type(
            graph_output.shape, ONNX_DTYPES[graph_output.type], "cuda", index
        )
        self._binding = self.session.io_binding()
        self._binding.bind_ortvalue_input(graph_input.name, self._gpu_in)
        self._binding.bind_ortvalue_output(graph_output.name, self._gpu_out)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _run_spikes(self, batch: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The output of the serving session (IO binding and CUDA graph included), the
        spikes of the same graph with every spike as an output, on the same providers."""
        if self._spike_session is None:
            self._spike_session, self._spike_layers = self._open_spike_session()
        session = self._spike_session
        results = session.run(None, {self._input_name: batch})
        found = dict(zip([o.name for o in session.get_outputs()], results))
        return self._run(batch), {
            layer: _time_major(found[tensor], self.card.T, len(batch))
            for tensor, layer in self._spike_layers.items()
        }

    def _open_spike_session(self):
        """A second session of the same graph that also outputs every LIF layer's boolean
        spikes (and the converter's events), found by name as ``calibration.flips`` does."""
        import onnx

        from ..calibration.flips import layer_name, spike_tensors
        from ..calibration.graph import merge_spike_casts

        model = onnx.load(str(self.path))
        merge_spike_casts(model)  # the same function, with each LIF's spikes in one tensor
        tensors = spike_tensors(model)
        known = {o.name for o in model.graph.output}
        model.graph.output.extend(
            onnx.helper.make_tensor_value_info(t, onnx.TensorProto.BOOL, None)
            for t in tensors
            if t not in known
        )
        # The serving configuration, less the CUDA graph (which replays fixed buffers; the
        # kernels are the same).
        session = self.open_session(
            model.SerializeToString(),
            lambda options: setattr(options, "log_severity_level", 3),
            without_cuda_graph(self.chosen),
        )
        return session, {t: layer_name(t) for t in tensors}

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self._binding is not None:
            self._gpu_in.update_inplace(batch)
            self.session.run_with_iobinding(self._binding)
            result = self._gpu_out.numpy()
        else:
            result = self.session.run(None, {self._input_name: batch})[0]
        return result if self.output == "events" else result.astype(np.float32, copy=False)

    def close(self) -> None:
        self.session = self._spike_session = self._binding = None


def without_cuda_graph(chosen: list) -> list:
    return [
        (entry[0], {k: v for k, v in entry[1].items() if k != "enable_cuda_graph"})
        if isinstance(entry, tuple)
        else entry
        for entry in chosen
    ]


ONNX_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(uint8)": np.uint8,
}


def _static_input(path: Path) -> bool:
    """Whether the graph's input has a fixed shape (exported with ``--static``)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return bool(dims) and all(d.HasField("dim_value") for d in dims)


def _time_major(spikes: np.ndarray, T: int, batch: int) -> np.ndarray:
    """A graph's time-folded spikes as ``[T, N, C, H, W]`` (or ``[T, N, ...]``): ``[T*N, ...]``
    as exported, or the ONNX Runtime INT8 lowering's GEMM rows ``[T*N*H*W, C]`` (square maps,
    as a square input gives)."""
    if spikes.ndim == 2 and spikes.shape[0] >= T * batch:
        side = math.isqrt(spikes.shape[0] // (T * batch))
        if T * batch * side * side == spikes.shape[0]:
            return spikes.reshape(T, batch, side, side, -1).transpose(0, 1, 4, 2, 3)
    return spikes.reshape(T, -1, *spikes.shape[1:])


def _graph_input_format(onnx_type: str, rank: int) -> str:
    if rank == 5:
        return "events"
    if onnx_type == "tensor(uint8)":
        return "uint8"
    return "float"


# --- TensorRT -------------------------------------------------------------------------------


def check_engine_compatible(
    sidecar: dict, *, tensorrt_version: str, gpu_name: str, compute_capability: str
) -> None:
    """Refuse an engine built for another TensorRT version or GPU (engines are not portable
    unless built version- or hardware-compatible)."""
    hint = "rebuild it here from the ONNX file with `i2e-deploy build model.onnx`"
    if not sidecar.get("version_compatible") and sidecar["tensorrt_version"] != tensorrt_version:
        raise I2EError(
            f"engine was built with TensorRT {sidecar['tensorrt_version']}, this is "
            f"TensorRT {tensorrt_version}; {hint}"
        )
    built_cc = str(sidecar["compute_capability"])
    if sidecar.get("hardware_compatibility"):
        if _cc_tuple(compute_capability) < (8, 0):
            raise I2EError(
                f"hardware-compatible engines need compute capability >= 8.0, this "
                f"GPU is {compute_capability}; {hint}"
            )
        return
    if built_cc != compute_capability or sidecar["gpu_name"] != gpu_name:
        raise I2EError(
            f"engine was built for {sidecar['gpu_name']} (sm {built_cc}), this GPU is "
            f"{gpu_name} (sm {compute_capability}); {hint}"
        )


def _cc_tuple(cc: str) -> tuple[int, ...]:
    return tuple(int(part) for part in str(cc).split("."))


class TensorRTRunner(Runner):
    """A serialized TensorRT engine run by Polygraphy's ``TrtRunner``, which owns the CUDA
    buffers and stream (no PyTorch needed, as on a Jetson). I/O names and the batch range
    come from the sidecar written with the engine."""

    name = "tensorrt"

    def __init__(self, path: Path, device: str = "cuda"):
        from ..export.tensorrt import (
            cuda_gpu,
            dla_runtime,
            load_cuda_runtime,
            polygraphy_errors,
            tensorrt_module,
        )

        super().__init__(path, device)
        trt = tensorrt_module()
        sidecar = read_engine_sidecar(path)
        gpu = cuda_gpu(device)
        check_engine_compatible(
            sidecar,
            tensorrt_version=trt.__version__,
            gpu_name=gpu.name,
            compute_capability=gpu.compute_capability,
        )
        self.card = ModelCard.from_dict(sidecar["card"])
        self.precision = sidecar["precision"]
        graph_input, graph_output = sidecar["io"]["inputs"][0], sidecar["io"]["outputs"][0]
        self._input_name, self._output_name = graph_input["name"], graph_output["name"]
        self.input_format = _graph_input_format(
            f"tensor({graph_input['dtype']})", len(graph_input["shape"])
        )
        self.output = "events" if len(graph_output["shape"]) == 5 else "logits"
        profile = sidecar["profile"]
        self.min_batch, self.batch_limit = profile["min"][0], profile["max"][0]
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        load_cuda_runtime(f"{path}: cannot run the engine")
        # A DLA engine runs on the core it was built for (the runtime's default is -1).
        dla_core = sidecar.get("dla_core")
        runtime = None if dla_core is None else functools.partial(dla_runtime, trt, dla_core)
        self._runner = TrtRunner(EngineFromBytes(BytesFromPath(str(path)), runtime=runtime))
        with polygraphy_errors(f"{path}: TensorRT cannot load the engine"):
            self._runner.activate()

    def _run(self, batch: np.ndarray) -> np.ndarray:
        from ..export.tensorrt import polygraphy_errors

        with polygraphy_errors(f"{self.path.name}: TensorRT inference failed"):
            result = self._runner.infer({self._input_name: batch})[self._output_name]
        # A copy: TrtRunner reuses its host output buffer on the next call.
        return np.array(result, np.uint8 if self.output == "events" else np.float32)

    def close(self) -> None:
        if self._runner.is_active:
            self._runner.deactivate()


def load_runner(
    path: str | os.PathLike,
    *,
    device: str = "cpu",
    threads: int | None = None,
    providers: list[str] | None = None,
    optimization: str = "all",
    warmup: int = 1,
    cache: Path | None = None,
    spinning: bool = True,
    **torch_options,
) -> Runner:
    """Open a model file on the backend its kind names ('default' = the bundled model).

    ``torch_options`` go to the PyTorch runner (``graphs``, and ``load_checkpoint``
    overrides such as ``imgsz``); they are refused for other backends. ``cache``: where the
    ONNX Runtime TensorRT provider keeps its engines; ``spinning``: ONNX Runtime's idle
    threads spin (off where another thread of the process needs the cores: ``stream``).
    """
    from ..assets import resolve_model

    path = resolve_model(str(path))
    if not path.is_file():
        raise I2EError(f"model file not found: {path}")
    kind = kind_of(path)
    if kind == "checkpoint":
        runner: Runner = TorchRunner(path, device, threads, **torch_options)
    elif torch_options:
        raise I2EError(f"options {sorted(torch_options)} apply only to PyTorch checkpoints")
    elif kind == "onnx":
        runner = OrtRunner(path, device, threads, providers, optimization, cache, spinning)
    else:
        runner = TensorRTRunner(path, "cuda" if device == "cpu" else device)
    if warmup:
        runner.warmup(warmup)
    return runner
