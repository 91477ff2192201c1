"""The streaming loop end to end, headless: video in, predictions JSONL + annotated video +
stats out, checked against the runner run directly on the same frames."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from stream_fixtures import BIKES, make_checkpoint, read_video, synthetic_frames, write_video
from typer.testing import CliRunner

from i2e_deploy.apps.stream import run_demo, run_stream
from i2e_deploy.card import CIFAR10_CLASSES
from i2e_deploy.cli import app
from i2e_deploy.compare import compare, limits_for
from i2e_deploy.errors import I2EError
from i2e_deploy.images import preprocess
from i2e_deploy.runtime.classify import Classifier
from i2e_deploy.runtime.loop import Stream
from i2e_deploy.runtime.outputs import open_sink
from i2e_deploy.runtime.runners import load_runner
from i2e_deploy.runtime.sinks import NullSink
from i2e_deploy.runtime.sources import open_source
from i2e_deploy.runtime.stats import Ring

N_FRAMES = 12
# One thread: on a shared 2-core box, OpenMP spinning on 2 threads is many times slower.
THREADS = 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    """One export cache for the module: the checkpoint is exported to ONNX at most once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", synthetic_frames(N_FRAMES))


def stream(checkpoint, sources, outputs, **options):
    """PyTorch unless a test asks for another backend: these tests check the loop against
    the runner itself (``--backend auto`` is tested on its own)."""
    options.setdefault("backend", "torch")
    return run_stream(str(checkpoint), sources, outputs, threads=THREADS, **options)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stream_video_to_jsonl_video_and_stats(checkpoint, video, tmp_path):
    out, preds, stats_path = tmp_path / "out.mp4", tmp_path / "preds.jsonl", tmp_path / "s.json"
    stats = stream(
        checkpoint, [str(video)], [str(out), str(preds)], topk=3, stats_json=str(stats_path)
    )
    assert stats.error is None and stats.frames == N_FRAMES

    # Predictions: one per frame, equal to the runner applied directly to the decoded frames.
    records = read_jsonl(preds)
    assert [r["frame"] for r in records] == list(range(N_FRAMES))
    runner = load_runner(checkpoint, threads=THREADS)
    decoded = read_video(video)
    direct = runner.infer(np.stack([preprocess(f, runner.card) for f in decoded]))
    probs = np.exp(direct - direct.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for record, p in zip(records, probs):
        top = record["top"]
        assert len(top) == 3
        assert [t["class"] for t in top] == list(np.argsort(-p)[:3])
        assert top[0]["label"] == CIFAR10_CLASSES[top[0]["class"]]
        assert top[0]["prob"] == pytest.approx(p.max(), abs=1e-5)

    # Annotated video: every frame, frame panel scaled to 256 px high + 2x4 event tiles.
    annotated = read_video(out)
    assert len(annotated) == N_FRAMES
    height, width = annotated[0].shape[:2]
    assert height == 256 and width == 96 * 256 // 64 + 4 * 128

    saved = json.loads(stats_path.read_text())
    assert saved["frames"] == N_FRAMES and saved["fps"] > 0
    assert 0 < saved["latency_ms"]["p50"] <= saved["latency_ms"]["p99"]
    assert set(saved["stages_ms"]) == {"capture", "preprocess", "infer", "overlay", "sink"}
    assert saved["stages_ms"]["infer"] > 0 and saved["stages_ms"]["overlay"] > 0
    assert saved["dropped"] == 0 and saved["unreadable"] == 0  # recordings never drop
    assert not list(tmp_path.glob(".*tmp*"))  # temp files renamed into place


@pytest.mark.skipif(not BIKES.is_file(), reason="../shared/data/video/bikes.mp4 not present")
def test_stream_real_street_video(checkpoint, tmp_path):
    out, preds = tmp_path / "bikes.mp4", tmp_path / "bikes.jsonl"
    stats = stream(checkpoint, [str(BIKES)], [str(out), str(preds)], stride=10, max_frames=8)
    assert stats.frames == 8
    assert [r["frame"] for r in read_jsonl(preds)] == list(range(0, 80, 10))
    annotated = read_video(out)
    assert len(annotated) == 8
    assert annotated[0].shape[:2] == (272, 640 + 4 * 136)  # 640x272 frame + event tiles


class SlowRunner:
    """A real runner that takes at least ``delay`` seconds per batch (a slow accelerator)."""

    def __init__(self, runner, delay):
        self.runner, self.delay = runner, delay
        self.card, self.name = runner.card, runner.name

    def infer(self, batch):
        time.sleep(self.delay)
        return self.runner.infer(batch)

    def close(self):
        self.runner.close()


def test_slow_model_drops_stale_frames_of_a_live_source(checkpoint, video):
    # Played back at 100 FPS like a live camera, a ~12 FPS model must skip frames, and
    # every frame is either processed or counted as dropped.
    model = Classifier(SlowRunner(load_runner(checkpoint, threads=THREADS), 0.08))
    source = open_source(str(video), fps=100)
    seen = []

    class Recorder(NullSink):
        def write(self, frame, prediction, canvas):
            seen.append(frame.index)

    stats = Stream(model, [source], Recorder(), queue_size=1).run()
    assert stats.dropped > 0
    assert stats.frames + stats.dropped == N_FRAMES
    assert seen == sorted(seen) and seen[-1] == N_FRAMES - 1  # newest frames kept, in order


def test_python_api_reads_like_jetson_inference(checkpoint, video, tmp_path):
    model = Classifier(str(checkpoint), topk=2, threads=THREADS)
    with open_source(str(video), stride=4) as source, open_sink(str(tmp_path / "p.jsonl")) as sink:
        for frame in source:
            sink.render(frame, model(frame))
    records = read_jsonl(tmp_path / "p.jsonl")
    assert [r["frame"] for r in records] == [0, 4, 8]
    assert all(len(r["top"]) == 2 for r in records)


def test_two_sources_are_micro_batched(checkpoint, video, tmp_path):
    single = stream(checkpoint, [str(video)], [str(tmp_path / "one.jsonl")])
    both = stream(
        checkpoint,
        [str(video), str(video)],
        [str(tmp_path / "two.jsonl"), str(tmp_path / "two.mp4")],
    )
    assert single.frames == N_FRAMES and both.frames == 2 * N_FRAMES
    records = read_jsonl(tmp_path / "two.jsonl")
    one = read_jsonl(tmp_path / "one.jsonl")
    for source in (0, 1):
        mine = [r for r in records if r["source"] == source]
        assert [r["frame"] for r in mine] == list(range(N_FRAMES))
        # Batched inference gives the same classes as one frame at a time.
        assert [r["top"][0]["class"] for r in mine] == [r["top"][0]["class"] for r in one]
    assert len(read_video(tmp_path / "two.mp4")) == N_FRAMES
    assert len(read_video(tmp_path / "two.1.mp4")) == N_FRAMES


def test_image_folder_skips_and_counts_unreadable_files(checkpoint, tmp_path):
    import cv2

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(synthetic_frames(4, size=(40, 40))):
        cv2.imwrite(str(folder / f"{i}.png"), image)
    (folder / "2b.jpg").write_bytes(b"not a jpeg")
    preds = tmp_path / "p.jsonl"
    stats = stream(checkpoint, [str(folder)], [str(preds)])
    assert stats.frames == 4 and stats.unreadable == 1
    assert len(read_jsonl(preds)) == 4
    glob_stats = stream(checkpoint, [str(folder / "[01]*.png")], ["none"])
    assert glob_stats.frames == 2


def test_max_frames_and_loop(checkpoint, video):
    stats = stream(checkpoint, [str(video)], ["none"], loop=True, max_frames=N_FRAMES + 3)
    assert stats.frames == N_FRAMES + 3 and stats.error is None


def test_ring_keeps_bounded_memory_and_exact_recent_percentiles():
    ring = Ring(capacity=100)
    values = np.random.default_rng(0).uniform(0, 50, 1000)
    for v in values[:60]:
        ring.add(v)
    assert ring.percentile(99) == pytest.approx(np.percentile(values[:60], 99))
    for v in values[60:]:
        ring.add(v)
    assert ring.values.size == 100 and ring.count == 1000
    assert ring.percentile(50) == pytest.approx(np.percentile(values[-100:], 50))
    assert ring.mean == pytest.approx(values.mean())


def test_cli_stream_and_demo(checkpoint, video, onnx_cache, tmp_path, monkeypatch):
    runner = CliRunner()
    monkeypatch.setenv("I2E_CACHE", str(onnx_cache))
    stats_path = tmp_path / "stats.json"
    result = runner.invoke(
        app,
        [
            "stream",
            str(checkpoint),
            "--source",
            str(video),
            "--output",
            "none",
            "--max-frames",
            "3",
            "--json",
            str(stats_path),
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    # --backend auto on a CPU: the checkpoint's verified graph on ONNX Runtime, said first.
    assert result.stdout.startswith(
        "runner: ONNX Runtime fp32 on cpu (ONNX Runtime runs the "
        "verified graph faster than eager PyTorch on a CPU)"
    )
    assert "3 frames" in result.output and "FPS" in result.output
    stats = json.loads(stats_path.read_text())
    assert stats["frames"] == 3 and stats["backend"] == "onnxruntime"

    result = runner.invoke(
        app, ["stream", str(checkpoint), "--source", str(tmp_path / "x.mp4"), "--output", "none"]
    )
    assert result.exit_code == 2
    assert "source not found" in result.output and "Traceback" not in result.output

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    result = runner.invoke(
        app, ["demo", "--model", str(checkpoint), "--max-frames", "4", "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "(onnxruntime)" in result.output  # a checkpoint runs on ONNX Runtime by default
    assert len(read_jsonl(tmp_path / "demo.jsonl")) == 4
    assert len(read_video(tmp_path / "demo.mp4")) == 4


def test_demo_falls_back_to_pytorch_when_export_fails(checkpoint, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("I2E_CACHE", str(blocker))  # the cache cannot be created
    notes = []
    stats, outputs = run_demo(
        model=str(checkpoint), output=["none"], max_frames=2, threads=1, log=notes.append
    )
    assert stats.backend == "torch" and stats.frames == 2 and outputs == ["none"]
    assert notes[0].startswith("model knows 10 classes: airplane, automobile")
    assert notes[1].startswith("runner: ONNX Runtime") and "running on PyTorch" in notes[-1]


def test_open_errors_are_one_clear_line(checkpoint, tmp_path, monkeypatch):
    import socket
    import sys

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(I2EError, match="cannot open stream"):
        open_source(f"rtsp://127.0.0.1:{port}/live", timeout_s=2)
    assert time.perf_counter() - started < 10
    with pytest.raises(I2EError, match="camera 57 not found"):
        open_source("57")
    with pytest.raises(I2EError, match="source not found"):
        open_source(str(tmp_path / "missing.mp4"))
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(I2EError, match="cannot decode video"):
        open_source(str(tmp_path / "broken.mp4"))
    with pytest.raises(I2EError, match="WIDTHxHEIGHT"):
        open_source("demo", resolution="640-480")
    with pytest.raises(I2EError, match="unknown output"):
        open_sink(str(tmp_path / "out.txt"))
    if sys.platform.startswith("linux"):
        monkeypatch.delenv("DISPLAY", raising=False)
        monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
        with pytest.raises(I2EError, match="no screen"):
            open_sink("display")
    with pytest.raises(I2EError, match="model file not found"):
        run_stream(str(tmp_path / "none.pt"), ["demo"], ["none"])


def test_backend_onnx_exports_once_into_the_cache(
    checkpoint, video, onnx_cache, tmp_path, monkeypatch
):
    monkeypatch.setenv("I2E_CACHE", str(onnx_cache))
    torch_run = stream(checkpoint, [str(video)], [str(tmp_path / "t.jsonl")])
    ort_run = stream(checkpoint, [str(video)], [str(tmp_path / "o.jsonl")], backend="onnx")
    assert torch_run.backend == "torch" and ort_run.backend == "onnxruntime"
    exported = list(onnx_cache.glob("*.onnx"))
    assert len(exported) == 1
    stamp = exported[0].stat().st_mtime_ns
    stream(checkpoint, [str(video)], ["none"], backend="onnx", max_frames=2)
    assert exported[0].stat().st_mtime_ns == stamp  # reused, not exported again
    ort_top = [r["top"][0]["class"] for r in read_jsonl(tmp_path / "o.jsonl")]
    assert len(ort_top) == N_FRAMES
    # The stream predicts what its graph predicts on the decoded frames, and that graph is
    # faithful to the checkpoint on them (no decisive change: i2e_deploy.compare).
    with (
        load_runner(exported[0], threads=THREADS) as graph,
        load_runner(checkpoint, threads=THREADS) as reference,
    ):
        frames = np.stack([preprocess(f, graph.card) for f in read_video(video)])
        assert graph.infer(frames).argmax(1).tolist() == ort_top
        found = compare(reference, graph, frames, limits_for("fp32"))
    assert found.passed, found.summary()


def test_int8_exact_checkpoints_stream_through_int8(
    checkpoint, video, onnx_cache, tmp_path, monkeypatch
):
    from i2e_deploy.artifacts import read_card
    from i2e_deploy.assets import DEFAULT_MODEL
    from i2e_deploy.targets import run_precision

    monkeypatch.setenv("I2E_CACHE", str(onnx_cache))
    exact = read_card(DEFAULT_MODEL)  # the bundled model is INT8-exact
    assert run_precision(exact, "auto", "onnx", "cpu") == "int8"
    assert run_precision(exact, "auto", "onnx", "cuda") == "fp32"
    assert run_precision(exact, "auto", "tensorrt", "cuda") == "fp32"
    assert run_precision(read_card(checkpoint), "auto", "onnx", "cpu") == "fp32"  # not exact
    with pytest.raises(I2EError, match="unknown precision"):
        run_precision(exact, "int4", "onnx", "cpu")

    runs = {
        p: stream(
            DEFAULT_MODEL, [str(video)], [str(tmp_path / f"{p}.jsonl")], backend="onnx", precision=p
        )
        for p in ("auto", "fp32")
    }
    assert runs["auto"].backend == "onnxruntime int8" and runs["fp32"].backend == "onnxruntime"
    tops = {p: [r["top"][0]["class"] for r in read_jsonl(tmp_path / f"{p}.jsonl")] for p in runs}
    assert len(tops["auto"]) == N_FRAMES and tops["auto"] == tops["fp32"]  # INT8-exact

    result = CliRunner().invoke(
        app,
        [
            "stream",
            str(checkpoint),
            "--source",
            str(video),
            "--output",
            "none",
            "--precision",
            "int8",
            "--backend",
            "torch",
        ],
    )
    assert result.exit_code == 2 and "--backend onnx" in result.output
    graph = next(onnx_cache.glob("*.onnx"))
    result = CliRunner().invoke(
        app,
        ["stream", str(graph), "--source", str(video), "--output", "none", "--backend", "torch"],
    )
    assert result.exit_code == 2 and "needs the checkpoint" in result.output


def test_ctrl_c_ends_cleanly_with_summary_and_outputs(checkpoint, video, tmp_path):
    import signal
    import subprocess
    import sys

    preds = tmp_path / "p.jsonl"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "i2e_deploy.cli",
            "stream",
            str(checkpoint),
            "-s",
            str(video),
            "--loop",
            "-o",
            str(preds),
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:  # wait until frames flow
        if preds.exists() and preds.stat().st_size > 0:  # records appear at their own path
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "interrupted:" in output and "Traceback" not in output
    assert len(read_jsonl(preds)) > 0  # what was done is published
