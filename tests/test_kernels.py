"""The decode kernels (longmoe/kernels/decode.c) equal the PyTorch ops they replace, within bf16 rounding."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from longmoe import kernels

pytestmark = pytest.mark.skipif(not kernels._load(), reason="needs a C compiler and a CPU with AVX-512 BF16")


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("K, N", [(64, 8), (512, 2048), (96, 33)])
def test_linear_matches_fp32_reference(rows, K, N):
    torch.manual_seed(0)
    x = torch.randn(rows, K, dtype=torch.bfloat16)
    pool = torch.randn(N, K + 32, dtype=torch.bfloat16)
    w = pool[:, :K]  # rows with a stride, like a view into a bigger tensor
    b = torch.randn(N, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = kernels.linear(x, w, b)
    ref = F.linear(x.float(), w.float(), b.float())
    assert out.dtype == torch.bfloat16 and out.shape == (rows, N)
    torch.testing.assert_close(out.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)  # one bf16 rounding


def test_linear_falls_back_outside_its_domain():
    x = torch.randn(40, 64, dtype=torch.bfloat16)  # too many rows: a GEMM
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w))
    x32, w32 = x.float(), w.float()
    with torch.inference_mode():
        torch.testing.assert_close(kernels.linear(x32[:2], w32), F.linear(x32[:2], w32))  # fp32: not the kernel
    x.requires_grad_()
    assert kernels.linear(x[:1], w).requires_grad  # autograd: not the kernel


@pytest.mark.parametrize(
    "R, S, valid, Dv", [(1, 7, 7, 64), (4, 768, 700, 64), (8, 5000, 4321, 128), (64, 300, 300, 64)]
)
def test_decode_attention_matches_softmax_reference(R, S, valid, Dv):
    torch.manual_seed(1)
    q = torch.randn(R, 64, dtype=torch.bfloat16)
    k = torch.randn(S, 64, dtype=torch.bfloat16)
    v = torch.randn(S, Dv, dtype=torch.bfloat16)
    with torch.inference_mode():
        out, lse = kernels.decode_attention(q, k, v, 0.125, valid)
    scores = (q.float() @ k.float()[:valid].T) * 0.125  # keys past `valid` are padding and must not count
    torch.testing.assert_close(out, scores.softmax(-1) @ v.float()[:valid], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-4, rtol=1e-5)


def test_bf16_decoding_with_and_without_kernels(hf_dirs):
    path, _ = hf_dirs("qwen2_moe")
    script = (
        f"import longmoe, json; m = longmoe.load({str(path)!r}, dtype='bfloat16', block_size=16, chunk_size=24, "
        "kv_memory=2**25); g = m.generate('The special magic number is', max_new_tokens=12, logprobs=True); "
        "print(json.dumps([g.token_ids, g.logprobs]))"
    )
    runs = []
    for flag in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "LONGMOE_KERNELS": flag})  # fmt: skip
        assert out.returncode == 0, out.stderr
        runs.append(json.loads(out.stdout))
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(torch.tensor(runs[0][1]), torch.tensor(runs[1][1]), atol=0.05, rtol=0)


def test_scores_and_weighted_sum():
    torch.manual_seed(2)
    q = torch.randn(4, 64, dtype=torch.bfloat16)
    k = torch.randn(1000, 64, dtype=torch.bfloat16)
    p = torch.rand(4, 1000)
    with torch.inference_mode():
        torch.testing.assert_close(kernels.scores(q, k), q.float() @ k.float().T, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(kernels.weighted_sum(p, k), p @ k.float(), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("weight_on_input", [False, True])
def test_fused_moe_decode_equals_the_per_expert_path(monkeypatch, tokens, weight_on_input):
    """kernels.moe_decode rounds where MoE._few_tokens rounds: equal to it (all but a rare last-bit difference
    from exp() inside silu), and within bf16 rounding of the grouped-GEMM dispatch."""
    from longmoe.model import ModelConfig
    from longmoe.model.moe import MoE

    torch.manual_seed(3)
    cfg = ModelConfig(
        vocab_size=64, hidden_size=128, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=96,
        num_experts=8, num_experts_per_tok=1 if weight_on_input else 2, moe_intermediate_size=96,
        weight_on_input=weight_on_input,
    )  # fmt: skip
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
    moe = moe.to(torch.bfloat16).eval()
    x = torch.randn(tokens, 128, dtype=torch.bfloat16)
    with torch.inference_mode():
        _, w, e = moe.router(x)
        fused = moe._few_tokens(x, w, e)
        monkeypatch.setattr(kernels, "moe_decode", lambda *a: None)
        per_expert = moe._few_tokens(x, w, e)
        grouped = moe._dispatch(x, w, e)
    differ = (fused != per_expert).sum().item()
    assert differ <= max(1, fused.numel() // 500), f"{differ} of {fused.numel()} values differ"
    torch.testing.assert_close(fused, per_expert, atol=0, rtol=1e-2)  # any difference is one bf16 step
    torch.testing.assert_close(fused.float(), grouped.float(), atol=2e-2 * grouped.abs().max().item(), rtol=0)


@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_equals_the_pytorch_form(monkeypatch, weighted):
    from longmoe.model.transformer import RMSNorm

    torch.manual_seed(4)
    norm = RMSNorm(512, 1e-6, weight=weighted).to(torch.bfloat16)
    if weighted:
        torch.nn.init.normal_(norm.weight, 1.0, 0.5)
    x = torch.randn(2, 3, 512, dtype=torch.bfloat16) * 3
    with torch.inference_mode():
        fused = norm(x)
        monkeypatch.setattr(kernels, "rms_norm", lambda *a: None)
        ref = norm(x)
    assert fused.shape == ref.shape and fused.dtype == torch.bfloat16
    # the same rounding points; only the fp32 sum of squares may differ in its last bit
    assert (fused != ref).float().mean() < 0.01
    torch.testing.assert_close(fused, ref, atol=0, rtol=1e-2)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_equals_the_pytorch_form(monkeypatch, interleaved):
    from longmoe.model.rope import apply_rope

    torch.manual_seed(5)
    x = torch.randn(2, 3, 4, 64, dtype=torch.bfloat16)
    angles = torch.rand(2, 3, 32) * 100
    cos, sin = angles.cos() * 1.1, angles.sin() * 1.1
    with torch.inference_mode():
        fused = apply_rope(x, cos, sin, interleaved)
        monkeypatch.setattr(kernels, "rope", lambda *a: None)
        ref = apply_rope(x, cos, sin, interleaved)
    assert torch.equal(fused, ref)  # same fp32 operations in the same order, one rounding


@pytest.mark.parametrize("V", [32000, 1000, 37])
def test_cross_entropy_rows_equals_log_softmax(V):
    """Loss per row within fp32 rounding of log_softmax on the same bf16 logits; the in-place gradient equal to
    softmax - one-hot rounded to bf16 (up to the last bit where the exp polynomial differs)."""
    torch.manual_seed(5)
    logits = (torch.randn(70, V) * 3).to(torch.bfloat16)
    logits[3, 5] = 60.0  # one confident row
    targets = torch.randint(0, V, (70,))
    targets[3] = 5
    logp = torch.log_softmax(logits.float(), dim=-1)
    rows = torch.arange(70)
    grad_ref = logp.exp()
    grad_ref[rows, targets] -= 1.0
    with torch.no_grad():
        assert kernels.cross_entropy_rows(logits.float(), targets, True) is None  # fp32: not its domain
        g = logits.clone()
        loss = kernels.cross_entropy_rows(g, targets, True)
        loss_only = kernels.cross_entropy_rows(logits.clone(), targets, False)
    torch.testing.assert_close(loss, -logp[rows, targets], atol=1e-5, rtol=1e-6)
    assert torch.equal(loss, loss_only)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), grad_ref.to(torch.bfloat16).float(), atol=1e-6, rtol=2**-8)
