"""`convert`: image folder -> I2E event dataset, equal to the paper's converter; the uint8
fast path behind it; resuming; one-line errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from paper_model import paper_convert
from training_data import cifar_folder
from typer.testing import CliRunner

from i2e_deploy.card import ModelCard
from i2e_deploy.cli import app
from i2e_deploy.errors import I2EError
from i2e_deploy.images import load_image_folder, preprocess, read_image
from i2e_deploy.model.converter import EVAL_PAIRS, TRAIN_GROUPS, convert, convert_uint8
from i2e_deploy.training.convert import convert_folder
from i2e_deploy.training.eventsets import META_FILE, EventFolder


def paper_events(images_uint8: np.ndarray, ratio: float) -> np.ndarray:
    """The paper's converter on uint8 NHWC images, as bool [N, T, 2, H, W]."""
    floats = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0
    return paper_convert(floats, ratio).transpose(0, 1).bool().numpy()


@pytest.fixture(scope="module")
def images_128(tmp_path_factory) -> np.ndarray:
    """Real CIFAR images resized to 128x128 (uint8 NHWC), the paper's CIFAR setting."""
    folder = cifar_folder(tmp_path_factory.mktemp("c128"))
    images = load_image_folder(folder, ModelCard(imgsz=128, resize=128), limit=20).images
    return images


@pytest.mark.parametrize("ratio", [0.03, 0.07, 0.1, 0.23])
def test_uint8_fast_path_equals_paper(images_128, ratio):
    expected = paper_events(images_128, ratio)
    assert 0 < expected.mean() < 0.5
    sample_major = convert_uint8(images_128, ratio, time_major=False, threads=2)
    assert np.array_equal(sample_major, expected)
    buffer = np.ones((len(images_128), 8, 2, 128, 128), bool)
    convert_uint8(images_128, ratio, time_major=False, threads=1, out=buffer)
    assert np.array_equal(buffer, expected)
    time_major = convert_uint8(images_128[:5], ratio)
    assert np.array_equal(time_major, expected[:5].transpose(1, 0, 2, 3, 4))


def test_uint8_fast_path_edge_cases(images_128):
    batch = images_128[:4].copy()
    batch[1] = 90  # flat: no events (documented deviation from the paper)
    batch[2] = batch[2] // 64 + 100  # tiny range, four levels
    events = convert_uint8(batch, 0.07, time_major=False)
    assert not events[1].any()
    keep = [0, 2, 3]
    assert np.array_equal(events[keep], paper_events(batch[keep], 0.07))
    # ratio 0 fires everywhere on non-flat images, as released.
    zero = convert_uint8(batch, 0.0, time_major=False)
    assert zero[keep].all() and not zero[1].any()
    # Training-time directions go through the same path.
    pairs = tuple(group[-1] for group in TRAIN_GROUPS)
    tensor = torch.from_numpy(batch[keep])
    assert torch.equal(
        convert(tensor, 0.07, pairs), convert(tensor.permute(0, 3, 1, 2).float() / 255, 0.07, pairs)
    )
    assert pairs != EVAL_PAIRS


def test_uint8_fast_path_rejects_other_input():
    with pytest.raises(ValueError, match="uint8 NHWC"):
        convert_uint8(np.zeros((1, 3, 8, 8), np.uint8), 0.07)
    with pytest.raises(ValueError, match="out must be bool"):
        convert_uint8(np.zeros((2, 8, 8, 3), np.uint8), 0.07, out=np.zeros((2, 8, 2, 8, 8), bool))


@pytest.mark.parametrize("fmt", ["npz", "packed"])
def test_convert_folder_equals_reference_and_resumes(tmp_path, fmt):
    src = cifar_folder(tmp_path)
    dst = tmp_path / "events"
    stats = convert_folder(src, dst, fmt, ratio=0.07, imgsz=48, batch=10, workers=0)
    dataset = EventFolder(dst)
    assert stats.written == len(dataset) == 24 and stats.skipped == 0
    assert dataset.classes == sorted(p.name for p in src.iterdir())
    card = ModelCard(imgsz=48, resize=48)
    sources = sorted(src.rglob("*.jpg"))
    images = np.stack([preprocess(read_image(p), card) for p in sources])
    expected = paper_events(images, 0.07)
    got = np.stack([dataset[i][0].numpy() for i in range(len(dataset))])
    assert np.array_equal(got, expected)
    assert [dataset[i][1] for i in range(len(dataset))] == [
        dataset.classes.index(p.parent.name) for p in sources
    ]

    # Resume: only the missing sample is written; stale temp files of a killed run go.
    missing = dataset.samples[5][0]
    (dst / dataset.classes[0] / ".0001.npz.abc.tmp").write_bytes(b"partial")
    os.remove(missing)
    again = convert_folder(src, dst, fmt, ratio=0.07, imgsz=48, batch=10, workers=0)
    assert (again.written, again.skipped) == (1, 23)
    assert np.array_equal(EventFolder(dst)[5][0].numpy(), expected[5])
    assert not list(dst.rglob(".*.tmp"))


def test_convert_refuses_mixing_settings(tmp_path):
    src = cifar_folder(tmp_path, classes=3, per_class=8)
    dst = tmp_path / "events"
    convert_folder(src, dst, "packed", ratio=0.1, imgsz=32, workers=0)
    assert (dst / META_FILE).is_file()
    with pytest.raises(I2EError, match="ratio 0.1"):
        convert_folder(src, dst, "packed", ratio=0.2, imgsz=32, workers=0)
    with pytest.raises(I2EError, match="unknown format"):
        convert_folder(src, dst, "hdf5")


def test_convert_cli(tmp_path):
    src = cifar_folder(tmp_path)
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "convert",
            str(src),
            str(tmp_path / "ev"),
            "--format",
            "packed",
            "--imgsz",
            "32",
            "--ratio",
            "0.2",
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote 24 samples (0 already there)" in result.output
    assert len(list((tmp_path / "ev").rglob("*.npy"))) == 24
    bad = runner.invoke(app, ["convert", str(tmp_path / "nope"), str(tmp_path / "ev2")])
    assert bad.exit_code == 2 and "data folder not found" in bad.output
    assert "Traceback" not in bad.output


def test_convert_leaves_out_unreadable_images(tmp_path):
    src = cifar_folder(tmp_path)
    broken = sorted(src.iterdir())[1] / "zz_broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = CliRunner().invoke(
        app,
        [
            "convert",
            str(src),
            str(tmp_path / "ev"),
            "--imgsz",
            "32",
            "--ratio",
            "0.2",
            "--workers",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote 24 samples (0 already there, 1 unreadable left out)" in result.stdout
    assert result.stderr.count("warning:") == 1 and "zz_broken.png" in result.stderr
    assert len(list((tmp_path / "ev").rglob("*.npz"))) == 24
