"""MCP servers over HTTP: register, list, refresh, remove, and approve changed tool definitions.

`/v1/mcp/servers` registers an MCP server for the calling user (its tools
become the kernel's `mcp.<server>.<tool>` syscalls, pinned; see tools/mcp.py)
and lists the caller's servers with each tool's pin and any change waiting;
`POST /v1/mcp/servers/{name}/tools/{tool}/approve` pins a changed definition.
Guarantees: a user sees and manages only their own servers (another user's
answers 404; an admin's: all); a stdio server is a command the server runs,
so only an admin may register one (403 otherwise); HTTP servers must be on
loopback; approvals are audited under the approving user's name.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict

from llmos.kernel.users import User
from llmos.server.auth import CurrentUser
from llmos.server.kernel_api import KernelAPIError
from llmos.tools.mcp import MCPError, MCPStore, MCPTools, Server


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await app.state.mcp.aclose()  # end the sessions (and stdio servers) with the app


router = APIRouter(prefix="/v1/mcp", tags=["mcp"], lifespan=_lifespan)


class ServerBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    command: list[str] | None = None
    env: dict[str, str] = {}
    url: str | None = None


def _mcp(request: Request) -> MCPTools:
    return request.app.state.mcp


def _visible(request: Request, user: User, name: str) -> Server:
    server = _mcp(request).store.server(name)
    if server is None or not user.can_see(server.owner):
        raise KernelAPIError(404, f"no MCP server named {name!r}", "mcp_server_not_found")
    return server


def _describe(mcp: MCPTools, server: Server) -> dict[str, Any]:
    return server.info() | {"tools": mcp.status(server.name)}


@router.get("/servers")
async def servers(request: Request, user: CurrentUser) -> dict[str, Any]:
    mcp = _mcp(request)
    return {"data": [_describe(mcp, s) for s in mcp.store.servers() if user.can_see(s.owner)]}


@router.post("/servers")
async def add(request: Request, body: ServerBody, user: CurrentUser) -> dict[str, Any]:
    """Register a server for the caller: connect, list its tools, pin each definition."""
    if body.command and not user.admin:
        raise KernelAPIError(403, "a stdio MCP server runs a command on the server's machine: only an "
                                  "admin may register one", "admin_only")
    mcp = _mcp(request)
    try:
        await mcp.add(user.id, body.name, body.command, body.env, body.url)
    except MCPError as e:
        raise KernelAPIError(400, str(e), "mcp_error") from None
    return _describe(mcp, _visible(request, user, body.name))


@router.get("/servers/{name}")
async def server(request: Request, name: str, user: CurrentUser) -> dict[str, Any]:
    return _describe(_mcp(request), _visible(request, user, name))


@router.delete("/servers/{name}")
async def remove(request: Request, name: str, user: CurrentUser) -> dict[str, Any]:
    _visible(request, user, name)
    await _mcp(request).remove(name)
    return {"name": name, "deleted": True}


@router.post("/servers/{name}/refresh")
async def refresh(request: Request, name: str, user: CurrentUser) -> dict[str, Any]:
    """List the server's tools now: new ones are pinned, changed ones wait for approval."""
    server = _visible(request, user, name)
    try:
        await _mcp(request).refresh(name)
    except MCPError as e:
        raise KernelAPIError(502, str(e), "mcp_error") from None
    return _describe(_mcp(request), server)


@router.post("/servers/{name}/tools/{tool}/approve")
async def approve(request: Request, name: str, tool: str, user: CurrentUser) -> dict[str, Any]:
    """Pin the definition the server now gives `tool` (calls were refused since it changed)."""
    server = _visible(request, user, name)
    try:
        _mcp(request).approve(name, tool, f"user:{user.name}")
    except MCPError as e:
        raise KernelAPIError(409, str(e), "nothing_to_approve") from None
    return _describe(_mcp(request), server)


def install(app: Any) -> None:
    """Mount the MCP API on `app` and put the registered servers' tools into its kernel."""
    system = app.state.system
    app.state.mcp = MCPTools(MCPStore.of_home(system.home), system.kernel.tools, system.monitor, system.audit)
    app.include_router(router)
