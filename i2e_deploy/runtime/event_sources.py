"""Event-camera sources for event-input models: recordings (``.aedat4`` through
dv-processing, Prophesee ``.raw``/EVT3 through expelliarmus, N-MNIST ``.bin``), a connected
iniVation camera (``dvs:`` or ``dvs:SERIAL``) and a DV network event stream
(``dv://HOST:PORT``: DV's TCP output, ``dv.io.NetworkWriter``).

All of them go through one path: ``event_windows`` cuts the events into consecutive
``window_ms`` windows of *event time* (the sensor's timestamps, not arrival time), and
``events_to_frames`` bins each window into the ``[T, 2, imgsz, imgsz]`` frames the model takes.
"""

from __future__ import annotations

import itertools
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ..card import ModelCard
from ..errors import I2EError
from .frames import Frame, Source

EVENT_SUFFIXES = {".aedat4", ".raw", ".evt3", ".bin"}
LIVE_EVENT_SCHEMES = ("dv://", "dvs:")

Columns = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # t (us), x, y, polarity
Reader = Callable[[str], tuple[Iterator[Columns], tuple[int, int]]]


def import_dv() -> ModuleType:
    """dv-processing, or one line saying which extra installs it."""
    try:
        import dv_processing
    except ImportError:
        raise I2EError(
            "AEDAT4 files, iniVation cameras and DV network streams need "
            "dv-processing: pip install 'i2e-deploy[events]'"
        ) from None
    return dv_processing


def _cause(exc: Exception) -> str:
    """The cause in a dv-processing error: its C++ errors put a source location before it and
    a stack trace after it; its socket errors end in a bracketed location."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "Stacktrace:" in lines[1:]:
        return lines[lines.index("Stacktrace:") - 1]
    return lines[0].split(" [", 1)[0] if lines else type(exc).__name__


def _columns(batch: Any) -> Columns:
    """A dv.EventStore -> (t, x, y, p) arrays."""
    events = batch.numpy()
    return events["timestamp"], events["x"], events["y"], events["polarity"]


# --- recordings -------------------------------------------------------------------------------


def _read_aedat4(path: str) -> tuple[Iterator[Columns], tuple[int, int]]:
    """Event batches and the sensor size of an AEDAT4 file (dv-processing)."""
    dv = import_dv()
    try:
        recording = dv.io.MonoCameraRecording(path)
    except RuntimeError as exc:
        raise I2EError(f"{path}: not a readable AEDAT4 file ({_cause(exc)})") from None
    size = recording.getEventResolution() if recording.isEventStreamAvailable() else None
    if size is None:
        raise I2EError(f"{path}: AEDAT4 file has no event stream")

    def batches() -> Iterator[Columns]:
        while (batch := recording.getNextEventBatch()) is not None:
            yield _columns(batch)

    return batches(), (int(size[0]), int(size[1]))


def _read_evt3(path: str) -> tuple[Iterator[Columns], tuple[int, int]]:
    """Chunks of (t us, x, y, p) and the sensor size from a Prophesee EVT3 file
    (``expelliarmus``), read in chunks so long recordings stream. The size comes from the
    header's geometry/format line, else from the first chunk's largest coordinates."""
    try:
        from expelliarmus import Wizard
    except ImportError:
        raise I2EError(
            "reading Prophesee .raw needs the 'expelliarmus' package: "
            "pip install 'i2e-deploy[events]'"
        ) from None
    wizard = Wizard(encoding="evt3", fpath=path, chunk_size=1 << 18)
    chunks = wizard.read_chunk()
    try:
        first = next(chunks, None)
    except Exception as exc:
        raise I2EError(f"{path}: not a readable EVT3 recording ({exc})") from None
    if first is None or not len(first):
        raise I2EError(f"{path}: EVT3 recording holds no events")
    size = _evt3_header_size(path) or (int(first["x"].max()) + 1, int(first["y"].max()) + 1)

    def columns() -> Iterator[Columns]:
        for events in itertools.chain([first], chunks):
            yield events["t"].astype(np.int64), events["x"], events["y"], events["p"]

    return columns(), size


def _evt3_header_size(path: str) -> tuple[int, int] | None:
    with open(path, "rb") as fh:
        for line in fh:
            if not line.startswith(b"%"):
                return None
            text = line.decode("ascii", "replace")
            match = re.search(r"geometry\s+(\d+)x(\d+)", text) or re.search(
                r"width=(\d+);height=(\d+)", text
            )
            if match:
                return int(match.group(1)), int(match.group(2))
    return None


def _read_nmnist(path: str) -> tuple[Iterator[Columns], tuple[int, int]]:
    """N-MNIST binary: 5 bytes per event, x, y, then polarity (1 bit) and time (23 bits, us)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % 5:
        raise I2EError(f"{path}: not an N-MNIST .bin file (size is not a multiple of 5 bytes)")
    raw = raw.reshape(-1, 5).astype(np.int64)
    x, y = raw[:, 0], raw[:, 1]
    p = (raw[:, 2] >> 7).astype(np.uint8)
    t = ((raw[:, 2] & 0x7F) << 16) | (raw[:, 3] << 8) | raw[:, 4]
    return iter([(t, x, y, p)]), (34, 34)


EVENT_READERS: dict[str, Reader] = {
    ".aedat4": _read_aedat4,
    ".raw": _read_evt3,
    ".evt3": _read_evt3,
    ".bin": _read_nmnist,
}


# --- windows and event frames -----------------------------------------------------------------


@dataclass
class EventWindow:
    """The events with ``start_us <= t < end_us``."""

    start_us: int
    end_us: int
    t: np.ndarray
    x: np.ndarray
    y: np.ndarray
    p: np.ndarray


def event_windows(chunks: Iterable[Columns], window_us: int) -> Iterator[EventWindow]:
    """Consecutive windows of ``window_us`` of event time from the first event on, whatever
    the chunking. A window is complete when a later event arrives; windows without events are
    kept (nothing moved). When the chunks end, the last window ends after its last event."""
    pending: list[Columns] = []
    start: int | None = None
    for t, x, y, p in chunks:
        if len(t) == 0:
            continue
        if start is None:
            start = int(t[0])
        while len(t):
            cut = int(np.searchsorted(t, start + window_us))
            pending.append((t[:cut], x[:cut], y[:cut], p[:cut]))
            if cut == len(t):
                break
            yield EventWindow(start, start + window_us, *_join(pending))
            pending = []
            start += window_us
            t, x, y, p = t[cut:], x[cut:], y[cut:], p[cut:]
    if start is not None and any(len(part[0]) for part in pending):
        t, x, y, p = _join(pending)
        yield EventWindow(start, int(t[-1]) + 1, t, x, y, p)


def _join(parts: list[Columns]) -> Columns:
    t, x, y, p = (np.concatenate([part[k] for part in parts]) for k in range(4))
    return t, x, y, p


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


def window_frame(
    window: EventWindow, index: int, sensor: tuple[int, int], card: ModelCard
) -> Frame:
    """One window as a frame: its picture, its model input, its span of event time."""
    return Frame(
        render_events(window.x, window.y, window.p, sensor),
        index,
        events=events_to_frames(window.x, window.y, window.p, sensor, card),
        span_us=(window.start_us, window.end_us),
    )


def _check_window(window_ms: float) -> int:
    if not window_ms > 0:
        raise I2EError(f"window must be positive, got {window_ms} ms")
    return max(1, round(window_ms * 1000))


class EventRecordingSource(Source):
    """An event-camera recording cut into consecutive ``window_ms`` windows; each window
    becomes one frame whose ``events`` are the model input (see ``events_to_frames``)."""

    def __init__(self, path: str, card: ModelCard, *, window_ms: float = 100.0, **options):
        super().__init__(path, **options)
        self.card = card
        self.window_us = _check_window(window_ms)
        self.nominal_fps = 1000.0 / window_ms
        self._reader = EVENT_READERS[Path(path).suffix.lower()]
        self._reader(path)  # fail now, not in the capture thread, if unreadable

    def _read(self) -> Iterator[Frame | None]:
        chunks, sensor = self._reader(self.uri)
        for index, window in enumerate(event_windows(chunks, self.window_us)):
            if index % self.stride == 0:
                yield window_frame(window, index, sensor, self.card)


# --- live: iniVation cameras and DV network streams -------------------------------------------


class LiveEventSource(Source):
    """Events arriving live, cut into windows of event time as recordings are. A capture
    thread polls the device; when it goes away it is reopened with doubling backoff
    (``reconnect_attempts`` tries, -1 for ever, from ``backoff_s``), and windows start again
    from the first event after the reconnection. ``interrupt()`` (Ctrl-C, end of the stream)
    stops polling."""

    live = True
    poll_s = 0.002  # getNextEventBatch does not wait: it returns None until a batch is in

    def __init__(
        self,
        uri: str,
        card: ModelCard,
        *,
        window_ms: float = 100.0,
        reconnect_attempts: int = 5,
        backoff_s: float = 0.5,
        timeout_s: float = 5.0,
        **options,
    ):
        super().__init__(uri, **options)
        self.card = card
        self.window_us = _check_window(window_ms)
        self.nominal_fps = 1000.0 / window_ms
        self.reconnect_attempts = self.state.attempts = reconnect_attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.stopping = threading.Event()
        self.dv = import_dv()
        self.input, self.sensor = self._connect()

    def _open(self) -> Any:
        """The dv-processing input (camera or network reader); I2EError if unavailable."""
        raise NotImplementedError

    def _lost(self) -> I2EError | None:
        """What to raise when the input is gone for good; None ends the stream cleanly."""
        return None

    def _connect(self) -> tuple[Any, tuple[int, int]]:
        source = self._open()
        size = source.getEventResolution() if source.isEventStreamAvailable() else None
        if size is None:
            raise I2EError(
                f"{self.uri} sends no events (frames or IMU only?); an event-input "
                "model needs the event stream"
            )
        return source, (int(size[0]), int(size[1]))

    @property
    def fps(self) -> float:
        return self.nominal_fps / self.stride  # the windows set the pace

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        while self.input is not None:
            for window in event_windows(self._batches(), self.window_us):
                if index % self.stride == 0:
                    began = time.perf_counter()
                    frame = window_frame(window, index, self.sensor, self.card)
                    frame.image = self._fit(frame.image)
                    frame.timestamp = time.perf_counter()
                    frame.capture_ms = (frame.timestamp - began) * 1e3
                    frame.captured_at = self._delivered()
                    yield frame
                index += 1
            if not self._reconnect():
                return

    def _batches(self) -> Iterator[Columns]:
        """Event batches of the current connection, until it ends or ``interrupt()``."""
        source = self.input
        while not self.stopping.is_set():
            batch = source.getNextEventBatch()
            if batch is None:
                if not source.isRunning():
                    return
                self.stopping.wait(self.poll_s)
            elif len(batch):
                yield _columns(batch)

    def _reconnect(self) -> bool:
        self.input = None
        connected = self._retry(
            self._connect, self.reconnect_attempts, self.backoff_s, self.stopping
        )
        if connected is not None:
            self.input, self.sensor = connected
            return True
        if self.stopping.is_set():
            return False
        error = self._lost()
        if error is None:  # gone for good is this source's end
            self.state.status = "ended"
            return False
        self.state.error = str(error)
        raise error

    def interrupt(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        self.stopping.set()
        self.input = None  # dv-processing releases the device or socket with the object


class DvStreamSource(LiveEventSource):
    """A DV network event stream, ``dv://HOST:PORT``: DV software's TCP output, or
    ``dv.io.NetworkWriter``. The stream ends when the sender stops and does not come back."""

    def __init__(self, uri: str, card: ModelCard, **options):
        address = urlsplit(uri)
        try:
            port = address.port
        except ValueError:
            port = None
        if not address.hostname or port is None:
            raise I2EError(
                f"{uri}: a DV network stream is dv://HOST:PORT, e.g. dv://127.0.0.1:7777"
            )
        self.host, self.port = address.hostname, port
        super().__init__(uri, card, **options)

    def _open(self) -> Any:
        self._check_server()
        try:
            return self.dv.io.NetworkReader(self.host, self.port)
        except RuntimeError as exc:
            raise I2EError(f"cannot connect to {self.uri}: {_cause(exc)}") from None

    def _check_server(self) -> None:
        """NetworkReader waits forever, holding the GIL (no Ctrl-C), on a server that does not
        speak DV's protocol; so first read the start of what the server sends: a 4-byte size,
        then a flatbuffer whose identifier (bytes 4-8) is 'IOHE', DV's stream header."""
        try:
            conn = socket.create_connection((self.host, self.port), self.timeout_s)
        except OSError as exc:
            raise I2EError(
                f"cannot connect to {self.uri}: {exc.strerror or exc}; is the sender "
                "(DV's network output, dv.io.NetworkWriter) running on that "
                "port?"
            ) from None
        head = b""
        with conn:
            try:
                while len(head) < 12 and (more := conn.recv(12 - len(head))):
                    head += more
            except OSError:
                pass  # judged by what arrived
        if head[8:12] != b"IOHE":
            raise I2EError(
                f"{self.uri} is not a DV event stream (no DV stream header within "
                f"{self.timeout_s:g} s); check the port of DV's network output"
            )


class DvCameraSource(LiveEventSource):
    """A connected iniVation camera (DVXplorer, DAVIS, DVS128): ``dvs:`` for the first one,
    ``dvs:SERIAL`` for a given one. A camera lost for good is an error."""

    def __init__(self, uri: str, card: ModelCard, **options):
        self.serial = uri.split(":", 1)[1].strip()
        super().__init__(uri, card, **options)

    def _open(self) -> Any:
        serials = [device.serialNumber for device in self.dv.io.camera.discover()]
        if not serials:
            raise I2EError(
                "no iniVation camera connected (is it plugged in, and may this "
                "user access it? iniVation's udev rules); for DV's network output "
                "use dv://HOST:PORT"
            )
        if self.serial and self.serial not in serials:
            raise I2EError(
                f"iniVation camera {self.serial} not connected; connected: {', '.join(serials)}"
            )
        try:
            return self.dv.io.camera.open(self.serial or serials[0])
        except RuntimeError as exc:
            raise I2EError(
                f"cannot open camera {self.serial or serials[0]}: {_cause(exc)}"
            ) from None

    def _lost(self) -> I2EError | None:
        return I2EError(
            f"camera {self.uri} was lost and did not come back after "
            f"{self.reconnect_attempts} reconnect attempts"
        )


def open_event_source(text: str, card: ModelCard | None, *, window_ms: float, **options) -> Source:
    """The source for a ``dv://`` or ``dvs:`` URI, or an event recording's path; ``options``
    are ``Source``'s, and for live sources ``LiveEventSource``'s reconnection options."""
    live = text.lower().startswith(LIVE_EVENT_SCHEMES)
    if card is None or card.input != "events":
        what = "a live event camera" if live else "an event-camera recording"
        raise I2EError(
            f"{text} is {what}; it needs an event-input model (e.g. a CIFAR10-DVS "
            "checkpoint, or --events)"
        )
    if text.lower().startswith("dv://"):
        return DvStreamSource(text, card, window_ms=window_ms, **options)
    if live:
        return DvCameraSource(text, card, window_ms=window_ms, **options)
    return EventRecordingSource(text, card, window_ms=window_ms, **options)
