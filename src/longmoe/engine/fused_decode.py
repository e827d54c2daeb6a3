"""Decode of one sequence with one C call per layer (longmoe.kernels' decode_layer_bf16), applied from outside the
model: at one token, eager PyTorch spends more time dispatching a layer's ~30 ops than the layer spends streaming
its weights. Used by the engine for a lone decoding sequence when the model is the plain GQA + routed-MoE kind the
kernel implements (Mixtral-style) in bf16 on a CPU with AVX-512 BF16; everything else takes the model's own forward,
which stays the reference (tests compare the two).
"""

from __future__ import annotations

import ctypes

import torch

from .. import kernels
from ..model.moe import MoE
from ..model.transformer import Attention, Transformer
from .kv_cache import PagedKVCache


def unsupported(model: Transformer, cache: PagedKVCache) -> str | None:
    """Why the fused path cannot run this model and cache (None: it can)."""
    c = model.config
    checks = [
        (model.embed_tokens.weight.dtype == torch.bfloat16, "the model is not bf16"),
        (model.embed_tokens.weight.device.type == "cpu", "the model is not on the CPU"),
        (cache.storage_dtype == torch.bfloat16, "the KV cache is not bf16"),
        (bool(kernels._load()), "the AVX-512 BF16 kernels are unavailable"),
        (not c.is_mla and c.qk_norm is None and c.clip_qkv is None, "attention has MLA, q/k norms or clipping"),
        (not c.attention_bias and not c.o_bias, "attention projections have biases"),
        (all(t == "full" for t in c.layer_types), "some layers attend locally"),
        (not c.attn_temperature_tuning and not c.logn_attn and not c.nope_qk_norm, "NoPE layers scale queries"),
        (not c.mrope_section and (c.rope_scaling or {}).get("rope_type") not in ("dynamic", "longrope"),
         "the RoPE frequencies depend on the sequence"),  # fmt: skip
        (c.head_dim % 64 == 0 and c.hidden_size % 32 == 0, "head or hidden sizes are not multiples of 64 / 32"),
        (c.num_experts and all(c.moe_layers), "not every layer is a mixture of experts"),
        (c.num_experts <= 256 and c.num_experts_per_tok <= 16, "more than 256 experts or 16 per token"),
        (c.moe_intermediate_size % 32 == 0, "the expert width is not a multiple of 32"),
        (c.score_func == "softmax" and c.n_group <= 1 and not c.router_bias, "the router is not a plain softmax"),
        (not c.weight_on_input and not c.shared_expert_intermediate_size, "experts weigh inputs or are shared"),
    ]
    for ok, why in checks:
        if not ok:
            return why
    for layer in model.layers:
        attn = layer.self_attn
        if not isinstance(attn, Attention) or not isinstance(layer.mlp, MoE) or layer.mlp.dispatcher is not None:
            return "a layer is not plain attention + MoE"
        if c.rope_layers[attn.layer_idx] and model.rotary.inv_freq.numel() * 2 != c.head_dim:
            return "RoPE rotates only part of each head"
        tensors = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
                   layer.input_layernorm.weight, layer.post_attention_layernorm.weight, layer.mlp.router.weight,
                   layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj]  # fmt: skip
        if not all(t.is_contiguous() for t in tensors):
            return "a weight is not contiguous"
    return None


class FusedDecode:
    def __init__(self, model: Transformer, cache: PagedKVCache):
        self.model, self.cache = model, cache
        c = model.config
        self.lib = kernels._load()
        self.layers = []
        for i, layer in enumerate(model.layers):
            a, moe = layer.self_attn, layer.mlp
            k, v = cache.k["full"][cache.index_in_kind[i]], cache.v["full"][cache.index_in_kind[i]]  # [Hkv, slots, D]
            rope = (2 if c.rope_interleaved else 1) if a.use_rope else 0
            self.layers.append((
                layer.input_layernorm.weight.data_ptr(), a.q_proj.weight.data_ptr(), a.k_proj.weight.data_ptr(),
                a.v_proj.weight.data_ptr(), a.o_proj.weight.data_ptr(), rope, k.data_ptr(), v.data_ptr(),
                k.stride(0), layer.post_attention_layernorm.weight.data_ptr(), moe.router.weight.data_ptr(),
                moe.experts.gate_up_proj.data_ptr(), moe.experts.down_proj.data_ptr(),
            ))  # fmt: skip

    def __call__(self, token: int, position: int) -> torch.Tensor:
        """Logits [1, 1, V] of `token` at `position`; cache.prepare() has laid out this step's row."""
        c, row = self.model.config, self.cache.rows[0]
        x = self.model.embed_tokens.weight[token].clone()  # [C], the residual stream, updated in place
        cos, sin = (t.contiguous() for t in self.model.rotary(torch.tensor([[position]])))  # [1, 1, D/2] fp32
        slot = int(row.slots["full"][0])
        runs = (ctypes.c_long * (2 * len(row.runs)))(*(n for run in row.runs for n in run))
        for ln1, wq, wk, wv, wo, rope, kc, vc, kv_hs, ln2, wr, gate_up, down in self.layers:
            self.lib.decode_layer_bf16(
                x.data_ptr(), c.hidden_size, c.rms_norm_eps, ln1, wq, wk, wv, wo, c.num_heads, c.num_kv_heads,
                c.head_dim, cos.data_ptr(), sin.data_ptr(), rope, kc, vc, kv_hs, slot, runs, len(row.runs), c.scale,
                ln2, wr, c.num_experts, c.num_experts_per_tok, int(c.norm_topk_prob), c.routed_scaling_factor,
                gate_up, down, c.moe_intermediate_size,
            )  # fmt: skip
        return self.model.lm_head(self.model.norm(x[None, None]))
