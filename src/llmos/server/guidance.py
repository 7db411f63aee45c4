"""Tool calls and structured outputs for the chat API, enforced by constrained decoding.

`response_format` (json_object, json_schema) and `tools` with `tool_choice`
required or naming a function become a JSON schema; the engine decodes under
its grammar, so even a small model returns JSON that parses and validates,
and the engine closes it before `max_tokens` runs out (engine/guided.py).
Tool parameters (and a json_schema marked `strict`) follow the strict
convention of structured-output engines: an object takes no property beyond
those declared unless its schema says `additionalProperties`. With
`tool_choice` auto the model writes freely and a reply that is exactly a tool call in this JSON form (or, with
`parallel_tool_calls`, a list of them) is returned as tool calls.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from llmos.server.protocol import ChatCompletionRequest, NamedToolChoice, Tool


class GuidanceError(ValueError):
    """A tools or response_format field that cannot be served; the message names it."""


def strict_schema(schema: Any) -> Any:
    """A copy of `schema` where every object that does not say otherwise takes no extra properties."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in ("const", "enum", "default", "examples", "required"):
            out[key] = value
        else:
            out[key] = strict_schema(value)
    is_object = out.get("type") == "object" or "properties" in out
    if is_object and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _call_schema(tool: Tool) -> dict[str, Any]:
    fn = tool.function
    params = strict_schema(fn.parameters or {"type": "object", "properties": {}})
    return {"type": "object", "properties": {"name": {"const": fn.name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def constraint(req: ChatCompletionRequest) -> tuple[dict[str, Any] | None, bool]:
    """(the JSON schema the reply must follow, whether the reply is a tool call)."""
    choice = req.tool_choice
    if req.tools and choice != "none":
        tools = req.tools
        if isinstance(choice, NamedToolChoice):
            tools = [t for t in tools if t.function.name == choice.function.name]
            if not tools:
                raise GuidanceError(f"tool_choice names {choice.function.name!r}, "
                                    "which is not among the tools")
        if choice in (None, "auto"):
            return None, True
        schemas = [_call_schema(t) for t in tools]
        return (schemas[0] if len(schemas) == 1 else {"anyOf": schemas}), True
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None, False
    if fmt.type == "json_object":
        return {"type": "object"}, False
    if fmt.json_schema is None:
        raise GuidanceError("response_format json_schema needs json_schema.schema, an object")
    schema = fmt.json_schema.schema_
    return (strict_schema(schema) if fmt.json_schema.strict else schema), False


def tools_prompt(tools: list[dict[str, Any]], parallel: bool) -> str:
    """System text that shows the model its tools, for templates that have no tools section."""
    lines = ["You can call these functions. To call one, answer with only a JSON object "
             '{"name": <function name>, "arguments": <arguments object>}'
             + (", or a JSON list of such objects to call several at once." if parallel else ".")]
    for tool in tools:
        fn = tool["function"]
        lines.append(json.dumps({"name": fn["name"], "description": fn.get("description", ""),
                                 "parameters": fn.get("parameters", {})}, ensure_ascii=False))
    return "\n".join(lines)


def tool_calls(text: str, tools: list[dict[str, Any]], parallel: bool = True) -> list[dict[str, Any]] | None:
    """The reply as OpenAI tool_calls, or None when it is not a call (or list of calls) of the tools."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    calls = value if isinstance(value, list) and parallel else [value]
    names = {t["function"]["name"] for t in tools}
    if not calls or not all(isinstance(c, dict) and c.get("name") in names
                            and isinstance(c.get("arguments"), dict) for c in calls):
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]
