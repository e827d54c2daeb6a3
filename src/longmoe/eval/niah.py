"""Needle in a haystack, as in the Gemini 1.5 report (sec. 5.2.1.2): plant "The special magic {city} number is:
{number}." at a depth of a haystack sized with the target's own tokenizer, ask "What is the special magic {city}
number?", and count a hit when the number appears in the answer. A grid of lengths x depths gives the heatmap."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from ..tasks import ANSWER_PREFIX, NEEDLE, QUESTION, default_haystack, needle_task_from, split_sentences, window
from .runner import Cell, Results, run, sized
from .targets import Target


def load_haystack(source: str | None) -> list[str]:
    """Sentences of English text shipped with Python by default; a text file; or a directory: every text or
    source file in it (a code haystack: units are lines, in shuffled file order)."""
    if not source:
        return list(default_haystack())
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"--haystack {source}: no such file or directory")
    if p.is_dir():
        from ..train.data import CODE_SUFFIXES

        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in CODE_SUFFIXES)
        random.Random(0).shuffle(files)
        lines = [ln for f in files for ln in f.read_text(errors="replace").splitlines() if ln.strip()]
        if not lines:
            raise FileNotFoundError(f"--haystack {source}: no text or source files inside")
        return lines
    sentences = split_sentences(p.read_text(errors="replace"))
    if not sentences:
        raise FileNotFoundError(f"--haystack {source}: no text")
    return sentences


def cells(
    target: Target,
    lengths: list[int],
    depths: list[float],
    *,
    haystack: list[str],
    needles: int = 1,
    samples: int = 1,
    seed: int = 0,
    needle: str = NEEDLE,
    question: str = QUESTION,
    answer_prefix: str = ANSWER_PREFIX,
    max_tokens: int = 32,
) -> list[Cell]:
    sentence_tokens = target.count_tokens(" ".join(haystack[:64])) / min(64, len(haystack))
    out = []
    for length in lengths:
        for depth in depths:
            for s in range(samples):
                key = f"niah:{needles}:{length}:{depth:g}:{s}"
                seeded = random.Random(f"{seed}:{key}")
                start = seeded.randrange(len(haystack))

                def build(n: int, key=key, start=start, depth=depth) -> Any:
                    return needle_task_from(
                        random.Random(f"{seed}:{key}:task"), window(haystack, start, n), depth=depth / 100,
                        keys=needles, queries=needles, needle=needle, question=question, answer_prefix=answer_prefix,
                    )  # fmt: skip

                out.append(
                    Cell(
                        key,
                        {"task": "niah", "needles": needles, "length": length, "depth": depth, "sample": s},
                        lambda b=build, n=length: sized(b, target.count_tokens, n, sentence_tokens),
                        max_tokens,
                    )
                )
    return out


def summarize(rows: list[dict]) -> dict[str, Any]:
    scored = [r for r in rows if r.get("score") is not None]
    per_length: dict[int, list[float]] = {}
    for r in scored:
        per_length.setdefault(r["length"], []).append(r["score"])
    return {
        "recall": sum(r["score"] for r in scored) / len(scored) if scored else None,
        "recall_per_length": {str(k): sum(v) / len(v) for k, v in sorted(per_length.items())},
        "cells": len(rows),
        "errors": sum(r.get("error") is not None for r in rows),
    }


def table(summary: dict[str, Any]) -> str:
    lines = [f"{'length':>10} | recall", f"{'-' * 10}-+-------"]
    for length, rec in summary["recall_per_length"].items():
        lines.append(f"{int(length):>10,} | {100 * rec:5.1f}%")
    overall = summary["recall"]
    lines.append(f"{'overall':>10} | {100 * overall:5.1f}%" if overall is not None else "   overall | n/a")
    if summary["errors"]:
        lines.append(f"({summary['errors']} cells failed with API errors: grey, not counted as misses)")
    return "\n".join(lines)


def heatmap(rows: list[dict], path: Path, title: str) -> None:
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
    ax.set_xticks([i + 0.5 for i in range(len(lengths))], [_short(n) for n in lengths], rotation=45 if
                  len(lengths) > 8 else 0)  # fmt: skip
    ax.set_yticks([j + 0.5 for j in range(len(depths))], [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (% of context)")
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
    out.mkdir(parents=True, exist_ok=True)
    grid = cells(
        target, args.lengths, args.depths, haystack=load_haystack(args.haystack), needles=args.needles,
        samples=args.samples, seed=args.seed, needle=args.needle, question=args.question,
        answer_prefix=args.answer_prefix, max_tokens=args.max_tokens,
    )  # fmt: skip
    results = Results(out / "results.jsonl")
    run(grid, target, results, "niah", quiet=args.quiet)
    keys = {c.key for c in grid}
    rows = [r for k, r in results.rows.items() if k in keys]
    summary = summarize(rows)
    summary.update(target=target.name, task="niah", needles=args.needles)
    (out / "results.json").write_text(json.dumps({"summary": summary, "cells": rows}, indent=1))
    title = f"needle in a haystack: {re.sub(r'^.*/', '', target.name)}" + (
        f" ({args.needles} needles)" if args.needles > 1 else ""
    )
    heatmap(rows, out / "heatmap.png", title)
    return summary
