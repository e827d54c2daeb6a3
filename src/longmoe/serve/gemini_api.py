"""The Gemini API (v1beta, also under v1, the default of google-genai >= 3): models, generateContent,
streamGenerateContent, countTokens, cachedContents, and files with Google's resumable upload protocol."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from ..engine.engine import SamplingParams, Sequence
from ..engine.planner import MemoryPlanError
from ..media import AUDIO_TYPES, IMAGE_TYPES, VIDEO_TYPES, MediaError, modality
from ..media import check as media_check
from ..multimodal import Prompt
from .errors import ApiError, invalid, not_found
from .runtime import Job, Prefix, ServedModel, State, media_marker
from .schemas import (
    CachedContentCreate,
    CachedContentUpdate,
    Content,
    CountTokensRequest,
    CreateFileRequest,
    FileMetadata,
    GenerateContentRequest,
    GenerationConfig,
    Part,
)
from .store import CacheRecord, FileRecord, StoreError, new_id

router = APIRouter(tags=["gemini"])  # under /v1beta and /v1
models_router = APIRouter(tags=["gemini"])  # under /v1beta only: /v1/models is shared with OpenAI (openai_api)
upload_router = APIRouter(tags=["gemini files"])  # under /upload/v1beta and /upload/v1

FINISH_REASON = {"stop": "STOP", "length": "MAX_TOKENS", "cancelled": "OTHER", "error": "OTHER"}
METHODS = ["generateContent", "streamGenerateContent", "countTokens", "createCachedContent"]
TEXT_TYPES = {"application/json", "application/xml", "application/javascript", "application/x-javascript",
              "application/x-python", "application/x-python-code", "application/x-sh", "application/x-tex",
              "application/sql", "application/yaml", "application/x-yaml", "application/toml", "application/csv",
              "application/rtf", "application/x-ipynb+json"}  # fmt: skip
FILE_ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?")
UPLOAD_CHUNK = 8 << 20  # the granularity google-genai uploads in
DEFAULT_TTL = 3600.0
MAX_TTL = 100 * 365 * 86400.0


def state(request: Request) -> State:
    return request.app.state.longmoe


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def is_text(mime: str | None) -> bool:
    mime = (mime or "").split(";")[0].strip().lower()
    return mime.startswith("text/") or mime in TEXT_TYPES or mime.endswith(("+json", "+xml"))


PageSize = Annotated[int | None, Query(alias="pageSize")]
PageToken = Annotated[str | None, Query(alias="pageToken")]


def page(page_size: int | None, page_token: str | None, default: int, maximum: int) -> tuple[int, int]:
    """(offset, limit) from the list methods' pageSize / pageToken (our tokens are offsets)."""
    if page_size is not None and page_size < 0:
        raise invalid(f"pageSize must be >= 0, got {page_size}")
    limit = min(page_size or default, maximum)
    if not page_token:
        return 0, limit
    if not page_token.isdigit() or len(page_token) > 12:
        raise invalid(f"pageToken {page_token[:40]!r} is not one this server issued")
    return int(page_token), limit


def resolve_model(st: State, name: str) -> ServedModel:
    bare = name.removeprefix("models/")
    if bare != st.served.name:
        raise not_found(
            f"models/{bare} is not found for API version v1beta, or is not supported for generateContent. "
            f"Call ListModels to see the list of available models (this server has models/{st.served.name})"
        )
    return st.served


def model_resource(served: ServedModel) -> dict[str, Any]:
    m = served.model
    out = {
        "name": f"models/{served.name}",
        "baseModelId": served.name,
        "version": "1",
        "displayName": served.name,
        "description": f"{m.checkpoint.hub_config.get('model_type', 'longmoe')} model served by longmoe "
        f"({m.config.num_layers} layers, {m.config.num_experts or 'no'} experts)",
        "inputTokenLimit": served.max_context,
        "outputTokenLimit": served.output_limit,
        "supportedGenerationMethods": METHODS,
        "temperature": served.temperature,
        "maxTemperature": 2.0,
    }
    if served.top_p is not None:
        out["topP"] = served.top_p
    if served.default_top_k is not None:
        out["topK"] = served.default_top_k
    return out


# ---------------------------------------------------------------------------------------------------------------------
# contents -> conversation


def b64decode(data: str, where: str) -> bytes:
    """Standard or URL-safe base64 (google-genai sends URL-safe), padding optional, whitespace ignored."""
    s = "".join(data.split()).replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{where}.inlineData.data is not valid base64") from None


def utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def file_id_of(uri: str) -> str | None:
    """files/ID, or any URL whose path ends in files/ID (the `uri` this server hands out, or another replica's)."""
    m = re.search(r"(?:^|/)files/([a-z0-9-]+)/?(?:[?#].*)?$", uri.strip())
    return m[1] if m else None


def duration(value: str | None, where: str) -> float | None:
    """A protobuf Duration as JSON writes it ("10s", "1.5s"; plain seconds are accepted too)."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)s?\s*", str(value))
    if not m:
        raise invalid(f"{where} {str(value)[:40]!r} is not a duration such as '10s' or '1.5s'")
    return float(m[1])


def media_piece(mime: str, data: bytes, part: Part, where: str) -> dict[str, Any]:
    """A media part as longmoe.multimodal takes it, with its videoMetadata (clip offsets, frames per second)."""
    try:
        kind = modality(mime)
    except MediaError:
        raise invalid(f"{where} has MIME type {mime!r}; this server reads text, images ({', '.join(IMAGE_TYPES)}), "
                      f"audio ({', '.join(AUDIO_TYPES)}) and video ({', '.join(VIDEO_TYPES)})") from None  # fmt: skip
    piece: dict[str, Any] = {"mime_type": mime, "data": data, "where": where}
    vm = part.video_metadata
    if vm is not None:
        if kind != "video":
            raise invalid(f"{where}: videoMetadata is set on a {kind} part")
        start = duration(vm.start_offset, f"{where}.videoMetadata.startOffset")
        end = duration(vm.end_offset, f"{where}.videoMetadata.endOffset")
        if start is not None and end is not None and end <= start:
            raise invalid(f"{where}.videoMetadata: endOffset ({end:g}s) must be after startOffset ({start:g}s)")
        piece.update(start_offset=start, end_offset=end, fps=vm.fps)
    return piece


def part_text(st: State, part: Part, where: str) -> tuple[str | dict[str, Any], bool]:
    """The text of one part, or a media part (a dict with mime_type and data), and whether it is a document (a file
    or inline data) rather than typed text."""
    given = [k for k in ("text", "inline_data", "file_data") if getattr(part, k) is not None]
    if not given:
        raise invalid(f"{where} has no text, inlineData or fileData (function calls and other parts are not "
                      "supported by this server)")  # fmt: skip
    if len(given) > 1:
        names = {"text": "text", "inline_data": "inlineData", "file_data": "fileData"}
        raise invalid(f"{where} sets {' and '.join(names[k] for k in given)}; a part holds exactly one of them")
    if part.text is not None:
        return part.text, False
    if part.inline_data is not None:
        blob = part.inline_data
        data = b64decode(blob.data, where)
        if not is_text(blob.mime_type):
            return media_piece(blob.mime_type, data, part, f"{where}.inlineData"), False
        return utf8(data, f"{where}.inlineData"), True
    uri = part.file_data.file_uri
    file_id = file_id_of(uri)
    if file_id is None:
        raise invalid(f"{where}.fileData.fileUri {uri[:200]!r} does not name a file (…/files/ID)")
    record = st.store.get_file(file_id)
    if record is None:
        raise not_found(f"{where}.fileData: files/{file_id} does not exist (deleted, or uploaded elsewhere)")
    if record.state == "PROCESSING":
        raise invalid(f"{where}.fileData: files/{file_id} is still PROCESSING; poll files.get until it is ACTIVE")
    if record.state == "FAILED":
        raise invalid(f"{where}.fileData: files/{file_id} FAILED its check: {record.error}")
    try:
        data = st.store.read_file(file_id)
    except FileNotFoundError:
        raise not_found(f"{where}.fileData: files/{file_id} does not exist") from None
    if not is_text(record.mime_type):
        return media_piece(record.mime_type, data, part, f"{where}.fileData files/{file_id}"), False
    return utf8(data, f"{where}.fileData files/{file_id}"), True


def content_text(st: State, parts: list[Part], where: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """Text parts are joined as they are; a document is a paragraph of its own (a blank line before and after); a
    media part stands in the text as a marker (runtime.media_marker) and is returned by it."""
    if not parts:
        raise invalid(f"{where} has no parts")
    out, prev_doc, media = "", False, {}
    for i, part in enumerate(parts):
        text, doc = part_text(st, part, f"{where}.parts[{i}]")
        if isinstance(text, dict):
            marker = media_marker(text)
            media[marker] = text
            text = marker
        out += ("\n\n" if i and (doc or prev_doc) else "") + text
        prev_doc = doc
    return out, media


def to_messages(st: State, contents: list[Content], system: Content | None) -> list[dict[str, Any]]:
    """{"role", "content"} per turn; a turn with media also has "media": {marker: part} (see content_text)."""
    messages = []
    turns = ([("system", system, "systemInstruction")] if system is not None else []) + [
        ("assistant" if c.role == "model" else "user", c, f"contents[{i}]") for i, c in enumerate(contents)
    ]
    for role, content, where in turns:
        text, media = content_text(st, content.parts, where)
        messages.append({"role": role, "content": text, **({"media": media} if media else {})})
    return messages


# ---------------------------------------------------------------------------------------------------------------------
# generation


def sampling(served: ServedModel, cfg: GenerationConfig | None, prompt_len: int) -> tuple[SamplingParams, int]:
    cfg = cfg or GenerationConfig()
    for name, value in (("presencePenalty", cfg.presence_penalty), ("frequencyPenalty", cfg.frequency_penalty)):
        if value:
            raise invalid(f"generationConfig.{name} is not supported by this server (leave it unset or 0)")
    if cfg.logprobs:
        raise invalid("generationConfig.logprobs (top candidates per step) is not supported; responseLogprobs is")
    if cfg.response_mime_type not in (None, "", "text/plain"):
        raise invalid(f"generationConfig.responseMimeType {cfg.response_mime_type!r} is not supported (text/plain)")
    if cfg.response_schema is not None or cfg.response_json_schema is not None:
        raise invalid("generationConfig.responseSchema (constrained decoding) is not supported by this server")
    if cfg.response_modalities and any(m.upper() != "TEXT" for m in cfg.response_modalities):
        raise invalid(f"generationConfig.responseModalities {cfg.response_modalities} is not supported (TEXT only)")
    max_new = served.check_context(prompt_len, cfg.max_output_tokens, "generationConfig.maxOutputTokens")
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=served.temperature if cfg.temperature is None else cfg.temperature,
        top_k=served.top_k(cfg.top_k),
        top_p=served.top_p if cfg.top_p is None else cfg.top_p,
        seed=cfg.seed,
        stop=[s for s in cfg.stop_sequences or [] if s],
        logprobs=bool(cfg.response_logprobs),
    )
    return params, cfg.candidate_count or 1


def cache_id_of(name: str) -> str:
    cache_id = name.removeprefix("cachedContents/")
    if not FILE_ID.fullmatch(cache_id):
        raise not_found(f"cachedContents/{cache_id[:80]} not found")
    return cache_id


async def live_cache(st: State, name: str) -> CacheRecord:
    """The cache record, or a 404 if it never existed or has expired (then it is deleted now)."""
    cache_id = cache_id_of(name)
    record = st.store.get_cache(cache_id)
    if record is not None and record.expire_time <= time.time():
        st.store.delete_cache(cache_id)
        await st.caches.drop(cache_id)
        record = None
    if record is None:
        raise not_found(f"cachedContents/{cache_id} not found (it may have expired)")
    return record


async def build_prompt(st: State, served: ServedModel, body: GenerateContentRequest, pin: bool = True
                       ) -> tuple[Prompt, Prefix | None]:  # fmt: skip
    prefix = None
    if body.tools:
        raise invalid("tools (function calling) are not supported by this server")
    if body.cached_content:
        if body.system_instruction is not None or body.tools or body.tool_config:
            raise invalid("a request with cachedContent cannot also set systemInstruction, tools or toolConfig: "
                          "they are part of the cached content")  # fmt: skip
        record = await live_cache(st, body.cached_content)
        if record.model != served.name:
            raise invalid(f"cachedContents/{record.id} belongs to models/{record.model}, not models/{served.name}")
        prefix = await (st.caches.prefix_for(record) if pin else st.caches.load_prefix(record))
    elif not body.contents:
        raise invalid("contents is empty; give at least one content with a part")
    messages = await asyncio.to_thread(to_messages, st, body.contents, body.system_instruction)
    prompt = await asyncio.to_thread(served.prompt, messages, prefix)
    return prompt, prefix


async def start(st: State, served: ServedModel, body: GenerateContentRequest) -> tuple[Job, Prefix | None, bool]:
    prompt, prefix = await build_prompt(st, served, body)
    params, n = sampling(served, body.generation_config, len(prompt.tokens))
    return st.runner.submit([prompt], params, n), prefix, params.logprobs


def engine_failure(job: Job) -> ApiError | None:
    for s in job.seqs:
        if s.error is not None:
            if isinstance(s.error, MemoryPlanError):  # out of KV blocks under load: transient
                return ApiError(503, f"the engine is out of memory for this request: {s.error}",
                                headers={"Retry-After": "1"})  # fmt: skip
            return ApiError(500, f"the engine failed on this request: {type(s.error).__name__}: {s.error}")
    return None


def logprobs_of(served: ServedModel, seq: Sequence) -> dict[str, Any]:
    chosen = [{"token": served.tokenizer.decode([t], skip_special_tokens=False), "tokenId": t, "logProbability": lp}
              for t, lp in zip(seq.output, seq.logprobs)]  # fmt: skip
    avg = sum(seq.logprobs) / len(seq.logprobs) if seq.logprobs else 0.0
    return {"avgLogprobs": avg, "logprobsResult": {"chosenCandidates": chosen, "topCandidates": []}}


def usage(job: Job, prefix: Prefix | None) -> dict[str, Any]:
    seq = job.seqs[0]
    prompt, generated = len(seq.prompt), sum(len(s.output) for s in job.seqs)
    out = {"promptTokenCount": prompt, "candidatesTokenCount": generated, "totalTokenCount": prompt + generated}
    if prefix is not None or seq.num_cached:
        out["cachedContentTokenCount"] = seq.num_cached  # prompt tokens whose KV was reused, not recomputed
    out["promptTokensDetails"] = modality_counts(seq.media.counts if seq.media else {"text": prompt})
    return out


def modality_counts(counts: dict[str, int]) -> list[dict[str, Any]]:
    """ModalityTokenCount entries (TEXT, IMAGE, VIDEO, AUDIO) for the modalities a prompt holds."""
    return [{"modality": k.upper(), "tokenCount": n} for k, n in counts.items() if n]


def response_body(served: ServedModel, job: Job, prefix: Prefix | None, logprobs: bool, rid: str) -> dict[str, Any]:
    candidates = []
    for i, s in enumerate(job.seqs):
        c = {"content": {"role": "model", "parts": [{"text": s.text}]}, "finishReason": FINISH_REASON[s.finish_reason],
             "index": i, "tokenCount": len(s.output)}  # fmt: skip
        if logprobs:
            c.update(logprobs_of(served, s))
        candidates.append(c)
    return {"candidates": candidates, "usageMetadata": usage(job, prefix), "modelVersion": served.name,
            "responseId": rid}  # fmt: skip


@router.post("/models/{model}:generateContent")
async def generate_content(model: str, body: GenerateContentRequest, request: Request) -> Response:
    st = state(request)
    served = resolve_model(st, model)
    job, prefix, logprobs = await start(st, served, body)
    try:
        if not await st.runner.wait(job, request.is_disconnected):
            if st.runner.past_deadline:
                raise ApiError(503, "the server is shutting down; retry", headers={"Retry-After": "5"})
            return Response(status_code=499)  # the client has gone: nobody reads this
        failure = engine_failure(job)
        if failure is not None:
            raise failure
        return JSONResponse(response_body(served, job, prefix, logprobs, request.state.request_id))
    finally:
        st.runner.release(job)


@router.post("/models/{model}:streamGenerateContent")
async def stream_generate_content(model: str, body: GenerateContentRequest, request: Request,
                                  alt: str | None = None) -> Response:  # fmt: skip
    """Server-sent events with `alt=sse` (one GenerateContentResponse per event, `finishReason` and
    `usageMetadata` in the last); without it, a JSON array streamed element by element."""
    st = state(request)
    served = resolve_model(st, model)
    job, prefix, logprobs = await start(st, served, body)
    rid = request.state.request_id
    sse = alt == "sse"

    def frame(obj: dict[str, Any], first: bool) -> bytes:
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        return f"data: {data}\r\n\r\n".encode() if sse else (("[" if first else ",\r\n") + data).encode()

    async def events() -> AsyncIterator[bytes]:
        first, ended = True, [False] * len(job.seqs)
        try:
            while True:
                await st.runner.changed(job)
                if st.runner.past_deadline:
                    err = {"code": 503, "message": "the server is shutting down; the answer is incomplete",
                           "status": "UNAVAILABLE"}  # fmt: skip
                    yield frame({"error": err}, first)
                    break
                failure = engine_failure(job)
                if failure is not None:
                    yield frame({"error": {"code": failure.code, "message": failure.message,
                                           "status": failure.status}}, first)  # fmt: skip
                    break
                for i, s in enumerate(job.seqs):
                    if ended[i]:
                        continue
                    done = s.finished
                    piece = s.take_text()
                    if not piece and not done:
                        continue
                    c: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": piece}]}, "index": i}
                    chunk: dict[str, Any] = {"candidates": [c], "modelVersion": served.name, "responseId": rid}
                    if done:
                        ended[i] = True
                        c["finishReason"] = FINISH_REASON[s.finish_reason]
                        if logprobs:
                            c.update(logprobs_of(served, s))
                        if all(ended):
                            chunk["usageMetadata"] = usage(job, prefix)
                    yield frame(chunk, first)
                    first = False
                if all(ended):
                    break
            if not sse:
                yield b"[]" if first else b"]"
        finally:
            st.runner.release(job)

    return stream_response(st, job, events(), "text/event-stream" if sse else "application/json")


def stream_response(st: State, job: Job, body: AsyncIterator[bytes], media_type: str) -> StreamingResponse:
    """A streamed answer; a client that disconnects cancels the stream, and the job is released (its sequences
    ended, their KV freed) by the stream's own cleanup or, if the stream never ran, by the background task."""

    async def cleanup() -> None:
        st.runner.release(job)

    return StreamingResponse(body, media_type=media_type, headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(cleanup))  # fmt: skip


@router.post("/models/{model}:countTokens")
async def count_tokens(model: str, body: CountTokensRequest, request: Request) -> dict[str, Any]:
    """The tokens the prompt would take, chat template included (what promptTokenCount will say)."""
    st = state(request)
    served = resolve_model(st, model)
    if body.contents is not None and body.generate_content_request is not None:
        raise invalid("give contents or generateContentRequest, not both")
    inner = body.generate_content_request or GenerateContentRequest(contents=body.contents or [])
    if inner.model:
        resolve_model(st, inner.model)
    if not inner.contents and not inner.cached_content and inner.system_instruction is None:
        return {"totalTokens": 0, "promptTokensDetails": []}
    prompt, prefix = await build_prompt(st, served, inner, pin=False)
    out: dict[str, Any] = {"totalTokens": len(prompt.tokens), "promptTokensDetails": modality_counts(prompt.counts)}
    if prefix is not None:
        out["cachedContentTokenCount"] = len(prefix.ids)
    return out


@models_router.get("/models")
async def list_models(request: Request, page_size: PageSize = None, page_token: PageToken = None) -> dict[str, Any]:
    offset, _ = page(page_size, page_token, 50, 1000)
    return {"models": [model_resource(state(request).served)][offset:]}


@models_router.get("/models/{model}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    return model_resource(resolve_model(state(request), model))


# ---------------------------------------------------------------------------------------------------------------------
# cached contents


def parse_expiry(ttl: str | None, expire_time: str | None, default: float | None) -> float:
    """Seconds since the epoch at which a cache expires, from a Duration ("300s") or an RFC 3339 time."""
    now = time.time()
    if ttl is not None and expire_time is not None:
        raise invalid("set ttl or expireTime, not both")
    if ttl is not None:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)s\s*", ttl)
        if not m:
            raise invalid(f'ttl {ttl[:40]!r} is not a duration such as "300s"')
        seconds = float(m[1])
        if not 0 < seconds <= MAX_TTL:
            raise invalid(f"ttl must be more than 0s and at most {MAX_TTL:.0f}s, got {ttl}")
        return now + seconds
    if expire_time is not None:
        text = re.sub(r"(\.\d{6})\d+", r"\1", expire_time.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        try:
            t = datetime.fromisoformat(text)
        except ValueError:
            raise invalid(f"expireTime {expire_time[:40]!r} is not an RFC 3339 time") from None
        if t.tzinfo is None:  # google-genai sends datetime.isoformat() of a naive time: take it as UTC
            t = t.replace(tzinfo=timezone.utc)
        stamp = t.timestamp()
        if stamp <= now:
            raise invalid(f"expireTime {expire_time} is in the past")
        if stamp - now > MAX_TTL:
            raise invalid(f"expireTime {expire_time} is more than {MAX_TTL:.0f}s away")
        return stamp
    if default is None:
        raise invalid("give ttl or expireTime")
    return now + default


def cache_resource(record: CacheRecord) -> dict[str, Any]:
    out = {
        "name": f"cachedContents/{record.id}",
        "model": f"models/{record.model}",
        "createTime": rfc3339(record.create_time),
        "updateTime": rfc3339(record.update_time),
        "expireTime": rfc3339(record.expire_time),
        "usageMetadata": {"totalTokenCount": record.token_count},
    }
    if record.display_name:
        out["displayName"] = record.display_name
    return out


@router.post("/cachedContents")
async def create_cached_content(body: CachedContentCreate, request: Request) -> dict[str, Any]:
    """Prefill the contents now and keep their KV pinned until the cache expires; requests naming the cache reuse
    it (usageMetadata.cachedContentTokenCount). Returns once the KV is ready."""
    st = state(request)
    served = resolve_model(st, body.model)
    if body.tools or body.tool_config:
        raise invalid("tools (function calling) are not supported by this server")
    expire = parse_expiry(body.ttl, body.expire_time, DEFAULT_TTL)
    if not body.contents and body.system_instruction is None:
        raise invalid("a cached content needs contents or a systemInstruction")
    messages = await asyncio.to_thread(to_messages, st, body.contents, body.system_instruction)
    prefix = await asyncio.to_thread(served.prefix, messages)
    if not prefix.ids:
        raise invalid("the cached content is empty (no tokens)")
    if len(prefix.ids) >= served.max_context:
        raise invalid(f"the cached content is {len(prefix.ids):,} tokens; this model's context is "
                      f"{served.max_context:,} tokens, with room needed for the question and answer")  # fmt: skip
    ok, why = st.caches.room_for(prefix.ids)
    if not ok:
        raise ApiError(429, why, headers={"Retry-After": "60"})
    now = time.time()
    record = CacheRecord(new_id(), served.name, body.display_name, len(prefix.ids), now, now, expire)
    await st.caches.pin(record.id, prefix, expire)
    try:
        await asyncio.to_thread(st.store.put_cache, record, messages)
    except BaseException:
        await st.caches.drop(record.id)
        raise
    st.caches.prefixes[record.id] = prefix
    return cache_resource(record)


@router.get("/cachedContents")
async def list_cached_contents(request: Request, page_size: PageSize = None,
                               page_token: PageToken = None) -> dict[str, Any]:  # fmt: skip
    st = state(request)
    await st.caches.sweep()
    offset, limit = page(page_size, page_token, 100, 1000)
    records, next_offset = st.store.list_caches(offset, limit)
    out: dict[str, Any] = {"cachedContents": [cache_resource(r) for r in records]}
    if next_offset is not None:
        out["nextPageToken"] = str(next_offset)
    return out


@router.get("/cachedContents/{cache_id}")
async def get_cached_content(cache_id: str, request: Request) -> dict[str, Any]:
    return cache_resource(await live_cache(state(request), cache_id))


@router.patch("/cachedContents/{cache_id}")
async def update_cached_content(cache_id: str, body: CachedContentUpdate, request: Request) -> dict[str, Any]:
    """Only the expiry can change (ttl or expireTime; no updateMask needed, as google-genai sends none)."""
    st = state(request)
    record = await live_cache(st, cache_id)
    expire = parse_expiry(body.ttl, body.expire_time, None)
    record = st.store.update_cache(record.id, expire) or record
    await st.caches.retime(record.id, expire)
    return cache_resource(record)


@router.delete("/cachedContents/{cache_id}")
async def delete_cached_content(cache_id: str, request: Request) -> dict[str, Any]:
    st = state(request)
    record = await live_cache(st, cache_id)
    st.store.delete_cache(record.id)
    await st.caches.drop(record.id)
    return {}


# ---------------------------------------------------------------------------------------------------------------------
# files


def file_resource(record: FileRecord, base: str, version: str) -> dict[str, Any]:
    out = {
        "name": f"files/{record.id}",
        "mimeType": record.mime_type,
        "sizeBytes": str(record.size_bytes),  # int64 is a string in proto3 JSON
        "createTime": rfc3339(record.create_time),
        "updateTime": rfc3339(record.create_time),
        "sha256Hash": base64.b64encode(record.sha256.encode()).decode(),
        "uri": f"{base}/{version}/files/{record.id}",
        "state": record.state,
        "source": "UPLOADED",
    }
    if record.state == "FAILED":
        out["error"] = {"code": 400, "message": record.error or "the file could not be decoded"}
    if record.display_name:
        out["displayName"] = record.display_name
    return out


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def api_version(request: Request) -> str:
    """v1beta or v1, whichever the client called (its file URIs then point at the same version)."""
    parts = request.url.path.split("/")
    return parts[2] if parts[1] == "upload" else parts[1]


def file_id_param(name: str) -> str:
    file_id = name.removeprefix("files/")
    if not FILE_ID.fullmatch(file_id):
        raise not_found(f"files/{file_id[:80]} not found")
    return file_id


@router.get("/files/{file_id}")
async def get_file(file_id: str, request: Request) -> dict[str, Any]:
    record = state(request).store.get_file(file_id_param(file_id))
    if record is None:
        raise not_found(f"files/{file_id} not found")
    return file_resource(record, base_url(request), api_version(request))


@router.get("/files")
async def list_files(request: Request, page_size: PageSize = None, page_token: PageToken = None) -> dict[str, Any]:
    offset, limit = page(page_size, page_token, 10, 100)
    records, next_offset = state(request).store.list_files(offset, limit)
    out: dict[str, Any] = {"files": [file_resource(r, base_url(request), api_version(request)) for r in records]}
    if next_offset is not None:
        out["nextPageToken"] = str(next_offset)
    return out


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> dict[str, Any]:
    if not state(request).store.delete_file(file_id_param(file_id)):
        raise not_found(f"files/{file_id} not found")
    return {}


def is_media(mime: str) -> bool:
    try:
        modality(mime)
        return True
    except MediaError:
        return False


_checks: set[asyncio.Task] = set()  # running checks (the event loop keeps only weak references to tasks)


def check_media_file(st: State, file_id: str) -> None:
    """PROCESSING -> ACTIVE once the file decodes (checked once, in a worker thread), else FAILED with the reason."""

    def run() -> None:
        record = st.store.get_file(file_id)
        if record is None:
            return
        try:
            media_check(record.mime_type, st.store.read_file(file_id))
            st.store.set_file_state(file_id, "ACTIVE")
        except MediaError as e:
            st.store.set_file_state(file_id, "FAILED", str(e))
        except FileNotFoundError:
            pass  # deleted meanwhile

    task = asyncio.get_running_loop().create_task(asyncio.to_thread(run))
    _checks.add(task)
    task.add_done_callback(_checks.discard)


def _upload_error(code: int, message: str) -> ApiError:
    # Every reply to an upload request carries x-goog-upload-status; without it google-genai retries (with sleeps)
    return ApiError(code, message, headers={"x-goog-upload-status": "final"})


@upload_router.post("/files")
async def upload_file(request: Request, upload_id: str | None = None) -> Response:
    """Google's resumable upload. Start: `X-Goog-Upload-Protocol: resumable`, `X-Goog-Upload-Command: start`,
    `X-Goog-Upload-Header-Content-Length` / `-Content-Type`, body `{"file": {...}}`; the reply's `x-goog-upload-url`
    is where the bytes go (`X-Goog-Upload-Command: upload` / `upload, finalize` / `finalize` / `query` / `cancel`,
    `X-Goog-Upload-Offset`). The upload URL is a capability: it needs no API key, as google-genai sends none."""
    st = state(request)
    if upload_id is not None:
        return await _upload_chunk(st, request, upload_id)
    h = request.headers
    if h.get("x-goog-upload-protocol", "").lower() != "resumable":
        raise invalid("this server takes uploads with the resumable protocol: send X-Goog-Upload-Protocol: "
                      "resumable and X-Goog-Upload-Command: start, then send the bytes to x-goog-upload-url")
    if h.get("x-goog-upload-command", "").lower() != "start":
        raise invalid("X-Goog-Upload-Command must be start to begin an upload")
    meta = FileMetadata()
    raw = await request.body()
    if raw.strip():
        try:
            meta = CreateFileRequest.model_validate(json.loads(raw)).file or FileMetadata()
        except json.JSONDecodeError as e:
            raise invalid(f"the body is not valid JSON: {e}") from None
        except ValidationError as e:
            raise invalid(f"the body is not a file request: {e.errors()[0]['msg']} at "
                          f"{'.'.join(map(str, e.errors()[0]['loc']))}") from None  # fmt: skip
    size_header = h.get("x-goog-upload-header-content-length")
    size = meta.size_bytes
    if size_header is not None:
        if not size_header.strip().isdigit():
            raise invalid(f"X-Goog-Upload-Header-Content-Length {size_header[:40]!r} is not a byte count")
        size = int(size_header)
    if size is not None and size > st.max_file_bytes:
        raise ApiError(413, f"the file is {size:,} bytes; this server takes files up to {st.max_file_bytes:,} bytes")
    mime = h.get("x-goog-upload-header-content-type") or meta.mime_type
    if not mime:
        raise invalid("the file's MIME type is missing (X-Goog-Upload-Header-Content-Type or file.mimeType)")
    file_id = None
    if meta.name:
        file_id = meta.name.removeprefix("files/")
        if not FILE_ID.fullmatch(file_id):
            raise invalid(f"file.name {meta.name[:60]!r}: an id is 1-40 lowercase letters, digits or dashes")
    try:
        token = st.store.start_upload(file_id, meta.display_name, mime, size)
    except FileExistsError:
        raise ApiError(409, f"files/{file_id} already exists") from None
    url = f"{base_url(request)}/upload/{api_version(request)}/files?upload_id={token}&upload_protocol=resumable"
    return JSONResponse({}, headers={"x-goog-upload-url": url, "x-goog-upload-status": "active",
                                     "x-goog-upload-chunk-granularity": str(UPLOAD_CHUNK)})  # fmt: skip


async def _upload_chunk(st: State, request: Request, token: str) -> Response:
    upload = st.store.get_upload(token)
    if upload is None:
        raise _upload_error(404, "no upload in progress at this URL (finished, cancelled, or the server restarted)")
    commands = {c.strip() for c in request.headers.get("x-goog-upload-command", "").lower().split(",") if c.strip()}
    if commands == {"cancel"}:
        st.store.cancel_upload(token)
        return Response(headers={"x-goog-upload-status": "cancelled"})
    if commands == {"query"}:
        received = str(st.store.received(token))
        return Response(headers={"x-goog-upload-status": "active", "x-goog-upload-size-received": received})
    if not commands or not commands <= {"upload", "finalize"}:
        raise _upload_error(400, "X-Goog-Upload-Command must be upload, finalize, 'upload, finalize', query or cancel")
    received = st.store.received(token)
    if "upload" in commands:
        offset = request.headers.get("x-goog-upload-offset", "")
        if not offset.strip().isdigit():
            raise _upload_error(400, f"X-Goog-Upload-Offset {offset[:40]!r} is not a byte offset")
        data = await request.body()
        if received + len(data) > st.max_file_bytes:
            st.store.cancel_upload(token)
            raise _upload_error(413, f"the file is over {st.max_file_bytes:,} bytes, this server's limit")
        try:
            received = await asyncio.to_thread(st.store.write_chunk, token, int(offset), data)
        except StoreError as e:
            raise _upload_error(400, str(e)) from None
    if "finalize" in commands:
        media = is_media(upload.mime_type)
        try:
            record = await asyncio.to_thread(st.store.finalize_upload, token, "PROCESSING" if media else "ACTIVE")
        except StoreError as e:
            raise _upload_error(400, str(e)) from None
        if media:
            check_media_file(st, record.id)
        body = {"file": file_resource(record, base_url(request), api_version(request))}
        return JSONResponse(body, headers={"x-goog-upload-status": "final"})
    return Response(headers={"x-goog-upload-status": "active", "x-goog-upload-size-received": str(received)})
