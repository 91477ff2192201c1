"""i2e-deploy: export, run and verify I2E spiking networks (MS-ResNet + I2E converter).

The public API loads on first use, so that ``import i2e_deploy.errors`` or the CLI's
``--help`` do not import PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from .card import ModelCard
    from .errors import I2EError
    from .model import I2E, LIF, MSResNet, build_model, load_checkpoint, save_checkpoint

_API = {
    "ModelCard": "card",
    "I2EError": "errors",
    "I2E": "model",
    "LIF": "model",
    "MSResNet": "model",
    "build_model": "model",
    "load_checkpoint": "model",
    "save_checkpoint": "model",
}
__all__ = [
    "I2E",
    "I2EError",
    "LIF",
    "MSResNet",
    "ModelCard",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
