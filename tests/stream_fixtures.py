"""Shared helpers for the stream tests: a small real model, videos, an MJPEG server."""

from __future__ import annotations

import http.server
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
