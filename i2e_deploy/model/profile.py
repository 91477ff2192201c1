"""Parameter and MAC counts of a model at its card's input size, per layer and in total."""

from __future__ import annotations

import torch
from torch import nn

from ..card import ModelCard
from .converter import I2E
from .layers import Layer
from .msresnet import BasicBlock, build_model
from .neuron import LIF


def example_input(card: ModelCard, batch: int = 1) -> torch.Tensor:
    if card.input == "events":
        return torch.zeros(batch, card.T, 2, card.imgsz, card.imgsz)
    return torch.zeros(batch, 3, card.imgsz, card.imgsz)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# The name of the event input of an event-input model (image models: 'i2e', the converter).
INPUT_EVENTS = "input"


@torch.no_grad()
def layer_table(card: ModelCard) -> list[Layer]:
    """The converter's events, every LIF layer, every conv / linear (with its MACs and the
    spiking layer it reads) and every residual sum, in execution order.

    Runs the model on the meta device: shapes only, no arithmetic, so it is instant. A conv
    reads the spiking layer that ran last before it (LIF -> conv in every block and
    shortcut, converter -> stem, LIF -> pool -> flatten -> fc in the head)."""
    with torch.device("meta"):
        model = build_model(card).eval()
        sample = example_input(card)
    rows: list[Layer] = []
    last_spikes = [INPUT_EVENTS]
    if card.input == "events":
        rows.append(Layer(INPUT_EVENTS, "events", shape=(2, card.imgsz, card.imgsz)))

    def hook(name: str, module: nn.Module, output: torch.Tensor) -> None:
        per_step = tuple(output.shape[1:])
        if isinstance(module, (I2E, LIF)):
            kind = "events" if isinstance(module, I2E) else "lif"
            shape = per_step[1:] if isinstance(module, I2E) else per_step  # I2E: [T, B, ...]
            rows.append(Layer(name, kind, shape=shape))
            last_spikes[0] = name
        elif isinstance(module, nn.Conv2d):
            taps = (
                module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            )
            rows.append(Layer(name, "conv", output.numel() * taps, last_spikes[0], per_step))
        elif isinstance(module, nn.Linear):
            rows.append(
                Layer(name, "linear", output.numel() * module.in_features, last_spikes[0], per_step)
            )
        elif isinstance(module, BasicBlock):
            rows.append(Layer(name, "residual", shape=per_step))

    handles = [
        m.register_forward_hook(lambda m, _i, out, name=name: hook(name, m, out))
        for name, m in model.named_modules()
        if isinstance(m, (I2E, LIF, nn.Conv2d, nn.Linear, BasicBlock))
    ]
    try:
        model(sample)
    finally:
        for h in handles:
            h.remove()
    return rows


def count_macs(card: ModelCard) -> int:
    """Multiply-accumulates of the conv and linear layers for one input (all T steps)."""
    return sum(layer.macs for layer in layer_table(card))


def describe(path, **overrides) -> tuple[ModelCard, dict[str, float]]:
    """A checkpoint's card (``load_checkpoint`` overrides applied), parameter count and
    GMACs per image."""
    from .checkpoint import load_checkpoint

    model, card = load_checkpoint(path, **overrides)
    return card, {"params": count_params(model), "gmacs_per_image": count_macs(card) / 1e9}
