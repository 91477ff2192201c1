"""Parameter and MAC counts of a model at its card's input size."""
from __future__ import annotations

import torch
from torch import nn

from ..card import ModelCard
from .msresnet import build_model


def example_input(card: ModelCard, batch: int = 1) -> torch.Tensor:
    if card.input == "events":
        return torch.zeros(batch, card.T, 2, card.imgsz, card.imgsz)
    return torch.zeros(batch, 3, card.imgsz, card.imgsz)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(card: ModelCard) -> int:
    """Multiply-accumulates of the conv and linear layers for one input (all T steps).

    Runs the model on the meta device: shapes only, no arithmetic, so it is instant."""
    with torch.device("meta"):
        model = build_model(card).eval()
        sample = example_input(card)
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * per_out
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model(sample)
    finally:
        for h in handles:
            h.remove()
    return total


def describe(path, **overrides) -> tuple[ModelCard, dict[str, float]]:
    """A checkpoint's card (``load_checkpoint`` overrides applied), parameter count and
    GMACs per image."""
    from .checkpoint import load_checkpoint

    model, card = load_checkpoint(path, **overrides)
    return card, {"params": count_params(model), "gmacs_per_image": count_macs(card) / 1e9}
