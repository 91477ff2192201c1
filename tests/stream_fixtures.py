"""Shared helpers for the stream tests: a small real model, videos, an MJPEG server."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
from runtime_models import save_active

SHARED = Path(__file__).resolve().parents[2] / "shared"
BIKES = SHARED / "data" / "video" / "bikes.mp4"
DVS = SHARED / "data" / "dvs"


def make_checkpoint(path: Path, *, events: bool = False, imgsz: int = 32) -> Path:
    """A real MS-ResNet-18 with random weights whose neurons fire, so that logits differ from
    frame to frame (the tests' one BatchNorm randomizer)."""
    return save_active(path, imgsz=imgsz, events=events)


def synthetic_frames(count: int, size=(96, 64), seed: int = 0) -> list[np.ndarray]:
    """RGB frames of a few coloured shapes moving over a gradient."""
    rng = np.random.default_rng(seed)
    width, height = size
    base = np.zeros((height, width, 3), np.uint8)
    base[..., 0] = np.linspace(30, 200, width, dtype=np.uint8)[None]
    base[..., 2] = np.linspace(200, 30, height, dtype=np.uint8)[:, None]
    shapes = [
        (
            rng.integers(0, width),
            rng.integers(0, height),
            rng.integers(6, 16),
            tuple(int(c) for c in rng.integers(0, 256, 3)),
        )
        for _ in range(4)
    ]
    frames = []
    for i in range(count):
        image = base.copy()
        for k, (x, y, r, colour) in enumerate(shapes):
            cx = int(x + 3 * i * (1 if k % 2 else -1)) % width
            cv2.circle(image, (cx, int(y)), int(r), colour, -1)
        frames.append(image)
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: float = 25.0) -> Path:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def read_video(path: Path) -> list[np.ndarray]:
    """All frames of a video, RGB."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


class _LocalServer:
    """An HTTP server on a free localhost port, serving while used as a context manager."""

    def __init__(self, handler, name: str):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/{name}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class MjpegServer(_LocalServer):
    """An HTTP MJPEG camera on localhost: each of the first ``connections`` clients gets
    ``frames_per_connection`` JPEG frames, then the connection drops (a camera lost);
    later clients get 503 (it does not come back)."""

    def __init__(self, frames_per_connection: int, connections: int):
        served = {"count": 0}
        frames = synthetic_frames(frames_per_connection, size=(64, 48))

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                served["count"] += 1
                if served["count"] > connections:
                    self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                for image in frames:
                    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
                    self.wfile.write(
                        b"--frame\r\nContent-Type: image/jpeg\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(jpeg)
                    )
                    self.wfile.write(jpeg.tobytes() + b"\r\n")
                    self.wfile.flush()
                    time.sleep(0.01)

            def log_message(self, *args):
                pass

        super().__init__(Handler, "stream.mjpg")


class FileServer(_LocalServer):
    """Serves one file over HTTP with byte ranges (as real web servers do; FFmpeg seeks in
    MP4 files)."""

    def __init__(self, path: Path):
        data = path.read_bytes()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                start, end = 0, len(data) - 1
                wanted = self.headers.get("Range", "")
                if wanted.startswith("bytes="):
                    first, _, last = wanted[6:].partition("-")
                    start, end = int(first or 0), int(last) if last else len(data) - 1
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Content-Length", str(end - start + 1))
                self.end_headers()
                try:
                    self.wfile.write(data[start : end + 1])
                except (BrokenPipeError, ConnectionResetError):
                    pass  # FFmpeg closes a connection when it seeks elsewhere

            def log_message(self, *args):
                pass

        super().__init__(Handler, path.name)


class FlakyCamera:
    """A network camera on 127.0.0.1 that can stall, refuse connections and come back: MJPEG
    (multipart JPEG frames, ``fps`` a second) over HTTP (``http://127.0.0.1:PORT/cam.mjpg``)
    or plain TCP (``tcp://127.0.0.1:PORT``, read by FFmpeg's mpjpeg demuxer).

    ``stall()``: connections stay open and silent, new ones too; ``refuse()``: the port
    closes (connection refused) and open connections drop; ``serve()``: frames again.
    ``sent`` counts the frames sent. The server stops with the ``with`` block."""

    def __init__(self, protocol: str = "http", fps: float = 25.0):
        self.protocol, self.period = protocol, 1 / fps
        self.jpegs = [
            cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()
            for image in synthetic_frames(20, size=(64, 48))
        ]
        self.mode = "serve"
        self.generation = 0  # refuse() drops the connections of earlier generations
        self.sent = 0
        self.closed = threading.Event()
        self.listener = self._listen(0)
        self.port = self.listener.getsockname()[1]
        self.url = (
            f"http://127.0.0.1:{self.port}/cam.mjpg"
            if protocol == "http"
            else f"tcp://127.0.0.1:{self.port}"
        )

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        listener.settimeout(0.05)  # accept() polls, so that refuse() and the end are seen
        self.accepting = threading.Thread(
            target=self._accept, args=(listener, self.generation), daemon=True
        )
        self.accepting.start()
        return listener

    def _accept(self, listener: socket.socket, generation: int) -> None:
        with listener:
            while not self.closed.is_set() and self.generation == generation:
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                threading.Thread(target=self._client, args=(conn, generation), daemon=True).start()

    def _client(self, conn: socket.socket, generation: int) -> None:
        def alive() -> bool:
            return not self.closed.is_set() and self.generation == generation

        with conn:
            try:
                if self.protocol == "http":
                    conn.settimeout(5)
                    request = b""
                    while b"\r\n\r\n" not in request and (more := conn.recv(1024)):
                        request += more
                    while self.mode == "stall" and alive():  # a hung camera answers nothing
                        time.sleep(0.02)
                    conn.sendall(
                        b"HTTP/1.0 200 OK\r\n"
                        b"Content-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n"
                    )
                index = 0
                while alive():
                    if self.mode != "serve":
                        time.sleep(0.02)
                        continue
                    jpeg = self.jpegs[index % len(self.jpegs)]
                    conn.sendall(
                        b"--frame\r\nContent-Type: image/jpeg\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(jpeg) + jpeg + b"\r\n"
                    )
                    self.sent += 1
                    index += 1
                    time.sleep(self.period)
            except OSError:
                pass  # the client went away

    def stall(self) -> None:
        self.mode = "stall"

    def refuse(self) -> None:
        self.mode = "refuse"
        self.generation += 1  # the accept loop closes the port, the clients hang up

    def serve(self) -> None:
        if self.mode == "refuse":
            self.accepting.join()  # the old accept loop lets the port go
            self.listener = self._listen(self.port)
        self.mode = "serve"

    def __enter__(self) -> FlakyCamera:
        return self

    def __exit__(self, *exc) -> None:
        self.closed.set()
