"""The operator agent: an LLM (or a deterministic policy) keeping the system healthy under guardrails.

observe -> detect -> propose -> guard -> act (syscalls, checked by the reference monitor) -> verify ->
roll back; see operator.py.
"""

from llmos.agents.operator.actions import ACTION_SCHEMA, ActionError, action_schema, parse_action
from llmos.agents.operator.agent import host_kernel, main, operator_process  # `llmos run operator`
from llmos.agents.operator.detect import Detector, Finding, Rule, default_rules
from llmos.agents.operator.guardrails import ApprovalQueue, Grants, Guardrails, Limits, Verdict
from llmos.agents.operator.observe import Observation, Observer
from llmos.agents.operator.operator import Actuator, Event, Operator
from llmos.agents.operator.policy import FallbackPolicy
from llmos.agents.operator.propose import LLMProposer, engine_chat, syscalls_chat

__all__ = [
    "ACTION_SCHEMA", "ActionError", "action_schema", "parse_action", "Detector", "Finding", "Rule",
    "default_rules", "ApprovalQueue", "Grants", "Guardrails", "Limits", "Verdict", "Observation", "Observer",
    "Actuator", "Event", "Operator", "FallbackPolicy", "LLMProposer", "engine_chat", "syscalls_chat", "main",
    "host_kernel", "operator_process",
]
