"""The agent SDK: what an agent program holds is this handle, and every method
on it is a system call into the kernel (there is no other way out).

An agent program is `async def main(sys: Syscalls, **args) -> str | None`.
The handle holds only its pid and an opaque token; its methods send through
the gate in kernel/syscall.py, so no attribute of it leads to the kernel.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass
class ChatResult:
    """One LLM call's answer."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


ToolStatus = Literal["allowed", "denied", "error"]
TOOL_STATUSES = ("allowed", "denied", "error")


@dataclass
class ToolResult:
    """A tool call's result. `status`: "allowed" (it ran; `content` is its output), "denied" (the
    reference monitor refused it) or "error" (it failed, timed out or does not exist); `reason` says
    why for the last two."""

    tool: str
    status: ToolStatus
    content: Any = None
    reason: str | None = None
    trusted: bool = True  # False when the content carries outside data (IFC source)

    def __post_init__(self) -> None:
        if self.status not in TOOL_STATUSES:
            raise ValueError(f"a tool result's status is one of {TOOL_STATUSES}, got {self.status!r}")

    @property
    def ok(self) -> bool:
        return self.status == "allowed"

    @property
    def denied(self) -> bool:
        return self.status == "denied"

    @property
    def error(self) -> str | None:
        """Why the call did not run or failed (None when it ran)."""
        return None if self.ok else self.reason

    def as_text(self) -> str:
        """What an LLM reads back as the function's result."""
        if not self.ok:
            return f"Error: {self.reason}"
        return self.content if isinstance(self.content, str) else repr(self.content)


class Syscalls:
    """An agent's handle on the kernel; every coroutine method is one logged syscall.

    It holds its pid and an opaque token, nothing else: no attribute, closure or exception
    leads from it to the kernel. It cannot be copied, pickled or given new attributes.
    """

    __slots__ = ("_pid", "_token")
    _pid: int
    _token: str

    def __init__(self, pid: int, token: str) -> None:
        object.__setattr__(self, "_pid", pid)
        object.__setattr__(self, "_token", token)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a syscall handle is read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("a syscall handle is read-only")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a syscall handle cannot be copied or pickled")

    def __repr__(self) -> str:
        return f"Syscalls(pid={self._pid})"

    async def _call(self, syscall: str, args: dict[str, Any]) -> Any:
        from llmos.kernel.syscall import enter

        return await enter(self._token, syscall, args)

    def _query(self, name: str, *args: Any) -> Any:
        from llmos.kernel.syscall import query

        return query(self._token, name, *args)

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def name(self) -> str:
        return self._query("name")

    @property
    def workdir(self) -> Path:
        return self._query("workdir")

    @property
    def home(self) -> Path:
        """The llmos home the kernel's tools use (shared state such as memory.db lives there)."""
        return self._query("home")

    @property
    def context_window(self) -> int:
        return self._query("context_window")

    async def llm_chat(self, messages: list[dict[str, Any]], *, max_tokens: int = 256,
                       temperature: float = 0.0, stop: list[str] | None = None,
                       json_schema: Mapping[str, Any] | None = None, seed: int | None = None) -> ChatResult:
        """A chat completion on the kernel's backend, scheduled by the agent scheduler."""
        return await self._call("llm_chat", {"messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature, "stop": stop, "json_schema": json_schema,
                                "seed": seed})

    async def llm_generate(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0,
                           stop: list[str] | None = None, json_schema: Mapping[str, Any] | None = None,
                           seed: int | None = None) -> ChatResult:
        """A raw text completion of `prompt`."""
        return await self._call("llm_generate", {"prompt": prompt, "max_tokens": max_tokens,
                                "temperature": temperature, "stop": stop, "json_schema": json_schema,
                                "seed": seed})

    async def tool_call(self, tool: str, args: Mapping[str, Any] | None = None,
                        labels: Mapping[str, Any] | None = None) -> ToolResult:
        """Run a tool through the reference monitor; denials and failures come back as results.

        `labels` can only make arguments less trusted than this agent's context (they are joined
        with it), unless the agent holds the `ifc.declassify` capability."""
        return await self._call("tool_call", {"tool": tool, "args": dict(args or {}), "labels": labels})

    def tools(self) -> list[dict[str, Any]]:
        """OpenAI-style specs of the tools registered with the kernel (read-only)."""
        return self._query("tools")

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Tokens `messages` take as a chat prompt on the kernel's model."""
        return self._query("count_tokens", messages)

    async def spawn(self, program: Any, name: str | None = None, **kwargs: Any) -> int:
        """Start a child agent; its capabilities are attenuated from this agent's and its quotas are at
        most this agent's remaining (by default all of it, shared: a child's use counts against ours)."""
        return await self._call("spawn", {"program": program, "name": name, **kwargs})

    async def wait(self, pid: int) -> Any:
        """Wait for an agent to end; returns its result."""
        return await self._call("wait", {"target": pid})

    async def sleep(self, seconds: float) -> None:
        await self._call("sleep", {"seconds": seconds})

    # Privileged calls: the reference monitor allows them only with a `kernel.*` capability.

    async def kernel_stats(self) -> dict[str, Any]:
        """Engine, scheduler and per-agent state (what `llmos top` shows); needs `kernel.stats`."""
        return await self._call("kernel_stats", {})

    def settings(self) -> dict[str, Any]:
        """The scheduler and engine settings now (read-only, like /proc/sys)."""
        return self._query("settings")

    async def configure(self, **changes: Any) -> dict[str, Any]:
        """Change settings (policy, quantum, max_running, kv_blocks); returns the previous values.
        Needs `kernel.configure`."""
        return await self._call("configure", {"changes": changes})

    async def kill(self, pid: int, reason: str = "") -> str:
        """End another agent; needs `kernel.signal`."""
        return await self._call("signal", {"target": pid, "signal": "kill", "reason": reason})

    async def suspend(self, pid: int) -> str:
        return await self._call("signal", {"target": pid, "signal": "suspend"})

    async def resume(self, pid: int) -> str:
        return await self._call("signal", {"target": pid, "signal": "resume"})

    def print(self, text: str) -> None:
        """Write to the agent's output (shown by `llmos run`, kept in the process table)."""
        self._query("print", text)
