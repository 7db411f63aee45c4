"""The MemGPT agent: an LLM that manages its own virtual context through memory functions.

Each run resumes the persistent agent named after the process (`sys.name`):
its core memory, summary, message queue and archival storage are read from
the memory store, so the conversation goes on across runs and restarts. For
every user message the agent takes steps: main context is assembled under
memory pressure (warning, then eviction with a recursive summary), the model
answers with exactly one function call (constrained to the functions' JSON
schemas, so even a small model's calls parse), the call runs as a syscall
through the reference monitor, and its result is appended. A step chains to
the next while the call set `request_heartbeat` or failed, up to `max_chain`
steps; `send_message` is how the user hears anything.

Guarantee: no prompt sent to the model, for a step or a summary, takes more
than the context window less the tokens asked for its reply.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmos.memory import DEFAULT_SYSTEM, ContextConfig, MainContext, event, open_store

MEMORY_FUNCTIONS = ("send_message", "core_memory_append", "core_memory_replace", "conversation_search",
                    "conversation_search_date", "archival_memory_insert", "archival_memory_search")

DEFAULT_PERSONA = "I am Sam, a friendly assistant with a long memory. I keep my replies short."
DEFAULT_HUMAN = "(nothing known about the user yet)"

_CALL_FORMAT = (
    'Answer with one JSON object {"function": NAME, "arguments": {...}}. To talk to the user, call '
    'send_message with {"message": "...", "request_heartbeat": false}.'
)


def home_of(sys: Any) -> Path:
    """The llmos home the kernel gives its tools (memory tools and this agent must share one store)."""
    return Path(sys.home)


def call_schema(specs: list[dict[str, Any]], max_string: int = 400,
                choices: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """JSON schema of one function call to any of `specs` (OpenAI tool specs). Strings are bounded so
    a call ends inside the reply's token budget; an argument named in `choices` (e.g. a core memory
    `label`) may only take one of the listed values."""
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

    return {"anyOf": [
        {"type": "object",
         "properties": {"function": {"const": s["function"]["name"]},
                        "arguments": bounded(s["function"]["parameters"])},
         "required": ["function", "arguments"], "additionalProperties": False}
        for s in specs]}


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


class MemGPTAgent:
    """One agent's step loop over the kernel's syscalls."""

    def __init__(self, sys: Any, context: MainContext, specs: list[dict[str, Any]], *, reply_tokens: int,
                 max_chain: int, temperature: float, seed: int | None, constrained: bool,
                 max_string: int) -> None:
        self.sys = sys
        self.context = context
        self.specs = specs
        self.known = {s["function"]["name"] for s in specs}
        self.reply_tokens = reply_tokens
        self.max_chain = max_chain
        self.temperature = temperature
        self.seed = seed
        labels = {"label": [b.label for b in context.core.blocks()]}
        self.schema = call_schema(specs, max_string, labels) if constrained else None

    async def _summarize(self, messages: list[dict[str, Any]], max_tokens: int) -> str:
        result = await self.sys.llm_chat(messages, max_tokens=max_tokens, temperature=0.0)
        self.context.note_prompt(result.prompt_tokens, max_tokens)
        return result.text

    async def step(self) -> tuple[str | None, bool]:
        """One model call and its function; returns (message sent to the user or None, chain on?)."""
        ctx = self.context
        messages, _ = await ctx.prompt(self._summarize)
        result = await self.sys.llm_chat(messages, max_tokens=self.reply_tokens, temperature=self.temperature,
                                         json_schema=self.schema, seed=self.seed)
        ctx.note_prompt(result.prompt_tokens, self.reply_tokens)
        try:
            name, args = parse_call(result.text, self.known)
        except ValueError as e:
            ctx.append("assistant", result.text, search_text="")
            ctx.alert(f"Your reply was not a valid function call: {e}. {_CALL_FORMAT}")
            return None, True
        said = args.get("message") if name == "send_message" else None
        said = said if isinstance(said, str) else None
        ctx.append("assistant", json.dumps({"function": name, "arguments": args}, ensure_ascii=False),
                   name=name, search_text=said or "")
        out = await self.sys.tool_call(name, args)
        ctx.append("tool", event("function_return", function=name, status="OK" if out.ok else "Failed",
                                 message=out.as_text()), name=name)
        heartbeat = args.get("request_heartbeat") is True
        if not out.ok:
            ctx.alert(f"Function {name} failed; returning control so you can fix the call.")
            return None, True
        if heartbeat:
            ctx.alert(f"Function {name} returned; request_heartbeat was true, so this is your next step.")
        return said, heartbeat

    async def turn(self, user_message: str) -> list[str]:
        """Handle one user message; returns what the agent sent to the user."""
        self.context.append("user", user_message)
        sent: list[str] = []
        for _ in range(self.max_chain):
            said, more = await self.step()
            if said is not None:
                sent.append(said)
            if not more:
                break
        return sent


async def main(sys: Any, message: str | list[str] | None = None, context_window: int | None = None,
               persona: str = DEFAULT_PERSONA, human: str = DEFAULT_HUMAN, block_limit: int = 1000,
               reply_tokens: int = 128, summary_tokens: int = 200, warning_fraction: float = 0.7,
               flush_fraction: float = 1.0, max_chain: int = 3, temperature: float = 0.0,
               seed: int | None = None, constrained: bool = True,
               max_string: int | None = None) -> str | None:
    """Resume the MemGPT agent `sys.name` and answer `message` (one, or several in turn).

    Returns what the agent sent to the user (messages joined by newlines), or None if it sent nothing.
    With `constrained`, string arguments are at most `max_string` characters (default: 2 per reply
    token), so that a call fits its reply budget.
    """
    window = min(context_window or sys.context_window, sys.context_window)
    config = ContextConfig(window, reply_tokens=reply_tokens, summary_tokens=summary_tokens,
                           warning_fraction=warning_fraction, flush_fraction=flush_fraction)
    context = MainContext(open_store(home_of(sys)), sys.name, sys.count_tokens, config,
                          system=f"{DEFAULT_SYSTEM} {_CALL_FORMAT}",
                          blocks={"persona": (persona, block_limit), "human": (human, block_limit)})
    specs = [s for s in sys.tools() if s["function"]["name"] in MEMORY_FUNCTIONS]
    if not any(s["function"]["name"] == "send_message" for s in specs):
        raise RuntimeError("the MemGPT agent needs the memory tools registered with the kernel "
                           "(llmos.tools.memory.memory_tools())")
    agent = MemGPTAgent(sys, context, specs, reply_tokens=reply_tokens, max_chain=max_chain,
                        temperature=temperature, seed=seed, constrained=constrained,
                        max_string=max_string or 2 * reply_tokens)
    messages = [message] if isinstance(message, str) else list(message or [])
    sent: list[str] = []
    for text in messages:
        sent += await agent.turn(text)
    return "\n".join(sent) if sent else None
