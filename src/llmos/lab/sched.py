"""Lab `sched`: who holds the engine when, under each of the agent scheduler's policies.

The workload is `llmos bench sched`'s (its harness runs here unchanged):
interactive agents (short questions, one due every `interval` seconds) share
the engine with batch agents (long prompts, long answers, all at t=0), and at
most `max_running` LLM calls run at once, so the policy decides who waits.
Every policy in the kernel's registry (`llmos.kernel.POLICIES`) runs the same
mix on the same engine, one after the other, with the prefix cache emptied
between runs. The backend records, after every engine step, which processes'
calls the scheduler lets run next: those records are the timelines.

Measured per policy: the timeline (per agent, the intervals its calls ran),
interactive latency from the moment a request was due to its last token
(p50, p90, max), Jain's fairness index of tokens per weight over the batch
agents while all of them were busy, throughput and preemptions.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from llmos.bench.sched import SchedWorkload, _percentile, run_policy
from llmos.kernel import EngineBackend
from llmos.lab._common import MODEL, engine, pyplot, save

SIZE = {
    "small": SchedWorkload(interactive=1, batch=2, interactive_requests=2, interval=0.2, interactive_tokens=4,
                           batch_tokens=12, batch_notes=1, max_running=2),
    "full": SchedWorkload(interactive=2, batch=3, interactive_requests=6, interval=0.5, interactive_tokens=12,
                          batch_tokens=48, batch_notes=3, max_running=2),
}
POOL_BLOCKS = 256


class _TimelineBackend(EngineBackend):
    """The embedded engine backend, which also notes after each step whose calls run next."""

    def attach(self, sched: Any, on_switch: Any) -> None:
        super().attach(sched, on_switch)
        self.t0 = time.perf_counter()
        self.steps: list[tuple[float, list[int]]] = []

    def _step_hook(self, engine: Any, outputs: list[Any]) -> None:
        super()._step_hook(engine, outputs)
        running = self.sched.running if self.sched is not None else []
        self.steps.append((time.perf_counter() - self.t0, sorted({c.pid for c in running})))


def run(size: str, loaded: Any) -> dict[str, Any]:
    from llmos.engine import AsyncLLM
    from llmos.kernel import POLICIES

    w = SIZE[size]
    backend = _TimelineBackend(AsyncLLM(engine(loaded, POOL_BLOCKS)))
    policies: dict[str, Any] = {}
    try:
        asyncio.run(_warm_up(backend.llm))
        for policy in POLICIES:
            asyncio.run(backend.llm.call(backend.engine.blocks.reset_prefix_cache))
            with tempfile.TemporaryDirectory(prefix="llmos-lab-sched-") as home:
                r = asyncio.run(run_policy(backend, policy, w, home))
                names = _names(Path(home))
            policies[policy] = _summary(r, _timeline(backend.steps, names))
    finally:
        backend.close()
    return {"lab": "sched", "size": size, "model": MODEL, "workload": dict(w.__dict__),
            "policies": policies}


async def _warm_up(llm: Any) -> None:
    """One short generation first, so that no policy's run pays for a cold engine."""
    from llmos.engine import SamplingParams

    async for _ in llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0.0)):
        pass


def _names(home: Path) -> dict[int, str]:
    from llmos.kernel.table import ProcessTable

    table = ProcessTable(home / "kernel.db")
    try:
        return {row["pid"]: row["name"] for row in table.processes(limit=1000)}
    finally:
        table.close()


def _timeline(steps: list[tuple[float, list[int]]], names: dict[int, str]) -> dict[str, list[list[float]]]:
    """Per agent, the [start, end] intervals in which its call was among those the engine ran: a call
    picked after one step runs in the next, until the step after that."""
    spans: dict[str, list[list[float]]] = {name: [] for name in sorted(names.values())}
    for (t, pids), (t_next, _) in zip(steps, steps[1:], strict=False):
        for pid in pids:
            own = spans[names[pid]]
            if own and abs(own[-1][1] - t) < 1e-9:
                own[-1][1] = t_next
            else:
                own.append([t, t_next])
    return spans


def _summary(r: dict[str, Any], timeline: dict[str, list[list[float]]]) -> dict[str, Any]:
    lat = r["interactive_latencies_s"]
    return {"seconds": r["seconds"], "tokens": r["tokens"], "tok_per_s": r["tok_per_s"],
            "latency_samples": len(lat), "interactive_p50_s": _percentile(lat, 0.5),
            "interactive_p90_s": _percentile(lat, 0.9), "interactive_max_s": max(lat, default=0.0),
            "interactive_latencies_s": lat, "jain_batch": r["jain_batch"], "batch_shares": r["batch_shares"],
            "preemptions": r["preemptions"],
            "timeline": timeline,
            "busy_s": {name: sum(b - a for a, b in spans) for name, spans in timeline.items()}}


def plot(data: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    policies = list(data["policies"])
    fig = plt.figure(figsize=(14, 2.0 * len(policies) + 3))
    grid = fig.add_gridspec(len(policies) + 1, 2, height_ratios=[1.0] * len(policies) + [1.4])
    end = max(p["seconds"] for p in data["policies"].values())
    for i, policy in enumerate(policies):
        p = data["policies"][policy]
        ax = fig.add_subplot(grid[i, :])
        agents = sorted(p["timeline"], key=lambda n: (not n.startswith("interactive"), n))
        for lane, name in enumerate(agents):
            colour = "#1565c0" if name.startswith("interactive") else "#ef6c00"
            ax.broken_barh([(a, b - a) for a, b in p["timeline"][name]], (lane - 0.4, 0.8), color=colour)
        ax.set_yticks(range(len(agents)), agents, fontsize=7)
        ax.set_ylim(len(agents) - 0.5, -0.5)
        ax.set_xlim(0, end)
        ax.set_title(f"{policy}: interactive latency p50 {p['interactive_p50_s']:.2f} s, p90 "
                     f"{p['interactive_p90_s']:.2f} s, max {p['interactive_max_s']:.2f} s "
                     f"({p['latency_samples']} requests); Jain (batch) {p['jain_batch']:.3f}; "
                     f"{p['tok_per_s']:.1f} tok/s; {p['preemptions']} preemptions", fontsize=9, loc="left")
        if i == len(policies) - 1:
            ax.set_xlabel("seconds since the kernel booted (bars: the agent's call is running on the engine)")
    lat_ax, jain_ax = fig.add_subplot(grid[-1, 0]), fig.add_subplot(grid[-1, 1])
    x = range(len(policies))
    for k, (key, label) in enumerate((("interactive_p50_s", "p50"), ("interactive_p90_s", "p90"))):
        lat_ax.bar([i + 0.4 * k - 0.2 for i in x], [data["policies"][q][key] for q in policies], 0.4,
                   label=label)
    lat_ax.set_xticks(list(x), policies)
    lat_ax.set_ylabel("interactive latency (s)")
    lat_ax.legend(fontsize=8)
    jain_ax.bar(list(x), [data["policies"][q]["jain_batch"] for q in policies], color="#6a1b9a")
    jain_ax.set_xticks(list(x), policies)
    jain_ax.set_ylim(0, 1.05)
    jain_ax.set_ylabel("Jain's index (batch)")
    jain_ax.set_title("fairness: Jain's index of batch tokens per weight while all batch agents ran",
                      fontsize=9)
    lat_ax.set_title("interactive latency, from when a request was due to its last token", fontsize=9)
    w = data["workload"]
    fig.suptitle(f"llmos lab sched: {w['interactive']} interactive agents (blue; a question every "
                 f"{w['interval']} s) and {w['batch']} batch agents (orange) on one engine, "
                 f"{w['max_running']} calls at once, under each policy", fontsize=10)
    save(fig, path)


def describe(data: dict[str, Any]) -> str:
    w = data["workload"]
    lines = [f"{w['interactive']} interactive + {w['batch']} batch agents, {w['max_running']} LLM calls at "
             f"once; interactive latency from when a request was due to its last token:"]
    for policy, p in data["policies"].items():
        lines.append(f"  {policy:<9} p50 {p['interactive_p50_s']:6.2f} s  "
                     f"p90 {p['interactive_p90_s']:6.2f} s  "
                     f"max {p['interactive_max_s']:6.2f} s  Jain (batch) {p['jain_batch']:.3f}  "
                     f"{p['tok_per_s']:5.1f} tok/s  preemptions {p['preemptions']:>3}  "
                     f"wall {p['seconds']:5.1f} s")
    return "\n".join(lines)
