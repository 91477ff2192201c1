"""Files shipped with the package: the bundled default model, its training log and the demo's
photos (``demo/``, listed with their sources and licences in ``demo/photos.json``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import I2EError

ASSETS = Path(__file__).parent
DEFAULT_MODEL = ASSETS / "i2e_cifar10_msresnet18.pt"
DEMO_PHOTOS = ASSETS / "demo"


def resolve_model(name: str) -> Path:
    """'default' names the bundled model; anything else is a path."""
    if name == "default":
        if not DEFAULT_MODEL.is_file():
            raise I2EError("the bundled default model is missing from this installation")
        return DEFAULT_MODEL
    return Path(name)
