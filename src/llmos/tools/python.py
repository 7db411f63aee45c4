"""The run_python tool: Python code in the sandbox (standard library only, no network).

The code runs on the base interpreter (not llmos' virtual environment) as an
unprivileged process; its output is untrusted for information-flow control.
"""

from __future__ import annotations

from llmos.security.sandbox import SandboxLimits, sandbox_python
from llmos.tools.base import Tool
from llmos.tools.shell import sandboxed_tool

MAX_CODE_CHARS = 200_000


def python_tool(limits: SandboxLimits | None = None) -> Tool:
    return sandboxed_tool(
        "run_python", "Run Python 3 code in a sandbox (standard library only, no network); print what you "
        "need. Your working directory is the current directory and the only writable place.",
        "code", " of Python", MAX_CODE_CHARS, lambda code: ([sandbox_python(), "-I", "-"], code), limits)
