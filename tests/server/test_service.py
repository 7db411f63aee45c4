"""The OS as a service: one System booted on a home, served on 127.0.0.1, its kernel API per user,
the CLI finding the server, and `llmos serve` itself."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from llmos.kernel.users import UserStore
from llmos.server import create_app
from llmos.server.system import AgentTurns, System, boot, find_server
from tests.server.conftest import _free_port

LLMOS = str(Path(sys.executable).with_name("llmos"))


class Served:
    """A System served by uvicorn in a thread, on that thread's own event loop."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.loop = asyncio.new_event_loop()
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(system=system), host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.server.serve(),),
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        system.publish(self.url)

    def run(self, coro, timeout: float = 60):
        """Run a coroutine on the server's loop (where the kernel lives)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"} if key else {},
                            timeout=30)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.loop.run_until_complete(self.system.aclose())
        self.loop.close()


@pytest.fixture
def served(llm, tmp_path) -> Iterator[Served]:
    s = Served(boot(tmp_path / "home", llm=llm, policy="fair"))
    yield s
    s.close()


async def _worker(sys, tool_expr: str, hold: float = 3600.0):
    """A process that leaves one audit row (a calculator call), then stays alive."""
    await sys.tool_call("calculator", {"expression": tool_expr})
    await sys.sleep(hold)


def _spawn(served: Served, owner: str, expr: str) -> int:
    async def go():
        return await served.system.kernel.spawn(_worker, f"w-{expr}", owner=owner, args={"tool_expr": expr})

    pid = served.run(go())
    deadline = time.monotonic() + 30
    while served.system.kernel.process(pid).tool_calls < 1 or len(served.system.audit) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return pid


def test_two_users_cannot_see_each_others_processes_or_audit_rows(served):
    users = UserStore.of_home(served.system.home)
    alice, alice_key = users.add("alice")
    bob, bob_key = users.add("bob")
    a_pid, b_pid = _spawn(served, alice.id, "1+1"), _spawn(served, bob.id, "2+2")
    time.sleep(0.3)  # the audit rows of both calls are written
    with served.client(alice_key) as a, served.client(bob_key) as b, \
            served.client(served.system.local_key) as admin:
        assert [p["pid"] for p in a.get("/v1/kernel/processes").json()["data"]] == [a_pid]
        assert [p["pid"] for p in b.get("/v1/kernel/processes").json()["data"]] == [b_pid]
        assert {p["pid"] for p in admin.get("/v1/kernel/processes").json()["data"]} == {a_pid, b_pid}
        every = a.get("/v1/kernel/processes", params={"all": True}).json()["data"]
        assert [p["pid"] for p in every] == [a_pid]
        assert [x["pid"] for x in a.get("/v1/kernel/stats").json()["agents"]] == [a_pid]

        # another user's process answers exactly like one that does not exist
        theirs, missing = a.get(f"/v1/kernel/processes/{b_pid}"), a.get("/v1/kernel/processes/999999")
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json()["error"]["code"] == missing.json()["error"]["code"] == "process_not_found"
        assert theirs.json()["error"]["message"] == f"no process with pid {b_pid}"
        r = a.post(f"/v1/kernel/processes/{b_pid}/signal", json={"signal": "kill"})
        assert r.status_code == 404 and served.system.kernel.process(b_pid).alive

        a_rows = a.get("/v1/kernel/audit", params={"limit": 100}).json()["data"]
        b_rows = b.get("/v1/kernel/audit", params={"limit": 100}).json()["data"]
        all_rows = admin.get("/v1/kernel/audit", params={"limit": 100}).json()["data"]
        assert a_rows and {r["agent"] for r in a_rows} == {"w-1+1"}
        assert b_rows and {r["agent"] for r in b_rows} == {"w-2+2"}
        assert {r["id"] for r in all_rows} >= {r["id"] for r in a_rows + b_rows}
        assert a.get("/v1/kernel/audit/verify").status_code == 403
        v = admin.get("/v1/kernel/audit/verify").json()
        assert v["ok"] is True and v["row"] is None

        # bob names a process after alice's: rows under that name are no longer anyone's but the admin's
        async def impostor():
            return await served.system.kernel.spawn(_worker, "w-1+1", owner=bob.id, args={"tool_expr": "9"})

        served.run(impostor())
        assert a.get("/v1/kernel/audit", params={"limit": 100}).json()["data"] == []
        b_rows = b.get("/v1/kernel/audit", params={"limit": 100}).json()["data"]
        assert {r["agent"] for r in b_rows} == {"w-2+2"}

        # a user signals their own: suspend, resume, kill; a second kill is refused as not running
        for sig, state in (("suspend", "suspended"), ("resume", "blocked"), ("kill", "terminated")):
            r = a.post(f"/v1/kernel/processes/{a_pid}/signal", json={"signal": sig})
            assert r.status_code == 200 and r.json()["state"] == state, r.json()
        r = a.post(f"/v1/kernel/processes/{a_pid}/signal", json={"signal": "kill"})
        assert r.status_code == 409 and "has already ended" in r.json()["error"]["message"]
        assert a.post(f"/v1/kernel/processes/{a_pid}/signal", json={"signal": "stop"}).status_code == 400
        assert admin.post(f"/v1/kernel/processes/{b_pid}/signal", json={"signal": "kill"}).status_code == 200


def test_keys_are_required_once_a_user_exists(served):
    with served.client() as anon:
        assert anon.get("/v1/kernel/processes").status_code == 200  # no key configured: the local user
        alice, key = UserStore.of_home(served.system.home).add("alice")
        r = anon.get("/v1/kernel/processes")
        assert r.status_code == 401
        assert r.json() == {"error": {"message": "missing API key", "type": "authentication_error",
                                      "param": None, "code": "invalid_api_key"}}
        assert anon.get("/v1/kernel/processes", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert anon.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert anon.get("/v1/kernel/processes", headers={"X-API-Key": key}).status_code == 200
        for header in (f"bearer {key}", f"Bearer   {key}"):  # the scheme in any case, spaces between
            assert anon.get("/v1/kernel/processes", headers={"Authorization": header}).status_code == 200
        for header in (f"Basic {key}", f"Bearer {key[:-1]}", f"Bearer {key}x", "Bearer", key):
            assert anon.get("/v1/kernel/processes", headers={"Authorization": header}).status_code == 401
        # a wrong bearer token is not rescued by a right X-API-Key: the bearer token is the key
        both = {"Authorization": "Bearer nope", "X-API-Key": key}
        assert anon.get("/v1/kernel/processes", headers=both).status_code == 401
        admin, admin_key = UserStore.of_home(served.system.home).add("root", admin=True)
        r = anon.get("/v1/kernel/audit/verify", headers={"Authorization": f"Bearer {admin_key}"})
        assert r.status_code == 200 and r.json()["ok"] is True
        assert anon.get("/v1/kernel/audit/verify", headers={"X-API-Key": key}).status_code == 403
        assert anon.get("/health").status_code == 200
        UserStore.of_home(served.system.home).remove("alice")  # the last user: keys stay required
        assert anon.get("/v1/kernel/processes", headers={"X-API-Key": key}).status_code == 401
        assert anon.get("/v1/kernel/processes").status_code == 401


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMOS_HOME": str(home)}
    env.pop("LLMOS_API_KEY", None)
    env.pop("LLMOS_URL", None)
    return subprocess.run([LLMOS, *args], capture_output=True, text=True, env=env, timeout=120)


def test_the_cli_finds_the_running_server(served):
    home = served.system.home
    assert find_server(home)["url"] == served.url
    assert (home / "server.json").stat().st_mode & 0o777 == 0o600
    pid = _spawn(served, "local", "3+3")
    r = _cli(home, "ps")
    assert r.returncode == 0, r.stderr
    assert "w-3+3" in r.stdout and str(pid) in r.stdout
    alice, key = UserStore.of_home(home).add("alice")
    r = _cli(home, "ps", "--url", served.url, "--api-key", key)  # alice sees none of the local user's
    assert r.returncode == 0 and "no agents running" in r.stdout
    r = _cli(home, "kill", str(pid), "--url", served.url, "--api-key", key)
    assert r.returncode == 2 and f"no process with pid {pid}" in r.stderr
    r = _cli(home, "audit", "tail", "--url", served.url, "--api-key", key)
    assert r.returncode == 0 and "w-3+3" not in r.stdout  # alice's rows: none
    r = _cli(home, "audit", "tail")
    assert r.returncode == 0 and "w-3+3" in r.stdout and "calculator" in r.stdout
    r = _cli(home, "audit", "verify", "--url", served.url)
    assert r.returncode == 0 and r.stdout.startswith("ok: ")
    r = _cli(home, "audit", "verify", "--url", served.url, "--api-key", key)
    assert r.returncode == 2 and "needs an admin key" in r.stderr
    r = _cli(home, "kill", str(pid))  # the home's local key: the admin
    assert r.returncode == 0 and f"{pid} (w-3+3): kill: done" in r.stdout
    assert not served.system.kernel.process(pid).alive
    r = _cli(home, "top", "--once")
    assert r.returncode == 0 and "policy fair" in r.stdout


def test_the_operator_runs_on_the_servers_kernel(tmp_path):
    from tests.server.scripted_server import ScriptedBackend

    served = Served(boot(tmp_path, backend=ScriptedBackend()))
    try:
        pid = served.run(served.system.start_operator(interval_s=0.1))
        deadline = time.monotonic() + 30
        while served.system.kernel.process(pid).syscalls < 3:  # it observes through kernel_stats
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc = served.system.kernel.process(pid)
        assert proc.alive and proc.owner == "local" and proc.syscall_errors == 0, proc.info()
        with served.client() as http:
            assert [p["name"] for p in http.get("/v1/kernel/processes").json()["data"]] == ["operator"]
    finally:
        served.close()
    assert served.system.kernel.process(pid).exit_reason == "kernel shut down"


def test_a_stale_server_file_is_ignored(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": int(dead)}))
    assert find_server(tmp_path) is None
    r = _cli(tmp_path, "ps")  # falls back to the home's process table, as without a server
    assert r.returncode == 2 and "no kernel has run yet" in r.stderr
    # a live pid that is not a server (the pid was reused): nothing answers at the URL
    (tmp_path / "server.json").write_text(json.dumps({"url": f"http://127.0.0.1:{_free_port()}",
                                                      "pid": os.getpid()}))
    assert find_server(tmp_path) is not None
    r = _cli(tmp_path, "ps")
    assert r.returncode == 2 and "no kernel has run yet" in r.stderr


def test_agent_turns_are_first_come_first_served():
    async def main():
        turns, order = AgentTurns(), []

        async def message(i: int):
            async with turns.turn("a"):
                order.append(("start", i, turns.queued("a")))
                await asyncio.sleep(0.01)
                order.append(("end", i))

        tasks = [asyncio.create_task(message(i)) for i in range(5)]
        await asyncio.sleep(0)
        assert turns.busy("a") and turns.queued("a") == 4
        async with turns.turn("b"):  # another agent is not held up by a's queue
            assert turns.busy("a") and turns.queued("a") == 4
        await asyncio.gather(*tasks)
        assert order == [e for i in range(5) for e in (("start", i, 4 - i if i else 0), ("end", i))]
        assert not turns.busy("a") and turns.queued("a") == 0

    asyncio.run(main())


def test_llmos_serve_boots_publishes_and_cleans_up(tmp_path):
    port = _free_port()
    env = {**os.environ, "LLMOS_HOME": str(tmp_path)}
    env.pop("LLMOS_API_KEY", None)
    proc = subprocess.Popen([LLMOS, "serve", "--port", str(port), "--kv-budget", "64MiB", "--policy", "rr"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while (info := find_server(tmp_path)) is None:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "llmos serve did not publish its URL"
            time.sleep(0.2)
        assert info["url"] == f"http://127.0.0.1:{port}" and info["pid"] == proc.pid
        stats = httpx.get(f"{info['url']}/v1/kernel/stats", timeout=30).json()
        assert stats["policy"] == "rr"
        assert httpx.get(f"{info['url']}/v1/models", timeout=30).json()["data"][0]["id"] == \
            "smollm2-135m-instruct"
        r = _cli(tmp_path, "ps")
        assert r.returncode == 0 and "no agents running" in r.stdout
        r = _cli(tmp_path, "serve", "--port", str(_free_port()))  # a second server on the same home
        assert r.returncode == 2 and "llmos already serves this home" in r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not (tmp_path / "server.json").exists()
    assert "llmos serving smollm2-135m-instruct" in out
