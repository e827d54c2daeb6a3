"""The inference engine: continuous batching over a paged KV cache with chunked prefill and prefix caching.

Each `step()`: every sequence that is decoding advances one token in one batched forward; then prompts waiting to be
prefilled are processed in chunks that fill the rest of the step's token budget (decode first keeps streaming
latency flat while a million-token prompt is being read). Admission reserves a sequence's worst-case KV blocks, so a
running sequence never runs out of memory; a request that could never fit fails at submit with the planner's numbers.

Thread model: one thread drives `step()` (the caller's, or `start()`'s background thread); `submit`, `cancel` and
the pin functions are safe to call from any thread.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import count

import torch

from ..errors import LongmoeError
from ..model import Transformer
from ..model.config import ModelConfig
from ..multimodal import Prompt
from ..sysinfo import available_memory, fmt_gib
from ..tokenizer import Detokenizer, Tokenizer
from .fused_decode import FusedDecode
from .fused_decode import unsupported as fused_unsupported
from .kv_cache import OutOfBlocks, PagedKVCache, Row, block_hashes
from .planner import MemoryPlan, MemoryPlanError, activation_bytes, blocks_needed, bytes_per_token, kv_bytes
from .sampling import sample, validate_sampling

try:
    _LIBC = ctypes.CDLL(None)  # the C library this process already uses (find_library would spawn processes)
except OSError:  # pragma: no cover
    _LIBC = None


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS. glibc keeps the large per-chunk activation buffers of a long prefill
    in its heap after they are freed: RSS after a 32K-token prefill was 2.8 GiB without this, 1.7 GiB with it,
    for ~1 ms per prefill step."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class ContextLengthError(LongmoeError, ValueError):
    """A request longer than the model's context; the message has both lengths and the way out."""


def check_options(**options) -> None:
    """Validate engine options (the keyword arguments of `Engine`, which `longmoe.load` passes through) before any
    work, naming the option: an unknown name, a wrong type or an impossible value."""
    known = {"kv_dtype", "block_size", "chunk_size", "max_batch_tokens", "kv_memory", "max_seqs", "max_context"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    kv = options.get("kv_dtype", "auto")
    if kv not in ("auto", "fp8"):
        raise ValueError(f"kv_dtype {kv!r} is not one of auto, fp8")
    for name, v in options.items():
        if name == "kv_dtype" or (v is None and name in ("max_batch_tokens", "kv_memory", "max_context")):
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"engine option {name} must be an integer, got {v!r}")
        if v < 1:
            raise ValueError(f"engine option {name} must be >= 1, got {v}")


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop sequences (text); the output is cut before them
    logprobs: bool = False  # log-probability of each generated token
    prompt_logprobs: bool = False  # log-probability of each prompt token given the ones before (scoring)
    ignore_eos: bool = False

    def validate(self) -> None:
        """TypeError / ValueError naming the setting; called by `Engine.submit` before anything is queued."""
        validate_sampling(self.temperature, self.top_k, self.top_p, self.max_new_tokens)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an integer, got {type(self.seed).__name__} {self.seed!r}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise TypeError(f"stop must be a list of strings, got {self.stop!r}")
        for name in ("logprobs", "prompt_logprobs", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")


@dataclass
class Timings:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


class Sequence:
    """One request as the engine sees it. Read `output`, `text`, `finish_reason` once `finished` is set."""

    def __init__(
        self,
        seq_id: int,
        prompt: list[int],
        params: SamplingParams,
        detok: Detokenizer | None,
        media: Prompt | None = None,
    ):
        self.id, self.prompt, self.params, self.detok = seq_id, prompt, params, detok
        self.media = media if media is not None and media.has_media else None  # embeddings, M-RoPE positions
        self.tokens = list(prompt)  # prompt + generated
        self.output: list[int] = []
        self.logprobs: list[float] = []
        self.prompt_logprobs: list[float] = []  # for prompt tokens 1..n-1 (token 0 has no context)
        self.num_computed = 0  # tokens whose KV is cached
        self.num_cached = 0  # of those, how many came from the prefix cache
        self.tables: dict[str, list[int]] = {}
        self.hashes: list[bytes] = []  # content hash of every full block computed so far
        self.committed = 0  # blocks already offered to the prefix cache
        self.released: dict[str, int] = {}  # local kinds: blocks before this index are released
        self.reserved: dict[str, int] = {}  # blocks still reserved but not yet allocated, per kind
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
        self.error: BaseException | None = None  # why the request failed (finish_reason "error")
        self.timings = Timings()
        self.cancelled = False
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._pin: tuple[str, float] | None = None  # (name, ttl) when this prefill creates a pinned prefix

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def hash_tokens(self, lo: int, hi: int) -> list[int]:
        """Tokens [lo, hi) as the prefix cache hashes them: media placeholders stand for their content."""
        if self.media is None:
            return self.tokens[lo:hi]
        n = len(self.prompt)
        return self.media.hash_ids[lo : min(hi, n)] + self.tokens[max(lo, n) : hi]

    @property
    def text(self) -> str:
        return self.detok.text if self.detok else ""

    def take_text(self) -> str:
        """New text since the last call (stop-sequence-safe); all of the rest once finished."""
        with self._lock:
            return self.detok.take(final=self.finished) if self.detok else ""

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def raise_error(self) -> None:
        """Re-raise the exception that ended this request, if one did."""
        if self.error is not None:
            raise self.error


@dataclass
class Pin:
    blocks: dict[str, list[int]]
    tokens: list[int]
    expires: float


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        *,
        eos_ids: frozenset[int] = frozenset(),
        kv_dtype: str = "auto",
        block_size: int = 256,
        chunk_size: int = 2048,
        max_batch_tokens: int | None = None,
        kv_memory: int | None = None,
        max_seqs: int = 16,
        max_context: int | None = None,
    ):
        check_options(kv_dtype=kv_dtype, block_size=block_size, chunk_size=chunk_size,
                      max_batch_tokens=max_batch_tokens, kv_memory=kv_memory, max_seqs=max_seqs,
                      max_context=max_context)  # fmt: skip
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.config: ModelConfig = model.config
        self.kv_dtype, self.block_size, self.chunk_size = kv_dtype, block_size, chunk_size
        self.max_batch_tokens = max_batch_tokens or chunk_size
        # Longest prompt + generation accepted: the model's trained context unless the caller opts into more
        # (e.g. with RoPE scaling, or a NoPE global layer that has no position limit).
        self.max_context = max_context or self.config.max_position_embeddings
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype

        # Local (sliding / chunked) layers get fixed pools: a window per possible sequence. Full layers get the rest
        # of the budget: what is free now minus a chunk's working memory (weights are already loaded or mapped), by
        # default no more than two sequences at the model's full context need.
        per_layer_token = bytes_per_token(self.config, kv_dtype, self.dtype)
        kinds = sorted(set(self.config.layer_types))
        layers = {kind: self.config.layer_types.count(kind) for kind in kinds}
        num_blocks: dict[str, int] = {}
        for kind in kinds:
            if kind != "full":
                num_blocks[kind] = max_seqs * blocks_needed(self.config, kind, 1 << 62, chunk_size, block_size)
        local_bytes = sum(n * block_size * per_layer_token * layers[k] for k, n in num_blocks.items())
        self.local_pool_bytes = local_bytes
        full_block = block_size * per_layer_token * layers.get("full", 0)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        free = available_memory(str(self.device)) - (weights if self.device.type == "cpu" else 0)
        if kv_memory is None:
            two_full = 2 * full_block * -(-self.config.max_position_embeddings // block_size)
            kv_memory = min(
                int(0.85 * free) - activation_bytes(self.config, chunk_size, self.dtype), local_bytes + two_full
            )
        self.kv_budget = kv_memory
        if "full" in kinds:
            num_blocks["full"] = max(0, (self.kv_budget - local_bytes) // full_block)
        if any(n <= 0 for n in num_blocks.values()) or self.kv_budget < local_bytes:
            raise MemoryPlanError(
                f"no memory left for a KV cache: budget {fmt_gib(max(self.kv_budget, 0))}, local-layer windows need "
                f"{fmt_gib(local_bytes)}, {fmt_gib(max(free, 0))} free after the weights; free memory or lower max_seqs"
            )
        self.cache = PagedKVCache(self.config, num_blocks, block_size, self.dtype, kv_dtype, self.device)
        # a lone decoding sequence runs one C call per layer when the model is of the kind that kernel implements
        self.fused_decode = FusedDecode(model, self.cache) if fused_unsupported(model, self.cache) is None else None
        self.capacity_tokens = num_blocks.get("full", 0) * block_size if "full" in kinds else None

        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.pins: dict[str, Pin] = {}
        self._ids = count()
        self._lock = threading.RLock()  # held for a whole step: pools, tables, pins
        self._inbox: deque[Sequence] = deque()  # submissions from any thread, drained at the start of a step
        self._wake = threading.Condition()  # guards the inbox; wakes the background loop
        self._thread: threading.Thread | None = None
        self._stop = False

    # ------------------------------------------------------------------------------------------------------------
    # requests

    def submit(
        self, prompt: list[int], params: SamplingParams | None = None, media: Prompt | None = None
    ) -> Sequence:
        """Queue a request. Fails at once, before anything is queued, on a bad prompt or setting (TypeError /
        ValueError), a prompt beyond the model's context (ContextLengthError) or one that could never fit in the KV
        cache (MemoryPlanError). `media` (from longmoe.multimodal) carries the embeddings and M-RoPE positions of a
        prompt with images, audio or video; `prompt` is then `media.tokens`."""
        params = params or SamplingParams()
        params.validate()
        prompt = self._check_prompt(prompt)
        if media is not None and (media.tokens != prompt or not self.config.mrope_section and media.has_media):
            raise ValueError("media must come from this prompt's longmoe.multimodal.Prompt, for an M-RoPE model")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop sequences need a tokenizer")
        self.check_fits(len(prompt) + params.max_new_tokens, new=params.max_new_tokens)
        detok = Detokenizer(self.tokenizer, params.stop) if self.tokenizer else None
        return self._enqueue(Sequence(next(self._ids), prompt, params, detok, media))

    def _check_prompt(self, prompt: list[int]) -> list[int]:
        if not isinstance(prompt, (list, tuple)):
            raise TypeError(f"a prompt is a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("the prompt is empty (no tokens); give at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = next(t for t in prompt if not isinstance(t, int) or isinstance(t, bool))
            raise TypeError(f"token ids must be integers, got {type(bad).__name__} {bad!r}")
        V = self.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {V})")
        return list(prompt)

    def _enqueue(self, seq: Sequence) -> Sequence:
        with self._wake:
            self._inbox.append(seq)
            self._wake.notify()
        return seq

    def check_fits(self, tokens: int, new: int = 0) -> None:
        """Refuse, with the numbers, a sequence of `tokens` (prompt + `new` tokens to generate) that is longer than
        the model's context or whose KV cache cannot fit."""
        if tokens > self.max_context:
            prompt = tokens - new
            what = f"the prompt is {prompt:,} tokens" + (f" + {new:,} to generate" if new else "")
            raise ContextLengthError(
                f"{what}; this model's context is {self.max_context:,} tokens. Shorten the prompt"
                + (" or max_new_tokens" if new else "")
                + ", or load with max_context=N to go beyond what the model was trained for (e.g. with RoPE scaling)"
            )
        need = kv_bytes(self.config, tokens, self.kv_dtype, self.dtype, self.chunk_size, self.block_size)
        if need > self.kv_budget:
            fp8 = "" if self.kv_dtype == "fp8" else ", use kv_dtype='fp8' (half the bytes of bf16)"
            raise MemoryPlanError(
                f"a {tokens:,}-token sequence needs {fmt_gib(need)} of KV cache ({self.kv_dtype_name}), "
                f"{fmt_gib(max(self.kv_budget, 0))} free for it; shorten the prompt or max_new_tokens{fp8}, "
                "or free memory"
            )

    def memory_plan(self, tokens: int) -> MemoryPlan:
        """What this engine will hold for one sequence of `tokens`: weights, full-layer KV for every token plus the
        local layers' fixed window pools (all of which fill up over time), and one chunk's working memory."""
        c = self.config
        full = c.layer_types.count("full") * bytes_per_token(c, self.kv_dtype, self.dtype)
        full *= -(-tokens // self.block_size) * self.block_size
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return MemoryPlan(weights, full + self.local_pool_bytes, activation_bytes(c, self.chunk_size, self.dtype))

    @property
    def kv_dtype_name(self) -> str:
        return "fp8-e4m3" if self.kv_dtype == "fp8" else str(self.dtype).removeprefix("torch.")

    def cancel(self, seq: Sequence) -> None:
        """Ask for `seq` to end (finish_reason "cancelled"); its KV blocks are freed at the next step."""
        seq.cancelled = True
        with self._wake:
            self._wake.notify()

    def _drop(self, seq: Sequence) -> None:
        """End `seq` now, wherever it is (inbox, waiting, running), freeing everything it holds."""
        with self._lock:
            with self._wake:
                if seq in self._inbox:
                    self._inbox.remove(seq)
            if seq in self.waiting:
                self.waiting.remove(seq)
            if not seq.finished:
                self._finish(seq, "cancelled")

    # ------------------------------------------------------------------------------------------------------------
    # pinned, named prefixes (context caching)

    def pin(self, name: str, prompt: list[int], ttl: float, media: Prompt | None = None) -> Sequence:
        """Compute `prompt`'s KV and keep its full blocks cached under `name` for `ttl` seconds. Any request whose
        prompt starts with these tokens (and the same media) reuses them. Returns the prefill sequence (wait on it)."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a pin's name is a non-empty string, got {name!r}")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < float("inf"):
            raise ValueError(f"ttl must be a finite number of seconds > 0, got {ttl!r}")
        prompt = self._check_prompt(prompt)
        self.check_fits(len(prompt))
        if media is not None and media.tokens != prompt:
            raise ValueError("media must come from this prompt's longmoe.multimodal.Prompt")
        seq = Sequence(next(self._ids), prompt, SamplingParams(max_new_tokens=0), None, media)
        seq._pin = (name, ttl)
        return self._enqueue(seq)

    def unpin(self, name: str) -> bool:
        with self._lock:
            pin = self.pins.pop(name, None)
            if pin is None:
                return False
            for kind, blocks in pin.blocks.items():
                for b in blocks:
                    self.cache.pools[kind].release(b)
            return True

    def touch(self, name: str, ttl: float) -> None:
        with self._lock:
            self.pins[name].expires = time.monotonic() + ttl

    def _expire_pins(self) -> None:
        now = time.monotonic()
        for name in [n for n, p in self.pins.items() if p.expires <= now]:
            self.unpin(name)

    # ------------------------------------------------------------------------------------------------------------
    # scheduling

    def has_work(self) -> bool:
        return bool(self._inbox or self.waiting or self.running)

    @property
    def background(self) -> bool:
        return self._thread is not None

    def step(self) -> None:
        with self._lock:
            with self._wake:
                self.waiting.extend(self._inbox)
                self._inbox.clear()
            self._expire_pins()
            for seq in [s for s in self.running if s.cancelled]:
                self._finish(seq, "cancelled")
            for seq in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(seq)
                seq.finish_reason = "cancelled"
                seq._done.set()
            self._admit()
            decoding = [s for s in self.running if s.num_computed == len(s.tokens) - 1 and len(s.output)]
            budget = self.max_batch_tokens
            if decoding:
                self._guarded(decoding, self._decode, decoding)
                budget -= len(decoding)
            prefilled = False
            for seq in [s for s in self.running if s.num_computed < len(s.prompt)]:
                while budget > 0 and seq.num_computed < len(seq.prompt) and not seq.finished:
                    budget -= self._guarded([seq], self._prefill_chunk, seq, min(budget, self.chunk_size)) or 0
                    prefilled = True
                if budget <= 0:
                    break
            if prefilled:
                _malloc_trim()

    def _guarded(self, seqs: list[Sequence], fn, *args):
        """Run one piece of a step; if it raises, end exactly the requests it was working for with that error
        (the caller re-raises it) and carry on with the others: one bad request never stops the engine."""
        try:
            return fn(*args)
        except Exception as e:
            if isinstance(e, OutOfBlocks):
                e = MemoryPlanError(f"the KV cache ran out of blocks ({e}); retry, or lower concurrent load")
            for seq in seqs:
                if not seq.finished:
                    seq.error = e
                    self._finish(seq, "error")
            return None

    def _fail_all(self, error: BaseException) -> None:
        """Last resort of the background loop: end every request with `error`, keep the engine usable."""
        with self._lock:
            with self._wake:
                self.waiting.extend(self._inbox)
                self._inbox.clear()
            for seq in list(self.running) + list(self.waiting):
                if not seq.finished:
                    seq.error = error
                    self._finish(seq, "error")
            self.waiting.clear()

    def _admit(self) -> None:
        """Move waiting sequences to running, FIFO, while their worst-case KV blocks can be reserved."""
        while self.waiting:
            seq = self.waiting[0]
            # Scoring computes every position it reports (as vLLM does for prompt log-probs): no prefix reuse.
            hit = {} if seq.params.prompt_logprobs else self._match_prefix(seq)
            total = len(seq.prompt) + seq.params.max_new_tokens
            need = {}
            for kind, pool in self.cache.pools.items():
                held = sum(b >= 0 for b in hit.get(kind, []))
                need[kind] = max(0, blocks_needed(self.config, kind, total, self.chunk_size, self.block_size) - held)
                reserved = sum(s.reserved.get(kind, 0) for s in self.running)
                # blocks the hit will take out of the evictable cache are no longer available to others
                taking = sum(1 for b in hit.get(kind, []) if b >= 0 and pool.ref[b] == 0)
                if pool.available - taking - reserved < need[kind]:
                    return  # wait for running sequences to finish
            self.waiting.popleft()
            for kind, blocks in hit.items():
                for b in blocks:
                    if b >= 0:
                        self.cache.pools[kind].acquire(b)
                seq.tables[kind] = list(blocks)
            for kind in self.cache.pools:
                seq.tables.setdefault(kind, [])
            n_hit = len(hit.get("full", next(iter(hit.values()), [])))
            seq.num_computed = seq.num_cached = n_hit * self.block_size
            seq.hashes = block_hashes(seq.hash_tokens(0, seq.num_computed), self.block_size)
            seq.reserved = need
            self.running.append(seq)

    def _match_prefix(self, seq: Sequence) -> dict[str, list[int]]:
        """Longest run of cached full blocks that starts the prompt (never the whole prompt: its last token must be
        computed to get logits), for which every local kind still holds the blocks its window needs."""
        bs = self.block_size
        hashes = block_hashes(seq.hash_tokens(0, (len(seq.prompt) - 1) // bs * bs), bs)
        best: dict[str, list[int]] = {}
        for n in range(len(hashes), 0, -1):
            tables: dict[str, list[int]] = {}
            for kind, pool in self.cache.pools.items():
                first = self.cache.first_needed(kind, n * bs) // bs
                blocks = [-1] * first + [pool.lookup(h) for h in hashes[first:n]]
                if any(b is None for b in blocks):
                    break
                tables[kind] = blocks
            else:
                best = tables
                break
        return best

    def _ensure_blocks(self, seq: Sequence, end: int) -> None:
        """Allocate blocks so that positions < end have a slot, from the sequence's reservation."""
        for kind, table in seq.tables.items():
            pool = self.cache.pools[kind]
            while len(table) * self.block_size < end:
                prev = next((b for b in reversed(table) if b >= 0), None)
                table.append(pool.allocate(prefer=None if prev is None else prev + 1))
                self.cache.zero_block(kind, table[-1])
                seq.reserved[kind] = max(0, seq.reserved.get(kind, 0) - 1)

    def _after_compute(self, seq: Sequence) -> None:
        """Commit newly completed blocks to the prefix cache; release blocks local layers will not read again."""
        bs = self.block_size
        full = seq.num_computed // bs
        if full > len(seq.hashes):
            seq.hashes += block_hashes(
                seq.hash_tokens(len(seq.hashes) * bs, full * bs), bs, seq.hashes[-1] if seq.hashes else b""
            )
        for kind, table in seq.tables.items():
            pool = self.cache.pools[kind]
            for i in range(seq.committed, min(full, len(table))):
                if table[i] >= 0:
                    pool.commit(table[i], seq.hashes[i])
            if kind != "full":
                keep_from = self.cache.first_needed(kind, seq.num_computed) // bs
                for i in range(seq.released.get(kind, 0), keep_from):
                    if table[i] >= 0:
                        pool.release(table[i])
                        table[i] = -1
                seq.released[kind] = max(keep_from, seq.released.get(kind, 0))
        seq.committed = full

    def _forward(self, rows: list[tuple[Sequence, int, int]], outputs: int | None) -> torch.Tensor:
        """Run tokens [start, start + n) of each sequence through the model; rows share n. Returns the logits of
        the last `outputs` positions of each row (None: all)."""
        for seq, start, n in rows:
            self._ensure_blocks(seq, start + n)
        self.cache.prepare([Row(seq.tables, start, n) for seq, start, n in rows])
        ids = torch.tensor([seq.tokens[start : start + n] for seq, start, n in rows], device=self.device)
        pos = torch.tensor([list(range(start, start + n)) for _, start, n in rows], device=self.device)
        with torch.inference_mode():
            seq0, start0, n0 = rows[0]
            if self.fused_decode is not None and len(rows) == 1 and n0 == 1 and outputs == 1 and seq0.media is None:
                logits = self.fused_decode(seq0.tokens[start0], start0)
            elif any(seq.media is not None for seq, _, _ in rows):
                embeds, rope_pos, deepstack = self._media_inputs(rows, ids, pos)
                logits = self.model(input_embeds=embeds, positions=pos, cache=self.cache, outputs=outputs,
                                    rope_positions=rope_pos, deepstack=deepstack).logits  # fmt: skip
            else:
                logits = self.model(ids, pos, cache=self.cache, outputs=outputs).logits
        for seq, start, n in rows:
            seq.num_computed = start + n
            self._after_compute(seq)
        return logits

    def _media_inputs(
        self, rows: list[tuple[Sequence, int, int]], ids: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Token embeddings with each row's media rows in place, M-RoPE positions [3, B, n] and DeepStack additions
        for positions [start, start + n) of each row (a row without media: plain positions on every axis)."""
        x = self.model.embed_tokens(ids)  # [B, n, C]
        rope = pos.to(torch.float32)[None].repeat(3, 1, 1)  # [3, B, n]
        layers = max((len(seq.media.deepstack) for seq, _, _ in rows if seq.media is not None), default=0)
        deep = [torch.zeros_like(x) for _ in range(layers)] if layers else []
        for b, (seq, start, n) in enumerate(rows):
            m = seq.media
            if m is None:
                continue
            end, plen = start + n, len(seq.prompt)
            if start < plen:
                k = min(end, plen) - start
                rope[:, b, :k] = m.rope_positions[:, start : start + k].to(rope.device)
            rope[:, b, max(plen - start, 0) :] += m.rope_delta
            lo, hi = torch.searchsorted(m.embed_index, torch.tensor([start, end])).tolist()
            if hi > lo:
                x[b, m.embed_index[lo:hi] - start] = m.embeds[lo:hi].to(x.device, x.dtype)
            if m.visual_index is not None:
                lo, hi = torch.searchsorted(m.visual_index, torch.tensor([start, end])).tolist()
                for layer, feats in zip(deep, m.deepstack):
                    layer[b, m.visual_index[lo:hi] - start] = feats[lo:hi].to(x.device, x.dtype)
        return x, rope, deep

    def _prefill_chunk(self, seq: Sequence, budget: int) -> int:
        t0 = time.perf_counter()
        start = seq.num_computed
        n = min(budget, len(seq.prompt) - start)
        last = start + n == len(seq.prompt)
        want_all = seq.params.prompt_logprobs
        # logits only where they are used: every position when scoring, else the prompt's last token (a middle chunk
        # needs none, and the model then skips its last layer's attention and FFN there)
        logits = self._forward([(seq, start, n)], outputs=None if want_all else int(last))[0]  # [n, 1 or 0, V]
        if want_all:
            lp = torch.log_softmax(logits.float(), dim=-1)
            targets = torch.tensor(seq.prompt[start + 1 : start + n + 1], device=lp.device)
            seq.prompt_logprobs += lp[: len(targets)].gather(1, targets[:, None])[:, 0].tolist()
        seq.timings.prefill_seconds += time.perf_counter() - t0
        if last:
            self._sample(seq, logits[-1])
        return n

    def _decode(self, seqs: list[Sequence]) -> None:
        t0 = time.perf_counter()
        logits = self._forward([(s, s.num_computed, 1) for s in seqs], outputs=1)[:, -1]  # [B, V]
        dt = (time.perf_counter() - t0) / len(seqs)
        for seq, row in zip(seqs, logits):
            seq.timings.decode_seconds += dt
            self._sample(seq, row)

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> None:
        p = seq.params
        if p.max_new_tokens == 0:
            self._finish(seq, "length")
            return
        tok = sample(logits, p.temperature, p.top_k, p.top_p, seq.generator)
        with seq._lock:
            seq.tokens.append(tok)
            seq.output.append(tok)
            if p.logprobs:
                seq.logprobs.append(torch.log_softmax(logits.float(), dim=-1)[tok].item())
            if seq.detok:
                seq.detok.push(tok)
        if seq.detok and seq.detok.stopped:
            self._finish(seq, "stop")
        elif tok in self.eos_ids and not p.ignore_eos:
            self._finish(seq, "stop")
        elif len(seq.output) >= p.max_new_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq._pin is not None and reason not in ("cancelled", "error"):
            self._register_pin(seq)
        for kind, table in seq.tables.items():
            for b in table:
                if b >= 0:
                    self.cache.pools[kind].release(b)
            table.clear()
        seq.reserved = {}
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        with seq._lock:
            if seq.detok:
                seq.detok.flush()
            seq.finish_reason = reason
        seq._done.set()

    def _register_pin(self, seq: Sequence) -> None:
        name, ttl = seq._pin
        self.unpin(name)
        bs = self.block_size
        n = len(seq.prompt) // bs  # full blocks only: a partial last block is recomputed by each user
        blocks = {}
        for kind, table in seq.tables.items():
            first = self.cache.first_needed(kind, n * bs) // bs
            blocks[kind] = [b for b in table[first:n] if b >= 0]
            for b in blocks[kind]:
                self.cache.pools[kind].acquire(b)
        self.pins[name] = Pin(blocks, seq.prompt[: n * bs], time.monotonic() + ttl)

    # ------------------------------------------------------------------------------------------------------------
    # driving

    def run(self, seq: Sequence) -> None:
        """Return once `seq` has finished: step the engine here, or wait for the background thread. If this is
        interrupted (Ctrl-C), `seq` is ended and its KV freed before the interrupt propagates."""
        try:
            while not seq.finished:
                if self.background:
                    seq.wait(0.5)
                else:
                    self.step()
        except BaseException:
            self.abandon(seq)
            raise

    def abandon(self, seq: Sequence) -> None:
        """The caller has gone (Ctrl-C, a closed stream): end `seq` and free its KV: now when driving the engine
        here, at the background thread's next step otherwise (never blocking on a step in progress)."""
        if self.background:
            self.cancel(seq)
        else:
            self._drop(seq)

    def start(self) -> None:
        """Drive the engine from a background thread (for servers)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="longmoe-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        # Lock order is _lock before _wake everywhere (step, _drop): the wait below holds _wake alone.
        while True:
            with self._wake:
                if not self._stop and not self.has_work():
                    self._wake.wait(timeout=1.0)
                if self._stop:
                    return
                idle = not self.has_work()
            try:
                if idle:
                    with self._lock:
                        self._expire_pins()  # idle pins still time out
                else:
                    self.step()
            except Exception as e:  # a bug outside any one request: fail what is in flight, keep serving
                self._fail_all(e)
