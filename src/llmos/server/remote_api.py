"""Remote agent programs: a program in another OS process makes its syscalls over HTTP.

`POST /v1/remote/spawn` starts a process in the server's kernel for the caller
and returns its pid and a per-process token; the program, wherever it runs,
sends each syscall to `POST /v1/remote/syscall` with that token
(`X-LLMOS-Process`). Inside the kernel the process is an ordinary agent whose
body relays those requests to its own syscall handle (cf. a stub process
standing in for a remote client, as in an RPC server). Guarantees:

- the remote program has exactly the syscalls of an in-process agent, through
  the same handle: its LLM calls are scheduled by the kernel's policy beside
  every other agent's, its tool calls pass the reference monitor and are
  audited, its quotas are charged; it cannot spawn (a program is code the
  server would have to run);
- the token names one process: it is unguessable, it is the only thing that
  selects the process, and it works only with the key of the user who
  spawned it; a token of another process, or another user's key, gets 404;
- a non-admin's process gets at most the kernel's default capabilities
  (narrowed by what it asks for); an admin's gets what it asks for, as
  `llmos run` grants openly;
- killing the process (API, `llmos kill`) ends its relay: a syscall waiting or
  sent afterwards is answered 410 with the reason, so the program ends too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel, ConfigDict

from llmos.kernel.api import Syscalls
from llmos.kernel.process import Quotas
from llmos.kernel.syscall import SyscallError
from llmos.server.auth import CurrentUser
from llmos.server.kernel_api import KernelAPIError

router = APIRouter(prefix="/v1/remote", tags=["remote"])
SYSCALLS = ("llm_chat", "llm_generate", "tool_call", "sleep", "print", "wait", "kernel_stats", "signal",
            "exit")


class SpawnBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "remote"
    priority: int = 0
    weight: float = 1.0
    quotas: dict[str, Any] | None = None
    capabilities: list[Any] | None = None


class SyscallBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    args: dict[str, Any] = {}


@dataclass
class _Link:
    """One remote process: its pid, its user and the syscalls waiting for its relay."""

    pid: int
    owner: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


async def _relay(sys: Syscalls, link: _Link) -> Any:
    """The in-kernel body of a remote process: run each syscall the program sends on this handle."""
    while True:
        name, args, fut = await link.queue.get()
        if name == "exit":
            fut.set_result(None)
            return args.get("result")
        try:
            fut.set_result(await _dispatch(sys, name, args))
        except BaseException as e:  # the program gets the error; a quota's Terminated also ends us
            if not fut.done():
                fut.set_exception(e)
            if not isinstance(e, Exception):
                raise


async def _dispatch(sys: Syscalls, name: str, args: dict[str, Any]) -> Any:
    try:
        if name in ("llm_chat", "llm_generate"):
            prompt = args.pop("messages" if name == "llm_chat" else "prompt", None)
            return dataclasses.asdict(await getattr(sys, name)(prompt, **args))
        if name == "tool_call":
            r = await sys.tool_call(args.get("tool", ""), args.get("args"), args.get("labels"))
            return jsonable_encoder(dataclasses.asdict(r))
        if name == "sleep":
            return await sys.sleep(float(args.get("seconds", 0)))
        if name == "print":
            return sys.print(str(args.get("text", "")))
        if name == "wait":
            return jsonable_encoder(await sys.wait(int(args["pid"])))
        if name == "kernel_stats":
            return jsonable_encoder(await sys.kernel_stats())
        if name == "signal" and args.get("signal") in ("kill", "suspend", "resume"):
            method = getattr(sys, args["signal"])
            return await (method(int(args["pid"]), str(args.get("reason", ""))) if args["signal"] == "kill"
                          else method(int(args["pid"])))
    except (KeyError, ValueError) as e:
        raise SyscallError(f"bad arguments for {name}: {type(e).__name__}: {e}") from None
    except TypeError as e:
        raise SyscallError(f"bad arguments for {name}: {e}") from None
    raise SyscallError(f"no remote syscall named {name!r} (remote programs have {', '.join(SYSCALLS)})")


def _links(request: Request) -> dict[str, _Link]:
    return request.app.state.remote_links


@router.post("/spawn")
async def spawn(request: Request, body: SpawnBody, user: CurrentUser) -> dict[str, Any]:
    """Start a remote process for the caller; its token goes only to the caller."""
    from llmos.security.capabilities import Capabilities, PolicyError

    kernel = request.app.state.system.kernel
    try:
        quotas = Quotas(**body.quotas) if body.quotas else None
        caps = None
        if body.capabilities is not None and user.admin:
            caps = Capabilities.of(body.capabilities)
        elif body.capabilities is not None:
            caps = kernel.default_capabilities(None).attenuate(body.capabilities)
    except (TypeError, ValueError, PolicyError) as e:
        raise KernelAPIError(400, f"bad spawn request: {e}", "bad_spawn") from None
    except PermissionError as e:
        raise KernelAPIError(403, str(e), "permission_denied") from None
    link = _Link(0, user.id)

    async def remote(sys: Syscalls) -> Any:
        return await _relay(sys, link)

    try:
        link.pid = await kernel.spawn(remote, body.name, priority=body.priority, weight=body.weight,
                                      quotas=quotas, capabilities=caps, owner=user.id)
    except SyscallError as e:
        raise KernelAPIError(400, str(e), "bad_spawn") from None
    token = secrets.token_urlsafe(32)
    _links(request)[token] = link
    return {"pid": link.pid, "token": token}


@router.post("/syscall")
async def syscall(request: Request, body: SyscallBody, user: CurrentUser,
                  x_llmos_process: str = Header()) -> dict[str, Any]:
    """One syscall of the remote process the token names."""
    link = _links(request).get(x_llmos_process)
    if link is None or link.owner != user.id:
        raise KernelAPIError(404, "no remote process has this token", "process_not_found")
    if body.name not in SYSCALLS:
        raise KernelAPIError(400, f"no remote syscall named {body.name!r}", "bad_syscall")
    proc = request.app.state.system.kernel.process(link.pid)
    if not proc.alive:
        _links(request).pop(x_llmos_process, None)
        raise KernelAPIError(410, f"process {link.pid} has ended: {proc.exit_reason}", "process_ended")
    fut = asyncio.get_running_loop().create_future()
    await link.queue.put((body.name, dict(body.args), fut))
    await asyncio.wait([fut, proc.task], return_when=asyncio.FIRST_COMPLETED)
    if not fut.done():
        fut.cancel()
        raise KernelAPIError(410, f"process {link.pid} has ended: {proc.exit_reason}", "process_ended")
    if fut.cancelled() or (e := fut.exception()) is None:
        return {"result": None if fut.cancelled() else fut.result()}
    if isinstance(e, SyscallError):
        raise KernelAPIError(400, str(e), "syscall_error")
    raise KernelAPIError(410, f"process {link.pid} has ended: {proc.exit_reason or e}", "process_ended")


def install(app: Any) -> None:
    """Mount the remote-program API on `app` (which has `state.system`)."""
    app.state.remote_links = {}
    app.include_router(router)
