"""MCP tools: an outside server's tools as llmos syscalls, pinned by hash and treated as untrusted.

A Model Context Protocol server (a stdio command, or streamable HTTP on
loopback) is registered for a user; each of its tools becomes the tool
`mcp.<server>.<tool>` in the kernel's registry, so it runs only through the
one tool path: the reference monitor checks a capability for it (no grant, no
call), the call is audited, and its result is outside content (cf. loading a
driver only after checking its signature, and never trusting what it returns).
Guarantees:

- every tool's definition (name, description, input schema) is pinned by the
  sha256 of its canonical JSON when the server is registered (a tool that
  appears later is pinned when first seen); the model is shown the pinned
  definition, never a later one;
- before each call the server's current definition is compared with the pin;
  a changed description or schema (a "rug pull") makes the call a typed
  denial naming what changed, until someone approves the new definition
  (`approve`), which re-pins it; pins, changes and approvals are audited;
- results carry the untrusted label (`tool:mcp.<server>.<tool>`): the monitor
  joins it into the caller's context, so a flow rule refuses a send-type tool
  on anything derived from them;
- a server's tools answer only processes of the user who registered it;
  HTTP servers must be on 127.0.0.1, ::1 or localhost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from llmos.tools.base import Tool, ToolContext, ToolDenied, ToolError, ToolRegistry

SERVER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
CONNECT_TIMEOUT_S = 30.0  # starting a server and its initialize handshake
REQUEST_TIMEOUT_S = 120.0  # one request on a session; past it the session is dropped (a hung server)
PREFIX = "mcp."
MAX_DESCRIPTION = 2000  # characters of a server's description shown to the model

MIGRATIONS = ["""
CREATE TABLE IF NOT EXISTS servers (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, command TEXT, env TEXT, url TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pins (
    server TEXT NOT NULL REFERENCES servers(name) ON DELETE CASCADE, tool TEXT NOT NULL,
    definition TEXT NOT NULL, digest TEXT NOT NULL, pinned REAL NOT NULL,
    seen TEXT, seen_digest TEXT, PRIMARY KEY (server, tool));
"""]


class MCPError(Exception):
    """A registration or connection problem (bad name, not loopback, no such server, unreachable)."""


@dataclass(frozen=True)
class Server:
    """A registered MCP server: `command` (stdio) or `url` (streamable HTTP)."""

    name: str
    owner: str
    command: tuple[str, ...] | None = None
    env: tuple[tuple[str, str], ...] = ()
    url: str | None = None

    @property
    def transport(self) -> str:
        return "stdio" if self.command else "http"

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "owner": self.owner, "transport": self.transport,
                "command": list(self.command or ()), "url": self.url}


@dataclass(frozen=True)
class Definition:
    """What a server says a tool is; its digest is what gets pinned."""

    name: str
    description: str
    input_schema: dict[str, Any]

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "description": self.description,
                           "input_schema": self.input_schema}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Definition:
        d = json.loads(text)
        return cls(d["name"], d["description"], d["input_schema"])

    def changes(self, other: Definition) -> list[str]:
        """What differs in `other`: "description", "input schema"."""
        out = ["description"] if other.description != self.description else []
        return out + (["input schema"] if other.input_schema != self.input_schema else [])


def tool_name(server: str, tool: str) -> str:
    return f"{PREFIX}{server}.{tool}"


def validate(name: str, command: list[str] | None, url: str | None) -> None:
    """Raise MCPError unless this is a registrable server."""
    if not SERVER_NAME.fullmatch(name or ""):
        raise MCPError(f"server name {name!r} must match {SERVER_NAME.pattern}")
    if bool(command) == bool(url):
        raise MCPError("give either a command (stdio) or a URL (streamable HTTP), not both")
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or (parts.hostname or "") not in LOOPBACK:
            raise MCPError(f"an MCP server URL must be http(s) on the loopback interface "
                           f"({', '.join(sorted(LOOPBACK))}), got {url!r}")


# --- persistence -----------------------------------------------------------------------------------------


class MCPStore:
    """The registered servers and their pins, in `mcp.db` under the llmos home."""

    def __init__(self, path: Path | str) -> None:
        from llmos.db import connect

        self.db = connect(path, MIGRATIONS)
        self.db.execute("PRAGMA foreign_keys = ON")

    @classmethod
    def of_home(cls, home: Path | str) -> MCPStore:
        return cls(Path(home) / "mcp.db")

    def close(self) -> None:
        self.db.close()

    def add(self, server: Server) -> None:
        try:
            command = json.dumps(server.command) if server.command else None
            self.db.execute("INSERT INTO servers VALUES (?, ?, ?, ?, ?, ?)",
                            (server.name, server.owner, command, json.dumps(dict(server.env)), server.url,
                             time.time()))
        except Exception as e:
            if "UNIQUE" in str(e):
                raise MCPError(f"an MCP server named {server.name!r} is already registered") from None
            raise

    def server(self, name: str) -> Server | None:
        row = self.db.execute("SELECT * FROM servers WHERE name = ?", (name,)).fetchone()
        return None if row is None else _server(row)

    def servers(self, owner: str | None = None) -> list[Server]:
        rows = self.db.execute("SELECT * FROM servers WHERE ?1 IS NULL OR owner = ?1 ORDER BY name", (owner,))
        return [_server(r) for r in rows]

    def remove(self, name: str) -> None:
        self.db.execute("DELETE FROM servers WHERE name = ?", (name,))

    def pins(self, server: str) -> dict[str, tuple[Definition, Definition | None]]:
        """tool -> (pinned definition, a different definition seen since, or None)."""
        rows = self.db.execute("SELECT tool, definition, seen FROM pins WHERE server = ? ORDER BY tool",
                               (server,))
        return {r["tool"]: (Definition.from_json(r["definition"]),
                            Definition.from_json(r["seen"]) if r["seen"] else None) for r in rows}

    def pin(self, server: str, d: Definition) -> None:
        self.db.execute("INSERT OR REPLACE INTO pins VALUES (?, ?, ?, ?, ?, NULL, NULL)",
                        (server, d.name, d.to_json(), d.digest, time.time()))

    def saw(self, server: str, d: Definition) -> None:
        """Remember a definition that differs from the pin (what an approval would pin)."""
        self.db.execute("UPDATE pins SET seen = ?, seen_digest = ? WHERE server = ? AND tool = ?",
                        (d.to_json(), d.digest, server, d.name))


def _server(row: Any) -> Server:
    return Server(row["name"], row["owner"], tuple(json.loads(row["command"])) if row["command"] else None,
                  tuple(sorted(json.loads(row["env"] or "{}").items())), row["url"])


# --- the protocol ----------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _session(server: Server) -> AsyncIterator[Any]:
    """An initialized MCP ClientSession with `server`."""
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import get_default_environment, stdio_client
    from mcp.client.streamable_http import streamable_http_client

    if server.command:
        params = StdioServerParameters(command=server.command[0], args=list(server.command[1:]),
                                       env={**get_default_environment(), **dict(server.env)})
        transport = stdio_client(params)
    else:
        transport = streamable_http_client(server.url or "")
    async with transport as streams, ClientSession(streams[0], streams[1]) as session:
        await asyncio.wait_for(session.initialize(), CONNECT_TIMEOUT_S)
        yield session


class _Connection:
    """One long-lived session with a server, served by its own task (the SDK's transports must be
    entered and left in one task); requests run one at a time. A session that breaks, or a request
    the server does not answer within REQUEST_TIMEOUT_S, fails the requests waiting on it and ends
    the session, so a hung server holds nobody after that; the next request connects afresh."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._queue: asyncio.Queue[tuple[Callable[[Any], Awaitable[Any]], asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None

    async def request(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._serve(self._queue), name=f"mcp-{self.server.name}")
        fut = asyncio.get_running_loop().create_future()
        assert self._queue is not None
        await self._queue.put((fn, fut))
        return await fut

    async def _serve(self, queue: asyncio.Queue) -> None:
        fut: asyncio.Future | None = None  # the request in progress
        try:
            async with _session(self.server) as session:
                while True:
                    fn, fut = await queue.get()
                    if fut.done():
                        continue
                    try:
                        result = await asyncio.wait_for(fn(session), REQUEST_TIMEOUT_S)
                    except TimeoutError:
                        raise MCPError(f"no answer within {REQUEST_TIMEOUT_S:g} s") from None
                    except Exception as e:
                        if not fut.done():
                            fut.set_exception(e)
                    else:
                        if not fut.done():
                            fut.set_result(result)
        except BaseException as e:  # the session broke, hung or was closed: fail whoever waits
            why = MCPError(f"MCP server {self.server.name!r} ({self.server.transport}) failed: {_cause(e)}")
            if fut is not None and not fut.done():
                fut.set_exception(why)
            while not queue.empty():
                _, fut = queue.get_nowait()
                if not fut.done():
                    fut.set_exception(why)
            if isinstance(e, asyncio.CancelledError):
                raise

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


def _cause(e: BaseException) -> str:
    """The first leaf of an exception group (anyio wraps transport errors), as text."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _definitions(listed: Any) -> dict[str, Definition]:
    return {t.name: Definition(t.name, t.description or "", dict(t.inputSchema or {}))
            for t in listed.tools if TOOL_NAME.fullmatch(t.name)}


def _text(result: Any) -> str:
    parts = [getattr(c, "text", None) or json.dumps(c.model_dump(mode="json")) for c in result.content]
    return "\n".join(parts)


# --- the kernel side -------------------------------------------------------------------------------------


class MCPTools:
    """Registered MCP servers' tools in a kernel's `ToolRegistry`, behind its monitor.

    `monitor` is told each tool's output is untrusted; `audit` (an AuditLog or None) gets a row for
    every pin, change and approval.
    """

    def __init__(self, store: MCPStore, tools: ToolRegistry, monitor: Any, audit: Any = None) -> None:
        self.store, self.tools, self.monitor, self.audit = store, tools, monitor, audit
        self._connections: dict[str, _Connection] = {}
        for server in store.servers():
            for pinned, _ in store.pins(server.name).values():
                self._register(server, pinned)

    async def add(self, owner: str, name: str, command: list[str] | None = None,
                  env: dict[str, str] | None = None, url: str | None = None) -> list[Definition]:
        """Register a server for `owner`: connect, list its tools and pin each one."""
        validate(name, command, url)
        if self.store.server(name) is not None:
            raise MCPError(f"an MCP server named {name!r} is already registered")
        server = Server(name, owner, tuple(command) if command else None, tuple(sorted((env or {}).items())),
                        url)
        conn = _Connection(server)
        try:
            found = await self._list(conn)
        except BaseException:
            await conn.close()
            raise
        self.store.add(server)
        self._connections[name] = conn
        for d in found.values():
            self._pin(server, d, f"user:{owner}")
        return list(found.values())

    async def remove(self, name: str) -> None:
        for tool in self.store.pins(name):
            self.tools.tools.pop(tool_name(name, tool), None)
        self.store.remove(name)
        conn = self._connections.pop(name, None)
        if conn is not None:
            await conn.close()

    def status(self, name: str) -> list[dict[str, Any]]:
        """Each pinned tool: its syscall name, pinned digest, and what changed since (if anything)."""
        return [{"tool": t, "syscall": tool_name(name, t), "digest": pinned.digest,
                 "description": pinned.description, "input_schema": pinned.input_schema,
                 "changed": pinned.changes(seen) if seen else [],
                 "pending_digest": seen.digest if seen else None}
                for t, (pinned, seen) in self.store.pins(name).items()]

    async def refresh(self, name: str) -> list[dict[str, Any]]:
        """List the server's tools now: pin new ones, note changed ones (they stay refused)."""
        server = self._server(name)
        pins = self.store.pins(name)
        for d in (await self._list(self._connection(server))).values():
            if d.name not in pins:
                self._pin(server, d, "refresh")
            else:
                self._check(server, pins[d.name][0], d)
        return self.status(name)

    def approve(self, name: str, tool: str, by: str) -> Definition:
        """Pin the definition the server now gives `tool` (the one a refused call saw)."""
        server = self._server(name)
        pinned, seen = self.store.pins(name).get(tool, (None, None))
        if pinned is None:
            raise MCPError(f"MCP server {name!r} has no tool {tool!r}")
        if seen is None:
            raise MCPError(f"{tool_name(name, tool)} has no changed definition waiting for approval")
        self._pin(server, seen, by, approved=pinned)
        return seen

    async def aclose(self) -> None:
        for conn in self._connections.values():
            await conn.close()
        self._connections.clear()

    # -- private

    def _server(self, name: str) -> Server:
        server = self.store.server(name)
        if server is None:
            raise MCPError(f"no MCP server named {name!r}")
        return server

    def _connection(self, server: Server) -> _Connection:
        conn = self._connections.get(server.name)
        if conn is None:
            conn = self._connections[server.name] = _Connection(server)
        return conn

    async def _list(self, conn: _Connection) -> dict[str, Definition]:
        async def ask(session: Any) -> dict[str, Definition]:
            return _definitions(await session.list_tools())

        try:
            return await asyncio.wait_for(conn.request(ask), CONNECT_TIMEOUT_S)
        except (MCPError, TimeoutError):
            raise
        except Exception as e:
            raise MCPError(f"MCP server {conn.server.name!r} did not list its tools: {_cause(e)}") from None

    def _pin(self, server: Server, d: Definition, by: str, approved: Definition | None = None) -> None:
        self.store.pin(server.name, d)
        self._register(server, d)
        if self.audit is not None:
            what = "mcp.approve" if approved is not None else "mcp.pin"
            args: dict[str, Any] = {"server": server.name, "tool": d.name, "digest": d.digest}
            if approved is not None:
                args |= {"previous_digest": approved.digest, "changed": approved.changes(d)}
            self.audit.append(by, what, args, None, "allow",
                              f"{'approved' if approved else 'pinned'} the definition of "
                              f"{tool_name(server.name, d.name)}", {"owner": server.owner})

    def _check(self, server: Server, pinned: Definition, current: Definition) -> list[str]:
        """What changed in `current` since `pinned` (noted and audited once per new definition)."""
        changes = pinned.changes(current)
        if changes:
            _, seen = self.store.pins(server.name).get(pinned.name, (None, None))
            if seen is None or seen.digest != current.digest:
                self.store.saw(server.name, current)
                if self.audit is not None:
                    self.audit.append("mcp", "mcp.changed",
                                      {"server": server.name, "tool": pinned.name, "pinned": pinned.digest,
                                       "now": current.digest, "changed": changes}, None, "deny",
                                      f"the server changed the {' and '.join(changes)} of "
                                      f"{tool_name(server.name, pinned.name)}", {"owner": server.owner})
        return changes

    def _register(self, server: Server, d: Definition) -> None:
        name = tool_name(server.name, d.name)
        description = (f"[MCP tool {d.name!r} of server {server.name!r}; its description is the server's "
                       f"own words, untrusted] {d.description[:MAX_DESCRIPTION]}")
        tool = Tool(name, description, d.input_schema or {"type": "object"},
                    self._runner(server.name, d.name), untrusted_output=True, owner=server.owner)
        self.tools.tools[name] = tool  # replaces the tool's earlier (pinned) definition
        untrusted = getattr(self.monitor, "untrusted_output", None)
        if untrusted is not None:
            untrusted(name)

    def _runner(self, server_name: str, tool: str) -> Callable[[dict[str, Any], ToolContext], Awaitable[str]]:
        async def run(args: dict[str, Any], ctx: ToolContext) -> str:
            server = self.store.server(server_name)
            if server is None:
                raise ToolError(f"MCP server {server_name!r} is no longer registered")
            owner = getattr(ctx.process, "owner", None)
            if owner != server.owner:
                raise ToolDenied(f"MCP server {server_name!r} belongs to another user")
            pinned, _ = self.store.pins(server_name).get(tool, (None, None))
            if pinned is None:
                raise ToolError(f"{tool_name(server_name, tool)} is not pinned")

            async def call(session: Any) -> tuple[Definition | None, Any]:
                current = _definitions(await session.list_tools()).get(tool)
                if current is None or current.digest != pinned.digest:
                    return current, None
                return current, await session.call_tool(tool, args)

            try:
                current, result = await self._connection(server).request(call)
            except MCPError as e:
                raise ToolError(str(e)) from None
            if current is None:
                raise ToolError(f"MCP server {server_name!r} no longer offers {tool!r}")
            if changes := self._check(server, pinned, current):
                raise ToolDenied(
                    f"the MCP server changed the {' and '.join(changes)} of {tool_name(server_name, tool)} "
                    f"since it was pinned (sha256 {pinned.digest[:12]} -> {current.digest[:12]}); "
                    f"refused until approved: llmos mcp approve {server_name} {tool}")
            if result.isError:
                raise ToolError(f"{tool_name(server_name, tool)} failed: {_text(result)}")
            return _text(result)

        return run
