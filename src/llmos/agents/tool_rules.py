"""Tool rules: which tool an agent may call next, and when its turn may end (Letta's tool rules).

A turn is an agent's answer to one user message: a sequence of steps, each one
LLM call that picks one tool call. Tool rules constrain that sequence; they are
parsed from Letta's JSON shapes (`ToolRules.from_letta`, the `tool_rules` of a
Letta agent) and written back with `to_letta`:

- `run_first` (InitToolRule): the first call of a turn is one of these tools
  (with `args` prefilled, if given);
- `exit_loop` (TerminalToolRule): calling it ends the turn;
- `continue_loop` (ContinueToolRule): calling it always runs another step;
- `constrain_child_tools` (ChildToolRule): right after it, only its children
  (a child named in `child_arg_nodes` gets those arguments prefilled);
- `parent_last_tool` (ParentToolRule): its children only right after it,
  and right after it only its children;
- `conditional` (ConditionalToolRule): right after it, the child that its
  output maps to (`child_output_mapping`, else `default_child`, else any; none
  with `require_output_mapping`);
- `max_count_per_step` (MaxCountPerStepToolRule): at most `max_count_limit`
  calls of it per turn;
- `required_before_exit` (RequiredBeforeExitToolRule): the turn cannot end
  before it has been called;
- `requires_approval` (RequiresApprovalToolRule): offered like any tool, but each
  call waits in the kernel's approval queue for a person (the agents API sets the
  rule on the run's process); it never counts as the turn's terminal tool nor holds
  the turn open, so the reply guarantee does not depend on a person's answer.

The solver (`ToolRules.plan`) is a pure function of the rules, the agent's
tools and the calls that succeeded so far in this turn (a failed call changes
nothing, so the model may retry it); the agent offers the model only the tool
names it allows, as an enum in the call's grammar, so the rules hold even on a
model that ignores its instructions.

Reply guarantee: the turn ends with a call of a terminal tool (the rules'
`exit_loop` tools, else `send_message`) within `max_steps` steps. With one
step left, or when the model yielded without one (a call that is not terminal,
asked for no heartbeat and has no continue or child rule), only terminal tools
are offered; the steps before that are kept for required-before-exit tools
still to call. The guarantee overrides the other rules only on those forced
steps, and a rule set that leaves no tool offers the terminal tools too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

REPLY_TOOL = "send_message"

RULE_TYPES = ("run_first", "exit_loop", "continue_loop", "constrain_child_tools", "parent_last_tool",
              "conditional", "max_count_per_step", "required_before_exit", "requires_approval")
_CHILD_RULES = ("constrain_child_tools", "parent_last_tool", "conditional")


class ToolRuleError(ValueError):
    """A tool rule that is malformed or cannot hold for this agent (the message says which and why)."""


@dataclass(frozen=True)
class ToolRule:
    """One rule, in Letta's vocabulary (`type` is one of RULE_TYPES)."""

    type: str
    tool_name: str
    children: tuple[str, ...] = ()
    args: Mapping[str, Any] | None = None  # run_first: arguments fixed for the call
    child_args: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # child -> fixed arguments
    max_count_limit: int | None = None
    child_output_mapping: Mapping[str, str] = field(default_factory=dict)
    default_child: str | None = None
    require_output_mapping: bool = False
    prompt_template: str | None = None

    def names(self) -> set[str]:
        """Every tool this rule mentions."""
        return {self.tool_name, *self.children, *self.child_output_mapping.values(),
                *([self.default_child] if self.default_child else [])}

    def to_letta(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "tool_name": self.tool_name,
                               "prompt_template": self.prompt_template}
        if self.type in ("constrain_child_tools", "parent_last_tool"):
            out["children"] = list(self.children)
        if self.type == "constrain_child_tools" and self.child_args:
            out["child_arg_nodes"] = [{"name": c, "args": dict(a)} for c, a in self.child_args.items()]
        if self.type == "run_first" and self.args is not None:
            out["args"] = dict(self.args)
        if self.type == "max_count_per_step":
            out["max_count_limit"] = self.max_count_limit
        if self.type == "conditional":
            out.update(child_output_mapping=dict(self.child_output_mapping), default_child=self.default_child,
                       require_output_mapping=self.require_output_mapping)
        return out


@dataclass(frozen=True)
class Call:
    """A tool call that succeeded in this turn, with its output (what conditional rules read)."""

    name: str
    output: str = ""


@dataclass(frozen=True)
class Plan:
    """What the next step may do: call one of `allowed` (in the agent's tool order), with `prefill`'s
    arguments fixed; `forced` names the guarantee that narrowed the set ("reply": only terminal
    tools; "required": only required-before-exit tools still to call), else None."""

    allowed: tuple[str, ...]
    prefill: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    forced: str | None = None


def _text(rule: dict[str, Any], key: str, what: str) -> str:
    value = rule.get(key)
    if not isinstance(value, str) or not value:
        raise ToolRuleError(f"{what}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _names(rule: dict[str, Any], key: str, what: str) -> tuple[str, ...]:
    value = rule.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ToolRuleError(f"{what}: {key!r} must be a non-empty list of tool names, got {value!r}")
    return tuple(value)


def _args(value: Any, what: str) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise ToolRuleError(f"{what}: args must be an object, got {value!r}")
    return value


def parse_rule(rule: Any) -> ToolRule:
    """One rule from Letta's JSON shape; ToolRuleError naming what is wrong."""
    if not isinstance(rule, dict):
        raise ToolRuleError(f"a tool rule must be an object, got {rule!r}")
    kind = rule.get("type")
    if kind not in RULE_TYPES:
        raise ToolRuleError(f"unknown tool rule type {kind!r} (types: {', '.join(RULE_TYPES)})")
    name = _text(rule, "tool_name", kind)
    what = f"{kind} rule on {name}"
    template = rule.get("prompt_template")
    common = {"type": kind, "tool_name": name,
              "prompt_template": template if isinstance(template, str) else None}
    if kind == "run_first":
        return ToolRule(**common, args=_args(rule.get("args"), what))
    if kind in ("constrain_child_tools", "parent_last_tool"):
        children = _names(rule, "children", what)
        child_args: dict[str, dict[str, Any]] = {}
        nodes = (rule.get("child_arg_nodes") or []) if kind == "constrain_child_tools" else []
        for node in nodes:
            child = node.get("name") if isinstance(node, dict) else None
            if child not in children:
                raise ToolRuleError(f"{what}: child_arg_nodes entry {node!r} names no child of the rule")
            child_args[child] = _args(node.get("args"), what) or {}
        return ToolRule(**common, children=children, child_args=child_args)
    if kind == "max_count_per_step":
        limit = rule.get("max_count_limit")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ToolRuleError(f"{what}: max_count_limit must be an integer >= 1, got {limit!r}")
        return ToolRule(**common, max_count_limit=limit)
    if kind == "conditional":
        mapping = rule.get("child_output_mapping")
        if not isinstance(mapping, dict) or not mapping or not all(
                isinstance(v, str) and v for v in mapping.values()):
            raise ToolRuleError(f"{what}: child_output_mapping must map outputs to tool names, "
                                f"got {mapping!r}")
        default = rule.get("default_child")
        if default is not None and (not isinstance(default, str) or not default):
            raise ToolRuleError(f"{what}: default_child must be a tool name, got {default!r}")
        strict = bool(rule.get("require_output_mapping"))
        return ToolRule(**common, child_output_mapping={str(k): v for k, v in mapping.items()},
                        default_child=default, require_output_mapping=strict)
    return ToolRule(**common)


def _matches(output: str, key: str) -> bool:
    """Letta's matching of a tool's output to a conditional key (booleans case-blind, numbers by value)."""
    out = output.strip()
    if key.lower() in ("true", "false"):
        return out.lower() == key.lower()
    try:
        return float(out) == float(key)
    except ValueError:
        return out == key


class ToolRules:
    """An agent's tool rules and the solver over them."""

    def __init__(self, rules: Iterable[ToolRule] = ()) -> None:
        self.rules = tuple(rules)

    @classmethod
    def from_letta(cls, rules: Sequence[Any] | None) -> ToolRules:
        """Rules from Letta's JSON list (dicts, or letta-client models with `model_dump`)."""
        items = [r.model_dump() if hasattr(r, "model_dump") else r for r in rules or []]
        return cls(parse_rule(r) for r in items)

    def to_letta(self) -> list[dict[str, Any]]:
        return [r.to_letta() for r in self.rules]

    def __len__(self) -> int:
        return len(self.rules)

    def _of(self, kind: str) -> list[ToolRule]:
        return [r for r in self.rules if r.type == kind]

    def _named(self, kind: str) -> set[str]:
        return {r.tool_name for r in self._of(kind)}

    def requiring_approval(self) -> list[str]:
        """The tools whose every call waits for a person (requires_approval rules), sorted."""
        return sorted(self._named("requires_approval"))

    def terminal(self, tools: Iterable[str]) -> list[str]:
        """The tools that end a turn, in `tools` order: those of exit_loop rules, else send_message."""
        ends = self._named("exit_loop") or {REPLY_TOOL}
        return [t for t in tools if t in ends]

    def check(self, tools: Sequence[str], params: Mapping[str, Iterable[str]] | None = None) -> None:
        """ToolRuleError unless every rule names tools the agent has (and prefilled arguments that
        `params` lists for the tool), and some terminal tool can be called without approval."""
        have = set(tools)
        for rule in self.rules:
            missing = sorted(rule.names() - have)
            if missing:
                raise ToolRuleError(f"{rule.type} rule on {rule.tool_name} names tool(s) the agent does not "
                                    f"have: {', '.join(missing)} (tools: {', '.join(tools)})")
            fixed = [(rule.tool_name, rule.args or {}), *rule.child_args.items()]
            for tool, args in fixed:
                unknown = sorted(set(args) - set((params or {}).get(tool, args)))
                if unknown:
                    raise ToolRuleError(f"{rule.type} rule on {rule.tool_name} prefills unknown argument(s) "
                                        f"of {tool}: {', '.join(unknown)}")
        approval = self._named("requires_approval")
        if not [t for t in self.terminal(tools) if t not in approval]:
            raise ToolRuleError("no terminal tool can be called (the reply guarantee needs one): add "
                                f"{REPLY_TOOL} or an exit_loop rule on a tool the agent has, "
                                "without approval")

    def pending(self, tools: Iterable[str], history: Sequence[Call]) -> list[str]:
        """Required-before-exit tools not yet called in this turn, in `tools` order."""
        called = {c.name for c in history}
        required = self._named("required_before_exit")
        return [t for t in tools if t in required and t not in called]

    def by_rules(self, tools: Sequence[str], history: Sequence[Call]) -> list[str]:
        """The tools the rules allow next (before the reply guarantee), in `tools` order."""
        allowed = set(tools)
        if not history:
            init = self._named("run_first")
            if init:
                allowed &= init
            for rule in self._of("parent_last_tool"):
                allowed -= set(rule.children)
        else:
            last = history[-1]
            for rule in self.rules:
                if rule.type == "constrain_child_tools" and rule.tool_name == last.name:
                    allowed &= set(rule.children)
                elif rule.type == "parent_last_tool" and rule.tool_name == last.name:
                    allowed &= set(rule.children)
                elif rule.type == "parent_last_tool":
                    allowed -= set(rule.children)
                elif rule.type == "conditional" and rule.tool_name == last.name:
                    mapping = rule.child_output_mapping.items()
                    hit = next((c for k, c in mapping if _matches(last.output, k)), None)
                    if hit or rule.default_child:
                        allowed &= {hit or rule.default_child}
                    elif rule.require_output_mapping:
                        allowed = set()
        counts = [c.name for c in history]
        for rule in self._of("max_count_per_step"):
            if counts.count(rule.tool_name) >= (rule.max_count_limit or 0):
                allowed.discard(rule.tool_name)
        return [t for t in tools if t in allowed]

    def prefill(self, history: Sequence[Call]) -> dict[str, dict[str, Any]]:
        """Arguments the rules fix for the next call, by tool."""
        if not history:
            return {r.tool_name: dict(r.args) for r in self._of("run_first") if r.args}
        last = history[-1].name
        return {child: dict(args) for r in self._of("constrain_child_tools") if r.tool_name == last
                for child, args in r.child_args.items()}

    def plan(self, tools: Sequence[str], history: Sequence[Call], steps_left: int,
             must_reply: bool = False) -> Plan:
        """What the next step may call, with `steps_left` steps (this one included) left in the turn;
        `must_reply` after the model yielded without ending the turn."""
        approval = self._named("requires_approval")
        pending = [t for t in self.pending(tools, history) if t not in approval]
        ends = [t for t in self.terminal(tools) if t not in approval]
        prefill = self.prefill(history)
        if steps_left <= 1 or (must_reply and not pending):
            return Plan(tuple(ends), prefill, "reply")
        if must_reply or steps_left <= len(pending) + 1:
            return Plan(tuple(pending), prefill, "required")
        # a terminal tool is offered only if calling it leaves nothing required uncalled
        allowed = [t for t in self.by_rules(tools, history) if t not in ends or set(pending) <= {t}]
        if not allowed:
            return Plan(tuple(pending or ends), prefill, "required" if pending else "reply")
        return Plan(tuple(allowed), prefill)

    def after(self, name: str, history: Sequence[Call], heartbeat: bool) -> str:
        """What follows a successful call of `name` (already in `history`): "end" the turn, "continue"
        with a free step, or "reply" (the model yielded: the next step must end the turn)."""
        called = {c.name for c in history}
        uncalled = self._named("required_before_exit") - called - self._named("requires_approval")
        if name in self.terminal([name]) and not uncalled:
            return "end"
        has_children = any(r.tool_name == name for r in self.rules if r.type in _CHILD_RULES)
        if heartbeat or uncalled or has_children or name in self._named("continue_loop"):
            return "continue"
        return "reply"

    def describe(self) -> list[str]:
        """One line per rule for the model's instructions (the grammar enforces them regardless; Letta's
        Jinja `prompt_template`s are kept for `to_letta` but not rendered)."""
        lines = {
            "run_first": "Start with {t}.", "exit_loop": "Calling {t} ends your turn.",
            "continue_loop": "After {t}, you take another step.",
            "constrain_child_tools": "After {t}, call one of: {c}.",
            "parent_last_tool": "Call {c} only right after {t}.",
            "conditional": "After {t}, the next function depends on its result.",
            "max_count_per_step": "Call {t} at most {n} time(s) per turn.",
            "required_before_exit": "Call {t} before you end your turn.",
            "requires_approval": "{t} runs only after a person approves the call.",
        }
        return [lines[r.type].format(t=r.tool_name, c=", ".join(r.children), n=r.max_count_limit)
                for r in self.rules]
