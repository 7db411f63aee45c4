"""Engine metrics: what the KV memory and the batch are doing, and how fast."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


def _percentile(values: deque[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class EngineMetrics:
    """Counters since start, and the latest gauges; a snapshot is `as_dict()`."""

    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    num_paused: int = 0
    kv_blocks_total: int = 0
    kv_blocks_capacity: int = 0
    kv_blocks_used: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: int = 0
    steps: int = 0
    preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # KV token-state, summed over steps: slots allocated and slots holding a token.
    kv_slots_allocated: int = 0
    kv_slots_filled: int = 0
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=10000))
    itl: deque[float] = field(default_factory=lambda: deque(maxlen=100000))
    e2e: deque[float] = field(default_factory=lambda: deque(maxlen=10000))
    started: float = field(default_factory=time.perf_counter)
    # Seconds a step spends per token it computes, measured on prefill-sized steps (an EWMA;
    # 0 until one ran): what recomputing a dropped context costs on this machine.
    prefill_s_per_token: float = 0.0

    def observe_compute(self, tokens: int, seconds: float, min_tokens: int = 32) -> None:
        """A step computed `tokens` tokens in `seconds`; steps under `min_tokens` are decode steps,
        whose time is mostly per-step overhead and says little about a prefill's."""
        if tokens < min_tokens or seconds <= 0:
            return
        rate = seconds / tokens
        old = self.prefill_s_per_token
        self.prefill_s_per_token = rate if old == 0 else 0.8 * old + 0.2 * rate

    @property
    def kv_utilization(self) -> float:
        """Share of allocated KV slots that held a token, averaged over steps."""
        return self.kv_slots_filled / self.kv_slots_allocated if self.kv_slots_allocated else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def as_dict(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.started
        return {
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "num_swapped": self.num_swapped,
            "num_paused": self.num_paused,
            "kv_blocks_total": self.kv_blocks_total,
            "kv_blocks_capacity": self.kv_blocks_capacity,
            "kv_blocks_used": self.kv_blocks_used,
            "kv_blocks_free": self.kv_blocks_total - self.kv_blocks_used,
            "kv_usage": self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0,
            "kv_utilization": self.kv_utilization,
            "kv_waste": 1.0 - self.kv_utilization if self.kv_slots_allocated else 0.0,
            "prefix_cache_queries": self.prefix_cache_queries,
            "prefix_cache_hits": self.prefix_cache_hits,
            "prefix_cache_hit_rate": self.prefix_cache_hit_rate,
            "preemptions": self.preemptions,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "requests_finished": self.requests_finished,
            "steps": self.steps,
            "ttft_p50_s": _percentile(self.ttft, 0.5),
            "ttft_p99_s": _percentile(self.ttft, 0.99),
            "itl_p50_s": _percentile(self.itl, 0.5),
            "itl_p99_s": _percentile(self.itl, 0.99),
            "e2e_p50_s": _percentile(self.e2e, 0.5),
            "generation_tok_per_s": self.generation_tokens / elapsed if elapsed > 0 else 0.0,
            "prefill_s_per_token": self.prefill_s_per_token,
        }
