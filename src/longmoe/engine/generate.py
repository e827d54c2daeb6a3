"""Single-sequence generation: prefill the prompt, then decode one token at a time against the KV cache."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..model import Transformer
from .kv_cache import DenseCache
from .sampling import sample


@dataclass
class Timings:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


@dataclass
class TokenStream:
    """Iterate for token ids; `finish_reason` ("stop" | "length") and `timings` are filled in as it runs."""

    tokens: Iterator[int]
    timings: Timings = field(default_factory=Timings)
    finish_reason: str = "length"

    def __iter__(self) -> Iterator[int]:
        return self.tokens


def generate_tokens(
    model: Transformer,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_ids: frozenset[int] = frozenset(),
) -> TokenStream:
    stream = TokenStream(iter(()))

    def run() -> Iterator[int]:
        device = model.embed_tokens.weight.device
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        cache = DenseCache()

        @torch.inference_mode()  # per call: a generator must not leave inference mode on while it is suspended
        def forward(ids: list[int], start: int) -> torch.Tensor:
            positions = torch.arange(start, start + len(ids), device=device)[None]
            return model(torch.tensor([ids], device=device), positions, cache=cache, last_only=True).logits[0, -1]

        n = len(prompt_ids)
        t0 = time.perf_counter()
        logits = forward(prompt_ids, 0)
        stream.timings.prefill_seconds = time.perf_counter() - t0
        for i in range(max_new_tokens):
            t0 = time.perf_counter()
            tok = sample(logits, temperature, top_k, top_p, generator)
            stream.timings.decode_seconds += time.perf_counter() - t0
            yield tok
            if tok in eos_ids:
                stream.finish_reason = "stop"
                return
            if i + 1 == max_new_tokens:
                return
            t0 = time.perf_counter()
            logits = forward([tok], n + i)
            stream.timings.decode_seconds += time.perf_counter() - t0

    stream.tokens = run()
    return stream
