"""System calls: the one gate from an agent program into the kernel, and the one path to a tool.

An agent program holds a `Syscalls` handle (kernel/api.py) with two slots: its
pid and an unguessable token. Every method sends through `enter` (or `query`
for read-only calls) here, which finds the kernel in a module-private table by
that token. Guarantees:

- no attribute of the handle, of its class or of its methods (no closures)
  leads to the Kernel; an exception that leaves a syscall carries no kernel
  frame (its traceback, cause and context are dropped at the gate); the agent's
  task runs `_agent`, whose frame holds only the program, handle and arguments.
  This closes the attribute paths; it is not an interpreter sandbox: Python code
  in the kernel's process can still reach any object (gc, asyncio.all_tasks,
  module globals), so code that must be confined runs in the sandbox instead;
- every tool call, whoever makes it (an agent through `sys.tool_call`, the
  plan interpreter, the server, the operator), passes `call_tool` -> `checked`:
  the monitor decides (a monitor that fails denies), the tool runs under a time
  bound, the monitor records the outcome. The result is a `ToolResult` whose
  `status` is "allowed", "denied" or "error" with the reason; nobody parses text;
- blocking tools run on `ToolExecutor` threads, at most a few at once per
  process tree and a bounded number in all: a tool stuck past its timeout keeps
  only its own tree's slot until it returns, so it cannot starve other agents.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from llmos.kernel.api import Syscalls, ToolResult
from llmos.kernel.approvals import approvals_of
from llmos.kernel.backend import GenerationParams, new_call_id
from llmos.kernel.process import Process, ProcessState, Quotas
from llmos.kernel.sched import LLMCall
from llmos.security.monitor import Decision
from llmos.tools.base import ToolContext, ToolDenied, ToolError

if TYPE_CHECKING:
    from llmos.kernel.kernel import Kernel

DEFAULT_TOOL_TIMEOUT_S = 120.0  # a tool call's wall-clock bound unless its Tool names one


class SyscallError(Exception):
    """A syscall the kernel refused (bad arguments, unknown agent); the agent may catch it."""


class Terminated(BaseException):
    """Ends an agent from inside its own task (a quota); BaseException so `except Exception`
    in agent code cannot swallow it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- the gate: handle -> kernel ------------------------------------------------------------------------

_GATES: dict[str, tuple[Kernel, int]] = {}  # token -> (kernel, pid); only this module reads it


def open_gate(kernel: Kernel, pid: int) -> Syscalls:
    """A new handle for process `pid` of `kernel`."""
    token = secrets.token_urlsafe(32)
    _GATES[token] = (kernel, pid)
    return Syscalls(pid, token)


def close_gate(handle_token: str) -> None:
    _GATES.pop(handle_token, None)


def _gate(token: str) -> tuple[Kernel, int]:
    try:
        return _GATES[token]
    except (KeyError, TypeError):
        raise SyscallError("this syscall handle is closed (its agent has ended)") from None


def _scrubbed(e: BaseException) -> BaseException:
    """`e` without the kernel frames and chained exceptions it gathered inside the kernel."""
    e.__traceback__ = None
    e.__cause__ = e.__context__ = None
    e.__suppress_context__ = True
    return e


async def _enter(token: str, name: str, args: dict[str, Any]) -> Any:
    kernel, pid = _gate(token)
    return await kernel.syscall(pid, name, **args)


async def enter(token: str, name: str, args: dict[str, Any]) -> Any:
    """One syscall from a handle (what every coroutine method of `Syscalls` sends)."""
    try:
        return await _enter(token, name, args)
    except BaseException as e:
        raise _scrubbed(e) from None


def _query(token: str, name: str, args: tuple[Any, ...]) -> Any:
    kernel, pid = _gate(token)
    proc = kernel.process(pid)
    if name not in _QUERIES:
        raise SyscallError(f"no query named {name!r}")
    return _QUERIES[name](kernel, proc, *args)


def query(token: str, name: str, *args: Any) -> Any:
    """A read-only call from a handle (name, workdir, tools, settings ...): answered, not logged."""
    try:
        return _query(token, name, args)
    except BaseException as e:
        raise _scrubbed(e) from None


_QUERIES: dict[str, Callable[..., Any]] = {
    "name": lambda k, p: p.name,
    "workdir": lambda k, p: p.workdir,
    "home": lambda k, p: k.home,
    "context_window": lambda k, p: k.backend.context_window,
    "tools": lambda k, p: k.tools.specs(user=p.owner),  # another user's MCP tools stay unseen
    "count_tokens": lambda k, p, messages: k.backend.count_tokens(messages),
    "settings": lambda k, p: k.settings(),
    "print": lambda k, p, text: k.emit(p.pid, str(text)),
}


async def _agent(run: Callable[..., Awaitable[Any]], handle: Syscalls, args: dict[str, Any]) -> Any:
    """The body of an agent's task: its program, given only its handle."""
    return await run(handle, **args)


def start_agent(kernel: Kernel, proc: Process, run: Callable[..., Awaitable[Any]],
                args: dict[str, Any]) -> asyncio.Task:
    """Start `run` as `proc`'s task; `kernel.ended(proc, task)` runs when it ends."""
    handle = open_gate(kernel, proc.pid)
    task = asyncio.create_task(_agent(run, handle, args), name=f"agent-{proc.pid}")
    task.add_done_callback(functools.partial(_agent_done, handle._token))
    return task


def _agent_done(token: str, task: asyncio.Task) -> None:
    kernel, pid = _GATES.pop(token)
    kernel.ended(kernel.process(pid), task)


# --- the one tool path: check, run (bounded), record ------------------------------------------------------


class ToolBusy(Exception):
    """No thread for a blocking tool: its process tree's (or the kernel's) threads are all in use."""


class ToolExecutor:
    """Runs blocking tool functions on daemon threads, at most `per_tree` at once for one process tree
    (an agent and its descendants) and `max_threads` in all. A thread whose call timed out keeps its
    slot until the function returns: a stuck tool uses up its own tree's share, nobody else's."""

    def __init__(self, max_threads: int = 32, per_tree: int = 4) -> None:
        self.max_threads, self.per_tree = max_threads, per_tree
        self._lock = threading.Lock()
        self._running: collections.Counter[Any] = collections.Counter()

    def running(self, key: Any = None) -> int:
        with self._lock:
            return sum(self._running.values()) if key is None else self._running[key]

    async def run(self, key: Any, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            if self._running[key] >= self.per_tree:
                raise ToolBusy(f"{self._running[key]} tool calls of this agent's process tree are still "
                               f"running (at most {self.per_tree} at once)")
            if sum(self._running.values()) >= self.max_threads:
                raise ToolBusy(f"all {self.max_threads} tool threads of the kernel are busy")
            self._running[key] += 1
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def work() -> None:
            try:
                outcome: tuple[Any, BaseException | None] = (fn(*args), None)
            except BaseException as e:  # handed to the caller
                outcome = (None, e)
            finally:
                with self._lock:
                    self._running[key] -= 1
                    if not self._running[key]:
                        del self._running[key]
            try:
                loop.call_soon_threadsafe(_settle, done, *outcome)
            except RuntimeError:  # the loop closed while the tool ran
                pass

        threading.Thread(target=work, name=f"tool-{key}", daemon=True).start()
        return await done


def _settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():  # the caller timed out or was killed
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _record(monitor: Any, agent: Any, name: str, args: Mapping[str, Any], decision: Decision,
            status: str) -> str | None:
    """Record an outcome; why recording failed, or None."""
    try:
        monitor.record(agent, name, args, decision, status)
    except Exception as e:
        return f"the monitor could not record the call: {type(e).__name__}: {e}"
    return None


async def checked(monitor: Any, agent: Any, name: str, args: Mapping[str, Any], labels: Any,
                  run: Callable[[], Awaitable[Any]], *, timeout_s: float | None = None, trusted: bool = True,
                  passthrough: tuple[type[BaseException], ...] = (),
                  before: Callable[[], Awaitable[Any]] | None = None) -> ToolResult:
    """The one check-run-record path: `run()` happens only if `monitor` allows `name(args)`.

    `before` (a human approval) is awaited after the monitor allowed the call and before `run`, outside
    the time bound; a `ToolDenied` from it (or from `run`) is a "denied" result.
    Exceptions in `passthrough` are recorded as errors and re-raised (the kernel's own refusals);
    every other failure, a timeout included, is an "error" result.
    """
    try:
        decision = monitor.check(agent, name, args, labels)
    except Exception as e:  # fail closed
        decision = Decision(False, f"the monitor failed: {type(e).__name__}: {e}")
    if not decision.allowed:
        why = _record(monitor, agent, name, args, decision, "denied")
        return ToolResult(name, "denied", reason=f"denied: {decision.reason}" + (f" ({why})" if why else ""),
                          trusted=trusted)
    limit = asyncio.timeout(timeout_s)
    try:
        if before is not None:
            await before()
        async with limit:
            content = await run()
        status, result = "ok", ToolResult(name, "allowed", content, trusted=trusted)
    except asyncio.CancelledError:
        _record(monitor, agent, name, args, decision, "killed")
        raise
    except passthrough:
        _record(monitor, agent, name, args, decision, "error")
        raise
    except TimeoutError as e:
        text = f"{name} timed out after {timeout_s:g} s" if limit.expired() else \
            f"{name} failed: TimeoutError: {e}"
        status, result = "error", ToolResult(name, "error", reason=text, trusted=trusted)
    except ToolDenied as e:
        status, result = "denied", ToolResult(name, "denied", reason=f"denied: {e}", trusted=trusted)
    except (ToolError, ToolBusy) as e:
        status, result = "error", ToolResult(name, "error", reason=str(e), trusted=trusted)
    except Exception as e:  # a tool's bug is its caller's error result, never a crash
        status = "error"
        result = ToolResult(name, "error", reason=f"{name} failed: {type(e).__name__}: {e}", trusted=trusted)
    if (why := _record(monitor, agent, name, args, decision, status)) is not None:
        return ToolResult(name, "error", reason=why, trusted=trusted)
    return result


def snapshot(value: Any, where: str = "arguments", depth: int = 0) -> Any:
    """A private deep copy of JSON-like arguments, made of exact built-in types: what the monitor checks is
    what the tool gets, whatever the caller mutates meanwhile (a list it still holds, a str subclass)."""
    if depth > 64:
        raise TypeError(f"{where} nests too deeply")
    if value is None or type(value) in (bool, str, int, float, bytes):
        return value
    if isinstance(value, str):
        return "".join([value])  # an exact str, not the subclass
    if isinstance(value, int):
        return int.__add__(value, 0)
    if isinstance(value, float):
        return float.__add__(value, 0.0)
    if isinstance(value, Mapping):
        out = {}
        for k, v in list(value.items()):
            if not isinstance(k, str):
                raise TypeError(f"{where} has a key that is not a string: {k!r:.40}")
            key = "".join([k])
            out[key] = snapshot(v, f"{where}.{key}" if depth else f"argument {key!r}", depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [snapshot(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(list(value))]
    raise TypeError(f"{where} is a {type(value).__name__}, not a JSON value")


async def call_tool(monitor: Any, tools: Any, agent: Any, tool: str, args: Mapping[str, Any], labels: Any,
                    ctx: ToolContext, *, executor: ToolExecutor, key: Any = None,
                    timeout_s: float = DEFAULT_TOOL_TIMEOUT_S,
                    approval: Callable[[str, dict[str, Any]], Awaitable[Any]] | None = None) -> ToolResult:
    """Run registered tool `tool` for `agent` through `monitor` (kernel or not: the only way to a tool)."""
    if not isinstance(tool, str):
        why = f"a tool name is a string, got {type(tool).__name__}"
        return ToolResult(repr(tool)[:60], "error", reason=why)
    try:
        spec = tools.get(tool)
    except ToolError as e:
        return ToolResult(tool, "error", reason=str(e))
    try:
        args = snapshot(args)
    except (TypeError, RecursionError) as e:
        return ToolResult(tool, "error", reason=f"{tool}: {e}")
    if not isinstance(args, dict):
        return ToolResult(tool, "error", reason=f"arguments must be an object, got {type(args).__name__}")

    async def run() -> Any:
        if inspect.iscoroutinefunction(spec.fn):
            return await spec.fn(args, ctx)
        return await executor.run(key if key is not None else ctx.pid, spec.fn, args, ctx)

    async def approved() -> Any:
        assert approval is not None
        return await approval(tool, args)

    return await checked(monitor, agent, tool, args, labels, run, trusted=not spec.untrusted_output,
                         timeout_s=spec.timeout_s or timeout_s, before=approved if approval else None)


# --- the syscall handlers ---------------------------------------------------------------------------

Handler = Callable[..., Awaitable[Any]]


async def _llm_chat(kernel: Kernel, proc: Process, messages: list[dict[str, Any]], **params: Any) -> Any:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise SyscallError("messages must be a list of {'role': ..., 'content': ...} objects")
    return await _llm(kernel, proc, messages, _params(params))


async def _llm_generate(kernel: Kernel, proc: Process, prompt: str, **params: Any) -> Any:
    if not isinstance(prompt, str) or not prompt:
        raise SyscallError("prompt must be a non-empty string")
    return await _llm(kernel, proc, prompt, _params(params))


def _params(params: dict[str, Any]) -> GenerationParams:
    try:
        return GenerationParams(**params)
    except TypeError as e:
        raise SyscallError(str(e)) from None


async def _llm(kernel: Kernel, proc: Process, prompt: Any, params: GenerationParams) -> Any:
    from llmos.engine import InvalidRequestError

    if (why := kernel.over_quota(proc, before="llm_tokens")) is not None:
        raise Terminated(why)
    call = LLMCall(new_call_id(), proc.pid, proc.priority, proc.weight, params.max_tokens)
    base = proc.tokens_used

    def on_tokens(generated: int) -> None:
        kernel.charge(proc, tokens=base + generated - proc.tokens_used)
        if (why := kernel.over_quota(proc)) is not None:
            raise Terminated(why)

    # A process's calls share one context key: the KV its call leaves is retained across its tool
    # call, and its next call, whose prompt extends that context, reuses it.
    kwargs = {"context": kernel.context_key(proc)} if kernel.retains_kv else {}
    proc.set_state(ProcessState.READY)
    started = time.monotonic()
    try:
        result = await kernel.backend.complete(call, prompt, params, on_tokens, **kwargs)
    except (InvalidRequestError, ValueError) as e:
        raise SyscallError(str(e)) from None
    finally:
        proc.set_state(ProcessState.RUNNING)
    kernel.llm_call_ended(proc, result.prompt_tokens, call.cached_tokens, time.monotonic() - started)
    kernel.charge(proc, tokens=base + result.prompt_tokens + result.completion_tokens - proc.tokens_used)
    if (why := kernel.over_quota(proc)) is not None:
        raise Terminated(why)
    return result


async def _tool_call(kernel: Kernel, proc: Process, tool: str, args: dict[str, Any],
                     labels: Any = None) -> ToolResult:
    if (why := kernel.over_quota(proc, before="tool_calls")) is not None:
        raise Terminated(why)
    kernel.charge(proc, tool_calls=1)
    ctx = ToolContext(proc.pid, proc.name, proc.workdir or kernel.home / "scratch" / str(proc.pid),
                      kernel.home, proc)
    proc.set_state(ProcessState.WAITING)
    kernel.tool_started(proc, tool if isinstance(tool, str) else repr(tool)[:60])
    started, status = time.monotonic(), "killed"
    try:
        result = await call_tool(kernel.monitor, kernel.tools, proc, tool, args, labels, ctx,
                                 executor=kernel.executor, key=kernel.tree_of(proc),
                                 timeout_s=kernel.tool_timeout_s,
                                 approval=approvals_of(kernel).gate(proc, kernel.monitor))
        status = result.status
        return result
    finally:
        proc.set_state(ProcessState.RUNNING)
        kernel.tool_ended(proc, tool if isinstance(tool, str) else repr(tool)[:60],
                          time.monotonic() - started, status)


async def _spawn(kernel: Kernel, proc: Process, program: Any, name: str | None = None, *,
                 quotas: Quotas | Mapping[str, Any] | None = None, priority: int | None = None,
                 weight: float | None = None, **kwargs: Any) -> int:
    """A child never gets more than its parent: capabilities attenuated, quotas at most what is left,
    a priority no higher (nice only goes up) and a fair-share weight no larger."""
    if "parent" in kwargs:
        raise SyscallError("a child's parent is the agent that spawns it")
    try:
        quotas = Quotas(**quotas) if isinstance(quotas, Mapping) else quotas
    except (TypeError, ValueError) as e:
        raise SyscallError(f"bad quotas: {e}") from None
    if quotas is not None and not isinstance(quotas, Quotas):
        raise SyscallError(f"quotas must be a Quotas or a mapping, got {type(quotas).__name__}")
    priority = proc.priority if priority is None else priority
    weight = proc.weight if weight is None else weight
    if not isinstance(priority, int) or isinstance(priority, bool) or priority < proc.priority:
        raise SyscallError(f"denied: a child's priority must be an integer >= its parent's ({proc.priority})")
    if not isinstance(weight, int | float) or isinstance(weight, bool) or not 0 < weight <= proc.weight:
        raise SyscallError(f"denied: a child's weight must be in (0, {proc.weight:g}] (its parent's at most)")
    try:
        return await kernel.spawn(program, name, parent=proc.pid, quotas=quotas, priority=priority,
                                  weight=weight, **kwargs)
    except PermissionError as e:  # asked for more than the parent holds
        raise SyscallError(f"denied: {e}") from None


async def _wait(kernel: Kernel, proc: Process, target: int) -> Any:
    if target == proc.pid:
        raise SyscallError("an agent cannot wait for itself")
    proc.set_state(ProcessState.BLOCKED)
    try:
        result = await kernel.wait(target)
    finally:
        proc.set_state(ProcessState.RUNNING)
    kernel.monitor.flow(kernel.process(target), proc)  # the result carries what the child read
    return result


async def _sleep(kernel: Kernel, proc: Process, seconds: float) -> None:
    proc.set_state(ProcessState.BLOCKED)
    try:
        await asyncio.sleep(max(0.0, float(seconds)))
    finally:
        proc.set_state(ProcessState.RUNNING)


# Privileged syscalls (/proc, sysctl, kill): each passes the monitor as the tool `kernel.<name>`.

async def _privileged(kernel: Kernel, proc: Process, name: str, args: dict[str, Any],
                      action: Callable[[], Awaitable[Any]]) -> Any:
    result = await checked(kernel.monitor, proc, f"kernel.{name}", args, None, action,
                           passthrough=(SyscallError,))
    if not result.ok:
        raise SyscallError(result.reason)
    return result.content


async def _kernel_stats(kernel: Kernel, proc: Process) -> dict[str, Any]:
    return await _privileged(kernel, proc, "stats", {}, kernel.stats)


async def _configure(kernel: Kernel, proc: Process, changes: dict[str, Any]) -> dict[str, Any]:
    """Each setting is its own `kernel.configure` decision, and nothing changes unless every one is
    allowed: a grant bounding one setting never lets a second one ride along in the same call."""
    settings = list(changes.items())
    if not settings:
        raise SyscallError("configure needs at least one setting")

    async def apply(i: int) -> dict[str, Any]:
        if i == len(settings):
            return await kernel.configure(**changes)
        return await _privileged(kernel, proc, "configure", dict([settings[i]]), lambda: apply(i + 1))

    return await apply(0)


async def _signal(kernel: Kernel, proc: Process, target: int, signal: str, reason: str = "") -> str:
    async def act() -> str:
        if target == proc.pid:
            raise SyscallError("an agent cannot signal itself")
        kernel.process(target)
        return await kernel._signal(target, signal, reason or f"signal from agent {proc.pid}")

    return await _privileged(kernel, proc, "signal", {"target": target, "signal": signal}, act)


HANDLERS: dict[str, Handler] = {
    "llm_chat": _llm_chat, "llm_generate": _llm_generate, "tool_call": _tool_call, "spawn": _spawn,
    "wait": _wait, "sleep": _sleep, "kernel_stats": _kernel_stats, "configure": _configure,
    "signal": _signal,
}
