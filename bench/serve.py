"""`longmoe serve` under load, measured in one run against one server process:

1. context caching: time to first token of a question after a PREFIX-token document, with the document sent in
   full each time (each request's document differs in its first line, so the automatic prefix cache cannot help:
   a cold prefill) vs. with the document in a cachedContent (its KV pinned: only the question is prefilled);
2. continuous batching: tokens/s of 1 client vs CLIENTS concurrent clients (short prompts, streamed answers), with
   per-request latency and time to first token, p50 / p99.

Model: --model DIR; else the bundled model if this install has one; else a random-weight tiny MoE built in a
temporary directory (fast, so the numbers show the server's overheads more than the model's). Clients speak HTTP
(httpx, server-sent events) from this process; the server is a subprocess (`longmoe serve --port 0`).

    .venv/bin/python bench/serve.py                                # 32K-token prefix, 8 vs 1 clients
    .venv/bin/python bench/serve.py --prefix 4096 --clients 2 --requests 2 --json    # a quick check
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

KEY = "bench"
SENTENCES = [
    "The special magic number of {city} is {n}.",
    "Travellers to {city} report that the river freezes in {n} places.",
    "In {city} the library holds {n} volumes about mixture-of-experts models.",
    "A census counted {n} bicycles in {city} last spring.",
]
CITIES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Accra", "Lima", "Perth", "Riga", "Tunis", "Osaka"]


def tiny_model(path: Path, context: int) -> Path:
    import json as _json

    from longmoe.checkpoint import native, save
    from longmoe.model import ModelConfig, Transformer
    from longmoe.train.data import byte_tokenizer

    cfg = ModelConfig(vocab_size=264, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=128, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      max_position_embeddings=context)  # fmt: skip
    model = Transformer(cfg)
    model.init_weights(std=0.5, seed=0)
    save(native(model), path)
    byte_tokenizer(path / "tokenizer.json")
    (path / "generation_config.json").write_text(_json.dumps({"eos_token_id": 256}))
    return path


def document(tokenizer, tokens: int, first_line: str = "") -> str:
    """Text of exactly `tokens` tokens (by the model's tokenizer), made of varied sentences."""
    parts, i = [first_line], 0
    while len(tokenizer.encode("".join(parts))) < tokens:
        for _ in range(64):
            parts.append(SENTENCES[i % 4].format(city=CITIES[i * 7 % 10], n=(i * 7919) % 100000) + " ")
            i += 1
    text = "".join(parts)
    lo, hi = 0, len(text)  # the longest prefix of the text within the token count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(text[:mid])) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


class Server:
    def __init__(self, model: Path, data: Path, max_tokens: int):
        cmd = [sys.executable, "-m", "longmoe.cli", "serve", "--model", str(model), "--model-name", "m", "--port", "0",
               "--api-key", KEY, "--data-dir", str(data), "--max-queue", "256", "--log-level", "warning"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.url, ready, self.lines = None, threading.Event(), []

        def read() -> None:
            for line in self.proc.stderr:
                self.lines.append(line)
                if " ready at " in line:
                    self.url = line.split(" ready at ")[1].split()[0]
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(600)
        if self.url is None:
            raise SystemExit("the server did not start:\n" + "".join(self.lines[-30:]))
        self.http = httpx.Client(base_url=self.url, headers={"x-goog-api-key": KEY}, timeout=3600)

    def stream(self, contents: list, max_tokens: int, cache: str | None = None) -> dict:
        """One streamed generateContent: time to first token, total latency, tokens, cached tokens."""
        body = {"contents": contents, "generationConfig": {"maxOutputTokens": max_tokens, "temperature": 0}}
        if cache:
            body["cachedContent"] = cache
        t0 = time.perf_counter()
        ttft, usage = None, {}
        with self.http.stream("POST", "/v1beta/models/m:streamGenerateContent?alt=sse", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                parts = chunk["candidates"][0]["content"]["parts"]
                if ttft is None and any(p.get("text") for p in parts):
                    ttft = time.perf_counter() - t0
                usage = chunk.get("usageMetadata", usage)
        total = time.perf_counter() - t0
        return {"ttft": ttft if ttft is not None else total, "latency": total,
                "tokens": usage.get("candidatesTokenCount", 0), "cached": usage.get("cachedContentTokenCount", 0),
                "prompt": usage.get("promptTokenCount", 0)}  # fmt: skip

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def user(text: str) -> list:
    return [{"role": "user", "parts": [{"text": text}]}]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def caching(srv: Server, tokenizer, prefix: int, requests: int) -> dict:
    questions = [f"Question {i}: what is the special magic number of {CITIES[i % 10]}?" for i in range(requests)]
    cold = []
    for i, q in enumerate(questions):  # a different first line each time: no prefix-cache reuse, a full prefill
        doc = document(tokenizer, prefix, f"Document {i} of {requests}.\n")
        cold.append(srv.stream([{"role": "user", "parts": [{"text": doc}, {"text": "\n\n" + q}]}], 8))
    doc = document(tokenizer, prefix, "Document cached.\n")
    t0 = time.perf_counter()
    cache = srv.http.post("/v1beta/cachedContents", json={"model": "models/m", "contents": user(doc), "ttl": "3600s"})
    cache.raise_for_status()
    create = time.perf_counter() - t0
    name = cache.json()["name"]
    hot = [srv.stream(user(q), 8, cache=name) for q in questions]
    srv.http.delete(f"/v1beta/{name}")
    cold_ttft, hot_ttft = statistics.median(r["ttft"] for r in cold), statistics.median(r["ttft"] for r in hot)
    return {"prefix_tokens": cold[0]["prompt"], "requests": requests, "cache_create_s": create,
            "ttft_uncached_s": cold_ttft, "ttft_cached_s": hot_ttft, "speedup": cold_ttft / hot_ttft,
            "cached_tokens": hot[0]["cached"]}  # fmt: skip


def batching(srv: Server, clients: int, requests: int, max_tokens: int) -> dict:
    def client(c: int) -> list[dict]:
        return [srv.stream(user(f"Client {c}, request {r}: tell me a long story about {CITIES[(c + r) % 10]}."),
                           max_tokens) for r in range(requests)]  # fmt: skip

    out = {}
    for n in (1, clients):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            results = [r for rs in pool.map(client, range(n)) for r in rs]
        wall = time.perf_counter() - t0
        tokens = sum(r["tokens"] for r in results)
        out[n] = {"clients": n, "requests": len(results), "tokens": tokens, "tokens_per_s": tokens / wall,
                  "latency_p50_s": pct([r["latency"] for r in results], 50),
                  "latency_p99_s": pct([r["latency"] for r in results], 99),
                  "ttft_p50_s": pct([r["ttft"] for r in results], 50),
                  "ttft_p99_s": pct([r["ttft"] for r in results], 99)}  # fmt: skip
    return {"runs": list(out.values()), "throughput_ratio": out[clients]["tokens_per_s"] / out[1]["tokens_per_s"]}


def table(summary: dict) -> str:
    c, b = summary["caching"], summary["batching"]
    lines = [
        f"model: {summary['model']}",
        "",
        f"context caching, {c['prefix_tokens']:,}-token prompt, {c['requests']} questions (median time to first token)",
        f"  without cache   {c['ttft_uncached_s'] * 1000:10.1f} ms",
        f"  with cache      {c['ttft_cached_s'] * 1000:10.1f} ms   ({c['cached_tokens']:,} tokens from the cache; "
        f"creating it took {c['cache_create_s']:.2f} s)",
        f"  speedup         {c['speedup']:10.1f}x",
        "",
        f"{'clients':>8} {'requests':>9} {'tokens':>7} {'tokens/s':>9} {'lat p50':>9} {'lat p99':>9} {'ttft p50':>9} "
        f"{'ttft p99':>9}",
    ]
    for r in b["runs"]:
        lines.append(f"{r['clients']:>8} {r['requests']:>9} {r['tokens']:>7} {r['tokens_per_s']:>9.1f} "
                     f"{r['latency_p50_s']:>8.2f}s {r['latency_p99_s']:>8.2f}s {r['ttft_p50_s'] * 1000:>7.0f}ms "
                     f"{r['ttft_p99_s'] * 1000:>7.0f}ms")  # fmt: skip
    lines.append(f"throughput {b['runs'][-1]['clients']} clients / 1 client: {b['throughput_ratio']:.2f}x")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", metavar="DIR", help="model directory (default: the bundled model, else a tiny one)")
    ap.add_argument("--prefix", type=int, default=32768, metavar="N", help="cached document tokens (32768)")
    ap.add_argument("--clients", type=int, default=8, metavar="N", help="concurrent clients (8)")
    ap.add_argument("--requests", type=int, default=4, metavar="N", help="requests per client, and questions (4)")
    ap.add_argument("--max-tokens", type=int, default=64, metavar="N", help="tokens per answer (64)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout (the table on stderr)")
    args = ap.parse_args()
    from longmoe.api import BUNDLED
    from longmoe.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else BUNDLED
        if not (model / "config.json").exists():
            context = 1 << max(16, math.ceil(math.log2(args.prefix + 1024)))
            model = tiny_model(Path(tmp) / "tiny", context)
            name = f"random tiny MoE (hidden 64, 2 layers, 4 experts, context {context:,})"
        else:
            name = str(model)
        tokenizer = Tokenizer(model / "tokenizer.json")
        srv = Server(model, Path(tmp) / "data", args.max_tokens)
        try:
            srv.stream(user("warm up"), 4)
            summary = {"model": name, "caching": caching(srv, tokenizer, args.prefix, args.requests),
                       "batching": batching(srv, args.clients, args.requests, args.max_tokens)}  # fmt: skip
        finally:
            srv.close()
    text = table(summary)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(summary))
    else:
        print(text)


if __name__ == "__main__":
    main()
