"""Negative log-likelihood by token position (Gemini 1.5 report, sec. 5.2.1.1, Fig. 7): the cumulative average NLL
of a long document's tokens up to position x, averaged over documents, with the power-law fit
L(x) = a * x^b + c and its R^2. Documents are text files, or a source tree's files concatenated in shuffled order
(a code document); by default the English documentation shipped with Python, in shuffled order."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import Progress
from ..tasks import python_docs_text
from .targets import LocalTarget, Target, TargetError


def documents(files: list[str], code_dir: str | None, seed: int) -> list[tuple[str, str]]:
    """(name, text) pairs."""
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
    if not docs:
        topics = list(python_docs_text())
        random.Random(seed).shuffle(topics)
        docs.append(("python-docs", "\n\n".join(topics)))
    return docs


def checkpoints(n: int) -> list[int]:
    """Log-spaced positions 1..n (about 24 per decade) at which curves are recorded and fitted."""
    out = sorted({min(n, max(1, round(10 ** (k / 24)))) for k in range(int(24 * math.log10(max(n, 1))) + 1)} | {n})
    return out


def fit_power_law(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Least squares for L(x) = a x^b + c: for a given c, log(y - c) is linear in log x; search c (a coarse grid
    below min(y), then finer grids around the best) for the smallest squared error in y itself."""

    def sse(c: float) -> tuple[float, float, float]:
        b, log_a = np.polyfit(np.log(x), np.log(y - c), 1)
        return float(((y - (np.exp(log_a) * x**b + c)) ** 2).sum()), float(np.exp(log_a)), float(b)

    top, span = float(y.min()), max(float(y.max() - y.min()), 1e-6)
    lo, hi = top - 20 * span, top - 1e-9 * span
    for _ in range(4):
        grid = np.linspace(lo, hi, 200)
        errors = [sse(c)[0] for c in grid]
        i = int(np.argmin(errors))
        step = grid[1] - grid[0]
        lo, hi = grid[max(i - 1, 0)], min(grid[min(i + 1, len(grid) - 1)], top - 1e-9 * span)
        if step < 1e-9 * span:
            break
    c = float(grid[i])
    err, a, b = sse(c)
    r2 = 1 - err / max(float(((y - y.mean()) ** 2).sum()), 1e-12)
    return {"a": a, "b": b, "c": c, "r2": r2}


def plot(curve: dict[int, float], fit: dict[str, float] | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array(sorted(curve))
    y = np.array([curve[k] for k in x])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, y, "o", ms=3, color="#2166ac", label="cumulative average NLL")
    if fit:
        xs = np.logspace(np.log10(x[x >= fit["x_min"]].min()), np.log10(x.max()), 200)
        ax.plot(xs, fit["a"] * xs ** fit["b"] + fit["c"], "-", color="#b2182b",
                label=f"fit {fit['a']:.3g}·x^{fit['b']:.3f} + {fit['c']:.3g}  (R² = {fit['r2']:.3f})")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("token position (x)")
    ax.set_ylabel("cumulative average NLL up to x (nats)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(target: Target, args: Any) -> dict[str, Any]:
    if not isinstance(target, LocalTarget):
        raise TargetError("nll needs the model's log-probabilities: use a local --model (the Gemini and OpenAI APIs "
                          "do not return them for the prompt)")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "documents.jsonl"
    done = {}
    if cache_path.exists():
        for line in cache_path.read_text().splitlines():
            try:
                row = json.loads(line)
                done[row["key"]] = row
            except (json.JSONDecodeError, KeyError):
                continue
    docs = documents(args.documents, args.code_dir, args.seed)
    model = target.model
    progress = Progress(len(docs), "nll", enabled=not args.quiet)
    rows = []
    from ..engine.engine import SamplingParams

    for i, (name, text) in enumerate(docs):
        key = f"{name}:{args.max_context}"
        if key not in done:
            ids = model.encode(text)[: args.max_context]
            if len(ids) < 2:
                raise ValueError(f"document {name} has fewer than 2 tokens")
            seq = model.engine.submit(ids, SamplingParams(max_new_tokens=0, prompt_logprobs=True))
            model.engine.run(seq)
            nll = -np.array(seq.prompt_logprobs)  # token 1..n-1 given everything before
            cum = np.cumsum(nll) / np.arange(1, len(nll) + 1)
            points = checkpoints(len(cum))
            row = {
                "key": key,
                "document": name,
                "tokens": len(ids),
                "curve": {str(p): float(cum[p - 1]) for p in points},
            }
            with open(cache_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            done[key] = row
        rows.append(done[key])
        progress.update(i + 1, f"{name}: {done[key]['tokens']:,} tokens")

    # average the documents' curves at each recorded position they reach
    sums: dict[int, list[float]] = {}
    for r in rows:
        for p, v in r["curve"].items():
            sums.setdefault(int(p), []).append(v)
    curve = {p: sum(v) / len(v) for p, v in sorted(sums.items())}
    x = np.array([p for p in curve if p >= args.fit_from], dtype=float)
    y = np.array([curve[int(p)] for p in x])
    fit = None
    if len(x) >= 4:
        fit = fit_power_law(x, y)
        fit["x_min"] = args.fit_from
    summary = {
        "target": target.name,
        "task": "nll",
        "documents": [{"name": r["document"], "tokens": r["tokens"]} for r in rows],
        "fit": fit,
        "final_nll": curve[max(curve)],
        "curve": {str(k): v for k, v in curve.items()},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    plot(curve, fit, out / "nll.png", f"NLL by position: {Path(target.name).name}")
    return summary


def table(summary: dict[str, Any]) -> str:
    curve = {int(k): v for k, v in summary["curve"].items()}
    marks = [p for p in curve if p in (1, 10, 100, 1000, 10000, 100000, 1000000)] + [max(curve)]
    lines = [f"{'position':>10} | cumulative NLL"] + [f"{p:>10,} | {curve[p]:.4f}" for p in sorted(set(marks))]
    f = summary["fit"]
    if f:
        lines.append(f"fit L(x) = {f['a']:.4g} * x^{f['b']:.4f} + {f['c']:.4g}   R^2 = {f['r2']:.4f} "
                     f"(x >= {f['x_min']})")  # fmt: skip
    return "\n".join(lines)
