"""The operator as an agent process: `llmos run operator` runs it on the kernel.

Its LLM calls are syscalls (`sys.llm_chat`, scheduled like any agent's, under
the action schema); its llmos-side reads and actions are the privileged
syscalls `kernel_stats`, `configure` and `signal`, which the reference monitor
allows only with the capabilities below; the guardrails never let it act on
itself.
"""

from __future__ import annotations

from typing import Any

from llmos.agents.operator.detect import Detector
from llmos.agents.operator.guardrails import ApprovalQueue, Grants, Guardrails, Limits
from llmos.agents.operator.observe import Observer
from llmos.agents.operator.operator import Actuator, Operator, default_approvals_path
from llmos.agents.operator.policy import FallbackPolicy
from llmos.agents.operator.propose import LLMProposer, syscalls_chat

# What `llmos run operator` grants it beyond an ordinary agent's capabilities.
CAPABILITIES = [{"tool": "kernel.stats"}, {"tool": "kernel.configure"}, {"tool": "kernel.signal"}]


def _audit_log() -> Any:
    from llmos.security.audit import AuditLog

    return AuditLog()


async def main(sys: Any, dry_run: bool = False, duration_s: float = 60.0, interval_s: float = 1.0,
               use_model: bool = True, pids: list[int] | None = None, scratch: list[str] | None = None,
               token_budget: int | None = None) -> str:
    """Keep the kernel's agents and engine healthy for `duration_s` seconds; returns what it did."""
    # Everything on the kernel side is a privileged syscall the reference monitor checks.
    grants = Grants(pids=frozenset(pids or ()), paths=tuple(scratch or ()), agents=None, self_agent=sys.pid)
    rails = Guardrails(grants, Limits(), dry_run=dry_run, settings=sys.settings)
    proposer = (LLMProposer(syscalls_chat(sys), settings=sys.settings) if use_model
                else FallbackPolicy(sys.settings))
    observer = Observer(pids=pids or (), scratch=scratch or (), llmos_state=sys.kernel_stats,
                        agent_budget={"llm_tokens": token_budget} if token_budget else None)
    op = Operator(observer, proposer, rails, detector=Detector(), actuator=Actuator(sys),
                  audit=_audit_log(), approvals=ApprovalQueue(default_approvals_path()),
                  on_event=lambda e: sys.print(f"{e.step} {e.subject} {e.action or ''} {e.detail}".strip()))
    await op.run(duration_s=duration_s, interval_s=interval_s)
    acted = sum(e.step == "acted" for e in op.events)
    return f"{len(op.events)} events, {acted} actions"
