"""transformers-format checkpoints (config.json + safetensors) in and out, for every supported family.

Each family is a config translation plus a name map. Our parameter names follow transformers' (so most maps are a
prefix strip), with three differences: the router is `mlp.router` (not `mlp.gate`), shared experts are always
`mlp.shared_expert`, and experts are always fused `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`. Per-expert hub
tensors (Mixtral's w1/w3/w2, Qwen/OLMoE/DeepSeek's gate/up/down_proj) are fused on load; every loaded tensor's source
is recorded so `save` writes back exactly the names, layout and dtypes it came from (a lossless round trip).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model.config import ConfigError, ModelConfig
from ..model.omni import AudioConfig, OmniEncoders, VisionConfig
from ..model.rope import yarn_mscale
from ..model.transformer import Transformer
from ..sysinfo import available_memory, cpu_computes, fmt_gib
from .safetensors_io import (
    CheckpointError,
    SafetensorsFile,
    TensorRef,
    atomic_write_bytes,
    checkpoint_files,
    save_sharded,
)

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "preprocessor_config.json")


# ---------------------------------------------------------------------------------------------------------------------
# config translation


def _rope(h: dict, default_theta: float) -> dict[str, Any]:
    """Both transformers forms: v4 `rope_theta` + `rope_scaling`, v5 `rope_parameters` (theta inside)."""
    params = dict(h.get("rope_parameters") or h.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or h.get("rope_theta") or default_theta
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    for key in ("mrope_section", "interleaved", "mrope_interleaved"):  # M-RoPE (Qwen-Omni / -VL): see _qwen3_omni_moe
        params.pop(key, None)
    if params.pop("partial_rotary_factor", h.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 is not supported")
    if kind in ("llama3", "yarn", "longrope"):
        params.setdefault(
            "original_max_position_embeddings",
            h.get("original_max_position_embeddings") or h["max_position_embeddings"],
        )
    scaling = None if kind == "default" else {"rope_type": kind, **params}
    return {"rope_theta": float(theta), "rope_scaling": scaling}


def _base(h: dict, *, eps: float, theta: float, tie: bool = False) -> dict[str, Any]:
    heads = h["num_attention_heads"]
    return {
        "vocab_size": h["vocab_size"],
        "hidden_size": h["hidden_size"],
        "num_layers": h["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": h.get("num_key_value_heads") or heads,
        "head_dim": h.get("head_dim") or h["hidden_size"] // heads,
        "intermediate_size": h.get("intermediate_size", 0),
        "rms_norm_eps": h.get("rms_norm_eps", eps),
        "tie_word_embeddings": h.get("tie_word_embeddings", tie),
        "hidden_act": h.get("hidden_act", "silu"),
        "max_position_embeddings": h.get("max_position_embeddings", 4096),
        **_rope(h, theta),
    }


def _num_experts(h: dict, default: int) -> int:
    # transformers renames these through attribute maps, so both spellings occur in config.json files
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if h.get(key) is not None:
            return h[key]
    return default


def _layer_types(h: dict, default: list[str]) -> list[str]:
    names = {"full_attention": "full", "sliding_attention": "sliding", "chunked_attention": "chunked"}
    if h.get("layer_types"):
        return [names[t] for t in h["layer_types"]]
    return default


def _mixtral(h: dict) -> ModelConfig:
    b = _base(h, eps=1e-5, theta=1e6)
    window = h.get("sliding_window") or 0
    return ModelConfig(
        **b,
        layer_types=["sliding" if window else "full"] * b["num_layers"],
        sliding_window=window,
        num_experts=_num_experts(h, 8),
        num_experts_per_tok=h.get("num_experts_per_tok", 2),
        moe_intermediate_size=h.get("intermediate_size", 14336),
        norm_topk_prob=True,
        router_aux_loss_coef=h.get("router_aux_loss_coef", 0.001),
    )


def _qwen_moe_layers(h: dict, n: int) -> list[bool]:
    skip, step = set(h.get("mlp_only_layers") or []), h.get("decoder_sparse_step", 1)
    return [i not in skip and _num_experts(h, 0) > 0 and (i + 1) % step == 0 for i in range(n)]


def _qwen2_moe(h: dict) -> ModelConfig:
    b = _base(h, eps=1e-6, theta=10000.0)
    n = b["num_layers"]
    window = h.get("sliding_window") or 0 if h.get("use_sliding_window") else 0
    default_types = [
        "sliding" if window and (i + 1) % 2 and i < h.get("max_window_layers", 28) else "full" for i in range(n)
    ]
    return ModelConfig(
        **b,
        attention_bias=h.get("qkv_bias", True),
        layer_types=_layer_types(h, default_types),
        sliding_window=window,
        num_experts=_num_experts(h, 60),
        num_experts_per_tok=h.get("num_experts_per_tok", 4),
        moe_intermediate_size=h.get("moe_intermediate_size", 1408),
        moe_layers=_qwen_moe_layers(h, n),
        norm_topk_prob=h.get("norm_topk_prob", False),
        shared_expert_intermediate_size=h.get("shared_expert_intermediate_size", 5632),
        shared_expert_gate=True,
        router_aux_loss_coef=h.get("router_aux_loss_coef", 0.001),
    )


def _qwen3_moe(h: dict) -> ModelConfig:
    b = _base(h, eps=1e-6, theta=10000.0)
    n = b["num_layers"]
    window = (h.get("sliding_window") or 0) if h.get("use_sliding_window") else 0
    bias = h.get("attention_bias", False)
    return ModelConfig(
        **b,
        attention_bias=bias,
        o_bias=bias,
        qk_norm="head",
        layer_types=["sliding" if window else "full"] * n,
        sliding_window=window,
        num_experts=_num_experts(h, 128),
        num_experts_per_tok=h.get("num_experts_per_tok", 8),
        moe_intermediate_size=h.get("moe_intermediate_size", 768),
        moe_layers=_qwen_moe_layers(h, n),
        norm_topk_prob=h.get("norm_topk_prob", False),
        router_aux_loss_coef=h.get("router_aux_loss_coef", 0.001),
    )


def _qwen3_omni_moe(h: dict) -> ModelConfig:
    """The thinker of Qwen3-Omni-MoE: a Qwen3-MoE text model with interleaved M-RoPE (the talker is not loaded)."""
    thinker = h.get("thinker_config", h)
    text = dict(thinker["text_config"])
    text.setdefault("tie_word_embeddings", thinker.get("tie_word_embeddings", False))
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    config = _qwen3_moe({"rope_theta": 1e6, **text})
    config.mrope_section = list(rope.get("mrope_section") or [24, 20, 20])
    config.mrope_interleaved = True  # transformers interleaves whatever the config's flag says
    config.validate()
    return config


def _omni_encoders(h: dict) -> OmniEncoders:
    thinker = h.get("thinker_config", h)
    v, a = dict(thinker.get("vision_config") or {}), dict(thinker.get("audio_config") or {})
    theta = (v.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    vision = VisionConfig(**{k: v[k] for k in VisionConfig.__dataclass_fields__ if k in v}, rope_theta=theta)
    if v.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh" or v.get("in_channels", 3) != 3:
        raise ConfigError("vision_config: longmoe implements hidden_act gelu_pytorch_tanh on 3-channel input")
    audio = AudioConfig(**{k: a[k] for k in AudioConfig.__dataclass_fields__ if k in a})
    if a.get("activation_function", "gelu") != "gelu" or a.get("scale_embedding"):
        raise ConfigError("audio_config: longmoe implements activation_function gelu without scale_embedding")
    return OmniEncoders(vision, audio)


def _olmoe(h: dict) -> ModelConfig:
    b = _base(h, eps=1e-5, theta=10000.0)
    bias = h.get("attention_bias", False)
    return ModelConfig(
        **b,
        attention_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=h.get("clip_qkv"),
        num_experts=_num_experts(h, 64),
        num_experts_per_tok=h.get("num_experts_per_tok", 8),
        moe_intermediate_size=h.get("intermediate_size", 2048),
        norm_topk_prob=h.get("norm_topk_prob", False),
        router_aux_loss_coef=h.get("router_aux_loss_coef", 0.01),
    )


def _deepseek_v3(h: dict) -> ModelConfig:
    b = _base(h, eps=1e-6, theta=10000.0)
    n = b["num_layers"]
    rope_dim, nope_dim = h.get("qk_rope_head_dim", 64), h.get("qk_nope_head_dim", 128)
    scale = (rope_dim + nope_dim) ** -0.5
    scaling = b["rope_scaling"] or {}
    if scaling.get("mscale_all_dim"):  # yarn: DeepSeek folds mscale^2 into the softmax scale
        scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
    experts = _num_experts(h, 256)
    b.update(head_dim=rope_dim, num_kv_heads=b["num_heads"])
    return ModelConfig(
        **b,
        attention_bias=h.get("attention_bias", False),
        q_lora_rank=h.get("q_lora_rank") or 0,
        kv_lora_rank=h.get("kv_lora_rank", 512),
        qk_nope_head_dim=nope_dim,
        qk_rope_head_dim=rope_dim,
        v_head_dim=h.get("v_head_dim", 128),
        softmax_scale=scale,
        rope_interleaved=h.get("rope_interleave", True),
        num_experts=experts,
        num_experts_per_tok=h.get("num_experts_per_tok", 8),
        moe_intermediate_size=h.get("moe_intermediate_size", 2048),
        moe_layers=[i >= h.get("first_k_dense_replace", 3) for i in range(n)],
        score_func="sigmoid",
        norm_topk_prob=h.get("norm_topk_prob", True),
        routed_scaling_factor=h.get("routed_scaling_factor", 2.5),
        n_group=h.get("n_group") or 1,
        topk_group=h.get("topk_group") or 1,
        group_score="top2_sum",
        router_bias=True,
        shared_expert_intermediate_size=h.get("moe_intermediate_size", 2048) * h.get("n_shared_experts", 1),
    )


def _llama4(h: dict) -> ModelConfig:
    h = h.get("text_config", h)  # multimodal Llama 4 checkpoints nest the text model
    b = _base(h, eps=1e-5, theta=500000.0)
    n = b["num_layers"]
    interval = h.get("no_rope_layer_interval", 4)
    rope_layers = [bool(x) for x in h.get("no_rope_layers") or [(i + 1) % interval != 0 for i in range(n)]]
    step = h.get("interleave_moe_layer_step", 1)
    moe = h.get("moe_layers")
    moe = set(moe if moe is not None else range(step - 1, n, step))
    chunk = h.get("attention_chunk_size", 8192) or 0
    bias = h.get("attention_bias", False)
    b["intermediate_size"] = h.get("intermediate_size_mlp", 16384)
    return ModelConfig(
        **b,
        attention_bias=bias,
        o_bias=bias,
        qk_norm="l2" if h.get("use_qk_norm", True) else None,
        layer_types=_layer_types(h, ["chunked" if r and chunk else "full" for r in rope_layers]),
        attention_chunk_size=chunk,
        rope_layers=rope_layers,
        rope_interleaved=True,
        attn_temperature_tuning=h.get("attn_temperature_tuning", True),
        floor_scale=h.get("floor_scale", 8192),
        attn_scale=h.get("attn_scale", 0.1),
        num_experts=_num_experts(h, 16),
        num_experts_per_tok=h.get("num_experts_per_tok", 1),
        moe_intermediate_size=h.get("intermediate_size", 8192),
        moe_layers=[i in moe for i in range(n)],
        score_func="sigmoid",
        norm_topk_prob=False,
        weight_on_input=True,
        shared_expert_intermediate_size=h.get("intermediate_size", 8192),
        router_aux_loss_coef=h.get("router_aux_loss_coef", 0.001),
    )


def _llama(h: dict) -> ModelConfig:
    if h.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported")
    b = _base(h, eps=1e-6, theta=10000.0)
    bias = h.get("attention_bias", False)
    return ModelConfig(**b, attention_bias=bias, o_bias=bias)


def _qwen3(h: dict) -> ModelConfig:
    b = _base(h, eps=1e-6, theta=10000.0)
    n = b["num_layers"]
    window = (h.get("sliding_window") or 0) if h.get("use_sliding_window") else 0
    default_types = ["sliding" if window and i >= h.get("max_window_layers", 28) else "full" for i in range(n)]
    bias = h.get("attention_bias", False)
    return ModelConfig(
        **b,
        attention_bias=bias,
        o_bias=bias,
        qk_norm="head",
        layer_types=_layer_types(h, default_types),
        sliding_window=window,
    )


def _longmoe(h: dict) -> ModelConfig:
    return ModelConfig.from_dict({k: v for k, v in h.items() if k not in ("model_type", "architectures")})


# ---------------------------------------------------------------------------------------------------------------------
# families: config translation + tensor names


@dataclass(frozen=True)
class Family:
    to_config: Callable[[dict], ModelConfig]
    renames: tuple[tuple[str, str], ...] = ()  # (hub fragment, our fragment), applied in order after "model." is cut
    expert_parts: dict[str, str] = field(default_factory=dict)  # per-expert tensor -> gate | up | down
    fused_transposed: bool = False  # Llama 4 stores experts as gate_up_proj [E, H, 2I], down_proj [E, I, H]
    encoders: Callable[[dict], torch.nn.Module] | None = None  # media encoders (omni families), loaded as `encoders.*`


QWEN_RENAMES = (
    (".mlp.gate.e_score_correction_bias", ".mlp.router.selection_bias"),
    (".mlp.gate.weight", ".mlp.router.weight"),
    (".mlp.shared_experts.", ".mlp.shared_expert."),
)
QWEN_EXPERTS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        _mixtral,
        ((".block_sparse_moe.gate.", ".mlp.router."), (".block_sparse_moe.", ".mlp."), (".mlp.gate.", ".mlp.router.")),
        {"w1": "gate", "w3": "up", "w2": "down"},
    ),
    "qwen2_moe": Family(_qwen2_moe, QWEN_RENAMES, QWEN_EXPERTS),
    "qwen3_moe": Family(_qwen3_moe, QWEN_RENAMES, QWEN_EXPERTS),
    "qwen3_omni_moe": Family(_qwen3_omni_moe, QWEN_RENAMES, QWEN_EXPERTS, encoders=_omni_encoders),
    "olmoe": Family(_olmoe, QWEN_RENAMES, QWEN_EXPERTS),
    "deepseek_v3": Family(_deepseek_v3, QWEN_RENAMES, QWEN_EXPERTS),
    "llama4_text": Family(_llama4, ((".feed_forward.router.", ".mlp.router."), (".feed_forward.", ".mlp.")), {}, True),
    "llama": Family(_llama),
    "qwen3": Family(_qwen3),
    "longmoe": Family(_longmoe),
}
FAMILIES["llama4"] = FAMILIES["llama4_text"]
SUPPORTED = sorted(FAMILIES)

PREFIX = re.compile(r"^(?:thinker\.)?(?:language_model\.)?(?:model\.)?")
ENCODER_PREFIXES = ("visual.", "audio_tower.")
EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")


@dataclass
class Source:
    """Where one of our tensors came from, so export can write it back unchanged."""

    kind: str  # "copy" | "transpose" | "experts"
    keys: list[str]  # hub names; for "experts": one per expert and part, in (expert, part) order
    dtype: torch.dtype


def hub_to_ours(family: Family, name: str) -> tuple[str, int | None, str | None]:
    """Hub tensor name -> (our name, expert index, part) for per-expert tensors, else (our name, None, None)."""
    ours = PREFIX.sub("", name)
    if family.encoders is not None and ours.startswith(ENCODER_PREFIXES):
        return "encoders." + ours, None, None
    for a, b in family.renames:
        ours = ours.replace(a, b)
    m = EXPERT.match(ours)
    if m and m.group(3) in family.expert_parts:
        part = family.expert_parts[m.group(3)]
        return f"{m.group(1)}.{'down_proj' if part == 'down' else 'gate_up_proj'}", int(m.group(2)), part
    return ours, None, None


# ---------------------------------------------------------------------------------------------------------------------
# loading


@dataclass
class Checkpoint:
    """A loaded model and what is needed to write it back in its source format."""

    model: Transformer
    config: ModelConfig
    path: Path
    hub_config: dict[str, Any]
    sources: dict[str, Source]
    generation: dict[str, Any]
    encoders: torch.nn.Module | None = None  # media encoders of an omni model (longmoe.model.omni.OmniEncoders)


def read_hub_config(path: Path) -> tuple[dict[str, Any], str]:
    if not path.exists():
        raise CheckpointError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a file; pass the directory that holds config.json and *.safetensors")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path} has no config.json; is it a transformers-format model directory?")
    try:
        hub = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(hub, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    model_type = hub.get("model_type", "")
    if model_type not in FAMILIES:
        arch = ",".join(hub.get("architectures") or []) or "no architectures field"
        raise CheckpointError(
            f"{cfg_path}: unsupported architecture {model_type!r} ({arch}); supported model_type values: "
            f"{', '.join(SUPPORTED)}"
        )
    if hub.get("quantization_config"):
        method = hub["quantization_config"].get("quant_method", "?")
        raise CheckpointError(
            f"{cfg_path}: quantized checkpoints ({method}) are not supported; use an unquantized (bf16/fp16/fp32) copy"
        )
    return hub, model_type


def load(
    path: str | Path, dtype: str | torch.dtype = "auto", check_memory: bool = True, device: str = "cpu"
) -> Checkpoint:
    """Load a transformers-format (or native longmoe) directory, memory-mapped where no conversion is needed.
    dtype "auto" is the checkpoint's own, except float32 on a CPU without native bf16 / fp16 matmuls; the model
    ends up on `device`."""
    path = Path(path)
    device = _check_device(device)
    hub, model_type = read_hub_config(path)
    family = FAMILIES[model_type]
    try:
        config = family.to_config(hub)
    except (ConfigError, KeyError, TypeError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{path / 'config.json'}: cannot build a {model_type} model: {what}") from None

    refs: dict[str, TensorRef] = {}
    for f in checkpoint_files(path):
        for name, ref in SafetensorsFile(f).tensors.items():
            refs[name] = ref
    target = _resolve_dtype(dtype, hub, refs)
    if dtype == "auto" and device.type == "cpu" and not cpu_computes(str(target).removeprefix("torch.")):
        target = torch.float32  # a bf16 checkpoint on a CPU with no bf16 instructions: compute in fp32

    with torch.device("meta"):
        model = Transformer(config)
        try:
            encoders = family.encoders(hub) if family.encoders else None
        except (ConfigError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / 'config.json'}: cannot build the media encoders: {e}") from None
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    if encoders is not None:
        expected.update({"encoders." + k: v for k, v in encoders.state_dict(keep_vars=True).items()})
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")

    needed = sum(t.numel() for t in expected.values()) * target.itemsize
    if check_memory:
        free = available_memory(str(device))
        if needed > free:
            raise CheckpointError(
                f"{path}: the model needs {fmt_gib(needed)} of memory as {str(target).removeprefix('torch.')}, "
                f"but only {fmt_gib(free)} is available; free memory, pick a smaller dtype, or use a bigger machine"
            )

    grouped: dict[str, list[tuple[int | None, str | None, TensorRef]]] = {}
    unexpected = []
    for name, ref in refs.items():
        ours, e, part = hub_to_ours(family, name)
        if ours in expected:
            grouped.setdefault(ours, []).append((e, part, ref))
        elif not _ignorable(ours, config):
            unexpected.append(name)
    if unexpected:
        raise CheckpointError(
            f"{path}: tensors that config.json does not describe: {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}; the weights do not match this config"
        )
    missing = sorted(set(expected) - set(grouped))
    if missing:
        raise CheckpointError(f"{path}: missing tensors for {missing[:8]}{' ...' if len(missing) > 8 else ''}")

    state, sources = {}, {}
    for ours, items in grouped.items():
        want = list(expected[ours].shape)
        tensor, source = _assemble(family, ours, items, want, path)
        if ours.endswith("selection_bias"):
            tensor = tensor.float()  # balancing biases stay fp32, as DeepSeek keeps them
        elif tensor.dtype != target:
            tensor = tensor.to(target)
        if source.kind == "experts" or tensor.dtype != source.dtype:  # a copy: the mapped pages are not needed
            for _, _, ref in items:
                ref.release()
        state[ours] = tensor
        sources[ours] = source
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    if encoders is not None:
        enc_state = {k.removeprefix("encoders."): state.pop(k) for k in list(state) if k.startswith("encoders.")}
        encoders.load_state_dict(enc_state, strict=True, assign=True)
        encoders.reset_buffers(device)  # non-persistent buffers were made on the meta device
        encoders.to(device).eval()
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if device.type != "cpu":
        model.to(device)
    model.reset_buffers(device)
    model.eval()
    return Checkpoint(model, config, path, hub, sources, _generation_config(path, hub), encoders)


def _check_device(device: str | torch.device) -> torch.device:
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available here; use device='cpu'")
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: longmoe runs on cpu or cuda")
    return d


def _ignorable(ours: str, config: ModelConfig) -> bool:
    if "rotary_emb.inv_freq" in ours:  # old checkpoints saved the RoPE buffer
        return True
    if ours.startswith(("vision_model.", "multi_modal_projector.")):  # Llama 4's image tower: text-only for now
        return True
    if ours.startswith(("talker.", "code2wav.")):  # Qwen3-Omni's speech output: out of scope
        return True
    m = re.match(r"^layers\.(\d+)\.", ours)  # DeepSeek-V3's multi-token-prediction layer sits past num_layers
    return bool(m) and int(m.group(1)) >= config.num_layers


def _assemble(family: Family, ours: str, items: list, want: list[int], path: Path) -> tuple[torch.Tensor, Source]:
    def mismatch(name: str, got: list[int]) -> CheckpointError:
        return CheckpointError(
            f"{path}: tensor {name!r} has shape {got} but config.json implies {want} for {ours}; "
            "the weights and config.json do not belong together"
        )

    if items[0][0] is None:  # one hub tensor
        ((_, _, ref),) = items
        t = ref.load()
        kind = "copy"
        if family.fused_transposed and ours.endswith(("experts.gate_up_proj", "experts.down_proj")):
            t, kind = t.transpose(1, 2), "transpose"  # a view: the hub layout is what grouped_mm wants anyway
        if list(t.shape) != want:
            raise mismatch(ref.name, list(t.shape))
        return t, Source(kind, [ref.name], ref.dtype)

    # per-expert hub tensors -> one fused [E, ...] tensor
    E = want[0]
    parts = ("gate", "up") if ours.endswith("gate_up_proj") else ("down",)
    by_key = {(e, part): ref for e, part, ref in items}
    keys = [(e, p) for e in range(E) for p in parts]
    absent = [k for k in keys if k not in by_key]
    if absent or len(by_key) != len(keys):
        raise CheckpointError(f"{path}: {ours} needs {E} experts x {parts}; missing {absent[:6]} or extra tensors")
    first = by_key[keys[0]]
    out = torch.empty(want, dtype=first.dtype)
    rows = want[1] // len(parts)
    for e, p in keys:
        ref = by_key[(e, p)]
        t = ref.load()
        if list(t.shape) != [rows, want[2]]:
            raise mismatch(ref.name, list(t.shape))
        i = parts.index(p)
        out[e, i * rows : (i + 1) * rows] = t
    return out, Source("experts", [by_key[k].name for k in keys], first.dtype)


def _resolve_dtype(dtype: str | torch.dtype, hub: dict, refs: dict[str, TensorRef]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
    }
    if dtype in names:
        return names[dtype]
    if dtype != "auto":
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(names)}")
    declared = hub.get("dtype") or hub.get("torch_dtype")
    if declared in names:
        return names[declared]
    sizes: dict[torch.dtype, int] = {}
    for r in refs.values():
        if r.dtype.is_floating_point:
            sizes[r.dtype] = sizes.get(r.dtype, 0) + r.nbytes
    return max(sizes, key=sizes.get) if sizes else torch.float32


def _generation_config(path: Path, hub: dict) -> dict[str, Any]:
    gen = {}
    f = path / "generation_config.json"
    if f.exists():
        try:
            gen = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f}: not valid JSON ({e})") from None
        if not isinstance(gen, dict):
            raise CheckpointError(f"{f}: expected a JSON object, got {type(gen).__name__}")
        eos = gen.get("eos_token_id")
        ok = eos is None or (isinstance(eos, int) and not isinstance(eos, bool)) or (
            isinstance(eos, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in eos))  # fmt: skip
        if not ok:
            raise CheckpointError(f"{f}: eos_token_id must be a token id or a list of them, got {eos!r}")
    for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if gen.get(k) is None and hub.get(k) is not None:
            gen[k] = hub[k]
    return gen


# ---------------------------------------------------------------------------------------------------------------------
# saving


def native(model: Transformer, path: str | Path = ".") -> Checkpoint:
    """Wrap a model built in longmoe (e.g. by the trainer) so `save` writes the native format: config.json holds
    the ModelConfig fields, tensors keep our names."""
    config = model.config
    state = model.state_dict()
    sources = {k: Source("copy", [k], t.dtype) for k, t in state.items()}
    if config.tie_word_embeddings:
        sources.pop("lm_head.weight")
    hub = {"model_type": "longmoe", **config.to_dict()}
    return Checkpoint(model, config, Path(path), hub, sources, {})


def save(ckpt: Checkpoint, out: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write the model in the format it was loaded from: same config.json, tensor names, layouts and (unless `dtype`
    is given) dtypes; tokenizer and generation files are copied alongside."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = ckpt.model.state_dict()
    if ckpt.encoders is not None:
        state.update({"encoders." + k: v for k, v in ckpt.encoders.state_dict().items()})
    tensors: dict[str, torch.Tensor] = {}
    for ours, src in ckpt.sources.items():
        t = state[ours].detach()
        t = t.to(dtype or src.dtype) if not ours.endswith("selection_bias") else t.to(src.dtype)
        if src.kind == "copy":
            tensors[src.keys[0]] = t
        elif src.kind == "transpose":
            tensors[src.keys[0]] = t.transpose(1, 2)
        else:
            per_expert = len(src.keys) // t.shape[0]
            rows = t.shape[1] // per_expert
            for i, key in enumerate(src.keys):
                e, part = divmod(i, per_expert)
                tensors[key] = t[e, part * rows : (part + 1) * rows]
    save_sharded(tensors, out)
    atomic_write_bytes(out / "config.json", json.dumps(ckpt.hub_config, indent=2).encode())
    for name in SIDE_FILES:
        src = ckpt.path / name
        if src.exists() and src.resolve() != (out / name).resolve():
            atomic_write_bytes(out / name, src.read_bytes())
