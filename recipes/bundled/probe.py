"""Needle probes of training checkpoints at long lengths: exact match through the engine, and the last layer's
attention at the answer position (the needle's rank among all keys, the share of the softmax on it).

Haystack, keys and values are held out from both training and the final evaluation: IDLE's text files and the
licenses Debian ships (prose), person names as keys. Used to compare architectures early and to draw the probe
curves of the training run:

    python recipes/bundled/probe.py runs/bundled --lengths 16384,131072,1048576 --trials 4 [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

import longmoe
from longmoe.api import Model
from longmoe.checkpoint import native
from longmoe.model import ModelConfig, Transformer
from longmoe.tokenizer import Tokenizer

NAMES = (
    "Alice Boris Chiara Dmitri Elena Farid Greta Hiroshi Ingrid Jamal Katya Lorenzo Mireille Nikolai Olga Pablo "
    "Quentin Rosa Stefan Tamsin Ulrich Valentina Wojciech Ximena Yusuf Zora"
).split()
NEEDLE = "The special magic {key} number is: {value}."
QUESTION = "What is the special magic {key} number?"
ANSWER = "The special magic {key} number is:"


def validation_haystack() -> str:
    idle = Path(sysconfig.get_paths()["stdlib"]) / "idlelib"
    parts = [f.read_text(errors="replace") for f in sorted(idle.glob("*.txt"))]
    lic = Path("/usr/share/common-licenses")
    if lic.is_dir():
        parts += [f.read_text(errors="replace") for f in sorted(lic.iterdir()) if f.is_file() and not f.is_symlink()]
    return "\n".join(parts)


def load_step(ckpt: Path, tokenizer: Path) -> Model:
    """A training checkpoint directory (checkpoints/step-N) or an export, as a longmoe Model on the engine."""
    if (ckpt / "config.json").exists():
        return longmoe.load(ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    state = torch.load(ckpt / "rank-00000.pt", weights_only=False)
    model = Transformer(ModelConfig.from_dict(meta["config"]))
    weights = dict(state["model"])
    for name, master in (state.get("master") or {}).items():  # bf16 runs: the fp32 masters are the weights
        weights[name] = master
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    model.reset_buffers("cpu")
    model.eval()
    return Model(native(model), Tokenizer(tokenizer), chunk_size=16384)


def trial(m: Model, hay: str, length: int, depth: float, rng: random.Random, fixed_logn: int = 0) -> dict:
    """One needle at `depth` of a `length`-token prompt. fixed_logn=N: the ablation without length-dependent
    scaling, SSMax's log n held at log N (exact for the answer's queries, which all sit at about the prompt's end)."""
    key, value = rng.choice(NAMES), str(rng.randint(1_000_000, 9_999_999))
    needle = NEEDLE.format(key=key, value=value)
    tail = f"\n{QUESTION.format(key=key)} {ANSWER.format(key=key)}"
    n = length - len(needle) - len(tail) - 2
    start = rng.randrange(len(hay))
    text = (hay * (2 + n // len(hay)))[start : start + n]
    cut = int(depth * len(text))
    while 0 < cut < len(text) and text[cut - 1] not in "\n ":
        cut -= 1  # back to a word or line boundary
    prompt = f"{text[:cut]} {needle} {text[cut:]}{tail}"
    lo = prompt.encode().index(needle.encode())  # byte-level tokens: token offsets = byte offsets
    span = (lo, lo + len(needle))  # any key of the needle sentence

    attn = m.module.layers[-1].self_attn
    keys = []
    h = attn.k_proj.register_forward_hook(lambda mod, args, out: keys.append(out.detach()))
    last = {}  # the input of the prompt's final position to the last layer (recomputed for its query)
    hq = attn.register_forward_hook(lambda mod, args, out: last.update({int(args[1][0, -1]): args[0][0, -1:]}))
    saved = attn.logn_scale.data.clone() if attn.logn_scale is not None else None
    if fixed_logn and saved is not None:
        attn.logn_scale.data *= math.log(fixed_logn) / math.log(len(prompt.encode()))
    t0 = time.perf_counter()
    try:
        out = m.generate(prompt, max_new_tokens=12)
        stats_scale = attn.logn_scale.data.clone() if saved is not None else None
    finally:
        h.remove()
        hq.remove()
        if saved is not None:
            attn.logn_scale.data.copy_(saved)
    seconds = time.perf_counter() - t0
    c = m.config
    T = len(prompt.encode())
    k = torch.cat([x[0] for x in keys], 0)[:T].view(T, c.num_kv_heads, c.head_dim)  # prompt keys [T, Hkv, D]
    stats = _attention(attn, k, last[T - 1], torch.tensor([[T - 1]]), span, stats_scale)
    return {"length": length, "depth": depth, "found": value in out.text, "answer": out.text, "seconds": seconds,
            **stats}  # fmt: skip


def _attention(attn, k: torch.Tensor, x: torch.Tensor, pos: torch.Tensor, span: tuple[int, int],
               logn_scale: torch.Tensor | None) -> dict:  # fmt: skip
    """Scores of the final query over every prompt key, per head: the needle's best rank and softmax share."""
    c = attn.config
    with torch.no_grad():
        q = attn.q_proj(x).view(1, c.num_heads, c.head_dim)
        kk = k
        if attn.nope_norm is not None:
            q, kk = attn.nope_norm(q), attn.nope_norm(k)
        if c.attn_temperature_tuning:
            q = q * (math.log1p(math.floor((pos.item() + 1) / c.floor_scale)) * c.attn_scale + 1)
        if logn_scale is not None:
            q = q * (math.log(pos.item() + 1) * logn_scale.float())[None, :, None]
        rep = c.num_heads // c.num_kv_heads
        s = torch.einsum("qhd,thd->ht", q.float(), kk.float().repeat_interleave(rep, dim=1)) * c.scale  # [H, T]
        p = s.softmax(-1)
        inside = torch.zeros(s.shape[1], dtype=torch.bool)
        inside[span[0] : span[1]] = True
        mass = p[:, inside].sum(-1)  # [H]
        best = int(mass.argmax())
        rank = int((s[best, ~inside] > s[best, inside].max()).sum())
        margin = float(s[best, inside].max() - s[best, ~inside].max())
    return {"mass": float(mass[best]), "rank": rank, "margin": margin, "head": best}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a training run directory (every checkpoint is probed) or a model directory")
    p.add_argument("--lengths", default="16384,131072", help="comma-separated lengths in tokens")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--trials", type=int, default=1, help="trials per length and depth")
    p.add_argument("--every", type=int, default=1, help="probe every k-th checkpoint")
    p.add_argument("--out", help="append results here (JSONL); default RUN/probes.jsonl")
    p.add_argument("--fixed-logn", type=int, default=0, metavar="N",
                   help="ablation: hold SSMax's log n at log N (no length-dependent scaling past N tokens)")
    args = p.parse_args()
    run = Path(args.run)
    steps = sorted(run.glob("checkpoints/step-*"))[:: args.every] if (run / "checkpoints").is_dir() else [run]
    if run.parent.name == "checkpoints":  # one checkpoint of a run
        run = run.parent.parent
    out = Path(args.out or (run / "probes.jsonl" if (run / "checkpoints").is_dir() else "probes.jsonl"))
    rows_done = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    done = {(r["checkpoint"], r.get("fixed_logn", 0)) for r in rows_done}
    hay = validation_haystack()
    for ckpt in steps:
        if (str(ckpt), args.fixed_logn) in done:
            continue
        m = load_step(ckpt, run / "tokenizer.json")
        rng = random.Random(0)
        rows = [trial(m, hay, int(n), float(d), rng, args.fixed_logn) for n in args.lengths.split(",")
                for d in args.depths.split(",") for _ in range(args.trials)]  # fmt: skip
        step = int(ckpt.name.split("-")[-1]) if ckpt.name.startswith("step-") else None
        summary = {"checkpoint": str(ckpt), "step": step, "fixed_logn": args.fixed_logn, "rows": rows}
        with open(out, "a") as f:
            f.write(json.dumps(summary) + "\n")
        for n in args.lengths.split(","):
            r = [x for x in rows if x["length"] == int(n)]
            print(f"{ckpt.name} {int(n):>9,}: found {sum(x['found'] for x in r)}/{len(r)}  mass "
                  f"{sum(x['mass'] for x in r) / len(r):.3f}  rank {max(x['rank'] for x in r)}  margin "
                  f"{min(x['margin'] for x in r):.2f}  {sum(x['seconds'] for x in r) / len(r):.1f} s/trial",
                  file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
