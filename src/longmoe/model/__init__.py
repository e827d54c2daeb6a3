"""Pure single-device model math: no process groups, no I/O, no global state."""

from .attention import Segment, attend, attend_span, merge, sdpa
from .config import ConfigError, ModelConfig
from .loss import IGNORE, cross_entropy_sum
from .moe import MoE, load_balancing_loss, update_selection_bias, z_loss
from .transformer import Output, Transformer

__all__ = [
    "IGNORE",
    "ConfigError",
    "ModelConfig",
    "MoE",
    "Output",
    "Segment",
    "Transformer",
    "attend",
    "attend_span",
    "cross_entropy_sum",
    "load_balancing_loss",
    "merge",
    "sdpa",
    "update_selection_bias",
    "z_loss",
]
