import asyncio
import os
import subprocess
import sys
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
from llmos.agents.operator.guardrails import ApprovalQueue, Grants, Guardrails, Limits, Verdict

DENIED = "denied: denied by capabilities: "


def _grants(**kw) -> Grants:
    return Grants(**kw)


def test_pid_0_and_1_are_never_targets_even_when_granted(host, audited):
    async def body(kernel, act):
        return [await act.execute(KillProcess(pid=pid), dry_run=True) for pid in (0, 1)] + \
            [await act.execute(ReniceProcess(pid=1, nice=19))]

    outcomes = host(_grants(pids=frozenset({0, 1})), body)
    assert [(o.ok, o.denied, o.detail) for o in outcomes] == [
        (False, False, "pid 0 is never a target (init and the kernel's idle task)"),
        (False, False, "pid 1 is never a target (init and the kernel's idle task)"),
        (False, False, "pid 1 is never a target (init and the kernel's idle task)")]
    assert [(t, d) for t, d, _ in audited()] == [
        ("host.kill_process", "allow"), ("host.kill_process", "done"), ("host.kill_process", "allow"),
        ("host.kill_process", "done"), ("host.renice_process", "allow"), ("host.renice_process", "done")]
    assert audited()[1][2] == "error"


def test_the_kernel_and_its_ancestors_are_never_targets_even_when_granted(host):
    me, parent = os.getpid(), os.getppid()

    async def body(kernel, act):
        return [(await act.execute(KillProcess(pid=p), dry_run=True)).detail for p in (me, parent)]

    assert host(_grants(pids=frozenset({me, parent})), body) == [
        f"pid {me} is the kernel itself", f"pid {parent} is an ancestor of the kernel"]


def test_an_ungranted_process_is_denied_by_the_monitor_and_audited(spawn, host, audited):
    granted, other = spawn(), spawn()

    async def body(kernel, act):
        return (await act.execute(ReniceProcess(pid=other.pid, nice=5)),
                await act.execute(ReniceProcess(pid=granted.pid, nice=5)))

    refused, done = host(_grants(pids=frozenset({granted.pid})), body)
    assert (refused.ok, refused.denied) == (False, True)
    assert refused.detail == f"{DENIED}pid={other.pid} is not in the allowlist ['{granted.pid}']"
    assert (done.ok, done.detail) == (True, "nice 0 -> 5")
    assert psutil.Process(granted.pid).nice() == 5 and psutil.Process(other.pid).nice() == 0
    assert audited() == [
        ("host.renice_process", "deny", refused.detail.removeprefix("denied: ")),
        ("host.renice_process", "allow", "granted by 'host.renice_process'"),
        ("host.renice_process", "done", "ok")]


def test_children_of_a_granted_parent_are_granted_but_not_the_parent(spawn, host):
    child = spawn()

    async def body(kernel, act):
        return (await act.execute(ReniceProcess(pid=child.pid, nice=3)),
                await act.execute(ReniceProcess(pid=os.getpid(), nice=3)))

    ok, parent = host(_grants(children_of=frozenset({os.getpid()})), body)
    assert ok.ok and parent.denied
    assert parent.detail == f"{DENIED}argument 'within' is required by the grant's allowlist"


def test_a_forged_ancestor_does_not_reach_an_unrelated_process(spawn, tmp_path):
    """An operator that calls the tool itself and names a granted parent it does not descend from."""
    from llmos.agents.operator import host_kernel, operator_process

    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    sleeper = spawn()

    async def go():
        kernel = host_kernel(home=tmp_path / "home", audit_path=tmp_path / "audit.db")
        try:
            handle = await operator_process(kernel, _grants(children_of=frozenset({sleeper.pid})))
            return await handle.tool_call("host.kill_process", {"pid": victim.pid, "within": sleeper.pid,
                                                                "max_tree": 1})
        finally:
            await kernel.shutdown()

    try:
        result = asyncio.run(go())
        assert not result.ok and result.error == f"pid {victim.pid} is not a descendant of pid {sleeper.pid}"
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_renice_may_not_raise_a_priority(spawn, host):
    p = spawn("import os, time; os.nice(10); time.sleep(60)")
    time.sleep(0.3)

    async def body(kernel, act):
        return await act.execute(ReniceProcess(pid=p.pid, nice=0))

    outcome = host(_grants(pids=frozenset({p.pid})), body)
    assert (outcome.ok, outcome.denied) == (False, False)
    assert outcome.detail == f"renice may only lower a priority: pid {p.pid} is at nice 10, asked 0"


def test_blast_radius_of_a_process_tree(spawn, host):
    code = ("import subprocess, sys, time; ps = [subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']) for _ in range(3)]; time.sleep(60)")
    p = spawn(code)
    deadline = time.monotonic() + 10
    while len(psutil.Process(p.pid).children(recursive=True)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)

    async def body(kernel, act):
        wide = await act.sys.tool_call("host.kill_process", {"pid": p.pid, "max_tree": 9})
        return wide, await act.execute(KillProcess(pid=p.pid))

    try:
        wide, outcome = host(_grants(pids=frozenset({p.pid}), max_tree=2), body)
        assert wide.error == f"{DENIED}max_tree=9 is outside the granted bounds [1.0, 2.0]"
        assert outcome.detail == f"blast radius: pid {p.pid} heads 4 processes (at most 2)"
        assert p.poll() is None
    finally:
        for child in psutil.Process(p.pid).children(recursive=True):
            child.kill()


def test_paths_outside_the_grant_are_refused(tmp_path, host, audited):
    grant, outside = tmp_path / "scratch", tmp_path / "home2"
    grant.mkdir()
    outside.mkdir()
    (outside / "precious").write_text("x")
    (outside / "dir").mkdir()
    (outside / "dir" / "precious").write_text("x")
    (grant / "junk").write_text("y" * 10)
    (grant / "escape").symlink_to(outside / "precious")
    (grant / "linkdir").symlink_to(outside / "dir")
    denied = [outside / "precious", grant / ".." / "home2" / "precious", grant, "/etc/passwd"]

    async def body(kernel, act):
        out = [await act.execute(RemoveFiles(path=str(p))) for p in denied]
        out.append(await act.execute(RemoveFiles(path=str(grant / "linkdir" / "precious"))))
        out.append(await act.execute(RemoveFiles(path=str(grant / "escape"))))
        out.append(await act.execute(RemoveFiles(path=str(grant / "nothing"))))
        out.append(await act.execute(RemoveFiles(path=str(grant / "junk"))))
        return out

    *refused, via_link, link, missing, junk = host(_grants(paths=(grant,)), body)
    assert [o.denied for o in refused] == [True] * 4
    assert refused[0].detail == (f"{DENIED}path path='{outside / 'precious'}' is outside the granted paths "
                                 f"['**'] under {grant}")
    assert via_link.detail == (f"path {grant / 'linkdir' / 'precious'}: 'linkdir' is a symlink or not a "
                               "directory")
    link_size = len(str(outside / "precious"))
    assert link.ok and link.detail == f"removed {grant / 'escape'} (1 files, {link_size} bytes)"
    assert (outside / "precious").read_text() == "x" and (outside / "dir" / "precious").exists()
    assert missing.detail == f"path {grant / 'nothing'} does not exist"
    assert junk.ok and sorted(p.name for p in grant.iterdir()) == ["linkdir"]
    assert [d for _, d, _ in audited()].count("deny") == 4


def test_blast_radius_of_a_removal(tmp_path, host):
    (tmp_path / "d").mkdir()
    for i in range(5):
        (tmp_path / "d" / str(i)).write_bytes(b"x" * 100)

    async def body(kernel, act):
        return await act.execute(RemoveFiles(path=str(tmp_path / "d")))

    outcome = host(_grants(paths=(tmp_path,), max_files=4), body)
    assert outcome.detail == (f"blast radius: {tmp_path / 'd'} holds 5+ files, 500 bytes "
                              f"(at most 4 files, {2 * 2**30} bytes)")
    assert len(list((tmp_path / "d").iterdir())) == 5


def test_rate_limit_per_kind():
    g = Guardrails(Limits(rate=(2, 60.0)))
    action = ReniceProcess(pid=1234, nice=1)
    g.executed(action, now=100.0)
    g.executed(action, now=110.0)
    v = g.check(action, now=120.0)
    assert (v.decision, v.reason) == (
        "deny", "rate limit: 2 renice_process actions in the last 60s (at most 2)")
    assert g.check(action, now=165.0).decision == "allow"  # the first one left the window
    assert g.check(SetSetting(name="policy", value="rr"), now=120.0).decision == "allow"  # other kinds


def test_settings_are_granted_with_allowlists_and_bounds(host, audited):
    grants = _grants(settings={"policy": ("fifo", "rr"), "quantum": (8, 64)})

    async def body(kernel, act):
        out = [await act.execute(SetSetting(name="policy", value=v)) for v in ("rr", "fair")]
        out += [await act.execute(SetSetting(name="quantum", value=v)) for v in (32, 4096)]
        out.append(await act.execute(SetSetting(name="max_running", value=4)))
        return out, kernel.settings()

    (rr, fair, q32, q4096, running), settings = host(grants, body)
    assert rr.ok and rr.undo == {"policy": "fifo"} and q32.ok and q32.undo == {"quantum": 16}
    assert (settings["policy"], settings["quantum"], settings["max_running"]) == ("rr", 32, 8)
    assert all(o.denied for o in (fair, q4096, running))
    assert "policy='fair' is not in the allowlist ['fifo', 'rr']" in fair.detail
    assert "quantum=4096 is outside the granted bounds [8.0, 64.0]" in q4096.detail
    assert "argument 'quantum' must be a number" in running.detail  # no grant names max_running
    assert [d for t, d, _ in audited() if t == "kernel.configure"] == [
        "allow", "done", "deny", "allow", "done", "deny", "deny"]


def test_agents_only_when_granted_and_never_itself(host):
    async def idle(sys):
        await sys.sleep(60)

    async def body(kernel, act):
        granted = await kernel.spawn(idle, name="granted")
        other = await kernel.spawn(idle, name="other")
        assert (act.sys.pid, granted, other) == (1, 2, 3)
        return (await act.execute(SuspendAgent(pid=granted)), await act.execute(SuspendAgent(pid=other)),
                kernel.process(granted).state.value, kernel.process(other).state.value)

    # a fresh home hands out pids from 1 (the operator process): agent 2 is granted up front
    ok, refused, state, other_state = host(_grants(agents=frozenset({2})), body)
    assert ok.ok and state == "suspended" and other_state != "suspended"
    assert refused.denied and "target=3 is not in the allowlist ['2']" in refused.detail

    async def itself(kernel, act):
        return await act.execute(KillAgent(pid=act.sys.pid))

    outcome = host(_grants(agents=None), itself)
    assert not outcome.ok and outcome.detail == "an agent cannot signal itself"


def test_no_grant_no_action_and_dry_run_reports_refusals_first(spawn, host):
    p = spawn()

    async def body(kernel, act):
        return (await act.execute(KillProcess(pid=p.pid), dry_run=True),
                await act.execute(RemoveFiles(path="/tmp/x"), dry_run=True))

    kill, remove = host(_grants(), body)
    assert kill.denied and kill.detail == f"{DENIED}no capability for tool 'host.kill_process'"
    assert remove.denied and remove.detail == f"{DENIED}no capability for tool 'host.remove_files'"
    assert p.poll() is None
    dry = Guardrails(Limits(), dry_run=True)
    assert dry.check(ReniceProcess(pid=p.pid, nice=4)).decision == "dry_run"
    assert dry.check(NoAction()).decision == "allow"
    g = Guardrails(Limits())
    assert g.check(KillProcess(pid=p.pid)) == Verdict(
        "needs_approval", "kill_process is destructive: waits for a human approval")
    assert g.check(KillProcess(pid=p.pid), approved=True).decision == "allow"
    assert g.check(ReniceProcess(pid=p.pid, nice=10)).decision == "allow"  # not destructive


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


def test_a_setting_cannot_ride_along_with_a_granted_one(host, audited):
    """A compromised operator that sends a granted setting and an ungranted one in one call changes
    neither: each setting is its own decision."""
    from llmos.kernel.kernel import SyscallError

    grants = _grants(settings={"quantum": (8, 64)})

    async def body(kernel, act):
        try:
            await act.sys.configure(quantum=32, max_running=4096)
        except SyscallError as e:
            return str(e), kernel.settings()
        return None, kernel.settings()

    error, settings = host(grants, body)
    assert error is not None and error.startswith("denied: denied by capabilities")
    assert (settings["quantum"], settings["max_running"]) == (16, 8)
    rows = [(d, why) for t, d, why in audited() if t == "kernel.configure"]
    assert [d for d, _ in rows] == ["allow", "deny", "done"] and rows[2][1] == "error"  # quantum not applied
