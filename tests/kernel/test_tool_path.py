"""The one tool path: check, run under a time bound on bounded threads, record; results are typed.

Attacks: a tool that blocks forever (a FIFO, a hung socket) holding the kernel's threads so that no
other agent's tool runs; a coroutine tool that never returns; a monitor that raises; killing an agent
stuck in a blocking tool; a second check-run-record path appearing beside the kernel's.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from llmos.kernel import Kernel, Syscalls, ToolExecutor, ToolResult
from llmos.security.audit import AuditLog
from llmos.security.capabilities import Capabilities
from llmos.security.monitor import Decision, ReferenceMonitor
from llmos.tools.base import Tool, ToolError, ToolRegistry
from tests.stub_backend import StubBackend

OPEN = {"type": "object"}


def _tools(release: threading.Event, cancelled: list[str]) -> ToolRegistry:
    def stuck(args: dict, ctx: Any) -> str:
        release.wait()
        return "released"

    async def hangs(args: dict, ctx: Any) -> str:
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.append("hangs")
        return "never"

    def fails(args: dict, ctx: Any) -> str:
        raise ToolError("no such thing")

    def own_timeout(args: dict, ctx: Any) -> str:
        raise TimeoutError("the remote did not answer")

    reg = ToolRegistry()
    reg.register(Tool("stuck", "Blocks until released.", OPEN, stuck, timeout_s=0.3),
                 Tool("hangs", "Never returns.", OPEN, hangs),
                 Tool("quick", "Answers at once.", OPEN, lambda args, ctx: "quick"),
                 Tool("fails", "Fails.", OPEN, fails),
                 Tool("own_timeout", "Times out by itself.", OPEN, own_timeout),
                 Tool("secret", "Nobody may.", OPEN, lambda args, ctx: "secret"))
    return reg


def _kernel(tmp_path: Path, tools: ToolRegistry, **kwargs: Any) -> tuple[Kernel, AuditLog]:
    audit = AuditLog(tmp_path / "audit.db")
    grants = Capabilities.of([{"tool": t} for t in ("stuck", "hangs", "quick", "fails", "own_timeout")])
    monitor = ReferenceMonitor(audit=audit, tools=tools, default_capabilities=lambda workdir: grants)
    return Kernel(StubBackend(), home=tmp_path, tools=tools, monitor=monitor, **kwargs), audit


def test_results_are_typed_and_the_log_takes_their_status(tmp_path: Path):
    release, cancelled = threading.Event(), []

    async def agent(sys: Syscalls) -> list[tuple[str, str | None]]:
        out = []
        for tool in ("quick", "fails", "secret", "nonexistent", "own_timeout"):
            r = await sys.tool_call(tool, {})
            out.append((r.status, r.reason))
        return out

    async def go() -> tuple[Any, list[str]]:
        kernel, audit = _kernel(tmp_path, _tools(release, cancelled))
        try:
            pid = await kernel.spawn(agent)
            out = await kernel.wait(pid)
            return out, [row["status"] for row in kernel.table.syscall_log(pid)]
        finally:
            await kernel.shutdown()

    out, log = asyncio.run(go())
    assert out == [("allowed", None), ("error", "no such thing"),
                   ("denied", "denied: denied by capabilities: no capability for tool 'secret'"),
                   ("error", "no tool named 'nonexistent' (known tools: fails, hangs, own_timeout, quick, "
                             "secret, stuck)"),
                   ("error", "own_timeout failed: TimeoutError: the remote did not answer")]
    assert log == ["ok", "error", "denied", "error", "error"]
    assert ToolResult("t", "denied", reason="why").error == "why" and not ToolResult("t", "error").ok
    assert ToolResult("t", "allowed", "x").error is None
    with pytest.raises(ValueError, match="status is one of"):
        ToolResult("t", "maybe")


def test_a_tool_past_its_time_bound_is_an_error_and_coroutines_are_cancelled(tmp_path: Path):
    release, cancelled = threading.Event(), []

    async def agent(sys: Syscalls) -> list[Any]:
        t0 = time.monotonic()
        a = await sys.tool_call("stuck", {})  # its own bound: 0.3 s
        b = await sys.tool_call("hangs", {})  # the kernel's: 0.5 s
        return [a.status, a.reason, b.status, b.reason, time.monotonic() - t0]

    async def go() -> tuple[Any, list[dict]]:
        kernel, audit = _kernel(tmp_path, _tools(release, cancelled), tool_timeout_s=0.5)
        try:
            out = await kernel.wait(await kernel.spawn(agent))
            return out, audit.tail(4)
        finally:
            release.set()
            await kernel.shutdown()

    out, rows = asyncio.run(go())
    assert out[:4] == ["error", "stuck timed out after 0.3 s", "error", "hangs timed out after 0.5 s"]
    assert out[4] < 5
    assert cancelled == ["hangs"]
    assert [(r["tool"], r["decision"], r["reason"]) for r in rows] == [
        ("stuck", "allow", "granted by 'stuck'"), ("stuck", "done", "error"),
        ("hangs", "allow", "granted by 'hangs'"), ("hangs", "done", "error")]


def test_stuck_tools_cannot_starve_other_agents(tmp_path: Path):
    """Six agents each keep calling a tool that never returns; another agent's tools still run at once."""
    release, cancelled = threading.Event(), []
    executor = ToolExecutor(max_threads=32, per_tree=2)

    async def stuck_agent(sys: Syscalls) -> list[str]:
        return [(await sys.tool_call("stuck", {})).reason or "" for _ in range(4)]

    async def bystander(sys: Syscalls) -> list[Any]:
        await sys.sleep(1.0)  # after the stuck agents have filled their share
        t0 = time.monotonic()
        results = [await sys.tool_call("quick", {}) for _ in range(10)]
        return [[r.status for r in results], time.monotonic() - t0]

    async def go() -> tuple[list[Any], Any, int]:
        kernel, _ = _kernel(tmp_path, _tools(release, cancelled), executor=executor)
        try:
            stuck = [await kernel.spawn(stuck_agent, f"stuck{i}") for i in range(6)]
            by = await kernel.spawn(bystander)
            out = [await kernel.wait(p) for p in stuck]
            threads = executor.running()
            return out, await kernel.wait(by), threads
        finally:
            release.set()
            await kernel.shutdown()

    stuck, (statuses, elapsed), threads = asyncio.run(go())
    busy = "2 tool calls of this agent's process tree are still running (at most 2 at once)"
    for reasons in stuck:
        assert reasons == ["stuck timed out after 0.3 s"] * 2 + [busy] * 2
    assert threads == 12  # six trees, two stuck threads each: nobody else's share
    assert statuses == ["allowed"] * 10 and elapsed < 2.0
    deadline = time.monotonic() + 5
    while executor.running() and time.monotonic() < deadline:  # released threads give their slots back
        time.sleep(0.01)
    assert executor.running() == 0


def test_killing_an_agent_stuck_in_a_blocking_tool_returns_at_once(tmp_path: Path):
    release, cancelled = threading.Event(), []

    async def agent(sys: Syscalls) -> None:
        await sys.tool_call("stuck", {})

    async def go() -> tuple[float, str | None, str]:
        tools = _tools(release, cancelled)
        tools.tools["stuck"].timeout_s = 60
        kernel, _ = _kernel(tmp_path, tools)
        try:
            pid = await kernel.spawn(agent)
            while kernel.executor.running() == 0:
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            await kernel.kill(pid)
            took = time.monotonic() - t0
            return took, kernel.process(pid).exit_reason, kernel.table.syscall_log(pid)[-1]["status"]
        finally:
            release.set()
            await kernel.shutdown()

    took, reason, status = asyncio.run(go())
    assert took < 1.0 and reason == "killed: killed" and status == "killed"


class _BrokenMonitor(ReferenceMonitor):
    def check(self, agent: Any, tool: str, args: Any, labels: Any = None) -> Decision:
        raise RuntimeError("audit disk full")


def test_a_monitor_that_fails_denies(tmp_path: Path):
    ran: list[str] = []
    tools = ToolRegistry()
    tools.register(Tool("t", "", OPEN, lambda args, ctx: ran.append("ran")))

    async def agent(sys: Syscalls) -> ToolResult:
        return await sys.tool_call("t", {})

    async def go() -> ToolResult:
        kernel = Kernel(StubBackend(), home=tmp_path, tools=tools, monitor=_BrokenMonitor())
        try:
            return await kernel.wait(await kernel.spawn(agent))
        finally:
            await kernel.shutdown()

    r = asyncio.run(go())
    assert (r.status, r.reason) == ("denied", "denied: the monitor failed: RuntimeError: audit disk full")
    assert ran == []


def test_the_only_check_run_record_path_is_the_kernels():
    """Every `.check(` / `.record(` of a monitor in src/ is in kernel/syscall.py (the bench's AgentDojo
    replay checks its own functions, which are not llmos tools, and runs no registry tool)."""
    src = Path(__file__).resolve().parents[2] / "src" / "llmos"
    calls = re.compile(r"\bmonitor\.(check|record)\(")
    found = sorted(str(p.relative_to(src)) for p in src.rglob("*.py") if calls.search(p.read_text()))
    assert found == ["bench/security.py", "kernel/syscall.py"]


def test_executor_refuses_beyond_its_total():
    ex = ToolExecutor(max_threads=2, per_tree=2)
    release = threading.Event()

    async def go() -> str:
        first = [asyncio.ensure_future(ex.run(key, release.wait)) for key in (1, 2)]
        await asyncio.sleep(0.05)
        try:
            await ex.run(3, lambda: None)
            return "ran"
        except Exception as e:
            return str(e)
        finally:
            release.set()
            await asyncio.gather(*first)

    assert asyncio.run(go()) == "all 2 tool threads of the kernel are busy"


class _Sneaky(str):
    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = str.__hash__


def test_what_the_monitor_checked_is_what_the_tool_gets(tmp_path: Path):
    """The agent mutates the argument list it still holds while the (allowed) call is in flight."""
    got: list[Any] = []
    started, release = threading.Event(), threading.Event()

    def send(args: dict, ctx: Any) -> str:
        started.set()
        release.wait(5)
        got.append(args)
        return "sent"

    tools = ToolRegistry()
    tools.register(Tool("send_email", "", OPEN, send))
    grants = Capabilities.of([{"tool": "send_email", "allow": {"to": ["*@corp.com"]}}])
    monitor = ReferenceMonitor(tools=tools, default_capabilities=lambda workdir: grants)

    async def agent(sys: Syscalls) -> list[Any]:
        to = ["bob@corp.com"]
        call = asyncio.ensure_future(sys.tool_call("send_email", {"to": to, "subject": _Sneaky("hi")}))
        while not started.is_set():
            await asyncio.sleep(0.01)
        to.append("eve@evil.com")  # after the check, before the tool reads it
        release.set()
        r = await call
        bad = await sys.tool_call("send_email", {"to": ["bob@corp.com"], "when": object()})
        return [r.status, bad.status, bad.reason]

    async def go() -> list[Any]:
        kernel = Kernel(StubBackend(), home=tmp_path, tools=tools, monitor=monitor)
        try:
            return await kernel.wait(await kernel.spawn(agent))
        finally:
            await kernel.shutdown()

    out = asyncio.run(go())
    assert out == ["allowed", "error", "send_email: argument 'when' is a object, not a JSON value"]
    assert got == [{"to": ["bob@corp.com"], "subject": "hi"}] and type(got[0]["subject"]) is str


def test_hostile_arguments_are_results_and_logged_not_raised(tmp_path: Path):
    """A huge integer, deep nesting, a cycle: the call is denied or refused, the syscall log keeps a row."""
    release, cancelled = threading.Event(), []
    deep: Any = 1
    for _ in range(5000):
        deep = [deep]
    cycle: list[Any] = []
    cycle.append(cycle)

    async def agent(sys: Syscalls) -> list[tuple[str, str | None]]:
        out = []
        for args in ({"n": 10 ** 5000}, {"n": deep}, {"n": cycle}):
            r = await sys.tool_call("quick", args)
            out.append((r.status, r.reason))
        r = await sys.tool_call(["quick"], {})  # type: ignore[arg-type]
        out.append((r.status, r.reason))
        return out

    async def go() -> tuple[Any, list[dict]]:
        kernel, _ = _kernel(tmp_path, _tools(release, cancelled))
        try:
            pid = await kernel.spawn(agent)
            return await kernel.wait(pid), kernel.table.syscall_log(pid)
        finally:
            await kernel.shutdown()

    out, log = asyncio.run(go())
    assert out[0] == ("denied", "denied: denied by the monitor: argument 'n' is an integer outside the "
                                "signed 64-bit range")
    assert out[1] == out[2] == ("error", "quick: argument 'n'" + "[0]" * 64 + " nests too deeply")
    assert out[3] == ("error", "a tool name is a string, got list")
    assert [row["status"] for row in log] == ["denied", "error", "error", "error"]


def test_an_agent_cannot_wait_for_itself(tmp_path: Path):
    async def agent(sys: Syscalls) -> str:
        try:
            await asyncio.wait_for(sys.wait(sys.pid), 5)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return "waited"

    async def go() -> str:
        kernel = Kernel(StubBackend(), home=tmp_path)
        try:
            return await kernel.wait(await kernel.spawn(agent))
        finally:
            await kernel.shutdown()

    assert asyncio.run(go()) == "SyscallError: an agent cannot wait for itself"
