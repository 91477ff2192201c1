"""The I2E converter against SPEC §1: the paper's literal conv converter, hand-computed cases."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from paper_model import paper_convert
from PIL import Image

from i2e_deploy.model.converter import EVAL_PAIRS, I2E, TIME_ORDER, TRAIN_GROUPS, convert

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_TAR = SHARED / "data" / "cifar10-train.tar.gz"

# SPEC §1, copied by hand: training groups per kernel (first = eval choice) and time order.
SPEC_GROUPS = (
    ((5, 6), (1, 2), (2, 3), (4, 5), (7, 8), (8, 9)),
    ((5, 2), (4, 1), (6, 3), (7, 4), (8, 5), (9, 6)),
    ((5, 3), (4, 2), (7, 5), (8, 6)),
    ((5, 1), (6, 2), (8, 4), (9, 5)),
    ((9, 4), (6, 1)),
    ((4, 3), (7, 6)),
    ((3, 8), (2, 7)),
    ((8, 1), (9, 2)),
)
SPEC_ORDER = (4, 5, 6, 7, 0, 1, 2, 3)


@pytest.fixture(scope="module")
def cifar_images() -> torch.Tensor:
    """64 real CIFAR-10 training images, float NCHW [0, 1], 32x32."""
    if not CIFAR_TAR.is_file():
        pytest.skip("../shared/data/cifar10-train.tar.gz not present")
    images = []
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                data = tar.extractfile(member).read()
                images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                if len(images) == 64:
                    break
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def test_constants_match_spec():
    assert TRAIN_GROUPS == SPEC_GROUPS
    assert EVAL_PAIRS == tuple(g[0] for g in SPEC_GROUPS)
    assert tuple(TIME_ORDER) == SPEC_ORDER


@pytest.mark.parametrize("ratio", [0.0, 0.03, 0.07, 0.12, 0.3, 1.0])
def test_real_images_match_paper(cifar_images, ratio):
    ours = convert(cifar_images, ratio)
    assert torch.equal(ours, paper_convert(cifar_images, ratio))
    if 0 < ratio < 1:
        assert 0 < ours.mean() < 0.5  # real events, not a degenerate all/none output


@pytest.mark.parametrize("ratio", [0.07, 0.12])
def test_resized_real_images_match_paper(cifar_images, ratio):
    big = F.interpolate(
        cifar_images[:16], size=(128, 128), mode="bilinear", antialias=True, align_corners=False
    ).clamp(0, 1)
    assert torch.equal(convert(big, ratio), paper_convert(big, ratio))


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.07, 0.12, 0.5, 1.0])
def test_non_square_and_uint8_real_images(cifar_images, ratio):
    crop = cifar_images[:, :, 3:30, 1:32]  # 27 x 31
    as_uint8 = (crop * 255).round().to(torch.uint8)
    reference = paper_convert(as_uint8.float() / 255.0, ratio)
    assert torch.equal(convert(as_uint8.permute(0, 2, 3, 1).contiguous(), ratio), reference)
    assert torch.equal(convert(as_uint8.float() / 255.0, ratio), reference)


def test_module_eval_matches_paper(cifar_images):
    i2e = I2E(ratio=0.07).eval()
    assert torch.equal(i2e(cifar_images), paper_convert(cifar_images, 0.07))
    assert torch.equal(i2e(cifar_images), i2e(cifar_images))


def single_bright_pixel(size: int = 3) -> torch.Tensor:
    image = torch.zeros(1, 3, size, size)
    image[0, 1, size // 2, size // 2] = 1.0  # green only: intensity is the max over channels
    return image


def test_hand_computed_single_pixel():
    # Bright centre of a 3x3 black image, range 1, threshold 0.5. Kernel (a, b) gives
    # D(p) = V(p + off(b)) - V(p + off(a)), so ON sits at centre - off(b), OFF at centre - off(a),
    # where cell c has offset ((c-1)//3 - 1, (c-1)%3 - 1). Timestep t uses kernel SPEC_ORDER[t].
    expected = {  # t: (kernel pair, ON (row, col), OFF (row, col))
        0: ((9, 4), (1, 2), (0, 0)),
        1: ((4, 3), (2, 0), (1, 2)),
        2: ((3, 8), (0, 1), (2, 0)),
        3: ((8, 1), (2, 2), (0, 1)),
        4: ((5, 6), (1, 0), (1, 1)),
        5: ((5, 2), (2, 1), (1, 1)),
        6: ((5, 3), (2, 0), (1, 1)),
        7: ((5, 1), (2, 2), (1, 1)),
    }
    events = convert(single_bright_pixel(), 0.5)
    assert events.shape == (8, 1, 2, 3, 3)
    for t, (_, on, off) in expected.items():
        want = torch.zeros(2, 3, 3)
        want[0][on] = 1
        want[1][off] = 1
        assert torch.equal(events[t, 0], want), f"timestep {t}"


def test_threshold_is_greater_or_equal():
    # Rows [0, 0.5, 1, 1]; range 1, ratio 0.5 -> threshold exactly 0.5. Timestep 4 is kernel 0,
    # (5, 6): D = right neighbour - pixel = [0.5, 0.5, 0, 0] (replicate pad at the right edge).
    row = torch.tensor([0.0, 0.5, 1.0, 1.0])
    image = row.expand(1, 3, 4, 4).clone()
    on = convert(image, 0.5)[4, 0, 0]
    assert torch.equal(on, torch.tensor([[1.0, 1.0, 0, 0]]).expand(4, 4))
    # Just below the threshold at column 0 no longer fires; column 1 (now 0.5 + eps) does.
    image[..., 1] = 0.5 - 2**-10
    on = convert(image, 0.5)[4, 0, 0]
    assert torch.equal(on, torch.tensor([[0.0, 1.0, 0, 0]]).expand(4, 4))
    assert torch.equal(convert(image, 0.5), paper_convert(image, 0.5))


def test_flat_image_emits_nothing_unlike_released_code():
    flat = torch.full((2, 3, 8, 8), 0.4)
    assert convert(flat, 0.07).sum() == 0
    assert paper_convert(flat, 0.07).min() == 1  # the released quirk: 0 >= 0 everywhere
    uint8_flat = torch.full((1, 8, 8, 3), 200, dtype=torch.uint8)
    assert convert(uint8_flat, 0.07).sum() == 0


def test_range_is_per_image():
    torch.manual_seed(0)
    textured = torch.rand(1, 3, 16, 16)
    faint = 0.5 + 0.01 * torch.rand(1, 3, 16, 16)
    flat = torch.full((1, 3, 16, 16), 0.9)
    batch = torch.cat([textured, faint, flat])
    events = convert(batch, 0.1)
    assert torch.equal(events[:, 0:1], convert(textured, 0.1))
    assert torch.equal(events[:, 1:2], convert(faint, 0.1))
    assert events[:, 1].sum() > 0  # a low-contrast image still fires on its own range
    assert events[:, 2].sum() == 0
    assert torch.equal(events[:, :2], paper_convert(batch[:2], 0.1))


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.07, 0.3])
def test_uint8_nhwc_equals_float_nchw(ratio):
    torch.manual_seed(1)
    raw = torch.randint(0, 256, (40, 20, 24, 3), dtype=torch.uint8)  # > 1 chunk of images
    raw[1] = raw[1] // 64 + 100  # low contrast: a threshold between few levels
    raw[2, :, :12] = 7  # half flat
    raw[3] = 200  # flat
    as_float = raw.permute(0, 3, 1, 2).float() / 255.0
    expected = paper_convert(as_float, ratio)
    expected[:, 3] = 0  # our flat-image rule
    assert torch.equal(convert(raw, ratio), convert(as_float, ratio))
    assert torch.equal(convert(raw, ratio), expected)
    if ratio > 0:
        assert torch.equal(I2E(ratio).eval()(raw), expected)


def test_ratio_zero_is_refused_where_a_model_is_built(tmp_path):
    """At ratio 0 the reference fires everywhere and a graph's comparisons would not: no
    model, card, graph or dataset is made with it (``convert`` keeps the SPEC semantics)."""
    from typer.testing import CliRunner

    from i2e_deploy.card import ModelCard
    from i2e_deploy.cli import app
    from i2e_deploy.errors import I2EError
    from i2e_deploy.export.deploy import DeployI2E

    for ratio in (0.0, -0.1):
        with pytest.raises(I2EError, match="ratio must be positive"):
            ModelCard(ratio=ratio)
        with pytest.raises(ValueError, match="ratio must be positive"):
            I2E(ratio)
        with pytest.raises(ValueError, match="ratio must be positive"):
            DeployI2E(ratio)
    (tmp_path / "images" / "cat").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "images" / "cat" / "0.png"), np.full((8, 8, 3), 9, np.uint8))
    result = CliRunner().invoke(
        app, ["convert", str(tmp_path / "images"), str(tmp_path / "out"), "--ratio", "0"]
    )
    assert result.exit_code == 2 and "ratio must be positive" in result.output
    assert not (tmp_path / "out").exists()


def test_output_shape_dtype_values():
    torch.manual_seed(2)
    events = convert(torch.rand(3, 3, 10, 14), 0.07)
    assert events.shape == (8, 3, 2, 10, 14)
    assert events.dtype == torch.float32
    assert set(events.unique().tolist()) == {0.0, 1.0}
    assert not (events[:, :, 0] * events[:, :, 1]).any()  # ON and OFF exclusive when ratio > 0


def test_bad_shapes_rejected():
    with pytest.raises(ValueError):
        convert(torch.rand(3, 10, 10), 0.07)
    with pytest.raises(ValueError):
        convert(torch.rand(1, 1, 10, 10), 0.07)
    with pytest.raises(ValueError):
        convert(torch.zeros(1, 10, 10, 4, dtype=torch.uint8), 0.07)


def decode_pairs(events: torch.Tensor, size: int) -> list[tuple[int, int]]:
    """Per timestep, the (a, b) pair that produced the events of a single centred bright pixel."""
    centre = size // 2
    pairs = []
    for t in range(events.shape[0]):
        cells = []
        for polarity in (1, 0):  # OFF marks cell a, ON marks cell b
            ((row, col),) = torch.nonzero(events[t, 0, polarity]).tolist()
            cells.append((centre - row + 1) * 3 + (centre - col + 1) + 1)
        pairs.append(tuple(cells))
    return pairs


def test_decode_recovers_eval_pairs():
    size = 5
    pairs = decode_pairs(convert(single_bright_pixel(size), 0.5), size)
    assert pairs == [SPEC_GROUPS[k][0] for k in SPEC_ORDER]


def test_train_mode_draws_from_groups():
    torch.manual_seed(3)
    size = 5
    image = single_bright_pixel(size).repeat(2, 1, 1, 1)
    i2e = I2E(0.5).train()
    seen = [set() for _ in range(8)]
    for _ in range(60):
        events = i2e(image)
        assert torch.equal(events[:, 0], events[:, 1])  # one draw per batch
        for t, pair in enumerate(decode_pairs(events, size)):
            assert pair in SPEC_GROUPS[SPEC_ORDER[t]], f"timestep {t} used {pair}"
            seen[t].add(pair)
    assert all(len(s) > 1 for s in seen)
    i2e.eval()
    first = i2e(image)
    assert all(torch.equal(first, i2e(image)) for _ in range(5))
    assert decode_pairs(first, size) == [SPEC_GROUPS[k][0] for k in SPEC_ORDER]
