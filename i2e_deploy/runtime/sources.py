"""Frame sources named by URI: ``open_source(uri) -> Source``, iterate it for ``Frame``s.

URIs: ``0`` or ``/dev/video0`` (camera), a video file, ``rtsp://``/``http(s)://`` streams,
an image folder or glob, ``demo`` (bundled photos of the bundled model's classes, panned
and jittered like a handheld camera), and for event-input models event-camera recordings
(``.aedat4``, Prophesee ``.raw``/EVT3, N-MNIST ``.bin``), iniVation cameras (``dvs:``,
``dvs:SERIAL``) and DV network event streams (``dv://HOST:PORT``): see ``event_sources``.
"""

from __future__ import annotations

import glob
import math
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from ..card import ModelCard
from ..errors import I2EError
from ..images import IMAGE_SUFFIXES, list_images
from .frames import Frame, Source

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv", ".gif"}
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


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
                yield Frame(_bgr_to_rgb(image), index)
                index += 1
        finally:
            capture.release()


class LiveSource(Source):
    """A camera or network stream. If it stops delivering (an error, or ``timeout_s`` of
    silence), it is reopened with exponential backoff (``reconnect_attempts`` tries, -1 for
    ever, from ``backoff_s``), then a clear error is raised."""

    live = True

    def __init__(
        self,
        uri: str,
        target,
        *,
        reconnect_attempts: int = 5,
        backoff_s: float = 0.5,
        timeout_s: float = 5.0,
        **options,
    ):
        super().__init__(uri, **options)
        self.target = target
        self.reconnect_attempts = self.state.attempts = reconnect_attempts
        self.backoff_s = backoff_s
        self.timeout_ms = int(timeout_s * 1000)
        self.stopping = threading.Event()
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
            return (
                f"camera {self.uri} not found or busy (is it connected? see `ls /dev/video*`); "
                "try another index, a video file, or --source demo"
            )
        return (
            f"cannot open stream {self.uri}: connection refused, timed out or not a video "
            "stream; check the URL and that the server is up"
        )

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
            capture = cv2.VideoCapture(
                self.target,
                cv2.CAP_FFMPEG,
                [
                    cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                    self.timeout_ms,
                    cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                    self.timeout_ms,
                ],
            )
        if not capture.isOpened():
            capture.release()
            return None
        return capture

    def _reconnect(self) -> bool:
        """Reopened: True; stopped meanwhile: False; out of attempts: I2EError."""
        self.capture.release()
        self.capture = self._retry(
            self._open, self.reconnect_attempts, self.backoff_s, self.stopping
        )
        if self.capture is not None or self.stopping.is_set():
            return self.capture is not None
        what = "camera" if self.is_camera else "stream"
        self.state.error = (
            f"{what} {self.uri} was lost and did not come back after "
            f"{self.reconnect_attempts} reconnect attempts"
        )
        raise I2EError(self.state.error)

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
                if self.finite or self.stopping.is_set() or not self._reconnect():
                    return
                continue
            index += 1
            if (index - 1) % self.stride:
                continue
            ok, image = self.capture.retrieve()
            if not ok or image is None:
                self.unreadable += 1
                continue
            image = self._fit(_bgr_to_rgb(image))
            now = time.perf_counter()
            captured_at = self._delivered()
            yield Frame(image, index - 1, now, (now - began) * 1e3, captured_at=captured_at)

    def interrupt(self) -> None:
        self.stopping.set()  # ends a reconnect wait; a blocked read ends within timeout_s

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
            yield None if image is None else Frame(_bgr_to_rgb(image), index)


# The view shows this share of a photo: enough motion for a moving clip, while the model
# still sees the subject whole (each photo is cropped so it fills the frame, as in CIFAR-10).
DEMO_VIEW = 0.9


def demo_manifest() -> list[dict]:
    """The bundled demo photos (``assets/demo/photos.json``): file, labelled class, where each
    came from (package, original file, author, licence) and the bundled model's verdict;
    ``path`` is added: where the file is."""
    import json

    from ..assets import DEMO_PHOTOS

    with open(DEMO_PHOTOS / "photos.json", encoding="utf-8") as fh:
        photos = json.load(fh)["photos"]
    return [dict(photo, path=DEMO_PHOTOS / photo["file"]) for photo in photos]


def _read_photo(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise I2EError(f"bundled demo photo missing or unreadable: {path}")
    return _bgr_to_rgb(image)


def demo_intro(class_names: list[str] | None, num_classes: int) -> str:
    """The demo's first line: what the model knows and what the photos show. Only when the
    photos are of the model's classes does it say so; otherwise the labels mean little."""
    labels = list(dict.fromkeys(photo["label"] for photo in demo_manifest()))
    shown = ", ".join(labels)
    if not class_names:
        return (
            f"model knows {num_classes} unnamed classes; the demo's photos ({shown}) "
            "cannot be matched to them"
        )
    line = f"model knows {num_classes} classes: {', '.join(class_names)}; "
    if set(labels) <= set(class_names):
        return line + f"the demo shows photos of {shown}"
    return line + f"the demo's photos ({shown}) are not all of its classes"


class DemoSource(Source):
    """A few seconds of real photos of the bundled model's classes (``assets/demo``, sources
    and licences in ``photos.json``), each panned across and shaken like a handheld camera.
    Deterministic, offline, no camera needed."""

    nominal_fps = 15.0

    def __init__(
        self,
        uri: str = "demo",
        *,
        seconds_per_image: float = 1.5,
        size: tuple[int, int] = (320, 240),
        seed: int = 0,
        **options,
    ):
        super().__init__(uri, **options)
        manifest = demo_manifest()
        self.photos = [_read_photo(photo["path"]) for photo in manifest]
        self.labels = [photo["label"] for photo in manifest]
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
            # The view covers DEMO_VIEW of the photo; it pans from one side to the other.
            scale = DEMO_VIEW * min(pw / width, ph / height)
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
                matrix = np.array(
                    [
                        [cos, -sin, cx - cos * width / 2 + sin * height / 2],
                        [sin, cos, cy - sin * width / 2 - cos * height / 2],
                    ]
                )
                view = cv2.warpAffine(
                    photo,
                    matrix,
                    (width, height),
                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                    borderMode=cv2.BORDER_REFLECT,
                )
                yield Frame(view, index)


def _handheld_shake(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, 4] smooth random (dx px, dy px, angle rad, zoom): low-passed noise, like a hand."""
    noise = rng.normal(size=(n + 8, 4))
    kernel = np.hanning(9)
    smooth = np.stack(
        [np.convolve(noise[:, k], kernel / kernel.sum(), "valid") for k in range(4)], axis=1
    )[:n]
    smooth /= smooth.std(axis=0) + 1e-9
    return smooth * np.array([6.0, 6.0, math.radians(1.5), 0.02]) + np.array([0, 0, 0, 1.0])


def needs_card(uri: str) -> bool:
    """Whether ``open_source`` needs the model card for ``uri``: event sources do."""
    from .event_sources import EVENT_SUFFIXES, LIVE_EVENT_SCHEMES

    text = str(uri).strip().lower()
    return text.startswith(LIVE_EVENT_SCHEMES) or Path(text).suffix in EVENT_SUFFIXES


def open_source(
    uri: str,
    *,
    card: ModelCard | None = None,
    resolution=None,
    fps: float | None = None,
    loop: bool = False,
    stride: int = 1,
    window_ms: float = 100.0,
    **live_options,
) -> Source:
    """Open a source URI (see the module doc). ``card`` is needed for event sources (their
    frames are built at the model's size); ``live_options`` (``reconnect_attempts``,
    ``backoff_s``, ``timeout_s``) tune reconnection of cameras and streams."""
    from .event_sources import EVENT_SUFFIXES, LIVE_EVENT_SCHEMES, open_event_source

    options = dict(resolution=resolution, fps=fps, loop=loop, stride=stride)
    text = str(uri).strip()
    if text.lower().startswith(LIVE_EVENT_SCHEMES):
        return open_event_source(text, card, window_ms=window_ms, **options, **live_options)
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
        files = sorted(
            Path(p)
            for p in glob.glob(os.path.expanduser(text), recursive=True)
            if Path(p).suffix.lower() in IMAGE_SUFFIXES
        )
        return ImageFilesSource(text, files, **options)
    if not path.exists():
        raise I2EError(
            f"source not found: {text} (expected a camera index, a video or image "
            "file, a folder, a glob, an rtsp:// or http:// URL, 'demo', an event "
            "recording, dv://HOST:PORT or dvs:)"
        )
    suffix = path.suffix.lower()
    if suffix in EVENT_SUFFIXES:
        return open_event_source(text, card, window_ms=window_ms, **options)
    if suffix in IMAGE_SUFFIXES:
        return ImageFilesSource(text, [path], **options)
    if suffix in VIDEO_SUFFIXES:
        return VideoFileSource(text, **options)
    raise I2EError(
        f"{text}: unknown source type {suffix or '(no suffix)'}; expected a video "
        f"({', '.join(sorted(VIDEO_SUFFIXES))}), an image, a folder or an event "
        "recording (.aedat4, .raw, .bin)"
    )
