"""Long media through decoding and encoding in bounded memory: a 60-minute video sampled at 1 fps and a 2-hour
audio file, prepared for a (tiny, random-weight) Qwen3-Omni-MoE thinker -- decoded frame by frame and block by block,
encoded one temporal patch / one 8-s attention window at a time. Prints wall time, the tokens made, peak RSS over
the baseline and the planner's estimate (longmoe.multimodal.media_memory) for each.

    .venv/bin/python bench/long_media.py                           # 60 min video + 120 min audio
    .venv/bin/python bench/long_media.py --video-minutes 5 --audio-minutes 10 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tiny checkpoint of the tests

from long_context import peak_rss, reset_peak, rss  # noqa: E402

import longmoe  # noqa: E402
from longmoe.multimodal import decode_part  # noqa: E402
from longmoe.sysinfo import cpu_name, fmt_gib  # noqa: E402


def write_video(path: Path, minutes: float, fps: int = 1, width: int = 96, height: int = 64) -> None:
    """Moving noise squares, `fps` frames per second, H.264, no audio track."""
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), mode="w") as c:
        v = c.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        for i in range(int(minutes * 60 * fps)):
            img = np.full((height, width, 3), 30 * (i % 7), np.uint8)
            x = (i * 5) % (width - 16)
            img[8:24, x : x + 16] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            for packet in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in v.encode():
            c.mux(packet)


def write_audio(path: Path, minutes: float, rate: int = 16000) -> None:
    """Tones gliding in pitch, 16-bit FLAC, written 10 s at a time."""
    import soundfile as sf

    with sf.SoundFile(str(path), "w", samplerate=rate, channels=1, format="FLAC", subtype="PCM_16") as f:
        for k in range(int(minutes * 6)):
            t = np.arange(10 * rate) / rate + 10 * k
            f.write((0.3 * np.sin(2 * np.pi * (200 + 50 * np.sin(t / 60)) * t)).astype(np.float32))


def measure(m, part: Path, fps: float | None) -> dict:
    spec = m.media
    decoded = decode_part(part, spec, fps)
    plan = m.media_memory([decoded], fps)
    base = rss()
    reset_peak()
    t0 = time.perf_counter()
    prompt = m.prepare(["Watch: " if decoded.kind == "video" else "Listen: ", part], video_fps=fps)
    seconds = time.perf_counter() - t0
    peak = peak_rss() - base
    estimate = sum(plan.values())
    return {"kind": decoded.kind, "file_mib": part.stat().st_size / 2**20, "duration_s": decoded.duration,
            "tokens": len(prompt.tokens), "counts": prompt.counts, "seconds": round(seconds, 1),
            "peak_over_baseline_gib": round(peak / 2**30, 3), "estimate_gib": round(estimate / 2**30, 3),
            "estimate_parts_gib": {k: round(v / 2**30, 3) for k, v in plan.items()},
            "peak_over_estimate": round(peak / estimate, 3)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video-minutes", type=float, default=60.0)
    ap.add_argument("--audio-minutes", type=float, default=120.0)
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args()
    import omni_reference

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        omni_reference.build(tmp / "model")
        video, audio = tmp / "long.mp4", tmp / "long.flac"
        t0 = time.perf_counter()
        write_video(video, args.video_minutes)
        write_audio(audio, args.audio_minutes)
        made = time.perf_counter() - t0
        m = longmoe.load(tmp / "model", dtype="float32")
        results = {"cpu": cpu_name(), "files_written_seconds": round(made, 1),
                   "video": measure(m, video, 1.0), "audio": measure(m, audio, None)}  # fmt: skip
    if args.json:
        print(json.dumps(results))
        return
    print(f"CPU: {results['cpu']}")
    for name in ("video", "audio"):
        r = results[name]
        print(f"{name}: {r['duration_s'] / 60:.1f} min ({r['file_mib']:.1f} MiB file) -> {r['tokens']:,} tokens in "
              f"{r['seconds']:.1f} s; peak RSS +{fmt_gib(r['peak_over_baseline_gib'] * 2**30)} over the baseline, "
              f"planner estimate {fmt_gib(r['estimate_gib'] * 2**30)} ({r['peak_over_estimate']:.0%} of it)")


if __name__ == "__main__":
    main()
