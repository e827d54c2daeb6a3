"""RULER (Hsieh et al., arXiv 2404.06654; github.com/NVIDIA/RULER) as published, for the 11 of its 13 tasks that
need no downloads: niah_single_{1,2,3}, niah_multikey_{1,2,3}, niah_multivalue, niah_multiquery, vt, cwe, fwe. The
two QA tasks (qa_1 on SQuAD, qa_2 on HotpotQA) are left out because they need downloaded data sets, so the average
is labelled "RULER (11 of 13 tasks, no QA)" and is not the paper's 13-task average.

As RULER does: prompts are its templates and answer prefixes word for word (scripts/data/synthetic/constants.py,
with niah.py's singular wording when one value is asked); vt and cwe start with RULER's one-shot example (a smaller,
answered instance of the same task); fwe uses its deterministic Zipf counts; a length counts the prompt and the
answer tokens (max_seq_length includes tokens_to_generate); scores are string_match_all x 100 (the share of
expected strings found in the answer), a failed sample counts as wrong, and the effective context length is the
longest tested length up to which the average stays >= the threshold (85.6 = Llama-2-7B at 4K in the paper).

Where we differ, for want of downloads or to avoid a wrong number: the essay haystack is the English documentation
shipped with Python (RULER: Paul Graham's essays), split into sentences by a regex (RULER: nltk); keys are two words
of words.txt joined by "-" (RULER: wonderwords adjective-noun); cwe draws from words.txt and, past its 1,200
words, from two-word compounds of it (RULER: wonderwords, then an English word list), and is scored by whole words
(a common word found only inside a longer word is not credited); a length a task cannot reach is refused up front
or recorded as an error cell (RULER's generators loop forever there).

Defaults: DEFAULT_LENGTHS (the paper's 4K to 128K) and DEFAULT_SAMPLES per task and length (main uses them when
args.lengths / args.samples are None).
"""

from __future__ import annotations

import json
import math
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from ..tasks import Task, default_haystack, split_sentences
from .runner import Cell, Results, TaskTooShort, atomic_write, fingerprint, fit, run
from .targets import Target

TASKS = (
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
)  # fmt: skip
ALL_TASKS = 13  # RULER's count, with qa_1 and qa_2
LEFT_OUT = "qa_1 and qa_2 are left out: they need downloaded data sets (SQuAD, HotpotQA)"
DEFAULT_LENGTHS = [4096, 8192, 16384, 32768, 65536, 131072]  # the paper's lengths
# RULER generates 500 samples per task and length. 25 keeps the 11 x 6 grid at 1,650 prompts while a task's score
# moves in steps of 4 points (with 1 sample: 0 or 100; its standard error near 85 is about 7 points), so the 85.6
# threshold is not decided by a single answer
DEFAULT_SAMPLES = 25
TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}  # RULER's tokens_to_generate

# RULER's scripts/data/synthetic/constants.py, verbatim (each answer prefix starts with a space there)
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz "
    "you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} "
    "mentioned in the provided text?"
)
NIAH_ANSWER = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: "
    "Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the "
    "value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that "
    "appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_ANSWER = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What "
    "are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER = " Answer: According to the coded text above, the three most frequently appeared words are:"
TEMPLATES = (NIAH_TEMPLATE, NIAH_ANSWER, NIAH_NEEDLE, VT_TEMPLATE, VT_ANSWER, CWE_TEMPLATE, CWE_ANSWER,
             FWE_TEMPLATE, FWE_ANSWER)  # fmt: skip

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER's np.linspace(0, 100, 40), rounded
VT_HOPS, VT_CHAINS, VT_EXAMPLE_TOKENS = 4, 1, 500  # synthetic.yaml; the one-shot example is sized to 500 tokens
CWE_COMMON = 10
ZETA2 = math.pi**2 / 6  # zeta(alpha) for fwe's alpha = 2
POOL = 200_000  # cwe words available: enough for about 1M tokens (3 list entries of 2+ tokens per rare word)


class Niah(NamedTuple):
    """One row of RULER's synthetic.yaml for a niah task."""

    haystack: str  # noise (a fixed paragraph, repeated), essay (running text) or needle (distractor needles)
    key: str  # words or uuids
    value: str  # numbers or uuids
    keys: int = 1
    values: int = 1
    queries: int = 1


NIAH = {
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("essay", "words", "numbers"),
    "niah_single_3": Niah("essay", "words", "uuids"),
    "niah_multikey_1": Niah("essay", "words", "numbers", keys=4),
    "niah_multikey_2": Niah("needle", "words", "numbers"),
    "niah_multikey_3": Niah("needle", "uuids", "uuids"),
    "niah_multivalue": Niah("essay", "words", "numbers", values=4),
    "niah_multiquery": Niah("essay", "words", "numbers", keys=4, queries=4),
}


class WholeWordTask(Task):
    """cwe: string_match_all over whole words, so "accept" is not found in "accepted"."""

    def score(self, output: str) -> float:
        return sum(bool(re.search(rf"\b{re.escape(a)}\b", output, re.I)) for a in self.answers) / len(self.answers)


def label(n_tasks: int = len(TASKS)) -> str:
    return f"RULER ({n_tasks} of {ALL_TASKS} tasks, no QA)"


def tokens_to_generate(task: str) -> int:
    return TOKENS["niah" if task.startswith("niah") else task]


@lru_cache(maxsize=1)
def words() -> tuple[str, ...]:
    return tuple(dict.fromkeys(Path(__file__).with_name("words.txt").read_text().split()))


@lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
    """words.txt, then distinct two-word compounds of it (deterministic), POOL words in all: cwe's pool past 1,200
    words. A compound never equals another word of the pool; it may contain one, which whole-word scoring ignores."""
    base = words()
    out, seen, rng = list(base), set(base), random.Random("cwe-pool")
    while len(out) < POOL:
        w = rng.choice(base) + rng.choice(base)
        if w not in seen:
            seen.add(w)
            out.append(w)
    return tuple(out)


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The essay haystack as words (RULER splits its essays on whitespace and sizes the haystack in words)."""
    return tuple(" ".join(default_haystack()).split())


def fill(template: str, answer: str, **fields: Any) -> tuple[str, str, str]:
    """RULER's template + answer prefix as Task fields, so that Task.prompt() (context + "\\n" + question + " " +
    prefix) is RULER's input text exactly: the question is the template's last line, and Task.prompt supplies the
    space RULER's answer prefix starts with."""
    head, question = template.format(**fields).rsplit("\n", 1)
    return head, question, answer.format(**fields).removeprefix(" ")


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _draw(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))  # 7 digits
    if kind == "uuids":
        return _uuid(rng)
    return f"{rng.choice(words())}-{rng.choice(words())}"


def _insert(units: list[str], items: list[str], rng: random.Random) -> list[str]:
    """RULER's insertion into a haystack of units: each item at its own random unit index, in reverse index order
    (so an item goes before the unit it was drawn with). Indices are drawn from at least len(items) slots, so a
    haystack with fewer units than items (only ever probed while sizing) still builds."""
    out = list(units)
    for i, item in zip(sorted(rng.sample(range(max(len(units), len(items))), len(items)), reverse=True), items):
        out.insert(i, item)
    return out


def niah(name: str, rng: random.Random, n: int) -> Task:
    """A RULER needle task with n haystack units (paragraphs, words or distractor needles)."""
    cfg = NIAH[name]
    keys, values, needles = [], [], []
    while len(keys) < cfg.keys:
        if (key := _draw(cfg.key, rng)) in keys:
            continue  # distinct keys: a repeated one would make a query ambiguous
        keys.append(key)
        values.append([_draw(cfg.value, rng) for _ in range(cfg.values)])
        needles += [NIAH_NEEDLE.format(type_needle_v=cfg.value, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    asked = rng.sample(range(cfg.keys), cfg.queries)  # drawn before the haystack: the same for every n
    if cfg.haystack == "essay":
        hay = essay_words()
        sents = split_sentences(" ".join((hay * (n // len(hay) + 1))[:n]))  # repeated as needed, as RULER does
        # the needles between sentences, at distinct depths among RULER's 40
        cuts = [0] + sorted(len(sents) * d // 100 for d in rng.sample(DEPTHS, len(needles))) + [len(sents)]
        parts = []
        for i in range(len(cuts) - 1):
            parts += [" ".join(sents[cuts[i] : cuts[i + 1]])] + needles[i : i + 1]
        context = " ".join(p for p in parts if p)
    else:
        if cfg.haystack == "noise":
            units = [NOISE] * n
        else:  # distractor needles with other keys
            units = []
            while len(units) < n:
                k = _draw(cfg.key, rng)
                if k not in keys:
                    units.append(NIAH_NEEDLE.format(type_needle_v=cfg.value, key=k, value=_draw(cfg.value, rng)))
        context = "\n".join(_insert(units, needles, rng))
    queries = [keys[i] for i in asked]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, answer, kind = NIAH_TEMPLATE, NIAH_ANSWER, cfg.value
    if cfg.queries * cfg.values == 1:  # niah.py's singular wording for one asked value
        template, answer = (t.replace("Some", "A").replace("are all", "is").replace("are", "is").replace(
            "answers", "answer") for t in (template, answer))  # fmt: skip
        kind = kind[:-1]
    head, question, prefix = fill(template, answer, type_needle_v=kind, context=context, query=query)
    expected = [v for i in asked for v in values[i]]
    depth = context.find(expected[0]) / max(len(context), 1)
    return Task(head, question, prefix, expected, depth=depth, meta={"kind": name})


def variable_tracking(rng: random.Random, n: int, letters: int = 5) -> Task:
    """RULER vt over n noise paragraphs: chains 'VAR A = 12345', 'VAR B = VAR A ', ... one line each, in order at
    random places; name every variable of the first chain. letters = 3 for the one-shot example, as in RULER."""
    used = {"VAR"}

    def var() -> str:
        while True:
            v = "".join(rng.choices(string.ascii_uppercase, k=letters))
            if v not in used:
                used.add(v)
                return v

    chains, names = [], []
    for _ in range(VT_CHAINS):
        names.append([var() for _ in range(VT_HOPS + 1)])
        value = str(rng.randint(10000, 99998))
        hops = [f"VAR {b} = VAR {a} " for a, b in zip(names[-1], names[-1][1:])]  # the trailing space is RULER's
        chains.append([f"VAR {names[-1][0]} = {value}"] + hops)
    lines = [NOISE] * n
    for chain in chains:
        slots = sorted(rng.sample(range(max(len(lines), len(chain))), len(chain)))
        for j, (slot, line) in enumerate(zip(slots, chain)):
            lines.insert(slot + j, line)
    context = "\n".join(lines).replace(". \n", ".\n")
    query = chains[0][0].split("=")[-1].strip()
    head, question, prefix = fill(VT_TEMPLATE, VT_ANSWER, context=context, query=query, num_v=VT_HOPS + 1)
    return Task(head, question, prefix, names[0], depth=context.find(names[0][0]) / len(context), meta={"kind": "vt"})


def vt_example(rng: random.Random, n: int) -> str:
    """The answered one-shot example RULER puts before vt: the prompt, the answer, a newline."""
    task = variable_tracking(rng, n, letters=3)
    return task.prompt() + " " + " ".join(task.answers) + "\n"


def vt_example_size(count: Callable[[str], int]) -> int:
    """Noise paragraphs in vt's one-shot example: as many as fit VT_EXAMPLE_TOKENS by the target's count, at least 5
    (RULER sizes its example once per run, from 5 paragraphs up, and re-draws its names and value per sample)."""
    try:
        n = fit(lambda k: variable_tracking(random.Random("vt-example"), k, 3), count, VT_EXAMPLE_TOKENS,
                count(NOISE))  # fmt: skip
    except TaskTooShort:
        n = 0
    return max(n, 5)


def _cwe_list(rng: random.Random, n: int, common_repeats: int, rare_repeats: int) -> tuple[str, list[str]]:
    """RULER's get_example: n distinct words, the first 10 repeated common_repeats times and the rest rare_repeats
    times, shuffled into '1. w 2. w ...'."""
    pool = words() if n <= len(words()) else word_pool()
    chosen = rng.sample(pool, min(n, len(pool)))
    common, rare = chosen[:CWE_COMMON], chosen[CWE_COMMON:]
    seq = common * common_repeats + rare * rare_repeats
    rng.shuffle(seq)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(seq)), common


def common_words(rng: random.Random, example_rng: random.Random, n: int, length: int) -> Task:
    """RULER cwe with n distinct words, after its one-shot example. Below 4,096 tokens RULER uses a smaller
    example (20 words: 3 and 1 repeats) and 6 / 1 repeats; from 4,096 on, 40 words (10 / 3) and 30 / 3."""
    small = length < 4096
    ex_context, ex_answer = _cwe_list(example_rng, 20, 3, 1) if small else _cwe_list(example_rng, 40, 10, 3)
    answered = " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer))
    example = (CWE_TEMPLATE + CWE_ANSWER).format(context=ex_context) + " " + answered
    context, common = _cwe_list(rng, n, 6, 1) if small else _cwe_list(rng, n, 30, 3)
    head, question, prefix = fill(CWE_TEMPLATE, CWE_ANSWER, context=context)
    return WholeWordTask(example + "\n" + head, question, prefix, common, meta={"kind": "cwe"})


def fwe_vocab_size(length: int) -> int:
    return (length - TOKENS["fwe"]) // 50  # RULER: (max_seq_length - tokens_to_generate) // 50


def fwe_counts(n: int, vocab: int) -> list[int]:
    """RULER's deterministic Zipf counts: rank k (from 1) appears int(n k^-2 / zeta(2)) times."""
    return [int(n * k**-2 / ZETA2) for k in range(1, vocab + 1)]


@lru_cache(maxsize=64)
def fwe_min_words(vocab: int) -> int | None:
    """The least n from which on every n gives fwe an untied top 3 (ranks 2-4, rank 1 being the dots): rank 4
    appears, and more often than rank 5. Every n >= 74 is untied (n (1/16 - 1/25) / zeta(2) >= 1); below, ties come
    and go, so take the start of the untied run up to 74. None when the vocabulary cannot hold 3 answers."""
    if vocab < 4:
        return None

    def untied(n: int) -> bool:
        c = fwe_counts(n, min(vocab, 5))
        return c[3] >= 1 and (vocab < 5 or c[3] > c[4])

    n = 74
    while n > 1 and untied(n - 1):
        n -= 1
    return n


def frequent_words(rng: random.Random, vocab_rng: random.Random, n: int, length: int) -> Task:
    """RULER fwe: a vocabulary of (length - 50) / 50 random 6-letter words, the most frequent replaced by '...'
    (noise); each rank in fixed Zipf proportion to n; answer ranks 2-4."""
    size = fwe_vocab_size(length)
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(vocab_rng.choices(string.ascii_lowercase, k=6)))
    ranked = sorted(vocab)
    vocab_rng.shuffle(ranked)
    ranked[:1] = ["..."]
    counts = fwe_counts(n, size)
    text = [w for w, c in zip(ranked, counts) for _ in range(c)]
    rng.shuffle(text)
    head, question, prefix = fill(FWE_TEMPLATE, FWE_ANSWER, context=" ".join(text))
    return Task(head, question, prefix, ranked[1:4], meta={"kind": "fwe", "counts": counts[:5]})


def builder(name: str, seed: str, length: int, example_units: int = 5) -> Callable[[int], Task]:
    """The task of one cell as a function of its haystack size: everything but the haystack is drawn the same for
    every size, so sizing changes only the haystack. One-shot examples have their own random stream."""

    def build(n: int) -> Task:
        rng, other = random.Random(seed), random.Random(f"{seed}:example")
        if name == "vt":
            task = variable_tracking(rng, n)
            return replace(task, context=vt_example(other, example_units) + "\n" + task.context)
        if name == "cwe":
            return common_words(rng, other, n, length)
        if name == "fwe":
            return frequent_words(rng, other, n, length)
        return niah(name, rng, n)

    return build


def min_units(name: str, length: int) -> int | None:
    """The fewest haystack units a well-formed task has: one haystack unit for niah; 5 noise paragraphs for vt
    (RULER draws its 5 chain lines' places among them); 10 common words and a rare one for cwe; an untied top 3
    for fwe (None: no size works at this length)."""
    return {"vt": 5, "cwe": CWE_COMMON + 1}.get(name, 1) if name != "fwe" else fwe_min_words(fwe_vocab_size(length))


def need(name: str, length: int, count: Callable[[str], int], example_units: int) -> int | None:
    """Tokens (prompt + answer) of the smallest well-formed task at `length`; None if there is none."""
    least = min_units(name, length)
    if least is None:
        return None
    return count(builder(name, "shortest", length, example_units)(least).prompt()) + tokens_to_generate(name)


def shortest(name: str, count: Callable[[str], int], example_units: int) -> int:
    """About the shortest length at which the task builds (cwe's and fwe's shape depends on the length)."""
    length = tokens_to_generate(name) + 1
    if name == "fwe":
        length = max(length, 50 * 4 + TOKENS["fwe"])  # a vocabulary with the dots and 3 answers
    for _ in range(8):
        n = need(name, length, count, example_units)
        if n is not None and n <= length:
            break
        length = n if n is not None and n > length else length * 2
    return length


def check_lengths(lengths: list[int], tasks: list[str], count: Callable[[str], int], example_units: int) -> None:
    """Refuse, before any cell, a length too short for a chosen task, naming what each task takes."""
    for length in sorted(lengths):
        at = {t: need(t, length, count, example_units) for t in tasks}
        short = [t for t in tasks if at[t] is None or at[t] > length]
        if short:
            least = {t: shortest(t, count, example_units) for t in short}
            why = ", ".join(
                f"{t} needs {at[t]:,} at this length" if at[t] is not None and least[t] < length
                else f"{t} needs {least[t]:,}" for t in short
            )  # fmt: skip
            raise ValueError(
                f"--lengths {length} is too short: {why} tokens or more (prompt + answer; vt and cwe include RULER's "
                "one-shot example, which grows at 4K and beyond): use longer --lengths or fewer --tasks"
            )


def cells(target: Target, lengths: list[int], tasks: list[str], samples: int, seed: int,
          example_units: int = 5) -> list[Cell]:  # fmt: skip
    count = target.count_tokens
    out = []
    for length in lengths:
        for task in tasks:
            answer = tokens_to_generate(task)
            probe = builder(task, "probe", length, example_units)
            least = min_units(task, length) or 0
            unit = max((count(probe(least + 64).prompt()) - count(probe(least).prompt())) / 64, 0.1)
            for s in range(samples):
                key = f"ruler:{task}:{length}:{s}"
                build = builder(task, f"{seed}:{key}", length, example_units)

                def exact(b=build, n=length, t=task, u=unit, a=answer) -> Task:
                    units = fit(b, count, n - a, u)  # RULER sizes the prompt to the length less the answer
                    least = min_units(t, n)
                    if least is None or units < least:
                        raise TaskTooShort(f"{n:,} tokens leave room for {units} haystack units; {t} needs "
                                           f"{least if least is not None else 'more'}")  # fmt: skip
                    return b(units)

                meta = {"task": task, "length": length, "sample": s, "tokens_to_generate": answer}
                out.append(Cell(key, meta, exact, answer))
    return out


def summarize(rows: list[dict], threshold: float) -> dict[str, Any]:
    """Per task and length the mean score x 100 (a failed cell counts 0, as RULER counts a failed sample wrong),
    rounded to 2 decimals as RULER's string_match_all; the average over tasks per length; the effective length."""
    by: dict[tuple[str, int], list[float]] = {}
    errors: dict[str, int] = {}
    for r in rows:
        by.setdefault((r["task"], r["length"]), []).append(100 * (r.get("score") or 0.0))
        if r.get("error") is not None:
            errors[r["task"]] = errors.get(r["task"], 0) + 1
    lengths = sorted({length for _, length in by})
    tasks = sorted({t for t, _ in by}, key=lambda t: TASKS.index(t) if t in TASKS else len(TASKS))
    per_task = {t: {str(n): round(sum(by[t, n]) / len(by[t, n]), 2) for n in lengths if (t, n) in by} for t in tasks}
    average = {}
    for n in lengths:
        scores = [per_task[t][str(n)] for t in tasks if str(n) in per_task[t]]
        average[str(n)] = round(sum(scores) / len(scores), 2)  # rounded: 85.6 is not missed by a float's last bit
    effective = 0
    for n in lengths:
        if average[str(n)] < threshold:
            break
        effective = n
    return {
        "average_of": label(len(tasks)),
        "left_out": LEFT_OUT,
        "average_per_length": average,
        "per_task": per_task,
        "effective_length": effective,
        "effective_length_rule": f"the longest length up to which the {label(len(tasks))} average is >= {threshold:g}",
        "threshold": threshold,
        "errors": sum(errors.values()),
        "errors_per_task": errors,
        "cells": len(rows),
    }


def table(summary: dict[str, Any]) -> str:
    lengths = list(summary["average_per_length"])
    name = summary.get("average_of", label())
    width = max(18, len(name) + 1)
    head = f"{'task':{width}}" + "".join(f"{int(n):>9,}" for n in lengths)
    lines = [head, "-" * len(head)]
    for t, row in summary["per_task"].items():
        lines.append(f"{t:{width}}" + "".join(f"{row[n]:9.1f}" if n in row else f"{'-':>9}" for n in lengths))
    lines.append("-" * len(head))
    lines.append(f"{name:{width}}" + "".join(f"{summary['average_per_length'][n]:9.1f}" for n in lengths))
    eff = summary["effective_length"]
    lines.append(
        f"effective context length ({name} average >= {summary['threshold']:g}): "
        + (f"{eff:,} tokens" if eff else f"below {int(lengths[0]):,} tokens" if lengths else "n/a")
    )
    lines.append(f"({summary.get('left_out', LEFT_OUT)})")
    if summary["errors"]:
        lines.append(f"({summary['errors']} cells failed with errors; each counted as 0, as RULER counts a failed "
                     "sample as wrong)")  # fmt: skip
    return "\n".join(lines)


def main(target: Target, args: Any) -> dict[str, Any]:
    out = Path(args.out)
    tasks = list(dict.fromkeys(args.tasks or TASKS))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks: unknown RULER task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)} "
                         f"({LEFT_OUT})")  # fmt: skip
    samples = DEFAULT_SAMPLES if args.samples is None else args.samples  # None: not given
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    lengths = sorted(set(args.lengths or DEFAULT_LENGTHS))
    if not lengths or lengths[0] < 1:
        raise ValueError(f"--lengths must be positive token counts, got {args.lengths}")
    target.check_length(lengths[-1])  # a length already counts the answer's tokens
    example_units = vt_example_size(target.count_tokens) if "vt" in tasks else 5
    check_lengths(lengths, tasks, target.count_tokens, example_units)
    identity = {
        "eval": "ruler", "target": target.identity, "seed": args.seed, "tasks": tasks,
        "templates": fingerprint(TEMPLATES, NOISE, TOKENS), "essay": fingerprint(essay_words()),
        "words": fingerprint(words(), POOL), "vt_example_units": example_units,
    }  # fmt: skip
    results = Results(out, identity)
    grid = cells(target, lengths, tasks, samples, args.seed, example_units)
    run(grid, target, results, "ruler", quiet=args.quiet)
    keys = {c.key for c in grid}
    rows = [r for k, r in results.rows.items() if k in keys]
    summary = summarize(rows, args.threshold)
    summary.update(target=target.name, task="ruler")
    atomic_write(out / "results.json", json.dumps({"summary": summary, "cells": rows}, indent=1))
    return summary
