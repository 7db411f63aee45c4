"""The kernel: agents are processes, their requests are system calls.

Each agent runs as an asyncio task with a process control block; it reaches
the model, tools and other agents only through `syscall`, which logs every
call (pid, name, truncated arguments, status, timing). LLM calls go through
the agent scheduler to one backend; tool calls pass the reference monitor.
Killing an agent cancels its task, which aborts its in-flight LLM request
and frees its KV blocks before `kill` returns. Quotas end an agent with a
reason that says which one it exceeded. The process table is saved to SQLite
a few times a second and on every state change that ends a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from llmos.home import llmos_home
from llmos.kernel.api import Syscalls, ToolResult
from llmos.kernel.backend import Backend, GenerationParams, new_call_id
from llmos.kernel.process import Process, ProcessState, Quotas
from llmos.kernel.sched import AgentScheduler, LLMCall, SchedulerSettings
from llmos.kernel.table import ProcessTable
from llmos.security.monitor import AllowAllMonitor, Decision, Monitor
from llmos.tools.base import ToolContext, ToolError, ToolRegistry

Program = Callable[..., Awaitable[Any]]
HOUSEKEEPING_S = 0.25  # how often the process table and signals are looked at


class SyscallError(Exception):
    """A syscall the kernel refused (bad arguments, unknown agent); the agent may catch it."""


class Terminated(BaseException):
    """Ends an agent from inside its own task (a quota); BaseException so `except Exception`
    in agent code cannot swallow it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Kernel:
    def __init__(
        self,
        backend: Backend,
        *,
        home: Path | str | None = None,
        tools: ToolRegistry | None = None,
        monitor: Monitor | None = None,
        policy: str = "fifo",
        max_running: int = 8,
        quantum: int = 16,
        aging: int = 64,
        default_capabilities: Callable[[Path], Any] | None = None,
    ) -> None:
        self.backend = backend
        self.home = Path(home) if home is not None else llmos_home()
        self.tools = tools or ToolRegistry()
        self.monitor: Monitor = monitor or AllowAllMonitor()
        self.default_capabilities = default_capabilities
        self.sched = AgentScheduler(SchedulerSettings(policy, max_running, quantum, aging))
        backend.attach(self.sched, self._on_switch)
        self.table = ProcessTable(self.home / "kernel.db")
        self.boot = self.table.start_boot()
        self.procs: dict[int, Process] = {}
        self.on_output: Callable[[Process, str], None] | None = None
        self._housekeeper: asyncio.Task | None = None
        self._handlers: dict[str, Callable[..., Awaitable[Any]]] = {
            "llm_chat": self._sys_llm_chat, "llm_generate": self._sys_llm_generate,
            "tool_call": self._sys_tool_call, "spawn": self._sys_spawn, "wait": self._sys_wait,
            "sleep": self._sys_sleep, "kernel_stats": self._sys_kernel_stats,
            "configure": self._sys_configure, "signal": self._sys_signal,
        }

    # -- process management ----------------------------------------------------------

    async def spawn(self, program: Program, name: str | None = None, *, args: dict[str, Any] | None = None,
                    priority: int = 0, weight: float = 1.0, quotas: Quotas | None = None,
                    capabilities: Any = None, parent: int | None = None) -> int:
        """Start an agent program as a new process; returns its pid."""
        run = getattr(program, "run", program)
        if not callable(run) or not inspect.iscoroutinefunction(run):
            raise SyscallError(f"an agent program must be an async function, got {program!r}")
        if weight <= 0:
            raise SyscallError(f"weight must be positive, got {weight}")
        name = name or getattr(program, "__name__", None) or type(program).__name__
        if parent is not None:
            parent_caps = self.process(parent).capabilities
            capabilities = self.monitor.attenuate(parent_caps, capabilities if capabilities is not None
                                                  else parent_caps)
        self._ensure_housekeeper()
        pid = self.table.new_pid(name, parent)
        workdir = self.home / "scratch" / str(pid)
        workdir.mkdir(parents=True, exist_ok=True)
        if capabilities is None and self.default_capabilities is not None:
            capabilities = self.default_capabilities(workdir)
        proc = Process(pid, name, parent, priority, weight, quotas or Quotas(), capabilities,
                       workdir=workdir)
        self.procs[pid] = proc
        proc.task = asyncio.create_task(self._run(proc, run, args or {}), name=f"agent-{pid}")
        if proc.quotas.wall_time_s is not None:
            asyncio.get_running_loop().call_later(
                proc.quotas.wall_time_s, lambda: asyncio.ensure_future(
                    self.kill(pid, f"quota exceeded: wall_time_s {proc.quotas.wall_time_s}", prefix=False)))
        return pid

    async def _run(self, proc: Process, run: Program, args: dict[str, Any]) -> None:
        proc.set_state(ProcessState.RUNNING)
        try:
            proc.result = await run(Syscalls(self, proc.pid), **args)
            reason = "exited"
        except Terminated as t:
            reason = t.reason
        except asyncio.CancelledError:
            reason = proc.exit_reason or "killed"
        except Exception as e:  # the agent's own bug ends the agent, not the kernel
            reason = f"error: {type(e).__name__}: {e}"
        proc.state, proc.exit_reason, proc.ended = ProcessState.TERMINATED, reason, time.time()
        self.monitor.forget(proc)
        self.table.save([self._row(proc)])

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

        return {**self.settings(), **await self.backend.run_in_scheduler(sched_state), "engine": engine,
                "agents": [p.info() for p in self.procs.values()]}

    # -- syscalls ------------------------------------------------------------------------

    async def syscall(self, pid: int, name: str, /, **args: Any) -> Any:
        proc = self.process(pid)
        if not proc.alive:
            raise Terminated(proc.exit_reason or "terminated")
        await proc.resumed.wait()  # a suspended agent stops here
        handler = self._handlers.get(name)
        if handler is None:
            raise SyscallError(f"no syscall named {name!r}")
        proc.syscalls += 1
        proc.current_syscall, proc.dirty = name, True
        started, status = time.time(), "ok"
        try:
            result = await handler(proc, **args)
            if isinstance(result, ToolResult) and not result.ok:
                status = "denied" if (result.error or "").startswith("denied") else "error"
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
            self.table.log_syscall(pid, name, {k: v for k, v in args.items() if v is not None}, status,
                                   started, time.time() - started)
        await proc.resumed.wait()  # suspended during the call: the result waits for resume
        return result

    async def _sys_llm_chat(self, proc: Process, messages: list[dict[str, Any]], **params: Any) -> Any:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise SyscallError("messages must be a list of {'role': ..., 'content': ...} objects")
        return await self._llm(proc, messages, GenerationParams(**params))

    async def _sys_llm_generate(self, proc: Process, prompt: str, **params: Any) -> Any:
        if not isinstance(prompt, str) or not prompt:
            raise SyscallError("prompt must be a non-empty string")
        return await self._llm(proc, prompt, GenerationParams(**params))

    async def _llm(self, proc: Process, prompt: Any, params: GenerationParams) -> Any:
        from llmos.engine import InvalidRequestError

        quota = proc.quotas.llm_tokens
        if quota is not None and proc.tokens_used >= quota:
            raise Terminated(f"quota exceeded: llm_tokens used {proc.tokens_used} of {quota}")
        call = LLMCall(new_call_id(), proc.pid, proc.priority, proc.weight, params.max_tokens)
        base = proc.tokens_used

        def on_tokens(generated: int) -> None:
            proc.tokens_used, proc.dirty = base + generated, True
            if quota is not None and proc.tokens_used > quota:
                raise Terminated(f"quota exceeded: llm_tokens used {proc.tokens_used} of {quota}")

        proc.set_state(ProcessState.READY)
        try:
            result = await self.backend.complete(call, prompt, params, on_tokens)
        except (InvalidRequestError, ValueError) as e:
            raise SyscallError(str(e)) from None
        finally:
            proc.set_state(ProcessState.RUNNING)
        proc.tokens_used = base + result.prompt_tokens + result.completion_tokens
        if (reason := proc.over_quota()) is not None:
            raise Terminated(reason)
        return result

    async def _sys_tool_call(self, proc: Process, tool: str, args: dict[str, Any],
                             labels: Any = None) -> ToolResult:
        quota = proc.quotas.tool_calls
        if quota is not None and proc.tool_calls >= quota:
            raise Terminated(f"quota exceeded: tool_calls used {proc.tool_calls} of {quota}")
        proc.tool_calls += 1
        try:
            spec = self.tools.get(tool)
        except ToolError as e:
            return ToolResult(tool, False, error=str(e))
        decision: Decision = self.monitor.check(proc, tool, args, labels)
        if not decision.allowed:
            self.monitor.record(proc, tool, args, decision, "denied")
            return ToolResult(tool, False, error=f"denied: {decision.reason}")
        ctx = ToolContext(proc.pid, proc.name, proc.workdir, self.home, proc)
        trusted, status = not spec.untrusted_output, "ok"
        proc.set_state(ProcessState.WAITING)
        try:
            if inspect.iscoroutinefunction(spec.fn):
                result = ToolResult(tool, True, await spec.fn(args, ctx), trusted=trusted)
            else:
                result = ToolResult(tool, True, await asyncio.to_thread(spec.fn, args, ctx), trusted=trusted)
        except asyncio.CancelledError:
            self.monitor.record(proc, tool, args, decision, "killed")
            raise
        except ToolError as e:
            status, result = "error", ToolResult(tool, False, error=str(e), trusted=trusted)
        except Exception as e:  # a tool's bug is its caller's error result, never a crash
            status = "error"
            result = ToolResult(tool, False, error=f"{tool} failed: {type(e).__name__}: {e}", trusted=trusted)
        finally:
            proc.set_state(ProcessState.RUNNING)
        self.monitor.record(proc, tool, args, decision, status)
        return result

    async def _sys_spawn(self, proc: Process, program: Program, name: str | None = None,
                         **kwargs: Any) -> int:
        try:
            return await self.spawn(program, name, parent=proc.pid, **kwargs)
        except PermissionError as e:  # asked for more than the parent holds
            raise SyscallError(f"denied: {e}") from None

    async def _sys_wait(self, proc: Process, target: int) -> Any:
        proc.set_state(ProcessState.BLOCKED)
        try:
            return await self.wait(target)
        finally:
            proc.set_state(ProcessState.RUNNING)

    async def _sys_sleep(self, proc: Process, seconds: float) -> None:
        proc.set_state(ProcessState.BLOCKED)
        try:
            await asyncio.sleep(max(0.0, float(seconds)))
        finally:
            proc.set_state(ProcessState.RUNNING)

    # Privileged syscalls (/proc, sysctl, kill): each needs a capability for `kernel.<name>`.

    async def _privileged(self, proc: Process, name: str, args: dict[str, Any]) -> None:
        decision = self.monitor.check(proc, f"kernel.{name}", args, None)
        self.monitor.record(proc, f"kernel.{name}", args, decision, "ok" if decision.allowed else "denied")
        if not decision.allowed:
            raise SyscallError(f"denied: {decision.reason}")

    async def _sys_kernel_stats(self, proc: Process) -> dict[str, Any]:
        await self._privileged(proc, "stats", {})
        return await self.stats()

    async def _sys_configure(self, proc: Process, changes: dict[str, Any]) -> dict[str, Any]:
        await self._privileged(proc, "configure", changes)
        return await self.configure(**changes)

    async def _sys_signal(self, proc: Process, target: int, signal: str, reason: str = "") -> str:
        await self._privileged(proc, "signal", {"target": target, "signal": signal})
        if target == proc.pid:
            raise SyscallError("an agent cannot signal itself")
        self.process(target)
        return await self._signal(target, signal, reason or f"signal from agent {proc.pid}")

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
