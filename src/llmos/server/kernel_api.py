"""The kernel's native API: /proc, kill and the audit trail of the running OS over HTTP.

What `llmos ps`, `top`, `kill` and `audit` use when a server runs (cf. a
Unix `ps` reading /proc and `kill(2)`): processes and kernel statistics,
signals (kill, suspend, resume), the audit log and its verification.
Guarantees: a user sees and signals only their own processes and the audit
rows of their own processes (rows under a process name that another user's
process also had are shown to admins only); another user's process answers 404 exactly like
a pid that does not exist; an admin sees everything; verifying the whole
audit chain is an admin's operation (403 otherwise).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from llmos.kernel.users import User
from llmos.server.auth import CurrentUser

router = APIRouter(prefix="/v1/kernel", tags=["kernel"])
SIGNALS = ("kill", "suspend", "resume")


class KernelAPIError(Exception):
    """An answer in OpenAI's error shape (status, message, code)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def response(self) -> JSONResponse:
        kind = {403: "permission_denied", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": None,
                                       "code": self.code}}, status_code=self.status)


class SignalBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    signal: Literal["kill", "suspend", "resume"]
    reason: str = ""


def _system(request: Request) -> Any:
    return request.app.state.system


def _visible(user: User, row: dict[str, Any] | None, pid: int) -> dict[str, Any]:
    if row is None or not user.can_see(row.get("owner")):
        raise KernelAPIError(404, f"no process with pid {pid}", "process_not_found")
    return row


def _live_rows(system: Any, user: User) -> list[dict[str, Any]]:
    return [p.info() | {"boot": system.kernel.boot} for p in system.kernel.ps()
            if p.alive and user.can_see(p.owner)]


@router.get("/processes")
async def processes(request: Request, user: CurrentUser, all: bool = False,
                    limit: int = 50) -> dict[str, Any]:
    """This kernel's live processes, or with `all` the newest `limit` ones of every boot of this home."""
    system = _system(request)
    if not all:
        rows = _live_rows(system, user)
    else:
        await system.kernel.sync()  # the table has the latest states
        owner = None if user.admin else user.id
        rows = await run_in_threadpool(system.kernel.table.processes, False, max(1, min(limit, 1000)), owner)
    return {"boot": system.kernel.boot, "data": rows}


@router.get("/processes/{pid}")
async def process(request: Request, pid: int, user: CurrentUser) -> dict[str, Any]:
    system = _system(request)
    live = system.kernel.procs.get(pid)
    if live is not None:
        return _visible(user, live.info(), pid)
    return _visible(user, await run_in_threadpool(system.kernel.table.process, pid), pid)


@router.get("/stats")
async def stats(request: Request, user: CurrentUser) -> dict[str, Any]:
    """Scheduler and engine state, with the caller's processes (an admin's: all)."""
    system = _system(request)
    out = await system.kernel.stats()
    out["agents"] = [a for a in out.get("agents", []) if user.can_see(a.get("owner"))]
    return out


@router.post("/processes/{pid}/signal")
async def signal(request: Request, pid: int, body: SignalBody, user: CurrentUser) -> dict[str, Any]:
    """kill, suspend or resume one of the caller's processes of this kernel."""
    system = _system(request)
    kernel = system.kernel
    proc = kernel.procs.get(pid)
    if proc is None:
        row = _visible(user, await run_in_threadpool(kernel.table.process, pid), pid)
        raise KernelAPIError(409, f"process {pid} ({row['name']}) is not running in this kernel: "
                                  f"{row['exit_reason'] or row['state']}", "process_not_running")
    _visible(user, proc.info(), pid)
    if not proc.alive:
        raise KernelAPIError(409, f"process {pid} ({proc.name}) has already ended: {proc.exit_reason}",
                             "process_not_running")
    if body.signal == "kill":
        await kernel.kill(pid, body.reason or f"signal from {user.name} over the API")
    elif body.signal == "suspend":
        await kernel.suspend(pid)
    else:
        await kernel.resume(pid)
    return {"pid": pid, "signal": body.signal, "outcome": f"{body.signal}: done",
            "state": kernel.process(pid).state.value}


@router.get("/audit")
async def audit(request: Request, user: CurrentUser, limit: int = 20) -> dict[str, Any]:
    """The last audit rows: an admin's are everyone's, a user's those of their own processes."""
    system = _system(request)
    limit = max(1, min(limit, 1000))
    if user.admin:
        rows = await run_in_threadpool(system.audit.tail, limit)
    else:
        # An agent is audited under its process name; the server names processes after agent ids
        # (unique), and a name any other user's process also had is left out, so the names select
        # only rows of the user's own processes.
        names = await run_in_threadpool(system.kernel.table.names_only_of, user.id)
        rows = await run_in_threadpool(system.audit.tail, limit, names)
    return {"data": rows}


@router.get("/audit/verify")
async def audit_verify(request: Request, user: CurrentUser) -> dict[str, Any]:
    if not user.admin:
        raise KernelAPIError(403, "verifying the whole audit log needs an admin key", "admin_only")
    verdict = await run_in_threadpool(_system(request).audit.verify)
    return {"ok": verdict.ok, "status": verdict.status, "row": verdict.row, "rows": verdict.rows,
            "message": verdict.message}


def install(app: Any) -> None:
    """Mount the kernel API on `app` (which has `state.system`)."""

    @app.exception_handler(KernelAPIError)
    async def _error(_: Request, e: KernelAPIError) -> JSONResponse:
        return e.response()

    app.include_router(router)
