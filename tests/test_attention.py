"""Attention: chunked/LSE-merged == one-shot, local windows == a dense reference mask, packing, O(N) memory."""

import subprocess
import sys
import textwrap

import pytest
import torch

import longmoe.model.attention as attn
from longmoe.model import ModelConfig, Transformer
from longmoe.model.attention import attend_span, merge, sdpa

SCALE = 0.25


def qkv(T: int, H: int = 4, Hkv: int = 2, D: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, H, T, D, generator=g),
        torch.randn(1, Hkv, T, D, generator=g),
        torch.randn(1, Hkv, T, D, generator=g),
    )


def reference(q, k, v, *, end: int, window: int = 0, chunk: int = 0) -> torch.Tensor:
    """Dense-mask attention, the plainest definition (small sizes only)."""
    Tq, Tk = q.shape[2], k.shape[2]
    qp = torch.arange(end - Tq, end)[:, None]
    kp = torch.arange(end - Tk, end)[None, :]
    visible = kp <= qp
    if window:
        visible &= kp > qp - window
    if chunk:
        visible &= kp // chunk == qp // chunk
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * SCALE
    return s.masked_fill(~visible, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("Tq", [1, 7, 64, 100, 128])
def test_chunked_causal_with_lse_merge_equals_one_shot(Tq):
    q, k, v = qkv(128)
    full = sdpa(q, k, v, causal=True, scale=SCALE)[0]
    part = attend_span(q[:, :, -Tq:], k, v, end=128, scale=SCALE)[0]
    torch.testing.assert_close(part, full[:, :, -Tq:], atol=1e-5, rtol=0)


def test_lse_merge_of_key_halves_equals_full_attention():
    q, k, v = qkv(96)
    q = q[:, :, -8:]  # 8 queries that see all 96 keys
    a = sdpa(q, k[:, :, :40], v[:, :, :40], causal=False, scale=SCALE)
    b = sdpa(q, k[:, :, 40:], v[:, :, 40:], causal=False, scale=SCALE)
    full = sdpa(q, k, v, causal=False, scale=SCALE)
    out, lse = merge(a, b)
    torch.testing.assert_close(out, full[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, full[1], atol=1e-5, rtol=0)
    empty = (torch.zeros_like(full[0]), torch.full_like(full[1], float("-inf")))
    torch.testing.assert_close(merge(empty, full)[0], full[0])  # a side with no keys contributes nothing


@pytest.mark.parametrize("Tq", [1, 5, 40, 100])
@pytest.mark.parametrize("window", [7, 16, 33])
def test_sliding_window_equals_reference(monkeypatch, Tq, window):
    monkeypatch.setattr(attn, "SLIDING_BLOCK", 8)  # several query blocks even at this size
    q, k, v = qkv(100)
    out = attend_span(q[:, :, -Tq:], k, v, end=130, scale=SCALE, window=window)[0]
    ref = reference(q[:, :, -Tq:], k, v, end=130, window=window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("Tq", [1, 9, 48, 100])
@pytest.mark.parametrize("chunk", [8, 16, 50])
def test_chunked_local_attention_equals_reference(Tq, chunk):
    q, k, v = qkv(100)
    out = attend_span(q[:, :, -Tq:], k, v, end=117, scale=SCALE, chunk=chunk)[0]
    ref = reference(q[:, :, -Tq:], k, v, end=117, chunk=chunk)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_packed_documents_do_not_see_each_other():
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        num_experts=4,
        moe_intermediate_size=16,
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(std=0.2, seed=0)
    a, b = torch.randint(0, 64, (1, 20)), torch.randint(0, 64, (1, 12))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(20), torch.arange(12)])[None]  # positions restart: a new document
    with torch.no_grad():
        out = model(packed, positions).logits
        torch.testing.assert_close(out[:, :20], model(a).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 20:], model(b).logits, atol=1e-5, rtol=0)


def test_tail_queries_under_autograd_equal_the_full_causal_attention():
    """Training on the last few positions only (one masked call, no LSE merge): same output and gradients."""
    q, k, v = qkv(32)
    grads = []
    for tail in (False, True):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = attend_span(qq[:, :, -8:], kk, vv, end=32, scale=SCALE)[0] if tail else \
            attend_span(qq, kk, vv, end=32, scale=SCALE)[0][:, :, -8:]  # fmt: skip
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append((out.detach(), qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="inference-only"):  # merging partial results still refuses autograd
        merge((q.requires_grad_(), torch.zeros(q.shape[:3])), (q, torch.zeros(q.shape[:3])))


MEMORY_SCRIPT = textwrap.dedent("""
    import sys, torch
    from longmoe.model.attention import attend_span
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    T = int(sys.argv[1])
    torch.set_num_threads(2)
    q, k, v = torch.randn(1, 4, T, 64), torch.randn(1, 2, T, 64), torch.randn(1, 2, T, 64)
    attend_span(q[:, :, :64], k[:, :, :64], v[:, :, :64], end=64, scale=0.125)  # warm up
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter
    before = status("VmRSS:")
    out = attend_span(q, k, v, end=T, scale=0.125)[0]
    print(status("VmHWM:") - before, out.numel() * out.element_size())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for peak RSS")
def test_attention_memory_is_linear_in_length():
    """Peak extra memory of causal attention over T tokens (4 heads, d=64) is the output plus a constant: at 16K
    tokens a dense score matrix alone would be 4 x 16K x 16K x 4 B = 4 GiB."""
    rows = {}
    for T in (4096, 16384):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(T)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        rows[T] = [int(x) for x in out.stdout.split()]
    for T, (extra, out_bytes) in rows.items():
        print(f"T={T}: peak extra {extra / 2**20:.1f} MiB, output {out_bytes / 2**20:.1f} MiB")
        assert extra <= 1.5 * out_bytes + 8 * 2**20
    assert rows[16384][0] < 6 * rows[4096][0]  # ~4x for 4x the tokens; quadratic would be ~16x
