"""llmos.db: schema versions, ordered migrations, and databases written by main before versions."""

import shutil
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from llmos.db import SchemaError, connect, schema_version, statements
from llmos.kernel.table import ProcessTable
from llmos.memory.archival import ArchivalStorage
from llmos.memory.core import CoreMemory
from llmos.memory.recall import RecallStorage
from llmos.memory.store import MemoryStore
from llmos.security.audit import AuditLog

FIXTURES = Path(__file__).parent / "fixtures" / "main_f02445c"  # made by make_fixtures.py at f02445c


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copy(FIXTURES / name, dst)
    return dst


def _rows(path: Path, table: str) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
    finally:
        db.close()


V1 = "CREATE TABLE t (a INTEGER);"
V2 = "ALTER TABLE t ADD COLUMN b TEXT NOT NULL DEFAULT 'x'; CREATE INDEX t_b ON t(b);"


def test_new_database_gets_every_migration_in_order(tmp_path):
    db = connect(tmp_path / "a.db", [V1, V2])
    assert schema_version(db) == 2
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute("INSERT INTO t (a) VALUES (1)")
    assert tuple(db.execute("SELECT a, b FROM t").fetchone()) == (1, "x")
    db.close()
    db = connect(tmp_path / "a.db", [V1, V2])  # reopening applies nothing twice
    assert schema_version(db) == 2 and db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1


def test_a_later_migration_runs_on_an_older_file_only(tmp_path):
    connect(tmp_path / "a.db", [V1]).execute("INSERT INTO t (a) VALUES (7)")
    db = connect(tmp_path / "a.db", [V1, V2])
    assert schema_version(db) == 2
    assert [tuple(r) for r in db.execute("SELECT a, b FROM t")] == [(7, "x")]


def test_a_failing_migration_leaves_the_version_and_data_before_it(tmp_path):
    connect(tmp_path / "a.db", [V1]).execute("INSERT INTO t (a) VALUES (7)")
    broken = "ALTER TABLE t ADD COLUMN c TEXT; INSERT INTO nowhere VALUES (1);"
    with pytest.raises(sqlite3.OperationalError, match="nowhere"):
        connect(tmp_path / "a.db", [V1, broken])
    db = connect(tmp_path / "a.db", [V1])
    assert schema_version(db) == 1
    assert [d[1] for d in db.execute("PRAGMA table_info(t)")] == ["a"]  # the ALTER was rolled back
    assert db.execute("SELECT a FROM t").fetchone()[0] == 7


def test_a_file_from_a_newer_llmos_is_refused(tmp_path):
    connect(tmp_path / "a.db", [V1, V2]).close()
    with pytest.raises(SchemaError, match="schema version 2, newer than this llmos knows \\(1\\)"):
        connect(tmp_path / "a.db", [V1])


def test_callable_migrations_and_trigger_bodies(tmp_path):
    trig = ("CREATE TABLE log (x); CREATE TABLE t (a); CREATE TRIGGER tr AFTER INSERT ON t BEGIN "
            "INSERT INTO log VALUES (new.a); INSERT INTO log VALUES (new.a + 1); END;")
    assert len(statements(trig)) == 3
    db = connect(tmp_path / "a.db", [trig, lambda c: c.execute("INSERT INTO t VALUES (10)")])
    assert [r[0] for r in db.execute("SELECT x FROM log")] == [10, 11]


def test_two_openers_at_once_migrate_once(tmp_path):
    calls: list[int] = []

    def slow(c):
        calls.append(1)
        c.execute("CREATE TABLE once (a)")  # a second run would fail: the table exists

    errors: list[BaseException] = []

    def open_it():
        try:
            connect(tmp_path / "a.db", [V1, slow]).close()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and calls == [1]


def test_process_table_of_main_migrates_without_losing_a_row(tmp_path):
    path = _copy("kernel.db", tmp_path)
    before = {t: _rows(path, t) for t in ("boots", "processes", "syscalls", "signals")}
    assert [len(v) for v in before.values()] == [2, 4, 3, 2]
    table = ProcessTable(path)
    assert schema_version(table.db) == 2
    for name, rows in before.items():
        after = _rows(path, name)
        if name == "processes":  # the old columns unchanged, and every old process is the local user's
            assert [r[:-1] for r in after] == rows and {r[-1] for r in after} == {"local"}
        else:
            assert after == rows
    procs = table.processes(owner="local")
    assert [(p["pid"], p["name"], p["state"]) for p in procs] == [
        (1, "chat", "terminated"), (2, "react", "terminated"), (3, "planner", "terminated"),
        (4, "memgpt", "running")]
    assert table.processes(owner="user-else") == []
    assert [s["name"] for s in table.syscall_log(2)] == ["tool_call", "tool_call"]
    table.start_boot()  # the new code runs on it: the dead boots' agents are ended, new pids follow
    pid = table.new_pid("new", None, owner="user-x")
    assert pid == 5 and table.process(pid)["owner"] == "user-x"
    assert table.process(4)["state"] == "terminated"
    table.close()


def test_memory_store_of_main_migrates_without_losing_a_row(tmp_path):
    path = _copy("memory.db", tmp_path)
    tables = ("agents", "core_blocks", "messages", "passages", "archival_versions")
    before = {t: _rows(path, t) for t in tables}
    assert [len(v) for v in before.values()] == [2, 4, 10, 5, 2]
    store = MemoryStore(path)
    assert schema_version(store._conn) == 1
    assert {t: _rows(path, t) for t in tables} == before
    assert CoreMemory(store, "alice").get("human").value == "The user likes tea.\nThey live in Lyon."
    recall = RecallStorage(store, "alice")
    assert recall.count() == 5 and len(recall.in_context()) == 3
    assert [m.content for m in recall.search("Lyon").items][:1]  # full-text index still answers
    assert ArchivalStorage(store, "bob").count() == 2
    assert store.agent("alice")["summary"] == "alice talked about tea"
    vec = np.zeros((1, 384), dtype=np.float32)
    vec[0, 0] = 1
    ArchivalStorage(store, "bob").insert_many(["new passage"], vectors=vec)
    assert ArchivalStorage(store, "bob").count() == 3
    store.close()


def test_audit_log_of_main_still_verifies(tmp_path):
    path = _copy("audit.db", tmp_path)
    log = AuditLog(path)
    verdict = log.verify()
    assert verdict[0] is True and verdict[2].startswith("3 rows, chain intact"), verdict
    assert [r["tool"] for r in log.tail(5)] == ["calculator", "run_shell", "read_file"]
    log.close()
