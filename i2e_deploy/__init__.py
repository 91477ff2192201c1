"""i2e-deploy: export, run and verify I2E spiking networks (MS-ResNet + I2E converter)."""
from .card import ModelCard
from .errors import I2EError
from .model import I2E, LIF, MSResNet, build_model, load_checkpoint, save_checkpoint

__version__ = "0.1.0"
__all__ = ["I2E", "I2EError", "LIF", "MSResNet", "ModelCard", "build_model", "load_checkpoint",
           "save_checkpoint", "__version__"]
