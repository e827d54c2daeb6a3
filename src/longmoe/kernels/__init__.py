"""CPU kernels for bf16 inference: decoding, where a few query rows meet large weights or KV caches; the element-wise
passes of prefill; and the training loss's softmax over a large vocabulary.

- `decode.c` (AVX-512 BF16 required): oneDNN's bf16 GEMV reaches ~11-15 GB/s on this class of CPU from cold
  memory; the kernels stream the same bytes at 30-60 GB/s with AVX-512 BF16 dot products and fp32 accumulation.
- `prefill.c` (portable C, built with -march=native: AVX2, AVX-512 or NEON as the CPU has): RMSNorm, RoPE, SwiGLU's
  silu(gate) * up and the MoE combine, each one pass over the rows instead of several PyTorch ops and temporaries.
Both are compiled with the system C compiler on first use (about a second each) into ~/.cache/longmoe/. Without a
compiler (or the CPU feature), or with LONGMOE_KERNELS=0, everything falls back to the PyTorch ops, and results
stay within rounding (tests compare every kernel with the PyTorch form it replaces).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..sysinfo import cpu_flags

MAX_ROWS = 16  # query rows up to which the kernels beat a GEMM
SOURCE = Path(__file__).with_name("decode.c")
PREFILL_SOURCE = Path(__file__).with_name("prefill.c")
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable
_prefill_lib: ctypes.CDLL | None | bool = None
_prefill_why_not = ""


_why_not = ""  # why the kernels are not in use, once _load has run


def status() -> str:
    """Which path decode and the bf16 loss take on this machine, and why (for `longmoe info`)."""
    lib = _load()
    flash = "PyTorch's flash attention (AMX)" if AMX else "flash attention"
    decode = (f"AVX-512 BF16 kernels (prefill: {flash}; decode: one call per layer, GEMV, attention, MoE experts; "
              "loss)" if lib else f"PyTorch ops ({_why_not})")  # fmt: skip
    rows = "C kernels for this CPU (RMSNorm, RoPE, SwiGLU, MoE combine)" if _load_prefill() else (
        f"PyTorch ops ({_prefill_why_not})")  # fmt: skip
    return f"bf16: {decode}; element-wise passes: {rows}"


def _build(source: Path, flags: list[str], *includes: Path) -> ctypes.CDLL:
    """Compile `source` once per content (its own and that of the files it includes), flags and CPU into
    ~/.cache/longmoe/ (atomically) and load it."""
    key = b"".join(p.read_bytes() for p in (source, *includes))
    key += " ".join(flags).encode() + " ".join(sorted(cpu_flags())).encode()
    cache = Path(os.environ.get("LONGMOE_CACHE", Path.home() / ".cache" / "longmoe"))
    so = cache / f"{source.stem}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if not so.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, *flags, str(source), "-o", str(tmp), "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp, so)
    return ctypes.CDLL(str(so))  # links libgomp.so.1: the OpenMP runtime torch has already loaded


def _failure(source: Path, e: Exception) -> str:
    detail = getattr(e, "stderr", b"") or b""
    detail = detail.decode(errors="replace").strip().splitlines()[-1:] if detail else [str(e)]
    why = f"building {source.name} failed: {detail[0][:200] if detail else e}"
    warnings.warn(f"longmoe: CPU kernels unavailable, using PyTorch ops ({why})", RuntimeWarning, stacklevel=4)
    return why


def _unavailable(need_avx512_bf16: bool) -> str:
    """Why a kernel library cannot be built or used here ("" when it can)."""
    if os.environ.get("LONGMOE_KERNELS", "1") == "0":
        return "LONGMOE_KERNELS=0"
    if not sys.platform.startswith("linux"):
        return f"the kernels are built for Linux, this is {sys.platform}"
    if need_avx512_bf16 and "avx512_bf16" not in cpu_flags():
        return "this CPU has no AVX-512 BF16 instructions"
    return ""


def _load() -> ctypes.CDLL | bool:
    global _lib, _why_not
    if _lib is not None:
        return _lib
    _lib = False
    if _why_not := _unavailable(need_avx512_bf16=True):
        return _lib
    flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-ffp-contract=off", "-fopenmp", "-shared",
             "-fPIC"]  # fmt: skip
    try:
        lib = _build(SOURCE, flags, PREFILL_SOURCE)  # decode.c includes prefill.c
        lib.gemv_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_long,
                                  ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_int]  # fmt: skip
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
        P, L, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        lib.flash_attn_bf16.argtypes = [P, I, I, I, L, L, P, P, I, I, I, L, L, L, L, I, I, ctypes.c_float, P, L, L, P]
        F_ = ctypes.c_float
        lib.decode_layer_bf16.argtypes = [P, I, F_, P, P, P, P, P, I, I, I, P, P, I, P, P, L, L, P, I, F_, P, P, I, I,
                                          I, F_, P, P, I]  # fmt: skip
        _lib = lib
    except (OSError, subprocess.SubprocessError) as e:
        _why_not = _failure(SOURCE, e)
    return _lib


def _load_prefill() -> ctypes.CDLL | bool:
    """prefill.c: portable C for the element-wise passes of many rows, built for this CPU (-march=native)."""
    global _prefill_lib, _prefill_why_not
    if _prefill_lib is not None:
        return _prefill_lib
    _prefill_lib = False
    if _prefill_why_not := _unavailable(need_avx512_bf16=False):
        return _prefill_lib
    try:
        lib = _build(PREFILL_SOURCE, ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"])
        P, L, I, F_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
        lib.rmsnorm_rows.argtypes = [P, L, I, L, P, F_, P]
        lib.rope_rows.argtypes = [P, L, I, I, L, P, P, I, P]
        lib.silu_mul_rows.argtypes = [P, P, L, L, I, P]
        lib.moe_combine_rows.argtypes = [P, L, I, I, P, P, P]
        _prefill_lib = lib
    except (OSError, subprocess.SubprocessError) as e:
        _prefill_why_not = _failure(PREFILL_SOURCE, e)
    return _prefill_lib


def _usable(*tensors: torch.Tensor, lib: Callable[[], ctypes.CDLL | bool] = _load) -> bool:
    """Inference (no autograd) on CPU bf16 tensors, with the kernel library `lib` loads built and loaded."""
    return not torch.is_grad_enabled() and all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors) \
        and bool(lib())  # fmt: skip


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


FLASH_SPAN = 16384  # keys per flash_attention call: bounds the packed copy of K and V it makes
AMX = "amx_bf16" in cpu_flags() and os.environ.get("LONGMOE_FLASH", "") != "1"  # LONGMOE_FLASH=1: ours anyway


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_offset: int, window: int = 0
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Causal attention of many bf16 query rows (prefill) in one fused pass, with AVX-512 BF16 dot products:
    q [B, H, Tq, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] (any head/token strides); query i sits at key index
    i + q_offset and sees keys j <= i + q_offset (and j > i + q_offset - window with a window).
    -> (out [B, H, Tq, Dv] bf16, laid out as [B, Tq, H, Dv] so that o_proj reads it without a copy; lse [B, H, Tq]
    fp32), or None when the kernel can't. Keys beyond FLASH_SPAN go in spans merged through their lse."""
    B, H, Tq, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    if (
        Tq == 0
        or AMX  # oneDNN's AMX tiles in PyTorch's flash kernel (~550-690 GFLOP/s) beat AVX-512 dot products there
        or D % 32
        or Dv % 64
        or H % Hkv
        or v.shape[2] != S
        or min(q.stride(-1), k.stride(-1), v.stride(-1)) != 1
        or not _usable(q, k, v)
    ):
        return None
    if S > FLASH_SPAN:
        from ..model.attention import merge

        result = None
        for a in range(0, S, FLASH_SPAN):
            part = flash_attention(q, k[:, :, a : a + FLASH_SPAN], v[:, :, a : a + FLASH_SPAN], scale, q_offset - a,
                                   window)  # fmt: skip
            result = part if result is None else merge(result, part)
        return result
    out = torch.empty(B, Tq, H, Dv, dtype=torch.bfloat16).transpose(1, 2)
    lse = torch.empty(B, H, Tq)
    for b in range(B):
        _lib.flash_attn_bf16(q[b].data_ptr(), H, Tq, D, q.stride(1), q.stride(2), k[b].data_ptr(), v[b].data_ptr(),
                             Hkv, S, Dv, k.stride(1), k.stride(2), v.stride(1), v.stride(2), q_offset, window, scale,
                             out[b].data_ptr(), out.stride(1), out.stride(2), lse[b].data_ptr())  # fmt: skip
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
    """RMSNorm of bf16 rows in one pass (the PyTorch form costs eight ops and an fp32 copy); None when the kernel
    can't."""
    C = x.shape[-1]
    if C == 0 or not (_usable(x, lib=_load_prefill) if weight is None else _usable(x, weight, lib=_load_prefill)):
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    w = 0 if weight is None else weight.contiguous().data_ptr()
    _prefill_lib.rmsnorm_rows(x.data_ptr(), x.numel() // C, C, C, w, eps, out.data_ptr())
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor | None:
    """apply_rope in one pass (x [B, T, H, D] bf16, cos/sin [B, T, 1, D/2] fp32); None when the kernel can't."""
    B, T, H, D = x.shape
    if (
        D % 2
        or cos.dtype != torch.float32
        or sin.dtype != torch.float32
        or cos.shape != (B, T, 1, D // 2)
        or sin.shape != cos.shape
        or not _usable(x, lib=_load_prefill)
    ):
        return None
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    _prefill_lib.rope_rows(x.data_ptr(), B * T, H, D, H * D, cos.data_ptr(), sin.data_ptr(), int(interleaved),
                           out.data_ptr())  # fmt: skip
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """F.silu(gate) * up for bf16 [M, I] rows sharing one row stride (e.g. the halves of a gate | up projection),
    in one pass with the same two roundings; None when the kernel can't."""
    shape = gate.shape
    if gate.ndim != 2 and gate.shape == up.shape:  # [B, T, I] -> rows (a view for projections' outputs)
        gate, up = gate.reshape(-1, shape[-1]), up.reshape(-1, shape[-1])
    if (
        gate.ndim != 2
        or gate.shape != up.shape
        or gate.stride() != up.stride()
        or gate.stride(1) != 1
        or not _usable(gate, up, lib=_load_prefill)
    ):
        return None
    M, I = gate.shape  # noqa: E741
    out = torch.empty(M, I, dtype=torch.bfloat16)
    _prefill_lib.silu_mul_rows(gate.data_ptr(), up.data_ptr(), gate.stride(0), M, I, out.data_ptr())
    return out.view(shape)


def moe_combine(
    y_MH: torch.Tensor, order_M: torch.Tensor, weights_NK: torch.Tensor, weighted: bool
) -> torch.Tensor | None:
    """MoE combine: out[n] = sum over token n's K slots of y[pos] (first weighted by weights_NK when `weighted`),
    added in the order index_add_ adds them, rounding where MoE._dispatch rounds. y_MH holds the N*K expert outputs
    sorted by `order_M` (the permutation of flattened (token, slot) pairs). -> out [N, H] bf16, or None."""
    M, H = y_MH.shape
    if weights_NK.dtype != torch.float32 or weights_NK.shape[1] > 16 or not _usable(y_MH, lib=_load_prefill):
        return None
    N, K = weights_NK.shape
    pos_M = torch.empty_like(order_M).scatter_(0, order_M, torch.arange(M))  # pair -> its row in y_MH
    y, w = y_MH.contiguous(), weights_NK.contiguous()
    out = torch.empty(N, H, dtype=torch.bfloat16)
    _prefill_lib.moe_combine_rows(y.data_ptr(), N, K, H, pos_M.data_ptr(), w.data_ptr() if weighted else 0,
                                  out.data_ptr())  # fmt: skip
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
