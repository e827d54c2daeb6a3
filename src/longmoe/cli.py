"""The `longmoe` command line. Every subcommand uses the public Python API (`longmoe.load`)."""

from __future__ import annotations

import argparse
import json
import sys

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
    g.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="stop after N tokens (default: 128)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K most likely tokens")
    g.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass in (0, 1]")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="random seed, for reproducible sampling")
    _dtype_arg(g)

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
    model = longmoe.load(args.model, dtype=args.dtype)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")  # model text is UTF-8 whatever the locale says
    for piece in model.stream(
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    if sys.stdout.isatty():
        sys.stdout.write("\n")
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
    from .model import ConfigError

    try:
        return {"generate": cmd_generate, "info": cmd_info}[args.command](args)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        print(f"longmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
