"""Users and their API keys: who owns each object of the running OS (cf. Unix uids and /etc/shadow).

Every process, agent, block, passage and audit row belongs to a user by an
`owner` field holding `User.id`. A key is a random 32-byte token shown once,
when the user is added; only its SHA-256 is stored (users.db under the llmos
home), so reading the database does not give a key away. With no user added,
the OS has a single local user (`LOCAL_USER`, an admin), as it had before
users existed. Guarantees:

- once a user was added, keys are required for good: removing every user
  does not reopen the server to requests without a key (delete users.db to
  go back to a single local user);

- `authenticate` answers a user only for a key that was issued and not
  revoked; removing a user revokes their keys at once (every request looks
  the key up, nothing is cached);
- ids are random and never reused, so a user added again under an old name
  does not inherit the removed user's objects.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from llmos.db import connect

KEY_PREFIX = "llmos-"


@dataclass(frozen=True)
class User:
    id: str
    name: str
    admin: bool = False

    def can_see(self, owner: str | None) -> bool:
        """Whether this user may see an object owned by `owner` (an admin sees everything)."""
        return self.admin or owner == self.id


LOCAL_USER = User("local", "local", True)


class UserError(ValueError):
    """A user command that cannot be done (a name taken or unknown)."""


_MIGRATIONS = [
    """
    CREATE TABLE users (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, admin INTEGER NOT NULL,
                        created REAL NOT NULL);
    CREATE TABLE keys (key_hash TEXT PRIMARY KEY, user_id TEXT NOT NULL REFERENCES users(id),
                       created REAL NOT NULL);
    CREATE INDEX keys_user ON keys(user_id);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _user(row) -> User:
    return User(row["id"], row["name"], bool(row["admin"]))


class UserStore:
    """The users of one llmos home and the hashes of their keys."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db = connect(self.path, _MIGRATIONS, synchronous="FULL")
        self._lock = threading.Lock()

    @classmethod
    def of_home(cls, home: Path | str) -> UserStore:
        return cls(Path(home) / "users.db")

    def add(self, name: str, admin: bool = False) -> tuple[User, str]:
        """Create a user with a new key; returns the user and the key (shown once, stored hashed)."""
        name = name.strip()
        if not name or not name.isprintable():
            raise UserError("a user name must be non-empty printable text")
        user = User(f"user-{uuid.uuid4()}", name, admin)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("INSERT INTO users (id, name, admin, created) VALUES (?, ?, ?, ?)",
                                 (user.id, user.name, int(admin), now))
                self._db.execute("INSERT INTO keys (key_hash, user_id, created) VALUES (?, ?, ?)",
                                 (hash_key(key), user.id, now))
                self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('keys_required', '1')")
                self._db.execute("COMMIT")
            except BaseException as e:
                self._db.execute("ROLLBACK")
                if isinstance(e, sqlite3.IntegrityError):
                    raise UserError(f"a user named {name!r} exists already") from None
                raise
        return user, key

    def remove(self, name: str) -> User:
        """Delete a user and revoke their keys (their objects keep their owner id)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
                if row is None:
                    raise UserError(f"no user named {name!r}")
                self._db.execute("DELETE FROM keys WHERE user_id = ?", (row["id"],))
                self._db.execute("DELETE FROM users WHERE id = ?", (row["id"],))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return _user(row)

    def list(self) -> list[User]:
        with self._lock:
            return [_user(r) for r in self._db.execute("SELECT * FROM users ORDER BY created, name")]

    def get(self, name: str) -> User | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
        return _user(row) if row else None

    def keys_required(self) -> bool:
        """True once a user was ever added: removing the last user does not reopen the server."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM meta WHERE key = 'keys_required'").fetchone() is not None

    def authenticate(self, key: str) -> User | None:
        """The user holding `key`, or None for a key never issued or revoked."""
        with self._lock:
            row = self._db.execute("SELECT u.* FROM keys k JOIN users u ON u.id = k.user_id "
                                   "WHERE k.key_hash = ?", (hash_key(key),)).fetchone()
        return _user(row) if row else None

    def close(self) -> None:
        with self._lock:
            self._db.close()
