"""The audit log is append-only and any tampering breaks verification at the right row."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from llmos.security.audit import AuditLog, args_digest


def fill(log: AuditLog, n: int = 5) -> None:
    for i in range(n):
        log.append("agent-1", "send_email", {"to": f"u{i}@example.com"}, {"to": {"trusted": True}},
                   "allow", "granted", evidence={"i": i} if i % 2 else None)


def test_append_tail_verify(tmp_path: Path):
    log = AuditLog(tmp_path / "audit.db")
    assert log.verify() == (True, None, "0 rows, chain intact")
    assert log.append("a", "read_file", {"path": "x"}, None, "deny", "no capability") == 1
    fill(log, 4)
    assert len(log) == 5 and log.verify() == (True, None, "5 rows, chain intact")
    rows = log.tail(2)
    assert [r["id"] for r in rows] == [4, 5]
    assert rows[0]["evidence"] is None and rows[1]["evidence"] == {"i": 3}
    assert rows[1]["labels"] == {"to": {"trusted": True}}
    assert rows[1]["args_digest"] == args_digest({"to": "u3@example.com"})
    assert rows[1]["prev_hash"] == rows[0]["hash"]
    # reopened, the chain continues
    log.close()
    log2 = AuditLog(tmp_path / "audit.db")
    assert log2.append("b", "t", {}, None, "allow", "ok") == 6
    assert log2.verify()[0]


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
    ok, row, msg = AuditLog(path).verify()
    assert not ok and row == bad_row and message in msg


def test_recomputed_row_breaks_the_next_link(tmp_path: Path):
    """An attacker who rewrites a row and fixes its own hash still breaks the link after it."""
    from llmos.security.audit import _row_hash

    path = tmp_path / "audit.db"
    log = AuditLog(path)
    fill(log, 4)
    row = log.tail(4)[1]
    log.close()
    row["reason"] = "forged"
    row["labels"] = '{"to":{"trusted":true}}'
    row["evidence"] = '{"i":1}'
    new_hash = _row_hash(row)
    _tamper(path, f"UPDATE audit SET reason = 'forged', hash = '{new_hash}' WHERE id = 2")
    ok, bad, msg = AuditLog(path).verify()
    assert (ok, bad) == (False, 3) and "does not link" in msg
