"""Training throughput: longmoe vs transformers' MixtralForCausalLM on the same config, same weights, same batches,
measured in the same run. One step = forward + backward + AdamW step; attention as each library picks by default
(longmoe's fused CPU flash kernel, transformers' SDPA), experts through grouped_mm in both.

--dtype float32: both train in fp32. --dtype bfloat16: longmoe trains as `longmoe train` does with dtype=bfloat16
(bf16 weights and compute, fp32 master weights in AdamW, loss fused with the output projection); transformers runs
both of its own recipes, fp32 and bf16 autocast over fp32 weights (what its Trainer does with bf16=True), and the
ratio is taken against the faster of the two.

    .venv/bin/python bench/train_vs_transformers.py [--steps 10] [--seq-len 1024] [--batch 4] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

CONFIG = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=8192,
)


def build(tmp: Path):
    from transformers import MixtralConfig, MixtralForCausalLM

    import longmoe

    torch.manual_seed(0)
    hf = MixtralForCausalLM(MixtralConfig(**CONFIG, output_router_logits=True, router_aux_loss_coef=0.01))
    hf.save_pretrained(tmp)
    ours = longmoe.load(tmp, dtype="float32").module
    ours = type(ours)(ours.config)  # fresh, writable parameters (not memory-mapped)
    ours.load_state_dict(longmoe.load(tmp, dtype="float32").module.state_dict())
    return hf.train(), ours.train()


def step_ours(model, opt, masters, ids, targets):
    from longmoe.model import load_balancing_loss

    out = model(ids, targets=targets)  # cross-entropy fused with lm_head, no [B, T, V] logits
    loss = out.loss_sum / targets.numel()
    loss = loss + 0.01 * load_balancing_loss(out.router_logits, model.config.num_experts_per_tok)
    loss.backward()
    masters.grads_to_master()
    opt.step()
    opt.zero_grad(set_to_none=True)
    masters.copy_to_model()
    return loss.item()


def step_hf(model, opt, masters, ids, targets):
    out = model(ids, labels=ids)  # shifts internally; includes router_aux_loss_coef * aux
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (autocast)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    tmp = Path(__file__).parent / ".cache" / "train-mixtral"
    hf, ours = build(tmp)
    from longmoe.train.loop import flops_per_token as model_flops
    from longmoe.train.loop import measured_peak_flops

    c = CONFIG
    flops_per_token = model_flops(ours.config, ours.num_parameters()[1], args.seq_len)  # as `longmoe train` logs
    dtype = getattr(torch, args.dtype)
    peak = measured_peak_flops(dtype)
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, c["vocab_size"], (args.batch, args.seq_len + 1), generator=g) for _ in range(args.steps + 2)
    ]
    from longmoe.train.precision import MasterWeights

    masters = MasterWeights(dict(ours.named_parameters()) if dtype == torch.bfloat16 else {})
    runs = [("longmoe", ours, step_ours, False), ("transformers", hf, step_hf, False)]
    if dtype == torch.bfloat16:  # transformers' mixed precision: autocast over fp32 weights; also its fp32 run
        runs[1] = ("transformers-autocast", hf, step_hf, True)
        runs.append(("transformers-fp32", copy.deepcopy(hf), step_hf, False))
    result = {}
    for name, model, step, autocast in runs:
        params = [masters.master(x) for x in model.parameters()]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # the fastest CPU AdamW, for both
        times, losses = [], []
        for i, b in enumerate(batches):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                losses.append(step(model, opt, masters, b[:, :-1], b[:, 1:]))
            if i >= 2:  # the first two steps warm up kernels and allocate optimizer state
                times.append(time.perf_counter() - t0)
        tokens = args.batch * args.seq_len
        tps = tokens * len(times) / sum(times)
        result[name] = {"tokens_per_s": tps, "mfu": tps * flops_per_token / peak, "first_loss": losses[0]}
        print(f"{name:21} {tps:8.0f} tok/s  MFU {100 * result[name]['mfu']:5.1f}%  (loss at step 1 {losses[0]:.4f})",
              flush=True)  # fmt: skip
    best = max(v["tokens_per_s"] for k, v in result.items() if k.startswith("transformers"))
    ratio = result["longmoe"]["tokens_per_s"] / best
    print(f"ratio x{ratio:.2f} over transformers' faster run  ({args.dtype} matmul peak {peak / 1e9:.0f} GFLOP/s; "
          f"{flops_per_token / 1e6:.0f} MFLOP/token)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "peak_flops": peak, **result}, indent=2))


if __name__ == "__main__":
    main()
