"""The reference monitor inside the real kernel: grants, flow policy, attenuation and the audit trail."""

from __future__ import annotations

import asyncio
from pathlib import Path

from llmos.kernel import Kernel
from llmos.security.audit import AuditLog
from llmos.security.capabilities import default_capabilities
from llmos.security.ifc import FlowPolicies
from llmos.security.monitor import ReferenceMonitor
from llmos.tools.base import ToolRegistry
from llmos.tools.files import file_tools
from llmos.tools.shell import shell_tool
from tests.stub_backend import StubBackend


class NoLLM(StubBackend):
    """A backend for agents that only make tool syscalls."""

    context_window = 1024


async def child(sys):
    w = await sys.tool_call("write_file", {"path": "c.txt", "content": "child"})
    s = await sys.tool_call("run_shell", {"command": "echo hi"})
    return [w.ok, s.ok]


async def parent(sys):
    out = {}
    out["write"] = (await sys.tool_call("write_file", {"path": "a.txt", "content": "hello"})).ok
    r = await sys.tool_call("read_file", {"path": "a.txt"})
    out["read"] = (r.content, r.trusted)
    out["escape"] = (await sys.tool_call("read_file", {"path": "/etc/passwd"})).error
    # the file's content is now in this agent's context, so the flow rule on run_shell applies
    out["shell_after_read"] = (await sys.tool_call("run_shell", {"command": "ls"})).error
    # labels the agent passes only rise: claiming the user wrote the command launders nothing
    out["shell_user_labelled"] = (await sys.tool_call("run_shell", {"command": "ls"},
                                                      labels={"command": ["user"]})).status
    out["shell_no_labels"] = (await sys.tool_call("run_shell", {"command": "ls"}, labels={})).status
    return out


def test_monitor_in_kernel(tmp_path: Path):
    reg = ToolRegistry()
    reg.register(*file_tools(), shell_tool())
    audit = AuditLog(tmp_path / "audit.db")
    flows = FlowPolicies().add("run_shell", "command", why="no commands steered by file contents")
    monitor = ReferenceMonitor(audit=audit, flows=flows, tools=reg)

    async def go():
        kernel = Kernel(NoLLM(), home=tmp_path, tools=reg, monitor=monitor,
                        default_capabilities=default_capabilities)
        try:
            pid = await kernel.spawn(parent, name="boss")
            result = await kernel.wait(pid)
            assert kernel.process(pid).exit_reason == "exited", kernel.process(pid).exit_reason
            # a child gets a subset of the parent's grants (Syscalls.spawn's name= clashes with
            # Kernel.syscall's own parameter for now, so the test spawns it from outside)
            kid = await kernel.spawn(child, "kid", parent=pid, capabilities=["write_file", "run_shell"])
            result["child"] = await kernel.wait(kid)
            try:
                await kernel.spawn(child, "greedy", parent=pid, capabilities=[{"tool": "send_money"}])
            except PermissionError as e:
                result["greedy"] = str(e)
            return result
        finally:
            await kernel.shutdown()

    out = asyncio.run(go())
    assert out["write"] and out["read"] == ("hello", False)
    assert out["escape"].startswith("denied: denied by capabilities: path path='/etc/passwd' is outside")
    assert out["shell_after_read"] == ("denied: denied by flow policy: argument 'command' depends on "
                                       "untrusted data from tool:read_file (no commands steered by file "
                                       "contents)")
    assert out["shell_user_labelled"] == out["shell_no_labels"] == "denied"
    # the child starts with what its parent has read (a file): the same flow rule holds for its shell
    assert out["child"] == [True, False]
    assert out["greedy"] == "cannot grant 'send_money': the parent holds no capability for it"
    assert sorted(p.name for p in (tmp_path / "scratch").glob("*/*.txt")) == ["a.txt", "c.txt"]
    rows = audit.tail(100)
    assert ("kid", "write_file", "allow") in [(r["agent"], r["tool"], r["decision"]) for r in rows]
    assert [r["decision"] for r in rows if r["tool"] == "spawn"] == ["allow", "deny"]
    assert audit.verify()[:3] == (True, None, f"{len(rows)} rows, chain intact")
