"""Tiny random transformers models for every supported family, built offline in the test process.

Weights are drawn with a larger std than transformers' default and norms/biases are perturbed, so that routing,
attention patterns and logits are far from trivial (a wrong layer shows up as an O(1) logit difference).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 320
EOS, BOS = 0, 1
TEXT = (
    "The special magic number is hidden somewhere in this long text. Mixture-of-experts transformers route "
    "each token to a few experts. Long context models read a million tokens and still find the needle. "
    "Attention looks back at every previous token; the key value cache keeps them. "
) * 4

COMMON = dict(vocab_size=VOCAB, eos_token_id=EOS, bos_token_id=BOS, pad_token_id=None, initializer_range=0.1)

FAMILIES: dict[str, tuple[type, type, dict]] = {
    "mixtral": (
        tf.MixtralConfig,
        tf.MixtralForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=256,
            sliding_window=24,
        ),
    ),
    "qwen2_moe": (
        tf.Qwen2MoeConfig,
        tf.Qwen2MoeForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            norm_topk_prob=False,
            qkv_bias=True,
        ),
    ),
    "qwen3_moe": (
        tf.Qwen3MoeConfig,
        tf.Qwen3MoeForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=2,
            max_position_embeddings=256,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32,
                "rope_theta": 10000.0,
            },
        ),
    ),
    "olmoe": (
        tf.OlmoeConfig,
        tf.OlmoeForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_experts=8,
            num_experts_per_tok=2,
            clip_qkv=0.5,
        ),
    ),
    "deepseek_v3": (
        tf.DeepseekV3Config,
        tf.DeepseekV3ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            max_position_embeddings=128,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "beta_fast": 32,
                "beta_slow": 1,
                "rope_theta": 10000.0,
            },
        ),
    ),
    "llama4": (
        tf.Llama4TextConfig,
        tf.Llama4ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=32,
            intermediate_size_mlp=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            attention_chunk_size=16,
            no_rope_layer_interval=2,
            floor_scale=4,
            attn_scale=0.5,
        ),
    ),
    "llama": (
        tf.LlamaConfig,
        tf.LlamaForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            attention_bias=True,
            max_position_embeddings=256,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
                "rope_theta": 10000.0,
            },
        ),
    ),
    "qwen3": (
        tf.Qwen3Config,
        tf.Qwen3ForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            use_sliding_window=True,
            sliding_window=16,
            max_window_layers=1,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        ),
    ),
}
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "llama4"]


def build_tokenizer(path: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<eos>", "<bos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(path))


def build_hf(family: str, seed: int = 0):
    """A random transformers model of `family` in fp32 eval mode with the eager reference paths."""
    cfg_cls, model_cls, kwargs = FAMILIES[family]
    config = cfg_cls(**COMMON, **kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    model.eval()
    model.set_attn_implementation("eager")
    if hasattr(model, "set_experts_implementation") and family != "llama4":
        model.set_experts_implementation("eager")
    return model


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path)
    build_tokenizer(path / "tokenizer.json")
    return path
