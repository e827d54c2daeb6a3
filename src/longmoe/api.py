"""The public Python API: `m = longmoe.load(path)`; `m.generate(...)`, `m.stream(...)`, `m.count_tokens(...)`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, CheckpointError
from .checkpoint import load as load_checkpoint
from .checkpoint import save as save_checkpoint
from .engine.generate import TokenStream, generate_tokens
from .engine.sampling import validate_sampling
from .model import ModelConfig, Transformer
from .tokenizer import Tokenizer, incremental_text


@dataclass
class Usage:
    prompt_tokens: int
    generated_tokens: int


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence token) | "length" (max_new_tokens reached)
    usage: Usage
    prefill_seconds: float
    decode_seconds: float


class Model:
    """A loaded model with its tokenizer. Construct with `longmoe.load`."""

    def __init__(self, checkpoint: Checkpoint, tokenizer: Tokenizer | None):
        self.checkpoint = checkpoint
        self.tokenizer = tokenizer
        eos = checkpoint.generation.get("eos_token_id")
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))

    @property
    def config(self) -> ModelConfig:
        return self.checkpoint.config

    @property
    def module(self) -> Transformer:
        return self.checkpoint.model

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise CheckpointError(
                f"{self.checkpoint.path} has no tokenizer.json; pass token ids (a list of ints) instead of text"
            )
        return self.tokenizer.encode(text)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def _start(
        self, prompt: str | list[int], max_new_tokens, temperature, top_k, top_p, seed
    ) -> tuple[list, TokenStream]:
        validate_sampling(temperature, top_k, top_p, max_new_tokens)
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty (no tokens); give at least one token")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        stream = generate_tokens(
            self.module,
            ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_ids=self.eos_ids,
        )
        return ids, stream

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Generation:
        """Continue `prompt` (raw text, no chat template; or token ids). temperature 0 is greedy decoding."""
        ids, stream = self._start(prompt, max_new_tokens, temperature, top_k, top_p, seed)
        out = list(stream)
        text = self.tokenizer.decode(out) if self.tokenizer is not None else ""
        return Generation(
            text=text,
            token_ids=out,
            finish_reason=stream.finish_reason,
            usage=Usage(len(ids), len(out)),
            prefill_seconds=stream.timings.prefill_seconds,
            decode_seconds=stream.timings.decode_seconds,
        )

    def stream(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield the generated text piece by piece as tokens arrive (never splitting a UTF-8 character)."""
        if self.tokenizer is None:
            raise CheckpointError(f"{self.checkpoint.path} has no tokenizer.json; streaming text needs one")
        _, stream = self._start(prompt, max_new_tokens, temperature, top_k, top_p, seed)
        out: list[int] = []
        emitted = ""
        for tok in stream:
            out.append(tok)
            piece = incremental_text(self.tokenizer, out, emitted)
            if piece:
                emitted += piece
                yield piece
        rest = self.tokenizer.decode(out)[len(emitted) :]  # what was held back (e.g. an unfinished UTF-8 sequence)
        if rest:
            yield rest

    def info(self) -> dict[str, Any]:
        c = self.config
        total, active = self.module.num_parameters()
        dtype = self.module.embed_tokens.weight.dtype
        return {
            "path": str(self.checkpoint.path),
            "model_type": self.checkpoint.hub_config.get("model_type"),
            "dtype": str(dtype).removeprefix("torch."),
            "parameters_total": total,
            "parameters_active_per_token": active,
            "layers": c.num_layers,
            "moe_layers": sum(c.moe_layers),
            "experts": c.num_experts,
            "experts_per_token": c.num_experts_per_tok if c.num_experts else 0,
            "shared_experts": bool(c.shared_expert_intermediate_size),
            "attention": "mla" if c.is_mla else f"gqa {c.num_heads}q/{c.num_kv_heads}kv",
            "layer_types": {t: c.layer_types.count(t) for t in sorted(set(c.layer_types))},
            "kv_bytes_per_token": c.kv_bytes_per_token(dtype.itemsize),
            "max_context": c.max_position_embeddings,
            "vocab_size": c.vocab_size,
        }

    def save(self, out: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write the model back in the format it was loaded from (lossless)."""
        save_checkpoint(self.checkpoint, out, dtype)


def load(path: str | Path, dtype: str | torch.dtype = "auto") -> Model:
    """Load a model directory (transformers format: config.json, *.safetensors, tokenizer.json; or native longmoe).
    dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16"."""
    ckpt = load_checkpoint(path, dtype)
    tok_path = Path(path) / "tokenizer.json"
    tokenizer = Tokenizer(tok_path) if tok_path.exists() else None
    return Model(ckpt, tokenizer)
