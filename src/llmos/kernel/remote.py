"""The agent SDK over the network: a syscall handle whose calls travel to a running llmos server.

An agent program written against `Syscalls` (`async def main(sys, **args)`)
runs unchanged in another OS process with a `RemoteSyscalls` handle: the
server starts a process for it (server/remote_api.py) and each method is one
HTTP request carrying the process's token, answered by that process's own
in-kernel handle. So its LLM calls wait for the kernel's scheduler, its tool
calls pass the reference monitor, and `llmos ps` / `kill` see it like any
other agent. A kernel refusal is a `SyscallError` here as in-process; the
process ending under the program (killed, out of quota) is `ProcessEnded`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx

from llmos.kernel.api import ChatResult, ToolResult
from llmos.kernel.syscall import SyscallError


class ProcessEnded(Exception):
    """The remote process was ended by the kernel (killed, a quota); the program should stop."""


class RemoteSyscalls:
    """A remote agent's handle: the same syscalls as `Syscalls`, over HTTP (spawn and configure
    excepted)."""

    def __init__(self, http: httpx.AsyncClient, pid: int, token: str, name: str) -> None:
        self._http, self._pid, self._token, self._name = http, pid, token, name
        self._printing: set[asyncio.Task] = set()

    def __repr__(self) -> str:
        return f"RemoteSyscalls(pid={self._pid})"

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def name(self) -> str:
        return self._name

    async def _call(self, name: str, args: dict[str, Any]) -> Any:
        r = await self._http.post("/v1/remote/syscall", json={"name": name, "args": args},
                                  headers={"X-LLMOS-Process": self._token})
        if r.status_code == 200:
            return r.json()["result"]
        message = _message(r)
        if r.status_code == 410:
            raise ProcessEnded(message)
        raise SyscallError(message)

    async def llm_chat(self, messages: list[dict[str, Any]], **params: Any) -> ChatResult:
        return ChatResult(**await self._call("llm_chat", {"messages": messages, **params}))

    async def llm_generate(self, prompt: str, **params: Any) -> ChatResult:
        return ChatResult(**await self._call("llm_generate", {"prompt": prompt, **params}))

    async def tool_call(self, tool: str, args: Mapping[str, Any] | None = None,
                        labels: Mapping[str, Any] | None = None) -> ToolResult:
        return ToolResult(**await self._call("tool_call", {"tool": tool, "args": dict(args or {}),
                                                           "labels": labels}))

    async def sleep(self, seconds: float) -> None:
        await self._call("sleep", {"seconds": seconds})

    async def wait(self, pid: int) -> Any:
        """Wait for an agent of the same kernel to end; its result (as JSON)."""
        return await self._call("wait", {"pid": pid})

    async def kernel_stats(self) -> dict[str, Any]:
        """Needs `kernel.stats`, as in-process."""
        return await self._call("kernel_stats", {})

    async def kill(self, pid: int, reason: str = "") -> str:
        """Needs `kernel.signal`, as in-process."""
        return await self._call("signal", {"pid": pid, "signal": "kill", "reason": reason})

    async def suspend(self, pid: int) -> str:
        return await self._call("signal", {"pid": pid, "signal": "suspend"})

    async def resume(self, pid: int) -> str:
        return await self._call("signal", {"pid": pid, "signal": "resume"})

    def print(self, text: str) -> None:
        """Write to the process's output (kept in the process table); sent in the background."""
        task = asyncio.ensure_future(self._call("print", {"text": str(text)}))
        self._printing.add(task)
        task.add_done_callback(self._printing.discard)

    async def _exit(self, result: Any) -> None:
        if self._printing:
            await asyncio.gather(*self._printing, return_exceptions=True)
        await self._call("exit", {"result": result})


def _message(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {r.status_code}: {r.text[:200]}"


async def run_remote(url: str, key: str | None, program: Callable[..., Awaitable[Any]], name: str,
                     args: dict[str, Any] | None = None, **spawn: Any) -> tuple[int, Any]:
    """Run `program` here as a process of the server at `url`; (pid, its result).

    `spawn` takes priority, weight, quotas and capabilities (a list of grants).
    """
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=None) as http:
        r = await http.post("/v1/remote/spawn", json={"name": name, **spawn})
        if r.status_code != 200:
            raise SyscallError(_message(r))
        pid, token = r.json()["pid"], r.json()["token"]
        sys = RemoteSyscalls(http, pid, token, name)
        result = await program(sys, **(args or {}))
        await sys._exit(result)
        return pid, result


def server_key(url: str, home: Any = None) -> str | None:
    """The key for the server at `url`: $LLMOS_API_KEY, else the llmos home's local key when `url` is
    that home's running server."""
    import os

    from llmos.home import llmos_home
    from llmos.server.system import find_server

    if key := os.environ.get("LLMOS_API_KEY"):
        return key
    info = find_server(home if home is not None else llmos_home())
    return info.get("local_key") if info is not None and info["url"] == url.rstrip("/") else None


async def run_programs(url: str, key: str | None, programs: list[tuple[str, Any, Any]],
                       args: dict[str, Any]) -> list[tuple[str, int | None, str, Any]]:
    """Run (name, main, capabilities) programs concurrently as remote processes of `url`; for each:
    (name, pid or None, "exited" | the error's text, result)."""
    import inspect

    async def one(name: str, main: Any, caps: Any) -> tuple[str, int | None, str, Any]:
        accepted = inspect.signature(main).parameters
        mine = {k: v for k, v in args.items() if k in accepted}
        try:
            pid, result = await run_remote(url, key, main, name, mine, capabilities=caps)
        except (SyscallError, ProcessEnded, httpx.HTTPError) as e:
            return name, None, f"{type(e).__name__}: {e}", None
        return name, pid, "exited", result

    return list(await asyncio.gather(*(one(*p) for p in programs)))
