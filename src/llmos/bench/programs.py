"""`llmos bench programs`: scheduling agent programs, not requests, with KV kept across tool calls.

A seeded multi-agent trace: programs arrive over time (a Poisson process);
each is a chain of LLM calls, their number long-tailed (Pareto: most programs
short, a few long), ReAct-like: a call's prompt is the previous context, its
answer and a tool result, with tool calls between them whose durations come
from a long-tailed (log-normal) distribution, clipped to 10 ms - 10 s. Greedy
decoding to a fixed length, so every configuration does the same work and
should produce the same tokens. The KV capacity is tight: the contexts of the
programs in flight do not all fit, so an LRU prefix cache evicts contexts that
are about to be reused. The three configurations run one after the other on
the same engine, under the same KV capacity and host swap space:

- `fcfs`: per-call first come first served, no prefix cache, nothing retained
  (an agent framework on a plain serving engine);
- `fcfs+prefix`: the same with the prefix cache (contexts survive a tool call
  only if LRU eviction spares them);
- `llmos`: the kernel's `las` policy (programs in levels of attained service,
  FCFS over programs within a level) and cost-based KV retention (keep with a
  TTL, swap to host, or release, per tool call).

Reported: mean and p99 program completion time (arrival to last answer),
throughput (calls and generated tokens per second), prompt tokens
recomputed, peak KV blocks in use, the ratios against `fcfs` and
`fcfs+prefix`, and whether every call's tokens equal those of `fcfs`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from llmos.kernel import AgentScheduler, EngineBackend, LLMCall, SchedulerSettings
from llmos.kernel.backend import GenerationParams, new_call_id


@dataclass
class ProgramsWorkload:
    programs: int = 48
    calls: tuple[int, int] = (3, 12)  # LLM calls per program, from a Pareto tail
    calls_alpha: float = 1.2
    first_prompt: tuple[int, int] = (48, 128)  # tokens of the task
    new_tokens: tuple[int, int] = (32, 128)  # a call's new tokens: its answer and the tool's result
    answer_tokens: int = 4  # decoded per call (the same in every configuration)
    tool_median_s: float = 0.3  # log-normal tool time, clipped to [tool_min_s, tool_max_s]
    tool_sigma: float = 1.5
    tool_min_s: float = 0.01
    tool_max_s: float = 10.0
    arrival_mean_s: float = 0.5  # mean time between two programs' arrivals (Poisson): a loaded engine
    max_running: int = 2  # LLM calls on the engine at once
    kv_blocks: int = 64  # the KV capacity every configuration runs under (16 tokens a block)
    threads: int = 1  # torch's intra-op threads (1 is the fastest on a shared 2-core machine)
    seed: int = 0


QUICK = ProgramsWorkload(programs=4, calls=(2, 4), first_prompt=(32, 64), new_tokens=(16, 32),
                         answer_tokens=4, tool_median_s=0.1, arrival_mean_s=0.3, max_running=2,
                         kv_blocks=24)
FULL = ProgramsWorkload(programs=60, calls=(3, 12), first_prompt=(64, 256), new_tokens=(64, 256),
                        answer_tokens=16, tool_median_s=0.5, arrival_mean_s=1.0, max_running=8,
                        kv_blocks=512)
CONFIGS = ("fcfs", "fcfs+prefix", "llmos")
_TOOLS = ("search", "calculator", "read_file", "run_code")


@dataclass
class Step:
    tool: str
    tool_s: float
    result: list[int]  # the tool's answer, appended to the context


@dataclass
class Program:
    index: int
    arrival: float
    prompt: list[int]
    steps: list[Step]  # one per call but the last: the tool call after it

    @property
    def num_calls(self) -> int:
        return len(self.steps) + 1


def make_trace(w: ProgramsWorkload) -> list[Program]:
    rng = random.Random(w.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(200, 20000) for _ in range(n)]

    programs, arrival = [], 0.0
    for i in range(w.programs):
        lo, hi = w.calls  # long-tailed, as in agent traces: most programs short, a few long
        calls = min(hi, lo - 1 + int(rng.paretovariate(w.calls_alpha)))
        steps = []
        for _ in range(calls - 1):
            tool = rng.choice(_TOOLS)
            seconds = w.tool_median_s * rng.lognormvariate(0.0, w.tool_sigma)
            result = tokens(max(1, rng.randint(*w.new_tokens) - w.answer_tokens))
            steps.append(Step(tool, min(w.tool_max_s, max(w.tool_min_s, seconds)), result))
        programs.append(Program(i, arrival, tokens(rng.randint(*w.first_prompt)), steps))
        arrival += rng.expovariate(1.0 / w.arrival_mean_s)
    return programs


@dataclass
class _Run:
    completion: dict[int, float] = field(default_factory=dict)  # program -> seconds
    outputs: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # (program, call) -> tokens
    prompt_tokens: int = 0
    recomputed: int = 0
    generated: int = 0
    decisions: Counter = field(default_factory=Counter)


async def _program(p: Program, backend: EngineBackend, config: str, w: ProgramsWorkload,
                   start: float, run: _Run) -> None:
    await asyncio.sleep(max(0.0, p.arrival - (time.perf_counter() - start)))
    arrived = time.perf_counter()
    context, pid, agent = list(p.prompt), p.index + 1, f"agent-{p.index % 4}"
    key = f"program-{p.index}" if config == "llmos" else None
    params = GenerationParams(max_tokens=w.answer_tokens, ignore_eos=True)
    decisions = []
    for i in range(p.num_calls):
        call = LLMCall(new_call_id(), pid, max_tokens=w.answer_tokens)
        await backend.complete(call, context, params, lambda n: None, context=key)
        run.outputs[(p.index, i)] = call.output_ids
        run.prompt_tokens += len(context)
        run.recomputed += len(context) - call.cached_tokens
        run.generated += len(call.output_ids)
        if i == len(p.steps):
            break
        step = p.steps[i]
        if key is not None:  # decided on the engine thread while the tool runs: the tool never waits
            decisions.append(asyncio.ensure_future(backend.between_calls(key, agent, step.tool)))
        await asyncio.sleep(step.tool_s)
        if key is not None:
            backend.tool_finished(agent, step.tool, step.tool_s)
        context = context + call.output_ids + step.result
    run.completion[p.index] = time.perf_counter() - arrived
    for decision in await asyncio.gather(*decisions):
        run.decisions[decision.action if decision else "none"] += 1
    if key is not None:
        await backend.forget(key)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


async def run_config(backend: EngineBackend, config: str, w: ProgramsWorkload,
                     trace: list[Program]) -> tuple[dict[str, Any], _Run]:
    """One configuration over the whole trace on a clean engine (prefix cache emptied)."""
    engine = backend.engine
    policy = "las" if config == "llmos" else "fifo"
    sched = AgentScheduler(SchedulerSettings(policy=policy, max_running=w.max_running))
    backend.attach(sched, lambda call, started: None)
    peak = [0]
    hook = backend.llm.step_hook

    def step_hook(eng: Any, outputs: list[Any]) -> None:
        peak[0] = max(peak[0], eng.blocks.num_used_blocks)
        hook(eng, outputs)

    def reset() -> None:
        retained = engine.scheduler.retained
        for key in list(retained.contexts):  # nothing of an earlier configuration survives
            retained.release(key)
        retained.begin_step()
        engine.blocks.reset_prefix_cache()
        engine.blocks.enable_prefix_caching = config != "fcfs"
        engine.set_kv_capacity(min(w.kv_blocks, engine.blocks.num_blocks))
        engine.reset_metrics()
        retained.stats = type(retained.stats)()

    await backend.llm.call(reset)
    backend.llm.step_hook = step_hook
    backend.retention.predictor = type(backend.retention.predictor)()
    run = _Run()
    start = time.perf_counter()
    await asyncio.gather(*(_program(p, backend, config, w, start, run) for p in trace))
    elapsed = time.perf_counter() - start
    backend.llm.step_hook = hook
    stats = await backend.stats()
    times = list(run.completion.values())
    calls = sum(p.num_calls for p in trace)
    row = {
        "config": config, "policy": policy, "seconds": elapsed,
        "mean_completion_s": sum(times) / len(times), "p99_completion_s": _percentile(times, 0.99),
        "calls_per_s": calls / elapsed, "tok_per_s": run.generated / elapsed,
        "prompt_tokens": run.prompt_tokens, "prompt_tokens_recomputed": run.recomputed,
        "peak_kv_blocks": peak[0], "kv_capacity_blocks": min(w.kv_blocks, engine.blocks.num_blocks),
        "preemptions": stats.get("preemptions", 0), "retention": dict(run.decisions),
        "retention_engine": engine.scheduler.retained.stats.as_dict(),
        "completion_s": {str(k): round(v, 3) for k, v in sorted(run.completion.items())},
    }
    return row, run


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def run_programs_bench(console: Console, quick: bool = False, full: bool = False,
                       model: str = "smollm2-135m-instruct", json_path: str | None = None,
                       seed: int = 0, threads: int | None = None) -> dict[str, Any]:
    import torch

    from llmos.bench.engine import write_report
    from llmos.engine import AsyncLLM
    from llmos.engine.config import EngineConfig
    from llmos.engine.kv_cache import KVCache
    from llmos.models.loader import load_model

    w = QUICK if quick else FULL if full else ProgramsWorkload()
    w = ProgramsWorkload(**{**w.__dict__, "seed": seed, "threads": threads or w.threads})
    trace = make_trace(w)
    torch.set_num_threads(w.threads)
    # The device holds exactly kv_blocks blocks: the prefix cache lives in the same memory as the
    # running calls (a capacity cap alone would leave it the rest of a larger pool).
    # float32 weights and activations: int8-quantized activations would turn the last-bit
    # differences between KV computed in a decode step and in a prefill chunk into different tokens.
    config = EngineConfig(swap_space="1GiB", dtype="float32")
    loaded = load_model(model, dtype=config.torch_dtype, device=config.torch_device,
                        quantization=config.weight_quantization)
    config.kv_budget = w.kv_blocks * KVCache.block_bytes(loaded.config, config.block_size, config.torch_dtype)
    llm = AsyncLLM(loaded, config)
    backend = EngineBackend(llm)
    rows, runs, load = [], [], {"start": _loadavg()}
    try:
        asyncio.run(llm.call(lambda: torch.set_num_threads(w.threads)))  # the engine thread's own
        warm = make_trace(ProgramsWorkload(**{**QUICK.__dict__, "programs": 2, "seed": seed + 1}))
        asyncio.run(run_config(backend, "llmos", QUICK, warm))  # warm-up: kernels built
        for config in CONFIGS:
            with console.status(f"{config} ..."):
                row, run = asyncio.run(run_config(backend, config, w, trace))
            row["loadavg"] = _loadavg()
            rows.append(row)
            runs.append(run)
            console.print(f"{config} ({row['seconds']:.0f} s): mean {row['mean_completion_s']:.2f} s, "
                          f"p99 {row['p99_completion_s']:.2f} s, "
                          f"{row['prompt_tokens_recomputed']} prompt tokens recomputed, "
                          f"load {row['loadavg']}")
    finally:
        llm.shutdown()
    load["end"] = _loadavg()
    base, base_run = rows[0], runs[0]
    prefix = rows[1]
    for row, run in zip(rows, runs, strict=True):
        row["mean_speedup_vs_fcfs"] = base["mean_completion_s"] / row["mean_completion_s"]
        row["p99_speedup_vs_fcfs"] = base["p99_completion_s"] / row["p99_completion_s"]
        row["mean_speedup_vs_prefix"] = prefix["mean_completion_s"] / row["mean_completion_s"]
        row["p99_speedup_vs_prefix"] = prefix["p99_completion_s"] / row["p99_completion_s"]
        row["throughput_vs_fcfs"] = row["calls_per_s"] / base["calls_per_s"]
        same = sum(run.outputs[k] == v for k, v in base_run.outputs.items())
        row["calls_identical_to_fcfs"] = f"{same}/{len(base_run.outputs)}"
    calls = sum(p.num_calls for p in trace)
    table = Table(title=f"agent programs: {len(trace)} programs, {calls} LLM calls, {w.max_running} at once, "
                        f"KV capacity {rows[0]['kv_capacity_blocks']} blocks", title_justify="left")
    for col in ("config", "mean s", "vs fcfs", "vs prefix", "p99 s", "vs fcfs ", "vs prefix ", "calls/s",
                "recomputed", "peak KV", "same tokens", "retention"):
        table.add_column(col, justify="left" if col in ("config", "retention") else "right")
    for r in rows:
        table.add_row(r["config"], f"{r['mean_completion_s']:.2f}", f"{r['mean_speedup_vs_fcfs']:.2f}x",
                      f"{r['mean_speedup_vs_prefix']:.2f}x", f"{r['p99_completion_s']:.2f}",
                      f"{r['p99_speedup_vs_fcfs']:.2f}x", f"{r['p99_speedup_vs_prefix']:.2f}x",
                      f"{r['calls_per_s']:.3f}", f"{r['prompt_tokens_recomputed']}/{r['prompt_tokens']}",
                      str(r["peak_kv_blocks"]), r["calls_identical_to_fcfs"],
                      " ".join(f"{k}={v}" for k, v in sorted(r["retention"].items())))
    console.print(table)
    console.print(f"load average {load['start']} at the start, {load['end']} at the end")
    report = {"workload": w.__dict__, "model": model, "calls": calls, "loadavg": load, "results": rows}
    suffix = "-quick" if quick else "-full" if full else ""
    write_report(report, json_path, f"bench-results/programs{suffix}.json", console)
    return report
