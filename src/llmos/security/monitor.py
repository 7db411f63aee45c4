"""The reference monitor's interface: every tool syscall is checked, then recorded.

The kernel calls `check` before it runs a tool and `record` after; a denial
is a value (the agent reads the reason as the tool's result), never an
exception. `AllowAllMonitor` is the permissive monitor a kernel gets when it
is given none; `ReferenceMonitor` is llmos' real one (capabilities, flow
policies, audit), deterministic: no model takes part in a decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


ALLOW = Decision(True, "allowed")


class Monitor(Protocol):
    def check(self, agent: Any, tool: str, args: Mapping[str, Any],
              labels: Mapping[str, Any] | None = None) -> Decision:
        """May `agent` (has .pid, .name, .capabilities) call `tool` with `args`?"""

    def record(self, agent: Any, tool: str, args: Mapping[str, Any], decision: Decision,
               status: str) -> None:
        """Append the decision and the call's outcome ("ok", "error", "denied", ...)."""

    def attenuate(self, parent: Any, requested: Any) -> Any:
        """The capabilities a child of `parent` gets when it asks for `requested`.

        Raises PermissionError if `requested` is not a subset of what the parent holds.
        """

    def forget(self, agent: Any) -> None:
        """The agent ended: drop whatever the monitor tracked for it."""


class AllowAllMonitor:
    """Allows every call; the kernel's syscall log still records each one."""

    def check(self, agent: Any, tool: str, args: Mapping[str, Any],
              labels: Mapping[str, Any] | None = None) -> Decision:
        return ALLOW

    def record(self, agent: Any, tool: str, args: Mapping[str, Any], decision: Decision,
               status: str) -> None:
        pass

    def attenuate(self, parent: Any, requested: Any) -> Any:
        return requested

    def forget(self, agent: Any) -> None:
        pass


class ReferenceMonitor:
    """The one deterministic gate every tool syscall passes: capabilities, then flow policy, then audit.

    Guarantees: a call is allowed only if a capability the agent holds grants it
    and no flow rule forbids it; every decision is appended to the audit log
    before the tool runs. An agent the kernel spawned without capabilities gets
    `default_capabilities(its workdir)`. Calls made without labels are labelled
    by the agent's context: once a tool with untrusted output has answered an
    agent, everything that agent asks for afterwards may depend on that output.
    """

    def __init__(self, audit: Any = None, flows: Any = None, tools: Any = None,
                 default_capabilities: Any = None, track_context: bool = True):
        from llmos.security.capabilities import default_capabilities as _default
        from llmos.security.ifc import FlowPolicies

        self.audit = audit  # an AuditLog, or None to keep no log
        self.flows = flows if flows is not None else FlowPolicies()
        self._untrusted_tools = {n for n, t in getattr(tools, "tools", {}).items() if t.untrusted_output}
        self._default = default_capabilities or _default
        self.track_context = track_context
        self._context: dict[Any, Any] = {}  # pid -> Label of what the agent's context has seen

    def untrusted_output(self, *tools: str) -> None:
        """Declare tools whose output is outside content (when no ToolRegistry was given)."""
        self._untrusted_tools.update(tools)

    def capabilities_of(self, agent: Any) -> Any:
        from llmos.security.capabilities import Capabilities

        caps = getattr(agent, "capabilities", None)
        if caps is None:
            workdir = getattr(agent, "workdir", None)
            caps = self._default(workdir) if workdir is not None else Capabilities()
            try:
                agent.capabilities = caps
            except AttributeError:
                pass
        elif not isinstance(caps, Capabilities):
            caps = Capabilities.of(caps)
            agent.capabilities = caps
        return caps

    def context_label(self, agent: Any) -> Any:
        from llmos.security.ifc import Label

        return self._context.get(_key(agent), Label())

    def _labels(self, agent: Any, args: Mapping[str, Any], labels: Mapping[str, Any] | None) -> dict:
        from llmos.security.ifc import CONTROL, Label

        if labels is not None:
            return {k: Label.coerce(v) for k, v in labels.items()}
        if not self.track_context:
            return {}
        ctx = self.context_label(agent)
        return {**{k: ctx for k in args}, CONTROL: ctx}

    def check(self, agent: Any, tool: str, args: Mapping[str, Any],
              labels: Mapping[str, Any] | None = None) -> Decision:
        caps = self.capabilities_of(agent)
        workdir = getattr(agent, "workdir", None)
        cap = caps.check(tool, args, workdir, consume=False)
        effective = self._labels(agent, args, labels)
        if not cap.allowed:
            decision = Decision(False, f"denied by capabilities: {cap.reason}")
        elif (why := self.flows.check(tool, args, effective)) is not None:
            decision = Decision(False, f"denied by flow policy: {why}")
        else:
            cap = caps.check(tool, args, workdir, consume=True)  # takes one unit of quota
            decision = Decision(True, cap.reason) if cap.allowed else \
                Decision(False, f"denied by capabilities: {cap.reason}")
        if self.audit is not None:
            self.audit.append(_name(agent), tool, dict(args), {k: v.to_json() for k, v in effective.items()}
                              or None, "allow" if decision.allowed else "deny", decision.reason,
                              {"pid": getattr(agent, "pid", None)})
        return decision

    def record(self, agent: Any, tool: str, args: Mapping[str, Any], decision: Decision,
               status: str) -> None:
        from llmos.security.ifc import Label, tool_source

        if decision.allowed and status == "ok" and tool in self._untrusted_tools and self.track_context:
            key = _key(agent)
            self._context[key] = self._context.get(key, Label()).join(Label.of(tool_source(tool, False)))
        if self.audit is not None and decision.allowed:
            self.audit.append(_name(agent), tool, dict(args), None, "done", status,
                              {"pid": getattr(agent, "pid", None)})

    def attenuate(self, parent: Any, requested: Any) -> Any:
        """`parent` is the parent process, or its capabilities (what the kernel passes)."""
        from llmos.security.capabilities import Capabilities

        if parent is None or isinstance(parent, Capabilities | list | tuple):
            caps = parent if isinstance(parent, Capabilities) else Capabilities.of(parent or [])
        else:
            caps = self.capabilities_of(parent)
        try:
            child = caps.attenuate(requested)
        except PermissionError as e:
            if self.audit is not None:
                self.audit.append(_name(parent), "spawn", {"requested": repr(requested)}, None, "deny",
                                  str(e))
            raise
        if self.audit is not None:
            self.audit.append(_name(parent), "spawn", {"granted": child.tools()}, None, "allow",
                              "attenuated from the parent's capabilities")
        return child

    def forget(self, agent: Any) -> None:
        """Drop what the monitor tracks for an agent that ended."""
        self._context.pop(_key(agent), None)


def _key(agent: Any) -> Any:
    return getattr(agent, "pid", None) or id(agent)


def _name(agent: Any) -> str:
    return str(getattr(agent, "name", None) or agent)
