"""run_shell and run_python: sandboxed, bounded, results the agent can read."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos.security.sandbox import SandboxLimits
from llmos.tools.base import ToolContext, ToolError
from llmos.tools.python import python_tool
from llmos.tools.shell import shell_tool


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    return ToolContext(pid=1, agent="a", workdir=tmp_path / "work", home=tmp_path)


def test_shell(ctx):
    tool = shell_tool()
    assert tool.name == "run_shell" and tool.untrusted_output and tool.destructive
    out = tool.fn({"command": "echo hello > f.txt; cat f.txt; echo oops >&2; exit 2"}, ctx)
    assert out == "exit code 2\n--- stdout ---\nhello\n--- stderr ---\noops"
    assert (ctx.workdir / "f.txt").read_text() == "hello\n"


def test_python(ctx):
    tool = python_tool()
    assert tool.name == "run_python"
    out = tool.fn({"code": "import sys\nprint(sum(range(10)))\nopen('p.txt', 'w').write('x')"}, ctx)
    assert out == "exit code 0\n--- stdout ---\n45"
    assert (ctx.workdir / "p.txt").read_text() == "x"
    out = tool.fn({"code": "raise SystemExit('bad')"}, ctx)
    assert out == "exit code 1\n--- stderr ---\nbad"


def test_timeouts(ctx):
    tool = shell_tool(SandboxLimits(wall_s=5))
    out = tool.fn({"command": "sleep 10", "timeout_s": 0.3}, ctx)
    assert out.startswith("exit code 137\n[killed after the wall-clock limit of 0.3 s]")
    with pytest.raises(ToolError, match=r"'timeout_s' must be a number in \(0, 5\]"):
        tool.fn({"command": "true", "timeout_s": 60}, ctx)


def test_bad_arguments(ctx):
    with pytest.raises(ToolError, match="'command' must be a non-empty string"):
        shell_tool().fn({"command": "  "}, ctx)
    with pytest.raises(ToolError, match="'code' must be a non-empty string"):
        python_tool().fn({}, ctx)
