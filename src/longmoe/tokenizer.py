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
    def vocab(self) -> dict[str, int]:
        """Token text -> id, added (special) tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


class Detokenizer:
    """Incremental decoding for streaming: text arrives as tokens do, never splitting a UTF-8 character, and text
    that may turn out to be the start of a stop sequence is held back until it is clear.

    Decoding re-reads only a few tokens per step (the prefix/read offsets of vLLM's detokenizer): O(1) per token."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut before a stop sequence once one is found)
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False
        self._prefix = self._read = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        after = self.tokenizer.decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return  # an unfinished multi-byte character: wait for the next token
        new = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += new
        if self.stop:
            longest = max(map(len, self.stop))
            search_from = max(0, len(self.text) - len(new) - longest + 1)
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True

    def flush(self) -> None:
        """At the end of generation: keep whatever is left undecoded (e.g. invalid UTF-8, shown as U+FFFD)."""
        if not self.stopped and self._read < len(self.ids):
            before = self.tokenizer.decode(self.ids[self._prefix : self._read])
            self.text += self.tokenizer.decode(self.ids[self._prefix :])[len(before) :]
            self._prefix = self._read = len(self.ids)

    def take(self, final: bool = False) -> str:
        """The text not handed out yet, minus a tail that could still grow into a stop sequence (unless final)."""
        end = len(self.text)
        if not final and not self.stopped:
            for s in self.stop:
                for n in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece
