"""I2E event datasets: both published layouts round-trip bit-exactly and read as the paper's
own loaders read them; event folders feed held-out splits like image folders."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from training_data import cifar_folder

from i2e_deploy.errors import I2EError
from i2e_deploy.model.converter import convert_uint8
from i2e_deploy.training import data as D
from i2e_deploy.training.eventsets import (
    EventFolder,
    is_event_folder,
    pack,
    read_sample,
    unpack,
    write_sample,
)


def real_events(tmp_path, size: int = 32) -> np.ndarray:
    """Events of real CIFAR images (bool [N, 8, 2, size, size])."""
    from i2e_deploy.card import ModelCard
    from i2e_deploy.images import load_image_folder

    card = ModelCard(imgsz=size, resize=size)
    images = load_image_folder(cifar_folder(tmp_path), card, limit=6).images
    return convert_uint8(images, 0.07, time_major=False)


def paper_unpack(raw: np.ndarray) -> np.ndarray:
    """The decoder published with the paper's datasets (header view, unpackbits, trim)."""
    shape = tuple(raw[:8].view(np.uint16))
    bits = np.unpackbits(raw[8:])[: np.prod(shape)]
    return bits.reshape(shape).astype(bool)


@pytest.mark.parametrize("shape", [(8, 2, 32, 32), (8, 2, 5, 7), (1, 1, 1, 3), (3, 2, 17, 1)])
def test_pack_round_trip_any_shape(shape):
    rng = np.random.default_rng(sum(shape))
    events = rng.random(shape) < 0.3
    raw = pack(events)
    assert raw.dtype == np.uint8 and raw.size == 8 + (events.size + 7) // 8
    assert raw[:8].tobytes() == np.array(shape, "<u2").tobytes()
    assert np.array_equal(unpack(raw), events)
    assert np.array_equal(paper_unpack(raw), events)


@pytest.mark.parametrize("fmt", ["npz", "packed"])
def test_sample_files_round_trip_real_events(tmp_path, fmt):
    events = real_events(tmp_path)
    assert 0.01 < events.mean() < 0.3
    for i, sample in enumerate(events):
        path = tmp_path / f"{i}.{'npz' if fmt == 'npz' else 'npy'}"
        write_sample(path, sample, fmt)
        back = read_sample(path)
        assert back.dtype == np.bool_ and np.array_equal(back, sample)
    # No temporary files are left behind.
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_files_read_by_the_papers_loaders(tmp_path):
    sample = real_events(tmp_path)[0]
    write_sample(tmp_path / "a.npz", sample, "npz")
    write_sample(tmp_path / "b.npy", sample, "packed")
    # Paper's I2E_NpzFolder: np.load(path)['arr_0'].
    assert np.array_equal(np.load(tmp_path / "a.npz")["arr_0"], sample)
    # Paper's Hugging Face loader: np.load of the stored bytes, then unpack.
    raw = np.load(io.BytesIO((tmp_path / "b.npy").read_bytes()))
    assert np.array_equal(paper_unpack(raw), sample)


def test_reads_papers_npz_written_with_savez(tmp_path):
    sample = real_events(tmp_path)[1]
    np.savez_compressed(tmp_path / "7", sample)  # how the paper's notebook writes them
    assert np.array_equal(read_sample(tmp_path / "7.npz"), sample)


def test_event_folder_numeric_classes_and_split(tmp_path):
    root = tmp_path / "events"
    rng = np.random.default_rng(0)
    for label in (0, 1, 2, 10):  # numeric folder names sort as numbers, not strings
        (root / str(label)).mkdir(parents=True)
        for i in range(5):
            fmt = "npz" if i % 2 else "packed"
            write_sample(
                root / str(label) / f"{i}.{'npz' if fmt == 'npz' else 'npy'}",
                rng.random((8, 2, 6, 6)) < 0.2,
                fmt,
            )
    assert is_event_folder(root)
    folder = EventFolder(root)
    assert folder.classes == ["0", "1", "2", "10"]
    assert len(folder) == 20 and folder.sample_shape == (8, 2, 6, 6)
    events, label = folder[len(folder) - 1]
    assert events.dtype == torch.bool and label == 3
    train_idx, held = D.split_indices(folder.targets, 8, seed=0)
    assert len(held) == 8 and not set(train_idx) & set(held)
    assert sorted(folder.targets[i] for i in held) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_corrupt_and_wrong_samples_are_one_line_errors(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(I2EError, match="not a readable I2E event sample"):
        read_sample(tmp_path / "bad.npz")
    np.save(tmp_path / "short.npy", pack(np.ones((8, 2, 4, 4), bool))[:12])
    with pytest.raises(I2EError, match="truncated"):
        read_sample(tmp_path / "short.npy")
    np.save(tmp_path / "image.npy", np.zeros((3, 4, 4), bool))
    with pytest.raises(I2EError, match=r"expected events \[T, 2, H, W\]"):
        read_sample(tmp_path / "image.npy")


def test_image_folder_is_not_an_event_folder(tmp_path):
    assert not is_event_folder(cifar_folder(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(I2EError, match="no class folders"):
        EventFolder(tmp_path / "empty")
