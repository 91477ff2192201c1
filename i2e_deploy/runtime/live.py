"""The live page: ``--output http://HOST:PORT`` serves the annotated canvases of all sources,
tiled into one MJPEG stream, beside numbers pushed by Server-Sent Events (and ``/stats`` as
JSON for scripts), from the standard library's threading HTTP server.

A viewer never slows inference: ``LiveSink.write`` only keeps a reference to the newest
frame of each source. One encoder thread draws (when no other output drew the canvas) and
JPEG-encodes the tiled picture while someone watches, at most ``view_fps`` times a second and
once per new frame, for all viewers alike; each viewer's thread sends the newest JPEG and
skips what it missed, so nothing queues per viewer and memory stays flat.

Routes: ``/`` (the page), ``/live.js`` (the shared worker that holds one event stream for all
tabs of a browser), ``/stream.mjpg``, ``/events``, ``/stats``; anything else is 404, and no
request path ever reaches the file system.
"""

from __future__ import annotations

import collections
import errno
import json
import math
import re
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from ..errors import I2EError
from .overlay import BACKGROUND, annotate, draw_source_state
from .sinks import Sink

if TYPE_CHECKING:
    from .frames import Frame, Prediction, Source
    from .stats import StreamStats

BOUNDARY = "i2eframe"
EVENT_PERIOD_S = 0.5  # numbers pushed twice a second: enough for the charts
STALE_REDRAW_S = 1.0  # a source that is not live: its banner's age is redrawn this often
SEND_TIMEOUT_S = 10.0  # a viewer that stops reading for this long is disconnected
SEND_BUFFER = 1 << 18  # bytes the kernel holds for a picture viewer: a picture or two
_VIEWER_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")


def parse_address(uri: str) -> tuple[str, int]:
    """``http://HOST:PORT`` -> (host, port); an empty host is 127.0.0.1 (this machine only).
    Port 0 picks a free port (tests)."""
    match = re.fullmatch(r"http://(\[[0-9a-fA-F:.]+\]|[^/:\s\[\]]*):(\d{1,5})/?", uri.strip())
    if not match:
        raise I2EError(
            f"live output must be http://HOST:PORT (e.g. http://:8080, http://0.0.0.0:8080), "
            f"got {uri!r}"
        )
    host, port = match.group(1).strip("[]") or "127.0.0.1", int(match.group(2))
    if port > 65535:
        raise I2EError(f"port must be 0-65535, got {port} in {uri!r}")
    return host, port


def banner(host: str, port: int) -> str:
    """The one line said at start: where to look, and who can."""
    if host in ("0.0.0.0", "::"):
        return (
            f"live view on every network interface, port {port}: open "
            f"{http_url(socket.gethostname(), port)} (anyone who can reach this machine can watch)"
        )
    return f"live view: {http_url(host, port)}"


def http_url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def _resource(name: str) -> bytes:
    return resources.files("i2e_deploy.assets").joinpath(name).read_bytes()


def tile(canvases: list[np.ndarray]) -> np.ndarray:
    """All canvases in one picture: a near-square grid of cells the size of the first; one
    canvas is returned as is."""
    if len(canvases) == 1:
        return canvases[0]
    height, width = canvases[0].shape[:2]
    cols = math.ceil(math.sqrt(len(canvases)))
    rows = math.ceil(len(canvases) / cols)
    grid = np.full((rows * height, cols * width, 3), BACKGROUND, np.uint8)
    for i, canvas in enumerate(canvases):
        h, w = canvas.shape[:2]
        scale = min(height / h, width / w)
        if scale != 1:
            canvas = cv2.resize(canvas, (max(1, round(w * scale)), max(1, round(h * scale))))
        r, c = divmod(i, cols)
        grid[r * height : r * height + canvas.shape[0], c * width : c * width + canvas.shape[1]] = (
            canvas
        )
    return grid


@dataclass
class _Latest:
    frame: Frame
    prediction: Prediction
    canvas: np.ndarray | None  # drawn once, by the stream or the encoder


class LiveSink(Sink):
    """Serves the live page on ``http://HOST:PORT`` from construction, so a port in use or a
    bad host is refused before a model loads or a camera opens; :meth:`attach` hands it the
    stream's stats and sources; :meth:`close` stops the server, closes viewers' connections
    and joins every thread."""

    def __init__(self, uri: str, *, view_fps: float = 10.0, quality: int = 80):
        if not view_fps > 0:
            raise I2EError(f"--view-fps must be positive, got {view_fps}")
        self.host, port = parse_address(uri)
        self.view_fps, self.quality = view_fps, quality
        try:
            self.server = _Server((self.host, port), _Handler)
        except socket.gaierror:
            raise I2EError(f"cannot serve the live view: unknown host {self.host!r}") from None
        except OSError as exc:
            why = "port in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise I2EError(f"cannot serve the live view on {self.host}:{port}: {why}") from None
        self.server.sink = self
        self.port = self.server.server_address[1]
        self.stats: StreamStats | None = None
        self.sources: list[Source] = []
        self.latest: dict[int, _Latest] = {}
        self.version = 0  # bumped by every write
        self.lock = threading.Lock()
        # The newest JPEG and its number; viewers wait on ``published`` for a newer one.
        self.published = threading.Condition()
        self.jpeg = b""
        self.seq = 0
        self.encodes = 0
        self.viewers = 0  # open /stream.mjpg connections
        self.sent: dict[str, int] = {}  # viewer id -> frames sent on its open connection
        self.closing = threading.Event()
        self.wake = threading.Event()  # a new frame or a new viewer: the encoder looks
        self.rates: collections.deque[tuple[float, int]] = collections.deque(maxlen=12)
        self.snapshot_cache: tuple[float, dict[str, Any]] = (0.0, {})
        # Serving from here on: a page opened while the model loads shows up at once.
        self.threads = [
            threading.Thread(target=self.server.serve_forever, args=(0.2,), name="live-http"),
            threading.Thread(target=self._encode_loop, name="live-encode"),
        ]
        for thread in self.threads:
            thread.start()

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    def banner(self) -> str:
        return banner(self.host, self.port)

    def attach(self, stats: StreamStats, sources: list[Source]) -> None:
        self.stats, self.sources = stats, sources

    def write(self, frame, prediction, canvas) -> None:
        # Only a reference: drawing and encoding happen on the encoder thread, if watched.
        with self.lock:
            self.version += 1
            self.latest[frame.source] = _Latest(frame, prediction, canvas)
        if self.viewers:
            self.wake.set()

    def close(self) -> None:
        if self.closing.is_set():
            return
        self.closing.set()
        self.wake.set()
        with self.published:
            self.published.notify_all()
        self.server.shutdown()
        self.server.close_connections()
        self.server.server_close()  # joins the request threads (block_on_close)
        for thread in self.threads:
            thread.join()

    # -- the encoder thread -------------------------------------------------------------

    def _encode_loop(self) -> None:
        encoded_version, encoded_at = -1, 0.0
        while not self.closing.is_set():
            self.wake.wait(STALE_REDRAW_S)
            self.wake.clear()
            if self.closing.is_set() or not self.viewers or not self.latest:
                continue
            stale = any(s.state.status != "live" for s in self.sources)
            if self.version == encoded_version and not (
                stale and time.monotonic() - encoded_at >= STALE_REDRAW_S
            ):
                continue
            wait = encoded_at + 1 / self.view_fps - time.monotonic()
            if wait > 0 and self.closing.wait(wait):
                break
            encoded_version, encoded_at = self.version, time.monotonic()
            jpeg = self._encode()
            with self.published:
                self.jpeg, self.seq = jpeg, self.seq + 1
                self.published.notify_all()

    def _encode(self) -> bytes:
        now = time.time()
        with self.lock:
            latest = dict(self.latest)
        status = self._status_line()
        canvases = []
        for index in sorted(latest):
            item = latest[index]
            if item.canvas is None:  # no other output drew it: draw it here, off the loop
                item.canvas = annotate(item.frame, item.prediction, status)
            canvas = item.canvas
            if index < len(self.sources) and self.sources[index].state.status != "live":
                canvas = draw_source_state(canvas.copy(), self.sources[index].state, now)
            canvases.append(canvas)
        _, jpeg = cv2.imencode(".jpg", tile(canvases), [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        self.encodes += 1
        return jpeg.tobytes()

    def _status_line(self) -> str:
        if self.stats is None:
            return ""
        return (
            f"{self._rate():.1f} FPS | {self.stats.latency.percentile(50):.0f} ms | "
            f"{self.stats.backend}"
        )

    # -- numbers ------------------------------------------------------------------------

    def _rate(self) -> float:
        """Frames per second over the last few seconds (``stats.fps`` is the whole run's,
        known at its end)."""
        frames = self.stats.frames if self.stats else 0
        now = time.monotonic()
        with self.lock:
            if not self.rates or now - self.rates[-1][0] >= 0.25:
                self.rates.append((now, frames))
            (t0, f0), (t1, f1) = self.rates[0], self.rates[-1]
        return (f1 - f0) / (t1 - t0) if t1 > t0 else 0.0

    def snapshot(self) -> dict[str, Any]:
        """``StreamStats.to_dict()`` with the live rate, each source's state and newest
        top-k, and the view's own counters. Shared by all viewers for a quarter second."""
        with self.lock:
            made, cached = self.snapshot_cache
        if time.monotonic() - made < 0.25:
            return cached
        now = time.time()
        data = self.stats.to_dict() if self.stats else {}
        data["fps_now"] = round(self._rate(), 3)
        with self.lock:
            latest = dict(self.latest)
        data["source_states"] = [{"uri": s.uri, **s.state.to_dict(now)} for s in self.sources]
        data["top"] = [
            {
                "source": index,
                "frame": item.frame.index,
                "labels": list(item.prediction.labels),
                "probs": [round(float(p), 4) for p in item.prediction.probs],
                "firing_rate": item.prediction.firing_rate,
                "sops": item.prediction.sops,
            }
            for index, item in sorted(latest.items())
        ]
        data["view"] = {
            "shown": self.seq,
            "encodes": self.encodes,
            "viewers": self.viewers,
            "view_fps": self.view_fps,
        }
        with self.lock:
            self.snapshot_cache = (time.monotonic(), data)
        return data


class _Server(ThreadingHTTPServer):
    # Request threads are joined on close (not daemons): close() ends them first.
    daemon_threads = False
    block_on_close = True
    sink: LiveSink

    def __init__(self, address, handler):
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake every request blocked on a viewer that stopped reading: the run is over."""
        with self.connections_lock:
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = SEND_TIMEOUT_S
    protocol_version = "HTTP/1.1"
    server_version = "i2e-deploy"

    def log_message(self, format, *args) -> None:
        pass  # one line per request would drown the stream's own output

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        routes = {
            "/": self._page,
            "/live.js": self._worker,
            "/stream.mjpg": self._mjpeg,
            "/events": self._events,
            "/stats": self._stats,
        }
        route = routes.get(url.path)
        if route is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        viewer = parse_qs(url.query).get("viewer", [""])[0]
        try:
            route(viewer if _VIEWER_ID.fullmatch(viewer) else "")
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
            self.close_connection = True  # the viewer left or stopped reading

    def _send(self, body: bytes, content_type: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _start_stream(self, content_type: str) -> None:
        self.close_connection = True
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()

    def _page(self, viewer: str) -> None:
        self._send(_resource("live.html"), "text/html; charset=utf-8")

    def _worker(self, viewer: str) -> None:
        self._send(_resource("live.js"), "text/javascript; charset=utf-8")

    def _stats(self, viewer: str) -> None:
        self._send(json.dumps(self.server.sink.snapshot()).encode(), "application/json")

    def _events(self, viewer: str) -> None:
        sink = self.server.sink
        self._start_stream("text/event-stream")
        self.wfile.write(b"retry: 1000\n\n")  # reconnect within a second after a restart
        while not sink.closing.is_set():
            with sink.published:
                sent = dict(sink.sent)
            # ``sent``: frames each page's picture got, so a page can see its own stall.
            data = dict(sink.snapshot(), sent=sent)
            self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
            self.wfile.flush()
            sink.closing.wait(EVENT_PERIOD_S)

    def _mjpeg(self, viewer: str) -> None:
        sink = self.server.sink
        # Little kernel buffering: a slow viewer gets the newest picture, not a backlog of
        # old ones, and a stalled one stops counting in ``sent`` soon.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self._start_stream(f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        with sink.published:
            sink.viewers += 1
            if viewer:
                sink.sent[viewer] = 0
        sink.wake.set()
        shown = 0
        try:
            while not sink.closing.is_set():
                with sink.published:
                    # The newest frame only: one missed while sending is skipped, not queued.
                    if sink.seq == shown:
                        sink.published.wait(1.0)
                    jpeg, seq = sink.jpeg, sink.seq
                if seq == shown or sink.closing.is_set():
                    continue
                shown = seq
                self.wfile.write(
                    f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                    f"Content-Length: {len(jpeg)}\r\n\r\n".encode()
                    + jpeg
                    + b"\r\n"
                )
                self.wfile.flush()
                if viewer:
                    with sink.published:
                        sink.sent[viewer] = sink.sent.get(viewer, 0) + 1
        finally:
            with sink.published:
                sink.viewers -= 1
                if viewer:
                    sink.sent.pop(viewer, None)
