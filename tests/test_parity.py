"""Logits, expert choices and the balance loss of longmoe equal transformers' on every supported family."""

import pytest
import torch
from reference_models import FAMILIES, MOE_FAMILIES, VOCAB

import longmoe
from longmoe.model import load_balancing_loss
from longmoe.model.moe import Router

ATOL = 1e-4  # fp32; observed differences are ~4e-6 with logits of std ~0.8


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(seed))


def capture_experts(module: torch.nn.Module, is_router, to_indices) -> tuple[list, list]:
    """Forward hooks on every router; returns (captured list, hook handles)."""
    seen, handles = [], []
    for m in module.modules():
        if is_router(m):
            handles.append(m.register_forward_hook(lambda mod, args, out: seen.append(to_indices(mod, out))))
    return seen, handles


def hf_indices(mod, out):
    if type(mod).__name__ == "Llama4Router":  # returns (scores [N, E] with zeros off the top-k, logits)
        return out[1].topk(mod.top_k, dim=-1).indices
    return out[2]  # (logits, weights, indices)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(hf_dirs, family):
    path, hf = hf_dirs(family)
    m = longmoe.load(path)
    ids = batch()
    hf_seen, h1 = capture_experts(hf, lambda x: type(x).__name__.endswith(("Router", "TopkRouter")), hf_indices)
    ours_seen, h2 = capture_experts(m.module, lambda x: isinstance(x, Router), lambda mod, out: out[2])
    with torch.no_grad():
        ref = hf(ids, output_router_logits=family in MOE_FAMILIES)
        out = m.module(ids)
    for h in h1 + h2:
        h.remove()
    assert ref.logits.std() > 0.3  # far from a trivially flat output
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    # the same top-k experts for every token in every MoE layer (order within the k is irrelevant)
    assert len(ours_seen) == len(hf_seen) == sum(m.config.moe_layers)
    for ours, theirs in zip(ours_seen, hf_seen):
        assert torch.equal(ours.sort(-1).values, theirs.sort(-1).values)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_load_balancing_loss_matches_transformers(hf_dirs, family):
    path, hf = hf_dirs(family)
    m = longmoe.load(path)
    ids = batch(1)
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True)
        out = m.module(ids)
    ours = load_balancing_loss(out.router_logits, m.config.num_experts_per_tok)
    torch.testing.assert_close(ours, ref.aux_loss.float(), atol=1e-5, rtol=1e-5)


def test_load_balancing_loss_is_top_k_at_perfect_balance():
    # uniform router probabilities and a round-robin top-k: every expert gets exactly K/E of the slots
    E, K = 8, 2
    logits = torch.zeros(64, E)
    logits[torch.arange(64)[:, None], (torch.arange(64)[:, None] * K + torch.arange(K)) % E] = 1e-4
    assert load_balancing_loss([logits], K).item() == pytest.approx(K, rel=1e-3)
    # all tokens on one pair of experts is penalised
    skewed = torch.zeros(64, E)
    skewed[:, :K] = 5.0
    assert load_balancing_loss([skewed], K).item() > 3 * K
