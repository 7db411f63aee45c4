"""Protection: capabilities, the reference monitor, audit, information-flow control, the sandbox.

Every tool syscall passes one deterministic `ReferenceMonitor` (a kernel's
default): the agent's capabilities (deny by default), then the flow policy on
the arguments' labels (never below the agent's context label unless it holds
`ifc.declassify`), then an append to the hash-chained audit log.
"""

from llmos.security.audit import AuditLog, default_audit_path
from llmos.security.capabilities import (
    Capabilities,
    Grant,
    PolicyError,
    default_capabilities,
    load_policy,
    parse_policy,
)
from llmos.security.ifc import CONTROL, USER, FlowPolicies, FlowRule, Label, Source, tool_source
from llmos.security.interpreter import Labeled, PlanError, PlanInterpreter, PolicyDenied
from llmos.security.monitor import ALLOW, DECLASSIFY, AllowAllMonitor, Decision, Monitor, ReferenceMonitor
from llmos.security.sandbox import SandboxLimits, SandboxResult, isolation, run_sandboxed

__all__ = [
    "ALLOW", "DECLASSIFY", "AllowAllMonitor", "AuditLog", "CONTROL", "Capabilities", "Decision",
    "FlowPolicies", "FlowRule",
    "Grant", "Label", "Labeled", "Monitor", "PlanError", "PlanInterpreter", "PolicyDenied", "PolicyError",
    "ReferenceMonitor", "SandboxLimits", "SandboxResult", "Source", "USER", "default_audit_path",
    "default_capabilities", "isolation", "load_policy", "parse_policy", "run_sandboxed", "tool_source",
]
