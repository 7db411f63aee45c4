"""`llmos bench replicas`: where a request runs decides what its replica has cached.

Many conversations, each with its own long system prompt, their turns
arriving interleaved after random pauses (a turn's prompt is its system
prompt, the earlier turns and their answers, and a new question), over 2 engine replicas on Ray,
routed round-robin, least-loaded and prefix-aware, one after the other on
the same pool (prefix caches and counters emptied between runs). Each
replica's KV holds 60% of all the conversations' prefixes, as a busy
replica would: a router that spreads a conversation over both replicas makes
each replica hold every prefix, and evict them; one that keeps a
conversation on the replica holding its prefix needs only its share.

Measured per router: the prefix-cache hit rate and prompt tokens served from
cache (prefill saved), read from the replicas' own engine counters;
throughput (generated tokens per second); time to first token p50/p99 as
the client sees it; requests per replica. On a CPU box the replicas share
its cores, so the hit rate and the prefill saved are the result; the
throughput comparison wants a replica per GPU.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from llmos.bench.engine import write_report
from llmos.engine import RequestOutput, SamplingParams

ROUTERS = ("round-robin", "least-loaded", "prefix")
_TOKENS = (1000, 20000)  # token ids drawn from here: plain vocabulary of any model llmos runs


@dataclass
class Workload:
    conversations: int = 12
    turns: int = 3
    system_tokens: int = 256
    question_tokens: int = 24
    answer_tokens: int = 16
    concurrency: int = 6  # turns in flight at once
    think_s: float = 0.5  # mean pause before each turn (exponential, the same under every router; 0: none)
    seed: int = 0

    @classmethod
    def quick(cls) -> Workload:
        return cls(conversations=6, turns=3, system_tokens=192, concurrency=4)

    def prefix_tokens(self) -> int:
        """What one conversation holds at its last turn (system prompt, questions and answers)."""
        return self.system_tokens + self.turns * (self.question_tokens + self.answer_tokens)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _run(pool: Any, w: Workload) -> dict[str, Any]:
    """Every conversation's turns, interleaved under a concurrency limit; client-side latencies."""
    rng = random.Random(w.seed)
    systems = [[rng.randrange(*_TOKENS) for _ in range(w.system_tokens)] for _ in range(w.conversations)]
    questions = [[[rng.randrange(*_TOKENS) for _ in range(w.question_tokens)] for _ in range(w.turns)]
                 for _ in range(w.conversations)]
    params = SamplingParams(max_tokens=w.answer_tokens, temperature=0.0, ignore_eos=True)
    gate = asyncio.Semaphore(w.concurrency)
    ttft: list[float] = []
    generated = 0

    async def conversation(c: int) -> None:
        nonlocal generated
        history, pauses = list(systems[c]), random.Random(w.seed * 1000 + c)
        for t in range(w.turns):
            prompt = history + questions[c][t]
            if w.think_s:
                await asyncio.sleep(pauses.expovariate(1 / w.think_s))
            async with gate:
                start = time.perf_counter()
                first: float | None = None
                last: RequestOutput | None = None
                async for out in pool.generate(prompt, params, f"c{c}-t{t}", session=f"conversation-{c}"):
                    first = first if first is not None else time.perf_counter()
                    last = out
            if first is None or last is None:
                raise RuntimeError(f"request c{c}-t{t} ended without any output")
            ttft.append(first - start)
            answer = last.outputs[0].token_ids
            generated += len(answer)
            history = prompt + list(answer)

    start = time.perf_counter()
    await asyncio.gather(*(conversation(c) for c in range(w.conversations)))
    wall = time.perf_counter() - start
    stats = await pool.stats()
    hits, queries = stats["prefix_cache_hits"], stats["prefix_cache_queries"]
    return {"wall_s": wall, "requests": w.conversations * w.turns, "generated_tokens": generated,
            "throughput_tok_s": generated / wall, "ttft_p50_s": _percentile(ttft, 0.5),
            "ttft_p99_s": _percentile(ttft, 0.99), "prompt_tokens": queries, "prefill_saved_tokens": hits,
            "prefill_computed_tokens": queries - hits, "hit_rate": hits / queries if queries else 0.0,
            "per_replica_requests": [r.get("requests_finished", 0) for r in stats["replicas"]],
            "per_replica_hit_rate": [r.get("prefix_cache_hit_rate", 0.0) for r in stats["replicas"]]}


def run_replicas_bench(console: Console, quick: bool = False, model: str = "smollm2-135m-instruct",
                       replicas: int = 2, json_path: str | None = None, ray_address: str | None = None,
                       kv_share: float = 0.6, think_s: float | None = None) -> dict[str, Any]:
    """Run the workload under each router on one pool of `replicas`; `kv_share`: the part of all the
    conversations' prefixes one replica's KV holds."""
    import torch

    from llmos.engine import EngineConfig
    from llmos.engine.kv_cache import KVCache
    from llmos.models.loader import load_model
    from llmos.replicas import ReplicaPool

    w = Workload.quick() if quick else Workload()
    if think_s is not None:
        w.think_s = think_s
    engine = EngineConfig()
    block_size = engine.block_size
    per_token = KVCache.block_bytes(load_model(model).config, block_size, engine.torch_dtype) // block_size
    kv_tokens = int(kv_share * w.conversations * w.prefix_tokens())
    with console.status(f"starting {replicas} replicas on Ray ..."):
        pool = ReplicaPool(model, replicas, ray_address=ray_address, kv_budget=kv_tokens * per_token)
    runs: dict[str, dict[str, Any]] = {}
    try:
        for router in ROUTERS:
            with console.status(f"{router}: {w.conversations} conversations x {w.turns} turns ..."):
                asyncio.run(_reset_and_run(pool, router, w, runs))
    finally:
        pool.shutdown()
    table = Table(title=f"llmos bench replicas: {w.conversations} conversations x {w.turns} turns, "
                        f"{w.system_tokens}-token system prompts, {replicas} replicas")
    for col in ("router", "hit rate", "prefill saved", "prefill computed", "tok/s", "TTFT p50 s",
                "TTFT p99 s", "requests per replica"):
        table.add_column(col)
    for name, r in runs.items():
        table.add_row(name, f"{r['hit_rate']:.1%}", f"{r['prefill_saved_tokens']:,}",
                      f"{r['prefill_computed_tokens']:,}", f"{r['throughput_tok_s']:.1f}",
                      f"{r['ttft_p50_s']:.2f}", f"{r['ttft_p99_s']:.2f}",
                      "/".join(str(n) for n in r["per_replica_requests"]))
    console.print(table)
    p, rr = runs["prefix"], runs["round-robin"]
    ratios = {"hit_rate": p["hit_rate"] / rr["hit_rate"] if rr["hit_rate"] else None,
              "prefill_computed": p["prefill_computed_tokens"] / rr["prefill_computed_tokens"],
              "throughput": p["throughput_tok_s"] / rr["throughput_tok_s"],
              "ttft_p50": p["ttft_p50_s"] / rr["ttft_p50_s"], "ttft_p99": p["ttft_p99_s"] / rr["ttft_p99_s"]}
    console.print("prefix vs round-robin: " + ", ".join(
        f"{k} x{v:.2f}" for k, v in ratios.items() if v is not None))
    report = {"bench": "replicas", "model": model, "replicas": replicas, "workload": w.__dict__,
              "kv_tokens_per_replica": kv_tokens, "device": "cuda" if torch.cuda.is_available() else "cpu",
              "runs": runs, "prefix_vs_round_robin": ratios}
    write_report(report, json_path, "bench-results/replicas.json", console)
    return report


async def _reset_and_run(pool: Any, router: str, w: Workload, runs: dict[str, dict[str, Any]]) -> None:
    await pool.reset(router)
    runs[router] = await _run(pool, w)
