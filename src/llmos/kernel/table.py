"""The process table on disk (SQLite under the llmos home), shared by every kernel.

Each kernel boot is a row; each agent it ran is a row that outlives it, so
`llmos ps` in another terminal sees live agents, and a restarted kernel knows
which agents existed and how they ended. A boot whose kernel process is gone
had its unfinished agents end with it: they are marked terminated on the
next boot. Signals (`llmos kill`) travel through the table too. The file is
opened by `llmos.db` (WAL: readers run beside the kernel's writes; a schema
version with migrations); every write is one transaction. Each process has
the `owner` (a user id) it was spawned for.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from llmos.db import connect

_MIGRATIONS = [
    # 1: the schema of the table before versions (a file made then has version 0 and these tables)
    """
    CREATE TABLE IF NOT EXISTS boots (
        boot INTEGER PRIMARY KEY AUTOINCREMENT, os_pid INTEGER, started REAL, ended REAL,
        heartbeat REAL, status TEXT);
    CREATE TABLE IF NOT EXISTS processes (
        pid INTEGER PRIMARY KEY AUTOINCREMENT, boot INTEGER, name TEXT, parent INTEGER, state TEXT,
        priority INTEGER, weight REAL, quotas TEXT, tokens_used INTEGER, tool_calls INTEGER,
        syscalls INTEGER, syscall_errors INTEGER, current_syscall TEXT, created REAL, ended REAL,
        exit_reason TEXT, result TEXT);
    CREATE TABLE IF NOT EXISTS syscalls (
        id INTEGER PRIMARY KEY AUTOINCREMENT, pid INTEGER, name TEXT, args TEXT, status TEXT,
        started REAL, duration REAL);
    CREATE TABLE IF NOT EXISTS signals (
        id INTEGER PRIMARY KEY AUTOINCREMENT, pid INTEGER, signal TEXT, sent REAL, handled REAL,
        outcome TEXT);
    """,
    # 2: users: every process belongs to one (processes from before users belong to the local user)
    """
    ALTER TABLE processes ADD COLUMN owner TEXT NOT NULL DEFAULT 'local';
    CREATE INDEX processes_owner ON processes(owner, pid);
    CREATE INDEX syscalls_pid ON syscalls(pid, id);
    """,
]

_PROCESS_FIELDS = ("name", "parent", "state", "priority", "weight", "quotas", "tokens_used", "tool_calls",
                   "syscalls", "syscall_errors", "current_syscall", "created", "ended", "exit_reason",
                   "result")
ARG_LIMIT = 200  # characters of a syscall's arguments kept in the log


def os_pid_alive(os_pid: int) -> bool:
    """Whether an OS process with this pid exists (another user's counts)."""
    try:
        os.kill(os_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _truncate(value: Any, limit: int = ARG_LIMIT) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=repr, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ProcessTable:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = connect(path, _MIGRATIONS)
        self.boot: int | None = None

    def _tx(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        with self.db:  # one transaction
            return self.db.execute(sql, params)

    # -- the kernel's side ---------------------------------------------------------

    def start_boot(self) -> int:
        """Register this kernel; agents of boots whose kernel died are ended first."""
        for row in self.db.execute("SELECT boot, os_pid FROM boots WHERE ended IS NULL").fetchall():
            if not os_pid_alive(row["os_pid"]):
                self.end_boot(row["boot"], reason=f"kernel exited (boot {row['boot']})")
        now = time.time()
        self.boot = self._tx("INSERT INTO boots (os_pid, started, heartbeat) VALUES (?, ?, ?)",
                             (os.getpid(), now, now)).lastrowid
        return self.boot

    def end_boot(self, boot: int, reason: str = "kernel shut down") -> None:
        now = time.time()
        with self.db:
            self.db.execute("UPDATE processes SET state='terminated', ended=?, exit_reason=?, "
                            "current_syscall=NULL WHERE boot=? AND state!='terminated'", (now, reason, boot))
            self.db.execute("UPDATE boots SET ended=? WHERE boot=?", (now, boot))

    def new_pid(self, name: str, parent: int | None, owner: str = "local") -> int:
        return self._tx("INSERT INTO processes (boot, name, parent, state, created, owner) "
                        "VALUES (?, ?, ?, 'new', ?, ?)",
                        (self.boot, name, parent, time.time(), owner)).lastrowid

    def save(self, infos: list[dict[str, Any]]) -> None:
        rows = [tuple(_truncate(i[f], 2000) if f in ("quotas", "result") and i[f] is not None else i[f]
                      for f in _PROCESS_FIELDS) + (i["pid"],) for i in infos]
        sets = ", ".join(f"{f}=?" for f in _PROCESS_FIELDS)
        with self.db:
            self.db.executemany(f"UPDATE processes SET {sets} WHERE pid=?", rows)

    def heartbeat(self, status: dict[str, Any]) -> None:
        self._tx("UPDATE boots SET heartbeat=?, status=? WHERE boot=?",
                 (time.time(), json.dumps(status), self.boot))

    def log_syscall(self, pid: int, name: str, args: dict[str, Any], status: str, started: float,
                    duration: float) -> None:
        self._tx("INSERT INTO syscalls (pid, name, args, status, started, duration) "
                 "VALUES (?, ?, ?, ?, ?, ?)",
                 (pid, name, _truncate(args), status, started, duration))

    def take_signals(self) -> list[sqlite3.Row]:
        """Signals sent to this boot's agents and not yet handled."""
        return self.db.execute(
            "SELECT s.id, s.pid, s.signal FROM signals s JOIN processes p ON p.pid = s.pid "
            "WHERE s.handled IS NULL AND p.boot = ?", (self.boot,)).fetchall()

    def signal_handled(self, signal_id: int, outcome: str) -> None:
        self._tx("UPDATE signals SET handled=?, outcome=? WHERE id=?", (time.time(), outcome, signal_id))

    # -- anyone's side (llmos ps / top / kill) ---------------------------------------

    def processes(self, only_live: bool = False, limit: int = 50,
                  owner: str | None = None) -> list[dict[str, Any]]:
        """The newest `limit` processes, oldest first; `owner`: only that user's."""
        conds, params = [], []
        if only_live:
            conds.append("state != 'terminated'")
        if owner is not None:
            conds.append("owner = ?")
            params.append(owner)
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        rows = self.db.execute(f"SELECT * FROM processes {where} ORDER BY pid DESC LIMIT ?",
                               (*params, limit))
        return [dict(r) for r in rows.fetchall()][::-1]

    def names_only_of(self, owner: str) -> set[str]:
        """Process names that only `owner`'s processes ever had (a name shared with another user's
        process is left out: records kept by name, like audit rows, cannot say whose they are)."""
        rows = self.db.execute("SELECT name FROM processes GROUP BY name "
                               "HAVING COUNT(DISTINCT owner) = 1 AND MIN(owner) = ?", (owner,))
        return {r["name"] for r in rows.fetchall()}

    def process(self, pid: int) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM processes WHERE pid=?", (pid,)).fetchone()
        return dict(row) if row else None

    def syscall_log(self, pid: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
        where, params = ("WHERE pid=?", (pid, limit)) if pid is not None else ("", (limit,))
        rows = self.db.execute(f"SELECT * FROM syscalls {where} ORDER BY id DESC LIMIT ?", params)
        return [dict(r) for r in rows.fetchall()][::-1]

    def live_boots(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM boots WHERE ended IS NULL ORDER BY boot").fetchall()
        return [dict(r) | {"status": json.loads(r["status"] or "{}")} for r in rows
                if os_pid_alive(r["os_pid"])]

    def send_signal(self, pid: int, signal: str) -> int:
        return self._tx("INSERT INTO signals (pid, signal, sent) VALUES (?, ?, ?)",
                        (pid, signal, time.time())).lastrowid

    def signal_outcome(self, signal_id: int) -> str | None:
        row = self.db.execute("SELECT outcome FROM signals WHERE id=?", (signal_id,)).fetchone()
        return row["outcome"] if row else None

    def close(self) -> None:
        self.db.close()
