"""Tools are the system calls of llmos: each has a name, a JSON-schema
signature the model sees, and a function the kernel runs on the agent's behalf.

A tool never raises at the agent: a `ToolError` (bad arguments, a refused
path, a failed command) becomes an error result the agent reads, the way a
syscall returns -1 and sets errno.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ToolError(Exception):
    """A tool failed in a way the agent should be told about (its result, not a crash)."""


class ToolDenied(ToolError):
    """The call was refused after the monitor allowed it (a changed MCP tool definition, a human who
    said no): the result's status is "denied", not "error"."""


@dataclass
class ToolContext:
    """What a tool may know about its caller: who it is and where it may write."""

    pid: int
    agent: str  # the agent's name: persistent per-agent state is keyed by it
    workdir: Path  # the agent's private scratch directory
    home: Path  # the llmos home directory
    process: Any = None  # the kernel's process control block, for memory/security hooks


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    fn: Callable[[dict[str, Any], ToolContext], Any]
    untrusted_output: bool = False  # its result carries outside content (files, web, mail)
    destructive: bool = False
    timeout_s: float | None = None  # the kernel's bound on one call (None: the kernel's default)
    owner: str | None = None  # the user whose tool it is (an MCP server's); None: every user's

    def visible_to(self, user: str | None) -> bool:
        """Whether `user` may see this tool (None: an admin, who sees every tool)."""
        return self.owner is None or user is None or self.owner == user

    def spec(self) -> dict[str, Any]:
        """The OpenAI `tools` entry for this tool."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description,
                             "parameters": self.parameters}}


@dataclass
class ToolRegistry:
    tools: dict[str, Tool] = field(default_factory=dict)

    def register(self, *tools: Tool) -> None:
        for tool in tools:
            if tool.name in self.tools:
                raise ValueError(f"a tool named {tool.name!r} is already registered")
            self.tools[tool.name] = tool

    def get(self, name: str) -> Tool:
        try:
            return self.tools[name]
        except KeyError:
            known = ", ".join(sorted(self.tools)) or "none"
            raise ToolError(f"no tool named {name!r} (known tools: {known})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def specs(self, names: list[str] | None = None, user: str | None = None) -> list[dict[str, Any]]:
        """The specs of the tools (of `names`) that `user` may see (None: all of them)."""
        return [t.spec() for n, t in sorted(self.tools.items())
                if (names is None or n in names) and t.visible_to(user)]

    def visible(self, user: str | None) -> dict[str, Tool]:
        """The tools `user` may see, by name (None: all of them)."""
        return {n: t for n, t in self.tools.items() if t.visible_to(user)}
