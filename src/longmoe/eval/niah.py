"""Needle in a haystack, as in the Gemini 1.5 report (sec. 5.2.1.2): plant "The special magic {city} number is:
{number}." at a depth of a haystack sized with the target's own tokenizer, ask "What is the special magic {city}
number?", and count a hit when the number appears in the answer. A grid of lengths x depths gives the heatmap."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..corpora import HAYSTACKS, builtin_haystack, source_files
from ..tasks import (
    ANSWER_PREFIX,
    CITIES,
    NAMES,
    NEEDLE,
    QUESTION,
    Task,
    default_haystack,
    needle_task_from,
    split_sentences,
)
from ..tasks import window as take_window
from .runner import Cell, Results, atomic_write, fingerprint, fit, run
from .targets import Target, TargetError

ENDINGS = {
    "answer-prefix": "the prompt ends with the answer's first words (a base model continues with the number)",
    "question": "the prompt ends with the question alone (LWM's and Kamradt's wording)",
}


@dataclass(frozen=True)
class Haystack:
    """Units of text (sentences, or lines of code) and what joins them."""

    name: str
    units: tuple[str, ...]
    sep: str

    @property
    def is_code(self) -> bool:
        return self.sep == "\n"


def load_haystack(source: str | None) -> Haystack:
    """The English documentation shipped with Python by default; a built-in by name (python-docs, perl-docs,
    perl-code); a text file (sentences); or a directory: every text or source file in it, a code haystack whose
    units are lines, in shuffled file order."""
    source = source or "python-docs"
    if source == "python-docs":
        return Haystack(source, default_haystack(), " ")
    if source in HAYSTACKS:
        text, code = builtin_haystack(source), HAYSTACKS[source][1]
        return _from_text(source, text, code)
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"--haystack {source}: no such file or directory (built-ins: {', '.join(HAYSTACKS)})")
    if p.is_dir():
        files = source_files(p)
        random.Random(0).shuffle(files)
        text = "\n".join(f.read_text(errors="replace") for f in files)
        if not text.strip():
            raise FileNotFoundError(f"--haystack {source}: no text or source files inside")
        return _from_text(str(p), text, True)
    return _from_text(str(p), p.read_text(errors="replace"), False)


def _from_text(name: str, text: str, code: bool) -> Haystack:
    if code:
        units = tuple(ln for ln in text.splitlines() if ln.strip() and "magic" not in ln.lower())
    else:
        units = tuple(s for s in split_sentences(text) if "magic" not in s.lower())
    if not units:
        raise FileNotFoundError(f"--haystack {name}: no text")
    return Haystack(name, units, "\n" if code else " ")


def check_templates(needle: str, question: str, answer_prefix: str, ending: str) -> None:
    """Templates must carry their placeholders, or every cell would ask an unanswerable question."""
    for name, text, fields in (("--needle", needle, ("{city}", "{value}")), ("--question", question, ("{city}",)),
                               ("--answer-prefix", answer_prefix, ("{city}",) if ending == "answer-prefix" else ())):
        missing = [f for f in fields if f not in text]
        if missing:
            raise ValueError(f"{name} {text!r} lacks {' and '.join(missing)}")
        try:
            text.format(city="x", value="1")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{name} {text!r}: only {{city}} and {{value}} may be filled in ({e})") from None
    if ending not in ENDINGS:
        raise ValueError(f"--ending {ending!r}: choose {' or '.join(ENDINGS)}")


def cells(
    target: Target,
    lengths: list[int],
    depths: list[float],
    *,
    haystack: Haystack,
    needles: int = 1,
    samples: int = 1,
    seed: int = 0,
    needle: str = NEEDLE,
    question: str = QUESTION,
    answer_prefix: str = ANSWER_PREFIX,
    ending: str = "answer-prefix",
    ask_each: bool = False,
    max_tokens: int = 32,
    keys: str = "cities",
    values: str = "numbers",
) -> list[Cell]:
    units = haystack.units
    sample = haystack.sep.join(units[:64])
    try:
        sentence_tokens = target.count_tokens(sample) / min(64, len(units))
    except TargetError:  # each cell will record the target's error itself; size the search by characters meanwhile
        sentence_tokens = len(sample) / 4 / min(64, len(units))
    prefix = answer_prefix if ending == "answer-prefix" else ""
    out = []
    for length in lengths:
        for depth in depths:
            for s in range(samples):
                key = f"niah:{needles}:{length}:{depth:g}:{s}"
                start = random.Random(f"{seed}:{key}").randrange(len(units))

                def build(n: int, count=None, key=key, start=start, depth=depth) -> Task:
                    return needle_task_from(
                        random.Random(f"{seed}:{key}:task"), take_window(units, start, n), depth=depth / 100,
                        count=count, sep=haystack.sep, keys=needles, queries=1 if ask_each else needles,
                        needle=needle, question=question, answer_prefix=prefix, key_kind=keys, value_kind=values,
                    )  # fmt: skip

                def exact(b=build, n=length) -> Task:
                    # size with character depths (cheap), then place the needle by token depth at that size
                    task = b(fit(b, target.count_tokens, n, sentence_tokens), target.count_tokens)
                    return _ask_each(task, question, prefix) if ask_each else task

                meta = {"task": "niah", "needles": needles, "length": length, "depth": depth, "sample": s}
                out.append(Cell(key, meta, exact, max_tokens, weight=length))
    return out


def _ask_each(task: Task, question: str, prefix: str) -> Task:
    """One question per planted needle, each sent on its own over the same context (a prefix cache reuses it)."""
    facts = task.meta["facts"]
    queries = [(question.format(city=c), prefix.format(city=c) if prefix else "", vs) for c, vs in facts.items()]
    return replace(task, answers=[v for _, _, vs in queries for v in vs], meta={**task.meta, "queries": queries})


def summarize(rows: list[dict]) -> dict[str, Any]:
    scored = [r for r in rows if r.get("score") is not None]
    per_length: dict[int, list[float]] = {}
    per_depth: dict[float, list[float]] = {}
    grid: dict[int, dict[float, list[float]]] = {}
    seconds: dict[int, list[float]] = {}
    for r in scored:
        per_length.setdefault(r["length"], []).append(r["score"])
        per_depth.setdefault(r["depth"], []).append(r["depth_actual"])
        grid.setdefault(r["length"], {}).setdefault(r["depth"], []).append(r["score"])
        seconds.setdefault(r["length"], []).append(r.get("seconds", 0.0))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {
        "recall": mean([r["score"] for r in scored]) if scored else None,
        "recall_per_length": {str(k): mean(v) for k, v in sorted(per_length.items())},
        "recall_grid": {str(n): {f"{d:g}": mean(v) for d, v in sorted(g.items())} for n, g in sorted(grid.items())},
        "seconds_per_trial": {str(k): round(mean(v), 2) for k, v in sorted(seconds.items())},
        "trials": len(scored),
        "actual_depth_per_depth": {f"{k:g}": round(100 * mean(v), 2) for k, v in sorted(per_depth.items())},
        "cells": len(rows),
        "errors": sum(r.get("error") is not None for r in rows),
    }


def table(summary: dict[str, Any]) -> str:
    """Recall by length (rows) and depth (columns), the recall per length and the time of one trial."""
    depths = sorted({d for g in summary["recall_grid"].values() for d in g}, key=float)
    head = f"{'length':>10} |" + "".join(f"{d + '%':>7}" for d in depths) + " | recall | s/trial"
    lines = [head, "-" * len(head)]
    for length, rec in summary["recall_per_length"].items():
        g = summary["recall_grid"][length]
        cols = "".join(f"{100 * g[d]:6.0f}%" if d in g else f"{'-':>7}" for d in depths)
        secs = summary["seconds_per_trial"].get(length, 0.0)
        lines.append(f"{int(length):>10,} |{cols} | {100 * rec:5.1f}% | {secs:7.1f}")
    overall = summary["recall"]
    lines.append(f"{'overall':>10} | {100 * overall:5.1f}% of {summary['trials']} trials" if overall is not None
                 else "   overall | n/a")  # fmt: skip
    if "ending" in summary:
        lines.append(f"haystack {summary['haystack']}; keys {summary.get('keys', 'cities')}, values "
                     f"{summary.get('values', 'numbers')}; prompt ending: {summary['ending']}"
                     + ("; each needle asked on its own" if summary.get("ask_each") else ""))  # fmt: skip
    if summary["errors"]:
        lines.append(f"({summary['errors']} cells failed with API errors: grey, not counted as misses)")
    return "\n".join(lines)


def heatmap(rows: list[dict], path: Path, title: str, xlabel: str = "context length (tokens)", short=None) -> None:
    """Green = found, red = missed, grey = API error; x = context length, y = needle depth (as in the report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(lengths) + 2), max(3.5, 0.45 * len(depths) + 1.5)))
    cmap = LinearSegmentedColormap.from_list("hit", ["#d7301f", "#fdae61", "#1a9850"])
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            cell = [r for r in rows if r["length"] == length and r["depth"] == depth]
            scores = [r["score"] for r in cell if r.get("score") is not None]
            color = cmap(sum(scores) / len(scores)) if scores else "#bdbdbd"
            ax.add_patch(plt.Rectangle((i, j), 1, 1, facecolor=color, edgecolor="white", linewidth=1))
    ax.set_xlim(0, len(lengths))
    ax.set_ylim(len(depths), 0)  # depth 0 (start of the context) at the top
    ax.set_xticks([i + 0.5 for i in range(len(lengths))], [(short or _short)(n) for n in lengths], rotation=45 if
                  len(lengths) > 8 else 0)  # fmt: skip
    actual = summarize(rows)["actual_depth_per_depth"]  # requested depth (mean actual, in tokens)
    ax.set_yticks([j + 0.5 for j in range(len(depths))],
                  [f"{d:g}% ({actual[f'{d:g}']:.0f}%)" if f"{d:g}" in actual else f"{d:g}%" for d in depths])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("needle depth: requested (actual), % of context")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#1a9850", "#d7301f", "#bdbdbd")]
    ax.legend(handles, ["found", "missed", "API error"], loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _short(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n / 1000:g}K" if n >= 1000 else str(n)


def main(target: Target, args: Any) -> dict[str, Any]:
    out = Path(args.out)
    keys, values = getattr(args, "keys", "cities"), getattr(args, "values", "numbers")
    available = {"cities": len(CITIES), "names": len(NAMES)}.get(keys, 1000)
    if not 1 <= args.needles <= available:
        raise ValueError(f"--needles {args.needles}: plant between 1 and {available} (the {keys} available)")
    check_templates(args.needle, args.question, args.answer_prefix, args.ending)
    target.check_length(max(args.lengths) + args.max_tokens)
    haystack = load_haystack(args.haystack)
    identity = {
        "eval": "niah", "target": target.identity, "seed": args.seed, "haystack": haystack.name,
        "haystack_fingerprint": fingerprint(haystack.sep, haystack.units), "needles": args.needles,
        "needle": args.needle, "question": args.question, "answer_prefix": args.answer_prefix,
        "ending": args.ending, "ask_each": args.ask_each, "max_tokens": args.max_tokens, "keys": keys,
        "values": values,
    }  # fmt: skip
    results = Results(out, identity)
    grid = cells(
        target, args.lengths, args.depths, haystack=haystack, needles=args.needles, samples=args.samples,
        seed=args.seed, needle=args.needle, question=args.question, answer_prefix=args.answer_prefix,
        ending=args.ending, ask_each=args.ask_each, max_tokens=args.max_tokens, keys=keys, values=values,
    )  # fmt: skip
    run(grid, target, results, "niah", quiet=args.quiet)
    wanted = {c.key for c in grid}
    rows = [r for k, r in results.rows.items() if k in wanted]
    summary = summarize(rows)
    summary.update(target=target.name, task="niah", needles=args.needles, haystack=haystack.name,
                   ending=args.ending, ask_each=args.ask_each, keys=keys, values=values)  # fmt: skip
    atomic_write(out / "results.json", json.dumps({"summary": summary, "cells": rows}, indent=1))
    title = f"needle in a haystack: {re.sub(r'^.*/', '', target.name)}" + (
        f" ({args.needles} needles)" if args.needles > 1 else ""
    )
    heatmap(rows, out / "heatmap.png", title)
    return summary
