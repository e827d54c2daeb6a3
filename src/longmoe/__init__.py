"""longmoe: open, PyTorch-native sparse-MoE long-context transformers."""

from .api import Generation, Model, load
from .checkpoint import CheckpointError
from .model import ConfigError, ModelConfig

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "Generation", "Model", "ModelConfig", "load", "__version__"]
