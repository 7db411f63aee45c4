"""The reference monitor's interface: every tool syscall is checked, then recorded.

The kernel calls `check` before it runs a tool and `record` after; a denial
is a value (the agent reads the reason as the tool's result), never an
exception, also for arguments or labels it cannot read (a huge integer, a
malformed label). `ReferenceMonitor` is llmos' monitor and what a kernel gets
by default (capabilities, flow policies, audit), deterministic: no model takes
part in a decision. `AllowAllMonitor` allows everything and is used only when
asked for by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from llmos.security.capabilities import DECLASSIFY


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


ALLOW = Decision(True, "allowed")
MAX_INT_BITS = 64  # integer arguments beyond a signed 64-bit range are refused, not converted
MAX_DEPTH = 32  # how deeply arguments may nest
ENDED_LABELS = 4096  # labels of ended agents kept for a later `flow` (wait) from them


def unsafe_argument(args: Any) -> str | None:
    """Why `args` cannot be checked safely (a huge integer, a non-mapping, deep nesting), or None."""
    if not isinstance(args, Mapping):
        return f"arguments must be a mapping, got {type(args).__name__}"
    stack: list[tuple[str, Any, int]] = [(str(k), v, 1) for k, v in args.items()]
    while stack:
        where, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"argument {where!r} nests deeper than {MAX_DEPTH} levels"
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() >= MAX_INT_BITS:
            return f"argument {where!r} is an integer outside the signed {MAX_INT_BITS}-bit range"
        if isinstance(value, Mapping):
            stack.extend((f"{where}.{k}", v, depth + 1) for k, v in value.items())
        elif isinstance(value, list | tuple | set | frozenset):
            stack.extend((f"{where}[{i}]", v, depth + 1) for i, v in enumerate(value))
    return None


def _auditable(args: Any) -> dict:
    """The arguments as the audit log stores them (a note instead, when they cannot be serialized)."""
    why = unsafe_argument(args)
    return dict(args) if why is None else {"unreadable": why}


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

    def flow(self, source: Any, sink: Any) -> None:
        """Data of agent `source` reaches agent `sink` (spawn arguments, a child's result)."""


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

    def flow(self, source: Any, sink: Any) -> None:
        pass


class ReferenceMonitor:
    """The one deterministic gate every tool syscall passes: capabilities, then flow policy, then audit.

    Guarantees: a call is allowed only if a capability the agent holds grants it
    and no flow rule forbids it; every decision is appended to the audit log
    before the tool runs. An agent the kernel spawned without capabilities gets
    `default_capabilities(its workdir)`. Every call is labelled at least by the
    agent's context: once a tool with untrusted output has answered an agent,
    everything that agent asks for afterwards may depend on that output. Labels
    a caller passes are joined with the context label (labels only rise); only
    an agent holding a grant for `ifc.declassify` (the plan interpreter, which
    tracks labels per value) has its labels taken as given.
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
        self._ended: dict[Any, Any] = {}  # pid -> the last label of an agent that ended (for `flow`)

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

    def may_declassify(self, agent: Any) -> bool:
        """Whether `agent` holds a grant for `ifc.declassify` (may label values finer than its context)."""
        workdir = getattr(agent, "workdir", None)
        return self.capabilities_of(agent).check(DECLASSIFY, {}, workdir, consume=False).allowed

    def _labels(self, agent: Any, args: Mapping[str, Any], labels: Any) -> dict:
        """The labels the flow rules see: the caller's labels joined with the agent's context label.

        Labels only rise: a caller without `ifc.declassify` cannot make an argument (or the call's
        control) look more trusted than everything its context has seen.
        """
        from llmos.security.ifc import CONTROL, Label

        ctx = self.context_label(agent) if self.track_context else Label()
        if labels is None:
            return {**{k: ctx for k in args}, CONTROL: ctx} if self.track_context else {}
        if not isinstance(labels, Mapping):
            raise TypeError(f"labels must map argument names to labels, got {type(labels).__name__}")
        given = {str(k): Label.coerce(v) for k, v in labels.items()}
        if not ctx.sources or self.may_declassify(agent):
            return given
        return {k: given.get(k, Label()).join(ctx) for k in dict.fromkeys([*args, *given, CONTROL])}

    def check(self, agent: Any, tool: str, args: Mapping[str, Any],
              labels: Mapping[str, Any] | None = None) -> Decision:
        try:
            decision, effective = self._decide(agent, tool, args, labels)
        except Exception as e:  # malformed labels or arguments: a denial, never a crash
            decision, effective = Decision(False, f"the call cannot be checked: {e}"), {}
        if self.audit is not None:
            shown = {k: v.to_json() for k, v in effective.items()} or None
            self.audit.append(_name(agent), tool, _auditable(args), shown,
                              "allow" if decision.allowed else "deny", decision.reason,
                              {"pid": getattr(agent, "pid", None)})
        return decision

    def _decide(self, agent: Any, tool: str, args: Mapping[str, Any], labels: Any) -> tuple[Decision, dict]:
        if (why := unsafe_argument(args)) is not None:
            return Decision(False, f"denied by the monitor: {why}"), {}
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
        return decision, effective

    def record(self, agent: Any, tool: str, args: Mapping[str, Any], decision: Decision,
               status: str) -> None:
        from llmos.security.ifc import Label, tool_source

        if decision.allowed and status == "ok" and tool in self._untrusted_tools and self.track_context:
            key = _key(agent)
            self._context[key] = self._context.get(key, Label()).join(Label.of(tool_source(tool, False)))
        if self.audit is not None and decision.allowed:
            self.audit.append(_name(agent), tool, _auditable(args), None, "done", status,
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
        """Drop what the monitor tracks for an agent that ended (its last label is kept for whoever
        waits for its result, a bounded number of them)."""
        label = self._context.pop(_key(agent), None)
        if label is not None and label.sources:
            self._ended[_key(agent)] = label
            while len(self._ended) > ENDED_LABELS:
                self._ended.pop(next(iter(self._ended)))

    def flow(self, source: Any, sink: Any) -> None:
        """What `source`'s context has seen reaches `sink`'s: a child starts with its parent's label
        (its arguments may carry what the parent read), a parent that waits for a child's result
        takes on the child's. Labels only rise, across agents too."""
        from llmos.security.ifc import Label

        if not self.track_context:
            return
        label = self._context.get(_key(source)) or self._ended.get(_key(source))
        if label is not None and label.sources:
            key = _key(sink)
            self._context[key] = self._context.get(key, Label()).join(label)


def _key(agent: Any) -> Any:
    return getattr(agent, "pid", None) or id(agent)


def _name(agent: Any) -> str:
    return str(getattr(agent, "name", None) or agent)
