"""Letta's requires_approval tool rule on the agents API: the agent's call of the tool waits in the
kernel's approval queue until a person decides; the agent sees the decision as the tool's result."""

import time

import httpx
import pytest

from llmos.server import create_app
from tests.server.scripted_server import say, scripted_system, serve

INSERT = {"function": "archival_memory_insert",
          "arguments": {"content": "Ann was born in Lyon.", "request_heartbeat": True}}


@pytest.fixture
def api(tmp_path):
    system = scripted_system(tmp_path, [INSERT, say("saved?"), INSERT, say("denied?")])
    server, thread, url = serve(create_app(system=system))
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client, system
    server.should_exit = True
    thread.join(timeout=10)


def _wait(client: httpx.Client, path: str, done, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(path).json()
        if done(body):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def _message(client: httpx.Client, agent: str) -> str:
    return client.post(f"/v1/agents/{agent}/messages/async", json={"input": "remember Lyon"}).json()["id"]


def test_requires_approval_parks_the_call_until_a_person_decides(api):
    client, system = api
    agent = client.post("/v1/agents/", json={"name": "ann", "tool_rules": [
        {"type": "requires_approval", "tool_name": "archival_memory_insert"}]}).json()["id"]

    run = _message(client, agent)
    (pending,) = _wait(client, "/v1/approvals", lambda b: b["data"])["data"]
    assert pending["tool"] == "archival_memory_insert"
    assert pending["args"]["content"] == "Ann was born in Lyon."
    assert client.get(f"/v1/runs/{run}").json()["status"] == "running"  # the agent waits
    assert client.get(f"/v1/agents/{agent}/archival-memory").json() == []  # nothing ran yet
    assert client.post(f"/v1/approvals/{pending['id']}/approve", json={}).status_code == 200
    _wait(client, f"/v1/runs/{run}", lambda b: b["status"] == "completed")
    assert [p["text"] for p in client.get(f"/v1/agents/{agent}/archival-memory").json()] == [
        "Ann was born in Lyon."]

    run = _message(client, agent)
    (pending,) = _wait(client, "/v1/approvals", lambda b: b["data"])["data"]
    assert client.post(f"/v1/approvals/{pending['id']}/deny", json={"reason": "not now"}).status_code == 200
    _wait(client, f"/v1/runs/{run}", lambda b: b["status"] == "completed")
    returns = [m for m in client.get(f"/v1/runs/{run}/messages").json()
               if m["message_type"] == "tool_return_message"]
    assert returns and returns[0]["status"] == "error" and "not now" in returns[0]["tool_return"]
    assert len(client.get(f"/v1/agents/{agent}/archival-memory").json()) == 1  # the denied call did not run
    assert system.kernel.procs and not approvals_left(system)


def approvals_left(system) -> dict:
    from llmos.kernel.approvals import approvals_of

    return approvals_of(system.kernel)._per_pid
