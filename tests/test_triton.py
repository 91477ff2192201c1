"""Triton model repositories, checked against Triton's own model-config schema."""

from __future__ import annotations

import json

import pytest
from google.protobuf import text_format
from runtime_models import export, shared_model

from i2e_deploy.card import CIFAR10_CLASSES, ModelCard
from i2e_deploy.errors import I2EError
from i2e_deploy.export.tensorrt import profile_shapes, sidecar_record, write_engine
from i2e_deploy.export.triton import write_repository

model_config = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def parse(folder):
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config.ModelConfig())


def test_onnx_repository_matches_the_graph(tmp_path):
    source = shared_model("onnx")
    folder = write_repository(source, tmp_path / "repo", name="cifar_snn", max_batch_size=16)
    assert folder == tmp_path / "repo" / "cifar_snn"
    config = parse(folder)
    assert config.name == "cifar_snn" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    (inp,), (out,) = config.input, config.output
    assert (inp.name, inp.data_type, list(inp.dims)) == (
        "images",
        model_config.TYPE_UINT8,
        [32, 32, 3],
    )
    assert (out.name, out.data_type, list(out.dims)) == ("logits", model_config.TYPE_FP32, [10])
    assert out.label_filename == "labels.txt"
    assert list(config.dynamic_batching.preferred_batch_size) == [1, 2, 4, 8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert (folder / "1" / "model.onnx").read_bytes() == source.read_bytes()
    assert (folder / "labels.txt").read_text().split() == list(CIFAR10_CLASSES)
    # Writing again replaces the model folder whole; the repository holds nothing else.
    write_repository(source, tmp_path / "repo", name="cifar_snn", max_batch_size=4)
    assert parse(folder).max_batch_size == 4
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["cifar_snn"]


def test_static_graph_has_no_batching(tmp_path):
    static = export(
        shared_model("ckpt"), tmp_path / "static.onnx", batch=2, dynamic=False, simplify=False
    )
    config = parse(write_repository(static, tmp_path / "repo"))
    assert config.name == "static" and config.max_batch_size == 0
    assert list(config.input[0].dims) == [2, 32, 32, 3]
    assert not config.HasField("dynamic_batching")


def engine(tmp_path, **batches):
    card = ModelCard(imgsz=32, resize=32)  # no class names: labels are indices
    io = {
        "inputs": [{"name": "images", "dtype": "uint8", "shape": [-1, 32, 32, 3]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 10]}],
    }
    return write_engine(
        tmp_path / "m.plan",
        b"plan",
        sidecar_record(
            card,
            tensorrt_version="10.3.0",
            gpu_name="T4",
            compute_capability="7.5",
            precision="fp16",
            io=io,
            profile=profile_shapes([-1, 32, 32, 3], **batches),
        ),
    )


def test_engine_repository_follows_the_profile(tmp_path):
    plan = engine(tmp_path, opt_batch=3, max_batch=4)  # an engine built with --max-batch 4
    folder = write_repository(plan, tmp_path / "repo")
    config = parse(folder)
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 4
    assert list(config.dynamic_batching.preferred_batch_size) == [1, 2, 3, 4]
    assert config.instance_group[0].kind == model_config.ModelInstanceGroup.KIND_GPU
    assert (folder / "1" / "model.plan").read_bytes() == b"plan"
    assert (folder / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    # The plan's TensorRT version and GPU travel with it: its sidecar, and the config's header.
    beside = json.loads((folder / "1" / "model.plan.json").read_text())
    assert beside["tensorrt_version"] == "10.3.0" and beside["profile"]["max"][0] == 4
    assert (
        (folder / "config.pbtxt").read_text().startswith("# TensorRT 10.3.0 plan for T4 (sm 7.5)")
    )
    assert parse(write_repository(plan, tmp_path / "repo", max_batch_size=2)).max_batch_size == 2
    with pytest.raises(I2EError, match="--max-batch 8 exceeds the engine's profile max .4."):
        write_repository(plan, tmp_path / "repo", max_batch_size=8)
    with pytest.raises(I2EError, match="refuses KIND_CPU"):
        write_repository(plan, tmp_path / "repo", instance_kind="KIND_CPU")
    with pytest.raises(I2EError, match="profile starts at batch 2.*--min-batch 1"):
        write_repository(engine(tmp_path, min_batch=2), tmp_path / "repo")


def test_bad_requests_are_one_line_errors(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(I2EError, match="Triton serves .onnx"):
        write_repository(tmp_path / "model.pt", tmp_path / "repo")
    with pytest.raises(I2EError, match="not found"):
        write_repository(tmp_path / "none.onnx", tmp_path / "repo")
    with pytest.raises(I2EError, match="may only hold"):
        write_repository(shared_model("onnx"), tmp_path / "repo", name="a/b")
    with pytest.raises(I2EError, match="unknown instance kind"):
        write_repository(shared_model("onnx"), tmp_path / "repo", instance_kind="TPU")
