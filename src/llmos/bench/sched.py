"""`llmos bench sched`: the agent scheduler's policies on one mixed workload.

Interactive agents (short prompts, short answers, one request due every half
second) share the engine with batch agents (long prompts, long answers, all
at t=0); the engine runs at most `max_running` calls at once, so the policy
decides who waits. Each policy runs the same work on the same engine
`repeats` times; the runs are interleaved (round r starts the policy order at
its r-th policy), so no policy always runs first or last on a shared machine
(prefix cache emptied between runs). Reported per policy: throughput (mean
and the range over repeats), interactive latency from the moment a request
was due to its last token (an agent still waiting for its previous answer
is late, and that counts), pooled over the repeats: p50, p90 and the
maximum, with the number of samples (no p99 is claimed from fewer than 100)
and the range of each run's own p50 and p90,
Jain's fairness index of tokens per weight over the batch agents while all
of them are still busy, and for sjf the length predictor's mean absolute
error.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from llmos.kernel import POLICIES, EngineBackend, Kernel, Syscalls

_TOPICS = ["volcanoes", "the printing press", "coral reefs", "jazz", "the Roman roads", "honeybees",
           "glaciers", "the telescope", "silk", "tides", "lighthouses", "paper money", "owls", "deserts",
           "railways", "comets"]
_QUESTIONS = ["What is 2 + 2?", "Name a primary color.", "What is the capital of Spain?", "Say hello.",
              "What day comes after Monday?", "Name a fruit.", "How many legs has a cat?", "What is ice?"]


@dataclass
class SchedWorkload:
    interactive: int = 4
    batch: int = 12
    interactive_requests: int = 32  # in all, one every `interval` seconds, dealt round robin
    interval: float = 0.5
    interactive_tokens: int = 32
    batch_tokens: int = 256
    batch_notes: int = 12  # sentences of context in each batch prompt (its length)
    max_running: int = 8


QUICK = SchedWorkload(interactive=2, batch=4, interactive_requests=4, interval=0.3, interactive_tokens=8,
                      batch_tokens=32, batch_notes=3, max_running=2)


def _batch_prompt(i: int, notes: int) -> str:
    topic = _TOPICS[i % len(_TOPICS)]
    context = " ".join(f"Note {k + 1}: {topic} have been studied for a long time, and observation {k + 1} "
                       f"adds a new detail about {topic}." for k in range(notes))
    return f"{context}\nUsing these notes, write a long, detailed essay about {topic}."


async def _batch_agent(sys: Syscalls, prompt: str, max_tokens: int) -> int:
    reply = await sys.llm_chat([{"role": "user", "content": prompt}], max_tokens=max_tokens)
    return reply.completion_tokens


async def _interactive_agent(sys: Syscalls, questions: list[str], arrivals: list[float], start: float,
                             max_tokens: int) -> list[tuple[float, int]]:
    """An agent is sequential: a request is sent at its due time or when the previous answer
    came, whichever is later; its latency runs from when it was due to the last token."""
    done = []
    for question, at in zip(questions, arrivals, strict=True):
        delay = at - (time.perf_counter() - start)
        if delay > 0:
            await sys.sleep(delay)
        reply = await sys.llm_chat([{"role": "user", "content": question}], max_tokens=max_tokens)
        done.append((time.perf_counter() - (start + at), reply.completion_tokens))
    return done


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one has everything."""
    square = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * square) if square else 1.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


async def run_policy(backend: EngineBackend, policy: str, w: SchedWorkload, home: Any) -> dict[str, Any]:
    """One run of the workload under `policy`; the kernel is booted and shut down inside."""
    kernel = Kernel(backend, home=home, policy=policy, max_running=w.max_running)
    start = time.perf_counter()
    batch = [await kernel.spawn(_batch_agent, f"batch-{i}", priority=4, weight=1.0 + i % 2,
                                args={"prompt": _batch_prompt(i, w.batch_notes),
                                      "max_tokens": w.batch_tokens})
             for i in range(w.batch)]
    interactive = []
    for j in range(w.interactive):
        mine = list(range(j, w.interactive_requests, w.interactive))
        interactive.append(await kernel.spawn(
            _interactive_agent, f"interactive-{j}", priority=0, weight=4.0,
            args={"questions": [_QUESTIONS[k % len(_QUESTIONS)] for k in mine],
                  "arrivals": [(k + 1) * w.interval for k in mine], "start": start,
                  "max_tokens": w.interactive_tokens}))
    # Batch shares while every batch agent is still busy: tokens_used is the tokens generated
    # so far until a call returns (then the prompt is added), so sample until the first ends.
    shares = {pid: 0 for pid in batch}
    procs = [kernel.process(p) for p in batch]
    seen_all_busy = False
    while True:
        if all(p.current_syscall == "llm_chat" for p in procs):
            shares, seen_all_busy = {p.pid: p.tokens_used for p in procs}, True
        elif seen_all_busy or not all(p.alive for p in procs):
            break
        await asyncio.sleep(0.05)
    results = {pid: await kernel.wait(pid) for pid in batch + interactive}
    elapsed = time.perf_counter() - start
    latencies = [lat for pid in interactive for lat, _ in results[pid]]
    tokens = sum(results[p] for p in batch) + sum(n for p in interactive for _, n in results[p])
    predictor = kernel.sched.predictor
    out = {
        "policy": policy, "seconds": elapsed, "tokens": tokens, "tok_per_s": tokens / elapsed,
        "interactive_latencies_s": latencies,
        "jain_batch": jain([shares[p.pid] / p.weight for p in procs]),
        "batch_shares": [shares[p.pid] for p in procs],
        "preemptions": kernel.sched.preemptions,
        "sjf_mae_tokens": sum(predictor.errors) / len(predictor.errors) if predictor.errors else 0.0,
    }
    await kernel.shutdown(close_backend=False)
    return out


def _summary(policy: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One policy's repeats: throughput mean and range, latency pooled over all runs."""
    tps = [r["tok_per_s"] for r in runs]
    lat = [x for r in runs for x in r["interactive_latencies_s"]]
    return {"policy": policy, "repeats": len(runs), "tokens": runs[0]["tokens"],
            "tok_per_s": sum(tps) / len(tps), "tok_per_s_min": min(tps), "tok_per_s_max": max(tps),
            "latency_samples": len(lat), "interactive_p50_s": _percentile(lat, 0.5),
            "interactive_p90_s": _percentile(lat, 0.9), "interactive_max_s": max(lat, default=0.0),
            "run_p50s_s": [_percentile(r["interactive_latencies_s"], 0.5) for r in runs],
            "run_p90s_s": [_percentile(r["interactive_latencies_s"], 0.9) for r in runs],
            "jain_batch": sum(r["jain_batch"] for r in runs) / len(runs),
            "preemptions": sum(r["preemptions"] for r in runs) / len(runs),
            "sjf_mae_tokens": sum(r["sjf_mae_tokens"] for r in runs) / len(runs), "runs": runs}


def _span(values: list[float]) -> str:
    """The range of per-run values, as (min-max)."""
    return f"({min(values):.2f}-{max(values):.2f})"


def interleaved(policies: tuple[str, ...], repeats: int) -> list[str]:
    """The run order: round r starts at the r-th policy, so each runs early and late."""
    n = len(policies)
    return [policies[(r + i) % n] for r in range(repeats) for i in range(n)]


def run_sched_bench(console: Console, quick: bool = False, model: str = "smollm2-135m-instruct",
                    json_path: str | None = None, policies: tuple[str, ...] = POLICIES,
                    repeats: int | None = None) -> dict[str, Any]:
    import tempfile

    from llmos.bench.engine import write_report
    from llmos.engine import AsyncLLM

    w = QUICK if quick else SchedWorkload()
    repeats = repeats or (1 if quick else 3)
    llm = AsyncLLM(model, kv_budget="1GiB")
    backend = EngineBackend(llm)
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
    try:
        with tempfile.TemporaryDirectory() as home:
            asyncio.run(run_policy(backend, "fifo", QUICK, home))  # warm-up: kernels built, caches hot
            for k, policy in enumerate(interleaved(policies, repeats)):
                asyncio.run(llm.call(llm.engine.blocks.reset_prefix_cache))
                with console.status(f"policy {policy} (run {k + 1} of {len(policies) * repeats}) ..."):
                    r = asyncio.run(run_policy(backend, policy, w, home))
                runs[policy].append(r)
                median = _percentile(r["interactive_latencies_s"], 0.5)
                console.print(f"{policy}: {r['tok_per_s']:.1f} tok/s, interactive median {median:.2f} s, "
                              f"Jain {r['jain_batch']:.3f}")
    finally:
        llm.shutdown()
    rows = [_summary(p, runs[p]) for p in policies]
    fifo = next((r for r in rows if r["policy"] == "fifo"), rows[0])
    table = Table(title=f"agent scheduling: {w.interactive} interactive + {w.batch} batch agents, "
                        f"{w.max_running} running at once, {repeats} interleaved runs per policy; "
                        f"latency from when a request was due, {fifo['latency_samples']} samples per policy",
                  title_justify="left")
    for col in ("policy", "tok/s (min-max)", "vs fifo", "latency p50 s (runs)", "p90 s (runs)", "max s",
                "p90 vs fifo", "Jain (batch)", "preemptions", "sjf error (tokens)"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in rows:
        r["throughput_vs_fifo"] = r["tok_per_s"] / fifo["tok_per_s"]
        r["p90_improvement_vs_fifo"] = fifo["interactive_p90_s"] / max(r["interactive_p90_s"], 1e-9)
        spread = f"{r['tok_per_s']:.1f} ({r['tok_per_s_min']:.1f}-{r['tok_per_s_max']:.1f})"
        table.add_row(r["policy"], spread, f"{r['throughput_vs_fifo']:.2f}x",
                      f"{r['interactive_p50_s']:.2f} {_span(r['run_p50s_s'])}",
                      f"{r['interactive_p90_s']:.2f} {_span(r['run_p90s_s'])}",
                      f"{r['interactive_max_s']:.2f}",
                      f"{r['p90_improvement_vs_fifo']:.1f}x", f"{r['jain_batch']:.3f}",
                      f"{r['preemptions']:.0f}", f"{r['sjf_mae_tokens']:.1f}" if r["policy"] == "sjf" else "")
    console.print(table)
    report = {"workload": w.__dict__, "model": model, "repeats": repeats,
              "order": interleaved(policies, repeats), "results": rows}
    write_report(report, json_path, f"bench-results/sched{'-quick' if quick else ''}.json", console)
    return report
