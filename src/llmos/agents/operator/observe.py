"""Observation: the operator's view of the machine, like a sysadmin reading /proc.

One `Observation` is a snapshot taken at one instant: host totals (psutil),
the processes the operator was granted, the size of its granted scratch
directories, and llmos's own state (engine KV usage, queues, preemption rate,
agents and their quotas) from any callable that returns the kernel's stats
dict. Everything the detector looks at is one flat `signals()` mapping of
name -> number, so rules and baselines treat every source alike.
"""

from __future__ import annotations

import inspect
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

StateFn = Callable[[], dict[str, Any] | Awaitable[dict[str, Any]]]
_MB = 2**20


@dataclass(frozen=True)
class ProcessSample:
    pid: int
    name: str
    cmdline: str
    cpu_percent: float
    rss_bytes: int
    nice: int
    descendants: int


@dataclass(frozen=True)
class ScratchSample:
    path: str
    bytes: int
    files: int
    largest: list[tuple[str, int]]  # top-level entries by size, biggest first


@dataclass
class Observation:
    t: float
    host: dict[str, float]
    processes: dict[int, ProcessSample] = field(default_factory=dict)
    scratch: dict[str, ScratchSample] = field(default_factory=dict)
    llmos: dict[str, float] = field(default_factory=dict)
    agents: dict[int, dict[str, Any]] = field(default_factory=dict)

    def signals(self) -> dict[str, float]:
        """Every number the detector watches, under a stable name."""
        out = {f"host.{k}": float(v) for k, v in self.host.items()}
        for pid, p in self.processes.items():
            out[f"proc.{pid}.cpu_percent"] = p.cpu_percent
            out[f"proc.{pid}.rss_mb"] = p.rss_bytes / _MB
        for path, s in self.scratch.items():
            out[f"scratch.{path}.mb"] = s.bytes / _MB
        out.update({f"llmos.{k}": float(v) for k, v in self.llmos.items()})
        for pid, a in self.agents.items():
            if a.get("quota_use") is not None:
                out[f"agent.{pid}.quota_use"] = float(a["quota_use"])
            out[f"agent.{pid}.errors"] = float(a.get("syscall_errors", 0))
        return out

    def evidence(self, subject: str) -> dict[str, Any]:
        """What a reader (human or model) needs to judge a finding about `subject`."""
        kind, _, key = subject.partition(":")
        ev: dict[str, Any] = {"host": {k: round(v, 1) for k, v in self.host.items()}}
        if kind == "pid" and key.isdigit() and int(key) in self.processes:
            p = self.processes[int(key)]
            ev["process"] = {"pid": p.pid, "name": p.name, "cmdline": p.cmdline[:120],
                             "cpu_percent": round(p.cpu_percent, 1), "rss_mb": round(p.rss_bytes / _MB, 1),
                             "nice": p.nice, "descendants": p.descendants}
        elif kind == "path" and key in self.scratch:
            s = self.scratch[key]
            ev["scratch"] = {"path": s.path, "mb": round(s.bytes / _MB, 1), "files": s.files,
                             "largest": [[name, round(b / _MB, 1)] for name, b in s.largest]}
        elif kind == "agent" and key.isdigit() and int(key) in self.agents:
            ev["agent"] = self.agents[int(key)]
        if self.llmos:
            ev["llmos"] = {k: round(v, 3) for k, v in self.llmos.items()}
        return ev


def granted_processes(pids: Iterable[int], children_of: Iterable[int]) -> dict[int, psutil.Process]:
    """The live processes named in a grant: listed pids, and every descendant of a listed parent."""
    out: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid)
        except psutil.Error:
            pass
    for parent in children_of:
        try:
            for child in psutil.Process(parent).children(recursive=True):
                out[child.pid] = child
        except psutil.Error:
            pass
    return out


def dir_usage(path: Path, top: int = 5) -> ScratchSample:
    """Bytes and files under `path`, and its biggest top-level entries. The walk goes from a directory
    fd and never follows a symlink (llmos.security.fs.Walk), so an agent that swaps a directory for a
    link while it is measured cannot make the operator measure, and then act on, a host directory."""
    from llmos.security.fs import Walk

    total = files = 0
    sizes: dict[str, int] = {}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ScratchSample(str(path), 0, 0, [])
    try:
        for entry in Walk(fd, recursive=True):
            if not stat.S_ISREG(entry.st.st_mode):  # directories, and links never followed
                sizes.setdefault(entry.parts[0], 0)
                continue
            sizes[entry.parts[0]] = sizes.get(entry.parts[0], 0) + entry.st.st_size
            total += entry.st.st_size
            files += 1
    except OSError:
        pass  # the directory went away while it was measured: what was seen stands
    finally:
        os.close(fd)
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:top]
    return ScratchSample(str(path), total, files, largest)


class Observer:
    """Samples the host and llmos; per-process CPU is measured between consecutive samples."""

    def __init__(self, pids: Iterable[int] = (), children_of: Iterable[int] = (),
                 scratch: Iterable[str | Path] = (), llmos_state: StateFn | None = None,
                 agent_budget: dict[str, int] | None = None) -> None:
        self.pids = set(pids)
        self.children_of = set(children_of)
        self.scratch = [Path(p) for p in scratch]
        self.llmos_state = llmos_state
        self.agent_budget = agent_budget or {}  # {"llm_tokens": n, "tool_calls": n}
        self._procs: dict[int, psutil.Process] = {}
        self._last_llmos: tuple[float, dict[str, Any]] | None = None
        psutil.cpu_percent(None)  # start the host CPU interval

    async def sample(self) -> Observation:
        t = time.monotonic()
        vm = psutil.virtual_memory()
        host = {"cpu_percent": psutil.cpu_percent(None), "mem_percent": vm.percent,
                "mem_available_mb": vm.available / _MB, "load1": os.getloadavg()[0]}
        obs = Observation(t, host)
        live = granted_processes(self.pids, self.children_of)
        # keep the same psutil.Process objects: cpu_percent(None) is the usage since the last call
        procs: dict[int, psutil.Process] = {}
        for pid, p in live.items():
            old = self._procs.get(pid)
            try:
                procs[pid] = old if old is not None and old.create_time() == p.create_time() else p
            except psutil.Error:
                continue
        self._procs = procs
        for pid, p in self._procs.items():
            try:
                with p.oneshot():
                    obs.processes[pid] = ProcessSample(
                        pid, p.name(), " ".join(p.cmdline())[:200], p.cpu_percent(None),
                        p.memory_info().rss, p.nice(), len(p.children(recursive=True)))
            except psutil.Error:
                continue
        for path in self.scratch:
            obs.scratch[str(path)] = dir_usage(path)
        if self.llmos_state is not None:
            stats = self.llmos_state()
            if inspect.isawaitable(stats):  # Kernel.stats is a coroutine
                stats = await stats
            obs.llmos, obs.agents = self._llmos(t, stats or {})
        return obs

    def _llmos(self, t: float, stats: dict[str, Any]) -> tuple[dict[str, float], dict[int, dict[str, Any]]]:
        engine = stats.get("engine", stats)
        out = {k: float(engine[k]) for k in ("kv_usage", "kv_blocks_used", "kv_blocks_total", "num_running",
                                             "num_waiting", "num_swapped", "preemptions") if k in engine}
        if "kv_usage" not in out and engine.get("kv_blocks_total"):
            out["kv_usage"] = engine.get("kv_blocks_used", 0) / engine["kv_blocks_total"]
        if self._last_llmos is not None and "preemptions" in out:
            t0, prev = self._last_llmos
            dt = max(t - t0, 1e-6)
            out["preemption_rate"] = max(0.0, out["preemptions"] - prev.get("preemptions", 0.0)) / dt
        self._last_llmos = (t, out)
        agents: dict[int, dict[str, Any]] = {}
        raw = stats.get("agents", [])
        for a in raw.values() if isinstance(raw, dict) else raw:
            if a.get("state") in ("terminated", "suspended"):
                continue
            info = {k: a.get(k) for k in ("pid", "name", "state", "tokens_used", "tool_calls",
                                          "syscall_errors") if k in a}
            quotas = a.get("quotas") or {}
            if not isinstance(quotas, dict):
                quotas = dict(getattr(quotas, "__dict__", {}))
            # the operator's own budget where the kernel sets no quota: a soft limit it enforces by suspending
            limits = {"tokens_used": quotas.get("llm_tokens") or self.agent_budget.get("llm_tokens"),
                      "tool_calls": quotas.get("tool_calls") or self.agent_budget.get("tool_calls")}
            uses = [a.get(k, 0) / v for k, v in limits.items() if v]
            info["quotas"] = {k: v for k, v in limits.items() if v}
            info["quota_use"] = max(uses) if uses else None
            agents[int(a["pid"])] = info
        return out, agents
