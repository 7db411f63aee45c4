"""The agents API, compatible with Letta's REST API: the official `letta-client` works against a
running llmos with only its `base_url` changed (the server's root URL, e.g. http://127.0.0.1:8000).

Routes (under /v1): agents create / list / retrieve / modify / delete, export and import as one JSON
file; messages create (synchronous, or streamed as server-sent events), async runs, history, cancel
and reset; core-memory blocks by label; archival memory (passages) insert / list / search / delete;
tools list / attach / detach; runs; and `GET /v1/models/` in Letta's shape (the OpenAI shape stays
at `GET /v1/models`, without the slash). Replies carry Letta's message types: reasoning_message,
tool_call_message, tool_return_message, assistant_message, then stop_reason and usage_statistics.

Guarantees: every object belongs to the user of the request (`request.state.user`); another user's
agent, run or passage answers 404 exactly like one that does not exist, and only an admin sees
everyone's. Messages run through `AgentRuntime` as kernel processes, one at a time per agent.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llmos.agents.memgpt import MIN_REPLY_TOKENS
from llmos.agents.messages import from_recall
from llmos.agents.tool_rules import ToolRuleError, ToolRules
from llmos.memory import DEFAULT_SYSTEM, ArchivalError, ArchivalStorage, CoreMemory, RecallStorage
from llmos.memory.agents import AgentDef, Run
from llmos.memory.core import DEFAULT_BLOCK_LIMIT
from llmos.memory.embeddings import MiniLMEmbedder
from llmos.memory.recall import ROLES, Message
from llmos.server.agent_runtime import DEFAULT_TOOLS, ActiveRun, AgentRuntime, instructions

AGENT_FILE_VERSION = 1
MAX_STEPS = 50  # steps one message may take (Letta's default limit)



@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """At startup, recover the agents (roll back open steps, resume queued runs); at shutdown, stop."""
    if getattr(app.state, "system", None) is not None:
        _runtime_of(app)
    yield
    runtime = getattr(app.state, "agent_runtime", None)
    if runtime is not None:
        await runtime.close()


router = APIRouter(tags=["agents"], lifespan=_lifespan)


# -- request bodies ---------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # Letta fields llmos does not use are accepted


class BlockCreate(_Body):
    label: str = Field(min_length=1)
    value: str = ""
    limit: int = Field(DEFAULT_BLOCK_LIMIT, ge=1)
    description: str | None = None


class AgentCreate(_Body):
    name: str | None = None
    system: str | None = None
    description: str | None = None
    memory_blocks: list[BlockCreate] = []
    tools: list[str] | None = None
    tool_ids: list[str] | None = None
    include_base_tools: bool = True
    tool_rules: list[dict[str, Any]] | None = None
    model: str | None = None
    llm_config: dict[str, Any] | None = None
    context_window_limit: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None


class AgentUpdate(_Body):
    name: str | None = None
    system: str | None = None
    description: str | None = None
    tool_ids: list[str] | None = None
    tool_rules: list[dict[str, Any]] | None = None
    model: str | None = None
    context_window_limit: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None


class MessageRequest(_Body):
    messages: list[dict[str, Any]] | None = None
    input: str | list[dict[str, Any]] | None = None
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    streaming: bool = False
    include_return_message_types: list[str] | None = None
    use_assistant_message: bool = True


class CancelRequest(_Body):
    run_ids: list[str] | None = None


class BlockUpdate(_Body):
    value: str | None = None
    limit: int | None = Field(None, ge=1)
    description: str | None = None


class PassageCreate(_Body):
    text: str
    tags: list[str] | None = None


# -- plumbing ---------------------------------------------------------------------------------------


def _runtime_of(app: FastAPI) -> AgentRuntime:
    """The runtime of the app's System, made on first use (which recovers after a restart)."""
    runtime = getattr(app.state, "agent_runtime", None)
    if runtime is None:
        runtime = app.state.agent_runtime = AgentRuntime(app.state.system)
    return runtime


def _runtime(request: Request) -> AgentRuntime:
    return _runtime_of(request.app)


def _fail(status: int, message: str) -> Exception:
    """An error answered in the server's error shape ({"error": {"message", ...}})."""
    from llmos.server.app import APIError

    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    return APIError(status, message, kind)


def _user(request: Request):
    user = getattr(request.state, "user", None)
    if user is None:
        raise _fail(401, "not authenticated")
    return user


def _not_found(kind: str, ident: str) -> Exception:
    return _fail(404, f"no {kind} {ident}")


def _agent(request: Request, agent_id: str) -> AgentDef:
    """The agent, if the request's user may see it; else 404 (whether or not it exists)."""
    agent = _runtime(request).store.get(agent_id)
    if agent is None or not _user(request).can_see(agent.owner):
        raise _not_found("agent", agent_id)
    return agent


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _handle(system: Any) -> str:
    return f"llmos/{system.model_name}"


def _check_model(system: Any, model: str | None) -> None:
    if model and model not in (system.model_name, _handle(system)):
        raise _fail(400, f"model {model!r} is not served here; this server runs {_handle(system)!r}")


def _window(system: Any) -> int:
    return int(system.backend.context_window)


def _tools(request: Request) -> dict[str, Any]:
    """The kernel's tools the caller may see (another user's MCP tools are not among them)."""
    user = _user(request)
    return request.app.state.system.kernel.tools.visible(None if user.admin else user.id)


def _tool_names(request: Request, names: list[str]) -> list[str]:
    """Tool names (a Letta tool id `tool-NAME` or a name) checked against the tools the caller sees."""
    known = _tools(request)
    out = []
    for n in names:
        name = n.removeprefix("tool-")
        if name not in known:
            raise _fail(404 if n.startswith("tool-") else 400,
                                f"no tool {n!r}; tools: {', '.join(sorted(known))}")
        if name not in out:
            out.append(name)
    return out


def _check_agent(request: Request, agent: AgentDef) -> None:
    """400 for tool rules that are malformed or cannot hold for the agent's tools, or a reply budget
    too small for a send_message call."""
    registry = request.app.state.system.kernel.tools.tools
    try:
        ToolRules.from_letta(agent.tool_rules).check(
            agent.tools, {n: registry[n].parameters.get("properties", {}) for n in agent.tools})
    except ToolRuleError as e:
        raise _fail(400, f"tool_rules: {e}") from None
    if agent.max_tokens is not None and agent.max_tokens < MIN_REPLY_TOKENS:
        raise _fail(400, f"max_tokens must be at least {MIN_REPLY_TOKENS} (a send_message call's "
                                 f"opening), got {agent.max_tokens}")


# -- Letta shapes -----------------------------------------------------------------------------------


def _tool_json(tool: Any, base: set[str]) -> dict[str, Any]:
    return {"id": f"tool-{tool.name}", "name": tool.name, "description": tool.description,
            "tool_type": "letta_memory_core" if tool.name in base else "custom",
            "json_schema": {"name": tool.name, "description": tool.description,
                            "parameters": tool.parameters},
            "args_json_schema": tool.parameters, "source_type": "python", "tags": [], "metadata_": {}}


def _block_json(agent_id: str, label: str, value: str, limit: int) -> dict[str, Any]:
    return {"id": f"block-{agent_id.removeprefix('agent-')}-{label}", "label": label, "value": value,
            "limit": limit, "description": None, "metadata": {}, "read_only": False, "is_template": False}


def _agent_json(request: Request, agent: AgentDef) -> dict[str, Any]:
    system = request.app.state.system
    runtime = _runtime(request)
    registry = system.kernel.tools.tools
    blocks = [_block_json(agent.id, b.label, b.value, b.limit)
              for b in CoreMemory(runtime.memory, agent.id).blocks()]
    window = min(agent.context_window_limit or _window(system), _window(system))
    return {
        "id": agent.id, "name": agent.name, "agent_type": "memgpt_agent", "description": agent.description,
        "system": agent.system, "tags": agent.tags, "metadata": agent.metadata, "blocks": blocks,
        "memory": {"blocks": blocks, "agent_type": "memgpt_agent", "file_blocks": []},
        "tools": [_tool_json(registry[n], set(DEFAULT_TOOLS)) for n in agent.tools if n in registry],
        "tool_rules": agent.tool_rules, "sources": [], "model": _handle(system),
        "llm_config": {"model": system.model_name, "model_endpoint_type": "openai",
                       "handle": _handle(system), "context_window": window, "max_tokens": agent.max_tokens,
                       "provider_name": "llmos"},
        "context_window_limit": window, "created_at": _iso(agent.created_at),
        "updated_at": _iso(agent.updated_at),
        "created_by_id": agent.owner, "last_stop_reason": agent.last_stop_reason,
        "last_run_completion": _iso(agent.last_run_completion),
    }


def _run_json(runtime: AgentRuntime, run: Run) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    if run.error:
        metadata["error"] = run.error
    if run.status == "created":
        metadata["queued"] = True  # Letta's "created": accepted, waiting for the agent's earlier runs
    duration = (run.completed_at - run.created_at) if run.completed_at else None
    return {"id": run.id, "agent_id": run.agent_id, "status": run.status, "stop_reason": run.stop_reason,
            "background": run.background, "created_at": _iso(run.created_at),
            "completed_at": _iso(run.completed_at), "metadata": metadata,
            "total_duration_ns": int(duration * 1e9) if duration is not None else None,
            "request_config": {"use_assistant_message": True}}


def _stop(reason: str | None) -> dict[str, Any]:
    return {"message_type": "stop_reason", "stop_reason": reason or "error"}


def _usage(run: Run) -> dict[str, Any]:
    usage = run.usage or {"step_count": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {"message_type": "usage_statistics", **usage, "run_ids": [run.id]}


def _input_text(body: MessageRequest) -> str:
    """The user's text from Letta's `messages` or `input` (text parts joined)."""
    def text_of(content: Any) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "\n".join(p.get("text", "") for p in content
                             if isinstance(p, dict) and p.get("type") == "text")
        return ""

    parts: list[str] = []
    if body.messages:
        parts += [text_of(m.get("content")) for m in body.messages]
    if isinstance(body.input, str):
        parts.append(body.input)
    elif isinstance(body.input, list):
        parts += [text_of(p.get("content", [p])) if "content" in p else text_of([p]) for p in body.input]
    text = "\n".join(p for p in parts if p)
    if not text.strip():
        raise _fail(400, "no message: give `messages` (with text content) or `input`")
    return text


def _keep(types: list[str] | None):
    return (lambda m: m.get("message_type") != "user_message") if not types else \
        (lambda m: m.get("message_type") in types)


# -- agents -----------------------------------------------------------------------------------------


def _both(path: str) -> list[str]:
    """A collection route with and without its trailing slash (letta-client sends it, curl may not)."""
    return [path, path.rstrip("/")]


def _route(method: str, path: str, **kwargs: Any):
    def register(fn):
        for p in _both(path):
            router.add_api_route(p, fn, methods=[method], include_in_schema=p.endswith("/"), **kwargs)
        return fn
    return register


@_route("POST", "/v1/agents/")
async def create_agent(body: AgentCreate, request: Request) -> dict[str, Any]:
    system, user = request.app.state.system, _user(request)
    _check_model(system, body.model or (body.llm_config or {}).get("model"))
    labels = [b.label for b in body.memory_blocks]
    if len(set(labels)) != len(labels):
        raise _fail(400, "memory_blocks: labels must be unique")
    for b in body.memory_blocks:
        if len(b.value) > b.limit:
            raise _fail(400, f"memory block {b.label!r}: value has {len(b.value)} characters, "
                                     f"over its limit of {b.limit}")
    names = (list(DEFAULT_TOOLS) if body.include_base_tools else ["send_message"])
    names += _tool_names(request, [*(body.tools or []), *(body.tool_ids or [])])
    llm = body.llm_config or {}
    agent = AgentDef(id=f"agent-{uuid.uuid4()}", owner=user.id,
                     name=body.name or f"agent-{uuid.uuid4().hex[:8]}",
                     system=body.system or DEFAULT_SYSTEM, tools=list(dict.fromkeys(names)),
                     tool_rules=body.tool_rules or [], description=body.description, model=body.model,
                     context_window_limit=body.context_window_limit or llm.get("context_window"),
                     max_tokens=body.max_tokens or llm.get("max_tokens"), tags=body.tags or [],
                     metadata=body.metadata or {})
    _check_agent(request, agent)
    _runtime(request).store.create(agent, [(b.label, b.value, b.limit) for b in body.memory_blocks],
                                   instructions(agent))
    return _agent_json(request, agent)


@_route("GET", "/v1/agents/")
async def list_agents(request: Request, after: str | None = None, before: str | None = None,
                      limit: int | None = 50, order: str = "desc", ascending: bool | None = None,
                      name: str | None = None, tags: list[str] | None = None,
                      match_all_tags: bool = False) -> list[dict[str, Any]]:
    user = _user(request)
    descending = (not ascending) if ascending is not None else order != "asc"
    agents = _runtime(request).store.list(None if user.admin else user.id, after=after, before=before,
                                          limit=limit, descending=descending, name=name, tags=tags,
                                          match_all_tags=match_all_tags)
    return [_agent_json(request, a) for a in agents]


def _read_agent_file(raw: bytes) -> dict[str, Any]:
    """An agent file, checked whole before anything is stored (ValueError saying what is wrong)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"the file is not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("llmos_agent_file") != AGENT_FILE_VERSION:
        raise ValueError(f"not an llmos agent file (version {AGENT_FILE_VERSION})")
    spec = data.get("agent")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError("agent: an object with a name is required")
    blocks = []
    for b in data.get("blocks", []):
        label, value, limit = b.get("label"), b.get("value"), b.get("limit")
        if not (isinstance(label, str) and isinstance(value, str) and isinstance(limit, int)
                and len(value) <= limit):
            raise ValueError(f"block {label!r}: label, value and a limit of at least its length are required")
        blocks.append((label, value, limit))
    messages = []
    for m in data.get("messages", []):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str) \
                or not isinstance(m.get("created_at"), int | float):
            raise ValueError(f"message {m!r:.80}: role ({', '.join(ROLES)}), content and created_at needed")
        messages.append((m["role"], m.get("name"), m["content"], str(m.get("search_text", "")),
                         m["created_at"], int(bool(m.get("in_context", True)))))
    passages = []
    for p in data.get("passages", []):
        try:
            vector = np.frombuffer(base64.b64decode(p["embedding"], validate=True), dtype=np.float32)
        except (KeyError, TypeError, ValueError):
            raise ValueError("passage: a base64 float32 embedding is required") from None
        if not isinstance(p.get("text"), str) or not p["text"].strip() or len(vector) != MiniLMEmbedder.dim:
            raise ValueError(f"passage: non-empty text and a {MiniLMEmbedder.dim}-dimension embedding needed")
        passages.append((p["text"], p.get("created_at"), vector))
    return {"spec": spec, "blocks": blocks, "messages": messages, "passages": passages,
            "summary": str(data.get("summary", ""))}


@router.post("/v1/agents/import")
async def import_agent(request: Request, file: UploadFile) -> dict[str, Any]:
    form = await request.form()
    new_name = form.get("name") or form.get("override_name")
    strip = str(form.get("strip_messages", "false")).lower() == "true"
    suffix = str(form.get("append_copy_suffix", "false")).lower() == "true"
    try:
        data = _read_agent_file(await file.read())
    except ValueError as e:
        raise _fail(400, f"cannot import: {e}") from None
    runtime, user, spec = _runtime(request), _user(request), data["spec"]
    tools = _tool_names(request, list(spec.get("tools") or ["send_message"]))
    agent = AgentDef(id=f"agent-{uuid.uuid4()}", owner=user.id,
                     name=str(new_name or spec["name"]) + ("__copy" if suffix else ""),
                     system=spec.get("system") or DEFAULT_SYSTEM, tools=tools,
                     tool_rules=spec.get("tool_rules") or [], description=spec.get("description"),
                     model=spec.get("model"), context_window_limit=spec.get("context_window_limit"),
                     max_tokens=spec.get("max_tokens"), tags=spec.get("tags") or [],
                     metadata=spec.get("metadata") or {})
    _check_agent(request, agent)
    memory = runtime.memory

    def fill(db: sqlite3.Connection) -> None:
        db.execute("UPDATE agents SET summary = ? WHERE name = ?", (data["summary"], agent.id))
        if not strip:
            db.executemany("INSERT INTO messages(agent, role, name, content, search_text, created_at, "
                           "in_context) VALUES (?,?,?,?,?,?,?)", [(agent.id, *m) for m in data["messages"]])
        archival = ArchivalStorage(memory, agent.id)  # joins the transaction
        for text, created_at, vector in data["passages"]:
            archival.insert_many([text], created_at, vector[None, :])

    runtime.store.create(agent, data["blocks"], instructions(agent), fill)
    return {"agent_ids": [agent.id]}


@router.get("/v1/agents/{agent_id}")
async def retrieve_agent(agent_id: str, request: Request) -> dict[str, Any]:
    return _agent_json(request, _agent(request, agent_id))


@router.patch("/v1/agents/{agent_id}")
async def modify_agent(agent_id: str, body: AgentUpdate, request: Request) -> dict[str, Any]:
    agent = _agent(request, agent_id)
    _check_model(request.app.state.system, body.model)
    changes = body.model_dump(exclude_unset=True, exclude={"tool_ids"})
    if body.tool_ids is not None:
        changes["tools"] = list(dict.fromkeys(["send_message", *_tool_names(request, body.tool_ids)]))
    for k in ("name", "system"):
        if k in changes and not changes[k]:
            raise _fail(400, f"{k} must not be empty")
    for k in ("tags", "metadata", "tool_rules"):
        if k in changes and changes[k] is None:
            changes[k] = {} if k == "metadata" else []
    store = _runtime(request).store
    candidate = AgentDef(**{**agent.__dict__, **changes})
    _check_agent(request, candidate)
    updated = store.update(agent.id, **changes)
    store.set_instructions(agent.id, instructions(updated))
    return _agent_json(request, updated)


@router.delete("/v1/agents/{agent_id}")
async def delete_agent(agent_id: str, request: Request) -> dict[str, Any]:
    agent = _agent(request, agent_id)
    runtime = _runtime(request)
    await runtime.cancel(agent.id)
    runtime.store.delete(agent.id)
    return {"deleted": agent.id}


@router.get("/v1/agents/{agent_id}/export")
async def export_agent(agent_id: str, request: Request, scrub_messages: bool = False) -> JSONResponse:
    agent = _agent(request, agent_id)
    memory = _runtime(request).memory
    blocks = [{"label": b.label, "value": b.value, "limit": b.limit}
              for b in CoreMemory(memory, agent.id).blocks()]
    rows = [] if scrub_messages else memory.query(
        "SELECT role, name, content, search_text, created_at, in_context FROM messages WHERE agent = ? "
        "ORDER BY id", (agent.id,))
    summary = memory.query("SELECT summary FROM agents WHERE name = ?", (agent.id,))
    passages = memory.query("SELECT text, embedding, created_at FROM passages WHERE agent = ? ORDER BY id",
                            (agent.id,))
    spec = {k: getattr(agent, k) for k in ("name", "system", "description", "tools", "tool_rules", "model",
                                          "context_window_limit", "max_tokens", "tags", "metadata")}
    return JSONResponse({
        "llmos_agent_file": AGENT_FILE_VERSION, "exported_at": _iso(time.time()), "agent": spec,
        "blocks": blocks, "summary": summary[0][0] if summary else "",
        "messages": [{**dict(r), "in_context": bool(r["in_context"])} for r in rows],
        "passages": [{"text": p["text"], "created_at": p["created_at"],
                      "embedding": base64.b64encode(p["embedding"]).decode()} for p in passages],
    })


# -- messages ---------------------------------------------------------------------------------------


async def _events(runtime: AgentRuntime, active: ActiveRun, keep) -> AsyncIterator[dict[str, Any]]:
    """The run's Letta messages as they are stored, then its stop reason and usage."""
    queue = active.watch()
    while (m := await queue.get()) is not None:
        out = {**m.to_letta(), "run_id": active.run.id}
        if keep(out):
            yield out
    run = runtime.refresh(active)
    yield _stop(run.stop_reason)
    yield _usage(run)


def _sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async for e in events:
            yield f"data: {json.dumps(e, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def _submit(request: Request, agent_id: str, body: MessageRequest, background: bool = False) -> ActiveRun:
    agent = _agent(request, agent_id)
    return _runtime(request).submit(agent, _input_text(body), body.max_steps, background)


@router.post("/v1/agents/{agent_id}/messages")
async def send_message(agent_id: str, body: MessageRequest, request: Request):
    active = _submit(request, agent_id, body)
    runtime, keep = _runtime(request), _keep(body.include_return_message_types)
    if body.streaming:
        return _sse(_events(runtime, active, keep))
    messages, tail = [], []
    async for e in _events(runtime, active, keep):
        (tail if e["message_type"] in ("stop_reason", "usage_statistics") else messages).append(e)
    return {"messages": messages, "stop_reason": tail[0], "usage": tail[1]}


@router.post("/v1/agents/{agent_id}/messages/stream")
async def stream_message(agent_id: str, body: MessageRequest, request: Request) -> StreamingResponse:
    active = _submit(request, agent_id, body)
    return _sse(_events(_runtime(request), active, _keep(body.include_return_message_types)))


@router.post("/v1/agents/{agent_id}/messages/async")
async def send_message_async(agent_id: str, body: MessageRequest, request: Request) -> dict[str, Any]:
    active = _submit(request, agent_id, body, background=True)
    return _run_json(_runtime(request), active.run)


@router.get("/v1/agents/{agent_id}/messages")
async def list_messages(agent_id: str, request: Request, after: str | None = None, before: str | None = None,
                        limit: int = 100, order: str = "desc") -> list[dict[str, Any]]:
    agent = _agent(request, agent_id)
    recall = RecallStorage(_runtime(request).memory, agent.id)
    return _history(recall, after, before, limit, order == "desc")


def _message_id(value: str | None) -> int | None:
    if value is None:
        return None
    match = re.fullmatch(r"(?:message-)?(\d+)", value)
    if match is None:
        raise _fail(400, f"not a message id: {value!r}")
    return int(match.group(1))


def _history(recall: RecallStorage, after: str | None, before: str | None, limit: int, descending: bool,
             lo: int | None = None, hi: int | None = None) -> list[dict[str, Any]]:
    """Up to `limit` Letta messages in order (newest first if `descending`), after/before a message
    id (in that order); `lo`..`hi` bound the stored rows (one run's)."""
    a, b = _message_id(after), _message_id(before)
    where, params = ["agent = ?"], [recall.agent]
    if lo is not None:
        where.append("id BETWEEN ? AND ?")
        params += [lo, hi]
    rows = recall.store.query(f"SELECT * FROM messages WHERE {' AND '.join(where)} ORDER BY id",
                              tuple(params))
    stored = [Message(r["id"], r["role"], r["content"], r["created_at"], r["name"], bool(r["in_context"]))
              for r in rows]
    messages = from_recall(stored)
    if descending:
        messages.reverse()
    if a is not None:
        messages = [m for m in messages if (m.id < a if descending else m.id > a)]
    if b is not None:
        messages = [m for m in messages if (m.id > b if descending else m.id < b)]
    return [m.to_letta() for m in messages[:limit]]


@router.post("/v1/agents/{agent_id}/messages/cancel")
async def cancel_messages(agent_id: str, request: Request,
                          body: CancelRequest | None = None) -> dict[str, Any]:
    agent = _agent(request, agent_id)
    cancelled = await _runtime(request).cancel(agent.id, body.run_ids if body else None)
    return {run_id: "cancelled" for run_id in cancelled}


@router.patch("/v1/agents/{agent_id}/reset-messages")
async def reset_messages(agent_id: str, request: Request) -> dict[str, Any]:
    agent = _agent(request, agent_id)
    runtime = _runtime(request)
    async with request.app.state.system.turns.turn(agent.id):  # not in the middle of a run
        with runtime.memory.transaction() as db:
            db.execute("DELETE FROM messages WHERE agent = ?", (agent.id,))
            db.execute("UPDATE agents SET summary = '', warned = 0 WHERE name = ?", (agent.id,))
    return _agent_json(request, agent)


# -- runs -------------------------------------------------------------------------------------------


def _visible_run(request: Request, run_id: str) -> Run:
    run = _runtime(request).store.get_run(run_id)
    if run is None or not _user(request).can_see(run.owner):
        raise _not_found("run", run_id)
    return run


@router.get("/v1/runs/{run_id}")
async def retrieve_run(run_id: str, request: Request) -> dict[str, Any]:
    return _run_json(_runtime(request), _visible_run(request, run_id))


@_route("GET", "/v1/runs/")
async def list_runs(request: Request, agent_id: str | None = None, after: str | None = None,
                    limit: int | None = None) -> list[dict[str, Any]]:
    user, runtime = _user(request), _runtime(request)
    runs = runtime.store.runs(None if user.admin else user.id, agent_id)
    return _page([_run_json(runtime, r) for r in runs], after, limit)


@router.get("/v1/runs/{run_id}/messages")
async def run_messages(run_id: str, request: Request, after: str | None = None, limit: int = 100,
                       order: str = "asc") -> list[dict[str, Any]]:
    run = _visible_run(request, run_id)
    if run.first_message is None:
        return []
    recall = RecallStorage(_runtime(request).memory, run.agent_id)
    return _history(recall, after, None, limit, order == "desc", run.first_message, run.last_message)


# -- core memory ------------------------------------------------------------------------------------


@router.get("/v1/agents/{agent_id}/core-memory/blocks")
async def list_blocks(agent_id: str, request: Request, after: str | None = None,
                      limit: int | None = None) -> list[dict[str, Any]]:
    agent = _agent(request, agent_id)
    blocks = [_block_json(agent.id, b.label, b.value, b.limit)
              for b in CoreMemory(_runtime(request).memory, agent.id).blocks()]
    return _page(blocks, after, limit)


def _page(items: list[dict[str, Any]], after: str | None, limit: int | None) -> list[dict[str, Any]]:
    """The items after the one with id `after` (letta-client pages on until a page is empty)."""
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return items[:limit] if limit else items


def _block(request: Request, agent: AgentDef, label: str):
    for b in CoreMemory(_runtime(request).memory, agent.id).blocks():
        if b.label == label:
            return b
    raise _not_found("block", label)


@router.get("/v1/agents/{agent_id}/core-memory/blocks/{label}")
async def retrieve_block(agent_id: str, label: str, request: Request) -> dict[str, Any]:
    agent = _agent(request, agent_id)
    b = _block(request, agent, label)
    return _block_json(agent.id, b.label, b.value, b.limit)


@router.patch("/v1/agents/{agent_id}/core-memory/blocks/{label}")
async def modify_block(agent_id: str, label: str, body: BlockUpdate, request: Request) -> dict[str, Any]:
    agent = _agent(request, agent_id)
    b = _block(request, agent, label)
    value = b.value if body.value is None else body.value
    limit = b.limit if body.limit is None else body.limit
    if len(value) > limit:
        raise _fail(400, f"block {label!r}: {len(value)} characters, over its limit of {limit}")
    with _runtime(request).memory.transaction() as db:
        db.execute("UPDATE core_blocks SET value = ?, char_limit = ? WHERE agent = ? AND label = ?",
                   (value, limit, agent.id, label))
    return _block_json(agent.id, label, value, limit)


# -- archival memory --------------------------------------------------------------------------------


def _passage_json(agent_id: str, pid: int, text: str, created_at: float) -> dict[str, Any]:
    return {"id": f"passage-{pid}", "text": text, "created_at": _iso(created_at), "agent_id": agent_id,
            "tags": [], "metadata": {}, "embedding": None}


def _passage_id(value: str) -> int:
    match = re.fullmatch(r"(?:passage-)?(\d+)", value)
    if match is None:
        raise _not_found("passage", value)
    return int(match.group(1))


@router.post("/v1/agents/{agent_id}/archival-memory")
async def insert_passage(agent_id: str, body: PassageCreate, request: Request) -> list[dict[str, Any]]:
    agent = _agent(request, agent_id)
    archival = ArchivalStorage(_runtime(request).memory, agent.id)
    try:
        pid = await run_in_threadpool(archival.insert, body.text)
    except ArchivalError as e:
        raise _fail(400, str(e)) from None
    p = archival.get(pid)
    return [_passage_json(agent.id, p.id, p.text, p.created_at)]


@router.get("/v1/agents/{agent_id}/archival-memory")
async def list_passages(agent_id: str, request: Request, after: str | None = None, before: str | None = None,
                        limit: int | None = 100, search: str | None = None,
                        ascending: bool = True) -> list[dict[str, Any]]:
    agent = _agent(request, agent_id)
    where, params = ["agent = ?"], [agent.id]
    for cursor, later in ((after, True), (before, False)):
        if cursor is not None:
            where.append(f"id {'>' if later == ascending else '<'} ?")
            params.append(_passage_id(cursor))
    if search:
        where.append("instr(lower(text), lower(?)) > 0")
        params.append(search)
    rows = _runtime(request).memory.query(
        f"SELECT id, text, created_at FROM passages WHERE {' AND '.join(where)} ORDER BY id "
        f"{'ASC' if ascending else 'DESC'} LIMIT ?", (*params, limit or -1))
    return [_passage_json(agent.id, r["id"], r["text"], r["created_at"]) for r in rows]


@router.get("/v1/agents/{agent_id}/archival-memory/search")
async def search_passages(agent_id: str, query: str, request: Request,
                          top_k: int | None = 5) -> dict[str, Any]:
    agent = _agent(request, agent_id)
    archival = ArchivalStorage(_runtime(request).memory, agent.id)
    try:
        page = await run_in_threadpool(archival.search, query, 0, max(1, top_k or 5))
    except ArchivalError as e:
        raise _fail(400, str(e)) from None
    results = [{"id": f"passage-{p.id}", "content": p.text, "timestamp": _iso(p.created_at), "tags": [],
                "score": p.score} for p in page.items]
    return {"count": len(results), "results": results}


@router.delete("/v1/agents/{agent_id}/archival-memory/{memory_id}")
async def delete_passage(agent_id: str, memory_id: str, request: Request) -> dict[str, Any]:
    agent = _agent(request, agent_id)
    try:
        ArchivalStorage(_runtime(request).memory, agent.id).delete(_passage_id(memory_id))
    except ArchivalError:
        raise _not_found("passage", memory_id) from None
    return {"deleted": memory_id}


# -- tools ------------------------------------------------------------------------------------------


@_route("GET", "/v1/tools/")
async def list_tools(request: Request, after: str | None = None, limit: int | None = None,
                     name: str | None = None) -> list[dict[str, Any]]:
    tools = sorted(_tools(request).values(), key=lambda t: t.name)
    if name is not None:
        tools = [t for t in tools if t.name == name]
    return _page([_tool_json(t, set(DEFAULT_TOOLS)) for t in tools], after, limit)


@router.get("/v1/tools/{tool_id}")
async def retrieve_tool(tool_id: str, request: Request) -> dict[str, Any]:
    tool = _tools(request).get(tool_id.removeprefix("tool-"))
    if tool is None:
        raise _not_found("tool", tool_id)
    return _tool_json(tool, set(DEFAULT_TOOLS))


@router.get("/v1/agents/{agent_id}/tools")
async def agent_tools(agent_id: str, request: Request, after: str | None = None,
                      limit: int | None = None) -> list[dict[str, Any]]:
    agent = _agent(request, agent_id)
    registry = request.app.state.system.kernel.tools.tools
    tools = [_tool_json(registry[n], set(DEFAULT_TOOLS)) for n in agent.tools if n in registry]
    return _page(tools, after, limit)


@router.patch("/v1/agents/{agent_id}/tools/attach/{tool_id}")
async def attach_tool(agent_id: str, tool_id: str, request: Request) -> dict[str, Any]:
    agent = _agent(request, agent_id)
    name = _tool_names(request, [tool_id])[0]
    tools = agent.tools if name in agent.tools else [*agent.tools, name]
    return _agent_json(request, _runtime(request).store.update(agent.id, tools=tools))


@router.patch("/v1/agents/{agent_id}/tools/detach/{tool_id}")
async def detach_tool(agent_id: str, tool_id: str, request: Request) -> dict[str, Any]:
    agent = _agent(request, agent_id)
    name = _tool_names(request, [tool_id])[0]
    if name == "send_message":
        raise _fail(400, "send_message cannot be detached: it is how the agent replies")
    return _agent_json(request, _runtime(request).store.update(agent.id,
                                                               tools=[t for t in agent.tools if t != name]))


# -- models -----------------------------------------------------------------------------------------


@router.get("/v1/models/")
async def letta_models(request: Request) -> list[dict[str, Any]]:
    """Letta's model list (the OpenAI one is `GET /v1/models`, without the trailing slash)."""
    system = request.app.state.system
    window = _window(system)
    return [{"name": system.model_name, "display_name": system.model_name, "model": system.model_name,
             "handle": _handle(system), "model_endpoint_type": "openai", "provider_type": "openai",
             "provider_name": "llmos", "model_type": "llm", "context_window": window,
             "max_context_window": window}]
