"""Approvals over the API and the CLI of a running server: approve, deny and timeout, each user seeing
only their own, every decision audited, and the agent's view of each.

Attacks: another user listing, approving or denying someone else's parked call; deciding twice;
deciding after the timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmos.kernel import Syscalls
from llmos.kernel.approvals import approvals_of
from llmos.kernel.users import UserStore
from llmos.security.capabilities import Capabilities
from llmos.server.system import boot
from llmos.tools.base import Tool
from tests.server.test_service import Served
from tests.stub_backend import StubBackend

LLMOS = str(Path(sys.executable).with_name("llmos"))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    system = boot(tmp_path / "home", backend=StubBackend())
    system.kernel.tools.register(Tool("pay", "Pay.", {"type": "object"},
                                      lambda args, ctx: f"paid {args['amount']} to {args['to']}"))
    s = Served(system)
    yield s
    s.close()


async def payer(sys: Syscalls, amount: int) -> tuple[str, Any]:
    r = await sys.tool_call("pay", {"amount": amount, "to": "bob"})
    return r.status, r.content if r.ok else r.reason


def _spawn(served: Served, amount: int) -> tuple[int, str]:
    """A process that parks a call of `pay`; its pid and the approval's id."""
    async def go() -> int:
        caps = Capabilities.of([{"tool": "pay", "approval": True}])
        return await served.system.kernel.spawn(payer, f"payer-{amount}", capabilities=caps,
                                                args={"amount": amount})

    pid = served.run(go())
    deadline = time.monotonic() + 30
    while not [a for a in approvals_of(served.system.kernel).list() if a.pid == pid]:
        assert time.monotonic() < deadline, "the call did not park"
        time.sleep(0.02)
    [item] = [a for a in approvals_of(served.system.kernel).list() if a.pid == pid]
    return pid, item.id


def _result(served: Served, pid: int) -> Any:
    return served.run(served.system.kernel.wait(pid))


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LLMOS_API_KEY", "LLMOS_URL")}
    env["LLMOS_HOME"] = str(home)
    return subprocess.run([LLMOS, *args], capture_output=True, text=True, env=env, timeout=120)


def test_approve_deny_and_timeout_over_the_api_and_the_cli(served: Served):
    home = served.system.home
    _, alice_key = UserStore.of_home(home).add("alice")
    admin, alice = served.client(served.system.local_key), served.client(alice_key)

    # API: approve; alice sees nothing of it and cannot decide it
    pid, aid = _spawn(served, 5)
    [shown] = admin.get("/v1/approvals").json()["data"]
    assert (shown["id"], shown["pid"], shown["tool"], shown["args"], shown["state"], shown["owner"]) == \
        (aid, pid, "pay", {"amount": 5, "to": "bob"}, "pending", "local")
    assert alice.get("/v1/approvals").json()["data"] == []
    for r in (alice.get(f"/v1/approvals/{aid}"), alice.post(f"/v1/approvals/{aid}/approve"),
              alice.post(f"/v1/approvals/{aid}/deny")):
        assert r.status_code == 404 and r.json()["error"]["message"] == f"no approval {aid!r}"
    r = admin.post(f"/v1/approvals/{aid}/approve", json={"reason": "fine"})
    assert r.status_code == 200 and (r.json()["state"], r.json()["decided_by"]) == ("approved", "user:local")
    assert _result(served, pid) == ("allowed", "paid 5 to bob")
    r = admin.post(f"/v1/approvals/{aid}/deny")
    assert r.status_code == 409 and "already approved (by user:local)" in r.json()["error"]["message"]

    # API: deny with a reason; the agent reads it
    pid, aid = _spawn(served, 6)
    assert admin.post(f"/v1/approvals/{aid}/deny", json={"reason": "not bob"}).json()["state"] == "denied"
    assert _result(served, pid) == ("denied", f"denied: user:local denied this call of pay (approval {aid}): "
                                              "not bob")

    # CLI: list, approve, deny
    pid, aid = _spawn(served, 7)
    pid2, aid2 = _spawn(served, 8)
    r = _cli(home, "approvals")
    assert r.returncode == 0, r.stderr
    assert f"{aid}  pid {pid} (payer-7)  pay " in r.stdout and f"{aid2}  pid {pid2} (payer-8)" in r.stdout
    r = _cli(home, "approve", aid)
    assert r.returncode == 0 and r.stdout.strip().endswith("approved"), r.stderr
    assert _result(served, pid) == ("allowed", "paid 7 to bob")
    r = _cli(home, "deny", aid2, "--reason", "too much", "--url", served.url, "--api-key", alice_key)
    assert r.returncode == 2 and f"no approval {aid2!r}" in r.stderr  # alice may not
    r = _cli(home, "deny", aid2, "--reason", "too much")
    assert r.returncode == 0 and r.stdout.strip().endswith("denied"), r.stderr
    assert _result(served, pid2) == ("denied", f"denied: user:local denied this call of pay "
                                               f"(approval {aid2}): too much")

    # timeout: denied; too late to approve
    approvals_of(served.system.kernel).timeout_s = 0.5
    pid, aid = _spawn(served, 9)
    assert _result(served, pid) == ("denied", f"denied: pay needs a person's approval and got none within "
                                              f"0.5 s (approval {aid} timed out)")
    r = admin.post(f"/v1/approvals/{aid}/approve")
    assert r.status_code == 409 and "already expired" in r.json()["error"]["message"]
    states = {a["id"]: a["state"] for a in admin.get("/v1/approvals", params={"all": True}).json()["data"]}
    assert states[aid] == "expired"

    # every step audited
    audit = admin.get("/v1/kernel/audit", params={"limit": 200}).json()["data"]
    rows = [(r["agent"], r["decision"]) for r in audit if r["tool"] == "approval"]
    assert rows == [("payer-5", "ask"), ("payer-5", "approve"), ("payer-6", "ask"), ("payer-6", "deny"),
                    ("payer-7", "ask"), ("payer-8", "ask"), ("payer-7", "approve"), ("payer-8", "deny"),
                    ("payer-9", "ask"), ("payer-9", "expired")]
