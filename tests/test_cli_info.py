"""`i2e-deploy info` on the three checkpoint forms, and clean failures on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from i2e_deploy import ModelCard, save_checkpoint
from i2e_deploy.cli import app
from i2e_deploy.model.msresnet import msresnet18

runner = CliRunner()

# MS-ResNet-18 MACs per timestep at 128x128 by hand: stem (64x64 out, 2x7x7 in), layer1 at 32x32,
# layers 2-4 each = one strided 3x3, three 3x3 and a 1x1 downsample (same count per stage), fc.
STEM = 64 * 64 * 64 * 2 * 49
LAYER1 = 4 * 32 * 32 * 64 * 64 * 9
STAGE = 16 * 16 * 128 * (64 * 9 + 3 * 128 * 9 + 64)
MSRESNET18_128_GMACS = 8 * (STEM + LAYER1 + 3 * STAGE + 512 * 10) / 1e9


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    torch.manual_seed(0)
    model = msresnet18(10, 0.07)
    state = model.state_dict()
    paths = {
        "released": root / "cifar10_transfer.pth.tar",
        "bare": root / "bare.pt",
        "ours": root / "ours.pt",
    }
    torch.save(
        {
            "epoch": 5,
            "state_dict": {f"module.{k}": v for k, v in state.items()},
            "best_acc1": torch.tensor(90.86),
        },
        paths["released"],
    )
    torch.save(state, paths["bare"])
    save_checkpoint(paths["ours"], model, ModelCard(ratio=0.08, imgsz=64, resize=64))
    paths["params"] = sum(p.numel() for p in model.parameters())
    return paths


def info(*args: str):
    return runner.invoke(app, ["info", *map(str, args)])


# Only the released form runs at the default 128 px: info runs one forward pass to count MACs.
@pytest.mark.parametrize(
    "form, extra", [("released", ()), ("bare", ("--imgsz", "32")), ("ours", ())]
)
def test_info_json(checkpoints, form, extra):
    result = info(checkpoints[form], "--json", *extra)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    card = data["card"]
    assert (card["arch"], card["input"], card["num_classes"]) == ("msresnet18", "images", 10)
    assert data["params"] == checkpoints["params"]
    expected = {"released": (0.07, 128), "bare": (0.07, 32), "ours": (0.08, 64)}[form]
    assert (card["ratio"], card["imgsz"]) == expected
    assert bool(card["inferred"]) == (form != "ours")
    if form == "released":
        assert data["gmacs_per_image"] == pytest.approx(MSRESNET18_128_GMACS, rel=1e-9)
    assert (
        card["provenance"]["format"]
        == {"released": "released", "bare": "state_dict", "ours": "i2e-deploy"}[form]
    )


def test_info_table_shows_card_and_inferred(checkpoints):
    result = info(checkpoints["released"], "--imgsz", "32")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for text in (
        "msresnet18",
        "parameters",
        f"{checkpoints['params']:,}",
        "GMACs",
        "inferred:",
        "90.86",
    ):
        assert text in out, text
    assert "inferred:" not in info(checkpoints["ours"], "--imgsz", "32").stdout


def test_info_overrides(checkpoints):
    result = info(checkpoints["released"], "--json", "--events", "--imgsz", "32", "--ratio", "0.1")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["card"]["input"], data["card"]["imgsz"], data["card"]["ratio"]) == (
        "events",
        32,
        0.1,
    )
    # Same network at a quarter of the side: 1/16 of the MACs (but the tiny fc layer's).
    assert data["gmacs_per_image"] == pytest.approx(MSRESNET18_128_GMACS / 16, rel=1e-3)


def assert_clean_failure(result, *needles: str) -> None:
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_bad_files_fail_cleanly(checkpoints, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    assert_clean_failure(info(text), "not a")
    truncated = tmp_path / "half.pth.tar"
    data = checkpoints["released"].read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    assert_clean_failure(info(truncated, "--json"), "truncated")
    empty = tmp_path / "empty.pt"
    empty.touch()
    assert_clean_failure(info(empty), "empty")
    assert_clean_failure(info(tmp_path / "missing.pt"), "not found")
    assert_clean_failure(info(checkpoints["released"], "--arch", "msresnet34"), "msresnet34")
    assert_clean_failure(info(checkpoints["bare"], "--classes", "100"), "100")


def console_script() -> Path:
    script = Path(sys.executable).parent / "i2e-deploy"
    if not script.is_file():
        pytest.skip("i2e-deploy console script not installed next to this Python")
    return script


def test_console_script_fails_cleanly(tmp_path):
    # One real process (imports cost seconds): exit code and stderr as a user sees them.
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    failed = subprocess.run(
        [console_script(), "info", bad], capture_output=True, text=True, timeout=120
    )
    assert failed.returncode == 2
    assert failed.stderr.startswith("error:") and len(failed.stderr.strip().splitlines()) == 1
    assert "Traceback" not in failed.stderr + failed.stdout


def test_messages_print_literally(tmp_path, monkeypatch):
    """Error lines are not rich markup: '[events]' and bracketed shapes survive."""
    from runtime_models import save_active

    model = save_active(tmp_path / "dvs.pt", imgsz=32, events=True)
    recording = tmp_path / "rec.aedat4"
    recording.write_bytes(b"#!AER-DAT4.0\r\n")
    monkeypatch.setitem(sys.modules, "dv_processing", None)  # no [events] extra
    result = runner.invoke(
        app, ["stream", str(model), "--source", str(recording), "--output", "none"]
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: AEDAT4 files, iniVation cameras and DV network "
        "streams need dv-processing: pip install "
        "'i2e-deploy[events]'"
    )
    result = runner.invoke(app, ["info", str(tmp_path / "[red]x[/red].pt")])
    assert result.exit_code == 2 and "[red]x[/red].pt" in result.stderr


# --- every model file: ONNX graphs, engines, Triton folders ----------------------------------


def test_info_reads_an_onnx_graphs_card_precision_and_flavour(tmp_path):
    from runtime_models import shared_model

    from i2e_deploy.calibration.quantize import to_int8

    graph = shared_model("onnx")
    result = info(graph, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["kind"], data["precision"], data["int8_flavour"]) == ("onnx", "fp32", None)
    assert (data["card"]["arch"], data["card"]["imgsz"]) == ("msresnet18", 32)
    int8 = to_int8(graph, tmp_path / "tiny.int8.onnx", flavour="tensorrt")
    table = info(int8).stdout
    for text in ("onnx:", "msresnet18", "precision", "int8", "S8S8 Q/DQ", "no verdict"):
        assert text in table, text
    assert_clean_failure(info(graph, "--imgsz", "64"), "apply only to PyTorch checkpoints")


def test_info_reads_an_engine_sidecar_with_its_verdict_and_a_triton_folder(tmp_path):
    """The engine's bytes are TensorRT's (not readable here): info reads its sidecar only.
    The sidecar is the one `build` writes, verdict included."""
    from runtime_models import shared_model

    from i2e_deploy.artifacts import engine_sidecar_path
    from i2e_deploy.export.triton import write_repository

    engine = tmp_path / "tiny.fp16.engine"
    engine.write_bytes(b"engine")
    card = ModelCard(imgsz=32, resize=32)
    verdict = {
        "passed": True,
        "what": "TensorRT fp16 engine",
        "when": "2026-12-04T05:00:00+00:00",
        "summary": "decisive top-1 changes 0 of 32",
        "images": "32 frames",
    }
    sidecar = {
        "card": card.to_dict(),
        "tensorrt_version": "10.3.0",
        "gpu_name": "Orin",
        "compute_capability": "8.7",
        "precision": "fp16",
        "io": {
            "inputs": [{"name": "images", "dtype": "uint8", "shape": [-1, 32, 32, 3]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 10]}],
        },
        "profile": {"min": [1, 32, 32, 3], "opt": [1, 32, 32, 3], "max": [8, 32, 32, 3]},
        "verification": verdict,
    }
    engine_sidecar_path(engine).write_text(json.dumps(sidecar))
    data = json.loads(info(engine, "--json").stdout)
    assert (data["kind"], data["precision"], data["gpu_name"]) == ("engine", "fp16", "Orin")
    assert data["verification"] == [verdict]
    table = info(engine).stdout
    assert "TensorRT 10.3.0 on Orin" in table and "pass TensorRT fp16 engine" in table

    folder = write_repository(shared_model("onnx"), tmp_path / "repo", name="tiny")
    data = json.loads(info(folder, "--json").stdout)
    assert (data["kind"], data["precision"], data["card"]["imgsz"]) == ("triton", "fp32", 32)
    assert data["triton"]["platform"] == "onnxruntime_onnx" and data["triton"]["name"] == "tiny"
    assert data["model"].endswith("1/model.onnx")
    assert_clean_failure(info(tmp_path), "no config.pbtxt")


def test_info_shows_the_export_verdict_a_graph_carries(tmp_path):
    from runtime_models import shared_model

    graph = tmp_path / "tiny.onnx"
    exported = runner.invoke(app, ["export", str(shared_model("ckpt")), "-o", str(graph)])
    assert exported.exit_code == 0, exported.output
    data = json.loads(info(graph, "--json").stdout)
    record = data["verification"][0]
    assert record["passed"] and record["on"] == "export: ONNX Runtime (CPU)"
    assert record["count"] == 32 and record["decisive_changes"] == 0
    assert "PyTorch reference" in record["reference"]
