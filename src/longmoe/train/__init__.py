"""Training: MoE pretraining and context extension, one process or many under torchrun."""

from .config import PRESETS, TrainConfig, load_config
from .loop import Trainer

__all__ = ["PRESETS", "TrainConfig", "Trainer", "load_config"]
