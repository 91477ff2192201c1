"""The converter gives the same events on every device: every path (the CPU's integer
tables, the tensor path a GPU runs, the exported graph's module and the graph on ONNX
Runtime) against the reference formula, computed here in float32 with a true division by
255, on images holding all 256 x 256 pairs of neighbouring pixel values, at ratios that put
many differences exactly on the threshold. A division done as a reciprocal multiply (what
PyTorch's CUDA kernel does) gives other events on these images: the test can fail."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from runtime_models import shared_model

from i2e_deploy.artifacts import read_card
from i2e_deploy.export.deploy import DeployI2E
from i2e_deploy.model.converter import EVAL_PAIRS, TIME_ORDER, convert, convert_tensor

# Ratios whose threshold on a full-range tile is exactly some level difference (ties); on
# the first two a reciprocal multiply gives other events.
TIES = (float(np.float32(1 / 255)), float(np.float32(2 / 255)))
RATIOS = (*TIES, float(np.float32(18 / 255)), 0.07, 0.5)


def all_pairs(tile: int = 32) -> np.ndarray:
    """uint8 NHWC images whose horizontal neighbours (2j, 2j + 1) of row a hold (a, b) for
    every a, b in 0..255: one 256 x 512 image cut into ``tile`` px tiles (even, so no pair
    straddles two), each with its own range and threshold."""
    rows = np.arange(256)[:, None]
    image = np.empty((256, 512), np.uint8)
    image[:, 0::2] = np.broadcast_to(rows, (256, 256))
    image[:, 1::2] = np.broadcast_to(np.arange(256)[None, :], (256, 256))
    tiles = [
        image[r : r + tile, c : c + tile] for r in range(0, 256, tile) for c in range(0, 512, tile)
    ]
    gray = np.stack(tiles)
    return np.repeat(gray[..., None], 3, axis=-1)


def reference(images: np.ndarray, ratio: float, reciprocal: bool = False) -> np.ndarray:
    """SPEC §1 in float32: bool events [T, N, 2, H, W]."""
    levels = images.max(axis=-1).astype(np.float32)
    v = levels * np.float32(1 / 255) if reciprocal else levels / np.float32(255)
    padded = np.pad(v, ((0, 0), (1, 1), (1, 1)), mode="edge")
    flat = padded.reshape(len(v), -1)
    value_range = flat.max(axis=1) - flat.min(axis=1)
    threshold = (value_range * np.float32(ratio))[:, None, None]
    live = (value_range > 0)[:, None, None]
    height, width = v.shape[1:]

    def cell(c: int) -> np.ndarray:
        r, q = divmod(c - 1, 3)
        return padded[:, r : r + height, q : q + width]

    frames = []
    for k in TIME_ORDER:
        a, b = EVAL_PAIRS[k]
        diff = cell(b) - cell(a)
        on = (np.maximum(diff, 0) >= threshold) & live
        off = (np.maximum(-diff, 0) >= threshold) & live
        frames.append(np.stack((on, off), axis=1))
    return np.stack(frames)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return all_pairs()


def test_the_images_hold_every_neighbouring_pair(images):
    pairs = images[..., 0].reshape(-1, 2)  # consecutive pixels of a row, column 2j and 2j+1
    assert len({(int(a), int(b)) for a, b in pairs}) == 256 * 256


@pytest.mark.parametrize("ratio", RATIOS)
def test_every_path_gives_the_reference_events(images, ratio):
    want = reference(images, ratio)
    batch = torch.from_numpy(images)
    cpu = convert(batch, ratio).bool().numpy()  # the integer tables
    device = convert_tensor(batch, ratio).bool().numpy()  # what CUDA runs
    module = DeployI2E(ratio)(batch).bool().numpy()  # what the exported graph computes
    for name, got in (("tables", cpu), ("tensor path", device)):
        assert np.array_equal(got, want), name
    assert np.array_equal(module.reshape(want.shape), want), "exported module"
    # The test can tell: a reciprocal multiply gives other events on these images.
    if ratio in TIES:
        assert not np.array_equal(reference(images, ratio, reciprocal=True), want)


def test_the_exported_graph_gives_the_reference_events(images):
    graph = shared_model("converter.onnx")
    ratio = read_card(graph).ratio
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    got = np.concatenate(
        [session.run(None, {"images": images[i : i + 16]})[0] for i in range(0, len(images), 16)]
    )  # [N, T, 2, H, W] uint8
    assert np.array_equal(got.transpose(1, 0, 2, 3, 4).astype(bool), reference(images, ratio))
