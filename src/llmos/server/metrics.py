"""The engine's metrics in Prometheus' text format, read at each scrape.

Gauges and counters under `llmos_`; the latency histograms (TTFT,
inter-token, end-to-end, queue time) under vLLM's names too (`vllm:...`),
so a vLLM dashboard computes llmos's percentiles unchanged.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from llmos.engine.histograms import LatencyHistograms

_GAUGES = {
    "num_running": "Requests running in the batch",
    "num_waiting": "Requests waiting to start",
    "num_swapped": "Requests swapped out to host memory",
    "kv_blocks_used": "KV cache blocks in use",
    "kv_blocks_free": "KV cache blocks free",
    "kv_usage": "Share of KV cache blocks in use",
    "kv_utilization": "Share of allocated KV slots that held a token, averaged over steps",
    "ttft_p50_s": "Time to first token, median (s)",
    "itl_p50_s": "Inter-token latency, median (s)",
    "e2e_p50_s": "End-to-end request latency, median (s)",
    "generation_tok_per_s": "Generated tokens per second since start",
}
_COUNTERS = {
    "prefix_cache_queries": "Prompt tokens looked up in the prefix cache",
    "prefix_cache_hits": "Prompt tokens served from the prefix cache",
    "preemptions": "Sequences preempted (swap or recompute)",
    "prompt_tokens": "Prompt tokens received",
    "generation_tokens": "Tokens generated",
    "requests_finished": "Requests finished",
}


class _Snapshot:
    def __init__(self, stats: dict[str, float], histograms: dict[str, Any]) -> None:
        self.stats = stats
        self.histograms = histograms

    def collect(self):
        for name, doc in _GAUGES.items():
            yield GaugeMetricFamily(f"llmos_{name}", doc, value=self.stats.get(name, 0.0))
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"llmos_{name}", doc, value=self.stats.get(name, 0.0))
        for key, h in self.histograms.items():
            name, doc = LatencyHistograms.NAMES[key]
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, h.bounds), "+Inf"], h.counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            for prefix in ("llmos_", "vllm:"):
                yield HistogramMetricFamily(prefix + name, doc, buckets=buckets, sum_value=h.total)


def render(stats: dict[str, float], histograms: dict[str, Any] | None = None) -> tuple[bytes, str]:
    """(body, content type) of one scrape; `histograms` is LatencyHistograms.snapshot()."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats, histograms or {}))
    return generate_latest(registry), CONTENT_TYPE_LATEST
