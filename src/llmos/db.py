"""Opening SQLite databases: the one place that does it, with schema versions and migrations.

Every database llmos keeps under its home (the process table, virtual-context
memory, the audit log, users, agents) is opened here, so each gets the same
treatment, like a file system's superblock check before mount:

- WAL journaling (readers run beside one writer) and a busy timeout, so other
  processes on the same home wait for a lock instead of failing;
- a schema version in the file's header (`PRAGMA user_version`) and an ordered
  list of migrations per database: opening applies those the file has not
  had, each in one transaction with its version bump, so a crash leaves the
  database at the version before or after a migration, never between;
- two processes opening an old file at once migrate it once (the version is
  re-read under the write lock);
- a file written by a newer llmos (a version past the known migrations) is
  refused with `SchemaError` instead of being used with a schema this code
  does not know.

Migration 1 of each database is the schema the code had before versions
existed, written with `IF NOT EXISTS`, so a file made by that code (version 0)
takes it as a no-op and then gets the later migrations without losing a row.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

Migration = str | Callable[[sqlite3.Connection], None]  # an SQL script, or a function given the connection
BUSY_TIMEOUT_S = 30.0


class SchemaError(RuntimeError):
    """The database's schema version cannot be used by this code."""


def statements(script: str) -> list[str]:
    """Split an SQL script into complete statements (trigger bodies keep their inner semicolons)."""
    out, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\r\n;"):
                out.append(pending.strip())
            pending = ""
    if pending.strip(" \t\r\n;"):
        raise ValueError(f"incomplete SQL statement: {pending.strip()[:80]!r}")
    return out


def schema_version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def migrate(db: sqlite3.Connection, migrations: Sequence[Migration], name: str = "database") -> int:
    """Apply the migrations `db` has not had, each in its own transaction; returns the version."""
    while True:
        db.execute("BEGIN IMMEDIATE")  # the write lock: a second opener waits, then sees our version
        try:
            version = schema_version(db)
            if version > len(migrations):
                raise SchemaError(f"{name} has schema version {version}, newer than this llmos knows "
                                  f"({len(migrations)}); upgrade llmos to open it")
            if version == len(migrations):
                db.execute("COMMIT")
                return version
            step = migrations[version]
            if callable(step):
                step(db)
            else:
                for sql in statements(step):
                    db.execute(sql)
            db.execute(f"PRAGMA user_version = {version + 1}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


def connect(path: Path | str, migrations: Sequence[Migration], *, synchronous: str = "NORMAL",
            row_factory: object = sqlite3.Row) -> sqlite3.Connection:
    """Open (creating if needed) the SQLite file `path` and bring its schema up to date.

    The connection is in autocommit mode (`BEGIN ... COMMIT` is explicit), may be
    used from any thread (callers serialize their own use), and returns rows as
    `sqlite3.Row` unless `row_factory` says otherwise. `synchronous`: NORMAL
    survives a crash of the process (not of the machine); FULL survives both.
    """
    memory = str(path) == ":memory:"
    if not memory:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
    try:
        db.row_factory = row_factory  # type: ignore[assignment]
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if not memory:
            db.execute("PRAGMA journal_mode=WAL")
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"unknown synchronous mode {synchronous!r}")
        db.execute(f"PRAGMA synchronous={synchronous}")
        migrate(db, migrations, name=str(path))
    except BaseException:
        db.close()
        raise
    return db
