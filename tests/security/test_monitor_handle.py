"""No way around the monitor: the syscall handle leads nowhere but to syscalls.

Attacks an agent program might try to reach the Kernel object (and run a tool with no decision and
no audit row): `sys.kernel`, `sys._kernel`, `vars(sys)`, `sys.__dict__`, the slots, `gc.get_referents`,
the class and its methods' closures and defaults, bound-method `__self__`, copy/pickle, rewriting the
handle's token or pid, forging a handle, keeping a dead agent's handle, the traceback, cause and
context of a syscall's exception, and the frame of its own task's coroutine.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import gc
import inspect
import pickle
import types
from pathlib import Path
from typing import Any

import pytest

import llmos.kernel.api as api
from llmos.kernel import Kernel, SyscallError, Syscalls
from llmos.security.audit import AuditLog
from llmos.security.monitor import ReferenceMonitor
from llmos.tools.base import Tool, ToolRegistry
from tests.stub_backend import StubBackend


def _secret_tool(ran: list[str]) -> Tool:
    return Tool("secret", "A tool no agent holds a grant for.", {"type": "object"},
                lambda args, ctx: ran.append(ctx.agent) or "the secret")


def _run(tmp_path: Path, program: Any, **spawn: Any) -> tuple[Any, Kernel, list[str], AuditLog]:
    ran: list[str] = []
    tools = ToolRegistry()
    tools.register(_secret_tool(ran))
    audit = AuditLog(tmp_path / "audit.db")

    async def go() -> tuple[Any, Kernel]:
        monitor = ReferenceMonitor(audit=audit, tools=tools)
        kernel = Kernel(StubBackend(), home=tmp_path, tools=tools, monitor=monitor)
        try:
            pid = await kernel.spawn(program, name="attacker", **spawn)
            result = await kernel.wait(pid)
            assert kernel.process(pid).exit_reason == "exited", kernel.process(pid).exit_reason
            return result, kernel
        finally:
            await kernel.shutdown()

    result, kernel = asyncio.run(go())
    return result, kernel, ran, audit


def _holds_kernel(value: Any, depth: int = 2) -> bool:
    """Whether `value` is a Kernel or directly holds one (in a container, a cell, a bound method)."""
    if isinstance(value, Kernel):
        return True
    if depth == 0:
        return False
    if isinstance(value, dict):
        return any(_holds_kernel(v, depth - 1) for v in value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return any(_holds_kernel(v, depth - 1) for v in value)
    if isinstance(value, types.CellType):
        try:
            return _holds_kernel(value.cell_contents, depth - 1)
        except ValueError:
            return False
    if isinstance(value, types.MethodType):
        return _holds_kernel(value.__self__, depth - 1) or _holds_kernel(value.__func__, depth - 1)
    if isinstance(value, types.FunctionType):
        held = (*(value.__closure__ or ()), *(value.__defaults__ or ()),
                *(value.__kwdefaults__ or {}).values())
        return any(_holds_kernel(x, depth - 1) for x in held)
    if isinstance(value, functools.partial):
        return _holds_kernel(value.func, depth - 1) or _holds_kernel(value.args, depth - 1)
    return False


def test_the_handle_has_no_attribute_that_leads_to_the_kernel(tmp_path: Path):
    async def attacker(sys: Syscalls) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name in ("kernel", "_kernel", "__dict__", "monitor", "_gate", "tools_registry"):
            found[name] = hasattr(sys, name)
        with pytest.raises(TypeError):
            vars(sys)
        slots = {s: object.__getattribute__(sys, s) for s in type(sys).__slots__}
        found["slot_types"] = sorted(type(v).__name__ for v in slots.values())
        found["referents"] = sorted(type(r).__name__ for r in gc.get_referents(sys))
        found["bound_self_is_handle"] = sys.tool_call.__self__ is sys
        found["class_members_hold_kernel"] = [
            name for name, member in vars(type(sys)).items()
            if _holds_kernel(member) or _holds_kernel(getattr(member, "fget", None))]
        found["closures"] = [name for name, member in vars(type(sys)).items()
                             if getattr(getattr(member, "fget", member), "__closure__", None)]
        found["module_globals_hold_kernel"] = [k for k, v in vars(api).items() if _holds_kernel(v)]
        found["dir_values_hold_kernel"] = [n for n in dir(sys) if not n.startswith("__")
                                           and _holds_kernel(getattr(sys, n))]
        task = asyncio.current_task()
        assert task is not None
        coro = task.get_coro()
        found["task_frame_holds_kernel"] = [k for k, v in coro.cr_frame.f_locals.items() if _holds_kernel(v)]
        found["task_callbacks_hold_kernel"] = _holds_kernel(
            [cb for cb, _ctx in getattr(task, "_callbacks", None) or ()], depth=3)
        return found

    found, _, _, _ = _run(tmp_path, attacker)
    assert not any(found[n] for n in ("kernel", "_kernel", "__dict__", "monitor", "_gate", "tools_registry"))
    assert found["slot_types"] == ["int", "str"]
    assert found["referents"] == ["int", "str", "type"]
    assert found["bound_self_is_handle"]
    assert found["class_members_hold_kernel"] == [] and found["closures"] == []
    assert found["module_globals_hold_kernel"] == [] and found["dir_values_hold_kernel"] == []
    assert found["task_frame_holds_kernel"] == [] and not found["task_callbacks_hold_kernel"]


def test_the_handle_cannot_be_rewritten_copied_or_pickled(tmp_path: Path):
    async def attacker(sys: Syscalls) -> list[str]:
        out = []
        for attempt in (lambda: setattr(sys, "_pid", 1), lambda: setattr(sys, "kernel", 1),
                        lambda: delattr(sys, "_token"), lambda: copy.copy(sys), lambda: copy.deepcopy(sys),
                        lambda: pickle.dumps(sys)):
            try:
                attempt()
                out.append("succeeded")
            except (AttributeError, TypeError) as e:
                out.append(type(e).__name__)
        return out

    out, _, _, _ = _run(tmp_path, attacker)
    assert out == ["AttributeError"] * 3 + ["TypeError"] * 3


def test_a_forged_or_dead_handle_reaches_nothing(tmp_path: Path):
    leaked: list[Syscalls] = []

    async def victim(sys: Syscalls) -> None:
        leaked.append(sys)

    async def attacker(sys: Syscalls) -> dict[str, Any]:
        out: dict[str, Any] = {}
        vpid = await sys.spawn(victim, "victim")
        await sys.wait(vpid)
        dead = leaked[0]
        for name, attempt in (("dead", lambda: dead.tool_call("secret", {})),
                              ("guessed", lambda: Syscalls(vpid, "guess").tool_call("secret", {}))):
            try:
                await attempt()
                out[name] = "ran"
            except SyscallError as e:
                out[name] = str(e)
        try:
            out["dead_name"] = dead.name
        except SyscallError as e:
            out["dead_name"] = str(e)
        # its own token under another pid still acts as itself: the pid the gate holds counts
        token = object.__getattribute__(sys, "_token")
        out["forged_pid_name"] = Syscalls(vpid, token).name
        return out

    out, _, ran, _ = _run(tmp_path, attacker)
    closed = "this syscall handle is closed (its agent has ended)"
    assert out == {"dead": closed, "guessed": closed, "dead_name": closed, "forged_pid_name": "attacker"}
    assert ran == []


def _frames(e: BaseException) -> list[types.FrameType]:
    frames, seen, todo = [], set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        tb = x.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        todo += [x.__cause__, x.__context__]
    return frames


def test_a_syscalls_exception_carries_no_kernel_frame(tmp_path: Path):
    async def attacker(sys: Syscalls) -> dict[str, Any]:
        out: dict[str, Any] = {}
        attempts = {"no such agent": lambda: sys.wait(424242), "denied": lambda: sys.configure(policy="rr"),
                    "bad messages": lambda: sys.llm_chat("not a list"),  # type: ignore[arg-type]
                    "bad spawn": lambda: sys.spawn(len)}
        for what, attempt in attempts.items():
            try:
                await attempt()
            except SyscallError as e:
                frames = _frames(e)
                holding = [f for f in frames if any(_holds_kernel(v) for v in f.f_locals.values())]
                out[what] = (str(e), [f.f_code.co_name for f in frames], [f.f_code.co_name for f in holding])
        return out

    out, _, _, _ = _run(tmp_path, attacker)
    assert out["no such agent"][0] == "no agent with pid 424242 in this kernel"
    assert out["denied"][0] == "denied: denied by capabilities: no capability for tool 'kernel.configure'"
    assert out["bad spawn"][0].startswith("an agent program must be an async function")
    for what, (_, frames, holding) in out.items():
        assert holding == [], (what, frames)
        assert "syscall" not in frames and "_privileged" not in frames, (what, frames)


def test_syscall_results_hold_no_kernel_objects(tmp_path: Path):
    async def attacker(sys: Syscalls) -> list[Any]:
        r = await sys.tool_call("secret", {})
        return [r, sys.tools(), sys.settings(), sys.workdir, sys.home, sys.name]

    out, _, ran, audit = _run(tmp_path, attacker)
    r, specs = out[0], out[1]
    assert r.status == "denied"
    assert r.reason == "denied: denied by capabilities: no capability for tool 'secret'"
    assert ran == []
    assert [s["function"]["name"] for s in specs] == ["secret"]
    assert not _holds_kernel(out, depth=4)
    assert all(not inspect.isfunction(v) for s in specs for v in s["function"].values())
    assert [(row["tool"], row["decision"]) for row in audit.tail(5)] == [("secret", "deny")]
