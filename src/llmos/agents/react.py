"""A ReAct agent: think, call a tool, read the result, until it can answer.

The model answers with one JSON object per step: `{"tool": NAME, "arguments":
{...}}` or `{"answer": TEXT}`. On the embedded engine the reply is constrained
to that schema, so it parses by construction; any other backend may send
anything, and a reply that is not a valid action is answered with an error
message the model can correct, never a crash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llmos.agents import TaskFailed
from llmos.kernel.api import Syscalls

DEFAULT_TASK = "What is 17 * 23?"
DEFAULT_TOOLS = ["calculator", "list_files", "read_file", "write_file"]
SYSTEM = """You solve tasks step by step with tools. The tools are:
{tools}
Reply with one JSON object and nothing else: {{"tool": "<name>", "arguments": {{...}}}} to call a tool, \
or {{"answer": "<text>"}} when the task is done."""


# Worked examples as prior turns: small models follow a shown exchange far better than a rule. Each
# example is shown only when its tools are offered; its numbers differ from any task's so a model that
# copies cannot pass (the demo checks every answer against Python's own arithmetic).
_NEXT = "\nDo the next step of the task, or answer."
_CALC_EXAMPLE = [
    {"role": "user", "content": "What is 6 * 7?"},
    {"role": "assistant", "content": '{"tool": "calculator", "arguments": {"expression": "6 * 7"}}'},
    {"role": "user", "content": "Result of calculator: 42" + _NEXT},
    {"role": "assistant", "content": '{"answer": "6 * 7 = 42"}'},
]
_FILE_EXAMPLE = [
    {"role": "user", "content": "What is 8 + 5? Save it in answer.txt."},
    {"role": "assistant", "content": '{"tool": "calculator", "arguments": {"expression": "8 + 5"}}'},
    {"role": "user", "content": "Result of calculator: 13" + _NEXT},
    {"role": "assistant",
     "content": '{"tool": "write_file", "arguments": {"path": "answer.txt", "content": "13"}}'},
    {"role": "user", "content": "Result of write_file: wrote 2 bytes to answer.txt" + _NEXT},
    {"role": "assistant", "content": '{"answer": "8 + 5 = 13, saved in answer.txt"}'},
]


def examples(names: set[str]) -> list[dict[str, str]]:
    """The worked examples whose tools are all in `names`."""
    out = list(_CALC_EXAMPLE) if "calculator" in names else []
    return out + (_FILE_EXAMPLE if {"calculator", "write_file"} <= names else [])


class ActionError(ValueError):
    """The model's reply is not a valid action; the message tells it what to fix."""


@dataclass
class Action:
    tool: str | None = None
    arguments: dict[str, Any] | None = None
    answer: str | None = None


def action_schema(specs: list[dict[str, Any]], may_answer: bool = True) -> dict[str, Any]:
    """The JSON schema of one reply: a call of one of `specs`, or (if `may_answer`) the answer."""
    calls = [{"type": "object", "properties": {"tool": {"const": s["function"]["name"]},
                                                "arguments": s["function"]["parameters"]},
              "required": ["tool", "arguments"], "additionalProperties": False} for s in specs]
    answer = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
              "additionalProperties": False}
    return {"anyOf": [*calls, answer] if may_answer else calls}


def parse_action(text: str, tools: set[str]) -> Action:
    """The first JSON object in `text`, read as an action."""
    decoder = json.JSONDecoder()
    obj = None
    for i, ch in enumerate(text):
        if ch == "{":
            try:
                obj, _ = decoder.raw_decode(text, i)
                break
            except json.JSONDecodeError:
                continue
    if not isinstance(obj, dict):
        raise ActionError("your reply has no JSON object")
    if "answer" in obj:
        return Action(answer=str(obj["answer"]))
    tool, arguments = obj.get("tool"), obj.get("arguments", {})
    if not isinstance(tool, str):
        raise ActionError('the object needs "tool" (a tool name) or "answer"')
    if tool not in tools:
        raise ActionError(f"there is no tool {tool!r}; the tools are {', '.join(sorted(tools))}")
    if not isinstance(arguments, dict):
        raise ActionError('"arguments" must be a JSON object')
    return Action(tool=tool, arguments=arguments)


async def main(sys: Syscalls, task: str = DEFAULT_TASK, tools: list[str] | None = DEFAULT_TOOLS,
               max_steps: int = 8, max_tokens: int = 96, constrained: bool = True) -> str:
    """Work on `task` with `tools` (None: every registered tool); returns the answer, or raises
    TaskFailed after `max_steps` steps without one."""
    specs = [s for s in sys.tools() if tools is None or s["function"]["name"] in tools]
    names = {s["function"]["name"] for s in specs}
    listing = "\n".join(f"- {s['function']['name']}: {s['function']['description']} "
                        f"arguments: {json.dumps(s['function']['parameters'].get('properties', {}))}"
                        for s in specs)
    messages = [{"role": "system", "content": SYSTEM.format(tools=listing)},
                *examples(names),
                {"role": "user", "content": task}]
    acted = False  # the agent acts before it answers: until a tool succeeded, only calls are offered
    for _ in range(max_steps):
        schema = action_schema(specs, may_answer=acted) if constrained else None
        reply = (await sys.llm_chat(messages, max_tokens=max_tokens, json_schema=schema)).text
        messages.append({"role": "assistant", "content": reply})
        try:
            action = parse_action(reply, names)
        except ActionError as e:
            sys.print(f"(bad reply: {e}: {reply[:200]!r})")
            messages.append({"role": "user", "content": f"Error: {e}. Reply with one JSON action."})
            continue
        if action.answer is not None:
            sys.print(f"answer: {action.answer}")
            return action.answer
        result = await sys.tool_call(action.tool, action.arguments)
        acted = acted or result.ok
        sys.print(f"{action.tool}({json.dumps(action.arguments)}) -> {result.as_text()}")
        messages.append({"role": "user", "content": f"Result of {action.tool}: {result.as_text()}{_NEXT}"})
    raise TaskFailed(f"no answer after {max_steps} steps")
