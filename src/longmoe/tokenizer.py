"""Text <-> token ids through the `tokenizers` library (the tokenizer.json every transformers model ships)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _Tokenizer

from .checkpoint import CheckpointError


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._tok = _Tokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises a bare Exception on bad files
            raise CheckpointError(f"{self.path}: cannot read tokenizer ({e})") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def incremental_text(tokenizer: Tokenizer, ids: list[int], emitted: str) -> str:
    """The text that decoding `ids` adds after `emitted`, held back while it ends in a partial UTF-8 character."""
    text = tokenizer.decode(ids)
    if text.endswith("\ufffd") or not text.startswith(emitted):
        return ""
    return text[len(emitted) :]
