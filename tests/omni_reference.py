"""A tiny random Qwen3-Omni-MoE checkpoint, saved as transformers saves one (config.json with thinker/talker/code2wav
configs, safetensors under `thinker.*`), with a tokenizer that has the family's special tokens and a
preprocessor_config.json as the real checkpoints ship it; plus media made offline (PNG, WAV, MP4 with an audio
track) and the transformers inputs for the same prompt."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch
import transformers as tf
from reference_models import TEXT
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>"]  # fmt: skip
VOCAB = 300
PREPROCESSOR = {  # the fields of Qwen/Qwen3-Omni-30B-A3B-Instruct's preprocessor_config.json
    "image_processor_type": "Qwen2VLImageProcessor", "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "min_pixels": 3136, "max_pixels": 12845056, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, "hop_length": 160, "n_fft": 400,
    "n_samples": 4800000, "nb_max_frames": 30000, "sampling_rate": 16000, "dither": 0.0, "padding_value": 0.0,
    "return_attention_mask": True, "processor_class": "Qwen3OmniMoeProcessor",
}  # fmt: skip


def ids(tok: Tokenizer) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t in SPECIAL}


def build(path: Path, seed: int = 0) -> tf.Qwen3OmniMoeForConditionalGeneration:
    """Save a tiny omni checkpoint to `path`; return the transformers model (fp32, eval, eager experts)."""
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(path / "tokenizer.json"))
    t = ids(tok)
    thinker = dict(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2],
                                          "interleaved": True}),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=16,
                           deepstack_visual_indexes=[0, 1]),
        audio_config=dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                          output_dim=64, downsample_hidden_size=16),
        audio_token_id=t["<|audio_pad|>"], audio_start_token_id=t["<|audio_start|>"],
        audio_end_token_id=t["<|audio_end|>"], image_token_id=t["<|image_pad|>"], video_token_id=t["<|video_pad|>"],
        vision_start_token_id=t["<|vision_start|>"], vision_end_token_id=t["<|vision_end|>"],
        position_id_per_seconds=13,
    )  # fmt: skip
    config = tf.Qwen3OmniMoeConfig(thinker_config=thinker, enable_audio_output=False)
    torch.manual_seed(seed)
    model = tf.Qwen3OmniMoeForConditionalGeneration(config)
    with torch.no_grad():  # far from the init's near-zero weights, so a wrong piece shows as an O(1) difference
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_((1 if name.endswith("weight") else 0) + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": t["<|im_end|>"]}))
    ref = tf.Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                                   experts_implementation="eager")  # fmt: skip
    return ref.eval()


# ---------------------------------------------------------------------------------------------------------------------
# media made here


def png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    ImageDraw.Draw(img).ellipse((width // 4, height // 4, width // 2, height // 2), fill=(255, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def tone(seconds: float, freq: float, rate: int = 22050) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def wav(seconds: float, freq: float, rate: int = 22050, stereo: bool = False) -> bytes:
    import soundfile as sf

    x = tone(seconds, freq, rate)
    if stereo:
        x = np.stack([x, 0.5 * x], axis=1)
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def mp4(frames: int, fps: int, width: int, height: int, seed: int, audio: bool = True) -> bytes:
    """A video of moving noise squares; with a tone track (AAC) when `audio`."""
    import av

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        v = c.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        v.options = {"crf": "10"}
        a = c.add_stream("aac", rate=16000) if audio else None
        if a is not None:
            a.layout = "mono"
        for i in range(frames):
            img = np.full((height, width, 3), 40 * (i % 5), np.uint8)
            x = (i * 7) % max(1, width - 16)
            img[8:24, x : x + 16] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            for packet in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in v.encode():
            c.mux(packet)
        if a is not None:
            samples = tone(frames / fps, 440.0, 16000)
            step = 1024
            for k in range(0, len(samples), step):
                chunk = samples[k : k + step]
                frame = av.AudioFrame.from_ndarray(chunk[None], format="flt", layout="mono")
                frame.sample_rate = 16000
                frame.pts = k
                for packet in a.encode(frame):
                    c.mux(packet)
            for packet in a.encode():
                c.mux(packet)
    return buf.getvalue()
