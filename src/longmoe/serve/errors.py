"""HTTP errors in the two shapes clients parse: Google's `{"error": {"code", "message", "status"}}` on Gemini routes
and OpenAI's `{"error": {"message", "type", "param", "code"}}` on OpenAI routes."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

# HTTP status -> google.rpc status name (https://ai.google.dev/gemini-api/docs/troubleshooting)
GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "ALREADY_EXISTS",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
OPENAI_TYPE = {401: "invalid_request_error", 403: "permission_error", 429: "rate_limit_error", 500: "server_error",
               503: "server_error"}  # fmt: skip
GEMINI_ONLY = ("/v1/cachedContents", "/v1/files", "/upload/")
OPENAI_ONLY = ("/v1/chat/", "/v1/completions")


class ApiError(Exception):
    """Raised anywhere in a request to answer with this status and message (never a 500 for bad input)."""

    def __init__(self, code: int, message: str, *, status: str | None = None, reason: str | None = None,
                 openai_code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.code, self.message = code, message
        self.status = status or GOOGLE_STATUS.get(code, "UNKNOWN")
        self.reason, self.openai_code, self.param = reason, openai_code, param
        self.headers = headers or {}


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def not_found(message: str) -> ApiError:
    return ApiError(404, message, openai_code="not_found")


def speaks_openai(request: Request) -> bool:
    """Whether this request gets OpenAI's error shape. /v1/models is shared by both APIs (google-genai uses v1 by
    default): a request carrying a Google key or client header is a Gemini request there."""
    path = request.url.path
    if path.startswith(OPENAI_ONLY):
        return True
    if not path.startswith("/v1/") or path.startswith(GEMINI_ONLY) or ":" in path.rsplit("/", 1)[-1]:
        return False
    h = request.headers
    return not ("x-goog-api-key" in h or "x-goog-api-client" in h or "key" in request.query_params)


class AsciiJSON(JSONResponse):
    """JSON with every non-ASCII character escaped: an error message may quote any input, and must always encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(request: Request, err: ApiError) -> JSONResponse:
    if speaks_openai(request):
        body = {
            "message": err.message,
            "type": OPENAI_TYPE.get(err.code, "invalid_request_error"),
            "param": err.param,
            "code": err.openai_code,
        }
    else:
        body = {"code": err.code, "message": err.message, "status": err.status}
        if err.reason:
            body["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": err.reason,
                                "domain": "googleapis.com"}]  # fmt: skip
    return AsciiJSON({"error": body}, status_code=err.code, headers=err.headers)
