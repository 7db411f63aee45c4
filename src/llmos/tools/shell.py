"""The run_shell tool: a shell command in the sandbox, with the agent's workdir as its only writable place.

What the command prints may carry the contents of files anyone could have
written, so the result is untrusted for information-flow control.
"""

from __future__ import annotations

from collections.abc import Callable
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


def sandboxed_tool(name: str, description: str, field: str, what: str, max_chars: int,
                   command: Callable[[str], tuple[list[str], str | None]],
                   limits: SandboxLimits | None = None) -> Tool:
    """A tool that runs one string argument (`field`) in the sandbox: `command` turns it into
    (argv, stdin). Its output is untrusted; it may write to the workdir, so it is destructive."""
    limits = limits or SandboxLimits()

    def run(args: dict[str, Any], ctx: ToolContext) -> str:
        value = args.get(field)
        if not isinstance(value, str) or not value.strip():
            raise ToolError(f"'{field}' must be a non-empty string{what}")
        if len(value) > max_chars:
            raise ToolError(f"'{field}' is {len(value)} characters; the limit is {max_chars}")
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        argv, stdin = command(value)
        return format_result(run_sandboxed(argv, ctx.workdir, timeout_arg(args, limits), stdin=stdin))

    return Tool(name, description,
                {"type": "object", "properties": {
                    field: {"type": "string"},
                    "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": limits.wall_s}},
                 "required": [field], "additionalProperties": False},
                run, untrusted_output=True, destructive=True)


def shell_tool(limits: SandboxLimits | None = None) -> Tool:
    return sandboxed_tool(
        "run_shell", "Run a shell command (/bin/sh) in a sandbox: your working directory is the current "
        "directory and the only writable place; there is no network.",
        "command", "", MAX_COMMAND_CHARS, lambda command: (["/bin/sh", "-c", command], None), limits)
