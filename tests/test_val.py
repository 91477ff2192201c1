"""`val`: top-1/top-5, per-class accuracy and confusion matrix, checked against the runner's own
predictions; held-out splits from the card; JSON and PNG outputs; one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from runtime_models import save_active
from training_data import cifar_folder, one_thread  # noqa: F401 (autouse fixture)
from typer.testing import CliRunner

from i2e_deploy.apps.validate import validate
from i2e_deploy.assets import DEFAULT_MODEL
from i2e_deploy.cli import app
from i2e_deploy.errors import I2EError
from i2e_deploy.images import load_labelled_folder
from i2e_deploy.model.checkpoint import load_checkpoint, save_checkpoint
from i2e_deploy.runtime.runners import load_runner
from i2e_deploy.training import data as D


@pytest.fixture
def folder(tmp_path):
    return cifar_folder(tmp_path)


@pytest.fixture
def checkpoint(tmp_path):
    return save_active(tmp_path / "active.pt", imgsz=32)


def test_report_matches_runner_predictions(folder, checkpoint):
    report = validate(
        str(checkpoint), folder, workers=0, batch=7, backend="torch", log=lambda _: None
    )
    with load_runner(checkpoint) as runner:
        loaded, labels, names = load_labelled_folder(folder, runner.card)
        images = loaded.images
        logits = runner.infer(images)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert report.classes == names and report.images == len(labels) == 24
    assert report.top1 == pytest.approx(100 * np.mean(top5[:, 0] == labels))
    assert report.top5 == pytest.approx(100 * np.mean((top5 == labels[:, None]).any(axis=1)))
    expected = np.zeros((10, 10), np.int64)
    np.add.at(expected, (labels, top5[:, 0]), 1)
    assert np.array_equal(report.confusion, expected)
    assert len(set(top5[:, 0].tolist())) > 1  # the model is not constant: the check has teeth
    per_class = report.per_class()
    present = {names[i] for i in set(labels.tolist())}
    for name, value in per_class.items():
        assert (value is None) == (name not in present)


def test_cli_json_and_plot(folder, checkpoint, tmp_path):
    out, png = tmp_path / "report.json", tmp_path / "confusion.png"
    result = CliRunner().invoke(
        app,
        [
            "val",
            str(checkpoint),
            str(folder),
            "--workers",
            "0",
            "--json",
            str(out),
            "--plot",
            str(png),
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("runner: ONNX Runtime fp32 on cpu")  # --backend auto
    assert "top-1" in result.output and "per-class accuracy" in result.output
    report = json.loads(out.read_text())
    assert {"top1", "top5", "per_class", "confusion"} <= report.keys()
    confusion = np.array(report["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == report["images"] == 24
    assert report["top1"] == pytest.approx(100 * np.trace(confusion) / 24)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heldout_split_from_card_and_flags(folder, tmp_path):
    model, card = load_checkpoint(save_active(tmp_path / "a.pt", imgsz=32))
    card.provenance = {
        "data": folder.name,
        "val_split": 6,
        "seed": 3,
        "train_images": 18,
        "heldout_images": 6,
    }
    save_checkpoint(tmp_path / "trained.pt", model, card)
    messages = []
    report = validate(str(tmp_path / "trained.pt"), folder, workers=0, log=messages.append)
    assert report.images == 6 and report.heldout == {"val_split": 6.0, "seed": 3}
    assert any("held out in training" in m for m in messages)
    # Exactly the images `train --val-split 6 --seed 3` held out.
    images = D.image_folder(folder)
    _, held = D.split_indices(images.targets, 6, 3)
    support = np.zeros(10, np.int64)
    for i in held:
        support[card.class_names.index(images.classes[images.targets[i]])] += 1
    assert np.array_equal(report.confusion.sum(axis=1), support)
    assert validate(str(tmp_path / "trained.pt"), folder, workers=0, val_split=0).images == 24
    explicit = validate(str(tmp_path / "trained.pt"), folder, workers=0, val_split=6, seed=3)
    assert np.array_equal(explicit.confusion, report.confusion)
    # Another folder (here: other name) is evaluated whole.
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    assert validate(str(tmp_path / "trained.pt"), other, workers=0).images == 24


def test_errors_are_one_line(folder, tmp_path):
    events_model = save_active(tmp_path / "events.pt", imgsz=32, events=True)
    runner = CliRunner()
    result = runner.invoke(app, ["val", str(events_model), str(folder), "--workers", "0"])
    assert result.exit_code == 2 and "takes events" in result.output
    (folder / "unicorn").mkdir()
    shutil.copy(next(folder.rglob("*.jpg")), folder / "unicorn" / "x.jpg")
    with pytest.raises(I2EError, match="unicorn"):
        validate(str(save_active(tmp_path / "img.pt", imgsz=32)), folder, workers=0)
    missing = runner.invoke(app, ["val", str(tmp_path / "none.pt"), str(folder)])
    assert missing.exit_code == 2 and "Traceback" not in missing.output


MEASURED = (
    Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "val_default_heldout.json"
)


@pytest.mark.skipif(
    not (DEFAULT_MODEL.is_file() and MEASURED.is_file()),
    reason="bundled model or its measured held-out accuracy not there",
)
def test_bundled_model_reproduces_its_measured_heldout_accuracy():
    """On 200 of the images its card holds out, the bundled model scores what `val` measured
    on all 5,000 of them (the README's number), within three binomial standard deviations."""
    from runtime_models import heldout_cifar

    measured = json.loads(MEASURED.read_text())
    assert measured["images"] == 5000 and measured["model"] == "default"
    report = validate("default", heldout_cifar(200), workers=0, val_split=0, log=lambda _: None)
    assert report.images == 200
    rate = measured["top1"] / 100
    sigma = (rate * (1 - rate) / report.images) ** 0.5
    assert abs(report.top1 / 100 - rate) <= 3 * sigma, (report.top1, measured["top1"])


def test_unreadable_images_are_skipped_with_one_warning(folder, checkpoint, tmp_path):
    """The issue's case: one unreadable JPEG in the folder, evaluated by worker processes."""
    first, second = sorted(p for p in folder.iterdir())[:2]
    (first / "zz_truncated.jpg").write_bytes(next(first.glob("*.jpg")).read_bytes()[:200])
    (second / "zz_text.jpg").write_text("not an image")
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        app, ["val", str(checkpoint), str(folder), "--workers", "2", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "skipped 2 unreadable file(s) of 26" in warnings[0]
    report = json.loads(out.read_text())
    assert report["images"] == 24 and report["skipped"] == 2
    assert "24 images (2 unreadable left out)" in result.stdout

    nothing = tmp_path / "nothing" / "cat"
    nothing.mkdir(parents=True)
    (nothing / "a.jpg").write_text("not an image")
    result = CliRunner().invoke(
        app, ["val", str(checkpoint), str(nothing.parent), "--workers", "0"]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (
        result.stderr.startswith("error: none of the 1 file(s)")
        and len(result.stderr.strip().splitlines()) == 1
    )
