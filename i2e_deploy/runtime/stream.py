"""The streaming loop: sources -> preprocess -> infer -> overlay -> sinks, with statistics.

Python API, in the style of jetson-inference's examples::

    from i2e_deploy.runtime.stream import Classifier
    from i2e_deploy.runtime.sources import open_source
    from i2e_deploy.runtime.sinks import open_sink

    model = Classifier("model.onnx")
    with open_source("video.mp4") as source, open_sink("out.mp4") as sink:
        for frame in source:
            sink.render(frame, model(frame))

``Stream`` (and ``run_stream`` for the CLI) adds what a live camera needs: capture on its own
thread with a latest-frame policy (stale frames are dropped and counted), several sources
micro-batched into one inference, FPS / latency percentiles / per-stage times in bounded
memory, reconnection, and a clean end on Ctrl-C or end of input.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from ..assets import resolve_model
from ..cache import cache_dir, cached_export
from ..card import ModelCard
from ..errors import I2EError
from ..fileio import atomic_output
from .overlay import annotate
from .preprocess import preprocess
from .runners import TORCH_SUFFIXES, Runner, load_runner, parse_device
from .sinks import Sink, open_sinks
from .sources import Frame, Source, open_source

STAGES = ("capture", "preprocess", "infer", "overlay", "sink")


@dataclass
class Prediction:
    """Top-k classes of one frame, and what the network saw (for the event view)."""
    indices: np.ndarray
    labels: list[str]
    probs: np.ndarray
    logits: np.ndarray
    model_input: np.ndarray  # uint8 [S, S, 3] crop, or events [T, 2, S, S]
    card: ModelCard

    @cached_property
    def events(self) -> np.ndarray:
        """[T, 2, S, S] 0/1 events: the model input itself, or the I2E conversion of the crop."""
        if self.model_input.ndim == 4:
            return self.model_input
        return image_to_events(self.model_input, self.card.ratio)


def image_to_events(crop: np.ndarray, ratio: float) -> np.ndarray:
    """uint8 HWC RGB -> [T, 2, H, W] uint8: the converter's exact integer path (SPEC §1),
    bit-identical to the model's own first layer and far cheaper per frame."""
    from ..model.converter import convert_uint8

    return convert_uint8(crop[None], ratio, threads=1)[:, 0].view(np.uint8)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


PRECISIONS = ("auto", "fp32", "int8")


def open_runner(model: str | os.PathLike, *, backend: str = "auto", precision: str = "auto",
                device: str = "cpu", threads: int | None = None, **overrides) -> Runner:
    """Load a model for streaming. ``backend='onnx'`` runs a PyTorch checkpoint on ONNX
    Runtime, exporting it once into the cache (``$I2E_CACHE``, default ~/.cache/i2e-deploy),
    in ``precision`` (see :func:`onnx_precision`); 'auto' and 'torch' use the backend the
    file's suffix names."""
    if backend not in ("auto", "torch", "onnx"):
        raise I2EError(f"unknown backend {backend!r}; choose auto, torch or onnx")
    path = resolve_model(str(model))
    checkpoint = path.suffix.lower() in TORCH_SUFFIXES
    if checkpoint and (backend == "onnx" or precision == "int8"):
        chosen = onnx_precision(path, precision, device)
        if backend != "onnx":
            raise I2EError("--precision int8 runs a checkpoint's INT8 graph on ONNX Runtime: "
                           "add --backend onnx")
        path = cached_onnx(path, precision=chosen, **overrides)
        overrides = {}
    elif backend == "torch" and not checkpoint:
        raise I2EError(f"--backend torch needs a PyTorch checkpoint, got {path.name}")
    return load_runner(path, device=device, threads=threads, **overrides)


def onnx_precision(checkpoint: Path, precision: str, device: str) -> str:
    """The graph a checkpoint streams through on ONNX Runtime. 'auto' picks INT8 on a CPU
    for an INT8-exact checkpoint (the bundled model is one): the same predictions as FP32,
    about 2.5x faster; else FP32. INT8 graphs here are ONNX Runtime's CPU flavour."""
    from ..model.checkpoint import load_checkpoint

    if precision not in PRECISIONS:
        raise I2EError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    on_cpu = parse_device(device)[0] == "cpu"
    if precision == "int8" and not on_cpu:
        raise I2EError("--precision int8 streams on the CPU; on a GPU build a TensorRT engine "
                       "(`i2e-deploy export CKPT --format engine --int8`) and stream that")
    if precision != "auto":
        return precision
    exact = load_checkpoint(checkpoint)[1].provenance.get("int8_exact", False)
    return "int8" if exact and on_cpu else "fp32"


def cached_onnx(checkpoint: Path, log: Callable[[str], None] | None = None,
                precision: str = "fp32", **overrides) -> Path:
    """The verified ONNX export of a checkpoint (FP32, or INT8 for ONNX Runtime on CPUs),
    made once per file content, precision and overrides."""
    from ..calibration.quantize import export_int8  # the exporters load only when needed
    from ..export.onnx import export_onnx

    def build(output: Path) -> None:
        if log:
            log(f"exporting {checkpoint.name} to {precision.upper()} ONNX once (cached in "
                f"{cache_dir()})")
        if precision == "int8":
            export_int8(checkpoint, output, **overrides)  # verified vs FP32
        else:
            export_onnx(checkpoint, output=output, **overrides)  # verified vs the checkpoint

    return cached_export(checkpoint, ".onnx", build, backend="onnx", precision=precision,
                         verified=True, **overrides)


class Classifier:
    """A model that classifies frames: ``Classifier(path)(frame) -> Prediction``. ``model`` is
    a file name, or an already loaded runner (anything with ``card`` and ``infer``)."""

    def __init__(self, model: str | os.PathLike | Runner, *, topk: int = 3,
                 backend: str = "auto", precision: str = "auto", device: str = "cpu",
                 threads: int | None = None, **overrides):
        if topk < 1:
            raise I2EError(f"topk must be >= 1, got {topk}")
        self.runner = open_runner(model, backend=backend, precision=precision, device=device,
                                  threads=threads, **overrides) \
            if isinstance(model, (str, os.PathLike)) else model
        if self.runner.name != "torch":
            import torch

            # Torch only preprocesses here; for such small ops its thread pool costs more
            # than it gives, many times more when the cores are busy.
            torch.set_num_threads(1)
        self.card: ModelCard = self.runner.card
        self.topk = min(topk, self.card.num_classes)

    @property
    def name(self) -> str:
        precision = getattr(self.runner, "precision", "fp32")
        return self.runner.name if precision == "fp32" else f"{self.runner.name} {precision}"

    def prepare(self, frame: Frame) -> np.ndarray:
        """The model input for one frame: the card's crop, or events [T, 2, S, S]."""
        if frame.events is not None:
            if self.card.input != "events":
                raise I2EError("event-camera frames need an event-input model")
            return frame.events
        crop = preprocess(frame.image, self.card)
        if self.card.input == "events":  # an event model watching a camera: I2E makes events
            return image_to_events(crop, self.card.ratio)
        return crop

    def classify(self, inputs: list[np.ndarray]) -> list[Prediction]:
        """One inference over a micro-batch of prepared inputs."""
        logits = self.runner.infer(np.stack(inputs))
        probs = softmax(logits.astype(np.float64))
        top = np.argsort(-probs, axis=1)[:, :self.topk]
        return [Prediction(top[i], [self.card.label(int(k)) for k in top[i]], probs[i, top[i]],
                           logits[i], inputs[i], self.card) for i in range(len(inputs))]

    def __call__(self, frame: Frame) -> Prediction:
        return self.classify([self.prepare(frame)])[0]

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Ring:
    """The last ``capacity`` samples (for percentiles) plus whole-run count and sum, in
    fixed memory however long the stream runs."""

    def __init__(self, capacity: int = 8192):
        self.values = np.zeros(capacity)
        self.count = 0
        self.total = 0.0

    def add(self, value: float) -> None:
        self.values[self.count % len(self.values)] = value
        self.count += 1
        self.total += value

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def percentile(self, q: float) -> float:
        n = min(self.count, len(self.values))
        return float(np.percentile(self.values[:n], q)) if n else 0.0


@dataclass
class StreamStats:
    sources: list[str]
    backend: str
    frames: int = 0
    seconds: float = 0.0
    dropped: int = 0
    unreadable: int = 0
    reconnects: int = 0
    interrupted: bool = False
    error: str | None = None
    latency: Ring = field(default_factory=Ring)
    stages: dict[str, Ring] = field(default_factory=lambda: {s: Ring() for s in STAGES})

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        infer_s = self.stages["infer"].total / 1e3
        return {
            "sources": self.sources, "backend": self.backend,
            "frames": self.frames, "seconds": round(self.seconds, 4), "fps": round(self.fps, 3),
            "latency_ms": {"p50": round(self.latency.percentile(50), 3),
                           "p90": round(self.latency.percentile(90), 3),
                           "p99": round(self.latency.percentile(99), 3),
                           "mean": round(self.latency.mean, 3)},
            "stages_ms": {name: round(ring.mean, 3) for name, ring in self.stages.items()},
            # Share of wall time not spent inside the network: the pipeline's own cost.
            "pipeline_overhead_pct": round(100 * (1 - infer_s / self.seconds), 2)
            if self.seconds > 0 else 0.0,
            "dropped": self.dropped, "unreadable": self.unreadable,
            "reconnects": self.reconnects, "interrupted": self.interrupted, "error": self.error,
        }

    def summary(self) -> str:
        d = self.to_dict()
        lat, st = d["latency_ms"], d["stages_ms"]
        end = "interrupted" if self.interrupted else ("stopped by error" if self.error else "done")
        return (f"{end}: {self.frames} frames in {self.seconds:.1f} s = {self.fps:.1f} FPS "
                f"({self.backend}) | latency p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms | "
                f"per frame: capture {st['capture']:.1f}, preprocess {st['preprocess']:.1f}, "
                f"infer {st['infer']:.1f}, overlay {st['overlay']:.1f}, sink {st['sink']:.1f} ms "
                f"| dropped {self.dropped}, unreadable {self.unreadable}")


_END = object()


class _Capture(threading.Thread):
    """Reads and preprocesses one source on its own thread, in parallel with inference, into
    a queue of ``queue_size`` items ``(frame, model input, preprocess ms)``. Live sources keep
    only the newest frames (the oldest is dropped and counted); recordings wait for a free
    slot before decoding, so every frame is processed and none ages in the queue."""

    def __init__(self, source: Source, index: int, prepare, queue_size: int, latest: bool):
        super().__init__(name=f"capture-{index}", daemon=True)
        self.source, self.index, self.prepare, self.latest = source, index, prepare, latest
        self.queue: queue.Queue = queue.Queue()  # bounded by the slots; +1 for the end marker
        self.slots = threading.Semaphore(queue_size)
        self.stop = threading.Event()
        self.dropped = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            frames = iter(self.source)
            while not self.stop.is_set():
                if not self.latest and not self._take_slot():
                    break
                frame = next(frames, None)
                if frame is None:
                    break
                frame.source = self.index
                began = time.perf_counter()
                model_input = self.prepare(frame)
                prepared_ms = (time.perf_counter() - began) * 1e3
                if self.latest and not self.slots.acquire(blocking=False):
                    self._drop_oldest()
                self.queue.put((frame, model_input, prepared_ms))
        except I2EError as exc:
            self.error = str(exc)
        except Exception as exc:  # a decoder failing mid-stream must not kill the loop silently
            self.error = f"source {self.source.uri} failed: {type(exc).__name__}: {exc}"
        finally:
            self.source.close()  # here, not from the main thread, which may still be reading
            self.queue.put(_END)

    def _take_slot(self) -> bool:
        while not self.stop.is_set():
            if self.slots.acquire(timeout=0.1):
                return True
        return False

    def _drop_oldest(self) -> None:
        """Full: the new frame takes the slot of the oldest queued one, unless the consumer
        took that one meanwhile and freed a slot."""
        while True:
            try:
                self.queue.get_nowait()
                self.dropped += 1
                return
            except queue.Empty:
                if self.slots.acquire(timeout=0.01):
                    return

    def get(self):
        """Next item, or _END; waits in short steps so Ctrl-C is seen promptly."""
        while True:
            try:
                item = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is not _END:
                self.slots.release()
            return item


class Stream:
    """Run ``classifier`` over ``sources`` into ``sink`` until the sources end, ``max_frames``
    are done, the sink's window is closed, or Ctrl-C. The stream closes sources and sink.

    ``latest`` (default: for live sources) selects the latest-frame policy; ``queue_size``
    bounds each source's queue (1-2 keeps latency low)."""

    def __init__(self, classifier: Classifier, sources: list[Source], sink: Sink, *,
                 max_frames: int | None = None, queue_size: int = 1, latest: bool | None = None):
        if not sources:
            raise I2EError("no source given")
        if queue_size < 1:
            raise I2EError(f"queue size must be >= 1, got {queue_size}")
        self.classifier, self.sources, self.sink = classifier, sources, sink
        self.max_frames = max_frames
        self.captures = [_Capture(s, i, classifier.prepare, queue_size,
                                  s.live if latest is None else latest)
                         for i, s in enumerate(sources)]
        self.stats = StreamStats([s.uri for s in sources], classifier.name)

    def run(self) -> StreamStats:
        stats = self.stats
        start = time.perf_counter()
        for capture in self.captures:
            capture.start()
        active = list(self.captures)
        rate = 0.0
        try:
            while active and not self.sink.stopped:
                items = []
                for capture in list(active):
                    item = capture.get()
                    if item is _END:
                        active.remove(capture)
                    else:
                        items.append(item)
                if self.max_frames is not None:
                    items = items[:self.max_frames - stats.frames]
                if not items:
                    continue
                frames, inputs, prepared_ms = zip(*items)
                prepared = time.perf_counter()
                predictions = self.classifier.classify(list(inputs))
                inferred = time.perf_counter()
                canvases: list[np.ndarray | None] = [None] * len(frames)
                if self.sink.needs_canvas:
                    status = f"{rate:.1f} FPS | {stats.latency.percentile(50):.0f} ms | " \
                             f"{self.classifier.name}"
                    canvases = [annotate(f, p, status) for f, p in zip(frames, predictions)]
                drawn = time.perf_counter()
                for frame, prediction, canvas in zip(frames, predictions, canvases):
                    self.sink.write(frame, prediction, canvas)
                written = time.perf_counter()
                n = len(frames)
                for frame, prep_ms in zip(frames, prepared_ms):
                    stats.latency.add((written - frame.timestamp) * 1e3)
                    stats.stages["capture"].add(frame.capture_ms)
                    stats.stages["preprocess"].add(prep_ms)
                    for name, seconds in (("infer", inferred - prepared),
                                          ("overlay", drawn - inferred),
                                          ("sink", written - drawn)):
                        stats.stages[name].add(seconds * 1e3 / n)
                stats.frames += n
                elapsed = written - start
                rate = stats.frames / elapsed if elapsed > 0 else 0.0
                if self.max_frames is not None and stats.frames >= self.max_frames:
                    break
        except KeyboardInterrupt:
            stats.interrupted = True
        finally:
            stats.seconds = time.perf_counter() - start
            self._shutdown()
        return stats

    def _shutdown(self) -> None:
        for capture in self.captures:
            capture.stop.set()
            capture.source.interrupt()
        for capture in self.captures:
            capture.join(timeout=5.0)  # a live read can block; the thread is a daemon
        self.sink.close()
        stats = self.stats
        stats.dropped = sum(c.dropped for c in self.captures)
        stats.unreadable = sum(s.unreadable for s in self.sources)
        stats.reconnects = sum(s.reconnects for s in self.sources)
        errors = [c.error for c in self.captures if c.error]
        if errors and not stats.interrupted:
            stats.error = errors[0]


def run_stream(model: str, sources: list[str], outputs: list[str], *,
               max_frames: int | None = None, topk: int = 3, backend: str = "auto",
               precision: str = "auto", device: str = "cpu", threads: int | None = None, resolution: str | None = None,
               fps: float | None = None, loop: bool = False, stride: int = 1,
               window_ms: float = 100.0, queue_size: int = 1, reconnects: int = 5,
               stats_json: str | None = None, **overrides) -> StreamStats:
    """Open everything by name, run the stream, write ``stats_json``. Open failures (missing
    file, dead URL, no camera) raise I2EError before anything runs; a failure mid-stream
    (camera lost, not back after ``reconnects`` attempts) ends the stream and is reported in
    ``stats.error``."""
    if reconnects < 0:
        raise I2EError(f"--reconnects must be >= 0, got {reconnects}")
    if max_frames is not None and max_frames < 1:
        raise I2EError(f"--max-frames must be >= 1, got {max_frames}")
    classifier = Classifier(model, topk=topk, backend=backend, precision=precision,
                            device=device, threads=threads, **overrides)
    opened: list[Source] = []
    try:
        for uri in sources:
            opened.append(open_source(uri, card=classifier.card, resolution=resolution, fps=fps,
                                      loop=loop, stride=stride, window_ms=window_ms,
                                      reconnect_attempts=reconnects))
        sink = open_sinks(outputs or ["display"], fps=opened[0].fps if opened else 25.0)
    except BaseException:
        for source in opened:
            source.close()
        raise
    try:
        stats = Stream(classifier, opened, sink, max_frames=max_frames,
                       queue_size=queue_size).run()
    finally:
        classifier.close()
    if stats_json:
        write_json_atomic(stats_json, stats.to_dict())
    return stats


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    with atomic_output(path, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


def run_demo(*, model: str = "default", output: list[str] | None = None,
             backend: str = "auto", precision: str = "auto", device: str = "cpu",
             threads: int | None = None,
             max_frames: int | None = None, stats_json: str | None = None,
             log: Callable[[str], None] = print) -> tuple[StreamStats, list[str]]:
    """The zero-argument demo: the bundled model on the bundled 'demo' clip; a window when
    a screen and a GUI OpenCV are there, else demo.mp4 + demo.jsonl in the current folder.
    Returns the stats and the outputs used.

    ``backend='auto'`` runs a PyTorch checkpoint on ONNX Runtime (exported once into the
    cache, in ``precision``: see :func:`onnx_precision`; several times faster on a CPU), and
    on PyTorch if that export fails."""
    from .sinks import DisplaySink, screen_available
    from .sources import DemoSource

    path = resolve_model(model)
    if backend == "auto" and path.suffix.lower() in TORCH_SUFFIXES and device == "cpu":
        chosen = onnx_precision(path, precision, device)
        try:
            model = str(cached_onnx(path, log=log, precision=chosen))
        except Exception as exc:  # the demo must run; PyTorch runs the same network
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log(f"ONNX export failed ({first}); running on PyTorch")

    if output is None:
        output = ["demo.mp4", "demo.jsonl"]
        if screen_available():
            try:
                DisplaySink().close()
                output = ["display"]
            except I2EError:
                pass  # a screen but a headless OpenCV: fall back to files
    paced = "display" in output  # on screen, play at the clip's own speed
    stats = run_stream(model, ["demo"], output, max_frames=max_frames, backend=backend,
                       precision=precision, device=device, threads=threads, fps=DemoSource.nominal_fps if paced else None,
                       stats_json=stats_json)
    return stats, output
