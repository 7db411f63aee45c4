"""`llmos bench operator`: chaos engineering for the operator agent, on the defaults a user gets.

The operator runs exactly as `llmos operator` configures it: the documented
rules (`default_rules()`: a process over 80% of a core for 3 samples, over
512 MB resident, a scratch directory over 256 MB, an agent at 90% of its
kernel quota, requests swapped out for want of KV blocks), one observation a
second, the default guardrails (rate limit, approvals) and verification
deadline. Faults are injected one at a time inside a sandbox the benchmark
creates (a temporary directory and its own child processes, the only things
the operator is granted), each sized by a seeded draw from a range that
straddles the rule's line: a process spinning a drawn share of a core, a
memory hog growing to a drawn size, a scratch directory filling to a drawn
size, an agent looping under a drawn kernel token quota, and KV thrashing
from a drawn cap on KV blocks under a drawn number of long-generating agents
(so one step of the fallback, which multiplies the cap by 4, does not always
fix it). The benchmark measures each fault's own signal itself (psutil, the
directory, the kernel's counters): a fault is "over the line" when that
measurement crossed the rule's threshold, so a missed detection and an
action on a fault below the line are both visible. A no-fault period comes
first: any action there is a false action. The benchmark plays the on-call
human and approves every destructive action the operator queues on its
sandbox, so approval latency is in the timings.

Proposers: the deterministic fallback; the model on the led prompt (the
system prompt names each fault's remedy, the answer schema is narrowed to
the kinds and the target that fit the finding); the model on an unled prompt
(the finding, the whole observation, the full action vocabulary, nothing
narrowed), where a wrong target is possible and is refused or counted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from llmos.agents.operator import (
    ACTION_SCHEMA,
    Actuator,
    ApprovalQueue,
    Detector,
    FallbackPolicy,
    Grants,
    Guardrails,
    Limits,
    LLMProposer,
    Observer,
    Operator,
    default_rules,
    host_kernel,
    operator_process,
)
from llmos.agents.operator.actions import ACTION_KINDS, ActionError, NoAction, parse_action

ACTIONS = ("acted", "queued", "dry_run", "failed")
PROPOSERS = ("fallback", "model", "unled")
_SPIN = ("import time\nd = {duty}\nwhile True:\n    t = time.perf_counter()\n"
         "    while time.perf_counter() - t < 0.1 * d:\n        pass\n    time.sleep(0.1 * (1 - d))\n")
_HOG = ("import time\nchunks = []\nfor _ in range({steps}):\n    chunks.append(bytearray({chunk}))\n"
        "    chunks[-1][::4096] = b'x' * len(chunks[-1][::4096])\n    time.sleep(0.1)\ntime.sleep(600)\n")
_FILL = ("import os, time\nd = {path!r}\nos.makedirs(d, exist_ok=True)\nfor i in range({steps}):\n"
         "    with open(os.path.join(d, f'part{{i:04d}}.bin'), 'wb') as f:\n"
         "        f.write(os.urandom({chunk}))\n    time.sleep(0.05)\n")
_BENIGN = ("import time\nwhile True:\n    t = time.perf_counter()\n"
           "    while time.perf_counter() - t < 0.02:\n        pass\n    time.sleep(0.2)\n")
_MB = 2**20


@dataclass
class BenchConfig:
    """The run's shape; the operator's own settings are not here: they are its defaults."""

    trials: int = 3  # per fault kind
    seed: int = 0
    interval_s: float = 1.0  # `llmos operator`'s default
    window_s: float = 30.0  # a fault's time to be detected and repaired, from when it crossed its line
    quiet_s: float = 30.0  # the no-fault period
    warmup_s: float = 12.0  # the baselines' 10-sample warm-up, before the no-fault period
    kv_budget: str = "128MiB"  # the engine's KV pool in the kernel faults (a bound on a shared machine)
    # the ranges fault sizes are drawn from (uniform), each straddling the default rule's line
    cpu_duty: tuple[float, float] = (0.5, 1.0)  # share of one core a spinning process takes (line: 80%)
    hog_mb: tuple[int, int] = (256, 1024)  # where the memory hog stops growing (line: 512 MB)
    fill_mb: tuple[int, int] = (128, 512)  # where the scratch filler stops (line: 256 MB)
    quota_tokens: tuple[int, int] = (100, 600)  # the looping agent's kernel quota (line: 90% of it)
    thrash_blocks: tuple[int, int] = (8, 48)  # the KV cap (the workload needs about 25 blocks an agent)
    thrash_agents: tuple[int, int] = (4, 8)


def rule_line(kind: str, pattern: str | None = None) -> float:
    """The threshold of the documented rule for `kind` (watching `pattern`, else the first of that kind)."""
    return next(r.threshold for r in default_rules() if r.kind == kind and pattern in (None, r.pattern))


@dataclass
class Fault:
    """One injected fault and the bench's own measurement of the signal the rule watches."""

    kind: str
    name: str
    size: dict[str, Any]
    subject: str
    started: float
    cleanup: Callable[[], None]
    still_faulty: Callable[[], bool]  # ground truth for "repaired", independent of the operator's view
    level: Callable[[], float]  # the rule's signal, measured by the bench
    line: float
    settle_s: float  # by then a fault below the line has shown all it will
    peak: float = 0.0
    crossed: float | None = None  # when the measurement first crossed the line

    def sample(self) -> None:
        try:
            self.peak = max(self.peak, self.level())
        except Exception:  # noqa: BLE001 - the subject went away (killed, exited): nothing to measure
            return
        if self.crossed is None and self.peak > self.line:
            self.crossed = time.monotonic()

    @property
    def over_line(self) -> bool:
        return self.peak > self.line


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
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / _MB if path.exists() else 0.0


def _cpu_level(pid: int, samples: int) -> Callable[[], float]:
    """The least CPU share over the last `samples` measurements: over the line when the rule's streak is."""
    import psutil

    proc = psutil.Process(pid)
    proc.cpu_percent(None)
    last: deque[float] = deque(maxlen=samples)

    def level() -> float:
        last.append(proc.cpu_percent(None))
        return min(last) if len(last) == samples else 0.0

    return level


def _rss_level(pid: int) -> Callable[[], float]:
    import psutil

    proc = psutil.Process(pid)
    return lambda: proc.memory_info().rss / _MB


def draw_sizes(cfg: BenchConfig) -> dict[str, list[dict[str, Any]]]:
    """Each fault kind's `cfg.trials` sizes, drawn with `cfg.seed` from the config's ranges, stratified
    (trial i draws from the i-th of `trials` equal slices of the range, then the order is shuffled) so a
    few trials still cover the range on both sides of the line; every proposer meets the same faults."""
    rng = random.Random(cfg.seed)

    def draw(lo: float, hi: float, whole: bool = True) -> list[Any]:
        step = (hi - lo) / cfg.trials
        out = [rng.uniform(lo + i * step, lo + (i + 1) * step) for i in range(cfg.trials)]
        rng.shuffle(out)
        return [round(x) for x in out] if whole else [round(x, 2) for x in out]

    quotas, blocks, agents = draw(*cfg.quota_tokens), draw(*cfg.thrash_blocks), draw(*cfg.thrash_agents)
    return {
        "runaway_cpu": [{"duty": d} for d in draw(*cfg.cpu_duty, whole=False)],
        "memory_hog": [{"mb": m} for m in draw(*cfg.hog_mb)],
        "scratch_full": [{"mb": m} for m in draw(*cfg.fill_mb)],
        "over_quota": [{"quota": q, "max_tokens": rng.choice((8, 16, 32))} for q in quotas],
        "kv_thrashing": [{"kv_blocks": b, "agents": a} for b, a in zip(blocks, agents, strict=True)],
    }


def _host_fault(kind: str, size: dict[str, Any], sb: _Sandbox) -> Fault:
    now = time.monotonic
    if kind == "runaway_cpu":
        rule = next(r for r in default_rules() if r.kind == kind)
        p = sb.spawn(_SPIN.format(duty=size["duty"]))
        return Fault(kind, f"process spinning {size['duty']:.0%} of a core", size, f"pid:{p.pid}", now(),
                     p.kill, lambda: _alive(p), _cpu_level(p.pid, rule.for_samples), rule.threshold,
                     settle_s=3 * rule.for_samples + 2)
    if kind == "memory_hog":
        chunk = 16 * _MB
        p = sb.spawn(_HOG.format(steps=size["mb"] * _MB // chunk, chunk=chunk))
        return Fault(kind, f"memory hog (to {size['mb']} MB)", size, f"pid:{p.pid}", now(), p.kill,
                     lambda: _alive(p), _rss_level(p.pid), rule_line(kind), settle_s=size["mb"] / 160 + 4)
    if kind == "scratch_full":
        chunk = 4 * _MB
        steps = size["mb"] * _MB // chunk
        p = sb.spawn(_FILL.format(path=str(sb.scratch / "dump"), steps=steps, chunk=chunk))
        line = rule_line(kind)
        return Fault(kind, f"scratch dir filling (to {size['mb']} MB)", size, f"path:{sb.scratch}", now(),
                     p.kill, lambda: _dir_mb(sb.scratch) > line, lambda: _dir_mb(sb.scratch), line,
                     settle_s=size["mb"] / 40 + 4)
    raise ValueError(f"not a host fault: {kind}")


class UnledProposer(LLMProposer):
    """The model on an unled prompt: the finding and the whole observation, the full action vocabulary;
    no remedy is named and neither the kinds nor the targets are narrowed to the finding."""

    name = "llm-unled"
    SYSTEM = ("You are the operator of a computer that runs llmos, an operating system for LLM agents. You "
              "are shown a finding of the operator's detector and the latest observation of the machine "
              "and of llmos. Answer with exactly one action as JSON. The actions: "
              + ", ".join(ACTION_KINDS) + ".")

    def prompt(self, finding: Any, obs: Any, attempts: list[Any]) -> list[dict[str, Any]]:
        facts: dict[str, Any] = {"finding": finding.as_dict(), "observation": _observation(obs)}
        if self.settings is not None:
            facts["settings"] = self.settings()
        if attempts:
            facts["earlier_actions"] = [{"kind": a.kind, "recovered": a.recovered} for a in attempts]
        return [{"role": "system", "content": self.SYSTEM}, {"role": "user", "content": json.dumps(facts)}]

    async def propose(self, finding: Any, obs: Any, attempts: list[Any]) -> Any:
        text = await self.chat(self.prompt(finding, obs, attempts), ACTION_SCHEMA)
        try:
            return parse_action(text)
        except ActionError as e:
            self.invalid += 1
            return NoAction(reason=f"model answer rejected: {e}"[:80])


def _observation(obs: Any) -> dict[str, Any]:
    """An Observation as plain, rounded JSON (what the unled prompt shows)."""
    def clean(x: Any) -> Any:
        if isinstance(x, float):
            return round(x, 2)
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    out = clean(dataclasses.asdict(obs))
    out.pop("t", None)
    return out


class _Run:
    """One proposer's run: the operator's process, observer and detector persist (a long-running
    operator that has learned the sandbox); each fault trial gets fresh guardrails, as if faults came a
    rate-limit window apart, and its own approval queue (an action approved too late for its trial never
    runs in the next one)."""

    def __init__(self, cfg: BenchConfig, sb: _Sandbox, proposer: Any, kernel: Any, grants: Grants,
                 observer: Observer) -> None:
        self.cfg, self.sb, self.proposer, self.kernel, self.grants = cfg, sb, proposer, kernel, grants
        self.observer = observer
        self.detector = Detector()
        self.actuator: Actuator | None = None
        self._queues = 0

    async def operator(self) -> Operator:
        if self.actuator is None:
            self.actuator = Actuator(await operator_process(self.kernel, self.grants), self.grants)
        self._queues += 1
        approvals = ApprovalQueue(self.sb.root / f"approvals-{id(self)}-{self._queues}.db")
        return Operator(self.observer, self.proposer, self.actuator, Guardrails(Limits()),
                        detector=self.detector, approvals=approvals)

    async def drive(self, op: Operator, seconds: float, fault: Fault | None = None,
                    until: Callable[[], bool] | None = None) -> None:
        """Tick `op` for `seconds` (or until `until()`), approving what it queues, as a human would; with a
        `fault`, the seconds count from when it crossed its line (a slow fault gets the whole window)."""
        start = time.monotonic()
        while time.monotonic() < (fault.crossed if fault is not None and fault.crossed else start) + seconds:
            started = time.monotonic()
            if fault is not None:
                fault.sample()
            await op.tick()
            for pending in op.approvals.list():
                op.approvals.decide(pending["id"])
            if until is not None and until():
                return
            await asyncio.sleep(max(0.0, self.cfg.interval_s - (time.monotonic() - started)))

    async def trial(self, fault: Fault, console: Console | None,
                    gone: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """Drive the operator until the fault is repaired, it is `gone()` (ended by someone else), a fault
        below the line has settled with nothing done, or the window ends."""
        op = await self.operator()
        if console:
            console.print(f"[dim]  injected {fault.name} ({fault.subject})[/]")
        await self.drive(op, self.cfg.window_s, fault,
                         until=lambda: _done(fault, op.events) or gone() or (
                             time.monotonic() - fault.started > fault.settle_s and not fault.over_line
                             and not any(e.subject == fault.subject for e in op.events)))
        fault.sample()
        return _summarise(fault, op.events)


def _done(fault: Fault, events: list[Any]) -> bool:
    recovered = any(e.step == "recovered" and e.subject == fault.subject for e in events)
    return recovered and not fault.still_faulty()


def _on_target(subject: str, action: dict[str, Any]) -> bool:
    """Does an action answering a finding about `subject` touch that subject?"""
    kind, _, key = subject.partition(":")
    if kind in ("pid", "agent"):
        agent_action = action["kind"] in ("suspend_agent", "kill_agent")
        return str(action.get("pid")) == key and agent_action == (kind == "agent")
    if kind == "path":
        return action["kind"] == "remove_files" and action["path"].startswith(key.rstrip("/") + "/")
    return action["kind"] == "set_setting"


def _summarise(fault: Fault, events: list[Any]) -> dict[str, Any]:
    mine = [e for e in events if e.subject == fault.subject]
    first = next((e for e in mine if e.step == "finding"), None)
    acted = [e for e in mine if e.step == "acted"]
    recovered = next((e for e in mine if e.step == "recovered"), None)
    repaired = bool(recovered) and not fault.still_faulty()
    return {
        "kind": fault.kind,
        "fault": fault.name,
        "size": fault.size,
        "subject": fault.subject,
        "line": fault.line,
        "peak": round(fault.peak, 2),
        "over_line": fault.over_line,
        "detected": first is not None,
        "time_to_detect_s": round(first.t - fault.started, 2) if first else None,
        "finding": first.detail if first else None,
        "proposals": [e.action for e in mine if e.step == "proposal"],
        "actions": [e.action for e in acted],
        "steps": len(acted),
        "off_target": [e.action for e in acted if not _on_target(fault.subject, e.action)],
        "approvals": sum(e.step == "queued" for e in mine),
        "refused": [e.detail for e in mine if e.step == "refused"],
        "failed": [e.detail for e in mine if e.step == "failed"],  # run, but the syscall reported an error
        "repaired": repaired,
        "time_to_repair_s": round(recovered.t - fault.started, 2) if repaired and recovered else None,
        "rolled_back": sum(e.step == "rolled_back" for e in mine),
        "other_actions": [{"subject": e.subject, "action": e.action, "step": e.step} for e in events
                          if e.step in ACTIONS and e.subject != fault.subject],
    }


async def run_chaos(proposer: Any, cfg: BenchConfig, console: Console | None = None,
                    kernel_model: str | None = None) -> dict[str, Any]:
    """One full run with one proposer: warm-up, the no-fault period, every host fault's trials, then
    (with `kernel_model`) the kernel faults' trials."""
    sizes = draw_sizes(cfg)
    with tempfile.TemporaryDirectory(prefix="llmos-chaos-") as tmp:
        sb = _Sandbox(Path(tmp))
        sb.scratch.mkdir()
        (sb.scratch / "notes.txt").write_text("benign scratch content\n" * 100)
        try:
            sb.spawn("import time; time.sleep(3600)")  # an idle granted process
            sb.spawn(_BENIGN)  # a granted process with a light duty cycle
            kernel = host_kernel(home=sb.root / "host", audit_path=sb.root / "audit.db")
            me = frozenset({os.getpid()})
            run = _Run(cfg, sb, proposer, kernel, Grants(children_of=me, paths=(sb.scratch,)),
                       Observer(children_of=me, scratch=[sb.scratch]))
            op = await run.operator()
            await run.drive(op, cfg.warmup_s)
            mark = len(op.events)
            t0 = time.monotonic()
            await run.drive(op, cfg.quiet_s)
            quiet = op.events[mark:]
            no_fault = {"seconds": round(time.monotonic() - t0, 1),
                        "findings": sum(e.step == "finding" for e in quiet),
                        "false_actions": [{"subject": e.subject, "action": e.action, "step": e.step}
                                          for e in quiet if e.step in ACTIONS]}
            results = []
            for i in range(cfg.trials):  # interleaved: a round of every kind, then the next round
                for kind in ("runaway_cpu", "memory_hog", "scratch_full"):
                    fault = _host_fault(kind, sizes[kind][i], sb)
                    results.append(await run.trial(fault, console))
                    fault.cleanup()
                    if kind == "scratch_full":
                        await asyncio.to_thread(_empty, sb.scratch / "dump")
                    await run.drive(await run.operator(), 2 * cfg.interval_s)  # settle before the next
            await kernel.shutdown()
            if kernel_model is not None:
                results += await _kernel_faults(sb, cfg, proposer, kernel_model, sizes, console)
        finally:
            sb.close()
    return {"proposer": proposer.name, "sizes": sizes, "no_fault": no_fault, "faults": results,
            "invalid_model_answers": getattr(proposer, "invalid", 0)}


def _empty(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


async def _looper(sys: Any, max_tokens: int = 16) -> None:
    """An agent stuck in a loop: it asks the model the same thing forever."""
    while True:
        await sys.llm_chat([{"role": "user", "content": "Say the word again."}], max_tokens=max_tokens)


async def _generator(sys: Any, n: int = 0) -> None:
    """Steady work for the engine: long answers, one after the other."""
    prompt = f"Story {n}. " + "Write a long story about an operating system and its processes. " * 18
    while True:
        await sys.llm_chat([{"role": "user", "content": prompt}], max_tokens=160, seed=n)


async def _kernel_faults(sb: _Sandbox, cfg: BenchConfig, proposer: Any, model: str,
                         sizes: dict[str, list[dict[str, Any]]],
                         console: Console | None) -> list[dict[str, Any]]:
    """Faults that need the kernel and its engine: an agent looping under its quota, and KV thrashing."""
    from llmos.kernel import EngineBackend, Quotas

    kernel = host_kernel(home=sb.root / "home", backend=EngineBackend(model, kv_budget=cfg.kv_budget),
                         audit_path=sb.root / "audit.db")
    engine = kernel.backend.engine
    total = engine.blocks.num_blocks
    results = []
    before = getattr(proposer, "settings", None)
    proposer.settings = kernel.settings
    try:
        run = _Run(cfg, sb, proposer, kernel, Grants(agents=None), Observer(llmos_state=kernel.stats))
        await run.drive(await run.operator(), 2 * cfg.interval_s)
        quota_line = rule_line("over_quota")
        for size in sizes["over_quota"]:
            pid = await kernel.spawn(_looper, name="looper", args={"max_tokens": size["max_tokens"]},
                                     quotas=Quotas(llm_tokens=size["quota"]))
            proc = kernel.process(pid)
            fault = Fault("over_quota", f"agent looping (quota {size['quota']} tokens, "
                          f"{size['max_tokens']} a call)", size, f"agent:{pid}", time.monotonic(),
                          lambda: None,
                          lambda p=proc: p.state.value not in ("suspended", "terminated"),
                          lambda p=proc, q=size["quota"]: p.tokens_used / q, quota_line,
                          settle_s=cfg.window_s)
            row = await run.trial(fault, console, gone=lambda p=proc: p.state.value == "terminated")
            # the kernel's own hard quota ends the agent at 100%: then the operator did not repair it
            row["ended_by_kernel_quota"] = (proc.exit_reason or "").startswith("quota")
            row["repaired"] = row["repaired"] and not row["ended_by_kernel_quota"]
            results.append(row)
            if proc.state.value != "terminated":
                await kernel.kill(pid, "chaos cleanup")
        for size in sizes["kv_thrashing"]:
            workers = [await kernel.spawn(_generator, name=f"gen{i}", args={"n": i})
                       for i in range(size["agents"])]
            await run.drive(await run.operator(), 6.0)  # steady work first
            await kernel.configure(kv_blocks=size["kv_blocks"])
            fault = Fault("kv_thrashing", f"KV thrashing ({size['agents']} agents, kv_blocks {total} -> "
                          f"{size['kv_blocks']})", size, "llmos", time.monotonic(), lambda: None,
                          lambda: len(engine.scheduler.swapped) > 0, lambda: len(engine.scheduler.swapped),
                          rule_line("kv_thrashing", "llmos.num_swapped"), settle_s=cfg.window_s)
            row = await run.trial(fault, console)
            row["kv_blocks_after"] = kernel.settings().get("kv_blocks")
            results.append(row)
            for w in workers:
                await kernel.kill(w, "chaos cleanup")
            await kernel.configure(kv_blocks=total)
            await run.drive(await run.operator(), 2 * cfg.interval_s)
    finally:
        proposer.settings = before
        await kernel.shutdown()
    return results


def summary(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per fault kind: trials, over the line, detected (of those over it), repaired, steps, false actions
    (an action on a fault below the line, or on another subject than the fault's), actions that answered
    the fault's finding on another target (a pid it was not about, say) and refusals."""
    out: dict[str, dict[str, Any]] = {}
    for r in run["faults"]:
        s = out.setdefault(r["kind"], {"trials": 0, "over_line": 0, "detected": 0, "repaired": 0,
                                       "steps_when_repaired": [], "detected_below_line": 0,
                                       "false_actions": 0, "off_target": 0, "refused": 0})
        s["trials"] += 1
        s["off_target"] += len(r["off_target"])
        s["refused"] += len(r["refused"])
        s["false_actions"] += len(r["other_actions"])
        if r["over_line"]:
            s["over_line"] += 1
            s["detected"] += r["detected"]
            s["repaired"] += r["repaired"]
            if r["repaired"]:
                s["steps_when_repaired"].append(r["steps"])
        else:
            s["detected_below_line"] += r["detected"]
            s["false_actions"] += r["steps"]
    return out


def _table(run: dict[str, Any]) -> Table:
    table = Table(title=f"llmos bench operator: proposer {run['proposer']} (default rules)")
    for col in ("fault", "trials", "over the line", "detected", "repaired", "steps", "false actions",
                "off target", "refused"):
        table.add_column(col, justify="left" if col == "fault" else "right")
    for kind, s in summary(run).items():
        over = s["over_line"]
        steps = s["steps_when_repaired"]
        table.add_row(kind, str(s["trials"]), str(over), f"{s['detected']}/{over}"
                      + (f" (+{s['detected_below_line']} below)" if s["detected_below_line"] else ""),
                      f"{s['repaired']}/{over}", f"{sum(steps) / len(steps):.1f}" if steps else "-",
                      str(s["false_actions"]), str(s["off_target"]), str(s["refused"]))
    nf = run["no_fault"]
    table.add_row(f"no fault ({nf['seconds']:.0f} s)", "-", "-", f"{nf['findings']} findings", "-", "-",
                  str(len(nf["false_actions"])), "-", "-")
    return table


def make_proposer(name: str, model: str) -> Any:
    if name == "fallback":
        return FallbackPolicy()
    if name not in ("model", "unled"):
        raise ValueError(f"unknown proposer {name!r} (one of {', '.join(PROPOSERS)})")
    from llmos import LLM
    from llmos.agents.operator.propose import engine_chat

    chat = engine_chat(LLM(model))
    return LLMProposer(chat) if name == "model" else UnledProposer(chat)


def run_operator_bench(console: Console, proposers: tuple[str, ...] = PROPOSERS,
                       model: str = "smollm2-135m-instruct", json_path: str | None = None,
                       config: BenchConfig | None = None, kernel: bool = True) -> dict[str, Any]:
    from llmos.bench.engine import write_report

    cfg = config or BenchConfig()
    load = os.getloadavg()
    runs = []
    for name in proposers:
        with console.status(f"loading {name} ..."):
            proposer = make_proposer(name, model)
        console.print(f"[bold]chaos run with the {name} proposer[/]")
        run = asyncio.run(run_chaos(proposer, cfg, console, model if kernel else None))
        run["summary"] = summary(run)
        if name != "fallback":
            run["model"] = model
        console.print(_table(run))
        if name != "fallback":
            console.print(f"invalid model answers: {run['invalid_model_answers']}")
        runs.append(run)
    report = {"bench": "operator", "config": dataclasses.asdict(cfg),
              "rules": [dataclasses.asdict(r) for r in default_rules()], "machine": platform.machine(),
              "cpus": os.cpu_count(), "loadavg_start": load, "loadavg_end": os.getloadavg(),
              "approval": "the benchmark approves every queued action on its sandbox", "runs": runs}
    write_report(report, json_path, "bench-results/operator.json", console)
    return report
