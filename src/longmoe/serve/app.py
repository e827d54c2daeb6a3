"""The FastAPI app: routes from gemini_api and openai_api, and what every request goes through (a request id and a
log line, the API key check, the body size limit, metrics), errors in the shape each API's clients parse, the
playground at /, /healthz, /metrics and /openapi.json."""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..api import Model
from . import gemini_api, openai_api
from .chat import TemplateError
from .errors import ApiError, error_response, speaks_openai
from .metrics import Metrics
from .runtime import Caches, Runner, ServedModel, State
from .store import Store, default_data_dir

log = logging.getLogger("longmoe.serve")
OPEN_PATHS = {"/", "/healthz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/favicon.ico"}
UPLOAD_CHUNK_LIMIT = 16 << 20  # google-genai sends 8 MiB chunks, whatever the JSON body limit is
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
PREFIXES = ("/upload/v1beta", "/upload/v1", "/v1beta", "/v1")  # where routers are included (longest first)


class BodyTooLarge(StarletteHTTPException):
    # An HTTPException, so that FastAPI passes it through while reading the body instead of turning it into a 400
    pass


def key_error(request: Request, given: str | None, expected: str) -> ApiError | None:
    """None if the key matches; else the error Google (or OpenAI, on its routes) answers with."""
    if given is not None and hmac.compare_digest(given.encode(), expected.encode()):
        return None
    if speaks_openai(request):
        if given is None:
            return ApiError(401, "You didn't provide an API key: send it as Authorization: Bearer KEY",
                            openai_code="missing_api_key")  # fmt: skip
        return ApiError(401, "Incorrect API key provided", openai_code="invalid_api_key")
    if given is None:
        return ApiError(403, "Method doesn't allow unregistered callers: send an API key (x-goog-api-key header, "
                        "?key= or Authorization: Bearer)", reason="API_KEY_MISSING")  # fmt: skip
    return ApiError(400, "API key not valid. Please pass a valid API key.", reason="API_KEY_INVALID")


class RequestMiddleware:
    """Pure ASGI (BaseHTTPMiddleware would buffer streams and hide client disconnects from them)."""

    def __init__(self, app: ASGIApp, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        rid = headers.get("x-request-id", "")
        rid = rid if REQUEST_ID.fullmatch(rid) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        status, started = 500, False
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        if scope["method"] in ("POST", "PATCH", "PUT") and not scope["path"].startswith("/upload/"):
            # Bodies are JSON whatever they are labelled: `curl -d` says x-www-form-urlencoded, and Google's API
            # reads them anyway
            if "json" not in headers.get("content-type", ""):
                scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope["headers"].append((b"content-type", b"application/json"))
        query = QueryParams(scope.get("query_string", b""))
        is_chunk = scope["path"].startswith("/upload/") and "upload_id" in query
        limit = max(self.state.max_request_bytes, UPLOAD_CHUNK_LIMIT) if is_chunk else self.state.max_request_bytes
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(413, f"the request body is over {limit:,} bytes, this server's limit")
            return message

        try:
            error = None
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > limit:
                error = ApiError(413, f"the request body is {int(length):,} bytes; this server takes at most "
                                 f"{limit:,} (longmoe serve --max-request-bytes)")  # fmt: skip
            elif self.state.api_key and scope["path"] not in OPEN_PATHS and not is_chunk:
                bearer = headers.get("authorization", "")
                given = headers.get("x-goog-api-key") or query.get("key") or (
                    bearer[7:].strip() if bearer.lower().startswith("bearer ") else None)  # fmt: skip
                error = key_error(Request(scope), given, self.state.api_key)
            if error is not None:
                await error_response(Request(scope), error)(scope, receive, send_with_id)
            else:
                await self.app(scope, limited_receive, send_with_id)
        except Exception:
            # A bug, not bad input (that is a 4xx by now): log it once with its traceback, answer 500, stay up
            log.exception("%s %s %s failed", rid, scope["method"], scope["path"])
            if status == 500 and not started:
                err = ApiError(500, f"internal error (request {rid}); the server logged it")
                await error_response(Request(scope), err)(scope, receive, send_with_id)
        finally:
            ms = (time.perf_counter() - t0) * 1000
            # the path without its query string, which may hold the API key
            log.info("%s %s %s %d %.1fms", rid, scope["method"], scope["path"], status, ms)
            self.state.metrics.requests.labels(route_label(scope), scope["method"], str(status)).inc()


def route_label(scope: Scope) -> str:
    """The route template of a request (/v1beta/models/{model}:generateContent), or "unmatched". FastAPI gives the
    route as declared in its router, without the prefix the router was included under: put that back."""
    route = scope.get("route")
    if route is None:
        return "unmatched"
    path = scope["path"]
    for prefix in PREFIXES:
        if path.startswith(prefix + "/") and route.path_regex.match(path[len(prefix) :]):
            return prefix + route.path
    return route.path


def describe(errors: list[dict[str, Any]]) -> str:
    """A validation error as one line naming each bad field, e.g. "generationConfig.temperature: Input should be
    less than or equal to 2 (got 5)"."""
    out = []
    for e in errors[:5]:
        loc = list(e.get("loc", ()))
        if e.get("type") == "json_invalid":
            return f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})"
        if loc == ["body"] and e.get("type") == "missing":
            return "the request body is missing: send a JSON object"
        path = ""
        for x in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
            path += f"[{x}]" if isinstance(x, int) else (f".{x}" if path else str(x))
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {str(got)[:60]!r})"
        out.append(f"{path or 'body'}: {e.get('msg')}{shown}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(out) + more


def create_app(model: Model, name: str, *, api_key: str | None = None, data_dir: str | Path | None = None,
               max_queue: int = 64, max_request_bytes: int = 64 << 20, max_file_bytes: int = 2 << 30,
               max_output_tokens: int | None = None) -> FastAPI:  # fmt: skip
    """The server for one loaded model. The engine's thread starts and stops with the app (its lifespan)."""
    metrics = Metrics()
    served = ServedModel(model, name, max_output_tokens)
    store = Store(data_dir or default_data_dir())
    runner = Runner(served, metrics, max_queue=max_queue)
    caches = Caches(served, store, runner)
    st = State(served, store, runner, caches, metrics, api_key or None, max_request_bytes, max_file_bytes)
    metrics.bind(lambda: runner.in_flight, runner.queue_depth, runner.kv_blocks, lambda: len(model.engine.pins))
    playground = (resources.files("longmoe.serve") / "static" / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        await caches.sweep()
        for file_id in store.files_in_state("PROCESSING"):  # media whose check a restart interrupted
            gemini_api.check_media_file(st, file_id)
        yield
        await runner.stop()
        store.close()

    app = FastAPI(title="longmoe", version=__version__, lifespan=lifespan,
                  description="Gemini (v1beta) and OpenAI-compatible API over longmoe's engine.")  # fmt: skip
    app.state.longmoe = st
    for prefix in ("/v1beta", "/v1"):
        # v1 copies stay out of the spec: same operations, and google-genai >= 3 calls v1 by default
        app.include_router(gemini_api.router, prefix=prefix, include_in_schema=prefix == "/v1beta")
        app.include_router(gemini_api.upload_router, prefix=f"/upload{prefix}", include_in_schema=prefix == "/v1beta")
    app.include_router(gemini_api.models_router, prefix="/v1beta")
    app.include_router(openai_api.router)
    app.add_middleware(RequestMiddleware, state=st)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return error_response(request, exc)

    @app.exception_handler(TemplateError)
    async def on_template_error(request: Request, exc: TemplateError) -> Response:
        return error_response(request, ApiError(400, str(exc)))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request, ApiError(400, describe(list(exc.errors()))))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path} (see /openapi.json)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(request, ApiError(exc.status_code, message, headers=dict(exc.headers or {})))

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(playground)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> Response:
        body = {"status": "draining" if runner.draining else "ok", "model": served.name, "in_flight": runner.in_flight}
        return JSONResponse(body, status_code=503 if runner.draining else 200)

    @app.get("/metrics", tags=["operations"])
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
