"""Rotary position embedding with the scaling types of transformers' `ROPE_INIT_FUNCTIONS`.

Formulas follow `transformers/modeling_rope_utils.py` (checked value for value in tests/test_rope.py):
- default:  inv_freq_i = theta^(-2i/d)
- linear:   inv_freq / factor (position interpolation, arXiv 2306.15595)
- dynamic:  NTK-aware theta' = theta * (factor*L/L0 - (factor-1))^(d/(d-2)) once the sequence L exceeds L0
- yarn:     per-dimension ramp between interpolation and extrapolation; cos/sin scaled by 0.1 ln(factor) + 1
- llama3:   low frequencies divided by factor, high kept, smooth in between (Llama 3.1)
- longrope: per-dimension short/long factors, long ones once the sequence exceeds the original length
"""

from __future__ import annotations

import math

import torch

from .. import kernels
from .config import ModelConfig


def rope_frequencies(config: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim // 2] (fp32) and the factor applied to cos/sin, for sequences of `seq_len`."""
    p = dict(config.rope_scaling or {})
    kind = p.get("rope_type", "default")
    base = config.rope_theta
    dim = config.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [dim/2]
    inv_freq = 1.0 / (base**exponents)
    attention_factor = 1.0

    if kind == "linear":
        inv_freq = inv_freq / p["factor"]
    elif kind == "dynamic":
        max_pos = config.max_position_embeddings
        seq_len = max(seq_len or max_pos, max_pos)
        factor = p["factor"]
        dyn_base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        inv_freq = 1.0 / (dyn_base**exponents)
    elif kind == "yarn":
        original = p.get("original_max_position_embeddings") or config.max_position_embeddings
        factor = p.get("factor") or config.max_position_embeddings / original
        attention_factor = p.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = yarn_mscale(factor)
        beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp  # 1 = keep the original frequency (high-frequency dims)
        pos_freqs = base**exponents
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    elif kind == "llama3":
        factor, low_ff, high_ff = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "longrope":
        original = p["original_max_position_embeddings"]
        factor = p.get("factor") or config.max_position_embeddings / original
        attention_factor = p.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        long = seq_len is not None and seq_len > original
        ext = torch.tensor(p["long_factor"] if long else p["short_factor"], dtype=torch.float32)
        inv_freq = 1.0 / (ext * base**exponents)
    return inv_freq, float(attention_factor)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class RotaryEmbedding(torch.nn.Module):
    """cos/sin for explicit positions. Types whose frequencies depend on the sequence length (dynamic, longrope)
    use the longest position in the call, as transformers does while a sequence grows."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.length_dependent = (config.rope_scaling or {}).get("rope_type") in ("dynamic", "longrope")
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("mrope_axis", mrope_axes(config), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (or M-RoPE's [3, B, T]: time, height, width) -> cos, sin [B, T, rotary_dim // 2] in fp32
        (already multiplied by the attention factor)."""
        inv_freq, factor = self.inv_freq, self.attention_factor
        if self.length_dependent:
            # NOTE: one device-to-host sync; only these two scaling types need the sequence length.
            inv_freq, factor = rope_frequencies(self.config, int(positions.max()) + 1)
            inv_freq = inv_freq.to(positions.device)
        angles = positions[..., None].float() * inv_freq  # [B, T, dim/2] or [3, B, T, dim/2]
        if positions.dim() == 3:
            if self.mrope_axis is None:
                raise ValueError("3-D (M-RoPE) positions need a config with mrope_section")
            axis = self.mrope_axis.to(positions.device).expand(1, *angles.shape[1:])  # [1, B, T, dim/2]
            angles = angles.gather(0, axis)[0]  # each frequency pair takes its axis' angle
        return angles.cos() * factor, angles.sin() * factor


def mrope_axes(config: ModelConfig) -> torch.Tensor | None:
    """Which position axis (0 time, 1 height, 2 width) rotates each frequency pair [rotary_dim // 2] under
    M-RoPE, as transformers' Qwen3-Omni `recomposition_frequencies` (interleaved) / Qwen2-VL (contiguous) lay it out."""
    if not config.mrope_section:
        return None
    t, h, w = config.mrope_section
    axis = torch.zeros(t + h + w, dtype=torch.int64)
    if config.mrope_interleaved:
        axis[1 : 3 * h : 3] = 1
        axis[2 : 3 * w : 3] = 2
    else:
        axis[t : t + h] = 1
        axis[t + h :] = 2
    return axis


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, T, H, D] by cos/sin [B, T, D/2]; computed in fp32, returned in x's dtype.

    Halves layout (Llama, Qwen, Mixtral): dims i and i + D/2 form a pair. Interleaved layout (DeepSeek, Llama 4):
    dims 2i and 2i+1 form a pair; the result is written back in the same interleaved order.
    """
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, D/2]
    fused = kernels.rope(x, cos, sin, interleaved)  # decode: a few bf16 tokens
    if fused is not None:
        return fused
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
