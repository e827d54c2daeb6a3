"""Media encoders of the Qwen3-Omni-MoE thinker, for one device: the vision transformer (images and video) and the
audio transformer. Each turns preprocessed media (`longmoe.multimodal`) into rows of the text model's hidden size,
which replace the placeholder tokens' embeddings; the vision encoder also returns DeepStack features, added to the
hidden states at the visual positions after the text model's first layers.

Parameter names follow transformers' (`visual.*`, `audio_tower.*`), so checkpoints load by prefix. Shapes: N patches
(vision) or frames (audio), C encoder width, H heads, D head dim, O the text model's hidden size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope


@dataclass
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 2048
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: list[int] = field(default_factory=lambda: [8, 16, 24])
    rope_theta: float = 10000.0

    @property
    def patch_dim(self) -> int:  # values per patch row: C x T x P x P
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass
class AudioConfig:
    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    output_dim: int = 2048
    n_window: int = 50  # the convolutions run on chunks of 2 * n_window mel frames (1 s)
    n_window_infer: int = 800  # attention windows of n_window_infer frames (8 s)
    downsample_hidden_size: int = 480
    max_source_positions: int = 1500


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Bidirectional attention within consecutive segments: q, k, v [N, H, D] -> [N, H, D]."""
    out = []
    for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        o = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1))  # [H, n, D]
        out.append(o.transpose(0, 1))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------------
# vision


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)  # each [N, H, D]
        cos, sin = rope  # [1, N, D/2]
        q = apply_rope(q[None], cos, sin, interleaved=False)[0]  # computed in fp32 (transformers does the same)
        k = apply_rope(k[None], cos, sin, interleaved=False)[0]
        return self.proj(segment_attention(q, k, v, lengths).reshape(N, -1))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.attn = VisionAttention(c)
        self.mlp = nn.Module()
        self.mlp.linear_fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.mlp.linear_fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, lengths)
        h = F.gelu(self.mlp.linear_fc1(self.norm2(x)), approximate="tanh")
        return x + self.mlp.linear_fc2(h)


class PatchMerger(nn.Module):
    """Each 2x2 block of patches (4 consecutive rows) -> one row of the text model's width. The main merger
    normalises patches before grouping them; DeepStack's mergers group first (`postshuffle`)."""

    def __init__(self, c: VisionConfig, postshuffle: bool):
        super().__init__()
        self.width = c.hidden_size * c.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.ln_q = nn.LayerNorm(self.width if postshuffle else c.hidden_size, eps=1e-6)
        self.mlp = nn.ModuleList(
            [nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, c.out_hidden_size)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_q(x.view(-1, self.width)) if self.postshuffle else self.ln_q(x).view(-1, self.width)  # [N/4, 4C]
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionEncoder(nn.Module):
    """pixel rows [N, C*T*P*P] of images or videos with their grids [n, 3] (t, h, w in patches) ->
    (features [N/4, O], DeepStack features: one [N/4, O] per `deepstack_visual_indexes` block)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_embed = nn.Module()
        P, T = c.patch_size, c.temporal_patch_size
        self.patch_embed.proj = nn.Conv3d(c.in_channels, c.hidden_size, (T, P, P), stride=(T, P, P))
        self.pos_embed = nn.Embedding(c.num_position_embeddings, c.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.depth))
        self.merger = PatchMerger(c, postshuffle=False)
        self.merger_list = nn.ModuleList(PatchMerger(c, postshuffle=True) for _ in c.deepstack_visual_indexes)

    def forward(
        self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        c = self.config
        w = self.patch_embed.proj.weight  # [C, 3, T, P, P]: a conv whose stride is its kernel is one matmul
        x = F.linear(pixels.to(w.dtype), w.view(w.shape[0], -1), self.patch_embed.proj.bias)  # [N, C]
        x = x + self._position_table(grids).to(x.dtype)
        rope = self._rope(grids)
        lengths = [h * w for t, h, w in grids for _ in range(t)]  # attention within each frame (temporal patch)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, rope, lengths)
            if i in c.deepstack_visual_indexes:
                deepstack.append(self.merger_list[c.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack

    def _merge_order(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column of each patch of an h x w frame, in the rows' order: 2x2 merge blocks, raster inside."""
        m = self.config.spatial_merge_size
        rows = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
        cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
        return rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()  # [h*w] each, (bh, bw, mh, mw) order

    def _position_table(self, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """The learned square position table, bilinearly resampled (corners aligned) to each frame's grid."""
        side = int(math.isqrt(self.config.num_position_embeddings))
        table = self.pos_embed.weight
        out = []
        for t, h, w in grids:
            rows, cols = self._merge_order(h, w)
            (r0, r1, dr), (c0, c1, dc) = _taps(rows, h, side), _taps(cols, w, side)
            emb = (
                table[r0 * side + c0] * ((1 - dr) * (1 - dc))[:, None]
                + table[r0 * side + c1] * ((1 - dr) * dc)[:, None]
                + table[r1 * side + c0] * (dr * (1 - dc))[:, None]
                + table[r1 * side + c1] * (dr * dc)[:, None]
            )  # [h*w, C]
            out.append(emb.repeat(t, 1))
        return torch.cat(out)

    def _rope(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D rotary angles: the first half of each head's pairs rotate by row, the second half by column."""
        D = self.config.hidden_size // self.config.num_heads
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, D // 2, 2, dtype=torch.float) / (D // 2)))
        pos = torch.cat([torch.stack(self._merge_order(h, w), -1).repeat(t, 1) for t, h, w in grids])  # [N, 2]
        angles = (pos[..., None].float() * inv_freq).flatten(1)  # [N, D/2]: rows' angles, then columns'
        return angles.cos()[None], angles.sin()[None]  # [1, N, D/2]


def _taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear taps (corners aligned) of `size` output points over `side` table points: lower, upper, weight."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    lo = src.floor()
    return lo.long().clamp(0, side - 1), (lo.long() + 1).clamp(0, side - 1), src - lo


# ---------------------------------------------------------------------------------------------------------------------
# audio


def audio_output_length(frames: int, n_window: int = 50) -> int:
    """Tokens the audio encoder makes from `frames` mel frames: 13 per full 2 * n_window chunk, plus the tail's
    three stride-2 convolutions (transformers' `_get_feat_extract_output_lengths`)."""
    chunk = 2 * n_window
    tail = frames % chunk
    tail = (tail - 1) // 2 + 1
    return ((tail - 1) // 2 + 1 - 1) // 2 + 1 + (frames // chunk) * 13


class AudioLayer(nn.Module):
    def __init__(self, c: AudioConfig):
        super().__init__()
        d = c.d_model
        self.num_heads = c.encoder_attention_heads
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, nn.Linear(d, d))
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, c.encoder_ffn_dim)
        self.fc2 = nn.Linear(c.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        N, a = x.shape[0], self.self_attn
        h = self.self_attn_layer_norm(x)
        q, k, v = (p(h).view(N, self.num_heads, -1) for p in (a.q_proj, a.k_proj, a.v_proj))  # [N, H, D]
        x = x + a.out_proj(segment_attention(q, k, v, lengths).reshape(N, -1))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    """Log-mel features [num_mel_bins, frames] of one clip -> [audio_output_length(frames), O]."""

    def __init__(self, c: AudioConfig):
        super().__init__()
        self.config = c
        ch = c.downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, ch, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(ch, ch, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(ch, ch, 3, 2, padding=1)
        freq = ((c.num_mel_bins + 1) // 2 + 1) // 2
        freq = (freq + 1) // 2  # mel bins after three stride-2 convolutions
        self.conv_out = nn.Linear(ch * freq, c.d_model, bias=False)
        self.layers = nn.ModuleList(AudioLayer(c) for _ in range(c.encoder_layers))
        self.ln_post = nn.LayerNorm(c.d_model)
        self.proj1 = nn.Linear(c.d_model, c.d_model)
        self.proj2 = nn.Linear(c.d_model, c.output_dim)
        self.register_buffer("positions", sinusoids(c.max_source_positions, c.d_model), persistent=False)

    def forward(self, features: torch.Tensor, clip_frames: int | None = None) -> torch.Tensor:
        """features [mel, frames]: a whole clip, or one n_window_infer-frame segment of a longer clip of
        `clip_frames` frames (attention windows never cross segments: a clip encoded segment by segment is exact)."""
        c = self.config
        frames = features.shape[1]
        if frames == 0:
            raise ValueError("an audio clip with no mel frames")
        clip_frames = frames if clip_frames is None else clip_frames
        chunk = 2 * c.n_window
        x = []
        # Each 1 s chunk is convolved on its own and gets positions 0, 1, ... from the sinusoid table: chunks are
        # independent until attention. A clip's short last chunk is zero-padded to a full one, as transformers pads
        # all chunks to the longest (the padding reaches the last token through the convolutions' bias and GELU).
        for piece in features.split(chunk, dim=1):  # [mel, <= chunk]
            n = audio_output_length(piece.shape[1], c.n_window)
            if clip_frames > chunk:
                piece = F.pad(piece, (0, chunk - piece.shape[1]))
            h = piece[None, None].to(self.conv2d1.weight.dtype)  # [1, 1, mel, t]
            h = F.gelu(self.conv2d3(F.gelu(self.conv2d2(F.gelu(self.conv2d1(h))))))  # [1, ch, mel/8, t/8]
            h = h[0].permute(2, 0, 1).reshape(h.shape[3], -1)  # [t/8, ch * mel/8], channel-major
            h = self.conv_out(h) + self.positions[: h.shape[0]].to(h.dtype)
            x.append(h[:n])
        x = torch.cat(x)  # [tokens, d]
        window = audio_output_length(chunk, c.n_window) * (c.n_window_infer // chunk)  # tokens per attention window
        lengths = [window] * (x.shape[0] // window) + ([x.shape[0] % window] if x.shape[0] % window else [])
        for layer in self.layers:
            x = layer(x, lengths)
        return self.proj2(F.gelu(self.proj1(self.ln_post(x))))


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed position table [length, channels]: sines then cosines of geometric timescales."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2).float())
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


class OmniEncoders(nn.Module):
    """The thinker's media encoders, under transformers' names (`visual`, `audio_tower`)."""

    def __init__(self, vision: VisionConfig, audio: AudioConfig):
        super().__init__()
        self.visual = VisionEncoder(vision)
        self.audio_tower = AudioEncoder(audio)

    def reset_buffers(self, device: torch.device | str) -> None:
        """(Re)create non-persistent buffers, e.g. after building on the meta device and loading weights."""
        c = self.audio_tower.config
        self.audio_tower.positions = sinusoids(c.max_source_positions, c.d_model).to(device)
