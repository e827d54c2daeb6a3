"""CPU kernels for decoding, where a few query rows meet large bf16 weights or KV caches, and for the training
loss's softmax over a large vocabulary.

oneDNN's bf16 GEMV reaches ~11-15 GB/s on this class of CPU from cold memory; `decode.c` streams the same bytes at
30-60 GB/s with AVX-512 BF16 dot products and fp32 accumulation. It is compiled with the system C compiler on first
use (about a second) into ~/.cache/longmoe/. Without a compiler or AVX-512 BF16, or with LONGMOE_KERNELS=0,
everything falls back to the PyTorch ops and results stay within rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..sysinfo import cpu_flags

MAX_ROWS = 16  # query rows up to which the kernels beat a GEMM
SOURCE = Path(__file__).with_name("decode.c")
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable


_why_not = ""  # why the kernels are not in use, once _load has run


def status() -> str:
    """Which path decode and the bf16 loss take on this machine, and why (for `longmoe info`)."""
    lib = _load()
    if lib:
        return "AVX-512 BF16 kernels (bf16 models: decode GEMV, attention, MoE experts, RMSNorm, RoPE, loss)"
    return f"PyTorch ops ({_why_not})"


def _load() -> ctypes.CDLL | bool:
    global _lib, _why_not
    if _lib is not None:
        return _lib
    _lib = False
    if os.environ.get("LONGMOE_KERNELS", "1") == "0":
        _why_not = "LONGMOE_KERNELS=0"
        return _lib
    if not sys.platform.startswith("linux"):
        _why_not = f"the kernels are built for Linux, this is {sys.platform}"
        return _lib
    if "avx512_bf16" not in cpu_flags():
        _why_not = "this CPU has no AVX-512 BF16 instructions"
        return _lib
    source = SOURCE.read_bytes()
    flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-ffp-contract=off", "-fopenmp", "-shared",
             "-fPIC"]  # fmt: skip
    cache = Path(os.environ.get("LONGMOE_CACHE", Path.home() / ".cache" / "longmoe"))
    so = cache / f"decode-{hashlib.sha256(source + ' '.join(flags).encode()).hexdigest()[:16]}.so"
    try:
        if not so.exists():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            cc = os.environ.get("CC", "cc")
            subprocess.run(
                [cc, *flags, str(SOURCE), "-o", str(tmp), "-lm"], check=True, capture_output=True, timeout=120
            )
            os.replace(tmp, so)
        lib = ctypes.CDLL(str(so))  # links libgomp.so.1: the OpenMP runtime torch has already loaded
        lib.gemv_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_long,
                                  ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_int]  # fmt: skip
        lib.rmsnorm_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_float,
                                     ctypes.c_void_p]  # fmt: skip
        lib.rope_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]  # fmt: skip
        lib.moe_decode_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
        lib.pv_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_void_p,
                                ctypes.c_long, ctypes.c_int, ctypes.c_void_p]  # fmt: skip
        lib.decode_attn_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_void_p,
                                         ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int,
                                         ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
        lib.xent_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_void_p,
                                  ctypes.c_int, ctypes.c_void_p]  # fmt: skip
        _lib = lib
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        detail = detail.decode(errors="replace").strip().splitlines()[-1:] if detail else [str(e)]
        _why_not = f"building {SOURCE.name} failed: {detail[0][:200] if detail else e}"
        warnings.warn(f"longmoe: CPU kernels unavailable, using PyTorch ops ({_why_not})", RuntimeWarning,
                      stacklevel=3)  # fmt: skip
        _lib = False
    return _lib


def _usable(*tensors: torch.Tensor) -> bool:
    return (
        not torch.is_grad_enabled()
        and all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors)
        and bool(_load())
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; for a few rows of bf16 on CPU at inference, the streaming kernel (fp32 accumulation)."""
    K = x.shape[-1]
    rows = x.numel() // max(K, 1)
    if rows > MAX_ROWS or K % 32 or weight.stride(1) != 1 or not _usable(x, weight):
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, K).contiguous()
    N = weight.shape[0]
    if bias is None:  # rounded to bf16 inside the kernel
        out = torch.empty(rows, N, dtype=torch.bfloat16)
        _lib.gemv_bf16(x2.data_ptr(), rows, K, weight.data_ptr(), weight.stride(0), N, out.data_ptr(), N, 1)
        return out.view(*x.shape[:-1], N)
    out = torch.empty(rows, N)
    _lib.gemv_bf16(x2.data_ptr(), rows, K, weight.data_ptr(), weight.stride(0), N, out.data_ptr(), N, 0)
    return (out + bias).to(x.dtype).view(*x.shape[:-1], N)


def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [M, D] @ k[S, D]^T in fp32 (k may be a strided view of a KV pool: rows contiguous)."""
    if q.shape[0] > MAX_ROWS or q.shape[1] % 32 or k.stride(1) != 1 or not _usable(q, k):
        return F.linear(q, k).float()
    M, D = q.shape
    S = k.shape[0]
    q = q.contiguous()
    out = torch.empty(M, S)
    _lib.gemv_bf16(q.data_ptr(), M, D, k.data_ptr(), k.stride(0), S, out.data_ptr(), S, 0)
    return out


def weighted_sum(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p [M, S] fp32 @ v [S, D] (bf16, rows contiguous) -> [M, D] fp32."""
    if v.shape[1] % 64 or v.stride(1) != 1 or p.dtype != torch.float32 or not _usable(v):
        return (p.to(v.dtype) @ v).float()
    M, S = p.shape
    D = v.shape[1]
    p = p.contiguous()
    out = torch.empty(M, D)
    _lib.pv_bf16(p.data_ptr(), M, S, S, v.data_ptr(), v.stride(0), D, out.data_ptr())
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, valid: int) -> tuple | None:
    """Softmax attention of R query rows q [R, D] over keys k [S, D] and values v [S, Dv] (bf16, rows contiguous;
    the first `valid` keys count) in one call -> (out [R, Dv] fp32, lse [R] fp32); None when the kernel can't."""
    R, D = q.shape
    Dv = v.shape[1]
    if R > 64 or D % 32 or Dv % 64 or k.stride(1) != 1 or v.stride(1) != 1 or valid < 1 or not _usable(q, k, v):
        return None
    q = q.contiguous()
    out = torch.empty(R, Dv)
    lse = torch.empty(R)
    _lib.decode_attn_bf16(q.data_ptr(), R, D, D, k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), Dv, valid,
                          scale, out.data_ptr(), lse.data_ptr())  # fmt: skip
    return out, lse


def moe_decode(
    x_NH: torch.Tensor,
    weights_NK: torch.Tensor,
    experts_NK: torch.Tensor,
    gate_up_EIH: torch.Tensor,
    down_EHI: torch.Tensor,
    weight_on_input: bool,
) -> torch.Tensor | None:
    """The routed experts of a few bf16 tokens in one call: MoE._few_tokens's arithmetic and rounding, without
    its per-expert PyTorch ops. -> out [N, H] bf16, or None when the kernel can't."""
    N, H = x_NH.shape
    I = down_EHI.shape[-1]  # noqa: E741
    if (
        N > MAX_ROWS
        or H % 32
        or I % 32
        or not (gate_up_EIH.is_contiguous() and down_EHI.is_contiguous())
        or not _usable(x_NH, gate_up_EIH, down_EHI)
    ):
        return None
    # (expert, token, weight) pairs sorted by expert, then token: the order _few_tokens adds them in
    pairs = sorted(
        (e, t, w) for t, (es, ws) in enumerate(zip(experts_NK.tolist(), weights_NK.tolist())) for e, w in zip(es, ws)
    )
    P = len(pairs)
    ex = (ctypes.c_int * P)(*(p[0] for p in pairs))
    tok = (ctypes.c_int * P)(*(p[1] for p in pairs))
    w = (ctypes.c_float * P)(*(p[2] for p in pairs))  # fp32 weights round-trip exactly through Python floats
    x = x_NH.contiguous()
    out = torch.zeros_like(x)
    _lib.moe_decode_bf16(x.data_ptr(), H, I, P, tok, ex, w, int(weight_on_input), gate_up_EIH.data_ptr(),
                         down_EHI.data_ptr(), out.data_ptr())  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor | None:
    """RMSNorm of a few bf16 rows in one call (the PyTorch form costs eight ops); None when the kernel can't."""
    C = x.shape[-1]
    rows = x.numel() // max(C, 1)
    if rows > MAX_ROWS or not (_usable(x) if weight is None else _usable(x, weight)):
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    _lib.rmsnorm_bf16(x.data_ptr(), rows, C, 0 if weight is None else weight.data_ptr(), eps, out.data_ptr())
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor | None:
    """apply_rope for a few bf16 tokens in one call (x [B, T, H, D], cos/sin [B, T, 1, D/2] fp32); None when the
    kernel can't."""
    B, T, H, D = x.shape
    if (
        B * T > MAX_ROWS
        or D % 2
        or cos.dtype != torch.float32
        or sin.dtype != torch.float32
        or cos.shape != (B, T, 1, D // 2)
        or sin.shape != cos.shape
        or not _usable(x)
    ):
        return None
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    _lib.rope_bf16(x.data_ptr(), B * T, H, D, cos.data_ptr(), sin.data_ptr(), int(interleaved), out.data_ptr())
    return out


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, grad: bool) -> torch.Tensor | None:
    """Per-row cross-entropy of bf16 logits [n, V] (fp32 math) -> loss [n] fp32. With grad, the logits are
    overwritten in place with softmax - one-hot (bf16), the logit gradient. None when the kernel can't: one fused
    pass per row instead of PyTorch's convert / log-softmax / exp / subtract / convert."""
    if logits.ndim != 2 or logits.stride(1) != 1 or not _usable(logits):
        return None
    n, V = logits.shape
    t = targets.to(torch.int64).contiguous()
    loss = torch.empty(n)
    _lib.xent_bf16(logits.data_ptr(), n, V, logits.stride(0), t.data_ptr(), int(grad), loss.data_ptr())
    return loss
