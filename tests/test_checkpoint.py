"""Checkpoints: lossless round trips, memory-mapped loading, and clear errors for every kind of bad input."""

import json
import shutil
import struct

import pytest
import torch
from reference_models import FAMILIES, VOCAB

import longmoe
from longmoe.checkpoint import CheckpointError, native, save
from longmoe.checkpoint.safetensors_io import DTYPE_NAMES, SafetensorsFile, checkpoint_files, save_safetensors
from longmoe.model import ModelConfig, Transformer


def read_all(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in checkpoint_files(directory):
        for name, ref in SafetensorsFile(f).tensors.items():
            out[name] = ref.load()
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_export_import_is_bit_exact(hf_dirs, tmp_path, family):
    path, hf = hf_dirs(family)
    first = longmoe.load(path)
    first.save(tmp_path / "out")
    second = longmoe.load(tmp_path / "out")
    a, b = first.module.state_dict(), second.module.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # and the export is the source format itself: same tensor names, shapes, dtypes and bytes
    src, dst = read_all(path), read_all(tmp_path / "out")
    assert src.keys() == dst.keys()
    for k in src:
        assert src[k].dtype == dst[k].dtype and torch.equal(src[k], dst[k]), k
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((path / "config.json").read_text())
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (path / "tokenizer.json").read_bytes()


def test_transformers_loads_our_export(hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    path, hf = hf_dirs("qwen2_moe")
    longmoe.load(path).save(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits)


def test_sharded_export_with_index_round_trips(hf_dirs, tmp_path):
    from longmoe.checkpoint import hf as hf_ckpt

    path, _ = hf_dirs("mixtral")
    m = longmoe.load(path)
    shards = hf_ckpt.save_sharded
    hf_ckpt.save_sharded = lambda tensors, d: shards(tensors, d, max_shard_bytes=200_000)
    try:
        m.save(tmp_path)
    finally:
        hf_ckpt.save_sharded = shards
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("model-*"))) > 1
    again = longmoe.load(tmp_path)
    for k, v in m.module.state_dict().items():
        assert torch.equal(v, again.module.state_dict()[k]), k


def test_weights_are_memory_mapped(hf_dirs):
    path, _ = hf_dirs("llama")
    m = longmoe.load(path)  # dtype auto = the checkpoint's fp32: no copy needed
    ptr = m.module.layers[0].self_attn.q_proj.weight.data_ptr()
    maps = open("/proc/self/maps").read().splitlines()
    owner = [
        line for line in maps if int(line.split()[0].split("-")[0], 16) <= ptr < int(line.split()[0].split("-")[1], 16)
    ]
    assert owner and owner[0].endswith("model.safetensors")


def test_dtype_choice(hf_dirs):
    path, _ = hf_dirs("olmoe")
    assert longmoe.load(path).module.lm_head.weight.dtype == torch.float32
    m = longmoe.load(path, dtype="bfloat16")
    assert m.module.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'float8'"):
        longmoe.load(path, dtype="float8")


def test_deepseek_selection_bias_stays_fp32(hf_dirs):
    path, _ = hf_dirs("deepseek_v3")
    m = longmoe.load(path, dtype="bfloat16")
    assert m.module.layers[1].mlp.router.selection_bias.dtype == torch.float32


def test_native_format_round_trip(tmp_path):
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        num_experts=4,
        moe_intermediate_size=16,
        moe_layers=[False, True],
        router_bias=True,
        tie_word_embeddings=True,
    )
    model = Transformer(cfg)
    model.init_weights(seed=0)
    save(native(model), tmp_path)
    m = longmoe.load(tmp_path)
    assert m.config == cfg
    for k, v in model.state_dict().items():
        assert torch.equal(v, m.module.state_dict()[k]), k
    assert m.module.lm_head.weight is m.module.embed_tokens.weight


# --- bad input: each gives an error that names the problem -----------------------------------------------------------


def copy_of(hf_dirs, family, tmp_path):
    src, _ = hf_dirs(family)
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        longmoe.load(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        longmoe.load(tmp_path)


def test_unknown_architecture_lists_supported(hf_dirs, tmp_path):
    d = copy_of(hf_dirs, "llama", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="mamba", architectures=["MambaForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unsupported architecture 'mamba' \(MambaForCausalLM\).*mixtral"):
        longmoe.load(d)


def test_truncated_safetensors_names_the_file(hf_dirs, tmp_path):
    d = copy_of(hf_dirs, "mixtral", tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: is truncated: tensor"):
        longmoe.load(d)


def test_corrupt_header_names_the_file(hf_dirs, tmp_path):
    d = copy_of(hf_dirs, "mixtral", tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json at!"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: has a corrupt header"):
        longmoe.load(d)


def test_mismatched_shapes_name_the_tensor(hf_dirs, tmp_path):
    d = copy_of(hf_dirs, "qwen3_moe", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 48  # the weights were built for 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor '\S+' has shape \[.*\] but config\.json implies"):
        longmoe.load(d)


def test_missing_expert_tensor(hf_dirs, tmp_path):
    d = copy_of(hf_dirs, "olmoe", tmp_path)
    tensors = read_all(d)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    from longmoe.checkpoint.safetensors_io import save_safetensors

    save_safetensors(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.experts\.gate_up_proj needs 8 experts"):
        longmoe.load(d)


def test_pickle_only_directory(hf_dirs, tmp_path):
    d = copy_of(hf_dirs, "llama", tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle weights"):
        longmoe.load(d)


def write_sparse_checkpoint(directory, config: ModelConfig) -> int:
    """A native checkpoint whose safetensors file has the full size of the model but is sparse on disk (all
    zeros, no blocks allocated): a real 'too big' checkpoint that costs nothing to make."""
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in Transformer(config).state_dict().items()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 4
        for s in shape:
            n *= s
        header[name] = {"dtype": DTYPE_NAMES[torch.float32], "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    f = directory / "model.safetensors"
    with open(f, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)) + head)
        fh.truncate(8 + len(head) + offset)
    (directory / "config.json").write_text(json.dumps({"model_type": "longmoe", **config.to_dict()}))
    return offset


def test_checkpoint_larger_than_memory_fails_with_numbers(tmp_path):
    big = ModelConfig(
        vocab_size=128000, hidden_size=8192, num_layers=48, num_heads=64, num_kv_heads=8, intermediate_size=28672
    )
    nbytes = write_sparse_checkpoint(tmp_path, big)
    assert nbytes > 100 * 2**30  # ~40B parameters in fp32
    with pytest.raises(CheckpointError, match=r"needs [\d,.]+ GiB of memory as float32, but only [\d,.]+ GiB"):
        longmoe.load(tmp_path)


def test_released_pages_stop_counting_and_still_read_back(tmp_path):
    """Per-expert tensors are copied into fused ones at load; their mapped pages are then dropped (RSS counts a
    model once, not twice) and reading the tensor again re-faults it from the file unchanged."""

    def rss_file() -> int:
        return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("RssFile:")) * 1024

    t = torch.randn(4096, 1024)  # 16 MiB
    save_safetensors({"a": t, "b": torch.ones(3)}, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    before = rss_file()
    assert torch.equal(f.tensors["a"].load().clone(), t)
    touched = rss_file()
    assert touched - before > 12 * 2**20
    f.tensors["a"].release()
    assert touched - rss_file() > 12 * 2**20
    assert torch.equal(f.tensors["a"].load(), t) and torch.equal(f.tensors["b"].load(), torch.ones(3))
