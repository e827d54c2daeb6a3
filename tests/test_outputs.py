"""Outputs only where they are asked for: the last layer runs attention and FFN only at the positions whose logits
are wanted (every position still makes its K/V). Logits, the KV cache and training losses equal the full
computation, for every family; the engine's prefill uses it (middle chunks ask for no logits at all)."""

import pytest
import torch
from reference_models import FAMILIES

import longmoe
from longmoe.engine.kv_cache import PagedKVCache, Row
from longmoe.model import IGNORE, ModelConfig, Transformer

ATOL = 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_last_positions_equal_the_full_forward(hf_dirs, family):
    path, _ = hf_dirs(family)
    m = longmoe.load(path)
    ids = torch.randint(0, m.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m.module(ids).logits
        for k in (1, 7, 40):
            torch.testing.assert_close(m.module(ids, outputs=k).logits, full[:, -k:], atol=ATOL, rtol=0)
        assert m.module(ids, outputs=0).logits.shape == (2, 0, m.config.vocab_size)


def _prefill(module: Transformer, ids: list[int], chunks: list[tuple[int, int | None]]):
    """Prefill `ids` through a paged cache in the given (length, outputs) chunks -> (last chunk's logits, cache)."""
    c = module.config
    bs = 16
    blocks = -(-len(ids) // bs)
    cache = PagedKVCache(c, {kind: blocks for kind in set(c.layer_types)}, bs, torch.float32)
    tables = {kind: list(range(blocks)) for kind in cache.pools}
    start, logits = 0, None
    with torch.no_grad():
        for n, outputs in chunks:
            cache.prepare([Row(tables, start, n)])
            x = torch.tensor([ids[start : start + n]])
            pos = torch.arange(start, start + n)[None]
            logits = module(x, pos, cache=cache, outputs=outputs).logits
            start += n
    return logits, cache


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kv_cache_and_logits_equal_the_full_computation(hf_dirs, family):
    path, _ = hf_dirs(family)
    m = longmoe.load(path)
    ids = torch.randint(0, m.config.vocab_size, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_logits, ref = _prefill(m.module, ids, [(30, None), (40, None)])
    logits, got = _prefill(m.module, ids, [(30, 0), (40, 1)])  # a middle chunk asks for nothing
    assert logits.shape[1] == 1
    torch.testing.assert_close(logits[:, -1], ref_logits[:, -1], atol=ATOL, rtol=0)
    for kind in ref.k:
        torch.testing.assert_close(got.k[kind][:, :, :70], ref.k[kind][:, :, :70], atol=0, rtol=0)
        if ref.v[kind] is not None:
            torch.testing.assert_close(got.v[kind][:, :, :70], ref.v[kind][:, :, :70], atol=0, rtol=0)


def test_training_loss_on_the_tail_equals_the_full_loss_and_gradients():
    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                      num_experts=4, moe_intermediate_size=32, layer_types=["sliding", "sliding", "full"],
                      sliding_window=8, rope_layers=[True, True, False], logn_attn=True, nope_qk_norm=True)  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    ids = torch.randint(0, 64, (2, 50))
    targets = torch.full((2, 50), IGNORE)
    targets[0, 40:] = ids[0, 40:]
    targets[1, 45:48] = ids[1, 45:48]
    grads = []
    losses = []
    for outputs in (None, 10):
        model.zero_grad()
        loss = model(ids, targets=targets, outputs=outputs).loss_sum
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-6)
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-4, msg=n)
    with pytest.raises(ValueError, match="targets outside the last outputs = 5 positions would be dropped"):
        model(ids, targets=targets, outputs=5)


def test_engine_prefill_asks_the_model_for_logits_only_at_the_end(hf_dirs, monkeypatch):
    path, _ = hf_dirs("mixtral")
    m = longmoe.load(path, block_size=16, chunk_size=24, kv_memory=32 * 2**20)
    asked = []
    forward = m.module.forward

    def spy(*args, **kw):
        asked.append(kw.get("outputs"))
        return forward(*args, **kw)

    monkeypatch.setattr(m.module, "forward", spy)
    m.generate(list(range(3, 80)), max_new_tokens=2)
    assert asked == [0, 0, 0, 1, 1]  # 77 prompt tokens in chunks of 24: three silent chunks, the last, one decode
