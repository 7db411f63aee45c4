"""`llmos bench operator`: chaos engineering for the operator agent.

Faults are injected one at a time inside a sandbox the benchmark creates (a
temporary directory and the benchmark's own child processes, the only things
the operator is granted): a runaway CPU process, a memory hog (bounded: it
stops growing at a few hundred MB), a scratch directory filling up (bounded
size), and, with a kernel, an agent looping past its budget and KV thrashing.
For each fault: detected, time to detect, the action, recovered, time to
recover (both from the injection) and what the guardrails refused. A no-fault
period of the same length comes first: any action there is a false action.
The benchmark plays the on-call human: it approves every destructive action
the operator queues on its sandbox, so approval latency is in the timings.
"""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from llmos.agents.operator import (
    Actuator,
    ApprovalQueue,
    Detector,
    FallbackPolicy,
    Grants,
    Guardrails,
    Limits,
    Observer,
    Operator,
    default_rules,
    host_kernel,
    operator_process,
)

ACTIONS = ("acted", "queued", "dry_run", "failed")
_HOG = ("import time\nchunks = []\nfor _ in range({steps}):\n    chunks.append(bytearray({chunk}))\n"
        "    time.sleep(0.1)\ntime.sleep(600)\n")
_FILL = ("import os, time\nd = {path!r}\nos.makedirs(d, exist_ok=True)\nfor i in range({steps}):\n"
         "    with open(os.path.join(d, f'part{{i:04d}}.bin'), 'wb') as f:\n"
         "        f.write(os.urandom({chunk}))\n    time.sleep(0.05)\n")
_BENIGN = ("import time\nwhile True:\n    t = time.perf_counter()\n"
           "    while time.perf_counter() - t < 0.02:\n        pass\n    time.sleep(0.2)\n")


@dataclass
class BenchConfig:
    interval_s: float = 0.5
    window_s: float = 30.0  # a fault's time limit to be detected and recovered
    warmup_s: float = 8.0  # baselines learn the quiet sandbox first
    cpu_percent: float = 50.0  # of one core: a busy loop still crosses it with the 2 cores shared
    rss_mb: float = 192.0
    hog_mb: int = 320  # the memory hog stops growing here
    scratch_mb: float = 128.0
    fill_mb: int = 200  # the scratch filler stops writing here
    verify_s: float = 10.0
    agent_budget: int = 200  # LLM tokens an agent may use before the operator calls it a runaway
    preemption_rate: float = 2.0  # preemptions per second that count as thrashing
    kv_budget: str = "128MiB"  # the kernel's engine KV pool in the kernel faults
    thrash_blocks: int = 40  # the KV cap the thrashing fault sets (the workload needs about 150 blocks)
    thrash_agents: int = 6


@dataclass
class Fault:
    name: str
    subject: str
    started: float
    cleanup: Callable[[], None]
    still_faulty: Callable[[], bool]  # ground truth, independent of the operator's own view


@dataclass
class _Sandbox:
    root: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"

    def spawn(self, code: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", code], cwd=self.root, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=5)
            except (subprocess.TimeoutExpired, ChildProcessError):
                pass


def _alive(p: subprocess.Popen) -> bool:
    import psutil

    try:
        return psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE and p.poll() is None
    except psutil.Error:
        return False


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def _host_faults(sb: _Sandbox, cfg: BenchConfig) -> list[tuple[str, Callable[[], Fault]]]:
    def runaway() -> Fault:
        p = sb.spawn("while True: pass")
        return Fault("runaway CPU process", f"pid:{p.pid}", time.monotonic(), p.kill, lambda: _alive(p))

    def hog() -> Fault:
        chunk = 16 * 2**20
        p = sb.spawn(_HOG.format(steps=cfg.hog_mb * 2**20 // chunk, chunk=chunk))
        return Fault(f"memory hog (to {cfg.hog_mb} MB)", f"pid:{p.pid}", time.monotonic(), p.kill,
                     lambda: _alive(p))

    def fill() -> Fault:
        chunk = 4 * 2**20
        target = sb.scratch / "dump"
        p = sb.spawn(_FILL.format(path=str(target), steps=cfg.fill_mb * 2**20 // chunk, chunk=chunk))
        return Fault(f"scratch dir filling (to {cfg.fill_mb} MB)", f"path:{sb.scratch}", time.monotonic(),
                     p.kill, lambda: _dir_mb(sb.scratch) > cfg.scratch_mb)

    return [("runaway_cpu", runaway), ("memory_hog", hog), ("scratch_full", fill)]


async def _new_operator(sb: _Sandbox, cfg: BenchConfig, proposer: Any, kernel: Any,
                        agents: frozenset[int] | None = frozenset(), watch_llmos: bool = False) -> Operator:
    """An operator process on `kernel` granted the sandbox (and `agents`): every action it takes passes
    the kernel's reference monitor and lands in the sandbox's audit log."""
    me = frozenset({os.getpid()})
    grants = Grants(children_of=me, paths=(sb.scratch,), agents=agents)
    sys = await operator_process(kernel, grants)
    state = kernel.stats if watch_llmos else None
    rules = default_rules(cpu_percent=cfg.cpu_percent, rss_mb=cfg.rss_mb, scratch_mb=cfg.scratch_mb,
                          preemption_rate=cfg.preemption_rate)
    observer = Observer(children_of=me, scratch=[sb.scratch], llmos_state=state,
                        agent_budget={"llm_tokens": cfg.agent_budget})
    return Operator(observer, proposer, Actuator(sys, grants), Guardrails(Limits(rate=(5, 60.0))),
                    detector=Detector(rules), approvals=ApprovalQueue(sb.root / "approvals.db"),
                    verify_s=cfg.verify_s)


async def _drive(op: Operator, seconds: float, cfg: BenchConfig,
                 until: Callable[[], bool] | None = None) -> None:
    """Tick the operator for `seconds` (or until `until()`), approving what it queues, as a human would."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        await op.tick()
        for pending in op.approvals.list():
            op.approvals.decide(pending["id"])
        if until is not None and until():
            return
        await asyncio.sleep(max(0.0, cfg.interval_s - (time.monotonic() - started)))


def _summarise(fault: Fault, events: list[Any]) -> dict[str, Any]:
    mine = [e for e in events if e.subject == fault.subject]
    first = next((e for e in mine if e.step == "finding"), None)
    acted = [e for e in mine if e.step == "acted"]
    recovered = next((e for e in mine if e.step == "recovered"), None)
    truly = not fault.still_faulty()
    return {
        "fault": fault.name,
        "subject": fault.subject,
        "detected": first is not None,
        "time_to_detect_s": round(first.t - fault.started, 2) if first else None,
        "finding": first.detail if first else None,
        "proposals": [e.action for e in mine if e.step == "proposal"],
        "actions": [e.action for e in acted],
        "approvals": sum(e.step == "queued" for e in mine),
        "refused": [e.detail for e in mine if e.step == "refused"],
        "recovered": bool(recovered) and truly,
        "time_to_recover_s": round(recovered.t - fault.started, 2) if recovered and truly else None,
        "rolled_back": sum(e.step == "rolled_back" for e in mine),
        "other_actions": [{"subject": e.subject, "action": e.action} for e in events
                          if e.step in ACTIONS and e.subject != fault.subject],
    }


async def run_chaos(proposer: Any, cfg: BenchConfig, console: Console | None = None,
                    kernel_model: str | None = None) -> dict[str, Any]:
    """One full run (warm-up, no-fault period, each fault) with one proposer."""
    with tempfile.TemporaryDirectory(prefix="llmos-chaos-") as tmp:
        sb = _Sandbox(Path(tmp))
        sb.scratch.mkdir()
        (sb.scratch / "notes.txt").write_text("benign scratch content\n" * 100)
        try:
            sb.spawn("import time; time.sleep(3600)")  # an idle granted process
            sb.spawn(_BENIGN)  # a granted process with a light duty cycle
            kernel = host_kernel(home=sb.root / "host", audit_path=sb.root / "audit.db")
            op = await _new_operator(sb, cfg, proposer, kernel)
            await _drive(op, cfg.warmup_s, cfg)
            mark = len(op.events)
            t0 = time.monotonic()
            await _drive(op, cfg.window_s, cfg)
            quiet = op.events[mark:]
            no_fault = {"seconds": round(time.monotonic() - t0, 1),
                        "findings": sum(e.step == "finding" for e in quiet),
                        "false_actions": [{"subject": e.subject, "action": e.action, "step": e.step}
                                          for e in quiet if e.step in ACTIONS]}
            results = []
            for key, inject in _host_faults(sb, cfg):
                mark = len(op.events)
                fault = inject()
                if console:
                    console.print(f"[dim]  injected {fault.name} ({fault.subject})[/]")
                await _drive(op, cfg.window_s, cfg, until=lambda f=fault, m=mark: _done(f, op.events[m:]))
                results.append({"key": key, **_summarise(fault, op.events[mark:])})
                fault.cleanup()
                await _drive(op, 2 * cfg.interval_s, cfg)  # settle before the next fault
            await kernel.shutdown()
            if kernel_model is not None:
                results += await _kernel_faults(sb, cfg, proposer, kernel_model, console)
        finally:
            sb.close()
    return {"proposer": proposer.name, "no_fault": no_fault, "faults": results,
            "invalid_model_answers": getattr(proposer, "invalid", 0)}


async def _looper(sys: Any) -> None:
    """An agent stuck in a loop: it asks the model the same thing forever."""
    while True:
        await sys.llm_chat([{"role": "user", "content": "Say the word again."}], max_tokens=16)


async def _generator(sys: Any, n: int = 0) -> None:
    """Steady work for the engine: long answers, one after the other."""
    prompt = f"Story {n}. " + "Write a long story about an operating system and its processes. " * 18
    while True:
        await sys.llm_chat([{"role": "user", "content": prompt}], max_tokens=160, seed=n)


def _starved(engine: Any) -> Callable[[], bool]:
    """Ground truth for thrashing: requests sit swapped out in the engine for want of KV blocks."""
    return lambda: len(engine.scheduler.swapped) > 0


async def _kernel_faults(sb: _Sandbox, cfg: BenchConfig, proposer: Any, model: str,
                         console: Console | None) -> list[dict[str, Any]]:
    """Faults that need the kernel and its engine: a looping agent, and KV thrashing."""
    from llmos.kernel import EngineBackend, Quotas

    kernel = host_kernel(home=sb.root / "home", backend=EngineBackend(model, kv_budget=cfg.kv_budget),
                         audit_path=sb.root / "audit.db")
    results = []
    before = getattr(proposer, "settings", None)
    proposer.settings = kernel.settings
    try:
        op = await _new_operator(sb, cfg, proposer, kernel, agents=None, watch_llmos=True)
        await _drive(op, 2 * cfg.interval_s, cfg)
        # an agent looping past the operator's token budget
        mark = len(op.events)
        pid = await kernel.spawn(_looper, name="looper")
        fault = Fault(f"agent looping past its budget ({cfg.agent_budget} tokens)", f"agent:{pid}",
                      time.monotonic(), lambda: None,
                      lambda: kernel.process(pid).state.value not in ("suspended", "terminated"))
        if console:
            console.print(f"[dim]  injected {fault.name} ({fault.subject})[/]")
        await _drive(op, cfg.window_s, cfg, until=lambda: _done(fault, op.events[mark:]))
        results.append({"key": "over_quota", **_summarise(fault, op.events[mark:])})
        await kernel.kill(pid, "chaos cleanup")
        # KV thrashing: steady work, then a KV cap far below what it needs
        # legitimate heavy work: a kernel quota of their own exempts them from the operator's soft budget
        workers = [await kernel.spawn(_generator, name=f"gen{i}", args={"n": i},
                                      quotas=Quotas(llm_tokens=10**9)) for i in range(cfg.thrash_agents)]
        await _drive(op, cfg.warmup_s, cfg)
        mark = len(op.events)
        engine = kernel.backend.engine
        await kernel.configure(kv_blocks=cfg.thrash_blocks)
        fault = Fault(f"KV thrashing (kv_blocks {engine.blocks.num_blocks} -> {cfg.thrash_blocks})", "llmos",
                      time.monotonic(), lambda: None, _starved(engine))
        if console:
            console.print(f"[dim]  injected {fault.name}[/]")
        await _drive(op, cfg.window_s, cfg, until=lambda: _done(fault, op.events[mark:]))
        results.append({"key": "kv_thrashing", "kv_blocks_after": kernel.settings().get("kv_blocks"),
                        **_summarise(fault, op.events[mark:])})
        for w in workers:
            await kernel.kill(w, "chaos cleanup")
    finally:
        proposer.settings = before
        await kernel.shutdown()
    return results


def _done(fault: Fault, events: list[Any]) -> bool:
    recovered = any(e.step == "recovered" and e.subject == fault.subject for e in events)
    return recovered and not fault.still_faulty()


def _table(run: dict[str, Any]) -> Table:
    table = Table(title=f"llmos bench operator: proposer {run['proposer']}")
    for col in ("fault", "detected", "detect s", "action", "recovered", "recover s", "refused"):
        table.add_column(col, justify="left" if col in ("fault", "action", "refused") else "right")
    for r in run["faults"]:
        action = ", ".join(a["kind"] for a in r["actions"]) or (
            ", ".join(p["kind"] for p in r["proposals"]) + " (not run)" if r["proposals"] else "-")
        table.add_row(r["fault"], "yes" if r["detected"] else "no", f"{r['time_to_detect_s'] or '-'}", action,
                      "yes" if r["recovered"] else "no", f"{r['time_to_recover_s'] or '-'}",
                      str(len(r["refused"])) + (f": {r['refused'][0][:40]}" if r["refused"] else ""))
    nf = run["no_fault"]
    table.add_row(f"no fault ({nf['seconds']:.0f} s)", "-", "-", f"{len(nf['false_actions'])} false actions",
                  "-", "-", "-")
    return table


def run_operator_bench(console: Console, proposers: tuple[str, ...] = ("fallback", "model"),
                       model: str = "smollm2-135m-instruct", json_path: str | None = None,
                       config: BenchConfig | None = None, kernel: bool = True) -> dict[str, Any]:
    from llmos.bench.engine import write_report

    cfg = config or BenchConfig()
    runs = []
    for name in proposers:
        if name == "fallback":
            proposer = FallbackPolicy()
        elif name == "model":
            from llmos import LLM
            from llmos.agents.operator.propose import LLMProposer, engine_chat

            with console.status(f"loading {model} ..."):
                proposer = LLMProposer(engine_chat(LLM(model)))
        else:
            raise ValueError(f"unknown proposer {name!r} (fallback or model)")
        console.print(f"[bold]chaos run with the {name} proposer[/]")
        run = asyncio.run(run_chaos(proposer, cfg, console, model if kernel else None))
        if name == "model":
            run["model"] = model
        console.print(_table(run))
        runs.append(run)
    report = {"bench": "operator", "config": cfg.__dict__, "machine": platform.machine(),
              "cpus": os.cpu_count(), "approval": "the benchmark approves every queued action on its sandbox",
              "runs": runs}
    write_report(report, json_path, "bench-results/operator.json", console)
    return report
