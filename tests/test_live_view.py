"""The live page (``--output http://HOST:PORT``) on loopback: the real command serves the
annotated canvas as MJPEG and the numbers as Server-Sent Events; nothing is encoded without a
viewer; a viewer that never reads does not hold the loop up; bad input is one line; and in
a real browser (Chromium, headless, nothing outside 127.0.0.1 reachable) the picture moves,
the charts are drawn, four tabs load at once and the page recovers from a server restart
and from a network blip."""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
import pytest
from stream_fixtures import make_checkpoint, read_video
from typer.testing import CliRunner

from i2e_deploy.apps.stream import run_demo
from i2e_deploy.cli import app
from i2e_deploy.runtime.classify import Classifier
from i2e_deploy.runtime.frames import SourceState
from i2e_deploy.runtime.live import LiveSink, banner, parse_address
from i2e_deploy.runtime.loop import Stream
from i2e_deploy.runtime.overlay import STATE_BGR, annotate
from i2e_deploy.runtime.sources import DemoSource, open_source

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("model") / "model.pt")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class StreamProcess:
    """``i2e-deploy stream CKPT --source demo --loop --output http://127.0.0.1:PORT ...`` in
    its own process; ``url`` once its first line announced the page."""

    def __init__(self, checkpoint: Path, port: int, *extra: str):
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "i2e_deploy.cli",
                "stream",
                str(checkpoint),
                "--source",
                "demo",
                "--loop",
                "--backend",
                "torch",
                "--threads",
                "1",
                "--output",
                f"http://127.0.0.1:{port}",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        line = self._line(120)
        assert line.startswith("live view: http://127.0.0.1:"), line
        self.url = line.split()[-1]

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def _line(self, timeout: float) -> str:
        line = self.lines.get(timeout=timeout)
        self.output.append(line)
        return line

    def stop(self) -> str:
        """Ctrl-C, as a user would; the whole output."""
        self.process.send_signal(signal.SIGINT)
        assert self.process.wait(timeout=60) == 0, "\n".join(self.output)
        while True:
            try:
                self._line(5)
            except queue.Empty:
                break
        return "\n".join(self.output)


def connect(url: str, path: str, timeout: float = 60.0) -> http.client.HTTPResponse:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    connection.request("GET", path)
    return connection.getresponse()


def mjpeg_frames(response: http.client.HTTPResponse, count: int) -> list[np.ndarray]:
    """The next ``count`` pictures of a multipart/x-mixed-replace response, decoded."""
    boundary = response.headers["Content-Type"].split("boundary=")[1].encode()
    frames = []
    while len(frames) < count:
        line = response.fp.readline()
        assert line, "the image stream ended"
        if line.strip() != b"--" + boundary:
            continue
        headers = {}
        while (line := response.fp.readline().strip()) != b"":
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        assert headers["content-type"] == "image/jpeg"
        jpeg = response.fp.read(int(headers["content-length"]))
        frames.append(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))
    return frames


def sse_events(response: http.client.HTTPResponse, count: int) -> list[dict]:
    events = []
    while len(events) < count:
        line = response.fp.readline()
        assert line, "the event stream ended"
        if line.startswith(b"data: "):
            events.append(json.loads(line[6:]))
    return events


def test_stream_serves_frames_events_and_stats_beside_a_video(checkpoint, tmp_path):
    video = tmp_path / "out.mp4"
    stream = StreamProcess(checkpoint, free_port(), "--output", str(video), "--view-fps", "20")
    try:
        pictures = connect(stream.url, "/stream.mjpg")
        assert pictures.status == 200
        assert pictures.headers["Content-Type"].startswith("multipart/x-mixed-replace")
        first, second = mjpeg_frames(pictures, 2)
        events = connect(stream.url, "/events")
        assert events.headers["Content-Type"] == "text/event-stream"
        early, late = sse_events(events, 2)
        assert late["frames"] > early["frames"] > 0  # pushed live, not a fixed copy
        assert late["source_states"][0]["uri"] == "demo"
        assert late["source_states"][0]["status"] == "live"
        assert late["view"]["viewers"] == 1 and late["top"][0]["labels"]
        stats = json.loads(connect(stream.url, "/stats").read())
        assert stats["backend"] == "torch" and stats["latency_ms"]["p50"] > 0
        page = connect(stream.url, "/")
        assert page.status == 200 and b"stream.mjpg" in page.read()
        for path in ("/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/live.html", "//etc"):
            response = connect(stream.url, path)
            assert response.status == 404, path
            assert b"root:" not in response.read()
    finally:
        output = stream.stop()
    assert "interrupted:" in output and "Traceback" not in output
    # The run is over: the open viewer's picture stream ends.
    with pytest.raises((AssertionError, OSError, http.client.HTTPException)):
        mjpeg_frames(pictures, 50)
    # Both pictures are the whole annotated canvas (overlay + event view), and they move.
    canvas = annotate(*_first_demo_prediction(checkpoint))
    assert first.shape == second.shape == canvas.shape
    assert not np.array_equal(first, second)
    assert read_video(video)  # the other output was written alongside


def _first_demo_prediction(checkpoint: Path):
    classifier = Classifier(str(checkpoint), threads=1)
    with open_source("demo") as source:
        frame = next(iter(source))
        prediction = classifier(frame)
    classifier.close()
    return frame, prediction


def run_live(checkpoint: Path, frames: int, viewer=None) -> tuple[Stream, LiveSink, float]:
    """The loop over the demo clip (as fast as it goes) into a live page on a free port;
    ``viewer(url)`` is called once serving began. Returns the stream, the sink, seconds."""
    sink = LiveSink("http://127.0.0.1:0", view_fps=50)
    classifier = Classifier(str(checkpoint), threads=1)
    try:
        stream = Stream(classifier, [open_source("demo")], sink, max_frames=frames)
        if viewer is not None:
            viewer(sink.url)
        began = time.perf_counter()
        stream.run()
    finally:
        classifier.close()
    return stream, sink, time.perf_counter() - began


def test_nothing_is_encoded_without_a_viewer(checkpoint):
    stream, sink, _ = run_live(checkpoint, 20)
    assert stream.stats.frames == 20 and sink.encodes == 0


def test_a_viewer_that_never_reads_does_not_hold_up_the_loop(checkpoint):
    stalled: list[socket.socket] = []

    def never_reads(url: str) -> None:
        parts = urlsplit(url)
        viewer = socket.socket()
        viewer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        viewer.connect((parts.hostname, parts.port))
        viewer.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n")
        stalled.append(viewer)

    stream, sink, _ = run_live(checkpoint, 60, never_reads)
    try:
        assert stream.stats.frames == 60
        # A loop that waited on it would wait out the send timeout (10 s) in its sink stage
        # (its total time says little on a loaded box: the sink stage alone is timed here).
        sink_ms = stream.stats.stages["sink"]
        assert sink_ms.values[: sink_ms.count].max() < 1000
        # It was served (its pictures fill the socket buffers), never more than once a frame,
        assert 0 < sink.encodes <= 60
        # and the run closed its connection: the server is gone.
        stalled[0].settimeout(10)
        try:
            while stalled[0].recv(1 << 16):
                pass
        except ConnectionResetError:
            pass  # closed with pictures still unsent: as good as an end
        assert sink.viewers == 0 and not sink.sent
        assert not any(thread.is_alive() for thread in sink.threads)  # joined on close
    finally:
        stalled[0].close()


class LosesItsCamera(DemoSource):
    """The demo clip that, after a few frames, is lost: reconnecting until the run ends."""

    def __init__(self):
        super().__init__(loop=True)
        self.gone = threading.Event()

    def __iter__(self):
        for count, frame in enumerate(super().__iter__()):
            if count == 5:
                self.state = SourceState(
                    "reconnecting", attempt=3, attempts=-1, last_frame_at=time.time() - 4
                )
                self.gone.wait()
                return
            yield frame

    def interrupt(self) -> None:
        self.gone.set()


def test_sources_tile_into_one_picture_and_a_lost_one_shows_its_state(checkpoint):
    pictures: list[np.ndarray] = []
    states: list[dict] = []
    sink = LiveSink("http://127.0.0.1:0", view_fps=50)
    classifier = Classifier(str(checkpoint), threads=1)
    stream = Stream(classifier, [open_source("demo", loop=True), LosesItsCamera()], sink)

    def watch() -> None:
        response = connect(sink.url, "/stream.mjpg")
        deadline = time.time() + 60
        while time.time() < deadline and not states:
            state = json.loads(connect(sink.url, "/stats").read())["source_states"][1]
            if state["status"] == "reconnecting":
                states.append(state)
            time.sleep(0.1)
        # No new frames now: the picture is redrawn for the banner's age about once a
        # second; what was sent before the loss has drained after a few seconds.
        drained = time.time() + 3
        while time.time() < drained:
            pictures[:] = mjpeg_frames(response, 1)
        stream.request_stop()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        stream.run()
    finally:
        classifier.close()
        watcher.join()
    canvas = annotate(*_first_demo_prediction(checkpoint))
    (picture,) = pictures
    height, width = canvas.shape[:2]
    assert picture.shape == (height, 2 * width, 3)  # side by side, one stream
    live, lost = picture[:, :width].astype(int), picture[:, width:].astype(int)
    # The banner: a band of the reconnecting colour right across the tile.
    in_colour = np.abs(lost - STATE_BGR["reconnecting"]).max(axis=2) < 40
    assert in_colour.mean(axis=1).max() > 0.9
    assert lost.mean() < live.mean()  # dimmed: its last canvas, not a live one
    assert states[0]["attempt"] == 3 and states[0]["last_frame_age_s"] >= 4


def test_every_viewer_shares_one_encode_per_frame(checkpoint):
    readers: list[threading.Thread] = []
    got: list[int] = []

    def three_readers(url: str) -> None:
        def read() -> None:
            response = connect(url, "/stream.mjpg")
            count = 0
            try:
                while True:
                    mjpeg_frames(response, 1)
                    count += 1
            except (AssertionError, OSError, http.client.HTTPException):
                got.append(count)  # the run ended and closed it

        readers.extend(threading.Thread(target=read) for _ in range(3))
        for reader in readers:
            reader.start()

    stream, sink, seconds = run_live(checkpoint, 40, three_readers)
    for reader in readers:
        reader.join(timeout=30)
    assert len(got) == 3 and all(count > 0 for count in got)
    # Three viewers, one encode per picture: at most one a frame and within --view-fps.
    assert sink.encodes <= min(stream.stats.frames, 50 * seconds + 1)
    assert max(got) <= sink.encodes
    assert sink.viewers == 0 and not sink.sent  # nothing kept for viewers gone


def test_addresses_and_the_line_said_at_start():
    assert parse_address("http://:8080") == ("127.0.0.1", 8080)  # this machine only
    assert parse_address("http://0.0.0.0:8080/") == ("0.0.0.0", 8080)
    assert parse_address("http://[::1]:0") == ("::1", 0)
    assert banner("127.0.0.1", 8080) == "live view: http://127.0.0.1:8080/"
    assert banner("::1", 8080) == "live view: http://[::1]:8080/"
    network = banner("0.0.0.0", 8080)
    assert "every network interface" in network and f"{socket.gethostname()}:8080" in network
    assert "\n" not in network


def test_bad_live_outputs_are_one_line_before_the_model_loads(tmp_path):
    runner = CliRunner()
    missing = str(tmp_path / "no-model.pt")  # the port is checked first: this is never read
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = {
            f"http://127.0.0.1:{port}": "port in use",
            "http://no-such-host.invalid:8080": "unknown host",
            "http://127.0.0.1": "must be http://HOST:PORT",
            "http://127.0.0.1:99999": "port must be",
        }
        for uri, message in cases.items():
            result = runner.invoke(app, ["stream", missing, "-s", "demo", "-o", uri])
            assert result.exit_code == 2, (uri, result.output)
            assert message in result.output and "Traceback" not in result.output
            assert len(result.output.strip().splitlines()) == 1, result.output
    result = runner.invoke(
        app, ["stream", missing, "-s", "demo", "-o", "http://:0", "--view-fps", "0"]
    )
    assert result.exit_code == 2 and "--view-fps must be positive" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_headless_demo_with_a_live_page_still_writes_its_files(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    said: list[str] = []
    stats, outputs = run_demo(
        model=str(checkpoint),
        output=["http://127.0.0.1:0"],
        backend="torch",
        max_frames=3,
        threads=1,
        log=said.append,
    )
    assert said[0].startswith("model knows")  # the first line names the classes
    assert re.fullmatch(r"live view: http://127\.0\.0\.1:\d+/", said[1])
    assert outputs == ["http://127.0.0.1:0", "demo.mp4", "demo.jsonl"] and stats.frames == 3
    assert len(read_video(tmp_path / "demo.mp4")) == 3
    assert len((tmp_path / "demo.jsonl").read_text().splitlines()) == 3


# -- a real browser ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = "Chromium" if CHROMIUM is None else "Playwright" if sync_playwright is None else ""
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test, but {missing} is missing (see .ci/run)")
        pytest.skip(f"no {missing} here (apt-get install chromium; pip install playwright)")
    with sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=CHROMIUM,
            # Belt and braces beside the route below: no name but 127.0.0.1 resolves.
            args=["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"],
        )
        yield browser
        browser.close()


PICTURE = """() => {
  const img = document.getElementById('view');
  if (!img.naturalWidth) return null;
  const c = document.createElement('canvas'); c.width = 64; c.height = 32;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0, 64, 32);
  return Array.from(g.getImageData(0, 0, 64, 32).data).join(',');
}"""
INKED = """(id) => {
  const c = document.getElementById(id);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++;
  return n;
}"""


class BlipProxy:
    """A TCP relay on 127.0.0.1 to ``port``; :meth:`blip` makes every connection open now
    hang for good, as when a network drops them without a word (new ones pass)."""

    def __init__(self, port: int):
        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/"
        self.generation = 0
        self.sockets: list[socket.socket] = []
        self.closed = False
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)  # closing a socket does not wake a blocked accept
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(
                    target=self._pump, args=(a, b, self.generation), daemon=True
                ).start()

    def _pump(self, source: socket.socket, target: socket.socket, generation: int) -> None:
        source.settimeout(0.2)
        while not self.closed and generation == self.generation:
            try:
                data = source.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                target.shutdown(socket.SHUT_WR)
                return
            try:
                target.sendall(data)
            except OSError:
                return

    def blip(self) -> None:
        self.generation += 1

    def close(self) -> None:
        self.closed = True
        self.acceptor.join()
        self.listener.close()
        for sock in self.sockets:
            sock.close()


def wait_for_frozen_picture(page, timeout: float = 30.0) -> None:
    """The page's picture stops changing for two seconds."""
    still, before = time.time(), page.evaluate(PICTURE)
    deadline = time.time() + timeout
    while time.time() < deadline:
        page.wait_for_timeout(250)
        now = page.evaluate(PICTURE)
        if now != before:
            still, before = time.time(), now
        elif time.time() - still > 2:
            return
    raise AssertionError("the picture kept moving")


def wait_for_new_picture(page, timeout: float = 60.0) -> None:
    """The page's picture changes (the MJPEG stream moves), polled without a reload."""
    before = page.evaluate(PICTURE)
    deadline = time.time() + timeout
    while time.time() < deadline:
        page.wait_for_timeout(300)
        now = page.evaluate(PICTURE)
        if now is not None and now != before:
            return
    raise AssertionError("the picture did not move")


def test_browser_page_moves_charts_tabs_and_recovers_from_a_restart(chromium, checkpoint, tmp_path):
    port = free_port()
    outside: list[str] = []
    context = chromium.new_context(viewport={"width": 1280, "height": 720})

    def loopback_only(route) -> None:
        if urlsplit(route.request.url).hostname != "127.0.0.1":
            outside.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    context.route("**/*", loopback_only)
    stream = StreamProcess(checkpoint, port, "--activity")
    try:
        tabs = [context.new_page() for _ in range(4)]
        for tab in tabs:
            tab.goto(stream.url, wait_until="commit")
        for tab in tabs:  # all four load at once: each keeps its picture moving
            wait_for_new_picture(tab)
        page = tabs[0]
        page.wait_for_function("document.querySelectorAll('#numbers tr').length > 5")
        page.wait_for_timeout(2500)  # a few samples on the charts
        for chart in ("chart-fps", "chart-latency", "chart-rate"):
            assert page.evaluate(INKED, chart) > 100, chart
        assert "live" in page.inner_text("#sources")
        page.screenshot(path=str(tmp_path / "live_view.png"))
        page.evaluate("window.sameDocument = true")

        stream.stop()  # the server goes away and a new one comes up on the same port
        stream = StreamProcess(checkpoint, port, "--activity")
        wait_for_new_picture(page)
        assert page.evaluate("window.sameDocument === true")  # recovered without a reload

        # A network blip: the viewer's connections hang (no error, no close) and it recovers.
        proxy = BlipProxy(port)
        try:
            remote = context.new_page()
            remote.goto(proxy.url, wait_until="commit")
            wait_for_new_picture(remote)
            remote.evaluate("window.sameDocument = true")
            proxy.blip()
            wait_for_frozen_picture(remote)
            wait_for_new_picture(remote)
            assert remote.evaluate("window.sameDocument === true")
        finally:
            proxy.close()
    finally:
        stream.stop()
        context.close()
    assert outside == []
