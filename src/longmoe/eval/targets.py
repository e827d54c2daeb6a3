"""What an evaluation talks to: a local model directory (through the engine), or an HTTP endpoint speaking the
Gemini API (generateContent / countTokens) or the OpenAI chat API. Remote calls retry transient failures with
exponential backoff and jitter; a call that still fails raises TargetError, which the evaluations record as an
error (grey), never as a miss."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from ..engine.engine import SamplingParams
from ..errors import LongmoeError

TRANSIENT = {408, 429, 500, 502, 503, 504}


class TargetError(LongmoeError, RuntimeError):
    """A call that failed for good (after retries, or a non-transient status); not a wrong answer."""


class Target(Protocol):
    name: str
    reads_media: bool  # takes prompts that are lists of parts (text and media dicts), not only text
    identity: dict  # what results are credited to: a model directory and its content, or an endpoint and model
    concurrency: int

    def count_tokens(self, text: str) -> int: ...

    def generate(self, prompt: str, max_tokens: int) -> str: ...

    def check_length(self, tokens: int) -> None: ...


def model_fingerprint(path: Path) -> str:
    """A content hash of a model directory: config, tokenizer, and every weight file's header, size and first and
    last MiB (hashing many GB of weights for every evaluation would take minutes; this catches any retraining)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name in ("config.json", "tokenizer.json", "generation_config.json"):
            h.update(f.name.encode() + f.read_bytes())
        elif f.suffix == ".safetensors":
            size = f.stat().st_size
            with open(f, "rb") as fh:
                h.update(f"{f.name}:{size}".encode() + fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read())
    return h.hexdigest()[:16]


class LocalTarget:
    """A model directory run in this process by longmoe's engine (greedy decoding)."""

    concurrency = 1

    def __init__(self, path: str | Path | None, **engine_options):
        import longmoe

        from ..api import bundled_path

        path = path or bundled_path()  # no --model: the bundled model
        self.model = longmoe.load(path, **engine_options)
        if self.model.tokenizer is None:
            raise TargetError(f"{path} has no tokenizer.json; text evaluations need one")
        self.name = str(path)
        self.identity = {"kind": "local", "path": str(Path(path).resolve()), "content": model_fingerprint(Path(path))}
        self.reads_media = self.model.checkpoint.encoders is not None
        self._lock = threading.Lock()
        self._prepared: tuple[int, Any] | None = None  # (id of a parts list, its Prompt): encoded once per cell

    def _prompt(self, prompt: str | list[Any]) -> Any:
        if isinstance(prompt, str):
            return prompt
        if self._prepared is None or self._prepared[0] != id(prompt):
            self._prepared = (id(prompt), self.model.prepare(prompt))
        return self._prepared[1]

    def count_tokens(self, text: str | list[Any]) -> int:
        with self._lock:
            p = self._prompt(text)
            return self.model.count_tokens(p) if isinstance(p, str) else len(p.tokens)

    def generate(self, prompt: str | list[Any], max_tokens: int) -> str:
        with self._lock:
            p = self._prompt(prompt)
            if isinstance(p, str):
                return self.model.generate(p, max_new_tokens=max_tokens).text
            seq = self.model.engine.submit(p.tokens, SamplingParams(max_new_tokens=max_tokens), media=p)
            self.model.engine.run(seq)
            seq.raise_error()
            return seq.text

    def check_length(self, tokens: int) -> None:
        """Refuse, before any work, lengths (prompt + answer) beyond what the model accepts."""
        limit = self.model.engine.max_context
        if tokens > limit:
            raise TargetError(
                f"--lengths up to {tokens:,} tokens (with the answer) exceed this model's context of {limit:,} tokens; "
                "drop the longer lengths"
            )


class HttpTarget:
    """Common HTTP plumbing: JSON POST with retries on transient errors."""

    def __init__(self, url: str, api_key: str | None, model_name: str, *, concurrency: int = 4, retries: int = 5,
                 timeout: float = 600.0, backoff: float = 1.0):  # fmt: skip
        self.url, self.api_key, self.model_name = url.rstrip("/"), api_key, model_name
        if concurrency < 1 or retries < 0:
            raise TargetError(f"--concurrency must be >= 1 and --retries >= 0, got {concurrency} and {retries}")
        self.concurrency, self.retries, self.timeout, self.backoff = concurrency, retries, timeout, backoff
        self.name = f"{self.url} ({model_name})"
        self.reads_media = False
        self.identity = {"kind": type(self).__name__, "url": self.url, "model": model_name}
        self.calls = 0  # HTTP requests sent, retries included

    def check_length(self, tokens: int) -> None:
        pass  # an endpoint says itself what it cannot take (an error cell)

    def headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json"}

    def post(self, url: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=data, headers=self.headers(), method="POST")
            self.calls += 1
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    out = json.loads(resp.read())
                if not isinstance(out, dict):
                    raise TargetError(f"{url} answered with JSON that is not an object: {str(out)[:100]}")
                return out
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                if e.code not in TRANSIENT or attempt == self.retries:
                    raise TargetError(f"HTTP {e.code} from {url}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.retries:
                    raise TargetError(f"cannot reach {url}: {e}") from None
            except json.JSONDecodeError as e:
                raise TargetError(f"{url} answered with invalid JSON: {e}") from None
            time.sleep(self.backoff * 2**attempt * (0.5 + random.random() / 2))
        raise AssertionError("unreachable")


class GeminiTarget(HttpTarget):
    """POST {url}/v1beta/models/{m}:generateContent and :countTokens, key in x-goog-api-key; media as inlineData."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.reads_media = True

    @staticmethod
    def parts(prompt: str | list[Any]) -> list[dict[str, Any]]:
        if isinstance(prompt, str):
            return [{"text": prompt}]
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append({"text": p})
            else:
                part: dict[str, Any] = {"inlineData": {"mimeType": p["mime_type"],
                                                       "data": base64.b64encode(p["data"]).decode()}}  # fmt: skip
                if p.get("fps"):
                    part["videoMetadata"] = {"fps": p["fps"]}
                out.append(part)
        return out

    def headers(self) -> dict[str, str]:
        h = super().headers()
        if self.api_key:
            h["x-goog-api-key"] = self.api_key
        return h

    def _model_url(self, method: str) -> str:
        name = self.model_name if self.model_name.startswith("models/") else f"models/{self.model_name}"
        return f"{self.url}/v1beta/{name}:{method}"

    def count_tokens(self, text: str) -> int:
        out = self.post(self._model_url("countTokens"), {"contents": [{"role": "user", "parts": self.parts(text)}]})
        n = out.get("totalTokens")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TargetError(f"countTokens answered without a token count (totalTokens = {n!r}): {str(out)[:200]}")
        return n

    def generate(self, prompt: str, max_tokens: int) -> str:
        body = {
            "contents": [{"role": "user", "parts": self.parts(prompt)}],
            "generationConfig": {"temperature": 0.0, "maxOutputTokens": max_tokens},
        }
        out = self.post(self._model_url("generateContent"), body)
        try:
            parts = out["candidates"][0]["content"]["parts"]
            texts = [p["text"] for p in parts if "text" in p]
        except (KeyError, IndexError, TypeError):
            feedback = out.get("promptFeedback")
            reason = (feedback.get("blockReason") if isinstance(feedback, dict) else None) or str(out)[:200]
            raise TargetError(f"generateContent returned no text ({reason})") from None
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TargetError(f"generateContent returned no text (parts: {str(parts)[:200]})")
        return "".join(texts)


class OpenAITarget(HttpTarget):
    """POST {url}/v1/chat/completions. The OpenAI API has no token counting endpoint, so context sizes come from a
    local tokenizer.json (--tokenizer) for the target model."""

    def __init__(self, url: str, api_key: str | None, model_name: str, tokenizer: str | None, **kw):
        super().__init__(url, api_key, model_name, **kw)
        if not tokenizer:
            raise TargetError("OpenAI-API targets need --tokenizer FILE (the target's tokenizer.json) to size contexts")
        from ..tokenizer import Tokenizer

        self.tokenizer = Tokenizer(tokenizer)
        self.identity["tokenizer"] = hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()[:16]

    def headers(self) -> dict[str, str]:
        h = super().headers()
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def generate(self, prompt: str, max_tokens: int) -> str:
        base = self.url if self.url.endswith("/v1") else f"{self.url}/v1"
        body = {"model": self.model_name, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": max_tokens}  # fmt: skip
        out = self.post(f"{base}/chat/completions", body)
        try:
            content = out["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise TargetError(f"chat/completions returned no message: {str(out)[:200]}") from None
        if not isinstance(content, str):
            raise TargetError(f"chat/completions returned no text (content = {content!r})")
        return content
