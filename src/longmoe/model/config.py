"""One dataclass describes every model longmoe runs: its own, and the open families it imports.

Family conventions (Qwen's `decoder_sparse_step`, DeepSeek's `first_k_dense_replace`, Llama 4's NoPE interval, ...)
are resolved by the checkpoint adapters into the explicit per-layer lists below, so the model code only ever reads
`config.layer_types[i]`, `config.moe_layers[i]` and `config.rope_layers[i]`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import LongmoeError

ATTENTION_TYPES = ("full", "sliding", "chunked")
QK_NORMS = (None, "head", "full", "l2")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


class ConfigError(LongmoeError, ValueError):
    """A model config that cannot describe a working model; the message names the field and the fix."""


@dataclass
class ModelConfig:
    # --- sizes ---
    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 0  # 0 -> hidden_size // num_heads
    intermediate_size: int = 1024  # width of the dense (non-MoE) MLP layers
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    # --- attention ---
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    o_bias: bool = False  # bias on the output projection
    qk_norm: str | None = None  # "head": RMSNorm per head (Qwen3); "full": over all heads (OLMoE); "l2": Llama 4
    clip_qkv: float | None = None  # OLMoE: clamp q, k, v to [-c, c]
    layer_types: list[str] = field(default_factory=list)  # per layer: "full" | "sliding" | "chunked"; [] -> all full
    sliding_window: int = 0  # keys visible to a query on "sliding" layers, itself included
    attention_chunk_size: int = 0  # "chunked" layers attend within aligned chunks of this many positions (Llama 4)
    rope_layers: list[bool] = field(default_factory=list)  # per layer; False = no positional encoding; [] -> all
    attn_temperature_tuning: bool = False  # Llama 4: scale NoPE-layer queries up with position (arXiv 2501.19399)
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    softmax_scale: float = 0.0  # 0 -> 1/sqrt(qk head dim)
    # NoPE (global) layers that must extrapolate far past the training length (longmoe's bundled model):
    nope_qk_norm: bool = False  # L2-normalise q and k per head (weightless RMSNorm): scores are bounded cosines
    logn_attn: bool = False  # SSMax (arXiv 2501.19399): q x s_h * log(n) for a query that sees n keys, s_h learned

    # --- Multi-head Latent Attention (DeepSeek-V2/V3); on when kv_lora_rank > 0 ---
    q_lora_rank: int = 0  # 0 -> plain q projection
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    # --- rotary position embedding ---
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # transformers form: {"rope_type": "yarn", "factor": 4.0, ...}
    rope_interleaved: bool = False  # rotate pairs (x0, x1), (x2, x3) (DeepSeek, Llama 4) instead of halves
    max_position_embeddings: int = 4096
    # multimodal RoPE (Qwen2-VL / Qwen3-Omni): frequency pairs per axis (time, height, width), summing to
    # rotary_dim // 2; with `rope_positions` [3, B, T] each pair rotates by its axis' position. Interleaved (Qwen3):
    # pairs cycle t, h, w, t, h, w, ...; else contiguous runs (Qwen2-VL). Text-only positions make it plain RoPE.
    mrope_section: list[int] = field(default_factory=list)
    mrope_interleaved: bool = True

    # --- mixture of experts; on when num_experts > 0 ---
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0  # width of one routed expert
    moe_layers: list[bool] = field(default_factory=list)  # per layer; [] -> every layer when num_experts > 0
    score_func: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = True  # renormalise the k selected weights to sum to 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # group-limited routing: experts split into n_group groups ...
    topk_group: int = 1  # ... and only the best topk_group groups may be chosen
    group_score: str = "top2_sum"  # how a group is scored: "top2_sum" (DeepSeek-V3) | "max" (DeepSeek-V2)
    router_bias: bool = False  # a selection-only bias per expert (DeepSeek-V3; aux-loss-free balancing)
    weight_on_input: bool = False  # Llama 4 scales each expert's input, not its output, by the router weight
    shared_expert_intermediate_size: int = 0  # 0 -> no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE gates the shared expert with sigmoid(x @ w)
    router_aux_loss_coef: float = 0.0  # Switch/Mixtral load-balancing loss weight (training)
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss weight (training)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // max(self.num_heads, 1)
        n = self.num_layers
        if not self.layer_types:
            self.layer_types = ["full"] * n
        if not self.rope_layers:
            self.rope_layers = [True] * n
        if not self.moe_layers:
            self.moe_layers = [self.num_experts > 0] * n
        self.validate()

    # --- derived sizes ---
    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def rotary_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def scale(self) -> float:
        return self.softmax_scale or 1.0 / math.sqrt(self.qk_head_dim)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of KV cache one token costs summed over layers (MLA caches its compressed latent once)."""
        per_layer = self.kv_lora_rank + self.qk_rope_head_dim if self.is_mla else 2 * self.num_kv_heads * self.head_dim
        return per_layer * dtype_bytes * self.num_layers

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            need(getattr(self, name) > 0, f"{name} must be a positive integer, got {getattr(self, name)}")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported; longmoe implements 'silu'")
        need(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})",
        )
        n = self.num_layers
        for name in ("layer_types", "rope_layers", "moe_layers"):
            need(len(getattr(self, name)) == n, f"{name} has {len(getattr(self, name))} entries; num_layers is {n}")
        for t in self.layer_types:
            need(t in ATTENTION_TYPES, f"layer_types entry {t!r} is not one of {ATTENTION_TYPES}")
        need("sliding" not in self.layer_types or self.sliding_window > 0, "sliding layers need sliding_window > 0")
        need(
            "chunked" not in self.layer_types or self.attention_chunk_size > 0,
            "chunked layers need attention_chunk_size > 0",
        )
        need(self.qk_norm in QK_NORMS, f"qk_norm {self.qk_norm!r} is not one of {QK_NORMS}")
        need(self.rotary_dim % 2 == 0, f"the rotary dimension ({self.rotary_dim}) must be even")
        if self.is_mla:
            need(
                self.qk_rope_head_dim > 0 and self.v_head_dim > 0,
                "MLA (kv_lora_rank > 0) needs qk_rope_head_dim and v_head_dim",
            )
            need(self.qk_norm is None, "qk_norm is not defined for MLA layers")
        if self.mrope_section:
            need(
                len(self.mrope_section) == 3 and sum(self.mrope_section) == self.rotary_dim // 2,
                f"mrope_section {self.mrope_section} must be 3 numbers summing to rotary_dim // 2 = "
                f"{self.rotary_dim // 2}",
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        need(rope_type in ROPE_TYPES, f"rope_scaling.rope_type {rope_type!r} is not one of {ROPE_TYPES}")
        if any(self.moe_layers):
            need(self.num_experts > 0, "moe_layers marks MoE layers but num_experts is 0")
            need(self.moe_intermediate_size > 0, "MoE layers need moe_intermediate_size > 0")
            need(
                0 < self.num_experts_per_tok <= self.num_experts,
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts={self.num_experts}]",
            )
            need(self.score_func in ("softmax", "sigmoid"), f"score_func {self.score_func!r} is not softmax|sigmoid")
            need(
                self.num_experts % self.n_group == 0 and 0 < self.topk_group <= self.n_group,
                f"group-limited routing needs num_experts ({self.num_experts}) divisible by n_group ({self.n_group})"
                f" and 0 < topk_group ({self.topk_group}) <= n_group",
            )
            need(self.group_score in ("top2_sum", "max"), f"group_score {self.group_score!r} is not top2_sum|max")
        if not all(self.moe_layers):
            need(self.intermediate_size > 0, "dense layers need intermediate_size > 0")

    # --- (de)serialisation with checked keys and types ---
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> ModelConfig:
        return dataclass_from_dict(cls, d, where)


def dataclass_from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    """Build a config dataclass from plain data, naming the key on an unknown key or a wrong type."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {d!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}")
    for k, v in d.items():
        if not _type_ok(v, hints[k]):
            raise ConfigError(f"{where}.{k} = {v!r} should be of type {_type_name(hints[k])}")
    return cls(**d)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(x, item) for x in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is Any:
        return True
    return isinstance(value, hint)
