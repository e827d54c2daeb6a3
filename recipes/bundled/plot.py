"""The training run's curves as PNGs: loss (text, held-out, synthetic answers) by step, and the needle probes of
probe.py (exact match, attention share and logit margin of the needle at each probed length) by checkpoint.

    python recipes/bundled/plot.py runs/bundled --out recipes/bundled
    python recipes/bundled/plot.py runs/bundled-ft --out recipes/bundled --suffix=-stage2   # loss-stage2.png, ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def smooth(ys: list[float], k: int = 25) -> list[float]:
    out, acc = [], []
    for y in ys:
        acc.append(y)
        acc = acc[-k:]
        out.append(sum(acc) / len(acc))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--out", default=".")
    p.add_argument("--suffix", default="", help="appended to the PNGs' names (loss{suffix}.png, probes{suffix}.png)")
    args = p.parse_args()
    run, out = Path(args.run), Path(args.out)
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [r["step"] for r in rows]
    ax.plot(steps, smooth([r["loss"] for r in rows]), label="text (train, smoothed)", color="#2166ac")
    if any("synthetic_loss" in r for r in rows):
        syn = [r for r in rows if "synthetic_loss" in r]
        ax.plot([r["step"] for r in syn], smooth([r["synthetic_loss"] for r in syn]), label="synthetic answers "
                "(smoothed)", color="#b2182b")  # fmt: skip
    held = [r for r in rows if "heldout_loss" in r]
    if held:
        ax.plot([r["step"] for r in held], [r["heldout_loss"] for r in held], "o-", label="held-out text",
                color="#4d9221")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_title(f"training loss: {run.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"loss{args.suffix}.png", dpi=120)
    plt.close(fig)

    probes = run / "probes.jsonl"
    if not probes.exists():
        return
    every = [json.loads(x) for x in probes.read_text().splitlines()]
    points = sorted((r for r in every if not r.get("fixed_logn")), key=lambda r: r["step"] or 0)
    lengths = sorted({r["length"] for p_ in points for r in p_["rows"]})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for n in lengths:
        xs, found, mass, rank = [], [], [], []
        for p_ in points:
            rs = [r for r in p_["rows"] if r["length"] == n]
            if rs:
                xs.append(p_["step"])
                found.append(sum(r["found"] for r in rs) / len(rs))
                mass.append(sum(r["mass"] for r in rs) / len(rs))
                rank.append(min(r["margin"] for r in rs))
        label = f"{n >> 10}K" if n < 1 << 20 else f"{n >> 20}M"
        axes[0].plot(xs, found, "o-", label=label)
        axes[1].plot(xs, mass, "o-", label=label)
        axes[2].plot(xs, rank, "o-", label=label)
    axes[0].set_title("needle found (exact match)")
    axes[1].set_title("attention share on the needle (best head)")
    axes[2].set_title("logit margin: needle over best other key")
    axes[2].axhline(0, color="grey", lw=0.8)  # below 0: another key outranks the needle
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(title="length")
    fig.tight_layout()
    fig.savefig(out / f"probes{args.suffix}.png", dpi=120)
    plt.close(fig)
    ablation(every, out)


def ablation(every: list[dict], out: Path) -> None:
    """SSMax as trained vs. its log n held at a training length: the needle's attention share by length."""
    fixed = [r for r in every if r.get("fixed_logn")]
    if not fixed:
        return
    ckpt = fixed[-1]["checkpoint"]
    runs = [r for r in every if r["checkpoint"] == ckpt]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for r in sorted(runs, key=lambda r: r.get("fixed_logn", 0)):
        n_fixed = r.get("fixed_logn", 0)
        label = "SSMax: q x s log n (as trained)" if not n_fixed else f"log n held at log {n_fixed:,}"
        lengths = sorted({x["length"] for x in r["rows"]})
        per = [[x for x in r["rows"] if x["length"] == n] for n in lengths]
        axes[0].plot(lengths, [sum(x["mass"] for x in p) / len(p) for p in per], "o-", label=label)
        axes[1].plot(lengths, [sum(x["found"] for x in p) / len(p) for p in per], "o-", label=label)
    axes[0].set_title("attention share on the needle (best head)")
    axes[1].set_title("needle found (exact match)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ssmax.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
