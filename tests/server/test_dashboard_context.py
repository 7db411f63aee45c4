"""The dashboard's context-window panel, time series and request owners: each API agent's main
context read live (occupancy, core memory, queue, summary, evictions, recall hits) and shown only
to its owner; the engine's rates over time from its own counters and histograms."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from letta_client import Letta

from llmos.engine.histograms import LatencyHistograms
from llmos.kernel.users import User
from llmos.memory import open_store
from llmos.memory.context import RECALL_FUNCTIONS
from llmos.server import create_app
from llmos.server.dashboard import RequestOwners, Throughput, _operator_line
from tests.server.scripted_server import client, say, scripted_system, serve, wait_run


def _search(query: str) -> dict:
    return {"function": "conversation_search", "arguments": {"query": query, "request_heartbeat": True}}


@pytest.fixture
def scripted(tmp_path) -> Iterator[dict]:
    """A server on a scripted model (0.3 s a step) with users alice and bob and an admin."""
    system = scripted_system(tmp_path / "home", delay=0.3)
    keys = {name: system.users.add(name, admin=name == "root")[1] for name in ("alice", "bob", "root")}
    server, thread, url = serve(create_app(system=system))
    yield {"url": url, "keys": keys, "system": system}
    server.should_exit = True
    thread.join(timeout=10)


def _events(url: str, key: str, count: int, until=None) -> list[str]:
    """The raw text of `count` events of the dashboard stream, as `key`'s user receives them (fewer
    when `until(event)` holds for one first)."""
    out: list[str] = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http, \
            http.stream("GET", "/v1/dashboard/events", params={"interval": 0.1}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
                if len(out) == count or (until is not None and until(out[-1])):
                    return out
    return out


def test_a_users_stream_never_shows_another_users_agents(scripted):
    alice, bob = client(scripted, "alice"), client(scripted, "bob")
    mine = alice.agents.create(name="alice-diary", memory_blocks=[
        {"label": "human", "value": "ALICE-MARKER likes the cello"}])
    theirs = bob.agents.create(name="bob-ledger", memory_blocks=[
        {"label": "human", "value": "BOB-MARKER keeps the books"}])
    users = {u.name: u.id for u in scripted["system"].users.list()}
    runs = [(alice, alice.agents.messages.create_async(mine.id, messages=[
                {"role": "user", "content": "ALICE-QUESTION about my diary"}])),
            (bob, bob.agents.messages.create_async(theirs.id, messages=[
                {"role": "user", "content": "BOB-QUESTION about the ledger"}]))]
    def shows_a_pid(event: str) -> bool:
        return any(c["pid"] is not None for c in json.loads(event)["contexts"])

    # While both runs run: until alice's context shows the pid running it (10 s at most, so a
    # loaded machine that starts the run late still gets there).
    seen = _events(scripted["url"], scripted["keys"]["alice"], 100, until=shows_a_pid)
    running = [json.loads(s)["contexts"] for s in seen]
    for c, run in runs:
        assert wait_run(c, run.id, timeout=60).status == "completed"
    seen += _events(scripted["url"], scripted["keys"]["alice"], 2)  # and after: the contexts stay listed
    text = "\n".join(seen)
    for secret in ("bob-ledger", theirs.id, "BOB-MARKER", "BOB-QUESTION", users["bob"]):
        assert secret not in text, f"alice's dashboard stream shows {secret!r}"
    last = json.loads(seen[-1])
    assert [c["agent_id"] for c in last["contexts"]] == [mine.id]
    (ctx,) = last["contexts"]
    assert ctx["name"] == "alice-diary" and ctx["owner"] == users["alice"] and ctx["pid"] is None
    assert [(b["label"], b["value"]) for b in ctx["core"] if b["label"] == "human"] == [
        ("human", "ALICE-MARKER likes the cello")]
    assert any(cs and cs[0]["pid"] is not None for cs in running), "the pid is shown while the message runs"
    # the admin sees both agents' contexts, bob only his own
    root = json.loads(_events(scripted["url"], scripted["keys"]["root"], 1)[0])
    assert {c["name"] for c in root["contexts"]} == {"alice-diary", "bob-ledger"}
    assert root["operator"] is None  # the operator is not running on this server
    bobs = "\n".join(_events(scripted["url"], scripted["keys"]["bob"], 2))
    assert "bob-ledger" in bobs and "ALICE-MARKER" not in bobs and mine.id not in bobs
    # a deleted agent leaves the panel
    alice.agents.delete(mine.id)
    assert json.loads(_events(scripted["url"], scripted["keys"]["alice"], 1)[0])["contexts"] == []


def test_the_context_panel_reads_occupancy_evictions_and_recall_hits(tmp_path):
    # step by step: search (a hit: the cello is in recall storage), search (a miss), reply; then replies
    system = scripted_system(tmp_path / "home", calls=[_search("cello"), _search("zebra"), say("found it")])
    key = system.users.add("alice")[1]
    server, thread, url = serve(create_app(system=system))
    try:
        c = Letta(base_url=url, api_key=key, max_retries=0)
        agent = c.agents.create(name="pager", context_window_limit=1400, max_tokens=128,
                                memory_blocks=[{"label": "human", "value": "plays the cello"}])
        first = c.agents.messages.create_async(agent.id, messages=[{"role": "user", "content": "my cello"}])
        assert wait_run(c, first.id, timeout=60).status == "completed"
        for i in range(4):  # long messages on a small window: the queue overflows and is flushed
            run = c.agents.messages.create_async(agent.id, messages=[
                {"role": "user", "content": f"story {i}: " + "word " * 300}])
            assert wait_run(c, run.id, timeout=60).status == "completed"
        snap = httpx.get(f"{url}/v1/dashboard/snapshot", headers={"Authorization": f"Bearer {key}"}).json()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    (ctx,) = snap["contexts"]
    store = open_store(system.home)
    row = store.agent(agent.id)
    queue = store.query("SELECT count(*) FROM messages WHERE agent = ? AND in_context = 1", (agent.id,))[0][0]
    total = store.query("SELECT count(*) FROM messages WHERE agent = ?", (agent.id,))[0][0]
    assert row["evictions"] > 0 and row["summaries"] > 0, "the small window was flushed"
    assert (ctx["evictions"], ctx["summaries"], ctx["queue"], ctx["messages"], ctx["passages"]) == (
        row["evictions"], row["summaries"], queue, total, 0)
    assert ctx["summary"] == "summary"  # what the scripted summarizer wrote
    assert (ctx["recall_searches"], ctx["recall_hits"]) == (2, 1)
    marks = ", ".join("?" * len(RECALL_FUNCTIONS))
    searches = store.query(f"SELECT content FROM messages WHERE agent = ? AND role = 'tool' AND name IN "
                           f"({marks}) ORDER BY id", (agent.id, *RECALL_FUNCTIONS))
    assert ["Showing messages" in json.loads(r[0])["message"] for r in searches] == [True, False]
    assert (ctx["window"], ctx["reply_tokens"], ctx["budget"]) == (1400, 128, 1272)
    assert ctx["tokens"] == ctx["fixed_tokens"] + ctx["summary_tokens"] + ctx["queue_tokens"]
    assert 0 < ctx["fixed_tokens"] and 0 < ctx["summary_tokens"] and ctx["tokens"] <= ctx["budget"]
    assert ctx["warning_at"] == int(1272 * 0.7) and ctx["flush_at"] == 1272
    assert [(b["label"], b["value"], b["chars"]) for b in ctx["core"] if b["label"] == "human"] == [
        ("human", "plays the cello", 15)]
    assert row["overflows"] == ctx["overflows"] == 0


def _histograms(ttft: list[float], queue: list[float]) -> dict:
    h = LatencyHistograms()
    for v in ttft:
        h.ttft.observe(v)
    for v in queue:
        h.queue.observe(v)
    return h.snapshot()


def test_the_time_series_are_differences_of_the_engines_counters():
    series = Throughput(size=3, every_s=0.5)
    assert not series.sample(100.0, {"generation_tokens": 40}, _histograms([0.2], [0.1]))  # the baseline
    assert not series.sample(100.2, {"generation_tokens": 90}, _histograms([0.2], [0.1]))  # too soon
    assert series.sample(101.0, {"generation_tokens": 90}, _histograms([0.2, 0.4, 0.6], [0.1, 1.0, 2.0]))
    assert series.sample(103.0, {"generation_tokens": 190}, _histograms([0.2, 0.4, 0.6], [0.1, 1.0, 2.0]))
    s = series.as_dict()
    assert s["tok_s"] == [50.0, 50.0]  # 50 tokens in 1 s, 100 in 2 s
    assert s["ttft_s"] == [pytest.approx(0.5), None]  # the two new first tokens' mean; then none came
    assert s["queue_s"] == [pytest.approx(1.5), None]
    for t in (104.0, 105.0):
        series.sample(t, {"generation_tokens": 190}, _histograms([0.2, 0.4, 0.6], [0.1, 1.0, 2.0]))
    assert series.as_dict()["t"] == [103.0, 104.0, 105.0] and series.as_dict()["size"] == 3  # a ring


def test_request_owners_name_an_engine_request_by_its_api_request():
    owners = RequestOwners(limit=2)
    alice, bob = User("user-a", "alice"), User("user-b", "bob")
    owners.add("chatcmpl-1", alice)
    owners.add("chatcmpl-2", bob)
    assert owners.of("chatcmpl-1-0") == alice and owners.of("chatcmpl-2-3") == bob
    assert owners.of("chatcmpl-1") is None and owners.of(None) is None  # only "<api id>-<prompt>" ids
    owners.add("cmpl-3", alice)  # over the limit: the oldest is forgotten
    assert owners.of("chatcmpl-1-0") is None and len(owners) == 2
    owners.discard("chatcmpl-2")
    assert owners.of("chatcmpl-2-0") is None and len(owners) == 1


def test_the_operators_lines_are_split_into_step_subject_action_and_detail():
    # the lines agents/operator/agent.py prints: "STEP SUBJECT [ACTION] DETAIL"
    acted = ("acted agent:2 {'reason': 'over_quota on agent:2 (a } inside)', 'kind': 'suspend_agent', "
             "'pid': 2} agent 2 suspended")
    assert _operator_line(acted) == {"step": "acted", "subject": "agent:2", "action": "suspend_agent pid=2",
                                     "text": "agent 2 suspended"}
    assert _operator_line("finding llmos kv_thrashing on llmos: rate=30.00 > 20.00 (rule)") == {
        "step": "finding", "subject": "llmos", "action": "",
        "text": "kv_thrashing on llmos: rate=30.00 > 20.00 (rule)"}
    assert _operator_line("refused pid:7 {not a dict} rate limit") == {  # an action that does not parse
        "step": "refused", "subject": "pid:7", "action": "", "text": "{not a dict} rate limit"}
    assert _operator_line("something else") == {"step": "", "subject": "", "action": "",
                                                "text": "something else"}
