"""Where predictions go, named by URI: ``display`` (OpenCV window), a video file
(``out.mp4``, ``out.webm``: annotated frames with the event view), a ``.jsonl`` file of
predictions, ``none``.

A ``.jsonl`` file grows at its own path by whole lines as predictions come (``tail -f``
works; a run killed at any moment leaves whole lines). A video is written to a temporary
name beside the target and renamed when complete, since a half-written video does not play.
With a :class:`~.service.Rotation` both are closed as timestamped segments as they go.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ..errors import I2EError, warn
from ..fileio import native_stderr_muted, temp_beside
from .overlay import annotate
from .service import STDERR_LOCK, Rotation

if TYPE_CHECKING:
    from .frames import Frame, Prediction, Source, SourceState
    from .stats import StreamStats

# MP4-family files get H.264 ('avc1', what browsers play) where OpenCV's FFmpeg can encode
# it, else MPEG-4 Part 2 ('mp4v'); .webm is VP8, which every browser plays.
VIDEO_CODECS = {
    ".mp4": "avc1",
    ".m4v": "avc1",
    ".mov": "avc1",
    ".mkv": "mp4v",
    ".avi": "MJPG",
    ".webm": "VP80",
}


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Mute stderr while OpenCV opens a writer: it prints codec-tag notes ('tag VP80 is not
    supported ... webm'); under the lock that the JSON log's writes wait on."""
    with STDERR_LOCK, native_stderr_muted():
        yield


def _open_writer(path: Path, fourcc: str, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    with _quiet_stderr():
        return cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), fps, size)


@functools.lru_cache(maxsize=1)
def h264_available() -> bool:
    """Whether this OpenCV can write H.264 into .mp4 (opencv-python-headless from PyPI
    cannot: its FFmpeg has no software H.264 encoder)."""
    with tempfile.TemporaryDirectory() as folder:
        writer = _open_writer(Path(folder, "probe.mp4"), "avc1", 10.0, (64, 64))
        available = writer.isOpened()
        writer.release()
    return available


def video_codec(suffix: str) -> str:
    """The FourCC a video output of ``suffix`` is written with here."""
    fourcc = VIDEO_CODECS[suffix]
    if fourcc == "avc1" and not h264_available():
        warn(
            f"this OpenCV has no H.264 encoder: {suffix} is written as MPEG-4 Part 2 (mp4v), "
            "which browsers do not play; write .webm (VP8) for a browser"
        )
        return "mp4v"
    return fourcc


class Sink:
    """``render(frame, prediction)`` one result; ``close()`` when done. ``needs_canvas`` says
    whether it shows the annotated picture (the stream then draws it once for all sinks)."""

    needs_canvas = False
    stopped = False  # set when the user closes the window: the stream ends

    def render(self, frame: Frame, prediction: Prediction, status: str | None = None) -> None:
        canvas = annotate(frame, prediction, status) if self.needs_canvas else None
        self.write(frame, prediction, canvas)

    def write(self, frame: Frame, prediction: Prediction, canvas: np.ndarray | None) -> None:
        raise NotImplementedError

    def attach(self, stats: StreamStats, sources: list[Source]) -> None:
        """Called once by the stream before it starts: a sink that reports live (the web
        view) reads the running ``stats`` and each source's ``state`` from here on."""

    def close(self) -> None:
        """Flush and publish the output."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullSink(Sink):
    def write(self, frame, prediction, canvas) -> None:
        pass


def numbered(path: Path, source: int) -> Path:
    """Output path for source ``source`` of a multi-source stream: out.mp4, out.1.mp4, ..."""
    return path if source == 0 else path.with_name(f"{path.stem}.{source}{path.suffix}")


class VideoSink(Sink):
    """Annotated frames to a video file (one file per source: out.mp4, out.1.mp4, ...). Each
    file (and each rotated segment) is written under a hidden name and renamed when
    released: a video is playable only once complete."""

    needs_canvas = True

    def __init__(
        self, path: str | os.PathLike, fps: float = 25.0, rotation: Rotation | None = None
    ):
        self.path = Path(path)
        if self.path.suffix.lower() not in VIDEO_CODECS:
            raise I2EError(f"cannot write video {self.path}: use one of {', '.join(VIDEO_CODECS)}")
        self.fourcc = video_codec(self.path.suffix.lower())
        self.fps = fps
        self.rotation = rotation
        # per source: writer, its temp file, frame size, monotonic time it was opened
        self.writers: dict[int, tuple[cv2.VideoWriter, Path, tuple[int, int], float]] = {}
        self.frames: dict[int, int] = {}

    def write(self, frame, prediction, canvas) -> None:
        source = frame.source
        if source in self.writers and self.rotation is not None:
            _, tmp, _, opened_at = self.writers[source]
            if self.rotation.due(tmp.stat().st_size, 0, opened_at):
                target = numbered(self.path, source)
                self._release(source, self.rotation.segment_path(target))
                self.rotation.prune(target)
        if source not in self.writers:
            self._open(source, (canvas.shape[1], canvas.shape[0]))
        writer, _, size, _ = self.writers[source]
        if (canvas.shape[1], canvas.shape[0]) != size:  # a source changed resolution
            canvas = cv2.resize(canvas, size, interpolation=cv2.INTER_AREA)
        writer.write(canvas)
        self.frames[source] += 1

    def _open(self, source: int, size: tuple[int, int]) -> None:
        target = numbered(self.path, source)
        if source not in self.frames:
            self.frames[source] = 0
            if self.rotation is not None and target.exists():
                # A restarted service keeps the previous run's video, as a segment.
                os.replace(target, self.rotation.segment_path(target))
                self.rotation.prune(target)
        tmp = temp_beside(self.path, f".tmp{self.path.suffix}")
        writer = _open_writer(tmp, self.fourcc, self.fps, size)
        if not writer.isOpened():
            tmp.unlink(missing_ok=True)
            raise I2EError(
                f"cannot write video {self.path}: OpenCV has no {self.fourcc} "
                "encoder here; try an .avi output"
            )
        self.writers[source] = (writer, tmp, size, time.monotonic())

    def _release(self, source: int, to: Path) -> None:
        writer, tmp, _, _ = self.writers.pop(source)
        writer.release()
        os.replace(tmp, to)

    def close(self) -> None:
        for source in list(self.writers):
            self._release(source, numbered(self.path, source))


class LineFile:
    """A text file of whole lines at its own path, growing as lines come: each line goes
    out in one ``write()`` on an O_APPEND descriptor, so a reader (``tail -f``), or a run
    killed at any moment, sees only whole lines. With a ``rotation`` it is closed as a
    timestamped segment and begun anew."""

    def __init__(self, path: Path, rotation: Rotation | None = None):
        self.path, self.rotation = path, rotation
        if rotation is not None and path.is_file() and path.stat().st_size > 0:
            # A restarted service keeps the previous run's records, as a segment.
            os.replace(path, rotation.segment_path(path))
            rotation.prune(path)
        self._begin()

    def _begin(self) -> None:
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
            self.fd = os.open(self.path, flags, 0o666)  # less the umask, as open() does
        except OSError as exc:
            raise I2EError(f"cannot write {self.path}: {exc.strerror}") from None
        self.size = 0
        self.opened_at = time.monotonic()

    def write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        if self.rotation is not None and self.rotation.due(self.size, len(data), self.opened_at):
            os.close(self.fd)
            os.replace(self.path, self.rotation.segment_path(self.path))
            self.rotation.prune(self.path)
            self._begin()
        self.size += len(data)
        try:
            while data:  # a regular file takes it in one write unless the disk is full
                data = data[os.write(self.fd, data) :]
        except OSError as exc:
            raise I2EError(f"cannot write {self.path}: {exc.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def prediction_record(
    frame: Frame, prediction: Prediction, states: list[SourceState] | None = None
) -> dict:
    """One prediction as a JSON-ready dict: source, frame index, top-k classes with
    probabilities, the frame's wall-clock ``captured_at`` and ``latency_ms`` from capture to
    now; for event windows their event time span ``window_us`` [start, end); the activity if
    counted; and, given every source's state (``states``, in source order), ``degraded``:
    the other sources that are not live."""
    now = time.time()
    record: dict = {
        "source": frame.source,
        "frame": frame.index,
        "top": [
            {"class": int(i), "label": label, "prob": round(float(p), 6)}
            for i, label, p in zip(prediction.indices, prediction.labels, prediction.probs)
        ],
    }
    if frame.captured_at:
        record["captured_at"] = round(frame.captured_at, 6)
        record["latency_ms"] = round((now - frame.captured_at) * 1e3, 3)
    if frame.span_us is not None:
        record["window_us"] = list(frame.span_us)
    if prediction.firing_rate is not None:
        record["firing_rate"] = round(prediction.firing_rate, 6)
        record["sops"] = round(prediction.sops or 0)
    degraded = [
        {"source": i, **state.to_dict(now)}
        for i, state in enumerate(states or [])
        if i != frame.source and state.status != "live"
    ]
    if degraded:
        record["degraded"] = degraded
    return record


class JsonlSink(Sink):
    """One JSON object per frame (see ``prediction_record``)."""

    def __init__(self, path: str | os.PathLike, rotation: Rotation | None = None):
        self.path = Path(path)
        self.rotation = rotation
        self.file: LineFile | None = None
        self.sources: list[Source] = []

    def _open(self) -> LineFile:
        if self.file is None:
            self.file = LineFile(self.path, self.rotation)
        return self.file

    def attach(self, stats, sources) -> None:
        self.sources = sources

    def write(self, frame, prediction, canvas) -> None:
        file = self._open()
        record = prediction_record(frame, prediction, [s.state for s in self.sources])
        file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._open().close()  # no frames: an empty file, the truthful result


def screen_available() -> bool:
    """A screen to draw on: $DISPLAY / $WAYLAND_DISPLAY on Linux, always on macOS/Windows."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


class DisplaySink(Sink):
    """An OpenCV window per source; 'q' or Esc (or closing the window) ends the stream."""

    needs_canvas = True

    def __init__(self, title: str = "i2e-deploy"):
        if not screen_available():
            raise I2EError(
                "no screen to display on ($DISPLAY is not set); write a video "
                "instead: --output out.mp4"
            )
        self.title = title
        try:
            cv2.namedWindow(self.title, cv2.WINDOW_NORMAL)
        except cv2.error:
            raise I2EError(
                "this OpenCV build has no GUI (opencv-python-headless); "
                "`pip install opencv-python` to display, or use --output out.mp4"
            ) from None
        self.windows = {0: self.title}

    def write(self, frame, prediction, canvas) -> None:
        name = self.windows.setdefault(frame.source, f"{self.title} [{frame.source}]")
        cv2.imshow(name, canvas)
        key = cv2.waitKey(1) & 0xFF
        closed = cv2.getWindowProperty(name, cv2.WND_PROP_VISIBLE) < 1
        if key in (ord("q"), 27) or closed:
            self.stopped = True

    def close(self) -> None:
        cv2.destroyAllWindows()


class MultiSink(Sink):
    """Several outputs at once (e.g. a video and a JSONL file)."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks
        self.needs_canvas = any(s.needs_canvas for s in sinks)

    def attach(self, stats, sources) -> None:
        for sink in self.sinks:
            sink.attach(stats, sources)

    def write(self, frame, prediction, canvas) -> None:
        for sink in self.sinks:
            sink.write(frame, prediction, canvas)
        self.stopped = any(s.stopped for s in self.sinks)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
