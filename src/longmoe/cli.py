"""The `longmoe` command line. Every subcommand uses the public Python API (`longmoe.load`)."""

from __future__ import annotations

import argparse
import json
import sys
import time

DESCRIPTION = """\
longmoe: open sparse Mixture-of-Experts long-context transformers.

Run a transformers-format model directory (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, Llama 4 text,
Llama, Qwen3, or a native longmoe checkpoint) on this machine. Run `longmoe COMMAND --help` for details."""


def _dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype; auto = the checkpoint's own (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longmoe", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser(
        "generate",
        help="continue a prompt; streams the generated text to stdout",
        description="Continue a raw-text prompt (no chat template). Only the generated text goes to stdout; "
        "diagnostics go to stderr.",
    )
    g.add_argument("--model", required=True, metavar="DIR", help="model directory (config.json + *.safetensors)")
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt text; '-' reads it from stdin")
    g.add_argument(
        "--context-file",
        action="append",
        default=[],
        metavar="F",
        help="a text file to put before the prompt (repeatable; in order, separated by blank lines)",
    )
    g.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="stop after N tokens (default: 128)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K most likely tokens")
    g.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass in (0, 1]")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="random seed, for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop sequence (repeatable)")
    g.add_argument("--kv-dtype", default="auto", choices=["auto", "fp8"], help="KV cache dtype (fp8: half of bf16)")
    g.add_argument(
        "--chunk-size", type=int, default=2048, metavar="N", help="prefill chunk in tokens (default: %(default)s)"
    )
    g.add_argument("--stats", action="store_true", help="print token counts and timings to stderr at the end")
    _dtype_arg(g)

    t = sub.add_parser(
        "train",
        help="train or extend a model (one process, or many under torchrun)",
        description="Train a MoE model from a config file (TOML) or a preset, or continue one (init = DIR).\n"
        "Presets: tiny (about a minute on a CPU). Metrics go to OUT/metrics.jsonl and OUT/tb (TensorBoard);\n"
        "checkpoints to OUT/checkpoints; the final model to OUT/export (load it with longmoe generate).\n\n"
        "Many processes: torchrun --nproc-per-node N -m longmoe.cli train CONFIG ... with [parallel] settings;\n"
        "many nodes: add --nnodes M --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT on every node.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("config", metavar="CONFIG", help="a preset name (tiny) or a TOML file")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set optim.lr=3e-4 --set data.seq_len=1024 (repeatable)",
    )
    t.add_argument("--steps", type=int, metavar="N", help="length of the schedule (overrides the config)")
    t.add_argument("--stop-at", type=int, metavar="K", help="stop cleanly after step K (resume later)")
    t.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps")
    t.add_argument("--out", metavar="DIR", help="run directory (default: runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    t.add_argument("--quiet", action="store_true", help="no progress line")

    i = sub.add_parser(
        "info",
        help="describe a model: parameters, experts, KV bytes per token, context",
        description="Print a model's size: total and active parameters per token, layers, experts, attention "
        "layout, KV-cache bytes per token and maximum context.",
    )
    i.add_argument("--model", required=True, metavar="DIR", help="model directory")
    i.add_argument("--json", action="store_true", help="print machine-readable JSON")
    _dtype_arg(i)
    return parser


def _version() -> str:
    from . import __version__

    return f"longmoe {__version__}"


def cmd_generate(args: argparse.Namespace) -> int:
    import longmoe

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    parts = []
    for f in args.context_file:
        try:
            parts.append(open(f, encoding="utf-8").read())
        except UnicodeDecodeError:
            raise ValueError(f"--context-file {f}: not UTF-8 text") from None
    prompt = "\n\n".join(parts + [prompt])
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    model = longmoe.load(args.model, dtype=args.dtype, kv_dtype=args.kv_dtype, chunk_size=args.chunk_size)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")  # model text is UTF-8 whatever the locale says
    t0 = time.perf_counter()
    stream = model.stream(
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
    )
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    if args.stats:
        seq = stream.sequence
        p, d = seq.timings.prefill_seconds, seq.timings.decode_seconds
        n_new = len(seq.output)
        print(
            f"prompt {len(seq.prompt):,} tokens ({seq.num_cached:,} cached), generated {n_new:,} "
            f"[{seq.finish_reason}]\nprefill {p:.3f} s ({(len(seq.prompt) - seq.num_cached) / max(p, 1e-9):,.0f} tok/s)"
            f", decode {d:.3f} s ({n_new / max(d, 1e-9):,.1f} tok/s), wall {time.perf_counter() - t0:.3f} s",
            file=sys.stderr,
        )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .train import Trainer, load_config

    overrides = list(args.set)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.save_every is not None:
        overrides.append(f"save_every={args.save_every}")
    cfg = load_config(args.config, overrides)
    out = Path(args.out or f"runs/{Path(args.config).stem}")
    trainer = Trainer(cfg, out, resume=args.resume, quiet=args.quiet)
    try:
        trainer.train(stop_at=args.stop_at)
    finally:
        trainer.close()
    if trainer.dist.main:
        done = ", export/" if trainer.step == cfg.steps else ""
        print(f"run directory: {out} (metrics.jsonl, tb/, checkpoints/{done})", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import longmoe

    info = longmoe.load(args.model, dtype=args.dtype).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        if isinstance(v, int) and not isinstance(v, bool) and v >= 10_000:
            v = f"{v:,}"
        print(f"{k.replace('_', ' '):<{width}}  {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .checkpoint import CheckpointError
    from .engine.planner import MemoryPlanError
    from .model import ConfigError

    try:
        return {"generate": cmd_generate, "info": cmd_info, "train": cmd_train}[args.command](args)
    except (CheckpointError, ConfigError, MemoryPlanError, ValueError, OSError, FileNotFoundError) as e:
        print(f"longmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
