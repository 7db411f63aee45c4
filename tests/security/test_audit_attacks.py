"""Adversarial tests of the audit log: an attacker who can write the database (and, where said, the
anchor) but cannot read the key tries each rewrite an adversarial review found; each is detected.

The attacker knows the code: the row format, the old unkeyed SHA-256 chain, the anchor's layout. What
they lack is the key, so their recomputed hashes are plain SHA-256 or HMACs under a key they guessed.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from llmos.security import audit_attacks as attacks
from llmos.security.audit import AuditLog, AuditTampered, verify_file

FIXTURE = Path(__file__).parent / "fixtures" / "audit_main_f02445c.db"
LLMOS = str(Path(sys.executable).with_name("llmos"))


def _log(tmp_path: Path, n: int = 6) -> Path:
    return attacks.make_log(tmp_path, n)


def _attacker(path: Path) -> sqlite3.Connection:
    return attacks.attacker(path)


def _tampered(path: Path, row: int | None, text: str) -> None:
    verdict = verify_file(path)
    assert (verdict.ok, verdict.status, verdict.row) == (False, "TAMPERED", row), verdict
    assert text in verdict.message


# -- the four rewrites of the review ---------------------------------------------------------------------

def test_deleting_the_tail_and_fixing_the_head(tmp_path: Path):
    path = _log(tmp_path)
    attacks.delete_tail_and_fix_head(path)
    _tampered(path, 5, "the log ends at row 4 but the anchor records 6 rows (rows were removed from the end)")


@pytest.mark.parametrize("how", ["sha256", "guessed-key"])
def test_flipping_a_deny_into_an_allow_and_recomputing_the_chain(tmp_path: Path, how: str):
    path = _log(tmp_path)
    attacks.flip_deny_and_rechain(path, how)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT decision FROM audit WHERE id = 3").fetchone() == ("allow",)
    _tampered(path, 3, "row 3 was modified (its hash does not match)")


@pytest.mark.parametrize("how", ["sha256", "guessed-key"])
def test_appending_a_forged_row(tmp_path: Path, how: str):
    path = _log(tmp_path)
    attacks.append_forged_row(path, how)
    _tampered(path, 7, "row 7 was modified (its hash does not match)")


def test_emptying_the_log(tmp_path: Path):
    path = _log(tmp_path)
    attacks.empty_log(path)
    _tampered(path, 1, "the log ends at row 0 but the anchor records 6 rows")


def test_replacing_or_deleting_the_database(tmp_path: Path):
    path = _log(tmp_path)
    attacks.replace_database(path)
    _tampered(path, 1, "the log ends at row 0 but the anchor records 6 rows")
    attacks.delete_database(path)
    _tampered(path, None, "is gone, but its anchor")
    (tmp_path / "audit.db.anchor").unlink()
    assert verify_file(path) == (False, None, f"no audit log at {path}", "DAMAGED", None)


def test_every_attack_of_the_bench_suite_is_detected():
    cases = attacks.audit_attack_cases()
    assert len(cases) == len(attacks.ATTACKS) == 14
    assert {name: check()[0] for name, check in cases.items()} == {name: True for name in cases}


# -- the anchor and the key ------------------------------------------------------------------------------

def test_rewriting_the_anchor_without_the_key(tmp_path: Path):
    path = _log(tmp_path)
    anchor = tmp_path / "audit.db.anchor"
    body = json.loads(anchor.read_text())
    body.update(count=4)
    anchor.write_text(json.dumps(body))  # the old MAC no longer matches
    _tampered(path, None, "was modified (its MAC does not match)")
    (tmp_path / "b").mkdir()
    path = _log(tmp_path / "b")
    attacks.truncate_and_reanchor(path)
    _tampered(path, None, "was modified (its MAC does not match)")


def test_deleting_the_anchor_or_the_key(tmp_path: Path):
    path = _log(tmp_path)
    anchor, key = tmp_path / "audit.db.anchor", tmp_path / "audit.db.key"
    saved = anchor.read_bytes()
    anchor.unlink()
    _tampered(path, None, "is missing (deleted?)")
    with pytest.raises(AuditTampered, match="anchor .* is missing"):
        AuditLog(path).append("a", "t", {}, None, "allow", "ok")  # not re-anchored where it was
    assert not anchor.exists()
    anchor.write_bytes(saved)
    key.unlink()
    _tampered(path, None, "the audit key")
    with pytest.raises(AuditTampered, match="key .* is missing: refusing to extend the log"):
        AuditLog(path).append("a", "t", {}, None, "allow", "ok")
    assert not key.exists()  # a missing key is never replaced by a new one


def test_a_garbled_anchor_is_damaged(tmp_path: Path):
    path = _log(tmp_path)
    (tmp_path / "audit.db.anchor").write_bytes(b"\x00garbage")
    verdict = verify_file(path)
    assert (verdict.ok, verdict.status) == (False, "DAMAGED") and "is unreadable" in verdict.message


def test_no_append_continues_a_truncated_log(tmp_path: Path):
    """Appending after a truncation must not overwrite the anchor that proves it."""
    path = _log(tmp_path)
    db = _attacker(path)
    db.execute("DELETE FROM audit WHERE id = 6")
    db.close()
    log = AuditLog(path)
    with pytest.raises(AuditTampered, match="refusing to extend a tampered audit log: the log ends at row 5"):
        log.append("a", "t", {}, None, "allow", "ok")
    assert len(log) == 5
    _tampered(path, 6, "rows were removed from the end")


def test_rewriting_a_row_from_before_the_key(tmp_path: Path):
    """Rows of a pre-key log keep their unkeyed chain; the first keyed row (or the anchor) binds them."""
    path = tmp_path / "audit.db"
    shutil.copyfile(FIXTURE, path)
    log = AuditLog(path)
    log.close()
    attacks.flip_deny_and_rechain(path)  # row 3 is the fixture's deny
    _tampered(path, 4, "row 4 is not the row the anchor recorded as the head")
    shutil.copyfile(FIXTURE, path)  # the same, with a keyed row after the migration point
    for f in (tmp_path / "audit.db.key", tmp_path / "audit.db.anchor"):
        f.unlink()
    log = AuditLog(path)
    log.append("agent-1", "read_file", {"path": "x"}, None, "allow", "granted")
    log.close()
    attacks.flip_deny_and_rechain(path)
    _tampered(path, 5, "row 5 was modified")


# -- damaged files and the command line ------------------------------------------------------------------

def test_truncated_garbled_and_foreign_files(tmp_path: Path):
    for n, attack in enumerate((attacks.truncate_file, attacks.garble_file)):
        (tmp_path / str(n)).mkdir()
        path = attacks.make_log(tmp_path / str(n), 60)
        attack(path)
        verdict = verify_file(path)
        assert not verdict.ok and verdict.status in ("TAMPERED", "DAMAGED"), verdict

    other = tmp_path / "kernel.db"  # another database of the llmos home
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE processes (pid INTEGER PRIMARY KEY, name TEXT)")
    verdict = verify_file(other)
    assert verdict == (False, None, f"{other} is an SQLite database but not an audit log (its tables: "
                                    "processes)", "DAMAGED", None)
    with sqlite3.connect(other) as db:  # left as it was
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["processes"]
    assert not (tmp_path / "kernel.db.key").exists()

    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a database, just some text that is long enough to fill a header page " * 20)
    verdict = verify_file(foreign)
    assert (verdict.ok, verdict.status) == (False, "DAMAGED")
    assert "is not a readable SQLite database" in verdict.message


def test_llmos_audit_verify_says_tampered_or_damaged_never_a_traceback(tmp_path: Path):
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    good, bad = _log(tmp_path / "good"), _log(tmp_path / "bad")
    db = _attacker(bad)
    db.execute("DELETE FROM audit")
    db.close()
    foreign = tmp_path / "notes.db"
    foreign.write_bytes(b"\x7fELF" + os.urandom(5000))

    def verify(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([LLMOS, "audit", "verify", "--db", str(path)], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "LLMOS_HOME": str(tmp_path)})

    r = verify(good)
    assert (r.returncode, r.stdout.strip()) == (0, "ok: 6 rows, chain intact")
    r = verify(bad)
    assert r.returncode == 1 and r.stdout.startswith("TAMPERED at row 1: the log ends at row 0")
    r = verify(foreign)
    assert r.returncode == 1 and r.stdout.startswith("DAMAGED: ") and "Traceback" not in r.stderr + r.stdout
    r = verify(tmp_path / "missing.db")
    assert r.returncode == 2 and "no audit log at" in r.stderr


def test_the_kernel_fails_closed_on_a_tampered_log(tmp_path: Path):
    """After a truncation, a tool call is denied (never run unaudited) and the log is not extended."""
    import asyncio

    from llmos.kernel import Kernel
    from llmos.security import ReferenceMonitor
    from llmos.tools import ToolRegistry, calculator_tool
    from tests.stub_backend import StubBackend

    path = tmp_path / "audit.db"
    tools = ToolRegistry()
    tools.register(calculator_tool())

    async def agent(sys):
        first = await sys.tool_call("calculator", {"expression": "1+1"})
        attacks.empty_log(path)  # an attacker with write access to the database, mid-run
        return first, await sys.tool_call("calculator", {"expression": "2+2"})

    async def go():
        audit = AuditLog(path)
        kernel = Kernel(StubBackend(), home=tmp_path / "home", tools=tools,
                        monitor=ReferenceMonitor(audit=audit, tools=tools))
        try:
            pid = await kernel.spawn(agent, "agent", capabilities=[{"tool": "calculator"}])
            return await kernel.wait(pid)
        finally:
            await kernel.shutdown()
            audit.close()

    first, second = asyncio.run(go())
    assert first.ok and first.content == "2"
    assert second.status == "denied" and second.content is None
    assert "AuditTampered: refusing to extend a tampered audit log: the log ends at row 0" in second.reason
    _tampered(path, 1, "the log ends at row 0 but the anchor records 2 rows")


def test_a_replay_of_database_and_anchor_needs_a_count_kept_elsewhere(tmp_path: Path):
    """The documented limit: an attacker who can write the anchor too can put back an older copy of both
    (they still cannot forge a row); only a row count kept elsewhere (`--min-rows`) catches that."""
    path = _log(tmp_path)
    saved = {f: f.read_bytes() for f in (path, tmp_path / "audit.db.anchor")}
    log = AuditLog(path)
    log.append("agent-1", "send_money", {"iban": "DE99", "amount": 1000}, None, "allow", "granted")
    log.close()
    assert verify_file(path).rows == 7
    for f, data in saved.items():
        f.write_bytes(data)
    assert verify_file(path)[:4] == (True, None, "6 rows, chain intact", "ok")
    env = {**os.environ, "LLMOS_HOME": str(tmp_path)}
    r = subprocess.run([LLMOS, "audit", "verify", "--db", str(path), "--min-rows", "7"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 1 and "TAMPERED at row 7: the log holds 6 rows, fewer than the 7" in r.stdout
