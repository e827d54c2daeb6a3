"""What this machine can hold: used to refuse work that cannot fit before it starts, with the numbers."""

from __future__ import annotations

import os
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
