"""The reference monitor's interface: every tool syscall is checked, then recorded.

The kernel calls `check` before it runs a tool and `record` after; a denial
is a value (the agent reads the reason as the tool's result), never an
exception. `AllowAllMonitor` is the permissive monitor a kernel gets when it
is given none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


ALLOW = Decision(True, "allowed")


class Monitor(Protocol):
    def check(self, agent: Any, tool: str, args: Mapping[str, Any],
              labels: Mapping[str, Any] | None = None) -> Decision:
        """May `agent` (has .pid, .name, .capabilities) call `tool` with `args`?"""

    def record(self, agent: Any, tool: str, args: Mapping[str, Any], decision: Decision,
               status: str) -> None:
        """Append the decision and the call's outcome ("ok", "error", "denied", ...)."""

    def attenuate(self, parent: Any, requested: Any) -> Any:
        """The capabilities a child of `parent` gets when it asks for `requested`.

        Raises PermissionError if `requested` is not a subset of what the parent holds.
        """


class AllowAllMonitor:
    """Allows every call; the kernel's syscall log still records each one."""

    def check(self, agent: Any, tool: str, args: Mapping[str, Any],
              labels: Mapping[str, Any] | None = None) -> Decision:
        return ALLOW

    def record(self, agent: Any, tool: str, args: Mapping[str, Any], decision: Decision,
               status: str) -> None:
        pass

    def attenuate(self, parent: Any, requested: Any) -> Any:
        return requested
