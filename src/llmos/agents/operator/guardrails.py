"""Guardrails: the reference monitor of the operator, enforced outside the model.

Whatever an LLM (or the fallback policy) proposes, an action runs only if
these checks pass, in this order: the kind is allowlisted; its target is
granted (never pid 0 or 1, never the operator itself or its ancestors, only
granted pids or descendants of a granted parent, only paths strictly inside a
granted directory after resolving symlinks, only granted agents and
settings); its blast radius is bounded (process-tree size, files and bytes
removed, how far a setting may move); its kind is under its rate limit. Then
dry-run turns the verdict into a report, and a destructive action waits in
the approval queue until a human approves it (`llmos operator approve ID`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from llmos.agents.operator.actions import (
    ACTION_KINDS,
    POLICIES,
    SETTINGS,
    KillAgent,
    KillProcess,
    RemoveFiles,
    ReniceProcess,
    SetSetting,
    SuspendAgent,
    parse_action,
)
from llmos.agents.operator.observe import granted_processes

ALLOW, DENY, DRY_RUN, NEEDS_APPROVAL = "allow", "deny", "dry_run", "needs_approval"
_INT_RANGES = {"quantum": (1, 65536), "max_running": (1, 4096), "kv_blocks": (1, 1 << 24)}


@dataclass(frozen=True)
class Verdict:
    decision: str  # allow, deny, dry_run, needs_approval
    reason: str

    @property
    def allowed(self) -> bool:
        return self.decision == ALLOW


@dataclass(frozen=True)
class Grants:
    """What the operator may touch; everything else is refused."""

    pids: frozenset[int] = frozenset()
    children_of: frozenset[int] = frozenset()  # descendants of these (not the parents themselves)
    paths: tuple[Path, ...] = ()
    agents: frozenset[int] | None = frozenset()  # None: every agent except the operator's own
    settings: frozenset[str] = frozenset(SETTINGS)
    self_pid: int = field(default_factory=os.getpid)  # the host process the operator runs in
    self_agent: int | None = None  # the operator's own agent pid, when it runs on the kernel


@dataclass(frozen=True)
class Limits:
    kinds: frozenset[str] = frozenset(ACTION_KINDS)
    rate: tuple[int, float] = (3, 60.0)  # at most n actions of one kind per window seconds
    max_tree: int = 8  # a process action may affect this many processes at most (target + descendants)
    max_files: int = 10_000  # one remove_files may delete this many files at most ...
    max_bytes: int = 2 * 2**30  # ... and this many bytes
    max_setting_factor: float = 4.0  # an integer setting may move by this factor at most per action
    approval: frozenset[str] = frozenset({"kill_process", "kill_agent", "remove_files"})


class Guardrails:
    """Checks every proposed action; remembers executed ones for the rate limit."""

    def __init__(self, grants: Grants, limits: Limits | None = None, dry_run: bool = False,
                 settings: Callable[[], dict[str, Any]] | None = None) -> None:
        self.grants = grants
        self.limits = limits or Limits()
        self.dry_run = dry_run
        self.settings = settings  # current llmos settings, to bound how far a change moves
        self._done: dict[str, deque[float]] = {}

    def check(self, action: Any, approved: bool = False, now: float | None = None) -> Verdict:
        now = time.monotonic() if now is None else now
        if action.kind not in self.limits.kinds:
            return Verdict(DENY, f"action kind {action.kind!r} is not allowlisted")
        if action.kind == "none":
            return Verdict(ALLOW, "no action")
        refusal = self._target(action)
        if refusal:
            return Verdict(DENY, refusal)
        n, window = self.limits.rate
        recent = [t for t in self._done.get(action.kind, ()) if now - t < window]
        if len(recent) >= n:
            return Verdict(DENY, f"rate limit: {len(recent)} {action.kind} actions in the last {window:g}s "
                                 f"(at most {n})")
        if self.dry_run:
            return Verdict(DRY_RUN, "dry run: would act")
        if action.destructive and action.kind in self.limits.approval and not approved:
            return Verdict(NEEDS_APPROVAL, f"{action.kind} is destructive: waits for a human approval")
        return Verdict(ALLOW, "within grants and limits")

    def executed(self, action: Any, now: float | None = None) -> None:
        """Count an executed action against its kind's rate limit."""
        self._done.setdefault(action.kind, deque(maxlen=1024)).append(
            time.monotonic() if now is None else now)

    def granted_pids(self) -> set[int]:
        return set(granted_processes(self.grants.pids, self.grants.children_of))

    # -- targets ---------------------------------------------------------------------------------------

    def _target(self, action: Any) -> str | None:
        if isinstance(action, (KillProcess, ReniceProcess)):
            return self._process(action)
        if isinstance(action, (SuspendAgent, KillAgent)):
            return self._agent(action.pid)
        if isinstance(action, SetSetting):
            return self._setting(action)
        if isinstance(action, RemoveFiles):
            return self._path(action.path)
        return f"unknown action {action!r}"

    def _process(self, action: KillProcess | ReniceProcess) -> str | None:
        pid = action.pid
        if pid <= 1:
            return f"pid {pid} is never a target (init and the kernel's idle task)"
        if pid == self.grants.self_pid:
            return f"pid {pid} is the operator itself"
        try:
            if pid in {p.pid for p in psutil.Process(self.grants.self_pid).parents()}:
                return f"pid {pid} is an ancestor of the operator"
        except psutil.Error:
            pass
        if pid not in self.granted_pids():
            return f"pid {pid} was not granted to the operator (or has exited)"
        try:
            proc = psutil.Process(pid)
            tree = 1 + len(proc.children(recursive=True))
            nice = proc.nice()
        except psutil.Error:
            return f"pid {pid} has exited"
        if tree > self.limits.max_tree:
            return f"blast radius: pid {pid} heads {tree} processes (at most {self.limits.max_tree})"
        if isinstance(action, ReniceProcess) and action.nice < nice:
            return f"renice may only lower a priority: pid {pid} is at nice {nice}, asked {action.nice}"
        return None

    def _agent(self, pid: int) -> str | None:
        if self.grants.self_agent is not None and pid == self.grants.self_agent:
            return f"agent {pid} is the operator itself"
        if self.grants.agents is not None and pid not in self.grants.agents:
            return f"agent {pid} was not granted to the operator"
        return None

    def _setting(self, action: SetSetting) -> str | None:
        name, value = action.name, action.value
        if name not in self.grants.settings:
            return f"setting {name!r} was not granted to the operator"
        if name == "policy":
            if value not in POLICIES:
                return f"policy must be one of {', '.join(POLICIES)}, got {value!r}"
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name} must be an integer, got {value!r}"
        lo, hi = _INT_RANGES[name]
        if not lo <= value <= hi:
            return f"{name} must be in [{lo}, {hi}], got {value}"
        current = (self.settings() if self.settings else {}).get(name)
        if isinstance(current, int) and current > 0:
            factor = max(value / current, current / value)
            if factor > self.limits.max_setting_factor:
                return (f"blast radius: {name} {current} -> {value} moves it {factor:.1f}x "
                        f"(at most {self.limits.max_setting_factor:g}x per action)")
        return None

    def _path(self, path: str) -> str | None:
        target = Path(os.path.realpath(path))
        roots = [Path(os.path.realpath(r)) for r in self.grants.paths]
        if not any(target != root and target.is_relative_to(root) for root in roots):
            return f"path {path} is not inside a granted directory"
        if not target.exists():
            return f"path {path} does not exist"
        files = size = 0
        if target.is_dir():
            for dirpath, _, names in os.walk(target):
                for name in names:
                    files += 1
                    try:
                        size += os.lstat(os.path.join(dirpath, name)).st_size
                    except OSError:
                        pass
        else:
            files, size = 1, target.lstat().st_size
        if files > self.limits.max_files or size > self.limits.max_bytes:
            return (f"blast radius: {path} holds {files} files, {size} bytes "
                    f"(at most {self.limits.max_files} files, {self.limits.max_bytes} bytes)")
        return None


class ApprovalQueue:
    """Destructive actions waiting for a human, in SQLite: `llmos operator approve` works from any shell."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS approvals (id INTEGER PRIMARY KEY, created REAL, "
                       "action TEXT NOT NULL, evidence TEXT, status TEXT NOT NULL, decided REAL)")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    def submit(self, action: Any, evidence: dict[str, Any] | None = None) -> int:
        """Queue `action`; the same action already pending keeps its id."""
        text = action.model_dump_json(exclude={"reason"})
        full = action.model_dump_json()
        with self._db() as db:
            for row_id, queued in db.execute("SELECT id, action FROM approvals WHERE status='pending'"):
                if parse_action(queued).model_dump_json(exclude={"reason"}) == text:
                    return row_id
            cur = db.execute("INSERT INTO approvals (created, action, evidence, status) VALUES (?, ?, ?, ?)",
                             (time.time(), full, json.dumps(evidence or {}, default=str), "pending"))
            return int(cur.lastrowid)

    def list(self, status: str | None = "pending") -> list[dict[str, Any]]:
        query = "SELECT id, created, action, evidence, status FROM approvals"
        with self._db() as db:
            rows = db.execute(query + (" WHERE status=?" if status else "") + " ORDER BY id",
                              (status,) if status else ()).fetchall()
        return [{"id": r[0], "created": r[1], "action": json.loads(r[2]), "evidence": json.loads(r[3]),
                 "status": r[4]} for r in rows]

    def decide(self, approval_id: int, approve: bool = True) -> dict[str, Any]:
        """Approve (or reject) a pending action; an unknown or already decided id is a ValueError."""
        with self._db() as db:
            row = db.execute("SELECT status FROM approvals WHERE id=?", (approval_id,)).fetchone()
            if row is None:
                raise ValueError(f"no approval request with id {approval_id}")
            if row[0] != "pending":
                raise ValueError(f"approval request {approval_id} is already {row[0]}")
            db.execute("UPDATE approvals SET status=?, decided=? WHERE id=?",
                       ("approved" if approve else "rejected", time.time(), approval_id))
        return next(r for r in self.list(None) if r["id"] == approval_id)

    def take_approved(self) -> list[tuple[int, Any, dict[str, Any]]]:
        """Approved actions not yet run, with their evidence; each is handed out once."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute("SELECT id, action, evidence FROM approvals WHERE status='approved'").fetchall()
            for row_id, *_ in rows:
                db.execute("UPDATE approvals SET status='taken' WHERE id=?", (row_id,))
            db.execute("COMMIT")
        return [(row_id, parse_action(text), json.loads(ev or "{}")) for row_id, text, ev in rows]

    def finish(self, approval_id: int, status: str) -> None:
        with self._db() as db:
            db.execute("UPDATE approvals SET status=? WHERE id=?", (status, approval_id))
