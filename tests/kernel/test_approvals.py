"""Human approval in the one tool path: a call parks until a person decides; the agent reads the decision.

Attacks: a child that drops the parent's approval requirement; a grant with a quota of one whose use
would make the approval lookup miss it; deciding a call twice or after its timeout; killing the
agent while it waits.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from llmos.kernel import Kernel, Syscalls
from llmos.kernel.approvals import ApprovalError, approvals_of
from llmos.security.audit import AuditLog
from llmos.security.capabilities import Capabilities
from llmos.security.monitor import ReferenceMonitor
from llmos.tools.base import Tool, ToolRegistry
from tests.stub_backend import StubBackend

PAID: list[dict] = []
GRANTS = [{"tool": "pay", "approval": True}, {"tool": "quick"}]


def _kernel(home: Path, timeout_s: float = 30.0) -> tuple[Kernel, AuditLog]:
    tools = ToolRegistry()
    tools.register(Tool("pay", "Pay.", {"type": "object"}, lambda args, ctx: PAID.append(args) or
                        f"paid {args['amount']}"),
                   Tool("quick", "Quick.", {"type": "object"}, lambda args, ctx: "quick"))
    audit = AuditLog(home / "audit.db")
    monitor = ReferenceMonitor(audit=audit, tools=tools, default_capabilities=lambda w: Capabilities())
    kernel = Kernel(StubBackend(), home=home, tools=tools, monitor=monitor)
    approvals_of(kernel).timeout_s = timeout_s
    return kernel, audit


async def pay(sys: Syscalls, amount: int = 5) -> tuple[str, Any]:
    r = await sys.tool_call("pay", {"amount": amount})
    return r.status, r.content if r.ok else r.reason


async def _pending(kernel: Kernel, n: int = 1) -> list:
    for _ in range(500):
        items = approvals_of(kernel).list()
        if len(items) >= n:
            return items
        await asyncio.sleep(0.01)
    raise AssertionError("no approval appeared")


def test_approve_deny_and_timeout_are_the_agents_results_and_audited(tmp_path: Path):
    PAID.clear()

    async def go() -> None:
        kernel, audit = _kernel(tmp_path, timeout_s=0.5)
        queue = approvals_of(kernel)
        caps = Capabilities.of(GRANTS)
        try:
            # approved: the tool runs with the arguments the person saw
            pid = await kernel.spawn(pay, "payer", capabilities=caps, args={"amount": 7})
            [item] = await _pending(kernel)
            assert (item.pid, item.agent, item.owner, item.tool, item.args, item.state) == \
                (pid, "payer", "local", "pay", {"amount": 7}, "pending")
            assert PAID == []  # nothing ran yet
            queue.decide(item.id, True, "user:local")
            assert await kernel.wait(pid) == ("allowed", "paid 7")
            assert PAID == [{"amount": 7}]
            with pytest.raises(ApprovalError, match="already approved"):
                queue.decide(item.id, False, "user:local")

            # denied: the agent reads who denied it and why; the tool never runs
            pid = await kernel.spawn(pay, "payer2", capabilities=caps)
            [item] = await _pending(kernel)
            queue.decide(item.id, False, "user:alice", "too much")
            assert await kernel.wait(pid) == ("denied", f"denied: user:alice denied this call of pay "
                                                        f"(approval {item.id}): too much")
            # timeout: denied
            pid = await kernel.spawn(pay, "payer3", capabilities=caps)
            [item] = await _pending(kernel)
            assert await kernel.wait(pid) == ("denied", f"denied: pay needs a person's approval and got none "
                                                        f"within 0.5 s (approval {item.id} timed out)")
            with pytest.raises(ApprovalError, match="already expired"):
                queue.decide(item.id, True, "user:local")
            with pytest.raises(ApprovalError, match="no approval 'nope'"):
                queue.decide("nope", True, "user:local")
            assert PAID == [{"amount": 7}]

            # a tool without the requirement does not wait
            async def quick(sys: Syscalls) -> str:
                return (await sys.tool_call("quick", {})).status

            assert await kernel.wait(await kernel.spawn(quick, capabilities=caps)) == "allowed"
            assert queue.list() == []

            # killed while waiting: the approval is abandoned and cannot be approved later
            pid = await kernel.spawn(pay, "payer4", capabilities=caps)
            [item] = await _pending(kernel)
            await kernel.kill(pid, "test")
            await asyncio.sleep(0)
            assert item.state == "abandoned"
            with pytest.raises(ApprovalError, match="already abandoned"):
                queue.decide(item.id, True, "user:local")

            rows = [(r["agent"], r["decision"], r["reason"]) for r in audit.tail(100)
                    if r["tool"] == "approval"]
            assert rows == [("payer", "ask", "waiting for a person's approval (at most 0.5 s)"),
                            ("payer", "approve", "approved"),
                            ("payer2", "ask", "waiting for a person's approval (at most 0.5 s)"),
                            ("payer2", "deny", "too much"),
                            ("payer3", "ask", "waiting for a person's approval (at most 0.5 s)"),
                            ("payer3", "expired", "no decision within 0.5 s"),
                            ("payer4", "ask", "waiting for a person's approval (at most 0.5 s)"),
                            ("payer4", "abandoned", "the agent ended while it waited")]
            done = [r["reason"] for r in audit.tail(100) if r["tool"] == "pay" and r["decision"] == "done"]
            assert done == ["ok", "denied", "denied", "killed"]
        finally:
            await kernel.shutdown()

    asyncio.run(go())


def test_a_child_cannot_drop_the_approval_and_a_used_quota_does_not_waive_it(tmp_path: Path):
    async def go() -> None:
        kernel, _ = _kernel(tmp_path, timeout_s=0.2)
        try:
            async def parent(sys: Syscalls) -> list[str]:
                out = []
                try:
                    await sys.spawn(pay, capabilities=[{"tool": "pay"}])
                except Exception as e:
                    out.append(str(e))
                child = await sys.spawn(pay, capabilities=["pay"])  # by name: the parent's grant, as is
                out.append((await sys.wait(child))[1])
                return out

            out = await kernel.wait(await kernel.spawn(parent, capabilities=Capabilities.of(GRANTS)))
            assert out[0] == ("denied: cannot grant 'pay': pay: must require approval "
                              "(the parent's grant does)")
            assert out[1].startswith("denied: pay needs a person's approval and got none within 0.2 s")

            # a quota of one: the monitor uses it up before the approval is looked for
            caps = Capabilities.of([{"tool": "pay", "approval": True, "quota": 1}])
            status, reason = await kernel.wait(await kernel.spawn(pay, capabilities=caps))
            assert status == "denied" and "got none within 0.2 s" in reason
            assert PAID == []
        finally:
            await kernel.shutdown()

    PAID.clear()
    asyncio.run(go())


def test_a_per_agent_rule_requires_approval_for_that_agent_only(tmp_path: Path):
    async def go() -> None:
        kernel, _ = _kernel(tmp_path, timeout_s=0.2)
        caps = Capabilities.of([{"tool": "pay"}])
        try:
            async def ruled(sys: Syscalls) -> tuple[str, Any]:
                approvals_of(kernel).require("pa*", pid=sys.pid)
                return await pay(sys)

            assert (await kernel.wait(await kernel.spawn(ruled, capabilities=caps)))[0] == "denied"
            assert await kernel.wait(await kernel.spawn(pay, capabilities=caps)) == ("allowed", "paid 5")
        finally:
            await kernel.shutdown()

    asyncio.run(go())
