"""The audit log: every reference-monitor decision, append-only, in a keyed hash chain anchored outside it.

The log is the protection system's record of who did what (cf. an OS audit
trail such as Linux auditd). Each row holds the agent, the tool, a digest and
a short preview of the arguments, the labels, the decision, its reason and
optional evidence, and the hash of the row before it. Three files make one log:

- `audit.db`: the rows (SQLite; triggers refuse UPDATE and DELETE);
- `audit.db.key`: a random key (mode 0600, owned by the kernel's user), never
  stored in the database. Each row's hash is an HMAC under this key of the row
  and the hash before it, so rewriting a row and recomputing the chain needs
  the key;
- `audit.db.anchor`: the row count and head hash (and the first keyed row),
  HMAC'd with the key, replaced atomically (temp file, fsync, rename) after
  each append, so removing rows from the end or emptying the log is seen
  even when the database's own contents are consistent.

Guarantees, against anyone who can write the database but cannot read the key
(nor write the anchor): `verify()` finds an edited, inserted, deleted or forged
row, a truncated or emptied log, and a damaged file; an append is one
transaction followed by its anchor update, and a crash between the two leaves
the anchor one row behind, which is consistent (rows past the anchor must
still carry valid HMACs). An append refuses to continue a log whose anchor
does not match it, so a later append never hides a truncation. Rows of a log
made before keys existed stay verifiable: they keep their unkeyed SHA-256
chain up to the migration point the anchor records; every row after it is
keyed. Against root (who can read the key) it proves nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import sqlite3
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, NamedTuple

from llmos.db import SchemaError, connect

GENESIS = "0" * 64
PREVIEW_CHARS = 400
_KEY_BYTES = 32

_SCHEMA_V1 = """
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
# v2: the head lives in the anchor file, outside the database an attacker can write.
_MIGRATIONS = (_SCHEMA_V1, "DROP TABLE IF EXISTS audit_head;")

_FIELDS = ("id", "ts", "agent", "tool", "args_digest", "args_preview", "labels", "decision", "reason",
           "evidence", "prev_hash")


class AuditError(RuntimeError):
    """The audit log cannot be used: a file of it is damaged, or its key is unreadable or exposed."""

    status = "DAMAGED"


class AuditTampered(AuditError):
    """The log contradicts its key or anchor: rows, the anchor or the key were changed or removed."""

    status = "TAMPERED"


class Verdict(NamedTuple):
    """What `verify` found: `status` is "ok", "TAMPERED" or "DAMAGED"; `row` the first bad row, if any;
    `rows` how many rows were verified (when ok)."""

    ok: bool
    row: int | None
    message: str
    status: str = "ok"
    rows: int | None = None


class _Anchor(NamedTuple):
    rows: int  # stored as "count" in the anchor file
    head: str
    keyed_from: int  # the first row hashed with the key; rows before it were written by unkeyed llmos


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def args_digest(args: Any) -> str:
    """SHA-256 of the arguments' canonical JSON: the log proves what was asked without storing it all."""
    return hashlib.sha256(_canonical(args).encode()).hexdigest()


def _row_hash(row: dict[str, Any], key: bytes | None = None) -> str:
    """The row's link in the chain: HMAC-SHA256 under `key`, or plain SHA-256 for pre-key rows."""
    data = _canonical([row[f] for f in _FIELDS]).encode()
    if key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.new(key, b"row:" + data, hashlib.sha256).hexdigest()


def _anchor_mac(key: bytes, anchor: _Anchor) -> str:
    return hmac.new(key, b"anchor:" + _canonical(list(anchor)).encode(), hashlib.sha256).hexdigest()


def default_audit_path() -> Path:
    from llmos.home import llmos_home

    return llmos_home() / "audit.db"


def key_path_of(db: Path) -> Path:
    return db.with_name(db.name + ".key")


def anchor_path_of(db: Path) -> Path:
    return db.with_name(db.name + ".anchor")


def _write_atomic(path: Path, data: bytes, *, exclusive: bool = False, sync: bool = True) -> bool:
    """Write `path` whole or not at all (temp file, fsync unless `sync` is False, rename; mode 0600).
    With `exclusive`, only if `path` does not exist yet (False if another writer made it first)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if not exclusive:
        os.replace(tmp, path)
        return True
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _open_key(path: Path) -> tuple[int, bytes]:
    """The key file's descriptor (kept open: appends lock it) and the key; refuses a key others can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except PermissionError:
        raise AuditError(f"the audit key {path} is not readable by this user (uid {os.geteuid()})") from None
    except OSError as e:  # a symlink (ELOOP), or gone since the caller looked
        raise AuditTampered(f"the audit key {path} cannot be opened: {e.strerror}") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        raise AuditError(f"the audit key {path} must be owned by uid {os.geteuid()} and readable only by it "
                         f"(it has uid {st.st_uid}, mode {st.st_mode & 0o777:o}): chmod 600 {path}")
    text = os.read(fd, 4 * _KEY_BYTES).decode("ascii", "replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != _KEY_BYTES:
        os.close(fd)
        raise AuditError(f"the audit key {path} is damaged (expected {2 * _KEY_BYTES} hex digits)")
    return fd, key


class AuditLog:
    """An append-only, keyed hash chain of reference-monitor decisions: `path`, its key and its anchor.

    A new log (or one written before keys existed) gets a key and an anchor on first open; a log whose
    key or anchor has gone missing is never given new ones (that would hide the loss): it can still be
    read and verified (TAMPERED), and appends raise AuditTampered.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_audit_path()
        self.key_path = key_path_of(self.path)
        self.anchor_path = anchor_path_of(self.path)
        self._lock = threading.Lock()
        self._db = connect(self.path, _MIGRATIONS, synchronous="FULL", row_factory=None)
        self._key_fd: int | None = None
        self._key: bytes | None = None
        try:
            self._init_key()
        except BaseException:
            self._db.close()
            raise

    def _init_key(self) -> None:
        if not self.key_path.exists() and not self.anchor_path.exists():
            # First use (or a log from before keys): key, then anchor at the current end, under the
            # database's write lock so that two openers make one key.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if not self.key_path.exists() and not self.anchor_path.exists():
                    key = os.urandom(_KEY_BYTES)
                    if _write_atomic(self.key_path, key.hex().encode(), exclusive=True):
                        last = self._last()
                        count, head = last if last else (0, GENESIS)
                        self._write_anchor(key, _Anchor(count, head, count + 1))
            finally:
                self._db.execute("COMMIT")
        if self.key_path.exists():
            self._key_fd, self._key = _open_key(self.key_path)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._key_fd is not None:
                os.close(self._key_fd)
                self._key_fd = None

    # -- the anchor ----------------------------------------------------------------------------------

    def _write_anchor(self, key: bytes, anchor: _Anchor) -> None:
        body = {"count": anchor.rows, "head": anchor.head, "keyed_from": anchor.keyed_from,
                "mac": _anchor_mac(key, anchor)}
        # No fsync: the rename is atomic, and an anchor that a power loss leaves behind the database is
        # what verify already accepts (rows past the anchor whose HMACs hold); it is never ahead.
        _write_atomic(self.anchor_path, (_canonical(body) + "\n").encode(), sync=False)

    def _read_anchor(self) -> _Anchor:
        """The anchor, authenticated; AuditError says why it cannot be trusted."""
        if self._key is None:
            raise AuditTampered(f"the audit key {self.key_path} is missing: the chain cannot be checked "
                             "(it was deleted, or the log was copied without it)")
        try:
            body = json.loads(self.anchor_path.read_bytes())
            anchor = _Anchor(int(body["count"]), str(body["head"]), int(body["keyed_from"]))
            mac = str(body["mac"])
        except FileNotFoundError:
            raise AuditTampered(f"the anchor {self.anchor_path} is missing (deleted?)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AuditError(f"the anchor {self.anchor_path} is unreadable ({type(e).__name__})") from None
        if not hmac.compare_digest(mac, _anchor_mac(self._key, anchor)):
            raise AuditTampered(f"the anchor {self.anchor_path} was modified (its MAC does not match)")
        return anchor

    def _last(self) -> tuple[int, str] | None:
        return self._db.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()

    def _anchor_matches(self, anchor: _Anchor, last: tuple[int, str] | None) -> str | None:
        """Why the database's end contradicts the anchor, or None (the anchor may lag one crash behind)."""
        count = last[0] if last else 0
        if count < anchor.rows:
            return (f"the log ends at row {count} but the anchor records {anchor.rows} rows "
                    "(rows were removed from the end)")
        if anchor.rows == 0:
            return None
        head: str | None
        if last is not None and last[0] == anchor.rows:
            head = last[1]
        else:
            found = self._db.execute("SELECT hash FROM audit WHERE id = ?", (anchor.rows,)).fetchone()
            head = str(found[0]) if found else None
        if head != anchor.head:
            return f"row {anchor.rows} is not the row the anchor recorded as the head (rewritten)"
        return None

    # -- appending -----------------------------------------------------------------------------------

    def append(self, agent: str, tool: str, args: dict, labels: dict | None, decision: str, reason: str,
               evidence: dict | None = None) -> int:
        """Append one decision; returns its row id. AuditTampered if the log does not match its anchor."""
        preview = _canonical(args)
        if len(preview) > PREVIEW_CHARS:
            preview = preview[:PREVIEW_CHARS] + "..."
        with self._lock:
            if self._key_fd is None or self._key is None:
                raise AuditTampered(f"the audit key {self.key_path} is missing: refusing to extend the log")
            fcntl.flock(self._key_fd, fcntl.LOCK_EX)  # one appender (of any process) at a time
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    anchor = self._read_anchor()
                    last = self._last()
                    if (why := self._anchor_matches(anchor, last)) is not None:
                        raise AuditTampered(f"refusing to extend a tampered audit log: {why}")
                    row_id = (last[0] + 1) if last else 1
                    row: dict[str, Any] = {
                        "id": row_id,
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
                    row["hash"] = _row_hash(row, self._key)
                    self._db.execute(f"INSERT INTO audit ({', '.join(row)}) VALUES "
                                     f"({', '.join('?' * len(row))})", tuple(row.values()))
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
                self._write_anchor(self._key, _Anchor(row_id, row["hash"], anchor.keyed_from))
            finally:
                fcntl.flock(self._key_fd, fcntl.LOCK_UN)
        return row_id

    # -- reading and verifying -----------------------------------------------------------------------

    def _rows(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def verify(self) -> Verdict:
        """Recompute every link (HMAC after the migration point) and check the end against the anchor."""
        try:
            return self._verify()
        except sqlite3.DatabaseError as e:
            return Verdict(False, None, f"the database is damaged: {e}", "DAMAGED")

    def _verify(self) -> Verdict:
        try:
            anchor = self._read_anchor()
        except AuditError as e:
            return Verdict(False, None, str(e), e.status)
        rows = self._rows("SELECT * FROM audit ORDER BY id")
        prev, expect_id = GENESIS, 1
        for row in rows:
            if row["id"] != expect_id:
                return Verdict(False, expect_id, f"row {expect_id} is missing (next row is {row['id']})",
                               "TAMPERED")
            if row["prev_hash"] != prev:
                return Verdict(False, row["id"], f"row {row['id']} does not link to the row before it",
                               "TAMPERED")
            key = self._key if row["id"] >= anchor.keyed_from else None
            if not hmac.compare_digest(_row_hash(row, key), str(row["hash"])):
                return Verdict(False, row["id"], f"row {row['id']} was modified (its hash does not match)",
                               "TAMPERED")
            prev, expect_id = row["hash"], expect_id + 1
        last = (rows[-1]["id"], rows[-1]["hash"]) if rows else None
        if (why := self._anchor_matches(anchor, last)) is not None:
            first_bad = len(rows) + 1 if len(rows) < anchor.rows else anchor.rows
            return Verdict(False, first_bad, why, "TAMPERED")
        message = f"{len(rows)} rows, chain intact"
        if anchor.keyed_from > 1:
            message += f" (rows 1-{anchor.keyed_from - 1} predate the key: unkeyed chain)"
        if len(rows) > anchor.rows:
            message += f"; {len(rows) - anchor.rows} row(s) past the anchor (an append was interrupted)"
        return Verdict(True, None, message, "ok", len(rows))

    def tail(self, n: int = 20, agents: Collection[str] | None = None) -> list[dict[str, Any]]:
        """The last `n` rows (of the agents named in `agents`, if given), oldest first, with labels
        and evidence decoded."""
        where, params = "", tuple[str, ...]()
        if agents is not None:
            params = tuple(sorted(set(agents)))
            if not params:
                return []
            where = f"WHERE agent IN ({', '.join('?' * len(params))})"
        rows = self._rows(f"SELECT * FROM audit {where} ORDER BY id DESC LIMIT ?", (*params, int(n)))
        for row in rows:
            for key in ("labels", "evidence"):
                if row[key] is not None:
                    row[key] = json.loads(row[key])
        return rows[::-1]

    def __len__(self) -> int:
        return self._rows("SELECT COUNT(*) AS n FROM audit")[0]["n"]


def _not_an_audit_log(path: Path) -> str | None:
    """Why the SQLite file at `path` is some other database (read-only: it is never turned into a log)."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        db.close()
    if tables and "audit" not in tables:
        return f"{path} is an SQLite database but not an audit log (its tables: {', '.join(sorted(tables))})"
    return None


def verify_file(path: str | Path) -> Verdict:
    """Verify the log at `path` without ever raising: a missing, non-SQLite or damaged file is DAMAGED."""
    path = Path(path)
    if not path.is_file():
        if anchor_path_of(path).exists():
            return Verdict(False, None, f"the audit database {path} is gone, but its anchor "
                                        f"{anchor_path_of(path)} remains (the log was deleted)", "TAMPERED")
        return Verdict(False, None, f"no audit log at {path}", "DAMAGED")
    try:
        if (why := _not_an_audit_log(path)) is not None:
            return Verdict(False, None, why, "DAMAGED")
        log = AuditLog(path)
    except sqlite3.DatabaseError as e:
        return Verdict(False, None, f"{path} is not a readable SQLite database: {e}", "DAMAGED")
    except SchemaError as e:
        return Verdict(False, None, str(e), "DAMAGED")
    except AuditError as e:
        return Verdict(False, None, str(e), e.status)
    try:
        return log.verify()
    finally:
        log.close()
