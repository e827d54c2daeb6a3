"""What this machine can hold: used to refuse work that cannot fit before it starts, with the numbers."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

GiB = 2**30


def available_memory(device: str = "cpu") -> int:
    """Bytes that can still be allocated: MemAvailable, capped by a cgroup limit; free memory on a CUDA device."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:  # cgroup v2: a container may be limited below the host's free memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def fmt_gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n < 100 * GiB else f"{n / GiB:,.0f} GiB"


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_computes(dtype_name: str) -> bool:
    """Whether this CPU has native instructions for matmuls in bfloat16 / float16 (else they run converted, slowly
    and for nothing: fp32 is then the better choice)."""
    flags = cpu_flags()
    if dtype_name == "bfloat16":
        return bool({"avx512_bf16", "amx_bf16"} & flags) or (platform.machine() == "aarch64" and "bf16" in flags)
    if dtype_name == "float16":
        return bool({"avx512_fp16", "amx_fp16"} & flags) or (platform.machine() == "aarch64" and "fphp" in flags)
    return True


def cpu_name() -> str:
    """The CPU model and its matmul features, e.g. 'AMD EPYC (AVX-512 BF16, no AMX)' (for benchmarks and info)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    feats = ["AMX" if "amx_bf16" in flags else "no AMX", "AVX-512 BF16" if "avx512_bf16" in flags else
             "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"]  # fmt: skip
    return f"{name} ({', '.join(feats)}, {os.cpu_count()} threads)"
