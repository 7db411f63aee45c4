"""`llmos bench preemption` and `llmos bench prefix`: paged memory under pressure and sharing.

preemption: workload C with a KV budget that holds a quarter of its static
reservation, by recompute and by swap; every request must produce exactly
the tokens it produces with an unlimited budget (greedy).
prefix: requests sharing a 256-token prefix; the share of shareable prompt
tokens the prefix cache served, and the speed-up against no prefix cache.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from llmos.bench.engine import run_llmos, write_report
from llmos.bench.workloads import static_reservation_tokens, workload_c, workload_shared_prefix
from llmos.engine.kv_cache import KVCache
from llmos.models.loader import load_model


def run_preemption_bench(console: Console, quick: bool = False, model: str = "smollm2-135m-instruct",
                         json_path: str | None = None) -> dict[str, Any]:
    loaded = load_model(model)
    requests = workload_c(quick)
    block_bytes = KVCache.block_bytes(loaded.config, 16, loaded.model.embed_tokens.weight.dtype)
    quarter_tokens = static_reservation_tokens(requests) // 4
    budget = quarter_tokens // 16 * block_bytes
    runs = {}
    for name, kwargs in [("unlimited", {}), ("recompute", {"kv_budget": budget, "preemption_mode":
                         "recompute"}), ("swap", {"kv_budget": budget, "preemption_mode": "swap",
                                                  "swap_space": 4 * budget})]:
        with console.status(f"workload C, {name} ..."):
            runs[name] = run_llmos(loaded, requests, **kwargs)
    table = Table(title=f"llmos bench preemption: workload C{' (quick)' if quick else ''}, "
                        f"KV budget {quarter_tokens} tokens (a quarter of its static reservation)")
    for col in ("mode", "requested tok/s", "preemptions", "peak running", "identical to unlimited"):
        table.add_column(col)
    reference = runs["unlimited"].outputs
    report: dict[str, Any] = {"bench": "preemption", "quick": quick, "budget_tokens": quarter_tokens,
                              "runs": {}}
    for name, r in runs.items():
        same = sum(a == b for a, b in zip(r.outputs, reference, strict=True))
        table.add_row(name, f"{r.throughput:.1f}", str(r.extra["preemptions"]),
                      str(r.extra["peak_running"]), f"{same}/{len(requests)}")
        report["runs"][name] = {"throughput": r.throughput, "wall_s": r.wall_s, "identical": same,
                                "requests": len(requests), **r.extra}
    console.print(table)
    write_report(report, json_path, f"bench-results/preemption{'-quick' if quick else ''}.json", console)
    return report


def run_prefix_bench(console: Console, model: str = "smollm2-135m-instruct",
                     json_path: str | None = None) -> dict[str, Any]:
    loaded = load_model(model)
    requests = workload_shared_prefix(n=16, prefix_len=256)
    runs = {}
    for name, on in (("prefix cache", True), ("no prefix cache", False)):
        with console.status(f"{name} ..."):
            runs[name] = run_llmos(loaded, requests, enable_prefix_caching=on, max_num_batched_tokens=2048)
    shareable = (len(requests) - 1) * 256
    hits = runs["prefix cache"].extra["prefix_cache_hit_rate"] * sum(len(r.prompt_token_ids)
                                                                     for r in requests)
    table = Table(title="llmos bench prefix: 16 requests sharing a 256-token prefix")
    for col in ("mode", "requested tok/s", "wall s", "TTFT p50 s"):
        table.add_column(col)
    for name, r in runs.items():
        table.add_row(name, f"{r.throughput:.1f}", f"{r.wall_s:.2f}", f"{r.extra['ttft_p50_s']:.2f}")
    console.print(table)
    console.print(f"shareable prompt tokens served from the cache: {hits:.0f}/{shareable} "
                  f"({hits / shareable:.1%})")
    report = {"bench": "prefix", "shareable_tokens": shareable, "served_from_cache": hits,
              "served_share": hits / shareable,
              "runs": {k: {"throughput": v.throughput, "wall_s": v.wall_s, **v.extra}
                       for k, v in runs.items()}}
    write_report(report, json_path, "bench-results/prefix.json", console)
    return report
