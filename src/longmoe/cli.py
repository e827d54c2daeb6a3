"""The `longmoe` command line. Every subcommand uses the public Python API (`longmoe.load`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

DESCRIPTION = """\
longmoe: open sparse Mixture-of-Experts long-context transformers.

Run a transformers-format model directory (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, Llama 4 text,
Llama, Qwen3, or a native longmoe checkpoint) on this machine; with no --model, the bundled model (a small MoE that
finds a needle in a million tokens). Start with `longmoe demo`. Run `longmoe COMMAND --help` for details."""


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
        "diagnostics go to stderr. With an omni model (Qwen3-Omni-MoE), --image/--audio/--video/--text add parts "
        "in the order given, before --prompt: e.g. --text 'Compare ' --image a.png --text ' with ' --image b.png "
        "--prompt ' What differs?'",
    )
    g.add_argument("--model", metavar="DIR", help="model directory (config.json + *.safetensors); default: the "
                   "bundled model")
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt text; '-' reads it from stdin")
    g.add_argument(
        "--context-file",
        action="append",
        default=[],
        metavar="F",
        help="a text file to put before the prompt (repeatable; in order, separated by blank lines)",
    )
    for kind, what in (("image", "PNG, JPEG, WebP, GIF, BMP"), ("audio", "WAV, FLAC, OGG, MP3"),
                       ("video", "MP4, WebM, MOV, MKV; its audio track too"), ("text", "text")):  # fmt: skip
        g.add_argument(f"--{kind}", action=_Part, dest="parts", metavar="F" if kind != "text" else "TEXT",
                       help=f"a {kind} part ({what}); repeatable, in order, before --prompt")  # fmt: skip
    g.add_argument("--video-fps", type=float, default=None, metavar="FPS",
                   help="frames per second sampled from --video (default: 2)")  # fmt: skip
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
    g.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="accept prompts + new tokens up to N tokens (default: the model's context)")  # fmt: skip
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
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
    t.add_argument("--overwrite", action="store_true", help="discard a run already in --out and start afresh")
    t.add_argument("--quiet", action="store_true", help="no progress line")

    e = sub.add_parser(
        "eval",
        help="measure long-context ability: niah, ruler, nll (local model or Gemini/OpenAI endpoint)",
        description="Long-context evaluations of a local model (--model DIR) or an HTTP endpoint (--gemini-url or\n"
        "--openai-url). Results are saved as they are measured under --out: rerun the same command to resume.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    esub = e.add_subparsers(dest="eval_command", metavar="EVAL")
    common = argparse.ArgumentParser(add_help=False)
    tg = common.add_argument_group("target (one of)")
    tg.add_argument("--model", metavar="DIR", help="a local model directory, run by longmoe's engine (default, with no "
                    "other target: the bundled model)")
    tg.add_argument("--gemini-url", metavar="URL", help="a server speaking the Gemini API (v1beta)")
    tg.add_argument("--openai-url", metavar="URL", help="a server speaking the OpenAI chat API")
    tg.add_argument("--api-key", metavar="K", help="API key for the endpoint")
    tg.add_argument("--model-name", metavar="M", help="model name at the endpoint")
    tg.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json sizing contexts for --openai-url targets")
    tg.add_argument("--concurrency", type=int, default=4, metavar="N", help="parallel requests to an endpoint (4)")
    tg.add_argument("--retries", type=int, default=5, metavar="N", help="retries of transient errors (5)")
    common.add_argument("--lengths", type=_int_list, default=None, metavar="N,N,...",
                        help="context lengths in the target's tokens (default: 1000,2000,4000; ruler: "
                        "4096,8192,16384,32768,65536,131072, each counting the prompt and the answer)")
    common.add_argument("--samples", type=int, default=None, metavar="N",
                        help="tasks per grid cell (default: 1; ruler: 25)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--out", required=True, metavar="DIR", help="results directory (results.json, plots)")
    common.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    common.add_argument("--quiet", action="store_true", help="no progress line")

    n = esub.add_parser("niah", parents=[common], help="needle in a haystack: recall by length x depth + heatmap",
                        description="Plant a needle at each depth of haystacks of each length; recall = share of "
                        "planted numbers found in the answers. Writes results.json and heatmap.png.")  # fmt: skip
    n.add_argument(
        "--depths",
        type=_float_list,
        default=[0, 25, 50, 75, 100],
        metavar="D,D,...",
        help="needle depths in percent of the context (default: 0,25,50,75,100)",
    )
    n.add_argument("--needles", type=int, default=1, metavar="K", help="plant K needles and ask for all of them")
    n.add_argument("--ask-each", action="store_true",
                   help="with --needles K: ask for each needle in its own request over the same context")
    n.add_argument("--haystack", metavar="NAME|PATH",
                   help="python-docs (default: the English docs shipped with Python), perl-docs, perl-code (held "
                   "out from the bundled model's training), a text file, or a directory of source code")
    n.add_argument("--needle", default="The special magic {city} number is: {value}.", help="needle template")
    n.add_argument("--question", default="What is the special magic {city} number?", help="question template")
    n.add_argument("--answer-prefix", default="The special magic {city} number is:", help="answer prefix template")
    n.add_argument("--ending", default="answer-prefix", choices=["answer-prefix", "question"],
                   help="how the prompt ends: with the answer prefix (default) or the question alone")
    n.add_argument("--keys", default="cities", choices=["cities", "names", "words", "uuids"],
                   help="what {city} is filled with (default: the report's cities)")
    n.add_argument("--values", default="numbers", choices=["numbers", "words", "uuids"],
                   help="what {value} is filled with (default: 7-digit numbers)")
    n.add_argument("--max-tokens", type=int, default=32, metavar="N", help="answer length limit (32)")

    for kind, what in (("video", "the text \"The secret word is 'X'\" on one frame of a synthetic video"),
                       ("audio", "\"The secret keyword is X\" spoken (espeak-ng) into speech")):  # fmt: skip
        mv = esub.add_parser(f"{kind}-niah", parents=[common], help=f"needle in a {kind} haystack (omni models)",
                             description=f"{what} at each depth of {kind} haystacks of each length (--lengths in "
                             "seconds, default 10,30,60); the question is asked in text. Writes results.json and "
                             "heatmap.png. Targets: a local omni model (Qwen3-Omni-MoE) or --gemini-url.")  # fmt: skip
        mv.add_argument("--depths", type=_float_list, default=[0, 25, 50, 75, 100], metavar="D,D,...",
                        help="needle depths in percent of the length (default: 0,25,50,75,100)")  # fmt: skip
        mv.add_argument("--words", metavar="W,W,...|FILE", help="candidate secret words (default: a built-in list)")
        mv.add_argument("--max-tokens", type=int, default=16, metavar="N", help="answer length limit (16)")
        if kind == "video":
            mv.add_argument("--fps", type=float, default=1.0, help="frames per second, made and sampled (default: 1)")
        else:
            mv.add_argument("--haystack", metavar="NAME|PATH", help="the text read aloud (niah's haystacks; default: "
                            "python-docs)")  # fmt: skip

    r = esub.add_parser("ruler", parents=[common], help="RULER tasks (no downloads) and the effective length",
                        description="RULER's synthetic tasks that need no downloads, scored by string_match_all; "
                        "prints the average per length and the effective context length.")  # fmt: skip
    r.add_argument("--tasks", type=lambda s: s.split(","), metavar="T,T,...", help="subset of the tasks (default: all)")
    r.add_argument("--threshold", type=float, default=85.6, help="effective-length threshold (default: 85.6)")

    ll = esub.add_parser("nll", parents=[common], help="negative log-likelihood by token position + power-law fit",
                         description="Cumulative average NLL by position over long documents, the fit "
                         "L(x) = a x^b + c with R^2, and nll.png. Local models only.")  # fmt: skip
    ll.add_argument("--documents", nargs="*", default=[], metavar="FILE", help="long text documents")
    ll.add_argument("--code-dir", metavar="DIR", help="a source tree: its files concatenated in shuffled order")
    ll.add_argument("--max-context", type=int, default=32768, metavar="N", help="tokens scored per document")
    ll.add_argument("--fit-from", type=int, default=16, metavar="X", help="fit positions x >= X (default: 16)")

    i = sub.add_parser(
        "info",
        help="describe a model: parameters, experts, KV bytes per token, context",
        description="Print a model's size: total and active parameters per token, layers, experts, attention "
        "layout, KV-cache bytes per token and maximum context.",
    )
    i.add_argument("--model", metavar="DIR", help="model directory (default: the bundled model)")
    i.add_argument("--json", action="store_true", help="print machine-readable JSON")
    _dtype_arg(i)

    d = sub.add_parser(
        "demo",
        help="the bundled model finds a needle in 1K..128K-token haystacks on this CPU (the README's first command)",
        description="Needle in a haystack with the bundled model (or --model DIR): lengths 1K, 2K, 4K, ... up to "
        "--max-length, five depths, every trial through the engine. Prints recall by length x depth and the time "
        "per trial, writes heatmap.png, and says what to try next.",
    )
    d.add_argument("--max-length", type=int, default=131072, metavar="N", help="longest haystack (default: 131072)")
    d.add_argument("--haystack", default="perl-docs", metavar="NAME|PATH",
                   help="perl-docs (default: prose the bundled model never saw), perl-code, python-docs, a text file "
                   "or a directory of source code")  # fmt: skip
    d.add_argument("--depths", type=_float_list, default=[0, 25, 50, 75, 100], metavar="D,D,...",
                   help="needle depths in percent (default: 0,25,50,75,100)")
    d.add_argument("--samples", type=int, default=1, metavar="N", help="trials per length and depth (default: 1)")
    d.add_argument("--model", metavar="DIR", help="another model directory (default: the bundled model)")
    d.add_argument("--chunk-size", type=int, default=16384, metavar="N", help="prefill chunk (default: 16384)")
    d.add_argument("--out", metavar="DIR", help="results directory (default: longmoe-demo/HAYSTACK-MAXLENGTH)")

    s = sub.add_parser(
        "serve",
        help="an HTTP server: the Gemini API (google-genai works unchanged), an OpenAI-compatible API, a playground",
        description="Serve one model over HTTP: the Gemini API (/v1beta and /v1: models, generateContent, "
        "streamGenerateContent, countTokens, cachedContents, files), the OpenAI API (/v1/chat/completions, "
        "/v1/completions, /v1/models), a playground at /, /metrics, /healthz and /openapi.json. Requests share the "
        "engine's continuous batching. Files and cached contents are kept under --data-dir across restarts.",
    )
    s.add_argument("--model", metavar="DIR", help="model directory (default: the bundled model)")
    s.add_argument("--model-name", metavar="NAME", help="the name clients use (default: the directory's name; "
                   "longmoe-bundled for the bundled model)")  # fmt: skip
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    s.add_argument("--port", type=int, default=8080, help="port (default: %(default)s; 0 = any free port)")
    s.add_argument("--api-key", metavar="K", default=os.environ.get("LONGMOE_API_KEY"),
                   help="the key clients must send (x-goog-api-key, ?key= or Authorization: Bearer); default: "
                   "$LONGMOE_API_KEY, else none (then only loopback addresses may be bound)")  # fmt: skip
    s.add_argument("--insecure-no-auth", action="store_true", help="serve a non-loopback address without a key")
    s.add_argument("--data-dir", metavar="D", help="where files and cached contents are kept (default: "
                   "$LONGMOE_DATA_DIR, else $XDG_DATA_HOME/longmoe or ~/.local/share/longmoe)")  # fmt: skip
    s.add_argument("--max-output-tokens", type=int, metavar="N",
                   help="the model's outputTokenLimit, also the default answer length (default: 8192, at most the "
                   "context)")  # fmt: skip
    s.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests in flight at most; more get 429 with Retry-After (default: %(default)s)")
    s.add_argument("--max-request-bytes", type=int, default=64 << 20, metavar="N",
                   help="largest JSON body, 413 beyond (default: 64 MiB; uploads go in chunks)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds in-flight requests get to finish (default: %(default)s)")
    s.add_argument("--kv-dtype", default="auto", choices=["auto", "fp8"], help="KV cache dtype (fp8: half of bf16)")
    s.add_argument("--chunk-size", type=int, default=2048, metavar="N", help="prefill chunk (default: %(default)s)")
    s.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="accept prompts + answers up to N tokens (default: the model's context)")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _dtype_arg(s)
    return parser


def _version() -> str:
    from . import __version__

    return f"longmoe {__version__}"


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


class _Part(argparse.Action):
    """--image/--audio/--video/--text: one ordered list of (kind, value) parts."""

    def __call__(self, parser, namespace, values, option_string=None):
        parts = list(getattr(namespace, self.dest, None) or [])
        parts.append((option_string.lstrip("-"), values))
        setattr(namespace, self.dest, parts)


def cmd_generate(args: argparse.Namespace) -> int:
    import longmoe

    if args.prompt == "-":
        prompt = _utf8(sys.stdin.buffer.read(), "the prompt on stdin")
    else:  # arguments that are not UTF-8 arrive as surrogate escapes
        prompt = _utf8(os.fsencode(args.prompt), "--prompt")
    parts = []
    for f in args.context_file:
        with open(f, "rb") as fh:
            parts.append(_utf8(fh.read(), f"--context-file {f}"))
    prompt = "\n\n".join(parts + [prompt])
    if args.parts:  # media and text parts in the order given, then the prompt
        from pathlib import Path

        prompt = [text if kind == "text" else Path(text) for kind, text in args.parts] + [prompt]
        for part in prompt:
            if isinstance(part, Path) and not part.is_file():
                raise ValueError(f"media file {str(part)!r} does not exist")
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.max_context is not None and args.max_context < 1:
        raise ValueError(f"--max-context must be >= 1, got {args.max_context}")
    model = longmoe.load(args.model, dtype=args.dtype, device=args.device, kv_dtype=args.kv_dtype,
                         chunk_size=args.chunk_size, max_context=args.max_context)  # fmt: skip
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
        video_fps=args.video_fps,
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
    if args.stop_at is not None and args.stop_at < 1:
        raise ValueError(f"--stop-at must be a step >= 1, got {args.stop_at}")
    cfg = load_config(args.config, overrides)
    out = Path(args.out or f"runs/{Path(args.config).stem}")
    trainer = Trainer(cfg, out, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    try:
        trainer.train(stop_at=args.stop_at)
    finally:
        trainer.close()
    if trainer.dist.main:
        done = ", export/" if trainer.step == cfg.steps else ""
        print(f"run directory: {out} (metrics.jsonl, tb/, checkpoints/{done})", file=sys.stderr)
    if trainer.dist.world > 1:
        from .train.parallel import exit_worker

        exit_worker(0)
    return 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1000,8000") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: lengths must be positive")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 0,50,100") from None
    if not values or min(values) < 0 or max(values) > 100:
        raise argparse.ArgumentTypeError(f"{text!r}: depths are percentages in [0, 100]")
    return values


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import niah, nll, ruler
    from .eval.targets import GeminiTarget, LocalTarget, OpenAITarget

    if args.eval_command is None:
        raise ValueError("choose an evaluation: longmoe eval niah|ruler|nll|video-niah|audio-niah --help")
    from .eval.ruler import DEFAULT_LENGTHS, DEFAULT_SAMPLES

    media = args.eval_command in ("video-niah", "audio-niah")
    if args.lengths is None:
        default = [10, 30, 60] if media else [1000, 2000, 4000]
        args.lengths = list(DEFAULT_LENGTHS) if args.eval_command == "ruler" else default
    if args.samples is None:
        args.samples = DEFAULT_SAMPLES if args.eval_command == "ruler" else 1
    chosen = [x for x in (args.model, args.gemini_url, args.openai_url) if x]
    if len(chosen) > 1:
        raise ValueError("give one target: --model DIR, --gemini-url URL or --openai-url URL (none: the bundled model)")
    for name, low in (("samples", 1), ("retries", 0), ("concurrency", 1), ("max_tokens", 1)):
        if getattr(args, name, low) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.gemini_url or args.openai_url:
        if not args.model_name:
            raise ValueError("--model-name is required with an endpoint (e.g. --model-name gemini-1.5-pro)")
        kw = {"concurrency": args.concurrency, "retries": args.retries}
        if args.gemini_url:
            target = GeminiTarget(args.gemini_url, args.api_key, args.model_name, **kw)
        else:
            target = OpenAITarget(args.openai_url, args.api_key, args.model_name, args.tokenizer, **kw)
    else:
        target = LocalTarget(args.model)
    if media:
        from .eval import media_niah

        if args.eval_command == "video-niah" and not 0 < args.fps <= 24:
            raise ValueError(f"--fps must be in (0, 24], got {args.fps}")
        args.haystack = getattr(args, "haystack", None)
        args.fps = getattr(args, "fps", 1.0)
        module = types.SimpleNamespace(main=lambda t, a: media_niah.main(t, a, args.eval_command.split("-")[0]),
                                       table=media_niah.table)  # fmt: skip
    else:
        module = {"niah": niah, "ruler": ruler, "nll": nll}[args.eval_command]
    try:
        summary = module.main(target, args)
    except KeyboardInterrupt:
        print(f"\ninterrupted: results so far are in {args.out}; rerun the same command to resume", file=sys.stderr)
        return 130
    text = module.table(summary)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(summary))
    else:
        print(text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo

    if args.samples < 1 or args.chunk_size < 1:
        raise ValueError("--samples and --chunk-size must be >= 1")
    try:
        return demo(args)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume", file=sys.stderr)
        return 130


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


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import serve
    except ImportError as e:  # fastapi / uvicorn missing from a minimal install
        raise ValueError(f"the server needs {e.name}: pip install 'longmoe' with its dependencies") from None
    return serve(
        args.model, model_name=args.model_name, host=args.host, port=args.port, api_key=args.api_key,
        insecure_no_auth=args.insecure_no_auth, data_dir=args.data_dir, dtype=args.dtype, device=args.device,
        kv_dtype=args.kv_dtype, chunk_size=args.chunk_size, max_context=args.max_context,
        max_output_tokens=args.max_output_tokens, max_queue=args.max_queue, max_request_bytes=args.max_request_bytes,
        shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .errors import LongmoeError

    try:
        commands = {"generate": cmd_generate, "info": cmd_info, "train": cmd_train, "eval": cmd_eval, "demo": cmd_demo,
                    "serve": cmd_serve}
        return commands[args.command](args)
    except BrokenPipeError:  # `longmoe generate ... | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (LongmoeError, ValueError, TypeError, OSError) as e:
        if os.environ.get("LONGMOE_DEBUG"):
            raise
        # bad input: one line naming the problem (LONGMOE_DEBUG=1 shows the traceback)
        print(f"longmoe {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
