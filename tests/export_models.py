"""Random MS-ResNets whose neurons fire, and inputs, for the export tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from i2e_deploy.card import ModelCard
from i2e_deploy.export.onnx import export_onnx
from i2e_deploy.images import synthetic_images
from i2e_deploy.model.converter import convert
from i2e_deploy.model.msresnet import build_model


def firing_model(
    arch: str = "msresnet18", events: bool = False, imgsz: int = 32, seed: int = 0
) -> tuple[nn.Module, ModelCard]:
    """A random model whose every LIF layer fires at roughly 1-50 %: BatchNorm statistics are
    measured on sample inputs (a fresh model's unit statistics leave it almost silent, which
    would make any comparison vacuous), then its affine parameters are randomised."""
    card = ModelCard(arch=arch, input="events" if events else "images", imgsz=imgsz, resize=imgsz)
    torch.manual_seed(seed)
    model = build_model(card)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # cumulative average over the calibration pass
    model.train().i2e.eval()
    with torch.no_grad():
        model(sample_inputs(card, 4, seed + 100))
        gen = torch.Generator().manual_seed(seed)
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) * 0.5 + 0.5)
            bn.bias.copy_(torch.rand(bn.num_features, generator=gen) * 0.4 - 0.25)
    return model.eval(), card


def sample_images(card: ModelCard, count: int, seed: int = 0) -> torch.Tensor:
    """Structured random uint8 NHWC images at the card's size."""
    return torch.from_numpy(synthetic_images(count, card, seed))


def sample_inputs(card: ModelCard, count: int, seed: int = 0) -> torch.Tensor:
    """uint8 NHWC images, or for event models those images as events [N, T, 2, H, W]."""
    images = sample_images(card, count, seed)
    if card.input == "events":
        return convert(images, card.ratio).transpose(0, 1).contiguous()
    return images


@pytest.fixture(scope="session")
def graphs(tmp_path_factory):
    """The exported graphs shared by the export test modules (exported once per session)."""
    if not _GRAPHS:  # a fixture imported into two modules is two fixtures: share the work
        _GRAPHS.update(_export_graphs(tmp_path_factory.mktemp("export")))
    return _GRAPHS


_GRAPHS: dict = {}


def _export_graphs(root) -> dict:
    model, card = firing_model("msresnet18", imgsz=32, seed=5)
    ev_model, ev_card = firing_model("msresnet18", events=True, imgsz=32, seed=6)
    paths = {
        "uint8": export_onnx(model, card, root / "uint8.onnx").path,
        "float": export_onnx(model, card, root / "float.onnx", input_format="float").path,
        "static": export_onnx(model, card, root / "static.onnx", batch=2, dynamic=False).path,
        "events": export_onnx(ev_model, ev_card, root / "events.onnx").path,
        "converter": export_onnx(model, card, root / "converter.onnx", converter_only=True).path,
        "converter_float": export_onnx(
            model,
            card,
            root / "converter_float.onnx",
            converter_only=True,
            input_format="float",
            batch=3,
            dynamic=False,
        ).path,
    }
    return {
        "paths": paths,
        "model": model,
        "card": card,
        "ev_model": ev_model,
        "ev_card": ev_card,
        "root": root,
    }
