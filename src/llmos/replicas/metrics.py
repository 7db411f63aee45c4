"""Each replica's metrics in Prometheus' text format, labelled replica="i".

The pool's totals go out under the engine's own names (server/metrics.py);
these families add one sample per replica, so a dashboard sees which replica
is queued, full or restarting.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_GAUGES = {
    "up": "1 while the replica serves, 0 while it is lost or restarting",
    "in_flight": "Requests the pool has sent the replica and not seen end",
    "num_running": "Requests running in the replica's batch",
    "num_waiting": "Requests waiting in the replica's queue",
    "kv_blocks_used": "The replica's KV cache blocks in use",
    "kv_usage": "Share of the replica's KV cache blocks in use",
    "cached_blocks_known": "Prefix blocks the router believes the replica holds",
}
_COUNTERS = {
    "routed": "Requests the router sent to the replica",
    "served": "Requests the replica finished for the pool",
    "restarts": "Times the replica came back after dying",
    "prefix_cache_queries": "Prompt tokens the replica looked up in its prefix cache",
    "prefix_cache_hits": "Prompt tokens the replica served from its prefix cache",
}


class _Replicas:
    def __init__(self, views: list[dict[str, Any]]) -> None:
        self.views = views

    def collect(self):
        for names, kind in ((_GAUGES, GaugeMetricFamily), (_COUNTERS, CounterMetricFamily)):
            for name, doc in names.items():
                family = kind(f"llmos_replica_{name}", doc, labels=["replica"])
                for v in self.views:
                    family.add_metric([str(v["replica"])], float(v.get(name, 0)))
                yield family


def render(views: list[dict[str, Any]]) -> bytes:
    """The text of every replica's samples; `views` as `ReplicaPool.stats()["replicas"]`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Replicas(views))
    return generate_latest(registry)
