"""The operator: a sysadmin agent that observes, detects, proposes, guards, acts, verifies and rolls back.

One `tick` is one pass of the loop. Each subject (a process, a scratch
directory, an agent, the engine) has at most one action in flight; an action
runs only with the guardrails' ALLOW; after it runs, its signal must recover
before the deadline, and a setting change that did not recover it (or made it
worse) is reverted with the values `configure` returned. Every step (finding,
proposal, verdict, action, verification, rollback) is appended to the audit
log with the evidence behind it.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

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
from llmos.agents.operator.guardrails import ALLOW, NEEDS_APPROVAL, ApprovalQueue, Guardrails, Verdict
from llmos.agents.operator.observe import Observation, Observer
from llmos.agents.operator.policy import Attempt


class Audit(Protocol):
    def append(self, agent: str, tool: str, args: dict, labels: dict | None, decision: str, reason: str,
               evidence: dict | None = None) -> int: ...


class MemoryAudit:
    """An audit log kept in memory (tests, benchmarks); same signature as the security layer's AuditLog."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def append(self, agent: str, tool: str, args: dict, labels: dict | None, decision: str, reason: str,
               evidence: dict | None = None) -> int:
        self.entries.append({"agent": agent, "tool": tool, "args": args, "labels": labels,
                             "decision": decision, "reason": reason, "evidence": evidence})
        return len(self.entries)


class Control(Protocol):
    """The kernel side of the operator's actions (a `Kernel` has these)."""

    def settings(self) -> dict[str, Any]: ...
    def configure(self, **changes: Any) -> dict[str, Any]: ...
    def kill(self, pid: int, reason: str) -> Any: ...
    def suspend(self, pid: int) -> Any: ...


@dataclass
class Outcome:
    ok: bool
    detail: str
    undo: dict[str, Any] | None = None  # settings to restore on rollback


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class Actuator:
    """Carries out allowed actions on the host (psutil, files) and on llmos (the kernel's Control)."""

    def __init__(self, control: Control | None = None) -> None:
        self.control = control

    async def execute(self, action: Any) -> Outcome:
        try:
            return await self._execute(action)
        except (psutil.Error, OSError, ValueError, KeyError, RuntimeError) as e:
            return Outcome(False, f"{type(e).__name__}: {e}")

    async def _execute(self, action: Any) -> Outcome:
        if isinstance(action, NoAction):
            return Outcome(True, "nothing done")
        if isinstance(action, KillProcess):
            proc = psutil.Process(action.pid)
            tree = [*proc.children(recursive=True), proc]
            for p in tree:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            gone, alive = psutil.wait_procs(tree, timeout=3)
            return Outcome(not alive, f"killed {len(gone)} process(es)" + (f", {len(alive)} survived"
                                                                             if alive else ""))
        if isinstance(action, ReniceProcess):
            proc = psutil.Process(action.pid)
            before = proc.nice()
            proc.nice(action.nice)
            return Outcome(True, f"nice {before} -> {action.nice}")
        if isinstance(action, RemoveFiles):
            target = Path(action.path)
            size = sum(f.lstat().st_size for f in target.rglob("*") if f.is_file()) if target.is_dir() \
                else target.lstat().st_size
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
            return Outcome(True, f"removed {action.path} ({size} bytes)")
        if self.control is None:
            return Outcome(False, f"{action.kind} needs the kernel, and the operator runs without one")
        if isinstance(action, SuspendAgent):
            await _maybe_await(self.control.suspend(action.pid))
            return Outcome(True, f"agent {action.pid} suspended")
        if isinstance(action, KillAgent):
            await _maybe_await(self.control.kill(action.pid, action.reason or "killed by the operator"))
            return Outcome(True, f"agent {action.pid} killed")
        if isinstance(action, SetSetting):
            previous = await _maybe_await(self.control.configure(**{action.name: action.value}))
            undo = {action.name: previous[action.name]}
            return Outcome(True, f"{action.name} {previous[action.name]} -> {action.value}", undo)
        return Outcome(False, f"cannot execute {action!r}")

    async def rollback(self, undo: dict[str, Any]) -> Outcome:
        if self.control is None:
            return Outcome(False, "no kernel to roll back on")
        await _maybe_await(self.control.configure(**undo))
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
    guardrails: Guardrails
    detector: Detector = field(default_factory=Detector)
    actuator: Actuator = field(default_factory=Actuator)
    audit: Audit = field(default_factory=MemoryAudit)
    approvals: ApprovalQueue | None = None
    verify_s: float = 10.0  # a signal must recover this long after its action
    worse_factor: float = 1.5  # a setting change whose signal grows past this factor is rolled back early;
    # one that only shrinks it by this factor (not under its limit) is kept as a partial fix
    cooldown_s: float = 5.0  # a subject left alone (no action, refused, queued) is not re-proposed sooner
    name: str = "operator"
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
        self._audit("detect", {}, "observe", finding.describe(), evidence)
        attempts = self._attempts.get(finding.subject, [])
        action = await self.proposer.propose(finding, obs, attempts)
        args = action.model_dump()
        self._emit(obs.t, "proposal", finding.subject, args, f"by {self.proposer.name}")
        verdict = self.guardrails.check(action)
        self._audit(action.kind, args, verdict.decision, verdict.reason,
                    {**evidence, "proposer": self.proposer.name})
        if isinstance(action, NoAction) or not verdict.allowed:
            self._refused(obs, finding, action, verdict, evidence)
            return
        await self._act(obs, finding, action, evidence)

    def _refused(self, obs: Observation, finding: Finding, action: Any, verdict: Verdict,
                 evidence: dict[str, Any]) -> None:
        self._quiet_until[finding.subject] = obs.t + self.cooldown_s
        if finding.source == "baseline":
            self._quiet_baseline.add(finding.subject)
        else:
            self._quiet_baseline.discard(finding.subject)
        if isinstance(action, NoAction):
            return
        step = {NEEDS_APPROVAL: "queued", "dry_run": "dry_run"}.get(verdict.decision, "refused")
        detail = verdict.reason
        if verdict.decision == NEEDS_APPROVAL and self.approvals is not None:
            approval_id = self.approvals.submit(action, evidence)
            self._awaiting[finding.subject] = approval_id  # the subject waits for the human, not re-proposed
            detail += f" (approval id {approval_id})"
        self._emit(obs.t, step, finding.subject, action.model_dump(), detail)

    async def _act(self, obs: Observation, finding: Finding, action: Any, evidence: dict[str, Any],
                   note: str = "") -> bool:
        outcome = await self.actuator.execute(action)
        self.guardrails.executed(action)
        args = action.model_dump()
        self._audit(action.kind, args, "executed" if outcome.ok else "failed", outcome.detail, evidence)
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
            evidence = {"finding": f.finding.as_dict(), "value_now": value, **obs.evidence(subject)}
            if recovered:
                detail = f"{f.finding.signal} back under {f.finding.limit:g} after {obs.t - f.started:.1f}s"
                self._audit("verify", args, "recovered", detail, evidence)
                self._emit(obs.t, "recovered", subject, args, detail)
                continue
            detail = f"{f.finding.signal} {'grew to' if worse else 'still'} {value}"
            if not worse:
                detail += f" after {self.verify_s:g}s" + (" (kept: it helped)" if partial else "")
            self._quiet_until[subject] = obs.t + self.cooldown_s
            self._audit("verify", args, "unrecovered", detail, evidence)
            self._emit(obs.t, "unrecovered", subject, args, detail)
            if f.undo is not None and not partial:
                outcome = await self.actuator.rollback(f.undo)
                self._audit("rollback", f.undo, "executed" if outcome.ok else "failed", outcome.detail,
                            evidence)
                self._emit(obs.t, "rolled_back", subject, f.undo, outcome.detail)

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
            evidence = {**evidence, "approval": approval_id}
            self._audit(action.kind, action.model_dump(), verdict.decision,
                        f"approved as #{approval_id}: {verdict.reason}", evidence)
            if verdict.decision != ALLOW:
                self.approvals.finish(approval_id, "refused")
                self._emit(obs.t, "refused", finding.subject, action.model_dump(), verdict.reason)
                continue
            ok = await self._act(obs, finding, action, evidence, f"approved #{approval_id}: ")
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

    def _audit(self, tool: str, args: dict[str, Any], decision: str, reason: str,
               evidence: dict[str, Any] | None) -> None:
        self.audit.append(self.name, f"operator.{tool}", args, None, decision, reason, evidence)


def default_approvals_path() -> Path:
    from llmos.home import llmos_home

    return llmos_home() / "operator" / "approvals.db"


def this_process_tree() -> frozenset[int]:
    """The pid the operator runs in: granting its children lets it manage what it started."""
    return frozenset({os.getpid()})
