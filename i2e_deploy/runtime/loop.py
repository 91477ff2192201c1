"""The streaming loop: sources -> preprocess -> infer -> overlay -> sinks, with statistics.

``Stream`` adds what a live camera needs: capture on its own thread with a latest-frame
policy (stale frames are dropped and counted), several sources micro-batched into one
inference, FPS / latency percentiles / per-stage times in bounded memory, reconnection, and a
clean end on Ctrl-C or end of input.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import I2EError
from .classify import Classifier
from .frames import Source
from .options import StreamOptions
from .overlay import annotate
from .sinks import Sink

STAGES = ("capture", "preprocess", "infer", "overlay", "sink")


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
    firing_rate: Ring | None = None  # per prediction, when the classifier counts activity
    sops: Ring | None = None

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        infer_s = self.stages["infer"].total / 1e3
        return {
            "sources": self.sources,
            "backend": self.backend,
            "frames": self.frames,
            "seconds": round(self.seconds, 4),
            "fps": round(self.fps, 3),
            "latency_ms": {
                "p50": round(self.latency.percentile(50), 3),
                "p90": round(self.latency.percentile(90), 3),
                "p99": round(self.latency.percentile(99), 3),
                "mean": round(self.latency.mean, 3),
            },
            "stages_ms": {name: round(ring.mean, 3) for name, ring in self.stages.items()},
            # Share of wall time not spent inside the network: the pipeline's own cost.
            "pipeline_overhead_pct": round(100 * (1 - infer_s / self.seconds), 2)
            if self.seconds > 0
            else 0.0,
            "dropped": self.dropped,
            "unreadable": self.unreadable,
            "reconnects": self.reconnects,
            "interrupted": self.interrupted,
            "error": self.error,
            **(
                {
                    "activity": {
                        "firing_rate": self.firing_rate.mean,
                        "sops_per_prediction": self.sops.mean,
                    }
                }
                if self.firing_rate is not None and self.sops is not None
                else {}
            ),
        }

    def summary(self) -> str:
        d = self.to_dict()
        lat, st = d["latency_ms"], d["stages_ms"]
        end = "interrupted" if self.interrupted else ("stopped by error" if self.error else "done")
        return (
            f"{end}: {self.frames} frames in {self.seconds:.1f} s = {self.fps:.1f} FPS "
            f"({self.backend}) | latency p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms | "
            f"per frame: capture {st['capture']:.1f}, preprocess {st['preprocess']:.1f}, "
            f"infer {st['infer']:.1f}, overlay {st['overlay']:.1f}, sink {st['sink']:.1f} ms "
            f"| dropped {self.dropped}, unreadable {self.unreadable}"
            + (
                f" | LIF rate {self.firing_rate.mean:.4f}, {self.sops.mean / 1e6:.1f} M SOPs "
                "per prediction"
                if self.firing_rate is not None and self.sops is not None and self.firing_rate.count
                else ""
            )
        )


def _activity(prediction) -> str:
    return f" | rate {prediction.firing_rate:.3f}, {prediction.sops / 1e6:.0f} M SOPs"


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

    def get(self, stopping: threading.Event):
        """Next item, or _END (also when ``stopping`` is set); waits in short steps so Ctrl-C
        and a stop request are seen promptly."""
        while not stopping.is_set():
            try:
                item = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is not _END:
                self.slots.release()
            return item
        return _END


class Stream:
    """Run ``classifier`` over ``sources`` into ``sink`` until the sources end,
    ``options.max_frames`` are done, the sink's window is closed, :meth:`request_stop` (a
    signal handler's way out) or Ctrl-C. The stream closes sources and sink.

    ``options.latest`` (default: for live sources) selects the latest-frame policy;
    ``options.queue_size`` bounds each source's queue (1-2 keeps latency low). Keyword
    ``changes`` override single options."""

    def __init__(
        self,
        classifier: Classifier,
        sources: list[Source],
        sink: Sink,
        options: StreamOptions | None = None,
        **changes,
    ):
        if not sources:
            raise I2EError("no source given")
        self.options = (options or StreamOptions()).replace(**changes).check()
        latest = self.options.latest
        self.classifier, self.sources, self.sink = classifier, sources, sink
        self.max_frames = self.options.max_frames
        self.captures = [
            _Capture(
                s,
                i,
                classifier.prepare,
                self.options.queue_size,
                s.live if latest is None else latest,
            )
            for i, s in enumerate(sources)
        ]
        self.stats = StreamStats([s.uri for s in sources], classifier.name)
        if classifier.activity is not None:
            self.stats.firing_rate, self.stats.sops = Ring(), Ring()
        self.show_activity = self.options.show_activity and classifier.activity is not None
        self.stopping = threading.Event()
        sink.attach(self.stats, sources)

    def request_stop(self) -> None:
        """End the run as Ctrl-C does (safe from a signal handler or another thread)."""
        self.stopping.set()

    def run(self) -> StreamStats:
        stats = self.stats
        start = time.perf_counter()
        for capture in self.captures:
            capture.start()
        active = list(self.captures)
        rate = 0.0
        try:
            while active and not self.sink.stopped and not self.stopping.is_set():
                items = []
                for capture in list(active):
                    item = capture.get(self.stopping)
                    if item is _END:
                        active.remove(capture)
                    else:
                        items.append(item)
                if self.max_frames is not None:
                    items = items[: self.max_frames - stats.frames]
                if not items:
                    continue
                frames, inputs, prepared_ms = zip(*items)
                prepared = time.perf_counter()
                predictions = self.classifier.classify(list(inputs))
                inferred = time.perf_counter()
                canvases: list[np.ndarray | None] = [None] * len(frames)
                if self.sink.needs_canvas:
                    status = (
                        f"{rate:.1f} FPS | {stats.latency.percentile(50):.0f} ms | "
                        f"{self.classifier.name}"
                    )
                    canvases = [
                        annotate(f, p, status + _activity(p) if self.show_activity else status)
                        for f, p in zip(frames, predictions)
                    ]
                drawn = time.perf_counter()
                for frame, prediction, canvas in zip(frames, predictions, canvases):
                    self.sink.write(frame, prediction, canvas)
                written = time.perf_counter()
                n = len(frames)
                for frame, prep_ms in zip(frames, prepared_ms):
                    stats.latency.add((written - frame.timestamp) * 1e3)
                    stats.stages["capture"].add(frame.capture_ms)
                    stats.stages["preprocess"].add(prep_ms)
                    for name, seconds in (
                        ("infer", inferred - prepared),
                        ("overlay", drawn - inferred),
                        ("sink", written - drawn),
                    ):
                        stats.stages[name].add(seconds * 1e3 / n)
                stats.frames += n
                if stats.firing_rate is not None and stats.sops is not None:
                    for prediction in predictions:
                        stats.firing_rate.add(prediction.firing_rate or 0.0)
                        stats.sops.add(prediction.sops or 0.0)
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
        # One deadline for all: a stop ends well inside Docker's 10 s even while cameras
        # reconnect (a live read or a backoff can block; the threads are daemons).
        deadline = time.monotonic() + 3.0
        for capture in self.captures:
            capture.join(timeout=max(0.0, deadline - time.monotonic()))
        self.sink.close()
        stats = self.stats
        stats.dropped = sum(c.dropped for c in self.captures)
        stats.unreadable = sum(s.unreadable for s in self.sources)
        stats.reconnects = sum(s.reconnects for s in self.sources)
        errors = [c.error for c in self.captures if c.error]
        if errors and not stats.interrupted:
            stats.error = errors[0]
