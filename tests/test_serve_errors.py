"""Bad input never gets a 500 and never takes the server down: a table of kinds of bad requests, each answered with
the right status and the error shape its API's clients parse (a normal request after each still works), and a
property-based fuzz run from the server's own /openapi.json (schemathesis) that finds no server error."""

from __future__ import annotations

import base64

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from serve_harness import KEY, ServerProcess, build_model

G = "/v1beta/models/tiny"
H = {"x-goog-api-key": KEY}
OK_PART = {"parts": [{"text": "ok"}]}


def gen(**extra) -> dict:
    return {"contents": [OK_PART], "generationConfig": {"maxOutputTokens": 2}, **extra}


def cfg(**config) -> dict:
    return {"contents": [OK_PART], "generationConfig": {"maxOutputTokens": 2, **config}}


def text_part(part: dict) -> dict:
    return {"contents": [{"parts": [part]}], "generationConfig": {"maxOutputTokens": 2}}


UPLOAD = {"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
          "X-Goog-Upload-Header-Content-Length": "10", "X-Goog-Upload-Header-Content-Type": "text/plain"}  # fmt: skip
OAI = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

# (what, method, path, request options, HTTP status, Google status or "openai", text the message must contain)
CASES = [
    ("malformed JSON", "POST", f"{G}:generateContent", {"content": b'{"contents": [', "headers": H}, 400,
     "INVALID_ARGUMENT", "not valid JSON"),
    ("a JSON array, not an object", "POST", f"{G}:generateContent", {"json": [1, 2]}, 400, "INVALID_ARGUMENT", ""),
    ("no body", "POST", f"{G}:generateContent", {}, 400, "INVALID_ARGUMENT", "body is missing"),
    ("contents is a string", "POST", f"{G}:generateContent", {"json": {"contents": "hi"}}, 400,
     "INVALID_ARGUMENT", "contents"),
    ("a part's text is a number", "POST", f"{G}:generateContent", {"json": text_part({"text": 5})}, 400,
     "INVALID_ARGUMENT", "text"),
    ("unknown role", "POST", f"{G}:generateContent", {"json": {"contents": [{"role": "robot", **OK_PART}]}}, 400,
     "INVALID_ARGUMENT", "role"),
    ("empty contents", "POST", f"{G}:generateContent", {"json": {"contents": []}}, 400, "INVALID_ARGUMENT",
     "contents is empty"),
    ("a content without parts", "POST", f"{G}:generateContent", {"json": {"contents": [{"role": "user"}]}}, 400,
     "INVALID_ARGUMENT", "contents[0] has no parts"),
    ("a function call part", "POST", f"{G}:generateContent",
     {"json": text_part({"functionCall": {"name": "f", "args": {}}})}, 400, "INVALID_ARGUMENT", "contents[0].parts[0]"),
    ("a part with text and inlineData", "POST", f"{G}:generateContent",
     {"json": text_part({"text": "a", "inlineData": {"mimeType": "text/plain", "data": "YQ=="}})}, 400,
     "INVALID_ARGUMENT", "exactly one"),
    ("bad base64", "POST", f"{G}:generateContent",
     {"json": text_part({"inlineData": {"mimeType": "text/plain", "data": "%%%not base64%%%"}})}, 400,
     "INVALID_ARGUMENT", "base64"),
    ("an image for a text-only model", "POST", f"{G}:generateContent",
     {"json": text_part({"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}})}, 400,
     "INVALID_ARGUMENT", "contents[0].parts[0].inlineData"),
    ("inline text that is not UTF-8", "POST", f"{G}:generateContent",
     {"json": text_part({"inlineData": {"mimeType": "text/plain", "data": base64.b64encode(b"\xff\xfe").decode()}})},
     400, "INVALID_ARGUMENT", "not UTF-8"),
    ("a lone surrogate", "POST", f"{G}:countTokens", {"content": b'{"contents": [{"parts": [{"text": "a\\ud800"}]}]}'},
     400, "INVALID_ARGUMENT", "surrogate"),
    ("unknown model", "POST", "/v1beta/models/nope:generateContent", {"json": gen()}, 404, "NOT_FOUND",
     "models/nope"),
    ("unknown cached content", "POST", f"{G}:generateContent", {"json": gen(cachedContent="cachedContents/nope")},
     404, "NOT_FOUND", "cachedContents/nope"),
    ("unknown file", "POST", f"{G}:generateContent",
     {"json": text_part({"fileData": {"fileUri": "files/nope1", "mimeType": "text/plain"}})}, 404, "NOT_FOUND",
     "files/nope1"),
    ("a fileUri that names no file", "POST", f"{G}:generateContent",
     {"json": text_part({"fileData": {"fileUri": "https://example.com/x.txt"}})}, 400, "INVALID_ARGUMENT",
     "does not name a file"),
    ("a prompt over the context", "POST", f"{G}:generateContent",
     {"json": {"contents": [{"parts": [{"text": "x" * 9000}]}]}}, 400, "INVALID_ARGUMENT", "context"),
    ("maxOutputTokens over outputTokenLimit", "POST", f"{G}:generateContent", {"json": cfg(maxOutputTokens=65)},
     400, "INVALID_ARGUMENT", "outputTokenLimit"),
    ("temperature out of range", "POST", f"{G}:generateContent", {"json": cfg(temperature=5)}, 400,
     "INVALID_ARGUMENT", "temperature"),
    ("temperature as a string", "POST", f"{G}:generateContent", {"json": cfg(temperature="hot")}, 400,
     "INVALID_ARGUMENT", "temperature"),
    ("NaN temperature", "POST", f"{G}:generateContent",
     {"content": b'{"contents": [{"parts": [{"text": "a"}]}], "generationConfig": {"temperature": NaN}}'}, 400,
     "INVALID_ARGUMENT", "temperature"),
    ("topP of 0", "POST", f"{G}:generateContent", {"json": cfg(topP=0)}, 400, "INVALID_ARGUMENT", "topP"),
    ("topK of 0", "POST", f"{G}:generateContent", {"json": cfg(topK=0)}, 400, "INVALID_ARGUMENT", "topK"),
    ("maxOutputTokens as a boolean", "POST", f"{G}:generateContent", {"json": cfg(maxOutputTokens=True)}, 400,
     "INVALID_ARGUMENT", "maxOutputTokens"),
    ("nine candidates", "POST", f"{G}:generateContent", {"json": cfg(candidateCount=9)}, 400, "INVALID_ARGUMENT",
     "candidateCount"),
    ("six stop sequences", "POST", f"{G}:generateContent", {"json": cfg(stopSequences=list("abcdef"))}, 400,
     "INVALID_ARGUMENT", "stopSequences"),
    ("a fractional seed", "POST", f"{G}:generateContent", {"json": cfg(seed=1.5)}, 400, "INVALID_ARGUMENT", "seed"),
    ("JSON output (unsupported)", "POST", f"{G}:generateContent", {"json": cfg(responseMimeType="application/json")},
     400, "INVALID_ARGUMENT", "responseMimeType"),
    ("a presence penalty (unsupported)", "POST", f"{G}:generateContent", {"json": cfg(presencePenalty=1.0)}, 400,
     "INVALID_ARGUMENT", "presencePenalty"),
    ("tools (unsupported)", "POST", f"{G}:generateContent", {"json": gen(tools=[{"functionDeclarations": []}])}, 400,
     "INVALID_ARGUMENT", "tools"),
    ("a stream with bad settings", "POST", f"{G}:streamGenerateContent?alt=sse", {"json": cfg(temperature=9)}, 400,
     "INVALID_ARGUMENT", "temperature"),
    ("countTokens with contents and a request", "POST", f"{G}:countTokens",
     {"json": {"contents": [OK_PART], "generateContentRequest": {"contents": [OK_PART]}}}, 400, "INVALID_ARGUMENT",
     "not both"),
    ("a body over the size limit", "POST", f"{G}:countTokens",
     {"json": {"contents": [{"parts": [{"text": "x" * (1 << 20)}]}]}}, 413, "INVALID_ARGUMENT", "bytes"),
    ("no API key", "POST", f"{G}:countTokens", {"json": {"contents": [OK_PART]}, "headers": {}}, 403,
     "PERMISSION_DENIED", "API key"),
    ("a wrong API key", "POST", f"{G}:countTokens",
     {"json": {"contents": [OK_PART]}, "headers": {"x-goog-api-key": "x"}}, 400, "INVALID_ARGUMENT", "not valid"),
    ("a wrong ?key=", "GET", "/v1beta/models?key=nope", {"headers": {}}, 400, "INVALID_ARGUMENT", "API key"),
    ("unknown route", "GET", "/v1beta/nothing/here", {}, 404, "NOT_FOUND", "/v1beta/nothing/here"),
    ("wrong method", "PUT", "/v1beta/cachedContents", {"json": {}}, 405, "UNIMPLEMENTED", "PUT"),
    ("cache with a bad ttl", "POST", "/v1beta/cachedContents",
     {"json": {"model": "models/tiny", "contents": [OK_PART], "ttl": "soon"}}, 400, "INVALID_ARGUMENT", "ttl"),
    ("cache expiring in the past", "POST", "/v1beta/cachedContents",
     {"json": {"model": "models/tiny", "contents": [OK_PART], "expireTime": "2001-01-01T00:00:00Z"}}, 400,
     "INVALID_ARGUMENT", "in the past"),
    ("cache for an unknown model", "POST", "/v1beta/cachedContents",
     {"json": {"model": "models/nope", "contents": [OK_PART]}}, 404, "NOT_FOUND", "models/nope"),
    ("cache with nothing in it", "POST", "/v1beta/cachedContents", {"json": {"model": "models/tiny"}}, 400,
     "INVALID_ARGUMENT", "needs contents"),
    ("get an unknown cache", "GET", "/v1beta/cachedContents/nope", {}, 404, "NOT_FOUND", "cachedContents/nope"),
    ("update an unknown cache", "PATCH", "/v1beta/cachedContents/nope", {"json": {"ttl": "5s"}}, 404, "NOT_FOUND",
     "cachedContents/nope"),
    ("delete an unknown file", "DELETE", "/v1beta/files/nope", {}, 404, "NOT_FOUND", "files/nope"),
    ("a garbage pageToken", "GET", "/v1beta/files?pageToken=zz", {}, 400, "INVALID_ARGUMENT", "pageToken"),
    ("an upload without the resumable protocol", "POST", "/upload/v1beta/files", {"content": b"abc"}, 400,
     "INVALID_ARGUMENT", "resumable"),
    ("an upload too large for the server", "POST", "/upload/v1beta/files",
     {"headers": H | UPLOAD | {"X-Goog-Upload-Header-Content-Length": str(3 << 30)}}, 413, "INVALID_ARGUMENT",
     "bytes"),
    ("bytes for an unknown upload", "POST", "/upload/v1beta/files?upload_id=nope",
     {"content": b"abc", "headers": {"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"}},
     404, "NOT_FOUND", "no upload"),
    # OpenAI routes answer in OpenAI's shape
    ("chat: no messages", "POST", "/v1/chat/completions", {"json": CHAT | {"messages": []}, "headers": OAI}, 400,
     "openai", "messages"),
    ("chat: unknown model", "POST", "/v1/chat/completions", {"json": CHAT | {"model": "gpt-9"}, "headers": OAI}, 404,
     "openai", "gpt-9"),
    ("chat: a wrong key", "POST", "/v1/chat/completions", {"json": CHAT, "headers": {"Authorization": "Bearer x"}},
     401, "openai", "Incorrect API key"),
    ("chat: n of 9", "POST", "/v1/chat/completions", {"json": CHAT | {"n": 9}, "headers": OAI}, 400, "openai", "n"),
    ("chat: an image part", "POST", "/v1/chat/completions",
     {"json": CHAT | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
      "headers": OAI}, 400, "openai", "image_url"),
    ("chat: max_tokens 0", "POST", "/v1/chat/completions", {"json": CHAT | {"max_tokens": 0}, "headers": OAI}, 400,
     "openai", "max_tokens"),
    ("completions: a token id outside the vocabulary", "POST", "/v1/completions",
     {"json": {"model": "tiny", "prompt": [1, 99999], "max_tokens": 2}, "headers": OAI}, 400, "openai",
     "vocabulary"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = build_model(tmp_path_factory.mktemp("tiny"))
    srv = ServerProcess(model, tmp_path_factory.mktemp("data"), "--max-request-bytes", str(1 << 20),
                        "--max-output-tokens", "64")  # fmt: skip
    yield srv
    srv.kill()


def still_works(url: str) -> None:
    r = httpx.post(f"{url}{G}:generateContent", json=gen(), headers=H, timeout=60)
    assert r.status_code == 200 and r.json()["usageMetadata"]["candidatesTokenCount"] >= 1


def test_the_table_has_enough_kinds():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("what,method,path,options,status,google_status,mentions", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_the_right_error(server, what, method, path, options, status, google_status, mentions):
    options = dict(options)
    headers = options.pop("headers", H)
    r = httpx.request(method, f"{server.url}{path}", headers=headers, timeout=60, **options)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    if google_status == "openai":
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["type"], str)
    else:
        assert (error["code"], error["status"]) == (status, google_status)
        assert set(error) <= {"code", "message", "status", "details"}
    assert error["message"] and mentions in error["message"], error["message"]
    still_works(server.url)


def test_a_cache_cannot_be_combined_with_a_system_instruction(server):
    body = {"model": "models/tiny", "contents": [{"parts": [{"text": "a document " * 30}]}], "ttl": "60s"}
    cache = httpx.post(f"{server.url}/v1beta/cachedContents", json=body, headers=H, timeout=60).json()["name"]
    r = httpx.post(f"{server.url}{G}:generateContent", headers=H, timeout=60,
                   json=gen(cachedContent=cache, systemInstruction={"parts": [{"text": "no"}]}))  # fmt: skip
    assert r.status_code == 400 and "cachedContent" in r.json()["error"]["message"]
    assert httpx.delete(f"{server.url}/v1beta/{cache}", headers=H).json() == {}
    still_works(server.url)


# ---------------------------------------------------------------------------------------------------------------------
# fuzzing from the OpenAPI spec


def test_fuzz_openapi_finds_no_server_error(server):
    """Every operation in /openapi.json with generated requests that fit the schema and requests that break it (a
    model path parameter is also tried as the served model, to reach generation): never a 5xx, and the server stays
    up. Derandomized and bounded (a few hundred requests), so the run is the same each time."""
    api = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    sent: list[str] = []
    assert len(operations) >= 18
    for operation in operations:
        fixed = [{}] + ([{"model": "tiny"}] if "{model}" in operation.path else [])
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for path_parameters in fixed:
                strategy = operation.as_strategy(mode, path_parameters=path_parameters or None)

                @given(case=strategy)
                @settings(max_examples=10, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck), phases=[Phase.generate])  # fmt: skip
                def run(case) -> None:
                    sent.append(f"{case.method} {case.formatted_path}")
                    case.call_and_validate(base_url=server.url, headers=H, checks=[not_a_server_error], timeout=60)

                try:
                    run()
                except Unsatisfiable:  # nothing in this operation can be made invalid (e.g. GET /healthz)
                    assert mode == GenerationMode.NEGATIVE, operation.path
    assert len(sent) > 200
    still_works(server.url)
