"""What flows through the stream, shared by sources, overlay, sinks and the loop: a
``Frame``, the ``Source`` base class that yields frames, and the ``Prediction`` made for one."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import cv2
import numpy as np

from ..card import ModelCard
from ..errors import I2EError

MAX_BACKOFF_S = 10.0  # the longest wait between reconnect attempts
Opened = TypeVar("Opened")


@dataclass
class Frame:
    """One captured frame. ``image`` is RGB uint8 ``[H, W, 3]``; event sources also carry
    ``events``, the model input ``[T, 2, imgsz, imgsz]`` (0/1), rendered into ``image``, and
    ``span_us``, the window's event time ``[start, end)`` in sensor microseconds."""

    image: np.ndarray
    index: int
    timestamp: float = 0.0  # time.perf_counter() when the frame became available
    capture_ms: float = 0.0  # time spent reading and decoding it
    captured_at: float = 0.0  # time.time() at capture: wall clock, for capture-to-result latency
    source: int = 0
    events: np.ndarray | None = None
    span_us: tuple[int, int] | None = None


def parse_resolution(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'640x480' -> (640, 480)."""
    if text is None or isinstance(text, tuple):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise I2EError(f"resolution must be WIDTHxHEIGHT, e.g. 640x480, got {text!r}")
    return int(match.group(1)), int(match.group(2))


@dataclass
class SourceState:
    """What a source is doing now, for the stats, records, overlay and live page.
    ``status``: ``live``, ``reconnecting`` (``attempt`` k of ``attempts``, -1 = forever),
    ``lost`` (gave up: ``error`` says why) or ``ended`` (a recording's end)."""

    status: str = "live"
    attempt: int = 0
    attempts: int = 0
    last_frame_at: float | None = None  # time.time() of its newest frame
    error: str | None = None

    def to_dict(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        age = None if self.last_frame_at is None else round(now - self.last_frame_at, 3)
        return {
            "status": self.status,
            "attempt": self.attempt,
            "attempts": self.attempts,
            "last_frame_age_s": age,
            "error": self.error,
        }

    def describe(self, now: float | None = None) -> str:
        """One short phrase: 'reconnecting (attempt 3 of 5), last frame 4.2 s old'."""
        now = time.time() if now is None else now
        text = self.status
        if self.status == "reconnecting":
            of = f" of {self.attempts}" if self.attempts >= 0 else ""
            text += f" (attempt {self.attempt}{of})"
        elif self.status == "lost" and self.error:
            text += f": {self.error}"
        if self.status != "ended" and self.last_frame_at is not None:
            text += f", last frame {now - self.last_frame_at:.1f} s old"
        return text


class Source:
    """Iterable of ``Frame``s. Options common to all sources:

    - ``resolution`` (w, h): frames are resized to it (cameras are also asked for it);
    - ``fps``: cameras are asked for it; recordings are paced to it, like a live camera;
    - ``loop``: recordings restart at their end;
    - ``stride``: keep every stride-th frame.
    """

    live = False  # frames arrive in real time: the stream drops stale ones instead of waiting
    nominal_fps = 25.0

    def __init__(
        self,
        uri: str,
        *,
        resolution=None,
        fps: float | None = None,
        loop: bool = False,
        stride: int = 1,
    ):
        if stride < 1:
            raise I2EError(f"stride must be >= 1, got {stride}")
        if fps is not None and not fps > 0:
            raise I2EError(f"fps must be positive, got {fps}")
        self.uri = uri
        self.resolution = parse_resolution(resolution)
        self.pace = fps
        self.loop = loop
        self.stride = stride
        self.unreadable = 0
        self.reconnects = 0
        self.state = SourceState()
        if fps is not None:
            self.live = True

    @property
    def fps(self) -> float:
        """Frames per second this source delivers (after stride)."""
        return self.pace or self.nominal_fps / self.stride

    def _read(self) -> Iterator[Frame | None]:
        """One pass over every stride-th frame; None for a frame that cannot be decoded."""
        raise NotImplementedError

    def _fit(self, image: np.ndarray) -> np.ndarray:
        if self.resolution and image.shape[1::-1] != self.resolution:
            return cv2.resize(image, self.resolution, interpolation=cv2.INTER_AREA)
        return image

    def __iter__(self) -> Iterator[Frame]:
        start = time.perf_counter()
        emitted = 0
        while True:
            produced = False
            frames = self._read()
            while True:
                began = time.perf_counter()
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                if frame is None:
                    self.unreadable += 1
                    continue
                frame.image = self._fit(frame.image)
                produced = True
                done = time.perf_counter()
                if self.pace:
                    delay = start + emitted / self.pace - done
                    if delay > 0:
                        time.sleep(delay)
                emitted += 1
                frame.timestamp, frame.capture_ms = time.perf_counter(), (done - began) * 1e3
                frame.captured_at = self._delivered()
                yield frame
            if not (self.loop and produced):
                return

    def _delivered(self) -> float:
        """A good frame is in: the source is live again and its backoff starts over.
        Returns the wall-clock capture time."""
        state = self.state
        state.status, state.attempt, state.error = "live", 0, None
        state.last_frame_at = time.time()
        return state.last_frame_at

    def _retry(
        self,
        open_: Callable[[], Opened | None],
        attempts: int,
        backoff_s: float,
        stop: threading.Event,
    ) -> Opened | None:
        """Reopen with ``open_`` (None or I2EError: not yet) after waits doubling from
        ``backoff_s`` up to MAX_BACKOFF_S, ``attempts`` times (-1: forever). The attempt count
        runs on until a good frame resets it, so a stream that reopens but sends nothing
        still runs out of attempts. None when stopped or out of attempts (state: lost)."""
        state = self.state
        state.attempts = attempts
        while attempts < 0 or state.attempt < attempts:
            state.status = "reconnecting"
            state.attempt += 1
            if stop.wait(min(backoff_s * 2 ** min(state.attempt - 1, 30), MAX_BACKOFF_S)):
                return None
            try:
                opened = open_()
            except I2EError as exc:
                state.error = str(exc)
                continue
            if opened is not None:
                self.reconnects += 1
                return opened
        state.status = "lost"
        return None

    def interrupt(self) -> None:
        """Ask a read waiting in another thread to return soon (the stream is stopping)."""

    def close(self) -> None:
        """Release the device or file."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


@dataclass
class Prediction:
    """Top-k classes of one frame, and what the network saw (for the event view)."""

    indices: np.ndarray
    labels: list[str]
    probs: np.ndarray
    logits: np.ndarray
    model_input: np.ndarray  # uint8 [S, S, 3] crop, or events [T, 2, S, S]
    card: ModelCard
    # Counted from the backend's spikes when the classifier was asked to (``activity``):
    firing_rate: float | None = None  # over all LIF neurons and time steps
    sops: float | None = None  # synaptic operations of this prediction

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
