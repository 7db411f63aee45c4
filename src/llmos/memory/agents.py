"""Agent definitions, runs and the step journal: what makes an agent the API created outlive the
server (cf. a file system's inodes plus its journal).

An agent is a definition (name, system prompt, tools, tool rules, model settings, tags, metadata,
owner) in `agents.db`, and its memory (core blocks, messages, summary, archival passages) in the
virtual-context store `memory.db`, keyed by the agent's id. A run is one message handed to an agent,
with its status (created = queued, running, completed, failed, cancelled).

Each step of a run is one transaction by undo logging: before the step writes anything, its journal
row records the agent's core blocks and the last message and passage ids; the step commits when that
row is deleted. `recover` (run at startup, and after a killed run) rolls back every step whose row is
still there: its messages and passages are deleted and the blocks restored. Guarantees: after a crash
(`kill -9`) at any instant, each step is in the store completely or not at all; a run that was running
is failed with a reason saying so, and runs still queued keep their place.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from llmos.db import connect
from llmos.memory.store import MemoryStore

RUN_STATES = ("created", "running", "completed", "failed", "cancelled")
INTERRUPTED = "interrupted: the server stopped during this run; its unfinished step was rolled back"

_MIGRATIONS = [
    """
    CREATE TABLE agents (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        description TEXT,
        system TEXT NOT NULL,
        tools TEXT NOT NULL,
        tool_rules TEXT NOT NULL,
        model TEXT,
        context_window_limit INTEGER,
        max_tokens INTEGER,
        tags TEXT NOT NULL,
        metadata TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        last_stop_reason TEXT,
        last_run_completion REAL
    );
    CREATE INDEX agents_owner ON agents(owner, seq);
    CREATE TABLE runs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        agent_id TEXT NOT NULL,
        owner TEXT NOT NULL,
        status TEXT NOT NULL,
        stop_reason TEXT,
        input TEXT NOT NULL,
        max_steps INTEGER,
        background INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        usage TEXT,
        first_message INTEGER,
        last_message INTEGER,
        created_at REAL NOT NULL,
        started_at REAL,
        completed_at REAL
    );
    CREATE INDEX runs_agent ON runs(agent_id, seq);
    CREATE TABLE step_journal (
        agent_id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL,
        blocks TEXT NOT NULL,
        summary TEXT NOT NULL,
        last_message INTEGER NOT NULL,
        last_passage INTEGER NOT NULL,
        started_at REAL NOT NULL
    );
    """,
]


class AgentStoreError(ValueError):
    """A request the store refuses (unknown id, bad value); the message says which."""


@dataclass
class AgentDef:
    """An agent's definition (its memory lives in memory.db under `id`)."""

    id: str
    owner: str
    name: str
    system: str
    tools: list[str]
    tool_rules: list[dict[str, Any]] = field(default_factory=list)
    description: str | None = None
    model: str | None = None
    context_window_limit: int | None = None
    max_tokens: int | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    last_stop_reason: str | None = None
    last_run_completion: float | None = None


@dataclass
class Run:
    id: str
    agent_id: str
    owner: str
    status: str
    input: str
    created_at: float
    max_steps: int | None = None
    background: bool = False
    stop_reason: str | None = None
    error: str | None = None
    usage: dict[str, Any] | None = None
    first_message: int | None = None
    last_message: int | None = None
    started_at: float | None = None
    completed_at: float | None = None


_JSON_FIELDS = {"tools", "tool_rules", "tags", "metadata"}
_EDITABLE = {"name", "system", "tools", "tool_rules", "description", "model", "context_window_limit",
             "max_tokens", "tags", "metadata", "last_stop_reason", "last_run_completion"}


def _agent(row) -> AgentDef:
    values = {f.name: row[f.name] for f in fields(AgentDef)}
    for k in _JSON_FIELDS:
        values[k] = json.loads(values[k])
    return AgentDef(**values)


def _run(row) -> Run:
    values = {f.name: row[f.name] for f in fields(Run)}
    values["background"] = bool(values["background"])
    values["usage"] = json.loads(values["usage"]) if values["usage"] else None
    return Run(**values)


class AgentStore:
    """Agent definitions and runs of one llmos home (agents.db), next to its memory store."""

    def __init__(self, path: Path | str, memory: MemoryStore) -> None:
        self.path = Path(path)
        self.memory = memory
        self._db = connect(self.path, _MIGRATIONS)
        self._lock = threading.RLock()

    def _write(self, sql: str, params: tuple = ()) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(sql, params)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return cur.rowcount

    def _query(self, sql: str, params: tuple = ()) -> list:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -- agents -----------------------------------------------------------------------------------

    def create(self, agent: AgentDef, blocks: list[tuple[str, str, int]], instructions: str,
               fill: Callable[[sqlite3.Connection], None] | None = None) -> AgentDef:
        """Store a new agent: its memory first, in one transaction (`instructions`: the system prompt
        the model sees; `fill(db)` adds more, e.g. an imported history), then its definition (so a
        crash between the two leaves no agent that lists without its memory)."""
        now = time.time()
        agent.created_at = agent.updated_at = now
        with self.memory.transaction() as db:
            db.execute("INSERT INTO agents(name, system, created_at) VALUES (?, ?, ?)",
                       (agent.id, instructions, now))
            db.executemany("INSERT INTO core_blocks(agent, label, value, char_limit) VALUES (?,?,?,?)",
                           [(agent.id, label, value, limit) for label, value, limit in blocks])
            if fill is not None:
                fill(db)
        cols = [f.name for f in fields(AgentDef)]
        values = tuple(json.dumps(getattr(agent, c)) if c in _JSON_FIELDS else getattr(agent, c)
                       for c in cols)
        self._write(f"INSERT INTO agents({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", values)
        return agent

    def get(self, agent_id: str) -> AgentDef | None:
        rows = self._query("SELECT * FROM agents WHERE id = ?", (agent_id,))
        return _agent(rows[0]) if rows else None

    def list(self, owner: str | None = None, *, after: str | None = None, before: str | None = None,
             limit: int | None = None, descending: bool = False, name: str | None = None,
             tags: list[str] | None = None, match_all_tags: bool = False) -> builtins.list[AgentDef]:
        """Agents (of `owner`, or all for None) in creation order (newest first if `descending`);
        `after`/`before` are agent ids, meaning after/before in that order."""
        where, params = ["1 = 1"], []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if name is not None:
            where.append("name = ?")
            params.append(name)
        for cursor, later in ((after, True), (before, False)):
            if cursor is not None:
                op = ">" if later != descending else "<"
                where.append(f"seq {op} (SELECT seq FROM agents WHERE id = ?)")
                params.append(cursor)
        rows = self._query(f"SELECT * FROM agents WHERE {' AND '.join(where)} ORDER BY seq "
                           f"{'DESC' if descending else 'ASC'}", tuple(params))
        agents = [_agent(r) for r in rows]
        if tags:
            want = set(tags)
            agents = [a for a in agents if (want <= set(a.tags) if match_all_tags else want & set(a.tags))]
        return agents[:limit] if limit else agents

    def update(self, agent_id: str, **changes: Any) -> AgentDef:
        unknown = set(changes) - _EDITABLE
        if unknown:
            raise AgentStoreError(f"cannot change {', '.join(sorted(unknown))}")
        if not changes:
            return self._must(agent_id)
        sets = ", ".join(f"{k} = ?" for k in changes)
        values = [json.dumps(v) if k in _JSON_FIELDS else v for k, v in changes.items()]
        if self._write(f"UPDATE agents SET {sets}, updated_at = ? WHERE id = ?",
                       (*values, time.time(), agent_id)) == 0:
            raise AgentStoreError(f"no agent {agent_id}")
        return self._must(agent_id)

    def set_instructions(self, agent_id: str, instructions: str) -> None:
        """The system prompt the model sees from the agent's next step on."""
        with self.memory.transaction() as db:
            db.execute("UPDATE agents SET system = ? WHERE name = ?", (instructions, agent_id))

    def _must(self, agent_id: str) -> AgentDef:
        agent = self.get(agent_id)
        if agent is None:
            raise AgentStoreError(f"no agent {agent_id}")
        return agent

    def delete(self, agent_id: str) -> None:
        """Delete the definition (the agent is gone from then on), then its memory and runs."""
        if self._write("DELETE FROM agents WHERE id = ?", (agent_id,)) == 0:
            raise AgentStoreError(f"no agent {agent_id}")
        self._write("DELETE FROM runs WHERE agent_id = ?", (agent_id,))
        self._write("DELETE FROM step_journal WHERE agent_id = ?", (agent_id,))
        with self.memory.transaction() as db:
            for table, col in (("core_blocks", "agent"), ("messages", "agent"), ("passages", "agent"),
                               ("agents", "name")):
                db.execute(f"DELETE FROM {table} WHERE {col} = ?", (agent_id,))
            db.execute("INSERT INTO archival_versions(agent, version) VALUES (?, 1) "
                       "ON CONFLICT(agent) DO UPDATE SET version = version + 1", (agent_id,))

    # -- runs -------------------------------------------------------------------------------------

    def new_run(self, agent: AgentDef, text: str, max_steps: int | None, background: bool) -> Run:
        run = Run(f"run-{uuid.uuid4()}", agent.id, agent.owner, "created", text, time.time(), max_steps,
                  background)
        self._write("INSERT INTO runs(id, agent_id, owner, status, input, max_steps, background, created_at) "
                    "VALUES (?,?,?,?,?,?,?,?)", (run.id, run.agent_id, run.owner, run.status, run.input,
                                                run.max_steps, int(background), run.created_at))
        return run

    def get_run(self, run_id: str) -> Run | None:
        rows = self._query("SELECT * FROM runs WHERE id = ?", (run_id,))
        return _run(rows[0]) if rows else None

    def runs(self, owner: str | None = None, agent_id: str | None = None,
             statuses: tuple[str, ...] | None = None) -> builtins.list[Run]:
        where, params = ["1 = 1"], []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if agent_id is not None:
            where.append("agent_id = ?")
            params.append(agent_id)
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            params += statuses
        return [_run(r) for r in self._query(f"SELECT * FROM runs WHERE {' AND '.join(where)} ORDER BY seq",
                                             tuple(params))]

    def set_run(self, run_id: str, **changes: Any) -> None:
        if "status" in changes and changes["status"] not in RUN_STATES:
            raise AgentStoreError(f"run status must be one of {', '.join(RUN_STATES)}")
        if "usage" in changes:
            changes["usage"] = json.dumps(changes["usage"])
        sets = ", ".join(f"{k} = ?" for k in changes)
        self._write(f"UPDATE runs SET {sets} WHERE id = ?", (*changes.values(), run_id))

    # -- the step journal -------------------------------------------------------------------------

    def begin_step(self, agent_id: str, run_id: str) -> None:
        """Record the state a step may change (its undo record); the step is open until `end_step`."""
        blocks = self.memory.query("SELECT label, value, char_limit FROM core_blocks WHERE agent = ?",
                                   (agent_id,))
        summary = self.memory.query("SELECT summary FROM agents WHERE name = ?", (agent_id,))
        last_message = self.last_message(agent_id)
        last_passage = self.memory.query("SELECT coalesce(max(id), 0) FROM passages WHERE agent = ?",
                                         (agent_id,))[0][0]
        self._write("INSERT OR REPLACE INTO step_journal(agent_id, run_id, blocks, summary, last_message, "
                    "last_passage, started_at) VALUES (?,?,?,?,?,?,?)",
                    (agent_id, run_id, json.dumps([tuple(b) for b in blocks]),
                     summary[0][0] if summary else "", last_message, last_passage, time.time()))

    def last_message(self, agent_id: str) -> int:
        """The id of the agent's newest stored message (0 for none)."""
        rows = self.memory.query("SELECT coalesce(max(id), 0) FROM messages WHERE agent = ?", (agent_id,))
        return rows[0][0]

    def end_step(self, agent_id: str) -> None:
        """Commit the open step of the agent (deleting its undo record is the commit point)."""
        self._write("DELETE FROM step_journal WHERE agent_id = ?", (agent_id,))

    def open_step(self, agent_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM step_journal WHERE agent_id = ?", (agent_id,)))

    def rollback_step(self, agent_id: str) -> bool:
        """Undo the agent's open step, if any; True when there was one."""
        rows = self._query("SELECT * FROM step_journal WHERE agent_id = ?", (agent_id,))
        if not rows:
            return False
        j = rows[0]
        with self.memory.transaction() as db:
            db.execute("DELETE FROM messages WHERE agent = ? AND id > ?", (agent_id, j["last_message"]))
            db.execute("DELETE FROM passages WHERE agent = ? AND id > ?", (agent_id, j["last_passage"]))
            db.execute("INSERT INTO archival_versions(agent, version) VALUES (?, 1) "
                       "ON CONFLICT(agent) DO UPDATE SET version = version + 1", (agent_id,))
            db.execute("DELETE FROM core_blocks WHERE agent = ?", (agent_id,))
            db.executemany("INSERT INTO core_blocks(agent, label, value, char_limit) VALUES (?,?,?,?)",
                           [(agent_id, *b) for b in json.loads(j["blocks"])])
            db.execute("UPDATE agents SET summary = ? WHERE name = ?", (j["summary"], agent_id))
        self.end_step(agent_id)
        return True

    def recover(self) -> builtins.list[str]:
        """After a restart: roll back open steps, fail the runs that were running; returns the ids of
        runs still queued (in order), for the caller to run again."""
        for row in self._query("SELECT agent_id FROM step_journal"):
            self.rollback_step(row["agent_id"])
        for run in self.runs(statuses=("running",)):
            self.set_run(run.id, status="failed", stop_reason="error", error=INTERRUPTED,
                         completed_at=time.time())
        return [r.id for r in self.runs(statuses=("created",))]

    def close(self) -> None:
        with self._lock:
            self._db.close()
