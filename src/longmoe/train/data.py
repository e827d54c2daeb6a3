"""Training data: documents from text files, JSONL, source trees (or the docs that ship with Python), tokenized and
packed into rows whose positions restart at every document (so attention never crosses documents), mixed with
synthetic long-context tasks at a set ratio.

Everything is streamed and deterministic for a seed: row i is synthetic or not by a hash of (seed, i); synthetic row
i is a pure function of (seed, i); real rows come from a document stream whose position (epoch, file, item) and
the packer's leftover tokens make up `state_dict()`, saved in every checkpoint.
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import os
import random
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ..corpora import python_docs_text, python_stdlib_files, source_files
from ..model.config import ConfigError
from ..tasks import ANSWER_PREFIX, CITIES, NEEDLE, QUESTION, TRAIN_TASKS
from ..tokenizer import Tokenizer
from .config import DataConfig
from .synthetic import copy_row, retrieval_row

TEXT_CHUNK = 1 << 20  # large text files become documents of ~1 MB, split at line breaks
MIN_DOCUMENTS = 20  # fewer documents than this: text files are read as PIECE-character pieces (see Documents)
PIECE = 8192
EOS = "<eos>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer(path: Path) -> None:
    """A tokenizer.json with one token per byte (id = byte value) and <eos> = 256: any text, no training."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    tok.save(str(path))


def bpe_tokenizer(path: Path, vocab_size: int, texts: Iterator[str]) -> None:
    """Byte-level BPE trained on `texts` plus the synthetic tasks' phrases (so a city is one token)."""
    from tokenizers import trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    phrases = [
        f"{NEEDLE.format(city=c, value=1234567)} {QUESTION.format(city=c)} {ANSWER_PREFIX.format(city=c)}"
        for c in CITIES
    ] * 20
    tok.train_from_iterator(itertools.chain(texts, phrases), trainer)
    tok.save(str(path))


def make_tokenizer(cfg: DataConfig, out_dir: Path) -> Tokenizer:
    """The run's tokenizer, copied into out_dir/tokenizer.json so checkpoints and exports are self-contained."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "tokenizer.json"
    if cfg.tokenizer == "bytes":
        if not target.exists():
            byte_tokenizer(target)
    elif cfg.tokenizer.startswith("bpe:"):
        try:
            vocab = int(cfg.tokenizer[4:])
        except ValueError:
            raise ConfigError(f"data.tokenizer = {cfg.tokenizer!r}: write bpe:<vocab size>, e.g. bpe:2048") from None
        if not target.exists():
            docs = iter(Documents(cfg.sources, cfg.seed, cfg.heldout_percent, "train"))
            budget = [8 << 20]  # train on the first ~8 MB of the training documents

            def texts() -> Iterator[str]:
                for text in docs:
                    if budget[0] <= 0:
                        return
                    budget[0] -= len(text)
                    yield text

            bpe_tokenizer(target, vocab, texts())
    else:
        src = Path(cfg.tokenizer)
        if not src.exists():
            raise ConfigError(f"data.tokenizer = {cfg.tokenizer!r}: no such file (use 'bytes' or a tokenizer.json)")
        if src.resolve() != target.resolve():
            target.write_bytes(src.read_bytes())
    return Tokenizer(target)


def eos_id(tok: Tokenizer) -> int:
    for name in (EOS, "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>"):
        i = tok._tok.token_to_id(name)
        if i is not None:
            return i
    raise ConfigError(f"{tok.path}: no end-of-document token (<eos>, </s>, <|endoftext|>) in the vocabulary")


def expand_sources(sources: list[str]) -> list[str]:
    """Files in a fixed order: 'python-docs' (the English docs shipped with Python), 'python-stdlib' (its standard
    library's source), JSONL/text files, globs, and directories (source files inside)."""
    out: list[str] = []
    for s in sources:
        if s == "python-docs":
            out.append(s)
            continue
        if s == "python-stdlib":
            out += python_stdlib_files()
            continue
        p = Path(s)
        if p.is_dir():
            out += [str(f) for f in source_files(p)]
        elif any(ch in s for ch in "*?["):
            out += sorted(glob.glob(s, recursive=True))
        elif p.is_file():
            out.append(str(p))
        else:
            raise ConfigError(f"data.sources: {s!r} does not exist")
    if not out:
        raise ConfigError(f"data.sources {sources} contain no files")
    return out


class Documents:
    """Documents in a seeded order, epoch after epoch, for one split ('train' or 'heldout')."""

    def __init__(self, sources: list[str], seed: int, heldout_percent: float, split: str = "train"):
        self.files = expand_sources(sources)
        self.seed, self.heldout_percent, self.split = seed, heldout_percent, split
        self.state = {"epoch": 0, "file": 0, "item": 0}
        # With few documents (one text file, say) a per-document split can leave held-out empty: split them into
        # pieces of PIECE characters and assign the pieces instead.
        self.pieces = self._count_items() < MIN_DOCUMENTS

    def _count_items(self) -> int:
        n = 0
        for name in self.files:
            if name == "python-docs":
                n += len(python_docs_text())
            elif name.endswith(".jsonl"):
                with open(name, encoding="utf-8", errors="replace") as f:
                    n += sum(1 for line in f if line.strip())
            else:
                n += max(1, -(-os.path.getsize(name) // TEXT_CHUNK))
            if n >= MIN_DOCUMENTS:
                break
        return n

    def _order(self, epoch: int) -> list[str]:
        files = list(self.files)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(files)
        return files

    def _items(self, name: str) -> Iterator[str]:
        if name == "python-docs":
            yield from python_docs_text()
        elif name.endswith(".jsonl"):
            with open(name, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise ConfigError(f"{name}:{n}: not valid JSON ({e})") from None
                        yield str(row.get("text") or row.get("content") or "")
        else:
            with open(name, encoding="utf-8", errors="replace") as f:
                while block := f.read(PIECE if self.pieces else TEXT_CHUNK):
                    rest = f.readline()  # finish the line
                    yield block + rest

    def _keep(self, name: str, item: int) -> bool:
        held = zlib.crc32(f"{name}:{item}".encode()) % 10_000 < self.heldout_percent * 100
        return held == (self.split == "heldout")

    def __iter__(self) -> Iterator[str]:
        empty_epochs = 0
        while True:
            order = self._order(self.state["epoch"])
            produced = False
            while self.state["file"] < len(order):
                name = order[self.state["file"]]
                for item, text in enumerate(self._items(name)):
                    if item < self.state["item"]:
                        continue
                    self.state["item"] = item + 1
                    if text and self._keep(name, item):
                        produced = True
                        yield text
                self.state["file"] += 1
                self.state["item"] = 0
            self.state = {"epoch": self.state["epoch"] + 1, "file": 0, "item": 0}
            empty_epochs = 0 if produced else empty_epochs + 1
            if empty_epochs >= 2:
                raise ConfigError(f"data: no {self.split} documents in {self.files[:3]}...")


class Batches:
    """Rows of seq_len + 1 tokens: `next(batch_size, seq_len)` -> input_ids, positions, targets, loss mask."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, split: str = "train"):
        self.cfg, self.tok = cfg, tokenizer
        self.eos = eos_id(tokenizer)
        self.docs = Documents(cfg.sources, cfg.seed, cfg.heldout_percent, split)
        self.stream = iter(self.docs)
        self.buffer: list[tuple[int, int]] = []  # (token, starts a document) carried over to the next row
        self.row = 0  # rows produced so far (synthetic and real)
        self._haystack: list[str] | None = None  # (before the checks: a retrieval task's fit needs it)
        self.synthetic = split == "train" and cfg.synthetic_ratio > 0
        if self.synthetic:
            self._check_tasks_fit(cfg.seq_len)
        self.synthetic_batches = 0  # long synthetic micro-batches produced so far (data.synthetic_rows)
        if split == "train" and cfg.synthetic_rows:
            self._check_tasks_fit(cfg.synthetic_lengths[0])

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def _real_row(self, n: int) -> list[tuple[int, int, int]]:
        while len(self.buffer) < n:
            ids = self.tok.encode(next(self.stream), add_special_tokens=False) + [self.eos]
            self.buffer += [(t, int(i == 0)) for i, t in enumerate(ids)]
        row, self.buffer = self.buffer[:n], self.buffer[n:]
        out, pos = [], 0
        for i, (t, doc_start) in enumerate(row):
            # positions restart with each document (and at the row start, for a document continued from the
            # previous row); a document's first token is not a target: nothing before it is visible
            pos = 0 if (doc_start and self.cfg.document_masking) or i == 0 else pos + 1
            out.append((t, pos, 1 - doc_start))
        return out

    def _check_tasks_fit(self, seq_len: int) -> None:
        """A synthetic row too short for its question and answer has nothing to learn: fail before training."""
        for name in self.cfg.synthetic_tasks:
            rows = [self._synthetic_row(random.Random(i), seq_len + 1, name) for i in range(8)]
            answered = sum(sum(mark for _, _, mark in row) > 1 for row in rows)  # more targets than the final <eos>
            if answered < 4:
                raise ConfigError(
                    f"data.seq_len = {seq_len} is too short for the synthetic task {name!r} with this tokenizer: "
                    f"{8 - answered} of 8 sample rows have no room for the question and answer. Raise data.seq_len "
                    "or set data.synthetic_ratio = 0"
                )

    def haystack(self) -> list[str]:
        """The training documents, in memory: haystacks of the 'retrieval' task (read once, on first use)."""
        if self._haystack is None:
            docs = Documents(self.cfg.sources, self.cfg.seed, self.cfg.heldout_percent, "train")
            self._haystack = []
            for text in docs:
                if docs.state["epoch"] > 0:
                    break
                self._haystack.append(text)
        return self._haystack

    def _synthetic_row(self, rng: random.Random, n: int, name: str | None = None) -> list[tuple[int, int, int]]:
        """A synthetic task, then its question and answer, then the same question for every other fact planted in
        the context (distractor needles too): several retrievals to learn from per row. Only the question/answer
        text is a target, not the haystack."""
        name = name or rng.choice(self.cfg.synthetic_tasks)
        if name in ("retrieval", "copy"):
            encode = lambda t: self.tok.encode(t, add_special_tokens=False)  # noqa: E731
            if name == "retrieval":
                c = self.cfg
                ids, marks = retrieval_row(rng, n, encode, self.eos, self.haystack(), c.retrieval_facts,
                                           c.retrieval_repeat_digits)  # fmt: skip
            else:
                ids, marks = copy_row(rng, n, encode, self.eos, self.haystack())
            return [(t, i, m) for i, (t, m) in enumerate(zip(ids, marks))]
        task = TRAIN_TASKS[name](rng, n * 2 // 3, self.count)
        qa = [f"\n{task.question} {task.answer_prefix} {', '.join(task.answers)}."]
        facts = task.meta.get("facts", {})
        asked = {task.question}
        for city, values in facts.items():
            q = QUESTION.format(city=city)
            if q not in asked and len(values) == 1:
                asked.add(q)
                qa.append(f"\n{q} {ANSWER_PREFIX.format(city=city)} {values[0]}.")
        context = self.tok.encode(task.context, add_special_tokens=False)
        ids, marks = list(context), [0] * len(context)
        for text in qa[:1] + rng.sample(qa[1:], len(qa) - 1):
            piece = self.tok.encode(text, add_special_tokens=False)
            if len(ids) + len(piece) + 1 > n:
                break
            ids += piece
            marks += [1] * len(piece)
        ids.append(self.eos)
        marks.append(1)
        row = [(t, i, marks[i]) for i, t in enumerate(ids[:n])]
        row += [(self.eos, len(row) + i, 0) for i in range(n - len(row))]  # padding, never a target
        return row

    def next(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(batch_size):
            rng = random.Random(f"{self.cfg.seed}:{self.row}")
            self.row += 1
            if self.synthetic and rng.random() < self.cfg.synthetic_ratio:
                rows.append(self._synthetic_row(rng, seq_len + 1))
            else:
                rows.append(self._real_row(seq_len + 1))
        t = torch.tensor(rows)  # [B, L+1, 3]
        return {
            "input_ids": t[:, :-1, 0],
            "positions": t[:, :-1, 1],
            "targets": t[:, 1:, 0],
            "mask": t[:, 1:, 2].bool(),
        }

    def next_synthetic(self, lengths: list[int] | None = None) -> dict[str, torch.Tensor]:
        """A micro-batch of data.synthetic_rows long synthetic rows of one length (log-uniform in `lengths`, by
        default data.synthetic_lengths; a multiple of 64). "outputs" = how many final positions hold targets."""
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}:synthetic:{self.synthetic_batches}")
        self.synthetic_batches += 1
        lo, hi = lengths or cfg.synthetic_lengths
        length = max(lo, min(hi, round(math.exp(rng.uniform(math.log(lo), math.log(hi))) / 64) * 64))
        rows = cfg.synthetic_rows
        if cfg.synthetic_tokens:
            rows = max(1, min(rows, cfg.synthetic_tokens // length))
        t = torch.tensor([self._synthetic_row(rng, length + 1) for _ in range(rows)])  # [B, L+1, 3]
        mask = t[:, 1:, 2].bool()
        cols = mask.any(0).nonzero()
        outputs = length - int(cols[0]) if len(cols) else 1
        return {"input_ids": t[:, :-1, 0], "positions": t[:, :-1, 1], "targets": t[:, 1:, 0], "mask": mask,
                "outputs": outputs}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"docs": dict(self.docs.state), "buffer": list(self.buffer), "row": self.row,
                "synthetic_batches": self.synthetic_batches}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.docs.state = dict(state["docs"])
        self.stream = iter(self.docs)
        self.buffer = [tuple(x) for x in state["buffer"]]
        self.row = state["row"]
        self.synthetic_batches = state.get("synthetic_batches", 0)
