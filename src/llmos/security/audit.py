"""The audit log: every reference-monitor decision, append-only and hash-chained in SQLite.

The log is the protection system's record of who did what (cf. an OS audit
trail such as Linux auditd). Each row holds the agent, the tool, a digest and
a short preview of the arguments, the labels, the decision, its reason and
optional evidence, and the hash of the row before it. Guarantees:

- rows are only ever appended (SQLite triggers refuse UPDATE and DELETE);
- `verify()` recomputes the chain, so an edited, inserted or deleted row is
  found even if someone bypasses the triggers with their own SQLite client;
  a head record (row count and last hash, written in the same transaction)
  also catches the removal of rows at the end;
- an append is one transaction: a crash leaves the chain as it was.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
PREVIEW_CHARS = 400

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    agent TEXT NOT NULL,
    tool TEXT NOT NULL,
    args_digest TEXT NOT NULL,
    args_preview TEXT NOT NULL,
    labels TEXT,
    decision TEXT NOT NULL,
    reason TEXT NOT NULL,
    evidence TEXT,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_head (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    count INTEGER NOT NULL,
    hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

_FIELDS = ("id", "ts", "agent", "tool", "args_digest", "args_preview", "labels", "decision", "reason",
           "evidence", "prev_hash")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def args_digest(args: Any) -> str:
    """SHA-256 of the arguments' canonical JSON: the log proves what was asked without storing it all."""
    return hashlib.sha256(_canonical(args).encode()).hexdigest()


def _row_hash(row: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical([row[f] for f in _FIELDS]).encode()).hexdigest()


def default_audit_path() -> Path:
    from llmos.home import llmos_home

    return llmos_home() / "audit.db"


class AuditLog:
    """An append-only, hash-chained log of reference-monitor decisions in one SQLite file."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_audit_path()
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                   timeout=30)
        if str(self.path) != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def append(self, agent: str, tool: str, args: dict, labels: dict | None, decision: str, reason: str,
               evidence: dict | None = None) -> int:
        """Append one decision; returns its row id."""
        preview = _canonical(args)
        if len(preview) > PREVIEW_CHARS:
            preview = preview[:PREVIEW_CHARS] + "..."
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                head = self._db.execute("SELECT count, hash FROM audit_head WHERE one = 1").fetchone()
                last = self._db.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
                row = {
                    "id": (last[0] + 1) if last else 1,
                    "ts": round(time.time(), 6),
                    "agent": str(agent),
                    "tool": str(tool),
                    "args_digest": args_digest(args),
                    "args_preview": preview,
                    "labels": None if labels is None else _canonical(labels),
                    "decision": str(decision),
                    "reason": str(reason),
                    "evidence": None if evidence is None else _canonical(evidence),
                    "prev_hash": last[1] if last else GENESIS,
                }
                row["hash"] = _row_hash(row)
                self._db.execute(f"INSERT INTO audit ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                                 tuple(row.values()))
                count = (head[0] if head else 0) + 1
                self._db.execute("INSERT OR REPLACE INTO audit_head (one, count, hash) VALUES (1, ?, ?)",
                                 (count, row["hash"]))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return row["id"]

    def _rows(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def verify(self) -> tuple[bool, int | None, str]:
        """(ok, first bad row id or None, message): recompute every hash and link in order."""
        rows = self._rows("SELECT * FROM audit ORDER BY id")
        prev, expect_id = GENESIS, 1
        for row in rows:
            if row["id"] != expect_id:
                return False, expect_id, f"row {expect_id} is missing (next row is {row['id']})"
            if row["prev_hash"] != prev:
                return False, row["id"], f"row {row['id']} does not link to the row before it"
            if _row_hash(row) != row["hash"]:
                return False, row["id"], f"row {row['id']} was modified (its hash does not match)"
            prev, expect_id = row["hash"], expect_id + 1
        head = self._rows("SELECT count, hash FROM audit_head WHERE one = 1")
        count, last = (head[0]["count"], head[0]["hash"]) if head else (0, GENESIS)
        if count != len(rows) or last != prev:
            return False, len(rows) + 1, (f"the log ends at row {len(rows)} but {count} rows were written "
                                          "(rows were removed from the end)")
        return True, None, f"{len(rows)} rows, chain intact"

    def tail(self, n: int = 20) -> list[dict[str, Any]]:
        """The last `n` rows, oldest first, with labels and evidence decoded."""
        rows = self._rows("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (int(n),))
        for row in rows:
            for key in ("labels", "evidence"):
                if row[key] is not None:
                    row[key] = json.loads(row[key])
        return rows[::-1]

    def __len__(self) -> int:
        return self._rows("SELECT COUNT(*) AS n FROM audit")[0]["n"]
