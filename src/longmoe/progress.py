"""A progress line with rate and ETA on stderr: redrawn in place on a terminal, a line every few seconds otherwise."""

from __future__ import annotations

import sys
import time


def fmt_seconds(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class Progress:
    def __init__(self, total: int, desc: str = "", start: int = 0, every: float = 5.0, enabled: bool = True):
        self.total, self.desc, self.start, self.every = total, desc, start, every
        self.enabled = enabled
        self.t0 = time.monotonic()
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def update(self, done: float, info: str = "", count: str | None = None) -> None:
        """`done` of `total` units of work (the rate and ETA); `count` replaces "done/total" in the line, e.g. when
        the units are tokens and the line counts cells."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.tty and now - self.last < self.every and done < self.total:
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        count = count or f"{done}/{self.total}"
        line = f"{self.desc} {count} [{fmt_seconds(now - self.t0)} < {fmt_seconds(eta)}] {info}".strip()
        if self.tty:
            sys.stderr.write("\r\033[K" + line + ("\n" if done >= self.total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
