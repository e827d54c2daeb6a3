"""`longmoe eval video-niah` / `audio-niah` over real HTTP against Gemini-API stubs that read the media they are
sent (an oracle that must find the needle in the decoded frames or samples, and a blind one), and against a local
omni model. The oracle reads by template matching against the candidate words: it has no other way to the answer."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from longmoe.eval import media_niah as MN

WORDS = "walrus,tulip,cobalt,zephyr"


def read_video(data: bytes) -> str:
    """The candidate word whose needle frame is closest to the brightest frame of the video."""
    from longmoe.media import video_frames

    frames = [f for _, f in video_frames(data, fps=24.0)]
    brightest = max(frames, key=lambda f: float(f.mean()))
    return min(WORDS.split(","), key=lambda w: float(((MN.needle_frame(w).astype(float) - brightest) ** 2).mean()))


def pcm16(x: np.ndarray) -> np.ndarray:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, x, MN.RATE, format="WAV", subtype="PCM_16")
    buf.seek(0)
    return sf.read(buf, dtype="int16")[0]


def read_audio(data: bytes) -> str | None:
    """The candidate word whose spoken needle occurs, sample for sample, in the audio."""
    import soundfile as sf

    audio = sf.read(io.BytesIO(data), dtype="int16")[0]
    for word in WORDS.split(","):
        spoken = pcm16(MN.needle_audio(word))
        end = np.flatnonzero(np.abs(spoken.astype(int)) > 200)[-1]
        probe = spoken[end - 4000 : end]  # the end of the sentence: the word (the start is the same for every word)
        starts = np.flatnonzero(audio[: len(audio) - len(probe)] == probe[0])
        if any(np.array_equal(audio[s : s + len(probe)], probe) for s in starts):
            return word
    return None


class Stub(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        m = re.match(r"^/v1beta/models/(\w+):(generateContent|countTokens)$", self.path)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        parts = body["contents"][0]["parts"]
        if m[2] == "countTokens":
            return self.reply({"totalTokens": 1000})
        answer = "I do not know."
        if m[1] == "oracle":
            for p in parts:
                blob = p.get("inlineData")
                if blob:
                    data = base64.b64decode(blob["data"])
                    answer = (read_video if blob["mimeType"].startswith("video") else read_audio)(data) or answer
        self.reply({"candidates": [{"content": {"role": "model", "parts": [{"text": answer}]}}]})

    def reply(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def stub():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def run_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longmoe.cli", "eval", *args], capture_output=True, text=True,
                          timeout=900)  # fmt: skip


@pytest.mark.parametrize("kind", ["video", "audio"])
def test_oracle_scores_1_and_blind_0_over_http(stub, tmp_path, kind):
    if kind == "audio" and shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (.ci/run installs it)")
    common = [f"{kind}-niah", "--gemini-url", stub, "--model-name", "", "--lengths", "8,20", "--depths", "0,50,100",
              "--words", WORDS, "--json", "--quiet"]  # fmt: skip
    for name, want in (("oracle", 1.0), ("blind", 0.0)):
        args = common.copy()
        args[args.index("--model-name") + 1] = name
        out = run_eval(*args, "--out", str(tmp_path / name))
        assert out.returncode == 0, out.stderr[-2000:]
        summary = json.loads(out.stdout)
        assert summary["recall"] == want and summary["trials"] == 6 and summary["errors"] == 0, summary
        assert (tmp_path / name / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    cells = json.loads((tmp_path / "oracle" / "results.json").read_text())["cells"]
    depths = {c["depth"]: c["depth_actual"] for c in cells if c["length"] == 20}
    assert depths[0] == 0 and 0.4 < depths[50] < 0.6 and depths[100] > 0.95


def test_video_and_audio_niah_run_against_a_local_omni_model(tmp_path):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import omni_reference

    model = omni_reference.build(tmp_path / "omni")
    out = run_eval("video-niah", "--model", str(model and tmp_path / "omni"), "--lengths", "4", "--depths", "50",
                   "--words", WORDS, "--out", str(tmp_path / "run"), "--json", "--quiet")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["trials"] == 1 and summary["errors"] == 0 and summary["recall"] in (0.0, 1.0)
    row = json.loads((tmp_path / "run" / "results.json").read_text())["cells"][0]
    assert row["prompt_tokens"] > 100  # the video's tokens, counted by the model
    again = run_eval("video-niah", "--model", str(tmp_path / "omni"), "--lengths", "4", "--depths", "50", "--words",
                     "other,list", "--out", str(tmp_path / "run"), "--quiet")  # fmt: skip
    assert again.returncode == 2 and "different run" in again.stderr  # never credited to another setting
    if shutil.which("espeak-ng") is not None:
        audio = run_eval("audio-niah", "--model", str(tmp_path / "omni"), "--lengths", "6", "--depths", "50",
                         "--words", WORDS, "--out", str(tmp_path / "audio"), "--json", "--quiet")  # fmt: skip
        assert audio.returncode == 0, audio.stderr[-2000:]
        assert json.loads(audio.stdout)["trials"] == 1
