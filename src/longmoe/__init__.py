"""longmoe: open, PyTorch-native sparse-MoE long-context transformers."""

import os

# oneDNN keeps up to 1024 matmul primitives; MoE prefill meets new shapes every chunk (per-expert row counts), so
# the default cache only grows (0.1-0.3 GiB here) without speeding anything up. Read at oneDNN's first use, so this
# only takes effect when longmoe is imported before torch runs a matmul; a user's own setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")


from .api import Generation, Model, load
from .checkpoint import CheckpointError
from .model import ConfigError, ModelConfig

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "Generation", "Model", "ModelConfig", "load", "__version__"]
