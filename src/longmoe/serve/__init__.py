"""HTTP serving: the Gemini API (v1beta, and v1) that google-genai uses unchanged, an OpenAI-compatible API, and a
playground page, over one model's engine (continuous batching in one process). `longmoe serve --help`.

    app.py         the FastAPI app: middleware (request ids, logs, API key, body limit, metrics), errors, /, /healthz
    gemini_api.py  models, generateContent, streamGenerateContent, countTokens, cachedContents, files + uploads
    openai_api.py  /v1/models, /v1/chat/completions, /v1/completions
    runtime.py     the served model (limits, prompt building), admission and waiting on the engine, pinned caches
    chat.py        chat templates (jinja2, as transformers renders them) and the plain template
    schemas.py     request models (camelCase and snake_case)
    store.py       SQLite + a data directory for files and cached contents
    server.py      uvicorn, binding rules, graceful shutdown
"""

from .app import create_app
from .server import serve

__all__ = ["create_app", "serve"]
