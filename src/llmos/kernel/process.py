"""The process control block: everything the kernel knows about one agent.

An agent moves through the states of a classic process: new, ready (its LLM
call waits for a slot), running, waiting (for a tool), blocked (sleeping or
waiting for another agent), suspended, and terminated, which is final and
always carries an exit reason.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ProcessState(enum.StrEnum):
    NEW = "new"
    READY = "ready"
    RUNNING = "running"
    WAITING = "waiting"
    BLOCKED = "blocked"
    SUSPENDED = "suspended"
    TERMINATED = "terminated"


@dataclass
class Quotas:
    """Limits on what an agent may consume; None is unlimited."""

    llm_tokens: int | None = None  # prompt + generated tokens over all its LLM calls
    tool_calls: int | None = None
    wall_time_s: float | None = None

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    math.isfinite(value) if isinstance(value, float) else value.bit_length() < 64):
                raise ValueError(f"quota {name} must be a finite number within 64 bits, got {value!r:.40}")
            if value <= 0:
                raise ValueError(f"quota {name} must be positive, got {value}")


@dataclass
class ProgramStats:
    """A process seen as a program of LLM calls with tool calls between them: its prompt tokens found
    in KV already (prefix hits, retained or swapped-in context) vs computed again, its time waiting
    for the engine (queued or running) vs in tools, and the KV retention decisions taken for it
    while it ran a tool (keep, swap, release)."""

    prompt_tokens_reused: int = 0
    prompt_tokens_computed: int = 0
    llm_s: float = 0.0
    tool_s: float = 0.0
    retention: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens_reused": self.prompt_tokens_reused,
                "prompt_tokens_computed": self.prompt_tokens_computed,
                "llm_s": round(self.llm_s, 3), "tool_s": round(self.tool_s, 3),
                "retention": dict(self.retention)}


@dataclass(eq=False)
class Process:
    pid: int
    name: str
    parent: int | None = None
    priority: int = 0  # lower runs first, as nice
    weight: float = 1.0  # fair-share weight
    quotas: Quotas = field(default_factory=Quotas)
    capabilities: Any = None  # the security layer's grants
    context: Any = None  # the memory layer's per-agent state
    workdir: Path | None = None
    owner: str = "local"  # the id of the user it runs for (kernel/users.py)
    state: ProcessState = ProcessState.NEW
    before_suspend: ProcessState | None = None
    created: float = field(default_factory=time.time)
    ended: float | None = None
    exit_reason: str | None = None
    result: Any = None
    tokens_used: int = 0
    tool_calls: int = 0
    syscalls: int = 0
    syscall_errors: int = 0
    current_syscall: str | None = None
    output: list[str] = field(default_factory=list)
    program: ProgramStats = field(default_factory=ProgramStats)
    task: asyncio.Task | None = field(default=None, repr=False)
    resumed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # clear while suspended
    dirty: bool = True  # changed since the process table last saw it

    def __post_init__(self) -> None:
        self.resumed.set()

    @property
    def alive(self) -> bool:
        return self.state is not ProcessState.TERMINATED

    def set_state(self, state: ProcessState) -> None:
        """Move to `state`; a suspended or terminated process stays so until the kernel says."""
        if self.state in (ProcessState.SUSPENDED, ProcessState.TERMINATED):
            return
        self.state = state
        self.dirty = True

    def over_quota(self) -> str | None:
        """Why the process is over a quota, or None."""
        q = self.quotas
        if q.llm_tokens is not None and self.tokens_used > q.llm_tokens:
            return f"quota exceeded: llm_tokens used {self.tokens_used} of {q.llm_tokens}"
        if q.tool_calls is not None and self.tool_calls > q.tool_calls:
            return f"quota exceeded: tool_calls used {self.tool_calls} of {q.tool_calls}"
        return None

    def info(self) -> dict[str, Any]:
        """The row `llmos ps` shows."""
        return {
            "pid": self.pid, "name": self.name, "owner": self.owner, "parent": self.parent,
            "state": self.state.value,
            "priority": self.priority, "weight": self.weight, "tokens_used": self.tokens_used,
            "tool_calls": self.tool_calls, "syscalls": self.syscalls, "syscall_errors": self.syscall_errors,
            "current_syscall": self.current_syscall, "created": self.created, "ended": self.ended,
            "exit_reason": self.exit_reason, "quotas": dict(self.quotas.__dict__),
            "program": self.program.as_dict(),
        }
