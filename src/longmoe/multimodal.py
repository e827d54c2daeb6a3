"""Prompts with media for an omni model (Qwen3-Omni-MoE's thinker): parts -> token ids, media embeddings placed at
their placeholder tokens, and M-RoPE positions.

A prompt is a list of parts, in order: `str` (text, tokenized as given: no chat template), or media given as
`{"mime_type": "image/png", "data": bytes}`, a `pathlib.Path`, or a PIL image. Each media part becomes the family's
placeholder block, e.g. `<|vision_start|><|image_pad|> x n <|vision_end|>`; the encoders' outputs replace the pads'
embeddings. Preprocessing equals transformers' Qwen3-Omni processor: images and frames are resized by
`smart_resize` (bicubic, PIL), normalised and cut into 2 x 16 x 16 patch rows; audio becomes Whisper's 128-bin
log-mel; a video's audio track is interleaved with its frames by time, as the processor's `use_audio_in_video`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import media as M
from .media import MediaError
from .model.omni import OmniEncoders, audio_output_length

MODALITIES = ("text", "image", "video", "audio")


# ---------------------------------------------------------------------------------------------------------------------
# configuration: token ids and preprocessing, from the checkpoint's config.json / preprocessor_config.json


@dataclass
class MediaSpec:
    image_token: int
    video_token: int
    audio_token: int
    vision_start: int
    vision_end: int
    audio_start: int
    audio_end: int
    position_id_per_seconds: float = 13.0
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384
    video_min_pixels: int = 128 * 32 * 32  # the Qwen3-Omni processor's frame size bounds
    video_max_pixels: int = 768 * 32 * 32
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    sampling_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    num_mel_bins: int = 128
    n_window: int = 50
    video_fps: float = 2.0  # frames sampled per second of video unless a request says otherwise

    @property
    def factor(self) -> int:  # image sides are multiples of this: one LLM token covers factor x factor pixels
        return self.patch_size * self.merge_size


def media_spec(path: Path, hub: dict[str, Any], vocab: dict[str, int] | None) -> MediaSpec:
    """Token ids from the thinker config (falling back to the tokenizer's special tokens), preprocessing settings from
    preprocessor_config.json where the checkpoint has one."""
    t = hub.get("thinker_config", hub)
    vocab = vocab or {}

    def token(key: str, text: str, default: int | None = None) -> int:
        value = t.get(key, vocab.get(text, default))
        if not isinstance(value, int):
            raise MediaError(f"{path}: config.json has no {key} and the tokenizer no {text}; cannot place media")
        return value

    spec = MediaSpec(
        image_token=token("image_token_id", "<|image_pad|>"),
        video_token=token("video_token_id", "<|video_pad|>"),
        audio_token=token("audio_token_id", "<|audio_pad|>"),
        vision_start=token("vision_start_token_id", "<|vision_start|>"),
        vision_end=token("vision_end_token_id", "<|vision_end|>"),
        audio_start=token("audio_start_token_id", "<|audio_start|>"),
        audio_end=token("audio_end_token_id", "<|audio_end|>"),
        position_id_per_seconds=float(t.get("position_id_per_seconds", 13.0)),
        n_window=int(t.get("audio_config", {}).get("n_window", 50)),
        num_mel_bins=int(t.get("audio_config", {}).get("num_mel_bins", 128)),
    )
    pre = path / "preprocessor_config.json"
    if pre.exists():
        try:
            p = json.loads(pre.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MediaError(f"{pre}: not valid JSON ({e})") from None
        size = p.get("size") or {}
        for ours, theirs in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                             ("merge_size", "merge_size"), ("sampling_rate", "sampling_rate"), ("n_fft", "n_fft"),
                             ("hop_length", "hop_length"), ("num_mel_bins", "feature_size")):  # fmt: skip
            if isinstance(p.get(theirs), int):
                setattr(spec, ours, p[theirs])
        spec.min_pixels = int(p.get("min_pixels") or size.get("shortest_edge") or spec.min_pixels)
        spec.max_pixels = int(p.get("max_pixels") or size.get("longest_edge") or spec.max_pixels)
        if p.get("image_mean"):
            spec.image_mean = tuple(float(x) for x in p["image_mean"])
            spec.image_std = tuple(float(x) for x in p["image_std"])
    return spec


# ---------------------------------------------------------------------------------------------------------------------
# images and video -> patch rows


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size transformers' Qwen2-VL processors resize to: sides multiples of `factor`, area within bounds, aspect
    ratio kept as well as that allows."""
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"an image of {width}x{height} pixels: the aspect ratio must be below 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _normalised(img: Any, size: tuple[int, int], spec: MediaSpec) -> np.ndarray:
    """PIL RGB image -> float32 [3, h, w], resized (bicubic) and normalised."""
    from PIL import Image

    h, w = size
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0  # [3, h, w]
    mean = np.asarray(spec.image_mean, np.float32)[:, None, None]
    std = np.asarray(spec.image_std, np.float32)[:, None, None]
    return (x - mean) / std


def patchify(frames: np.ndarray, spec: MediaSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    """frames [F, 3, h, w] (F a multiple of the temporal patch) -> rows [t*gh*gw, 3*T*P*P] in the vision encoder's
    order (time, 2x2 merge blocks, raster inside a block) and the grid (t, gh, gw) in patches."""
    F_, C, h, w = frames.shape
    P, T, m = spec.patch_size, spec.temporal_patch_size, spec.merge_size
    t, gh, gw = F_ // T, h // P, w // P
    x = frames.reshape(t, T, C, gh // m, m, P, gw // m, m, P)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, bh, bw, mh, mw, C, T, P, P]
    return np.ascontiguousarray(x).reshape(t * gh * gw, C * T * P * P), (t, gh, gw)


def image_patches(image: Any, spec: MediaSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    img = M.load_image(image)
    size = smart_resize(img.height, img.width, spec.factor, spec.min_pixels, spec.max_pixels)
    x = _normalised(img, size, spec)[None].repeat(spec.temporal_patch_size, axis=0)  # one frame, repeated in time
    return patchify(x, spec)


def video_patches(
    frames: Iterable[np.ndarray], spec: MediaSpec, size: tuple[int, int] | None = None
) -> Iterable[tuple[np.ndarray, tuple[int, int, int]]]:
    """RGB frames [H, W, 3] -> patch rows one temporal patch (2 frames) at a time: (rows [gh*gw, 1536], (1, gh, gw)).
    Every frame is resized to one size (from the first frame); an odd last frame is repeated, as transformers pads."""
    from PIL import Image

    pending: list[np.ndarray] = []
    for frame in frames:
        if size is None:
            h, w = frame.shape[:2]
            size = smart_resize(h, w, spec.factor, spec.video_min_pixels, spec.video_max_pixels)
        pending.append(_normalised(Image.fromarray(frame), size, spec))
        if len(pending) == spec.temporal_patch_size:
            yield patchify(np.stack(pending), spec)
            pending = []
    if pending:
        pending += [pending[-1]] * (spec.temporal_patch_size - len(pending))
        yield patchify(np.stack(pending), spec)


# ---------------------------------------------------------------------------------------------------------------------
# audio -> log-mel


def _hz_to_mel(f: np.ndarray) -> np.ndarray:  # Slaney's scale: linear below 1 kHz, logarithmic above
    f = np.asarray(f, dtype=np.float64)
    mel = 3.0 * f / 200.0
    log = f >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    hz = 200.0 * mel / 3.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), hz)


def mel_filters(n_fft: int, n_mels: int, rate: int) -> np.ndarray:
    """Whisper's filter bank [n_fft/2 + 1, n_mels]: Slaney-scale triangles over 0..8 kHz, Slaney-normalised."""
    fft_freqs = np.linspace(0, rate // 2, 1 + n_fft // 2)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), n_mels + 2))
    slopes = edges[None, :] - fft_freqs[:, None]
    diff = np.diff(edges)
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    bank = np.maximum(0.0, np.minimum(down, up))
    return bank * (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[None, :]


def log_mel(wave: np.ndarray, spec: MediaSpec) -> torch.Tensor:
    """Mono float32 samples at spec.sampling_rate -> [num_mel_bins, samples // hop] features, as
    WhisperFeatureExtractor computes them for one clip (no padding to 30 s)."""
    frames, segments = audio_features(lambda: iter([wave]), spec, segment=1 << 62)
    return torch.cat(list(segments), dim=1)


def log_mel_stream(blocks: Iterable[np.ndarray], spec: MediaSpec) -> Iterator[torch.Tensor]:
    """log10 of the mel power [num_mel_bins, k] of consecutive frames of a stream of samples -- the frames
    torch.stft(center=True, pad_mode="reflect") makes of the whole signal, less the last one (as Whisper drops it) --
    block by block, before Whisper's dynamic-range clamp. Memory is one block, whatever the length."""
    n_fft, hop, half = spec.n_fft, spec.hop_length, spec.n_fft // 2
    window = torch.hann_window(n_fft)
    bank = torch.from_numpy(mel_filters(n_fft, spec.num_mel_bins, spec.sampling_rate)).float().T  # [mel, freq]
    buf = np.zeros(0, np.float32)  # the padded signal P from P-index `base` on; P = reflect pad + x + reflect pad
    base, seen, emitted, started = 0, 0, 0, False

    def frames(upto: int) -> torch.Tensor | None:
        nonlocal buf, emitted
        if upto <= emitted:
            return None
        lo = emitted * hop - base
        piece = torch.from_numpy(buf[lo : lo + (upto - emitted - 1) * hop + n_fft])
        stft = torch.stft(piece, n_fft, hop, window=window, center=False, return_complex=True)  # [freq, k]
        emitted = upto
        return torch.clamp(bank @ (stft.abs() ** 2), min=1e-10).log10()

    def trim() -> None:
        nonlocal buf, base
        drop = emitted * hop - base
        buf, base = buf[drop:], base + drop

    for block in blocks:
        block = np.asarray(block, np.float32)
        seen += len(block)
        buf = np.concatenate([buf, block])
        if not started:
            if len(buf) <= half:
                continue  # the left reflection needs half + 1 samples
            buf = np.concatenate([buf[1 : half + 1][::-1], buf])
            started = True
        out = frames((base + len(buf) - n_fft) // hop + 1)
        if out is not None:
            yield out
            trim()
    if seen <= half:
        ms = half / spec.sampling_rate * 1e3
        raise MediaError(f"an audio clip of {seen} samples; it needs more than {half} ({ms:.1f} ms)")
    x_tail = buf[-(half + 1) :]  # the last half + 1 samples of x: the right reflection
    buf = np.concatenate([buf, x_tail[:-1][::-1]])
    out = frames(seen // hop)
    if out is not None:
        yield out


def audio_features(
    blocks: Callable[[], Iterable[np.ndarray]], spec: MediaSpec, segment: int
) -> tuple[int, Iterator[torch.Tensor]]:
    """Whisper features of a stream in segments of `segment` frames: (total frames, the segments [mel, <= segment]).
    The dynamic-range clamp needs the whole clip's maximum, so the stream is decoded twice (`blocks` makes a new
    iterator): once for the maximum, once for the features."""
    peak, total = -float("inf"), 0
    for logspec in log_mel_stream(blocks(), spec):
        peak, total = max(peak, float(logspec.max())), total + logspec.shape[1]

    def segments() -> Iterator[torch.Tensor]:
        pending: list[torch.Tensor] = []
        have = 0
        for logspec in log_mel_stream(blocks(), spec):
            pending.append((torch.maximum(logspec, torch.tensor(peak - 8.0)) + 4.0) / 4.0)
            have += logspec.shape[1]
            while have >= segment:
                x = torch.cat(pending, dim=1)
                yield x[:, :segment]
                pending, have = [x[:, segment:]], have - segment
        if have:
            yield torch.cat(pending, dim=1)

    return total, segments()


# ---------------------------------------------------------------------------------------------------------------------
# a prompt with media


@dataclass
class MediaPart:
    """One media part, checked and ready to stream through the encoders: an image's patch rows, or makers of fresh
    iterators over a video's temporal patches and over audio samples (so that nothing holds a whole file decoded)."""

    kind: str  # image | video | audio
    digest: bytes
    image: tuple[np.ndarray, tuple[int, int, int]] | None = None  # patch rows [N, 1536] and grid
    patches: Callable[[], Iterator[tuple[np.ndarray, tuple[int, int, int]]]] | None = None  # video, per 2 frames
    audio: Callable[[], Iterator[np.ndarray]] | None = None  # 16 kHz mono samples: an audio part or a video's track
    seconds_per_grid: float = 0.0  # video: seconds one temporal patch spans
    raw_bytes: int = 0  # the encoded file, held while the part streams
    duration: float = 0.0  # seconds of audio or of the video clip
    frame_size: tuple[int, int] = (0, 0)  # (h, w) a video frame is resized to
    source_size: tuple[int, int, int] = (0, 0, 0)  # video frame (h, w, 3) or audio (rate, channels, 0) as stored


@dataclass
class Prompt:
    """What the engine needs to run a prompt with media: token ids, the rows that replace placeholder embeddings,
    DeepStack rows at the visual positions, M-RoPE positions, and the ids the prefix cache hashes."""

    tokens: list[int]
    counts: dict[str, int]  # prompt tokens per modality (placeholders' own markers count as text)
    embed_index: torch.Tensor | None = None  # [n] positions whose embeddings are replaced, ascending
    embeds: torch.Tensor | None = None  # [n, C]
    visual_index: torch.Tensor | None = None  # [v] image/video positions, ascending (a subset of embed_index)
    deepstack: list[torch.Tensor] = field(default_factory=list)  # one [v, C] per DeepStack layer
    rope_positions: torch.Tensor | None = None  # [3, len(tokens)] float32
    rope_delta: float = 0.0  # a position p past the prompt has M-RoPE position p + rope_delta on every axis
    hash_ids: list[int] | None = None  # tokens for prefix hashing: media pads replaced by content-derived ids

    @property
    def has_media(self) -> bool:
        return self.embed_index is not None


def is_parts(prompt: Any) -> bool:
    """A list of parts (text and media) rather than a list of token ids (of which the engine checks every one)."""
    return isinstance(prompt, (list, tuple)) and any(
        isinstance(p, (str, dict, Path)) or type(p).__module__.startswith("PIL.") for p in prompt
    )


def decode_part(part: Any, spec: MediaSpec, video_fps: float | None = None, where: str = "part") -> MediaPart:
    """A media part (dict with mime_type and data, a Path, a PIL image) -> MediaPart, decoded and patched. A dict
    may also say, for a video, "fps" (frames sampled per second) and "start_offset" / "end_offset" (seconds)."""
    mime, data = _mime_and_data(part, where)
    opts = part if isinstance(part, dict) else {}
    start, end = float(opts.get("start_offset") or 0.0), opts.get("end_offset")
    end = None if end is None else float(end)
    if start < 0 or (end is not None and end <= start):
        raise MediaError(f"{where}: the clip from {start:g}s to {end if end is not None else 'the end'}s is empty")
    try:
        kind = M.modality(mime)
        raw = data if not isinstance(data, (bytes, bytearray)) else bytes(data)
        digest_src = raw if isinstance(raw, bytes) else _image_bytes(raw)
        out = MediaPart(kind, M.digest(kind.encode() + digest_src))
        rate = spec.sampling_rate
        out.raw_bytes = len(raw) if isinstance(raw, bytes) else 0
        if kind == "image":
            out.image = image_patches(raw, spec)
        elif kind == "audio":
            next(iter(M.audio_stream(raw, rate, block_seconds=0.1)), None)  # decodes: fail here, naming the part
            out.audio = lambda: M.audio_stream(raw, rate)
            out.duration, src_rate, channels = M.audio_info(raw)
            out.source_size = (src_rate, channels, 0)
        else:
            fps = float(opts.get("fps") or video_fps or spec.video_fps)
            info = M.video_info(raw)
            out.duration = max(0.0, (info.duration if end is None else min(end, info.duration)) - start)
            out.source_size = (info.height, info.width, 3)
            out.frame_size = smart_resize(info.height, info.width, spec.factor, spec.video_min_pixels,
                                          spec.video_max_pixels)  # fmt: skip
            out.patches = lambda: video_patches((f for _, f in M.video_frames(raw, fps, start, end)), spec)
            if info.has_audio:
                out.audio = lambda: M.video_audio_stream(raw, rate, start, end)
            out.seconds_per_grid = spec.temporal_patch_size / fps
            out.digest = M.digest(out.digest + repr((fps, start, end)).encode())
    except MediaError as e:
        raise MediaError(f"{where} ({mime}): {e}") from None
    return out


def media_memory(part: MediaPart, spec: MediaSpec, encoders: OmniEncoders, dtype: torch.dtype,
                 fps: float | None = None) -> dict[str, int]:  # fmt: skip
    """What preparing a media part holds at its peak, in bytes, before any of it is decoded: the encoded file, the
    decode working set (one frame pair / one block of samples), the encoder's activations for one temporal patch or
    one attention window, and the embeddings it yields (with DeepStack's copies for visual tokens), counted three times
    over for the concatenation and ordering at the end. Generous by design, like the engine's chunk estimate."""
    item, f32 = dtype.itemsize, 4
    vc, ac = encoders.visual.config, encoders.audio_tower.config
    out_width = vc.out_hidden_size
    decode = encoder = tokens = 0
    if part.kind in ("image", "video"):
        if part.image is not None:
            rows, (t, gh, gw) = part.image
            grids, decode = 1, rows.nbytes * 3
        else:
            h, w = part.frame_size
            gh, gw = h // spec.patch_size, w // spec.patch_size
            rate = fps or (spec.temporal_patch_size / part.seconds_per_grid)
            grids = max(1, math.ceil(part.duration * rate / spec.temporal_patch_size) + 1)
            src = math.prod(part.source_size)
            decode = 4 * src + spec.temporal_patch_size * 3 * h * w * f32 * 4  # frames, resized, stacked, patch rows
        n = gh * gw
        per_patch = (12 * vc.hidden_size + 3 * vc.intermediate_size + 2 * vc.patch_dim) * f32
        encoder = 2 * (n * per_patch + vc.num_heads * n * n * f32 * 2)
        tokens = grids * n // spec.merge_size**2
        embed = tokens * out_width * item * (1 + len(vc.deepstack_visual_indexes))
    else:
        embed = 0
    if part.audio is not None:
        frames = int(part.duration * spec.sampling_rate) // spec.hop_length + 1
        atokens = audio_output_length(frames, spec.n_window)
        src_rate, channels, _ = part.source_size if part.kind == "audio" else (48000, 2, 0)
        block = 30 * max(src_rate, spec.sampling_rate) * max(channels, 1) * f32
        stft = (spec.n_fft // 2 + 1) * 30 * (spec.sampling_rate // spec.hop_length) * (8 + 2 * f32)
        decode = max(decode, 6 * block + stft)
        window = ac.n_window_infer
        conv = ac.downsample_hidden_size * (ac.num_mel_bins // 2) * (window // 2) * f32 * 3
        layer = 104 * (12 * ac.d_model + 3 * ac.encoder_ffn_dim) * f32 + ac.encoder_attention_heads * 104 * 104 * f32
        encoder = max(encoder, 2 * (conv + layer))
        embed += atokens * ac.output_dim * item
    return {"file": part.raw_bytes, "decode": decode, "encoder": encoder, "embeddings": 3 * embed}


def _mime_and_data(part: Any, where: str) -> tuple[str, Any]:
    if isinstance(part, dict):
        mime = part.get("mime_type", part.get("mimeType"))
        if not isinstance(mime, str) or "data" not in part:
            raise MediaError(f"{where}: a media part is {{'mime_type': str, 'data': bytes}}, got keys {sorted(part)}")
        data = part["data"]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MediaError(f"{where}: 'data' must be bytes, got {type(data).__name__}")
        return mime, bytes(data)
    if isinstance(part, Path):
        return M.mime_of_path(part), M.read_bytes(part)
    if type(part).__module__.startswith("PIL."):
        return "image/png", part
    raise MediaError(
        f"{where}: expected text (str) or media (a dict with mime_type and data, a pathlib.Path, a PIL image), "
        f"got {type(part).__name__}"
    )


def _image_bytes(img: Any) -> bytes:
    return img.convert("RGB").tobytes() + repr(img.size).encode()


class Builder:
    """Assembles a Prompt part by part, keeping the M-RoPE positions as transformers' `get_rope_index` makes them:
    text runs are consecutive on all three axes; a media block's tokens take (time, row, column) offsets from the
    position after its start marker; whatever follows starts one past the largest position of the block's last piece."""

    def __init__(self, spec: MediaSpec | None, encoders: OmniEncoders | None, dtype: torch.dtype):
        self.spec, self.encoders, self.dtype = spec, encoders, dtype
        self.tokens: list[int] = []
        self.hash_ids: list[int] = []
        self.positions: list[torch.Tensor] = []  # [3, n] pieces
        self.next = 0.0  # the position the next text token gets
        self.counts = dict.fromkeys(MODALITIES, 0)
        self.embed_at: list[torch.Tensor] = []
        self.embeds: list[torch.Tensor] = []
        self.visual_at: list[torch.Tensor] = []
        self.deepstack: list[list[torch.Tensor]] = []

    def text(self, ids: list[int]) -> None:
        if ids:
            self._add(ids, torch.arange(len(ids), dtype=torch.float32).expand(3, -1) + self.next, "text")

    def _add(self, ids: list[int], pos: torch.Tensor, kind: str, salt: bytes = b"") -> None:
        start = len(self.tokens)
        self.tokens += ids
        if salt:  # media pads: ids derived from the content, never a real token id (those are >= 0)
            base = int.from_bytes(salt[:7], "little")
            self.hash_ids += [-1 - ((base + i) % (1 << 62)) for i in range(len(ids))]
        else:
            self.hash_ids += ids
        self.positions.append(pos)
        self.counts[kind] += len(ids)
        self.next = float(pos.max()) + 1.0
        if kind != "text":
            self.embed_at.append(torch.arange(start, start + len(ids)))

    def media(self, part: MediaPart) -> None:
        s, enc = self.spec, self.encoders
        if enc is None or s is None:
            raise MediaError("this model has no media encoders; it reads text only")
        if part.kind == "audio":
            feats = self._audio(part)
            if feats is None:
                raise MediaError("the audio has no samples")
            self.text([s.audio_start])
            n = feats.shape[0]
            self._add([s.audio_token] * n, torch.arange(n, dtype=torch.float32).expand(3, -1) + self.next, "audio",
                      part.digest)  # fmt: skip
            self.embeds.append(feats)
            self.text([s.audio_end])
            return
        pad = s.image_token if part.kind == "image" else s.video_token
        feats, deep, grids = self._vision(part)  # [n, C], per DeepStack layer [n, C], (t, h, w) per temporal patch
        m = s.merge_size
        if part.kind == "image":
            t_pos = torch.zeros(1)
        else:
            t_pos = torch.arange(len(grids), dtype=torch.float32) * part.seconds_per_grid * s.position_id_per_seconds
        vis = torch.cat([_grid_positions(t_pos[i : i + 1], gh // m, gw // m) for i, (_, gh, gw) in enumerate(grids)],
                        dim=1)  # fmt: skip
        audio = self._audio(part) if part.kind == "video" else None
        self.text([s.vision_start] + ([s.audio_start] if audio is not None else []))
        vis = vis + self.next
        if audio is None:
            self._add([pad] * vis.shape[1], vis, part.kind, part.digest)
            self.embeds.append(feats)
            self.visual_at.append(self.embed_at[-1])
            self.deepstack.append(deep)
        else:
            aud = torch.arange(audio.shape[0], dtype=torch.float32).expand(3, -1) + self.next
            self._interleave(vis, aud, feats, deep, audio, part.digest)
        self.text([s.audio_end, s.vision_end] if audio is not None else [s.vision_end])

    def _audio(self, part: MediaPart) -> torch.Tensor | None:
        """Encode audio one attention window (8 s) at a time: exact, since attention never crosses a window."""
        if part.audio is None:
            return None
        tower = self.encoders.audio_tower
        total, segments = audio_features(part.audio, self.spec, tower.config.n_window_infer)
        if total == 0:
            return None
        return torch.cat([tower(seg.to(self.dtype), clip_frames=total) for seg in segments])

    def _interleave(self, vis, aud, vfeats, deep, afeats, digest: bytes) -> None:
        """A video's frames and audio track in one block, merged by time (a frame's tokens before audio tokens of
        the same time), as the processor lays out the pads and get_rope_index the positions."""
        s = self.spec
        vt, at = vis[0].tolist(), aud[0].tolist()
        order, i, j = [], 0, 0
        while i < len(vt) and j < len(at):
            if vt[i] <= at[j]:
                order.append(("v", i))
                i += 1
            else:
                order.append(("a", j))
                j += 1
        order += [("v", k) for k in range(i, len(vt))] + [("a", k) for k in range(j, len(at))]
        ids = [s.video_token if k == "v" else s.audio_token for k, _ in order]
        pos = torch.stack([vis[:, x] if k == "v" else aud[:, x] for k, x in order], dim=1)
        start = len(self.tokens)
        self._add(ids, pos, "video", digest)
        self.counts["video"] -= len(at)
        self.counts["audio"] += len(at)
        # transformers continues from the largest position of the block's last piece (the run left over when the
        # other kind ran out), not of the whole block; that piece's largest position is its last token's
        self.next = float(pos[:, -1].max()) + 1.0
        at_v = torch.tensor([start + n for n, (k, _) in enumerate(order) if k == "v"])
        at_a = torch.tensor([start + n for n, (k, _) in enumerate(order) if k == "a"])
        self.embed_at[-1] = torch.cat([at_v, at_a])
        self.embeds.append(torch.cat([vfeats, afeats]))
        self.visual_at.append(at_v)
        self.deepstack.append(deep)

    def _vision(self, part: MediaPart) -> tuple[torch.Tensor, list[torch.Tensor], list[tuple[int, int, int]]]:
        """Encode one temporal patch at a time (attention never crosses one), so long videos stay in bounded memory."""
        feats, deep, grids = [], [], []
        for rows, grid in [part.image] if part.image is not None else part.patches():
            f, d = self.encoders.visual(torch.from_numpy(rows).to(self.dtype), [grid])
            feats.append(f)
            deep.append(d)
            grids.append(grid)
        if not feats:
            raise MediaError("the video has no frames in the clip asked for")
        return _cat(feats), _cat_layers(deep), grids

    def build(self) -> Prompt:
        if not self.tokens:
            raise ValueError("the prompt is empty (no parts); give at least one")
        pos = torch.cat(self.positions, dim=1)
        p = Prompt(self.tokens, self.counts)
        if self.embed_at:
            p.embed_index, order = _ascending(torch.cat(self.embed_at))
            p.embeds = _cat(self.embeds)
            if order is not None:  # a video's frames and audio interleave: rows in position order
                p.embeds = p.embeds[order]
            if self.visual_at:
                p.visual_index, vo = _ascending(torch.cat(self.visual_at))
                p.deepstack = [d if vo is None else d[vo] for d in _cat_layers(self.deepstack)]
            p.rope_positions = pos
            p.rope_delta = float(pos.max()) + 1.0 - len(self.tokens)
            p.hash_ids = self.hash_ids
        return p


def _cat(pieces: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat that empties the list as it goes: the pieces are freed as soon as the whole exists (an hour of
    video's embeddings are then held twice at most, not three times)."""
    out = torch.cat(pieces)
    pieces.clear()
    return out


def _cat_layers(per_piece: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per-piece lists of per-layer tensors -> one tensor per layer, freeing each layer's pieces once it is joined."""
    layers = []
    for k in range(len(per_piece[0]) if per_piece else 0):
        layers.append(torch.cat([p[k] for p in per_piece]))
        for p in per_piece:
            p[k] = None
    per_piece.clear()
    return layers


def _ascending(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(index sorted, the order that sorts it), or (index, None) when it is already ascending."""
    if index.numel() < 2 or bool((index[1:] > index[:-1]).all()):
        return index, None
    order = torch.argsort(index)
    return index[order], order


def _grid_positions(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(time, row, column) of each token of one temporal patch of h x w merged tokens: [3, h*w]."""
    rows = torch.arange(h, dtype=torch.float32).view(-1, 1).expand(h, w).flatten()
    cols = torch.arange(w, dtype=torch.float32).view(1, -1).expand(h, w).flatten()
    return torch.stack([t.expand(h * w), rows, cols])
