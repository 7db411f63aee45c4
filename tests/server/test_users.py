"""Users and keys (kernel/users.py), the request authenticator (server/auth.py), process owners,
and `llmos users` run as a user runs it."""

import asyncio
import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from llmos.kernel import Kernel, SyscallError
from llmos.kernel.users import LOCAL_USER, User, UserError, UserStore
from llmos.server.auth import Authenticator
from tests.stub_backend import StubBackend

LLMOS = str(Path(sys.executable).with_name("llmos"))


def test_keys_are_stored_hashed_and_authenticate_their_user(tmp_path):
    users = UserStore.of_home(tmp_path)
    alice, key = users.add("alice")
    assert key.startswith("llmos-") and len(key) > 40
    assert users.authenticate(key) == alice == User(alice.id, "alice", False)
    raw = (tmp_path / "users.db").read_bytes() + (tmp_path / "users.db-wal").read_bytes()
    assert key.encode() not in raw  # only the hash is on disk
    db = sqlite3.connect(tmp_path / "users.db")
    assert db.execute("SELECT key_hash FROM keys").fetchall() == [(hashlib.sha256(key.encode()).hexdigest(),)]
    assert users.authenticate(key + "x") is None and users.authenticate("") is None


def test_names_are_unique_and_a_removed_user_is_revoked_at_once(tmp_path):
    users = UserStore.of_home(tmp_path)
    alice, key = users.add("alice", admin=True)
    with pytest.raises(UserError, match="a user named 'alice' exists already"):
        users.add("alice")
    with pytest.raises(UserError, match="non-empty"):
        users.add("  ")
    assert [(u.name, u.admin) for u in users.list()] == [("alice", True)]
    assert users.remove("alice") == alice
    assert users.authenticate(key) is None and users.list() == []
    with pytest.raises(UserError, match="no user named 'alice'"):
        users.remove("alice")
    again, _ = users.add("alice")  # the same name again is a new user: it owns nothing of the old one
    assert again.id != alice.id and not again.can_see(alice.id)


def test_authenticator(tmp_path):
    users = UserStore.of_home(tmp_path)
    open_auth = Authenticator(users, api_key=None, local_key="local-k")
    assert open_auth.user(None) is LOCAL_USER and open_auth.user("anything") is LOCAL_USER  # as before users
    bob, key = users.add("bob")
    assert open_auth.required()  # a user exists now: keys are required
    assert open_auth.user(None) is None and open_auth.user("anything") is None
    assert open_auth.user(key) == bob and open_auth.user("local-k") is LOCAL_USER
    served = Authenticator(UserStore.of_home(tmp_path / "other"), api_key="serve-k")
    assert served.user("serve-k") is LOCAL_USER
    assert served.user(None) is None and served.user("serve-") is None


def test_processes_belong_to_a_user_and_children_cannot_change_it(tmp_path):
    async def child(sys):
        return "child"

    async def main():
        kernel = Kernel(StubBackend(), home=tmp_path)
        release = asyncio.Event()

        async def parent(sys):
            await release.wait()

        try:
            p = await kernel.spawn(parent, "p", owner="user-a")
            c = await kernel.spawn(child, parent=p)
            assert kernel.process(c).owner == "user-a"  # inherited
            with pytest.raises(SyscallError, match="a child process runs for its parent's user"):
                await kernel.spawn(child, parent=p, owner="user-b")
            assert kernel.process(await kernel.spawn(child)).owner == "local"
            release.set()
            await kernel.wait(p)
            await kernel.sync()
            rows = kernel.table.processes(owner="user-a")
            assert [(r["name"], r["owner"]) for r in rows] == [("p", "user-a"), ("child", "user-a")]
            assert [r["owner"] for r in kernel.table.processes()] == ["user-a", "user-a", "local"]
        finally:
            await kernel.shutdown()

    asyncio.run(main())


def test_users_command(tmp_path):
    env = {"LLMOS_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}

    def llmos(*args):
        return subprocess.run([LLMOS, "users", *args], capture_output=True, text=True, env=env, timeout=60)

    r = llmos("list")
    assert r.returncode == 0 and "no users" in r.stdout
    r = llmos("add", "carol", "--admin")
    assert r.returncode == 0, r.stderr
    key = [line for line in r.stdout.splitlines() if line.startswith("llmos-")][0]
    assert UserStore.of_home(tmp_path).authenticate(key).name == "carol"
    r = llmos("list")
    assert "carol" in r.stdout and "yes" in r.stdout and key not in r.stdout
    assert llmos("add", "carol").returncode == 2
    r = llmos("remove", "carol")
    assert r.returncode == 0 and UserStore.of_home(tmp_path).authenticate(key) is None
    r = llmos("remove", "carol")
    assert r.returncode == 2 and "no user named 'carol'" in r.stderr
