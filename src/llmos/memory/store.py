"""The backing store of virtual context: one SQLite database, the "disk" that
main context pages to and from.

Every agent's core memory, messages (recall storage), summary and archival
passages live in `memory.db` under the llmos home directory, keyed by the
agent's name. Guarantees: the database is opened by `llmos.db` (WAL mode, a
schema version and its migrations), every change is made
inside one transaction (a crash leaves the state before or after it, never
between), and reopening the file after a restart gives back exactly what was
committed.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmos.db import connect

_MIGRATIONS: list[str] = [
    # 1: the schema of the store before versions (a file made then has version 0 and these tables)
    """
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    system TEXT NOT NULL,
    summary TEXT NOT NULL DEFAULT '',
    memory_stats TEXT NOT NULL DEFAULT '',
    summaries INTEGER NOT NULL DEFAULT 0,
    evictions INTEGER NOT NULL DEFAULT 0,
    warned INTEGER NOT NULL DEFAULT 0,
    llm_calls INTEGER NOT NULL DEFAULT 0,
    largest_prompt INTEGER NOT NULL DEFAULT 0,
    overflows INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS core_blocks (
    agent TEXT NOT NULL REFERENCES agents(name),
    label TEXT NOT NULL,
    value TEXT NOT NULL,
    char_limit INTEGER NOT NULL,
    PRIMARY KEY (agent, label)
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    agent TEXT NOT NULL,
    role TEXT NOT NULL,
    name TEXT,
    content TEXT NOT NULL,
    search_text TEXT NOT NULL,
    created_at REAL NOT NULL,
    in_context INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS messages_agent_time ON messages(agent, created_at);
CREATE INDEX IF NOT EXISTS messages_agent_queue ON messages(agent, in_context, id);
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(
    search_text, content='messages', content_rowid='id', tokenize='porter unicode61');
CREATE TRIGGER IF NOT EXISTS messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, search_text) VALUES (new.id, new.search_text);
END;
CREATE TRIGGER IF NOT EXISTS messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, search_text) VALUES ('delete', old.id, old.search_text);
END;
CREATE TABLE IF NOT EXISTS passages (
    id INTEGER PRIMARY KEY,
    agent TEXT NOT NULL,
    text TEXT NOT NULL,
    embedding BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS passages_agent ON passages(agent, id);
CREATE TABLE IF NOT EXISTS archival_versions (
    agent TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
""",
]


class MemoryStore:
    """One connection to memory.db, shared by the threads of this process under a lock."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._depth = 0
        self._conn = connect(self.path, _MIGRATIONS)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All statements inside commit together or not at all (nested uses join the outer one)."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._conn
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")
            finally:
                self._depth = 0

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._conn.execute(sql, params)
            return cur.fetchall()

    def ensure_agent(self, name: str, system: str, created_at: float) -> bool:
        """Create the agent's row unless it exists; True when it was created (a first run)."""
        with self.transaction() as db:
            cur = db.execute("INSERT OR IGNORE INTO agents(name, system, created_at) VALUES (?, ?, ?)",
                             (name, system, created_at))
            return cur.rowcount == 1

    def agent(self, name: str) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM agents WHERE name = ?", (name,))
        return rows[0] if rows else None

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        _STORES.pop(self.path.resolve(), None)


_STORES: dict[Path, MemoryStore] = {}
_STORES_LOCK = threading.Lock()


def open_store(home: Path | str) -> MemoryStore:
    """The store of the llmos home `home` (memory.db in it), one per process."""
    path = (Path(home) / "memory.db").resolve()
    with _STORES_LOCK:
        store = _STORES.get(path)
        if store is None:
            store = _STORES[path] = MemoryStore(path)
        return store
