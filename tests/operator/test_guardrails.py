import os
import time

import psutil
import pytest

from llmos.agents.operator.actions import (
    ACTION_SCHEMA,
    ActionError,
    KillAgent,
    KillProcess,
    NoAction,
    RemoveFiles,
    ReniceProcess,
    SetSetting,
    SuspendAgent,
    action_schema,
    parse_action,
)
from llmos.agents.operator.guardrails import ApprovalQueue, Grants, Guardrails, Limits


def _rails(tmp_path=None, **grants):
    return Guardrails(Grants(**grants), Limits())


def test_pid_0_and_1_are_never_targets():
    g = _rails(pids=frozenset({0, 1}))
    for pid in (0, 1):
        v = g.check(KillProcess(pid=pid), approved=True)
        assert (v.decision, v.reason) == (
            "deny", f"pid {pid} is never a target (init and the kernel's idle task)")
        assert g.check(ReniceProcess(pid=pid, nice=19)).decision == "deny"


def test_the_operator_and_its_ancestors_are_never_targets():
    me, parent = os.getpid(), os.getppid()
    g = _rails(pids=frozenset({me, parent}))
    assert g.check(KillProcess(pid=me), approved=True).reason == f"pid {me} is the operator itself"
    assert g.check(KillProcess(pid=parent), approved=True).reason == (
        f"pid {parent} is an ancestor of the operator")


def test_an_ungranted_process_is_refused_and_a_granted_one_allowed(spawn):
    granted, other = spawn(), spawn()
    g = _rails(pids=frozenset({granted.pid}))
    v = g.check(ReniceProcess(pid=other.pid, nice=5))
    assert (v.decision, v.reason) == (
        "deny", f"pid {other.pid} was not granted to the operator (or has exited)")
    assert g.check(ReniceProcess(pid=granted.pid, nice=5)).decision == "allow"


def test_children_of_a_granted_parent_are_granted_but_not_the_parent(spawn):
    child = spawn()
    g = _rails(children_of=frozenset({os.getpid()}))
    assert g.check(ReniceProcess(pid=child.pid, nice=3)).decision == "allow"
    assert g.check(ReniceProcess(pid=os.getpid(), nice=3)).decision == "deny"


def test_destructive_actions_wait_for_approval(spawn):
    p = spawn()
    g = _rails(pids=frozenset({p.pid}))
    v = g.check(KillProcess(pid=p.pid))
    assert (v.decision, v.reason) == (
        "needs_approval", "kill_process is destructive: waits for a human approval")
    assert g.check(KillProcess(pid=p.pid), approved=True).decision == "allow"
    assert g.check(ReniceProcess(pid=p.pid, nice=10)).decision == "allow"  # not destructive


def test_renice_may_not_raise_a_priority(spawn):
    p = spawn("import os, time; os.nice(10); time.sleep(60)")
    time.sleep(0.3)
    g = _rails(pids=frozenset({p.pid}))
    v = g.check(ReniceProcess(pid=p.pid, nice=0))
    assert v.decision == "deny"
    assert v.reason == f"renice may only lower a priority: pid {p.pid} is at nice 10, asked 0"


def test_blast_radius_of_a_process_tree(spawn):
    code = ("import subprocess, sys, time; ps = [subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']) for _ in range(3)]; time.sleep(60)")
    p = spawn(code)
    g = Guardrails(Grants(pids=frozenset({p.pid})), Limits(max_tree=2))
    deadline = time.monotonic() + 10
    while True:
        v = g.check(KillProcess(pid=p.pid), approved=True)
        if v.decision == "deny" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for child in psutil.Process(p.pid).children(recursive=True):
        child.kill()
    assert v.reason == f"blast radius: pid {p.pid} heads 4 processes (at most 2)"



def test_paths_outside_the_grant_are_refused(tmp_path):
    grant, outside = tmp_path / "scratch", tmp_path / "home"
    grant.mkdir()
    outside.mkdir()
    (outside / "precious").write_text("x")
    (grant / "junk").write_text("y" * 10)
    (grant / "escape").symlink_to(outside / "precious")
    g = Guardrails(Grants(paths=(grant,)), Limits())
    for path, reason in [
        (outside / "precious", f"path {outside / 'precious'} is not inside a granted directory"),
        (grant / ".." / "home" / "precious", None),
        (grant / "escape", f"path {grant / 'escape'} is not inside a granted directory"),
        (grant, f"path {grant} is not inside a granted directory"),
        ("/etc/passwd", "path /etc/passwd is not inside a granted directory"),
    ]:
        v = g.check(RemoveFiles(path=str(path)), approved=True)
        assert v.decision == "deny"
        if reason:
            assert v.reason == reason
    assert g.check(RemoveFiles(path=str(grant / "junk")), approved=True).decision == "allow"
    assert g.check(RemoveFiles(path=str(grant / "junk"))).decision == "needs_approval"
    missing = g.check(RemoveFiles(path=str(grant / "nothing")), approved=True)
    assert missing.reason == f"path {grant / 'nothing'} does not exist"


def test_blast_radius_of_a_removal(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(5):
        (tmp_path / "d" / str(i)).write_bytes(b"x" * 100)
    g = Guardrails(Grants(paths=(tmp_path,)), Limits(max_files=4))
    assert g.check(RemoveFiles(path=str(tmp_path / "d")), approved=True).reason == (
        f"blast radius: {tmp_path / 'd'} holds 5 files, 500 bytes (at most 4 files, {2 * 2**30} bytes)")


def test_rate_limit_per_kind(spawn):
    p = spawn()
    g = Guardrails(Grants(pids=frozenset({p.pid})), Limits(rate=(2, 60.0)))
    action = ReniceProcess(pid=p.pid, nice=1)
    g.executed(action, now=100.0)
    g.executed(action, now=110.0)
    v = g.check(action, now=120.0)
    assert (v.decision, v.reason) == (
        "deny", "rate limit: 2 renice_process actions in the last 60s (at most 2)")
    assert g.check(action, now=165.0).decision == "allow"  # the first one left the window
    assert g.check(SetSetting(name="policy", value="rr"), now=120.0).decision == "allow"  # other kinds


def test_settings_are_checked_against_grants_ranges_and_step():
    current = {"policy": "fifo", "kv_blocks": 100, "max_running": 8}
    g = Guardrails(Grants(settings=frozenset({"policy", "kv_blocks"})), Limits(), settings=lambda: current)
    assert g.check(SetSetting(name="policy", value="rr")).decision == "allow"
    assert g.check(SetSetting(name="policy", value="lottery")).reason == (
        "policy must be one of fifo, rr, priority, fair, sjf, got 'lottery'")
    assert g.check(SetSetting(name="max_running", value=4)).reason == (
        "setting 'max_running' was not granted to the operator")
    assert g.check(SetSetting(name="kv_blocks", value="many")).reason == (
        "kv_blocks must be an integer, got 'many'")
    assert g.check(SetSetting(name="kv_blocks", value=0)).reason == (
        "kv_blocks must be in [1, 16777216], got 0")
    assert g.check(SetSetting(name="kv_blocks", value=400)).decision == "allow"
    assert g.check(SetSetting(name="kv_blocks", value=10)).reason == (
        "blast radius: kv_blocks 100 -> 10 moves it 10.0x (at most 4x per action)")


def test_agents_only_when_granted_and_never_itself():
    g = Guardrails(Grants(agents=frozenset({3}), self_agent=2), Limits())
    assert g.check(SuspendAgent(pid=3)).decision == "allow"
    assert g.check(SuspendAgent(pid=4)).reason == "agent 4 was not granted to the operator"
    assert g.check(KillAgent(pid=3)).decision == "needs_approval"
    every = Guardrails(Grants(agents=None, self_agent=2), Limits())
    assert every.check(SuspendAgent(pid=9)).decision == "allow"
    assert every.check(SuspendAgent(pid=2)).reason == "agent 2 is the operator itself"


def test_kinds_not_allowlisted_and_dry_run(spawn):
    p = spawn()
    g = Guardrails(Grants(pids=frozenset({p.pid})), Limits(kinds=frozenset({"renice_process", "none"})))
    assert g.check(KillProcess(pid=p.pid), approved=True).reason == (
        "action kind 'kill_process' is not allowlisted")
    dry = Guardrails(Grants(pids=frozenset({p.pid})), Limits(), dry_run=True)
    assert dry.check(ReniceProcess(pid=p.pid, nice=4)).decision == "dry_run"
    assert dry.check(ReniceProcess(pid=1, nice=4)).decision == "deny"  # refusals still come first
    assert dry.check(NoAction()).decision == "allow"


def test_approval_queue(tmp_path):
    q = ApprovalQueue(tmp_path / "approvals.db")
    a = q.submit(KillProcess(pid=1234, reason="hot"), {"cpu": 99})
    assert q.submit(KillProcess(pid=1234, reason="still hot")) == a  # same action, same request
    b = q.submit(RemoveFiles(path="/tmp/x"))
    assert [r["id"] for r in q.list()] == [a, b]
    assert q.list()[0]["action"] == {"reason": "hot", "kind": "kill_process", "pid": 1234}
    assert q.list()[0]["evidence"] == {"cpu": 99}
    assert q.decide(a)["status"] == "approved"
    assert q.decide(b, approve=False)["status"] == "rejected"
    with pytest.raises(ValueError, match=f"approval request {a} is already approved"):
        q.decide(a)
    with pytest.raises(ValueError, match="no approval request with id 99"):
        q.decide(99)
    taken = ApprovalQueue(tmp_path / "approvals.db").take_approved()  # another process' view
    assert taken == [(a, KillProcess(pid=1234, reason="hot"), {"cpu": 99})]
    assert q.take_approved() == []  # handed out once
    assert q.list() == []


def test_actions_parse_or_say_what_is_wrong():
    assert parse_action('{"kind": "renice_process", "pid": 5, "nice": 10, "reason": ""}') == ReniceProcess(
        pid=5, nice=10)
    with pytest.raises(ActionError, match="not a valid action: renice_process.nice: Input should be less"):
        parse_action({"kind": "renice_process", "pid": 5, "nice": 40})
    with pytest.raises(ActionError, match="not a valid action"):
        parse_action({"kind": "format_disk"})
    with pytest.raises(ActionError, match="unknown action kinds"):
        action_schema(kinds=("format_disk",))


def test_narrowed_schema_accepts_only_the_given_targets():
    jsonschema = pytest.importorskip("jsonschema")
    s = action_schema(kinds=("kill_process", "none"), pids=[42])
    jsonschema.validate({"kind": "kill_process", "pid": 42, "reason": "x"}, s)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"kind": "kill_process", "pid": 1, "reason": "x"}, s)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"kind": "remove_files", "path": "/", "reason": "x"}, s)
    jsonschema.validate({"kind": "set_setting", "name": "policy", "value": "rr", "reason": ""}, ACTION_SCHEMA)
