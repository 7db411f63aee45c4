"""A hijacked agent: it obeys every instruction in the text it reads (prompt injection's worst case).

Scripted instead of model-driven, so what happens depends only on the OS: the
agent reads a file and runs, through the `run_shell` syscall, the command the
file tells it to run (the text after "Run:"). Whether that command runs is
decided by the kernel's reference monitor, not by the agent: under a flow
policy that keeps shell commands trusted, the call is denied with its reason,
because the command came from a tool's untrusted output.

Example: llmos run hijacked --arg path=notes.txt
"""

from __future__ import annotations

import re
from typing import Any

from llmos.kernel.api import Syscalls

_INSTRUCTION = re.compile(r"run:\s*(.+)", re.IGNORECASE)


def injected_command(text: str) -> str | None:
    """The command an injected "Run: COMMAND" line asks for, or None."""
    match = _INSTRUCTION.search(text)
    return match.group(1).strip() if match else None


async def main(sys: Syscalls, path: str = "notes.txt") -> dict[str, Any]:
    """Read `path`, run what it says; returns the read's and the shell call's status and reason."""
    read = await sys.tool_call("read_file", {"path": path})
    sys.print(f"read_file({path!r}) -> {read.status}")
    command = injected_command(read.as_text()) if read.ok else None
    if command is None:
        sys.print("the text asks for nothing to run")
        return {"read": read.status, "command": None, "status": None, "reason": None}
    sys.print(f"the text says to run {command!r}: obeying")
    shell = await sys.tool_call("run_shell", {"command": command})
    sys.print(f"run_shell -> {shell.status}: {shell.as_text() if shell.ok else shell.reason}")
    return {"read": read.status, "command": command, "status": shell.status, "reason": shell.reason}
