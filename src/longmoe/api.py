"""The public Python API: `m = longmoe.load(path)`; `m.generate(...)`, `m.stream(...)`, `m.count_tokens(...)`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import kernels
from .checkpoint import Checkpoint, CheckpointError
from .checkpoint import load as load_checkpoint
from .checkpoint import save as save_checkpoint
from .engine.engine import Engine, SamplingParams, Sequence, check_options
from .engine.planner import MemoryPlanError
from .media import MediaError
from .model import ModelConfig, Transformer
from .multimodal import Builder, MediaPart, MediaSpec, Prompt, decode_part, is_parts, media_memory, media_spec
from .sysinfo import available_memory, cpu_name, fmt_gib
from .tokenizer import Tokenizer


@dataclass
class Usage:
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence token or stop sequence) | "length" (max_new_tokens reached)
    usage: Usage
    prefill_seconds: float
    decode_seconds: float
    logprobs: list[float] | None = None  # of each generated token, when asked for


class Model:
    """A loaded model with its tokenizer and inference engine. Construct with `longmoe.load`."""

    def __init__(self, checkpoint: Checkpoint, tokenizer: Tokenizer | None, **engine_options: Any):
        self.checkpoint = checkpoint
        self.tokenizer = tokenizer
        eos = checkpoint.generation.get("eos_token_id")
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.engine_options = engine_options
        self._engine: Engine | None = None
        self._media: MediaSpec | None = None

    @property
    def config(self) -> ModelConfig:
        return self.checkpoint.config

    @property
    def module(self) -> Transformer:
        return self.checkpoint.model

    @property
    def engine(self) -> Engine:
        """The paged-KV engine, created on first use (its KV pool is sized then)."""
        if self._engine is None:
            self._engine = Engine(self.module, self.tokenizer, eos_ids=self.eos_ids, **self.engine_options)
        return self._engine

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise CheckpointError(
                f"{self.checkpoint.path} has no tokenizer.json; pass token ids (a list of ints) instead of text"
            )
        return self.tokenizer.encode(text)

    def count_tokens(self, prompt: str | list[Any], video_fps: float | None = None) -> int:
        """Prompt tokens of text, or of a list of parts (text and media, see `generate`); `token_counts` gives them
        per modality."""
        if isinstance(prompt, str):
            return len(self.encode(prompt))
        if is_parts(prompt):
            return sum(self.token_counts(prompt, video_fps).values())
        raise TypeError(f"count_tokens takes text (str) or a list of parts, got {type(prompt).__name__}")

    def token_counts(self, parts: str | list[Any], video_fps: float | None = None) -> dict[str, int]:
        """Prompt tokens per modality (text, image, video, audio); a media block's start/end markers count as text."""
        return self.prepare([parts] if isinstance(parts, str) else parts, video_fps).counts

    @property
    def media(self) -> MediaSpec:
        """Token ids and preprocessing settings for media; MediaError on a model that reads text only."""
        if self.checkpoint.encoders is None:
            raise MediaError(f"{self.checkpoint.path} reads text only (model_type "
                             f"{self.checkpoint.hub_config.get('model_type')!r}); media needs an omni model such as "
                             "Qwen3-Omni-MoE")  # fmt: skip
        if self._media is None:
            vocab = self.tokenizer.vocab if self.tokenizer is not None else None
            self._media = media_spec(Path(self.checkpoint.path), self.checkpoint.hub_config, vocab)
        return self._media

    def prepare(self, parts: list[Any], video_fps: float | None = None, special_tokens: bool = True) -> Prompt:
        """Parts -> token ids, media embeddings (encoders run here) and M-RoPE positions. Text is tokenized as given
        (no chat template; special tokens such as a BOS added at the start, as for a plain prompt, unless
        `special_tokens` is False); each media part becomes its placeholder block."""
        if not isinstance(parts, (list, tuple)) or not parts:
            raise TypeError("a multimodal prompt is a non-empty list of parts (str and media)")
        spec = self.media if any(not isinstance(p, str) for p in parts) else None
        b = Builder(spec, self.checkpoint.encoders, self.module.embed_tokens.weight.dtype)
        with torch.inference_mode():
            decoded = [p if isinstance(p, str) else decode_part(p, spec, video_fps, where=_where(p, i))
                       for i, p in enumerate(parts)]  # fmt: skip
            if spec is not None:
                self._check_media_memory(decoded, video_fps)
            for i, part in enumerate(decoded):
                if isinstance(part, str):
                    # special tokens (a BOS) only where a plain-text prompt would have them: at the start
                    add = special_tokens and i == 0
                    b.text(self.encode(part) if add else self.tokenizer.encode(part, add_special_tokens=False))
                else:
                    try:
                        b.media(part)
                    except MediaError as e:
                        raise MediaError(f"{_where(parts[i], i)}: {e}") from None
            return b.build()

    def media_memory(self, parts: list[MediaPart], video_fps: float | None = None) -> dict[str, int]:
        """Peak bytes that preparing these decoded parts takes (longmoe.multimodal.media_memory), by kind."""
        dtype = self.module.embed_tokens.weight.dtype
        plans = [media_memory(p, self.media, self.checkpoint.encoders, dtype, video_fps) for p in parts]
        return {
            "file": sum(p["file"] for p in plans),
            "decode": max((p["decode"] for p in plans), default=0),
            "encoder": max((p["encoder"] for p in plans), default=0),
            "embeddings": sum(p["embeddings"] for p in plans),
        }

    def _check_media_memory(self, decoded: list[Any], video_fps: float | None) -> None:
        need = sum(self.media_memory([p for p in decoded if isinstance(p, MediaPart)], video_fps).values())
        free = available_memory(str(self.module.embed_tokens.weight.device))
        if need > free:
            raise MemoryPlanError(f"the prompt's media need ~{fmt_gib(need)} to decode and encode, {fmt_gib(free)} "
                                  "is free; send shorter clips, a lower video fps, or free memory")  # fmt: skip

    def submit(self, prompt: str | list[int] | list[Any], video_fps: float | None = None, **params: Any) -> Sequence:
        """Queue a request on the engine (see SamplingParams for the options) and return its sequence."""
        media = None
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        elif is_parts(prompt):
            media = self.prepare(prompt, video_fps)
            ids = media.tokens
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)  # the engine checks they are in-vocabulary ints
        else:
            hint = " (decode bytes first, e.g. data.decode('utf-8'))" if isinstance(prompt, (bytes, bytearray)) else ""
            raise TypeError(f"a prompt is text (str) or token ids (list of int), got {type(prompt).__name__}{hint}")
        stop = params.get("stop")
        if isinstance(stop, str):
            params["stop"] = [stop]  # one stop string, not its characters
        unknown = sorted(set(params) - set(SamplingParams.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown generation option(s) {', '.join(unknown)}")
        return self.engine.submit(ids, SamplingParams(**params), media=media)

    def generate(
        self,
        prompt: str | list[int] | list[Any],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        logprobs: bool = False,
        video_fps: float | None = None,
    ) -> Generation:
        """Continue `prompt`: raw text (no chat template), token ids, or a list of parts -- text and media
        (`{"mime_type": "image/png", "data": bytes}`, a pathlib.Path, a PIL image; images, audio, video) for an omni
        model. temperature 0 is greedy decoding; `stop` sequences end generation and are cut from the text; videos
        are sampled at `video_fps` frames per second (default 2). Raises what made the request fail, if anything did."""
        seq = self.submit(
            prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            stop=stop or [], logprobs=logprobs, video_fps=video_fps,
        )  # fmt: skip
        self.engine.run(seq)
        seq.raise_error()
        return Generation(
            text=seq.text,
            token_ids=list(seq.output),
            finish_reason=seq.finish_reason or "length",
            usage=Usage(len(seq.prompt), len(seq.output), seq.num_cached),
            prefill_seconds=seq.timings.prefill_seconds,
            decode_seconds=seq.timings.decode_seconds,
            logprobs=list(seq.logprobs) if logprobs else None,
        )

    def stream(
        self,
        prompt: str | list[int] | list[Any],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        video_fps: float | None = None,
    ) -> TextStream:
        """Iterate over the generated text piece by piece as tokens arrive (never splitting a UTF-8 character,
        never showing text that a stop sequence later removes). `.sequence` has usage and timings afterwards;
        leaving the loop early cancels the request."""
        if self.tokenizer is None:
            raise CheckpointError(f"{self.checkpoint.path} has no tokenizer.json; streaming text needs one")
        seq = self.submit(
            prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            stop=stop or [], video_fps=video_fps,
        )  # fmt: skip
        return TextStream(self.engine, seq)

    def info(self) -> dict[str, Any]:
        c = self.config
        total, active = self.module.num_parameters()
        dtype = self.module.embed_tokens.weight.dtype
        dtype_name = str(dtype).removeprefix("torch.")
        return {
            "path": str(self.checkpoint.path),
            "model_type": self.checkpoint.hub_config.get("model_type"),
            "dtype": dtype_name,
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
            "device": str(self.module.embed_tokens.weight.device),
            "cpu": cpu_name(),
            "kernels": kernels.status() if dtype == torch.bfloat16 else f"PyTorch ops ({dtype_name} model; the CPU "
                       "kernels are for bf16)",  # fmt: skip
            "model_card": str(card) if (card := Path(self.checkpoint.path) / "README.md").exists() else None,
        }

    def save(self, out: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write the model back in the format it was loaded from (lossless)."""
        save_checkpoint(self.checkpoint, out, dtype)


class TextStream:
    def __init__(self, engine: Engine, sequence: Sequence):
        self.engine, self.sequence = engine, sequence

    def __iter__(self) -> Iterator[str]:
        seq, engine = self.sequence, self.engine
        try:
            while True:
                done = seq.finished
                piece = seq.take_text()
                if piece:
                    yield piece
                if done:
                    seq.raise_error()
                    return
                if engine.background:
                    seq.wait(0.05)
                else:
                    engine.step()
        finally:
            if not seq.finished:  # left early, or interrupted: end it and free its KV
                engine.abandon(seq)


def _where(part: Any, i: int) -> str:
    return part.get("where", f"part {i}") if isinstance(part, dict) else f"part {i}"


BUNDLED = Path(__file__).with_name("data") / "bundled"  # the model made by recipes/bundled, shipped in the package


def bundled_path() -> Path:
    """The directory of the bundled model (package data)."""
    if not (BUNDLED / "config.json").exists():
        raise CheckpointError(f"this install has no bundled model ({BUNDLED} is missing); pass a model directory")
    return BUNDLED


def load(
    path: str | Path | None = None, dtype: str | torch.dtype = "auto", device: str = "cpu", **engine_options: Any
) -> Model:
    """Load a model directory (transformers format: config.json, *.safetensors, tokenizer.json; or native longmoe);
    with no path, the bundled model (see its model card: longmoe.api.BUNDLED / "README.md").
    dtype: "auto" (the checkpoint's; float32 on a CPU without bf16/fp16 instructions), "float32", "bfloat16" or
    "float16". device: "cpu", "cuda", "cuda:1", ... engine_options go to `Engine` (kv_dtype="fp8", chunk_size,
    block_size, kv_memory, max_batch_tokens, max_seqs, max_context) and are checked here, before the weights are
    read."""
    check_options(**engine_options)
    if path is None:
        path = bundled_path()
    if not isinstance(path, (str, Path)):
        raise TypeError(f"load() takes a model directory path, got {type(path).__name__}")
    ckpt = load_checkpoint(path, dtype, device=device)
    tok_path = Path(path) / "tokenizer.json"
    tokenizer = Tokenizer(tok_path) if tok_path.exists() else None
    return Model(ckpt, tokenizer, **engine_options)
