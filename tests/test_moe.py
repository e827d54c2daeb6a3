"""The grouped-GEMM expert path equals the per-expert loop, including degenerate routings; router terms."""

import pytest
import torch

from longmoe.model import ModelConfig, MoE, update_selection_bias, z_loss
from longmoe.model.moe import GroupedExperts


def make_moe(dtype=torch.float32, **kw) -> MoE:
    cfg = dict(
        hidden_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        shared_expert_gate=True,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    moe = MoE(ModelConfig(**cfg))
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape) * 0.1)
    return moe.to(dtype).eval()


def both_paths(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    assert moe.experts.impl == "grouped"
    grouped = moe(x)[0]
    moe.experts.impl = "loop"
    loop = moe(x)[0]
    moe.experts.impl = "grouped"
    return grouped, loop


@pytest.mark.parametrize("counts", [[3, 0, 5, 2, 0, 7, 1, 6], [24, 0, 0, 0, 0, 0, 0, 0], [0] * 7 + [24]])
def test_grouped_equals_loop_for_given_counts(counts):
    experts = GroupedExperts(8, 64, 32)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape) * 0.1)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 64)
    torch.testing.assert_close(experts(x, counts), experts.forward_loop(x, counts), atol=1e-5, rtol=0)


def test_grouped_equals_loop_random_routing_fp32():
    moe = make_moe()
    x = torch.randn(2, 50, 64)
    grouped, loop = both_paths(moe, x)
    torch.testing.assert_close(grouped, loop, atol=1e-5, rtol=0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_equals_loop_when_all_tokens_pick_the_same_experts(top_k):
    # zero router weights + a selection bias: every token picks expert 0 (and 1), the others get zero tokens
    moe = make_moe(router_bias=True, num_experts_per_tok=top_k)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.selection_bias.copy_(torch.tensor([2.0, 1.0, 0, 0, 0, 0, 0, 0]))
    x = torch.randn(1, 40, 64)
    _, _, experts = moe.router(x.view(-1, 64))
    assert set(experts.flatten().tolist()) == set(range(top_k))
    grouped, loop = both_paths(moe, x)
    torch.testing.assert_close(grouped, loop, atol=1e-5, rtol=0)


def test_grouped_bf16_within_tolerance_of_fp32():
    moe = make_moe()
    x = torch.randn(2, 50, 64)
    ref = moe(x)[0]
    moe.to(torch.bfloat16)
    grouped, loop = both_paths(moe, x.bfloat16())
    # stated bf16 tolerance: 2% of the output's scale (bf16 has an 8-bit mantissa: ~0.4% per rounding)
    tol = 0.02 * ref.abs().max().item()
    assert (grouped.float() - ref).abs().max().item() <= tol
    assert (loop.float() - ref).abs().max().item() <= tol
    assert (grouped.float() - loop.float()).abs().max().item() <= tol


def test_grouped_and_loop_gradients_match():
    moe = make_moe()
    x = torch.randn(2, 30, 64)
    g = torch.randn(2, 30, 64)
    grads = []
    for impl in ("grouped", "loop"):
        moe.zero_grad()
        moe.experts.impl = impl
        xi = x.clone().requires_grad_()
        (moe(xi)[0] * g).sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in moe.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_moe_equals_per_token_reference():
    """Against the plainest definition: each token sums its top-k experts' SwiGLU outputs times their weights."""
    moe = make_moe(shared_expert_intermediate_size=0, shared_expert_gate=False)
    x = torch.randn(17, 64)
    _, w, idx = moe.router(x)
    ref = torch.zeros_like(x)
    for t in range(17):
        for j in range(2):
            e = idx[t, j]
            gate, up = (moe.experts.gate_up_proj[e] @ x[t]).chunk(2)
            ref[t] += w[t, j] * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(moe(x[None])[0][0], ref, atol=1e-5, rtol=0)


def test_group_limited_routing_only_picks_from_best_groups():
    moe = make_moe(score_func="sigmoid", n_group=4, topk_group=2, router_bias=True)
    x = torch.randn(64, 64)
    _, _, idx = moe.router(x)
    groups = idx // 2  # 8 experts in 4 groups of 2
    assert all(len(set(row)) <= 2 for row in groups.tolist())


def test_training_counts_tokens_and_bias_update_balances():
    moe = make_moe(router_bias=True)
    moe.train()
    x = torch.randn(4, 32, 64)
    moe(x)
    counts = moe.tokens_per_expert.clone()
    assert counts.sum().item() == 4 * 32 * 2
    bias_before = moe.router.selection_bias.clone()
    update_selection_bias(moe, rate=0.01)
    delta = moe.router.selection_bias - bias_before
    # overloaded experts are pushed down, underloaded up, and the update is centred
    assert torch.all(delta[counts > counts.mean()] < 0) and torch.all(delta[counts < counts.mean()] > 0)
    assert abs(delta.sum().item()) < 1e-6
    assert moe.tokens_per_expert.sum() == 0
    moe.eval()
    moe(x)
    assert moe.tokens_per_expert.sum() == 0  # inference never counts


def test_z_loss_is_mean_squared_logsumexp():
    logits = [torch.randn(10, 8), torch.randn(10, 8)]
    expected = torch.stack([torch.logsumexp(x, -1).pow(2).mean() for x in logits]).mean()
    torch.testing.assert_close(z_loss(logits), expected)
