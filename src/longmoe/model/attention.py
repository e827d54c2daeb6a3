"""Causal attention for long contexts, never materialising an N x N mask.

Everything reduces to one case, `attend_span`: queries that are the last Tq of Tk contiguous key positions (the
"bottom-right" alignment that chunked prefill and decode need). It splits the keys into a prefix every query sees and
a causal tail, runs the fused SDPA kernel on each (its flash kernel runs on CPU too and returns the log-sum-exp) and
merges the two partial results through their log-sum-exp in fp32. Local layers add one rule:
- chunked (Llama 4): a query sees only keys in its own aligned chunk, so each chunk is an independent span;
- sliding window: queries go in blocks of `SLIDING_BLOCK`; each block sees at most W + block keys, masked with a
  block-local [block, W + block] bias.

Shapes: q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv]; lse [B, H, Tq] in fp32.
Packed sequences (several documents in one row) are described by `Segment`s built from explicit positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from .. import kernels

SLIDING_BLOCK = 512  # most query rows per sliding-window call; windows under 256 use blocks of 2 x window (>= 128)
SMALL_QUERY_ROWS = 64  # up to this many query rows per kv head, attention runs as two matmuls (decode)
FLASH_MIN_ROWS = 16  # from this many query rows on, bf16 attention on CPU runs in longmoe.kernels' flash kernel


@dataclass(frozen=True)
class Segment:
    """Queries q0:q1 of row `row` attend keys k0:k1 of the same row; both end at position `end` (exclusive)."""

    row: int
    q0: int
    q1: int
    k0: int
    k1: int
    end: int


def segments_from_positions(positions: torch.Tensor) -> list[Segment] | None:
    """Self-attention plan for [B, T] positions: a new document starts wherever positions do not count up by one.
    Returns None when every row is one document starting at 0, the common case that runs as a single batched call."""
    B, T = positions.shape
    pos = positions.cpu()  # NOTE: host sync, once per forward (not per layer)
    starts = torch.ones(B, T, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if not starts[:, 1:].any() and not pos[:, 0].any():
        return None
    segments = []
    for b in range(B):
        idx = starts[b].nonzero().flatten().tolist() + [T]
        for s, e in zip(idx[:-1], idx[1:]):
            segments.append(Segment(b, s, e, s, e, int(pos[b, e - 1]) + 1))
    return segments


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: list[Segment] | None,
    *,
    scale: float,
    window: int = 0,
    chunk: int = 0,
) -> torch.Tensor:
    """Attention output [B, H, Tq, Dv]; `segments=None` means every row is one sequence with positions 0..T-1."""
    if segments is None:
        Tk = k.shape[2]
        return attend_span(q, k, v, end=Tk, scale=scale, window=window, chunk=chunk)[0]
    out = q.new_zeros(*q.shape[:3], v.shape[-1])
    for s in segments:
        out[s.row : s.row + 1, :, s.q0 : s.q1] = attend_span(
            q[s.row : s.row + 1, :, s.q0 : s.q1],
            k[s.row : s.row + 1, :, s.k0 : s.k1],
            v[s.row : s.row + 1, :, s.k0 : s.k1],
            end=s.end,
            scale=scale,
            window=window,
            chunk=chunk,
        )[0]
    return out


def attend_span(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    end: int,
    scale: float,
    window: int = 0,
    chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bottom-right-aligned causal attention: query i is at position end - Tq + i, key j at end - Tk + j."""
    Tq, Tk = q.shape[2], k.shape[2]
    assert Tq <= Tk, f"queries ({Tq}) must be the tail of the keys ({Tk})"
    if chunk:
        return _chunked(q, k, v, end, scale, chunk)
    if Tq >= FLASH_MIN_ROWS and not (torch.is_grad_enabled() and q.requires_grad):
        fused = kernels.flash_attention(q, k, v, scale, Tk - Tq, window)  # bf16 on CPU: one pass, no merges
        if fused is not None:
            return fused
    if window and Tk > window:
        return _sliding(q, k, v, end, scale, window)
    if Tq == Tk:
        return sdpa(q, k, v, causal=True, scale=scale)
    if Tq == 1:
        return sdpa(q, k, v, causal=False, scale=scale)
    p = Tk - Tq  # prefix keys every query sees in full, then a causal tail aligned with the queries
    if torch.is_grad_enabled() and q.requires_grad:  # training on a tail of queries: one differentiable call
        hidden = torch.arange(Tk, device=q.device)[None, :] > torch.arange(p, Tk, device=q.device)[:, None]
        bias = torch.zeros(Tq, Tk, dtype=q.dtype, device=q.device).masked_fill_(hidden, float("-inf"))
        return sdpa(q, k, v, causal=False, scale=scale, bias=bias)
    head = sdpa(q, k[:, :, :p], v[:, :, :p], causal=False, scale=scale)
    tail = sdpa(q, k[:, :, p:], v[:, :, p:], causal=True, scale=scale)
    return merge(head, tail)


def _chunked(q, k, v, end, scale, chunk):
    Tq, Tk = q.shape[2], k.shape[2]
    q_start, k_start = end - Tq, end - Tk
    outs, lses = [], []
    pos = q_start
    while pos < end:  # one span per chunk touched by the queries
        chunk_end = min((pos // chunk + 1) * chunk, end)
        lo = max(pos // chunk * chunk, k_start)  # first visible key position
        qs = slice(pos - q_start, chunk_end - q_start)
        ks = slice(lo - k_start, chunk_end - k_start)
        o, lse = attend_span(q[:, :, qs], k[:, :, ks], v[:, :, ks], end=chunk_end, scale=scale)
        outs.append(o)
        lses.append(lse)
        pos = chunk_end
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _sliding(q, k, v, end, scale, window):
    Tq, Tk = q.shape[2], k.shape[2]
    q_start, k_start = end - Tq, end - Tk
    outs, lses = [], []
    block = min(SLIDING_BLOCK, max(128, 2 * window))  # a block reads window + block keys: small windows, small blocks
    for a in range(q_start, end, block):
        b = min(a + block, end)
        lo = max(a - window + 1, k_start)
        ks = slice(lo - k_start, b - k_start)
        bias = _band(a - lo, b - a, b - lo, window, q.dtype, q.device)  # [block, <= W + block]
        o, lse = sdpa(
            q[:, :, a - q_start : b - q_start], k[:, :, ks], v[:, :, ks], causal=False, scale=scale, bias=bias
        )
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


@lru_cache(maxsize=64)
def _band(offset: int, n_q: int, n_k: int, window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask of a sliding-window block: query i (at key index i + offset) sees keys j with
    i + offset - window < j <= i + offset. Every interior block has the same one, so it is built once."""
    i = torch.arange(n_q, device=device)[:, None] + offset
    j = torch.arange(n_k, device=device)[None, :]
    visible = (j <= i) & (j > i - window)
    return torch.zeros(n_q, n_k, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    bias: torch.Tensor | None = None,
    valid: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention returning (out, lse). Top-left causal alignment, so callers pass Tq == Tk when causal.
    `valid`: only the first `valid` keys count (the rest is padding; decode path only)."""
    Dv = v.shape[-1]
    if Dv != q.shape[-1]:  # MLA: value heads are narrower than query/key heads; the fused kernels want one size
        v = F.pad(v, (0, q.shape[-1] - Dv))
    if k.shape[2] == 0:
        out = q.new_zeros(*q.shape[:3], Dv)
        return out, torch.full(q.shape[:3], float("-inf"), device=q.device)
    small = q.device.type == "cpu" and not causal and bias is None
    small = small and q.shape[2] * q.shape[1] <= SMALL_QUERY_ROWS * k.shape[1]
    if valid is not None and valid < k.shape[2] and not small:
        k, v = k[:, :, :valid], v[:, :, :valid]
    if small:
        out, lse = _sdpa_small(q, k, v, scale, valid)
    elif q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale
        )
    else:
        out, lse = _sdpa_math(q, k, v, causal, scale, bias)
    return out[..., :Dv], lse


def _sdpa_small(q, k, v, scale, valid=None):
    """Few queries, many keys (decode): per kv head, scores = q_group @ K^T and out = softmax @ V, streaming the
    cache once. (The CPU flash kernel pays a per-block cost that makes one query ~10x slower.) Scores and softmax
    are fp32; bf16 caches go through longmoe.kernels, fp32 ones through one batched matmul."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = H // Hkv
    out = q.new_empty(B, H, T, v.shape[-1])
    lse = torch.empty(B, H, T, device=q.device)
    for b in range(B):
        qg = q[b].reshape(Hkv, rep * T, D)  # query heads grouped by the kv head they share
        fused = [kernels.decode_attention(qg[h], k[b, h], v[b, h], scale, valid or S) for h in range(Hkv)]
        if all(f is not None for f in fused):
            out[b] = torch.stack([o for o, _ in fused]).reshape(H, T, -1)
            lse[b] = torch.stack([x for _, x in fused]).reshape(H, T)
            continue
        if k.dtype == torch.float32:
            s = torch.bmm(qg, k[b].transpose(1, 2))  # [Hkv, rep*T, S]
        else:
            s = torch.stack([kernels.scores(qg[h], k[b, h]) for h in range(Hkv)])
        s = s * scale
        if valid is not None and valid < S:
            s[..., valid:] = float("-inf")
        m = s.amax(dim=-1, keepdim=True)  # [Hkv, rep*T, 1]
        p = (s - m).exp_()
        total = p.sum(dim=-1, keepdim=True)
        p /= total
        lse_b = m + total.log()
        if v.dtype == torch.float32:
            o = torch.bmm(p, v[b])
        else:
            o = torch.stack([kernels.weighted_sum(p[h], v[b, h]) for h in range(Hkv)])
        out[b] = o.reshape(H, T, -1)
        lse[b] = lse_b.reshape(H, T)
    return out, lse


def _sdpa_math(q, k, v, causal, scale, bias, block: int = 1024):
    """Reference path for devices without a fused kernel that returns the log-sum-exp: key blocks with an online
    softmax, so memory stays O(Tq x block)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    Tq, Tk = q.shape[2], k.shape[2]
    m = torch.full(q.shape[:3], float("-inf"), device=q.device)
    s_sum = torch.zeros(q.shape[:3], device=q.device)
    acc = torch.zeros(*q.shape[:3], v.shape[-1], device=q.device)
    qf = q.float() * scale
    for j in range(0, Tk, block):
        s = qf @ k[:, :, j : j + block].float().transpose(-1, -2)  # [B, H, Tq, blk]
        if bias is not None:
            s = s + bias[..., j : j + block].float()
        if causal:
            kj = torch.arange(j, min(j + block, Tk), device=q.device)
            s = s.masked_fill(kj[None, :] > torch.arange(Tq, device=q.device)[:, None], float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        safe = torch.where(m_new.isinf(), torch.zeros_like(m_new), m_new)
        p = (s - safe[..., None]).exp()
        corr = (m - safe).exp()
        s_sum = s_sum * corr + p.sum(-1)
        acc = acc * corr[..., None] + p @ v[:, :, j : j + block].float()
        m = m_new
    lse = m + s_sum.log()
    return (acc / s_sum[..., None]).to(q.dtype), lse


def merge(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets, in fp32 and without exp overflow:
    out = out_a - sigmoid(lse_b - lse_a) * (out_a - out_b); lse = logaddexp(lse_a, lse_b)."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    if torch.is_grad_enabled() and (out_a.requires_grad or out_b.requires_grad):
        # The fused kernels do not differentiate their log-sum-exp; a merge under autograd would drop gradient.
        raise RuntimeError("merging partial attentions is inference-only; train with queries == keys")
    lse_a, lse_b = lse_a.float(), lse_b.float()
    w_b = torch.sigmoid(lse_b - lse_a).nan_to_num(nan=0.0)[..., None]  # both -inf (no keys at all) -> keep a
    out = out_a.float() - w_b * (out_a.float() - out_b.float())
    lse = torch.logaddexp(lse_a, lse_b)
    return out.to(out_a.dtype), lse
