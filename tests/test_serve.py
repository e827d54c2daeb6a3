"""`longmoe serve` driven by the official clients, unmodified: google-genai (generate, stream, countTokens, caches,
files) and openai (chat, completions). Answers are checked against `longmoe.load(...).generate` on the same
prompt (greedy, so equal token for token); 32 concurrent streams against their sequential answers; a restart keeps
files and caches; a client that disconnects frees its KV; chat templates render as transformers renders them."""

from __future__ import annotations

import base64
import io
import json
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from serve_harness import (
    CHAT_TEMPLATE,
    KEY,
    ServerProcess,
    ServerThread,
    build_model,
    metrics,
    rss_bytes,
    sse_events,
    wait_until,
)

import longmoe
from longmoe import cli
from longmoe.serve.chat import ChatTemplate
from longmoe.serve.runtime import ServedModel

DOC = "".join(f"Line {i}: the special magic number of city {i} is {1000 + 37 * i}.\n" for i in range(40))
QUESTION = "What is the special magic number of city 7?"
BLOCK = 256  # the engine's KV block: pinned caches and prefix hits come in whole blocks


def cfg(n: int = 16, **kw) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(max_output_tokens=n, temperature=0, **kw)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def local(model_dir):
    """The same model through the Python API: the reference answers."""
    return longmoe.load(model_dir)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("data"))
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def client(server) -> genai.Client:
    return genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=server.url, timeout=120_000))


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(api_key=KEY, base_url=f"{server.url}/v1", max_retries=0, timeout=120)


# ---------------------------------------------------------------------------------------------------------------------
# google-genai


def test_models_list_and_get(client, server):
    for path in ("/healthz", "/", "/openapi.json"):  # open without a key
        assert httpx.get(server.url + path, timeout=30).status_code == 200
    assert httpx.get(f"{server.url}/healthz", timeout=30).json()["status"] == "ok"
    models = list(client.models.list())
    assert [m.name for m in models] == ["models/tiny"]
    m = client.models.get(model="tiny")
    assert (m.input_token_limit, m.output_token_limit) == (8192, 8192)
    assert {"generateContent", "countTokens", "createCachedContent"} <= set(m.supported_actions)


def test_generate_stream_and_count_equal_the_python_api(client, local):
    prompt = "The special magic number is"
    ref = local.generate(prompt, max_new_tokens=24)
    r = client.models.generate_content(model="tiny", contents=prompt, config=cfg(24))
    assert r.text == ref.text  # the plain template: one user turn is exactly the text `longmoe generate` reads
    u = r.usage_metadata
    assert (u.prompt_token_count, u.candidates_token_count) == (local.count_tokens(prompt), len(ref.token_ids))
    assert u.total_token_count == u.prompt_token_count + u.candidates_token_count
    assert r.candidates[0].finish_reason == (types.FinishReason.MAX_TOKENS if ref.finish_reason == "length"
                                             else types.FinishReason.STOP)  # fmt: skip
    chunks = list(client.models.generate_content_stream(model="tiny", contents=prompt, config=cfg(24)))
    assert len(chunks) > 1 and "".join(c.text or "" for c in chunks) == ref.text
    assert chunks[-1].usage_metadata.candidates_token_count == len(ref.token_ids)
    assert chunks[-1].candidates[0].finish_reason is not None
    assert client.models.count_tokens(model="tiny", contents=prompt).total_tokens == local.count_tokens(prompt)


def test_generation_config(client, local):
    prompt = "Once upon a time"
    ref = local.generate(prompt, max_new_tokens=20)
    stop = next(ch for ch in ref.text[3:] if ch != "\ufffd" and ch.strip())
    r = client.models.generate_content(model="tiny", contents=prompt, config=cfg(20, stop_sequences=[stop]))
    assert r.text == local.generate(prompt, max_new_tokens=20, stop=[stop]).text == ref.text[: ref.text.index(stop)]
    sampled = types.GenerateContentConfig(max_output_tokens=12, temperature=1.0, top_p=0.9, top_k=40, seed=7,
                                          candidate_count=2)  # fmt: skip
    r = client.models.generate_content(model="tiny", contents=prompt, config=sampled)
    for i, c in enumerate(r.candidates):  # candidate i is sampled with seed + i
        want = local.generate(prompt, max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=40, seed=7 + i)
        assert (c.index or 0, c.content.parts[0].text) == (i, want.text)
    r = client.models.generate_content(model="tiny", contents=prompt, config=cfg(8, response_logprobs=True))
    want = local.generate(prompt, max_new_tokens=8, logprobs=True).logprobs
    chosen = r.candidates[0].logprobs_result.chosen_candidates
    assert [c.log_probability for c in chosen] == pytest.approx(want, abs=1e-4)
    assert r.candidates[0].avg_logprobs == pytest.approx(sum(want) / len(want), abs=1e-4)
    safety = [types.SafetySetting(category="HARM_CATEGORY_HARASSMENT", threshold="BLOCK_NONE")]
    assert client.models.generate_content(model="tiny", contents=prompt, config=cfg(20, safety_settings=safety)
                                          ).text == ref.text  # fmt: skip


def test_conversation_with_system_instruction_uses_the_plain_template(client, local):
    contents = [
        types.Content(role="user", parts=[types.Part(text="Hello.")]),
        types.Content(role="model", parts=[types.Part(text="Hi!")]),
        types.Content(role="user", parts=[types.Part(text="Count to three."), types.Part(text=" Go.")]),
    ]
    text = "Be brief.\n\nHello.\n\nHi!\n\nCount to three. Go."  # turns apart by a blank line; parts joined as they are
    r = client.models.generate_content(model="tiny", contents=contents, config=cfg(12, system_instruction="Be brief."))
    assert r.text == local.generate(text, max_new_tokens=12).text
    assert r.usage_metadata.prompt_token_count == local.count_tokens(text)


def test_camel_case_snake_case_and_url_safe_base64(server, local):
    doc = "ü" * 40 + "?>"  # bytes whose base64 uses the URL-safe characters - and _
    b64 = base64.urlsafe_b64encode(doc.encode()).decode().rstrip("=")
    assert "-" in b64 or "_" in b64
    snake = {"contents": [{"role": "user", "parts": [{"inline_data": {"mime_type": "text/plain", "data": b64}},
                                                     {"text": "Why?"}]}],
             "generation_config": {"max_output_tokens": 10, "temperature": 0}, "system_instruction": None}  # fmt: skip
    camel = {"contents": [{"role": "user", "parts": [{"inlineData": {"mimeType": "text/plain",
                                                                     "data": base64.b64encode(doc.encode()).decode()}},
                                                     {"text": "Why?"}]}],
             "generationConfig": {"maxOutputTokens": 10, "temperature": 0},
             "safetySettings": [{"category": "HARM_CATEGORY_HATE_SPEECH", "threshold": "BLOCK_ONLY_HIGH"}]}  # fmt: skip
    url = f"{server.url}/v1beta/models/tiny:generateContent"
    answers = [httpx.post(url, json=b, headers={"x-goog-api-key": KEY}, timeout=60).json() for b in (snake, camel)]
    want = local.generate(doc + "\n\nWhy?", max_new_tokens=10).text  # a document is a paragraph of its own
    assert [a["candidates"][0]["content"]["parts"][0]["text"] for a in answers] == [want, want]


def test_files_upload_get_list_generate_delete(client, local):
    config = types.UploadFileConfig(mime_type="text/plain", display_name="cities.txt")
    f = client.files.upload(file=io.BytesIO(DOC.encode()), config=config)
    assert f.name.startswith("files/") and f.state == types.FileState.ACTIVE and f.size_bytes == len(DOC.encode())
    got = client.files.get(name=f.name)
    assert (got.display_name, got.mime_type, got.uri) == ("cities.txt", "text/plain", f.uri)
    assert f.name in [x.name for x in client.files.list()]
    r = client.models.generate_content(model="tiny", contents=[f, QUESTION], config=cfg(16))
    assert r.text == local.generate(DOC + "\n\n" + QUESTION, max_new_tokens=16).text
    inline = types.Part.from_bytes(data=DOC.encode(), mime_type="text/plain")
    assert client.models.generate_content(model="tiny", contents=[inline, QUESTION], config=cfg(16)).text == r.text
    client.files.delete(name=f.name)
    with pytest.raises(genai_errors.ClientError) as e:
        client.files.get(name=f.name)
    assert e.value.code == 404
    with pytest.raises(genai_errors.ClientError) as e:
        client.models.generate_content(model="tiny", contents=[f, QUESTION], config=cfg(4))
    assert e.value.code == 404 and f.name in e.value.message


def test_caches_create_get_update_list_generate_delete(client, local, server):
    f = client.files.upload(file=io.BytesIO(DOC.encode()), config=types.UploadFileConfig(mime_type="text/plain"))
    pinned_before = metrics(server.url)["longmoe_pinned_caches"]
    cache = client.caches.create(model="tiny", config=types.CreateCachedContentConfig(
        contents=[f], system_instruction="Answer with a number.", display_name="cities", ttl="600s"))  # fmt: skip
    prefix = "Answer with a number.\n\n" + DOC
    total = local.count_tokens(prefix)
    assert cache.usage_metadata.total_token_count == total and total > 2 * BLOCK
    assert metrics(server.url)["longmoe_pinned_caches"] == pinned_before + 1
    got = client.caches.get(name=cache.name)
    assert (got.display_name, got.model, got.expire_time) == ("cities", "models/tiny", cache.expire_time)
    assert cache.name in [c.name for c in client.caches.list()]

    for q in (QUESTION, "And of city 12?"):  # several questions against one cache
        r = client.models.generate_content(model="tiny", contents=q, config=cfg(16, cached_content=cache.name))
        assert r.text == local.generate(prefix + "\n\n" + q, max_new_tokens=16).text  # cache hit == cold run
        u = r.usage_metadata
        assert u.cached_content_token_count == total // BLOCK * BLOCK
        assert u.prompt_token_count == local.count_tokens(prefix + "\n\n" + q)  # includes the cached tokens
    counted = client.models.count_tokens(model="tiny", contents=[QUESTION])
    assert counted.total_tokens == local.count_tokens(QUESTION)

    later = client.caches.update(name=cache.name, config=types.UpdateCachedContentConfig(ttl="7200s"))
    assert 7000 < (later.expire_time - cache.expire_time).total_seconds() + 600 < 7300
    client.caches.delete(name=cache.name)
    assert metrics(server.url)["longmoe_pinned_caches"] == pinned_before
    for call in (lambda: client.caches.get(name=cache.name),
                 lambda: client.models.generate_content(model="tiny", contents=QUESTION,
                                                        config=cfg(4, cached_content=cache.name))):  # fmt: skip
        with pytest.raises(genai_errors.ClientError) as e:
            call()
        assert e.value.code == 404
    client.files.delete(name=f.name)


def test_an_expired_cache_is_gone(client, server):
    pinned = metrics(server.url)["longmoe_pinned_caches"]
    cache = client.caches.create(model="tiny", config=types.CreateCachedContentConfig(contents=[DOC], ttl="1s"))

    def gone() -> bool:
        try:
            client.caches.get(name=cache.name)
            return False
        except genai_errors.ClientError as e:
            return e.code == 404

    wait_until(gone, 30, "the cache to expire")
    assert cache.name not in [c.name for c in client.caches.list()]
    wait_until(lambda: metrics(server.url)["longmoe_pinned_caches"] == pinned, 30, "the engine to unpin it")


# ---------------------------------------------------------------------------------------------------------------------
# openai


def test_openai_chat_streamed_and_not(oai, local):
    messages = [{"role": "system", "content": "You count."}, {"role": "user", "content": "One, two,"}]
    want = local.generate("You count.\n\nOne, two,", max_new_tokens=16)
    r = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (local.count_tokens("You count.\n\nOne, two,"), 16)
    stream = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True,
                                         stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices
    assert [m.id for m in oai.models.list()] == ["tiny"]
    c = oai.completions.create(model="tiny", prompt="The special magic number is", max_tokens=12, temperature=0)
    assert c.choices[0].text == local.generate("The special magic number is", max_new_tokens=12).text


# ---------------------------------------------------------------------------------------------------------------------
# load, disconnects, memory


def long_request() -> dict:
    return {"contents": [{"parts": [{"text": "Tell me a very long story."}]}],
            "generationConfig": {"maxOutputTokens": 4000}}  # fmt: skip


def idle_blocks(url: str) -> float:
    m = metrics(url)
    assert m["longmoe_requests_in_flight"] == 0
    return m["longmoe_kv_blocks_in_use"]


def test_32_concurrent_streams_equal_their_sequential_answers_and_memory_returns(client, server):
    prompts = [f"Request {i}: tell me about {word}" for i, word in
               enumerate(("apples pears plums figs kiwis limes dates grapes " * 4).split())]  # fmt: skip
    sequential = [client.models.generate_content(model="tiny", contents=p, config=cfg(16)).text for p in prompts]
    assert len(set(sequential)) > 16  # distinct answers: crosstalk would show
    blocks = idle_blocks(server.url)

    def stream(p: str) -> str:
        return "".join(c.text or "" for c in client.models.generate_content_stream(model="tiny", contents=p,
                                                                                   config=cfg(16)))  # fmt: skip

    rss = []
    for _ in range(2):  # the first round warms up thread pools and allocator arenas; the second must not grow
        with ThreadPoolExecutor(32) as pool:
            assert list(pool.map(stream, prompts)) == sequential
        assert idle_blocks(server.url) == blocks  # every request's KV blocks are back
        rss.append(rss_bytes(server.pid))
    assert rss[1] - rss[0] < 48 << 20, f"RSS grew by {(rss[1] - rss[0]) >> 20} MiB over a round of 32 streams"


@pytest.fixture(scope="module")
def endless_dir(tmp_path_factory) -> Path:
    """A model with no end-of-sequence token: a request for 4000 tokens is certain to still run when we look."""
    return build_model(tmp_path_factory.mktemp("endless"), eos=False)


def test_a_client_that_disconnects_mid_stream_frees_its_kv(endless_dir, tmp_path):
    srv = ServerThread(longmoe.load(endless_dir), "tiny", tmp_path)
    try:
        blocks = idle_blocks(srv.url)
        with httpx.stream("POST", f"{srv.url}/v1beta/models/tiny:streamGenerateContent?alt=sse", json=long_request(),
                          timeout=60) as response:  # fmt: skip
            events = sse_events(response)  # (kept: a dropped iterator would close the stream)
            assert next(events)["candidates"][0]["content"]["parts"][0]["text"]
            assert metrics(srv.url)["longmoe_kv_blocks_in_use"] > blocks
        wait_until(lambda: metrics(srv.url)["longmoe_requests_in_flight"] == 0, 60, "the request to be cancelled")
        assert idle_blocks(srv.url) == blocks
        assert metrics(srv.url)["longmoe_generated_tokens_total"] < 4000  # ended when the client left, not finished
    finally:
        srv.stop()


def test_beyond_the_queue_bound_requests_get_429_with_retry_after(endless_dir, tmp_path):
    srv = ServerThread(longmoe.load(endless_dir), "tiny", tmp_path, max_queue=1)
    try:
        body = long_request()
        url = f"{srv.url}/v1beta/models/tiny:streamGenerateContent?alt=sse"
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            events = sse_events(response)
            next(events)  # admitted and streaming
            refused = httpx.post(f"{srv.url}/v1beta/models/tiny:generateContent", json=body, timeout=60)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
            chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            refused = httpx.post(f"{srv.url}/v1/chat/completions", json=chat, timeout=60)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        wait_until(lambda: metrics(srv.url)["longmoe_requests_in_flight"] == 0, 60, "the stream to be released")
        body["generationConfig"]["maxOutputTokens"] = 4
        assert httpx.post(f"{srv.url}/v1beta/models/tiny:generateContent", json=body, timeout=60).status_code == 200
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------------------------------
# restart, shutdown, binding


def test_restart_keeps_files_and_caches_and_sigterm_finishes_streams(endless_dir, tmp_path):
    local = longmoe.load(endless_dir)
    data = tmp_path / "data"
    first = ServerProcess(endless_dir, data)
    try:
        c = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=first.url, timeout=120_000))
        f = c.files.upload(file=io.BytesIO(DOC.encode()), config=types.UploadFileConfig(mime_type="text/plain"))
        cache = c.caches.create(model="tiny", config=types.CreateCachedContentConfig(contents=[f], ttl="3600s"))
        # SIGTERM while a stream is running: it still gets its whole answer, then the server exits cleanly
        body = {"contents": [{"parts": [{"text": "Once upon a time"}]}], "generationConfig": {"maxOutputTokens": 64}}
        with httpx.stream("POST", f"{first.url}/v1beta/models/tiny:streamGenerateContent?alt=sse", json=body,
                          headers={"x-goog-api-key": KEY}, timeout=60) as response:  # fmt: skip
            events = sse_events(response)
            text = next(events)["candidates"][0]["content"]["parts"][0]["text"]
            first.proc.send_signal(signal.SIGTERM)
            rest = list(events)
        text += "".join(e["candidates"][0]["content"]["parts"][0]["text"] for e in rest)
        assert rest[-1]["candidates"][0]["finishReason"] == "MAX_TOKENS"
        assert text == local.generate("Once upon a time", max_new_tokens=64).text
        assert first.proc.wait(60) == 0
    finally:
        first.kill()

    second = ServerProcess(endless_dir, data)
    try:
        c = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=second.url, timeout=120_000))
        assert [x.name for x in c.files.list()] == [f.name]
        assert [x.name for x in c.caches.list()] == [cache.name]
        r = c.models.generate_content(model="tiny", contents=QUESTION, config=cfg(12, cached_content=cache.name))
        assert r.text == local.generate(DOC + "\n\n" + QUESTION, max_new_tokens=12).text
        assert r.usage_metadata.cached_content_token_count == local.count_tokens(DOC) // BLOCK * BLOCK  # rebuilt
        f2 = c.files.get(name=f.name)
        assert c.models.generate_content(model="tiny", contents=[f2, QUESTION], config=cfg(12)).text == r.text
    finally:
        second.kill()


def test_unfinished_uploads_are_not_listed_after_a_restart(model_dir, tmp_path):
    data = tmp_path / "data"
    srv = ServerProcess(model_dir, data)
    try:
        h = {"x-goog-api-key": KEY, "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
             "X-Goog-Upload-Header-Content-Length": "100", "X-Goog-Upload-Header-Content-Type": "text/plain"}
        start = httpx.post(f"{srv.url}/upload/v1beta/files", headers=h, json={"file": {"displayName": "half"}})
        part = httpx.post(start.headers["x-goog-upload-url"], content=b"x" * 40,
                          headers={"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "0"})  # fmt: skip
        assert part.headers["x-goog-upload-status"] == "active"
        srv.proc.kill()  # a crash mid-upload
        srv.proc.wait()
    finally:
        srv.kill()
    srv = ServerProcess(model_dir, data)
    try:
        assert httpx.get(f"{srv.url}/v1beta/files", headers={"x-goog-api-key": KEY}).json() == {"files": []}
        assert not any((data / "uploads").iterdir()) and not any((data / "files").iterdir())
        same_url = srv.url + start.headers["x-goog-upload-url"].split("/upload/", 1)[1].join(["/upload/", ""])
        gone = httpx.post(same_url, content=b"x" * 60,
                          headers={"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "40"})
        assert gone.status_code == 404 and gone.headers["x-goog-upload-status"] == "final"
    finally:
        srv.kill()


def test_no_key_on_a_public_address_is_refused(capsys):
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "--insecure-no-auth" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# chat templates


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye\nnow"}],  # fmt: skip
]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("chat"), chat_template=CHAT_TEMPLATE)


@pytest.mark.parametrize("source", ["tokenizer_config.json", "chat_template.jinja"])
def test_chat_template_renders_and_tokenizes_as_transformers(chat_dir, tmp_path, source):
    from transformers import PreTrainedTokenizerFast

    d = chat_dir
    if source == "chat_template.jinja":  # the newer layout: the template in its own file
        d = tmp_path / "m"
        d.mkdir()
        for p in chat_dir.iterdir():
            (d / p.name).write_bytes(p.read_bytes())
        config = json.loads((d / "tokenizer_config.json").read_text())
        (d / "chat_template.jinja").write_text(config.pop("chat_template"))
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), chat_template=CHAT_TEMPLATE,
                                 bos_token="<s>", eos_token="<|im_end|>")  # fmt: skip
    served = ServedModel(longmoe.load(d), "chat")
    assert not served.template.plain
    for messages in CONVERSATIONS:
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert served.template.render(messages) == text
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert served.prompt_ids(messages) == ids


def test_plain_template_without_a_chat_template(model_dir):
    t = ChatTemplate.for_model(model_dir)
    assert t.plain
    assert t.render([{"role": "user", "content": "exactly\n this "}]) == "exactly\n this "
    assert t.render(CONVERSATIONS[1]) == "Be brief.\n\nHi\n\nHello!\n\nBye\nnow"


def test_server_uses_the_chat_template_with_caches(chat_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(chat_dir / "tokenizer.json"), chat_template=CHAT_TEMPLATE,
                                 bos_token="<s>", eos_token="<|im_end|>")  # fmt: skip
    srv = ServerThread(longmoe.load(chat_dir), "chat", tmp_path)
    try:
        c = genai.Client(api_key="unused", http_options=types.HttpOptions(base_url=srv.url, timeout=120_000))
        system = "Answer with a number."
        messages = [{"role": "system", "content": system}, {"role": "user", "content": DOC},
                    {"role": "user", "content": QUESTION}]  # fmt: skip
        want = len(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
        contents = [types.Content(role="user", parts=[types.Part(text=t)]) for t in (DOC, QUESTION)]
        counted = c.models.count_tokens(model="chat", contents=contents)  # the SDK sends no system instruction here
        without_system = hf.apply_chat_template(messages[1:], add_generation_prompt=True)["input_ids"]
        assert counted.total_tokens == len(without_system)
        cold = c.models.generate_content(model="chat", contents=contents, config=cfg(12, system_instruction=system))
        assert cold.usage_metadata.prompt_token_count == want
        cache = c.caches.create(model="chat", config=types.CreateCachedContentConfig(
            contents=[contents[0]], system_instruction=system, ttl="600s"))  # fmt: skip
        hot = c.models.generate_content(model="chat", contents=[contents[1]], config=cfg(12, cached_content=cache.name))
        assert hot.text == cold.text and hot.usage_metadata.prompt_token_count == want
        assert hot.usage_metadata.cached_content_token_count == cache.usage_metadata.total_token_count // BLOCK * BLOCK
        assert hot.usage_metadata.cached_content_token_count > 0
    finally:
        srv.stop()


def test_the_event_loop_answers_while_generations_run(endless_dir, tmp_path):
    """The event loop never waits on the engine: countTokens is answered while a long generation streams."""
    srv = ServerThread(longmoe.load(endless_dir), "tiny", tmp_path)
    try:
        body = long_request()
        with httpx.stream("POST", f"{srv.url}/v1beta/models/tiny:streamGenerateContent?alt=sse", json=body,
                          timeout=60) as response:  # fmt: skip
            events = sse_events(response)
            next(events)
            r = httpx.post(f"{srv.url}/v1beta/models/tiny:countTokens", json={"contents": body["contents"]},
                           timeout=60)  # fmt: skip
            assert r.json()["totalTokens"] == len("Tell me a very long story.")
            assert metrics(srv.url)["longmoe_requests_in_flight"] == 1
    finally:
        srv.stop()
