"""Live sources that survive, on real loopback servers (``FlakyCamera``: MJPEG over HTTP or
plain TCP through FFmpeg): a camera that stalls, refuses connections and comes back never
holds the healthy one back; ``--reconnects -1`` outlasts a 20 s outage; a camera lost for good
ends alone, in one line; sources' states reach the stats, the records and the overlay; and a
source that cannot open is reported before any runner is chosen."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from stream_fixtures import FlakyCamera, make_checkpoint, synthetic_frames, write_video
from typer.testing import CliRunner

from i2e_deploy.apps.stream import run_stream
from i2e_deploy.cli import app
from i2e_deploy.errors import I2EError
from i2e_deploy.runtime.classify import Classifier
from i2e_deploy.runtime.frames import Source, SourceState
from i2e_deploy.runtime.loop import Stream
from i2e_deploy.runtime.options import StreamOptions
from i2e_deploy.runtime.overlay import STATE_BGR, draw_source_state
from i2e_deploy.runtime.sinks import JsonlSink, MultiSink, Sink
from i2e_deploy.runtime.sources import open_source

# The healthy camera's longest wait for a result while the other one is away.
MAX_GAP_S = 1.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("faults") / "model.pt")


@pytest.fixture(scope="module")
def model(checkpoint):
    with Classifier(str(checkpoint), threads=1) as classifier:
        yield classifier


class Results(Sink):
    """When each source's results came out (monotonic seconds)."""

    def __init__(self):
        self.times: dict[int, list[float]] = {}

    def write(self, frame, prediction, canvas) -> None:
        self.times.setdefault(frame.source, []).append(time.monotonic())

    def count(self, source: int, since: float = 0.0) -> int:
        return sum(t > since for t in self.times.get(source, []))


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def longest_gap(times: list[float]) -> float:
    return float(np.diff(times).max())


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("protocol", ["http", "tcp"])
def test_a_camera_that_stalls_refuses_and_returns_never_holds_the_other_back(
    protocol, model, tmp_path
):
    results, preds = Results(), tmp_path / "preds.jsonl"
    seen: dict[str, dict] = {}
    with FlakyCamera("http") as healthy, FlakyCamera(protocol) as flaky:
        sources = [
            open_source(camera.url, reconnect_attempts=8, backoff_s=0.2, timeout_s=1)
            for camera in (healthy, flaky)
        ]
        stream = Stream(model, sources, MultiSink([JsonlSink(preds), results]))

        def outage():
            try:
                assert wait_for(lambda: results.count(1) >= 5, 10)
                flaky.stall()  # silent: the read timeout (1 s) notices
                assert wait_for(lambda: sources[1].state.status == "reconnecting", 5)
                time.sleep(0.8)  # a reconnect attempt meets the hung camera (open timeout)
                flaky.refuse()
                time.sleep(1.5)
                seen["down"] = stream.stats.to_dict()  # what a live view sees meanwhile
                seen["back_at"] = {"t": time.monotonic()}
                flaky.serve()
                wait_for(lambda: results.count(1, since=seen["back_at"]["t"]) >= 5, 10)
            finally:
                stream.request_stop()

        control = threading.Thread(target=outage)
        control.start()
        stats = stream.run()
        control.join()
    assert stats.error is None and not stats.interrupted
    back = seen["back_at"]["t"]
    assert results.count(1, since=back) >= 5, "the camera came back, its results did not"
    healthy_times = results.times[0]
    assert healthy_times[0] < back - 3 < back + 1 < healthy_times[-1]
    assert longest_gap(healthy_times) < MAX_GAP_S
    assert stats.reconnects >= 1 and sources[1].reconnects == stats.reconnects
    down = seen["down"]["per_source"]
    assert [s["uri"] for s in down] == [healthy.url, flaky.url]
    assert down[0]["status"] == "live" and down[0]["attempts"] == 8
    assert down[1]["status"] == "reconnecting"
    assert 1 <= down[1]["attempt"] and down[1]["attempts"] == 8
    assert down[1]["last_frame_age_s"] > 2
    end = stats.to_dict()["per_source"]
    assert [s["status"] for s in end] == ["live", "live"] and end[1]["reconnects"] >= 1
    records = read_jsonl(preds)
    assert len(records) == stats.frames
    assert all(r["latency_ms"] >= 0 and r["captured_at"] > 0 for r in records)
    # While the flaky camera was away, the healthy camera's records say so.
    degraded = [r["degraded"] for r in records if "degraded" in r]
    assert degraded and all(r["source"] == 0 for r in records if "degraded" in r)
    assert {d[0]["status"] for d in degraded} == {"reconnecting"}
    assert max(d[0]["attempt"] for d in degraded) >= 2


@pytest.mark.slow
def test_reconnects_forever_outlasts_a_20_s_outage(model, tmp_path):
    results, preds = Results(), tmp_path / "preds.jsonl"
    timeline: dict[str, float] = {}
    with FlakyCamera("http") as healthy, FlakyCamera("tcp") as flaky:
        # What --reconnects -1 --timeout 2 opens (StreamOptions.reconnects -> run_stream).
        sources = [
            open_source(camera.url, reconnect_attempts=-1, timeout_s=2)
            for camera in (healthy, flaky)
        ]
        stream = Stream(model, sources, MultiSink([JsonlSink(preds), results]))

        def outage():
            try:
                wait_for(lambda: results.count(1) >= 5, 10)
                flaky.refuse()
                timeline["down"] = time.monotonic()
                time.sleep(20)
                flaky.serve()
                timeline["up"] = time.monotonic()
                # Backoff is capped at 10 s: the attempt after the outage reconnects.
                wait_for(lambda: results.count(1, since=timeline["up"]) >= 5, 15)
            finally:
                stream.request_stop()

        control = threading.Thread(target=outage)
        control.start()
        stats = stream.run()
        control.join()
    assert stats.error is None
    assert [s["status"] for s in stats.to_dict()["per_source"]] == ["live", "live"]
    assert sources[1].reconnects == 1 and sources[0].reconnects == 0
    flaky_times = results.times[1]
    assert results.count(1, since=timeline["up"]) >= 5
    assert not any(timeline["down"] + 0.5 < t < timeline["up"] for t in flaky_times)
    healthy_times = results.times[0]
    assert healthy_times[0] < timeline["down"] and healthy_times[-1] > timeline["up"]
    assert longest_gap(healthy_times) < MAX_GAP_S
    # More attempts than the default 5, each one of "for ever" (-1), in the records.
    degraded = [d for r in read_jsonl(preds) for d in r.get("degraded", [])]
    assert {d["attempts"] for d in degraded} == {-1}
    assert max(d["attempt"] for d in degraded) >= 5


def test_a_camera_lost_for_good_ends_alone_in_one_line(checkpoint, tmp_path):
    """The rule: the others go on; the run ends when every source has ended or is lost;
    the exit code is 2 if any was lost."""
    video = write_video(tmp_path / "clip.mp4", synthetic_frames(30))
    preds, stats_json = tmp_path / "preds.jsonl", tmp_path / "stats.json"
    with FlakyCamera("http") as camera:

        def lose():
            wait_for(lambda: camera.sent >= 10, 20)
            camera.refuse()  # for good

        threading.Thread(target=lose, daemon=True).start()
        result = CliRunner().invoke(
            app,
            [
                "stream",
                str(checkpoint),
                *("--source", str(video), "--fps", "10"),  # a 3 s recording, played live
                *("--source", camera.url, "--reconnects", "1", "--timeout", "1"),
                *("--output", str(preds), "--json", str(stats_json)),
                *("--backend", "torch", "--threads", "1"),
            ],
        )
    assert result.exit_code == 3  # a source lost for good: a restart policy may retry
    lost = f"stream {camera.url} was lost and did not come back after 1 reconnect attempts"
    assert result.stderr == f"error: {lost}\n" and "Traceback" not in result.output
    # Progress: the runner, the loss when it happens (the recording goes on), the summary.
    runner, note, summary = result.stdout.splitlines()
    assert runner.startswith("runner: ") and note == f"{lost}; 1 other source(s) go on"
    assert summary.startswith("stopped by error: ") and "| source 1 lost" in summary
    stats = json.loads(stats_json.read_text())
    assert [s["status"] for s in stats["per_source"]] == ["ended", "lost"]
    assert stats["per_source"][1]["error"] == lost and stats["error"] == lost
    records = read_jsonl(preds)
    # The recording went on to its end after the camera was lost.
    recording = [r for r in records if r["source"] == 0]
    assert recording[-1]["frame"] == 29
    assert recording[-1]["degraded"] == [
        {
            "source": 1,
            "status": "lost",
            "attempt": 1,
            "attempts": 1,
            "last_frame_age_s": recording[-1]["degraded"][0]["last_frame_age_s"],
            "error": lost,
        }
    ]


def test_sources_that_cannot_open_are_reported_before_a_runner(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("I2E_CACHE", str(tmp_path / "cache"))
    notes: list[str] = []
    with FlakyCamera("http") as camera:
        for sources, message in (
            (["demo", str(tmp_path / "missing.mp4")], "source not found"),
            ([camera.url, "dv://127.0.0.1:7777"], "needs an event-input model"),
        ):
            with pytest.raises(I2EError, match=message):
                run_stream(str(checkpoint), sources, ["none"], backend="onnx", log=notes.append)
    assert notes == [] and not (tmp_path / "cache").exists()  # no runner, no export


def test_reconnects_take_minus_one_for_ever_and_refuse_less(checkpoint):
    assert StreamOptions(reconnects=-1).check().reconnects == -1
    result = CliRunner().invoke(
        app,
        ["stream", str(checkpoint), "--source", "demo", "-o", "none", "--max-frames", "2"]
        + ["--reconnects", "-1", "--backend", "torch", "--threads", "1"],
    )
    assert result.exit_code == 0 and result.stdout.splitlines()[-1].startswith("done: 2 frames")
    for flag, value, message in (
        ("--reconnects", "-2", "--reconnects must be >= 0, or -1 for ever, got -2"),
        ("--timeout", "0", "--timeout must be positive, got 0.0"),
    ):
        result = CliRunner().invoke(
            app, ["stream", str(checkpoint), "--source", "demo", "-o", "none", flag, value]
        )
        assert result.exit_code == 2 and result.stderr == f"error: {message}\n"


def test_backoff_doubles_and_a_good_frame_resets_it():
    source = Source("cam")
    failures = iter([None, None, None, "opened"])
    began = time.monotonic()
    opened = source._retry(lambda: next(failures), -1, 0.05, threading.Event())
    took = time.monotonic() - began
    assert opened == "opened" and source.reconnects == 1
    assert 0.05 + 0.1 + 0.2 + 0.4 <= took < 0.75 + 0.5
    assert source.state.status == "reconnecting" and source.state.attempt == 4
    source._delivered()
    assert (source.state.status, source.state.attempt) == ("live", 0)
    # Out of attempts: lost; the count went on from where it was.
    assert source._retry(lambda: None, 2, 0.01, threading.Event()) is None
    assert (source.state.status, source.state.attempt) == ("lost", 2)


def test_overlay_banner_for_a_source_that_is_not_live():
    now = time.time()
    waiting = SourceState("reconnecting", attempt=3, attempts=-1, last_frame_at=now - 4.2)
    assert waiting.describe(now) == "reconnecting (attempt 3), last frame 4.2 s old"
    gone = SourceState("lost", 5, 5, now - 30, "stream x was lost")
    assert gone.describe(now) == "lost: stream x was lost, last frame 30.0 s old"
    picture = np.full((240, 320, 3), 200, np.uint8)
    canvas = draw_source_state(picture, waiting, now)
    assert canvas is picture and canvas.shape == (240, 320, 3)
    assert (canvas[120] == STATE_BGR["reconnecting"]).all(axis=1).any()  # the banner
    assert (canvas[5] < 200).all()  # the picture behind is dimmed
