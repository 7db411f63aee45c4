"""The operator: a sysadmin agent that observes, detects, proposes, guards, acts, verifies and rolls back.

One `tick` is one pass of the loop. Each subject (a process, a scratch
directory, an agent, the engine) has at most one action in flight. Every
action is a syscall of the operator's process (`Actuator`): a host tool
through `sys.tool_call`, a setting or an agent signal through the kernel's
privileged syscalls, so the reference monitor decides it against the
operator's grants and the audit log records it, like any agent's call; a
denial is a "refused" step. Before that, the operator's own workflow
(guardrails.py) paces it, and a destructive action is first checked with
the tools' dry run, then waits for a human's approval. After an action runs,
its signal must recover before the deadline; a setting change that did not
recover it (or made it worse) is reverted with the values `configure`
returned. The loop's steps are `events` (what `llmos operator` prints).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmos.agents.operator.actions import (
    KillAgent,
    KillProcess,
    NoAction,
    RemoveFiles,
    ReniceProcess,
    SetSetting,
    SuspendAgent,
)
from llmos.agents.operator.detect import Detector, Finding, clears
from llmos.agents.operator.guardrails import (
    ALLOW,
    DENY,
    DRY_RUN,
    NEEDS_APPROVAL,
    ApprovalQueue,
    Grants,
    Guardrails,
)
from llmos.agents.operator.observe import Observation, Observer
from llmos.agents.operator.policy import Attempt


@dataclass
class Outcome:
    ok: bool
    detail: str
    undo: dict[str, Any] | None = None  # settings to restore on rollback
    denied: bool = False  # the reference monitor refused the call (the action did not run)


class Actuator:
    """Carries out actions as syscalls of the operator's process `sys`; `grants` only picks arguments
    (which granted parent a pid descends from, the blast radius to accept), the monitor decides."""

    def __init__(self, sys: Any, grants: Grants | None = None) -> None:
        self.sys = sys
        self.grants = grants or Grants()

    async def execute(self, action: Any, dry_run: bool = False) -> Outcome:
        """Run `action` (or, with `dry_run`, have the monitor and the host tool check it, doing nothing)."""
        from llmos.kernel import SyscallError

        try:
            return await self._execute(action, dry_run)
        except SyscallError as e:
            return Outcome(False, str(e), denied=str(e).startswith("denied"))

    async def _execute(self, action: Any, dry_run: bool) -> Outcome:
        if isinstance(action, NoAction):
            return Outcome(True, "nothing done")
        if isinstance(action, KillProcess | ReniceProcess | RemoveFiles):
            tool, args = self._host_call(action)
            result = await self.sys.tool_call(tool, {**args, "dry_run": True} if dry_run else args)
            if result.ok:
                return Outcome(True, str(result.content))
            return Outcome(False, str(result.error), denied=str(result.error).startswith("denied"))
        if dry_run:  # the kernel's syscalls have no dry run: the monitor decides when it runs
            return Outcome(True, f"would {action.kind.replace('_', ' ')} {action.target()}")
        if isinstance(action, SuspendAgent):
            await self.sys.suspend(action.pid)
            return Outcome(True, f"agent {action.pid} suspended")
        if isinstance(action, KillAgent):
            await self.sys.kill(action.pid, action.reason or "killed by the operator")
            return Outcome(True, f"agent {action.pid} killed")
        if isinstance(action, SetSetting):
            previous = await self.sys.configure(**{action.name: action.value})
            undo = {action.name: previous[action.name]}
            return Outcome(True, f"{action.name} {previous[action.name]} -> {action.value}", undo)
        return Outcome(False, f"cannot execute {action!r}")

    def _host_call(self, action: Any) -> tuple[str, dict[str, Any]]:
        if isinstance(action, RemoveFiles):
            return "host.remove_files", {"path": os.path.normpath(os.path.abspath(action.path)),
                                         "max_files": self.grants.max_files,
                                         "max_bytes": self.grants.max_bytes, "reason": action.reason}
        args: dict[str, Any] = {"pid": action.pid, "reason": action.reason}
        if (within := self.grants.within(action.pid)) is not None:
            args["within"] = within
        if isinstance(action, KillProcess):
            return "host.kill_process", {**args, "max_tree": self.grants.max_tree}
        return "host.renice_process", {**args, "nice": action.nice}

    async def rollback(self, undo: dict[str, Any]) -> Outcome:
        from llmos.kernel import SyscallError

        try:
            await self.sys.configure(**undo)
        except SyscallError as e:
            return Outcome(False, str(e), denied=str(e).startswith("denied"))
        return Outcome(True, f"restored {undo}")


@dataclass
class Event:
    """One step of the loop, as a report reads it."""

    t: float
    step: str  # finding proposal refused queued dry_run acted failed recovered unrecovered rolled_back
    subject: str
    action: dict[str, Any] | None = None
    detail: str = ""


@dataclass
class _InFlight:
    action: Any
    finding: Finding
    started: float
    deadline: float
    before: float
    undo: dict[str, Any] | None


@dataclass
class Operator:
    observer: Observer
    proposer: Any  # FallbackPolicy or LLMProposer: async propose(finding, obs, attempts) -> action
    actuator: Actuator
    guardrails: Guardrails = field(default_factory=Guardrails)
    detector: Detector = field(default_factory=Detector)
    approvals: ApprovalQueue | None = None
    verify_s: float = 10.0  # a signal must recover this long after its action
    worse_factor: float = 1.5  # a setting change whose signal grows past this factor is rolled back early;
    # one that only shrinks it by this factor (not under its limit) is kept as a partial fix
    cooldown_s: float = 5.0  # a subject left alone (no action, refused, queued) is not re-proposed sooner
    on_event: Callable[[Event], None] | None = None
    events: list[Event] = field(default_factory=list)
    _inflight: dict[str, _InFlight] = field(default_factory=dict)
    _quiet_until: dict[str, float] = field(default_factory=dict)
    _quiet_baseline: set[str] = field(default_factory=set)  # quiet because a baseline finding was let be
    _attempts: dict[str, list[Attempt]] = field(default_factory=dict)
    _awaiting: dict[str, int] = field(default_factory=dict)  # subject -> approval id

    async def tick(self) -> Observation:
        """One pass: observe, detect, verify what is in flight, run approved actions, handle new findings."""
        obs = await self.observer.sample()
        signals = obs.signals()
        findings = self.detector.update(signals)
        await self._verify(obs, signals)
        acted = await self._run_approved(obs)
        for finding in self._one_per_subject(findings):
            if finding.subject in acted:  # this observation predates the approved action just run
                continue
            busy = self._inflight.get(finding.subject)
            # a rule firing while a baseline anomaly's gentler action is still verified escalates now
            escalate = busy is not None and busy.finding.source == "baseline" and finding.source == "rule"
            quiet = obs.t < self._quiet_until.get(finding.subject, 0.0) or finding.subject in self._awaiting
            # a rule crossing its line is news even right after an anomaly on the same subject was let be
            quiet = quiet and not (finding.source == "rule" and finding.subject in self._quiet_baseline)
            if (busy or quiet) and not escalate:
                continue
            if escalate:
                del self._inflight[finding.subject]
                self._attempt(finding.subject, busy.action, False)
            await self._handle(finding, obs)
        return obs

    async def run(self, duration_s: float | None = None, interval_s: float = 1.0,
                  stop: asyncio.Event | None = None) -> None:
        end = None if duration_s is None else time.monotonic() + duration_s
        while (end is None or time.monotonic() < end) and not (stop and stop.is_set()):
            started = time.monotonic()
            await self.tick()
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    # -- the loop's steps ------------------------------------------------------------------------------

    @staticmethod
    def _one_per_subject(findings: list[Finding]) -> list[Finding]:
        """Rule findings before baseline ones; one finding per subject per tick."""
        chosen: dict[str, Finding] = {}
        for f in sorted(findings, key=lambda f: f.source != "rule"):
            chosen.setdefault(f.subject, f)
        return list(chosen.values())

    async def _handle(self, finding: Finding, obs: Observation) -> None:
        evidence = {"finding": finding.as_dict(), **obs.evidence(finding.subject)}
        self._emit(obs.t, "finding", finding.subject, None, finding.describe())
        attempts = self._attempts.get(finding.subject, [])
        action = await self.proposer.propose(finding, obs, attempts)
        self._emit(obs.t, "proposal", finding.subject, action.model_dump(), f"by {self.proposer.name}")
        verdict = self.guardrails.check(action)
        if isinstance(action, NoAction) or verdict.decision == DENY:
            self._refused(obs, finding, action, verdict.reason)
            return
        if verdict.decision in (DRY_RUN, NEEDS_APPROVAL):
            # the monitor and the tool check it now (no side effect), so a human is never asked to
            # approve, and a dry run never reports, an action that would be refused
            check = await self.actuator.execute(action, dry_run=True)
            if not check.ok:
                self._refused(obs, finding, action, check.detail)
            else:
                self._refused(obs, finding, action, f"{verdict.reason}: {check.detail}", verdict.decision,
                              evidence)
            return
        await self._act(obs, finding, action)

    def _refused(self, obs: Observation, finding: Finding, action: Any, detail: str, decision: str = DENY,
                 evidence: dict[str, Any] | None = None) -> None:
        """The subject is left alone for a cooldown: no action, refused, a dry run, or queued."""
        self._quiet_until[finding.subject] = obs.t + self.cooldown_s
        if finding.source == "baseline":
            self._quiet_baseline.add(finding.subject)
        else:
            self._quiet_baseline.discard(finding.subject)
        if isinstance(action, NoAction):
            return
        step = {NEEDS_APPROVAL: "queued", DRY_RUN: "dry_run"}.get(decision, "refused")
        if decision == NEEDS_APPROVAL and self.approvals is not None:
            approval_id = self.approvals.submit(action, evidence)
            self._awaiting[finding.subject] = approval_id  # the subject waits for the human, not re-proposed
            detail += f" (approval id {approval_id})"
        self._emit(obs.t, step, finding.subject, action.model_dump(), detail)

    async def _act(self, obs: Observation, finding: Finding, action: Any, note: str = "") -> bool:
        outcome = await self.actuator.execute(action)
        args = action.model_dump()
        if outcome.denied:
            self._refused(obs, finding, action, note + outcome.detail)
            return False
        self.guardrails.executed(action)
        self._emit(time.monotonic(), "acted" if outcome.ok else "failed", finding.subject, args,
                   note + outcome.detail)
        if not outcome.ok:
            self._quiet_until[finding.subject] = obs.t + self.cooldown_s
            self._attempt(finding.subject, action, False)
            return False
        if finding.signal:  # an action approved without a finding has nothing to verify
            now = time.monotonic()
            self._inflight[finding.subject] = _InFlight(action, finding, now, now + self.verify_s,
                                                        finding.value, outcome.undo)
        return True

    async def _verify(self, obs: Observation, signals: dict[str, float]) -> None:
        for subject, f in list(self._inflight.items()):
            value = signals.get(f.finding.signal)
            recovered = clears(f.finding, signals, self.detector.rules)
            worse = (f.undo is not None and value is not None and obs.t > f.started
                     and value > self.worse_factor * max(f.before, 1e-9) and f.before > 0)
            if not recovered and not worse and obs.t < f.deadline:
                continue
            # at the deadline a setting that moved the signal the right way is kept (a partial fix)
            partial = (not recovered and not worse and value is not None
                       and value < f.before / self.worse_factor)
            del self._inflight[subject]
            self._attempt(subject, f.action, None if partial else recovered)
            args = f.action.model_dump()
            if recovered:
                detail = f"{f.finding.signal} back under {f.finding.limit:g} after {obs.t - f.started:.1f}s"
                self._emit(obs.t, "recovered", subject, args, detail)
                continue
            detail = f"{f.finding.signal} {'grew to' if worse else 'still'} {value}"
            if not worse:
                detail += f" after {self.verify_s:g}s" + (" (kept: it helped)" if partial else "")
            self._quiet_until[subject] = obs.t + self.cooldown_s
            self._emit(obs.t, "unrecovered", subject, args, detail)
            if f.undo is not None and not partial:
                outcome = await self.actuator.rollback(f.undo)
                self._emit(obs.t, "rolled_back" if outcome.ok else "failed", subject, f.undo, outcome.detail)

    async def _run_approved(self, obs: Observation) -> set[str]:
        """Run what a human approved since the last tick; the subjects acted on."""
        acted: set[str] = set()
        if self.approvals is None:
            return acted
        for approval_id, action, evidence in self.approvals.take_approved():
            finding = Finding(**evidence["finding"]) if "finding" in evidence else Finding(
                "approved", action.target(), "", 0.0, 0.0, "human")
            self._awaiting.pop(finding.subject, None)
            verdict = self.guardrails.check(action, approved=True)
            if verdict.decision != ALLOW:
                self.approvals.finish(approval_id, "refused")
                self._emit(obs.t, "refused", finding.subject, action.model_dump(), verdict.reason)
                continue
            ok = await self._act(obs, finding, action, f"approved #{approval_id}: ")
            self.approvals.finish(approval_id, "done" if ok else "failed")
            acted.add(finding.subject)
        return acted

    def _attempt(self, subject: str, action: Any, recovered: bool) -> None:
        self._attempts.setdefault(subject, []).append(Attempt(action.kind, recovered, action.target()))

    def _emit(self, t: float, step: str, subject: str, action: dict[str, Any] | None, detail: str) -> None:
        event = Event(t, step, subject, action, detail)
        self.events.append(event)
        if self.on_event:
            self.on_event(event)


def default_approvals_path() -> Path:
    from llmos.home import llmos_home

    return llmos_home() / "operator" / "approvals.db"
