"""Where predictions go, named by URI: ``display`` (OpenCV window), a video file
(``out.mp4``: annotated frames with the event view), a ``.jsonl`` file of predictions, ``none``.

Files are written to a temporary name beside the target and renamed on ``close()``, so a
reader never sees a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import cv2
import numpy as np

from ..errors import I2EError
from ..fileio import temp_beside
from .overlay import annotate

if TYPE_CHECKING:
    from .frames import Frame, Prediction, Source, SourceState
    from .stats import StreamStats

VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}


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
    """Annotated frames to a video file (one file per source: out.mp4, out.1.mp4, ...)."""

    needs_canvas = True

    def __init__(self, path: str | os.PathLike, fps: float = 25.0):
        self.path = Path(path)
        if self.path.suffix.lower() not in VIDEO_CODECS:
            raise I2EError(f"cannot write video {self.path}: use one of {', '.join(VIDEO_CODECS)}")
        self.fourcc = VIDEO_CODECS[self.path.suffix.lower()]
        self.fps = fps
        self.writers: dict[int, tuple[cv2.VideoWriter, Path, tuple[int, int]]] = {}
        self.frames: dict[int, int] = {}

    def write(self, frame, prediction, canvas) -> None:
        if frame.source not in self.writers:
            size = (canvas.shape[1], canvas.shape[0])
            tmp = temp_beside(self.path, f".tmp{self.path.suffix}")
            writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter.fourcc(*self.fourcc), self.fps, size)
            if not writer.isOpened():
                tmp.unlink(missing_ok=True)
                raise I2EError(
                    f"cannot write video {self.path}: OpenCV has no {self.fourcc} "
                    "encoder here; try an .avi output"
                )
            self.writers[frame.source] = (writer, tmp, size)
            self.frames[frame.source] = 0
        writer, _, size = self.writers[frame.source]
        if (canvas.shape[1], canvas.shape[0]) != size:  # a source changed resolution
            canvas = cv2.resize(canvas, size, interpolation=cv2.INTER_AREA)
        writer.write(canvas)
        self.frames[frame.source] += 1

    def close(self) -> None:
        for source, (writer, tmp, _) in self.writers.items():
            writer.release()
            os.replace(tmp, numbered(self.path, source))
        self.writers.clear()


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

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.file: TextIO | None = None
        self.sources: list[Source] = []

    def _open(self) -> TextIO:
        if self.file is None:
            self.tmp = temp_beside(self.path, ".tmp.jsonl")
            self.file = open(self.tmp, "w", encoding="utf-8")
        return self.file

    def attach(self, stats, sources) -> None:
        self.sources = sources

    def write(self, frame, prediction, canvas) -> None:
        file = self._open()
        record = prediction_record(frame, prediction, [s.state for s in self.sources])
        file.write(json.dumps(record) + "\n")
        file.flush()  # one small write per frame; the temp file shows progress

    def close(self) -> None:
        file = self._open()  # no frames: publish an empty file, the truthful result
        if not file.closed:
            file.close()
            os.replace(self.tmp, self.path)


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


def open_sink(uri: str, *, fps: float = 25.0, view_fps: float = 10.0) -> Sink:
    """``display``, ``none``, ``*.jsonl``, a video file (``fps`` = the source's), or
    ``http://HOST:PORT``, the live page (:mod:`.live`; ``view_fps`` pictures a second)."""
    text = str(uri).strip()
    if text.startswith("http://"):
        from .live import LiveSink  # here: live.py builds on this module

        return LiveSink(text, view_fps=view_fps)
    if text == "none":
        return NullSink()
    if text == "display":
        return DisplaySink()
    suffix = Path(text).suffix.lower()
    if suffix == ".jsonl":
        return JsonlSink(text)
    if suffix in VIDEO_CODECS:
        return VideoSink(text, fps=fps)
    raise I2EError(
        f"unknown output {text!r}: use display, none, http://HOST:PORT, a .jsonl file or "
        f"a video file ({', '.join(VIDEO_CODECS)})"
    )


def open_sinks(
    uris: list[str], *, fps: float = 25.0, opened: Mapping[str, Sink] | None = None
) -> Sink:
    """One sink for one URI, a MultiSink for several; ``opened``: sinks already opened by URI."""
    opened = opened or {}
    # files are created on first write
    sinks = [opened[uri] if uri in opened else open_sink(uri, fps=fps) for uri in uris]
    return sinks[0] if len(sinks) == 1 else MultiSink(sinks)
