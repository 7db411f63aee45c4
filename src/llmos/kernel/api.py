"""The agent SDK: what an agent program holds is this handle, and every method
on it is a system call into the kernel (there is no other way out).

An agent program is `async def main(sys: Syscalls, **args) -> str | None`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmos.kernel.kernel import Kernel


@dataclass
class ChatResult:
    """One LLM call's answer."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ToolResult:
    """A tool syscall's result; `ok` is False for a denial or a tool error (`error` says why)."""

    tool: str
    ok: bool
    content: Any = None
    error: str | None = None
    trusted: bool = True  # False when the content carries outside data (IFC source)

    def as_text(self) -> str:
        """What an LLM reads back as the function's result."""
        if not self.ok:
            return f"Error: {self.error}"
        return self.content if isinstance(self.content, str) else repr(self.content)


@dataclass
class Syscalls:
    """An agent's handle on the kernel; every coroutine method is one logged syscall."""

    kernel: Kernel = field(repr=False)
    pid: int

    @property
    def name(self) -> str:
        return self.kernel.process(self.pid).name

    @property
    def workdir(self):
        return self.kernel.workdir(self.pid)

    @property
    def home(self):
        """The llmos home the kernel's tools use (shared state such as memory.db lives there)."""
        return self.kernel.home

    @property
    def context_window(self) -> int:
        return self.kernel.backend.context_window

    async def llm_chat(self, messages: list[dict[str, Any]], *, max_tokens: int = 256,
                       temperature: float = 0.0, stop: list[str] | None = None,
                       json_schema: Mapping[str, Any] | None = None, seed: int | None = None) -> ChatResult:
        """A chat completion on the kernel's backend, scheduled by the agent scheduler."""
        return await self.kernel.syscall(self.pid, "llm_chat", messages=messages, max_tokens=max_tokens,
                                         temperature=temperature, stop=stop, json_schema=json_schema,
                                         seed=seed)

    async def llm_generate(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0,
                           stop: list[str] | None = None, json_schema: Mapping[str, Any] | None = None,
                           seed: int | None = None) -> ChatResult:
        """A raw text completion of `prompt`."""
        return await self.kernel.syscall(self.pid, "llm_generate", prompt=prompt, max_tokens=max_tokens,
                                         temperature=temperature, stop=stop, json_schema=json_schema,
                                         seed=seed)

    async def tool_call(self, tool: str, args: Mapping[str, Any] | None = None,
                        labels: Mapping[str, Any] | None = None) -> ToolResult:
        """Run a tool through the reference monitor; denials and failures come back as results."""
        return await self.kernel.syscall(self.pid, "tool_call", tool=tool, args=dict(args or {}),
                                         labels=labels)

    def tools(self) -> list[dict[str, Any]]:
        """OpenAI-style specs of the tools registered with the kernel."""
        return self.kernel.tools.specs()

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Tokens `messages` take as a chat prompt on the kernel's model."""
        return self.kernel.backend.count_tokens(messages)

    async def spawn(self, program: Any, name: str | None = None, **kwargs: Any) -> int:
        """Start a child agent; its capabilities are attenuated from this agent's."""
        return await self.kernel.syscall(self.pid, "spawn", program=program, name=name, **kwargs)

    async def wait(self, pid: int) -> Any:
        """Wait for an agent to end; returns its result."""
        return await self.kernel.syscall(self.pid, "wait", target=pid)

    async def sleep(self, seconds: float) -> None:
        await self.kernel.syscall(self.pid, "sleep", seconds=seconds)

    # Privileged calls: the reference monitor allows them only with a `kernel.*` capability.

    async def kernel_stats(self) -> dict[str, Any]:
        """Engine, scheduler and per-agent state (what `llmos top` shows); needs `kernel.stats`."""
        return await self.kernel.syscall(self.pid, "kernel_stats")

    def settings(self) -> dict[str, Any]:
        """The scheduler and engine settings now (read-only, like /proc/sys)."""
        return self.kernel.settings()

    async def configure(self, **changes: Any) -> dict[str, Any]:
        """Change settings (policy, quantum, max_running, kv_blocks); returns the previous values.
        Needs `kernel.configure`."""
        return await self.kernel.syscall(self.pid, "configure", changes=changes)

    async def kill(self, pid: int, reason: str = "") -> str:
        """End another agent; needs `kernel.signal`."""
        return await self.kernel.syscall(self.pid, "signal", target=pid, signal="kill", reason=reason)

    async def suspend(self, pid: int) -> str:
        return await self.kernel.syscall(self.pid, "signal", target=pid, signal="suspend")

    async def resume(self, pid: int) -> str:
        return await self.kernel.syscall(self.pid, "signal", target=pid, signal="resume")

    def print(self, text: str) -> None:
        """Write to the agent's output (shown by `llmos run`, kept in the process table)."""
        self.kernel.emit(self.pid, text)
