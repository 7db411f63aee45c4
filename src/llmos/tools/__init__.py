"""Built-in tools: the system calls an agent can make beyond the LLM."""

from llmos.tools.base import Tool, ToolContext, ToolError, ToolRegistry
from llmos.tools.calculator import calculator_tool
from llmos.tools.files import file_tools


def builtin_tools() -> ToolRegistry:
    """A registry with every built-in tool (the kernel of `llmos run` gets this)."""
    registry = ToolRegistry()
    registry.register(calculator_tool(), *file_tools())
    return registry


__all__ = ["Tool", "ToolContext", "ToolError", "ToolRegistry", "builtin_tools", "calculator_tool",
           "file_tools"]
