"""Quotas are inherited and shared: a child gets at most its parent's remaining, and its use counts
against every ancestor's quota.

Attacks: a parent with a tool-call (or token) quota spawns children without quotas, or asks for more
than it has left, or fans out many children that each get the whole remainder; a parent whose quota
is used up spawns a child to keep going.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from llmos.kernel import ChatResult, Kernel, Quotas, SyscallError, Syscalls
from llmos.kernel.process import Process
from llmos.security.monitor import AllowAllMonitor, ReferenceMonitor
from llmos.tools.base import Tool, ToolRegistry
from llmos.tools.files import file_tools
from tests.stub_backend import StubBackend


class TenTokens(StubBackend):
    """Every LLM call costs 4 prompt and 6 generated tokens."""

    async def complete(self, call, prompt, params, on_tokens):
        on_tokens(6)
        return ChatResult("ok", "stop", 4, 6)


def _kernel(tmp_path: Path) -> Kernel:
    tools = ToolRegistry()
    tools.register(Tool("ping", "", {"type": "object"}, lambda args, ctx: "pong"))
    return Kernel(TenTokens(), home=tmp_path, tools=tools, monitor="allow-all")


async def _calls(sys: Syscalls, n: int) -> list[str]:
    out = []
    for _ in range(n):
        out.append((await sys.tool_call("ping", {})).status)
    return out


async def child_pings(sys: Syscalls, n: int = 100) -> list[str]:
    return await _calls(sys, n)


def _run(tmp_path: Path, program: Any, quotas: Quotas) -> tuple[Any, Kernel]:
    async def go() -> tuple[Any, Kernel]:
        kernel = _kernel(tmp_path)
        try:
            pid = await kernel.spawn(program, "parent", quotas=quotas)
            await kernel.wait(pid)
            return pid, kernel
        finally:
            await kernel.shutdown()

    return asyncio.run(go())


def test_a_child_gets_the_parents_remaining_by_default_and_no_more(tmp_path: Path):
    seen: dict[str, Any] = {}

    async def parent(sys: Syscalls) -> None:
        await _calls(sys, 2)
        kid = await sys.spawn(child_pings, "kid", args={"n": 0})
        seen["kid"] = kid
        for want in (Quotas(tool_calls=4), Quotas(llm_tokens=1)):
            try:
                await sys.spawn(child_pings, "greedy", quotas=want, args={"n": 0})
            except SyscallError as e:
                seen.setdefault("refused", []).append(str(e))
        seen["small"] = await sys.spawn(child_pings, "small", quotas=Quotas(tool_calls=2), args={"n": 0})

    _, kernel = _run(tmp_path, parent, Quotas(tool_calls=5, wall_time_s=60))
    kid = kernel.process(seen["kid"]).quotas
    assert kid.tool_calls == 3 and kid.llm_tokens is None and 0 < kid.wall_time_s < 60
    assert kernel.process(seen["small"]).quotas.tool_calls == 2
    assert seen["refused"] == ["denied: quota tool_calls=4 exceeds the parent's remaining 3"]
    # the parent has no llm_tokens quota: a child may ask for any
    assert [p.name for p in kernel.ps()] == ["parent", "kid", "greedy", "small"]


def test_children_share_the_parents_quota_instead_of_multiplying_it(tmp_path: Path):
    seen: dict[str, Any] = {}

    async def parent(sys: Syscalls) -> None:
        await _calls(sys, 1)
        kids = [await sys.spawn(child_pings, f"kid{i}") for i in range(3)]
        seen["kids"] = kids
        for k in kids:
            await sys.wait(k)
        seen["parent_after"] = await _calls(sys, 1)

    pid, kernel = _run(tmp_path, parent, Quotas(tool_calls=5))
    kids = [kernel.process(k) for k in seen["kids"]]
    assert [k.quotas.tool_calls for k in kids] == [4, 4, 4]
    assert sum(k.tool_calls for k in kids) == 4  # the pool was 4 calls after the parent's first, not 12
    shared = f"quota exceeded: tool_calls used 5 of 5 by agent {pid} (parent), whose quota it shares"
    for k in kids:
        own = f"quota exceeded: tool_calls used {k.tool_calls} of 4"
        assert k.exit_reason in (shared, own), k.exit_reason
    assert kernel.process(pid).exit_reason == "quota exceeded: tool_calls used 5 of 5"
    assert "parent_after" not in seen


def test_a_parent_with_nothing_left_cannot_spawn_to_go_on(tmp_path: Path):
    seen: dict[str, str] = {}

    async def parent(sys: Syscalls) -> None:
        await sys.llm_chat([{"role": "user", "content": "hi"}])  # 10 of its 10 tokens
        try:
            await sys.spawn(child_pings)
        except SyscallError as e:
            seen["spawn"] = str(e)

    pid, kernel = _run(tmp_path, parent, Quotas(llm_tokens=10))
    assert seen == {"spawn": "denied: cannot give a child any llm_tokens: its parent has none left"}
    assert kernel.process(pid).exit_reason == "exited"


def test_child_token_use_counts_against_the_parent(tmp_path: Path):
    seen: dict[str, Any] = {}

    async def talker(sys: Syscalls) -> None:
        for _ in range(10):
            await sys.llm_chat([{"role": "user", "content": "hi"}])

    async def parent(sys: Syscalls) -> None:
        seen["kid"] = await sys.spawn(talker, "talker")
        await sys.wait(seen["kid"])

    pid, kernel = _run(tmp_path, parent, Quotas(llm_tokens=25))
    kid = kernel.process(seen["kid"])
    # two calls (20 tokens), then the third passes 25 while it generates
    assert kid.quotas.llm_tokens == 25 and kid.exit_reason == "quota exceeded: llm_tokens used 26 of 25"
    assert kernel.process(pid).tokens_used == 26


def test_spawning_from_outside_with_a_parent_inherits_too(tmp_path: Path):
    async def go() -> tuple[Quotas, str]:
        kernel = _kernel(tmp_path)
        try:
            pid = await kernel.spawn(child_pings, "p", quotas=Quotas(tool_calls=3), args={"n": 1})
            await kernel.wait(pid)
            kid = await kernel.spawn(child_pings, "k", parent=pid, args={"n": 0})
            with pytest.raises(PermissionError, match="exceeds the parent's remaining 2"):
                await kernel.spawn(child_pings, "k2", parent=pid, quotas=Quotas(tool_calls=3))
            return kernel.process(kid).quotas, type(kernel.monitor).__name__
        finally:
            await kernel.shutdown()

    quotas, monitor = asyncio.run(go())
    assert quotas == Quotas(tool_calls=2) and monitor == AllowAllMonitor.__name__


def test_the_reference_monitor_is_the_default_and_allow_all_only_by_name(tmp_path: Path):
    ran: list[str] = []
    tools = ToolRegistry()
    tools.register(Tool("send_money", "", {"type": "object"}, lambda args, ctx: ran.append("paid")),
                   *file_tools())

    async def agent(sys: Syscalls) -> list[str]:
        out = [(await sys.tool_call("send_money", {})).status]
        out.append((await sys.tool_call("write_file", {"path": "/etc/x", "content": "x"})).status)
        out.append((await sys.tool_call("write_file", {"path": "mine.txt", "content": "x"})).status)
        return out

    async def go(**kwargs: Any) -> tuple[list[str], Any]:
        kernel = Kernel(StubBackend(), home=tmp_path, tools=tools, **kwargs)
        try:
            return await kernel.wait(await kernel.spawn(agent)), kernel.monitor
        finally:
            await kernel.shutdown()

    statuses, monitor = asyncio.run(go())
    assert isinstance(monitor, ReferenceMonitor) and statuses == ["denied", "denied", "allowed"] and ran == []
    statuses, monitor = asyncio.run(go(monitor="allow-all"))
    assert isinstance(monitor, AllowAllMonitor) and statuses[0] == "allowed" and ran == ["paid"]
    for wrong in ("allow_all", "none", ""):
        with pytest.raises(ValueError, match="monitor must be a Monitor, None"):
            Kernel(StubBackend(), home=tmp_path, monitor=wrong)  # type: ignore[arg-type]
    assert Process(1, "x").quotas == Quotas()


def test_a_child_cannot_outrank_its_parent(tmp_path: Path):
    seen: dict[str, Any] = {}

    async def parent(sys: Syscalls) -> None:
        for label, kwargs in (("priority", {"priority": -5}), ("weight", {"weight": 10.0}),
                              ("nan weight", {"weight": float("nan")}),
                              ("quotas", {"quotas": {"tool_calls": -1}}), ("quota type", {"quotas": "lots"})):
            try:
                await sys.spawn(child_pings, args={"n": 0}, **kwargs)
                seen[label] = "spawned"
            except SyscallError as e:
                seen[label] = str(e)
        seen["ok"] = await sys.spawn(child_pings, "ok", priority=3, weight=0.5, quotas={"tool_calls": 1},
                                     args={"n": 0})

    _run(tmp_path, parent, Quotas())
    assert seen["priority"] == "denied: a child's priority must be an integer >= its parent's (0)"
    assert seen["weight"] == seen["nan weight"] == \
        "denied: a child's weight must be in (0, 1] (its parent's at most)"
    assert seen["quotas"] == "bad quotas: quota tool_calls must be positive, got -1"
    assert seen["quota type"] == "quotas must be a Quotas or a mapping, got str"
    assert isinstance(seen["ok"], int)
