"""Built-in tools: the system calls an agent can make beyond the LLM."""

from llmos.tools.base import Tool, ToolContext, ToolError, ToolRegistry
from llmos.tools.calculator import calculator_tool
from llmos.tools.files import file_tools
from llmos.tools.memory import memory_tools
from llmos.tools.python import python_tool
from llmos.tools.shell import shell_tool


def builtin_tools() -> ToolRegistry:
    """A registry with every built-in tool (the kernel of `llmos run` gets this).

    The memory functions' embedding model loads on first use, not here.
    """
    registry = ToolRegistry()
    registry.register(calculator_tool(), *file_tools(), shell_tool(), python_tool(), *memory_tools())
    return registry


__all__ = ["Tool", "ToolContext", "ToolError", "ToolRegistry", "builtin_tools", "calculator_tool",
           "file_tools", "memory_tools", "python_tool", "shell_tool"]
