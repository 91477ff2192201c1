"""`i2e-deploy benchmark`: one row per backend x precision, absent backends say why."""

from __future__ import annotations

import json
import shutil

import pytest
from runtime_models import (
    one_torch_thread,  # noqa: F401  (autouse fixture)
    shared_cifar,
    shared_model,
)
from typer.testing import CliRunner

from i2e_deploy.apps.benchmark import plan_rows
from i2e_deploy.cache import PACKAGE, cache_key, code_digest
from i2e_deploy.cli import app
from i2e_deploy.export.tensorrt import tensorrt_unavailable

cli = CliRunner()


@pytest.fixture(scope="module")
def ckpt():
    return shared_model("ckpt")


def test_benchmark_table_and_json(ckpt, tmp_path):
    data = shared_cifar()
    cache = tmp_path / "cache"
    args = [
        "benchmark",
        str(ckpt),
        "--data",
        str(data),
        "--iters",
        "3",
        "--warmup",
        "1",
        "--batch",
        "2",
        "--cache",
        str(cache),
        "--precision",
        "fp32",
        "--threads",
        "1",
        "--json",
        str(tmp_path / "b.json"),
        "--markdown",
        str(tmp_path / "b.md"),
    ]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    rows = {(r["backend"], r["precision"]): r for r in report["rows"]}
    torch_row, ort_row = rows[("PyTorch (reference)", "fp32")], rows[("ONNX Runtime", "fp32")]
    for row in (torch_row, ort_row):
        assert row["reason"] is None, row
        assert 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
        assert row["throughput_ips"] > 0 and row["peak_rss_mb"] > row["model_rss_mb"] > 0
    assert torch_row["parity"] == "reference" and torch_row["top1_agreement"] is None
    assert ort_row["parity"] == "pass" and ort_row["decisive_mismatches"] == 0
    assert report["settings"]["inputs"]["count"] == 20
    assert sorted(rows) == [
        ("ONNX Runtime", "fp32"),
        ("PyTorch (reference)", "fp32"),
        ("TensorRT", "fp32"),
    ]  # --precision fp32 keeps the reference
    trt = rows[("TensorRT", "fp32")]
    if tensorrt_unavailable():
        assert trt["reason"] == tensorrt_unavailable() and trt["latency_p50_ms"] is None
    table = (tmp_path / "b.md").read_text()
    assert table.count("\n") == 2 + len(report["rows"])
    assert "| TensorRT | fp32 |" in table and (tensorrt_unavailable() or "") in table
    exports = sorted(cache.glob("*.onnx"))
    assert exports and not list(cache.glob(".*tmp*"))
    stamps = [p.stat().st_mtime_ns for p in exports]
    again = plan_rows(ckpt, cache, "cpu", ("fp32",))
    assert [r.model for r in again] == [r["model"] for r in report["rows"]]
    assert [p.stat().st_mtime_ns for p in sorted(cache.glob("*.onnx"))] == stamps  # reused


def test_cache_key_tracks_weights_and_options(tmp_path):
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    first.write_bytes(b"weights")
    second.write_bytes(b"weightz")
    assert cache_key(first, precision="fp32") == cache_key(first, precision="fp32")
    assert cache_key(first, precision="fp32") != cache_key(first, precision="int8")
    assert cache_key(first, precision="fp32") != cache_key(second, precision="fp32")


def test_code_digest_tracks_the_exporting_code(tmp_path):
    """An edited exporter (same version) must not reuse the exports of the code before it."""
    package = tmp_path / "i2e_deploy"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    before = code_digest(package)
    assert before == code_digest(PACKAGE)
    (package / "readme_only.txt").write_text("not code")
    (package / "cli.py").write_text("# not exporting code\n")
    assert code_digest.__wrapped__(package) == before
    lif = package / "calibration" / "lif.py"
    lif.write_text(lif.read_text() + "\n# changed\n")
    assert code_digest.__wrapped__(package) != before


def test_onnx_model_rows_say_what_is_missing(tmp_path):
    rows = plan_rows(shared_model("onnx"), tmp_path, "cpu")
    assert rows[0].backend == "PyTorch (reference)" and "checkpoint" in rows[0].reason
    assert (rows[1].backend, rows[1].precision, rows[1].reason) == ("ONNX Runtime", "fp32", None)
    assert [r.precision for r in rows[2:]] == ["fp32", "fp16", "int8"]
    assert all(r.backend == "TensorRT" and "checkpoint" in r.reason for r in rows[2:])


def test_bad_input_exits_2(ckpt, tmp_path):
    for args in (
        ["benchmark", str(tmp_path / "missing.pt")],
        ["benchmark", str(ckpt), "--iters", "0"],
        ["benchmark", str(ckpt), "--precision", "fp8"],
        ["benchmark", str(ckpt), "--data", str(tmp_path / "nowhere")],
    ):
        result = cli.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith("error:")


def test_workers_take_turns_and_failures_become_row_notes(ckpt, tmp_path):
    import numpy as np

    from i2e_deploy.apps.benchmark import Row, _measure
    from i2e_deploy.card import ModelCard
    from i2e_deploy.images import synthetic_images

    inputs = tmp_path / "inputs.npy"
    np.save(inputs, synthetic_images(3, ModelCard(imgsz=32, resize=32)))
    rows = [
        Row("ONNX Runtime", "fp32", model=str(shared_model("onnx"))),
        Row("ONNX Runtime", "int8", model=str(tmp_path / "missing.onnx")),
        Row("ONNX Runtime", "fp32", model=str(shared_model("onnx"))),
    ]
    messages = []
    _measure(
        rows,
        tmp_path,
        inputs,
        None,
        {"threads": 1, "warmup": 1, "batch": 2, "iters": 7},
        messages.append,
    )
    assert "7 calls per row in 7 interleaved rounds" in " ".join(messages)
    for row in (rows[0], rows[2]):
        assert row.reason is None and 0 < row.latency_p50_ms <= row.latency_p99_ms
        assert row.throughput_ips > 0
    assert rows[1].latency_p50_ms is None and "missing.onnx" in rows[1].reason


def test_bundled_model_accuracy_and_parity_on_heldout_images(tmp_path):
    """The bundled model on 200 of its held-out images: each row's accuracy is what `val`
    measures on them (independent code paths), and its INT8 graph, INT8-exact, changes no
    decisive prediction."""
    from runtime_models import heldout_cifar

    from i2e_deploy.apps.validate import validate
    from i2e_deploy.assets import DEFAULT_MODEL

    if not DEFAULT_MODEL.is_file():
        pytest.skip("bundled model not built yet")
    data = heldout_cifar(200)
    args = [
        "benchmark",
        "default",
        "--data",
        str(data),
        "--limit",
        "200",
        "--iters",
        "2",
        "--warmup",
        "0",
        "--batch",
        "8",
        "--cache",
        str(tmp_path / "cache"),
        "--precision",
        "fp32",
        "--precision",
        "int8",
        "--threads",
        "1",
        "--json",
        str(tmp_path / "b.json"),
    ]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = {
        (r["backend"], r["precision"]): r
        for r in json.loads((tmp_path / "b.json").read_text())["rows"]
    }
    measured = validate("default", data, workers=0, val_split=0, log=lambda _: None)
    assert measured.images == 200
    for key in (
        ("PyTorch (reference)", "fp32"),
        ("ONNX Runtime", "fp32"),
        ("ONNX Runtime", "int8"),
    ):
        assert rows[key]["accuracy"] == pytest.approx(measured.top1 / 100, abs=0.011), key
    assert rows[("PyTorch (reference)", "fp32")]["accuracy"] == pytest.approx(
        measured.top1 / 100
    )  # the same model on the same pixels
    for key in (("ONNX Runtime", "fp32"), ("ONNX Runtime", "int8")):
        assert rows[key]["parity"] == "pass" and rows[key]["decisive_mismatches"] == 0, rows[key]
