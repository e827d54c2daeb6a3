"""Training configuration: a few small dataclasses, read from a TOML file or a preset, with `--set key=value`
overrides. Everything is checked before any work starts; errors name the key."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model.config import ConfigError, ModelConfig, dataclass_from_dict
from .synthetic import FACTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["python-docs"])  # text/JSONL files, code dirs, globs
    tokenizer: str = "bytes"  # "bytes" (one token per byte), "bpe:N" (train an N-token BPE first), or a tokenizer.json
    seq_len: int = 256  # tokens per training sequence (the first stage's; stages may change it)
    synthetic_ratio: float = 0.0  # share of sequences that are synthetic long-context tasks
    # niah, multikey, multivalue, vt, retrieval, copy (repeat a name to weight it)
    synthetic_tasks: list[str] = field(default_factory=lambda: ["niah"])
    # Long synthetic rows in a micro-batch of their own each step, of a length drawn log-uniformly from
    # synthetic_lengths = [min, max] (tokens). Only their answers are targets, so the model's last layer runs only
    # on the answer tail: a row costs O(length x window) when the last layer is the only global one.
    synthetic_rows: int = 0
    synthetic_lengths: list[int] = field(default_factory=lambda: [1024, 8192])
    synthetic_tokens: int = 0  # > 0: as many rows as fit this many tokens (many short rows, few long ones), at
    # least one and at most synthetic_rows
    # the retrieval task: how many facts a row plants (drawn uniformly from this list; by default 1-12, mostly few)
    # and the share of its values that are numbers made of runs of one digit ("1411192")
    retrieval_facts: list[int] = field(default_factory=lambda: list(FACTS))
    retrieval_repeat_digits: float = 0.0
    synthetic_weight: float = 1.0  # loss weight of a synthetic target relative to a text target
    heldout_percent: float = 5.0  # documents kept out of training for the held-out loss
    document_masking: bool = True  # positions restart per document, so attention stays within it
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine decays to this
    warmup_steps: int = 20
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class ParallelConfig:
    dp: str = "fsdp"  # how data-parallel ranks hold the model: "fsdp" (FSDP2 fully_shard) or "replicate"
    ep: int = 1  # expert-parallel ranks (experts split across them; tokens exchanged with all_to_all)
    cp: int = 1  # context-parallel ranks (each sequence split across them; ring attention)


@dataclass
class TrainConfig:
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields (vocab_size 0 = the tokenizer's)
    init: str = ""  # start from this model directory instead (continued pretraining, context extension)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    steps: int = 200  # length of the schedule (warmup + cosine)
    batch_size: int = 8  # sequences per micro-batch, across all data-parallel ranks
    grad_accum: int = 1
    dtype: str = "float32"  # "bfloat16": bf16 weights and compute, fp32 master weights in the optimizer
    activation_checkpointing: bool = False
    balance: str = "aux_loss"  # MoE balancing: "aux_loss" (+ z-loss), "aux_free" (selection bias), "none"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.001
    stages: list[dict[str, Any]] = field(default_factory=list)  # context schedule, see Stage
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    eval_every: int = 50
    eval_batches: int = 4
    seed: int = 0


@dataclass
class Stage:
    """From `start_step` on, train at `seq_len`; optionally change RoPE (context extension: raise theta, or
    set a scaling such as {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096})."""

    start_step: int
    seq_len: int
    rope_theta: float = 0.0  # 0: keep
    rope_scaling: dict[str, Any] | None = None
    synthetic_lengths: list[int] | None = None  # new data.synthetic_lengths from this step on (None: keep)
    retrieval_facts: list[int] | None = None  # new data.retrieval_facts from this step on (None: keep)
    retrieval_repeat_digits: float | None = None  # new data.retrieval_repeat_digits from this step on (None: keep)


TINY_MODEL = dict(
    hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=256, num_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=128, max_position_embeddings=4096, rope_theta=10000.0,
)  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    # about three minutes on a 2-core CPU: a 4-layer MoE on the Python docs with a 2K-token BPE; three quarters of
    # the sequences are needle-in-a-haystack tasks of 64 tokens (it retrieves the needle in ~98% of fresh tasks)
    "tiny": {
        "model": TINY_MODEL,
        "data": {"tokenizer": "bpe:2048", "seq_len": 64, "synthetic_ratio": 0.75, "synthetic_tasks": ["niah"]},
        "optim": {"lr": 3e-3, "min_lr": 1e-3, "warmup_steps": 20},
        "steps": 1200,
        "batch_size": 32,
        "eval_every": 200,
    },
}


def load_config(spec: str, overrides: list[str] = ()) -> TrainConfig:
    """`spec` is a preset name or a TOML file; overrides are "section.key=value" with TOML values."""
    if spec in PRESETS:
        raw = _deepcopy(PRESETS[spec])
    else:
        path = Path(spec)
        if not path.exists():
            raise ConfigError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing config file")
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=3e-4")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # bare strings: --set init=runs/base/export
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = parsed
    return from_dict(raw)


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    raw = dict(raw)
    sections = {"data": DataConfig, "optim": OptimConfig, "parallel": ParallelConfig}
    for name, cls in sections.items():
        raw[name] = dataclass_from_dict(cls, raw.get(name, {}), name)
    cfg = dataclass_from_dict(TrainConfig, raw, "config")
    validate(cfg)
    return cfg


def stages(cfg: TrainConfig) -> list[Stage]:
    d = cfg.data
    out = [Stage(0, d.seq_len, synthetic_lengths=d.synthetic_lengths, retrieval_facts=d.retrieval_facts,
                 retrieval_repeat_digits=d.retrieval_repeat_digits)]
    for i, s in enumerate(cfg.stages):
        out.append(dataclass_from_dict(Stage, s, f"stages[{i}]"))
    return sorted(out, key=lambda s: s.start_step)


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Everything that can be checked before any work: values, shapes, and the parallel layout vs world size."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.steps > 0, f"steps = {cfg.steps}: must be > 0")
    need(cfg.batch_size > 0 and cfg.grad_accum > 0, "batch_size and grad_accum must be > 0")
    need(cfg.dtype in ("float32", "bfloat16"), f"dtype = {cfg.dtype!r}: use float32 or bfloat16")
    need(cfg.balance in ("aux_loss", "aux_free", "none"), f"balance = {cfg.balance!r}: aux_loss, aux_free or none")
    need(cfg.data.seq_len >= 8, f"data.seq_len = {cfg.data.seq_len}: must be >= 8")
    need(0 <= cfg.data.synthetic_ratio <= 1, f"data.synthetic_ratio = {cfg.data.synthetic_ratio}: must be in [0, 1]")
    need(0 <= cfg.data.heldout_percent < 100, "data.heldout_percent must be in [0, 100)")
    from ..tasks import TRAIN_TASKS

    for t in cfg.data.synthetic_tasks:
        need(t in TRAIN_TASKS or t in ("retrieval", "copy"),
             f"data.synthetic_tasks: unknown task {t!r}; choose from {', '.join([*TRAIN_TASKS, 'retrieval', 'copy'])}")
    d = cfg.data
    need(d.synthetic_rows >= 0, f"data.synthetic_rows = {d.synthetic_rows}: must be >= 0")
    need(len(d.synthetic_lengths) == 2 and 64 <= d.synthetic_lengths[0] <= d.synthetic_lengths[1],
         f"data.synthetic_lengths = {d.synthetic_lengths}: give [min, max] tokens with 64 <= min <= max")
    need(bool(d.retrieval_facts) and all(isinstance(n, int) and n >= 1 for n in d.retrieval_facts),
         f"data.retrieval_facts = {d.retrieval_facts}: give one or more whole numbers >= 1 (facts per row)")
    need(0 <= d.retrieval_repeat_digits <= 1,
         f"data.retrieval_repeat_digits = {d.retrieval_repeat_digits}: a share, between 0 and 1")
    need(d.synthetic_weight > 0, f"data.synthetic_weight = {d.synthetic_weight}: must be > 0")
    need(d.synthetic_tokens >= 0, f"data.synthetic_tokens = {d.synthetic_tokens}: must be >= 0")
    o = cfg.optim
    for name in ("lr", "min_lr", "beta1", "beta2", "weight_decay", "grad_clip"):
        need(math.isfinite(getattr(o, name)), f"optim.{name} = {getattr(o, name)}: must be a finite number")
    need(o.lr > 0 and o.min_lr >= 0, f"optim.lr = {o.lr} must be > 0 and optim.min_lr = {o.min_lr} >= 0")
    need(o.warmup_steps >= 0, f"optim.warmup_steps = {o.warmup_steps}: must be >= 0")
    for name in ("beta1", "beta2"):
        need(0 <= getattr(o, name) < 1, f"optim.{name} = {getattr(o, name)}: must be in [0, 1)")
    need(o.weight_decay >= 0 and o.grad_clip >= 0, "optim.weight_decay and optim.grad_clip must be >= 0")
    need(cfg.keep_checkpoints >= 1, f"keep_checkpoints = {cfg.keep_checkpoints}: must be >= 1 (how many to keep)")
    need(cfg.save_every >= 0, f"save_every = {cfg.save_every}: must be >= 0 (0 = only at the end)")
    need(cfg.eval_every >= 0 and cfg.eval_batches >= 1, "eval_every must be >= 0 and eval_batches >= 1")
    tok = cfg.data.tokenizer
    if tok.startswith("bpe:"):
        n = tok[4:]
        need(n.isdigit() and int(n) >= 257,
             f"data.tokenizer = {tok!r}: write bpe:<vocab size> with at least 257 tokens (256 bytes + <eos>), "
             "e.g. bpe:2048")  # fmt: skip
    need(cfg.parallel.dp in ("fsdp", "replicate"), f"parallel.dp = {cfg.parallel.dp!r}: use fsdp or replicate")
    need(bool(cfg.model) != bool(cfg.init), "give either [model] settings or init = a model directory, not both")
    if cfg.model:
        model = dict(cfg.model)
        model.setdefault("vocab_size", 1)
        if model["vocab_size"] == 0:
            model["vocab_size"] = 1  # filled in from the tokenizer later
        mc = ModelConfig.from_dict(model, "model")
        need(cfg.data.seq_len <= mc.max_position_embeddings,
             f"data.seq_len = {cfg.data.seq_len} is longer than model.max_position_embeddings = "
             f"{mc.max_position_embeddings}; raise the model's context or shorten the rows")  # fmt: skip
        if cfg.data.synthetic_rows:
            need(cfg.data.synthetic_lengths[1] <= mc.max_position_embeddings,
                 f"data.synthetic_lengths = {cfg.data.synthetic_lengths} goes past model.max_position_embeddings = "
                 f"{mc.max_position_embeddings}")  # fmt: skip
        if mc.is_mla and cfg.parallel.cp > 1:
            need(False, "parallel.cp > 1 is not implemented for MLA attention (DeepSeek-style kv_lora_rank > 0): "
                 "context parallelism would silently attend only locally; use parallel.cp = 1")
        if cfg.parallel.ep > 1:
            need(mc.num_experts % cfg.parallel.ep == 0,
                 f"parallel.ep = {cfg.parallel.ep} does not divide model.num_experts = {mc.num_experts}")  # fmt: skip
    if cfg.parallel.cp > 1:
        need(not cfg.data.document_masking, "parallel.cp > 1 needs data.document_masking = false")
    for st in stages(cfg):
        need(st.seq_len >= 8, f"stages: seq_len = {st.seq_len} must be >= 8")
        need(st.start_step < cfg.steps,
             f"stages: a stage starts at step {st.start_step}, but training ends after steps = {cfg.steps}")
        lengths = st.synthetic_lengths
        need(lengths is None or (len(lengths) == 2 and 64 <= lengths[0] <= lengths[1]),
             f"stages: synthetic_lengths = {lengths}: give [min, max] tokens with 64 <= min <= max")
        facts = st.retrieval_facts
        need(facts is None or (bool(facts) and all(isinstance(n, int) and n >= 1 for n in facts)),
             f"stages: retrieval_facts = {facts}: give one or more whole numbers >= 1 (facts per row)")
        share = st.retrieval_repeat_digits
        need(share is None or 0 <= share <= 1, f"stages: retrieval_repeat_digits = {share}: a share, between 0 and 1")
        if cfg.parallel.cp > 1:
            need(st.seq_len % (2 * cfg.parallel.cp) == 0,
                 f"seq_len {st.seq_len} must be divisible by 2 x parallel.cp = {2 * cfg.parallel.cp} "
                 "(each rank holds a head and a tail chunk)")  # fmt: skip
    p = cfg.parallel
    need(p.ep >= 1 and p.cp >= 1, "parallel.ep and parallel.cp must be >= 1")
    need(not (p.ep > 1 and p.cp > 1), "parallel.ep and parallel.cp cannot both be > 1 yet")
    if world_size > 1:
        for name, n in (("ep", p.ep), ("cp", p.cp)):
            need(n in (1, world_size), f"parallel.{name} = {n} must be 1 or the world size ({world_size})")
        dp = world_size // p.cp
        need(cfg.batch_size % dp == 0,
             f"batch_size = {cfg.batch_size} must be divisible by the {dp} data-parallel ranks")  # fmt: skip


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
