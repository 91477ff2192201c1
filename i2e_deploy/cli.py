"""The ``i2e-deploy`` command line: each command parses, calls the library, prints."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import threading
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from .device import GPU_INSTALL
from .errors import I2EError, SourceLostError, logger

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Export, run and verify I2E spiking networks.",
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Export, run and verify I2E spiking networks."""
    if _warning_line not in logger.handlers:
        logger.addHandler(_warning_line)


def say(message: str) -> None:
    """Print a line literally: library messages hold brackets ('[events]', '[N, T, 2, H, W]')
    that rich markup would take for style tags."""
    console.print(Text(message), highlight=False, soft_wrap=True)


def say_stderr(message: str) -> None:
    """A progress line on stderr, printed literally."""
    err_console.print(Text(message), highlight=False, soft_wrap=True)


class _WarningLine(logging.Handler):
    """The library's warnings (``i2e_deploy.errors.warn``) as one literal line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(
            Text.assemble(("warning:", "yellow"), f" {record.getMessage()}"),
            highlight=False,
            soft_wrap=True,
        )


_warning_line = _WarningLine(logging.WARNING)


def command(*args, **kwargs):
    """Register a command whose I2EError becomes one red line and its exit code: 2 (bad
    input), 1 for a refused verification (as parity's failure), 3 for a stream's source lost
    for good. The message
    prints literally: a Text, not markup, so "pip install 'i2e-deploy[events]'" keeps its
    brackets."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*a, **kw):
            try:
                return fn(*a, **kw)
            except I2EError as exc:
                err_console.print(
                    Text.assemble(("error:", "red"), f" {exc}"), highlight=False, soft_wrap=True
                )
                raise typer.Exit(exc.exit_code) from None
            except ImportError as exc:
                name = fn.__name__.removesuffix("_cmd")
                missing = (exc.name or "").split(".")[0]
                if missing in ("torch", "torchvision"):
                    need = (
                        "PyTorch here (checkpoints, export, training; exported .onnx/.engine "
                        "files run without it): pip install 'i2e-deploy[torch]'"
                    )
                elif missing == "onnxruntime":
                    need = f"ONNX Runtime: pip install 'i2e-deploy[cpu]', or {GPU_INSTALL}"
                else:
                    raise
                err_console.print(
                    Text.assemble(("error:", "red"), f" `{name}` needs {need}"),
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(2) from None

        return app.command(*args, **kwargs)(run)

    return wrap


def model_overrides(arch, classes, ratio, imgsz, events) -> dict:
    """The model-card flags given, as ``load_checkpoint`` keywords."""
    given = dict(arch=arch, num_classes=classes, ratio=ratio, imgsz=imgsz, events=events)
    return {key: value for key, value in given.items() if value is not None}


ArchOpt = typer.Option(None, "--arch", help="msresnet18 or msresnet34 (default: from the weights)")
ClassesOpt = typer.Option(None, "--classes", help="number of classes (must match fc.weight)")
RatioOpt = typer.Option(None, "--ratio", help="converter threshold ratio (default: card / paper)")
ImgszOpt = typer.Option(None, "--imgsz", help="input size in px (default: card / paper)")
EventsOpt = typer.Option(None, "--events/--images", help="event-input or image-input model")


@command("info")
def info(
    model: str = typer.Argument(
        ..., help="checkpoint, .onnx, .engine, Triton model folder, or 'default'"
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    arch: str | None = ArchOpt,
    classes: int | None = ClassesOpt,
    ratio: float | None = RatioOpt,
    imgsz: int | None = ImgszOpt,
    events: bool | None = EventsOpt,
):
    """Show a model file's card, precision, INT8 flavour and verification verdicts (and a
    checkpoint's inferred fields, parameters and GMACs)."""
    from .apps.info import describe_file, rows

    found = describe_file(model, **model_overrides(arch, classes, ratio, imgsz, events))
    if as_json:
        print(json.dumps(found, indent=2))
        return
    from rich.table import Table

    table = Table(title=Text(model), show_header=False)
    for key, value in rows(found):
        table.add_row(key, Text(value))
    console.print(table)
    for note in found["card"].get("inferred", []):
        console.print(Text.assemble(("inferred:", "yellow"), f" {note}"), highlight=False)


@command("train")
def train_cmd(
    data: Path = typer.Argument(
        ..., help="image folder or I2E event dataset, one sub-folder per class"
    ),
    output: Path = typer.Option(Path("runs/train"), "--output", "-o"),
    recipe: str = typer.Option("baseline-ii", help="baseline-i | baseline-ii | transfer"),
    arch: str = typer.Option("msresnet18"),
    imgsz: int | None = typer.Option(None, help="input size (default: paper's)"),
    ratio: float | None = typer.Option(None, help="converter ratio (default: paper's)"),
    epochs: int = typer.Option(256),
    batch: int = typer.Option(64),
    lr: float = typer.Option(0.1),
    weight_decay: float | None = typer.Option(None, help="default 2e-4 CIFAR, 1e-5 ImageNet"),
    augment: str | None = typer.Option(None, help="cifar | imagenet | none"),
    val_split: float = typer.Option(0.0, help="hold out a count (>=1) or fraction"),
    val_data: Path | None = typer.Option(None, help="separate held-out folder"),
    seed: int = typer.Option(0),
    workers: int = typer.Option(2),
    device: str = typer.Option("cpu"),
    precision: str = typer.Option(
        "auto", help="auto | fp32 | bf16 | fp16 (auto: bf16 where the CPU/GPU has native bf16)"
    ),
    time_budget: float | None = typer.Option(
        None,
        "--time",
        help="minutes: as many epochs as fit, cosine schedule fitted to them (overrides --epochs)",
    ),
    from_checkpoint: Path | None = typer.Option(None, "--from", help="fine-tune from"),
    resume: bool = typer.Option(False, help="continue OUTPUT/last.pt"),
    events: bool = typer.Option(
        False,
        "--events",
        help="train an event-input model (e.g. --from an image checkpoint on an event dataset)",
    ),
    mixup: bool = typer.Option(
        False, "--mixup", help="CutMix or MixUp for the first 2/3 of the epochs"
    ),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="also log to OUTPUT/tensorboard"),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="stop after N steps (smoke runs)"
    ),
):
    """Train an MS-ResNet with the paper's recipes; under torchrun, one process per device."""
    from .training.train import TrainConfig, train

    cfg = TrainConfig(
        data=str(data),
        output=str(output),
        recipe=recipe,
        arch=arch,
        imgsz=imgsz,
        ratio=ratio,
        epochs=epochs,
        batch=batch,
        lr=lr,
        weight_decay=weight_decay,
        augment=augment,
        val_split=val_split,
        val_data=str(val_data) if val_data else None,
        seed=seed,
        workers=workers,
        device=device,
        from_checkpoint=str(from_checkpoint) if from_checkpoint else None,
        resume=resume,
        events=events,
        mixup=mixup,
        tensorboard=tensorboard,
        max_steps=max_steps,
        precision=precision,
        time_budget=time_budget,
    )
    train(cfg, log=say, console=console)


BACKEND_HELP = (
    "auto (the fastest runner verified here: on a CPU ONNX Runtime, INT8 for an "
    "INT8-exact checkpoint; on CUDA TensorRT, else onnxruntime-gpu, else PyTorch "
    "CUDA graphs), torch, onnx or tensorrt (a checkpoint is exported once into "
    "the cache)"
)
VerifyOpt = typer.Option(
    True,
    "--verify/--no-verify",
    help="check a runner built for a GPU against the reference on the "
    "CPU before it runs (once per model file and GPU)",
)
VerifyDataOpt = typer.Option(
    None, "--verify-data", help="image folder for that check (default: the bundled sample photos)"
)
ToleranceOpt = typer.Option(
    None,
    "--tolerance",
    help="override one limit, NAME=VALUE (repeatable): tie_margin, "
    "decisive, median_rel, spike_agreement, event_agreement; "
    "the defaults per precision are in --json",
)


@command("parity")
def parity_cmd(
    model_a: str = typer.Argument(..., help="reference: checkpoint, .onnx, .engine or 'default'"),
    model_b: str = typer.Argument(..., help="model to check against A"),
    data: Path | None = typer.Option(None, "--data", help="image folder (recursive)"),
    random: int | None = typer.Option(None, "--random", help="N structured random images"),
    limit: int = typer.Option(100, "--limit", help="images taken from --data"),
    layers: bool = typer.Option(False, "--layers", help="print the spike agreement per LIF layer"),
    precision: str | None = typer.Option(
        None, "--precision", help="fp32|fp16|int8 limits (default: the lower precision of A and B)"
    ),
    tolerance: list[str] | None = ToleranceOpt,
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N"),
    threads: int | None = typer.Option(None, "--threads", help="intra-op threads"),
    batch: int = typer.Option(8, "--batch", help="inference batch size"),
    json_path: Path | None = typer.Option(None, "--json", help="write the report here"),
):
    """Check that model B predicts what model A predicts (exit 0 pass, 1 fail, 2 bad input)."""
    from .apps.parity import render, run_parity, write_json
    from .compare import parse_tolerances

    report = run_parity(
        model_a,
        model_b,
        data=data,
        random=random,
        limit=limit,
        precision=precision,
        tolerances=parse_tolerances(tolerance or ()),
        device=device,
        threads=threads,
        batch_size=batch,
        log=say,
    )
    render(report, console, layers=layers)
    if json_path:
        write_json(json_path, report.to_dict())
    if not report.passed:
        raise typer.Exit(1)


ViewFpsOpt = typer.Option(
    10.0, "--view-fps", help="http:// outputs: pictures per second sent to the page, at most"
)


@command("stream")
def stream(
    model: str = typer.Argument(..., help="model file (.pth/.pt, .onnx, .engine) or 'default'"),
    source: list[str] = typer.Option(
        ...,
        "--source",
        "-s",
        help="camera index or /dev/videoN, video file, rtsp:// "
        "or http:// URL, image folder or glob, 'demo'; "
        "for event-input models an event recording "
        "(.aedat4, .raw, .bin), an iniVation camera "
        "(dvs: or dvs:SERIAL) or a DV network stream "
        "(dv://HOST:PORT); repeat to micro-batch "
        "several",
    ),
    output: list[str] = typer.Option(
        ["display"],
        "--output",
        "-o",
        help="display, none, out.mp4, preds.jsonl or http://HOST:PORT (a live page; "
        "http://:8080 serves this machine only, http://0.0.0.0:8080 the network); repeatable",
    ),
    max_frames: int | None = typer.Option(None, "--max-frames", help="stop after N frames"),
    stats_json: Path | None = typer.Option(None, "--json", help="write stream statistics here"),
    topk: int = typer.Option(3, "--topk", help="labels shown and logged per frame"),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="what a checkpoint runs as on onnx/tensorrt: auto "
        "(int8 on a CPU for an INT8-exact checkpoint, "
        "else fp32), fp32, fp16 or int8",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N"),
    threads: int | None = typer.Option(None, "--threads", help="inference threads"),
    fps: float | None = typer.Option(
        None,
        "--fps",
        help="camera rate; recordings play at this rate like a live camera (stale frames dropped)",
    ),
    loop: bool = typer.Option(False, "--loop", help="restart recordings at their end"),
    stride: int = typer.Option(1, "--stride", help="use every N-th frame"),
    resolution: str | None = typer.Option(None, "--resolution", help="frame size WxH"),
    window_ms: float = typer.Option(
        100.0, "--window-ms", help="event sources: window of event time per prediction"
    ),
    reconnects: int = typer.Option(
        5,
        "--reconnects",
        help="cameras and streams: reconnect attempts when lost, -1 for ever (backoff "
        "doubling from 0.5 s to 10 s, reset by a good frame)",
    ),
    timeout: float = typer.Option(
        5.0,
        "--timeout",
        help="cameras and streams: seconds to open, and of silence that means lost",
    ),
    activity: bool | None = typer.Option(
        None,
        "--activity/--no-activity",
        help="count each prediction's firing rate "
        "and SOPs from the backend's spikes "
        "(into --json and .jsonl; default: on "
        "with --json where the backend "
        "exposes spikes)",
    ),
    show_activity: bool = typer.Option(
        False, "--show-activity", help="show firing rate and SOPs on the overlay"
    ),
    view_fps: float = ViewFpsOpt,
    rotate: str | None = typer.Option(
        None,
        "--rotate",
        help="close file outputs as timestamped segments at this size (100MB, 512KiB)",
    ),
    rotate_every: str | None = typer.Option(
        None, "--rotate-every", help="close file outputs as segments this often (10m, 1h, 1d)"
    ),
    keep: int | None = typer.Option(
        None, "--keep", help="closed segments kept per output (default: all)"
    ),
    log_format: str = typer.Option(
        "text", "--log-format", help="text, or json: one JSON object per event on stderr"
    ),
    verify: bool = VerifyOpt,
    verify_data: Path | None = VerifyDataOpt,
    arch: str | None = ArchOpt,
    classes: int | None = ClassesOpt,
    ratio: float | None = RatioOpt,
    imgsz: int | None = ImgszOpt,
    events: bool | None = EventsOpt,
):
    """Classify a camera, video, stream or event recording live, with the event view.
    SIGTERM, SIGHUP and Ctrl-C end it cleanly. Exit 0: ended (input done, --max-frames, a
    stop signal); 2: bad input; 3: a source lost for good; 1: an internal error."""
    from .runtime.options import StreamOptions
    from .runtime.service import EventLog, parse_duration, parse_size

    options = StreamOptions(
        backend=backend,
        precision=precision,
        device=device,
        threads=threads,
        verify=verify,
        verify_data=verify_data,
        model_overrides=model_overrides(arch, classes, ratio, imgsz, events),
        resolution=resolution,
        fps=fps,
        loop=loop,
        stride=stride,
        window_ms=window_ms,
        reconnects=reconnects,
        timeout_s=timeout,
        max_frames=max_frames,
        topk=topk,
        stats_json=stats_json,
        activity=activity,
        show_activity=show_activity,
        view_fps=view_fps,
        rotate_bytes=None if rotate is None else parse_size(rotate),
        rotate_every_s=None if rotate_every is None else parse_duration(rotate_every),
        keep=keep,
        log_format=log_format,
    ).check()
    event_log = EventLog(log_format, say)  # `events` is the event-input model flag
    try:
        with _warnings_as_events(event_log) if event_log.json else contextlib.nullcontext():
            _stream_logged(event_log, model, source, output, options)
    finally:
        _closed.set()


@contextlib.contextmanager
def _warnings_as_events(events):
    """With --log-format json, every line on stderr is an event, warnings included."""
    handler = events.handler()
    logger.removeHandler(_warning_line)
    logger.addHandler(handler)
    logger.propagate = False  # a root handler (some exporters configure one) adds text
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.addHandler(_warning_line)
        logger.propagate = True


def _stream_logged(events, model, source, output, options) -> None:
    """Run the stream with its start, end and error as events (lines in text format)."""
    from .apps.stream import run_stream
    from .runtime.service import interrupt_on_stop_signals

    events.emit("start", model=model, sources=source, outputs=output, pid=os.getpid())
    try:
        with interrupt_on_stop_signals():  # until the stream runs and takes them over
            stats = run_stream(
                model,
                source,
                output,
                options,
                log=events.log if events.json else say,
                events=events,
            )
    except KeyboardInterrupt:  # a stop signal while the model loads or sources open
        events.emit("end", "stopped before the stream started", stats=None)
        return
    except I2EError as exc:
        if not events.json:
            raise
        events.emit("error", str(exc), exit_code=exc.exit_code)
        raise typer.Exit(exc.exit_code) from None
    events.emit("end", stats.summary(), stats=stats.to_dict())
    if stats.error:
        if not events.json:
            raise SourceLostError(stats.error)
        events.emit("error", stats.error, exit_code=SourceLostError.exit_code)
        raise typer.Exit(SourceLostError.exit_code)


@command("demo")
def demo(
    model: str = typer.Option("default", "--model", help="model file or 'default'"),
    output: list[str] | None = typer.Option(
        None,
        "--output",
        "-o",
        help="default: a window if there is a screen, else demo.mp4 + demo.jsonl here; "
        "http://HOST:PORT serves a live page (e.g. -o http://0.0.0.0:8080 -o demo.mp4)",
    ),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="auto (int8 on a CPU for an INT8-exact model such as "
        "the bundled one, else fp32), fp32 or int8",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N"),
    threads: int | None = typer.Option(None, "--threads", help="inference threads"),
    max_frames: int | None = typer.Option(None, "--max-frames", help="stop after N frames"),
    stats_json: Path | None = typer.Option(None, "--json", help="write stream statistics here"),
    view_fps: float = ViewFpsOpt,
    verify: bool = VerifyOpt,
):
    """Zero-argument demo: the bundled model watching bundled real photos, with its events."""
    from .apps.stream import run_demo
    from .runtime.options import StreamOptions

    options = StreamOptions(
        backend=backend,
        precision=precision,
        device=device,
        threads=threads,
        verify=verify,
        max_frames=max_frames,
        stats_json=stats_json,
        view_fps=view_fps,
    )
    stats, outputs = run_demo(model=model, output=output or None, options=options, log=say)
    say(stats.summary())
    files = [o for o in outputs if o not in ("display", "none") and not o.startswith("http://")]
    if files:
        say(f"wrote {', '.join(files)}")
    if stats.error:
        raise I2EError(stats.error)


@command("benchmark")
def benchmark_cmd(
    model: str = typer.Argument(..., help="checkpoint, .onnx, .engine or 'default'"),
    data: Path | None = typer.Option(None, "--data", help="labelled ImageFolder for accuracy"),
    limit: int = typer.Option(500, "--limit", help="images taken from --data"),
    iters: int = typer.Option(50, "--iters", help="timed calls at batch 1"),
    warmup: int = typer.Option(5, "--warmup", help="untimed calls first"),
    batch: int = typer.Option(8, "--batch", help="batch size for throughput"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N"),
    threads: int | None = typer.Option(None, "--threads", help="intra-op threads"),
    cache: Path | None = typer.Option(
        None, "--cache", help="export cache (default ~/.cache/i2e-deploy)"
    ),
    precision: list[str] | None = typer.Option(
        None, "--precision", help="only these (fp32, fp16, int8); repeatable"
    ),
    json_path: Path | None = typer.Option(None, "--json", help="write the report here"),
    markdown_path: Path | None = typer.Option(None, "--markdown", help="write the table here"),
):
    """Latency, throughput, memory, accuracy and parity of every backend x precision here."""
    from .apps.benchmark import markdown, run_benchmark
    from .apps.parity import write_json, write_text
    from .artifacts import PRECISIONS

    report = run_benchmark(
        model,
        data=str(data) if data else None,
        limit=limit,
        iters=iters,
        warmup=warmup,
        batch=batch,
        device=device,
        threads=threads,
        cache=str(cache) if cache else None,
        precisions=tuple(precision) if precision else PRECISIONS,
        log=say_stderr,
    )
    table = markdown(report)
    print(table)
    if markdown_path:
        write_text(markdown_path, table + "\n")
    if json_path:
        write_json(json_path, report.to_dict())


@command("profile")
def profile_cmd(
    model: str = typer.Argument(..., help="checkpoint, .onnx, .engine or 'default'"),
    data: Path = typer.Option(
        ...,
        "--data",
        help="image folder (recursive); for event-input models also an event recording or I2E "
        "event dataset",
    ),
    limit: int = typer.Option(100, "--limit", help="inputs taken from --data (spread over it)"),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="what a checkpoint runs as on onnx/tensorrt: auto, fp32, fp16 or int8",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N"),
    threads: int | None = typer.Option(None, "--threads", help="intra-op threads"),
    batch: int = typer.Option(1, "--batch", help="batch size of the profiled calls"),
    runs: int = typer.Option(20, "--runs", help="profiled calls (per layer the median is shown)"),
    energy_ac: float = typer.Option(0.9, "--energy-ac", help="pJ per accumulate (SNN: per SOP)"),
    energy_mac: float = typer.Option(
        4.6, "--energy-mac", help="pJ per multiply-accumulate (ANN: per MAC)"
    ),
    json_path: Path | None = typer.Option(None, "--json", help="write the report here"),
    markdown_path: Path | None = typer.Option(None, "--markdown", help="write the table here"),
    plot_path: Path | None = typer.Option(
        None, "--plot", help="write a PNG: firing rates per layer and step, SOPs and ms per layer"
    ),
    arch: str | None = ArchOpt,
    classes: int | None = ClassesOpt,
    ratio: float | None = RatioOpt,
    imgsz: int | None = ImgszOpt,
    events: bool | None = EventsOpt,
):
    """Firing rates, MACs, synaptic operations, energy and ms per layer of a model."""
    from .apps.profile import render, run_profile, write_reports

    report = run_profile(
        model,
        data,
        limit=limit,
        backend=backend,
        precision=precision,
        device=device,
        threads=threads,
        batch=batch,
        runs=runs,
        energy_ac=energy_ac,
        energy_mac=energy_mac,
        log=say_stderr,
        **model_overrides(arch, classes, ratio, imgsz, events),
    )
    render(report, console)
    write_reports(report, json_path=json_path, markdown_path=markdown_path, plot_path=plot_path)
    for path in (json_path, markdown_path, plot_path):
        if path:
            say(f"wrote {path}")


@command("build")
def build_cmd(
    onnx_file: Path = typer.Argument(..., help=".onnx graph from `i2e-deploy export`"),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="engine file (default: ONNX name, .engine)"
    ),
    half: bool = typer.Option(False, "--half", help="FP16 convs, FP32 neurons (the FP16 graph)"),
    int8: bool = typer.Option(
        False, "--int8", help="INT8 convs, FP32 neurons (the S8S8 Q/DQ graph)"
    ),
    calibrator: str = typer.Option(
        "qdq",
        "--calibrator",
        help="INT8: qdq (exact 0/1 spikes, no data) | entropy | minmax (implicit, from --data)",
    ),
    data: Path | None = typer.Option(
        None, "--data", help="image folder for --calibrator entropy/minmax"
    ),
    calib_size: int = typer.Option(512, "--calib-size", help="calibration images"),
    calib_cache: Path | None = typer.Option(None, "--calib-cache", help="calibration cache file"),
    min_batch: int | None = typer.Option(None, "--min-batch", help="profile min batch (default 1)"),
    batch: int | None = typer.Option(None, "--batch", help="profile opt batch (default: min)"),
    max_batch: int | None = typer.Option(None, "--max-batch", help="profile max batch (default 8)"),
    workspace: float = typer.Option(4.0, "--workspace", help="workspace limit, GiB"),
    dla_core: int | None = typer.Option(
        None, "--dla-core", help="Jetson DLA core: one fixed batch, GPU fallback on"
    ),
    timing_cache: Path | None = typer.Option(
        None, "--timing-cache", help="reuse/update this timing cache"
    ),
    device: str = typer.Option("cuda", "--device", help="cuda or cuda:N"),
    verify: bool = typer.Option(
        True,
        "--verify/--no-verify",
        help="run the engine on this GPU against the ONNX graph on the CPU before writing it",
    ),
    verify_data: Path | None = VerifyDataOpt,
    tolerance: list[str] | None = ToleranceOpt,
):
    """Build a TensorRT engine (+ JSON sidecar) from an exported ONNX graph, on the target,
    verified there against the graph on ONNX Runtime (CPU) before it is written."""
    from .compare import parse_tolerances
    from .targets import build_verified_engine, precision_from_flags

    engine = build_verified_engine(
        onnx_file,
        output,
        verify=verify,
        data=verify_data,
        tolerances=parse_tolerances(tolerance or ()),
        log=say,
        precision=precision_from_flags(int8, half),
        int8_mode=calibrator,
        min_batch=min_batch,
        opt_batch=batch,
        max_batch=max_batch,
        workspace_gib=workspace,
        dla_core=dla_core,
        timing_cache=timing_cache,
        calib_data=data,
        calib_size=calib_size,
        calib_cache=calib_cache,
        device=device,
    )
    say(f"wrote {engine} and {engine.name}.json")


@command("val")
def val_cmd(
    model: str = typer.Argument(..., help="checkpoint, .onnx, .engine or 'default'"),
    data: Path = typer.Argument(
        ..., help="labelled image folder (or I2E event dataset for event models)"
    ),
    val_split: float | None = typer.Option(
        None,
        "--val-split",
        help="evaluate only what `train --val-split N --seed S` held out (default: the card's "
        "split when DATA is its training folder; 0 = all)",
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="seed of that split (default: the card's)"
    ),
    device: str = typer.Option("cpu", "--device"),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="auto, fp32, fp16 or int8 (a checkpoint's graph on onnx/tensorrt)",
    ),
    verify: bool = VerifyOpt,
    batch: int = typer.Option(64, "--batch"),
    workers: int = typer.Option(2, "--workers"),
    json_path: Path | None = typer.Option(None, "--json", help="write the report as JSON"),
    plot: Path | None = typer.Option(None, "--plot", help="save the confusion matrix as PNG"),
):
    """Top-1/top-5, per-class accuracy and confusion matrix of a model on a labelled folder."""
    from rich.progress import Progress

    from .apps.validate import plot_confusion, report_tables, validate, write_json

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("validating", total=None)
        report = validate(
            model,
            data,
            device=device,
            batch=batch,
            workers=workers,
            val_split=val_split,
            seed=seed,
            backend=backend,
            precision=precision,
            verify=verify,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            log=say,
        )
    for table in report_tables(report):
        console.print(table)
    unreadable = f" ({len(report.skipped)} unreadable left out)" if report.skipped else ""
    say(
        f"top-1 {report.top1:.2f}%  top-5 {report.top5:.2f}%  on {report.images} images{unreadable}"
    )
    if json_path:
        write_json(report, json_path)
        say(f"wrote {json_path}")
    if plot:
        plot_confusion(report, plot)
        say(f"wrote {plot}")


@command("qat")
def qat_cmd(
    checkpoint: str = typer.Argument(..., help="checkpoint file, or 'default'"),
    data: Path = typer.Argument(
        ..., help="its training image folder (the card's held-out split is left out)"
    ),
    output: Path = typer.Option(..., "--output", "-o", help="INT8-exact checkpoint to write"),
    steps: int = typer.Option(600, "--steps"),
    batch: int = typer.Option(32, "--batch"),
    lr: float = typer.Option(1e-3, "--lr"),
    workers: int = typer.Option(2, "--workers"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N]"),
):
    """Quantization-aware fine-tuning: a checkpoint whose INT8 graph predicts what its FP32
    graph does."""
    from .assets import resolve_model
    from .calibration.qat import finetune_int8

    finetune_int8(
        resolve_model(checkpoint),
        data,
        output,
        steps=steps,
        batch=batch,
        lr=lr,
        workers=workers,
        seed=seed,
        device=device,
        log=say,
    )
    say(
        f"wrote {output}: weights on the per-channel INT8 grid; export it with "
        f"`i2e-deploy export {output} --int8`"
    )


@command("convert")
def convert_cmd(
    src: Path = typer.Argument(..., help="image folder, one sub-folder per class"),
    dst: Path = typer.Argument(..., help="event dataset folder (resumes if it exists)"),
    fmt: str = typer.Option(
        "npz",
        "--format",
        help="npz (compressed, one .npz per sample) | packed (header + packbits .npy)",
    ),
    ratio: float | None = typer.Option(
        None, "--ratio", help="converter ratio (default: paper's for the class count)"
    ),
    imgsz: int | None = typer.Option(None, "--imgsz", help="output size in px (default: paper's)"),
    batch: int = typer.Option(256, "--batch"),
    workers: int = typer.Option(2, "--workers", help="decoding processes"),
):
    """Convert an image dataset into an I2E event dataset (the paper's layouts)."""
    from rich.progress import Progress

    from .training.convert import convert_folder

    with Progress(console=console) as bar:
        task = bar.add_task("converting", total=None)
        stats = convert_folder(
            src,
            dst,
            fmt,
            ratio=ratio,
            imgsz=imgsz,
            batch=batch,
            workers=workers,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    unreadable = f", {stats.unreadable} unreadable left out" if stats.unreadable else ""
    say(
        f"wrote {stats.written} samples ({stats.skipped} already there{unreadable}) in "
        f"{stats.seconds:.1f} s, {stats.rate:.0f} images/s"
    )


@command("export")
def export_cmd(
    checkpoint: str = typer.Argument(..., help="checkpoint file, or 'default'"),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="ONNX file (default: next to the checkpoint, .onnx)"
    ),
    input_format: str | None = typer.Option(
        None,
        "--input-format",
        help="image graphs: uint8 (NHWC RGB, default) or float (NCHW in [0, 1])",
    ),
    converter_only: bool = typer.Option(
        False, "--converter-only", help="images -> uint8 events [N, T, 2, H, W] only"
    ),
    batch: int = typer.Option(1, "--batch", help="batch traced (fixed in the graph with --static)"),
    static: bool = typer.Option(
        False, "--static", help="fixed batch size instead of a dynamic one"
    ),
    opset: int = typer.Option(
        17, "--opset", help="ONNX opset (13-20; TensorRT 8.5 reads up to 17)"
    ),
    verify: bool = typer.Option(
        True, "--verify/--no-verify", help="compare ONNX Runtime with the reference model"
    ),
    tolerance: list[str] | None = ToleranceOpt,
    data: Path | None = typer.Option(
        None,
        "--data",
        help="image folder (recursive) for the verification (default: structured random images)",
    ),
    arch: str | None = ArchOpt,
    classes: int | None = ClassesOpt,
    ratio: float | None = RatioOpt,
    imgsz: int | None = ImgszOpt,
    events: bool | None = EventsOpt,
    fmt: str = typer.Option(
        "onnx",
        "--format",
        help="onnx | engine (TensorRT, built on this machine) | triton (model repository at "
        "--output)",
    ),
    int8: bool = typer.Option(
        False,
        "--int8",
        help="SNN-aware INT8 (exact 0/1 activations): U8S8 for ONNX Runtime CPUs, S8S8 Q/DQ for "
        "TensorRT/GPUs",
    ),
    half: bool = typer.Option(False, "--half", help="FP16 convs, FP32 neurons"),
    calib_size: int = typer.Option(
        512, "--calib-size", help="--data images that check INT8/FP16 against FP32"
    ),
    device: str = typer.Option(
        "cpu", "--device", help="target device: cpu or cuda[:N] (picks the INT8 flavour)"
    ),
    max_batch: int | None = typer.Option(
        None, "--max-batch", help="engine profile / Triton max batch size (default 8)"
    ),
):
    """Export a checkpoint to an ONNX graph (verified against the reference by default)."""
    from .compare import parse_tolerances
    from .targets import ExportRequest, build_artifact, precision_from_flags

    request = ExportRequest(
        checkpoint,
        output,
        format=fmt,
        precision=precision_from_flags(int8, half),
        device=device,
        input_format=input_format,
        converter_only=converter_only,
        batch=batch,
        dynamic=not static,
        opset=opset,
        verify=verify,
        data=data,
        calib_size=calib_size,
        tolerances=parse_tolerances(tolerance or ()),
        max_batch=max_batch,
        overrides=model_overrides(arch, classes, ratio, imgsz, events),
    )
    build_artifact(request, log=say)


# Set by `stream` once its outputs are published and its sources closed.
_closed = threading.Event()


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        if not _closed.is_set():
            raise
        # Nothing is left to tear down but the interpreter, and PyTorch's teardown takes
        # seconds on a busy machine: a service stop must end well inside Docker's 10 s.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1)


if __name__ == "__main__":
    main()
