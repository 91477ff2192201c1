"""The streaming loop: sources -> preprocess -> infer -> overlay -> sinks, with statistics.

``Stream`` adds what a live camera needs: capture on its own thread with a latest-frame
policy (stale frames are dropped and counted), several sources micro-batched into one
inference (a stalled or reconnecting camera never holds the others back), FPS / latency
percentiles / per-stage times in bounded memory, reconnection, and a clean end on Ctrl-C or
end of input. A source lost for good ends alone: the others go on until every source has
ended or is lost, and the run reports the loss as its error.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from ..errors import I2EError
from .classify import Classifier
from .frames import Source
from .options import StreamOptions
from .overlay import annotate
from .sinks import Sink
from .stats import Ring, SourceStats, StreamStats


def _activity(prediction) -> str:
    return f" | rate {prediction.firing_rate:.3f}, {prediction.sops / 1e6:.0f} M SOPs"


_END = object()


class _Capture(threading.Thread):
    """Reads and preprocesses one source on its own thread, in parallel with inference, into
    a queue of ``queue_size`` items ``(frame, model input, preprocess ms)``. Live sources keep
    only the newest frames (the oldest is dropped and counted); recordings wait for a free
    slot before decoding, so every frame is processed and none ages in the queue."""

    def __init__(
        self,
        counts: SourceStats,
        index: int,
        prepare,
        queue_size: int,
        latest: bool,
        ready: threading.Condition,
    ):
        super().__init__(name=f"capture-{index}", daemon=True)
        self.source, self.counts, self.index = counts.source, counts, index
        self.prepare, self.latest, self.ready = prepare, latest, ready
        self.queue: queue.Queue = queue.Queue()  # bounded by the slots; +1 for the end marker
        self.slots = threading.Semaphore(queue_size)
        self.stop = threading.Event()
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
                self._put((frame, model_input, prepared_ms))
            if not self.stop.is_set() and self.source.state.status != "lost":
                self.source.state.status = "ended"
        except I2EError as exc:
            self.error = str(exc)
        except Exception as exc:  # a decoder failing mid-stream must not kill the loop silently
            self.error = f"source {self.source.uri} failed: {type(exc).__name__}: {exc}"
        finally:
            if self.error:
                self.source.state.status, self.source.state.error = "lost", self.error
            self.source.close()  # here, not from the main thread, which may still be reading
            self._put(_END)

    def _put(self, item) -> None:
        self.queue.put(item)
        with self.ready:
            self.ready.notify()

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
                self.counts.dropped += 1
                return
            except queue.Empty:
                if self.slots.acquire(timeout=0.01):
                    return

    def take(self):
        """The next item if one is ready (_END at the end), else None."""
        try:
            item = self.queue.get_nowait()
        except queue.Empty:
            return None
        if item is not _END:
            self.slots.release()
        return item


class Stream:
    """Run ``classifier`` over ``sources`` into ``sink`` until the sources end (or are lost),
    ``options.max_frames`` are done, the sink's window is closed, :meth:`request_stop` (a
    signal handler's way out) or Ctrl-C. The stream closes sources and sink. ``log`` gets a
    line when a source is lost while others go on.

    ``options.latest`` (default: for live sources) selects the latest-frame policy;
    ``options.queue_size`` bounds each source's queue (1-2 keeps latency low). Keyword
    ``changes`` override single options."""

    def __init__(
        self,
        classifier: Classifier,
        sources: list[Source],
        sink: Sink,
        options: StreamOptions | None = None,
        *,
        log: Callable[[str], None] | None = None,
        **changes,
    ):
        if not sources:
            raise I2EError("no source given")
        self.options = (options or StreamOptions()).replace(**changes).check()
        latest = self.options.latest
        self.classifier, self.sources, self.sink = classifier, sources, sink
        self.log = log or (lambda _line: None)
        self.max_frames = self.options.max_frames
        self.stats = StreamStats([s.uri for s in sources], classifier.name)
        self.stats.per_source = [SourceStats(s) for s in sources]
        self.ready = threading.Condition()  # a capture queued something
        self.captures = [
            _Capture(
                counts,
                i,
                classifier.prepare,
                self.options.queue_size,
                counts.source.live if latest is None else latest,
                self.ready,
            )
            for i, counts in enumerate(self.stats.per_source)
        ]
        # How long a batch waits for the other live sources once one frame is in: a frame
        # period of the fastest (cf. DeepStream's batched-push-timeout).
        live = [s.fps for s in sources if s.live]
        self.batch_wait_s = min(1.0, max(0.001, 1 / max(live))) if live else 0.0
        if classifier.activity is not None:
            self.stats.firing_rate, self.stats.sops = Ring(), Ring()
        self.show_activity = self.options.show_activity and classifier.activity is not None
        self.stopping = threading.Event()
        sink.attach(self.stats, sources)

    def request_stop(self) -> None:
        """End the run as Ctrl-C does (safe from a signal handler or another thread)."""
        self.stopping.set()

    def _next_batch(self, active: list[_Capture]) -> list[tuple[_Capture, object]]:
        """At most one item per active source, in source order: wait for a first one, then
        up to ``batch_wait_s`` for the other live sources (a stalled or reconnecting camera
        never holds the others back); recordings are waited for, so that every frame is
        processed, in step. Empty when stopping."""
        taken: dict[_Capture, object] = {}
        deadline: float | None = None
        with self.ready:
            while not self.stopping.is_set():
                for capture in active:
                    if capture not in taken and (item := capture.take()) is not None:
                        taken[capture] = item
                now = time.perf_counter()
                if taken and deadline is None:
                    deadline = now + self.batch_wait_s
                waiting = [c for c in active if c not in taken]
                if (
                    not waiting
                    or _END in taken.values()  # update the active list at once
                    or (
                        deadline is not None
                        and now >= deadline
                        and all(c.source.live for c in waiting)
                    )
                ):
                    break
                self.ready.wait(0.1 if deadline is None else min(0.1, max(deadline - now, 0.001)))
        return [(c, taken[c]) for c in active if c in taken]

    def _lost_line(self, capture: _Capture, active: list[_Capture]) -> None:
        if capture.error and active:
            self.log(f"{capture.error}; {len(active)} other source(s) go on")

    def _status(self, rate: float, frame_source: int, now: float) -> str:
        """The overlay's status line, with any other source that is not live."""
        status = (
            f"{rate:.1f} FPS | {self.stats.latency.percentile(50):.0f} ms | {self.classifier.name}"
        )
        for i, source in enumerate(self.sources):
            if i != frame_source and source.state.status != "live":
                status += f" | source {i} {source.state.describe(now)}"
        return status

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
                for capture, item in self._next_batch(active):
                    if item is _END:
                        active.remove(capture)
                        self._lost_line(capture, active)
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
                    now = time.time()
                    canvases = [
                        annotate(
                            f,
                            p,
                            self._status(rate, f.source, now)
                            + (_activity(p) if self.show_activity else ""),
                        )
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
                self._tally()
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

    def _tally(self) -> None:
        """The run's totals from the sources' counts (during the run, for a live view)."""
        stats = self.stats
        stats.dropped = sum(entry.dropped for entry in stats.per_source)
        stats.unreadable = sum(s.unreadable for s in self.sources)
        stats.reconnects = sum(s.reconnects for s in self.sources)

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
        self._tally()
        errors = [c.error for c in self.captures if c.error]
        if errors and not stats.interrupted:
            stats.error = errors[0]
