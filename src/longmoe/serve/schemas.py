"""Request bodies of the Gemini (v1beta) and OpenAI routes, as pydantic models (they are the OpenAPI spec too).

Gemini models accept every field in camelCase (the REST form) and in snake_case (what Google's own samples and the
official client send inside e.g. `inline_data`), at every level; unknown fields are ignored, as the real API ignores
what it does not use. Numbers are checked against the ranges the Gemini and OpenAI APIs document; a boolean is
never taken for a number.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

SURROGATE = re.compile("[\ud800-\udfff]")


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
Seed = Annotated[int, BeforeValidator(_not_bool), Field(ge=-(2**63), le=2**63 - 1)]


def _check_text(value: Any, path: str = "") -> None:
    # JSON can spell a lone UTF-16 surrogate ("\ud800"), which is no text at all: no tokenizer reads it, and it
    # cannot be written back as UTF-8. Refuse it where it comes in, naming the field.
    if isinstance(value, str):
        m = SURROGATE.search(value)
        if m:
            raise ValueError(f"{path or 'a string'} holds a lone surrogate (\\u{ord(m[0]):04x}) at {m.start()}: "
                             "not valid Unicode")  # fmt: skip
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, path)
            _check_text(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, f"{path}[{i}]")


class ValidText:
    """Mixed into each request body: every string in it must be valid Unicode (checked once, on the raw body)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        _check_text(data)
        return data


class GeminiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True, validate_by_alias=True, extra="ignore")


class Blob(GeminiModel):
    mime_type: str
    data: str = Field(description="base64, standard or URL-safe alphabet")


class FileData(GeminiModel):
    mime_type: str | None = None
    file_uri: str = Field(description="the `uri` of an uploaded file (or files/ID)")


class VideoMetadata(GeminiModel):
    start_offset: str | None = Field(None, description="a duration, e.g. '10s'")
    end_offset: str | None = Field(None, description="a duration, e.g. '70.5s'")
    fps: Float | None = Field(None, gt=0, le=24, description="frames sampled per second (default 2)")


class Part(GeminiModel):
    text: str | None = None
    inline_data: Blob | None = None
    file_data: FileData | None = None
    video_metadata: VideoMetadata | None = None
    thought: bool | None = None


class Content(GeminiModel):
    role: Literal["user", "model"] | None = None
    parts: list[Part] = Field(default_factory=list)


class GenerationConfig(GeminiModel):
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, gt=0, le=1)
    top_k: Int | None = Field(None, ge=1)
    candidate_count: Int | None = Field(None, ge=1, le=8)
    max_output_tokens: Int | None = Field(None, ge=1)
    stop_sequences: list[str] | None = Field(None, max_length=5)
    seed: Seed | None = None
    response_logprobs: bool | None = None
    logprobs: Int | None = Field(None, ge=0, le=20)
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    response_mime_type: str | None = None
    response_schema: Any = None
    response_json_schema: Any = None
    response_modalities: list[str] | None = None


class SafetySetting(GeminiModel):
    category: str | None = None
    threshold: str | None = None


class GenerateContentRequest(GeminiModel, ValidText):
    contents: list[Content] = Field(default_factory=list)
    system_instruction: Content | None = None
    generation_config: GenerationConfig | None = None
    safety_settings: list[SafetySetting] | None = Field(None, description="accepted and ignored")
    tools: list[dict[str, Any]] | None = None
    tool_config: dict[str, Any] | None = None
    cached_content: str | None = Field(None, description="cachedContents/ID: its contents come first")
    model: str | None = None


class CountTokensRequest(GeminiModel, ValidText):
    contents: list[Content] | None = None
    generate_content_request: GenerateContentRequest | None = None


class CachedContentCreate(GeminiModel, ValidText):
    model: str
    contents: list[Content] = Field(default_factory=list)
    system_instruction: Content | None = None
    tools: list[dict[str, Any]] | None = None
    tool_config: dict[str, Any] | None = None
    display_name: str | None = Field(None, max_length=128)
    ttl: str | None = Field(None, description='a duration such as "300s" (default 3600s)')
    expire_time: str | None = Field(None, description="RFC 3339; UTC when it has no offset")


class CachedContentUpdate(GeminiModel, ValidText):
    ttl: str | None = None
    expire_time: str | None = None


class FileMetadata(GeminiModel):
    name: str | None = None
    display_name: str | None = Field(None, max_length=512)
    mime_type: str | None = None
    size_bytes: Int | None = Field(None, ge=0)


class CreateFileRequest(GeminiModel, ValidText):
    file: FileMetadata | None = None


# ---------------------------------------------------------------------------------------------------------------------
# OpenAI


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(OpenAIModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class SamplingFields(OpenAIModel, ValidText):
    model: str
    max_tokens: Int | None = Field(None, ge=1)
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, gt=0, le=1)
    top_k: Int | None = Field(None, ge=1, description="an extension (as in vLLM)")
    n: Int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: Float | None = Field(None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(None, ge=-2, le=2)
    user: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[Int]
    max_tokens: Int | None = Field(16, ge=1)
    logprobs: Int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
