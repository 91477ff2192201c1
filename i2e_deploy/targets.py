"""One path from a model to an artifact, and from a model file to a runner.

``TARGETS`` lists every format x precision x device an export can take, with the INT8
flavour it uses and the runner that runs it; a combination not in the table is refused in
one place (:func:`target_for`). :func:`build_artifact` is the only caller of the exporters:
it exports the FP32 graph, verifies it against the reference model, derives the precision
and builds the format, optionally through the export cache. :func:`resolve_runner` opens a
model for ``stream``, ``demo``, ``parity`` and ``benchmark``, exporting a checkpoint into
the cache when another backend or precision is asked for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import (
    INT8_FLAVOURS,
    PRECISIONS,
    VERIFICATION_KEY,
    add_metadata,
    default_output,
    kind_of,
    read_card,
    read_precision,
    stem,
)
from .card import ModelCard
from .compare import compare, limits_for
from .device import GPU_INSTALL, parse_device
from .errors import I2EError, VerificationError

FORMATS = ("onnx", "engine", "triton")
FP32_VERIFY_COUNT = 32  # inputs the FP32 graph is verified on
REDUCED_VERIFY_COUNT = 64  # structured random inputs a reduced precision is checked on
DEFAULT_CALIB_SIZE = 512  # images of --data a reduced precision is checked on


@dataclass(frozen=True)
class Target:
    format: str  # onnx | engine | triton
    precision: str  # fp32 | fp16 | int8
    device: str  # cpu | cuda: where the artifact runs
    int8_flavour: str | None  # the INT8 graph (artifacts.INT8_FLAVOURS), for int8
    runner: str | None  # the backend that runs it: onnxruntime | tensorrt; None: Triton serves it
    suffix: str  # the file's suffix; '' for a folder


TARGETS = {
    (t.format, t.precision, t.device): t
    for t in [
        Target("onnx", "fp32", "cpu", None, "onnxruntime", ".onnx"),
        Target("onnx", "fp16", "cpu", None, "onnxruntime", ".onnx"),
        Target("onnx", "int8", "cpu", "onnxruntime", "onnxruntime", ".onnx"),
        Target("onnx", "fp32", "cuda", None, "onnxruntime", ".onnx"),
        Target("onnx", "fp16", "cuda", None, "onnxruntime", ".onnx"),
        Target("onnx", "int8", "cuda", "tensorrt", "onnxruntime", ".onnx"),
        Target("engine", "fp32", "cuda", None, "tensorrt", ".engine"),
        Target("engine", "fp16", "cuda", None, "tensorrt", ".engine"),
        Target("engine", "int8", "cuda", "tensorrt", "tensorrt", ".engine"),
        Target("triton", "fp32", "cpu", None, None, ""),
        Target("triton", "fp16", "cpu", None, None, ""),
        Target("triton", "int8", "cpu", "onnxruntime", None, ""),
        Target("triton", "fp32", "cuda", None, None, ""),
        Target("triton", "fp16", "cuda", None, None, ""),
        Target("triton", "int8", "cuda", "tensorrt", None, ""),
    ]
}


def target_for(fmt: str, precision: str, device: str) -> Target:
    """The table's row for a format, precision and device (``cuda:N`` counts as cuda;
    engines are built and run on a CUDA GPU, so ``cpu`` means the first GPU for them)."""
    if fmt not in FORMATS:
        raise I2EError(f"unknown format {fmt!r}; choose {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise I2EError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    kind = "cuda" if fmt == "engine" else parse_device(device)[0]
    return TARGETS[(fmt, precision, kind)]


def precision_from_flags(int8: bool, half: bool) -> str:
    """``--int8`` / ``--half`` -> a precision name."""
    if int8 and half:
        raise I2EError("choose one of --int8 and --half")
    return "int8" if int8 else "fp16" if half else "fp32"


@dataclass
class ExportRequest:
    """Everything ``export`` takes, checked before anything is loaded or written."""

    checkpoint: str  # a checkpoint file, or 'default'
    output: str | os.PathLike | None = None  # default: see ``destination``
    format: str = "onnx"
    precision: str = "fp32"
    device: str = "cpu"
    input_format: str | None = None  # image graphs: uint8 (NHWC) or float (NCHW)
    converter_only: bool = False
    batch: int = 1
    dynamic: bool = True
    opset: int = 17
    verify: bool = True
    data: str | os.PathLike | None = None  # real images for the verification
    calib_size: int = DEFAULT_CALIB_SIZE
    tolerances: dict[str, float] = field(default_factory=dict)
    max_batch: int | None = None  # engine profile's max / Triton's max batch size
    name: str | None = None  # Triton model name
    overrides: dict[str, Any] = field(default_factory=dict)  # load_checkpoint's

    def __post_init__(self) -> None:
        from .assets import resolve_model
        from .export.onnx import OPSETS

        self.target = target_for(self.format, self.precision, self.device)
        limits_for(self.precision, self.tolerances)  # a bad tolerance fails here
        source = resolve_model(self.checkpoint)
        if not source.is_file():
            raise I2EError(f"checkpoint not found: {source}")
        if kind_of(source) != "checkpoint":
            raise I2EError(
                f"{source}: export takes a PyTorch checkpoint; an exported graph "
                "is built into an engine with `i2e-deploy build`"
            )
        self.source = source
        if self.converter_only and (self.format, self.precision) != ("onnx", "fp32"):
            raise I2EError(
                "--converter-only writes an FP32 ONNX graph; drop --format, --int8 and --half"
            )
        if self.batch < 1:
            raise I2EError(f"--batch must be at least 1, got {self.batch}")
        if self.opset not in OPSETS:
            raise I2EError(
                f"--opset {self.opset} is not supported; choose {OPSETS.start}.."
                f"{OPSETS.stop - 1} (TensorRT 8.5 / JetPack 5 reads up to 17)"
            )
        if self.calib_size < 1:
            raise I2EError(f"--calib-size must be at least 1, got {self.calib_size}")
        if self.max_batch is not None and self.max_batch < 1:
            raise I2EError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.data is not None and not Path(self.data).is_dir():
            raise I2EError(
                f"--data {self.data} is not a folder; give an image folder "
                "(searched recursively) or leave it out to verify on structured "
                "random images"
            )
        if self.output is None and self.format == "triton":
            raise I2EError("--format triton needs --output REPO (the model repository folder)")
        if self.output is not None:
            self.output = Path(self.output)
            if self.format != "triton":
                from .export.onnx import check_writable

                check_writable(self.output)

    @property
    def destination(self) -> Path:
        """``output``, or by default the checkpoint's name with the target's suffix, next to
        the checkpoint (in this folder for the bundled model, whose folder may be
        read-only): ``m.onnx``, ``m.int8.onnx``, ``m.fp16.engine``..."""
        if self.output is not None:
            return Path(self.output)
        here = Path(self.source.name) if self.checkpoint == "default" else self.source
        tag = "" if self.precision == "fp32" else f".{self.precision}"
        default = default_output(here, self.converter_only).with_suffix(
            f"{tag}{self.target.suffix}"
        )
        from .export.onnx import check_writable

        check_writable(default)
        return default

    @property
    def export_options(self) -> dict[str, Any]:
        return {
            "input_format": self.input_format,
            "converter_only": self.converter_only,
            "batch": self.batch,
            "dynamic": self.dynamic,
            "opset": self.opset,
        }


def build_artifact(request: ExportRequest, log: Callable[[str], None] | None = None) -> Path:
    """Export ``request.checkpoint`` to ``request.output`` as ``request.target`` says; returns
    the file (or Triton model folder) written. The FP32 graph is verified against the
    reference model (a failure refuses the export, nothing is written); a reduced precision
    is checked against the FP32 graph (a shortfall is a warning: how far a spiking network's
    predictions move under rounding is a property of the model)."""
    from .calibration.half import to_fp16
    from .calibration.quantize import to_int8
    from .export.onnx import export_onnx
    from .fileio import copy_into_place
    from .model.checkpoint import load_checkpoint

    say = log or (lambda _msg: None)
    target = request.target
    output = request.destination
    model, card = load_checkpoint(request.source, **request.overrides)
    with tempfile.TemporaryDirectory() as scratch:
        # The FP32 graph is an intermediate here: keep its warnings, not its "wrote" line.
        fp32 = export_onnx(
            model,
            card,
            Path(scratch) / "model.onnx",
            log=lambda msg: None if msg.startswith("wrote ") else say(msg),
            **request.export_options,
        ).path
        stamp: dict[str, Any] = {}
        if request.verify:
            stamp["export"] = verify_graph(
                fp32, model, card, data=request.data, tolerances=request.tolerances, log=say
            )
        graph = fp32
        if target.precision == "int8":
            graph = to_int8(
                fp32,
                Path(scratch) / "model.int8.onnx",
                flavour=target.int8_flavour or "onnxruntime",
            )
        elif target.precision == "fp16":
            graph = to_fp16(fp32, Path(scratch) / "model.fp16.onnx")
        if graph != fp32 and request.verify:
            count = request.calib_size if request.data else REDUCED_VERIFY_COUNT
            reduced = verify_reduced(
                fp32,
                graph,
                target.precision,
                data=request.data,
                count=count,
                tolerances=request.tolerances,
                log=say,
            )
            stamp["reduced"] = {
                "passed": reduced["passed"],
                "vs": "the FP32 graph",
                "images": reduced["source"],
                **{
                    key: reduced["metrics"].get(key)
                    for key in ("decisive_mismatches", "median_rel", "event_agreement")
                },
            }
        if stamp:  # info shows what the graph was checked against
            add_metadata(graph, {VERIFICATION_KEY: json.dumps(stamp)})
        if target.format == "engine":  # TensorRT is needed from here on: graphs checked first
            device = request.device if request.device.startswith("cuda") else "cuda"
            # FP32: the engine against the checkpoint; a reduced precision against its own
            # graph on the CPU (that graph's distance from FP32 was checked above).
            reference = request.source if graph == fp32 else graph
            return build_verified_engine(
                graph,
                output,
                reference=reference,
                loaded=(model, card) if graph == fp32 else None,
                verify=request.verify,
                data=request.data,
                tolerances=request.tolerances,
                log=say,
                precision=target.precision,
                max_batch=request.max_batch,
                device=device,
            )
        if target.format == "triton":
            from .export.triton import write_repository

            folder = write_repository(
                graph,
                output,
                name=request.name or stem(request.source),
                max_batch_size=request.max_batch,
                instance_kind="KIND_GPU" if target.device == "cuda" else "KIND_CPU",
            )
            say(f"wrote Triton model {folder} ({target.precision})")
            return folder
        written = copy_into_place(graph, output)
        say(f"wrote {written} ({target.precision}, {_graph_note(target)})")
        return written


def build_verified_engine(
    graph: Path,
    output: str | os.PathLike | None,
    *,
    reference: Path | None = None,
    loaded: tuple[Any, ModelCard] | None = None,
    verify: bool = True,
    data: str | os.PathLike | None = None,
    tolerances: dict[str, float] | None = None,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> Path:
    """Build a TensorRT engine from ``graph`` (``options``: ``build_engine``'s) into a scratch
    folder, run it on this GPU against ``reference`` (default: ``graph`` on ONNX Runtime on
    the CPU), and only then write it and its sidecar, the verdict included. A refused engine
    leaves nothing behind. ``build``, ``export --format engine`` and the export cache all
    build engines here."""
    from .artifacts import engine_sidecar_path, write_engine_verification
    from .export.tensorrt import BuildRequest, build_engine
    from .fileio import copy_into_place
    from .runtime.runners import TensorRTRunner

    say = log or (lambda _msg: None)
    request = BuildRequest(graph, output, **options)  # checks before any build
    destination = request.output
    options = {**options, "calib_cache": request.calib_cache}  # beside the engine, as unverified
    with tempfile.TemporaryDirectory() as scratch:
        engine = build_engine(graph, Path(scratch) / destination.name, **options)
        if verify:
            with TensorRTRunner(engine, options.get("device", "cuda")) as candidate:
                record = verify_target(
                    candidate,
                    reference or Path(graph),
                    loaded=loaded,
                    data=data,
                    tolerances=tolerances,
                    log=say,
                    what=f"TensorRT {candidate.precision} engine",
                    refused="no engine written",
                )
            write_engine_verification(engine, record)
        copy_into_place(engine_sidecar_path(engine), engine_sidecar_path(destination))
        return copy_into_place(engine, destination)


def _graph_note(target: Target) -> str:
    if target.int8_flavour:
        return INT8_FLAVOURS[target.int8_flavour].split(":")[0]
    return "verified against the checkpoint" if target.precision == "fp32" else "FP32 neurons"


def cached_artifact(
    request: ExportRequest,
    log: Callable[[str], None] | None = None,
    cache: str | os.PathLike | None = None,
) -> Path:
    """:func:`build_artifact` once per checkpoint content and options, into the export cache
    (``$I2E_CACHE``, default ~/.cache/i2e-deploy), shared by stream, demo and benchmark."""
    from .cache import cache_dir, cached_export

    folder = Path(cache).expanduser() if cache else cache_dir()
    target = request.target
    options: dict[str, Any] = {
        "backend": target.runner,
        "precision": target.precision,
        "device": target.device,
        "verified": request.verify,
        **request.export_options,
        **{f"load_{key}": value for key, value in sorted(request.overrides.items())},
    }
    if target.format == "engine":  # engines are tied to the TensorRT version and the GPU
        from .export.tensorrt import cuda_gpu, tensorrt_module

        options.update(tensorrt=tensorrt_module().__version__, gpu=cuda_gpu(request.device).name)

    def build(output: Path) -> None:
        if log:
            log(
                f"exporting {request.source.name} to {target.format} {target.precision} once "
                f"(cached in {folder})"
            )
        build_artifact(dataclasses.replace(request, output=output), log=None)

    return cached_export(request.source, target.suffix, build, cache=folder, **options)


# --- verification ---------------------------------------------------------------------------


def verify_graph(
    path: str | os.PathLike,
    model,
    card: ModelCard,
    *,
    data: str | os.PathLike | None = None,
    count: int = FP32_VERIFY_COUNT,
    tolerances: dict[str, float] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compare the graph at ``path`` on ONNX Runtime with the reference ``model`` (FP32
    limits, ``tolerances`` applied); raise VerificationError naming the failing check and the
    ways out when it is not faithful."""
    from .runtime.runners import OrtRunner

    with OrtRunner(Path(path)) as candidate:
        return verify_target(
            candidate,
            Path(path),
            loaded=(model, card),
            data=data,
            count=count,
            tolerances=tolerances,
            log=log,
            stage="export verification",
            what="ONNX Runtime",
            refused="no file written",
            bundled=False,
        )


def verify_target(
    candidate,
    reference: Path,
    *,
    loaded: tuple[Any, ModelCard] | None = None,
    data: str | os.PathLike | None = None,
    count: int = FP32_VERIFY_COUNT,
    tolerances: dict[str, float] | None = None,
    key: dict[str, Any] | None = None,
    cache: Path | None = None,
    log: Callable[[str], None] | None = None,
    stage: str = "verification on the target",
    what: str | None = None,
    refused: str = "not used, nothing cached",
    bundled: bool = True,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The one check of a runner built from something other than the reference: compare
    ``candidate`` with the reference on the CPU (``loaded`` ``(model, card)``: the PyTorch
    model; else the checkpoint or the ONNX graph at ``reference``, on PyTorch or ONNX Runtime)
    on images of ``data``, else on the bundled sample photos (``bundled``; structured random
    images for export verification and event models), with the limits of the candidate's
    precision. A failure raises VerificationError naming the failing check, what was refused
    and the ways out. With ``key`` (artifact sha256, runner, device, GPU, versions) a passing
    verdict is kept in the cache and later calls reuse it: once per artifact and device.
    Returns the verdict record (for a sidecar, a cache entry and ``info``)."""
    from .cache import read_verdict
    from .images import model_inputs
    from .runtime.runners import OrtRunner, TorchRunner

    say = log or (lambda _msg: None)
    what = what or f"{candidate.name} on {candidate.device}"
    if key is not None:
        known = read_verdict(key, cache)
        if known is not None and known.get("passed"):
            say(f"verified here before ({known['when']}): {what}: {known['summary']}")
            return known
    limits = limits_for(candidate.precision, tolerances)
    random = data is None and (not bundled or candidate.card.input == "events")
    inputs, source = (
        model_inputs(candidate.card, data, count)
        if data is not None or random
        else sample_inputs(candidate.card, count)
    )
    if loaded is not None or kind_of(reference) == "checkpoint":
        opened: Any = TorchRunner(reference, loaded=loaded, **(overrides or {}))
        against = f"the PyTorch reference ({reference.name}, CPU)"
    else:
        opened = OrtRunner(reference)
        against = f"{reference.name} on ONNX Runtime (CPU)"
    with opened as ref:
        found = compare(ref, candidate, inputs, limits)
    say(f"verify: {what} vs {against}: {source}: {found.summary()}")
    if not found.passed:
        ways = "loosen that limit with --tolerance NAME=VALUE or skip the check with --no-verify"
        if random:
            ways = (
                "structured random images put many inputs near a spike threshold: verify "
                "on real images with --data DIR, " + ways
            )
        elif data is None:
            ways = "verify on your own images with --data DIR, " + ways
        raise VerificationError(
            f"{stage} failed ({what} vs {against}, {source}): "
            f"{found.failure()}; {refused}. If it is right, {ways}"
        )
    return verdict_record(
        found,
        source=source,
        what=what,
        reference=against,
        precision=candidate.precision,
        key=key,
        cache=cache,
    )


def sample_inputs(card: ModelCard, count: int) -> tuple[np.ndarray, str]:
    """``count`` frames spread over the bundled demo clip (real photos of CIFAR-10 classes,
    ``assets/demo``), preprocessed per the card."""
    from .images import preprocess
    from .runtime.sources import DemoSource

    with DemoSource() as clip:
        frames = [frame.image for frame in clip]
    picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    return (
        np.stack([preprocess(frames[i], card) for i in picks]),
        f"{len(picks)} frames of the bundled sample photos",
    )


def verdict_record(
    found,
    *,
    source: str,
    what: str,
    reference: str,
    precision: str,
    key: dict[str, Any] | None = None,
    cache: Path | None = None,
) -> dict[str, Any]:
    """What a passing verification leaves behind (kept in the cache when ``key`` is given)."""
    import datetime

    from .cache import write_verdict

    neurons = [row["agreement"] for row in found.layers or () if row["layer"] != "i2e"]
    metrics = found.metrics
    record = {
        "passed": found.passed,
        "what": what,
        "reference": reference,
        "images": source,
        "precision": precision,
        "summary": found.summary(),
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "count": metrics["count"],
        "decisive_changes": metrics.get("decisive_mismatches"),
        "median_rel": metrics.get("median_rel"),
        "median_abs": metrics.get("median_abs"),
        "spike_agreement": min(neurons) if neurons else None,
        "event_agreement": metrics.get("event_agreement"),
        "layers": found.layers,
    }
    if key is not None:
        write_verdict(key, record, cache)
    return record


def verify_reduced(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    precision: str,
    *,
    data: str | os.PathLike | None = None,
    count: int = REDUCED_VERIFY_COUNT,
    tolerances: dict[str, float] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compare a reduced-precision graph with its FP32 graph on ONNX Runtime with the limits
    of ``precision``; falling short is a warning line, not an error (see
    ``calibration.qat`` for INT8-exact checkpoints)."""
    from .images import model_inputs
    from .runtime.runners import OrtRunner

    say = log or (lambda _msg: None)
    with OrtRunner(Path(reference)) as fp32, OrtRunner(Path(candidate)) as reduced:
        inputs, source = model_inputs(fp32.card, data, count)
        found = compare(fp32, reduced, inputs, limits_for(precision, tolerances))
    say(f"verify {precision} vs FP32: {source}: {found.summary()}")
    if not found.passed:
        say(
            f"warning: {precision} is outside its limits ({found.failure()}): this model's "
            "spikes are sensitive to the rounding; for INT8, fine-tune an INT8-exact "
            "checkpoint whose INT8 graph equals its FP32 graph (`i2e-deploy qat CKPT "
            "TRAIN_IMAGES -o OUT`)"
        )
    return {**found.to_dict(), "source": source}


# --- runners --------------------------------------------------------------------------------

BACKENDS = ("auto", "torch", "onnx", "tensorrt")
RUN_PRECISIONS = ("auto", *PRECISIONS)


def run_precision(card: ModelCard, precision: str, backend: str, device: str) -> str:
    """The precision a checkpoint runs in on ``backend``: 'auto' picks INT8 for an
    INT8-exact checkpoint on ONNX Runtime on a CPU (the bundled model is one: the same
    predictions as FP32, faster), else FP32."""
    if precision not in RUN_PRECISIONS:
        raise I2EError(f"unknown precision {precision!r}; choose {', '.join(RUN_PRECISIONS)}")
    if precision != "auto":
        return precision
    exact = card.provenance.get("int8_exact", False)
    return "int8" if exact and backend == "onnx" and parse_device(device)[0] == "cpu" else "fp32"


@dataclass(frozen=True)
class Choice:
    """Which runner ``--backend auto`` (or the flag given) picked for a model, and why."""

    backend: str  # torch | onnx | tensorrt
    precision: str
    why: str
    graphs: bool = True  # torch on CUDA: CUDA graphs, else eager


def gpu_onnxruntime() -> str | None:
    """Why ONNX Runtime cannot run on a GPU here (no onnxruntime-gpu, or its CUDA provider,
    which its TensorRT provider runs beside, does not load), or None."""
    from .runtime.runners import provider_problem

    return provider_problem("CUDAExecutionProvider")


def runner_chain(card: ModelCard, backend: str, precision: str, device: str) -> list[Choice]:
    """For a checkpoint: the runners to try, fastest first; ``--backend auto`` moves to the
    next when one is refused. On CUDA: a TensorRT engine where TensorRT imports, ONNX
    Runtime's GPU providers where they load (onnxruntime-gpu), PyTorch CUDA graphs, eager
    PyTorch CUDA; on a CPU, ONNX Runtime (INT8 for an INT8-exact checkpoint, else FP32),
    then eager PyTorch. ``backend`` other than auto forces one."""
    if backend not in BACKENDS:
        raise I2EError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    if backend != "auto":
        chosen = run_precision(card, precision, backend, device)
        return [Choice(backend, chosen, f"--backend {backend}")]
    if parse_device(device)[0] == "cpu":
        chosen = run_precision(card, precision, "onnx", device)
        why = (
            "an INT8-exact checkpoint: its INT8 graph predicts what FP32 does, the fastest on a CPU"
            if chosen == "int8" and precision == "auto"
            else "ONNX Runtime runs the verified graph faster than eager PyTorch on a CPU"
        )
        chain = [Choice("onnx", chosen, why)]
        if precision in ("auto", "fp32"):
            chain.append(Choice("torch", "fp32", "the reference itself", graphs=False))
        return chain
    from .export.tensorrt import tensorrt_unavailable

    chain = []
    missing = tensorrt_unavailable(device)
    if missing is None:
        chain.append(
            Choice(
                "tensorrt",
                run_precision(card, precision, "tensorrt", device),
                "TensorRT is installed: an engine built and verified on this GPU",
            )
        )
    no_gpu_ort = gpu_onnxruntime()
    if no_gpu_ort is None:
        chain.append(
            Choice(
                "onnx",
                run_precision(card, precision, "onnx", device),
                "onnxruntime-gpu's providers, verified on this GPU"
                + (f" ({missing})" if missing else ""),
            )
        )
    if precision in ("auto", "fp32"):
        why = ", ".join(
            part for part in (missing, no_gpu_ort and f"no GPU ONNX Runtime: {no_gpu_ort}") if part
        )
        why = f" ({why})" if why else ""
        chain.append(Choice("torch", "fp32", f"CUDA graphs, verified on this GPU{why}"))
        chain.append(Choice("torch", "fp32", "eager CUDA, the reference itself", graphs=False))
    if not chain:
        raise I2EError(
            f"--precision {precision} on CUDA needs TensorRT or onnxruntime-gpu ({GPU_INSTALL})"
        )
    return chain


def choose_runner(card: ModelCard, backend: str, precision: str, device: str) -> Choice:
    """The first runner :func:`runner_chain` tries."""
    return runner_chain(card, backend, precision, device)[0]


def _label(backend: str, precision: str, device: str, graphs: bool = True) -> str:
    names = {"torch": "PyTorch", "onnx": "ONNX Runtime", "tensorrt": "TensorRT"}
    if backend == "torch" and parse_device(device)[0] == "cuda":
        return f"PyTorch {'CUDA graphs' if graphs else 'eager'} fp32 on {device}"
    if backend == "tensorrt" and device == "cpu":  # engines run on the first GPU
        device = "cuda"
    return f"{names[backend]} {precision} on {device}"


def resolve_runner(
    model: str | os.PathLike,
    *,
    backend: str = "auto",
    precision: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    cache: str | os.PathLike | None = None,
    warmup: int = 1,
    verify: bool = True,
    data: str | os.PathLike | None = None,
    tolerances: dict[str, float] | None = None,
    spinning: bool = True,
    log: Callable[[str], None] | None = None,
    **overrides: Any,
):
    """A loaded runner for a model file ('default' = the bundled model). A checkpoint runs
    where :func:`choose_runner` says (``backend`` 'auto': the fastest verified runner here),
    as the graph or engine of the precision asked for, built once into the export cache; an
    exported graph or engine runs on its own backend ('own' keeps a checkpoint on PyTorch).
    Whatever runs on a GPU from something other than the reference is verified there first
    (:func:`verify_target`, once per artifact and device; ``verify=False`` skips it). The
    first ``log`` line says which runner and why. ``spinning``: ONNX Runtime's (see
    ``load_runner``). ``overrides`` are ``load_checkpoint``'s."""
    from .assets import resolve_model
    from .cache import cache_key, read_refusal
    from .runtime.runners import gpu_name, load_runner

    say = log or (lambda _msg: None)
    if backend not in (*BACKENDS, "own"):
        raise I2EError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    path = resolve_model(str(model))
    if not path.is_file():
        raise I2EError(f"model file not found: {path}")
    folder = Path(cache).expanduser() if cache else None
    kind = kind_of(path)
    own = {"checkpoint": "torch", "onnx": "onnx", "engine": "tensorrt"}[kind]
    if kind != "checkpoint" and backend not in ("auto", "own", own):
        raise I2EError(
            f"{path.name} runs on its own backend ({own}); --backend {backend} needs the checkpoint"
        )
    if kind != "checkpoint" and precision not in ("auto", read_precision(path)):
        raise I2EError(
            f"{path.name} is a {read_precision(path)} file; --precision "
            f"{precision} needs the checkpoint"
        )
    on_gpu = parse_device(device)[0] == "cuda"
    if kind != "checkpoint" or backend == "own":
        if kind == "checkpoint" and precision not in ("auto", "fp32"):
            raise I2EError(
                f"--precision {precision} runs a checkpoint's {precision} graph: "
                "add --backend onnx (CPU or GPU) or --backend tensorrt (GPU)"
            )
        say(
            f"runner: {_label(own, read_precision(path), device)} ({path.name}: the file's "
            "own backend)"
        )
        runner = load_runner(
            path,
            device=device,
            threads=threads,
            warmup=warmup,
            cache=folder or _cache(),
            spinning=spinning,
            **overrides,
        )
        return _verified(
            runner,
            path,
            None,
            verify=verify and on_gpu,
            data=data,
            tolerances=tolerances,
            cache=folder,
            log=say,
        )
    card = read_card(path, **overrides)
    chain = runner_chain(card, backend, precision, device)
    if chain[0].backend == "torch" and chain[0].precision != "fp32":
        raise I2EError(
            f"--precision {chain[0].precision} runs a checkpoint's "
            f"{chain[0].precision} graph: add --backend onnx (CPU or GPU) or "
            "--backend tensorrt (GPU)"
        )
    # Runners refused here before are skipped (the last is always tried); the first line
    # names the runner that is tried, why, and what was skipped.
    tries: list[tuple[Choice, str, dict[str, Any]]] = []
    skipped: list[str] = []
    for number, choice in enumerate(chain):
        label = _label(choice.backend, choice.precision, device, choice.graphs)
        memo = {
            "refused": cache_key(
                path,
                backend=choice.backend,
                precision=choice.precision,
                graphs=choice.graphs,
                device=device,
                gpu=gpu_name(device) if parse_device(device)[0] == "cuda" else None,
                runtime=_runtime_version(choice.backend),
                data=str(data),
                tolerances=tolerances or {},
                **{f"load_{k}": v for k, v in sorted(overrides.items())},
            )
        }
        known = read_refusal(memo, folder) if number < len(chain) - 1 else None
        if known is not None:
            skipped.append(f"{label} refused here before ({known['when']}: {known['why']})")
        else:
            tries.append((choice, label, memo))
    first, label, _ = tries[0]
    say(f"runner: {label} ({'; '.join([first.why, *skipped])})")
    for number, (choice, label, memo) in enumerate(tries):
        try:
            return _open_choice(
                path,
                choice,
                device=device,
                threads=threads,
                folder=folder,
                warmup=warmup,
                verify=verify,
                data=data,
                tolerances=tolerances,
                spinning=spinning,
                log=say,
                overrides=overrides,
            )
        except I2EError as exc:
            why = str(exc).strip().splitlines()[0]
            if len(chain) == 1:
                if backend == "auto":
                    raise
                raise type(exc)(
                    f"{why}; --backend auto moves on to the next runner, --device cpu runs "
                    "on the CPU"
                ) from None
            if number == len(tries) - 1:
                raise
            _remember_refusal(memo, why, label, folder)
            following, following_label, _ = tries[number + 1]
            say(f"refused: {label} ({why}); running on {following_label} instead ({following.why})")
    raise AssertionError("unreachable: the last runner returns or raises")


def _remember_refusal(memo: dict[str, Any], why: str, label: str, cache: Path | None) -> None:
    """Keep a refusal for later runs; a cache that cannot be written keeps none (the
    runner is tried again next time)."""
    import datetime

    from .cache import write_refusal

    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        write_refusal(memo, {"when": when, "why": why, "runner": label}, cache)
    except (OSError, I2EError):  # temp_beside says I2EError for an unwritable folder
        pass


def _runtime_version(backend: str) -> str | None:
    """The version of the library that runs ``backend`` (a refusal is kept per version)."""
    import importlib

    module = {"onnx": "onnxruntime", "tensorrt": "tensorrt", "torch": "torch"}[backend]
    try:
        return str(importlib.import_module(module).__version__)
    except ImportError:
        return None


def _open_choice(
    path: Path,
    choice: Choice,
    *,
    device: str,
    threads: int | None,
    folder: Path | None,
    warmup: int,
    verify: bool,
    data: str | os.PathLike | None,
    tolerances: dict[str, float] | None,
    spinning: bool,
    log: Callable[[str], None],
    overrides: dict[str, Any],
):
    """One runner of :func:`runner_chain`, built (once, into the export cache), loaded and
    verified where it runs on a GPU."""
    from .runtime.runners import load_runner

    on_gpu = parse_device(device)[0] == "cuda"
    if choice.backend in ("onnx", "tensorrt"):
        request = ExportRequest(
            str(path),
            format="onnx" if choice.backend == "onnx" else "engine",
            precision=choice.precision,
            device=device,
            data=data,
            tolerances=tolerances or {},
            verify=verify,
            overrides=overrides,
        )
        artifact = cached_artifact(request, log=log, cache=folder)
        runner = load_runner(
            artifact,
            device=device,
            threads=threads,
            warmup=warmup,
            cache=folder or _cache(),
            spinning=spinning,
        )
        reference = path if choice.precision == "fp32" else artifact
        return _verified(
            runner,
            artifact,
            reference,
            verify=verify and on_gpu,
            data=data,
            tolerances=tolerances,
            cache=folder,
            log=log,
            overrides=overrides,
        )
    # CUDA graphs by default on CUDA; eager is the chain's last resort.
    graphs: dict[str, Any] = {"graphs": False} if on_gpu and not choice.graphs else {}
    runner = load_runner(path, device=device, threads=threads, warmup=warmup, **graphs, **overrides)
    return _verified(
        runner,
        path,
        path,
        verify=verify and on_gpu,
        data=data,
        tolerances=tolerances,
        cache=folder,
        log=log,
        overrides=overrides,
    )


def _cache() -> Path:
    from .cache import cache_dir

    return cache_dir()


def _verified(
    runner,
    artifact: Path,
    reference: Path | None,
    *,
    verify: bool,
    data: str | os.PathLike | None,
    tolerances: dict[str, float] | None,
    cache: Path | None,
    log: Callable[[str], None],
    overrides: dict[str, Any] | None = None,
):
    """``runner`` after :func:`verify_target` where it runs on a GPU: an ONNX Runtime GPU
    session or CUDA-graph PyTorch against ``reference`` (default: a graph on the CPU), keyed
    by the artifact's sha256, the runner, its providers and the GPU; an engine's verdict is
    in its sidecar (written when it was built and verified)."""
    if not verify:
        return runner
    from .artifacts import read_engine_sidecar
    from .card import sha256_file
    from .runtime.runners import gpu_name

    try:
        if runner.name == "tensorrt":
            record = read_engine_sidecar(artifact).get("verification")
            if record:
                log(
                    f"verified when built on {read_engine_sidecar(artifact)['gpu_name']} "
                    f"({record['when']}): {record['summary']}"
                )
            else:
                log(
                    f"warning: {artifact.name} carries no verification verdict; rebuild it "
                    "with `i2e-deploy build` to verify it on this GPU"
                )
            return runner
        if runner.name == "torch":  # the reference itself (eager)
            return runner
        versions: dict[str, Any] = {}
        if runner.name == "onnxruntime":
            import onnxruntime

            versions = {
                "onnxruntime": onnxruntime.__version__,
                "providers": runner.providers,
                "provider_options": runner.session.get_provider_options(),
            }
        else:
            import torch

            versions = {"torch": torch.__version__}
        key = {
            "sha256": sha256_file(artifact),
            "runner": runner.name,
            "device": runner.device,
            "gpu": gpu_name(runner.device),
            **versions,
            **{f"load_{k}": v for k, v in sorted((overrides or {}).items())},
        }
        verify_target(
            runner,
            reference or artifact,
            data=data,
            tolerances=tolerances,
            key=key,
            cache=cache,
            log=log,
            overrides=overrides if reference == artifact or reference is None else None,
        )
    except BaseException:
        runner.close()
        raise
    return runner
