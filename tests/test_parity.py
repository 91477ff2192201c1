"""`i2e-deploy parity`: passes a faithful export, fails a corrupted one, exit 2 on bad input."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from i2e_deploy.cli import app
from i2e_deploy.parity import (DEFAULT_THRESHOLDS, logit_metrics, lower_precision, run_parity,
                               thresholds_for)
from runtime_models import one_torch_thread  # noqa: F401  (autouse fixture)
from runtime_models import shared_cifar, shared_model

cli = CliRunner()


@pytest.fixture(scope="module")
def models():
    return {"ckpt": shared_model("ckpt"), "onnx": shared_model("onnx")}


@pytest.fixture(scope="module")
def data():
    return shared_cifar()


def corrupt(source, target, op_type: str, index: int, scale: float):
    """Scale the constant second input of one ``op_type`` node (a weight, or a threshold;
    an initializer or a Constant node): a wrong graph that still loads and runs."""
    model = onnx.load(str(source))
    constants = {init.name: init for init in model.graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in model.graph.node
                      if n.op_type == "Constant" and n.attribute[0].name == "value"})
    nodes = [n for n in model.graph.node if n.op_type == op_type and n.input[1] in constants]
    tensor = constants[nodes[index].input[1]]
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * scale, tensor.name))
    onnx.save(model, str(target))
    return target


def run(*args):
    result = cli.invoke(app, ["parity", *map(str, args)])
    return result.exit_code, result.output


def test_faithful_export_passes_on_real_images(models, data, tmp_path):
    code, output = run(models["ckpt"], models["onnx"], "--data", data, "--json",
                       tmp_path / "r.json")
    assert code == 0, output
    assert "PASS" in output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is True and report["precision"] == "fp32"
    assert report["inputs"]["count"] == 20
    assert report["metrics"]["top1_agreement"] == 1.0
    assert report["metrics"]["median_abs"] <= 1e-5
    assert [m["backend"] for m in report["models"]] == ["torch", "onnxruntime"]


@pytest.mark.parametrize("op_type, index, scale", [
    ("Conv", 0, -1.0),  # first conv sign-flipped
    ("GreaterOrEqual", -1, 0.9),  # the last neuron's firing threshold lowered
])
def test_corrupted_graph_fails_with_exit_1(models, tmp_path, op_type, index, scale):
    bad = corrupt(models["onnx"], tmp_path / "bad.onnx", op_type, index, scale)
    code, output = run(models["ckpt"], bad, "--random", 6, "--json", tmp_path / "r.json")
    assert code == 1, output
    assert "FAIL" in output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is False
    failed = [c["name"] for c in report["checks"] if not c["passed"]]
    assert "median |Δlogit|" in failed


def test_layers_report_every_lif_layer_and_overrides_decide(models):
    report = run_parity(str(models["ckpt"]), str(models["onnx"]), random=4, layers=True,
                        overrides={"median_abs": -1.0})
    assert [c.name for c in report.checks if not c.passed] == ["median |Δlogit|"]
    names = [row["layer"] for row in report.layers]
    assert names[0] == "layer1.0.sn1" and names[-1] == "sn" and len(names) == 20
    assert "layer2.0.downsample.0" in names
    assert all(row["agreement"] >= 0.999 for row in report.layers)
    assert all(0 < row["rate"] < 1 for row in report.layers)


def test_converter_only_graph_compared_by_events(models):
    report = run_parity(str(models["ckpt"]), str(shared_model("converter.onnx")), random=4)
    assert report.passed and report.metrics["event_agreement"] == 1.0
    assert [c.name for c in report.checks] == ["event agreement"]


def test_bad_input_exits_2(models, tmp_path, data):
    cases = [
        (models["ckpt"], tmp_path / "missing.onnx"),
        (models["ckpt"], models["onnx"], "--data", tmp_path / "nowhere"),
        (models["ckpt"], models["onnx"], "--data", data, "--random", 3),
        (models["ckpt"], models["onnx"], "--precision", "int4"),
        (models["ckpt"], models["onnx"], "--random", 0),
    ]
    cases.append((shared_model("events.ckpt"), models["onnx"]))  # another model
    for args in cases:
        code, output = run(*args)
        assert code == 2, (args, output)
        assert output.strip().startswith("error:") and "Traceback" not in output


def test_logit_metrics_by_hand():
    reference = np.array([[3.0, 1.0, 0.0], [1.0, 1.01, 0.0], [0.0, 2.0, 5.0]], np.float32)
    other = np.array([[3.0, 1.0, 0.0], [1.02, 1.0, 0.0], [0.0, 6.0, 5.0]], np.float32)
    m = logit_metrics(reference, other, tie_margin=0.05)
    assert m["top1_agreement"] == pytest.approx(1 / 3)
    assert m["top1_mismatches"] == 2
    assert m["decisive_mismatches"] == 1  # row 1 is a near tie (margin 0.01)
    assert m["near_ties"] == 1
    assert m["max_abs"] == pytest.approx(4.0)
    assert m["top5_overlap"] == 1.0  # 3 classes: top-k is all of them


def test_thresholds_per_precision():
    assert lower_precision("fp32", "int8") == "int8"
    assert lower_precision("fp16", "fp32") == "fp16"
    assert lower_precision("fp32", "unknown") == "fp32"
    strict = thresholds_for("fp32")
    assert strict.decisive == 0 and strict.events == 1.0
    assert DEFAULT_THRESHOLDS["int8"].top1 < strict.top1
    assert thresholds_for("fp16", top1=0.5, top5=None).top1 == 0.5
