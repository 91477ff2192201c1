"""``stream`` as a service: stop signals end a live run cleanly and fast (real processes,
loopback MJPEG cameras), records readable while written, rotation, JSON event logs, the exit
codes, the systemd unit, and browser-playable recordings."""

from __future__ import annotations

import http.server
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import pytest
from stream_fixtures import (
    MjpegServer,
    _LocalServer,
    make_checkpoint,
    synthetic_frames,
    write_video,
)
from typer.testing import CliRunner

from i2e_deploy.apps.stream import run_stream
from i2e_deploy.cli import app
from i2e_deploy.runtime.service import EventLog, Rotation, parse_duration, parse_size
from i2e_deploy.runtime.sinks import h264_available
from i2e_deploy.runtime.sources import DemoSource

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "docs" / "service" / "i2e-deploy.service"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An exported graph: the stream processes start and exit without PyTorch."""
    from i2e_deploy.export.onnx import export_onnx

    folder = tmp_path_factory.mktemp("model")
    return export_onnx(make_checkpoint(folder / "model.pt"), output=folder / "model.onnx").path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", synthetic_frames(12))


class Camera(_LocalServer):
    """A loopback MJPEG camera streaming until closed. ``lost_after``: its first connection
    drops after that many frames and later ones hang unanswered (a camera gone: each
    reconnect attempt waits for FFmpeg's open timeout); ``hang``: every connection does."""

    def __init__(self, lost_after: int | None = None, fps: float = 20.0, hang: bool = False):
        jpegs = [
            cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))[1].tobytes()
            for f in synthetic_frames(8, size=(64, 48))
        ]
        self.closing = threading.Event()
        self.connections = 0
        camera = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                camera.connections += 1
                if hang or (lost_after is not None and camera.connections > 1):
                    camera.closing.wait()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                sent = 0
                try:
                    while not camera.closing.is_set() and sent != lost_after:
                        jpeg = jpegs[sent % len(jpegs)]
                        self.wfile.write(
                            b"--frame\r\nContent-Type: image/jpeg\r\n"
                            b"Content-Length: %d\r\n\r\n%s\r\n" % (len(jpeg), jpeg)
                        )
                        self.wfile.flush()
                        sent += 1
                        time.sleep(1 / fps)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        super().__init__(Handler, "cam.mjpg")

    def __exit__(self, *exc) -> None:
        self.closing.set()
        super().__exit__(*exc)


def whole_lines(path: Path) -> list[dict]:
    """The records of a .jsonl file, asserting it holds only whole lines that parse."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path.name} ends mid-line"
    return [json.loads(line) for line in data.decode().splitlines()]


def start_stream(model, sources, folder: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "i2e_deploy.cli", "stream", str(model)]
    for source in sources:
        command += ["--source", source]
    command += ["-o", str(folder / "p.jsonl"), "--json", str(folder / "stats.json")]
    command += ["--threads", "1", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_records(process, path: Path, count: int, until=lambda: True) -> None:
    """Until ``path`` holds ``count`` records (read as they are written: whole lines at
    every look) and ``until()``; fails if the process ends first."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if path.exists() and len(whole_lines(path)) >= count and until():
            return
        time.sleep(0.1)
    raise AssertionError(f"no {count} records in {path} within 120 s")


def stop_and_check(process, signum, folder: Path) -> dict:
    """Send ``signum``; the run must end within 5 s with exit 0, whole lines, its stats
    counting exactly the records written, and no temp file left."""
    began = time.monotonic()
    process.send_signal(signum)
    out, err = process.communicate(timeout=30)
    took = time.monotonic() - began
    assert process.returncode == 0, out + err
    assert took < 5.0, f"{signal.Signals(signum).name} took {took:.1f} s to end the run"
    assert "Traceback" not in err and "interrupted:" in out
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["interrupted"] and stats["frames"] == len(whole_lines(folder / "p.jsonl"))
    assert sorted(p.name for p in folder.iterdir()) == ["p.jsonl", "stats.json"]
    return stats


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_stop_signals_end_a_live_two_camera_stream_cleanly(model, tmp_path, signum):
    with Camera() as one, Camera() as two:
        process = start_stream(model, [one.url, two.url], tmp_path)
        wait_for_records(process, tmp_path / "p.jsonl", 6)
        stats = stop_and_check(process, signum, tmp_path)
    assert {r["source"] for r in whole_lines(tmp_path / "p.jsonl")} == {0, 1}
    assert stats["error"] is None


def test_sigterm_ends_the_run_fast_while_a_camera_is_reconnecting(model, tmp_path):
    with Camera() as steady, Camera(lost_after=40) as lost:
        process = start_stream(model, [steady.url, lost.url], tmp_path, "--reconnects", "10")
        # The lost camera's reconnect attempt hangs in FFmpeg's open when the signal comes.
        wait_for_records(process, tmp_path / "p.jsonl", 2, until=lambda: lost.connections >= 2)
        time.sleep(0.5)
        stop_and_check(process, signal.SIGTERM, tmp_path)


def test_sigterm_while_a_camera_opens_ends_the_command_cleanly(model, tmp_path):
    with Camera(hang=True) as camera:
        process = start_stream(model, [camera.url], tmp_path)
        deadline = time.monotonic() + 120
        while camera.connections == 0 and time.monotonic() < deadline:  # the model is loaded
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0 and "stopped before the stream started" in out, out + err
    assert not list(tmp_path.iterdir())


def test_a_run_killed_outright_leaves_whole_lines(model, tmp_path):
    with Camera() as camera:
        process = start_stream(model, [camera.url], tmp_path)
        wait_for_records(process, tmp_path / "p.jsonl", 4)
        process.kill()  # SIGKILL: no handler runs, nothing is flushed on the way out
        process.communicate(timeout=30)
    assert len(whole_lines(tmp_path / "p.jsonl")) >= 4


def test_rotation_segments_hold_whole_lines_and_every_frame(model, video, tmp_path):
    # .mp4: its muxer writes each frame out at once (WebM buffers seconds-long clusters, so
    # its size on disk, which rotation reads, lags by up to a cluster).
    preds, view = tmp_path / "p.jsonl", tmp_path / "v.mp4"
    stats = run_stream(
        model,
        [str(video)],
        [str(preds), str(view)],
        loop=True,
        max_frames=40,
        threads=1,
        rotate_bytes=1500,
    )
    segments = Rotation.segments(preds)
    assert len(segments) >= 4
    assert all(p.stat().st_size <= 1500 for p in segments)
    records = [r for path in [*segments, preds] for r in whole_lines(path)]
    assert len(records) == stats.frames == 40
    assert [r["frame"] for r in records] == [i % 12 for i in range(40)]  # in order, none lost
    videos = Rotation.segments(view)
    assert len(videos) >= 2
    frames = 0
    for path in [*videos, view]:  # each segment a whole, playable file
        capture = cv2.VideoCapture(str(path))
        count = 0
        while capture.read()[0]:
            count += 1
        capture.release()
        assert count > 0, path.name
        frames += count
    assert frames == 40
    assert not list(tmp_path.glob(".*"))  # no temp file left


def test_keep_bounds_the_segments_and_a_restart_keeps_the_last_run(model, video, tmp_path):
    preds = tmp_path / "p.jsonl"
    run_stream(model, [str(video)], [str(preds)], threads=1, rotate_bytes=10**6)
    first = whole_lines(preds)
    run_stream(model, [str(video)], [str(preds)], threads=1, rotate_bytes=10**6)  # restarted
    (segment,) = Rotation.segments(preds)  # the previous run's records, kept as a segment
    assert whole_lines(segment) == first and len(whole_lines(preds)) == 12
    options = dict(loop=True, max_frames=30, threads=1, rotate_bytes=1000, keep=2)
    run_stream(model, [str(video)], [str(preds)], **options)
    segments = Rotation.segments(preds)
    assert len(segments) == 2 and all(whole_lines(p) for p in segments)


def test_rotation_by_time(model, video, tmp_path):
    preds = tmp_path / "p.jsonl"
    stats = run_stream(
        model,
        [str(video)],
        [str(preds)],
        loop=True,
        fps=20,
        max_frames=30,
        threads=1,
        rotate_every_s=0.5,
    )
    segments = Rotation.segments(preds)
    assert len(segments) >= 2  # 30 frames at 20 FPS: 1.5 s
    assert sum(len(whole_lines(p)) for p in [*segments, preds]) == stats.frames


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rotate", "0"], "--rotate must be a positive size"),
        (["--rotate", "12XB"], "--rotate takes a size"),
        (["--rotate", "1MB", "--keep", "-1"], "--keep must be >= 0"),
        (["--keep", "3"], "--keep counts rotated segments"),
        (["--rotate-every", "0s"], "--rotate-every must be positive"),
        (["--rotate-every", "soon"], "--rotate-every takes a duration"),
        (["--log-format", "xml"], "--log-format must be text or json"),
        (["-o", "{file}/p.jsonl"], "cannot write"),
    ],
)
def test_bad_service_options_are_one_line_before_any_camera_opens(model, tmp_path, args, message):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    args = [a.format(file=a_file) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "p.jsonl")]
    with Camera() as camera:
        result = CliRunner().invoke(app, ["stream", str(model), "-s", camera.url, *args])
        assert camera.connections == 0
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written


def test_sizes_and_durations():
    assert parse_size("100MB") == 100_000_000 and parse_size("512KiB") == 512 * 1024
    assert parse_size("2048") == 2048 and parse_size("1.5GB") == 1_500_000_000
    assert parse_duration("1h") == 3600 and parse_duration("10m") == 600
    assert parse_duration("90") == 90 and parse_duration("1d") == 86400


def test_json_log_reports_reconnects_and_a_lost_camera_exits_3(model, tmp_path):
    with MjpegServer(frames_per_connection=15, connections=2) as camera:
        process = start_stream(model, [camera.url], tmp_path, "--log-format", "json")
        out, err = process.communicate(timeout=120)
    assert process.returncode == 3, err
    assert out == ""  # stdout stays free: every message is an event on stderr
    events = [json.loads(line) for line in err.splitlines()]  # every line one JSON object
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and "runner" in kinds and "reconnect" in kinds
    end = next(e for e in events if e["event"] == "end")
    assert end["stats"]["frames"] == len(whole_lines(tmp_path / "p.jsonl")) > 0
    assert end["stats"]["reconnects"] == 1
    assert events[-1]["event"] == "error" and events[-1]["exit_code"] == 3
    assert "did not come back" in events[-1]["message"]


def test_json_events_report_source_state_changes(capsys):
    source = DemoSource()  # its state is changed here as a capture thread would
    log = EventLog("json")
    with log.watch([source], every_s=0.02):
        source.state.status, source.state.attempt, source.state.attempts = "reconnecting", 1, 5
        time.sleep(0.2)
        source.reconnects, source.state.status = 1, "live"
        time.sleep(0.2)
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    seen = [(e["event"], e.get("status"), e.get("reconnects")) for e in events]
    assert seen[0] == ("source", "reconnecting", None) and events[0]["attempt"] == 1
    assert sorted(seen[1:]) == [("reconnect", None, 1), ("source", "live", None)]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_systemd_unit_verifies(tmp_path):
    # verify also checks that ExecStart's program exists: point it at this install's, the
    # only line that differs from machine to machine.
    program = Path(sys.executable).with_name("i2e-deploy")
    unit = tmp_path / UNIT.name
    text = UNIT.read_text()
    assert "/opt/i2e-deploy/.venv/bin/i2e-deploy" in text
    unit.write_text(text.replace("/opt/i2e-deploy/.venv/bin/i2e-deploy", str(program)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # Unknown keys and bad values are only warnings ("ignoring"): none may be printed.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )
    for key in ("KillSignal=SIGTERM", "TimeoutStopSec=", "Restart=on-failure", "User="):
        assert key in text


def fourcc(path: Path) -> str:
    capture = cv2.VideoCapture(str(path))
    code = int(capture.get(cv2.CAP_PROP_FOURCC))
    capture.release()
    return code.to_bytes(4, "little").decode().lower()


def count_frames(path: Path) -> tuple[int, tuple[int, int]]:
    capture = cv2.VideoCapture(str(path))
    count, size = 0, (0, 0)
    while True:
        ok, image = capture.read()
        if not ok:
            break
        count, size = count + 1, image.shape[1::-1]
    capture.release()
    return count, size


def test_webm_plays_back_and_mp4_is_h264_where_opencv_can_encode_it(model, video, tmp_path):
    webm, mp4 = tmp_path / "v.webm", tmp_path / "v.mp4"
    run_stream(model, [str(video)], [str(webm), str(mp4)], threads=1)
    frames, size = count_frames(webm)
    assert (frames, size) == count_frames(mp4) and frames == 12 and size[0] > 0
    assert fourcc(webm) == "vp80"
    # opencv-python-headless from PyPI has no H.264 encoder: .mp4 falls back to mp4v.
    assert fourcc(mp4) in (("avc1", "h264") if h264_available() else ("mp4v", "fmp4"))
