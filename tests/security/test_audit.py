"""The audit log is append-only, keyed and anchored; tampering breaks verification at the right row."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
from pathlib import Path

import pytest

from llmos.security.audit import AuditError, AuditLog, Verdict, args_digest, verify_file

FIXTURE = Path(__file__).parent / "fixtures" / "audit_main_f02445c.db"  # written by the unkeyed main code


def fill(log: AuditLog, n: int = 5) -> None:
    for i in range(n):
        log.append("agent-1", "send_email", {"to": f"u{i}@example.com"}, {"to": {"trusted": True}},
                   "allow", "granted", evidence={"i": i} if i % 2 else None)


def test_append_tail_verify(tmp_path: Path):
    log = AuditLog(tmp_path / "audit.db")
    assert log.verify() == Verdict(True, None, "0 rows, chain intact", "ok", 0)
    assert log.append("a", "read_file", {"path": "x"}, None, "deny", "no capability") == 1
    fill(log, 4)
    assert len(log) == 5 and log.verify() == (True, None, "5 rows, chain intact", "ok", 5)
    rows = log.tail(2)
    assert [r["id"] for r in rows] == [4, 5]
    assert rows[0]["evidence"] is None and rows[1]["evidence"] == {"i": 3}
    assert rows[1]["labels"] == {"to": {"trusted": True}}
    assert rows[1]["args_digest"] == args_digest({"to": "u3@example.com"})
    assert rows[1]["prev_hash"] == rows[0]["hash"]
    # reopened, the chain continues under the same key
    log.close()
    log2 = AuditLog(tmp_path / "audit.db")
    assert log2.append("b", "t", {}, None, "allow", "ok") == 6
    assert log2.verify() == (True, None, "6 rows, chain intact", "ok", 6)


def test_the_key_lives_outside_the_database_readable_only_by_its_user(tmp_path: Path):
    log = AuditLog(tmp_path / "audit.db")
    fill(log, 2)
    key = (tmp_path / "audit.db.key").read_text()
    st = os.stat(tmp_path / "audit.db.key")
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid() and len(key) == 64
    assert stat.S_IMODE(os.stat(tmp_path / "audit.db.anchor").st_mode) == 0o600
    log._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert key.encode() not in (tmp_path / "audit.db").read_bytes()
    assert bytes.fromhex(key) not in (tmp_path / "audit.db").read_bytes()
    log.close()
    os.chmod(tmp_path / "audit.db.key", 0o644)
    with pytest.raises(AuditError, match="readable only by it .* mode 644"):
        AuditLog(tmp_path / "audit.db")
    # a symlink in the key's place (to a key the attacker made) is not followed
    os.rename(tmp_path / "audit.db.key", tmp_path / "other.key")
    os.chmod(tmp_path / "other.key", 0o600)
    (tmp_path / "audit.db.key").symlink_to(tmp_path / "other.key")
    verdict = verify_file(tmp_path / "audit.db")
    assert (verdict.ok, verdict.status) == (False, "TAMPERED") and "cannot be opened" in verdict.message


def test_triggers_refuse_update_and_delete(tmp_path: Path):
    log = AuditLog(tmp_path / "audit.db")
    fill(log, 2)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        log._db.execute("UPDATE audit SET decision = 'allow' WHERE id = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        log._db.execute("DELETE FROM audit WHERE id = 1")


def _tamper(path: Path, *sql: str) -> None:
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("DROP TRIGGER audit_no_delete")
    for s in sql:
        db.execute(s)
    db.commit()
    db.close()


@pytest.mark.parametrize("sql, bad_row, message", [
    (["UPDATE audit SET decision = 'allow', reason = 'x' WHERE id = 3"], 3, "row 3 was modified"),
    (["UPDATE audit SET args_preview = '{}' WHERE id = 1"], 1, "row 1 was modified"),
    (["DELETE FROM audit WHERE id = 2"], 2, "row 2 is missing"),
    (["DELETE FROM audit WHERE id = 5"], 5, "rows were removed from the end"),
    (["UPDATE audit SET hash = 'f' WHERE id = 4"], 4, "row 4 was modified"),
])
def test_verify_finds_tampering(tmp_path: Path, sql, bad_row, message):
    path = tmp_path / "audit.db"
    log = AuditLog(path)
    fill(log, 5)
    log.close()
    _tamper(path, *sql)
    ok, row, msg, status, _ = AuditLog(path).verify()
    assert (ok, row, status) == (False, bad_row, "TAMPERED") and message in msg


def test_a_crash_between_commit_and_anchor_leaves_a_consistent_log(tmp_path: Path, monkeypatch):
    """The anchor is replaced after the row commits: a crash in between leaves it one row behind, which
    verifies (the extra row carries a valid HMAC), and the next append brings it up to date."""
    log = AuditLog(tmp_path / "audit.db")
    fill(log, 3)

    def crash(*_):
        raise KeyboardInterrupt("killed between commit and anchor")

    monkeypatch.setattr(log, "_write_anchor", crash)
    with pytest.raises(KeyboardInterrupt):
        log.append("a", "t", {}, None, "allow", "ok")
    monkeypatch.undo()
    assert len(log) == 4
    assert log.verify() == (True, None, "4 rows, chain intact; 1 row(s) past the anchor (an append was "
                                        "interrupted)", "ok", 4)
    assert log.append("a", "t", {}, None, "allow", "ok") == 5
    assert log.verify() == (True, None, "5 rows, chain intact", "ok", 5)


def test_a_log_from_before_keys_opens_and_continues_keyed(tmp_path: Path):
    path = tmp_path / "audit.db"
    shutil.copyfile(FIXTURE, path)
    log = AuditLog(path)
    assert (tmp_path / "audit.db.key").exists() and (tmp_path / "audit.db.anchor").exists()
    legacy = " (rows 1-4 predate the key: unkeyed chain)"
    assert log.verify() == (True, None, "4 rows, chain intact" + legacy, "ok", 4)
    assert [r["decision"] for r in log.tail(4)] == ["allow", "done", "deny", "allow"]
    assert log.append("agent-3", "read_file", {"path": "a"}, None, "allow", "granted") == 5
    assert log.verify() == (True, None, "5 rows, chain intact" + legacy, "ok", 5)
    log.close()
    # a second opener neither re-keys nor moves the migration point
    key = (tmp_path / "audit.db.key").read_bytes()
    assert AuditLog(path).verify().ok and (tmp_path / "audit.db.key").read_bytes() == key


def test_concurrent_appenders_in_two_processes(tmp_path: Path):
    import subprocess
    import sys

    path = tmp_path / "audit.db"
    AuditLog(path).close()
    code = ("import sys; from llmos.security.audit import AuditLog; log = AuditLog(sys.argv[1])\n"
            "for i in range(40): log.append(sys.argv[2], 't', {'i': i}, None, 'allow', 'ok')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), f"w{n}"]) for n in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    log = AuditLog(path)
    assert log.verify() == (True, None, "80 rows, chain intact", "ok", 80)
    assert sorted({r["agent"] for r in log.tail(80)}) == ["w0", "w1"]
