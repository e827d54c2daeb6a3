"""Prometheus metrics at /metrics, in a registry of the app's own (several apps may live in one process)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from .runtime import Job

# Time to first token spans a short prompt (milliseconds) to a million-token prefill (tens of minutes).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("longmoe_requests", "HTTP requests by route and status", ["route", "method", "status"],
                                registry=r)  # fmt: skip
        self.prompt_tokens = Counter("longmoe_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("longmoe_generated_tokens", "tokens generated", registry=r)
        self.cached_tokens = Counter(
            "longmoe_cached_prompt_tokens", "prompt tokens whose KV came from the prefix cache", registry=r
        )
        self.ttft = Histogram("longmoe_time_to_first_token_seconds", "from submission to the first generated token",
                              buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.tpot = Histogram("longmoe_time_per_output_token_seconds", "mean time between tokens after the first",
                              buckets=TPOT_BUCKETS, registry=r)  # fmt: skip
        self.in_flight = Gauge("longmoe_requests_in_flight", "sequences admitted and not yet finished", registry=r)
        self.queue_depth = Gauge("longmoe_queue_depth", "sequences waiting for KV blocks to start", registry=r)
        self.kv_in_use = Gauge("longmoe_kv_blocks_in_use", "KV cache blocks referenced by requests or pins", registry=r)
        self.kv_total = Gauge("longmoe_kv_blocks_total", "KV cache blocks in all pools", registry=r)
        self.pinned = Gauge("longmoe_pinned_caches", "cached contents whose KV is pinned in the engine", registry=r)

    def bind(self, in_flight: Callable[[], int], queue_depth: Callable[[], int],
             kv_blocks: Callable[[], tuple[int, int]], pinned: Callable[[], int]) -> None:  # fmt: skip
        """Gauges read at scrape time from the live objects."""
        self.in_flight.set_function(in_flight)
        self.queue_depth.set_function(queue_depth)
        self.kv_in_use.set_function(lambda: kv_blocks()[0])
        self.kv_total.set_function(lambda: kv_blocks()[1])
        self.pinned.set_function(pinned)

    def observe(self, job: Job) -> None:
        seq = job.seqs[0]
        self.prompt_tokens.inc(len(seq.prompt) * len(job.seqs))
        self.cached_tokens.inc(sum(s.num_cached for s in job.seqs))
        generated = sum(len(s.output) for s in job.seqs)
        self.generated_tokens.inc(generated)
        if job.first_token is not None:
            self.ttft.observe(job.first_token - job.start)
            n = max(len(s.output) for s in job.seqs)
            if n > 1:
                self.tpot.observe((time.perf_counter() - job.first_token) / (n - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
