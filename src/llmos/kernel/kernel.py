"""The kernel: agents are processes, their requests are system calls.

Each agent runs as an asyncio task with a process control block; it reaches
the model, tools and other agents only through its syscall handle and
`syscall`, which logs every call (pid, name, truncated arguments, status,
timing); the handlers and the one tool path live in kernel/syscall.py. LLM
calls go through the agent scheduler to one backend; tool calls pass the
reference monitor, which a kernel has by default (allow-all only by name).
A child's quotas are at most its parent's remaining, and its use counts
against its ancestors' quotas too.
Killing an agent cancels its task, which aborts its in-flight LLM request
and frees its KV blocks before `kill` returns. Quotas end an agent with a
reason that says which one it exceeded. The process table is saved to SQLite
a few times a second and on every state change that ends a process.
A process is a program of LLM calls: its calls share one context key, so the
engine can keep the KV of its context across its tool calls (kept, swapped or
released, as the retention policy decides per tool call) and its next call
reuses it; what that saved or cost each process (`Process.program`) and every
decision are in `stats()` and the kernel's event stream (`events`, `on_event`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from llmos.home import llmos_home
from llmos.kernel.api import ToolResult
from llmos.kernel.backend import Backend
from llmos.kernel.process import Process, ProcessState, Quotas
from llmos.kernel.sched import AgentScheduler, LLMCall, SchedulerSettings
from llmos.kernel.syscall import (
    DEFAULT_TOOL_TIMEOUT_S,
    HANDLERS,
    SyscallError,
    Terminated,
    ToolExecutor,
    start_agent,
)
from llmos.kernel.table import ProcessTable
from llmos.security.monitor import AllowAllMonitor, Monitor, ReferenceMonitor
from llmos.tools.base import ToolRegistry

Program = Callable[..., Awaitable[Any]]
HOUSEKEEPING_S = 0.25  # how often the process table and signals are looked at
ZOMBIES = 256  # ended processes kept in memory for wait/ps; older ones live on only in the process table
EVENTS = 1024  # recent kernel events kept for readers of the event stream


__all__ = ["Kernel", "Program", "SyscallError", "Terminated"]


def _child_quotas(parent: Process, requested: Quotas | None) -> Quotas:
    """A child's quotas: each at most what its parent has left of it (by default all of that).

    PermissionError when the child asks for more than is left, or nothing is left."""
    q, asked = parent.quotas, requested or Quotas()
    left = {"llm_tokens": None if q.llm_tokens is None else q.llm_tokens - parent.tokens_used,
            "tool_calls": None if q.tool_calls is None else q.tool_calls - parent.tool_calls,
            "wall_time_s": None if q.wall_time_s is None else q.wall_time_s - (time.time() - parent.created)}
    out: dict[str, Any] = {}
    for name, remaining in left.items():
        want = getattr(asked, name)
        if remaining is None:
            out[name] = want
        elif remaining <= 0:
            raise PermissionError(f"cannot give a child any {name}: its parent has none left")
        elif want is not None and want > remaining:
            raise PermissionError(f"quota {name}={want:g} exceeds the parent's remaining {remaining:g}")
        else:
            out[name] = want if want is not None else remaining
    return Quotas(**out)


class Kernel:
    def __init__(
        self,
        backend: Backend,
        *,
        home: Path | str | None = None,
        tools: ToolRegistry | None = None,
        monitor: Monitor | Literal["allow-all"] | None = None,
        policy: str = "fifo",
        max_running: int = 8,
        quantum: int = 16,
        aging: int = 64,
        default_capabilities: Callable[[Path], Any] | None = None,
        tool_timeout_s: float = DEFAULT_TOOL_TIMEOUT_S,
        executor: ToolExecutor | None = None,
    ) -> None:
        """`monitor`: None gives the ReferenceMonitor with default grants (no audit log); the
        permissive AllowAllMonitor only when asked for by name, `monitor="allow-all"`."""
        self.backend = backend
        self.home = Path(home) if home is not None else llmos_home()
        self.tools = tools or ToolRegistry()
        if monitor == "allow-all":
            monitor = AllowAllMonitor()
        elif isinstance(monitor, str):
            raise ValueError(f"monitor must be a Monitor, None (the reference monitor) or 'allow-all', "
                             f"got {monitor!r}")
        self.monitor: Monitor = monitor if monitor is not None else ReferenceMonitor(tools=self.tools)
        self.default_capabilities = default_capabilities
        self.tool_timeout_s = tool_timeout_s
        self.executor = executor or ToolExecutor()
        self.sched = AgentScheduler(SchedulerSettings(policy, max_running, quantum, aging))
        backend.attach(self.sched, self._on_switch)
        self.table = ProcessTable(self.home / "kernel.db")
        self.boot = self.table.start_boot()
        self.procs: dict[int, Process] = {}
        self._ended: collections.deque[int] = collections.deque()  # pids of ended processes, oldest first
        self.on_output: Callable[[Process, str], None] | None = None
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS)
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        self._housekeeper: asyncio.Task | None = None
        self._kv_prefix = secrets.token_hex(4)  # context keys of kernels sharing one engine never collide

    # -- process management ----------------------------------------------------------

    async def spawn(self, program: Program, name: str | None = None, *, args: dict[str, Any] | None = None,
                    priority: int = 0, weight: float = 1.0, quotas: Quotas | None = None,
                    capabilities: Any = None, parent: int | None = None, owner: str | None = None) -> int:
        """Start an agent program as a new process for user `owner` (default: the parent's, else the
        local user); returns its pid."""
        run = getattr(program, "run", program)
        if not callable(run) or not inspect.iscoroutinefunction(run):
            raise SyscallError(f"an agent program must be an async function, got {program!r}")
        if weight <= 0:
            raise SyscallError(f"weight must be positive, got {weight}")
        name = name or getattr(program, "__name__", None) or type(program).__name__
        if parent is not None:
            parent_proc = self.process(parent)
            capabilities = self.monitor.attenuate(parent_proc, capabilities)
            quotas = _child_quotas(parent_proc, quotas)
        if parent is not None:  # a child runs for its parent's user, never for another one
            if owner not in (None, self.process(parent).owner):
                raise SyscallError("a child process runs for its parent's user")
            owner = self.process(parent).owner
        owner = owner or "local"
        self._ensure_housekeeper()
        pid = self.table.new_pid(name, parent, owner)
        workdir = self.home / "scratch" / str(pid)
        workdir.mkdir(parents=True, exist_ok=True)
        if capabilities is None and self.default_capabilities is not None:
            capabilities = self.default_capabilities(workdir)
        proc = Process(pid, name, parent, priority, weight, quotas or Quotas(), capabilities,
                       workdir=workdir, owner=owner)
        self.procs[pid] = proc
        if parent is not None:
            self.monitor.flow(self.process(parent), proc)  # its arguments may carry what the parent read
        proc.set_state(ProcessState.RUNNING)
        proc.task = start_agent(self, proc, run, args or {})
        if proc.quotas.wall_time_s is not None:
            asyncio.get_running_loop().call_later(
                proc.quotas.wall_time_s, lambda: asyncio.ensure_future(
                    self.kill(pid, f"quota exceeded: wall_time_s {proc.quotas.wall_time_s}", prefix=False)))
        return pid

    def ended(self, proc: Process, task: asyncio.Task) -> None:
        """The agent's task ended (its done callback): record why, drop what the monitor tracked."""
        reason = "exited"
        if task.cancelled():
            reason = proc.exit_reason or "killed"
        elif isinstance(e := task.exception(), Terminated):
            reason = e.reason
        elif isinstance(e, asyncio.CancelledError):
            reason = proc.exit_reason or "killed"
        elif e is not None:  # the agent's own bug ends the agent, not the kernel
            reason = f"error: {type(e).__name__}: {e}"
        else:
            proc.result = task.result()
        proc.state, proc.exit_reason, proc.ended = ProcessState.TERMINATED, reason, time.time()
        self.monitor.forget(proc)
        if self.retains_kv:  # its retained context goes back to the prefix cache
            asyncio.ensure_future(self._forget(self.context_key(proc)))
        self.table.save([self._row(proc)])
        self._ended.append(proc.pid)
        self._reap()

    async def _forget(self, key: str) -> None:
        with contextlib.suppress(Exception):  # an engine shut down has nothing left to forget
            await self.backend.forget(key)  # type: ignore[attr-defined]

    def _reap(self) -> None:
        """Forget the oldest ended processes beyond ZOMBIES (a server spawns one per message, forever);
        their rows stay in the process table. A process with a live descendant is kept, since quotas
        and tool threads are shared along the lineage."""
        lineages = {a.pid for p in self.procs.values() if p.alive for a in self.lineage(p)}
        for _ in range(len(self._ended) - ZOMBIES):
            pid = self._ended.popleft()
            if pid in lineages:
                self._ended.append(pid)  # look again later
            else:
                self.procs.pop(pid, None)

    def tree_of(self, proc: Process) -> int:
        """The pid of the top ancestor of `proc` (its process tree shares tool threads and quotas)."""
        while proc.parent is not None and proc.parent in self.procs:
            proc = self.procs[proc.parent]
        return proc.pid

    def lineage(self, proc: Process) -> list[Process]:
        """`proc` and its ancestors in this kernel, nearest first."""
        out = [proc]
        while out[-1].parent is not None and out[-1].parent in self.procs:
            out.append(self.procs[out[-1].parent])
        return out

    def charge(self, proc: Process, *, tokens: int = 0, tool_calls: int = 0) -> None:
        """Count use against `proc` and every ancestor (a parent's quota covers its children's use)."""
        for p in self.lineage(proc):
            p.tokens_used += tokens
            p.tool_calls += tool_calls
            p.dirty = True

    def over_quota(self, proc: Process, *, before: str | None = None) -> str | None:
        """Why `proc` must end for a quota of its own or an ancestor's, or None. `before="llm_tokens"`
        (or "tool_calls") asks whether one more call of that kind is still allowed."""
        for p in self.lineage(proc):
            if before is not None:
                quota = getattr(p.quotas, before)
                used = p.tokens_used if before == "llm_tokens" else p.tool_calls
                why = None if quota is None or used < quota else \
                    f"quota exceeded: {before} used {used} of {quota}"
            else:
                why = p.over_quota()
            if why is not None:
                return why if p is proc else f"{why} by agent {p.pid} ({p.name}), whose quota it shares"
        return None

    def process(self, pid: int) -> Process:
        try:
            return self.procs[pid]
        except KeyError:
            raise SyscallError(f"no agent with pid {pid} in this kernel") from None

    def ps(self) -> list[Process]:
        return list(self.procs.values())

    def workdir(self, pid: int) -> Path:
        return self.process(pid).workdir

    async def wait(self, pid: int) -> Any:
        """Wait for an agent to end; returns its program's result."""
        proc = self.process(pid)
        await asyncio.wait([proc.task])
        return proc.result

    async def kill(self, pid: int, reason: str = "killed", *, prefix: bool = True) -> None:
        """End an agent now; its in-flight LLM request is aborted and its KV blocks are free
        when this returns."""
        proc = self.process(pid)
        if not proc.alive or proc.task is None:
            return
        proc.exit_reason = f"killed: {reason}" if prefix else reason
        if proc.task is asyncio.current_task():
            raise Terminated(proc.exit_reason)
        proc.task.cancel()
        await asyncio.wait([proc.task])
        if pid in self.sched.held:
            await self.backend.run_in_scheduler(lambda: self.sched.release(pid))

    async def suspend(self, pid: int) -> None:
        """Stop an agent at its next syscall boundary; its LLM call leaves the engine."""
        proc = self.process(pid)
        if not proc.alive or proc.state is ProcessState.SUSPENDED:
            return
        proc.before_suspend = proc.state
        proc.state, proc.dirty = ProcessState.SUSPENDED, True
        proc.resumed.clear()
        await self.backend.run_in_scheduler(lambda: self.sched.hold(pid))

    async def resume(self, pid: int) -> None:
        proc = self.process(pid)
        if proc.state is not ProcessState.SUSPENDED:
            return
        proc.state, proc.dirty = proc.before_suspend or ProcessState.READY, True
        proc.resumed.set()
        await self.backend.run_in_scheduler(lambda: self.sched.release(pid))

    # -- scheduling ----------------------------------------------------------------------

    def _on_switch(self, call: LLMCall, started: bool) -> None:
        proc = self.procs.get(call.pid)
        if proc is not None:
            proc.set_state(ProcessState.RUNNING if started else ProcessState.READY)

    # -- programs: LLM calls with tool calls between them ------------------------------

    @property
    def retains_kv(self) -> bool:
        """The backend keeps a context's KV across tool calls (the embedded engine)."""
        return hasattr(self.backend, "between_calls")

    def context_key(self, proc: Process) -> str:
        """The key all of `proc`'s LLM calls share, under which its context's KV is retained."""
        return f"{self._kv_prefix}-pid-{proc.pid}"

    def event(self, pid: int, kind: str, **fields: Any) -> None:
        """Append to the kernel's event stream (and hand it to `on_event`)."""
        record = {"t": time.time(), "pid": pid, "kind": kind, **fields}
        self.events.append(record)
        if self.on_event is not None:
            self.on_event(record)

    def llm_call_ended(self, proc: Process, prompt_tokens: int, cached_tokens: int, seconds: float) -> None:
        p = proc.program
        p.prompt_tokens_reused += cached_tokens
        p.prompt_tokens_computed += prompt_tokens - cached_tokens
        p.llm_s += seconds
        self.event(proc.pid, "llm_call", prompt_tokens=prompt_tokens, reused=cached_tokens,
                   seconds=round(seconds, 4))

    def tool_started(self, proc: Process, tool: str) -> asyncio.Future | None:
        """`proc`'s LLM call ended and it runs `tool`: the retention policy decides what happens to
        its context's KV, on the engine thread while the tool already runs (the tool never waits)."""
        if not self.retains_kv:
            return None
        decided = asyncio.ensure_future(
            self.backend.between_calls(self.context_key(proc), proc.name, tool))  # type: ignore[attr-defined]
        decided.add_done_callback(functools.partial(self._retention_decided, proc, tool))
        return decided

    def _retention_decided(self, proc: Process, tool: str, decided: asyncio.Future) -> None:
        if decided.cancelled() or decided.exception() is not None or decided.result() is None:
            return  # nothing was retained (no LLM call before this tool, or the engine is gone)
        d = decided.result()
        proc.program.retention[d.action] = proc.program.retention.get(d.action, 0) + 1
        self.event(proc.pid, "kv_retention", action=d.action, tool=tool, ttl=round(d.ttl, 3),
                   expected_tool_s=round(d.expected_tool_s, 4),
                   costs={k: round(v, 6) for k, v in d.costs.items()})

    def tool_ended(self, proc: Process, tool: str, seconds: float, status: str) -> None:
        """Teach the backend how long `tool` takes for this agent; count the time."""
        proc.program.tool_s += seconds
        if self.retains_kv:
            self.backend.tool_finished(proc.name, tool, seconds)  # type: ignore[attr-defined]
        self.event(proc.pid, "tool_call", tool=tool, status=status, seconds=round(seconds, 4))

    def settings(self) -> dict[str, Any]:
        s = self.sched.settings
        out: dict[str, Any] = {"policy": s.policy, "max_running": s.max_running, "quantum": s.quantum,
                               "aging": s.aging}
        engine = getattr(self.backend, "engine", None)
        if engine is not None:
            out["kv_blocks"] = engine.blocks.capacity
        return out

    async def configure(self, **changes: Any) -> dict[str, Any]:
        """Change scheduler and engine settings at run time; returns the previous values."""
        old: dict[str, Any] = {}
        kv = changes.pop("kv_blocks", None)
        if kv is not None:
            if not hasattr(self.backend, "set_kv_capacity"):
                raise SyscallError("kv_blocks can only be set on the embedded engine")
            old["kv_blocks"] = await self.backend.run_in_scheduler(lambda: self.backend.set_kv_capacity(kv))
        if changes:
            try:
                old |= await self.backend.run_in_scheduler(lambda: self.sched.configure(**changes))
            except ValueError as e:
                raise SyscallError(str(e)) from None
        return old

    async def set_policy(self, policy: str) -> str:
        return (await self.configure(policy=policy))["policy"]

    async def stats(self) -> dict[str, Any]:
        """Engine, scheduler and per-agent state in one snapshot (what `llmos top` shows)."""
        engine = await self.backend.stats()

        def sched_state() -> dict[str, Any]:
            return {"sched_running": len(self.sched.running), "sched_waiting": len(self.sched.waiting),
                    "sched_preemptions": self.sched.preemptions, "tick": self.sched.tick}

        programs = [{"pid": p.pid, "name": p.name, **p.program.as_dict()}
                    for p in self.procs.values() if p.alive]
        return {**self.settings(), **await self.backend.run_in_scheduler(sched_state), "engine": engine,
                "programs": programs, "agents": [p.info() for p in self.procs.values()]}

    # -- syscalls ------------------------------------------------------------------------

    async def syscall(self, pid: int, name: str, /, **args: Any) -> Any:
        proc = self.process(pid)
        if not proc.alive:
            raise Terminated(proc.exit_reason or "terminated")
        await proc.resumed.wait()  # a suspended agent stops here
        handler = HANDLERS.get(name)
        if handler is None:
            raise SyscallError(f"no syscall named {name!r}")
        proc.syscalls += 1
        proc.current_syscall, proc.dirty = name, True
        started, status = time.time(), "ok"
        try:
            result = await handler(self, proc, **args)
            if isinstance(result, ToolResult) and not result.ok:
                status = result.status
                proc.syscall_errors += 1
        except (Terminated, asyncio.CancelledError):
            status = "killed"
            raise
        except Exception:
            status = "error"
            proc.syscall_errors += 1
            raise
        finally:
            proc.current_syscall, proc.dirty = None, True
            shown = {k: v for k, v in args.items() if v is not None}
            try:
                self.table.log_syscall(pid, name, shown, status, started, time.time() - started)
            except (ValueError, TypeError, RecursionError) as e:  # huge, deep or circular arguments
                self.table.log_syscall(pid, name, {"unreadable": f"{type(e).__name__}: {e}"[:200]}, status,
                                       started, time.time() - started)
        await proc.resumed.wait()  # suspended during the call: the result waits for resume
        return result

    def emit(self, pid: int, text: str) -> None:
        proc = self.process(pid)
        proc.output.append(text)
        if self.on_output is not None:
            self.on_output(proc, text)

    # -- housekeeping: the process table, signals, shutdown -----------------------------------

    def _row(self, proc: Process) -> dict[str, Any]:
        proc.dirty = False
        info = proc.info()
        info["quotas"] = str({k: v for k, v in info["quotas"].items() if v is not None})
        info["result"] = None if proc.result is None else str(proc.result)
        return info

    def _ensure_housekeeper(self) -> None:
        if self._housekeeper is None or self._housekeeper.done():
            self._housekeeper = asyncio.create_task(self._housekeep(), name="kernel-housekeeper")

    async def _housekeep(self) -> None:
        beat = 0
        while True:
            await self.sync()
            beat += 1
            if beat % 2 == 0:
                with contextlib.suppress(Exception):  # a dead engine must not stop the table
                    stats = await self.stats()
                    stats.pop("agents")
                    self.table.heartbeat(stats)
            await asyncio.sleep(HOUSEKEEPING_S)

    async def sync(self) -> None:
        """Write changed process rows and act on signals sent from other terminals."""
        dirty = [self._row(p) for p in self.procs.values() if p.dirty]
        if dirty:
            self.table.save(dirty)
        for sig in self.table.take_signals():
            outcome = await self._signal(sig["pid"], sig["signal"])
            self.table.signal_handled(sig["id"], outcome)

    async def _signal(self, pid: int, signal: str, reason: str = "signal from llmos kill") -> str:
        actions = {"kill": lambda: self.kill(pid, reason),
                   "suspend": lambda: self.suspend(pid), "resume": lambda: self.resume(pid)}
        if signal not in actions:
            return f"unknown signal {signal!r}"
        if pid not in self.procs or not self.procs[pid].alive:
            return f"pid {pid} is not running"
        await actions[signal]()
        return f"{signal}: done"

    async def shutdown(self, close_backend: bool = True) -> None:
        """Kill the agents still running, save the table, and end this boot."""
        for proc in list(self.procs.values()):
            if proc.alive:
                await self.kill(proc.pid, "kernel shut down", prefix=False)
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeper
        self.table.save([self._row(p) for p in self.procs.values()])
        self.table.end_boot(self.boot)
        self.table.close()
        if close_backend:
            self.backend.close()

    async def __aenter__(self) -> Kernel:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()
