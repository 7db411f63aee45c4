"""Guardrails: what the operator may touch, as capabilities the one reference monitor enforces.

The operator acts only through syscalls (tools/host.py for the host, the
kernel's `configure` and `signal` for llmos), so its guardrails are grants
(`Grants.capabilities()`), checked by the same monitor as every agent's call
and recorded in the same audit log: which pids it may signal (listed ones, or
descendants of a listed parent), which directories it may remove files from,
which agents it may suspend or kill, which settings it may change and within
what bounds, and how large a blast radius one call may accept (process-tree
size, files and bytes removed). Anything else is denied by the monitor and
audited. The host tools add what no grant can lift: never pid 0 or 1, the
kernel or its ancestors; the kernel never lets an agent signal itself.

What remains here is the operator's own workflow, which protects nothing by
itself: a rate limit per kind of action, dry-run, and the approval queue in
which a destructive action waits for a human (`llmos operator approve ID`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from llmos.agents.operator.actions import POLICIES, parse_action

ALLOW, DENY, DRY_RUN, NEEDS_APPROVAL = "allow", "deny", "dry_run", "needs_approval"
# The settings the operator may change and their bounds (a tuple of values, or an integer range).
SETTING_BOUNDS: dict[str, tuple] = {"policy": POLICIES, "quantum": (1, 65536), "max_running": (1, 4096),
                                    "kv_blocks": (1, 1 << 24)}


@dataclass(frozen=True)
class Verdict:
    decision: str  # allow, deny, dry_run, needs_approval
    reason: str

    @property
    def allowed(self) -> bool:
        return self.decision == ALLOW


@dataclass(frozen=True)
class Grants:
    """What the operator may touch, as grants for the reference monitor; everything else is denied."""

    pids: frozenset[int] = frozenset()
    children_of: frozenset[int] = frozenset()  # descendants of these (not the parents themselves)
    paths: tuple[Path, ...] = ()  # files strictly inside these directories
    agents: frozenset[int] | None = frozenset()  # None: every agent (the kernel refuses its own pid)
    settings: Mapping[str, tuple] = field(default_factory=lambda: dict(SETTING_BOUNDS))
    max_tree: int = 8  # a process action may affect this many processes at most (target + descendants)
    max_files: int = 10_000  # one removal may delete this many files at most ...
    max_bytes: int = 2 * 2**30  # ... and this many bytes

    def within(self, pid: int) -> int | None:
        """The granted parent `pid` descends from, when it is not granted by itself (a tool argument)."""
        if pid in self.pids:
            return None
        try:
            ancestors = {p.pid for p in psutil.Process(pid).parents()}
        except psutil.Error:
            return None
        return next((p for p in sorted(self.children_of) if p in ancestors), None)

    def capabilities(self) -> list[dict[str, Any]]:
        """The grants (policy-file form) the operator's process holds."""
        out: list[dict[str, Any]] = [{"tool": "kernel.stats"}]
        process_bounds = {"host.kill_process": {"max_tree": {"min": 1, "max": self.max_tree}},
                          "host.renice_process": {"nice": {"min": 0, "max": 19}}}
        for tool, bounds in process_bounds.items():
            for arg, pids in (("pid", self.pids), ("within", self.children_of)):
                if pids:
                    out.append({"tool": tool, "allow": {arg: [str(p) for p in sorted(pids)]},
                                "bounds": bounds})
        blast = {"max_files": {"min": 1, "max": self.max_files},
                 "max_bytes": {"min": 0, "max": self.max_bytes}}
        for root in self.paths:
            out.append({"tool": "host.remove_files", "root": os.path.realpath(root),
                        "paths": {"path": ["**"]}, "bounds": blast})
        signals: dict[str, list[str]] = {"signal": ["suspend", "kill"]}
        if self.agents is None:
            out.append({"tool": "kernel.signal", "allow": signals})
        elif self.agents:
            targets = [str(a) for a in sorted(self.agents)]
            out.append({"tool": "kernel.signal", "allow": {**signals, "target": targets}})
        for name, bound in self.settings.items():
            if name == "policy":
                out.append({"tool": "kernel.configure", "allow": {"policy": list(bound)}})
            else:
                out.append({"tool": "kernel.configure",
                            "bounds": {name: {"min": bound[0], "max": bound[1]}}})
        return out


@dataclass(frozen=True)
class Limits:
    rate: tuple[int, float] = (3, 60.0)  # at most n actions of one kind per window seconds
    approval: frozenset[str] = frozenset({"kill_process", "kill_agent", "remove_files"})


class Guardrails:
    """The operator's workflow gate: rate limit, dry-run, approval. Protection is the monitor's."""

    def __init__(self, limits: Limits | None = None, dry_run: bool = False) -> None:
        self.limits = limits or Limits()
        self.dry_run = dry_run
        self._done: dict[str, deque[float]] = {}

    def check(self, action: Any, approved: bool = False, now: float | None = None) -> Verdict:
        now = time.monotonic() if now is None else now
        if action.kind == "none":
            return Verdict(ALLOW, "no action")
        n, window = self.limits.rate
        recent = [t for t in self._done.get(action.kind, ()) if now - t < window]
        if len(recent) >= n:
            return Verdict(DENY, f"rate limit: {len(recent)} {action.kind} actions in the last {window:g}s "
                                 f"(at most {n})")
        if self.dry_run:
            return Verdict(DRY_RUN, "dry run: would act")
        if action.destructive and action.kind in self.limits.approval and not approved:
            return Verdict(NEEDS_APPROVAL, f"{action.kind} is destructive: waits for a human approval")
        return Verdict(ALLOW, "to the reference monitor")

    def executed(self, action: Any, now: float | None = None) -> None:
        """Count an executed action against its kind's rate limit."""
        self._done.setdefault(action.kind, deque(maxlen=1024)).append(
            time.monotonic() if now is None else now)


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
