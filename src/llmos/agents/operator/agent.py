"""The operator as an agent process: every action it takes is a syscall the reference monitor checks.

`llmos run operator` runs `main` on the kernel with `CAPABILITIES` (llmos
settings within bounds, suspending or killing other agents, reading the
kernel's state). `llmos operator`, the chaos benchmark and the tests run the
same loop on a kernel of their own (`host_kernel`) in a process spawned with
the grants the user gave (`operator_process`): host processes and scratch
directories are touched only through the host tools (tools/host.py), so
there is one monitor and one audit trail for the operator as for any agent.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from llmos.agents.operator.detect import Detector
from llmos.agents.operator.guardrails import ApprovalQueue, Grants, Guardrails, Limits
from llmos.agents.operator.observe import Observer
from llmos.agents.operator.operator import Actuator, Operator, default_approvals_path
from llmos.agents.operator.policy import FallbackPolicy
from llmos.agents.operator.propose import LLMProposer, syscalls_chat

# What `llmos run operator` grants it beyond an ordinary agent's capabilities: llmos settings within
# bounds, suspending or killing other agents, the kernel's state; host actions need grants given explicitly.
CAPABILITIES = Grants(agents=None).capabilities()


async def main(sys: Any, dry_run: bool = False, duration_s: float = 60.0, interval_s: float = 1.0,
               use_model: bool = True, pids: list[int] | None = None, scratch: list[str] | None = None,
               token_budget: int | None = None) -> str:
    """Keep the kernel's agents and engine healthy for `duration_s` seconds; returns what it did.

    `pids` and `scratch` are watched; acting on them needs host grants (a policy file for
    `host.kill_process`, `host.renice_process`, `host.remove_files`), else the monitor denies it.
    """
    grants = Grants(pids=frozenset(pids or ()), paths=tuple(Path(p) for p in scratch or ()), agents=None)
    proposer = (LLMProposer(syscalls_chat(sys), settings=sys.settings) if use_model
                else FallbackPolicy(sys.settings))
    observer = Observer(pids=pids or (), scratch=scratch or (), llmos_state=sys.kernel_stats,
                        agent_budget={"llm_tokens": token_budget} if token_budget else None)
    op = Operator(observer, proposer, Actuator(sys, grants), Guardrails(Limits(), dry_run=dry_run),
                  detector=Detector(), approvals=ApprovalQueue(default_approvals_path()),
                  on_event=lambda e: sys.print(f"{e.step} {e.subject} {e.action or ''} {e.detail}".strip()))
    await op.run(duration_s=duration_s, interval_s=interval_s)
    acted = sum(e.step == "acted" for e in op.events)
    return f"{len(op.events)} events, {acted} actions"


class NoModel:
    """A kernel backend with no LLM behind it: enough for the operator's deterministic policy."""

    context_window = 0

    def attach(self, sched: Any, on_switch: Any) -> None:
        pass

    def count_tokens(self, messages: list[dict[str, Any]]) -> int:
        return 0

    async def complete(self, call: Any, prompt: Any, params: Any, on_tokens: Any) -> Any:
        raise ValueError("this kernel has no model (run the operator with --model for LLM proposals)")

    async def run_in_scheduler(self, fn: Any) -> Any:
        return fn()

    async def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def host_kernel(home: Path | None = None, backend: Any = None, audit_path: Path | None = None) -> Any:
    """A kernel with the host tools behind the reference monitor, auditing to `audit_path`
    (default: the llmos home's audit log)."""
    from llmos.kernel import Kernel
    from llmos.security import AuditLog, ReferenceMonitor
    from llmos.tools import ToolRegistry
    from llmos.tools.host import host_tools

    tools = ToolRegistry()
    tools.register(*host_tools())
    monitor = ReferenceMonitor(audit=AuditLog(audit_path), tools=tools)
    return Kernel(backend if backend is not None else NoModel(), home=home, tools=tools, monitor=monitor)


async def operator_process(kernel: Any, grants: Grants, name: str = "operator") -> Any:
    """Spawn a process holding `grants.capabilities()` and nothing else, for an operator loop driven from
    outside its task; returns its syscall handle (kill the process to end it)."""
    handle: asyncio.Future = asyncio.get_running_loop().create_future()

    async def operator(sys: Any) -> None:
        handle.set_result(sys)
        await asyncio.Event().wait()

    await kernel.spawn(operator, name=name, capabilities=grants.capabilities())
    return await handle
