"""The agents API with the official letta-client against a real server whose model is scripted:
users' isolation, queued runs in order, cancel, errors, and durability across kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from letta_client import BadRequestError, Letta, NotFoundError

from llmos.memory import ArchivalStorage, CoreMemory, RecallStorage, open_store
from llmos.memory.agents import INTERRUPTED, AgentDef, AgentStore
from llmos.server import create_app
from tests.server.conftest import _free_port
from tests.server.scripted_server import client, scripted_system, serve, wait_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> Iterator[dict]:
    """One server with a scripted model (0.5 s per step) and users alice, bob and an admin."""
    home = tmp_path_factory.mktemp("home")
    system = scripted_system(home, delay=0.5)
    keys = {name: system.users.add(name, admin=name == "root")[1] for name in ("alice", "bob", "root")}
    server, thread, url = serve(create_app(system=system))
    yield {"url": url, "keys": keys, "system": system}
    server.should_exit = True
    thread.join(timeout=10)


def test_users_cannot_see_each_others_agents(scripted):
    alice, bob, root = client(scripted, "alice"), client(scripted, "bob"), client(scripted, "root")
    agent = alice.agents.create(name="private", memory_blocks=[{"label": "human", "value": "Alice"}])
    assert [a.id for a in alice.agents.list(name="private")] == [agent.id]
    assert bob.agents.list(name="private").items == []
    for attack in (lambda: bob.agents.retrieve(agent.id),
                   lambda: bob.agents.messages.create(agent.id, messages=[{"role": "user", "content": "hi"}]),
                   lambda: bob.agents.messages.list(agent.id),
                   lambda: bob.agents.blocks.retrieve("human", agent_id=agent.id),
                   lambda: bob.agents.blocks.update("human", agent_id=agent.id, value="pwned"),
                   lambda: bob.agents.passages.create(agent.id, text="planted"),
                   lambda: bob.agents.passages.list(agent.id),
                   lambda: bob.agents.export_file(agent.id),
                   lambda: bob.agents.update(agent.id, name="mine"),
                   lambda: bob.agents.delete(agent.id)):
        with pytest.raises(NotFoundError) as e:
            attack()
        assert e.value.status_code == 404
    # an unknown id answers exactly the same, so existence does not leak
    with pytest.raises(NotFoundError) as unknown:
        bob.agents.retrieve("agent-00000000-0000-0000-0000-000000000000")
    with pytest.raises(NotFoundError) as hidden:
        bob.agents.retrieve(agent.id)
    assert unknown.value.body["error"]["message"].replace("agent-00000000-0000-0000-0000-000000000000", "X") \
        == hidden.value.body["error"]["message"].replace(agent.id, "X")
    assert alice.agents.blocks.retrieve("human", agent_id=agent.id).value == "Alice"
    assert agent.id in [a.id for a in root.agents.list()]  # the admin sees everyone's
    run = alice.agents.messages.create_async(agent.id, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(NotFoundError):
        bob.runs.retrieve(run.id)
    with pytest.raises(NotFoundError):
        bob.runs.messages.list(run.id)
    assert run.id not in [r.id for r in bob.runs.list()]
    # through his own agent, bob can name alice's passage or run, and reach neither
    own = bob.agents.create(name="bobs")
    (passage,) = alice.agents.passages.create(agent.id, text="alice's secret")
    with pytest.raises(NotFoundError):
        bob.agents.passages.delete(passage.id, agent_id=own.id)
    assert bob.agents.messages.cancel(own.id, run_ids=[run.id]) == {}
    assert wait_run(alice, run.id).status == "completed"
    assert [p.text for p in alice.agents.passages.list(agent.id)] == ["alice's secret"]
    for a in (alice, bob):
        a.agents.delete((agent if a is alice else own).id)


def test_a_busy_agent_queues_messages_in_order(scripted):
    c = client(scripted, "alice")
    agent = c.agents.create(name="queue")
    runs = [c.agents.messages.create_async(agent.id, messages=[{"role": "user", "content": f"m{i}"}])
            for i in range(3)]
    statuses = [c.runs.retrieve(r.id).status for r in runs]
    assert statuses == ["running", "created", "created"]  # queued behind the first
    assert c.runs.retrieve(runs[2].id).metadata == {"queued": True}
    finished = [wait_run(c, r.id) for r in runs]
    assert [r.status for r in finished] == ["completed"] * 3
    assert [r.stop_reason for r in finished] == ["end_turn"] * 3
    assert finished[0].completed_at <= finished[1].completed_at <= finished[2].completed_at
    history = list(c.agents.messages.list(agent.id, order="asc"))
    kinds = [(m.message_type, m.content) for m in history]
    assert [k for k in kinds if k[0] == "user_message"] == [("user_message", f"m{i}") for i in range(3)]
    assert [k[0] for k in kinds] == ["user_message", "assistant_message"] * 3  # never interleaved


def test_cancel_a_running_and_a_queued_run(scripted):
    c = client(scripted, "alice")
    agent = c.agents.create(name="cancel")
    running = c.agents.messages.create_async(agent.id, messages=[{"role": "user", "content": "one"}])
    queued = c.agents.messages.create_async(agent.id, messages=[{"role": "user", "content": "two"}])
    deadline = time.monotonic() + 10
    while c.runs.retrieve(running.id).status != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    out = c.agents.messages.cancel(agent.id)
    assert set(out) == {running.id, queued.id}
    assert [wait_run(c, r.id).status for r in (running, queued)] == ["cancelled", "cancelled"]
    assert c.runs.retrieve(running.id).stop_reason == "cancelled"
    # the cancelled step left nothing half-done, and the agent answers the next message
    reply = c.agents.messages.create(agent.id, messages=[{"role": "user", "content": "three"}])
    assert [m.message_type for m in reply.messages] == ["assistant_message"]
    history = c.agents.messages.list(agent.id, order="asc")
    users = [m.content for m in history if m.message_type == "user_message"]
    assert users[-1] == "three" and "two" not in users


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # letta-client marks .stream() deprecated
def test_replies_in_letta_shapes_sync_and_streamed(scripted):
    c = client(scripted, "alice")
    agent = c.agents.create(name="shapes")
    reply = c.agents.messages.create(agent.id, input="hello")
    (said,) = reply.messages
    assert (said.message_type, said.content.startswith("ok ")) == ("assistant_message", True)
    assert (reply.stop_reason.stop_reason, reply.usage.step_count) == ("end_turn", 1)
    events = list(c.agents.messages.stream(agent.id, messages=[{"role": "user", "content": "again"}]))
    assert [e.message_type for e in events] == ["assistant_message", "stop_reason", "usage_statistics"]
    # the wire format, as curl sees it: one JSON object per SSE event, then [DONE]
    body = httpx.post(f"{scripted['url']}/v1/agents/{agent.id}/messages/stream",
                      headers={"Authorization": f"Bearer {scripted['keys']['alice']}"},
                      json={"messages": [{"role": "user", "content": "once more"}]}, timeout=30).text
    lines = [line for line in body.split("\n") if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: {") for line in lines[:-1])
    kinds = [json.loads(line[6:])["message_type"] for line in lines[:-1]]
    assert kinds == ["assistant_message", "stop_reason", "usage_statistics"]
    history = list(c.agents.messages.list(agent.id, order="asc"))
    assert [m.content for m in history if m.message_type == "user_message"] == ["hello", "again", "once more"]
    assert history[1].id == said.id and history[3].id == events[0].id  # the reply's ids are the history's


def test_tool_rules_reach_the_agents_grammar(scripted):
    c = client(scripted, "alice")
    rules = [{"type": "run_first", "tool_name": "archival_memory_search"}]
    agent = c.agents.create(name="rules", tool_rules=rules)
    assert [(r.type, r.tool_name) for r in agent.tool_rules] == [("run_first", "archival_memory_search")]
    backend = scripted["system"].backend
    before = len(backend.offered)
    reply = c.agents.messages.create(agent.id, input="hi", max_steps=2)
    # step 1 may only run the first tool; the last step may only reply (the reply guarantee)
    assert backend.offered[before:] == [["archival_memory_search"], ["send_message"]]
    assert [m.message_type for m in reply.messages] == ["assistant_message"]


def test_bad_requests_say_what_is_wrong(scripted):
    c = client(scripted, "alice")
    with pytest.raises(BadRequestError, match="over its limit"):
        c.agents.create(name="x", memory_blocks=[{"label": "human", "value": "x" * 11, "limit": 10}])
    with pytest.raises(BadRequestError, match="no tool 'rm_rf'"):
        c.agents.create(name="x", tools=["rm_rf"])
    with pytest.raises(BadRequestError, match="tool_rules"):
        c.agents.create(name="x", tool_rules=[{"type": "exit_loop", "tool_name": "not_a_tool"}])
    with pytest.raises(BadRequestError, match="not served here"):
        c.agents.create(name="x", model="openai/gpt-4o-mini")
    agent = c.agents.create(name="limits", memory_blocks=[{"label": "human", "value": "", "limit": 5}])
    with pytest.raises(BadRequestError, match="over its limit"):
        c.agents.blocks.update("human", agent_id=agent.id, value="123456")
    with pytest.raises(NotFoundError):
        c.agents.blocks.retrieve("nope", agent_id=agent.id)
    with pytest.raises(BadRequestError, match="send_message cannot be detached"):
        c.agents.tools.detach("tool-send_message", agent_id=agent.id)
    c.agents.delete(agent.id)
    with pytest.raises(NotFoundError):
        c.agents.retrieve(agent.id)


def test_a_bad_agent_file_imports_nothing(scripted):
    c = client(scripted, "alice")
    agent = c.agents.create(name="exported", memory_blocks=[{"label": "human", "value": "Ann"}])
    good = json.loads(c.agents.export_file(agent.id))
    before = [a.id for a in c.agents.list()]
    bad = [b"not json", json.dumps({**good, "llmos_agent_file": 99}).encode(),
           json.dumps({**good, "blocks": [{"label": "human", "value": "x" * 9, "limit": 3}]}).encode(),
           json.dumps({**good, "messages": [{"role": "root", "content": "x", "created_at": 1}]}).encode(),
           json.dumps({**good, "passages": [{"text": "x", "embedding": "AAAA"}]}).encode(),
           json.dumps({**good, "agent": {**good["agent"], "tools": ["rm_rf"]}}).encode()]
    for raw in bad:
        with pytest.raises(BadRequestError):
            c.agents.import_file(file=("bad.json", raw))
    assert [a.id for a in c.agents.list()] == before


def test_an_open_step_is_rolled_back_whole(tmp_path):
    """The journal alone: a step that wrote messages, a passage and a block edit and never committed."""
    memory = open_store(tmp_path)
    store = AgentStore(tmp_path / "agents.db", memory)
    agent = store.create(AgentDef("agent-1", "local", "a", "sys", ["send_message"]), [("human", "Ann", 100)],
                         "sys")
    recall, core = RecallStorage(memory, agent.id), CoreMemory(memory, agent.id)
    recall.append("user", "kept")
    archival = ArchivalStorage(memory, agent.id, embedder=_FakeEmbedder())
    archival.insert("kept passage")
    store.begin_step(agent.id, "run-1")
    recall.append("assistant", '{"function": "x"}', name="x")
    archival.insert("lost passage")
    core.append("human", "lost line")
    store.close()  # the server dies here, the step open
    store = AgentStore(tmp_path / "agents.db", memory)
    assert store.recover() == []
    assert [m.content for m in recall.in_context()] == ["kept"]
    assert [p.text for p in archival.search("passage", page_size=5).items] == ["kept passage"]
    assert core.get("human").value == "Ann"
    assert not store.open_step(agent.id)


class _FakeEmbedder:
    def encode(self, texts: list[str]) -> np.ndarray:
        return np.ones((len(texts), 4), dtype=np.float32) / 2


def _start(home: Path, port: int, *calls: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.server.scripted_server", str(home), str(port),
                             *(json.dumps(c) for c in calls)], cwd=ROOT, env=env)
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/agents/", timeout=1)
            return proc
        except httpx.TransportError:
            assert proc.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)


def test_kill_9_in_the_middle_of_a_step_and_restart(tmp_path):
    port = _free_port()
    remember = {"function": "core_memory_append",
                "arguments": {"label": "human", "content": "likes tea", "request_heartbeat": True}}
    slow = {"function": "slow_tool", "arguments": {"request_heartbeat": True}}
    server = _start(tmp_path, port, remember, slow)
    try:
        c = Letta(base_url=f"http://127.0.0.1:{port}", max_retries=0)
        agent = c.agents.create(name="durable", tools=["slow_tool"],
                                memory_blocks=[{"label": "human", "value": "Name: Ann", "limit": 200}])
        run = c.agents.messages.create_async(agent.id, messages=[{"role": "user", "content": "remember"}],
                                             max_steps=4)
        queued = c.agents.messages.create_async(agent.id, messages=[{"role": "user", "content": "next"}])
        deadline = time.monotonic() + 30
        while "SHOULD VANISH" not in c.agents.blocks.retrieve("human", agent_id=agent.id).value:
            assert time.monotonic() < deadline, "the slow step never started"
            time.sleep(0.05)
        os.kill(server.pid, signal.SIGKILL)  # step 2 has written its call and a block edit
        server.wait(timeout=10)
        server = _start(tmp_path, port)
        c = Letta(base_url=f"http://127.0.0.1:{port}", max_retries=0)
        assert [a.id for a in c.agents.list(name="durable")] == [agent.id]
        # step 1 (core_memory_append) is all there; step 2 (slow_tool) is not there at all
        assert c.agents.blocks.retrieve("human", agent_id=agent.id).value == "Name: Ann\nlikes tea"
        interrupted = c.runs.retrieve(run.id)
        assert (interrupted.status, interrupted.stop_reason) == ("failed", "error")
        assert interrupted.metadata["error"] == INTERRUPTED
        # the message that was queued behind it was kept, and runs now
        assert wait_run(c, queued.id).status == "completed"
        history = list(c.agents.messages.list(agent.id, order="asc"))[:3]
        def name(m) -> str | None:
            return m.tool_call.name if m.message_type == "tool_call_message" else getattr(m, "name", None)

        assert [(m.message_type, name(m)) for m in history] == [
            ("user_message", None), ("tool_call_message", "core_memory_append"),
            ("tool_return_message", "core_memory_append")]
        reply = c.agents.messages.create(agent.id, messages=[{"role": "user", "content": "still there?"}])
        assert [m.message_type for m in reply.messages] == ["assistant_message"]
        assert reply.stop_reason.stop_reason == "end_turn"
        history = c.agents.messages.list(agent.id, order="asc")
        assert [m.content for m in history if m.message_type == "user_message"] == [
            "remember", "next", "still there?"]
    finally:
        server.kill()
        server.wait(timeout=10)
