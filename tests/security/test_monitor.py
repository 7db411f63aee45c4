"""The reference monitor: capabilities, then flow policy, then audit; labels from the agent's context."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmos.security.audit import AuditLog
from llmos.security.capabilities import Capabilities
from llmos.security.ifc import CONTROL, USER, FlowPolicies, Label, Source, tool_source
from llmos.security.monitor import Decision, ReferenceMonitor
from llmos.tools.base import ToolRegistry
from llmos.tools.files import file_tools


@dataclass
class Proc:
    pid: int
    name: str
    workdir: Path
    capabilities: Any = None
    parent: Any = None


EMAIL = Label.of(tool_source("read_inbox", False))


def test_labels_join_and_coerce():
    both = USER.join(EMAIL)
    assert USER.trusted and not EMAIL.trusted and not both.trusted
    assert both.untrusted_sources() == ["tool:read_inbox"]
    assert Label().trusted and Label().join() == Label()
    assert Label.coerce(both.to_json()) == both
    assert Label.coerce(["user", "!tool:web"]) == Label.of(Source("user", True), Source("tool:web", False))
    assert Label.coerce({"trusted": False}).untrusted_sources() == ["unknown"]
    with pytest.raises(TypeError, match="cannot read a label from int"):
        Label.coerce(3)


def test_flow_rules():
    flows = FlowPolicies().add("send_email", "recipients", trusted_values={"recipients": ["Bob@corp.org"]},
                               why="recipients must come from the user")
    flows.add("send_money", "*", trusted_control=True)
    args = {"recipients": ["eve@evil.com"], "body": "hi"}
    assert flows.check("send_email", args, {"recipients": USER, "body": EMAIL}) is None
    why = flows.check("send_email", args, {"recipients": EMAIL})
    assert why == ("argument 'recipients' depends on untrusted data from tool:read_inbox "
                   "(recipients must come from the user)")
    assert flows.check("send_email", {"recipients": ["bob@corp.org"]}, {"recipients": EMAIL}) is None
    why = flows.check("send_money", {"iban": "X", "amount": 1}, {"amount": EMAIL})
    assert why.startswith("argument 'amount'")
    why = flows.check("send_money", {"iban": "X"}, {CONTROL: EMAIL})
    assert why == "calling send_money was decided by untrusted data from tool:read_inbox"
    assert flows.check("read_file", {"path": "x"}, {"path": EMAIL}) is None


def test_monitor_capabilities_flows_and_audit(tmp_path: Path):
    audit = AuditLog(tmp_path / "audit.db")
    flows = FlowPolicies().add("send_email", "to")
    mon = ReferenceMonitor(audit=audit, flows=flows)
    p = Proc(1, "mailer", tmp_path, Capabilities.of([{"tool": "send_email", "allow": {"to": ["*@corp.org"]},
                                                      "quota": 1}]))
    assert mon.check(p, "read_file", {"path": "x"}) == \
        Decision(False, "denied by capabilities: no capability for tool 'read_file'")
    d = mon.check(p, "send_email", {"to": "bob@corp.org"}, {"to": EMAIL})
    assert not d.allowed and d.reason.startswith("denied by flow policy: argument 'to' depends on untrusted")
    d = mon.check(p, "send_email", {"to": "bob@corp.org"}, {"to": USER})
    assert d.allowed  # the flow-denied call did not use up the quota
    mon.record(p, "send_email", {"to": "bob@corp.org"}, d, "ok")
    assert not mon.check(p, "send_email", {"to": "bob@corp.org"}, {"to": USER}).allowed
    rows = audit.tail(10)
    assert [(r["tool"], r["decision"]) for r in rows] == [
        ("read_file", "deny"), ("send_email", "deny"), ("send_email", "allow"), ("send_email", "done"),
        ("send_email", "deny")]
    assert rows[2]["labels"] == {"to": {"sources": ["user"], "trusted": True, "untrusted": []}}
    assert rows[3]["reason"] == "ok" and rows[0]["agent"] == "mailer" and rows[0]["evidence"] == {"pid": 1}
    assert audit.verify()[0]


def test_default_capabilities_and_context_taint(tmp_path: Path):
    reg = ToolRegistry()
    reg.register(*file_tools())
    mon = ReferenceMonitor(tools=reg, flows=FlowPolicies().add("write_file", "content"))
    p = Proc(7, "agent", tmp_path)
    d = mon.check(p, "write_file", {"path": "a.txt", "content": "x"})
    assert d.allowed and isinstance(p.capabilities, Capabilities)
    assert not mon.check(p, "write_file", {"path": "/etc/passwd", "content": "x"}).allowed
    mon.record(p, "write_file", {"path": "a.txt", "content": "x"}, d, "ok")
    assert mon.context_label(p).trusted
    d = mon.check(p, "read_file", {"path": "a.txt"})
    mon.record(p, "read_file", {"path": "a.txt"}, d, "ok")
    assert mon.context_label(p).untrusted_sources() == ["tool:read_file"]
    d = mon.check(p, "write_file", {"path": "b.txt", "content": "y"})
    assert not d.allowed and "untrusted data from tool:read_file" in d.reason
    # labels the agent passes are joined with its context's: they cannot launder what it has read
    d = mon.check(p, "write_file", {"path": "b.txt", "content": "y"}, {"content": USER})
    assert not d.allowed and "untrusted data from tool:read_file" in d.reason
    mon.forget(p)
    assert mon.context_label(p).trusted


def test_attenuate(tmp_path: Path):
    audit = AuditLog(tmp_path / "audit.db")
    mon = ReferenceMonitor(audit=audit)
    parent = Proc(1, "parent", tmp_path)
    child_caps = mon.attenuate(parent, ["calculator"])
    assert child_caps.tools() == ["calculator"]
    with pytest.raises(PermissionError, match="cannot grant 'send_money'"):
        mon.attenuate(parent, [{"tool": "send_money"}])
    assert [r["decision"] for r in audit.tail(5)] == ["allow", "deny"]
