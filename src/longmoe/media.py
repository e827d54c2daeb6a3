"""Media decoding: images (Pillow), audio (soundfile + soxr), video (PyAV) -- libraries that bundle their codecs.

Every function takes what a user or an HTTP request holds: raw bytes, a path, or (images) a PIL image, and fails
with `MediaError` naming the part and what is wrong. Video is decoded lazily, frame by frame, so an hour of it never
sits in memory as one array.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LongmoeError

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp")
AUDIO_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/flac", "audio/ogg", "audio/mpeg", "audio/mp3")
VIDEO_TYPES = ("video/mp4", "video/webm", "video/quicktime", "video/x-matroska", "video/mpeg", "video/avi")
SUFFIX_TYPES = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif",
    ".bmp": "image/bmp", ".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg",
    ".mp4": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime", ".mkv": "video/x-matroska",
}  # fmt: skip


class MediaError(LongmoeError, ValueError):
    """Media that cannot be used: an unsupported type, bytes that do not decode, an empty clip."""


def modality(mime_type: str) -> str:
    """'image' | 'audio' | 'video' for a supported MIME type; MediaError otherwise."""
    mime = mime_type.split(";")[0].strip().lower()
    for kind, types in (("image", IMAGE_TYPES), ("audio", AUDIO_TYPES), ("video", VIDEO_TYPES)):
        if mime in types:
            return kind
    raise MediaError(
        f"unsupported media type {mime_type!r}; supported: {', '.join(IMAGE_TYPES + AUDIO_TYPES + VIDEO_TYPES)}"
    )


def mime_of_path(path: str | Path) -> str:
    mime = SUFFIX_TYPES.get(Path(path).suffix.lower())
    if mime is None:
        raise MediaError(f"{path}: unknown media file type; use one of {', '.join(sorted(SUFFIX_TYPES))}")
    return mime


def read_bytes(data: bytes | str | Path) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    p = Path(data)
    if not p.is_file():
        raise MediaError(f"media file {str(p)!r} does not exist")
    return p.read_bytes()


def digest(data: bytes) -> bytes:
    """Content hash of a media part (the prefix cache keys media by it)."""
    return hashlib.sha256(data).digest()


# ---------------------------------------------------------------------------------------------------------------------
# images


def load_image(data: Any) -> Any:
    """bytes, a path or a PIL image -> an RGB PIL image (the first frame of an animation)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, Image.Image):
        return data.convert("RGB")
    raw = read_bytes(data)
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise MediaError(f"the image does not decode ({e}); send PNG, JPEG, WebP, GIF or BMP bytes") from None
    return img.convert("RGB")


# ---------------------------------------------------------------------------------------------------------------------
# audio


def load_audio(data: bytes | str | Path, rate: int = 16000) -> np.ndarray:
    """Audio bytes or a path (WAV, FLAC, OGG, MP3) -> mono float32 samples at `rate` Hz, as one array."""
    pieces = list(audio_stream(data, rate))
    return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


def audio_stream(
    data: bytes | str | Path, rate: int = 16000, block_seconds: float = 30.0
) -> Iterator[np.ndarray]:
    """Audio bytes or a path -> mono float32 samples at `rate` Hz, one block at a time (an hour of audio is never one
    array): libsndfile's block reader through soxr's streaming resampler; audio-only MP4/M4A/WebM through PyAV."""
    import soundfile as sf
    import soxr

    raw = read_bytes(data)
    try:
        f = sf.SoundFile(io.BytesIO(raw))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        if _looks_like_container(raw):
            yield from _audio_track_stream(raw, rate, 0.0, None)
            return
        raise MediaError(f"the audio does not decode ({e}); send WAV, FLAC, OGG or MP3 bytes") from None
    with f:
        stream = None if f.samplerate == rate else soxr.ResampleStream(f.samplerate, rate, 1, dtype="float32")
        for block in f.blocks(blocksize=max(1, int(block_seconds * f.samplerate)), dtype="float32", always_2d=True):
            mono = np.ascontiguousarray(block.mean(axis=1), dtype=np.float32)
            out = mono if stream is None else stream.resample_chunk(mono)
            if len(out):
                yield out
        if stream is not None:
            tail = stream.resample_chunk(np.zeros(0, np.float32), last=True)
            if len(tail):
                yield tail


def audio_info(data: bytes | str | Path) -> tuple[float, int, int]:
    """(seconds, sample rate, channels) of an audio file, from its header (no decoding)."""
    import soundfile as sf

    raw = read_bytes(data)
    try:
        i = sf.info(io.BytesIO(raw))
        return i.frames / i.samplerate if i.samplerate else 0.0, i.samplerate, i.channels
    except (sf.LibsndfileError, RuntimeError, TypeError):
        import av

        with av.open(io.BytesIO(raw)) as c:
            s = c.streams.audio[0]
            seconds = float(s.duration * s.time_base) if s.duration else (c.duration or 0) / 1e6
            return seconds, s.rate, s.channels


def resample(wave: np.ndarray, sr: int, rate: int) -> np.ndarray:
    import soxr

    wave = np.ascontiguousarray(wave, dtype=np.float32)
    return wave if sr == rate else soxr.resample(wave, sr, rate).astype(np.float32)


def _looks_like_container(raw: bytes) -> bool:
    return raw[4:8] == b"ftyp" or raw[:4] == b"\x1a\x45\xdf\xa3"


# ---------------------------------------------------------------------------------------------------------------------
# video


@dataclass
class VideoInfo:
    duration: float  # seconds
    fps: float  # the stream's average frame rate
    width: int
    height: int
    has_audio: bool


def _open_video(raw: bytes):
    import av

    try:
        container = av.open(io.BytesIO(raw), mode="r")
    except (av.error.FFmpegError, ValueError) as e:  # type: ignore[attr-defined]
        raise MediaError(f"the video does not decode ({e}); send MP4, WebM, MOV or MKV bytes") from None
    if not container.streams.video:
        container.close()
        raise MediaError("the video has no video stream")
    return container


def video_info(data: bytes | str | Path) -> VideoInfo:
    raw = read_bytes(data)
    with _open_video(raw) as c:
        s = c.streams.video[0]
        fps = float(s.average_rate or 0) or 25.0
        if s.duration is not None and s.time_base is not None:
            duration = float(s.duration * s.time_base)
        elif c.duration is not None:
            duration = c.duration / 1_000_000
        else:
            duration = (s.frames or 0) / fps
        return VideoInfo(duration, fps, s.codec_context.width, s.codec_context.height, bool(c.streams.audio))


def video_frames(
    data: bytes | str | Path, fps: float = 2.0, start: float = 0.0, end: float | None = None
) -> Iterator[tuple[float, np.ndarray]]:
    """Decode frames sampled at `fps` between `start` and `end` seconds: yields (timestamp, RGB uint8 [H, W, 3]),
    one at a time. A frame is taken for each sampling instant from the first decoded frame at or after it."""
    if not (isinstance(fps, (int, float)) and 0 < fps <= 60 and math.isfinite(fps)):
        raise MediaError(f"video fps must be in (0, 60], got {fps!r}")
    raw = read_bytes(data)
    with _open_video(raw) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        next_t, got = start, 0
        for frame in c.decode(stream):
            if frame.time is None:
                continue
            t = float(frame.time)
            if end is not None and t >= end:
                break
            if t + 1e-6 < next_t:
                continue
            yield t, frame.to_ndarray(format="rgb24")
            got += 1
            next_t = start + got / fps
        if got == 0:
            raise MediaError(f"no video frames between {start:g}s and {end if end is not None else 'the end'}")


def video_audio(
    data: bytes | str | Path, rate: int = 16000, start: float = 0.0, end: float | None = None
) -> np.ndarray:
    """The audio track of a video, mono float32 at `rate` Hz, cut to [start, end) seconds (empty if it has none)."""
    pieces = list(video_audio_stream(data, rate, start, end))
    return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


def video_audio_stream(
    data: bytes | str | Path, rate: int = 16000, start: float = 0.0, end: float | None = None
) -> Iterator[np.ndarray]:
    """video_audio, one decoded block at a time (nothing if the video has no audio track)."""
    raw = read_bytes(data)
    with _open_video(raw) as c:
        has_audio = bool(c.streams.audio)
    if has_audio:
        yield from _audio_track_stream(raw, rate, start, end)


def _audio_track_stream(raw: bytes, rate: int, start: float, end: float | None) -> Iterator[np.ndarray]:
    """Samples [start * rate, end * rate) of a container's first audio stream, resampled to mono `rate` Hz."""
    import av

    try:
        c = av.open(io.BytesIO(raw), mode="r")
    except (av.error.FFmpegError, ValueError) as e:  # type: ignore[attr-defined]
        raise MediaError(f"the audio does not decode ({e})") from None
    lo, hi = int(start * rate), None if end is None else int(end * rate)
    at = 0  # samples produced so far
    with c:
        if not c.streams.audio:
            raise MediaError("the file has no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)

        def frames():
            for frame in c.decode(c.streams.audio[0]):
                yield from resampler.resample(frame)
            yield from resampler.resample(None)

        for out in frames():
            x = out.to_ndarray().reshape(-1).astype(np.float32)
            a, b = max(lo - at, 0), len(x) if hi is None else min(len(x), hi - at)
            at += len(x)
            if b > a:
                yield x[a:b]
            if hi is not None and at >= hi:
                break


def check(mime_type: str, data: bytes) -> None:
    """Decode enough of a media file to know it is usable (an upload's PROCESSING step); MediaError if not."""
    kind = modality(mime_type)
    if kind == "image":
        load_image(data)
    elif kind == "audio":
        if len(load_audio(data)) == 0:
            raise MediaError("the audio has no samples")
    else:
        next(iter(video_frames(data, fps=1.0)))  # raises MediaError when there is no frame
