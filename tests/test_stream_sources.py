"""Sources: the bundled demo clip, event recordings (real DVS files from ../shared), the
count-based slicing into T frames, and a network camera that is lost mid-stream."""

from __future__ import annotations

import json

import numpy as np
import pytest
from stream_fixtures import (
    DVS,
    FileServer,
    MjpegServer,
    make_checkpoint,
    synthetic_frames,
    write_video,
)

from i2e_deploy.apps.stream import run_stream
from i2e_deploy.card import ModelCard
from i2e_deploy.errors import I2EError
from i2e_deploy.runtime.classify import Classifier
from i2e_deploy.runtime.event_sources import events_to_frames
from i2e_deploy.runtime.loop import Stream
from i2e_deploy.runtime.sinks import NullSink
from i2e_deploy.runtime.sources import DemoSource, open_source


def test_demo_clip_is_real_moving_and_deterministic():
    source = open_source("demo")
    assert isinstance(source, DemoSource)
    frames = list(source)
    assert len(frames) == len(source) >= 60  # a few seconds at 15 FPS
    assert frames[0].image.shape == (240, 320, 3) and frames[0].image.dtype == np.uint8
    again = list(open_source("demo"))
    assert all(np.array_equal(a.image, b.image) for a, b in zip(frames, again))
    # The camera moves: consecutive frames differ, but less than frames of different photos.
    step = np.abs(frames[1].image.astype(int) - frames[0].image).mean()
    cut = np.abs(frames[-1].image.astype(int) - frames[0].image).mean()
    assert 0 < step < cut
    assert frames[0].image.std() > 20  # a photograph, not a flat synthetic field
    small = list(open_source("demo", resolution="160x120", stride=3))
    assert len(small) == -(-len(frames) // 3) and small[0].image.shape == (120, 160, 3)


def test_count_slicing_matches_spikingjelly_split_by_number():
    card = ModelCard(input="events", imgsz=32, resize=32)
    # 20 events on a 64x32 sensor: slices of 20 // 8 = 2 events, the last takes 6.
    x = np.arange(20) * 3
    y = np.full(20, 5)
    p = np.arange(20) % 2
    frames = events_to_frames(x, y, p, (64, 32), card)
    assert frames.shape == (8, 2, 32, 32) and frames.dtype == np.uint8
    # Sensor 64x32 -> shorter side 32 (scale 1), centre crop 32 of width 64: columns 16..47.
    expected = np.zeros_like(frames)
    slice_of = [min(i // 2, 7) for i in range(20)]
    for i in range(20):
        col = x[i] - 16
        if 0 <= col < 32:
            expected[slice_of[i], 0 if p[i] else 1, 5, col] = 1
    np.testing.assert_array_equal(frames, expected)
    # Repeated events at one pixel integrate and clip to 1.
    twice = events_to_frames(np.full(16, 20), np.full(16, 3), np.ones(16), (64, 32), card)
    assert twice.max() == 1 and twice[:, 0, 3, 4].tolist() == [1] * 8


@pytest.fixture(scope="module")
def event_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("dvs") / "dvs_model.pt", events=True)


def event_card():
    return ModelCard(input="events", imgsz=32, resize=32)


@pytest.mark.skipif(not (DVS / "sample_nmnist.bin").is_file(), reason="../shared DVS data absent")
def test_nmnist_reader_on_a_real_recording():
    source = open_source(str(DVS / "sample_nmnist.bin"), card=event_card(), window_ms=1000)
    windows = list(source)
    assert len(windows) == 1  # the whole 0.31 s saccade sequence
    events = windows[0].events
    assert events.shape == (8, 2, 32, 32) and set(np.unique(events)) == {0, 1}
    assert events[:, 0].sum() > 0 and events[:, 1].sum() > 0  # both polarities
    raw = np.fromfile(DVS / "sample_nmnist.bin", np.uint8).reshape(-1, 5)
    assert len(raw) == 4325 and raw[:, 0].max() < 34 and raw[:, 1].max() < 34


@pytest.mark.parametrize(
    "name, package, window_ms",
    [("sample.aedat4", "dv_processing", 100), ("evt3_sample.raw", "expelliarmus", 20)],
)
def test_event_recordings_stream_through_an_event_model(
    name, package, window_ms, event_checkpoint, tmp_path
):
    pytest.importorskip(package)
    path = DVS / name
    if not path.is_file():
        pytest.skip("../shared DVS data absent")
    windows = list(open_source(str(path), card=event_card(), window_ms=window_ms))
    assert len(windows) >= 2
    for window in windows:
        assert window.events.shape == (8, 2, 32, 32)
        assert window.events.max() == 1 and window.image.ndim == 3
    preds = tmp_path / "p.jsonl"
    stats = run_stream(
        str(event_checkpoint),
        [str(path)],
        [str(preds), str(tmp_path / "v.mp4")],
        window_ms=window_ms,
        threads=1,
    )
    assert stats.error is None and stats.frames == len(windows)
    assert len(preds.read_text().splitlines()) == len(windows)


def test_event_recording_needs_an_event_model(tmp_path):
    (tmp_path / "r.bin").write_bytes(bytes(10))
    with pytest.raises(I2EError, match="event-input model"):
        open_source(str(tmp_path / "r.bin"), card=ModelCard())


def test_event_model_watches_a_camera_through_i2e(event_checkpoint):
    # An event-input model fed ordinary frames gets I2E events of the card's crop.
    model = Classifier(str(event_checkpoint), threads=1)
    frame = next(iter(open_source("demo")))
    prediction = model(frame)
    assert prediction.model_input.shape == (8, 2, 32, 32)
    assert prediction.events is prediction.model_input


def test_lost_network_camera_reconnects_then_fails_clearly(event_checkpoint, tmp_path):
    model = Classifier(str(make_checkpoint(tmp_path / "m.pt")), threads=1)
    with MjpegServer(frames_per_connection=5, connections=2) as camera:
        source = open_source(camera.url, reconnect_attempts=2, backoff_s=0.05, timeout_s=2)
        stats = Stream(model, [source], NullSink(), latest=False).run()
    assert stats.reconnects == 1  # the first drop: reopened, and it came back
    assert stats.frames == 10
    assert "lost" in stats.error and "2 reconnect attempts" in stats.error
    assert json.dumps(stats.to_dict())  # stats stay serialisable with an error in them


def test_video_file_over_http_ends_instead_of_reconnecting(tmp_path):
    video = write_video(tmp_path / "clip.mp4", synthetic_frames(9))
    with FileServer(video) as server:
        source = open_source(server.url, reconnect_attempts=1, backoff_s=0.05)
        frames = list(source)
    assert len(frames) == 9 and source.reconnects == 0
