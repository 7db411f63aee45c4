"""Remote agent programs: `llmos run --url` runs a program in another OS process whose syscalls go to a
real server's kernel: its LLM call is the kernel's, its allowed tool call works, its denied one is
denied and audited, killing it over the API ends the program.

Attacks: a process token used with another user's key; a made-up token; a token of one process
making syscalls as another; a non-admin asking for more than the default grants; spawning remotely.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmos.kernel.users import UserStore
from llmos.server.system import boot
from tests.server.scripted_server import ScriptedBackend
from tests.server.test_service import Served

LLMOS = str(Path(sys.executable).with_name("llmos"))

AGENT = '''
async def main(sys, word="cat"):
    chat = await sys.llm_chat([{"role": "user", "content": word}], max_tokens=8)
    ok = await sys.tool_call("calculator", {"expression": "6*7"})
    no = await sys.tool_call("read_file", {"path": "/etc/passwd"})
    sys.print("hello from afar")
    return {"chat": chat.text, "ok": [ok.status, ok.content], "no": [no.status, no.reason]}
'''

SLEEPER = '''
async def main(sys):
    while True:
        await sys.sleep(0.1)
'''


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(boot(tmp_path / "home", backend=ScriptedBackend()))
    yield s
    s.close()


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LLMOS_API_KEY", "LLMOS_URL")}
    return env | {"LLMOS_HOME": str(home)}


def test_a_remote_program_runs_in_another_process_through_the_kernel(served: Served, tmp_path: Path):
    home, kernel = served.system.home, served.system.kernel
    (tmp_path / "agent.py").write_text(AGENT)
    r = subprocess.run([LLMOS, "run", "--url", served.url, str(tmp_path / "agent.py"), "--arg", "word=dog"],
                       capture_output=True, text=True, env=_env(home), timeout=120)
    assert r.returncode == 0, r.stderr
    [proc] = [p for p in kernel.procs.values() if p.name == "agent"]
    assert f"pid {proc.pid} (agent): exited: " in r.stdout
    assert "'chat': 'summary'" in r.stdout and "'ok': ['allowed', '42']" in r.stdout
    assert "'no': ['denied', \"denied: denied by capabilities: path path='/etc/passwd' is outside" in r.stdout
    assert (proc.exit_reason, proc.tokens_used, proc.tool_calls) == ("exited", 11, 2)  # the kernel's LLM call
    assert "hello from afar" in "".join(str(x) for x in proc.output)
    rows = [(row["tool"], row["decision"]) for row in served.system.audit.tail(50) if row["agent"] == "agent"]
    assert rows == [("calculator", "allow"), ("calculator", "done"), ("read_file", "deny")]

    # killed over the API: the program in the other process ends
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    p = subprocess.Popen([LLMOS, "run", "--url", served.url, str(tmp_path / "sleeper.py")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(home))
    try:
        deadline = time.monotonic() + 120
        while not [q for q in kernel.procs.values() if q.name == "sleeper" and q.alive]:
            assert time.monotonic() < deadline and p.poll() is None, p.stderr.read() if p.poll() else ""
            time.sleep(0.1)
        [sleeper] = [q for q in kernel.procs.values() if q.name == "sleeper"]
        admin = served.client(served.system.local_key)
        r = admin.post(f"/v1/kernel/processes/{sleeper.pid}/signal", json={"signal": "kill"})
        assert r.status_code == 200
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 2
    assert f"sleeper: ProcessEnded: process {sleeper.pid} has ended: " in " ".join(err.split())
    assert not sleeper.alive


def test_a_process_token_names_one_process_of_one_user(served: Served):
    home = served.system.home
    _, alice_key = UserStore.of_home(home).add("alice")
    admin, alice = served.client(served.system.local_key), served.client(alice_key)
    a = admin.post("/v1/remote/spawn", json={"name": "ra"}).json()
    b = admin.post("/v1/remote/spawn", json={"name": "rb"}).json()
    assert a["pid"] != b["pid"] and a["token"] != b["token"]

    def call(client: httpx.Client, token: str, name: str, args: dict) -> httpx.Response:
        return client.post("/v1/remote/syscall", json={"name": name, "args": args},
                           headers={"X-LLMOS-Process": token})

    # another user's key with a's token, and a made-up token: no such process
    for r in (call(alice, a["token"], "tool_call", {"tool": "calculator", "args": {"expression": "1+1"}}),
              call(admin, "made-up", "tool_call", {"tool": "calculator", "args": {"expression": "1+1"}})):
        assert r.status_code == 404 and r.json()["error"]["message"] == "no remote process has this token"
    # a's token acts as a, never as b
    r = call(admin, a["token"], "tool_call", {"tool": "calculator", "args": {"expression": "2+3"}})
    assert r.status_code == 200 and r.json()["result"]["content"] == "5"
    kernel = served.system.kernel
    assert (kernel.process(a["pid"]).tool_calls, kernel.process(b["pid"]).tool_calls) == (1, 0)
    assert call(admin, a["token"], "spawn", {}).status_code == 400  # no remote spawn
    r = call(admin, a["token"], "kernel_stats", {})  # privileged syscalls pass the monitor, as in-process
    assert r.status_code == 400 and "no capability for tool 'kernel.stats'" in r.json()["error"]["message"]
    r = call(admin, a["token"], "signal", {"pid": b["pid"], "signal": "kill"})
    assert r.status_code == 400 and "no capability for tool 'kernel.signal'" in r.json()["error"]["message"]
    assert call(admin, a["token"], "wait", {}).status_code == 400

    async def quick(sys) -> dict:
        return {"answer": 42}

    child = served.run(kernel.spawn(quick, "quick"))
    r = call(admin, a["token"], "wait", {"pid": child})
    assert r.status_code == 200 and r.json()["result"] == {"answer": 42}
    r = call(admin, a["token"], "llm_chat", {"messages": "not a list"})
    assert r.status_code == 400 and "messages must be a list" in r.json()["error"]["message"]
    assert call(admin, a["token"], "exit", {"result": "bye"}).status_code == 200
    deadline = time.monotonic() + 10
    while kernel.process(a["pid"]).alive:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert kernel.process(a["pid"]).result == "bye"
    r = call(admin, a["token"], "print", {"text": "late"})
    assert r.status_code == 410 and f"process {a['pid']} has ended: exited" in r.json()["error"]["message"]

    # alice gets at most the default grants; her process is hers
    r = alice.post("/v1/remote/spawn", json={"capabilities": [{"tool": "kernel.stats"}]})
    assert r.status_code == 403 and "cannot grant 'kernel.stats'" in r.json()["error"]["message"]
    mine = alice.post("/v1/remote/spawn", json={"name": "alices", "capabilities": ["calculator"]}).json()
    assert kernel.process(mine["pid"]).owner != "local"
    assert call(admin, mine["token"], "print", {"text": "x"}).status_code == 404  # admin key, her token
    r = call(alice, mine["token"], "tool_call", {"tool": "read_file", "args": {"path": "x"}})
    assert r.json()["result"]["status"] == "denied"  # only the calculator was asked for
    served.run(kernel.kill(b["pid"], "test"))
    served.run(kernel.kill(mine["pid"], "test"))
