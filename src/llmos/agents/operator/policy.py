"""The deterministic fallback policy: the operator's decision when no model is available.

It maps a finding to one action of the same typed vocabulary an LLM must
answer in, so the guardrails, the audit log and the verify/rollback loop are
the same either way. The policy is a pure function of (finding, evidence,
earlier attempts): the same situation always gets the same action, and a
baseline anomaly alone never gets a destructive one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from llmos.agents.operator.actions import (
    KillProcess,
    NoAction,
    RemoveFiles,
    ReniceProcess,
    SetSetting,
    SuspendAgent,
)
from llmos.agents.operator.detect import Finding
from llmos.agents.operator.observe import Observation


@dataclass(frozen=True)
class Attempt:
    """An earlier action on the same subject and whether it recovered the signal."""

    kind: str
    recovered: bool | None  # None: still being verified
    target: str = ""  # what it touched: "pid:12", "setting:kv_blocks", ...


class FallbackPolicy:
    name = "fallback"

    def __init__(self, settings: Any = None) -> None:
        self.settings = settings  # a callable giving the current llmos settings, if any

    async def propose(self, finding: Finding, obs: Observation, attempts: list[Attempt]) -> Any:
        return self.decide(finding, obs, attempts)

    def decide(self, finding: Finding, obs: Observation, attempts: list[Attempt]) -> Any:
        tried = {a.kind for a in attempts} | {a.target for a in attempts if a.recovered is False}
        kind, subject = finding.kind, finding.subject
        key = subject.partition(":")[2]
        why = finding.describe()[:80]
        if kind in ("runaway_cpu", "memory_hog") and key.isdigit():
            return KillProcess(pid=int(key), reason=why)
        if kind == "anomaly" and finding.signal.endswith(".cpu_percent") and subject.startswith("pid:"):
            proc = obs.processes.get(int(key))
            if proc is not None and proc.nice < 19 and "renice_process" not in tried:
                return ReniceProcess(pid=proc.pid, nice=min(19, proc.nice + 10), reason=why)
            return NoAction(reason="unusual CPU, already reniced: watching")
        if kind == "scratch_full" and subject.startswith("path:"):
            scratch = obs.scratch.get(key)
            if scratch and scratch.largest:
                return RemoveFiles(path=os.path.join(key, scratch.largest[0][0]), reason=why)
            return NoAction(reason="scratch full but empty listing")
        if kind == "over_quota" and key.isdigit():
            return SuspendAgent(pid=int(key), reason=why)
        if kind == "kv_thrashing":
            return self._thrashing(obs, tried, why)
        return NoAction(reason=f"no rule acts on {kind} of {finding.signal}"[:80])

    def _thrashing(self, obs: Observation, tried: set[str], why: str) -> Any:
        current = self.settings() if self.settings else {}
        total = int(obs.llmos.get("kv_blocks_total", 0))
        blocks = current.get("kv_blocks")
        if isinstance(blocks, int) and 0 < blocks < total and "setting:kv_blocks" not in tried:
            return SetSetting(name="kv_blocks", value=min(total, blocks * 4), reason=why)
        running = current.get("max_running")
        if isinstance(running, int) and running > 1 and "setting:max_running" not in tried:
            return SetSetting(name="max_running", value=max(1, running // 2), reason=why)
        return NoAction(reason="thrashing, but no setting left to change")
