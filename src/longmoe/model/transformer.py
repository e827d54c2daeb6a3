"""The decoder-only transformer, for one device. Read top to bottom: norms, attention (GQA and MLA), block, model.

Shapes: B batch, T new tokens, S cached + new keys, C hidden, H query heads, Hkv key/value heads, D head dim.
Positions are always explicit ([B, T]). A KV cache, when given, owns both storage and attention over what it stores:
`cache.attend(layer, q, k, v, scale=, window=, chunk=)` (see longmoe.engine.kv_cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from .. import kernels
from .attention import Segment, attend, segments_from_positions
from .config import ModelConfig
from .loss import IGNORE, cross_entropy_sum
from .moe import MLP, Linear, MoE
from .rope import RotaryEmbedding, apply_rope

LOGN_INIT = 1 / math.log(1024)


class KVCache(Protocol):
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: int, chunk: int
    ) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    """x / rms(x) computed in fp32, cast back, then scaled by a learned weight (none for Llama 4's L2 norm)."""

    def __init__(self, dim: int, eps: float, weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = kernels.rms_norm(x, self.weight, self.eps)  # decode: a few bf16 rows
        if fused is not None:
            return fused
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y if self.weight is None else self.weight * y


class Attention(nn.Module):
    """Grouped-query attention with optional q/k norms, NoPE layers and local (sliding / chunked) windows."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        self.use_rope = c.rope_layers[layer_idx]
        kind = c.layer_types[layer_idx]
        self.window = c.sliding_window if kind == "sliding" else 0
        self.chunk = c.attention_chunk_size if kind == "chunked" else 0
        D = c.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_heads * D, bias=c.attention_bias)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * D, bias=c.attention_bias)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * D, bias=c.attention_bias)
        self.o_proj = Linear(c.num_heads * D, c.hidden_size, bias=c.o_bias)
        self.q_norm = self.k_norm = None
        if c.qk_norm == "head":  # Qwen3: per head, over D
            self.q_norm, self.k_norm = RMSNorm(D, c.rms_norm_eps), RMSNorm(D, c.rms_norm_eps)
        elif c.qk_norm == "full":  # OLMoE: over the whole projection
            self.q_norm = RMSNorm(c.num_heads * D, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.num_kv_heads * D, c.rms_norm_eps)
        elif c.qk_norm == "l2" and self.use_rope:  # Llama 4: weightless, after RoPE, RoPE layers only
            self.q_norm = self.k_norm = RMSNorm(D, c.rms_norm_eps, weight=False)
        self.nope_norm = RMSNorm(D, c.rms_norm_eps, weight=False) if c.nope_qk_norm and not self.use_rope else None
        # SSMax's per-head s_h, initialised so that s_h * log(n) = 1 at n = 1024 keys
        self.logn_scale = nn.Parameter(torch.full((c.num_heads,), LOGN_INIT)) if c.logn_attn and not self.use_rope \
            else None  # fmt: skip
        self.attend_fn = attend  # seam for parallelism applied from outside (context parallel's ring attention)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        plan: list[Segment] | None,
        cache: KVCache | None,
        outputs: int | None = None,
    ) -> torch.Tensor:
        """-> [B, T, C], or [B, outputs, C]: only the last `outputs` positions query (all of them make K/V)."""
        c = self.config
        B, T, _ = x.shape
        Tq = T if outputs is None or plan is not None else outputs  # packed rows: all queries, sliced at the end
        q, k, v = self.q_proj(x[:, T - Tq :]), self.k_proj(x), self.v_proj(x)
        if c.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if c.clip_qkv is not None:
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        q = q.view(B, Tq, c.num_heads, c.head_dim)  # [B, Tq, H, D]
        k = k.view(B, T, -1, c.head_dim)  # [B, T, Hkv, D]
        v = v.view(B, T, -1, c.head_dim)
        q_pos = positions[:, T - Tq :]  # [B, Tq]
        if c.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            cos, sin = rope
            q = apply_rope(q, cos[:, T - Tq :], sin[:, T - Tq :], interleaved=c.rope_interleaved)
            k = apply_rope(k, cos, sin, interleaved=c.rope_interleaved)
            if c.qk_norm == "l2":
                q, k = self.q_norm(q), self.k_norm(k)
        else:
            if self.nope_norm is not None:
                q, k = self.nope_norm(q), self.nope_norm(k)
            if c.attn_temperature_tuning:
                # Llama 4 NoPE layers: sharpen attention with distance, q *= 1 + s * log(1 + floor((pos + 1) / f)).
                scale = torch.log1p(torch.floor((q_pos.float() + 1.0) / c.floor_scale)) * c.attn_scale + 1.0
                q = (q * scale[:, :, None, None]).to(q.dtype)
            if self.logn_scale is not None:
                # SSMax: a query that sees n = pos + 1 keys gets logits x s_h log n, so the needle's share of the
                # softmax does not shrink as n grows past the training length
                scale = torch.log(q_pos.float() + 1.0)[:, :, None] * self.logn_scale.float()  # [B, Tq, H]
                q = (q * scale[..., None]).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if cache is None:
            o = self.attend_fn(q, k, v, plan, scale=c.scale, window=self.window, chunk=self.chunk)  # [B, H, Tq, D]
        else:
            o = cache.attend(self.layer_idx, q, k, v, scale=c.scale, window=self.window, chunk=self.chunk)
        o = o.transpose(1, 2).reshape(B, Tq, c.num_heads * c.head_dim)  # [B, Tq, H*D]
        if outputs is not None and Tq != outputs:
            o = o[:, Tq - outputs :]
        return self.o_proj(o)


class MLAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2/V3): keys and values are expanded from a per-token latent of
    kv_lora_rank dims plus one shared RoPE key of qk_rope_head_dim dims; only those are cached."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        H = c.num_heads
        if c.q_lora_rank:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, 1e-6)  # DeepSeek's reference uses 1e-6 here
            self.q_b_proj = Linear(c.q_lora_rank, H * c.qk_head_dim, bias=False)
        else:
            self.q_proj = Linear(c.hidden_size, H * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, 1e-6)
        self.kv_b_proj = Linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = Linear(H * c.v_head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        plan: list[Segment] | None,
        cache: KVCache | None,
        outputs: int | None = None,
    ) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        Tq = T if outputs is None or plan is not None else outputs
        xq = x[:, T - Tq :]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(xq))) if c.q_lora_rank else self.q_proj(xq)
        q = q.view(B, Tq, c.num_heads, c.qk_head_dim)  # [B, Tq, H, nope + rope]
        q_pass, q_rot = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, T, rank]
        cos, sin = rope
        q_rot = apply_rope(q_rot, cos[:, T - Tq :], sin[:, T - Tq :], interleaved=c.rope_interleaved)
        k_rot = apply_rope(k_rot[:, :, None, :], cos, sin, interleaved=c.rope_interleaved)  # [B, T, 1, rope]
        if cache is not None:
            return self._absorbed(q_pass, q_rot, latent, k_rot, cache)
        S = latent.shape[1]
        kv = self.kv_b_proj(latent).view(B, S, -1, c.qk_nope_head_dim + c.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)  # [B, H, S, .]
        k_rot = k_rot.transpose(1, 2)  # [B, 1, S, rope]
        k = torch.cat((k_nope, k_rot.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)  # [B, H, S, nope + rope]
        q = torch.cat((q_pass, q_rot), dim=-1).transpose(1, 2)  # [B, H, Tq, nope + rope]
        o = attend(q, k, v, plan, scale=c.scale)  # [B, H, Tq, v_head_dim]
        o = o.transpose(1, 2).reshape(B, Tq, c.num_heads * c.v_head_dim)
        if outputs is not None and Tq != outputs:
            o = o[:, Tq - outputs :]
        return self.o_proj(o)

    def _absorbed(self, q_pass, q_rot, latent, k_rot, cache: KVCache) -> torch.Tensor:
        """Inference form (DeepSeek-V2 sec. 2.1.2): fold kv_b_proj's key half into the queries and its value half
        into the output, so attention runs as one-KV-head MQA directly over the cached [latent ; rope key], and the
        per-head keys and values are never materialised. Scores are unchanged: q_nope.(W_uk c) = (W_uk^T q_nope).c"""
        c = self.config
        B, T = q_pass.shape[:2]
        w = self.kv_b_proj.weight.view(c.num_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        w_uk, w_uv = w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim :]  # [H, nope, rank], [H, v, rank]
        q_lat = torch.einsum("bthn,hnr->bhtr", q_pass, w_uk)  # [B, H, T, rank]
        q = torch.cat((q_lat, q_rot.transpose(1, 2)), dim=-1)  # [B, H, T, rank + rope]
        kv = torch.cat((latent, k_rot[:, :, 0]), dim=-1)[:, None]  # [B, 1, T, rank + rope]
        o = cache.attend(self.layer_idx, q, kv, kv, scale=c.scale, window=0, chunk=0)  # values = kv: slice after
        o = torch.einsum("bhtr,hvr->bthv", o[..., : c.kv_lora_rank], w_uv)  # [B, T, H, v]
        return self.o_proj(o.reshape(B, T, c.num_heads * c.v_head_dim))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = (MLAttention if config.is_mla else Attention)(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.moe_layers[layer_idx]
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(
        self, x, positions, rope, plan, cache, outputs: int | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """x [B, T, C] -> [B, T, C]; with `outputs`, [B, outputs, C] for the last positions only (attention and
        FFN run only there; every position still makes its K/V, which a cache stores)."""
        if outputs == 0 and cache is None:
            return x[:, :0], None  # nothing asked for and nowhere to keep K/V
        a = self.self_attn(self.input_layernorm(x), positions, rope, plan, cache, outputs)
        x = x if outputs is None else x[:, x.shape[1] - outputs :]
        x = x + a
        if outputs == 0:
            return x, None
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            h, logits, experts = self.mlp(h)
            return x + h, (logits, experts)
        return x + self.mlp(h), None


@dataclass
class Output:
    logits: torch.Tensor | None  # [B, T, V] (or [B, outputs, V]); None when targets were given
    router_logits: list[torch.Tensor] = field(default_factory=list)  # one [B*T, E] fp32 per MoE layer
    loss_sum: torch.Tensor | None = None  # with targets: summed next-token cross-entropy, fp32 []
    router_experts: list[torch.Tensor] = field(default_factory=list)  # the experts chosen, [B*T, K] per MoE layer


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        *,
        input_embeds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        outputs: int | None = None,
        targets: torch.Tensor | None = None,
        rope_positions: torch.Tensor | None = None,
        deepstack: list[torch.Tensor] | None = None,
    ) -> Output:
        """input_ids [B, T] (or input_embeds [B, T, C]); positions [B, T], default 0..T-1 for every row.
        Without a cache, positions that restart inside a row start a new document (packed sequences).
        outputs: only the last `outputs` positions need logits (0: none, the call only fills a KV cache). Nothing
        is downstream of the last layer, so it runs attention and FFN only there; every other position needs just
        its K/V. (For a model whose only global layer is the last, prefill is then O(n x window), not O(n^2).)
        With targets [B, T] (IGNORE = -100 for no loss) the output is the summed cross-entropy instead of logits,
        computed with the output projection in chunks (training never holds [B, T, V] logits); with `outputs` too,
        targets before the last `outputs` positions must be IGNORE.
        Multimodal inputs (Qwen3-Omni's thinker): rope_positions [3, B, T] are M-RoPE's time/height/width positions
        (`positions` stays the sequence index: masks and the cache use it); deepstack[i] [B, T, C] is added to the
        hidden states after layer i (visual features from the vision encoder's middle blocks, zero elsewhere)."""
        if (input_ids is None) == (input_embeds is None):
            raise ValueError("pass exactly one of input_ids or input_embeds")
        if targets is not None and cache is not None:
            raise ValueError("targets (a training loss) cannot be combined with a KV cache")
        x = self.embed_tokens(input_ids) if input_embeds is None else input_embeds  # [B, T, C]
        B, T = x.shape[:2]
        if outputs is not None and not 0 <= outputs <= T:
            raise ValueError(f"outputs must be in [0, T = {T}], got {outputs}")
        if targets is not None:
            if targets.shape != (B, T):
                raise ValueError(f"targets must have the input's shape [B, T] = {[B, T]}, got {list(targets.shape)}")
            if outputs is not None and bool((targets[:, : T - outputs] != IGNORE).any()):
                raise ValueError(f"targets outside the last outputs = {outputs} positions would be dropped")
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a KV cache")
            positions = torch.arange(T, device=x.device).expand(B, T)
        plan = segments_from_positions(positions) if cache is None else None
        rope = self.rotary(positions if rope_positions is None else rope_positions)
        deepstack = deepstack or []
        if len(deepstack) >= len(self.layers):
            raise ValueError(f"{len(deepstack)} deepstack inputs for {len(self.layers)} layers")
        router_logits, router_experts = [], []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, routed = layer(x, positions, rope, plan, cache, outputs if i == last else None)
            if i < len(deepstack):
                x = x + deepstack[i]
            if routed is not None:
                router_logits.append(routed[0])
                router_experts.append(routed[1])
        x = self.norm(x)
        if targets is not None:
            t = targets if outputs is None else targets[:, T - outputs :]
            return Output(None, router_logits, cross_entropy_sum(x, self.lm_head.weight, t), router_experts)
        return Output(self.lm_head(x), router_logits, None, router_experts)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Random initialisation for training from scratch: N(0, std) weights, unit norms, zero biases."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("logn_scale"):
                p.fill_(LOGN_INIT)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        self.reset_buffers(self.embed_tokens.weight.device)

    def reset_buffers(self, device: torch.device | str) -> None:
        """(Re)create non-persistent buffers, e.g. after building on the meta device and loading weights."""
        self.rotary = RotaryEmbedding(self.config).to(device)
        for m in self.modules():
            if isinstance(m, MoE):
                m.tokens_per_expert = torch.zeros(self.config.num_experts, device=device)
                if m.router.selection_bias is not None and m.router.selection_bias.is_meta:
                    m.router.selection_bias = torch.zeros(self.config.num_experts, device=device)

    def num_parameters(self) -> tuple[int, int]:
        """(total, active per token): a token uses its top-k routed experts plus everything else."""
        total = sum(p.numel() for p in self.parameters())
        c, idle = self.config, 0
        for layer in self.layers:
            if layer.is_moe:
                per_expert = layer.mlp.experts.gate_up_proj[0].numel() + layer.mlp.experts.down_proj[0].numel()
                idle += per_expert * (c.num_experts - c.num_experts_per_tok)
        return total, total - idle
