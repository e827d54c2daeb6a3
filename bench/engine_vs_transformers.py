"""longmoe's engine vs transformers on one Mixtral-shaped model, measured in the same run.

Model: random weights, transformers' MixtralForCausalLM (hidden 512, 8 layers, 8 heads / 2 KV heads, 8 experts top-2,
expert width 1024, vocab 32000), bf16, built locally and cached under bench/.cache/. Each measurement runs in its own
subprocess so its peak RSS is its own. Rooflines use this machine's bf16 matmul rate and copy bandwidth, measured
at the start of the run.

    .venv/bin/python bench/engine_vs_transformers.py                       # everything (about an hour on 2 cores)
    .venv/bin/python bench/engine_vs_transformers.py --prefill 2048 --decode 512   # a quick subset
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / ".cache" / "mixtral-512-8x2-bf16"
CONFIG = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=262144,
    rope_theta=1e6,
)  # fmt: skip


def build_model() -> None:
    if (MODEL_DIR / "config.json").exists():
        return
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**CONFIG)).to(torch.bfloat16)
    model.save_pretrained(MODEL_DIR)


def machine_rates() -> dict[str, float]:
    """bf16 matmul FLOP/s and copy bandwidth (bytes copied per second), with the threads the benchmark uses."""
    a = torch.randn(4096, 4096, dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, dtype=torch.bfloat16)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    flops = 5 * 2 * 4096**3 / (time.perf_counter() - t)
    src = torch.empty(2**30, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    bandwidth = 5 * 2**30 / (time.perf_counter() - t)
    del src, dst
    return {"bf16_flops": flops, "copy_bytes_per_s": bandwidth}


# --------------------------------------------------------------------------------------------------------------------
# workers: one measurement each, printing one JSON line


def worker_longmoe(task: str, tokens: int, new: int) -> dict:
    import longmoe
    from longmoe.engine.engine import SamplingParams

    m = longmoe.load(MODEL_DIR, chunk_size=4096 if task == "prefill" else 2048)
    prompt = torch.randint(0, 32000, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    m.generate(prompt[:64], max_new_tokens=2)  # warm up kernels and the pool
    seq = m.engine.submit(prompt, SamplingParams(max_new_tokens=new, ignore_eos=True))
    m.engine.run(seq)
    assert len(seq.output) == new
    return {"prefill_s": seq.timings.prefill_seconds, "decode_s": seq.timings.decode_seconds}


def worker_transformers(task: str, tokens: int, new: int) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache

    hf = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16).eval()  # sdpa, grouped_mm experts
    prompt = torch.randint(0, 32000, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        hf(prompt[:, :64], logits_to_keep=1)  # warm up
        cache = DynamicCache(config=hf.config)
        t0 = time.perf_counter()
        out = hf(prompt, cache=cache, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t0
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(new - 1):  # the first new token came from the prefill
            out = hf(tok, cache=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - t0
    return {"prefill_s": prefill, "decode_s": decode * new / max(new - 1, 1)}


def run_worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    fn = worker_longmoe if args.worker == "longmoe" else worker_transformers
    result = fn(args.task, args.tokens, args.new)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent that forked us
    result["peak_rss"] = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    print(json.dumps(result))


def measure(framework: str, task: str, tokens: int, new: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework, "--task", task, "--tokens", str(tokens), "--new", str(new),
           "--threads", str(threads)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------------------------
# model arithmetic for the rooflines


def model_numbers() -> dict[str, float]:
    c = CONFIG
    H, L, V, I, E, K = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"], 8, 2
    D = H // c["num_attention_heads"]
    attn = H * H * 2 + 2 * H * c["num_key_value_heads"] * D  # q, o + k, v
    expert = 3 * H * I
    active = L * (attn + E * H + K * expert + 2 * H) + V * H + H  # + router, norms; lm_head; final norm
    weights = L * (attn + E * H + E * expert + 2 * H) + 2 * V * H + H
    kv_per_token = L * 2 * c["num_key_value_heads"] * D * 2  # bf16
    return {"active_params": active, "weights_bytes": 2 * weights, "kv_bytes_per_token": kv_per_token, "hidden": H,
            "layers": L, "heads_x_dim": c["num_attention_heads"] * D}  # fmt: skip


def prefill_flops(n: int, m: dict) -> float:
    linear = 2 * (m["active_params"] - 32000 * 512) * n + 2 * 32000 * 512  # logits for the last token only
    attention = m["layers"] * 2 * n * n * m["heads_x_dim"]  # causal: QK^T and PV over half the square
    return linear + attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", default="2048,32768,131072", help="prefill context lengths")
    ap.add_argument("--decode", default="512,32768", help="decode context lengths")
    ap.add_argument("--new", type=int, default=32, help="tokens decoded per decode measurement")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", metavar="FILE", help="also write all results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return run_worker(args)

    build_model()
    torch.set_num_threads(args.threads)
    rates = machine_rates()
    m = model_numbers()
    print(f"machine: {args.threads} threads, bf16 matmul {rates['bf16_flops'] / 1e9:.0f} GFLOP/s, "
          f"copy {rates['copy_bytes_per_s'] / 1e9:.1f} GB/s")  # fmt: skip
    print(f"model: {m['weights_bytes'] / 2**20:.0f} MiB bf16 weights, {m['active_params'] / 1e6:.1f}M active "
          f"params/token, KV {m['kv_bytes_per_token']} B/token")  # fmt: skip
    rows = []
    for task, lengths in (("prefill", args.prefill), ("decode", args.decode)):
        for n in [int(x) for x in lengths.split(",") if x]:
            new = 1 if task == "prefill" else args.new
            ours = measure("longmoe", task, n, new, args.threads)
            ref = measure("transformers", task, n, new, args.threads)
            row = {"task": task, "context": n, "longmoe": ours, "transformers": ref}
            key = "prefill_s" if task == "prefill" else "decode_s"
            count = n if task == "prefill" else new
            for name in ("longmoe", "transformers"):
                if key in row[name]:
                    row[name]["tokens_per_s"] = count / row[name][key]
            if task == "prefill":
                row["roofline_tokens_per_s"] = n / (prefill_flops(n, m) / rates["bf16_flops"])
            else:
                bytes_per_token = 2 * m["active_params"] + m["kv_bytes_per_token"] * (n + new // 2)
                row["roofline_tokens_per_s"] = rates["copy_bytes_per_s"] / bytes_per_token
            kv = m["kv_bytes_per_token"] * (n + new)
            row["weights_plus_kv"] = m["weights_bytes"] + kv
            rows.append(row)
            print_row(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"rates": rates, "model": m, "rows": rows}, indent=2))


def print_row(r: dict) -> None:
    ours, ref = r["longmoe"], r["transformers"]

    def tps(x: dict) -> str:
        return f"{x['tokens_per_s']:9.1f}" if "tokens_per_s" in x else f"{'error':>9}"

    ratio = ours["tokens_per_s"] / ref["tokens_per_s"] if "tokens_per_s" in ours and "tokens_per_s" in ref else None
    roof = ours["tokens_per_s"] / r["roofline_tokens_per_s"] if "tokens_per_s" in ours else None
    rss = "/".join(f"{x['peak_rss'] / 2**30:.2f}" if "peak_rss" in x else "-" for x in (ours, ref))
    print(
        f"{r['task']:7} {r['context']:>7,} tok | longmoe {tps(ours)} tok/s | transformers {tps(ref)} tok/s | "
        f"x{ratio:.2f} | {100 * roof:.0f}% of roofline | peak RSS GiB {rss} "
        f"(weights+KV {r['weights_plus_kv'] / 2**30:.2f})"
        if ratio is not None and roof is not None
        else f"{r['task']:7} {r['context']:>7,} tok | longmoe {ours} | transformers {ref}",
        flush=True,
    )
    for name, x in (("longmoe", ours), ("transformers", ref)):
        if "error" in x:
            print(f"    {name} failed: {x['error']}", flush=True)


if __name__ == "__main__":
    main()
