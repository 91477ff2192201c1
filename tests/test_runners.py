"""Runners: every backend takes the same input and agrees; loading errors are one clear line."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from runtime_models import (
    one_torch_thread,  # noqa: F401  (autouse fixture)
    shared_cifar,
    shared_model,
)

from i2e_deploy.artifacts import engine_sidecar_path, read_engine_sidecar
from i2e_deploy.card import ModelCard
from i2e_deploy.compare import compare, limits_for
from i2e_deploy.device import parse_device
from i2e_deploy.errors import I2EError
from i2e_deploy.images import load_image_folder, load_labelled_folder, preprocess, synthetic_images
from i2e_deploy.runtime.runners import (
    GRAPH_BUCKETS,
    OrtRunner,
    TorchRunner,
    bucket_for,
    check_engine_compatible,
    load_runner,
    ort_providers,
    pad_batch,
    provider_problem,
)


@pytest.fixture(scope="module")
def models():
    return {"ckpt": shared_model("ckpt"), "onnx": shared_model("onnx")}


@pytest.fixture(scope="module")
def images():
    card = ModelCard(imgsz=32, resize=32)
    return synthetic_images(6, card, seed=3)


def test_torch_runner_matches_the_paper_model(models, images):
    """The PyTorch runner against the independent SpikingJelly build of the paper's model
    with the same weights, on the same uint8 batch."""
    from paper_model import paper_msresnet18

    with load_runner(models["ckpt"]) as runner:
        assert isinstance(runner, TorchRunner) and runner.input_format == "uint8"
        assert runner.card.imgsz == 32 and runner.card.num_classes == 10
        out = runner.infer(images)
        paper = paper_msresnet18(10, runner.card.ratio).eval()
        paper.load_state_dict(runner.model.state_dict())
    with torch.no_grad():
        want = paper(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).numpy()
    assert out.dtype == np.float32 and out.shape == (6, 10)
    np.testing.assert_allclose(out, want, atol=1e-5)
    assert np.ptp(out, axis=0).max() > 1e-2  # outputs depend on the image


def test_onnx_runner_agrees_with_torch(models, images):
    with load_runner(models["ckpt"]) as ref, load_runner(models["onnx"]) as ort:
        assert isinstance(ort, OrtRunner) and ort.name == "onnxruntime"
        assert ort.card.to_dict()["imgsz"] == ref.card.imgsz
        assert ort.input_format == "uint8" and ort.output == "logits"
        assert ort.infer(images).dtype == np.float32
        found = compare(ref, ort, images, limits_for("fp32"))
    assert found.passed, found.summary()
    assert [row["layer"] for row in found.layers][:2] == ["i2e", "layer1.0.sn1"]


def test_float_graph_takes_the_same_uint8_batch(models, images):
    with (
        load_runner(shared_model("float.onnx"), threads=1, optimization="basic") as runner,
        load_runner(models["onnx"]) as uint8,
    ):
        assert runner.input_format == "float"
        from_uint8 = runner.infer(images)
        from_float = runner.infer(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
        np.testing.assert_array_equal(from_uint8, from_float)
        np.testing.assert_allclose(from_uint8, uint8.infer(images), atol=1e-4)


def test_static_batch_graph_takes_any_batch(models, images):
    with load_runner(shared_model("static.onnx")) as static, load_runner(models["onnx"]) as ort:
        assert static.batch_limit == static.min_batch == 2
        for count in (1, 2, 5):  # padded, exact, chunked and padded
            np.testing.assert_allclose(
                static.infer(images[:count]), ort.infer(images[:count]), atol=1e-4
            )


class _CountingRunner(OrtRunner):
    """ONNX Runtime, recording the batch of each backend call."""

    def __init__(self, path):
        super().__init__(path)
        self.calls: list[int] = []

    def _run(self, batch):
        self.calls.append(len(batch))
        return super()._run(batch)


def test_batches_below_the_profile_minimum_are_padded(models, images):
    """An engine's profile (here min 3, max 4, as the TensorRT runner reads from its sidecar)
    takes no batch outside [min, max]: longer ones are split, short chunks padded."""
    runner = _CountingRunner(models["onnx"])
    want = runner.infer(images)
    runner.min_batch, runner.batch_limit, runner.calls = 3, 4, []
    for count, calls in ((1, [3]), (3, [3]), (4, [4]), (5, [4, 3]), (6, [4, 3])):
        np.testing.assert_allclose(runner.infer(images[:count]), want[:count], atol=1e-5)
        assert runner.calls == calls, count
        runner.calls = []


def test_converter_only_graph_outputs_reference_events(models, images):
    with load_runner(shared_model("converter.onnx")) as runner, load_runner(models["ckpt"]) as ref:
        assert runner.output == "events"
        events = runner.infer(images)
        np.testing.assert_array_equal(events, ref.events(images))
    assert events.shape == (6, 8, 2, 32, 32) and 0 < events.mean() < 0.5


def test_event_model_runners_agree():
    events = (np.random.default_rng(0).random((2, 8, 2, 32, 32)) < 0.1).astype(np.float32)
    with (
        load_runner(shared_model("events.ckpt")) as ref,
        load_runner(shared_model("events.onnx")) as ort,
    ):
        assert ref.input_format == ort.input_format == "events"
        np.testing.assert_allclose(ref.infer(events), ort.infer(events), atol=1e-4)
        with pytest.raises(I2EError, match="event batch"):
            ort.infer(events[:, :4])


def test_wrong_batch_is_one_clear_error(models):
    with load_runner(models["onnx"], warmup=0) as runner:
        with pytest.raises(I2EError, match=r"uint8 NHWC \[N, 32, 32, 3\]"):
            runner.infer(np.zeros((1, 3, 32, 32), np.float32))
        with pytest.raises(I2EError, match="uint8 NHWC"):
            runner.infer(np.zeros((1, 64, 64, 3), np.uint8))


def test_load_errors(tmp_path, models):
    with pytest.raises(I2EError, match="not found"):
        load_runner(tmp_path / "missing.onnx")
    (tmp_path / "model.tflite").write_bytes(b"x")
    with pytest.raises(I2EError, match="unknown model format"):
        load_runner(tmp_path / "model.tflite")
    (tmp_path / "garbage.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(I2EError, match="not a readable ONNX|card"):
        load_runner(tmp_path / "garbage.onnx")
    bare = onnx.load(str(models["onnx"]))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(I2EError, match="no i2e-deploy model card"):
        load_runner(tmp_path / "bare.onnx")
    with pytest.raises(I2EError, match="optimization level"):
        load_runner(models["onnx"], optimization="max")
    with pytest.raises(I2EError, match="only to PyTorch"):
        load_runner(models["onnx"], graphs=True)


def test_engine_without_tensorrt_says_so(tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    (tmp_path / "m.engine").write_bytes(b"\x00")
    with pytest.raises(I2EError, match="TensorRT is not installed"):
        load_runner(tmp_path / "m.engine")


def test_devices_and_providers():
    assert parse_device("cpu") == ("cpu", 0)
    assert parse_device("cuda") == ("cuda", 0)
    assert parse_device("CUDA:1") == ("cuda", 1)
    for bad in ("gpu", "cuda:x", "cpu:0", ""):
        with pytest.raises(I2EError, match="unknown device"):
            parse_device(bad)
    assert ort_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(I2EError, match="lacks provider"):
        ort_providers("cpu", ["NoSuchExecutionProvider"])
    if provider_problem("CUDAExecutionProvider") is None:
        assert ort_providers("cuda:1")[-2][1]["device_id"] == 1
    else:
        with pytest.raises(I2EError, match="cannot run on the GPU here.*gpu-cu12"):
            ort_providers("cuda")


def write_sidecar(engine, **changes):
    record = {
        "card": ModelCard(imgsz=32, resize=32).to_dict(),
        "tensorrt_version": "10.3.0",
        "gpu_name": "NVIDIA A100",
        "compute_capability": "8.0",
        "precision": "fp16",
        "io": {},
        "profile": {},
        **changes,
    }
    engine_sidecar_path(engine).write_text(json.dumps(record))
    return record


def test_engine_sidecar_read_and_compatibility(tmp_path):
    engine = tmp_path / "m.engine"
    assert engine_sidecar_path(engine).name == "m.engine.json"
    with pytest.raises(I2EError, match="sidecar m.engine.json is missing"):
        read_engine_sidecar(engine)
    engine_sidecar_path(engine).write_text("{not json")
    with pytest.raises(I2EError, match="not valid JSON"):
        read_engine_sidecar(engine)
    engine_sidecar_path(engine).write_text(json.dumps({"card": {}}))
    with pytest.raises(I2EError, match="missing tensorrt_version"):
        read_engine_sidecar(engine)
    record = write_sidecar(engine)
    assert read_engine_sidecar(engine) == record
    here = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA A100", "compute_capability": "8.0"}
    check_engine_compatible(record, **here)
    with pytest.raises(I2EError, match="built with TensorRT 10.3.0, this is TensorRT 10.4.0"):
        check_engine_compatible(record, **{**here, "tensorrt_version": "10.4.0"})
    with pytest.raises(I2EError, match="built for NVIDIA A100 .sm 8.0., this GPU is Orin"):
        check_engine_compatible(record, **{**here, "gpu_name": "Orin", "compute_capability": "8.7"})
    check_engine_compatible(
        {**record, "version_compatible": True}, **{**here, "tensorrt_version": "10.4.0"}
    )
    portable = {**record, "hardware_compatibility": True}
    check_engine_compatible(portable, **{**here, "gpu_name": "H100", "compute_capability": "9.0"})
    with pytest.raises(I2EError, match=">= 8.0"):
        check_engine_compatible(portable, **{**here, "gpu_name": "T4", "compute_capability": "7.5"})


def test_preprocess_per_card():
    card = ModelCard(imgsz=32, resize=40)
    image = np.zeros((60, 80, 3), np.uint8)
    image[:, 40:] = 255  # right half white: the centre crop keeps both halves
    out = preprocess(image, card)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[:, 0].max() == 0 and out[:, -1].min() == 255
    same = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess(same, ModelCard(imgsz=32, resize=32)), same)
    with pytest.raises(I2EError, match="RGB uint8"):
        preprocess(np.zeros((32, 32), np.uint8), card)


def test_image_folders_from_real_images(tmp_path):
    folder = shared_cifar()
    card = ModelCard(imgsz=32, resize=32, class_names=sorted(p.name for p in folder.iterdir()))
    loaded = load_image_folder(folder, card, limit=5)
    images, paths = loaded.images, loaded.paths
    assert images.shape == (5, 32, 32, 3) and len(paths) == 5
    loaded, labels, names = load_labelled_folder(folder, card, limit=12)
    images = loaded.images
    assert images.shape == (12, 32, 32, 3)
    assert labels[:10].tolist() == list(range(10))  # round-robin: every class in a subset
    other = ModelCard(imgsz=32, resize=32, class_names=[f"c{i}" for i in range(10)])
    with pytest.raises(I2EError, match="not classes of the model"):
        load_labelled_folder(folder, other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(I2EError, match="no images"):
        load_image_folder(empty, card)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_runner_on_cuda_matches_cpu(models, images):
    with (
        load_runner(models["ckpt"]) as cpu,
        load_runner(models["ckpt"], device="cuda", graphs=False) as eager,
        load_runner(models["ckpt"], device="cuda") as graphs,
    ):
        assert graphs.name == "torch-cudagraph" and eager.name == "torch"
        expected = cpu.infer(images)
        np.testing.assert_allclose(eager.infer(images), expected, atol=1e-3)
        for count in (1, 3, 6):  # bucket 1, padded into 4, padded into 8
            np.testing.assert_allclose(graphs.infer(images[:count]), expected[:count], atol=1e-3)
        assert not torch.backends.cudnn.allow_tf32


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_runner_matches_onnx(models, images, tmp_path):
    from i2e_deploy.export.tensorrt import build_engine, tensorrt_unavailable

    reason = tensorrt_unavailable()
    if reason:
        pytest.skip(reason)
    engine = build_engine(models["onnx"], tmp_path / "tiny.engine", precision="fp32")
    with load_runner(engine) as trt, load_runner(models["onnx"]) as ort:
        assert trt.name == "tensorrt" and trt.precision == "fp32"
        np.testing.assert_array_equal(trt.infer(images).argmax(1), ort.infer(images).argmax(1))


def test_image_folders_skip_unreadable_files(tmp_path, caplog):
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(shared_cifar(), folder)
    first = sorted(folder.iterdir())[0]
    (first / "0.jpg").write_bytes(b"\xff\xd8\xff")  # sorts first: a truncated JPEG
    card = ModelCard(imgsz=32, resize=32, class_names=sorted(p.name for p in folder.iterdir()))
    with caplog.at_level("WARNING", logger="i2e_deploy"):
        loaded = load_image_folder(folder, card, limit=5)
    assert len(loaded.images) == 5 and [u.path for u in loaded.skipped] == [str(first / "0.jpg")]
    assert first / "0.jpg" not in loaded.paths
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith("skipped 1 unreadable file(s) of 6 under")
    loaded, labels, _ = load_labelled_folder(folder, card)
    assert len(loaded.images) == len(labels) == 20
    assert labels.tolist() == [card.class_names.index(p.parent.name) for p in loaded.paths]
    for image in folder.rglob("*.jpg"):
        image.write_bytes(b"GIF89a")
    with pytest.raises(I2EError, match="none of the 21 file"):
        load_image_folder(folder, card)


def test_cuda_graph_buckets_and_padding():
    assert GRAPH_BUCKETS == (1, 2, 4, 8)
    assert [bucket_for(n) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    for bad in (0, 9):
        with pytest.raises(I2EError, match="does not fit"):
            bucket_for(bad)
    batch = np.arange(3 * 2).reshape(3, 2)
    padded = pad_batch(batch, 4)
    np.testing.assert_array_equal(padded, [[0, 1], [2, 3], [4, 5], [4, 5]])
    assert pad_batch(batch, 3) is batch
    with pytest.raises(I2EError, match="need --device cuda"):
        TorchRunner(shared_model("ckpt"), graphs=True)


def test_gpu_provider_options(monkeypatch, tmp_path):
    """The options given to ONNX Runtime's GPU providers (what onnxruntime-gpu would get;
    this machine's onnxruntime lists no GPU provider, so the list is set here, and its
    provider libraries, absent, cannot be probed)."""
    import onnxruntime as ort

    both = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: both)
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    provider_problem.cache_clear()
    try:
        chosen = ort_providers("cuda:1", precision="int8", cache=tmp_path / "a", cuda_graph=True)
        (trt, trt_options), (cuda, cuda_options), cpu = chosen
        assert (trt, cuda, cpu) == tuple(both)
        folder = tmp_path / "a" / "ort-tensorrt"
        assert trt_options == {
            "device_id": 1,
            "trt_fp16_enable": 0,
            "trt_int8_enable": 1,
            "trt_engine_cache_enable": 1,
            "trt_timing_cache_enable": 1,
            "trt_engine_cache_path": str(folder),
            "trt_timing_cache_path": str(folder),
        }
        assert folder.is_dir()  # the provider makes only the last folder of the path
        assert os.environ["NVIDIA_TF32_OVERRIDE"] == "0"  # TensorRT builds without TF32
        # TensorRT takes the graph: no CUDA graph here; TF32 off (its default is on).
        assert cuda_options == {"device_id": 1, "use_tf32": 0}
        # FP16 through the TensorRT provider is weakly typed: the CUDA provider runs it.
        notes: list[str] = []
        assert ort_providers("cuda", precision="fp16", log=notes.append)[0][0] == cuda
        assert "weakly typed" in notes[0]
        monkeypatch.setattr(ort, "get_available_providers", lambda: both[1:])
        provider_problem.cache_clear()
        assert ort_providers("cuda", cuda_graph=True)[0] == (
            "CUDAExecutionProvider",
            {"device_id": 0, "use_tf32": 0, "enable_cuda_graph": 1},
        )
        assert ort_providers("cuda")[0] == (
            "CUDAExecutionProvider",
            {"device_id": 0, "use_tf32": 0},
        )
    finally:
        provider_problem.cache_clear()


def test_static_graphs_are_told_apart():
    from i2e_deploy.runtime.runners import _static_input

    assert _static_input(shared_model("static.onnx"))
    assert not _static_input(shared_model("onnx"))


def test_preprocessing_without_torch_follows_torchvision():
    """On an install without PyTorch, Pillow resizes: the same sizes and crop; identical
    when upscaling (CIFAR's 32 px to 64), within one grey level when downscaling."""
    from i2e_deploy.images import _preprocess_without_torch

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (32, 32, 3), np.uint8)
    frame = cv2_blur(rng.integers(0, 256, (272, 640, 3), np.uint8))
    for image, size, exact in ((small, 64, True), (frame, 128, False), (frame[:, :200], 64, False)):
        card = ModelCard(imgsz=size, resize=size)
        want, got = preprocess(image, card), _preprocess_without_torch(image, card)
        assert got.shape == want.shape == (size, size, 3) and got.dtype == np.uint8
        diff = np.abs(want.astype(int) - got.astype(int))
        assert diff.max() == 0 if exact else diff.max() <= 1, (size, diff.max())


def cv2_blur(image):
    import cv2

    return cv2.GaussianBlur(image, (9, 9), 3)


def test_a_session_is_what_it_says():
    """A session without a provider asked for is refused in one line (ONNX Runtime registers
    the CPU provider instead of one that fails to load); the spike session is the serving
    session's configuration, and its logits are the serving session's."""
    import onnxruntime as ort

    from i2e_deploy.runtime.runners import check_session

    graph = shared_model("onnx")
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    asked = [("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0}), "CPUExecutionProvider"]
    with pytest.raises(I2EError, match="did not register CUDAExecutionProvider.*--device cpu"):
        check_session(session, "cuda", asked)
    check_session(session, "cpu", ["CPUExecutionProvider"])
    with OrtRunner(graph, threads=1, optimization="basic") as runner:
        batch = synthetic_images(2, runner.card)
        out, maps = runner.infer_spikes(batch)
        np.testing.assert_array_equal(out, runner.infer(batch))
        assert maps
        served, spikes = (s.get_session_options() for s in (runner.session, runner._spike_session))
        assert spikes.graph_optimization_level == served.graph_optimization_level
        assert spikes.intra_op_num_threads == served.intra_op_num_threads == 1
