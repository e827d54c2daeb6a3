"""RoPE frequencies and cos/sin for every scaling type equal transformers' own functions and modules."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from longmoe.checkpoint.hf import FAMILIES
from longmoe.model.rope import RotaryEmbedding, apply_rope, rope_frequencies

HEAD_DIM, MAX_POS = 64, 256
SHORT = [1.0 + 0.05 * i for i in range(HEAD_DIM // 2)]
LONG = [2.0 + 0.3 * i for i in range(HEAD_DIM // 2)]
TYPES = {
    "default": {},
    "linear": {"factor": 4.0},
    "dynamic": {"factor": 4.0},
    "yarn": {"factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1},
    "yarn-mscale": {"factor": 8.0, "original_max_position_embeddings": 32, "mscale": 0.707, "mscale_all_dim": 1.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "longrope": {"short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 64},
}


def configs(kind: str):
    params = {"rope_type": kind.split("-")[0], "rope_theta": 10000.0, **TYPES[kind]}
    hf = LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=32,
        max_position_embeddings=MAX_POS,
        rope_parameters=dict(params),
    )
    ours = FAMILIES["llama"].to_config(hf.to_dict())
    return hf, ours


@pytest.mark.parametrize("kind", list(TYPES))
def test_frequencies_match_rope_init_functions(kind):
    hf, ours = configs(kind)
    rope_type = kind.split("-")[0]
    for seq_len in (None, 4 * MAX_POS):
        if rope_type == "default":
            ref = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
        else:
            ref = ROPE_INIT_FUNCTIONS[rope_type](hf, None, seq_len=seq_len)
        inv_freq, factor = rope_frequencies(ours, seq_len)
        torch.testing.assert_close(inv_freq, ref[0].float(), rtol=1e-6, atol=0)
        assert factor == pytest.approx(ref[1], rel=1e-6)


@pytest.mark.parametrize("kind", list(TYPES))
def test_cos_sin_match_transformers_module(kind):
    hf, ours = configs(kind)
    for length in (MAX_POS // 2, 2 * MAX_POS):  # within and beyond the trained length (dynamic/longrope switch)
        hf_module = LlamaRotaryEmbedding(hf)  # fresh: transformers' dynamic types keep state between calls
        positions = torch.arange(length)[None]
        ref_cos, ref_sin = hf_module(torch.zeros(1, dtype=torch.float32), positions)
        cos, sin = RotaryEmbedding(ours)(positions)
        half = HEAD_DIM // 2
        torch.testing.assert_close(cos, ref_cos[..., :half], atol=1e-4, rtol=0)
        torch.testing.assert_close(sin, ref_sin[..., :half], atol=1e-4, rtol=0)


def test_both_config_forms_give_the_same_rope():
    v5 = {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 5e5,
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
        }
    }
    v4 = {"rope_theta": 5e5, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}}
    base = dict(
        model_type="llama",
        vocab_size=32,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=4096,
    )
    a, b = FAMILIES["llama"].to_config({**base, **v5}), FAMILIES["llama"].to_config({**base, **v4})
    assert a == b
    assert a.rope_theta == 5e5 and a.rope_scaling["rope_type"] == "yarn" and a.rope_scaling["factor"] == 4.0


def test_interleaved_and_half_layouts_rotate_pairs():
    x = torch.randn(1, 5, 2, 8)
    cos, sin = RotaryEmbedding(configs("default")[1])(torch.arange(5)[None])
    cos, sin = cos[..., :4], sin[..., :4]
    half = apply_rope(x, cos, sin, interleaved=False)
    inter = apply_rope(x[..., [0, 4, 1, 5, 2, 6, 3, 7]], cos, sin, interleaved=True)
    torch.testing.assert_close(inter, half[..., [0, 4, 1, 5, 2, 6, 3, 7]])
    # a rotation keeps the norm, and position 0 is the identity
    torch.testing.assert_close(half.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(half[:, 0], x[:, 0])
