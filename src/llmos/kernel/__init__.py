"""The agent kernel: processes, the agent scheduler, syscalls, LLM backends."""

from llmos.kernel.api import ChatResult, Syscalls, ToolResult
from llmos.kernel.backend import Backend, EngineBackend, GenerationParams, OpenAIBackend
from llmos.kernel.kernel import Kernel, SyscallError, Terminated
from llmos.kernel.process import Process, ProcessState, Quotas
from llmos.kernel.sched import POLICIES, AgentScheduler, LengthPredictor, LLMCall, SchedulerSettings
from llmos.kernel.syscall import ToolExecutor, call_tool, checked
from llmos.kernel.table import ProcessTable

__all__ = [
    "Kernel", "Syscalls", "ChatResult", "ToolResult", "SyscallError", "Terminated", "Process", "ProcessState",
    "Quotas", "AgentScheduler", "SchedulerSettings", "LLMCall", "LengthPredictor", "POLICIES", "Backend",
    "EngineBackend", "OpenAIBackend", "GenerationParams", "ProcessTable", "ToolExecutor", "call_tool",
    "checked",
]
