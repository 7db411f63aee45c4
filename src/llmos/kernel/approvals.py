"""Human approval: a tool call that needs a person's yes waits in a queue until it gets one.

Like a setuid prompt (sudo asking for a password), some calls are allowed by
the reference monitor only together with a human decision: a grant that says
`approval = true`, or a tool the kernel (or an agent's Letta
`requires_approval` rule) names. The call, after the monitor allowed it,
parks here as a pending `Approval` with its exact arguments; a person approves
or denies it over the API (`/v1/approvals`) or the CLI (`llmos approve ID`,
`llmos deny ID`). Guarantees:

- the tool runs only after an approval of that very call (the arguments shown
  are the snapshot the tool will get); a denial, or no decision within the
  timeout, is the call's result: a "denied" `ToolResult` naming who denied it
  or that time ran out, which the agent reads like any other result;
- a decision is taken once: a second one, or one after the timeout, is
  refused (`ApprovalError`);
- every request, decision, timeout and abandoned call (the agent was killed
  while it waited) is appended to the audit log;
- each approval belongs to the owner of the calling process; the API shows and
  decides a user's own approvals only (an admin's: all).
"""

from __future__ import annotations

import asyncio
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from llmos.security.capabilities import glob_match
from llmos.tools.base import ToolDenied

DEFAULT_TIMEOUT_S = 300.0  # how long a call waits for a person before it is denied
KEEP_DECIDED = 1000  # decided approvals kept for GET /v1/approvals/{id}


class ApprovalError(Exception):
    """No such pending approval (unknown id, already decided, timed out)."""


@dataclass
class Approval:
    """One parked tool call and, once taken, its decision."""

    id: str
    pid: int
    agent: str
    owner: str
    tool: str
    args: dict[str, Any]
    created: float
    timeout_s: float
    state: str = "pending"  # pending | approved | denied | expired | abandoned
    decided_by: str | None = None
    reason: str = ""
    decided: float | None = None
    _future: asyncio.Future | None = field(default=None, repr=False)

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "pid": self.pid, "agent": self.agent, "owner": self.owner, "tool": self.tool,
                "args": self.args, "created": self.created, "expires": self.created + self.timeout_s,
                "state": self.state, "decided_by": self.decided_by, "reason": self.reason,
                "decided": self.decided}


class ApprovalQueue:
    """The approvals of one kernel: which calls need one, the pending ones, and the decisions."""

    def __init__(self, audit: Any = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.audit, self.timeout_s = audit, timeout_s
        self._tools: set[str] = set()  # tool globs that always need approval
        self._per_pid: dict[int, set[str]] = {}  # pid -> tool globs (an agent's requires_approval rules)
        self._items: dict[str, Approval] = {}

    def require(self, *tools: str, pid: int | None = None) -> None:
        """Make calls of `tools` (names or globs) need approval: of every agent, or only of `pid`."""
        (self._tools if pid is None else self._per_pid.setdefault(pid, set())).update(tools)

    def release(self, pid: int) -> None:
        """The process `pid` ended: drop the approval rules that were only its own."""
        self._per_pid.pop(pid, None)

    def needed(self, proc: Any, tool: str, grants: list[Any] = ()) -> bool:  # type: ignore[assignment]
        """Whether `proc`'s call of `tool` waits for a person: one of the `grants` it holds for the tool
        says so (any of them: a grant that would not allow the call cannot waive it), or a rule does."""
        if any(getattr(g, "approval", False) for g in grants):
            return True
        pid = getattr(proc, "pid", None)
        globs = self._tools | (self._per_pid.get(pid, set()) if isinstance(pid, int) else set())
        return any(glob_match(g, tool) for g in globs)

    async def ask(self, proc: Any, tool: str, args: dict[str, Any]) -> Approval:
        """Park the call until it is approved (returns the approval); ToolDenied on a denial or timeout."""
        future = asyncio.get_running_loop().create_future()
        item = Approval(secrets.token_hex(8), proc.pid, str(proc.name), str(getattr(proc, "owner", "local")),
                        tool, args, time.time(), self.timeout_s, _future=future)
        self._items[item.id] = item
        self._audit(item, "ask", f"waiting for a person's approval (at most {self.timeout_s:g} s)")
        try:
            await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except TimeoutError:
            self._settle(item, "expired", None, f"no decision within {self.timeout_s:g} s")
        except asyncio.CancelledError:
            self._settle(item, "abandoned", None, "the agent ended while it waited")
            raise
        finally:
            self._trim()
        if item.state == "approved":
            return item
        if item.state == "expired":
            raise ToolDenied(f"{tool} needs a person's approval and got none within {self.timeout_s:g} s "
                             f"(approval {item.id} timed out)")
        raise ToolDenied(f"{item.decided_by} denied this call of {tool} (approval {item.id})"
                         + (f": {item.reason}" if item.reason else ""))

    def gate(self, proc: Any, monitor: Any) -> Callable[[str, dict[str, Any]], Awaitable[Any]]:
        """What the tool path awaits, after `monitor` allowed `proc`'s call and before the tool runs."""
        async def wait(tool: str, args: dict[str, Any]) -> Approval | None:
            if self.needed(proc, tool, _grants(monitor, proc, tool)):
                return await self.ask(proc, tool, args)
            return None

        return wait

    def get(self, approval_id: str) -> Approval | None:
        return self._items.get(approval_id)

    def list(self, pending_only: bool = True) -> list[Approval]:
        return [a for a in self._items.values() if a.state == "pending" or not pending_only]

    def decide(self, approval_id: str, approve: bool, by: str, reason: str = "") -> Approval:
        """Approve or deny a pending call (once)."""
        item = self._items.get(approval_id)
        if item is None:
            raise ApprovalError(f"no approval {approval_id!r}")
        if item.state != "pending":
            raise ApprovalError(f"approval {approval_id} is already {item.state}"
                                + (f" (by {item.decided_by})" if item.decided_by else ""))
        self._settle(item, "approved" if approve else "denied", by, reason)
        return item

    # -- private

    def _settle(self, item: Approval, state: str, by: str | None, reason: str) -> None:
        item.state, item.decided_by, item.reason, item.decided = state, by, reason, time.time()
        if item._future is not None and not item._future.done():
            item._future.set_result(state)
        self._audit(item, {"approved": "approve", "denied": "deny"}.get(state, state), reason or state)

    def _audit(self, item: Approval, decision: str, reason: str) -> None:
        if self.audit is not None:
            self.audit.append(item.agent, "approval", {"id": item.id, "tool": item.tool, "args": item.args},
                              None, decision, reason, {"pid": item.pid, "owner": item.owner,
                                                       "by": item.decided_by})

    def _trim(self) -> None:
        decided = [k for k, a in self._items.items() if a.state != "pending"]
        for k in decided[:max(0, len(decided) - KEEP_DECIDED)]:
            del self._items[k]


def _grants(monitor: Any, proc: Any, tool: str) -> list[Any]:
    """The grants `proc` holds whose tool glob matches `tool`."""
    capabilities_of = getattr(monitor, "capabilities_of", None)
    if capabilities_of is None:
        return []
    return [g for g in capabilities_of(proc).grants if glob_match(g.tool, tool)]


_QUEUES: weakref.WeakKeyDictionary[Any, ApprovalQueue] = weakref.WeakKeyDictionary()


def approvals_of(kernel: Any) -> ApprovalQueue:
    """The approval queue of `kernel` (made on first use, auditing to its monitor's log)."""
    queue = _QUEUES.get(kernel)
    if queue is None:
        queue = _QUEUES[kernel] = ApprovalQueue(getattr(kernel.monitor, "audit", None))
    return queue
