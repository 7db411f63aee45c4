"""Chat messages as clients send them, made into what a chat template can render.

This is the system-call argument check of the chat API: every message a
client sends (any SDK's shape) is validated and normalised before the
model's template sees it, so a bad message is a 400 naming it and never a
template crash. What it guarantees:

- `content` may be a string, null or absent (assistant turns), or a list of
  text parts (any role); the template always gets a string.
- `developer` is read as `system`; an unknown role is refused.
- Assistant `tool_calls` and `tool` results (with their `tool_call_id`) are
  passed through for templates that know tools, with arguments as objects;
  for templates that do not, they are written as text in the same JSON form
  the model is told to call tools in, so the model sees its own history.
- No string holds a lone surrogate (it cannot be encoded for the tokenizer).
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
_TEXT_PARTS = ("text", "input_text", "output_text", "refusal")


class MessageError(ValueError):
    """A message the API refuses; `param` names where it is (messages[2].content)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def check_unicode(value: Any, param: str) -> None:
    """Refuse strings that cannot be UTF-8 encoded (a lone surrogate from a JSON \\ud800 escape)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise MessageError("contains a lone surrogate, which is not valid Unicode text", param) from None
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_unicode(v, f"{param}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_unicode(k, param)
            check_unicode(v, f"{param}.{k}")


def template_knows_tools(template: str | None) -> bool:
    """Whether a chat template renders tools and tool calls itself."""
    return bool(template) and "tool_calls" in template


def _text(content: Any, param: str, optional: bool) -> str | None:
    if content is None:
        if optional:
            return None
        raise MessageError("content is required", param)
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise MessageError("content must be a string or a list of text parts", param)
    texts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise MessageError("a content part must be an object with a type", where)
        if part["type"] not in _TEXT_PARTS:
            raise MessageError(f"content part type {part['type']!r} is not supported: "
                               "this model reads text only", where)
        text = part.get(part["type"] if part["type"] == "refusal" else "text")
        if not isinstance(text, str):
            raise MessageError(f"a {part['type']} part needs a string", where)
        texts.append(text)
    return "\n".join(texts)


def _arguments(raw: Any, param: str) -> Any:
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise MessageError("arguments must be a JSON string", param)
    try:
        return json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        return raw  # the model's own malformed call, shown to it as it was


def _tool_calls(calls: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise MessageError("tool_calls must be a list", param)
    out = []
    for j, call in enumerate(calls):
        where = f"{param}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise MessageError("a tool call must be {'id', 'type': 'function', 'function': "
                               "{'name', 'arguments'}}", where)
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise MessageError("a tool call id must be a string", f"{where}.id")
        arguments = _arguments(fn.get("arguments", "{}"), f"{where}.function.arguments")
        out.append({"id": call_id or f"call_{j}", "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out


def calls_as_text(calls: list[dict[str, Any]]) -> str:
    """Tool calls in the JSON form a model without a tools template is taught (guidance.tools_prompt)."""
    plain = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]
    return json.dumps(plain[0] if len(plain) == 1 else plain, ensure_ascii=False)


def normalise(messages: list[Any], knows_tools: bool) -> list[dict[str, Any]]:
    """Messages ready for the template; raises MessageError naming the first bad one."""
    if not isinstance(messages, list) or not messages:
        raise MessageError("must be a non-empty list of messages", "messages")
    check_unicode(messages, "messages")
    out: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise MessageError("a message must be an object with a role", param)
        role = m.get("role")
        if not isinstance(role, str):
            raise MessageError("a message needs a role", f"{param}.role")
        if role not in ROLES:
            raise MessageError(f"unknown role {role!r}; the roles are {', '.join(ROLES)}", f"{param}.role")
        content = _text(m.get("content"), f"{param}.content", optional=role == "assistant")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content or ""}
        if isinstance(m.get("name"), str) and role in ("system", "developer", "user"):
            msg["name"] = m["name"]
        if role == "assistant" and m.get("tool_calls"):
            calls = _tool_calls(m["tool_calls"], f"{param}.tool_calls")
            call_names.update({c["id"]: c["function"]["name"] for c in calls})
            if knows_tools:
                msg["tool_calls"] = calls
            else:
                msg["content"] = "\n".join(t for t in (content, calls_as_text(calls)) if t)
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise MessageError("a tool message needs the tool_call_id it answers",
                                   f"{param}.tool_call_id")
            name = m.get("name") if isinstance(m.get("name"), str) else call_names.get(call_id)
            if knows_tools:
                msg.update({"tool_call_id": call_id, **({"name": name} if name else {})})
            else:
                msg = {"role": "user",
                       "content": f"Result of {name or 'the tool'} (call {call_id}): {content}"}
        out.append(msg)
    return out


def with_system_text(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """Put `text` into the first system message, or a new one at the front."""
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}".strip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
