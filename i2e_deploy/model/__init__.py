from .checkpoint import load_checkpoint, save_checkpoint
from .converter import I2E, convert
from .msresnet import MSResNet, build_model, msresnet18, msresnet34
from .neuron import LIF

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
