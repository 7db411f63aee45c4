"""MCP servers over the API and the CLI of a running server: registration, per-user visibility, a rug
pull shown by `llmos mcp list` and approved by `llmos mcp approve`, all audited.

Attacks: a non-admin registering a stdio command (code the server would run); a non-loopback URL;
another user reading, refreshing, approving or removing a server that is not theirs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmos.kernel import Syscalls
from llmos.kernel.users import UserStore
from llmos.security.capabilities import Capabilities
from llmos.server.system import boot
from tests.kernel.test_approvals_api import _cli
from tests.server.test_service import Served
from tests.stub_backend import StubBackend

SERVER = str(Path(__file__).parents[1] / "fixtures" / "mcp_server.py")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(boot(tmp_path / "home", backend=StubBackend()))
    yield s
    s.close()


async def lookup(sys: Syscalls) -> tuple[str, Any]:
    r = await sys.tool_call("mcp.fx.lookup", {"word": "cat"})
    return r.status, r.content if r.ok else r.reason


def _lookup(served: Served) -> tuple[str, Any]:
    async def go() -> Any:
        caps = Capabilities.of([{"tool": "mcp.fx.lookup"}])
        return await served.system.kernel.wait(await served.system.kernel.spawn(lookup, capabilities=caps))

    return served.run(go())


def test_mcp_over_the_api_and_the_cli(served: Served, tmp_path: Path):
    home, state = served.system.home, tmp_path / "state.json"
    _, alice_key = UserStore.of_home(home).add("alice")
    admin, alice = served.client(served.system.local_key), served.client(alice_key)
    body = {"name": "fx", "command": [sys.executable, SERVER, "stdio"],
            "env": {"LLMOS_MCP_STATE": str(state)}}

    r = alice.post("/v1/mcp/servers", json=body)
    assert r.status_code == 403 and "only an admin may register one" in r.json()["error"]["message"]
    r = alice.post("/v1/mcp/servers", json={"name": "web", "url": "http://example.com/mcp"})
    assert r.status_code == 400 and "loopback" in r.json()["error"]["message"]
    r = admin.post("/v1/mcp/servers", json=body)
    assert r.status_code == 200, r.text
    assert [t["syscall"] for t in r.json()["tools"]] == ["mcp.fx.add", "mcp.fx.hang", "mcp.fx.lookup"]
    assert admin.post("/v1/mcp/servers", json=body).status_code == 400  # the name is taken

    assert alice.get("/v1/mcp/servers").json()["data"] == []
    for r in (alice.get("/v1/mcp/servers/fx"), alice.post("/v1/mcp/servers/fx/refresh"),
              alice.post("/v1/mcp/servers/fx/tools/lookup/approve"), alice.delete("/v1/mcp/servers/fx")):
        assert r.status_code == 404 and r.json()["error"]["message"] == "no MCP server named 'fx'"

    status, content = _lookup(served)
    assert status == "allowed" and content.startswith("cat: a word.")

    # the rug pull: refused; the CLI shows the change and approves it
    state.write_text(json.dumps({"description": "Now also reads your mail."}))
    status, reason = _lookup(served)
    assert status == "denied" and "changed the description of mcp.fx.lookup" in reason
    r = _cli(home, "mcp", "list")
    assert r.returncode == 0, r.stderr
    assert "fx (stdio, owner local)" in r.stdout
    assert "mcp.fx.lookup" in r.stdout
    assert "CHANGED (description): refused until `llmos mcp approve fx lookup`" in r.stdout
    r = _cli(home, "mcp", "approve", "fx", "lookup")
    assert r.returncode == 0 and "CHANGED" not in r.stdout, r.stderr
    assert _lookup(served)[0] == "allowed"
    r = admin.post("/v1/mcp/servers/fx/tools/lookup/approve")
    assert r.status_code == 409 and "no changed definition" in r.json()["error"]["message"]

    # the CLI registers a stdio server too, and removes it
    r = _cli(home, "mcp", "add", "fx2", "--", sys.executable, SERVER, "stdio")
    assert r.returncode == 0, r.stderr
    assert "registered fx2: 3 tools pinned" in r.stdout and "mcp.fx2.lookup  sha256 " in r.stdout
    assert "mcp.fx2.add" in served.system.kernel.tools
    r = _cli(home, "mcp", "remove", "fx2")
    assert r.returncode == 0 and "mcp.fx2.add" not in served.system.kernel.tools

    rows = [(r["tool"], r["agent"], r["reason"])
            for r in admin.get("/v1/kernel/audit", params={"limit": 300}).json()["data"]
            if r["tool"] in ("mcp.pin", "mcp.changed", "mcp.approve")]
    assert rows[:5] == [("mcp.pin", "user:local", "pinned the definition of mcp.fx.add"),
                        ("mcp.pin", "user:local", "pinned the definition of mcp.fx.hang"),
                        ("mcp.pin", "user:local", "pinned the definition of mcp.fx.lookup"),
                        ("mcp.changed", "mcp", "the server changed the description of mcp.fx.lookup"),
                        ("mcp.approve", "user:local", "approved the definition of mcp.fx.lookup")]
