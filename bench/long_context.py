"""A 1,048,576-token context end to end on this machine: chunked prefill of the prompt, then decoding, with a small
Llama-4-shaped MoE (chunked local layers + one global NoPE layer; random weights: this measures the system, not
the model). Prints wall time, throughput, peak RSS and the memory planner's estimate.

    .venv/bin/python bench/long_context.py                  # 1,048,576 tokens (~20 min on 2 cores)
    .venv/bin/python bench/long_context.py --tokens 65536   # quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from longmoe.engine.engine import Engine, SamplingParams
from longmoe.model import ModelConfig, Transformer
from longmoe.sysinfo import fmt_gib


def status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def rss() -> int:
    return status("VmRSS:")


def reset_peak() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM), so the peak covers the run, not imports and setup."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    return status("VmHWM:")


def small_long_model() -> Transformer:
    config = ModelConfig(
        vocab_size=4096, hidden_size=128, num_layers=4, num_heads=2, num_kv_heads=1, head_dim=32,
        intermediate_size=256, layer_types=["chunked", "chunked", "chunked", "full"], attention_chunk_size=8192,
        rope_layers=[True, True, True, False], attn_temperature_tuning=True, qk_norm="l2", rope_interleaved=True,
        num_experts=4, num_experts_per_tok=1, moe_intermediate_size=128, shared_expert_intermediate_size=128,
        score_func="sigmoid", norm_topk_prob=False, weight_on_input=True, max_position_embeddings=1 << 21,
        rope_theta=5e5,
    )  # fmt: skip
    model = Transformer(config)
    model.init_weights(seed=0)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1 << 20, help="total context: prompt + generated")
    ap.add_argument("--new", type=int, default=16, help="tokens to generate at the end")
    ap.add_argument("--chunk", type=int, default=16384, help="prefill chunk")
    ap.add_argument("--kv-dtype", default="auto", choices=["auto", "fp8"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model = small_long_model()
    engine = Engine(model, kv_dtype=args.kv_dtype, chunk_size=args.chunk, block_size=256, max_seqs=1)
    base = rss()  # interpreter + torch + weights, before any context
    reset_peak()
    estimate = engine.memory_plan(args.tokens)
    prompt = torch.randint(0, 4096, (args.tokens - args.new,), generator=torch.Generator().manual_seed(0)).tolist()

    t0 = time.perf_counter()
    seq = engine.submit(prompt, SamplingParams(max_new_tokens=args.new))
    last = t0
    while not seq.finished:
        engine.step()
        now = time.perf_counter()
        if now - last > 30:
            done = seq.num_computed
            print(f"  {done:,}/{len(prompt):,} prompt tokens, {now - t0:,.0f} s, rss {fmt_gib(rss())}", file=sys.stderr)
            last = now
    wall = time.perf_counter() - t0
    peak = peak_rss()
    result = {
        "context_tokens": len(seq.tokens),
        "generated": len(seq.output),
        "wall_seconds": round(wall, 1),
        "prefill_seconds": round(seq.timings.prefill_seconds, 1),
        "prefill_tokens_per_s": round(len(prompt) / seq.timings.prefill_seconds, 1),
        "decode_tokens_per_s": round(len(seq.output) / max(seq.timings.decode_seconds, 1e-9), 2),
        "kv_dtype": engine.kv_dtype_name,
        "peak_rss_gib": round(peak / 2**30, 3),
        "baseline_rss_gib": round(base / 2**30, 3),
        "planner_kv_gib": round(estimate.kv / 2**30, 3),
        "planner_activations_gib": round(estimate.activations / 2**30, 3),
        "planner_estimate_gib": round((base + estimate.kv + estimate.activations) / 2**30, 3),
        "peak_over_estimate": round(peak / (base + estimate.kv + estimate.activations), 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:24} {v}")


if __name__ == "__main__":
    main()
