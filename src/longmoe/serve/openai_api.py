"""The OpenAI-compatible API: /v1/models, /v1/chat/completions and /v1/completions, streamed or not.

/v1/models is also where google-genai (whose default API version is v1) lists models, so its answers carry both
shapes: OpenAI's `data` / `id` fields and Gemini's `models` / `name` fields (each client ignores the other's)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..engine.engine import SamplingParams, Sequence
from .errors import ApiError, invalid
from .gemini_api import engine_failure, model_resource, resolve_model, state, stream_response
from .runtime import Job, ServedModel, State
from .schemas import ChatCompletionRequest, CompletionRequest, SamplingFields

router = APIRouter(prefix="/v1", tags=["openai"])
FINISH_REASON = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}
CREATED = int(time.time())


def model_object(served: ServedModel) -> dict[str, Any]:
    return {"id": served.name, "object": "model", "created": CREATED, "owned_by": "longmoe",
            "max_model_len": served.max_context, **model_resource(served)}  # fmt: skip


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    served = state(request).served
    return {"object": "list", "data": [model_object(served)], "models": [model_resource(served)]}


@router.get("/models/{model}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    return model_object(resolve_model(state(request), model))


def params_of(served: ServedModel, body: SamplingFields, prompt_len: int, max_tokens: int | None,
              logprobs: bool) -> SamplingParams:  # fmt: skip
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise invalid(f"{name} is not supported by this server (leave it unset or 0)", param=name)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise invalid(f"stop takes at most 4 sequences, got {len(stop)}", param="stop")
    return SamplingParams(
        max_new_tokens=served.check_context(prompt_len, max_tokens, "max_tokens"),
        temperature=served.temperature if body.temperature is None else body.temperature,
        top_k=served.top_k(body.top_k),
        top_p=served.top_p if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=[s for s in stop if s],
        logprobs=logprobs,
    )


def usage(job: Job, prompts: int = 1) -> dict[str, Any]:
    per_prompt = len(job.seqs) // prompts
    prompt = sum(len(s.prompt) for s in job.seqs[::per_prompt])
    completion = sum(len(s.output) for s in job.seqs)
    cached = sum(s.num_cached for s in job.seqs[::per_prompt])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


async def finish(st: State, job: Job, request: Request) -> Response | None:
    """Wait for a non-streamed job; a Response to return instead of the answer if it did not complete."""
    if not await st.runner.wait(job, request.is_disconnected):
        if st.runner.past_deadline:
            raise ApiError(503, "the server is shutting down; retry", headers={"Retry-After": "5"})
        return Response(status_code=499)
    failure = engine_failure(job)
    if failure is not None:
        raise failure
    return None


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


ChunkMaker = Callable[[int | None, str | None, str | None], dict[str, Any]]


async def stream_chunks(st: State, job: Job, make_chunk: ChunkMaker, include_usage: bool,
                        usage_of: Callable[[Job], dict[str, Any]]) -> AsyncIterator[bytes]:  # fmt: skip
    """Pieces of text as they come (`make_chunk(index, text, finish_reason)` shapes them), then usage, then [DONE]."""
    ended = [False] * len(job.seqs)
    try:
        while not all(ended):
            await st.runner.changed(job)
            if st.runner.past_deadline:
                yield sse({"error": {"message": "the server is shutting down; the answer is incomplete",
                                     "type": "server_error", "param": None, "code": "shutting_down"}})  # fmt: skip
                return
            failure = engine_failure(job)
            if failure is not None:
                yield sse({"error": {"message": failure.message, "type": "server_error", "param": None,
                                     "code": None}})  # fmt: skip
                return
            for i, s in enumerate(job.seqs):
                if ended[i]:
                    continue
                done = s.finished
                piece = s.take_text()
                if piece:
                    yield sse(make_chunk(i, piece, None))
                if done:
                    ended[i] = True
                    yield sse(make_chunk(i, None, FINISH_REASON[s.finish_reason]))
        if include_usage:
            yield sse(make_chunk(None, None, None) | {"choices": [], "usage": usage_of(job)})
        yield sse("[DONE]")
    finally:
        st.runner.release(job)


def chat_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    messages = []
    for i, m in enumerate(body.messages):
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise invalid(f"messages[{i}].content[{j}] is of type {part.type!r}; this server reads text only",
                                  param=f"messages[{i}].content")  # fmt: skip
                texts.append(part.text)
            content = "".join(texts)
        else:
            content = m.content or ""
        role = "system" if m.role in ("system", "developer") else m.role
        messages.append({"role": role, "content": content})
    return messages


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    st = state(request)
    served = resolve_model(st, body.model)
    if body.tools:
        raise invalid("tools (function calling) are not supported by this server", param="tools")
    if body.response_format and body.response_format.get("type") not in (None, "text"):
        raise invalid(f"response_format {body.response_format.get('type')!r} is not supported (text only)",
                      param="response_format")  # fmt: skip
    if body.top_logprobs:
        raise invalid("top_logprobs (alternatives per token) is not supported; logprobs is", param="top_logprobs")
    ids = await asyncio.to_thread(served.prompt_ids, chat_messages(body))
    params = params_of(served, body, len(ids), body.max_completion_tokens or body.max_tokens, body.logprobs)
    job = st.runner.submit([ids], params, body.n)
    rid, created = f"chatcmpl-{request.state.request_id}", int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.name}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index: int | None, text: str | None, reason: str | None) -> dict[str, Any]:
            if index is None:
                return dict(base)
            delta = {} if text is None else {"role": "assistant", "content": text}
            out = base | {"choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]}
            return out | ({"usage": None} if include_usage else {})

        return stream_response(st, job, stream_chunks(st, job, chunk, include_usage, usage), "text/event-stream")
    try:
        early = await finish(st, job, request)
        if early is not None:
            return early
        choices = []
        for i, s in enumerate(job.seqs):
            lp = None
            if body.logprobs:
                lp = {"content": [{"token": (t := served.tokenizer.decode([tok], skip_special_tokens=False)),
                                   "logprob": p, "bytes": list(t.encode()), "top_logprobs": []}
                                  for tok, p in zip(s.output, s.logprobs)], "refusal": None}  # fmt: skip
            choices.append({"index": i, "message": {"role": "assistant", "content": s.text, "refusal": None},
                            "logprobs": lp, "finish_reason": FINISH_REASON[s.finish_reason]})  # fmt: skip
        return JSONResponse(base | {"object": "chat.completion", "choices": choices, "usage": usage(job)})
    finally:
        st.runner.release(job)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    """Raw-text completion (no chat template): the prompt is read as `longmoe generate` reads it."""
    st = state(request)
    served = resolve_model(st, body.model)
    if body.echo or body.suffix:
        raise invalid("echo and suffix are not supported by this server", param="echo" if body.echo else "suffix")
    if isinstance(body.prompt, str):
        texts: list[str] | None = [body.prompt]
    elif body.prompt and all(isinstance(p, str) for p in body.prompt):
        texts = list(body.prompt)
    else:
        texts = None  # token ids
    if texts is None:
        prompts = [list(body.prompt)]
    else:
        prompts = await asyncio.to_thread(lambda: [served.encode(t) for t in texts])
    if not prompts or any(not p for p in prompts):
        raise invalid("the prompt is empty (no tokens)", param="prompt")
    params = params_of(served, body, max(map(len, prompts)), body.max_tokens, body.logprobs is not None)
    job = st.runner.submit(prompts, params, body.n)
    rid, created = f"cmpl-{request.state.request_id}", int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created, "model": served.name}

    def logprobs_of(s: Sequence) -> dict[str, Any]:
        tokens = [served.tokenizer.decode([t], skip_special_tokens=False) for t in s.output]
        offsets = [sum(map(len, tokens[:i])) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": list(s.logprobs), "top_logprobs": None, "text_offset": offsets}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index: int | None, text: str | None, reason: str | None) -> dict[str, Any]:
            if index is None:
                return dict(base)
            return base | {"choices": [{"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}]}

        return stream_response(st, job, stream_chunks(st, job, chunk, include_usage, lambda j: usage(j, len(prompts))),
                               "text/event-stream")  # fmt: skip
    try:
        early = await finish(st, job, request)
        if early is not None:
            return early
        choices = [{"index": i, "text": s.text, "logprobs": logprobs_of(s) if body.logprobs is not None else None,
                    "finish_reason": FINISH_REASON[s.finish_reason]} for i, s in enumerate(job.seqs)]  # fmt: skip
        return JSONResponse(base | {"choices": choices, "usage": usage(job, len(prompts))})
    finally:
        st.runner.release(job)
