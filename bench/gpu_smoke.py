"""GPU smoke test: the engine on a CUDA device equals the CPU, generates, and prefills 128K tokens.

    python bench/gpu_smoke.py [--device cuda] [--tokens 131072] [--json]

Builds a small random Llama-4-shaped MoE locally (no downloads), saves it, loads it with `longmoe.load(...,
device=...)`, and checks: logits of a 256-token prompt within 2e-3 of the CPU's (fp32; TF32 off), greedy
generation identical, seeded sampling reproducible, scoring (prompt log-probs) on the device, then a long chunked
prefill with its time and peak device memory against the planner's estimate. Exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import longmoe
from longmoe.checkpoint import native, save
from longmoe.engine.engine import SamplingParams
from longmoe.model import ModelConfig, Transformer
from longmoe.train.data import byte_tokenizer


def build(path: str) -> None:
    config = ModelConfig(
        vocab_size=264, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=256, layer_types=["chunked", "chunked", "chunked", "full"],
        attention_chunk_size=8192, rope_layers=[True, True, True, False], max_position_embeddings=1 << 20,
    )  # fmt: skip
    model = Transformer(config)
    model.init_weights(seed=0)
    save(native(model), path)
    byte_tokenizer(Path(path) / "tokenizer.json")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: nothing to check", file=sys.stderr)
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    result: dict = {"device": args.device}
    with tempfile.TemporaryDirectory() as d:
        build(d)
        cpu = longmoe.load(d, device="cpu")
        dev = longmoe.load(d, device=args.device, chunk_size=16384)
        ids = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a = cpu.module(ids).logits
            b = dev.module(ids.to(args.device)).logits.cpu()
        result["logits_max_abs_diff"] = float((a - b).abs().max())
        prompt = "The special magic number is 4217. " * 8
        result["greedy_equal"] = cpu.generate(prompt, max_new_tokens=16).token_ids == dev.generate(
            prompt, max_new_tokens=16).token_ids  # fmt: skip
        s1 = dev.generate(prompt, max_new_tokens=16, temperature=0.8, seed=3).token_ids
        s2 = dev.generate(prompt, max_new_tokens=16, temperature=0.8, seed=3).token_ids
        result["seeded_sampling_reproducible"] = s1 == s2
        seq = dev.engine.submit(ids[0].tolist(), SamplingParams(max_new_tokens=0, prompt_logprobs=True))
        dev.engine.run(seq)
        result["scoring_positions"] = len(seq.prompt_logprobs)
        long_ids = torch.randint(0, 256, (args.tokens,), generator=torch.Generator().manual_seed(1)).tolist()
        plan = dev.engine.memory_plan(args.tokens + 8)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = dev.generate(long_ids, max_new_tokens=8)
        torch.cuda.synchronize()
        result.update(prefill_tokens=args.tokens, prefill_seconds=round(out.prefill_seconds, 3),
                      prefill_tok_s=round(args.tokens / out.prefill_seconds), wall_s=round(time.perf_counter() - t0, 2),
                      peak_gib=round((torch.cuda.max_memory_allocated() - base) / 2**30, 3),
                      plan_kv_plus_activations_gib=round((plan.kv + plan.activations) / 2**30, 3))  # fmt: skip
    ok = result["logits_max_abs_diff"] < 2e-3 and result["greedy_equal"] and result["seeded_sampling_reproducible"]
    ok = ok and result["scoring_positions"] == 255
    result["ok"] = ok
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
