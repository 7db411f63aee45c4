"""The operator on the real kernel and engine: a looping agent, KV starvation, and a rollback."""

import asyncio
import time

from llmos.agents.operator import (
    Actuator,
    Detector,
    FallbackPolicy,
    Grants,
    Guardrails,
    Limits,
    Observer,
    Operator,
    default_rules,
    operator_process,
)
from llmos.agents.operator.actions import SetSetting


async def _operator(kernel, budget: int = 10**9, verify_s: float = 10.0) -> Operator:
    """An operator process granted every agent and the settings within their bounds."""
    grants = Grants(agents=None)
    act = Actuator(await operator_process(kernel, grants), grants)
    observer = Observer(llmos_state=kernel.stats, agent_budget={"llm_tokens": budget})
    return Operator(observer, FallbackPolicy(kernel.settings), act, Guardrails(Limits(approval=frozenset())),
                    detector=Detector(default_rules()), verify_s=verify_s)


async def _tick_until(op: Operator, step: str, timeout: float = 40.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and not any(e.step == step for e in op.events):
        await op.tick()
        await asyncio.sleep(0.3)


async def _looper(sys):
    while True:
        await sys.llm_chat([{"role": "user", "content": "Say it again."}], max_tokens=8)


async def _story(sys, n=0):
    prompt = f"Story {n}. " + "Write a long story about an operating system and its processes. " * 18
    while True:
        await sys.llm_chat([{"role": "user", "content": prompt}], max_tokens=64, seed=n)


def test_an_agent_past_its_budget_is_suspended(llm, tmp_path):
    from llmos.kernel import EngineBackend, Kernel

    async def main():
        kernel = Kernel(EngineBackend(llm), home=tmp_path)
        try:
            op = await _operator(kernel, budget=40)
            pid = await kernel.spawn(_looper, name="looper")
            await _tick_until(op, "recovered")
            assert [e.step for e in op.events] == ["finding", "proposal", "acted", "recovered"]
            assert op.events[1].action["kind"] == "suspend_agent" and op.events[1].action["pid"] == pid
            assert kernel.process(pid).state.value == "suspended"
            await kernel.kill(pid, "test over")
        finally:
            await kernel.shutdown(close_backend=False)

    asyncio.run(main())


def test_kv_starvation_gets_more_blocks_and_a_useless_change_is_rolled_back(llm, tmp_path):
    from llmos.kernel import EngineBackend, Kernel

    async def main():
        kernel = Kernel(EngineBackend(llm), home=tmp_path)
        total = llm.engine.blocks.num_blocks
        try:
            workers = [await kernel.spawn(_story, name=f"s{i}", args={"n": i}) for i in range(6)]
            await asyncio.sleep(2)
            assert (await kernel.configure(kv_blocks=40)) == {"kv_blocks": total}
            op = await _operator(kernel)
            await _tick_until(op, "recovered")
            acted = next(e for e in op.events if e.step == "acted")
            assert acted.action["kind"] == "set_setting" and acted.action["name"] == "kv_blocks"
            assert kernel.settings()["kv_blocks"] == acted.action["value"] == 160
            assert [e.step for e in op.events][-1] == "recovered"
            # rollback restores a setting through the kernel: a change the signal does not follow
            previous = await op.actuator.execute(SetSetting(name="policy", value="rr"))
            assert previous.undo == {"policy": "fifo"} and kernel.settings()["policy"] == "rr"
            await op.actuator.rollback(previous.undo)
            assert kernel.settings()["policy"] == "fifo"
            for w in workers:
                await kernel.kill(w, "test over")
        finally:
            await kernel.configure(kv_blocks=total)
            await kernel.shutdown(close_backend=False)

    asyncio.run(main())


def test_the_operator_runs_as_an_agent_on_the_kernel(llm, tmp_path, monkeypatch):
    from llmos.agents import load_program
    from llmos.agents.operator.agent import CAPABILITIES
    from llmos.kernel import EngineBackend, Kernel
    from llmos.security import AuditLog, ReferenceMonitor

    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    _, operator_main = load_program("operator")
    audit = AuditLog(tmp_path / "audit.db")

    def suspended_by_the_operator() -> bool:
        rows = [(r["agent"], r["tool"], r["decision"], r["args_preview"]) for r in audit.tail(50)]
        return any(row[:3] == ("operator", "kernel.signal", "allow") and '"signal":"suspend"' in row[3]
                   for row in rows)

    async def main():
        kernel = Kernel(EngineBackend(llm), home=tmp_path, monitor=ReferenceMonitor(audit=audit))
        try:
            looper = await kernel.spawn(_looper, name="looper")
            op = await kernel.spawn(operator_main, name="operator", capabilities=CAPABILITIES,
                                    args={"use_model": False, "duration_s": 20.0, "interval_s": 0.3,
                                          "token_budget": 40})
            end = time.monotonic() + 20
            while not suspended_by_the_operator() and time.monotonic() < end:
                await asyncio.sleep(0.2)
            assert kernel.process(looper).state.value == "suspended"
            await kernel.kill(op, "test over")
            await kernel.kill(looper, "test over")
        finally:
            await kernel.shutdown(close_backend=False)

    asyncio.run(main())
    assert suspended_by_the_operator() and audit.verify().ok
