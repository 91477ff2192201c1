"""The reference model. Its names load on first use, so that torch-free parts of the
package (``model.layers``, read by streams of exported graphs) do not import PyTorch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint import load_checkpoint, save_checkpoint
    from .converter import I2E, convert
    from .msresnet import MSResNet, build_model, msresnet18, msresnet34
    from .neuron import LIF

_API = {
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "I2E": "converter",
    "convert": "converter",
    "MSResNet": "msresnet",
    "build_model": "msresnet",
    "msresnet18": "msresnet",
    "msresnet34": "msresnet",
    "LIF": "neuron",
}
__all__ = [
    "I2E",
    "LIF",
    "MSResNet",
    "build_model",
    "convert",
    "load_checkpoint",
    "msresnet18",
    "msresnet34",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
