"""Tool calls and structured outputs for the chat API, enforced by constrained decoding.

`response_format` (json_object, json_schema) and `tools` with `tool_choice`
required or naming a function become a JSON schema; the engine decodes under
its grammar, so even a small model returns JSON that parses and validates.
With `tool_choice` auto the model writes freely and a reply that is exactly a
tool call in this JSON form is returned as one.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from llmos.server.protocol import ChatCompletionRequest


class GuidanceError(ValueError):
    """A tools or response_format field that cannot be served; the message names it."""


def _tool_schema(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool.get("function") or {}
    if tool.get("type", "function") != "function" or not fn.get("name"):
        raise GuidanceError("each tool must be {'type': 'function', 'function': {'name': ...}}")
    params = fn.get("parameters") or {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def constraint(req: ChatCompletionRequest) -> tuple[dict[str, Any] | None, bool]:
    """(the JSON schema the reply must follow, whether the reply is a tool call)."""
    choice = req.tool_choice
    if req.tools and choice != "none":
        tools = req.tools
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            tools = [t for t in tools if (t.get("function") or {}).get("name") == name]
            if not tools:
                raise GuidanceError(f"tool_choice names {name!r}, which is not among the tools")
        elif choice not in (None, "auto", "required"):
            raise GuidanceError(f"tool_choice must be none, auto, required or a function, got {choice!r}")
        if choice in (None, "auto"):
            return None, True
        schemas = [_tool_schema(t) for t in tools]
        return (schemas[0] if len(schemas) == 1 else {"anyOf": schemas}), True
    fmt = req.response_format or {"type": "text"}
    kind = fmt.get("type")
    if kind == "text":
        return None, False
    if kind == "json_object":
        return {"type": "object"}, False
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise GuidanceError("response_format json_schema needs json_schema.schema, an object")
        return schema, False
    raise GuidanceError(f"response_format type must be text, json_object or json_schema, got {kind!r}")


def tools_prompt(tools: list[dict[str, Any]]) -> dict[str, str]:
    """A system message that shows the model its tools, for templates that have no tools section."""
    lines = ["You can call these functions. To call one, answer with only a JSON object "
             '{"name": <function name>, "arguments": <arguments object>}.']
    for tool in tools:
        fn = tool.get("function") or {}
        lines.append(json.dumps({"name": fn.get("name"), "description": fn.get("description", ""),
                                 "parameters": fn.get("parameters", {})}))
    return {"role": "system", "content": "\n".join(lines)}


def tool_calls(text: str, tools: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The reply as OpenAI tool_calls, or None when it is not a call of one of the tools."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    names = {(t.get("function") or {}).get("name") for t in tools}
    if not isinstance(call, dict) or call.get("name") not in names or "arguments" not in call:
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]
