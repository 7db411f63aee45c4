"""The engine's metrics in Prometheus' text format, read at each scrape.

Gauges and counters under `llmos_`; the latency histograms (TTFT,
inter-token, end-to-end, queue time) under vLLM's names too (`vllm:...`),
so a vLLM dashboard computes llmos's percentiles unchanged. With a kernel,
KV retention across tool calls (contexts and blocks retained, decisions) and
each live process as a program: prompt tokens reused vs recomputed, seconds
waiting for the engine vs in tools, retention decisions by action (labelled
pid, name, action).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
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
_RETENTION_GAUGES = {
    "kv_retained_contexts": "Contexts whose KV is retained across a tool call now",
    "kv_retained_blocks": "Device KV blocks pinned for contexts retained across tool calls",
}
_RETENTION_COUNTERS = {  # the engine's RetentionStats, as kv_retention_<name>
    "captured": "Ended calls whose context was retained for the next call",
    "kept": "Retention decisions: keep pinned for a time-to-live",
    "swapped": "Retention decisions: swap to host memory",
    "released": "Retention decisions: release to the prefix cache",
    "expired": "Retained contexts whose time-to-live ended",
    "reclaimed": "Retained contexts given up early because memory was needed",
    "swapped_in_blocks": "KV blocks of retained contexts swapped back in",
    "reused_tokens": "Prompt tokens found in retained contexts",
}
_PROGRAM = {  # a process's program stat -> (metric name under llmos_process_, help)
    "prompt_tokens_reused": ("prompt_tokens_reused", "Prompt tokens of the process found in KV"),
    "prompt_tokens_computed": ("prompt_tokens_computed", "Prompt tokens of the process computed"),
    "llm_s": ("llm_seconds", "Seconds the process waited for the engine (queued or running)"),
    "tool_s": ("tool_seconds", "Seconds the process spent in tool calls"),
}


class _Snapshot:
    def __init__(self, stats: dict[str, float], histograms: dict[str, Any],
                 programs: list[dict[str, Any]] | None) -> None:
        self.stats = stats
        self.histograms = histograms
        self.programs = programs

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
        if self.programs is not None:
            yield from self._programs(self.programs)

    def _programs(self, programs: list[dict[str, Any]]) -> Iterator[Metric]:
        for name, doc in _RETENTION_GAUGES.items():
            yield GaugeMetricFamily(f"llmos_{name}", doc, value=self.stats.get(name, 0))
        for name, doc in _RETENTION_COUNTERS.items():
            yield CounterMetricFamily(f"llmos_kv_retention_{name}", doc,
                                      value=self.stats.get(f"kv_retention_{name}", 0))
        for key, (name, doc) in _PROGRAM.items():
            metric = CounterMetricFamily(f"llmos_process_{name}", doc, labels=["pid", "name"])
            for p in programs:
                metric.add_metric([str(p["pid"]), p["name"]], p[key])
            yield metric
        decisions = CounterMetricFamily("llmos_process_kv_retention_decisions",
                                        "KV retention decisions taken for the process, by action",
                                        labels=["pid", "name", "action"])
        for p in programs:
            for action, n in sorted(p["retention"].items()):
                decisions.add_metric([str(p["pid"]), p["name"], action], n)
        yield decisions


def render(stats: dict[str, float], histograms: dict[str, Any] | None = None,
           programs: list[dict[str, Any]] | None = None) -> tuple[bytes, str]:
    """(body, content type) of one scrape; `histograms` is LatencyHistograms.snapshot(); `programs`
    the kernel's per-process program stats (`Kernel.stats()["programs"]`), with the retention
    counters taken from `stats` (EngineBackend.stats())."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats, histograms or {}, programs))
    return generate_latest(registry), CONTENT_TYPE_LATEST
