"""The run_shell tool: a shell command in the sandbox, with the agent's workdir as its only writable place.

What the command prints may carry the contents of files anyone could have
written, so the result is untrusted for information-flow control.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from llmos.security.sandbox import SandboxLimits, SandboxResult, run_sandboxed
from llmos.tools.base import Tool, ToolContext, ToolError

MAX_COMMAND_CHARS = 100_000


def format_result(r: SandboxResult) -> str:
    """The text an agent reads: exit code, notes (timeouts, truncation), then stdout and stderr."""
    head = f"exit code {r.exit_code}" + "".join(f"\n[{n}]" for n in r.notes)
    parts = [head]
    if r.stdout:
        parts.append("--- stdout ---\n" + r.stdout.rstrip("\n"))
    if r.stderr:
        parts.append("--- stderr ---\n" + r.stderr.rstrip("\n"))
    return "\n".join(parts)


def timeout_arg(args: dict[str, Any], limits: SandboxLimits) -> SandboxLimits:
    """The limits for one call: an agent may ask for a shorter wall-clock timeout, never a longer one."""
    t = args.get("timeout_s")
    if t is None:
        return limits
    if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= limits.wall_s:
        raise ToolError(f"'timeout_s' must be a number in (0, {limits.wall_s:g}], got {t!r}")
    return replace(limits, wall_s=float(t))


def shell_tool(limits: SandboxLimits | None = None) -> Tool:
    limits = limits or SandboxLimits()

    def run(args: dict[str, Any], ctx: ToolContext) -> str:
        command = args.get("command")
        if not isinstance(command, str) or not command.strip():
            raise ToolError("'command' must be a non-empty string")
        if len(command) > MAX_COMMAND_CHARS:
            raise ToolError(f"'command' is {len(command)} characters; the limit is {MAX_COMMAND_CHARS}")
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        r = run_sandboxed(["/bin/sh", "-c", command], ctx.workdir, timeout_arg(args, limits))
        return format_result(r)

    return Tool("run_shell",
                "Run a shell command (/bin/sh) in a sandbox: your working directory is the current directory "
                "and the only writable place; there is no network.",
                {"type": "object", "properties": {
                    "command": {"type": "string"},
                    "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": limits.wall_s}},
                 "required": ["command"], "additionalProperties": False},
                run, untrusted_output=True, destructive=True)
