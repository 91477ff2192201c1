"""A model's layer table rows, without PyTorch: exported graphs carry their table (export
writes it into the metadata), so a stream of a graph counts spikes where torch is absent."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Layer:
    """One row of a model's layer table, in network order.

    ``kind``: 'events' (the converter's events, or the input events of an event model),
    'lif', 'conv', 'linear' or 'residual' (a block's membrane sum). ``macs``: dense
    multiply-accumulates per image over all T steps (conv / linear). ``source``: the spiking
    layer whose output a conv / linear reads (every one reads binary spikes)."""

    name: str
    kind: str
    macs: int = 0
    source: str | None = None
    shape: tuple[int, ...] = ()  # output per time step and image, [C, H, W] or [C]


def layers_to_json(table: list[Layer]) -> str:
    return json.dumps([asdict(layer) for layer in table])


def layers_from_json(text: str) -> list[Layer]:
    return [Layer(**{**row, "shape": tuple(row["shape"])}) for row in json.loads(text)]
