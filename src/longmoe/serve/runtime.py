"""The bridge between the asyncio server and the engine's background thread: the served model (names, limits,
chat template, prompt building), admission with a bounded queue, waiting for tokens without blocking the event loop,
and context caches pinned in the engine.

The engine signals nothing per token, so one task (the `Pump`) looks at every live request every few milliseconds
and wakes those with new tokens: one wake-up per tick however many requests stream, instead of one thread or one
polling loop per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ..api import Model
from ..engine.engine import SamplingParams, Sequence
from ..errors import LongmoeError
from ..multimodal import Prompt
from ..tokenizer import Tokenizer
from .chat import ChatTemplate
from .errors import ApiError, invalid
from .metrics import Metrics
from .store import CacheRecord, Store

GEMINI_OUTPUT_LIMIT = 8192  # Gemini 1.5's outputTokenLimit; the default length of an answer


@dataclass
class Prefix:
    """The start every request naming a cached content shares: its conversation, rendered text and token ids."""

    messages: list[dict[str, Any]]
    text: str
    ids: list[int]
    media: Prompt | None = None  # its media embeddings and M-RoPE positions, when it holds media


MARKER = re.compile("(\x00media:[0-9a-f]{24}\x00)")


def media_marker(part: dict[str, Any]) -> str:
    """What a media part stands as in a conversation's text until it is tokenized: NUL-delimited (no chat template
    writes NUL) and named by its content and clip settings, so the same media always gets the same marker."""
    key = hashlib.sha256(part["data"])
    key.update(repr((part.get("start_offset"), part.get("end_offset"), part.get("fps"))).encode())
    return f"\x00media:{key.hexdigest()[:24]}\x00"


def conversation_media(messages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: v for m in messages for k, v in (m.get("media") or {}).items()}


class ServedModel:
    """A loaded model as the API shows it: its name, token limits, default sampling and chat template."""

    def __init__(self, model: Model, name: str, max_output_tokens: int | None = None):
        if model.tokenizer is None:
            raise ValueError(f"{model.checkpoint.path} has no tokenizer.json; the server needs one to read text")
        self.model, self.name = model, name
        self.tokenizer: Tokenizer = model.tokenizer
        self.template = ChatTemplate.for_model(model.checkpoint.path)
        self.max_context = model.engine.max_context
        self.output_limit = min(max_output_tokens or GEMINI_OUTPUT_LIMIT, self.max_context)
        # Defaults come from the model's generation_config.json as in transformers' generate(): greedy unless it
        # says do_sample (then its temperature / top_p / top_k), which is also what `longmoe generate` does.
        gen = model.checkpoint.generation
        sample = bool(gen.get("do_sample"))
        self.temperature = float(gen.get("temperature", 1.0)) if sample else 0.0
        self.top_p = gen.get("top_p") if sample else None
        self.default_top_k = gen.get("top_k") if sample else None
        self.vocab_size = model.config.vocab_size

    def top_k(self, requested: int | None) -> int | None:
        """topK as asked, at most the vocabulary (more than that is no truncation at all), else the default."""
        return self.default_top_k if requested is None else min(requested, self.vocab_size)

    def encode(self, text: str, continuation: bool = False) -> list[int]:
        # The plain template is tokenized as `longmoe generate` does (special tokens added); a chat template writes
        # its own special tokens, so transformers encodes its text without adding any. A continuation never does.
        try:
            return self.tokenizer.encode(text, add_special_tokens=self.template.plain and not continuation)
        except Exception as e:  # the tokenizers library raises bare Exceptions on text it cannot read
            raise invalid(f"the prompt cannot be tokenized: {e}") from None

    def prefix(self, messages: list[dict[str, Any]]) -> Prefix:
        text = self.template.render(messages, add_generation_prompt=False)
        media = conversation_media(messages)
        if media:
            prompt = self.with_media(text, media)
            return Prefix(messages, text, prompt.tokens, prompt)
        return Prefix(messages, text, self.encode(text))

    def prompt(self, messages: list[dict[str, Any]], prefix: Prefix | None = None) -> Prompt:
        """A conversation as the engine takes it, after a cached prefix if given. The prefix's own ids come first so
        that its pinned KV is reused; the rest is tokenized from where the prefix's text ends. With media, the whole
        conversation is prepared (media encoded); a cached prefix's KV is still reused, found by content."""
        turns = (prefix.messages if prefix is not None else []) + messages
        media = conversation_media(turns)
        if media:
            return self.with_media(self.template.render(turns), media)
        if prefix is None:
            ids = self.encode(self.template.render(messages))
        else:
            full = self.template.render(turns)
            if full.startswith(prefix.text):
                ids = prefix.ids + self.encode(full[len(prefix.text) :], continuation=True)
            else:
                ids = self.encode(full)  # a template that rewrites earlier turns: still right, without the KV reuse
        return Prompt(ids, {"text": len(ids)})

    def prompt_ids(self, messages: list[dict[str, Any]], prefix: Prefix | None = None) -> list[int]:
        return self.prompt(messages, prefix).tokens

    def with_media(self, text: str, media: dict[str, dict[str, Any]]) -> Prompt:
        """Rendered text with media markers -> parts -> a Prompt (media decoded and encoded); a 400 naming the part
        when one cannot be used."""
        if self.model.checkpoint.encoders is None:
            first = next(iter(media.values()))
            raise invalid(f"{first['where']} is {first['mime_type']}, but models/{self.name} reads text only; serve an "
                          "omni model (Qwen3-Omni-MoE) for images, audio and video")  # fmt: skip
        pieces = MARKER.split(text)
        parts = [media[p] if i % 2 else p for i, p in enumerate(pieces) if i % 2 or p]
        try:
            return self.model.prepare(parts, special_tokens=self.template.plain)
        except (LongmoeError, ValueError, TypeError) as e:
            raise invalid(" ".join(str(e).split())) from None

    def check_context(self, prompt_len: int, max_new: int | None, field_name: str) -> int:
        """The number of tokens to generate (the default fills the context up to outputTokenLimit); a 400 naming
        both numbers when the prompt, or the prompt plus `max_new`, does not fit the context."""
        room = self.max_context - prompt_len
        if room < 1:
            raise invalid(
                f"the prompt is {prompt_len:,} tokens; this model's context (inputTokenLimit) is "
                f"{self.max_context:,} tokens including the answer. Shorten the prompt"
            )
        if max_new is None:
            return min(self.output_limit, room)
        if max_new > self.output_limit:
            raise invalid(f"{field_name} is {max_new:,}; this model's outputTokenLimit is {self.output_limit:,}")
        if max_new > room:
            raise invalid(
                f"the prompt is {prompt_len:,} tokens + {max_new:,} to generate ({field_name}); this model's "
                f"context is {self.max_context:,} tokens. Shorten the prompt or lower {field_name}"
            )
        return max_new


@dataclass(eq=False)  # hashed by identity: jobs live in a set
class Job:
    """One request's sequences (several with candidateCount / n) and what the server measured about them."""

    seqs: list[Sequence]
    start: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    seen: tuple[int, int] = (0, 0)  # (tokens generated, sequences finished) when the request last looked
    event: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    count_tokens: bool = True  # False for a cache's prefill (no request tokens to report)

    def state(self) -> tuple[int, int]:
        return sum(len(s.output) for s in self.seqs), sum(s.finished for s in self.seqs)

    @property
    def done(self) -> bool:
        return all(s.finished for s in self.seqs)


class Runner:
    """Admission, waiting and cancellation for requests on the engine (which `start` drives from its thread)."""

    def __init__(self, served: ServedModel, metrics: Metrics, max_queue: int = 64, tick: float = 0.005):
        self.served, self.metrics, self.max_queue, self.tick = served, metrics, max_queue, tick
        self.engine = served.model.engine
        self.in_flight = 0  # sequences submitted and not yet released (the bounded queue)
        self.jobs: set[Job] = set()
        self.draining = False
        self.drain_deadline: float | None = None  # after it, streams still running are ended cleanly
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.engine.start()
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for job in list(self.jobs):
            self.release(job)
        await asyncio.to_thread(self.engine.stop)

    def begin_drain(self, grace: float) -> None:
        self.draining = True
        self.drain_deadline = time.monotonic() + grace

    @property
    def past_deadline(self) -> bool:
        return self.drain_deadline is not None and time.monotonic() >= self.drain_deadline

    # ---------------------------------------------------------------------------------------------------------------

    def _admit(self, n: int) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down; retry on another replica", headers={"Retry-After": "5"})
        if self.in_flight + n > self.max_queue:
            raise ApiError(
                429,
                f"the server is at capacity ({self.in_flight} requests in flight, at most {self.max_queue}); retry",
                openai_code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )

    def submit(self, prompts: list[list[int] | Prompt], params: SamplingParams, n: int = 1) -> Job:
        """Queue `n` samples of each prompt (token ids, or a Prompt with media; seeds seed, seed+1, ... so that
        samples differ) as one job, all or none. Bad settings are a 400; beyond the queue's bound a 429."""
        self._admit(n * len(prompts))
        seqs: list[Sequence] = []
        try:
            for prompt in prompts:
                ids, media = (prompt.tokens, prompt) if isinstance(prompt, Prompt) else (prompt, None)
                for i in range(n):
                    seed = params.seed + i if params.seed is not None else None
                    seqs.append(self.engine.submit(ids, replace(params, seed=seed), media=media))
        except (TypeError, ValueError, LongmoeError) as e:
            for s in seqs:
                self.engine.abandon(s)
            raise invalid(" ".join(str(e).split())) from None
        return self._track(Job(seqs))

    def pin(self, name: str, ids: list[int], ttl: float, media: Prompt | None = None) -> Job:
        self._admit(1)
        try:
            seq = self.engine.pin(name, ids, ttl, media)
        except (TypeError, ValueError, LongmoeError) as e:
            raise invalid(" ".join(str(e).split())) from None
        return self._track(Job([seq], count_tokens=False))

    def _track(self, job: Job) -> Job:
        self.in_flight += len(job.seqs)
        self.jobs.add(job)
        self._wake.set()
        return job

    def release(self, job: Job) -> None:
        """The request is over (answered, failed or gone): end what still runs, free its KV, record metrics."""
        if job.closed:
            return
        job.closed = True
        for s in job.seqs:
            if not s.finished:
                self.engine.abandon(s)
        self.in_flight -= len(job.seqs)
        self.jobs.discard(job)
        if job.count_tokens:
            self.metrics.observe(job)

    async def changed(self, job: Job, timeout: float = 0.25) -> None:
        """Return once the job has new tokens or a finished sequence since it last looked, or after `timeout`
        (so that callers can check for a disconnected client or the shutdown deadline)."""
        job.event.clear()
        if job.state() == job.seen:
            try:
                await asyncio.wait_for(job.event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        job.seen = job.state()
        if job.first_token is None and job.seen[0] > 0:
            job.first_token = time.perf_counter()

    async def wait(self, job: Job, disconnected=None) -> bool:
        """Wait for every sequence of `job` to finish. False if the client went away first (`disconnected` is an
        async callable that says so) or the shutdown deadline passed; the caller then releases the job."""
        while not job.done:
            await self.changed(job)
            if self.past_deadline or (disconnected is not None and await disconnected()):
                return False
        job.seen = job.state()
        return True

    async def _pump(self) -> None:
        while True:
            if not self.jobs:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self.tick)
            for job in list(self.jobs):
                if job.state() != job.seen:
                    job.event.set()

    # ---------------------------------------------------------------------------------------------------------------
    # engine numbers

    def kv_blocks(self) -> tuple[int, int]:
        """(blocks in use, blocks in all pools). Read without the engine's lock: a gauge may be one step stale."""
        pools = list(self.engine.cache.pools.values())
        return sum(sum(1 for r in p.ref if r > 0) for p in pools), sum(p.num_blocks for p in pools)

    def queue_depth(self) -> int:
        return len(self.engine.waiting)


def pin_name(cache_id: str) -> str:
    return f"cachedContents/{cache_id}"


class Caches:
    """Cached contents: records in the store, prefixes pinned in the engine (rebuilt on first use after a restart
    or after the engine let one go), and the rule that pins may hold at most half of the KV cache, so that pinned
    documents never starve the requests that read them."""

    PIN_SHARE = 0.5

    def __init__(self, served: ServedModel, store: Store, runner: Runner):
        self.served, self.store, self.runner = served, store, runner
        self.engine = served.model.engine
        self.prefixes: dict[str, Prefix] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def room_for(self, ids: list[int]) -> tuple[bool, str]:
        pool = self.engine.cache.pools.get("full")
        if pool is None:  # a model with only local-attention layers pins a window's worth per kind: always small
            return True, ""
        pinned = sum(len(p.blocks.get("full", ())) for p in list(self.engine.pins.values()))
        need = len(ids) // self.engine.block_size
        limit = int(pool.num_blocks * self.PIN_SHARE)
        if pinned + need <= limit:
            return True, ""
        bs = self.engine.block_size
        return False, (
            f"pinned caches would hold {(pinned + need) * bs:,} tokens of KV; at most {limit * bs:,} of this server's "
            f"{pool.num_blocks * bs:,} may be pinned. Delete a cache, shorten a ttl, or retry later"
        )

    async def pin(self, cache_id: str, prefix: Prefix, expire_time: float) -> None:
        """Prefill `prefix` and keep its KV pinned until `expire_time` (seconds since the epoch)."""
        ttl = expire_time - time.time()
        if ttl <= 0:
            return
        job = self.runner.pin(pin_name(cache_id), prefix.ids, ttl, prefix.media)
        try:
            await self.runner.wait(job)
            seq = job.seqs[0]
            if seq.error is not None:
                raise ApiError(503, f"could not compute the cache's KV: {seq.error}", headers={"Retry-After": "5"})
        finally:
            self.runner.release(job)

    async def load_prefix(self, record: CacheRecord) -> Prefix:
        prefix = self.prefixes.get(record.id)
        if prefix is None:
            messages = await asyncio.to_thread(self.store.cache_messages, record.id)
            prefix = self.prefixes[record.id] = await asyncio.to_thread(self.served.prefix, messages)
        return prefix

    async def prefix_for(self, record: CacheRecord) -> Prefix:
        """The cache's prefix with its KV pinned in the engine: pinned again if the engine no longer holds it (after a
        restart), when there is room (else requests still get the right answer, computed in full)."""
        async with self._locks.setdefault(record.id, asyncio.Lock()):
            prefix = await self.load_prefix(record)
            if pin_name(record.id) not in self.engine.pins and self.room_for(prefix.ids)[0]:
                await self.pin(record.id, prefix, record.expire_time)
            return prefix

    # touch and unpin wait for the engine's lock, which a long prefill step holds: never on the event loop

    async def retime(self, cache_id: str, expire_time: float) -> None:
        try:
            await asyncio.to_thread(self.engine.touch, pin_name(cache_id), max(expire_time - time.time(), 1e-3))
        except KeyError:
            pass  # not pinned now: pinned with the new time on first use

    async def drop(self, cache_id: str) -> None:
        self.prefixes.pop(cache_id, None)
        self._locks.pop(cache_id, None)
        await asyncio.to_thread(self.engine.unpin, pin_name(cache_id))

    async def sweep(self) -> None:
        """Delete expired caches: the store rows and files, and the engine pins (the engine also expires those)."""
        for cache_id in self.store.expired_caches(time.time()):
            self.store.delete_cache(cache_id)
            await self.drop(cache_id)



@dataclass
class State:
    """Everything a request handler needs (app.state.longmoe)."""

    served: ServedModel
    store: Store
    runner: Runner
    caches: Caches
    metrics: Metrics
    api_key: str | None
    max_request_bytes: int
    max_file_bytes: int
