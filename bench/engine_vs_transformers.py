"""longmoe's engine vs transformers and llama.cpp on Mixtral-shaped models, measured in the same run.

Models (random weights, built locally with transformers' MixtralForCausalLM and cached under bench/.cache/, bf16):
- small: hidden 512, 8 layers, 8 heads / 2 KV heads, 8 experts top-2, expert width 1024 (265 MiB: fits in a big L3);
- large: hidden 1024, 14 layers, 8 heads of 128 / 2 KV heads, 8 experts top-2, expert width 2048 (1.6 GB: larger
  than any CPU cache, as real models are).
Peers: transformers (its defaults: SDPA, grouped_mm experts, DynamicCache) and llama.cpp through llama-cpp-python
(`pip install llama-cpp-python` builds it from source, ~10 min; the checkpoint is converted to a bf16 GGUF with the
converter that ships in its source distribution). A peer that is not installed is reported and skipped. Each
measurement runs in its own subprocess, so its peak RSS (VmHWM) is its own. The run starts by printing the CPU, its
matmul features and L3 size, and measuring the rates the rooflines use: bf16 matmul (4096^3), the fused CPU flash
attention at the model's head shape, and streaming memory reads.

    .venv/bin/python bench/engine_vs_transformers.py --model small                # everything on the small model
    .venv/bin/python bench/engine_vs_transformers.py --model large --prefill 8192 --decode "" --repeat 5  # spread
    .venv/bin/python bench/engine_vs_transformers.py --model large --prefill 131072 --decode "" --peers none  # RSS
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
COMMON = dict(vocab_size=32000, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=262144,
              rope_theta=1e6)  # fmt: skip
MODELS = {
    "small": ("mixtral-512-8x2-bf16", dict(COMMON, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                                           num_attention_heads=8, num_key_value_heads=2)),
    "large": ("mixtral-1024-14L-8x2-bf16", dict(COMMON, hidden_size=1024, intermediate_size=2048, num_hidden_layers=14,
                                                num_attention_heads=8, num_key_value_heads=2, head_dim=128)),
}  # fmt: skip
PEERS = ("transformers", "llama.cpp")


def model_dir(name: str) -> Path:
    return CACHE / MODELS[name][0]


def build_model(name: str) -> Path:
    """The random-weight checkpoint (and a sentencepiece tokenizer of the same vocabulary, which the GGUF converter
    insists on; the benchmark itself feeds token ids)."""
    out = model_dir(name)
    if (out / "config.json").exists():
        return out
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**MODELS[name][1])).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out


def write_sentencepiece(path: Path, vocab_size: int) -> None:
    """A valid sentencepiece model with `vocab_size` pieces: <unk> <s> </s>, the 256 byte pieces, then filler."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    m = sp.ModelProto()
    for piece, kind in (("<unk>", 2), ("<s>", 3), ("</s>", 3)):
        m.pieces.add(piece=piece, score=0.0, type=kind)
    for b in range(256):
        m.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=6)
    for i in range(vocab_size - len(m.pieces)):
        m.pieces.add(piece=f"\u2581t{i}", score=-float(i), type=1)
    m.trainer_spec.model_type = 2  # BPE
    m.trainer_spec.vocab_size = vocab_size
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    path.write_bytes(m.SerializeToString())


def llama_cpp_status() -> str | None:
    """None when llama-cpp-python imports, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure to import means the peer is unavailable
        return f"llama-cpp-python is not importable ({type(e).__name__}: {e}); `pip install llama-cpp-python` builds it"
    return None


def gguf_path(name: str) -> Path:
    """The bf16 GGUF of a bench model, converted once with llama.cpp's convert_hf_to_gguf.py from the sdist of the
    installed llama-cpp-python (pip download keeps a copy in bench/.cache/)."""
    from importlib.metadata import version

    out = CACHE / f"{MODELS[name][0]}.gguf"
    if out.exists():
        return out
    src = model_dir(name)
    if not (src / "tokenizer.model").exists():
        write_sentencepiece(src / "tokenizer.model", MODELS[name][1]["vocab_size"])
    ver = version("llama-cpp-python")
    sdist = CACHE / f"llama_cpp_python-{ver}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={ver}", "-d", str(CACHE)], check=True, capture_output=True)  # fmt: skip
    tree = CACHE / f"llama.cpp-{ver}"
    if not tree.exists():
        with tarfile.open(sdist) as tar:
            prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
            wanted = ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")  # the converter and the packages it imports
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix) :].startswith(wanted)]  # fmt: skip
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(tree, members=members, filter="data")
    tmp = out.with_suffix(".tmp")
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(src), "--outtype", "bf16", "--outfile", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"GGUF conversion failed: {done.stderr.strip().splitlines()[-1:]}")
    tmp.rename(out)
    return out


def l3_bytes() -> int | None:
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def machine_rates(m: dict) -> dict[str, float]:
    """bf16 matmul FLOP/s (4096^3), causal flash attention FLOP/s at 8K tokens with the model's heads (the faster of
    PyTorch's CPU flash kernel and longmoe's: the roofline must not flatter us), and the streaming rate of memory (the
    faster of a 1 GiB read and a 1 GiB copy), with the benchmark's threads."""

    def best_of(fn, reps: int = 5) -> float:
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    a = torch.randn(4096, 4096, dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, dtype=torch.bfloat16)
    flops = 2 * 4096**3 / best_of(lambda: a @ b)
    n, H, Hkv, D = 8192, m["heads"], m["kv_heads"], m["head_dim"]
    q = torch.randn(1, H, n, D, dtype=torch.bfloat16)
    k, v = torch.randn(1, Hkv, n, D, dtype=torch.bfloat16), torch.randn(1, Hkv, n, D, dtype=torch.bfloat16)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    attn_torch = 2 * n * n * H * D / best_of(lambda: flash(q, k, v, 0.0, True, scale=D**-0.5), reps=3)
    from longmoe import kernels

    with torch.inference_mode():
        ours = kernels.flash_attention(q, k, v, D**-0.5, 0) is not None
        attn_ours = 2 * n * n * H * D / best_of(lambda: kernels.flash_attention(q, k, v, D**-0.5, 0), 3) if ours else 0
    src = torch.empty(2**28, dtype=torch.float32).fill_(1)
    dst = torch.empty_like(src)
    read = 2**30 / best_of(src.sum)
    copy = 2**30 / best_of(lambda: dst.copy_(src))  # 1 GiB read + 1 GiB written, counted as the bytes read
    return {"bf16_flops": flops, "flash_attention_flops": max(attn_torch, attn_ours), "torch_flash_flops": attn_torch,
            "longmoe_flash_flops": attn_ours, "read_bytes_per_s": max(read, copy), "sum_bytes_per_s": read,
            "copy_bytes_per_s": copy}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# workers: one measurement each, printing one JSON line. A prefill is repeated `repeat` times in the process, each on a
# different prompt (no prefix-cache hits), to show its run-to-run spread.


def prompts(tokens: int, repeat: int) -> list[list[int]]:
    base = torch.randint(0, 32000, (tokens,), generator=torch.Generator().manual_seed(0))
    return [((base + r) % 32000).tolist() for r in range(repeat)]


def warmup(tokens: int) -> list[int]:
    """Each framework first runs a prompt of min(tokens, 2048) other tokens: kernels, allocators and caches warm."""
    return [(t + 977) % 32000 for t in prompts(min(tokens, 2048), 1)[0]]


def worker_longmoe(model: str, task: str, tokens: int, new: int, repeat: int) -> dict:
    import longmoe
    from longmoe.engine.engine import SamplingParams

    m = longmoe.load(model_dir(model))  # the engine's defaults: what users get
    m.generate(warmup(tokens), max_new_tokens=2)  # warm up kernels, allocator and the pool
    prefill, decode = [], []
    for prompt in prompts(tokens, repeat):
        seq = m.engine.submit(prompt, SamplingParams(max_new_tokens=new, ignore_eos=True))
        m.engine.run(seq)
        assert len(seq.output) == new
        prefill.append(seq.timings.prefill_seconds)
        decode.append(seq.timings.decode_seconds)
    return {"prefill_runs": prefill, "decode_s": min(decode)}


def worker_transformers(model: str, task: str, tokens: int, new: int, repeat: int) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache

    hf = AutoModelForCausalLM.from_pretrained(model_dir(model), dtype=torch.bfloat16).eval()
    prefill, decode = [], []
    with torch.inference_mode():
        hf(torch.tensor([warmup(tokens)]), logits_to_keep=1)  # warm up
        for prompt in prompts(tokens, repeat):
            cache = DynamicCache(config=hf.config)
            t0 = time.perf_counter()
            out = hf(torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
            prefill.append(time.perf_counter() - t0)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(new - 1):  # the first new token came from the prefill
                out = hf(tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            decode.append((time.perf_counter() - t0) * new / max(new - 1, 1))
            del cache, out
    return {"prefill_runs": prefill, "decode_s": min(decode)}


def worker_llama_cpp(model: str, task: str, tokens: int, new: int, repeat: int) -> dict:
    """llama.cpp as its CLI runs by default on a CPU: flash attention on, batches of 2048 in micro-batches of 512."""
    import numpy as np
    from llama_cpp import Llama

    threads = torch.get_num_threads()
    llm = Llama(model_path=str(gguf_path(model)), n_ctx=tokens + new + 16, n_batch=2048, n_ubatch=512,
                n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False)  # fmt: skip

    def next_token() -> int:  # greedy, from the last position's logits
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    llm.eval(warmup(tokens))  # warm up
    prefill, decode = [], []
    for prompt in prompts(tokens, repeat):
        llm.reset()  # the next eval drops the cached positions from 0 on
        t0 = time.perf_counter()
        llm.eval(prompt)
        prefill.append(time.perf_counter() - t0)
        tok = next_token()
        t0 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([tok])
            tok = next_token()
        decode.append((time.perf_counter() - t0) * new / max(new - 1, 1))
    return {"prefill_runs": prefill, "decode_s": min(decode)}


WORKERS = {"longmoe": worker_longmoe, "transformers": worker_transformers, "llama.cpp": worker_llama_cpp}


def run_worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    result = WORKERS[args.worker](args.model, args.task, args.tokens, args.new, args.repeat)
    result["prefill_s"] = sorted(result["prefill_runs"])[len(result["prefill_runs"]) // 2]  # the median
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent that forked us
    result["peak_rss"] = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    print(json.dumps(result))


def measure(framework: str, args: argparse.Namespace, task: str, tokens: int, new: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework, "--model", args.model, "--task", task, "--tokens",
           str(tokens), "--new", str(new), "--threads", str(args.threads), "--repeat", str(args.repeat)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------------------------
# model arithmetic for the rooflines


def model_numbers(name: str) -> dict[str, float]:
    c = MODELS[name][1]
    H, L, V, I = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    E, K = c["num_local_experts"], c["num_experts_per_tok"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    D = c.get("head_dim") or H // heads
    attn = 2 * H * heads * D + 2 * H * kv * D  # q, o + k, v
    expert = 3 * H * I
    active = L * (attn + E * H + K * expert + 2 * H) + V * H + H  # + router, norms; lm_head; final norm
    weights = L * (attn + E * H + E * expert + 2 * H) + 2 * V * H + H
    kv_per_token = L * 2 * kv * D * 2  # bf16
    return {"active_params": active, "weights_bytes": 2 * weights, "kv_bytes_per_token": kv_per_token, "hidden": H,
            "vocab": V, "layers": L, "heads": heads, "kv_heads": kv, "head_dim": D}  # fmt: skip


def prefill_roofline_s(n: int, m: dict, rates: dict) -> float:
    """Linear FLOPs at the matmul rate (logits for the last token only) + causal attention FLOPs (QK^T and PV over
    half the n x n square) at the flash-attention rate."""
    linear = 2 * (m["active_params"] - m["vocab"] * m["hidden"]) * n + 2 * m["vocab"] * m["hidden"]
    attention = m["layers"] * 2 * n * n * m["heads"] * m["head_dim"]
    return linear / rates["bf16_flops"] + attention / rates["flash_attention_flops"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="small", help="which bench model (see above)")
    ap.add_argument("--prefill", default="2048,8192,32768", help="prefill context lengths, comma-separated")
    ap.add_argument("--decode", default="512,8192", help="decode context lengths, comma-separated")
    ap.add_argument("--new", type=int, default=32, help="tokens decoded per decode measurement")
    ap.add_argument("--repeat", type=int, default=1, help="prefills per process (the median is reported)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}, or none")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", metavar="FILE", help="also write all results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return run_worker(args)
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    if unknown := set(peers) - set(PEERS):
        ap.error(f"unknown peer(s) {sorted(unknown)}; choose from {', '.join(PEERS)} or none")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")

    sys.path.insert(0, str(HERE.parent / "src"))
    from longmoe.sysinfo import cpu_name

    build_model(args.model)
    torch.set_num_threads(args.threads)
    m = model_numbers(args.model)
    rates = machine_rates(m)
    l3 = l3_bytes()
    print(f"cpu: {cpu_name()}; L3 {l3 / 2**20:.0f} MiB" if l3 else f"cpu: {cpu_name()}")
    print(f"machine ({args.threads} threads): bf16 matmul {rates['bf16_flops'] / 1e9:.0f} GFLOP/s, causal flash "
          f"attention {rates['torch_flash_flops'] / 1e9:.0f} GFLOP/s (PyTorch) / "
          f"{rates['longmoe_flash_flops'] / 1e9:.0f} (longmoe), memory read {rates['sum_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"copy {rates['copy_bytes_per_s'] / 1e9:.1f} GB/s")  # fmt: skip
    fits = l3 is not None and m["weights_bytes"] < l3
    print(f"model {args.model}: {m['weights_bytes'] / 2**20:.0f} MiB bf16 weights"
          f"{' (fits in L3: the decode roofline from memory bandwidth understates what is possible)' if fits else ''}, "
          f"{m['active_params'] / 1e6:.1f}M active params/token, KV {m['kv_bytes_per_token']} B/token")  # fmt: skip
    if "llama.cpp" in peers and (why := llama_cpp_status()):
        print(f"llama.cpp: skipped, {why}")
        peers.remove("llama.cpp")
    elif "llama.cpp" in peers:
        try:
            gguf_path(args.model)
        except Exception as e:  # noqa: BLE001 - report and go on without the peer
            print(f"llama.cpp: skipped, {e}")
            peers.remove("llama.cpp")
    rows = []
    for task, lengths in (("prefill", args.prefill), ("decode", args.decode)):
        for n in [int(x) for x in lengths.split(",") if x]:
            new = 1 if task == "prefill" else args.new
            row = {"task": task, "context": n}
            for name in ["longmoe", *peers]:
                row[name] = measure(name, args, task, n, new)
                key, count = ("prefill_s", n) if task == "prefill" else ("decode_s", new)
                if key in row[name]:
                    row[name]["tokens_per_s"] = count / row[name][key]
            if task == "prefill":
                row["roofline_tokens_per_s"] = n / prefill_roofline_s(n, m, rates)
            else:
                bytes_per_token = 2 * m["active_params"] + m["kv_bytes_per_token"] * (n + new // 2)
                row["roofline_tokens_per_s"] = rates["read_bytes_per_s"] / bytes_per_token
            row["weights_plus_kv"] = m["weights_bytes"] + m["kv_bytes_per_token"] * (n + new)
            rows.append(row)
            print_row(row, peers)
    if args.json:
        out = {"cpu": cpu_name(), "l3_bytes": l3, "model": args.model, "rates": rates, "numbers": m, "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=2))


def print_row(r: dict, peers: list[str]) -> None:
    ours = r["longmoe"]

    def tps(x: dict) -> str:
        return f"{x['tokens_per_s']:9.1f}" if "tokens_per_s" in x else f"{'error':>9}"

    line = f"{r['task']:7} {r['context']:>7,} tok | longmoe {tps(ours)} tok/s"
    if "tokens_per_s" in ours:
        line += f" ({100 * ours['tokens_per_s'] / r['roofline_tokens_per_s']:.0f}% of roofline)"
    for p in peers:
        ratio = ours.get("tokens_per_s", 0) / r[p]["tokens_per_s"] if "tokens_per_s" in r[p] else None
        line += f" | {p} {tps(r[p])} tok/s" + (f" x{ratio:.2f}" if ratio else "")
    rss = " / ".join(f"{x['peak_rss'] / 2**30:.2f}" if "peak_rss" in x else "-" for x in [ours, *(r[p] for p in peers)])
    line += f" | peak RSS GiB {rss} (weights+KV {r['weights_plus_kv'] / 2**30:.2f})"
    runs = ours.get("prefill_runs", [])
    if r["task"] == "prefill" and len(runs) > 1:
        med = sorted(runs)[len(runs) // 2]
        line += f" | longmoe runs {', '.join(f'{t:.2f}' for t in runs)} s: {100 * (min(runs) / med - 1):+.0f}%"
        line += f"/{100 * (max(runs) / med - 1):+.0f}% of the median"
    print(line, flush=True)
    for name in ["longmoe", *peers]:
        if "error" in r[name]:
            print(f"    {name} failed: {r[name]['error']}", flush=True)


if __name__ == "__main__":
    main()
