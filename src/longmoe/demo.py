"""`longmoe demo`: the bundled model finds a planted sentence in haystacks from 1K up to 128K tokens (or 1M), on
this CPU, through the same engine and evaluation as `longmoe eval niah`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .corpora import HAYSTACKS
from .progress import fmt_seconds

DEPTHS = [0.0, 25.0, 50.0, 75.0, 100.0]


def lengths_up_to(max_length: int) -> list[int]:
    """1024, 2048, 4096, ... up to max_length (which is included even if it is not a power of two)."""
    out, n = [], 1024
    while n < max_length:
        out.append(n)
        n *= 2
    return out + [max_length]


def explain(summary: dict[str, Any], heatmap: Path, haystack: str, seconds: float, max_length: int) -> str:
    recall = summary["recall"]
    longest = max(int(n) for n in summary["recall_per_length"])
    shortest = min(int(n) for n in summary["recall_per_length"])
    hay = HAYSTACKS.get(haystack, (haystack, False))[0]
    return (
        f"What you just saw: longmoe's bundled model, a {summary['model_size']} sparse mixture-of-experts trained "
        f"on this kind of CPU by recipes/bundled, read haystacks of {_short(shortest)} to {_short(longest)} tokens "
        f"of {hay} - text it never saw in training - with the sentence \"The special "
        f"magic <city> number is: <7 digits>.\" planted at {len(summary['recall_grid'][str(longest)])} depths, and "
        f"answered \"What is the special magic <city> number?\" {100 * recall:.1f}% of the time over "
        f"{summary['trials']} trials ({fmt_seconds(seconds)} in all). Every trial ran the full prompt through the "
        "engine: chunked prefill into a paged KV cache, then decoding. Its only global attention layer is its last, "
        "so prefill costs O(length x window) and the last layer runs only where the answer is read.\n"
        f"The heatmap is {heatmap}. Go further:\n"
        "  longmoe demo --max-length 1048576            a million tokens (about a minute per trial here)\n"
        "  longmoe demo --haystack perl-code             a code haystack; or --haystack FILE|DIR of your own\n"
        "  longmoe eval niah --lengths 4096,65536 --samples 20 --out runs/niah      the full evaluation\n"
        "  longmoe serve                                 the Gemini-compatible API, with this model\n"
        "It is a retrieval demonstrator trained on needle-style tasks, not a chat model (see its model card: "
        "longmoe info)."
    )


def _short(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10}K" if n % 1024 == 0 else f"{n:,}"


def main(args: argparse.Namespace) -> int:
    from .eval import niah
    from .eval.targets import LocalTarget

    if args.max_length < 1024:
        raise ValueError(f"--max-length must be >= 1024 tokens, got {args.max_length}")
    target = LocalTarget(args.model, chunk_size=args.chunk_size)
    out = Path(args.out or f"longmoe-demo/{Path(args.haystack).name}-{args.max_length}")
    ns = argparse.Namespace(
        out=str(out), lengths=lengths_up_to(args.max_length), depths=args.depths, samples=args.samples, seed=0,
        haystack=args.haystack, needles=1, ask_each=False, needle=niah.NEEDLE, question=niah.QUESTION,
        answer_prefix=niah.ANSWER_PREFIX, ending="answer-prefix", max_tokens=12, quiet=False,
    )  # fmt: skip
    print(f"longmoe demo: {target.name}, {len(ns.lengths)} lengths x {len(ns.depths)} depths x {ns.samples} "
          f"({_short(ns.lengths[0])} .. {_short(ns.lengths[-1])} tokens), haystack {args.haystack}",
          file=sys.stderr)  # fmt: skip
    t0 = time.perf_counter()
    summary = niah.main(target, ns)
    seconds = time.perf_counter() - t0
    total, _ = target.model.module.num_parameters()
    summary["model_size"] = f"{total / 1e6:.1f}M-parameter"
    print(niah.table(summary))
    print()
    print(explain(summary, out / "heatmap.png", args.haystack, seconds, args.max_length))
    return 0
