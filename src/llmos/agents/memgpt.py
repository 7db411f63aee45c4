"""The MemGPT agent: an LLM that manages its own virtual context through memory functions.

Each run resumes the persistent agent named after the process (`sys.name`):
its core memory, summary, message queue and archival storage are read from
the memory store, so the conversation goes on across runs and restarts. For
every user message the agent takes a turn of steps: main context is assembled
under memory pressure (warning, then eviction with a recursive summary), the
model answers with exactly one function call (constrained to the JSON schemas
of the functions the tool rules allow now, so even a small model's calls parse
and obey the rules), the call runs as a syscall through the reference monitor,
and its result is appended.

Guarantees: no prompt sent to the model, for a step or a summary, takes more
than the context window less the tokens asked for its reply. Every turn ends
with a terminal tool call (`send_message` unless the rules name others) within
`max_steps` steps, unless the reference monitor refuses that call: with one
step left, or once the model yields without replying, the grammar offers only
the terminal tools (see `llmos.agents.tool_rules`). A `send_message` call cut
short by the reply budget is delivered as far as it got (`reply_tokens` is at
least the length of the call's opening, so some of the message always fits);
on a step that may only reply, text that is not a call (from a backend that
ignored the grammar) is taken as the message.

Entry point for other programs (the agents API): inside a kernel process,

    agent = open_agent(sys, tool_rules=ToolRules.from_letta(rules), max_steps=6)
    turn = await agent.turn("Hi!", on_message=print)
    turn.messages      # AssistantMessage / ToolCallMessage / ToolReturnMessage, in order
    turn.stop_reason   # "end_turn" or "max_steps" (Letta's StopReasonType)
    turn.steps, turn.prompt_tokens, turn.completion_tokens  # usage

`on_message` sees each message as soon as its step is recorded (for streaming).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmos.agents.messages import AgentMessage, AssistantMessage, call_messages
from llmos.agents.tool_rules import REPLY_TOOL, Call, Plan, ToolRules
from llmos.memory import DEFAULT_SYSTEM, ContextConfig, MainContext, event, open_store

MEMORY_FUNCTIONS = ("send_message", "core_memory_append", "core_memory_replace", "conversation_search",
                    "conversation_search_date", "archival_memory_insert", "archival_memory_search")

DEFAULT_PERSONA = "I am Sam, a friendly assistant with a long memory. I keep my replies short."
DEFAULT_HUMAN = "(nothing known about the user yet)"

_CALL_FORMAT = (
    'Answer with one JSON object {"function": NAME, "arguments": {...}}. To talk to the user, call '
    'send_message with {"message": "...", "request_heartbeat": false}.'
)
# What a constrained send_message call starts with, up to its message: its bytes bound the tokens
# the model can spend before the message begins (a token is at least one byte).
_REPLY_OPENING = '{"function": "send_message", "arguments": {"message": "'
MIN_REPLY_TOKENS = len(_REPLY_OPENING.encode()) + 1
DEFAULT_MAX_STEPS = 4


def home_of(sys: Any) -> Path:
    """The llmos home the kernel gives its tools (memory tools and this agent must share one store)."""
    return Path(sys.home)


def instructions(system: str | None, rules: ToolRules) -> str:
    """The system prompt the model sees: the agent's own (default: MemGPT's), how to answer with a
    function call, and one line per tool rule."""
    return " ".join([system or DEFAULT_SYSTEM, _CALL_FORMAT, *rules.describe()])


def call_schema(specs: list[dict[str, Any]], max_string: int = 400,
                choices: dict[str, list[str]] | None = None,
                prefill: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """JSON schema of one function call to any of `specs` (OpenAI tool specs): the function names
    it allows are exactly those of `specs`. Strings are bounded so a call ends inside the reply's
    token budget; an argument named in `choices` (e.g. a core memory `label`) may only take one of
    the listed values; `prefill[function]` fixes arguments (tool rules' `args`); the message of
    `send_message` holds at least one non-space character."""
    choices = choices or {}

    def bounded(schema: dict[str, Any], name: str = "") -> dict[str, Any]:
        out = dict(schema)
        if out.get("type") == "string":
            if choices.get(name):
                out["enum"] = list(choices[name])
            else:
                out.setdefault("maxLength", max_string)
        if "properties" in out:
            out["properties"] = {k: bounded(v, k) for k, v in out["properties"].items()}
        return out

    def arguments(spec: dict[str, Any]) -> dict[str, Any]:
        name = spec["function"]["name"]
        out = bounded(spec["function"]["parameters"])
        props = dict(out.get("properties", {}))
        if name == REPLY_TOOL and "message" in props:
            props["message"] = {**props["message"], "minLength": 1, "pattern": r"^\S"}
        for key, value in (prefill or {}).get(name, {}).items():
            props[key] = {"const": value}
        return {**out, "properties": props}

    return {"anyOf": [
        {"type": "object",
         "properties": {"function": {"const": s["function"]["name"]}, "arguments": arguments(s)},
         "required": ["function", "arguments"], "additionalProperties": False}
        for s in specs]}


def salvage_reply(text: str) -> str | None:
    """The message of a `send_message` call cut short by the token budget (the grammar makes it start
    with the call's opening), as far as it got; None for any other text or an empty message."""
    if not text.startswith(_REPLY_OPENING):
        return None
    rest = text[len(_REPLY_OPENING):]
    try:  # the string was closed and the call cut later
        message = json.JSONDecoder().raw_decode('"' + rest)[0]
    except json.JSONDecodeError:
        message = None
        for cut in range(min(6, len(rest)) + 1):  # drop a partial escape (at most \uXXX)
            try:
                message = json.loads('"' + rest[:len(rest) - cut] + '"')
                break
            except json.JSONDecodeError:
                continue
    return message if message and message.strip() else None


def parse_call(text: str, known: set[str]) -> tuple[str, dict[str, Any]]:
    """(function, arguments) of a reply; ValueError saying what is wrong with it."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the reply is not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(call, dict) or not isinstance(call.get("function"), str):
        raise ValueError('the reply must be an object with a "function" name')
    if call["function"] not in known:
        raise ValueError(f"no function named {call['function']!r} (functions: {', '.join(sorted(known))})")
    args = call.get("arguments", {})
    if not isinstance(args, dict):
        raise ValueError('"arguments" must be an object')
    return call["function"], args


@dataclass
class Turn:
    """What one user message led to: the messages in order (Letta's types), why the turn stopped
    ("end_turn": a terminal tool ended it; "max_steps": the step limit did), and its usage."""

    user_message_id: int
    messages: list[AgentMessage] = field(default_factory=list)
    stop_reason: str = "max_steps"
    steps: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def replies(self) -> list[str]:
        """What the agent said to the user."""
        return [m.content for m in self.messages if isinstance(m, AssistantMessage)]


@dataclass
class _Step:
    messages: list[AgentMessage]
    call: Call | None  # the call that succeeded, if one did
    heartbeat: bool = False


class MemGPTAgent:
    """One agent's step loop over the kernel's syscalls, under its tool rules."""

    def __init__(self, sys: Any, context: MainContext, specs: list[dict[str, Any]], *,
                 tool_rules: ToolRules | None = None, max_steps: int = DEFAULT_MAX_STEPS,
                 reply_tokens: int = 128, temperature: float = 0.0, seed: int | None = None,
                 constrained: bool = True, max_string: int | None = None) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        if reply_tokens < MIN_REPLY_TOKENS:
            raise ValueError(f"reply_tokens must be at least {MIN_REPLY_TOKENS} (a send_message call's "
                             f"opening), got {reply_tokens}")
        self.sys = sys
        self.context = context
        self.specs = {s["function"]["name"]: s for s in specs}
        self.tools = list(self.specs)
        self.rules = tool_rules or ToolRules()
        self.rules.check(self.tools, {n: s["function"]["parameters"].get("properties", {})
                                      for n, s in self.specs.items()})
        self.max_steps = max_steps
        self.reply_tokens = reply_tokens
        self.temperature = temperature
        self.seed = seed
        self.constrained = constrained
        self.max_string = max_string or 2 * reply_tokens
        self._schemas: dict[str, dict[str, Any]] = {}

    def schema(self, plan: Plan) -> dict[str, Any]:
        """The JSON schema of the next call: the functions `plan` allows, its arguments prefilled."""
        key = json.dumps([plan.allowed, plan.prefill], sort_keys=True, default=str)
        if key not in self._schemas:
            labels = {"label": [b.label for b in self.context.core.blocks()]}
            self._schemas[key] = call_schema([self.specs[n] for n in plan.allowed], self.max_string, labels,
                                             {k: dict(v) for k, v in plan.prefill.items()})
        return self._schemas[key]

    async def _summarize(self, messages: list[dict[str, Any]], max_tokens: int) -> str:
        result = await self.sys.llm_chat(messages, max_tokens=max_tokens, temperature=0.0)
        self.context.note_prompt(result.prompt_tokens, max_tokens)
        return result.text

    def _refuse(self, text: str, why: str) -> _Step:
        self.context.append("assistant", text, search_text="")
        self.context.alert(why)
        return _Step([], None)

    async def step(self, plan: Plan, turn: Turn) -> _Step:
        """One model call, offered only the functions `plan` allows, and the call it makes."""
        ctx = self.context
        messages, _ = await ctx.prompt(self._summarize)
        result = await self.sys.llm_chat(messages, max_tokens=self.reply_tokens, temperature=self.temperature,
                                         json_schema=self.schema(plan) if self.constrained else None,
                                         seed=self.seed)
        ctx.note_prompt(result.prompt_tokens, self.reply_tokens)
        turn.steps += 1
        turn.prompt_tokens += result.prompt_tokens
        turn.completion_tokens += result.completion_tokens
        try:
            name, args = parse_call(result.text, set(self.tools))
        except ValueError as e:
            cut = salvage_reply(result.text) if REPLY_TOOL in plan.allowed else None
            if cut is None and plan.forced == "reply" and REPLY_TOOL in plan.allowed:
                cut = result.text.strip() or None  # a model that ignored the grammar answered in text
            if cut is None:
                return self._refuse(result.text,
                                    f"Your reply was not a valid function call: {e}. {_CALL_FORMAT}")
            name, args = REPLY_TOOL, {"message": cut, "request_heartbeat": False}
        if name not in plan.allowed:  # only an unconstrained model can get here
            return self._refuse(result.text, f"Function {name} is not allowed now by the tool rules; "
                                             f"call one of: {', '.join(plan.allowed)}.")
        args = {**args, **plan.prefill.get(name, {})}
        said = args.get("message") if name == REPLY_TOOL else None
        call = json.dumps({"function": name, "arguments": args}, ensure_ascii=False)
        call_row = ctx.append("assistant", call, name=name, search_text=said if isinstance(said, str) else "")
        out = await self.sys.tool_call(name, args)
        result_row = ctx.append("tool", event("function_return", function=name,
                                              status="OK" if out.ok else "Failed", message=out.as_text()),
                                name=name)
        shown = call_messages(call_row, result_row)
        if not out.ok:
            ctx.alert(f"Function {name} failed; returning control so you can fix the call.")
            return _Step(shown, None)
        heartbeat = args.get("request_heartbeat") is True
        if heartbeat:
            ctx.alert(f"Function {name} returned; request_heartbeat was true, so this is your next step.")
        return _Step(shown, Call(name, out.as_text()), heartbeat)

    async def turn(self, user_message: str,
                   on_message: Callable[[AgentMessage], None] | None = None) -> Turn:
        """Handle one user message: steps until a terminal tool ends the turn, at most `max_steps`."""
        turn = Turn(self.context.append("user", user_message).id)
        history: list[Call] = []
        must_reply = False
        for i in range(self.max_steps):
            plan = self.rules.plan(self.tools, history, self.max_steps - i, must_reply)
            step = await self.step(plan, turn)
            for message in step.messages:
                turn.messages.append(message)
                if on_message is not None:
                    on_message(message)
            if step.call is None:
                continue
            history.append(step.call)
            after = self.rules.after(step.call.name, history, step.heartbeat)
            if after == "end":
                turn.stop_reason = "end_turn"
                break
            must_reply = after == "reply"
        return turn


def open_agent(sys: Any, *, tool_rules: ToolRules | None = None, max_steps: int = DEFAULT_MAX_STEPS,
               context_window: int | None = None, system: str | None = None,
               blocks: dict[str, tuple[str, int]] | None = None, reply_tokens: int = 128,
               summary_tokens: int = 200, warning_fraction: float = 0.7, flush_fraction: float = 1.0,
               temperature: float = 0.0, seed: int | None = None, constrained: bool = True,
               max_string: int | None = None, tools: list[str] | None = None) -> MemGPTAgent:
    """Resume (or create) the MemGPT agent `sys.name` inside a kernel process.

    `system` and `blocks` (label -> (value, character limit)) are used when the agent is created;
    `tools` names the functions it may call (default: the memory functions), all registered with
    the kernel; `tool_rules` must hold for them (ToolRuleError otherwise). With `constrained`,
    string arguments are at most `max_string` characters (default: 2 per reply token).
    """
    window = min(context_window or sys.context_window, sys.context_window)
    config = ContextConfig(window, reply_tokens=reply_tokens, summary_tokens=summary_tokens,
                           warning_fraction=warning_fraction, flush_fraction=flush_fraction)
    rules = tool_rules or ToolRules()
    if blocks is None:
        blocks = {"persona": (DEFAULT_PERSONA, 1000), "human": (DEFAULT_HUMAN, 1000)}
    context = MainContext(open_store(home_of(sys)), sys.name, sys.count_tokens, config,
                          system=instructions(system, rules),
                          blocks=blocks)
    wanted = list(tools) if tools is not None else list(MEMORY_FUNCTIONS)
    specs = {s["function"]["name"]: s for s in sys.tools()}
    missing = [n for n in wanted if n not in specs]
    if missing:
        raise RuntimeError(f"the MemGPT agent's tools are not registered with the kernel: "
                           f"{', '.join(missing)} (memory tools: llmos.tools.memory.memory_tools())")
    return MemGPTAgent(sys, context, [specs[n] for n in wanted], tool_rules=rules, max_steps=max_steps,
                       reply_tokens=reply_tokens, temperature=temperature, seed=seed, constrained=constrained,
                       max_string=max_string)


async def main(sys: Any, message: str | list[str] | None = None, context_window: int | None = None,
               persona: str = DEFAULT_PERSONA, human: str = DEFAULT_HUMAN, block_limit: int = 1000,
               reply_tokens: int = 128, summary_tokens: int = 200, warning_fraction: float = 0.7,
               flush_fraction: float = 1.0, max_steps: int = DEFAULT_MAX_STEPS, temperature: float = 0.0,
               seed: int | None = None, constrained: bool = True, max_string: int | None = None,
               tool_rules: list[dict[str, Any]] | None = None) -> str | None:
    """Resume the MemGPT agent `sys.name` and answer `message` (one, or several in turn).

    Returns what the agent sent to the user (messages joined by newlines), or None if it sent nothing.
    `tool_rules` are Letta's JSON tool rules (see llmos.agents.tool_rules).
    """
    agent = open_agent(sys, tool_rules=ToolRules.from_letta(tool_rules), max_steps=max_steps,
                       context_window=context_window,
                       blocks={"persona": (persona, block_limit), "human": (human, block_limit)},
                       reply_tokens=reply_tokens, summary_tokens=summary_tokens,
                       warning_fraction=warning_fraction, flush_fraction=flush_fraction,
                       temperature=temperature, seed=seed, constrained=constrained, max_string=max_string)
    messages = [message] if isinstance(message, str) else list(message or [])
    sent: list[str] = []
    for text in messages:
        sent += (await agent.turn(text)).replies
    return "\n".join(sent) if sent else None
