"""Memory functions: the syscalls that page between main context and external
context (MemGPT's function set).

An agent reads and edits its core memory, searches recall storage (its own
past messages) by text or date, and inserts into and searches archival
storage. Each function finds the agent's state from the tool context (the
llmos home and the agent's name), so it survives restarts. Results come in
pages; every function takes MemGPT's `request_heartbeat` flag, which the
agent loop reads to chain another step. Bad arguments, an unknown block or an
over-limit edit raise `ToolError`, which the agent reads as the result.
"""

from __future__ import annotations

import json
from typing import Any

from llmos.memory import (
    ArchivalError,
    ArchivalStorage,
    CoreMemory,
    CoreMemoryError,
    Embedder,
    Page,
    RecallError,
    RecallStorage,
    open_store,
)
from llmos.tools.base import Tool, ToolContext, ToolError

PAGE_SIZE = 5

_HEARTBEAT = {"type": "boolean",
              "description": "true to run another step after this function returns (to chain functions)"}
_PAGE = {"type": "integer", "minimum": 0, "description": "which page of results (0 is the first)"}
_TYPES = {"string": str, "integer": int, "boolean": bool}


def _schema(properties: dict[str, dict], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": {**properties, "request_heartbeat": _HEARTBEAT},
            "required": [*required, "request_heartbeat"], "additionalProperties": False}


def check_args(tool: str, schema: dict[str, Any], args: Any) -> dict[str, Any]:
    """Arguments that match `schema` (required keys, no unknown keys, types, minimum), else ToolError."""
    if not isinstance(args, dict):
        raise ToolError(f"{tool}: arguments must be an object, got {type(args).__name__}")
    props = schema["properties"]
    unknown = sorted(set(args) - set(props))
    if unknown:
        raise ToolError(f"{tool}: unknown argument(s) {', '.join(unknown)} "
                        f"(takes {', '.join(props)})")
    for name in schema["required"]:
        if name not in args and name != "request_heartbeat":
            raise ToolError(f"{tool}: missing required argument {name!r}")
    for name, value in args.items():
        want = _TYPES[props[name]["type"]]
        ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
        if not ok:
            raise ToolError(f"{tool}: {name!r} must be a {props[name]['type']}, got {value!r}")
        if "minimum" in props[name] and value < props[name]["minimum"]:
            raise ToolError(f"{tool}: {name!r} must be >= {props[name]['minimum']}, got {value}")
    return args


def _page_text(what: str, page: Page, rows: list[dict]) -> str:
    if page.total == 0:
        return f"No {what} found."
    if not rows:
        return f"Page {page.page} is past the last page ({page.pages - 1}) of {page.total} {what}."
    first = page.page * page.page_size + 1
    head = (f"Showing {what} {first}-{first + len(rows) - 1} of {page.total} "
            f"(page {page.page} of {page.pages - 1}; ask for page={page.page + 1} for more):"
            if page.page + 1 < page.pages else
            f"Showing {what} {first}-{first + len(rows) - 1} of {page.total} (last page):")
    return head + "\n" + json.dumps(rows, ensure_ascii=False)


def memory_tools(embedder: Embedder | None = None) -> list[Tool]:
    """The seven MemGPT memory functions; `embedder` defaults to all-MiniLM-L6-v2."""

    def tool(name: str, description: str, properties: dict[str, dict], required: list[str], body) -> Tool:
        schema = _schema(properties, required)

        def fn(args: dict[str, Any], ctx: ToolContext) -> str:
            args = check_args(name, schema, args)
            try:
                return body(args, ctx)
            except (CoreMemoryError, RecallError, ArchivalError) as e:
                raise ToolError(f"{name}: {e}") from None

        return Tool(name, description, schema, fn)

    def send_message(args: dict, ctx: ToolContext) -> str:
        if not args["message"].strip():
            raise ToolError("send_message: message is empty")
        return "Sent message successfully."

    def core_append(args: dict, ctx: ToolContext) -> str:
        value = CoreMemory(open_store(ctx.home), ctx.agent).append(args["label"], args["content"])
        return f"Appended to core memory block {args['label']!r}; it now holds {len(value)} characters."

    def core_replace(args: dict, ctx: ToolContext) -> str:
        value = CoreMemory(open_store(ctx.home), ctx.agent).replace(args["label"], args["old_content"],
                                                                   args["new_content"])
        return f"Replaced in core memory block {args['label']!r}; it now holds {len(value)} characters."

    def conv_search(args: dict, ctx: ToolContext) -> str:
        page = RecallStorage(open_store(ctx.home), ctx.agent).search(args["query"], args.get("page", 0),
                                                                     PAGE_SIZE)
        return _page_text("messages", page, [m.as_dict() for m in page.items])

    def conv_search_date(args: dict, ctx: ToolContext) -> str:
        page = RecallStorage(open_store(ctx.home), ctx.agent).search_date(
            args["start_date"], args["end_date"], args.get("page", 0), PAGE_SIZE)
        return _page_text("messages", page, [m.as_dict() for m in page.items])

    def archival_insert(args: dict, ctx: ToolContext) -> str:
        pid = ArchivalStorage(open_store(ctx.home), ctx.agent, embedder).insert(args["content"])
        return f"Inserted into archival memory as passage {pid}."

    def archival_search(args: dict, ctx: ToolContext) -> str:
        page = ArchivalStorage(open_store(ctx.home), ctx.agent, embedder).search(
            args["query"], args.get("page", 0), PAGE_SIZE)
        return _page_text("passages", page, [p.as_dict() for p in page.items])

    text = {"type": "string"}
    return [
        tool("send_message", "Send a message to the user (the only thing the user sees).",
             {"message": {**text, "description": "the message, in the user's language"}},
             ["message"], send_message),
        tool("core_memory_append", "Append a line to a core memory block (always in your context).",
             {"label": {**text, "description": "the block: persona or human"},
              "content": {**text, "description": "text to add"}},
             ["label", "content"], core_append),
        tool("core_memory_replace",
             "Replace exact text in a core memory block (empty new_content deletes it).",
             {"label": {**text, "description": "the block: persona or human"},
              "old_content": {**text, "description": "the exact text to replace"},
              "new_content": {**text, "description": "the text to put in its place"}},
             ["label", "old_content", "new_content"], core_replace),
        tool("conversation_search", "Search past messages (recall storage) by text, best match first.",
             {"query": {**text, "description": "words to look for"}, "page": _PAGE},
             ["query"], conv_search),
        tool("conversation_search_date", "Past messages between two dates (YYYY-MM-DD), oldest first.",
             {"start_date": {**text, "description": "first day, YYYY-MM-DD"},
              "end_date": {**text, "description": "last day, YYYY-MM-DD"}, "page": _PAGE},
             ["start_date", "end_date"], conv_search_date),
        tool("archival_memory_insert", "Store a passage in archival memory (long-term, searchable).",
             {"content": {**text, "description": "the passage to remember"}},
             ["content"], archival_insert),
        tool("archival_memory_search", "Search archival memory by meaning, most similar first.",
             {"query": {**text, "description": "what to look for"}, "page": _PAGE},
             ["query"], archival_search),
    ]
