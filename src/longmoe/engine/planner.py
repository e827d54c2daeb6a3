"""Memory planner: what a context costs before any of it is computed, so work that cannot fit fails at once with the
numbers instead of an OOM kill part-way through a million-token prefill."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LongmoeError
from ..model.config import ModelConfig
from ..sysinfo import fmt_gib


class MemoryPlanError(LongmoeError, RuntimeError):
    """Work that cannot fit in memory; the message has the numbers and what to change."""


def bytes_per_token(config: ModelConfig, kv_dtype: str, dtype: torch.dtype) -> int:
    """KV bytes one token costs in one layer (MLA: the latent and the RoPE key, once)."""
    itemsize = 1 if kv_dtype == "fp8" else dtype.itemsize
    if config.is_mla:
        return (config.kv_lora_rank + config.qk_rope_head_dim) * itemsize
    return 2 * config.num_kv_heads * config.head_dim * itemsize


def kept_tokens(config: ModelConfig, kind: str, tokens: int, chunk: int, block_size: int) -> int:
    """Tokens a layer of this kind holds for a sequence of `tokens`: all of them, or a window (+ the chunk being
    prefilled and block rounding) for local layers."""
    if kind == "full":
        return tokens
    window = config.sliding_window if kind == "sliding" else config.attention_chunk_size
    return min(tokens, window + chunk + 2 * block_size)


def blocks_needed(config: ModelConfig, kind: str, tokens: int, chunk: int, block_size: int) -> int:
    return -(-kept_tokens(config, kind, tokens, chunk, block_size) // block_size)


def kv_bytes(config: ModelConfig, tokens: int, kv_dtype: str, dtype: torch.dtype, chunk: int, block_size: int) -> int:
    per = bytes_per_token(config, kv_dtype, dtype)
    return sum(
        per * block_size * blocks_needed(config, kind, tokens, chunk, block_size)
        for kind in config.layer_types  # one term per layer
    )


def activation_bytes(config: ModelConfig, chunk: int, dtype: torch.dtype) -> int:
    """Peak working memory of one prefill chunk, independent of the context length: hidden states, q/k/v, the MoE's
    routed copies and expert activations, attention partials merged in fp32, fp8 dequantised spans, one logits row.
    Generous by design (x2)."""
    c, item = config, dtype.itemsize
    width = max(c.intermediate_size, c.num_experts_per_tok * c.moe_intermediate_size * 2, 1)
    qkv = (c.num_heads * c.qk_head_dim + 2 * c.num_kv_heads * c.head_dim) * item
    if c.is_mla:
        qkv += c.num_heads * (c.kv_lora_rank + c.qk_head_dim) * item
    per_token = 6 * c.hidden_size * item + qkv + 3 * width * item + 3 * c.num_heads * c.qk_head_dim * 4
    span = 2 * 16384 * c.num_kv_heads * c.qk_head_dim * 4  # dequantised / gathered key-value span
    return 2 * (chunk * per_token + span + c.vocab_size * 4)


@dataclass
class MemoryPlan:
    weights: int
    kv: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations

    def __str__(self) -> str:
        return (
            f"weights {fmt_gib(self.weights)} + KV {fmt_gib(self.kv)} + activations {fmt_gib(self.activations)} "
            f"= {fmt_gib(self.total)}"
        )
