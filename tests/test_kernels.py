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


# --- prefill.c: the element-wise passes of many rows (portable C, built for this CPU) ---

needs_rows = pytest.mark.skipif(not kernels._load_prefill(), reason="needs a C compiler")


@needs_rows
@pytest.mark.parametrize("rows, C", [(1, 64), (37, 512), (2048, 1000)])
def test_rms_norm_rows_equals_the_pytorch_form(monkeypatch, rows, C):
    from longmoe.model.transformer import RMSNorm

    torch.manual_seed(6)
    norm = RMSNorm(C, 1e-5).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight, 1.0, 0.5)
    x = (torch.randn(rows, C + 8) * 3).to(torch.bfloat16)[:, :C]  # strided rows
    with torch.inference_mode():
        fused = norm(x)
        monkeypatch.setattr(kernels, "rms_norm", lambda *a: None)
        ref = norm(x)
    assert (fused != ref).float().mean() < 0.01  # only the fp32 sum of squares may differ in its last bit
    torch.testing.assert_close(fused, ref, atol=0, rtol=1e-2)


@needs_rows
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_rows_equals_the_pytorch_form(monkeypatch, interleaved):
    from longmoe.model.rope import apply_rope

    torch.manual_seed(7)
    x = torch.randn(2, 700, 8, 128, dtype=torch.bfloat16)
    angles = torch.rand(2, 700, 64) * 1000
    cos, sin = angles.cos(), angles.sin()
    with torch.inference_mode():
        fused = apply_rope(x, cos, sin, interleaved)
        monkeypatch.setattr(kernels, "rope", lambda *a: None)
        ref = apply_rope(x, cos, sin, interleaved)
    assert torch.equal(fused, ref)  # same fp32 operations in the same order, one rounding


@needs_rows
@pytest.mark.parametrize("shape", [(1, 32), (513, 1024), (3, 17, 96)])
def test_silu_mul_equals_the_pytorch_form(shape):
    torch.manual_seed(8)
    gu = (torch.randn(*shape[:-1], 2 * shape[-1]) * 4).to(torch.bfloat16)
    gate, up = gu.chunk(2, dim=-1)  # the halves of one projection: strided rows
    with torch.inference_mode():
        fused = kernels.silu_mul(gate, up)
        split = kernels.silu_mul(gate.contiguous(), up.contiguous())
    ref = torch.nn.functional.silu(gate) * up
    assert fused.shape == ref.shape and torch.equal(fused, split)
    # the same two roundings; exp's last bit may differ from PyTorch's, which moves a rare value one bf16 step
    assert (fused != ref).float().mean() < 0.01
    torch.testing.assert_close(fused, ref, atol=0, rtol=1e-2)


@needs_rows
@pytest.mark.parametrize("weight_on_input", [False, True])
@pytest.mark.parametrize("tokens, K", [(300, 2), (100, 4), (40, 8)])
def test_moe_prefill_combine_equals_index_add(monkeypatch, weight_on_input, tokens, K):
    """The fused combine adds each token's expert outputs in index_add_'s order with its roundings: bit-equal."""
    from longmoe.model import ModelConfig, MoE

    cfg = ModelConfig(hidden_size=128, num_experts=16, num_experts_per_tok=K, moe_intermediate_size=64,
                      weight_on_input=weight_on_input)  # fmt: skip
    torch.manual_seed(9)
    moe = MoE(cfg).to(torch.bfloat16)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    x = torch.randn(tokens, 128, dtype=torch.bfloat16)
    with torch.inference_mode():
        _, w, e = moe.router(x)
        fused = moe._dispatch(x, w, e)
        monkeypatch.setattr(kernels, "moe_combine", lambda *a: None)
        monkeypatch.setattr(kernels, "silu_mul", lambda *a: None)
        ref = moe._dispatch(x, w, e)
    differ = (fused != ref).sum().item()  # silu's exp may move a rare intermediate by one bf16 step
    assert differ <= max(1, fused.numel() // 200), f"{differ} of {fused.numel()} values differ"
    torch.testing.assert_close(fused.float(), ref.float(), atol=2e-2 * ref.abs().max().item(), rtol=0)


def _attention_reference(q, k, v, scale, q_offset, window):
    """fp32 softmax attention with the flash kernel's alignment: query i sees keys j <= i + q_offset (and
    j > i + q_offset - window)."""
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    s = q.float() @ kk.transpose(-1, -2) * scale
    i = torch.arange(q.shape[2])[:, None] + q_offset
    j = torch.arange(k.shape[2])[None]
    visible = (j <= i) & ((j > i - window) if window else True)
    s = s.masked_fill(~visible, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ vv, torch.logsumexp(s, -1)


@pytest.mark.parametrize(
    "B, H, Hkv, Tq, S, D, Dv, q_offset, window",
    [
        (1, 8, 2, 100, 100, 64, 64, 0, 0),  # causal, square
        (1, 8, 2, 300, 1000, 64, 64, 700, 0),  # a chunk after a cached prefix
        (2, 4, 4, 130, 500, 128, 128, 370, 0),  # batch, MHA, head dim 128
        (1, 8, 2, 257, 257, 64, 64, 0, 50),  # sliding window
        (1, 2, 1, 64, 900, 32, 64, 836, 128),  # window, D != Dv
        (1, 4, 2, 40, 20000, 64, 64, 19960, 0),  # more keys than one call takes: spans merged
        (1, 4, 2, 50, 300, 64, 64, -20, 0),  # the first 20 queries see no key: out 0, lse -inf
    ],
)
def test_flash_attention_matches_softmax_reference(monkeypatch, B, H, Hkv, Tq, S, D, Dv, q_offset, window):
    monkeypatch.setattr(kernels, "AMX", False)  # AMX CPUs prefer PyTorch's kernel in use; test ours there too
    torch.manual_seed(10)
    q = torch.randn(B, Tq, H, D, dtype=torch.bfloat16).transpose(1, 2)  # the projections' [B, T, H, D] strides
    k = torch.randn(B, S, Hkv, D, dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(B, Hkv, S, Dv, dtype=torch.bfloat16)  # a KV pool's layout
    with torch.inference_mode():
        out, lse = kernels.flash_attention(q, k, v, D**-0.5, q_offset, window)
    ref, ref_lse = _attention_reference(q, k, v, D**-0.5, q_offset, window)
    assert out.shape == (B, H, Tq, Dv) and out.dtype == torch.bfloat16
    assert out.transpose(1, 2).is_contiguous()  # o_proj's layout
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)  # bf16 probabilities and output
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("sliding_window", [None, 48])
def test_bf16_prefill_with_and_without_kernels(tmp_path, monkeypatch, sliding_window):
    """A bf16 Mixtral with 64-wide heads (the kernels' domain), prefilled in chunks by the engine: its prompt
    log-probabilities with longmoe.kernels (flash attention, RMSNorm, RoPE, SwiGLU, MoE combine) are as close to
    the fp32 model's as those of the PyTorch ops alone (bf16 noise, including the odd flipped expert choice, is
    ~0.002 on average and up to ~0.13 at a few positions in both)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    import longmoe
    from longmoe.engine.engine import SamplingParams

    torch.manual_seed(11)
    cfg = MixtralConfig(vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=4096, sliding_window=sliding_window)  # fmt: skip
    MixtralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    prompt = torch.randint(0, 512, (700,), generator=torch.Generator().manual_seed(0)).tolist()

    def prompt_logprobs(dtype: str = "bfloat16") -> torch.Tensor:
        m = longmoe.load(tmp_path, block_size=16, chunk_size=160, dtype=dtype)
        seq = m.engine.submit(prompt, SamplingParams(max_new_tokens=0, prompt_logprobs=True))
        m.engine.run(seq)
        return torch.tensor(seq.prompt_logprobs)

    exact = prompt_logprobs("float32")
    fused = prompt_logprobs()
    for name in ("flash_attention", "rms_norm", "rope", "silu_mul", "moe_combine"):
        monkeypatch.setattr(kernels, name, lambda *a, **k: None)
    ref = prompt_logprobs()
    fused_err, ref_err = (fused - exact).abs(), (ref - exact).abs()
    assert len(fused) == len(prompt) - 1
    assert fused_err.mean() <= 1.5 * ref_err.mean() + 1e-3, (fused_err.mean(), ref_err.mean())
    assert fused_err.max() <= 2 * ref_err.max() + 0.05, (fused_err.max(), ref_err.max())


def test_fused_decode_equals_the_model_forward(tmp_path):
    """Decoding one sequence with one C call per layer (engine.fused_decode) gives the tokens and log-probabilities
    of the model's own forward, also when the cached keys sit in two runs of slots (a prefix-cache hit)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    import longmoe
    from longmoe.engine.engine import SamplingParams

    torch.manual_seed(12)
    cfg = MixtralConfig(vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=4096)  # fmt: skip
    MixtralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(1)
    a, b, tail = (torch.randint(0, 512, (n,), generator=g).tolist() for n in (100, 50, 30))

    def run(fused: bool) -> list[tuple[list[int], list[float], int]]:
        m = longmoe.load(tmp_path, block_size=16)
        assert m.engine.fused_decode is not None
        if not fused:
            m.engine.fused_decode = None
        out = []
        for prompt in (a, b, a[:64] + tail):  # the third reuses a's first 4 blocks, then continues after b's
            seq = m.engine.submit(prompt, SamplingParams(max_new_tokens=12, logprobs=True, ignore_eos=True))
            m.engine.run(seq)
            out.append((seq.output, seq.logprobs, len(m.engine.cache.rows[0].runs)))
        return out

    fused, ref = run(True), run(False)
    assert fused[2][2] == 2  # the third prompt decoded over two runs of slots
    for (ids, lps, _), (ref_ids, ref_lps, _) in zip(fused, ref):
        assert ids == ref_ids
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), atol=0.02, rtol=0)
