"""The run_python tool: Python code in the sandbox (standard library only, no network).

The code runs on the base interpreter (not llmos' virtual environment) as an
unprivileged process; its output is untrusted for information-flow control.
"""

from __future__ import annotations

from typing import Any

from llmos.security.sandbox import SandboxLimits, run_sandboxed, sandbox_python
from llmos.tools.base import Tool, ToolContext, ToolError
from llmos.tools.shell import format_result, timeout_arg

MAX_CODE_CHARS = 200_000


def python_tool(limits: SandboxLimits | None = None) -> Tool:
    limits = limits or SandboxLimits()

    def run(args: dict[str, Any], ctx: ToolContext) -> str:
        code = args.get("code")
        if not isinstance(code, str) or not code.strip():
            raise ToolError("'code' must be a non-empty string of Python")
        if len(code) > MAX_CODE_CHARS:
            raise ToolError(f"'code' is {len(code)} characters; the limit is {MAX_CODE_CHARS}")
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        r = run_sandboxed([sandbox_python(), "-I", "-"], ctx.workdir, timeout_arg(args, limits), stdin=code)
        return format_result(r)

    return Tool("run_python",
                "Run Python 3 code in a sandbox (standard library only, no network); print what you need. "
                "Your working directory is the current directory and the only writable place.",
                {"type": "object", "properties": {
                    "code": {"type": "string"},
                    "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": limits.wall_s}},
                 "required": ["code"], "additionalProperties": False},
                run, untrusted_output=True, destructive=True)
