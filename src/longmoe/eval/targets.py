"""What an evaluation talks to: a local model directory (through the engine), or an HTTP endpoint speaking the
Gemini API (generateContent / countTokens) or the OpenAI chat API. Remote calls retry transient failures with
exponential backoff and jitter; a call that still fails raises TargetError, which the evaluations record as an
error (grey), never as a miss."""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

TRANSIENT = {408, 429, 500, 502, 503, 504}


class TargetError(RuntimeError):
    """A call that failed for good (after retries, or a non-transient status); not a wrong answer."""


class Target(Protocol):
    name: str
    concurrency: int

    def count_tokens(self, text: str) -> int: ...

    def generate(self, prompt: str, max_tokens: int) -> str: ...


class LocalTarget:
    """A model directory run in this process by longmoe's engine (greedy decoding)."""

    concurrency = 1

    def __init__(self, path: str | Path | None, **engine_options):
        import longmoe

        if path is None:
            raise TargetError("no --model given (and no bundled model is installed yet); pass --model DIR")
        self.model = longmoe.load(path, **engine_options)
        if self.model.tokenizer is None:
            raise TargetError(f"{path} has no tokenizer.json; text evaluations need one")
        self.name = str(path)
        self._lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        return self.model.count_tokens(text)

    def generate(self, prompt: str, max_tokens: int) -> str:
        with self._lock:
            return self.model.generate(prompt, max_new_tokens=max_tokens).text


class HttpTarget:
    """Common HTTP plumbing: JSON POST with retries on transient errors."""

    def __init__(self, url: str, api_key: str | None, model_name: str, *, concurrency: int = 4, retries: int = 5,
                 timeout: float = 600.0, backoff: float = 1.0):  # fmt: skip
        self.url, self.api_key, self.model_name = url.rstrip("/"), api_key, model_name
        self.concurrency, self.retries, self.timeout, self.backoff = concurrency, retries, timeout, backoff
        self.name = f"{self.url} ({model_name})"
        self.calls = 0  # HTTP requests sent, retries included

    def headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json"}

    def post(self, url: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=data, headers=self.headers(), method="POST")
            self.calls += 1
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
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
    """POST {url}/v1beta/models/{m}:generateContent and :countTokens, key in x-goog-api-key."""

    def headers(self) -> dict[str, str]:
        h = super().headers()
        if self.api_key:
            h["x-goog-api-key"] = self.api_key
        return h

    def _model_url(self, method: str) -> str:
        name = self.model_name if self.model_name.startswith("models/") else f"models/{self.model_name}"
        return f"{self.url}/v1beta/{name}:{method}"

    def count_tokens(self, text: str) -> int:
        out = self.post(self._model_url("countTokens"), {"contents": [{"role": "user", "parts": [{"text": text}]}]})
        if "totalTokens" not in out:
            raise TargetError(f"countTokens answered without totalTokens: {str(out)[:200]}")
        return int(out["totalTokens"])

    def generate(self, prompt: str, max_tokens: int) -> str:
        body = {
            "contents": [{"role": "user", "parts": [{"text": prompt}]}],
            "generationConfig": {"temperature": 0.0, "maxOutputTokens": max_tokens},
        }
        out = self.post(self._model_url("generateContent"), body)
        try:
            parts = out["candidates"][0]["content"]["parts"]
        except (KeyError, IndexError, TypeError):
            reason = (out.get("promptFeedback") or {}).get("blockReason") or str(out)[:200]
            raise TargetError(f"generateContent returned no text ({reason})") from None
        return "".join(p.get("text", "") for p in parts)


class OpenAITarget(HttpTarget):
    """POST {url}/v1/chat/completions. The OpenAI API has no token counting endpoint, so context sizes come from a
    local tokenizer.json (--tokenizer) for the target model."""

    def __init__(self, url: str, api_key: str | None, model_name: str, tokenizer: str | None, **kw):
        super().__init__(url, api_key, model_name, **kw)
        if not tokenizer:
            raise TargetError("OpenAI-API targets need --tokenizer FILE (the target's tokenizer.json) to size contexts")
        from ..tokenizer import Tokenizer

        self.tokenizer = Tokenizer(tokenizer)

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
            return out["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise TargetError(f"chat/completions returned no message: {str(out)[:200]}") from None
