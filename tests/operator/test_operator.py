import asyncio
import os
import time

import psutil

from llmos.agents.operator.actions import KillProcess
from llmos.agents.operator.detect import Detector, default_rules
from llmos.agents.operator.guardrails import ApprovalQueue, Grants, Guardrails, Limits
from llmos.agents.operator.observe import Observer
from llmos.agents.operator.operator import Actuator, MemoryAudit, Operator
from llmos.agents.operator.policy import FallbackPolicy

BUSY = "while True: pass"
NO_APPROVAL = Limits(approval=frozenset())


def _operator(limits=None, dry_run=False, scratch=(), control=None, approvals=None, **kw) -> Operator:
    """An operator granted this test's children; CPU rule at 25% (2 cores shared with other work)."""
    me = frozenset({os.getpid()})
    rails = Guardrails(Grants(children_of=me, paths=tuple(scratch)), limits or Limits(), dry_run=dry_run,
                       settings=control.settings if control else None)
    observer = Observer(children_of=me, scratch=scratch, llmos_state=control.stats if control else None)
    return Operator(observer, FallbackPolicy(control.settings if control else None), rails,
                    detector=Detector(default_rules(cpu_percent=25.0, scratch_mb=1.0)),
                    actuator=Actuator(control),
                    audit=MemoryAudit(), approvals=approvals, **kw)


def _until(op: Operator, step: str, timeout: float = 30.0, interval: float = 0.25) -> list[str]:
    async def go():
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            await op.tick()
            if any(e.step == step for e in op.events):
                return
            await asyncio.sleep(interval)

    asyncio.run(go())
    return [e.step for e in op.events]


def test_runaway_process_is_killed_verified_and_audited(spawn):
    busy, idle = spawn(BUSY), spawn()
    op = _operator(NO_APPROVAL)
    steps = _until(op, "recovered")
    assert steps == ["finding", "proposal", "acted", "recovered"]
    assert not psutil.pid_exists(busy.pid) and idle.poll() is None
    assert op.events[0].subject == f"pid:{busy.pid}"
    assert op.events[1].action["kind"] == "kill_process" and op.events[1].action["pid"] == busy.pid
    log = op.audit.entries
    assert [(e["tool"], e["decision"]) for e in log] == [
        ("operator.detect", "observe"), ("operator.kill_process", "allow"),
        ("operator.kill_process", "executed"), ("operator.verify", "recovered")]
    assert log[1]["evidence"]["process"]["pid"] == busy.pid
    assert log[1]["evidence"]["process"]["cpu_percent"] > 25
    assert log[1]["evidence"]["proposer"] == "fallback"


def test_dry_run_changes_nothing(spawn):
    busy = spawn(BUSY)
    op = _operator(NO_APPROVAL, dry_run=True)
    steps = _until(op, "dry_run")
    assert steps == ["finding", "proposal", "dry_run"]
    time.sleep(0.3)
    assert busy.poll() is None  # still running
    assert [e["decision"] for e in op.audit.entries] == ["observe", "dry_run"]


def test_destructive_action_waits_for_approval_then_runs(spawn, tmp_path):
    busy = spawn(BUSY)
    queue = ApprovalQueue(tmp_path / "approvals.db")
    op = _operator(approvals=queue)
    steps = _until(op, "queued")
    assert steps == ["finding", "proposal", "queued"]
    assert busy.poll() is None
    [pending] = queue.list()
    assert pending["action"]["kind"] == "kill_process" and pending["action"]["pid"] == busy.pid
    assert f"(approval id {pending['id']})" in op.events[-1].detail
    asyncio.run(op.tick())
    assert [e.step for e in op.events] == ["finding", "proposal", "queued"]  # waits, no second proposal
    queue.decide(pending["id"])
    steps = _until(op, "recovered")
    assert steps == ["finding", "proposal", "queued", "acted", "recovered"]
    assert not psutil.pid_exists(busy.pid)
    assert op.events[3].detail.startswith(f"approved #{pending['id']}: killed 1 process")
    assert op.events[4].subject == f"pid:{busy.pid}"
    assert queue.list("done")[0]["id"] == pending["id"]


def test_full_scratch_dir_loses_its_largest_entry_only(tmp_path):
    scratch = tmp_path / "scratch"
    (scratch / "logs").mkdir(parents=True)
    (scratch / "logs" / "big.log").write_bytes(b"x" * 3 * 2**20)
    (scratch / "keep.txt").write_text("small")
    op = _operator(NO_APPROVAL, scratch=[scratch])
    steps = _until(op, "recovered", interval=0.05)
    assert steps == ["finding", "proposal", "acted", "recovered"]
    assert op.events[1].action["path"] == str(scratch / "logs")
    assert sorted(p.name for p in scratch.iterdir()) == ["keep.txt"]


class _Engine:
    """Stands in for the kernel's settings/stats until it lands: thrashes while kv_blocks < needed."""

    def __init__(self, needed: int) -> None:
        self._settings = {"policy": "fifo", "quantum": 64, "max_running": 8, "kv_blocks": 16}
        self.needed = needed
        self.preemptions = 0.0
        self.last = time.monotonic()

    def settings(self):
        return dict(self._settings)

    def configure(self, **changes):
        previous = {k: self._settings[k] for k in changes}
        self._settings.update(changes)
        return previous

    def stats(self):
        now = time.monotonic()
        if self._settings["kv_blocks"] < self.needed:  # 200 preemptions a second, however often sampled
            self.preemptions += 200 * (now - self.last)
        self.last = now
        return {"kv_blocks_total": 64, "kv_blocks_used": self._settings["kv_blocks"],
                "preemptions": self.preemptions, "num_running": 8, "num_waiting": 4, "agents": []}


def test_a_setting_that_fixes_thrashing_is_kept():
    engine = _Engine(needed=64)
    op = _operator(NO_APPROVAL, control=engine, verify_s=2.0)
    steps = _until(op, "recovered", interval=0.1)
    assert steps == ["finding", "proposal", "acted", "recovered"]
    assert op.events[1].action == {"kind": "set_setting", "name": "kv_blocks", "value": 64,
                                   "reason": op.events[1].action["reason"]}
    assert engine.settings()["kv_blocks"] == 64


def test_a_setting_that_does_not_help_is_rolled_back():
    engine = _Engine(needed=10**9)
    op = _operator(NO_APPROVAL, control=engine, verify_s=0.5)
    steps = _until(op, "rolled_back", interval=0.1)
    assert steps[:5] == ["finding", "proposal", "acted", "unrecovered", "rolled_back"]
    assert engine.settings()["kv_blocks"] == 16
    assert op.events[4].action == {"kv_blocks": 16}
    assert ("operator.rollback", "executed") in [(e["tool"], e["decision"]) for e in op.audit.entries]


def test_agent_actions_need_the_kernel(spawn):
    result = asyncio.run(Actuator(None).execute(KillProcess(pid=os.getpid() + 10**6)))
    assert not result.ok and result.detail.startswith("NoSuchProcess")


def test_the_embedded_model_answers_with_a_valid_action_for_a_runaway(spawn):
    from llmos import LLM
    from llmos.agents.operator.propose import LLMProposer, engine_chat

    busy = spawn(BUSY)
    op = _operator(NO_APPROVAL)
    op.proposer = LLMProposer(engine_chat(LLM("smollm2-135m-instruct")))
    _until(op, "proposal")
    proposal = next(e for e in op.events if e.step == "proposal")
    assert proposal.detail == "by llm"
    assert proposal.action["kind"] in ("kill_process", "renice_process", "none")
    if proposal.action["kind"] != "none":
        assert proposal.action["pid"] == busy.pid  # the narrowed schema admits no other pid
    assert op.proposer.invalid == 0


def test_a_rule_is_handled_even_right_after_an_anomaly_was_let_be(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "a").write_bytes(b"x" * 1000)
    op = _operator(NO_APPROVAL, scratch=[scratch], cooldown_s=60.0)
    op.detector = Detector(default_rules(scratch_mb=1.0), warmup=5, persist=2, min_std=0.01)

    async def ticks(n):
        for _ in range(n):
            await op.tick()

    asyncio.run(ticks(6))
    (scratch / "b").write_bytes(b"x" * 2**19)  # unusual (0.5 MB), under the 1 MB line
    asyncio.run(ticks(2))
    assert [e.step for e in op.events] == ["finding", "proposal"]
    assert op.events[0].detail.startswith("anomaly") and op.events[1].action["kind"] == "none"
    (scratch / "c").write_bytes(b"x" * 2 * 2**20)  # over the line, inside the 60 s cooldown
    asyncio.run(ticks(2))
    assert [e.step for e in op.events] == ["finding", "proposal", "finding", "proposal", "acted", "recovered"]
    assert op.events[3].action["path"] == str(scratch / "c")
