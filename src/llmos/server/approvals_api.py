"""Approvals over HTTP: the people side of the kernel's approval queue (cf. a sudo prompt, remotely).

`GET /v1/approvals` lists the calls waiting for a decision (`?all=true`: the
recently decided too), `GET /v1/approvals/{id}` shows one, and
`POST /v1/approvals/{id}/approve` or `/deny` (body: optional `reason`)
decides it; the waiting agent resumes with the decision as its tool's result.
Guarantees: a user sees and decides only approvals of their own processes
(another user's answers 404, like an id that does not exist; an admin's: all);
a decision is taken once (a second one, or one after the timeout, is 409);
the decision is audited under the deciding user's name.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from llmos.kernel.approvals import Approval, ApprovalError, approvals_of
from llmos.kernel.users import User
from llmos.server.auth import CurrentUser
from llmos.server.kernel_api import KernelAPIError

router = APIRouter(prefix="/v1/approvals", tags=["approvals"])


class DecisionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = ""


def _queue(request: Request) -> Any:
    return approvals_of(request.app.state.system.kernel)


def _visible(request: Request, user: User, approval_id: str) -> Approval:
    item = _queue(request).get(approval_id)
    if item is None or not user.can_see(item.owner):
        raise KernelAPIError(404, f"no approval {approval_id!r}", "approval_not_found")
    return item


@router.get("")
async def approvals(request: Request, user: CurrentUser, all: bool = False) -> dict[str, Any]:
    """The caller's pending approvals (with `all`: the decided ones the kernel still keeps too)."""
    return {"data": [a.info() for a in _queue(request).list(pending_only=not all) if user.can_see(a.owner)]}


@router.get("/{approval_id}")
async def approval(request: Request, approval_id: str, user: CurrentUser) -> dict[str, Any]:
    return _visible(request, user, approval_id).info()


async def _decide(request: Request, approval_id: str, user: User, approve: bool,
                  reason: str) -> dict[str, Any]:
    _visible(request, user, approval_id)
    try:
        return _queue(request).decide(approval_id, approve, f"user:{user.name}", reason).info()
    except ApprovalError as e:
        raise KernelAPIError(409, str(e), "approval_decided") from None


@router.post("/{approval_id}/approve")
async def approve(request: Request, approval_id: str, user: CurrentUser,
                  body: DecisionBody | None = None) -> dict[str, Any]:
    return await _decide(request, approval_id, user, True, body.reason if body else "")


@router.post("/{approval_id}/deny")
async def deny(request: Request, approval_id: str, user: CurrentUser,
               body: DecisionBody | None = None) -> dict[str, Any]:
    return await _decide(request, approval_id, user, False, body.reason if body else "")


def install(app: Any) -> None:
    """Mount the approvals API on `app` (which has `state.system`; kernel_api's error handler)."""
    app.include_router(router)
