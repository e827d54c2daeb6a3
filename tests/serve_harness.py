"""Helpers for the server tests: tiny local models, `longmoe serve` in a subprocess or the app in a thread, metrics.

Every wait here waits for a condition (a line on stderr, an HTTP answer, a metric), never for a fixed time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

KEY = "test-key"
CONFIG = dict(vocab_size=264, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
              intermediate_size=128, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
              max_position_embeddings=8192)  # fmt: skip
# A ChatML-style template with a BOS token, a system turn and the generation prompt: what real chat models ship.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_SPECIALS = ["<s>", "<|im_start|>", "<|im_end|>"]


def build_model(path: Path, chat_template: str | None = None, max_position_embeddings: int = 8192,
                eos: bool = True) -> Path:  # fmt: skip
    """A random-weight byte-level MoE (std 0.5: greedy answers differ from prompt to prompt, so crosstalk between
    requests would show). With `chat_template`, tokenizer_config.json carries it and its special tokens. Without
    `eos` nothing ends an answer before its length limit (for tests that need a request to still be running)."""
    from longmoe.checkpoint import native, save
    from longmoe.model import ModelConfig, Transformer
    from longmoe.train.data import byte_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    model = Transformer(ModelConfig(**(CONFIG | {"max_position_embeddings": max_position_embeddings})))
    model.init_weights(std=0.5, seed=0)
    save(native(model), path)
    byte_tokenizer(path / "tokenizer.json")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 256} if eos else {}))
    if chat_template is not None:
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        tok.add_special_tokens(CHAT_SPECIALS)  # ids 257.. (the model's vocabulary has room up to 264)
        tok.save(str(path / "tokenizer.json"))
        config = {"chat_template": chat_template, "bos_token": "<s>", "eos_token": "<|im_end|>"}
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def wait_until(predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> object:
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


class ServerProcess:
    """`python -m longmoe.cli serve ... --port 0` in a subprocess; ready once its ready line is on stderr."""

    def __init__(self, model: Path, data_dir: Path, *args: str, name: str = "tiny", key: str | None = KEY,
                 timeout: float = 120.0):  # fmt: skip
        cmd = [sys.executable, "-m", "longmoe.cli", "serve", "--model", str(model), "--model-name", name,
               "--port", "0", "--data-dir", str(data_dir), *args]  # fmt: skip
        if key:
            cmd += ["--api-key", key]
        env = {k: v for k, v in os.environ.items() if k != "LONGMOE_API_KEY"}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout) or self.url is None:
            self.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines[-40:]))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if " ready at " in line:
                self.url = line.split(" ready at ")[1].split()[0]
                self._ready.set()
        self._ready.set()  # exited before getting ready

    @property
    def pid(self) -> int:
        return self.proc.pid

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return "".join(self.lines)


class ServerThread:
    """The app of an already loaded model in uvicorn, in a thread of this process, on a free loopback port."""

    def __init__(self, model, name: str, data_dir: Path, **options):
        import uvicorn

        from longmoe.serve import create_app

        self.app = create_app(model, name, data_dir=data_dir, **options)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 60, "the server thread to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics by name (labels joined in, e.g. 'longmoe_requests_total{...}')."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def sse_events(response: httpx.Response):
    """The JSON objects of a server-sent-event stream (`data: {...}` events)."""
    for line in response.iter_lines():
        if line.startswith("data:"):
            data = line[5:].strip()
            if data and data != "[DONE]":
                yield json.loads(data)
