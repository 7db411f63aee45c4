"""Attacks on the audit log, as an attacker who can write its database but cannot read its key.

Each function rewrites a closed log the way the adversarial review of issue 13
did (or a relative of it): the attacker knows the code, the row format, the
old unkeyed SHA-256 chain and the anchor's layout, and recomputes whatever
hashes they can, plain SHA-256 or an HMAC under a key they guessed. A case
holds when `verify_file` then says TAMPERED or DAMAGED (never "ok", never a
traceback). `llmos bench security` reports them as the class "audit log
rewrites"; tests/security/test_audit_attacks.py asserts each verdict exactly.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
import tempfile
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from llmos.security.audit import _FIELDS, AuditLog, _canonical, anchor_path_of, verify_file

GUESSED_KEY = b"\0" * 32


def make_log(directory: Path, n: int = 6) -> Path:
    """A closed log of `n` payment decisions in `directory`, every third one a deny; its path."""
    path = Path(directory) / "audit.db"
    log = AuditLog(path)
    for i in range(n):
        denied = i % 3 == 2
        log.append("agent-1", "send_money", {"iban": f"DE{i:02d}", "amount": 10 * i}, None,
                   "deny" if denied else "allow", "denied by flow policy" if denied else "granted")
    log.close()
    return path


def attacker(path: Path) -> sqlite3.Connection:
    """The attacker's own SQLite connection, with the append-only triggers dropped."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TRIGGER IF EXISTS audit_no_update")
    db.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    return db


def forge_hash(row: dict, how: str) -> str:
    """A row hash without the key: the unkeyed chain main used to write, or an HMAC under a guess."""
    data = _canonical([row[f] for f in _FIELDS]).encode()
    if how == "sha256":
        return hashlib.sha256(data).hexdigest()
    return hmac.new(GUESSED_KEY, b"row:" + data, hashlib.sha256).hexdigest()


def rechain(db: sqlite3.Connection, start: int, how: str) -> None:
    """Recompute every row's link and hash from row `start` on."""
    cols = [d[1] for d in db.execute("PRAGMA table_info(audit)")]
    prev = db.execute("SELECT hash FROM audit WHERE id = ?", (start - 1,)).fetchone()
    prev_hash = prev[0] if prev else "0" * 64
    for values in db.execute("SELECT * FROM audit WHERE id >= ? ORDER BY id", (start,)).fetchall():
        row = dict(zip(cols, values, strict=True))
        row["prev_hash"] = prev_hash
        row["hash"] = forge_hash(row, how)
        db.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE id = ?",
                   (row["prev_hash"], row["hash"], row["id"]))
        prev_hash = row["hash"]


# -- the rewrites ----------------------------------------------------------------------------------------

def delete_tail_and_fix_head(path: Path) -> None:
    """Delete the last two rows and write the new last hash into a head record in the database."""
    with closing(attacker(path)) as db:
        db.execute("DELETE FROM audit WHERE id > (SELECT MAX(id) - 2 FROM audit)")
        db.execute("CREATE TABLE IF NOT EXISTS audit_head (one INTEGER PRIMARY KEY, count INT, hash TEXT)")
        count, last = db.execute("SELECT MAX(id), hash FROM audit WHERE id = (SELECT MAX(id) FROM audit)"
                                 ).fetchone()
        db.execute("INSERT OR REPLACE INTO audit_head VALUES (1, ?, ?)", (count, last))


def flip_deny_and_rechain(path: Path, how: str = "sha256") -> None:
    """Turn the first deny into an allow and recompute the chain from there on."""
    with closing(attacker(path)) as db:
        row = db.execute("SELECT MIN(id) FROM audit WHERE decision = 'deny'").fetchone()[0]
        db.execute("UPDATE audit SET decision = 'allow', reason = 'granted' WHERE id = ?", (row,))
        rechain(db, row, how)


def append_forged_row(path: Path, how: str = "sha256") -> None:
    """Append an allow that was never decided, linked to the last row."""
    with closing(attacker(path)) as db:
        cols = [d[1] for d in db.execute("PRAGMA table_info(audit)")]
        values = db.execute("SELECT * FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        last = dict(zip(cols, values, strict=True))
        row = {**last, "id": last["id"] + 1, "decision": "allow", "reason": "granted",
               "prev_hash": last["hash"]}
        row["hash"] = forge_hash(row, how)
        db.execute(f"INSERT INTO audit VALUES ({', '.join('?' * len(cols))})", [row[c] for c in cols])


def empty_log(path: Path) -> None:
    with closing(attacker(path)) as db:
        db.execute("DELETE FROM audit")


def replace_database(path: Path) -> None:
    """Delete the database (and its WAL) and put an empty one in its place."""
    for f in path.parent.glob(path.name + "*"):
        if f.suffix not in (".key", ".anchor"):
            f.unlink()
    sqlite3.connect(path).close()


def delete_database(path: Path) -> None:
    for f in path.parent.glob(path.name + "*"):
        if f.suffix not in (".key", ".anchor"):
            f.unlink()


def truncate_and_reanchor(path: Path) -> None:
    """Delete the last row and rewrite the anchor to match, re-MACing it under a guessed key."""
    with closing(attacker(path)) as db:
        db.execute("DELETE FROM audit WHERE id = (SELECT MAX(id) FROM audit)")
        count, head = db.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    anchor = anchor_path_of(path)
    body = json.loads(anchor.read_text())
    body.update(count=count, head=head, mac=hmac.new(
        GUESSED_KEY, b"anchor:" + _canonical([count, head, body["keyed_from"]]).encode(), hashlib.sha256
    ).hexdigest())
    anchor.write_text(json.dumps(body))


def delete_anchor(path: Path) -> None:
    anchor_path_of(path).unlink()


def delete_key(path: Path) -> None:
    path.with_name(path.name + ".key").unlink()


def _checkpoint(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def truncate_file(path: Path) -> None:
    """Cut the database file in half (after moving the WAL into it)."""
    _checkpoint(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def garble_file(path: Path) -> None:
    """Overwrite the last 40% of the database file (where the newest rows are) with random bytes."""
    _checkpoint(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size - size * 2 // 5)
        f.write(os.urandom(size * 2 // 5))


def replace_with_foreign_file(path: Path) -> None:
    delete_database(path)
    path.write_bytes(b"\x7fELF" + os.urandom(5000))


ATTACKS: dict[str, Callable[[Path], None]] = {
    "delete the tail, fix the head record": delete_tail_and_fix_head,
    "flip a deny, recompute the SHA-256 chain": flip_deny_and_rechain,
    "flip a deny, recompute under a guessed key": lambda p: flip_deny_and_rechain(p, "guessed-key"),
    "append a forged row (SHA-256)": append_forged_row,
    "append a forged row (guessed key)": lambda p: append_forged_row(p, "guessed-key"),
    "empty the log": empty_log,
    "replace the database with an empty one": replace_database,
    "delete the database": delete_database,
    "truncate and re-anchor under a guessed key": truncate_and_reanchor,
    "delete the anchor": delete_anchor,
    "delete the key": delete_key,
    "truncate the file": truncate_file,
    "garble the file": garble_file,
    "replace it with a foreign file": replace_with_foreign_file,
}


def audit_attack_cases(rows: int = 12) -> dict[str, Callable[[], tuple[bool, str]]]:
    """Each attack as a check on a fresh log of `rows` rows: (held, what verify said)."""

    def case(attack: Callable[[Path], None]) -> Callable[[], tuple[bool, str]]:
        def check() -> tuple[bool, str]:
            with tempfile.TemporaryDirectory(prefix="llmos-audit-attack-") as tmp:
                path = make_log(Path(tmp), rows)
                attack(path)
                verdict = verify_file(path)
            held = not verdict.ok and verdict.status in ("TAMPERED", "DAMAGED")
            return held, f"{verdict.status}: {verdict.message}"[:160]
        return check

    return {name: case(attack) for name, attack in ATTACKS.items()}
