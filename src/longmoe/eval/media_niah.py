"""Needles in video and audio haystacks, as the Gemini 1.5 report tests them (its section 5.2.1.2-3).

video-niah: a synthetic video (moving squares over shifting backgrounds, made with PyAV) of each length in seconds,
with "The secret word is 'X'" rendered (Pillow) on the frame at each depth; the question is asked in text after the
video. audio-niah: speech (espeak-ng reading the haystack text) of each length, with "The secret keyword is X"
spoken and spliced in at each depth (between 0.3 s silences); the question is asked in text after the audio.
Recall by length x depth with the same table, heatmap and resumable results as `niah`; targets are a local omni
model or a Gemini-API endpoint (media sent as inlineData).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .niah import heatmap, load_haystack, summarize, table
from .runner import Cell, Results, atomic_write, fingerprint, run
from .targets import Target, TargetError

RATE = 16000
VIDEO_SIZE = (320, 240)  # (width, height) of the haystack video
QUESTIONS = {
    "video": "What is the secret word shown in the video? Answer with the word only.",
    "audio": "What is the secret keyword spoken in the audio? Answer with the word only.",
}


def secret_words(source: str | None) -> list[str]:
    """The candidate secret words: a comma-separated list, a file of one word per line, or the built-in list."""
    if source is None:
        words = (Path(__file__).with_name("words.txt")).read_text().split()
    elif Path(source).is_file():
        words = Path(source).read_text().split()
    else:
        words = [w.strip() for w in source.split(",") if w.strip()]
    words = sorted({w for w in words if w.isalpha()})
    if not words:
        raise ValueError(f"--words {source!r} holds no words (letters only)")
    return words


# ---------------------------------------------------------------------------------------------------------------------
# video


def needle_frame(word: str, size: tuple[int, int] = VIDEO_SIZE) -> np.ndarray:
    """The frame that carries the needle: black text on white, Pillow's own font (the same on every machine)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(12, size[1] // 9))
    for i, line in enumerate(("The secret word is", f"'{word}'")):
        w = draw.textlength(line, font=font)
        draw.text(((size[0] - w) / 2, size[1] * (0.3 + 0.25 * i)), line, fill="black", font=font)
    return np.asarray(img)


def make_video(seconds: float, fps: float, depth: float, word: str, seed: int) -> tuple[bytes, float]:
    """An MP4 (H.264) of round(seconds * fps) frames with the needle frame at `depth` percent; returns it and the
    needle's actual depth (its frame's index over the last index)."""
    import av

    rng = np.random.default_rng(seed)
    n = max(1, round(seconds * fps))
    at = round(depth / 100 * (n - 1))
    w, h = VIDEO_SIZE
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        v = c.add_stream("libx264", rate=max(1, round(fps)))
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        v.options = {"crf": "18"}
        tone = rng.integers(40, 200, 3)
        for i in range(n):
            if i == at:
                img = needle_frame(word)
            else:
                if i % 10 == 0:
                    tone = rng.integers(40, 200, 3)
                img = np.empty((h, w, 3), np.uint8)
                img[:] = tone
                for k in range(3):
                    x, y = (i * (7 + 5 * k) + 40 * k) % (w - 40), (i * (3 + 2 * k) + 60 * k) % (h - 40)
                    img[y : y + 40, x : x + 40] = rng.integers(0, 256, 3)
            for packet in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in v.encode():
            c.mux(packet)
    return buf.getvalue(), at / max(n - 1, 1)


# ---------------------------------------------------------------------------------------------------------------------
# audio


def espeak(text: str) -> np.ndarray:
    """Speech for `text` from espeak-ng (Debian package espeak-ng), as 16 kHz mono float32."""
    from ..media import load_audio

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise TargetError("audio-niah speaks its haystack with espeak-ng: install it (apt-get install -y espeak-ng)")
    out = subprocess.run([exe, "--stdout", "-v", "en-us", "-s", "170", text], capture_output=True, timeout=600)
    if out.returncode != 0:
        raise TargetError(f"espeak-ng failed: {out.stderr.decode(errors='replace')[:200]}")
    return load_audio(out.stdout, RATE)


@lru_cache(maxsize=4)
def speech_haystack(haystack: str | None, seconds: float) -> np.ndarray:
    """At least `seconds` of the haystack's text read aloud (synthesised once per run and length)."""
    units = load_haystack(haystack).units
    pieces, have, i = [], 0, 0
    while have < seconds * RATE:
        text = " ".join(units[i : i + 20])
        i = (i + 20) % max(len(units), 1)
        piece = espeak(text)
        pieces.append(piece)
        have += len(piece)
    return np.concatenate(pieces)[: int(seconds * RATE)]


def needle_audio(word: str) -> np.ndarray:
    gap = np.zeros(int(0.3 * RATE), np.float32)
    return np.concatenate([gap, espeak(f"The secret keyword is {word}."), gap])


def make_audio(seconds: float, depth: float, word: str, haystack: str | None) -> tuple[bytes, float]:
    """A WAV (16 kHz, 16-bit) of `seconds` of speech with the spoken needle spliced in at `depth` percent."""
    import soundfile as sf

    needle = needle_audio(word)
    rest = max(0, int(seconds * RATE) - len(needle))
    hay = speech_haystack(haystack, rest / RATE + 1)[:rest]
    at = round(depth / 100 * rest)
    wave = np.concatenate([hay[:at], needle, hay[at:]])
    buf = io.BytesIO()
    sf.write(buf, wave, RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue(), at / max(len(wave) - len(needle), 1)


# ---------------------------------------------------------------------------------------------------------------------
# tasks and the run


@dataclass
class MediaTask:
    """A cell's prompt (parts: the media, then the question) and its answer; what runner.evaluate needs."""

    parts: list[Any]
    answers: list[str]
    depth: float
    meta: dict[str, Any] = field(default_factory=dict)

    def prompt(self) -> list[Any]:
        return self.parts

    def score(self, answer: str) -> float:
        return float(self.answers[0].lower() in answer.lower())


def cells(kind: str, lengths: list[int], depths: list[float], samples: int, seed: int, words: list[str],
          fps: float, haystack: str | None, max_tokens: int) -> list[Cell]:  # fmt: skip
    out = []
    for length in lengths:
        for depth in depths:
            for s in range(samples):
                key = f"{kind}|{length}|{depth:g}|{s}"
                rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}|{key}".encode()).digest()[:8], "little"))
                word, cell_seed = rng.choice(words), rng.randrange(1 << 31)

                def build(length=length, depth=depth, word=word, cell_seed=cell_seed) -> MediaTask:
                    if kind == "video":
                        data, actual = make_video(length, fps, depth, word, cell_seed)
                        part = {"mime_type": "video/mp4", "data": data, "fps": fps}
                    else:
                        data, actual = make_audio(length, depth, word, haystack)
                        part = {"mime_type": "audio/wav", "data": data}
                    return MediaTask([part, "\n" + QUESTIONS[kind]], [word], actual)

                meta = {"task": f"{kind}-niah", "length": length, "depth": depth, "sample": s}
                out.append(Cell(key, meta, build, max_tokens, weight=float(length)))
    return out


def main(target: Target, args: Any, kind: str) -> dict[str, Any]:
    out = Path(args.out)
    if kind == "audio" and shutil.which("espeak-ng") is None:
        raise TargetError("audio-niah speaks its haystack with espeak-ng: install it (apt-get install -y espeak-ng)")
    if not getattr(target, "reads_media", False):
        raise TargetError(f"{target.name} cannot take media; use a local omni model (e.g. Qwen3-Omni-MoE) or "
                          "--gemini-url")  # fmt: skip
    words = secret_words(args.words)
    identity = {"eval": f"{kind}-niah", "target": target.identity, "seed": args.seed, "fps": args.fps,
                "haystack": args.haystack, "words": fingerprint(words), "max_tokens": args.max_tokens,
                "question": QUESTIONS[kind], "video_size": VIDEO_SIZE}  # fmt: skip
    results = Results(out, identity)
    grid = cells(kind, args.lengths, args.depths, args.samples, args.seed, words, args.fps, args.haystack,
                 args.max_tokens)  # fmt: skip
    run(grid, target, results, f"{kind}-niah", quiet=args.quiet)
    wanted = {c.key for c in grid}
    rows = [r for k, r in results.rows.items() if k in wanted]
    summary = summarize(rows)
    summary.update(target=target.name, task=f"{kind}-niah", unit="seconds")
    atomic_write(out / "results.json", json.dumps({"summary": summary, "cells": rows}, indent=1))
    heatmap(rows, out / "heatmap.png", f"{kind} needle in a haystack: {Path(target.name).name}",
            xlabel=f"{kind} length (seconds)", short=lambda n: f"{n:g}s")  # fmt: skip
    return summary


__all__ = ["main", "table", "make_video", "make_audio", "needle_frame", "needle_audio", "secret_words"]
