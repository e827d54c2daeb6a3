"""Negative log-likelihood by token position (Gemini 1.5 report, sec. 5.2.1.1, Fig. 7): the cumulative average NLL
of a long document's tokens up to position x, averaged over documents, with the power-law fit L(x) = a * x^b + c
and its R^2.

By default the documents are held out from the bundled model's training (which reads Python's documentation and
standard library): the built-in perl-docs (English prose) and perl-code (Perl source) haystacks, each cut into two
long documents. Or text files (--documents), or a source tree's files concatenated in shuffled order (--code-dir).

Every document is cut to the same number of tokens (the shortest document's, at most --max-context): averaging
each position over only the documents that reach it would draw a falling, "context helps" curve out of documents
that merely differ in level and length. The spread across documents (min, max, std) is reported with the mean."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..corpora import HAYSTACKS, builtin_haystack
from ..progress import Progress
from .runner import Results, atomic_write, fingerprint
from .targets import Target, TargetError

HELD_OUT = ("perl-docs", "perl-code")  # built-in haystacks the bundled model never trained on
PARTS = 2  # documents cut from each


def default_documents() -> list[tuple[str, str]]:
    """The held-out built-in haystacks, each cut into PARTS documents at a paragraph (prose) or file (code)
    boundary."""
    docs = []
    for name in HELD_OUT:
        text = builtin_haystack(name)
        sep = "\n# file: " if HAYSTACKS[name][1] else "\n"
        cuts = [0] + [text.find(sep, len(text) * i // PARTS) + 1 for i in range(1, PARTS)] + [len(text)]
        docs += [(f"{name} ({i + 1}/{PARTS})", text[a:b]) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    return docs


def documents(files: list[str], code_dir: str | None, seed: int) -> list[tuple[str, str]]:
    """(name, text) pairs: the files, the source tree, or else the held-out defaults."""
    docs = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"--documents {f}: no such file")
        docs.append((p.name, p.read_text(errors="replace")))
    if code_dir:
        from ..train.data import CODE_SUFFIXES

        root = Path(code_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--code-dir {code_dir}: no such directory")
        paths = sorted(x for x in root.rglob("*") if x.is_file() and x.suffix.lower() in CODE_SUFFIXES)
        if not paths:
            raise FileNotFoundError(f"--code-dir {code_dir}: no source files inside")
        random.Random(seed).shuffle(paths)
        docs.append((f"code:{root.name}", "\n\n".join(f"# file: {x.relative_to(root)}\n{x.read_text(errors='replace')}"
                                                      for x in paths)))  # fmt: skip
    return docs or default_documents()


def checkpoints(n: int) -> list[int]:
    """Log-spaced positions 1..n (about 24 per decade) at which curves are recorded and fitted."""
    out = sorted({min(n, max(1, round(10 ** (k / 24)))) for k in range(int(24 * math.log10(max(n, 1))) + 1)} | {n})
    return out


def fit_power_law(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Least squares for L(x) = a x^b + c: for a given c, log(y - c) is linear in log x; search c (a coarse grid
    from min(y) - 20 (max(y) - min(y)) up to just below min(y), then finer grids around the best) for the smallest
    squared error in y itself. fit_at_bound: the best c is an end of that search range, so the curve is no power
    law (one still falling like a logarithm pushes c down without end); a, b and c then describe nothing."""
    top = float(y.min())
    if float(y.max()) == top:  # flat: L = c exactly, and b is undetermined
        return {"a": 0.0, "b": 0.0, "c": top, "r2": 1.0, "fit_at_bound": False}

    def sse(c: float) -> tuple[float, float, float]:
        b, log_a = np.polyfit(np.log(x), np.log(y - c), 1)
        return float(((y - (np.exp(log_a) * x**b + c)) ** 2).sum()), float(np.exp(log_a)), float(b)

    span = float(y.max()) - top
    bottom, ceiling = top - 20 * span, top - 1e-9 * span
    lo, hi = bottom, ceiling
    for _ in range(4):
        grid = np.linspace(lo, hi, 200)
        errors = [sse(c)[0] for c in grid]
        i = int(np.argmin(errors))
        step = grid[1] - grid[0]
        lo, hi = grid[max(i - 1, 0)], min(grid[min(i + 1, len(grid) - 1)], ceiling)
        if step < 1e-9 * span:
            break
    c = float(grid[i])
    err, a, b = sse(c)
    r2 = 1 - err / max(float(((y - y.mean()) ** 2).sum()), 1e-12)
    at_bound = bool((i == 0 and grid[0] <= bottom) or (i == len(grid) - 1 and grid[-1] >= ceiling))
    return {"a": a, "b": b, "c": c, "r2": r2, "fit_at_bound": at_bound}


def score(target: Any, ids: list[int]) -> list[float]:
    """NLL (nats) of tokens 1..n-1 of `ids`, each given all before it, by the local model's engine."""
    from ..engine.engine import SamplingParams

    engine = target.model.engine
    seq = engine.submit(ids, SamplingParams(max_new_tokens=0, prompt_logprobs=True))
    engine.run(seq)
    return [-x for x in seq.prompt_logprobs]


def encode(model: Any, text: str, limit: int) -> list[int]:
    """The first `limit` tokens of the text (tokenizing only a generous prefix of a long text)."""
    prefix = text[: 32 * limit]
    ids = model.encode(prefix)
    if len(ids) < limit + 64 and len(prefix) < len(text):  # tokens longer than 32 characters on average
        ids = model.encode(text)
    return ids[:limit]


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve, spread, fit = summary["curve"], summary["spread"], summary["fit"]
    x = np.array([int(k) for k in curve])
    y = np.array(list(curve.values()))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(summary["documents"]) > 1:
        band = f"range over the {len(summary['documents'])} documents"
        low, high = [spread["min"][k] for k in curve], [spread["max"][k] for k in curve]
        ax.fill_between(x, low, high, color="#2166ac", alpha=0.18, linewidth=0, label=band)
    ax.plot(x, y, "o", ms=3, color="#2166ac", label="cumulative average NLL (mean over documents)")
    if fit:
        xs = np.logspace(np.log10(x[x >= fit["x_min"]].min()), np.log10(x.max()), 200)
        ax.plot(xs, fit["a"] * xs ** fit["b"] + fit["c"], "-", color="#b2182b",
                label=f"fit {fit['a']:.3g}·x^{fit['b']:.3f} + {fit['c']:.3g}  (R² = {fit['r2']:.3f})"
                + ("  [c at its search bound]" if fit["fit_at_bound"] else ""))  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("token position (x)")
    ax.set_ylabel("cumulative average NLL up to x (nats)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(target: Target, args: Any, scorer: Callable[[Any, list[int]], list[float]] = score) -> dict[str, Any]:
    """Score every document (resuming from --out), average, fit, plot. `scorer` gives a document's per-token NLL."""
    if not hasattr(target, "model"):
        raise TargetError("nll needs the model's log-probabilities: use a local --model (the Gemini and OpenAI APIs "
                          "do not return them for the prompt)")  # fmt: skip
    if args.max_context < 2 or args.fit_from < 1:
        raise ValueError(f"--max-context must be >= 2 and --fit-from >= 1, got {args.max_context} and {args.fit_from}")
    docs = documents(args.documents, args.code_dir, args.seed)
    ids = [encode(target.model, text, args.max_context) for _, text in docs]
    n = min(len(x) for x in ids)  # every document is scored over the same positions
    if n < 2:
        short = [name for (name, _), x in zip(docs, ids) if len(x) < 2]
        raise ValueError(f"document(s) {', '.join(short)}: fewer than 2 tokens; nothing to score")
    limit = getattr(getattr(target.model, "engine", None), "max_context", None)
    if limit is not None and n > limit:
        raise ValueError(f"--max-context {args.max_context}: documents of {n:,} tokens exceed this model's context of "
                         f"{limit:,} tokens; pass --max-context {limit} or less")  # fmt: skip
    target.check_length(n)
    identity = {
        "eval": "nll", "target": target.identity, "max_context": args.max_context, "seed": args.seed, "tokens": n,
        "documents": [[name, fingerprint(text)] for name, text in docs],
    }  # fmt: skip
    out = Path(args.out)
    results = Results(out, identity)
    progress = Progress(len(docs), "nll", enabled=not args.quiet)
    points = checkpoints(n - 1)  # n tokens: n - 1 predicted
    for i, ((name, _), doc) in enumerate(zip(docs, ids)):
        key = f"document:{i}"
        if key not in results.rows:
            nll = np.asarray(scorer(target, doc[:n]), dtype=float)
            if nll.shape != (n - 1,):
                raise TargetError(f"scoring {name} gave {nll.size} log-probabilities for {n - 1} predicted tokens")
            cum = np.cumsum(nll) / np.arange(1, n)
            results.add({"key": key, "document": name, "tokens_available": len(doc), "tokens": n,
                         "curve": {str(p): float(cum[p - 1]) for p in points}})  # fmt: skip
        progress.update(i + 1, f"{name}: {n:,} tokens")
    rows = [results.rows[f"document:{i}"] for i in range(len(docs))]

    curves = np.array([[r["curve"][str(p)] for p in points] for r in rows])  # documents x positions
    mean = curves.mean(axis=0)
    curve = {str(p): float(v) for p, v in zip(points, mean)}
    spread = {k: {str(p): float(v) for p, v in zip(points, f(curves, axis=0))}
              for k, f in (("min", np.min), ("max", np.max), ("std", np.std))}  # fmt: skip
    x = np.array([p for p in points if p >= args.fit_from], dtype=float)
    y = np.array([curve[str(int(p))] for p in x])
    fit = None
    if len(x) >= 4:
        fit = fit_power_law(x, y)
        fit["x_min"] = args.fit_from
    summary = {
        "target": target.name,
        "task": "nll",
        "source": "--documents / --code-dir" if args.documents or args.code_dir else
        f"the built-in haystacks {' and '.join(HELD_OUT)}, held out from the bundled model's training",
        "documents": [{"name": r["document"], "tokens_available": r["tokens_available"], "tokens_scored": n}
                      for r in rows],
        "tokens_scored": n,
        "fit": fit,
        "fit_at_bound": bool(fit and fit["fit_at_bound"]),
        "final_nll": curve[str(points[-1])],
        "curve": curve,
        "spread": spread,
    }  # fmt: skip
    atomic_write(out / "results.json", json.dumps(summary, indent=1))
    plot(summary, out / "nll.png", f"NLL by position: {Path(target.name).name}")
    return summary


def table(summary: dict[str, Any]) -> str:
    curve = {int(k): v for k, v in summary["curve"].items()}
    spread = summary.get("spread")
    marks = sorted({p for p in curve if p in (1, 10, 100, 1000, 10000, 100000, 1000000)} | {max(curve)})
    lines = [f"{'position':>10} | cumulative NLL" + (" | min over documents - max |    std" if spread else "")]
    for p in marks:
        row = f"{p:>10,} | {curve[p]:14.4f}"
        if spread:
            row += f" | {spread['min'][str(p)]:12.4f} - {spread['max'][str(p)]:<10.4f} | {spread['std'][str(p)]:.4f}"
        lines.append(row)
    f = summary["fit"]
    if f:
        lines.append(f"fit L(x) = {f['a']:.4g} * x^{f['b']:.4f} + {f['c']:.4g}   R^2 = {f['r2']:.4f} "
                     f"(x >= {f['x_min']})")  # fmt: skip
        if f.get("fit_at_bound"):
            lines.append("warning: the fit's c sits on the edge of its search range: this curve is not a power law "
                         "(e.g. it still falls like a logarithm), so do not read a, b or c")  # fmt: skip
    docs = summary.get("documents", [])
    if docs:
        lines.append(f"{len(docs)} documents ({summary.get('source', '')}), each scored over its first "
                     f"{summary['tokens_scored']:,} tokens: " + ", ".join(d["name"] for d in docs))  # fmt: skip
    return "\n".join(lines)
