"""Frame sources named by URI: ``open_source(uri) -> Source``, iterate it for ``Frame``s.

URIs: ``0`` or ``/dev/video0`` (camera), a video file, ``rtsp://``/``http(s)://`` streams,
an image folder or glob, ``demo`` (real photos shipped with scikit-image, panned and jittered
like a handheld camera), and event-camera recordings (``.aedat4``, Prophesee ``.raw``/EVT3,
N-MNIST ``.bin``) for event-input models.
"""
from __future__ import annotations

import glob
import itertools
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from ..card import ModelCard
from ..errors import I2EError
from .preprocess import IMAGE_SUFFIXES, list_images

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv", ".gif"}
EVENT_SUFFIXES = {".aedat4", ".raw", ".evt3", ".bin"}
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


@dataclass
class Frame:
    """One captured frame. ``image`` is RGB uint8 ``[H, W, 3]``; event sources also carry
    ``events``, the model input ``[T, 2, imgsz, imgsz]`` (0/1), and render ``image`` from it."""
    image: np.ndarray
    index: int
    timestamp: float  # time.perf_counter() when the frame became available
    capture_ms: float = 0.0  # time spent reading and decoding it
    source: int = 0
    events: np.ndarray | None = None


def parse_resolution(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'640x480' -> (640, 480)."""
    if text is None or isinstance(text, tuple):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise I2EError(f"resolution must be WIDTHxHEIGHT, e.g. 640x480, got {text!r}")
    return int(match.group(1)), int(match.group(2))


class Source:
    """Iterable of ``Frame``s. Options common to all sources:

    - ``resolution`` (w, h): frames are resized to it (cameras are also asked for it);
    - ``fps``: cameras are asked for it; recordings are paced to it, like a live camera;
    - ``loop``: recordings restart at their end;
    - ``stride``: keep every stride-th frame.
    """

    live = False  # frames arrive in real time: the stream drops stale ones instead of waiting
    nominal_fps = 25.0

    def __init__(self, uri: str, *, resolution=None, fps: float | None = None,
                 loop: bool = False, stride: int = 1):
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
        if fps is not None:
            self.live = True

    @property
    def fps(self) -> float:
        """Frames per second this source delivers (after stride)."""
        return self.pace or self.nominal_fps / self.stride

    def _read(self) -> Iterator[tuple[int, np.ndarray | None, np.ndarray | None]]:
        """One pass over every stride-th frame: ``(index, RGB image or None if unreadable,
        model-input events or None)``."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Frame]:
        start = time.perf_counter()
        emitted = 0
        while True:
            produced = False
            items = self._read()
            while True:
                began = time.perf_counter()
                item = next(items, None)
                if item is None:
                    break
                index, image, events = item
                if image is None:
                    self.unreadable += 1
                    continue
                if self.resolution and image.shape[1::-1] != self.resolution:
                    image = cv2.resize(image, self.resolution, interpolation=cv2.INTER_AREA)
                produced = True
                done = time.perf_counter()
                if self.pace:
                    delay = start + emitted / self.pace - done
                    if delay > 0:
                        time.sleep(delay)
                emitted += 1
                yield Frame(image, index, time.perf_counter(), (done - began) * 1e3,
                            events=events)
            if not (self.loop and produced):
                return

    def close(self) -> None:
        """Release the device or file."""

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def _quiet_opencv() -> None:
    """Failures reach the user as one I2EError; OpenCV's and FFmpeg's stderr lines would only
    repeat them (the env var is read when FFmpeg opens its first input; set it to override)."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def _bgr_to_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class VideoFileSource(Source):
    """A video file decoded by OpenCV (FFmpeg)."""

    def __init__(self, path: str, **options):
        super().__init__(path, **options)
        _quiet_opencv()
        capture = cv2.VideoCapture(path)
        if not capture.isOpened():
            raise I2EError(f"cannot decode video {path}: not a video OpenCV/FFmpeg can read")
        self.nominal_fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        self.frame_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        capture.release()

    def _read(self):
        capture = cv2.VideoCapture(self.uri)
        try:
            index = 0
            while True:
                if index % self.stride:
                    if not capture.grab():
                        return
                    index += 1
                    continue
                ok, image = capture.read()
                if not ok:
                    return
                yield index, _bgr_to_rgb(image), None
                index += 1
        finally:
            capture.release()


class LiveSource(Source):
    """A camera or network stream. If it stops delivering, it is reopened with exponential
    backoff (``reconnect_attempts`` tries from ``backoff_s``), then a clear error is raised."""

    live = True

    def __init__(self, uri: str, target, *, reconnect_attempts: int = 5, backoff_s: float = 0.5,
                 timeout_s: float = 5.0, **options):
        super().__init__(uri, **options)
        self.target = target
        self.reconnect_attempts = reconnect_attempts
        self.backoff_s = backoff_s
        self.timeout_ms = int(timeout_s * 1000)
        _quiet_opencv()
        self.capture = self._open()
        if self.capture is None:
            raise I2EError(self._not_found())
        self.nominal_fps = self.capture.get(cv2.CAP_PROP_FPS) or 30.0
        if not 1 <= self.nominal_fps <= 240:
            self.nominal_fps = 30.0
        # A file served over HTTP has a frame count and a real end; a live stream has neither.
        self.finite = not self.is_camera and self.capture.get(cv2.CAP_PROP_FRAME_COUNT) > 0

    @property
    def is_camera(self) -> bool:
        return isinstance(self.target, int)

    def _not_found(self) -> str:
        if self.is_camera:
            return (f"camera {self.uri} not found or busy (is it connected? see `ls /dev/video*`); "
                    "try another index, a video file, or --source demo")
        return (f"cannot open stream {self.uri}: connection refused, timed out or not a video "
                "stream; check the URL and that the server is up")

    def _open(self):
        if self.is_camera:
            capture = cv2.VideoCapture(self.target)
            if capture.isOpened():
                if self.resolution:
                    capture.set(cv2.CAP_PROP_FRAME_WIDTH, self.resolution[0])
                    capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self.resolution[1])
                if self.pace:
                    capture.set(cv2.CAP_PROP_FPS, self.pace)
        else:
            capture = cv2.VideoCapture(self.target, cv2.CAP_FFMPEG,
                                       [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self.timeout_ms,
                                        cv2.CAP_PROP_READ_TIMEOUT_MSEC, self.timeout_ms])
        if not capture.isOpened():
            capture.release()
            return None
        return capture

    def _reconnect(self) -> None:
        self.capture.release()
        delay = self.backoff_s
        for _ in range(self.reconnect_attempts):
            time.sleep(delay)
            capture = self._open()
            if capture is not None:
                self.capture = capture
                self.reconnects += 1
                return
            delay *= 2
        self.capture = None
        what = "camera" if self.is_camera else "stream"
        raise I2EError(f"{what} {self.uri} was lost and did not come back after "
                       f"{self.reconnect_attempts} reconnect attempts")

    @property
    def fps(self) -> float:
        return self.nominal_fps / self.stride  # a camera sets its own pace

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        while True:
            if self.capture is None:
                return
            began = time.perf_counter()
            ok = self.capture.grab()
            if not ok:
                if self.finite:
                    return
                self._reconnect()
                continue
            index += 1
            if (index - 1) % self.stride:
                continue
            ok, image = self.capture.retrieve()
            if not ok or image is None:
                self.unreadable += 1
                continue
            image = _bgr_to_rgb(image)
            if self.resolution and image.shape[1::-1] != self.resolution:
                image = cv2.resize(image, self.resolution, interpolation=cv2.INTER_AREA)
            now = time.perf_counter()
            yield Frame(image, index - 1, now, (now - began) * 1e3)

    def close(self) -> None:
        if self.capture is not None:
            self.capture.release()
            self.capture = None


class ImageFilesSource(Source):
    """A folder of images (sorted by name, recursively) or a glob pattern."""

    nominal_fps = 10.0

    def __init__(self, uri: str, paths: list[Path], **options):
        super().__init__(uri, **options)
        self.paths = paths
        if not paths:
            raise I2EError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {uri}")

    def _read(self):
        for index in range(0, len(self.paths), self.stride):
            image = cv2.imread(str(self.paths[index]), cv2.IMREAD_COLOR)
            yield index, None if image is None else _bgr_to_rgb(image), None


DEMO_IMAGES = ("chelsea", "rocket", "coffee", "astronaut")


class DemoSource(Source):
    """A few seconds of real photos (scikit-image's bundled samples: a cat, a rocket launch,
    a coffee cup, an astronaut), each panned across and shaken like a handheld camera.
    Deterministic, offline, no camera needed."""

    nominal_fps = 15.0

    def __init__(self, uri: str = "demo", *, seconds_per_image: float = 1.5,
                 size: tuple[int, int] = (320, 240), seed: int = 0, **options):
        super().__init__(uri, **options)
        import skimage.data

        self.photos = [getattr(skimage.data, name)() for name in DEMO_IMAGES]
        self.size = self.resolution or size
        self.frames_per_image = max(1, round(seconds_per_image * self.nominal_fps))
        self.seed = seed

    def __len__(self) -> int:
        return len(range(0, len(self.photos) * self.frames_per_image, self.stride))

    def _read(self):
        rng = np.random.default_rng(self.seed)
        width, height = self.size
        n = self.frames_per_image
        for photo_index, photo in enumerate(self.photos):
            shake = _handheld_shake(rng, n)
            ph, pw = photo.shape[:2]
            # The view covers 70% of the photo; it pans from one side to the other.
            scale = 0.7 * min(pw / width, ph / height)
            span_x = (pw - width * scale) / 2
            span_y = (ph - height * scale) / 2
            for step in range(n):
                index = photo_index * n + step
                if index % self.stride:
                    continue
                progress = step / max(1, n - 1) * 2 - 1  # -1 .. 1
                direction = 1 if photo_index % 2 == 0 else -1
                dx, dy, angle, zoom = shake[step]
                cx = pw / 2 + direction * progress * span_x * 0.8 + dx
                cy = ph / 2 + 0.3 * span_y * math.sin(math.pi * progress) + dy
                s = scale * zoom
                cos, sin = s * math.cos(angle), s * math.sin(angle)
                # Output pixel (u, v) samples the photo at centre + R(angle) * s * (u, v) offset.
                matrix = np.array([[cos, -sin, cx - cos * width / 2 + sin * height / 2],
                                   [sin, cos, cy - sin * width / 2 - cos * height / 2]])
                view = cv2.warpAffine(photo, matrix, (width, height),
                                      flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                      borderMode=cv2.BORDER_REFLECT)
                yield index, view, None


def _handheld_shake(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, 4] smooth random (dx px, dy px, angle rad, zoom): low-passed noise, like a hand."""
    noise = rng.normal(size=(n + 8, 4))
    kernel = np.hanning(9)
    smooth = np.stack([np.convolve(noise[:, k], kernel / kernel.sum(), "valid") for k in range(4)],
                      axis=1)[:n]
    smooth /= smooth.std(axis=0) + 1e-9
    return smooth * np.array([6.0, 6.0, math.radians(1.5), 0.02]) + np.array([0, 0, 0, 1.0])


# --- event-camera recordings ------------------------------------------------------------------

def _read_aedat4(path: str):
    """Chunks of (t us, x, y, p) and the sensor size, from an AEDAT4 file (``aedat``)."""
    try:
        import aedat
    except ImportError:
        raise I2EError("reading .aedat4 needs the 'aedat' package: "
                       "pip install 'i2e-deploy[events]'") from None
    try:
        decoder = aedat.Decoder(path)
    except Exception as exc:
        raise I2EError(f"{path}: not a readable AEDAT4 file ({exc})") from None
    streams = [s for s in decoder.id_to_stream().values() if s.get("type") == "events"]
    if not streams:
        raise I2EError(f"{path}: AEDAT4 file has no event stream")
    size = (streams[0]["width"], streams[0]["height"])

    def chunks():
        for packet in decoder:
            if "events" in packet:
                e = packet["events"]
                yield e["t"].astype(np.int64), e["x"], e["y"], e["on"].astype(np.uint8)
    return chunks(), size


def _read_evt3(path: str):
    """Chunks of (t us, x, y, p) and the sensor size from a Prophesee EVT3 file
    (``expelliarmus``), read in chunks so long recordings stream. The size comes from the
    header's geometry/format line, else from the first chunk's largest coordinates."""
    try:
        from expelliarmus import Wizard
    except ImportError:
        raise I2EError("reading Prophesee .raw needs the 'expelliarmus' package: "
                       "pip install 'i2e-deploy[events]'") from None
    wizard = Wizard(encoding="evt3", fpath=path, chunk_size=1 << 18)
    chunks = wizard.read_chunk()
    try:
        first = next(chunks, None)
    except Exception as exc:
        raise I2EError(f"{path}: not a readable EVT3 recording ({exc})") from None
    if first is None or not len(first):
        raise I2EError(f"{path}: EVT3 recording holds no events")
    size = _evt3_header_size(path) or (int(first["x"].max()) + 1, int(first["y"].max()) + 1)

    def columns():
        for events in itertools.chain([first], chunks):
            yield events["t"].astype(np.int64), events["x"], events["y"], events["p"]
    return columns(), size


def _evt3_header_size(path: str) -> tuple[int, int] | None:
    with open(path, "rb") as fh:
        for line in fh:
            if not line.startswith(b"%"):
                return None
            text = line.decode("ascii", "replace")
            match = (re.search(r"geometry\s+(\d+)x(\d+)", text)
                     or re.search(r"width=(\d+);height=(\d+)", text))
            if match:
                return int(match.group(1)), int(match.group(2))
    return None


def _read_nmnist(path: str):
    """N-MNIST binary: 5 bytes per event, x, y, then polarity (1 bit) and time (23 bits, us)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % 5:
        raise I2EError(f"{path}: not an N-MNIST .bin file (size is not a multiple of 5 bytes)")
    raw = raw.reshape(-1, 5).astype(np.int64)
    x, y = raw[:, 0], raw[:, 1]
    p = (raw[:, 2] >> 7).astype(np.uint8)
    t = ((raw[:, 2] & 0x7F) << 16) | (raw[:, 3] << 8) | raw[:, 4]

    def chunks():
        yield t, x, y, p
    return chunks(), (34, 34)


EVENT_READERS = {".aedat4": _read_aedat4, ".raw": _read_evt3, ".evt3": _read_evt3,
                 ".bin": _read_nmnist}


def events_to_frames(x, y, p, sensor: tuple[int, int], card: ModelCard) -> np.ndarray:
    """Events of one window -> ``[T, 2, imgsz, imgsz]`` uint8 0/1.

    Split into T slices of equal event count (SpikingJelly's ``split_by='number'``, as the
    paper's CIFAR10-DVS pipeline), integrate per polarity, map onto the card's geometry like
    an image (centre square of the shorter side, resized to ``imgsz``: any event in an output
    pixel's area when shrinking, nearest neighbour when enlarging), and clip to 0/1.
    """
    T, size = card.T, card.imgsz
    n = len(x)
    if n == 0:
        return np.zeros((T, 2, size, size), np.uint8)
    width, height = sensor
    side = round(min(width, height) * size / card.resize)  # the centre crop, in sensor pixels
    col = np.asarray(x, np.int64) - (width - side) // 2
    row = np.asarray(y, np.int64) - (height - side) // 2
    step = np.repeat(np.arange(T), np.diff(_count_split(n, T)))
    keep = (col >= 0) & (col < side) & (row >= 0) & (row < side)
    col, row = col[keep], row[keep]
    grid = side
    if side > size:  # shrink: an output pixel fires if any event falls in its area
        col, row, grid = col * size // side, row * size // side, size
    # Polarity channel 0 = ON, 1 = OFF (SPEC §1).
    plane = step[keep] * 2 + 1 - (np.asarray(p)[keep] > 0)
    counts = np.bincount((plane * grid + row) * grid + col, minlength=2 * T * grid * grid)
    fired = (counts.reshape(T, 2, grid, grid) > 0).astype(np.uint8)
    if grid < size:  # enlarge: nearest neighbour
        index = np.arange(size) * grid // size
        fired = fired[:, :, index][:, :, :, index]
    return np.ascontiguousarray(fired)


def _count_split(n: int, T: int) -> np.ndarray:
    """Slice boundaries [0, ..., n] of SpikingJelly's split_by='number' (last slice takes
    the remainder)."""
    bounds = np.arange(T + 1) * (n // T)
    bounds[-1] = n
    return bounds


def render_events(x, y, p, sensor: tuple[int, int]) -> np.ndarray:
    """RGB picture of a window at sensor resolution: ON red, OFF blue, on dark grey."""
    width, height = sensor
    image = np.full((height, width, 3), 30, np.uint8)
    x, y, p = np.asarray(x), np.asarray(y), np.asarray(p) > 0
    inside = (x < width) & (y < height)
    image[y[inside & p], x[inside & p]] = (255, 70, 60)
    image[y[inside & ~p], x[inside & ~p]] = (70, 140, 255)
    return image


class EventRecordingSource(Source):
    """An event-camera recording cut into consecutive ``window_ms`` windows; each window
    becomes one frame whose ``events`` are the model input (see ``events_to_frames``)."""

    def __init__(self, path: str, card: ModelCard, *, window_ms: float = 100.0, **options):
        super().__init__(path, **options)
        if not window_ms > 0:
            raise I2EError(f"window must be positive, got {window_ms} ms")
        self.card = card
        self.window_us = int(window_ms * 1000)
        self.nominal_fps = 1000.0 / window_ms
        self._reader = EVENT_READERS[Path(path).suffix.lower()]
        self._reader(path)  # fail now, not in the capture thread, if unreadable

    def _windows(self):
        chunks, sensor = self._reader(self.uri)
        pending: list[tuple] = []
        window_end = None
        for t, x, y, p in chunks:
            if len(t) == 0:
                continue
            if window_end is None:
                window_end = int(t[0]) + self.window_us
            while len(t):
                cut = int(np.searchsorted(t, window_end))
                pending.append((t[:cut], x[:cut], y[:cut], p[:cut]))
                if cut == len(t):
                    break
                yield self._join(pending), sensor
                pending = []
                window_end += self.window_us
                t, x, y, p = t[cut:], x[cut:], y[cut:], p[cut:]
        if pending and sum(len(c[0]) for c in pending):
            yield self._join(pending), sensor

    @staticmethod
    def _join(parts):
        return tuple(np.concatenate([part[k] for part in parts]) for k in range(4))

    def _read(self):
        for index, ((t, x, y, p), sensor) in enumerate(self._windows()):
            if index % self.stride == 0:
                yield index, render_events(x, y, p, sensor), events_to_frames(x, y, p, sensor,
                                                                             self.card)


def open_source(uri: str, *, card: ModelCard | None = None, resolution=None,
                fps: float | None = None, loop: bool = False, stride: int = 1,
                window_ms: float = 100.0, **live_options) -> Source:
    """Open a source URI (see the module doc). ``card`` is needed for event recordings
    (their frames are built at the model's size); ``live_options`` tune reconnection."""
    options = dict(resolution=resolution, fps=fps, loop=loop, stride=stride)
    text = str(uri).strip()
    if text == "demo":
        return DemoSource(**options)
    if re.fullmatch(r"\d+", text):
        return LiveSource(text, int(text), **options, **live_options)
    match = re.fullmatch(r"/dev/video(\d+)", text)
    if match:
        return LiveSource(text, int(match.group(1)), **options, **live_options)
    if text.lower().startswith(STREAM_SCHEMES):
        return LiveSource(text, text, **options, **live_options)
    path = Path(text).expanduser()
    if path.is_dir():
        return ImageFilesSource(text, list_images(path), **options)
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True)
                       if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        return ImageFilesSource(text, files, **options)
    if not path.exists():
        raise I2EError(f"source not found: {text} (expected a camera index, a video or image "
                       "file, a folder, a glob, an rtsp:// or http:// URL, or 'demo')")
    suffix = path.suffix.lower()
    if suffix in EVENT_SUFFIXES:
        if card is None or card.input != "events":
            raise I2EError(f"{text} is an event-camera recording; it needs an event-input "
                           "model (e.g. a CIFAR10-DVS checkpoint, or --events)")
        return EventRecordingSource(text, card, window_ms=window_ms, **options)
    if suffix in IMAGE_SUFFIXES:
        return ImageFilesSource(text, [path], **options)
    if suffix in VIDEO_SUFFIXES:
        return VideoFileSource(text, **options)
    raise I2EError(f"{text}: unknown source type {suffix or '(no suffix)'}; expected a video "
                   f"({', '.join(sorted(VIDEO_SUFFIXES))}), an image, a folder or an event "
                   "recording (.aedat4, .raw, .bin)")
