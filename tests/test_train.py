"""`train` on tiny real data: it learns, its checkpoints export and validate, resume continues
exactly, and image-trained weights start event-input models (sim-to-real)."""

from __future__ import annotations

import csv
import sys

import pytest
import torch
from torch import nn
from training_data import cifar_folder, one_thread  # noqa: F401 (autouse fixture)
from typer.testing import CliRunner

from i2e_deploy.apps.validate import validate
from i2e_deploy.cli import app
from i2e_deploy.errors import I2EError
from i2e_deploy.images import load_labelled_folder
from i2e_deploy.model.checkpoint import load_checkpoint, save_checkpoint
from i2e_deploy.model.msresnet import build_model
from i2e_deploy.training.convert import convert_folder
from i2e_deploy.training.train import TrainConfig, build_card, run_training, train

SIZE, RATIO = 32, 0.2


def config(data, output, **overrides) -> TrainConfig:
    base = dict(
        data=str(data),
        output=str(output),
        imgsz=SIZE,
        ratio=RATIO,
        epochs=2,
        batch=6,
        lr=0.05,
        val_split=6,
        workers=0,
        augment="none",
        seed=0,
    )
    return TrainConfig(**{**base, **overrides})


def mean_loss(checkpoint, folder) -> float:
    """Cross-entropy of a checkpoint (eval mode) over every image of ``folder``."""
    model, card = load_checkpoint(checkpoint)
    loaded, labels, _ = load_labelled_folder(folder, card)
    images = loaded.images
    with torch.no_grad():
        logits = model(torch.from_numpy(images))
    return nn.functional.cross_entropy(logits, torch.from_numpy(labels)).item()


def test_training_lowers_loss_and_checkpoint_exports_and_validates(tmp_path):
    from i2e_deploy.targets import ExportRequest, build_artifact

    data = cifar_folder(tmp_path)
    classes = sorted(p.name for p in data.iterdir())
    card = build_card("msresnet18", classes, SIZE, RATIO)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "init.pt", build_model(card), card)

    best = train(
        config(
            data, tmp_path / "run", epochs=4, val_split=0, from_checkpoint=str(tmp_path / "init.pt")
        ),
        log=lambda _: None,
    )
    assert mean_loss(best, data) < mean_loss(tmp_path / "init.pt", data)
    with open(tmp_path / "run" / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    model, trained_card = load_checkpoint(best)
    assert trained_card.class_names == classes and trained_card.imgsz == SIZE
    assert trained_card.provenance["fine_tuned_from"] == "init.pt"

    graph = build_artifact(ExportRequest(str(best), tmp_path / "model.onnx"))  # verified
    from_torch = validate(str(best), data, workers=0, log=lambda _: None)
    from_onnx = validate(str(graph), data, workers=0, log=lambda _: None)
    assert from_torch.images == from_onnx.images == 24
    assert abs(from_torch.top1 - from_onnx.top1) <= 100 / 24  # at most one image differs


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    data = cifar_folder(tmp_path)
    straight = run_training(config(data, tmp_path / "a"), log=lambda _: None)
    steps_per_epoch = (24 - 6) // 6
    run_training(config(data, tmp_path / "b", max_steps=steps_per_epoch), log=lambda _: None)
    messages = []
    resumed = run_training(config(data, tmp_path / "b", resume=True), log=messages.append)
    assert any("resumed" in m and "epoch 2" in m for m in messages)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state_a = torch.load(straight.last, weights_only=True)["train_state"]
    state_b = torch.load(resumed.last, weights_only=True)["train_state"]
    assert state_a["scheduler"]["last_epoch"] == state_b["scheduler"]["last_epoch"] == 6
    with open(tmp_path / "b" / "log.csv") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1", "2"]


def test_image_checkpoint_starts_event_model_on_event_data(tmp_path):
    data = cifar_folder(tmp_path)
    events = tmp_path / "events"
    convert_folder(data, events, "packed", ratio=RATIO, imgsz=SIZE, workers=0)
    classes = sorted(p.name for p in data.iterdir())
    image_card = build_card("msresnet18", classes + ["extra"], SIZE, RATIO)
    image_model = build_model(image_card)
    save_checkpoint(tmp_path / "images.pt", image_model, image_card)

    result = run_training(
        config(
            events,
            tmp_path / "run",
            events=True,
            mixup=True,
            tensorboard=True,
            max_steps=2,
            from_checkpoint=str(tmp_path / "images.pt"),
        ),
        log=lambda _: None,
    )
    model, card = load_checkpoint(result.last)
    assert card.input == "events" and card.num_classes == 3 and card.class_names == classes
    assert card.ratio == RATIO  # recorded by `convert`
    # The trunk came from the image model (SGD moved it), the 3-class head is new.
    source = image_model.state_dict()
    assert not torch.equal(model.state_dict()["conv1.weight"], source["conv1.weight"])
    assert torch.allclose(model.state_dict()["conv1.weight"], source["conv1.weight"], atol=0.05)
    assert list(model.fc.weight.shape) == [3, 512]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))

    report = validate(str(result.last), events, workers=0, log=lambda _: None)
    assert report.images == 6 and report.heldout == {"val_split": 6.0, "seed": 0}
    with open(tmp_path / "run" / "log.csv") as fh:
        logged = list(csv.DictReader(fh))[-1]
    assert float(logged["val_top1"]) == round(report.top1, 2)  # `val` reproduces the log


def test_train_cli_and_errors(tmp_path):
    data = cifar_folder(tmp_path)
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train",
            str(data),
            "-o",
            str(tmp_path / "run"),
            "--imgsz",
            "32",
            "--ratio",
            "0.2",
            "--epochs",
            "1",
            "--batch",
            "6",
            "--val-split",
            "6",
            "--workers",
            "0",
            "--max-steps",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "best checkpoint" in result.output and (tmp_path / "run" / "best.pt").is_file()
    bad = runner.invoke(app, ["train", str(data), "--recipe", "transfer"])
    assert bad.exit_code == 2 and "needs --from" in bad.output
    with pytest.raises(I2EError, match="no .*last.pt to resume"):
        train(config(data, tmp_path / "fresh", resume=True))
    with pytest.raises(I2EError, match="fewer than one batch"):
        train(config(data, tmp_path / "big", batch=64))


def test_tensorboard_missing_is_a_clear_error(monkeypatch, tmp_path):
    from i2e_deploy.training import train as train_module

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(I2EError, match="pip install tensorboard"):
        train_module._tensorboard(tmp_path)


def test_no_heldout_split_and_an_unreadable_image(tmp_path):
    """Without a held-out split the epoch line shows the training accuracy (no 'nan'); a
    corrupt image is left out with one warning line, not a worker traceback."""
    data = cifar_folder(tmp_path)
    (sorted(data.iterdir())[0] / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(data),
            "-o",
            str(tmp_path / "run"),
            "--imgsz",
            "32",
            "--ratio",
            "0.2",
            "--epochs",
            "2",
            "--batch",
            "5",
            "--workers",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "nan" not in result.output and "Traceback" not in result.output
    epochs = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and all("(no held-out set)" in line for line in epochs), epochs
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "skipped 1 unreadable file(s) of 25" in warnings[0], warnings
    with open(tmp_path / "run" / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["val_top1"], r["val_top5"]) for r in rows] == [("", "")] * 2
    _, card = load_checkpoint(tmp_path / "run" / "best.pt")
    assert "heldout_top1" not in card.provenance
