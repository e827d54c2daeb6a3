"""Choosing the next token from logits: greedy, temperature, top-k, top-p, reproducible with a seed."""

from __future__ import annotations

import math

import torch


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """logits [V] -> token id. temperature 0 is greedy (argmax, first index on ties)."""
    if temperature <= 0:
        return int(logits.float().argmax())  # bf16 argmax is ~4x slower on CPU than converting first
    scores = logits.float() / temperature
    if top_k is not None and 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_scores, order = scores.sort(descending=True)
        probs = sorted_scores.softmax(-1)
        # drop tokens once the mass before them already reaches top_p (the best token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        scores[order[drop]] = float("-inf")
    probs = scores.softmax(-1).cpu()  # drawn on the CPU: the seeded generator is a CPU one, whatever the device
    return int(torch.multinomial(probs, 1, generator=generator))


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    """Raise TypeError / ValueError, naming the setting, for anything `sample` cannot use."""

    def number(name: str, x: object) -> float:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(x).__name__} {x!r}")
        if not math.isfinite(x):
            raise ValueError(f"{name} must be a finite number, got {x}")
        return float(x)

    def integer(name: str, x: object) -> int:
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} must be an integer, got {type(x).__name__} {x!r}")
        return x

    if number("temperature", temperature) < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and integer("top_k", top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < number("top_p", top_p) <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if integer("max_new_tokens", max_new_tokens) < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
