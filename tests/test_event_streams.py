"""Live event cameras through dv-processing, no mocks: a real DV network stream
(``dv.io.NetworkWriter`` on 127.0.0.1, in its own process, playing ../shared's AEDAT4
recording) classified by ``stream`` window by window exactly as the recording read as a file;
a sender lost mid-stream and replaced; Ctrl-C; the camera path with no camera; the extra
missing."""

from __future__ import annotations

import _thread
import importlib.util
import json
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from stream_fixtures import DVS, make_checkpoint
from typer.testing import CliRunner

from i2e_deploy.card import ModelCard
from i2e_deploy.cli import app
from i2e_deploy.errors import I2EError
from i2e_deploy.runtime.classify import Classifier
from i2e_deploy.runtime.event_sources import event_windows, events_to_frames
from i2e_deploy.runtime.loop import Stream
from i2e_deploy.runtime.sinks import JsonlSink
from i2e_deploy.runtime.sources import open_source

RECORDING = DVS / "sample.aedat4"
SENDER = Path(__file__).with_name("dv_sender.py")
WINDOW_MS = 20
WINDOW_US = WINDOW_MS * 1000

needs_stream = pytest.mark.skipif(
    not RECORDING.is_file() or importlib.util.find_spec("dv_processing") is None,
    reason="needs dv-processing and ../shared/data/dvs/sample.aedat4",
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("live") / "dvs_live.pt", events=True)


@pytest.fixture(scope="module")
def model(checkpoint):
    with Classifier(str(checkpoint), threads=1) as classifier:
        yield classifier


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Sender:
    """``dv_sender.py`` in its own process: a DV network stream of batches [first, last) of
    the recording."""

    def __init__(self, port: int, first: int, last: int, linger_s: float = 1.5):
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(SENDER),
                str(RECORDING),
                str(port),
                str(first),
                str(last),
                str(linger_s),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )

    def line(self, timeout_s: float = 60.0) -> str:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        assert ready, "the sender said nothing"
        return self.process.stdout.readline().strip()

    def listening(self) -> Sender:
        assert self.line() == "listening"
        return self

    def sent(self) -> tuple[int, int]:
        words = self.line().split()
        assert words[0] == "sent", words
        return int(words[1]), int(words[2])

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()


class Recording:
    """The recording read as a file, through dv-processing's own time-range query."""

    def __init__(self):
        import dv_processing as dv

        self.file = dv.io.MonoCameraRecording(str(RECORDING))
        self.sensor = self.file.getEventResolution()
        self.batches = []  # (first, last timestamp, events) per batch, as the sender sends them
        while (batch := self.file.getNextEventBatch()) is not None:
            self.batches.append((batch.getLowestTime(), batch.getHighestTime(), len(batch)))

    def windows(self, first: int, last: int) -> int:
        """How many windows of event time batches [first, last) span."""
        return (self.batches[last - 1][1] - self.batches[first][0]) // WINDOW_US + 1

    def events(self, first: int, last: int) -> int:
        return sum(n for _, _, n in self.batches[first:last])

    def prediction(self, model: Classifier, start: int, end: int):
        events = self.file.getEventsTimeRange(start, end).numpy()
        frames = events_to_frames(
            events["x"], events["y"], events["polarity"], self.sensor, model.card
        )
        return model.classify([frames])[0]


def check_windows(
    records: list[dict], recording: Recording, model: Classifier, connections: list[tuple[int, int]]
) -> None:
    """Every classified window lies on the event-time grid of its connection (anchored at its
    first event; frame numbers count the dropped windows too) and has the prediction of the
    same time window of the recording."""
    assert records
    first_frame = checked = 0
    for first, last in connections:
        anchor, end_of_data = recording.batches[first][0], recording.batches[last - 1][1]
        mine = [r for r in records if anchor <= r["window_us"][0] <= end_of_data]
        for record in mine:
            start, end = record["window_us"]
            step, offset = divmod(start - anchor, WINDOW_US)
            assert offset == 0 and record["frame"] == first_frame + step
            assert end == min(start + WINDOW_US, end_of_data + 1)
            expected = recording.prediction(model, start, end)
            assert [top["class"] for top in record["top"]] == expected.indices.tolist()
            np.testing.assert_allclose(
                [top["prob"] for top in record["top"]], expected.probs, atol=2e-6
            )
        first_frame += recording.windows(first, last)
        checked += len(mine)
    assert checked == len(records)


def test_windows_follow_event_time_whatever_the_batches():
    t = np.array([100, 150, 1099, 1100, 1200, 4300, 4301])  # no events in 2100..4099
    columns = (t, np.arange(7), np.arange(7) * 2, np.arange(7) % 2)
    expected = [
        (100, 1100, [100, 150, 1099]),
        (1100, 2100, [1100, 1200]),
        (2100, 3100, []),
        (3100, 4100, []),
        (4100, 4302, [4300, 4301]),
    ]  # the last ends after its event
    for cuts in ([], [1], [2, 3], [1, 2, 3, 4, 5, 6]):  # one batch, ..., one event per batch
        batches = [
            tuple(np.split(column, cuts)[k] for column in columns) for k in range(len(cuts) + 1)
        ]
        windows = list(event_windows(batches, 1000))
        assert [(w.start_us, w.end_us, w.t.tolist()) for w in windows] == expected
        assert [w.x.tolist() for w in windows] == [[0, 1, 2], [3, 4], [], [], [5, 6]]
        assert [w.y.tolist() for w in windows][0] == [0, 2, 4]
    assert list(event_windows([], 1000)) == []


@needs_stream
def test_stream_classifies_a_dv_stream_as_the_recording_it_plays(checkpoint, model, tmp_path):
    recording = Recording()
    everything = len(recording.batches)
    port = free_port()
    preds, stats_json = tmp_path / "preds.jsonl", tmp_path / "stats.json"
    with Sender(port, 0, everything).listening() as sender:
        result = CliRunner().invoke(
            app,
            [
                "stream",
                str(checkpoint),
                "--source",
                f"dv://127.0.0.1:{port}",
                "--output",
                str(preds),
                "--json",
                str(stats_json),
                "--window-ms",
                str(WINDOW_MS),
                "--reconnects",
                "0",
                "--threads",
                "1",
                "--backend",
                "torch",
            ],
        )
        assert sender.sent() == (everything, recording.events(0, everything))
    assert result.exit_code == 0, result.output
    first, last = result.stdout.strip().splitlines()
    assert first == "runner: PyTorch fp32 on cpu (--backend torch)"
    assert last.startswith("done:")  # the end of the stream is a clean stop
    stats = json.loads(stats_json.read_text())
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    assert stats["sources"] == [f"dv://127.0.0.1:{port}"] and stats["error"] is None
    assert stats["frames"] == len(records)
    # The burst comes faster than the model classifies: the newest window wins, and every
    # window of the recording was either classified or counted as dropped.
    assert stats["frames"] + stats["dropped"] == recording.windows(0, everything) == 30
    assert stats["dropped"] > 0 and stats["reconnects"] == 0
    check_windows(records, recording, model, [(0, everything)])


@needs_stream
def test_a_sender_lost_mid_stream_is_reconnected(model, tmp_path):
    recording = Recording()
    everything = len(recording.batches)
    half = everything // 2
    port = free_port()
    preds = tmp_path / "preds.jsonl"
    # The second sender takes the port as soon as the first one, cut after half the
    # recording, lets it go.
    with Sender(port, 0, half).listening() as first, Sender(port, half, everything) as second:
        source = open_source(
            f"dv://127.0.0.1:{port}",
            card=model.card,
            window_ms=WINDOW_MS,
            reconnect_attempts=3,
            backoff_s=0.25,
        )
        stats = Stream(model, [source], JsonlSink(preds)).run()
        assert first.sent() == (half, recording.events(0, half))
        assert second.listening().sent() == (everything - half, recording.events(half, everything))
    assert stats.error is None and not stats.interrupted
    assert stats.reconnects == 1
    windows = recording.windows(0, half) + recording.windows(half, everything)
    assert stats.frames + stats.dropped == windows
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(records) == stats.frames
    check_windows(records, recording, model, [(0, half), (half, everything)])


class CtrlCAfterFirst(JsonlSink):
    """The user presses Ctrl-C once the first prediction is out."""

    def write(self, frame, prediction, canvas) -> None:
        super().write(frame, prediction, canvas)
        _thread.interrupt_main()


@needs_stream
def test_ctrl_c_stops_a_live_stream_at_once(model, tmp_path):
    recording = Recording()
    port = free_port()
    # The sender stays connected, silent after its burst, far longer than the test.
    with Sender(port, 0, len(recording.batches), linger_s=120).listening() as sender:
        source = open_source(f"dv://127.0.0.1:{port}", card=model.card, window_ms=WINDOW_MS)
        stream = Stream(model, [source], CtrlCAfterFirst(tmp_path / "p.jsonl"))
        stats = stream.run()
        # Polling stopped: the capture thread ended although the stream is still connected.
        assert not any(capture.is_alive() for capture in stream.captures)
        assert sender.process.poll() is None
    assert stats.interrupted and stats.error is None
    # The sink was closed: the prediction written before Ctrl-C is published.
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) >= 1


@needs_stream
def test_unreachable_or_foreign_servers_fail_in_one_line(model):
    port = free_port()  # nobody listens there
    with pytest.raises(I2EError, match=r"cannot connect to dv://127\.0\.0\.1:\d+: .*running"):
        open_source(f"dv://127.0.0.1:{port}", card=model.card)
    # A server that does not speak DV's protocol: NetworkReader alone would wait forever.
    with socket.create_server(("127.0.0.1", 0)) as server:

        def answer_like_a_web_server():
            connection, _ = server.accept()
            with connection:
                connection.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello")

        threading.Thread(target=answer_like_a_web_server, daemon=True).start()
        uri = f"dv://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(I2EError, match="not a DV event stream"):
            open_source(uri, card=model.card, timeout_s=10)
    for uri in ("dv://127.0.0.1", "dv://:7777", "dv://host:port"):
        with pytest.raises(I2EError, match="dv://HOST:PORT"):
            open_source(uri, card=model.card)


def test_live_event_sources_need_an_event_model():
    for uri in ("dv://127.0.0.1:7777", "dvs:"):
        with pytest.raises(I2EError, match="live event camera; it needs an event-input model"):
            open_source(uri, card=ModelCard())


def test_camera_path_without_a_camera_fails_in_one_line(checkpoint):
    dv = pytest.importorskip("dv_processing")
    if dv.io.camera.discover():
        pytest.skip("an iniVation camera is connected")
    for uri in ("dvs:", "dvs:DXA00093"):
        result = CliRunner().invoke(
            app, ["stream", str(checkpoint), "--source", uri, "--output", "none"]
        )
        assert result.exit_code == 2
        assert result.stderr.startswith("error: no iniVation camera connected")
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("source", ["dv://127.0.0.1:7777", "dvs:", "recording.aedat4"])
def test_without_dv_processing_the_error_names_the_extra_literally(
    source, checkpoint, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "dv_processing", None)  # import fails, as when absent
    monkeypatch.chdir(tmp_path)
    Path("recording.aedat4").write_bytes(b"#!AER-DAT4.0\r\n")
    result = CliRunner().invoke(
        app, ["stream", str(checkpoint), "--source", source, "--output", "none"]
    )
    assert result.exit_code == 2
    # One line, brackets and quotes intact (rich markup would have eaten "[events]").
    assert result.stderr == (
        "error: AEDAT4 files, iniVation cameras and DV network streams "
        "need dv-processing: pip install 'i2e-deploy[events]'\n"
    )
