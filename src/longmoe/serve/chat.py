"""Conversations -> prompt text, with the model's own chat template, rendered as transformers'
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` renders it.

Where the template comes from (first found): `chat_template.jinja` in the model directory, then the
`chat_template` of `tokenizer_config.json` (a string, or a list of named templates of which "default" is used). The
template sees `messages` (a list of `{"role", "content"}` with role system / user / assistant and content a
string), `add_generation_prompt`, `tools` and `documents` (None), and the special tokens of tokenizer_config.json
(`bos_token`, `eos_token`, ...), in the same sandboxed jinja2 environment (trim_blocks, lstrip_blocks,
loopcontrols, `raise_exception`, `strftime_now`, a non-escaping `tojson`). The rendered text is then tokenized
without adding special tokens, as transformers does (the template writes them itself).

The plain template, for a model without one (raw-text base models such as the bundled needle model): the text of
every message in order, system instruction first, separated by one blank line, with no role markers and nothing
added at the end; the text is tokenized as `longmoe generate` tokenizes a prompt. So a single user turn with plain
text becomes exactly that text, and a turn made of files followed by a question becomes what
`longmoe generate --context-file F --prompt Q` reads.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

PLAIN_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{{ message['content'] }}{% endfor %}"
)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TemplateError(ValueError):
    """A chat template that cannot render this conversation (its own `raise_exception`, or a broken template)."""


def _environment() -> ImmutableSandboxedEnvironment:
    # The same environment transformers builds for chat templates (utils/chat_template_utils.py), minus the
    # {% generation %} tracker, which only matters for training masks.
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A compiled chat template plus the special tokens it may use. `plain` is True for the built-in plain one."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, plain: bool = False):
        self.source, self.plain = source, plain
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise TemplateError(f"the chat template does not compile: {e}") from None

    @classmethod
    def for_model(cls, model_dir: str | Path) -> ChatTemplate:
        """The template of a model directory, or the plain template when it has none."""
        model_dir = Path(model_dir)
        config: dict[str, Any] = {}
        cfg_file = model_dir / "tokenizer_config.json"
        if cfg_file.exists():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TemplateError(f"{cfg_file}: not valid JSON ({e})") from None
        special = {}
        for name in SPECIAL_TOKENS:
            value = config.get(name)
            if isinstance(value, dict):  # the AddedToken form {"content": "<s>", ...}
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
        source = None
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.exists():
            source = jinja_file.read_text(encoding="utf-8")
        elif isinstance(config.get("chat_template"), str):
            source = config["chat_template"]
        elif isinstance(config.get("chat_template"), list):  # [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in config["chat_template"] if isinstance(t, dict)}
            source = named.get("default")
        if not source:
            return cls(PLAIN_TEMPLATE, special, plain=True)
        return cls(source, special)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )  # fmt: skip
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(f"the model's chat template cannot render this conversation: {e}") from None
