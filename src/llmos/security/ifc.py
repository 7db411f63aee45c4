"""Information-flow control: labels on values and per-tool flow policies (after CaMeL).

An LLM cannot tell instructions from data, so llmos does not ask it to: every
value carries a label, the set of sources it was derived from (the user's
request, a tool's output, another agent, the quarantined LLM), and a value is
trusted exactly when all its sources are. Labels only grow: combining values
joins their labels, so nothing derived from untrusted data is ever trusted
again. A flow policy names, per tool, the arguments that must be trusted (an
email's recipients, a payment's IBAN and amount) and the values that stay
acceptable even when untrusted (an allowlist such as the user's own address
book). The reference monitor applies the policies before every tool call, so a
prompt injection can put words in front of a model but cannot make those words
choose who gets the money.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llmos.security.capabilities import glob_match

CONTROL = "$control"  # labels key: what decided that this call happens at all (CaMeL's control flow)


@dataclass(frozen=True, order=True)
class Source:
    """Where a value came from: `user`, `plan`, `tool:NAME`, `agent:NAME`, `qllm` ...

    `endorsed`: untrusted content the user pointed at by name ("pay the bill in bill.txt"); rules
    that say so accept it where they would refuse other untrusted data.
    """

    name: str
    trusted: bool
    endorsed: bool = False


USER_SOURCE = Source("user", True)
PLAN_SOURCE = Source("plan", True)  # a literal the privileged planner wrote, seeing only the user's request


@dataclass(frozen=True)
class Label:
    """A value's provenance: trusted exactly when every source is (no sources = a trusted constant)."""

    sources: frozenset[Source] = frozenset()

    @property
    def trusted(self) -> bool:
        return all(s.trusted for s in self.sources)

    def join(self, *others: Label) -> Label:
        """The label of a value computed from this one and `others`: the union of their sources."""
        if not others:
            return self
        return Label(self.sources.union(*(o.sources for o in others)))

    @property
    def endorsed(self) -> bool:
        """Trusted, or untrusted only through sources the user named."""
        return all(s.trusted or s.endorsed for s in self.sources)

    def untrusted_sources(self) -> list[str]:
        return sorted(s.name for s in self.sources if not s.trusted)

    def to_json(self) -> dict[str, Any]:
        out = {"sources": sorted(s.name for s in self.sources), "trusted": self.trusted,
               "untrusted": self.untrusted_sources()}
        endorsed = sorted(s.name for s in self.sources if s.endorsed and not s.trusted)
        if endorsed:
            out["endorsed"] = endorsed
        return out

    @classmethod
    def of(cls, *sources: Source) -> Label:
        return cls(frozenset(sources))

    @classmethod
    def coerce(cls, value: Any) -> Label:
        """A Label from a Label, a `to_json()` dict, or a list of source names ("!name" = untrusted)."""
        if isinstance(value, Label):
            return value
        if value is None:
            return cls()
        if isinstance(value, Mapping):
            untrusted = set(value.get("untrusted", ()))
            endorsed = set(value.get("endorsed", ())) & untrusted
            names = set(value.get("sources", ())) | untrusted
            if value.get("trusted") is False and not untrusted:
                untrusted = names or {"unknown"}
                names |= untrusted
            return cls(frozenset(Source(n, n not in untrusted, n in endorsed) for n in names))
        if isinstance(value, Iterable) and not isinstance(value, str | bytes):
            return cls(frozenset(Source(n[1:], False) if n.startswith("!") else Source(n, True)
                                 for n in map(str, value)))
        raise TypeError(f"cannot read a label from {type(value).__name__}: {value!r}")


TRUSTED = Label()
USER = Label.of(USER_SOURCE)


def tool_source(tool: str, trusted: bool) -> Source:
    return Source(f"tool:{tool}", trusted)


def join_all(labels: Iterable[Label]) -> Label:
    return Label().join(*labels)


@dataclass(frozen=True)
class FlowRule:
    """For calls of `tool` (a glob): which arguments must not depend on untrusted data.

    `trusted_args` lists argument names ("*" = all); an untrusted argument still
    passes if its value (each element, for a list) is in `trusted_values[arg]`.
    With `trusted_control`, the call itself may not be caused by untrusted data.
    With `endorsed`, content the user named (a file, a page) counts as the user's say.
    `why` is the reason a reader (and the denied agent) sees.
    """

    tool: str
    trusted_args: tuple[str, ...] = ()
    trusted_values: Mapping[str, frozenset[str]] = field(default_factory=dict)
    trusted_control: bool = False
    why: str = ""
    endorsed: bool = False

    def violation(self, args: Mapping[str, Any], labels: Mapping[str, Label]) -> str | None:
        if self.trusted_control:
            control = labels.get(CONTROL, TRUSTED)
            if not control.trusted:
                return (f"calling {self.tool} was decided by untrusted data from "
                        f"{', '.join(control.untrusted_sources())}")
        names = list(args) if "*" in self.trusted_args else [a for a in self.trusted_args if a in args]
        for arg in names:
            label = labels.get(arg, TRUSTED)
            if label.trusted or (self.endorsed and label.endorsed):
                continue
            allowed = self.trusted_values.get(arg)
            values = args[arg] if isinstance(args[arg], list | tuple) else [args[arg]]
            if allowed is not None and values and all(_norm(v) in allowed for v in values):
                continue
            return (f"argument {arg!r} depends on untrusted data from "
                    f"{', '.join(label.untrusted_sources())}")
        return None


def _norm(v: Any) -> str:
    return str(v).strip().lower()


@dataclass
class FlowPolicies:
    """The flow rules the reference monitor applies; every matching rule must hold."""

    rules: list[FlowRule] = field(default_factory=list)

    def add(self, tool: str, *trusted_args: str, trusted_values: Mapping[str, Iterable[str]] | None = None,
            trusted_control: bool = False, why: str = "", endorsed: bool = False) -> FlowPolicies:
        values = {k: frozenset(_norm(v) for v in vs) for k, vs in (trusted_values or {}).items()}
        self.rules.append(FlowRule(tool, tuple(trusted_args), values, trusted_control, why, endorsed))
        return self

    def check(self, tool: str, args: Mapping[str, Any], labels: Mapping[str, Any] | None) -> str | None:
        """Why the flow into `tool` is forbidden, or None if every rule holds."""
        rules = [r for r in self.rules if glob_match(r.tool, tool)]
        if not rules:
            return None
        coerced = {k: Label.coerce(v) for k, v in (labels or {}).items()}
        for rule in rules:
            why = rule.violation(args, coerced)
            if why is not None:
                return f"{why}" + (f" ({rule.why})" if rule.why else "")
        return None

    def __bool__(self) -> bool:
        return bool(self.rules)
