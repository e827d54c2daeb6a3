"""Checkpoints: transformers-format families in and out (name maps + config translation), native longmoe format."""

from .hf import FAMILIES, SUPPORTED, Checkpoint, load, native, save
from .safetensors_io import CheckpointError

__all__ = ["FAMILIES", "SUPPORTED", "Checkpoint", "CheckpointError", "load", "native", "save"]
