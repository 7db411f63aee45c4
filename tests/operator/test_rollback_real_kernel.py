"""Verify-then-roll-back on the real kernel and engine: a setting change that makes KV thrashing worse is
found out by the operator's own verification and undone through the kernel, without anyone telling it."""

import asyncio
import time

from llmos.agents.operator import (
    Actuator,
    Detector,
    Grants,
    Guardrails,
    Limits,
    Observer,
    Operator,
    operator_process,
)
from llmos.agents.operator.actions import SetSetting
from llmos.security import AuditLog, ReferenceMonitor


class Harmful:
    """A proposer that answers thrashing by shrinking the KV cache to a third: the wrong way."""

    name = "harmful"

    def __init__(self, settings):
        self.settings = settings

    async def propose(self, finding, obs, attempts):
        return SetSetting(name="kv_blocks", value=max(4, self.settings()["kv_blocks"] // 3), reason="harm")


async def _story(sys, n=0):
    # Answers long enough that the running requests outgrow 60 blocks as they decode: the thrashing
    # lasts however fast the engine is (with 64 tokens a fast engine settled into three at a time).
    prompt = f"Story {n}. " + "Write a long story about an operating system and its processes. " * 18
    while True:
        await sys.llm_chat([{"role": "user", "content": prompt}], max_tokens=160, seed=n)


def test_a_harmful_setting_is_rolled_back_on_the_real_kernel(llm, tmp_path):
    from llmos.kernel import EngineBackend, Kernel

    audit = AuditLog(tmp_path / "audit.db")

    async def main():
        kernel = Kernel(EngineBackend(llm), home=tmp_path, monitor=ReferenceMonitor(audit=audit))
        total = llm.engine.blocks.num_blocks
        try:
            workers = [await kernel.spawn(_story, name=f"s{i}", args={"n": i}) for i in range(6)]
            await asyncio.sleep(2)
            await kernel.configure(kv_blocks=60)  # too few for six agents: requests are swapped out
            grants = Grants(agents=None)
            op = Operator(Observer(llmos_state=kernel.stats), Harmful(kernel.settings),
                          Actuator(await operator_process(kernel, grants), grants),
                          Guardrails(Limits(approval=frozenset())), detector=Detector(), verify_s=8.0)
            end = time.monotonic() + 60
            while time.monotonic() < end and not any(e.step == "rolled_back" for e in op.events):
                await op.tick()
                await asyncio.sleep(0.5)
            steps = [e.step for e in op.events]
            assert steps[:5] == ["finding", "proposal", "acted", "unrecovered", "rolled_back"], steps
            acted = op.events[2]
            assert acted.action["name"] == "kv_blocks" and acted.action["value"] == 20
            assert op.events[4].action == {"kv_blocks": 60}
            assert kernel.settings()["kv_blocks"] == 60  # undone through the kernel
            for w in workers:
                await kernel.kill(w, "test over")
        finally:
            await kernel.configure(kv_blocks=total)
            await kernel.shutdown(close_backend=False)

    asyncio.run(main())
    rows = audit.tail(1000, agents=["operator"])
    configured = [(r["agent"], r["decision"], r["args_preview"]) for r in rows
                  if r["tool"] == "kernel.configure" and r["decision"] == "allow"]
    # the harmful change and its undo, both decided by the monitor for the operator's process
    assert [(a, d) for a, d, _ in configured] == [("operator", "allow")] * 2
    assert '"kv_blocks":20' in configured[0][2] and '"kv_blocks":60' in configured[1][2]
