"""Latency histograms of the engine, for Prometheus: percentiles a dashboard can compute.

Each is cumulative since the engine started (Prometheus histograms never
reset), with vLLM's bucket bounds, so a vLLM dashboard's queries work:
time to first token, inter-token latency, end-to-end latency and queue time.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
         40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
        80.0)
_REQUEST = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
            480.0, 960.0, 1920.0, 7680.0)


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative); the last is +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total, self.count)


@dataclass
class LatencyHistograms:
    """name (vLLM's, without its prefix) -> histogram."""

    ttft: Histogram = field(default_factory=lambda: Histogram(_TTFT))
    itl: Histogram = field(default_factory=lambda: Histogram(_ITL))
    e2e: Histogram = field(default_factory=lambda: Histogram(_REQUEST))
    queue: Histogram = field(default_factory=lambda: Histogram(_REQUEST))

    NAMES = {"ttft": ("time_to_first_token_seconds", "Time to first token (s)"),
             "itl": ("inter_token_latency_seconds", "Time between two tokens of a request (s)"),
             "e2e": ("e2e_request_latency_seconds", "Request latency from arrival to its last token (s)"),
             "queue": ("request_queue_time_seconds", "Time a request waited before its first step (s)")}

    def snapshot(self) -> dict[str, Histogram]:
        return {key: getattr(self, key).copy() for key in self.NAMES}
