import asyncio
import os
import time
from types import SimpleNamespace

import psutil

from llmos.agents.operator.agent import NoModel
from llmos.agents.operator.detect import Detector, default_rules
from llmos.agents.operator.guardrails import ApprovalQueue, Grants, Guardrails, Limits
from llmos.agents.operator.observe import Observer
from llmos.agents.operator.operator import Operator
from llmos.agents.operator.policy import FallbackPolicy

BUSY = "while True: pass"
NO_APPROVAL = Limits(approval=frozenset())
ME = frozenset({os.getpid()})
KILL_ALLOWED, KILL_DONE = ("host.kill_process", "allow"), ("host.kill_process", "done")
CONFIGURED = [("kernel.configure", "allow"), ("kernel.configure", "done")]


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _operator(kernel, act, limits=None, dry_run=False, scratch=(), llmos=False, approvals=None,
              **kw) -> Operator:
    """An operator watching this test's children (and `scratch`); CPU rule at 25% (2 cores shared)."""
    observer = Observer(children_of=ME, scratch=scratch, llmos_state=kernel.stats if llmos else None)
    return Operator(observer, FallbackPolicy(kernel.settings if llmos else None), act,
                    Guardrails(limits or Limits(), dry_run=dry_run),
                    detector=Detector(default_rules(cpu_percent=25.0, scratch_mb=1.0)), approvals=approvals,
                    **kw)


async def _until(op: Operator, step: str, timeout: float = 30.0, interval: float = 0.25) -> list[str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        await op.tick()
        if any(e.step == step for e in op.events):
            break
        await asyncio.sleep(interval)
    return [e.step for e in op.events]


def test_runaway_process_is_killed_verified_and_audited(spawn, host, audited):
    busy, idle = spawn(BUSY), spawn()

    async def body(kernel, act):
        op = _operator(kernel, act, NO_APPROVAL)
        return op, await _until(op, "recovered")

    op, steps = host(Grants(children_of=ME), body)
    assert steps == ["finding", "proposal", "acted", "recovered"]
    assert _dead(busy.pid) and idle.poll() is None
    assert op.events[0].subject == f"pid:{busy.pid}"
    assert op.events[1].action["kind"] == "kill_process" and op.events[1].action["pid"] == busy.pid
    assert op.events[2].detail == "killed 1 process(es)"
    assert [(t, d) for t, d, _ in audited()] == [KILL_ALLOWED, KILL_DONE]


def test_an_action_outside_the_grants_is_refused_and_audited(tmp_path, host, audited):
    """The operator watches a scratch directory it may not remove files from: the monitor says no."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "big.log").write_bytes(b"x" * 2 * 2**20)

    async def body(kernel, act):
        op = _operator(kernel, act, NO_APPROVAL, scratch=[scratch])
        return op, await _until(op, "refused", interval=0.05)

    op, steps = host(Grants(children_of=ME), body)
    assert steps == ["finding", "proposal", "refused"]
    assert op.events[2].detail == "denied: denied by capabilities: no capability for tool 'host.remove_files'"
    assert (scratch / "big.log").exists()
    assert audited() == [("host.remove_files", "deny", "denied by capabilities: no capability for tool "
                                                        "'host.remove_files'")]


def test_dry_run_changes_nothing(spawn, host, audited):
    busy = spawn(BUSY)

    async def body(kernel, act):
        op = _operator(kernel, act, NO_APPROVAL, dry_run=True)
        return op, await _until(op, "dry_run")

    op, steps = host(Grants(children_of=ME), body)
    assert steps == ["finding", "proposal", "dry_run"]
    assert op.events[2].detail == f"dry run: would act: would kill pid {busy.pid} and 0 descendant(s)"
    time.sleep(0.3)
    assert busy.poll() is None  # still running
    assert [(t, d) for t, d, _ in audited()] == [KILL_ALLOWED, KILL_DONE]


def test_destructive_action_waits_for_approval_then_runs(spawn, tmp_path, host):
    busy = spawn(BUSY)
    queue = ApprovalQueue(tmp_path / "approvals.db")

    async def body(kernel, act):
        op = _operator(kernel, act, approvals=queue)
        steps = await _until(op, "queued")
        assert steps == ["finding", "proposal", "queued"]
        assert busy.poll() is None
        [pending] = queue.list()
        assert pending["action"]["kind"] == "kill_process" and pending["action"]["pid"] == busy.pid
        waits = "kill_process is destructive: waits for a human approval"
        assert op.events[-1].detail == (f"{waits}: would kill pid {busy.pid} and 0 descendant(s) "
                                        f"(approval id {pending['id']})")
        await op.tick()
        assert [e.step for e in op.events] == ["finding", "proposal", "queued"]  # waits, no second proposal
        queue.decide(pending["id"])
        return op, pending, await _until(op, "recovered")

    op, pending, steps = host(Grants(children_of=ME), body)
    assert steps == ["finding", "proposal", "queued", "acted", "recovered"]
    assert _dead(busy.pid)
    assert op.events[3].detail.startswith(f"approved #{pending['id']}: killed 1 process")
    assert op.events[4].subject == f"pid:{busy.pid}"
    assert queue.list("done")[0]["id"] == pending["id"]


def test_full_scratch_dir_loses_its_largest_entry_only(tmp_path, host):
    scratch = tmp_path / "scratch"
    (scratch / "logs").mkdir(parents=True)
    (scratch / "logs" / "big.log").write_bytes(b"x" * 3 * 2**20)
    (scratch / "keep.txt").write_text("small")

    async def body(kernel, act):
        op = _operator(kernel, act, NO_APPROVAL, scratch=[scratch])
        return op, await _until(op, "recovered", interval=0.05)

    op, steps = host(Grants(paths=(scratch,)), body)
    assert steps == ["finding", "proposal", "acted", "recovered"]
    assert op.events[1].action["path"] == str(scratch / "logs")
    assert sorted(p.name for p in scratch.iterdir()) == ["keep.txt"]


class _Thrashing(NoModel):
    """A backend whose engine thrashes while kv_blocks < needed (200 preemptions a second)."""

    def __init__(self, needed: int) -> None:
        self.engine = SimpleNamespace(blocks=SimpleNamespace(capacity=16))
        self.needed = needed
        self.preemptions = 0.0
        self.last = time.monotonic()

    def set_kv_capacity(self, n: int) -> int:
        old, self.engine.blocks.capacity = self.engine.blocks.capacity, n
        return old

    async def stats(self):
        now = time.monotonic()
        if self.engine.blocks.capacity < self.needed:
            self.preemptions += 200 * (now - self.last)
        self.last = now
        return {"kv_blocks_total": 64, "kv_blocks_used": self.engine.blocks.capacity,
                "preemptions": self.preemptions, "num_running": 8, "num_waiting": 4}


def test_a_setting_that_fixes_thrashing_is_kept(host, audited):
    async def body(kernel, act):
        op = _operator(kernel, act, NO_APPROVAL, llmos=True, verify_s=2.0)
        return op, await _until(op, "recovered", interval=0.1), kernel.settings()

    op, steps, settings = host(Grants(), body, backend=_Thrashing(needed=64))
    assert steps == ["finding", "proposal", "acted", "recovered"]
    assert op.events[1].action == {"kind": "set_setting", "name": "kv_blocks", "value": 64,
                                   "reason": op.events[1].action["reason"]}
    assert settings["kv_blocks"] == 64
    assert [(t, d) for t, d, _ in audited()] == CONFIGURED


def test_a_setting_that_does_not_help_is_rolled_back(host, audited):
    async def body(kernel, act):
        op = _operator(kernel, act, NO_APPROVAL, llmos=True, verify_s=0.5)
        return op, await _until(op, "rolled_back", interval=0.1), kernel.settings()

    op, steps, settings = host(Grants(), body, backend=_Thrashing(needed=10**9))
    assert steps[:5] == ["finding", "proposal", "acted", "unrecovered", "rolled_back"]
    assert settings["kv_blocks"] == 16
    assert op.events[4].action == {"kv_blocks": 16}
    assert [(t, d) for t, d, _ in audited()][:4] == CONFIGURED * 2


def test_a_setting_beyond_its_granted_bounds_is_refused(host, audited):
    async def body(kernel, act):
        op = _operator(kernel, act, NO_APPROVAL, llmos=True, verify_s=2.0)
        return op, await _until(op, "refused", interval=0.1), kernel.settings()

    grants = Grants(settings={"kv_blocks": (1, 32)})
    op, steps, settings = host(grants, body, backend=_Thrashing(needed=64))
    assert steps == ["finding", "proposal", "refused"] and settings["kv_blocks"] == 16
    assert op.events[2].detail == ("denied: denied by capabilities: kv_blocks=64 is outside the granted "
                                   "bounds [1.0, 32.0]")
    assert audited()[0][:2] == ("kernel.configure", "deny")


def test_the_embedded_model_answers_with_a_valid_action_for_a_runaway(spawn, host):
    from llmos import LLM
    from llmos.agents.operator.propose import LLMProposer, engine_chat

    busy = spawn(BUSY)

    async def body(kernel, act):
        op = _operator(kernel, act, NO_APPROVAL)
        op.proposer = LLMProposer(engine_chat(LLM("smollm2-135m-instruct")))
        await _until(op, "proposal")
        return op

    op = host(Grants(children_of=ME), body)
    proposal = next(e for e in op.events if e.step == "proposal")
    assert proposal.detail == "by llm"
    assert proposal.action["kind"] in ("kill_process", "renice_process", "none")
    if proposal.action["kind"] != "none":
        assert proposal.action["pid"] == busy.pid  # the narrowed schema admits no other pid
    assert op.proposer.invalid == 0


def test_a_rule_is_handled_even_right_after_an_anomaly_was_let_be(tmp_path, host):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "a").write_bytes(b"x" * 1000)

    async def body(kernel, act):
        op = _operator(kernel, act, NO_APPROVAL, scratch=[scratch], cooldown_s=60.0)
        op.detector = Detector(default_rules(scratch_mb=1.0), warmup=5, persist=2, min_std=0.01)
        for _ in range(6):
            await op.tick()
        (scratch / "b").write_bytes(b"x" * 2**19)  # unusual (0.5 MB), under the 1 MB line
        for _ in range(2):
            await op.tick()
        assert [e.step for e in op.events] == ["finding", "proposal"]
        assert op.events[0].detail.startswith("anomaly") and op.events[1].action["kind"] == "none"
        (scratch / "c").write_bytes(b"x" * 2 * 2**20)  # over the line, inside the 60 s cooldown
        for _ in range(2):
            await op.tick()
        return op

    op = host(Grants(paths=(scratch,)), body)
    assert [e.step for e in op.events] == ["finding", "proposal", "finding", "proposal", "acted", "recovered"]
    assert op.events[3].action["path"] == str(scratch / "c")
