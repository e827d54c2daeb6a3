"""RULER (arXiv 2404.06654) tasks that need no downloads, scored as RULER scores them (string_match_all: the share of
expected strings found in the answer, x100), averaged per length; the effective context length is the longest
tested length up to which every average stays above the threshold (85.6 = Llama-2-7B at 4K in the paper).

Tasks: niah_single_{1,2,3} (noise / essay haystack; word -> number / uuid), niah_multikey_{1,2,3} (distractor
keys; a haystack made of distractor needles; uuid -> uuid), niah_multivalue, niah_multiquery, vt (variable
tracking), cwe (common words) and fwe (frequent coded words). "Essay" text is the English documentation shipped
with Python; keys and common words come from the bundled words.txt.
"""

from __future__ import annotations

import json
import random
import string
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..tasks import Task, default_haystack, place, variable_tracking_task_from, window
from .runner import Cell, Results, run, sized
from .targets import Target

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.".split(". ")
NOISE = [s if s.endswith(".") else s + "." for s in NOISE]
TASKS = (
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
)  # fmt: skip
TOKENS = {"vt": 30, "cwe": 120, "fwe": 50}  # RULER's tokens_to_generate; niah tasks: 128


@lru_cache(maxsize=1)
def words() -> tuple[str, ...]:
    return tuple(Path(__file__).with_name("words.txt").read_text().split())


def uuid(rng: random.Random) -> str:
    h = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def key_word(rng: random.Random) -> str:
    return f"{rng.choice(words())}-{rng.choice(words())}"


def niah(name: str, rng: random.Random, n: int, essay: list[str]) -> Task:
    """One RULER needle task with n haystack units."""
    value_kind = "uuid" if name in ("niah_single_3", "niah_multikey_3") else "number"
    kind = "uuids" if value_kind == "uuid" else "numbers"
    tmpl = "One of the special magic {kind} for {key} is: {value}."

    def value() -> str:
        return uuid(rng) if value_kind == "uuid" else str(rng.randint(1_000_000, 9_999_999))

    def key() -> str:
        return uuid(rng) if name == "niah_multikey_3" else key_word(rng)

    n_keys = {"niah_multikey_1": 4, "niah_multiquery": 4}.get(name, 1)
    n_values = 4 if name == "niah_multivalue" else 1
    keys = [key() for _ in range(n_keys)]
    facts = {k: [value() for _ in range(n_values)] for k in keys}
    if name == "niah_single_1":
        hay = [NOISE[i % len(NOISE)] for i in range(n)]
    elif name in ("niah_multikey_2", "niah_multikey_3"):
        hay = [tmpl.format(kind=kind, key=key(), value=value()) for _ in range(n)]  # distractor needles
    else:
        hay = window(essay, rng.randrange(len(essay)), n)
    needles = [tmpl.format(kind=kind, key=k, value=v) for k, vs in facts.items() for v in vs]
    context, depths = place(hay, [(rng.random(), x) for x in needles])
    asked = keys if name == "niah_multiquery" else keys[:1]
    if name == "niah_multiquery":
        q = f"What are all the special magic {kind} for {', '.join(asked[:-1])}, and {asked[-1]} mentioned in the " \
            "provided text?"  # fmt: skip
        prefix = f"The special magic {kind} for {', '.join(asked[:-1])}, and {asked[-1]} mentioned in the provided" \
            " text are"  # fmt: skip
    elif name == "niah_multivalue":
        q = f"What are all the special magic {kind} for {asked[0]} mentioned in the provided text?"
        prefix = f"The special magic {kind} for {asked[0]} mentioned in the provided text are"
    else:
        q = f"What is the special magic {kind[:-1]} for {asked[0]} mentioned in the provided text?"
        prefix = f"The special magic {kind[:-1]} for {asked[0]} mentioned in the provided text is"
    answers = [v for k in asked for v in facts[k]]
    return Task(context, q, prefix, answers, depth=depths[0], meta={"kind": name})


def cwe(rng: random.Random, n: int, length: int) -> Task:
    """Common words extraction: 10 words repeated often among n others repeated rarely; name the 10."""
    pool = rng.sample(words(), min(len(words()), n + 10))
    common, rare = pool[:10], pool[10:]
    freq_common, freq_rare = (30, 3) if length >= 4096 else (6, 1)
    seq = [w for w in common for _ in range(freq_common)] + [w for w in rare for _ in range(freq_rare)]
    rng.shuffle(seq)
    context = "Below is a numbered list of words. In these words, some appear more often than others. Memorize " \
        "the ones that appear most often.\n" + " ".join(f"{i + 1}. {w}" for i, w in enumerate(seq))  # fmt: skip
    q = "Question: What are the 10 most common words in the above list?"
    return Task(context, q, "Answer: The top 10 words that appear most often in the list are:", common,
                meta={"kind": "cwe"})  # fmt: skip


def fwe(rng: random.Random, n: int) -> Task:
    """Frequent words extraction: n coded words drawn from a Zipf(2) vocabulary; the most frequent is replaced by
    dots (noise); name the next three."""
    vocab = ["".join(rng.choice(string.ascii_lowercase) for _ in range(6)) for _ in range(max(20, n // 50))]
    weights = [1 / (k + 1) ** 2 for k in range(len(vocab))]
    text = rng.choices(vocab, weights=weights, k=max(n, 10))
    ranked = [w for w, _ in Counter(text).most_common()]
    text = ["...." if w == ranked[0] else w for w in text]
    context = "Read the following coded text and track the frequency of each coded word. Find the three most " \
        "frequently appeared coded words. " + " ".join(text)  # fmt: skip
    q = "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most " \
        "frequently appeared words in the above coded text?"  # fmt: skip
    return Task(context, q, "Answer: According to the coded text above, the three most frequently appeared words "
                "are:", ranked[1:4], meta={"kind": "fwe"})  # fmt: skip


def builder(name: str, seed: str, length: int, essay: list[str]) -> Callable[[int], Task]:
    def build(n: int) -> Task:
        rng = random.Random(seed)
        if name == "vt":
            noise = [NOISE[i % len(NOISE)] for i in range(n)]
            return variable_tracking_task_from(rng, noise, hops=4)
        if name == "cwe":
            return cwe(rng, n, length)
        if name == "fwe":
            return fwe(rng, n)
        return niah(name, rng, n, essay)

    return build


def cells(target: Target, lengths: list[int], tasks: list[str], samples: int, seed: int) -> list[Cell]:
    essay = list(default_haystack())
    units = {t: target.count_tokens(" ".join(builder(t, "probe", 8192, essay)(64).context.split()[:400])) / 64
             for t in tasks}  # fmt: skip
    out = []
    for length in lengths:
        for task in tasks:
            for s in range(samples):
                key = f"ruler:{task}:{length}:{s}"
                build = builder(task, f"{seed}:{key}", length, essay)
                out.append(Cell(
                    key, {"task": task, "length": length, "sample": s},
                    lambda b=build, n=length, u=units[task]: sized(b, target.count_tokens, n, u),
                    TOKENS.get(task, 128),
                ))  # fmt: skip
    return out


def summarize(rows: list[dict], threshold: float) -> dict[str, Any]:
    by: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r.get("score") is not None:
            by.setdefault((r["task"], r["length"]), []).append(100 * r["score"])
    lengths = sorted({length for _, length in by})
    tasks = sorted({t for t, _ in by}, key=lambda t: TASKS.index(t) if t in TASKS else 99)
    per_task = {t: {str(n): sum(by[t, n]) / len(by[t, n]) for n in lengths if (t, n) in by} for t in tasks}
    average = {str(n): sum(per_task[t][str(n)] for t in tasks if str(n) in per_task[t]) /
               max(1, sum(str(n) in per_task[t] for t in tasks)) for n in lengths}  # fmt: skip
    effective = 0
    for n in lengths:
        if average[str(n)] > threshold:
            effective = n
        else:
            break
    return {
        "average_per_length": average,
        "per_task": per_task,
        "effective_length": effective,
        "threshold": threshold,
        "errors": sum(r.get("error") is not None for r in rows),
        "cells": len(rows),
    }


def table(summary: dict[str, Any]) -> str:
    lengths = list(summary["average_per_length"])
    head = f"{'task':18}" + "".join(f"{int(n):>9,}" for n in lengths)
    lines = [head, "-" * len(head)]
    for t, row in summary["per_task"].items():
        lines.append(f"{t:18}" + "".join(f"{row[n]:9.1f}" if n in row else f"{'-':>9}" for n in lengths))
    lines.append("-" * len(head))
    lines.append(f"{'average':18}" + "".join(f"{summary['average_per_length'][n]:9.1f}" for n in lengths))
    eff = summary["effective_length"]
    lines.append(
        f"effective context length (average > {summary['threshold']}): "
        + (f"{eff:,} tokens" if eff else f"below {int(lengths[0]):,} tokens" if lengths else "n/a")
    )
    if summary["errors"]:
        lines.append(f"({summary['errors']} cells failed with API errors; not counted)")
    return "\n".join(lines)


def main(target: Target, args: Any) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks or list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown RULER task(s) {unknown}; choose from {', '.join(TASKS)}")
    grid = cells(target, args.lengths, tasks, args.samples, args.seed)
    results = Results(out / "results.jsonl")
    run(grid, target, results, "ruler", quiet=args.quiet)
    keys = {c.key for c in grid}
    rows = [r for k, r in results.rows.items() if k in keys]
    summary = summarize(rows, args.threshold)
    summary.update(target=target.name, task="ruler")
    (out / "results.json").write_text(json.dumps({"summary": summary, "cells": rows}, indent=1))
    return summary
